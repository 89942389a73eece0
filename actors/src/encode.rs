//! Export encoding: which columns an export has, and how contact documents
//! become CSV or NDJSON bytes.
//!
//! The export job calls [`Encoder::header`] once and [`Encoder::encode_batch`]
//! once per batch; each call's output is appended to the file. Rendering reuses
//! one CSV writer, one record and one cell buffer per batch, so a row costs no
//! allocation once the buffers have grown.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Write as _};

use bson::{doc, oid::ObjectId, Bson, Document};
use csv_async::{AsyncWriterBuilder, ByteRecord, Terminator};
use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Prefix of a single custom field column in a request, and of its CSV header.
const CUSTOM_PREFIX: &str = "customFields.";
/// The request token meaning "every custom field key".
const ALL_CUSTOM: &str = "customFields";
/// `strftime` pattern of RFC 3339 UTC with milliseconds.
const RFC3339_MS: &str = "%Y-%m-%dT%H:%M:%S%.3fZ";

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RFC 4180 CSV with a header line, `\n` terminated.
    #[default]
    Csv,
    /// One JSON object per line.
    Ndjson,
}

impl Format {
    /// File extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
        }
    }

    /// HTTP content type of the (uncompressed) file.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    /// Parses a request's format (ASCII case-insensitive); errors name `field`.
    pub fn parse(s: &str, field: &str) -> Result<Format, ValidationError> {
        if s.eq_ignore_ascii_case("csv") {
            Ok(Format::Csv)
        } else if s.eq_ignore_ascii_case("ndjson") {
            Ok(Format::Ndjson)
        } else {
            Err(ValidationError::new(field, "must be one of csv, ndjson"))
        }
    }
}

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
    /// `phone`; never formula-neutralised.
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
        let mut seen = HashSet::with_capacity(items.len());
        let mut columns = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = || format!("{field}[{i}]");
            let Some(name) = item.as_str() else {
                return Err(ValidationError::new(at(), "must be a string"));
            };
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
            let mut wtr = csv_builder().create_writer(&mut out);
            wtr.write_record(self.columns.iter().map(Column::header))
                .await
                .map_err(io::Error::from)?;
            wtr.into_inner().await?;
        }
        Ok(out)
    }

    /// Encodes one batch, appending to `out`. Returns rows written.
    pub async fn encode_batch(
        &self,
        docs: &[Document],
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        match self.format {
            Format::Csv => self.encode_csv(docs, names, out).await,
            Format::Ndjson => self.encode_ndjson(docs, names, out),
        }
    }

    async fn encode_csv(
        &self,
        docs: &[Document],
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let mut wtr = csv_builder().create_writer(&mut *out);
        let mut record = ByteRecord::with_capacity(256, self.columns.len());
        // `cell` always starts with the neutralising quote; it is written
        // without it unless the value needs it.
        let mut cell = String::with_capacity(128);
        for doc in docs {
            record.clear();
            let custom = custom_fields(doc);
            for c in &self.columns {
                cell.clear();
                cell.push('\'');
                render_text(c, doc, custom, names, &mut cell);
                let value = &cell[1..];
                if *c != Column::Phone && is_formula(value) {
                    record.push_field(cell.as_bytes());
                } else {
                    record.push_field(value.as_bytes());
                }
            }
            wtr.write_byte_record(&record)
                .await
                .map_err(io::Error::from)?;
        }
        wtr.into_inner().await?;
        Ok(docs.len())
    }

    fn encode_ndjson(
        &self,
        docs: &[Document],
        names: &Names,
        out: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let mut cell = String::with_capacity(128);
        for doc in docs {
            let custom = custom_fields(doc);
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
                    Column::Custom(_) => self.write_custom_json(custom, out)?,
                    c => write_column_json(c, doc, names, &mut cell, out)?,
                }
            }
            out.extend_from_slice(b"}\n");
        }
        Ok(docs.len())
    }

    fn write_custom_json(&self, custom: Option<&Document>, out: &mut Vec<u8>) -> io::Result<()> {
        out.push(b'{');
        for (i, (key, name)) in self.json_custom.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key);
            write_json(custom.and_then(|d| d.get(name)), out)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// Collects the custom-field keys of one document into `keys`.
pub fn collect_custom_keys(doc: &Document, keys: &mut BTreeSet<String>) {
    if let Some(custom) = custom_fields(doc) {
        for k in custom.keys() {
            if !keys.contains(k) {
                keys.insert(k.clone());
            }
        }
    }
}

fn csv_builder() -> AsyncWriterBuilder {
    let mut b = AsyncWriterBuilder::new();
    b.terminator(Terminator::Any(b'\n'))
        .has_headers(false)
        .flexible(false)
        .buffer_capacity(64 * 1024);
    b
}

/// `"key":` as JSON.
fn json_key(key: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(key).unwrap_or_default();
    v.push(b':');
    v
}

fn custom_fields(doc: &Document) -> Option<&Document> {
    match doc.get(ALL_CUSTOM) {
        Some(Bson::Document(d)) => Some(d),
        _ => None,
    }
}

