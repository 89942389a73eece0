//! Cell rendering of the encoder (`encode.rs`) straight from raw BSON: text,
//! names, numbers, JSON values. Nothing is decoded into a `Document`; a value
//! is read where it lies in the row's bytes.

use bson::{RawArray, RawBsonRef, RawDocument};
use chrono::{Datelike, Timelike};

use super::*;

/// Collects the custom-field keys of one document into `keys`.
pub fn collect_custom_keys(doc: &Document, keys: &mut BTreeSet<String>) {
    if let Ok(custom) = doc.get_document(ALL_CUSTOM) {
        for k in custom.keys() {
            if !keys.contains(k) {
                keys.insert(k.clone());
            }
        }
    }
}

pub(super) fn csv_builder() -> csv::WriterBuilder {
    let mut b = csv::WriterBuilder::new();
    b.terminator(csv::Terminator::Any(b'\n'))
        .has_headers(false)
        .flexible(false)
        .buffer_capacity(64 * 1024);
    b
}

/// `"key":` as JSON.
pub(super) fn json_key(key: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(key).unwrap_or_default();
    v.push(b':');
    v
}

/// The top-level value at `key`, if present and readable.
pub(super) fn field<'a>(doc: &'a RawDocument, key: &str) -> Option<RawBsonRef<'a>> {
    doc.get(key).ok().flatten()
}

/// Would a spreadsheet read this cell as a formula? A leading `=`, `+`, `-`,
/// `@`, tab or CR, also behind leading spaces (spreadsheets trim them) and in
/// their full-width forms (`＝＋－＠`, which some spreadsheets fold to ASCII).
pub fn is_formula(value: &str) -> bool {
    let rest = value.trim_start_matches([' ', '\u{3000}', '\u{a0}']);
    matches!(
        rest.chars().next(),
        Some('=' | '+' | '-' | '@' | '\t' | '\r' | '＝' | '＋' | '－' | '＠')
    )
}

/// Is this a phone number, which may start with `+` or `-` and is left as it
/// is: at least one digit, and nothing but digits, spaces and `+ - ( ) .`.
pub fn is_phone_number(value: &str) -> bool {
    value.bytes().any(|b| b.is_ascii_digit())
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || b" +-().".contains(&b))
}

/// Does the cell of column `c` need the neutralising quote?
pub(super) fn needs_quote(c: &Column, value: &str) -> bool {
    is_formula(value) && !(*c == Column::Phone && is_phone_number(value))
}

/// Appends the name of a referenced id; false when absent or unknown.
pub(super) fn push_name(
    value: Option<RawBsonRef<'_>>,
    map: &HashMap<ObjectId, String>,
    out: &mut String,
) -> bool {
    match value {
        Some(RawBsonRef::ObjectId(id)) => map.get(&id).map(|n| out.push_str(n)).is_some(),
        _ => false,
    }
}

/// Appends the CSV text of column `c` to `out`; false when the value is
/// missing (null, absent, unresolved name, empty full name).
pub(super) fn render_text(c: &Column, row: &Fields<'_>, names: &Names, out: &mut String) -> bool {
    match c {
        Column::Id => text(row.id, out),
        Column::FirstName => text(row.first_name, out),
        Column::LastName => text(row.last_name, out),
        Column::Phone => text(row.phone, out),
        Column::Email => text(row.email, out),
        Column::FullName => full_name(row, out),
        Column::Pipeline => push_name(row.pipeline_id, &names.pipelines, out),
        Column::Stage => push_name(row.stage_id, &names.stages, out),
        Column::Owner => push_name(row.owner_id, &names.owners, out),
        Column::Tags => match row.tags {
            Some(RawBsonRef::Array(tags)) => {
                for (i, t) in present(tags).enumerate() {
                    out.push_str(if i > 0 { ", " } else { "" });
                    text(Some(t), out);
                }
                true
            }
            other => text(other, out),
        },
        Column::CreatedAt => match row.created_at {
            Some(RawBsonRef::DateTime(d)) => date(d, out),
            other => text(other, out),
        },
        Column::Custom(key) => text(row.custom.and_then(|d| field(d, key)), out),
        Column::AllCustom => false,
    }
}

/// The readable, non-null items of an array.
pub(super) fn present(items: &RawArray) -> impl Iterator<Item = RawBsonRef<'_>> {
    items
        .into_iter()
        .filter_map(Result::ok)
        .filter(|v| !is_null(v))
}

/// `YYYY-MM-DD` (UTC) of a date.
fn date(d: bson::DateTime, out: &mut String) -> bool {
    let t = d.to_chrono();
    write!(out, "{:04}-{:02}-{:02}", t.year(), t.month(), t.day()).is_ok()
}

/// RFC 3339 UTC with milliseconds of a date, e.g. `2026-05-20T10:11:12.345Z`.
fn timestamp(d: bson::DateTime, out: &mut String) -> std::fmt::Result {
    let t = d.to_chrono();
    if !(0..=9999).contains(&t.year()) {
        return write!(out, "{}", t.format(RFC3339_MS));
    }
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.timestamp_subsec_millis().min(999)
    )
}

