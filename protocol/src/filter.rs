//! The filter of contract section 3 as it arrives, and the enums it shares
//! with job records (`PipelineType`, `OwnerFilter`) and exports (`Format`).
//!
//! [`FilterSpec`] only decodes what the contract allows: closed key sets,
//! typed values, capped lists. The job core turns it into its validated
//! `Filter` (deduplicated, `stageIds` required unless `orgWide`), which alone
//! builds MongoDB queries.

use std::fmt;

use serde::de;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::limits::{list_too_long, List, Text, MAX_LIST};
use crate::types::{Id, Limit, Reason, Refused, Rfc3339};

/// Which pipeline (and so which collection) a filter selects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PipelineType {
    /// `contacts`.
    #[default]
    Contact,
    /// `applications`.
    Application,
}

impl PipelineType {
    /// The MongoDB collection holding this pipeline's documents.
    pub fn collection(self) -> &'static str {
        match self {
            PipelineType::Contact => "contacts",
            PipelineType::Application => "applications",
        }
    }

    /// The wire name: `"Contact"` or `"Application"`.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineType::Contact => "Contact",
            PipelineType::Application => "Application",
        }
    }

    /// Parses the wire name (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<PipelineType> {
        match s {
            "Contact" => Some(PipelineType::Contact),
            "Application" => Some(PipelineType::Application),
            _ => None,
        }
    }
}

/// Restricts the selection by whether a contact has an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerFilter {
    /// `ownerId` is set (neither null nor missing).
    Owned,
    /// `ownerId` is null or missing.
    Unowned,
}

impl OwnerFilter {
    /// The wire name: `"owned"` or `"unowned"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerFilter::Owned => "owned",
            OwnerFilter::Unowned => "unowned",
        }
    }

    /// Parses the wire name (exact, case-sensitive).
    pub fn parse(s: &str) -> Option<OwnerFilter> {
        match s {
            "owned" => Some(OwnerFilter::Owned),
            "unowned" => Some(OwnerFilter::Unowned),
            _ => None,
        }
    }
}

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Format {
    /// RFC 4180 CSV with a header line, `\n` terminated.
    #[default]
    Csv,
    /// One JSON object per line.
    Ndjson,
}

impl Format {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
        }
    }

    /// File extension, without the dot.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }

    /// HTTP content type of the (uncompressed) file.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    /// Parses a request's format (ASCII case-insensitive).
    pub fn from_name(s: &str) -> Option<Format> {
        if s.eq_ignore_ascii_case("csv") {
            Some(Format::Csv)
        } else if s.eq_ignore_ascii_case("ndjson") {
            Some(Format::Ndjson)
        } else {
            None
        }
    }
}

/// Serialises and deserialises an enum by its wire name, refusing anything
/// else with `$msg`.
macro_rules! by_name {
    ($t:ty, $parse:path, $msg:expr) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(crate::types::Expect::new($msg, $parse))
            }
        }
    };
}

by_name!(
    PipelineType,
    PipelineType::parse,
    "must be \"Contact\" or \"Application\""
);
by_name!(
    OwnerFilter,
    OwnerFilter::parse,
    "must be \"owned\" or \"unowned\""
);
by_name!(Format, Format::from_name, "must be one of csv, ndjson");

/// A filter of an export or a count: `limit` allowed.
pub type ExportFilter = FilterSpec<Limit>;
/// A filter of a delete: `limit` refused.
pub type DeleteFilter = FilterSpec<Refused<ExportsOnly>>;

/// Why a delete refuses `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportsOnly;

impl Reason for ExportsOnly {
    const MESSAGE: &'static str = "limit applies only to exports";
}

/// The filter as sent. Nulls mean "not given"; unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    remote = "Self",
    rename_all = "camelCase",
    deny_unknown_fields,
    bound(deserialize = "L: Deserialize<'de>", serialize = "L: Serialize")
)]
pub struct FilterSpec<L> {
    /// Stage ids; only read when `orgWide` is not true (then ignored entirely).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_ids: Option<StageIds>,
    /// Every stage of the organisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_wide: Option<bool>,
    /// Contacts (default) or applications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_type: Option<PipelineType>,
    /// Owned / unowned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_filter: Option<OwnerFilter>,
    /// Further restrictions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advanced_params: Option<AdvancedParamsSpec>,
    /// At most this many rows (exports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<L>,
}

impl<L> FilterSpec<L> {
    /// `{"orgWide": true}`: every contact of the organisation.
    pub fn org_wide() -> Self {
        FilterSpec {
            org_wide: Some(true),
            ..FilterSpec::default()
        }
    }
}

impl<L> Default for FilterSpec<L> {
    fn default() -> Self {
        FilterSpec {
            stage_ids: None,
            org_wide: None,
            pipeline_type: None,
            owner_filter: None,
            advanced_params: None,
            limit: None,
        }
    }
}

/// `advancedParams`: dates, tags and owners; nothing else.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct AdvancedParamsSpec {
    /// `createdAt >= createdAfter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<Rfc3339>,
    /// `createdAt < createdBefore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<Rfc3339>,
    /// The contact has all of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<List<Text>>,
    /// The contact has at least one of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any_tags: Option<List<Text>>,
    /// The contact's owner is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_ids: Option<List<Id>>,
}

crate::object_only!(AdvancedParamsSpec, "must be an object or null");
crate::remote_serialize!(AdvancedParamsSpec);

impl<L: Serialize> Serialize for FilterSpec<L> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        FilterSpec::serialize(self, s)
    }
}

impl<'de, L: Deserialize<'de>> Deserialize<'de> for FilterSpec<L> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<L>(std::marker::PhantomData<L>);
        impl<'de, L: Deserialize<'de>> de::Visitor<'de> for V<L> {
            type Value = FilterSpec<L>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("must be a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                FilterSpec::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// `stageIds` as sent, decoded as a [`List`] of [`Id`]s only when the filter
/// is not org-wide (`orgWide: true` ignores it, whatever it holds). A list over
/// the cap is refused either way.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct StageIds(pub Value);

impl StageIds {
    /// The ids, with errors named under `field`.
    pub fn decode(self, field: &str) -> Result<List<Id>, crate::ValidationError> {
        crate::parse::decode_value(self.0, field)
    }
}

impl<'de> Deserialize<'de> for StageIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        match &value {
            Value::Array(items) if items.len() > MAX_LIST => {
                Err(de::Error::custom(list_too_long()))
            }
            _ => Ok(StageIds(value)),
        }
    }
}

impl fmt::Display for PipelineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