/// Would a spreadsheet read this cell as a formula?
fn is_formula(value: &str) -> bool {
    matches!(
        value.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// Appends the name of the id at `key`; false when absent or unknown.
fn push_name(doc: &Document, key: &str, map: &HashMap<ObjectId, String>, out: &mut String) -> bool {
    match doc.get(key) {
        Some(Bson::ObjectId(id)) => map.get(id).map(|n| out.push_str(n)).is_some(),
        _ => false,
    }
}

/// Appends the CSV text of column `c` to `out`; false when the value is
/// missing (null, absent, unresolved name, empty full name).
fn render_text(
    c: &Column,
    doc: &Document,
    custom: Option<&Document>,
    names: &Names,
    out: &mut String,
) -> bool {
    match c {
        Column::Id => text(doc.get("_id"), out),
        Column::FirstName => text(doc.get("firstName"), out),
        Column::LastName => text(doc.get("lastName"), out),
        Column::Phone => text(doc.get("phone"), out),
        Column::Email => text(doc.get("email"), out),
        Column::FullName => full_name(doc, out),
        Column::Pipeline => push_name(doc, "pipelineId", &names.pipelines, out),
        Column::Stage => push_name(doc, "stageId", &names.stages, out),
        Column::Owner => push_name(doc, "ownerId", &names.owners, out),
        Column::Tags => match doc.get("tags") {
            Some(Bson::Array(tags)) => {
                for (i, t) in tags.iter().filter(|t| !is_null(t)).enumerate() {
                    out.push_str(if i > 0 { ", " } else { "" });
                    text(Some(t), out);
                }
                true
            }
            other => text(other, out),
        },
        Column::CreatedAt => match doc.get("createdAt") {
            Some(Bson::DateTime(d)) => write!(out, "{}", d.to_chrono().format("%Y-%m-%d")).is_ok(),
            other => text(other, out),
        },
        Column::Custom(key) => text(custom.and_then(|d| d.get(key)), out),
        Column::AllCustom => false,
    }
}

/// First and last name joined by a space, trimmed; false when that is empty.
fn full_name(doc: &Document, out: &mut String) -> bool {
    let start = out.len();
    text(doc.get("firstName"), out);
    out.push(' ');
    text(doc.get("lastName"), out);
    let end = start + out[start..].trim_end().len();
    out.truncate(end);
    let lead = out[start..].len() - out[start..].trim_start().len();
    out.drain(start..start + lead);
    out.len() > start
}

fn is_null(v: &Bson) -> bool {
    matches!(v, Bson::Null | Bson::Undefined)
}

/// A value as text: strings as is, numbers as their shortest text, booleans
/// `true`/`false`, dates RFC 3339 UTC with milliseconds, ids as hex, null and
/// missing as nothing (returning false), anything else as relaxed extended JSON.
fn text(v: Option<&Bson>, out: &mut String) -> bool {
    let written = match v {
        None | Some(Bson::Null | Bson::Undefined) => return false,
        Some(Bson::String(s) | Bson::Symbol(s)) => out.write_str(s),
        Some(Bson::Int32(i)) => write!(out, "{i}"),
        Some(Bson::Int64(i)) => write!(out, "{i}"),
        Some(Bson::Double(f)) => number_text(*f, out),
        Some(Bson::Boolean(b)) => write!(out, "{b}"),
        Some(Bson::DateTime(d)) => write!(out, "{}", d.to_chrono().format(RFC3339_MS)),
        Some(Bson::ObjectId(id)) => write!(out, "{id}"),
        Some(Bson::Decimal128(d)) => write!(out, "{d}"),
        Some(other) => write!(out, "{}", other.clone().into_relaxed_extjson()),
    };
    written.is_ok()
}

/// Shortest text of a double, as JavaScript prints it: plain notation for
/// 1e-7 ≤ |x| < 1e21, exponent notation otherwise.
fn number_text(f: f64, out: &mut String) -> std::fmt::Result {
    if f == 0.0 {
        write!(out, "0")
    } else if f.is_nan() {
        write!(out, "NaN")
    } else if f.is_infinite() {
        write!(out, "{}Infinity", if f < 0.0 { "-" } else { "" })
    } else if (1e-7..1e21).contains(&f.abs()) {
        write!(out, "{f}")
    } else {
        write!(out, "{f:e}")
    }
}

/// NDJSON value of a fixed column: a string or null; `tags` an array of
/// strings; `createdAt` RFC 3339 with milliseconds.
fn write_column_json(
    c: &Column,
    doc: &Document,
    names: &Names,
    cell: &mut String,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let value = |key| doc.get(key).filter(|v| !is_null(v));
    let tags = match c {
        Column::Tags => match value("tags") {
            Some(Bson::Array(tags)) => tags.as_slice(),
            Some(v) => std::slice::from_ref(v),
            None => return write_opt_str(None, out),
        },
        Column::CreatedAt => match value("createdAt") {
            Some(v) => return write_text_json(v, cell, out),
            None => return write_opt_str(None, out),
        },
        _ => {
            cell.clear();
            let present = render_text(c, doc, None, names, cell);
            return write_opt_str(present.then_some(cell.as_str()), out);
        }
    };
    out.push(b'[');
    for (i, t) in tags.iter().filter(|t| !is_null(t)).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_text_json(t, cell, out)?;
    }
    out.push(b']');
    Ok(())
}

/// A value as a JSON string (its text), e.g. a number in `firstName`.
fn write_text_json(v: &Bson, cell: &mut String, out: &mut Vec<u8>) -> io::Result<()> {
    if let Bson::String(s) = v {
        return write_opt_str(Some(s), out);
    }
    cell.clear();
    text(Some(v), cell);
    write_opt_str(Some(cell.as_str()), out)
}

fn write_opt_str(s: Option<&str>, out: &mut Vec<u8>) -> io::Result<()> {
    match s {
        Some(s) => serde_json::to_writer(&mut *out, s).map_err(io::Error::from),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// A value as native JSON: numbers, booleans, strings, null; dates RFC 3339
/// strings; ids hex strings; decimals strings; arrays and documents nested.
fn write_json(v: Option<&Bson>, out: &mut Vec<u8>) -> io::Result<()> {
    let Some(v) = v else {
        out.extend_from_slice(b"null");
        return Ok(());
    };
    match v {
        Bson::Null | Bson::Undefined => out.extend_from_slice(b"null"),
        Bson::String(s) | Bson::Symbol(s) => write_opt_str(Some(s), out)?,
        Bson::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Bson::Int32(i) => write!(out, "{i}")?,
        Bson::Int64(i) => write!(out, "{i}")?,
        Bson::Double(f) if f.is_finite() => serde_json::to_writer(&mut *out, f)?,
        Bson::Double(_) => out.extend_from_slice(b"null"),
        Bson::DateTime(d) => write!(out, "\"{}\"", d.to_chrono().format(RFC3339_MS))?,
        Bson::ObjectId(id) => write!(out, "\"{id}\"")?,
        Bson::Decimal128(d) => write!(out, "\"{d}\"")?,
        Bson::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(Some(item), out)?;
            }
            out.push(b']');
        }
        Bson::Document(d) => {
            out.push(b'{');
            for (i, (k, item)) in d.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&json_key(k));
                write_json(Some(item), out)?;
            }
            out.push(b'}');
        }
        other => serde_json::to_writer(&mut *out, &other.clone().into_relaxed_extjson())?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::DateTime;
    use serde_json::json;

    fn oid(n: u8) -> ObjectId {
        ObjectId::from_bytes([n; 12])
    }

    /// 2026-05-20T10:11:12.345Z
    fn created() -> DateTime {
        DateTime::from_millis(1_779_271_872_345)
    }

    fn names() -> Names {
        let mut n = Names::default();
        n.pipelines.insert(oid(1), "Sales".into());
        n.stages.insert(oid(2), "Won, finally".into());
        n.owners.insert(oid(3), "Olga \"O\" Owner".into());
        n
    }

    fn contact() -> Document {
        doc! {
            "_id": oid(9),
            "firstName": "Ann",
            "lastName": "Lee",
            "phone": "+14165550100",
            "email": "ann@example.com",
            "pipelineId": oid(1),
            "stageId": oid(2),
            "ownerId": oid(3),
            "tags": ["vip", "new"],
            "customFields": {"plan": "gold", "seats": 5, "active": true},
            "createdAt": created(),
        }
    }

    fn spec(fields: &[&str]) -> ColumnSpec {
        let v = json!(fields);
        match ColumnSpec::from_json(Some(&v), "fields") {
            Ok(s) => s,
            Err(e) => panic!("{fields:?}: {e}"),
        }
    }

    fn err(v: serde_json::Value) -> ValidationError {
        ColumnSpec::from_json(Some(&v), "fields").unwrap_err()
    }

    async fn csv_of(columns: ColumnSpec, docs: &[Document], names: &Names) -> String {
        let enc = Encoder::new(Format::Csv, columns);
        let mut out = enc.header().await.unwrap();
        let n = enc.encode_batch(docs, names, &mut out).await.unwrap();
        assert_eq!(n, docs.len());
        String::from_utf8(out).unwrap()
    }

    async fn ndjson_of(columns: ColumnSpec, docs: &[Document], names: &Names) -> String {
        let enc = Encoder::new(Format::Ndjson, columns);
        let mut out = enc.header().await.unwrap();
        assert!(out.is_empty());
        let n = enc.encode_batch(docs, names, &mut out).await.unwrap();
        assert_eq!(n, docs.len());
        String::from_utf8(out).unwrap()
    }

    /// Parses CSV with the `csv` crate; the first record is the header.
    fn parse_csv(s: &str) -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(s.as_bytes())
            .records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect()
    }

    fn parse_lines(s: &str) -> Vec<serde_json::Value> {
        assert!(s.is_empty() || s.ends_with('\n'));
        s.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    #[test]
    fn format_basics() {
        assert_eq!(Format::default(), Format::Csv);
        assert_eq!(Format::Csv.extension(), "csv");
        assert_eq!(Format::Ndjson.extension(), "ndjson");
        assert_eq!(Format::Csv.content_type(), "text/csv; charset=utf-8");
        assert_eq!(Format::Ndjson.content_type(), "application/x-ndjson");
        assert_eq!(Format::parse("csv", "format"), Ok(Format::Csv));
        assert_eq!(Format::parse("NDJSON", "format"), Ok(Format::Ndjson));
        let e = Format::parse("xlsx", "format").unwrap_err();
        assert_eq!(e.field, "format");
        assert_eq!(
            serde_json::to_value(Format::Ndjson).unwrap(),
            json!("ndjson")
        );
        let f: Format = serde_json::from_value(json!("csv")).unwrap();
        assert_eq!(f, Format::Csv);
    }

    #[test]
    fn fields_default_when_absent_or_null() {
        let d = ColumnSpec::default_columns();
        assert_eq!(ColumnSpec::from_json(None, "fields").unwrap(), d);
        assert_eq!(
            ColumnSpec::from_json(Some(&json!(null)), "fields").unwrap(),
            d
        );
        assert!(!d.needs_custom_discovery());
        assert!(d.needs_pipeline() && d.needs_stage() && !d.needs_owner());
    }

    #[test]
    fn fields_parse_every_name() {
        let s = spec(&[
            "id",
            "firstName",
            "lastName",
            "fullName",
            "phone",
            "email",
            "pipeline",
            "stage",
            "owner",
            "tags",
            "createdAt",
            "customFields.plan",
            "customFields",
            "customFields.a.b",
        ]);
        assert_eq!(
            s.0,
            vec![
                Column::Id,
                Column::FirstName,
                Column::LastName,
                Column::FullName,
                Column::Phone,
                Column::Email,
                Column::Pipeline,
                Column::Stage,
                Column::Owner,
                Column::Tags,
                Column::CreatedAt,
                Column::Custom("plan".into()),
                Column::AllCustom,
                Column::Custom("a.b".into()),
            ]
        );
        assert!(s.needs_custom_discovery() && s.needs_owner());
        let s = spec(&["email"]);
        assert!(!s.needs_owner() && !s.needs_pipeline() && !s.needs_stage());
    }

    #[test]
    fn fields_errors() {
        let e = err(json!([]));
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("fields", "must not be empty")
        );
        let e = err(json!("firstName"));
        assert_eq!(e.field, "fields");
        let e = err(json!({"a": 1}));
        assert_eq!(e.field, "fields");
        let e = err(json!(["firstName", "nickname"]));
        assert_eq!(e.field, "fields[1]");
        assert!(
            e.message.contains("unknown field \"nickname\""),
            "{}",
            e.message
        );
        let e = err(json!(["FirstName"]));
        assert_eq!(e.field, "fields[0]");
        let e = err(json!(["email", 3]));
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("fields[1]", "must be a string")
        );
        let e = err(json!(["email", "phone", "email"]));
        assert_eq!(e.field, "fields[2]");
        assert!(e.message.contains("duplicate"), "{}", e.message);
        let e = err(json!(["customFields", "customFields"]));
        assert_eq!(e.field, "fields[1]");
        let e = err(json!(["customFields.x", "customFields.x"]));
        assert_eq!(e.field, "fields[1]");
        let e = err(json!(["email", "customFields."]));
        assert_eq!(e.field, "fields[1]");
        assert!(e.message.contains("must not be empty"), "{}", e.message);
        let e = ColumnSpec::from_json(Some(&json!(["x"])), "export.fields").unwrap_err();
        assert_eq!(e.field, "export.fields[0]");
        assert_eq!(e.to_string(), format!("export.fields[0]: {}", e.message));
    }

    #[test]
    fn expand_custom_columns() {
        let s = spec(&["email", "customFields", "customFields.b", "phone"]);
        let discovered: Vec<String> = ["z", "b", "a", "a"].map(String::from).to_vec();
        let e = s.expand(&discovered);
        assert_eq!(
            e.0,
            vec![
                Column::Email,
                Column::Custom("a".into()),
                Column::Custom("z".into()),
                Column::Custom("b".into()),
                Column::Phone,
            ]
        );
        assert!(!e.needs_custom_discovery());
        // Nothing discovered: the token disappears.
        assert_eq!(
            s.expand(&[]).0,
            vec![Column::Email, Column::Custom("b".into()), Column::Phone]
        );
        // Without the token, expansion is the identity.
        let plain = spec(&["email", "customFields.q"]);
        assert_eq!(plain.expand(&discovered), plain);
    }

    #[test]
    fn projections() {
        assert_eq!(
            ColumnSpec::default_columns().projection(),
            doc! {"_id": 1, "firstName": 1, "lastName": 1, "phone": 1, "email": 1,
            "pipelineId": 1, "stageId": 1, "createdAt": 1}
        );
        assert_eq!(
            spec(&[
                "fullName",
                "id",
                "owner",
                "tags",
                "customFields.plan",
                "customFields.x"
            ])
            .projection(),
            doc! {"_id": 1, "firstName": 1, "lastName": 1, "ownerId": 1, "tags": 1,
            "customFields.plan": 1, "customFields.x": 1}
        );
        assert_eq!(
            spec(&["customFields.plan", "customFields"]).projection(),
            doc! {"_id": 1, "customFields": 1}
        );
        // A key that is not a plain path segment projects the whole object.
        assert_eq!(
            spec(&["customFields.plan", "customFields.a.b"]).projection(),
            doc! {"_id": 1, "customFields": 1}
        );
        assert_eq!(
            spec(&["customFields.$x"]).projection(),
            doc! {"_id": 1, "customFields": 1}
        );
    }

    #[test]
    fn column_spec_bson_and_json_round_trip() {
        let s = spec(&[
            "id",
            "fullName",
            "customFields.plan",
            "customFields",
            "createdAt",
        ]);
        let b = bson::to_bson(&s).unwrap();
        assert!(matches!(b, Bson::Array(_)));
        let back: ColumnSpec = bson::from_bson(b).unwrap();
        assert_eq!(back, s);
        // Embedded in a document, serialised to bytes and back, as in a job record.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Rec {
            columns: ColumnSpec,
            format: Format,
        }
        let rec = Rec {
            columns: s.clone(),
            format: Format::Ndjson,
        };
        let d = bson::to_document(&rec).unwrap();
        let mut bytes = Vec::new();
        d.to_writer(&mut bytes).unwrap();
        let d2 = Document::from_reader(&mut bytes.as_slice()).unwrap();
        assert_eq!(d2.get_str("format").unwrap(), "ndjson");
        let rec2: Rec = bson::from_document(d2).unwrap();
        assert_eq!(rec2, rec);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ColumnSpec>(&j).unwrap(), s);
    }

    #[tokio::test]
    async fn default_header_and_zero_rows() {
        let out = csv_of(ColumnSpec::default_columns(), &[], &Names::default()).await;
        assert_eq!(
            out,
            "First Name,Last Name,Phone,Email,Pipeline,Stage,Created Date\n"
        );
        let enc = Encoder::new(Format::Csv, ColumnSpec::default_columns());
        let mut buf = Vec::new();
        assert_eq!(
            enc.encode_batch(&[], &Names::default(), &mut buf)
                .await
                .unwrap(),
            0
        );
        assert!(buf.is_empty());
        assert_eq!(
            ndjson_of(ColumnSpec::default_columns(), &[], &names()).await,
            ""
        );
    }

    #[tokio::test]
    async fn all_headers() {
        let s = spec(&[
            "id",
            "firstName",
            "lastName",
            "fullName",
            "phone",
            "email",
            "pipeline",
            "stage",
            "owner",
            "tags",
            "createdAt",
            "customFields.plan",
            "customFields.a,b",
        ]);
        let out = csv_of(s, &[], &Names::default()).await;
        assert_eq!(
            out,
            "Id,First Name,Last Name,Full Name,Phone,Email,Pipeline,Stage,Owner,Tags,\
             Created Date,customFields.plan,\"customFields.a,b\"\n"
        );
    }

    #[tokio::test]
    async fn default_row() {
        let out = csv_of(ColumnSpec::default_columns(), &[contact()], &names()).await;
        assert_eq!(
            out,
            "First Name,Last Name,Phone,Email,Pipeline,Stage,Created Date\n\
             Ann,Lee,+14165550100,ann@example.com,Sales,\"Won, finally\",2026-05-20\n"
        );
    }

    #[tokio::test]
    async fn every_column_csv() {
        let s = spec(&[
            "id",
            "fullName",
            "owner",
            "tags",
            "createdAt",
            "customFields",
            "stage",
            "pipeline",
        ])
        .expand(&[
            "seats".into(),
            "active".into(),
            "plan".into(),
            "gone".into(),
        ]);
        let out = csv_of(s, &[contact()], &names()).await;
        let rows = parse_csv(&out);
        assert_eq!(
            rows,
            vec![
                vec![
                    "Id",
                    "Full Name",
                    "Owner",
                    "Tags",
                    "Created Date",
                    "customFields.active",
                    "customFields.gone",
                    "customFields.plan",
                    "customFields.seats",
                    "Stage",
                    "Pipeline",
                ],
                vec![
                    "090909090909090909090909",
                    "Ann Lee",
                    "Olga \"O\" Owner",
                    "vip, new",
                    "2026-05-20",
                    "true",
                    "",
                    "gold",
                    "5",
                    "Won, finally",
                    "Sales",
                ],
            ]
        );
    }

    #[tokio::test]
    async fn tricky_values_round_trip_through_csv_parser() {
        let d = doc! {
            "_id": oid(7),
            "firstName": "Smith, \"Jr\"",
            "lastName": "line1\nline2\r\nline3",
            "phone": "+1 (416) 555-0100",
            "email": "-5",
            "tags": ["a,b", "c\"d", "=HYPERLINK(\"x\")", "ü€😀"],
            "customFields": {
                "formula": "=1+2",
                "at": "@SUM(A1:A2)",
                "tab": "\tlead",
                "cr": "\rlead",
                "plus": "+x",
                "neg": -5,
                "negf": -2.5,
                "uni": "Zoë 日本 😀",
                "ok": "a=b",
            },
            "createdAt": created(),
        };
        let s = spec(&[
            "firstName",
            "lastName",
            "phone",
            "email",
            "tags",
            "customFields",
            "fullName",
        ])
        .expand(
            &[
                "formula", "at", "tab", "cr", "plus", "neg", "negf", "uni", "ok",
            ]
            .map(String::from),
        );
        let out = csv_of(s, &[d], &Names::default()).await;
        let rows = parse_csv(&out);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            vec![
                "First Name",
                "Last Name",
                "Phone",
                "Email",
                "Tags",
                "customFields.at",
                "customFields.cr",
                "customFields.formula",
                "customFields.neg",
                "customFields.negf",
                "customFields.ok",
                "customFields.plus",
                "customFields.tab",
                "customFields.uni",
                "Full Name",
            ]
        );
        assert_eq!(
            rows[1],
            vec![
                "Smith, \"Jr\"",
                "line1\nline2\r\nline3",
                "+1 (416) 555-0100",
                "'-5",
                "a,b, c\"d, =HYPERLINK(\"x\"), ü€😀",
                "'@SUM(A1:A2)",
                "'\rlead",
                "'=1+2",
                "'-5",
                "'-2.5",
                "a=b",
                "'+x",
                "'\tlead",
                "Zoë 日本 😀",
                "Smith, \"Jr\" line1\nline2\r\nline3",
            ]
        );
        // Output is UTF-8 and records end with a bare `\n`.
        assert!(out.ends_with("Full Name\n") || out.ends_with("line3\"\n"));
        assert!(!out.contains(",\r\n") && out.starts_with("First Name,"));
    }

    #[tokio::test]
    async fn formulas_in_names_and_tags_neutralised_phone_exempt() {
        let mut n = Names::default();
        n.pipelines.insert(oid(1), "=cmd|' /C calc'!A0".into());
        n.stages.insert(oid(2), "@stage".into());
        n.owners.insert(oid(3), "-owner".into());
        let d = doc! {
            "firstName": "=1+2", "lastName": "+3", "phone": "=cmd", "email": "@x",
            "pipelineId": oid(1), "stageId": oid(2), "ownerId": oid(3),
            "tags": ["=a", "b"],
        };
        let s = spec(&[
            "firstName",
            "lastName",
            "phone",
            "email",
            "pipeline",
            "stage",
            "owner",
            "tags",
            "fullName",
        ]);
        let rows = parse_csv(&csv_of(s, std::slice::from_ref(&d), &n).await);
        assert_eq!(
            rows[1],
            vec![
                "'=1+2",
                "'+3",
                "=cmd",
                "'@x",
                "'=cmd|' /C calc'!A0",
                "'@stage",
                "'-owner",
                "'=a, b",
                "'=1+2 +3"
            ]
        );
        let d2 = doc! {"phone": "+14165550100", "firstName": "\t"};
        let rows = parse_csv(&csv_of(spec(&["phone", "firstName"]), &[d2], &n).await);
        assert_eq!(rows[1], vec!["+14165550100", "'\t"]);
        // NDJSON is data: nothing is neutralised.
        let out = ndjson_of(spec(&["firstName", "pipeline", "phone"]), &[d], &n).await;
        assert_eq!(
            out,
            "{\"firstName\":\"=1+2\",\"pipeline\":\"=cmd|' /C calc'!A0\",\"phone\":\"=cmd\"}\n"
        );
    }

    #[tokio::test]
    async fn missing_null_and_non_string_values() {
        let docs = [
            doc! {"_id": oid(1)},
            doc! {
                "_id": oid(2), "firstName": null, "lastName": "Solo", "phone": 4165550100_i64,
                "email": 12.5, "pipelineId": null, "stageId": oid(99), "ownerId": null,
                "tags": null, "createdAt": null, "customFields": null,
            },
            doc! {"_id": "legacy-id", "firstName": 42, "lastName": true, "tags": "single", "createdAt": "yesterday", "customFields": {"k": null}},
        ];
        let s = spec(&[
            "id",
            "firstName",
            "lastName",
            "fullName",
            "phone",
            "email",
            "pipeline",
            "stage",
            "owner",
            "tags",
            "createdAt",
            "customFields.k",
        ]);
        let rows = parse_csv(&csv_of(s.clone(), &docs, &names()).await);
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[1],
            vec![
                "010101010101010101010101",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                ""
            ]
        );
        assert_eq!(
            rows[2],
            vec![
                "020202020202020202020202",
                "",
                "Solo",
                "Solo",
                "4165550100",
                "12.5",
                "",
                "",
                "",
                "",
                "",
                ""
            ]
        );
        assert_eq!(
            rows[3],
            vec![
                "legacy-id",
                "42",
                "true",
                "42 true",
                "",
                "",
                "",
                "",
                "",
                "single",
                "yesterday",
                ""
            ]
        );

        let lines = parse_lines(&ndjson_of(s, &docs, &names()).await);
        assert_eq!(
            lines[0],
            json!({"id": "010101010101010101010101", "firstName": null, "lastName": null,
                   "fullName": null, "phone": null, "email": null, "pipeline": null,
                   "stage": null, "owner": null, "tags": null, "createdAt": null,
                   "customFields": {"k": null}})
        );
        assert_eq!(
            lines[1],
            json!({"id": "020202020202020202020202", "firstName": null, "lastName": "Solo",
                   "fullName": "Solo", "phone": "4165550100", "email": "12.5", "pipeline": null,
                   "stage": null, "owner": null, "tags": null, "createdAt": null,
                   "customFields": {"k": null}})
        );
        assert_eq!(
            lines[2],
            json!({"id": "legacy-id", "firstName": "42", "lastName": "true", "fullName": "42 true",
                   "phone": null, "email": null, "pipeline": null, "stage": null, "owner": null,
                   "tags": ["single"], "createdAt": "yesterday", "customFields": {"k": null}})
        );
    }

    #[tokio::test]
    async fn exact_csv_quoting_and_terminator() {
        let docs = [
            doc! {"firstName": "a,b", "lastName": "q\"x", "phone": "l1\nl2", "email": " sp "},
            doc! {"firstName": "", "email": "#c"},
        ];
        let out = csv_of(
            spec(&["firstName", "lastName", "phone", "email"]),
            &docs,
            &names(),
        )
        .await;
        assert_eq!(
            out,
            "First Name,Last Name,Phone,Email\n\"a,b\",\"q\"\"x\",\"l1\nl2\", sp \n,,,#c\n"
        );
        // No columns at all (`customFields` with no keys found): one empty
        // quoted cell per line keeps the file well-formed.
        let out = csv_of(spec(&["customFields"]).expand(&[]), &[doc! {}], &names()).await;
        assert_eq!(out, "\"\"\n\"\"\n");
    }

    #[tokio::test]
    async fn single_empty_column_rows_stay_distinct() {
        let docs = [doc! {}, doc! {"email": "a@b.c"}, doc! {}];
        let out = csv_of(spec(&["email"]), &docs, &Names::default()).await;
        let rows = parse_csv(&out);
        assert_eq!(rows, vec![vec!["Email"], vec![""], vec!["a@b.c"], vec![""]]);
    }

    #[tokio::test]
    async fn custom_value_text() {
        let d = doc! {"customFields": {
            "b": false, "i": 7, "l": 9_007_199_254_740_993_i64, "f": 1.5, "whole": 5.0,
            "big": 1e21, "tiny": 1.5e-8, "zero": -0.0, "date": created(), "s": "x",
            "dec": Bson::Decimal128("1.10".parse().unwrap()),
        }};
        let keys = [
            "b", "i", "l", "f", "whole", "big", "tiny", "zero", "date", "s", "dec", "none",
        ];
        let s = spec(&["customFields"]).expand(&keys.map(String::from));
        let rows = parse_csv(&csv_of(s.clone(), std::slice::from_ref(&d), &Names::default()).await);
        let row: HashMap<&str, &str> = rows[0]
            .iter()
            .map(|h| h.strip_prefix("customFields.").unwrap())
            .zip(rows[1].iter().map(String::as_str))
            .collect();
        assert_eq!(row["b"], "false");
        assert_eq!(row["i"], "7");
        assert_eq!(row["l"], "9007199254740993");
        assert_eq!(row["f"], "1.5");
        assert_eq!(row["whole"], "5");
        assert_eq!(row["big"], "1e21");
        assert_eq!(row["tiny"], "1.5e-8");
        assert_eq!(row["zero"], "0");
        assert_eq!(row["date"], "2026-05-20T10:11:12.345Z");
        assert_eq!(row["s"], "x");
        assert_eq!(row["dec"], "1.10");
        assert_eq!(row["none"], "");

        let lines = parse_lines(&ndjson_of(s, &[d], &Names::default()).await);
        assert_eq!(
            lines[0],
            json!({"customFields": {
                "b": false, "big": 1e21, "date": "2026-05-20T10:11:12.345Z", "dec": "1.10",
                "f": 1.5, "i": 7, "l": 9_007_199_254_740_993_i64, "none": null, "s": "x",
                "tiny": 1.5e-8, "whole": 5.0, "zero": -0.0,
            }})
        );
    }

    #[test]
    fn number_text_cases() {
        let t = |f: f64| {
            let mut s = String::new();
            number_text(f, &mut s).unwrap();
            s
        };
        assert_eq!(t(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(t(-3.0), "-3");
        assert_eq!(t(123456789012.0), "123456789012");
        assert_eq!(t(1e-7), "0.0000001");
        assert_eq!(t(f64::NAN), "NaN");
        assert_eq!(t(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(t(-2.5e30), "-2.5e30");
    }

    #[tokio::test]
    async fn ndjson_exact_output() {
        let s = spec(&[
            "id",
            "firstName",
            "lastName",
            "fullName",
            "phone",
            "email",
            "pipeline",
            "stage",
            "owner",
            "tags",
            "customFields.seats",
            "createdAt",
            "customFields.plan",
        ]);
        let mut second = contact();
        second.insert("firstName", "Zoë \"Z\"\n");
        second.insert("tags", Bson::Array(vec![]));
        second.remove("customFields");
        second.insert("ownerId", oid(77));
        let out = ndjson_of(s, &[contact(), second], &names()).await;
        assert_eq!(
            out,
            concat!(
                r#"{"id":"090909090909090909090909","firstName":"Ann","lastName":"Lee","fullName":"Ann Lee","phone":"+14165550100","email":"ann@example.com","pipeline":"Sales","stage":"Won, finally","owner":"Olga \"O\" Owner","tags":["vip","new"],"customFields":{"seats":5,"plan":"gold"},"createdAt":"2026-05-20T10:11:12.345Z"}"#,
                "\n",
                r#"{"id":"090909090909090909090909","firstName":"Zoë \"Z\"\n","lastName":"Lee","fullName":"Zoë \"Z\"\n Lee","phone":"+14165550100","email":"ann@example.com","pipeline":"Sales","stage":"Won, finally","owner":null,"tags":[],"customFields":{"seats":null,"plan":null},"createdAt":"2026-05-20T10:11:12.345Z"}"#,
                "\n",
            )
        );
        let lines = parse_lines(&out);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["firstName"], "Zoë \"Z\"\n");
        // Key order follows the column order.
        let keys: Vec<&str> = out
            .lines()
            .next()
            .unwrap()
            .split("\":")
            .map(|k| k.rsplit('"').next().unwrap())
            .collect();
        assert_eq!(&keys[..3], ["id", "firstName", "lastName"]);
    }

    #[tokio::test]
    async fn ndjson_nested_and_exotic_custom_values() {
        let d = doc! {"customFields": {
            "arr": [1, "two", null], "obj": {"a": oid(1), "when": created()},
            "nan": f64::NAN, "bin": Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2] }),
        }};
        let s = spec(&["customFields"]).expand(&[
            "arr".into(),
            "obj".into(),
            "nan".into(),
            "bin".into(),
        ]);
        let lines =
            parse_lines(&ndjson_of(s.clone(), std::slice::from_ref(&d), &Names::default()).await);
        assert_eq!(lines[0]["customFields"]["arr"], json!([1, "two", null]));
        assert_eq!(
            lines[0]["customFields"]["obj"],
            json!({"a": "010101010101010101010101", "when": "2026-05-20T10:11:12.345Z"})
        );
        assert_eq!(lines[0]["customFields"]["nan"], json!(null));
        assert_eq!(
            lines[0]["customFields"]["bin"],
            json!({"$binary": {"base64": "AQI=", "subType": "00"}})
        );
        // CSV renders compound values as JSON text.
        let rows = parse_csv(&csv_of(s, &[d], &Names::default()).await);
        assert_eq!(rows[1][0], "[1,\"two\",null]");
        assert_eq!(rows[1][2], "NaN");
    }

    #[tokio::test]
    async fn batches_concatenate_into_one_file() {
        let enc = Encoder::new(Format::Csv, spec(&["id", "firstName", "customFields.plan"]));
        let mut file = enc.header().await.unwrap();
        let docs: Vec<Document> = (0..2500u32)
            .map(|i| {
                doc! {"_id": ObjectId::from_bytes([(i % 251) as u8; 12]), "firstName": format!("n{i}, \"q\""),
                      "customFields": {"plan": format!("p\n{i}")}}
            })
            .collect();
        let mut total = 0;
        for batch in docs.chunks(1000) {
            total += enc
                .encode_batch(batch, &Names::default(), &mut file)
                .await
                .unwrap();
        }
        assert_eq!(total, 2500);
        let rows = parse_csv(std::str::from_utf8(&file).unwrap());
        assert_eq!(rows.len(), 2501);
        assert_eq!(rows[0], vec!["Id", "First Name", "customFields.plan"]);
        for (i, r) in rows[1..].iter().enumerate() {
            assert_eq!(r[1], format!("n{i}, \"q\""));
            assert_eq!(r[2], format!("p\n{i}"));
        }

        let enc = Encoder::new(Format::Ndjson, spec(&["firstName"]));
        let mut file = Vec::new();
        for batch in docs.chunks(1000) {
            enc.encode_batch(batch, &Names::default(), &mut file)
                .await
                .unwrap();
        }
        let lines = parse_lines(std::str::from_utf8(&file).unwrap());
        assert_eq!(lines.len(), 2500);
        assert_eq!(lines[2499], json!({"firstName": "n2499, \"q\""}));
    }

    #[tokio::test]
    async fn unexpanded_all_custom_is_ignored_and_empty_columns_work() {
        let enc = Encoder::new(Format::Csv, spec(&["email", "customFields"]));
        assert_eq!(enc.header().await.unwrap(), b"Email\n");
        let out = ndjson_of(spec(&["customFields"]).expand(&[]), &[contact()], &names()).await;
        assert_eq!(out, "{}\n");
    }

    #[test]
    fn collects_custom_keys() {
        let mut keys = BTreeSet::new();
        collect_custom_keys(&contact(), &mut keys);
        collect_custom_keys(&doc! {"customFields": {"zeta": 1, "plan": "x"}}, &mut keys);
        collect_custom_keys(&doc! {"customFields": null}, &mut keys);
        collect_custom_keys(&doc! {"customFields": "oops"}, &mut keys);
        collect_custom_keys(&doc! {}, &mut keys);
        let keys: Vec<String> = keys.into_iter().collect();
        assert_eq!(keys, ["active", "plan", "seats", "zeta"]);
    }
}
