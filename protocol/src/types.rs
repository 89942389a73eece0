//! Scalar types of the wire: 24-hex ids, positive limits, RFC 3339 times.

use std::fmt;

use bson::oid::ObjectId;
use chrono::{DateTime, Utc};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::Item;

/// The message of a malformed id.
pub const OBJECT_ID_MSG: &str = "must be a 24-hex ObjectId string";

/// A 24-hex ObjectId string on the wire (`orgId`, `stageIds`, `requestedBy`, …):
/// nothing else decodes, neither `{"$oid": …}` nor an operator object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Id(pub ObjectId);

impl Item for Id {
    const ARRAY: &'static str = "an array of 24-hex ObjectId strings";
}

impl Id {
    /// Parses 24 hex digits.
    pub fn parse(s: &str) -> Option<Id> {
        (s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ObjectId::parse_str(s).ok())
            .flatten()
            .map(Id)
    }
}

impl From<ObjectId> for Id {
    fn from(id: ObjectId) -> Id {
        Id(id)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Expect::new(OBJECT_ID_MSG, Id::parse))
    }
}

/// The largest accepted export `limit`.
pub const MAX_LIMIT: u64 = 100_000_000;
/// The message of a bad `limit`.
pub const LIMIT_MSG: &str = "must be a positive integer no greater than 100000000";

/// An export's row limit: an integer from 1 to [`MAX_LIMIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Limit(pub u64);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Limit;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(LIMIT_MSG)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Limit, E> {
                if (1..=MAX_LIMIT).contains(&n) {
                    Ok(Limit(n))
                } else {
                    Err(E::custom(LIMIT_MSG))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Limit, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(LIMIT_MSG))
                    .and_then(|n| self.visit_u64(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// The row limit a filter's `limit` field carries, if any.
pub trait RowLimit {
    /// At most this many rows.
    fn rows(&self) -> Option<u64>;
}

impl RowLimit for Limit {
    fn rows(&self) -> Option<u64> {
        Some(self.0)
    }
}

impl<M> RowLimit for Refused<M> {
    fn rows(&self) -> Option<u64> {
        None
    }
}

/// A field that only some commands take (a delete's `limit`): absent or null
/// decodes, anything else is refused with the message of `M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused<M>(std::marker::PhantomData<M>);

impl<M> Serialize for Refused<M> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_none()
    }
}

/// The reason a [`Refused`] field gives.
pub trait Reason {
    /// Lowercase message.
    const MESSAGE: &'static str;
}

impl<'de, M: Reason> Deserialize<'de> for Refused<M> {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(de::Error::custom(M::MESSAGE))
    }
}

/// The message of a bad date.
pub const DATE_MSG: &str = "must be an RFC 3339 date-time string";

/// An RFC 3339 time with its offset (`2026-01-01T00:00:00.000Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub DateTime<Utc>);

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }
}

impl<'de> Deserialize<'de> for Rfc3339 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn parse(s: &str) -> Option<Rfc3339> {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| Rfc3339(t.with_timezone(&Utc)))
        }
        d.deserialize_any(Expect::new(DATE_MSG, parse))
    }
}

/// A visitor taking a string through `parse`, refusing anything else with `message`.
pub(crate) struct Expect<T> {
    message: &'static str,
    parse: fn(&str) -> Option<T>,
}

impl<T> Expect<T> {
    pub(crate) fn new(message: &'static str, parse: fn(&str) -> Option<T>) -> Expect<T> {
        Expect { message, parse }
    }
}

impl<T> Visitor<'_> for Expect<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.message)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        (self.parse)(s).ok_or_else(|| E::custom(self.message))
    }
}

/// Implements `Deserialize` for a struct derived with `#[serde(remote = "Self")]`
/// so that only a JSON object decodes: serde's derive would also take an
/// array, filling the fields by position, which no caller means.
#[macro_export]
#[doc(hidden)]
macro_rules! object_only {
    ($t:ident) => {
        $crate::object_only!($t, "must be a JSON object");
    };
    ($t:ident, $msg:expr) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($msg)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<$t, A::Error> {
                        $t::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

/// Implements `Serialize` for a struct derived with `#[serde(remote = "Self")]`.
#[macro_export]
#[doc(hidden)]
macro_rules! remote_serialize {
    ($t:ident) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                $t::serialize(self, s)
            }
        }
    };
}
