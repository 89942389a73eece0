//! Decoding requests into the contract's types, with errors that name the
//! exact field path (`filter.stageIds[1]`, via `serde_path_to_error`) and say
//! what was expected in the contract's words ("must be a boolean", "unknown key").

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ValidationError;

/// Decodes a request body (NATS payload or HTTP body). Malformed JSON,
/// non-UTF-8 and nesting deeper than 128 levels are errors of `body`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ValidationError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return not_json(&inner);
        }
        error_at("", &path, &strip(&inner))
    })?;
    de.end().map_err(|e| not_json(&e))?;
    Ok(value)
}

fn not_json(e: &serde_json::Error) -> ValidationError {
    ValidationError::new("body", format!("not valid JSON: {}", strip(e)))
}

/// Decodes an already parsed value found at `prefix` (`""` for a whole body).
pub fn decode_value<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        error_at(prefix, &path, &strip(e.inner()))
    })
}

/// Joins a prefix and a path: ("filter", "stageIds[1]") → "filter.stageIds[1]";
/// an index joins without a dot.
pub fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => path.to_string(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// serde_json's message without its ` at line L column C` suffix.
fn strip(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// The validation error for serde's `message` at `path` under `prefix`.
fn error_at(prefix: &str, path: &str, message: &str) -> ValidationError {
    let path = if path == "." { "" } else { path };
    let mut field = join(prefix, path);
    let message = if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde reports the key at the object's path; name the key itself.
        let key = rest.split('`').next().unwrap_or_default();
        if !field.ends_with(key) {
            field = join(&field, key);
        }
        "unknown key".to_string()
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or_default();
        field = join(&field, key);
        "is required".to_string()
    } else if message.starts_with("duplicate field `") {
        "is given twice".to_string()
    } else if let Some(expected) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|m| m.split_once(", expected ").map(|(_, e)| e))
    {
        expected_message(expected)
    } else if message.starts_with("recursion limit exceeded") {
        "is nested too deeply".to_string()
    } else {
        message.to_string()
    };
    if field.is_empty() {
        field = "body".into();
    }
    ValidationError::new(field, message)
}

/// "must be …" for serde's "expected …".
fn expected_message(expected: &str) -> String {
    if expected.starts_with("must ") {
        expected.to_string()
    } else if expected.starts_with("struct ") || expected == "a map" {
        "must be a JSON object".to_string()
    } else {
        format!("must be {expected}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(remote = "Self", deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Inner {
        flag: Option<bool>,
        items: Option<crate::List<crate::Id>>,
    }

    crate::object_only!(Inner);

    #[derive(Debug, Deserialize)]
    #[serde(remote = "Self", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Option<Inner>,
        name: crate::Text,
    }

    crate::object_only!(Outer);

    #[test]
    fn errors_name_the_exact_path() {
        let e = |s: &str| decode::<Outer>(s.as_bytes()).unwrap_err();
        assert_eq!(e("nope").field, "body");
        assert!(e("nope").message.starts_with("not valid JSON"));
        assert_eq!(e(&"[".repeat(500)).field, "body");
        assert_eq!(
            decode::<Outer>(&[0xff, 0xfe, b'{']).unwrap_err().field,
            "body"
        );
        assert_eq!(
            e("[]"),
            ValidationError::new("body", "must be a JSON object")
        );
        assert_eq!(
            e(r#"{"name": "n", "x": 1}"#),
            ValidationError::new("x", "unknown key")
        );
        assert_eq!(e(r#"{}"#), ValidationError::new("name", "is required"));
        assert_eq!(
            e(r#"{"name": "n", "inner": {"$where": 1}}"#),
            ValidationError::new("inner.$where", "unknown key")
        );
        assert_eq!(
            e(r#"{"name": "n", "inner": {"flag": "yes"}}"#),
            ValidationError::new("inner.flag", "must be a boolean")
        );
        assert_eq!(
            e(r#"{"name": "n", "inner": {"items": ["64b2c3d4e5f60012345678aa", {"$gt": ""}]}}"#),
            ValidationError::new("inner.items[1]", crate::types::OBJECT_ID_MSG)
        );
        assert_eq!(
            e(r#"{"name": "n", "inner": "x"}"#),
            ValidationError::new("inner", "must be a JSON object")
        );
        assert_eq!(
            e(r#"{"name": 5}"#),
            ValidationError::new("name", "must be a string")
        );
        assert_eq!(e(r#"{"name": "n"} trailing"#).field, "body");
        // Serde's derive would fill a struct from an array by position: refused.
        assert_eq!(
            e(r#"["n"]"#),
            ValidationError::new("body", "must be a JSON object")
        );
        assert_eq!(
            e(r#"{"name": "n", "inner": [true]}"#),
            ValidationError::new("inner", "must be a JSON object")
        );
        let e = decode_value::<Inner>(serde_json::json!({"items": 5}), "filter").unwrap_err();
        assert_eq!(
            e,
            ValidationError::new(
                "filter.items",
                "must be an array of 24-hex ObjectId strings"
            )
        );
    }
}
