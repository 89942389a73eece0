//! Export encoding: which columns an export has, and how contact documents
//! become CSV or NDJSON bytes.
//!
//! The export job calls [`Encoder::header`] once and [`Encoder::encode_batch`]
//! (or [`Encoder::encode_rows`] on raw rows) once per batch; each call's output
//! is appended to the file. Rows are rendered from raw BSON where they lie (no
//! `Document` is built), reusing one CSV writer, one record and one cell buffer
//! per batch, so a row costs no allocation once the buffers have grown.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Write as _};

use bson::{doc, oid::ObjectId, Bson, Document, RawDocument, RawDocumentBuf};
use csv::ByteRecord;
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

mod cells;
mod fields;
pub use cells::collect_custom_keys;
use cells::*;
pub use fields::Fields;

/// Prefix of a single custom field column in a request, and of its CSV header.
const CUSTOM_PREFIX: &str = "customFields.";
/// The request token meaning "every custom field key".
const ALL_CUSTOM: &str = "customFields";
/// `strftime` pattern of RFC 3339 UTC with milliseconds.
const RFC3339_MS: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";

pub use contact_bulk_protocol::filter::Format;

/// One exported column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Column {
    /// `_id` as 24 hex digits.
    Id,
    /// `firstName`.
    FirstName,
    /// `lastName`.
    LastName,
    /// First and last name joined by a space, trimmed.
    FullName,
    /// `phone`; formula-neutralised unless it is a phone number.
    Phone,
    /// `email`.
    Email,
    /// Name of `pipelineId`.
    Pipeline,
    /// Name of `stageId`.
    Stage,
    /// Name of `ownerId`.
    Owner,
    /// `tags`.
    Tags,
    /// `createdAt`.
    CreatedAt,
    /// One custom field, by key.
    Custom(String),
    /// Every custom field key found in the exported contacts; replaced by
    /// [`ColumnSpec::expand`] before encoding.
    AllCustom,
}

/// Fixed columns: request / NDJSON name, CSV header, column.
const FIXED: [(&str, &str, Column); 11] = [
    ("id", "Id", Column::Id),
    ("firstName", "First Name", Column::FirstName),
    ("lastName", "Last Name", Column::LastName),
    ("fullName", "Full Name", Column::FullName),
    ("phone", "Phone", Column::Phone),
    ("email", "Email", Column::Email),
    ("pipeline", "Pipeline", Column::Pipeline),
    ("stage", "Stage", Column::Stage),
    ("owner", "Owner", Column::Owner),
    ("tags", "Tags", Column::Tags),
    ("createdAt", "Created Date", Column::CreatedAt),
];

impl Column {
    /// Parses one requested field name.
    fn parse(name: &str) -> Result<Column, String> {
        if let Some((_, _, c)) = FIXED.iter().find(|(n, _, _)| *n == name) {
            return Ok(c.clone());
        }
        if name == ALL_CUSTOM {
            return Ok(Column::AllCustom);
        }
        match name.strip_prefix(CUSTOM_PREFIX) {
            Some("") => Err("custom field key must not be empty".into()),
            Some(key) => Ok(Column::Custom(key.to_string())),
            None => Err(format!(
                "unknown field \"{name}\"; expected one of {}, customFields or customFields.<key>",
                FIXED.map(|(n, _, _)| n).join(", ")
            )),
        }
    }

    /// Request and NDJSON name of a fixed column, e.g. `firstName`.
    fn name(&self) -> &'static str {
        self.fixed().map_or(ALL_CUSTOM, |(n, _)| n)
    }

    /// CSV header of this column.
    fn header(&self) -> String {
        match self {
            Column::Custom(key) => format!("{CUSTOM_PREFIX}{key}"),
            Column::AllCustom => ALL_CUSTOM.to_string(),
            c => c.fixed().map_or("", |(_, h)| h).to_string(),
        }
    }

    fn fixed(&self) -> Option<(&'static str, &'static str)> {
        FIXED
            .iter()
            .find(|(_, _, c)| c == self)
            .map(|(n, h, _)| (*n, *h))
    }
}

/// Validated column selection (may contain [`Column::AllCustom`], expanded
/// later with the discovered keys). Stored in job records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSpec(pub Vec<Column>);

impl ColumnSpec {
    /// `firstName, lastName, phone, email, pipeline, stage, createdAt`.
    pub fn default_columns() -> ColumnSpec {
        ColumnSpec(vec![
            Column::FirstName,
            Column::LastName,
            Column::Phone,
            Column::Email,
            Column::Pipeline,
            Column::Stage,
            Column::CreatedAt,
        ])
    }