/// First and last name joined by a space, trimmed; false when that is empty.
pub(super) fn full_name(row: &Fields<'_>, out: &mut String) -> bool {
    let start = out.len();
    text(row.first_name, out);
    out.push(' ');
    text(row.last_name, out);
    let end = start + out[start..].trim_end().len();
    out.truncate(end);
    let lead = out[start..].len() - out[start..].trim_start().len();
    out.drain(start..start + lead);
    out.len() > start
}

pub(super) fn is_null(v: &RawBsonRef<'_>) -> bool {
    matches!(v, RawBsonRef::Null | RawBsonRef::Undefined)
}

/// A raw value as an owned `Bson` (for the rare types written as extended JSON).
fn owned(v: RawBsonRef<'_>) -> Bson {
    Bson::try_from(v.to_raw_bson()).unwrap_or(Bson::Null)
}

/// A value as text: strings as is, numbers as their shortest text, booleans
/// `true`/`false`, dates RFC 3339 UTC with milliseconds, ids as hex, null and
/// missing as nothing (returning false), anything else as relaxed extended JSON.
pub(super) fn text(v: Option<RawBsonRef<'_>>, out: &mut String) -> bool {
    let written = match v {
        None | Some(RawBsonRef::Null | RawBsonRef::Undefined) => return false,
        Some(RawBsonRef::String(s) | RawBsonRef::Symbol(s)) => out.write_str(s),
        Some(RawBsonRef::Int32(i)) => write!(out, "{i}"),
        Some(RawBsonRef::Int64(i)) => write!(out, "{i}"),
        Some(RawBsonRef::Double(f)) => number_text(f, out),
        Some(RawBsonRef::Boolean(b)) => write!(out, "{b}"),
        Some(RawBsonRef::DateTime(d)) => timestamp(d, out),
        Some(RawBsonRef::ObjectId(id)) => write!(out, "{id}"),
        Some(RawBsonRef::Decimal128(d)) => write!(out, "{d}"),
        Some(other) => write!(out, "{}", owned(other).into_relaxed_extjson()),
    };
    written.is_ok()
}

/// Shortest text of a double, as JavaScript prints it: plain notation for
/// 1e-7 ≤ |x| < 1e21, exponent notation otherwise.
pub(super) fn number_text(f: f64, out: &mut String) -> std::fmt::Result {
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
pub(super) fn write_column_json(
    c: &Column,
    row: &Fields<'_>,
    names: &Names,
    cell: &mut String,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match c {
        Column::Tags => match row.tags.filter(|v| !is_null(v)) {
            Some(RawBsonRef::Array(tags)) => {
                out.push(b'[');
                for (i, t) in present(tags).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_text_json(t, cell, out)?;
                }
                out.push(b']');
                Ok(())
            }
            Some(v) => {
                out.push(b'[');
                write_text_json(v, cell, out)?;
                out.push(b']');
                Ok(())
            }
            None => write_opt_str(None, out),
        },
        Column::CreatedAt => match row.created_at.filter(|v| !is_null(v)) {
            Some(v) => write_text_json(v, cell, out),
            None => write_opt_str(None, out),
        },
        _ => {
            cell.clear();
            let present = render_text(c, row, names, cell);
            write_opt_str(present.then_some(cell.as_str()), out)
        }
    }
}

/// A value as a JSON string (its text), e.g. a number in `firstName`.
pub(super) fn write_text_json(
    v: RawBsonRef<'_>,
    cell: &mut String,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    if let RawBsonRef::String(s) = v {
        return write_opt_str(Some(s), out);
    }
    cell.clear();
    text(Some(v), cell);
    write_opt_str(Some(cell.as_str()), out)
}

pub(super) fn write_opt_str(s: Option<&str>, out: &mut Vec<u8>) -> io::Result<()> {
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
pub(super) fn write_json(v: Option<RawBsonRef<'_>>, out: &mut Vec<u8>) -> io::Result<()> {
    let Some(v) = v else {
        out.extend_from_slice(b"null");
        return Ok(());
    };
    match v {
        RawBsonRef::Null | RawBsonRef::Undefined => out.extend_from_slice(b"null"),
        RawBsonRef::String(s) | RawBsonRef::Symbol(s) => write_opt_str(Some(s), out)?,
        RawBsonRef::Boolean(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        RawBsonRef::Int32(i) => write!(out, "{i}")?,
        RawBsonRef::Int64(i) => write!(out, "{i}")?,
        RawBsonRef::Double(f) if f.is_finite() => serde_json::to_writer(&mut *out, &f)?,
        RawBsonRef::Double(_) => out.extend_from_slice(b"null"),
        RawBsonRef::DateTime(d) => {
            let mut s = String::with_capacity(24);
            timestamp(d, &mut s).map_err(io::Error::other)?;
            write!(out, "\"{s}\"")?
        }
        RawBsonRef::ObjectId(id) => write!(out, "\"{id}\"")?,
        RawBsonRef::Decimal128(d) => write!(out, "\"{d}\"")?,
        RawBsonRef::Array(items) => {
            out.push(b'[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item.ok(), out)?;
            }
            out.push(b']');
        }
        RawBsonRef::Document(d) => {
            out.push(b'{');
            for (i, (k, item)) in d.into_iter().filter_map(Result::ok).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&json_key(k));
                write_json(Some(item), out)?;
            }
            out.push(b'}');
        }
        other => serde_json::to_writer(&mut *out, &owned(other).into_relaxed_extjson())?,
    }
    Ok(())
}
