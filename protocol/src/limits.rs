//! The caps of contract section 10, carried by the types: a [`List`] holds at
//! most [`MAX_LIST`] items and a [`Text`] at most [`MAX_STRING`] characters, so
//! an over-size request fails while it is decoded, naming the field and the
//! limit, before anything is stored or queried.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Most items any list of a command or body may hold.
pub const MAX_LIST: usize = 1_000;
/// Most characters any string of a command or body may hold.
pub const MAX_STRING: usize = 256;
/// Largest HTTP request body, in bytes (1 MiB).
pub const MAX_BODY: usize = 1024 * 1024;

/// The message of an over-long list.
pub fn list_too_long() -> String {
    format!("must hold at most {MAX_LIST} items")
}

/// The message of an over-long string.
pub fn string_too_long() -> String {
    format!("must be at most {MAX_STRING} characters")
}

/// What an item type is called in an array's error message.
pub trait Item {
    /// `"an array of …"`, as in "must be an array of strings".
    const ARRAY: &'static str;
}

/// A list of at most [`MAX_LIST`] items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(transparent)]
pub struct List<T>(pub Vec<T>);

impl<T> List<T> {
    /// The items.
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T> Deref for List<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<'de, T: Deserialize<'de> + Item> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Item> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(T::ARRAY)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_LIST));
                while items.len() < MAX_LIST {
                    match seq.next_element()? {
                        Some(item) => items.push(item),
                        None => return Ok(List(items)),
                    }
                }
                // One more item is one too many: refused without reading the rest.
                match seq.next_element::<IgnoredAny>()? {
                    Some(_) => Err(de::Error::custom(list_too_long())),
                    None => Ok(List(items)),
                }
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// A string of at most [`MAX_STRING`] characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(transparent)]
pub struct Text(pub String);

impl Text {
    /// The string.
    pub fn into_string(self) -> String {
        self.0
    }

    /// The string, borrowed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Item for Text {
    const ARRAY: &'static str = "an array of strings";
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                if s.chars().nth(MAX_STRING).is_some() {
                    return Err(E::custom(string_too_long()));
                }
                Ok(Text(s.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::decode_value;
    use serde_json::json;

    #[test]
    fn lists_and_strings_are_capped_inclusively() {
        let ok: List<Text> = decode_value(json!(vec!["a"; MAX_LIST]), "tags").unwrap();
        assert_eq!(ok.len(), MAX_LIST);
        let e = decode_value::<List<Text>>(json!(vec!["a"; MAX_LIST + 1]), "tags").unwrap_err();
        assert_eq!(e.field, "tags");
        assert!(e.message.contains("1000"), "{}", e.message);
        let ok: Text = decode_value(json!("é".repeat(MAX_STRING)), "filename").unwrap();
        assert_eq!(ok.chars().count(), MAX_STRING);
        let e = decode_value::<Text>(json!("x".repeat(MAX_STRING + 1)), "filename").unwrap_err();
        assert_eq!(
            e,
            crate::ValidationError::new("filename", string_too_long())
        );
        let e = decode_value::<List<Text>>(json!(["a", "b".repeat(300)]), "tags").unwrap_err();
        assert_eq!(e.field, "tags[1]");
        let e = decode_value::<List<Text>>(json!(["a", 1]), "tags").unwrap_err();
        assert_eq!(
            e,
            crate::ValidationError::new("tags[1]", "must be a string")
        );
        let e = decode_value::<List<Text>>(json!("a"), "tags").unwrap_err();
        assert_eq!(
            e,
            crate::ValidationError::new("tags", "must be an array of strings")
        );
    }
}