    /// Parses the request's `fields` (a JSON value: null/absent = default,
    /// else a non-empty array of distinct field names). Errors name `field`
    /// or `field[i]`.
    pub fn from_json(
        value: Option<&serde_json::Value>,
        field: &str,
    ) -> Result<ColumnSpec, ValidationError> {
        let items = match value {
            None | Some(serde_json::Value::Null) => return Ok(Self::default_columns()),
            Some(serde_json::Value::Array(items)) => items,
            Some(_) => return Err(ValidationError::new(field, "must be an array of strings")),
        };
        if items.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        crate::filter::check_list_len(items.len(), field)?;
        let mut seen = HashSet::with_capacity(items.len());
        let mut columns = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = || format!("{field}[{i}]");
            let Some(name) = item.as_str() else {
                return Err(ValidationError::new(at(), "must be a string"));
            };
            crate::filter::check_string_len(name, &at())?;
            let column = Column::parse(name).map_err(|m| ValidationError::new(at(), m))?;
            if !seen.insert(name) {
                return Err(ValidationError::new(
                    at(),
                    format!("duplicate field \"{name}\""),
                ));
            }
            columns.push(column);
        }
        Ok(ColumnSpec(columns))
    }

    /// The columns named in a request's `fields` (already capped by the
    /// protocol); errors name `field[i]`.
    pub fn from_names(
        names: &[contact_bulk_protocol::Text],
        field: &str,
    ) -> Result<ColumnSpec, ValidationError> {
        if names.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        let mut seen = HashSet::with_capacity(names.len());
        let mut columns = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let at = || format!("{field}[{i}]");
            let column = Column::parse(name).map_err(|m| ValidationError::new(at(), m))?;
            if !seen.insert(name.as_str()) {
                return Err(ValidationError::new(
                    at(),
                    format!("duplicate field \"{}\"", name.as_str()),
                ));
            }
            columns.push(column);
        }
        Ok(ColumnSpec(columns))
    }

    /// True when `customFields` (all keys) was requested, so the job must
    /// discover keys first.
    pub fn needs_custom_discovery(&self) -> bool {
        self.0.contains(&Column::AllCustom)
    }

    /// Replaces `AllCustom` with one `Custom(key)` per discovered key (sorted,
    /// deduplicated, skipping keys already listed explicitly).
    pub fn expand(&self, discovered: &[String]) -> ColumnSpec {
        if !self.needs_custom_discovery() {
            return self.clone();
        }
        let explicit: HashSet<&str> = self
            .0
            .iter()
            .filter_map(|c| match c {
                Column::Custom(k) => Some(k.as_str()),
                _ => None,
            })
            .collect();
        let mut keys: Vec<&String> = discovered
            .iter()
            .filter(|k| !explicit.contains(k.as_str()))
            .collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::with_capacity(self.0.len() + keys.len());
        let mut expanded = false;
        for c in &self.0 {
            match c {
                Column::AllCustom if !expanded => {
                    expanded = true;
                    out.extend(keys.iter().map(|k| Column::Custom((*k).clone())));
                }
                Column::AllCustom => {}
                c => out.push(c.clone()),
            }
        }
        ColumnSpec(out)
    }

    /// MongoDB projection of the fields these columns need (always `_id`).
    /// Custom columns project `customFields.<key>`, or the whole
    /// `customFields` when all keys are wanted or a key is not a plain path
    /// segment (contains `.` or starts with `$`).
    pub fn projection(&self) -> Document {
        let mut p = doc! {"_id": 1};
        let whole_custom = self.0.iter().any(|c| match c {
            Column::AllCustom => true,
            Column::Custom(k) => k.is_empty() || k.contains('.') || k.starts_with('$'),
            _ => false,
        });
        for c in &self.0 {
            let path = match c {
                Column::Id => "_id",
                Column::FirstName => "firstName",
                Column::LastName => "lastName",
                Column::FullName => {
                    p.insert("firstName", 1);
                    "lastName"
                }
                Column::Phone => "phone",
                Column::Email => "email",
                Column::Pipeline => "pipelineId",
                Column::Stage => "stageId",
                Column::Owner => "ownerId",
                Column::Tags => "tags",
                Column::CreatedAt => "createdAt",
                Column::Custom(key) if !whole_custom => {
                    p.insert(format!("{CUSTOM_PREFIX}{key}"), 1);
                    continue;
                }
                Column::Custom(_) | Column::AllCustom => ALL_CUSTOM,
            };
            p.insert(path, 1);
        }
        p
    }

    /// True when the owner name must be resolved.
    pub fn needs_owner(&self) -> bool {
        self.0.contains(&Column::Owner)
    }

    /// True when the pipeline name must be resolved.
    pub fn needs_pipeline(&self) -> bool {
        self.0.contains(&Column::Pipeline)
    }

    /// True when the stage name must be resolved.
    pub fn needs_stage(&self) -> bool {
        self.0.contains(&Column::Stage)
    }
}

