//! Cell rendering of the encoder (`encode.rs`): text, names, numbers, JSON values.

use super::*;

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

pub(super) fn csv_builder() -> AsyncWriterBuilder {
    let mut b = AsyncWriterBuilder::new();
    b.terminator(Terminator::Any(b'\n'))
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

pub(super) fn custom_fields(doc: &Document) -> Option<&Document> {
    match doc.get(ALL_CUSTOM) {
        Some(Bson::Document(d)) => Some(d),
        _ => None,
    }
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

/// Appends the name of the id at `key`; false when absent or unknown.
pub(super) fn push_name(
    doc: &Document,
    key: &str,
    map: &HashMap<ObjectId, String>,
    out: &mut String,
) -> bool {
    match doc.get(key) {
        Some(Bson::ObjectId(id)) => map.get(id).map(|n| out.push_str(n)).is_some(),
        _ => false,
    }
}

/// Appends the CSV text of column `c` to `out`; false when the value is
/// missing (null, absent, unresolved name, empty full name).
pub(super) fn render_text(
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
pub(super) fn full_name(doc: &Document, out: &mut String) -> bool {
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

pub(super) fn is_null(v: &Bson) -> bool {
    matches!(v, Bson::Null | Bson::Undefined)
}

/// A value as text: strings as is, numbers as their shortest text, booleans
/// `true`/`false`, dates RFC 3339 UTC with milliseconds, ids as hex, null and
/// missing as nothing (returning false), anything else as relaxed extended JSON.
pub(super) fn text(v: Option<&Bson>, out: &mut String) -> bool {
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
pub(super) fn write_text_json(v: &Bson, cell: &mut String, out: &mut Vec<u8>) -> io::Result<()> {
    if let Bson::String(s) = v {
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
pub(super) fn write_json(v: Option<&Bson>, out: &mut Vec<u8>) -> io::Result<()> {
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