/// Names resolved by the job, looked up per batch, never per row.
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// Pipeline id → name.
    pub pipelines: HashMap<ObjectId, String>,
    /// Stage id → name.
    pub stages: HashMap<ObjectId, String>,
    /// Owner (user) id → display name.
    pub owners: HashMap<ObjectId, String>,
}

/// Renders contact documents in one format with fixed, expanded columns.
#[derive(Debug, Clone)]
pub struct Encoder {
    format: Format,
    columns: Vec<Column>,
    /// NDJSON: `"name":` of each column, pre-escaped (`"customFields":` for
    /// the first custom column, empty for the others).
    json_keys: Vec<Vec<u8>>,
    /// NDJSON: `"key":` and key of each custom column, in column order.
    json_custom: Vec<(Vec<u8>, String)>,
}

impl Encoder {
    /// `columns` must already be expanded; a leftover `AllCustom` is ignored.
    pub fn new(format: Format, columns: ColumnSpec) -> Encoder {
        let columns: Vec<Column> = columns
            .0
            .into_iter()
            .filter(|c| *c != Column::AllCustom)
            .collect();
        let mut json_keys = Vec::with_capacity(columns.len());
        let mut json_custom = Vec::new();
        for c in &columns {
            match c {
                Column::Custom(key) => {
                    let first = json_custom.is_empty();
                    json_custom.push((json_key(key), key.clone()));
                    json_keys.push(if first {
                        json_key(ALL_CUSTOM)
                    } else {
                        Vec::new()
                    });
                }
                c => json_keys.push(json_key(c.name())),
            }
        }
        Encoder {
            format,
            columns,
            json_keys,
            json_custom,
        }
    }

    /// The CSV header line (with `\n`), empty for NDJSON.
    pub async fn header(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        if self.format == Format::Csv {
            let mut wtr = csv_builder().from_writer(&mut out);
            wtr.write_record(self.columns.iter().map(Column::header))
                .map_err(io::Error::from)?;
            wtr.flush()?;
        }
        Ok(out)
    }

    /// Encodes one batch of documents, appending to `out`. Returns rows written.
    pub async fn encode_batch(
        &self,
        docs: &[Document],
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let raw = docs
            .iter()
            .map(RawDocumentBuf::from_document)
            .collect::<Result<Vec<_>, _>>()
            .map_err(io::Error::other)?;
        self.encode_rows(raw.iter().map(|d| d.as_ref()), names, out)
    }

    /// Encodes raw rows, appending to `out`; the fields each column needs are
    /// read where they lie, nothing is decoded. Returns rows written.
    pub fn encode_rows<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a RawDocument>,
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        self.encode_fields(rows.into_iter().map(Fields::read), names, out)
    }

    /// Encodes rows whose fields were already read (see [`Fields`]),
    /// appending to `out`. Returns rows written.
    pub fn encode_fields<'a>(
        &self,
        rows: impl IntoIterator<Item = Fields<'a>>,
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        match self.format {
            Format::Csv => self.encode_csv(rows, names, out),
            Format::Ndjson => self.encode_ndjson(rows, names, out),
        }
    }

    fn encode_csv<'a>(
        &self,
        rows: impl IntoIterator<Item = Fields<'a>>,
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let mut wtr = csv_builder().from_writer(&mut *out);
        let mut record = ByteRecord::with_capacity(256, self.columns.len());
        // `cell` always starts with the neutralising quote; it is written
        // without it unless the value needs it.
        let mut cell = String::with_capacity(128);
        let mut n = 0;
        for row in rows {
            record.clear();
            for c in &self.columns {
                cell.clear();
                cell.push('\'');
                render_text(c, &row, names, &mut cell);
                let value = &cell[1..];
                if needs_quote(c, value) {
                    record.push_field(cell.as_bytes());
                } else {
                    record.push_field(value.as_bytes());
                }
            }
            wtr.write_byte_record(&record).map_err(io::Error::from)?;
            n += 1;
        }
        wtr.flush()?;
        Ok(n)
    }

    fn encode_ndjson<'a>(
        &self,
        rows: impl IntoIterator<Item = Fields<'a>>,
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let mut cell = String::with_capacity(128);
        let mut n = 0;
        for row in rows {
            out.push(b'{');
            let mut first = true;
            for (c, key) in self.columns.iter().zip(&self.json_keys) {
                if key.is_empty() {
                    continue; // a custom column already inside `customFields`
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(key);
                match c {
                    Column::Custom(_) => self.write_custom_json(row.custom, out)?,
                    c => write_column_json(c, &row, names, &mut cell, out)?,
                }
            }
            out.extend_from_slice(b"}\n");
            n += 1;
        }
        Ok(n)
    }

    fn write_custom_json(&self, custom: Option<&RawDocument>, out: &mut Vec<u8>) -> io::Result<()> {
        out.push(b'{');
        for (i, (key, name)) in self.json_custom.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key);
            write_json(custom.and_then(|d| field(d, name)), out)?;
        }
        out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests;
