//! FHIR R4 (4.0.1, JSON, US Core flavoured) resources and search over the
//! document index: DocumentReference, Patient, Binary, search Bundles, the
//! US Core `$docref` operation and the CapabilityStatement. Pure functions:
//! no I/O.

use crate::documents::ccda::{self, Ccda};
use crate::documents::index::{IndexedDocument, PatientRecord};
use chrono::{NaiveDate, SecondsFormat};
use serde_json::{json, Map, Value};

/// The FHIR version served.
pub const FHIR_VERSION: &str = "4.0.1";
/// The LOINC code system, as an OID (in C-CDA) and as a FHIR URI.
pub const LOINC_OID: &str = "2.16.840.1.113883.6.1";
pub const LOINC_SYSTEM: &str = "http://loinc.org";
/// LOINC code of a Continuity of Care Document.
pub const CCD_LOINC: &str = "34133-9";
pub const US_CORE_DOCREF: &str =
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference";
pub const US_CORE_PATIENT: &str = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";
pub const CATEGORY_SYSTEM: &str =
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category";
const CATEGORY_CODE: &str = "clinical-note";
const FORMAT_SYSTEM: &str = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode";
const RFC3986: &str = "urn:ietf:rfc:3986";

/// Parameters accepted by DocumentReference search.
pub const DOC_SEARCH_PARAMS: &str =
    "patient, _id, type, category, date, period, status, _count, _offset, _format";
/// Parameters accepted by Patient search.
pub const PATIENT_SEARCH_PARAMS: &str = "_id, identifier, _count, _offset, _format";
/// Parameters accepted by `DocumentReference/$docref`.
pub const DOCREF_PARAMS: &str = "patient, start, end, type, on-demand, profile, _format";

/// Default and largest page size.
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 200;

/// A request the FHIR layer refuses; the message says exactly why.
#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("parameter {name}: {reason}")]
    BadParameter { name: String, reason: String },
    #[error("unknown parameter {name:?} (supported: {supported})")]
    UnknownParameter {
        name: String,
        supported: &'static str,
    },
    #[error("parameter {name}: {reason}")]
    NotSupported { name: String, reason: String },
}

impl FhirError {
    fn bad(name: &str, reason: impl Into<String>) -> Self {
        FhirError::BadParameter {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    fn unsupported(name: &str, reason: impl Into<String>) -> Self {
        FhirError::NotSupported {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    /// The FHIR issue type: `invalid` or `not-supported`.
    pub fn issue_code(&self) -> &'static str {
        match self {
            FhirError::BadParameter { .. } => "invalid",
            FhirError::UnknownParameter { .. } | FhirError::NotSupported { .. } => "not-supported",
        }
    }

    /// This error as an OperationOutcome.
    pub fn outcome(&self) -> Value {
        operation_outcome("error", self.issue_code(), &self.to_string())
    }
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    prune(json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }))
}

// ------------------------------------------------------------------- ids

/// Is `s` a valid FHIR id (`[A-Za-z0-9\-.]{1,64}`)?
pub fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn hash32(s: &str) -> String {
    let h = hex::encode(openssl::sha::sha256(s.as_bytes()));
    h[..32].to_string()
}

/// The stable FHIR id of a document key: `d` + 32 hex digits of its SHA-256.
pub fn fhir_id(key: &str) -> String {
    format!("d{}", hash32(key))
}

/// The FHIR id of a patient record: its id when that is a valid FHIR id,
/// else `p` + 32 hex digits of its SHA-256.
pub fn patient_fhir_id(id: &str) -> String {
    if is_fhir_id(id) {
        id.to_string()
    } else {
        format!("p{}", hash32(id))
    }
}

/// Which rendition of a document a Binary holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    /// The C-CDA XML as received.
    Ccda,
    /// Its HTML rendering.
    Html,
}

impl BinaryKind {
    fn suffix(self) -> &'static str {
        match self {
            BinaryKind::Ccda => "-ccda",
            BinaryKind::Html => "-html",
        }
    }

    /// The MIME type of this rendition.
    pub fn content_type(self) -> &'static str {
        match self {
            BinaryKind::Ccda => "application/xml",
            BinaryKind::Html => "text/html",
        }
    }
}

/// The Binary id of one rendition of a document.
pub fn binary_id(doc_fhir_id: &str, kind: BinaryKind) -> String {
    format!("{doc_fhir_id}{}", kind.suffix())
}

/// The document id and rendition of a Binary id made by [`binary_id`].
pub fn parse_binary_id(id: &str) -> Option<(String, BinaryKind)> {
    if !is_fhir_id(id) {
        return None;
    }
    [BinaryKind::Ccda, BinaryKind::Html]
        .into_iter()
        .find_map(|k| {
            id.strip_suffix(k.suffix())
                .filter(|d| !d.is_empty())
                .map(|d| (d.to_string(), k))
        })
}

// ----------------------------------------------------------------- dates

/// An HL7 v3 TS (`YYYY[MM[DD[HH[MM[SS[.S+]]]]]][±ZZZZ]`) as a FHIR date or
/// dateTime. A time is kept only with a zone (FHIR requires one); without
/// a zone the result is the date alone. `None` for anything malformed.
pub fn hl7_ts_to_fhir(ts: &str) -> Option<String> {
    let ts = ts.trim();
    let end = ts.find(|c: char| !c.is_ascii_digit()).unwrap_or(ts.len());
    let (digits, mut rest) = ts.split_at(end);
    let mut frac = "";
    if let Some(r) = rest.strip_prefix('.') {
        let e = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        if e == 0 || digits.len() != 14 {
            return None;
        }
        frac = &r[..e.min(9)];
        rest = &r[e..];
    }
    let zone = if rest.is_empty() {
        None
    } else {
        let (sign, z) = match rest.as_bytes().first() {
            Some(b'+') => ('+', &rest[1..]),
            Some(b'-') => ('-', &rest[1..]),
            _ => return None,
        };
        if z.len() != 4 || !z.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let zh: u32 = z[..2].parse().ok()?;
        let zm: u32 = z[2..].parse().ok()?;
        if zh > 14 || zm > 59 || (zh == 14 && zm != 0) {
            return None;
        }
        Some(format!("{sign}{zh:02}:{zm:02}"))
    };
    let field = |r: std::ops::Range<usize>| -> Option<u32> { digits.get(r)?.parse().ok() };
    let year = field(0..4)?;
    if year == 0 {
        return None;
    }
    match digits.len() {
        4 => return Some(format!("{year:04}")),
        6 => {
            let month = field(4..6)?;
            NaiveDate::from_ymd_opt(year as i32, month, 1)?;
            return Some(format!("{year:04}-{month:02}"));
        }
        8 | 10 | 12 | 14 => {}
        _ => return None,
    }
    let (month, day) = (field(4..6)?, field(6..8)?);
    NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let date = format!("{year:04}-{month:02}-{day:02}");
    if digits.len() == 8 {
        return Some(date);
    }
    let hour = field(8..10)?;
    let minute = if digits.len() >= 12 {
        field(10..12)?
    } else {
        0
    };
    let second = if digits.len() >= 14 {
        field(12..14)?
    } else {
        0
    };
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    match zone {
        None => Some(date),
        Some(z) => {
            let frac = if frac.is_empty() {
                String::new()
            } else {
                format!(".{frac}")
            };
            Some(format!("{date}T{hour:02}:{minute:02}:{second:02}{frac}{z}"))
        }
    }
}

/// A half-open interval `[lo, hi)` in microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    lo: i64,
    hi: i64,
}

impl Span {
    fn overlaps(&self, o: &Span) -> bool {
        self.lo < o.hi && o.lo < self.hi
    }
}

const MICROS: i64 = 1_000_000;

fn day_start(year: i32, month: u32, day: u32) -> Option<i64> {
    NaiveDate::from_ymd_opt(year, month, day)?
        .and_hms_opt(0, 0, 0)?
        .and_utc()
        .timestamp()
        .checked_mul(MICROS)
}

/// The interval a FHIR date or dateTime denotes at its precision
/// (`2024` is the whole year). Values without a zone are taken as UTC.
fn fhir_span(s: &str) -> Option<Span> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let year = num(0..4)? as i32;
    if year == 0 {
        return None;
    }
    if s.len() == 4 {
        return Some(Span {
            lo: day_start(year, 1, 1)?,
            hi: day_start(year + 1, 1, 1)?,
        });
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = num(5..7)?;
    if s.len() == 7 {
        let (ny, nm) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        return Some(Span {
            lo: day_start(year, month, 1)?,
            hi: day_start(ny, nm, 1)?,
        });
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = num(8..10)?;
    let start = day_start(year, month, day)?;
    if s.len() == 10 {
        return Some(Span {
            lo: start,
            hi: start + 86_400 * MICROS,
        });
    }
    if b.get(10) != Some(&b'T') || b.get(13) != Some(&b':') {
        return None;
    }
    let (hour, minute) = (num(11..13)?, num(14..16)?);
    let mut i = 16;
    let mut second = 0;
    let mut width = 60 * MICROS;
    let mut frac_micros = 0i64;
    if b.get(i) == Some(&b':') {
        second = num(17..19)?;
        width = MICROS;
        i = 19;
        if b.get(i) == Some(&b'.') {
            let digits: String = s[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if digits.is_empty() {
                return None;
            }
            i += 1 + digits.len();
            let kept = &digits[..digits.len().min(6)];
            let scale = 10i64.pow(6 - kept.len() as u32);
            frac_micros = kept.parse::<i64>().ok()? * scale;
            width = scale;
        }
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let offset_secs: i64 = match &s[i..] {
        "" | "Z" => 0,
        z => {
            let sign = match z.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let zb = z.as_bytes();
            if z.len() != 6 || zb.get(3) != Some(&b':') {
                return None;
            }
            let zd = |r: std::ops::Range<usize>| -> Option<i64> {
                let t = z.get(r)?;
                if t.bytes().all(|c| c.is_ascii_digit()) {
                    t.parse().ok()
                } else {
                    None
                }
            };
            let (zh, zm) = (zd(1..3)?, zd(4..6)?);
            if zh > 14 || zm > 59 {
                return None;
            }
            sign * (zh * 3600 + zm * 60)
        }
    };
    let lo = start
        + (i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset_secs)
            * MICROS
        + frac_micros;
    Some(Span { lo, hi: lo + width })
}

/// A Unix time as a FHIR instant (`2026-12-04T18:00:00Z`).
pub fn instant(unix_secs: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(unix_secs, 0)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
}

// ----------------------------------------------------------- identifiers

fn is_oid(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The URI of an HL7 II root: `urn:oid:` or `urn:uuid:`.
fn root_uri(root: &str) -> Option<String> {
    if is_oid(root) {
        Some(format!("urn:oid:{root}"))
    } else if is_uuid(root) {
        Some(format!("urn:uuid:{}", root.to_ascii_lowercase()))
    } else {
        None
    }
}

/// A FHIR code system URI for a C-CDA `codeSystem` OID.
fn coding_system(oid: &str) -> String {
    match oid {
        LOINC_OID => LOINC_SYSTEM.to_string(),
        "2.16.840.1.113883.6.96" => "http://snomed.info/sct".to_string(),
        _ => root_uri(oid).unwrap_or_else(|| format!("urn:oid:{oid}")),
    }
}

/// Search systems written as OIDs compare equal to their FHIR URIs.
fn normalise_system(s: &str) -> String {
    match s.strip_prefix("urn:oid:") {
        Some(oid) => coding_system(oid),
        None => s.to_string(),
    }
}

/// `(system, value)` of an identifier for a `root^ext`, `root` or
/// SHA-256-hex key.
fn key_identifier(key: &str) -> (Option<String>, String) {
    if is_sha256_hex(key) {
        return (
            Some(RFC3986.into()),
            format!("urn:sha256:{}", key.to_ascii_lowercase()),
        );
    }
    match key.split_once('^') {
        Some((root, ext)) => match root_uri(root) {
            Some(sys) if !ext.is_empty() => (Some(sys), ext.to_string()),
            _ => (None, key.to_string()),
        },
        None => match root_uri(key) {
            Some(uri) => (Some(RFC3986.into()), uri),
            None => (None, key.to_string()),
        },
    }
}

fn identifier_json(key: &str) -> Value {
    let (system, value) = key_identifier(key);
    json!({"system": system, "value": value})
}

// ------------------------------------------------------------- resources

/// Drop nulls and empty or blank strings, arrays and objects (FHIR forbids
/// them).
pub fn prune(v: Value) -> Value {
    fn walk(v: Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::String(s) if s.trim().is_empty() => None,
            Value::Array(a) => {
                let a: Vec<Value> = a.into_iter().filter_map(walk).collect();
                (!a.is_empty()).then_some(Value::Array(a))
            }
            Value::Object(o) => {
                let o: Map<String, Value> = o
                    .into_iter()
                    .filter_map(|(k, v)| walk(v).map(|v| (k, v)))
                    .collect();
                (!o.is_empty()).then_some(Value::Object(o))
            }
            other => Some(other),
        }
    }
    walk(v).unwrap_or(Value::Null)
}

/// A document with its parsed C-CDA, when that could be read.
#[derive(Clone, Copy, Debug)]
pub struct DocView<'a> {
    pub doc: &'a IndexedDocument,
    pub ccda: Option<&'a Ccda>,
}

impl DocView<'_> {
    fn title(&self) -> Option<&str> {
        self.ccda
            .and_then(|c| c.title.as_deref())
            .or(self.doc.title.as_deref())
            .filter(|t| !t.trim().is_empty())
    }

    fn code(&self) -> Option<&ccda::Code> {
        self.ccda
            .and_then(|c| c.code.as_ref())
            .filter(|c| c.code.as_deref().is_some_and(|c| !c.trim().is_empty()))
    }

    /// `(system, code)` of the document type.
    fn type_coding(&self) -> Option<(Option<String>, &str)> {
        let c = self.code()?;
        Some((
            c.code_system.as_deref().map(coding_system),
            c.code.as_deref()?,
        ))
    }

    fn is_ccd(&self) -> bool {
        self.code().is_some_and(|c| {
            c.code.as_deref() == Some(CCD_LOINC)
                && c.code_system.as_deref().is_none_or(|s| s == LOINC_OID)
        })
    }

    fn current(&self) -> bool {
        self.doc.superseded_by.is_none()
    }

    fn received_span(&self) -> Option<Span> {
        let lo = self.doc.received.checked_mul(MICROS)?;
        Some(Span {
            lo,
            hi: lo.checked_add(MICROS)?,
        })
    }

    fn period(&self) -> (Option<String>, Option<String>) {
        let conv = |s: Option<&String>| s.and_then(|s| hl7_ts_to_fhir(s));
        match self.ccda {
            Some(c) => (conv(c.service_start.as_ref()), conv(c.service_end.as_ref())),
            None => (None, None),
        }
    }

    /// `context.period` as an interval; open ends are unbounded.
    fn period_span(&self) -> Option<Span> {
        let (start, end) = self.period();
        let start = start.as_deref().and_then(fhir_span);
        let end = end.as_deref().and_then(fhir_span);
        if start.is_none() && end.is_none() {
            return None;
        }
        Some(Span {
            lo: start.map_or(i64::MIN, |s| s.lo),
            hi: end.map_or(i64::MAX, |s| s.hi),
        })
    }

    fn effective_span(&self) -> Option<Span> {
        self.ccda
            .and_then(|c| c.effective_time.as_deref())
            .and_then(hl7_ts_to_fhir)
            .as_deref()
            .and_then(fhir_span)
    }

    /// The care dates `$docref` filters on: the service period, else the
    /// document time, else when it was received.
    fn care_span(&self) -> Option<Span> {
        self.period_span()
            .or_else(|| self.effective_span())
            .or_else(|| self.received_span())
    }

    /// Ordering key for "latest": document time (else receipt), then receipt.
    fn recency(&self) -> (i64, i64) {
        let received = self.doc.received.saturating_mul(MICROS);
        (
            self.effective_span().map_or(received, |s| s.lo),
            self.doc.received,
        )
    }
}

/// A US Core DocumentReference for an indexed document, with two contents:
/// the C-CDA and its HTML rendering (as Binary URLs under `base`).
pub fn document_reference(base: &str, patient_id: &str, v: &DocView) -> Value {
    let base = base.trim_end_matches('/');
    let id = fhir_id(&v.doc.key);
    let title = v.title();
    let type_ = match v.code() {
        Some(c) => json!({
            "coding": [{
                "system": c.code_system.as_deref().map(coding_system),
                "code": c.code,
                "display": c.display_name,
            }],
            "text": title.or(c.display_name.as_deref()),
        }),
        None => json!({"text": "Clinical document"}),
    };
    let (format_code, format_display) =
        match v.ccda.and_then(|c| c.non_xml_body_media_type.as_ref()) {
            Some(_) => (
                "urn:hl7-org:sdwg:ccda-nonXMLBody:2.1",
                "For documents following C-CDA 2.1 constraints using a non structured body.",
            ),
            None => (
                "urn:hl7-org:sdwg:ccda-structuredBody:2.1",
                "For documents following C-CDA 2.1 constraints using a structured body.",
            ),
        };
    let (start, end) = v.period();
    let authors: Vec<Value> = v
        .ccda
        .map(|c| c.authors.iter().map(|a| json!({"display": a})).collect())
        .unwrap_or_default();
    prune(json!({
        "resourceType": "DocumentReference",
        "id": id,
        "meta": {"profile": [US_CORE_DOCREF]},
        "masterIdentifier": identifier_json(&v.doc.key),
        "identifier": [identifier_json(&v.doc.key)],
        "status": if v.current() { "current" } else { "superseded" },
        "docStatus": "final",
        "type": type_,
        "category": [{"coding": [{
            "system": CATEGORY_SYSTEM,
            "code": CATEGORY_CODE,
            "display": "Clinical Note",
        }]}],
        "subject": {"reference": format!("Patient/{patient_id}")},
        "date": instant(v.doc.received),
        "author": authors,
        "custodian": {"display": v.ccda.and_then(|c| c.custodian.as_deref())},
        "description": title,
        "content": [
            {
                "attachment": {
                    "contentType": BinaryKind::Ccda.content_type(),
                    "url": format!("{base}/Binary/{}", binary_id(&id, BinaryKind::Ccda)),
                    "title": title,
                    "creation": v.ccda
                        .and_then(|c| c.effective_time.as_deref())
                        .and_then(hl7_ts_to_fhir),
                },
                "format": {
                    "system": FORMAT_SYSTEM,
                    "code": format_code,
                    "display": format_display,
                },
            },
            {
                "attachment": {
                    "contentType": BinaryKind::Html.content_type(),
                    "url": format!("{base}/Binary/{}", binary_id(&id, BinaryKind::Html)),
                    "title": title,
                },
            },
        ],
        "context": {"period": {"start": start, "end": end}},
    }))
}

fn gender(code: Option<&str>) -> &'static str {
    match code.map(str::trim) {
        Some("M") | Some("m") => "male",
        Some("F") | Some("f") => "female",
        Some("UN") => "other",
        _ => "unknown",
    }
}

/// A HumanName from a single string: last word family, the rest given.
fn name_from_text(text: &str) -> Value {
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.split_last() {
        Some((family, given)) => json!({"text": words.join(" "), "family": family, "given": given}),
        None => Value::Null,
    }
}

/// A US Core Patient for a patient record, with the demographics of one of
/// its documents when known.
pub fn patient_resource(p: &PatientRecord, demographics: Option<&ccda::Patient>) -> Value {
    let mut names: Vec<Value> = demographics
        .map(|d| {
            d.name_parts
                .iter()
                .filter(|n| n.family.is_some() || !n.given.is_empty())
                .map(|n| {
                    let text: Vec<&str> = n
                        .prefix
                        .iter()
                        .chain(&n.given)
                        .map(String::as_str)
                        .chain(n.family.as_deref())
                        .chain(n.suffix.iter().map(String::as_str))
                        .collect();
                    json!({
                        "text": text.join(" "),
                        "family": n.family,
                        "given": n.given,
                        "prefix": n.prefix,
                        "suffix": n.suffix,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        let fallback = Some(p.name.as_str())
            .filter(|n| !n.trim().is_empty())
            .or_else(|| demographics.and_then(|d| d.names.first().map(String::as_str)));
        if let Some(n) = fallback {
            names.push(name_from_text(n));
        }
    }
    if names.iter().all(Value::is_null) {
        names = vec![json!({"extension": [{
            "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
            "valueCode": "unknown",
        }]})];
    }
    let birth_date = demographics
        .and_then(|d| d.birth_time.as_deref())
        .and_then(hl7_ts_to_fhir)
        .map(|t| t.split('T').next().unwrap_or_default().to_string());
    let identifiers: Vec<Value> = p.identifiers.iter().map(|i| identifier_json(i)).collect();
    prune(json!({
        "resourceType": "Patient",
        "id": patient_fhir_id(&p.id),
        "meta": {"profile": [US_CORE_PATIENT]},
        "identifier": identifiers,
        "name": names,
        "gender": gender(demographics.and_then(|d| d.gender.as_deref())),
        "birthDate": birth_date,
    }))
}

/// A Binary resource carrying `bytes` base64-encoded.
pub fn binary_resource(id: &str, content_type: &str, bytes: &[u8]) -> Value {
    use base64::Engine as _;
    prune(json!({
        "resourceType": "Binary",
        "id": id,
        "contentType": content_type,
        "data": base64::engine::general_purpose::STANDARD.encode(bytes),
    }))
}

// ---------------------------------------------------------------- search

/// Split at unescaped `sep` (FHIR escapes `\,` `\|` `\$` `\\`), raw pieces.
fn split_raw(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if !escaped && c == '\\' {
            escaped = true;
        } else {
            out.push(c);
            escaped = false;
        }
    }
    out
}

/// The comma-separated alternatives of a value, unescaped, non-empty.
fn alternatives(name: &str, value: &str) -> Result<Vec<String>, FhirError> {
    split_raw(value, ',')
        .into_iter()
        .map(|v| {
            let v = unescape(v);
            if v.is_empty() {
                Err(FhirError::bad(
                    name,
                    format!("empty alternative in {value:?}"),
                ))
            } else {
                Ok(v)
            }
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SystemMatch {
    Any,
    NoSystem,
    Is(String),
}

/// A token search value: `code`, `system|code`, `|code` or `system|`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Token {
    system: SystemMatch,
    code: Option<String>,
}

impl Token {
    fn parse_all(name: &str, value: &str) -> Result<Vec<Token>, FhirError> {
        split_raw(value, ',')
            .into_iter()
            .map(|alt| {
                let bad = || {
                    FhirError::bad(
                        name,
                        format!("{alt:?} is not a token (use code, system|code, |code or system|)"),
                    )
                };
                let parts = split_raw(alt, '|');
                let (system, code) = match parts.as_slice() {
                    [code] => (SystemMatch::Any, unescape(code)),
                    [sys, code] => {
                        let sys = unescape(sys);
                        let system = if sys.is_empty() {
                            SystemMatch::NoSystem
                        } else {
                            SystemMatch::Is(normalise_system(&sys))
                        };
                        (system, unescape(code))
                    }
                    _ => return Err(bad()),
                };
                if code.is_empty() && !matches!(system, SystemMatch::Is(_)) {
                    return Err(bad());
                }
                Ok(Token {
                    system,
                    code: Some(code).filter(|c| !c.is_empty()),
                })
            })
            .collect()
    }

    fn matches(&self, system: Option<&str>, code: &str) -> bool {
        let code_ok = self.code.as_deref().is_none_or(|c| c == code);
        let system_ok = match &self.system {
            SystemMatch::Any => true,
            SystemMatch::NoSystem => system.is_none(),
            SystemMatch::Is(s) => Some(s.as_str()) == system,
        };
        code_ok && system_ok
    }
}

/// A date search prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

/// One date comparison: prefix and the interval its value denotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateCond {
    prefix: Prefix,
    span: Span,
}

impl DateCond {
    fn parse_all(name: &str, value: &str) -> Result<Vec<DateCond>, FhirError> {
        // An unencoded '+' in a query string arrives as a space.
        let value = value.replace(' ', "+");
        value
            .split(',')
            .map(|v| {
                let (prefix, rest) = match v.get(..2) {
                    Some(p) if p.bytes().all(|b| b.is_ascii_alphabetic()) => {
                        let prefix = match p {
                            "eq" => Prefix::Eq,
                            "ne" => Prefix::Ne,
                            "gt" => Prefix::Gt,
                            "lt" => Prefix::Lt,
                            "ge" => Prefix::Ge,
                            "le" => Prefix::Le,
                            "sa" => Prefix::Sa,
                            "eb" => Prefix::Eb,
                            _ => {
                                return Err(FhirError::bad(
                                    name,
                                    format!(
                                        "{v:?} has an unsupported prefix {p:?} \
                                         (supported: eq, ne, gt, lt, ge, le, sa, eb)"
                                    ),
                                ))
                            }
                        };
                        (prefix, &v[2..])
                    }
                    _ => (Prefix::Eq, v),
                };
                let span = fhir_span(rest).ok_or_else(|| {
                    FhirError::bad(
                        name,
                        format!(
                            "{v:?} is not a date: use an optional prefix (eq, ne, gt, lt, ge, le, \
                             sa, eb) and YYYY, YYYY-MM, YYYY-MM-DD or \
                             YYYY-MM-DDThh:mm[:ss[.fff]][Z|+hh:mm|-hh:mm]"
                        ),
                    )
                })?;
                Ok(DateCond { prefix, span })
            })
            .collect()
    }

    /// FHIR date matching of a resource interval `r` against this value.
    fn matches(&self, r: Span) -> bool {
        let p = self.span;
        let eq = p.lo <= r.lo && r.hi <= p.hi;
        match self.prefix {
            Prefix::Eq => eq,
            Prefix::Ne => !eq,
            Prefix::Gt => r.hi > p.hi,
            Prefix::Lt => r.lo < p.lo,
            // Some of the resource lies at or after (before) the value: a
            // superset of the spec's "gt or eq" that also matches ranges
            // straddling the value's bound (like HAPI).
            Prefix::Ge => r.hi > p.lo,
            Prefix::Le => r.lo < p.hi,
            Prefix::Sa => r.lo >= p.hi,
            Prefix::Eb => r.hi <= p.lo,
        }
    }
}

/// `_count` and `_offset` (each at most once) and `_format` (JSON only).
#[derive(Default)]
struct Paging {
    count: Option<usize>,
    offset: Option<usize>,
}

impl Paging {
    /// Handles a paging or format parameter; `false` if `name` is another one.
    fn take(&mut self, name: &str, value: &str) -> Result<bool, FhirError> {
        match name {
            "_count" | "_offset" => {
                let n: usize = value.trim().parse().map_err(|_| {
                    FhirError::bad(name, format!("{value:?} is not a non-negative integer"))
                })?;
                let slot = if name == "_count" {
                    if !(1..=MAX_COUNT).contains(&n) {
                        return Err(FhirError::bad(
                            name,
                            format!("{n} is out of range (1 to {MAX_COUNT})"),
                        ));
                    }
                    &mut self.count
                } else {
                    &mut self.offset
                };
                if slot.is_some() {
                    return Err(FhirError::bad(name, "given more than once"));
                }
                *slot = Some(n);
                Ok(true)
            }
            "_format" => match value.trim() {
                "json" | "application/json" | "application/fhir+json" | "application/json+fhir" => {
                    Ok(true)
                }
                other => Err(FhirError::unsupported(
                    name,
                    format!("{other:?} is not supported: only json is served"),
                )),
            },
            _ => Ok(false),
        }
    }

    fn count(&self) -> usize {
        self.count.unwrap_or(DEFAULT_COUNT)
    }

    fn offset(&self) -> usize {
        self.offset.unwrap_or(0)
    }
}

/// Splits `name:modifier`; refuses modifiers other than `allowed`.
fn base_name<'a>(name: &'a str, allowed: &[&str]) -> Result<&'a str, FhirError> {
    match name.split_once(':') {
        None => Ok(name),
        Some((base, m)) if allowed.contains(&m) => Ok(base),
        Some((base, m)) => Err(FhirError::unsupported(
            base,
            format!("modifier :{m} is not supported"),
        )),
    }
}

/// Every group (AND) has an alternative (OR) that satisfies `f`.
fn all_any<T>(groups: &[Vec<T>], f: impl Fn(&T) -> bool) -> bool {
    groups.iter().all(|g| g.iter().any(&f))
}

/// The Patient id of a `patient` reference (`id`, `Patient/id` or a URL).
fn patient_ref(name: &str, v: &str) -> Result<String, FhirError> {
    let id = match v.rsplit_once('/') {
        None => v,
        Some((before, id)) if before == "Patient" || before.ends_with("/Patient") => id,
        Some(_) => {
            return Err(FhirError::bad(
                name,
                format!("{v:?} is not a Patient reference (use id or Patient/id)"),
            ))
        }
    };
    if is_fhir_id(id) {
        Ok(id.to_string())
    } else {
        Err(FhirError::bad(name, format!("{v:?} is not a valid id")))
    }
}

fn ids(name: &str, value: &str) -> Result<Vec<String>, FhirError> {
    alternatives(name, value)?
        .into_iter()
        .map(|id| {
            if is_fhir_id(&id) {
                Ok(id)
            } else {
                Err(FhirError::bad(name, format!("{id:?} is not a valid id")))
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DocStatus {
    Current,
    Superseded,
    EnteredInError,
}

/// A parsed DocumentReference search.
#[derive(Clone, Debug)]
pub struct DocSearch {
    patients: Vec<Vec<String>>,
    ids: Vec<Vec<String>>,
    types: Vec<Vec<Token>>,
    categories: Vec<Vec<Token>>,
    dates: Vec<Vec<DateCond>>,
    periods: Vec<Vec<DateCond>>,
    statuses: Vec<Vec<DocStatus>>,
    count: usize,
    offset: usize,
}

impl DocSearch {
    /// Parses query parameters; repeated parameters are ANDed, commas ORed.
    /// Parameters with an empty value are ignored.
    pub fn parse(params: &[(String, String)]) -> Result<DocSearch, FhirError> {
        let mut s = DocSearch {
            patients: Vec::new(),
            ids: Vec::new(),
            types: Vec::new(),
            categories: Vec::new(),
            dates: Vec::new(),
            periods: Vec::new(),
            statuses: Vec::new(),
            count: DEFAULT_COUNT,
            offset: 0,
        };
        let mut paging = Paging::default();
        for (name, value) in params {
            let known = [
                "patient", "_id", "type", "category", "date", "period", "status", "_count",
                "_offset", "_format",
            ];
            let base = name.split_once(':').map_or(name.as_str(), |(b, _)| b);
            if !known.contains(&base) {
                return Err(FhirError::UnknownParameter {
                    name: name.clone(),
                    supported: DOC_SEARCH_PARAMS,
                });
            }
            let allowed: &[&str] = if base == "patient" { &["Patient"] } else { &[] };
            let base = base_name(name, allowed)?;
            if value.trim().is_empty() {
                continue;
            }
            if paging.take(base, value)? {
                continue;
            }
            match base {
                "patient" => s.patients.push(
                    alternatives(base, value)?
                        .iter()
                        .map(|v| patient_ref(base, v))
                        .collect::<Result<_, _>>()?,
                ),
                "_id" => s.ids.push(ids(base, value)?),
                "type" => s.types.push(Token::parse_all(base, value)?),
                "category" => s.categories.push(Token::parse_all(base, value)?),
                "date" => s.dates.push(DateCond::parse_all(base, value)?),
                "period" => s.periods.push(DateCond::parse_all(base, value)?),
                _ => s.statuses.push(
                    alternatives(base, value)?
                        .iter()
                        .map(|v| match v.as_str() {
                            "current" => Ok(DocStatus::Current),
                            "superseded" => Ok(DocStatus::Superseded),
                            "entered-in-error" => Ok(DocStatus::EnteredInError),
                            other => Err(FhirError::bad(
                                base,
                                format!(
                                    "{other:?} is not a status (current, superseded, \
                                     entered-in-error)"
                                ),
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                ),
            }
        }
        s.count = paging.count();
        s.offset = paging.offset();
        Ok(s)
    }

    /// Does the document (of Patient `patient_id`) match every parameter?
    pub fn matches(&self, patient_id: &str, v: &DocView) -> bool {
        let id = fhir_id(&v.doc.key);
        let coding = v.type_coding();
        let received = v.received_span();
        let period = v.period_span();
        all_any(&self.patients, |p| p == patient_id)
            && all_any(&self.ids, |i| *i == id)
            && all_any(&self.types, |t| {
                coding
                    .as_ref()
                    .is_some_and(|(sys, code)| t.matches(sys.as_deref(), code))
            })
            && all_any(&self.categories, |t| {
                t.matches(Some(CATEGORY_SYSTEM), CATEGORY_CODE)
            })
            && all_any(&self.dates, |c| received.is_some_and(|r| c.matches(r)))
            && all_any(&self.periods, |c| period.is_some_and(|r| c.matches(r)))
            && all_any(&self.statuses, |s| match s {
                DocStatus::Current => v.current(),
                DocStatus::Superseded => !v.current(),
                DocStatus::EnteredInError => false,
            })
    }

    /// Page size (`_count`, default 50).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Index of the first result of the page (`_offset`, default 0).
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// A parsed Patient search.
#[derive(Clone, Debug)]
pub struct PatientSearch {
    ids: Vec<Vec<String>>,
    identifiers: Vec<Vec<Token>>,
    count: usize,
    offset: usize,
}

impl PatientSearch {
    /// Parses `_id`, `identifier`, `_count`, `_offset`, `_format`.
    pub fn parse(params: &[(String, String)]) -> Result<PatientSearch, FhirError> {
        let mut s = PatientSearch {
            ids: Vec::new(),
            identifiers: Vec::new(),
            count: DEFAULT_COUNT,
            offset: 0,
        };
        let mut paging = Paging::default();
        for (name, value) in params {
            let base = name.split_once(':').map_or(name.as_str(), |(b, _)| b);
            if !["_id", "identifier", "_count", "_offset", "_format"].contains(&base) {
                return Err(FhirError::UnknownParameter {
                    name: name.clone(),
                    supported: PATIENT_SEARCH_PARAMS,
                });
            }
            let base = base_name(name, &[])?;
            if value.trim().is_empty() || paging.take(base, value)? {
                continue;
            }
            if base == "_id" {
                s.ids.push(ids(base, value)?);
            } else {
                s.identifiers.push(Token::parse_all(base, value)?);
            }
        }
        s.count = paging.count();
        s.offset = paging.offset();
        Ok(s)
    }

    /// Does the patient match every parameter?
    pub fn matches(&self, p: &PatientRecord) -> bool {
        let id = patient_fhir_id(&p.id);
        let idents: Vec<(Option<String>, String)> =
            p.identifiers.iter().map(|i| key_identifier(i)).collect();
        all_any(&self.ids, |i| *i == id)
            && all_any(&self.identifiers, |t| {
                idents
                    .iter()
                    .any(|(sys, value)| t.matches(sys.as_deref(), value))
            })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// `<base>/<path>?<params>`, with `_count` and `_offset` replaced by
/// `page` (count, offset) when given.
fn page_url(
    base: &str,
    path: &str,
    params: &[(String, String)],
    page: Option<(usize, usize)>,
) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        if page.is_none() || (k != "_count" && k != "_offset") {
            q.append_pair(k, v);
        }
    }
    if let Some((count, offset)) = page {
        q.append_pair("_count", &count.to_string());
        q.append_pair("_offset", &offset.to_string());
    }
    let q = q.finish();
    if q.is_empty() {
        format!("{base}/{path}")
    } else {
        format!("{base}/{path}?{q}")
    }
}

/// A searchset Bundle of the page `[offset, offset+count)` of `matches`
/// (all the matching resources). `resource_type` is the path searched, e.g.
/// `DocumentReference` or `DocumentReference/$docref`; each entry's fullUrl
/// uses its own resourceType and id. An operation (a path with `$`) is not
/// paged: its only link is `self`, with the parameters as given.
pub fn searchset(
    base: &str,
    resource_type: &str,
    params: &[(String, String)],
    matches: Vec<Value>,
    offset: usize,
    count: usize,
) -> Value {
    let base = base.trim_end_matches('/');
    let total = matches.len();
    let entries: Vec<Value> = matches
        .into_iter()
        .skip(offset)
        .take(count)
        .map(|r| {
            let full_url = match (r["resourceType"].as_str(), r["id"].as_str()) {
                (Some(t), Some(id)) => Some(format!("{base}/{t}/{id}")),
                _ => None,
            };
            json!({"fullUrl": full_url, "resource": r, "search": {"mode": "match"}})
        })
        .collect();
    let link = |rel: &str, page: Option<(usize, usize)>| {
        let url = page_url(base, resource_type, params, page);
        json!({"relation": rel, "url": url})
    };
    let mut links = Vec::new();
    if resource_type.contains('$') {
        links.push(link("self", None));
    } else {
        links.push(link("self", Some((count, offset))));
        links.push(link("first", Some((count, 0))));
        if offset > 0 {
            links.push(link(
                "previous",
                Some((count, offset.saturating_sub(count))),
            ));
        }
        if count > 0 && offset.saturating_add(count) < total {
            links.push(link("next", Some((count, offset + count))));
        }
    }
    prune(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }))
}

/// US Core `$docref`: indices into `views` of the documents to return.
/// Without type, start or end: the latest current CCD (else the latest
/// current document); otherwise every current document matching, latest
/// first. start/end select on care dates (the service period, else the
/// document time, else receipt).
pub fn docref_select(
    views: &[DocView<'_>],
    params: &[(String, String)],
) -> Result<Vec<usize>, FhirError> {
    let mut start: Option<Span> = None;
    let mut end: Option<Span> = None;
    let mut types: Vec<Vec<Token>> = Vec::new();
    let mut format = Paging::default();
    for (name, value) in params {
        let value = value.trim();
        match name.as_str() {
            "patient" | "profile" => {}
            "_format" => {
                format.take(name, value)?;
            }
            "start" | "end" => {
                if value.is_empty() {
                    continue;
                }
                let span = fhir_span(&value.replace(' ', "+")).ok_or_else(|| {
                    FhirError::bad(
                        name,
                        format!("{value:?} is not a date (YYYY, YYYY-MM or YYYY-MM-DD)"),
                    )
                })?;
                let slot = if name == "start" {
                    &mut start
                } else {
                    &mut end
                };
                if slot.is_some() {
                    return Err(FhirError::bad(name, "given more than once"));
                }
                *slot = Some(span);
            }
            "type" => {
                if !value.is_empty() {
                    types.push(Token::parse_all(name, value)?);
                }
            }
            "on-demand" => match value {
                "" | "false" => {}
                "true" => {
                    return Err(FhirError::unsupported(
                        name,
                        "on-demand documents are not generated: only \"false\" is supported",
                    ))
                }
                other => {
                    return Err(FhirError::bad(
                        name,
                        format!("{other:?} is not a boolean (true or false)"),
                    ))
                }
            },
            _ => {
                return Err(FhirError::UnknownParameter {
                    name: name.clone(),
                    supported: DOCREF_PARAMS,
                })
            }
        }
    }
    if let (Some(s), Some(e)) = (start, end) {
        if s.lo >= e.hi {
            return Err(FhirError::bad("start", "start is after end"));
        }
    }
    let current = views.iter().enumerate().filter(|(_, v)| v.current());
    if types.is_empty() && start.is_none() && end.is_none() {
        let latest = |ccd_only: bool| {
            current
                .clone()
                .filter(|(_, v)| !ccd_only || v.is_ccd())
                .max_by_key(|(_, v)| v.recency())
                .map(|(i, _)| i)
        };
        return Ok(latest(true).or_else(|| latest(false)).into_iter().collect());
    }
    let window = Span {
        lo: start.map_or(i64::MIN, |s| s.lo),
        hi: end.map_or(i64::MAX, |e| e.hi),
    };
    let mut hits: Vec<(usize, &DocView<'_>)> = current
        .filter(|(_, v)| {
            all_any(&types, |t| {
                v.type_coding()
                    .is_some_and(|(sys, code)| t.matches(sys.as_deref(), code))
            })
        })
        .filter(|(_, v)| {
            (start.is_none() && end.is_none()) || v.care_span().is_some_and(|c| c.overlaps(&window))
        })
        .collect();
    hits.sort_by_key(|(_, v)| std::cmp::Reverse(v.recency()));
    Ok(hits.into_iter().map(|(i, _)| i).collect())
}

/// The server's CapabilityStatement (SMART on FHIR security).
pub fn capability_statement(
    base: &str,
    authorize_url: &str,
    token_url: &str,
    software_version: &str,
) -> Value {
    let base = base.trim_end_matches('/');
    let sp = |name: &str, ty: &str, def: &str| json!({"name": name, "type": ty, "definition": def});
    let interactions =
        |codes: &[&str]| -> Vec<Value> { codes.iter().map(|c| json!({"code": c})).collect() };
    let us_core_sp = |p: &str| format!("http://hl7.org/fhir/us/core/SearchParameter/{p}");
    prune(json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(chrono::Utc::now().timestamp()),
        "kind": "instance",
        "software": {"name": "hispd", "version": software_version},
        "implementation": {
            "description": "hispd Blue Button Plus Pull (read-only FHIR R4 access to the patient's documents)",
            "url": base,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "token", "valueUri": token_url},
                        {"url": "authorize", "valueUri": authorize_url},
                    ],
                }],
                "service": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }],
                    "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
                }],
            },
            "resource": [
                {
                    "type": "Patient",
                    "supportedProfile": [US_CORE_PATIENT],
                    "interaction": interactions(&["read", "search-type"]),
                    "searchParam": [
                        sp("_id", "token", "http://hl7.org/fhir/SearchParameter/Resource-id"),
                        sp("identifier", "token", &us_core_sp("us-core-patient-identifier")),
                    ],
                },
                {
                    "type": "DocumentReference",
                    "supportedProfile": [US_CORE_DOCREF],
                    "interaction": interactions(&["read", "search-type"]),
                    "searchParam": [
                        sp("_id", "token", &us_core_sp("us-core-documentreference-id")),
                        sp("patient", "reference", &us_core_sp("us-core-documentreference-patient")),
                        sp("type", "token", &us_core_sp("us-core-documentreference-type")),
                        sp("category", "token", &us_core_sp("us-core-documentreference-category")),
                        sp("date", "date", &us_core_sp("us-core-documentreference-date")),
                        sp("period", "date", &us_core_sp("us-core-documentreference-period")),
                        sp("status", "token", &us_core_sp("us-core-documentreference-status")),
                    ],
                    "operation": [{
                        "name": "docref",
                        "definition": "http://hl7.org/fhir/us/core/OperationDefinition/docref",
                    }],
                },
                {
                    "type": "Binary",
                    "interaction": interactions(&["read"]),
                },
            ],
        }],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Ccda {
        let xml = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/ccda")
                .join(name),
        )
        .unwrap();
        ccda::parse(&xml, &ccda::Limits::default()).unwrap()
    }

    fn indexed(key: &str, received: i64) -> IndexedDocument {
        IndexedDocument {
            key: key.into(),
            set_id: None,
            version: 1,
            title: Some("Indexed title".into()),
            patient_ids: vec!["2.16.840.1.113883.19.5^998991".into()],
            patient_names: vec!["Eve Everywoman".into()],
            received,
            spool: "spool-1".into(),
            superseded_by: None,
        }
    }

    fn params(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn search(q: &[(&str, &str)]) -> DocSearch {
        DocSearch::parse(&params(q)).unwrap()
    }

    /// Panics on any null, blank string, empty array or empty object.
    fn assert_no_empty(v: &Value, path: &str) {
        match v {
            Value::Null => panic!("null at {path}"),
            Value::String(s) => assert!(!s.trim().is_empty(), "empty string at {path}"),
            Value::Array(a) => {
                assert!(!a.is_empty(), "empty array at {path}");
                for (i, x) in a.iter().enumerate() {
                    assert_no_empty(x, &format!("{path}[{i}]"));
                }
            }
            Value::Object(o) => {
                assert!(!o.is_empty(), "empty object at {path}");
                for (k, x) in o {
                    assert_no_empty(x, &format!("{path}.{k}"));
                }
            }
            _ => {}
        }
    }

    const CCD_KEY: &str = "2.16.840.1.113883.19.5.99999.1^TT988";
    const DEC_4_2026_18H: i64 = 1_796_407_200;

    #[test]
    fn fhir_id_is_stable_and_valid() {
        // Pinned: ids are stored by clients, they must never change.
        assert_eq!(fhir_id(CCD_KEY), "d7d88774121a7774c244eb6f54904845a");
        assert_eq!(fhir_id(CCD_KEY), fhir_id(CCD_KEY));
        assert_ne!(
            fhir_id(CCD_KEY),
            fhir_id("2.16.840.1.113883.19.5.99999.1^TT989")
        );
        for key in [CCD_KEY, "1.2.3", "weird key / with ü^and^carets", ""] {
            let id = fhir_id(key);
            assert!(is_fhir_id(&id), "{id}");
            assert_eq!(id.len(), 33);
        }
        assert!(!is_fhir_id(""));
        assert!(!is_fhir_id("a^b"));
        assert!(!is_fhir_id(&"a".repeat(65)));
        assert_eq!(patient_fhir_id("p-1.x"), "p-1.x");
        let odd = patient_fhir_id("eve@example.org");
        assert!(is_fhir_id(&odd) && odd.starts_with('p'), "{odd}");
    }

    #[test]
    fn binary_id_round_trip() {
        let id = fhir_id(CCD_KEY);
        for kind in [BinaryKind::Ccda, BinaryKind::Html] {
            let b = binary_id(&id, kind);
            assert!(is_fhir_id(&b));
            assert_eq!(parse_binary_id(&b), Some((id.clone(), kind)));
        }
        assert_eq!(binary_id("dabc", BinaryKind::Html), "dabc-html");
        assert_eq!(parse_binary_id("dabc"), None);
        assert_eq!(parse_binary_id("-ccda"), None);
        assert_eq!(parse_binary_id("dabc-pdf"), None);
        assert_eq!(parse_binary_id("d/x-ccda"), None);
    }

    #[test]
    fn hl7_timestamps() {
        let t = |s| hl7_ts_to_fhir(s);
        assert_eq!(t("2024").as_deref(), Some("2024"));
        assert_eq!(t("202405").as_deref(), Some("2024-05"));
        assert_eq!(t("20240501").as_deref(), Some("2024-05-01"));
        assert_eq!(
            t("20240501123000-0500").as_deref(),
            Some("2024-05-01T12:30:00-05:00")
        );
        assert_eq!(
            t("202405011230+0000").as_deref(),
            Some("2024-05-01T12:30:00+00:00")
        );
        assert_eq!(
            t("2024050112-0330").as_deref(),
            Some("2024-05-01T12:00:00-03:30")
        );
        assert_eq!(
            t("20240501123000.1234+0100").as_deref(),
            Some("2024-05-01T12:30:00.1234+01:00")
        );
        // A time without a zone cannot be a FHIR dateTime: the date alone.
        assert_eq!(t("202405011230").as_deref(), Some("2024-05-01"));
        assert_eq!(t("20240501123000.5").as_deref(), Some("2024-05-01"));
        assert_eq!(t(" 20240501 ").as_deref(), Some("2024-05-01"));
        for bad in [
            "",
            "abc",
            "202",
            "20241",
            "2024-05-01",
            "20240231",
            "20241301",
            "20240501250000-0500",
            "20240501126000-0500",
            "20240501123000-05",
            "20240501123000+1500",
            "20240501123000Z",
            "20240501.5",
            "00000101",
            "2024050112300",
            "20240501123000-0500x",
        ] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fhir_spans() {
        let s = |v| fhir_span(v).unwrap();
        let day = 86_400 * MICROS;
        assert_eq!(s("2024").lo, 1_704_067_200 * MICROS);
        assert_eq!(s("2024").hi - s("2024").lo, 366 * day);
        assert_eq!(s("2024-02").hi - s("2024-02").lo, 29 * day);
        assert_eq!(s("2024-12").hi, s("2025").lo);
        assert_eq!(s("2024-05-01").hi - s("2024-05-01").lo, day);
        assert_eq!(
            s("2024-05-01T00:00Z").hi - s("2024-05-01T00:00Z").lo,
            60 * MICROS
        );
        assert_eq!(
            s("2024-05-01T05:00:00+05:00").lo,
            s("2024-05-01T00:00:00Z").lo
        );
        assert_eq!(
            s("2024-05-01T00:00:00.25Z").lo - s("2024-05-01").lo,
            250_000
        );
        assert_eq!(
            s("2024-05-01T00:00:00.25Z").hi - s("2024-05-01T00:00:00.25Z").lo,
            10_000
        );
        for bad in [
            "",
            "24",
            "2024-5",
            "2024-13",
            "2024-02-30",
            "2024-05-01T",
            "2024-05-01T25:00Z",
            "2024-05-01T10:00:00+5",
            "2024-05-01T10:00:00.Z",
            "2024-05-01x",
            "0000",
        ] {
            assert_eq!(fhir_span(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn document_reference_of_a_real_ccd() {
        let c = fixture("hl7-ccd-1.xml");
        let d = indexed(CCD_KEY, DEC_4_2026_18H);
        let v = DocView {
            doc: &d,
            ccda: Some(&c),
        };
        let r = document_reference("https://h.example/fhir/", "p1", &v);
        assert_no_empty(&r, "DocumentReference");
        let id = fhir_id(CCD_KEY);
        assert_eq!(r["resourceType"], "DocumentReference");
        assert_eq!(r["id"], id.as_str());
        assert_eq!(r["meta"]["profile"][0], US_CORE_DOCREF);
        assert_eq!(
            r["masterIdentifier"],
            json!({"system": "urn:oid:2.16.840.1.113883.19.5.99999.1", "value": "TT988"})
        );
        assert_eq!(r["identifier"][0], r["masterIdentifier"]);
        assert_eq!(r["status"], "current");
        assert_eq!(r["docStatus"], "final");
        assert_eq!(r["type"]["coding"][0]["system"], "http://loinc.org");
        assert_eq!(r["type"]["coding"][0]["code"], "34133-9");
        assert_eq!(r["type"]["text"], "Patient Chart Summary");
        assert_eq!(r["category"][0]["coding"][0]["code"], "clinical-note");
        assert_eq!(r["subject"]["reference"], "Patient/p1");
        assert_eq!(r["date"], "2026-12-04T18:00:00Z");
        assert!(!r["author"].as_array().unwrap().is_empty());
        assert_eq!(r["description"], "Patient Chart Summary");
        let content = r["content"].as_array().unwrap();
        assert_eq!(content.len(), 2);
        assert_eq!(content[0]["attachment"]["contentType"], "application/xml");
        assert_eq!(
            content[0]["attachment"]["url"],
            format!("https://h.example/fhir/Binary/{id}-ccda")
        );
        assert_eq!(
            content[0]["format"]["code"],
            "urn:hl7-org:sdwg:ccda-structuredBody:2.1"
        );
        assert_eq!(content[0]["format"]["system"], FORMAT_SYSTEM);
        assert_eq!(content[1]["attachment"]["contentType"], "text/html");
        assert_eq!(
            content[1]["attachment"]["url"],
            format!("https://h.example/fhir/Binary/{id}-html")
        );
        assert_eq!(
            r["context"]["period"],
            json!({"start": "1975-05-01", "end": "2013-08-15"})
        );

        // Discharge summary: another LOINC type, a period with times.
        let c = fixture("hl7-discharge-summary.xml");
        let v = DocView {
            doc: &d,
            ccda: Some(&c),
        };
        let r = document_reference("https://h.example/fhir", "p1", &v);
        assert_no_empty(&r, "DocumentReference");
        assert_eq!(r["type"]["coding"][0]["code"], "18842-5");
        assert_eq!(r["context"]["period"]["start"], "2014-09-09T19:04:00-05:00");
        assert_eq!(
            r["custodian"]["display"],
            c.custodian.clone().unwrap().as_str()
        );

        // An unstructured body.
        let mut nx = c.clone();
        nx.non_xml_body_media_type = Some("application/pdf".into());
        let r = document_reference(
            "https://h.example/fhir",
            "p1",
            &DocView {
                doc: &d,
                ccda: Some(&nx),
            },
        );
        assert_eq!(
            r["content"][0]["format"]["code"],
            "urn:hl7-org:sdwg:ccda-nonXMLBody:2.1"
        );
    }

    #[test]
    fn document_reference_identifiers_and_fallbacks() {
        // Root-only UUID id (the referral note), no C-CDA at hand.
        let c = fixture("hl7-referral-note.xml");
        let key = crate::documents::index::id_key(c.id.as_ref().unwrap()).unwrap();
        let d = indexed(&key, 0);
        let r = document_reference(
            "https://h.example",
            "p1",
            &DocView {
                doc: &d,
                ccda: Some(&c),
            },
        );
        assert_no_empty(&r, "DocumentReference");
        assert_eq!(
            r["masterIdentifier"],
            json!({"system": RFC3986, "value": "urn:uuid:6f1bd58b-c58f-40b7-b314-caf1294ed98b"})
        );
        assert_eq!(r["date"], "1970-01-01T00:00:00Z");
        assert!(r.get("context").is_none(), "no serviceEvent, no period");

        let hex = "ab".repeat(32);
        let mut d = indexed(&hex, 10);
        d.title = None;
        let r = document_reference(
            "https://h.example",
            "p1",
            &DocView {
                doc: &d,
                ccda: None,
            },
        );
        assert_no_empty(&r, "DocumentReference");
        assert_eq!(
            r["masterIdentifier"],
            json!({"system": RFC3986, "value": format!("urn:sha256:{hex}")})
        );
        assert_eq!(r["type"], json!({"text": "Clinical document"}));
        for absent in ["author", "custodian", "description", "context"] {
            assert!(r.get(absent).is_none(), "{absent}");
        }
        assert_eq!(r["content"].as_array().unwrap().len(), 2);

        let d = indexed("1.2.3.4", 10);
        let r = document_reference(
            "https://h.example",
            "p1",
            &DocView {
                doc: &d,
                ccda: None,
            },
        );
        assert_eq!(
            r["masterIdentifier"],
            json!({"system": RFC3986, "value": "urn:oid:1.2.3.4"})
        );
    }

    #[test]
    fn superseded_status() {
        let mut d = indexed(CCD_KEY, 1);
        d.superseded_by = Some("1.2.3^v2".into());
        let v = DocView {
            doc: &d,
            ccda: None,
        };
        assert_eq!(document_reference("b", "p", &v)["status"], "superseded");
        assert!(search(&[("status", "superseded")]).matches("p", &v));
        assert!(!search(&[("status", "current")]).matches("p", &v));
        assert!(search(&[("status", "current,superseded")]).matches("p", &v));
        assert!(!search(&[("status", "entered-in-error")]).matches("p", &v));
        assert!(search(&[]).matches("p", &v), "all statuses by default");
    }

    #[test]
    fn doc_search_parameters() {
        let c = fixture("hl7-ccd-1.xml");
        let d = indexed(CCD_KEY, DEC_4_2026_18H);
        let v = DocView {
            doc: &d,
            ccda: Some(&c),
        };
        let id = fhir_id(CCD_KEY);
        let yes = |q: &[(&str, &str)]| assert!(search(q).matches("p1", &v), "{q:?}");
        let no = |q: &[(&str, &str)]| assert!(!search(q).matches("p1", &v), "{q:?}");
        yes(&[]);
        yes(&[("patient", "p1")]);
        yes(&[("patient", "Patient/p1")]);
        yes(&[("patient:Patient", "p1")]);
        yes(&[("patient", "https://h.example/fhir/Patient/p1")]);
        yes(&[("patient", "p2,p1")]);
        no(&[("patient", "p2")]);
        no(&[("patient", "p1"), ("patient", "p2")]);
        yes(&[("_id", &id)]);
        yes(&[("_id", &format!("dother,{id}"))]);
        no(&[("_id", "dother")]);
        yes(&[("type", "34133-9")]);
        yes(&[("type", "http://loinc.org|34133-9")]);
        yes(&[("type", "urn:oid:2.16.840.1.113883.6.1|34133-9")]);
        yes(&[("type", "http://loinc.org|")]);
        yes(&[("type", "18842-5,34133-9")]);
        no(&[("type", "18842-5")]);
        no(&[("type", "|34133-9")]);
        no(&[("type", "http://snomed.info/sct|34133-9")]);
        no(&[("type", "34133-9"), ("type", "18842-5")]);
        yes(&[("category", "clinical-note")]);
        yes(&[("category", &format!("{CATEGORY_SYSTEM}|clinical-note"))]);
        no(&[("category", "imaging")]);
        no(&[("category", "http://loinc.org|clinical-note")]);
        yes(&[("date", "2026-12-04")]);
        yes(&[("date", "2026-12")]);
        yes(&[("date", "2026-12-04T18:00:00Z")]);
        yes(&[("date", "2026-12-04T13:00:00-05:00")]);
        yes(&[(
            "date",
            "2026-12-04T13:00:00 05:00".replace("13:", "23:").as_str(),
        )]);
        no(&[("date", "2026-12-05")]);
        no(&[("date", "2026-12-04T18:00:01Z")]);
        // service period 1975-05-01 .. 2013-08-15
        yes(&[("period", "ge1975")]);
        yes(&[("period", "ge2013-08-15")]);
        yes(&[("period", "le1975-05-01")]);
        yes(&[("period", "sa1975-04-30")]);
        yes(&[("period", "eb2013-08-16")]);
        yes(&[("period", "ne2000")]);
        no(&[("period", "1970,1980")]); // eq: the period lies in neither year
        yes(&[("period", "1970,1975-05-01T00:00Z,eq1970-01-01,ge2013-08-15")]);
        no(&[("period", "2000")]);
        no(&[("period", "sa1975-05-01")]);
        no(&[("period", "gt2013-08-15")]);
        no(&[("period", "eb2013-08-15")]);
        yes(&[("period", "ne1970")]);
        // A document without a service period never matches on period.
        let bare = DocView {
            doc: &d,
            ccda: None,
        };
        assert!(!search(&[("period", "ne2000")]).matches("p1", &bare));
        // _format and paging do not filter.
        yes(&[("_format", "json"), ("_count", "5"), ("_offset", "10")]);
        let s = search(&[("_count", "5"), ("_offset", "10")]);
        assert_eq!((s.count(), s.offset()), (5, 10));
        let s = search(&[]);
        assert_eq!((s.count(), s.offset()), (50, 0));
        // empty values are ignored
        yes(&[("type", ""), ("date", "")]);
    }

    #[test]
    fn period_eq_needs_containment() {
        let c = fixture("hl7-ccd-1.xml");
        let d = indexed(CCD_KEY, 0);
        let v = DocView {
            doc: &d,
            ccda: Some(&c),
        };
        // 1975-05-01 .. 2013-08-15 lies inside 1970..2020 only as a range.
        assert!(search(&[("period", "ge1970-01-01"), ("period", "le2020")]).matches("p", &v));
        assert!(!search(&[("period", "1975")]).matches("p", &v));
        assert!(search(&[("period", "gt1975")]).matches("p", &v));
        assert!(search(&[("period", "lt2013")]).matches("p", &v));
        assert!(!search(&[("period", "lt1975")]).matches("p", &v));
    }

    #[test]
    fn date_prefixes_and_precision() {
        let at = |secs: i64| indexed(CCD_KEY, secs);
        let late_2023 = at(1_704_063_600); // 2023-12-31T23:00:00Z
        let march_2024 = at(1_709_251_200); // 2024-03-01T00:00:00Z
        let m = |d: &IndexedDocument, q: &[(&str, &str)]| {
            search(q).matches("p", &DocView { doc: d, ccda: None })
        };
        // ge2024 means from the start of 2024.
        assert!(!m(&late_2023, &[("date", "ge2024")]));
        assert!(m(&march_2024, &[("date", "ge2024")]));
        assert!(m(&late_2023, &[("date", "lt2024")]));
        assert!(!m(&march_2024, &[("date", "lt2024")]));
        assert!(m(&late_2023, &[("date", "le2023")]));
        assert!(m(&late_2023, &[("date", "le2023-12-31")]));
        assert!(!m(&late_2023, &[("date", "gt2023")]));
        assert!(m(&late_2023, &[("date", "gt2023-12-31T22:59Z")]));
        assert!(!m(&late_2023, &[("date", "gt2023-12-31T23:00Z")]));
        // In New York it is still 18:00 on the 31st.
        assert!(m(&late_2023, &[("date", "2023-12-31T18:00-05:00")]));
        assert!(m(&march_2024, &[("date", "eq2024-03")]));
        assert!(m(&march_2024, &[("date", "ne2023")]));
        assert!(!m(&late_2023, &[("date", "ne2023")]));
        assert!(m(&march_2024, &[("date", "sa2024-02-29")]));
        assert!(!m(&march_2024, &[("date", "sa2024-03-01")]));
        assert!(m(&late_2023, &[("date", "eb2024")]));
        assert!(!m(&late_2023, &[("date", "eb2023")]));
        // repeated = AND
        let in_2024 = [("date", "ge2024-01-01"), ("date", "lt2025-01-01")];
        assert!(m(&march_2024, &in_2024));
        assert!(!m(&late_2023, &in_2024));
        assert!(!m(&at(1_735_689_600), &in_2024), "2025-01-01T00:00:00Z");
        // comma = OR
        assert!(m(&late_2023, &[("date", "2022,2023")]));
    }

    #[test]
    fn search_errors_say_what_is_wrong() {
        let err = |q: &[(&str, &str)]| DocSearch::parse(&params(q)).unwrap_err();
        let e = err(&[("subject", "p1")]);
        assert!(matches!(e, FhirError::UnknownParameter { ref name, .. } if name == "subject"));
        assert!(
            e.to_string().contains("\"subject\"") && e.to_string().contains("period"),
            "{e}"
        );
        assert_eq!(e.outcome()["issue"][0]["code"], "not-supported");
        assert_eq!(
            e.outcome()["issue"][0]["diagnostics"],
            e.to_string().as_str()
        );
        assert_eq!(e.outcome()["resourceType"], "OperationOutcome");
        for (q, what) in [
            (("date", "2024-13-01"), "\"2024-13-01\""),
            (("date", "ap2024"), "\"ap\""),
            (("date", "yesterday"), "\"yesterday\""),
            (("period", "ge2024-05-01T10"), "\"ge2024-05-01T10\""),
            (("_count", "0"), "0 is out of range"),
            (("_count", "201"), "201"),
            (("_count", "ten"), "\"ten\""),
            (("_offset", "-1"), "\"-1\""),
            (("status", "final"), "\"final\""),
            (("type", "a|b|c"), "\"a|b|c\""),
            (("type", "|"), "\"|\""),
            (("patient", "Group/1"), "\"Group/1\""),
            (("_id", "a^b"), "\"a^b\""),
        ] {
            let e = err(&[q]);
            assert!(
                matches!(e, FhirError::BadParameter { ref name, .. } if name == q.0),
                "{q:?}: {e}"
            );
            let msg = e.to_string();
            assert!(msg.contains(q.0) && msg.contains(what), "{q:?}: {msg}");
            assert_eq!(e.outcome()["issue"][0]["code"], "invalid");
        }
        let e = err(&[("_count", "5"), ("_count", "6")]);
        assert!(e.to_string().contains("more than once"), "{e}");
        let e = err(&[("type:text", "CCD")]);
        assert!(matches!(e, FhirError::NotSupported { .. }), "{e}");
        assert!(e.to_string().contains(":text"), "{e}");
        let e = err(&[("_format", "xml")]);
        assert!(matches!(e, FhirError::NotSupported { .. }), "{e}");
    }

    #[test]
    fn patients_and_patient_search() {
        let c = fixture("hl7-ccd-1.xml");
        let demo = &c.patients[0];
        let ident = crate::documents::index::id_key(&demo.ids[0]).unwrap();
        let (root, ext) = ident.split_once('^').unwrap();
        let p = PatientRecord {
            id: "p1".into(),
            name: "Eve Everywoman".into(),
            identifiers: vec![ident.clone()],
            password_hash: Some("secret".into()),
        };
        let r = patient_resource(&p, Some(demo));
        assert_no_empty(&r, "Patient");
        assert_eq!(r["id"], "p1");
        assert_eq!(r["meta"]["profile"][0], US_CORE_PATIENT);
        assert_eq!(
            r["identifier"][0],
            json!({"system": format!("urn:oid:{root}"), "value": ext})
        );
        assert!(r["name"][0]["family"].is_string(), "{r}");
        assert!(r["name"][0]["given"].is_array(), "{r}");
        assert_eq!(r["gender"], "female");
        assert_eq!(r["birthDate"], "1975-05-01");
        assert!(!r.to_string().contains("secret"));

        let r = patient_resource(&p, None);
        assert_no_empty(&r, "Patient");
        assert_eq!(
            r["name"][0],
            json!({"text": "Eve Everywoman", "family": "Everywoman", "given": ["Eve"]})
        );
        assert_eq!(r["gender"], "unknown");
        let nameless = PatientRecord {
            name: " ".into(),
            ..p.clone()
        };
        let r = patient_resource(&nameless, None);
        assert_no_empty(&r, "Patient");
        assert!(r["name"][0]["extension"].is_array());

        let ps = |q: &[(&str, &str)]| PatientSearch::parse(&params(q)).unwrap();
        assert!(ps(&[]).matches(&p));
        assert!(ps(&[("_id", "p1")]).matches(&p));
        assert!(!ps(&[("_id", "p2")]).matches(&p));
        assert!(ps(&[("identifier", ext)]).matches(&p));
        assert!(ps(&[("identifier", &format!("urn:oid:{root}|{ext}"))]).matches(&p));
        assert!(ps(&[("identifier", &format!("urn:oid:{root}|"))]).matches(&p));
        assert!(!ps(&[("identifier", &format!("urn:oid:1.2.3|{ext}"))]).matches(&p));
        assert!(!ps(&[("identifier", &format!("|{ext}"))]).matches(&p));
        assert!(!ps(&[("identifier", "other")]).matches(&p));
        let s = ps(&[
            ("_count", "7"),
            ("_offset", "3"),
            ("_format", "application/fhir+json"),
        ]);
        assert_eq!((s.count(), s.offset()), (7, 3));
        let e = PatientSearch::parse(&params(&[("name", "Eve")])).unwrap_err();
        assert!(
            e.to_string().contains("\"name\"") && e.to_string().contains("identifier"),
            "{e}"
        );
        assert!(PatientSearch::parse(&params(&[("_count", "1000")])).is_err());
    }

    #[test]
    fn binary() {
        let b = binary_resource("dx-html", "text/html", b"<p>hi</p>");
        assert_eq!(
            b,
            json!({"resourceType": "Binary", "id": "dx-html", "contentType": "text/html",
                   "data": "PHA+aGk8L3A+"})
        );
        assert!(binary_resource("dx-html", "text/html", b"")
            .get("data")
            .is_none());
    }

    #[test]
    fn searchset_paging() {
        let resources: Vec<Value> = (0..5)
            .map(|i| json!({"resourceType": "DocumentReference", "id": format!("d{i}")}))
            .collect();
        let q = params(&[
            ("type", "http://loinc.org|34133-9"),
            ("_count", "2"),
            ("_offset", "2"),
        ]);
        let b = searchset(
            "https://h.example/fhir/",
            "DocumentReference",
            &q,
            resources.clone(),
            2,
            2,
        );
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "searchset");
        assert_eq!(b["total"], 5);
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0]["fullUrl"],
            "https://h.example/fhir/DocumentReference/d2"
        );
        assert_eq!(entries[0]["resource"]["id"], "d2");
        assert_eq!(entries[0]["search"]["mode"], "match");
        let link = |b: &Value, rel: &str| {
            b["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == rel)
                .map(|l| l["url"].as_str().unwrap().to_string())
        };
        assert_eq!(
            link(&b, "self").unwrap(),
            "https://h.example/fhir/DocumentReference?type=http%3A%2F%2Floinc.org%7C34133-9&_count=2&_offset=2"
        );
        assert!(link(&b, "first").unwrap().ends_with("&_count=2&_offset=0"));
        assert!(link(&b, "previous")
            .unwrap()
            .ends_with("&_count=2&_offset=0"));
        assert!(link(&b, "next").unwrap().ends_with("&_count=2&_offset=4"));
        // Last page: no next.
        let b = searchset(
            "https://h.example/fhir",
            "DocumentReference",
            &q,
            resources.clone(),
            4,
            2,
        );
        assert_eq!(b["entry"].as_array().unwrap().len(), 1);
        assert_eq!(link(&b, "next"), None);
        assert!(link(&b, "previous").unwrap().ends_with("_offset=2"));
        // First page: no previous.
        let b = searchset(
            "https://h.example/fhir",
            "DocumentReference",
            &[],
            resources,
            0,
            50,
        );
        assert_eq!(link(&b, "previous"), None);
        assert_eq!(link(&b, "next"), None);
        assert_eq!(b["entry"].as_array().unwrap().len(), 5);
        // An operation is not paged.
        let q = params(&[("patient", "p 1"), ("type", "34133-9")]);
        let b = searchset(
            "https://h.example/fhir",
            "DocumentReference/$docref",
            &q,
            vec![],
            0,
            1,
        );
        assert_eq!(
            b["link"],
            json!([{"relation": "self",
                    "url": "https://h.example/fhir/DocumentReference/$docref?patient=p+1&type=34133-9"}])
        );
        // Nothing found: total 0, no entry array (never empty).
        let b = searchset("https://h.example/fhir", "Patient", &[], vec![], 0, 50);
        assert_eq!(b["total"], 0);
        assert!(b.get("entry").is_none());
        assert_no_empty(&b, "Bundle");
    }

    #[test]
    fn docref_operation() {
        let ccd_old = fixture("hl7-ccd-1.xml"); // effective 2013
        let ccd_new = fixture("hl7-ccd-2.xml"); // effective 2014
        let discharge = fixture("hl7-discharge-summary.xml");
        let referral = fixture("hl7-referral-note.xml");
        let docs: Vec<IndexedDocument> = (0..5)
            .map(|i| indexed(&format!("1.2^{i}"), 100 + i))
            .collect();
        let mut superseded = docs[4].clone();
        superseded.superseded_by = Some("x".into());
        let views = vec![
            DocView {
                doc: &docs[0],
                ccda: Some(&ccd_old),
            },
            DocView {
                doc: &docs[1],
                ccda: Some(&ccd_new),
            },
            DocView {
                doc: &docs[2],
                ccda: Some(&discharge),
            },
            DocView {
                doc: &docs[3],
                ccda: Some(&referral),
            },
            DocView {
                doc: &superseded,
                ccda: Some(&ccd_new),
            },
        ];
        let sel = |q: &[(&str, &str)]| docref_select(&views, &params(q)).unwrap();
        // Default: the latest current CCD, one result.
        assert_eq!(sel(&[("patient", "p1")]), vec![1]);
        assert_eq!(sel(&[("patient", "p1"), ("on-demand", "false")]), vec![1]);
        // No CCD: the latest document of any type.
        let no_ccd = [views[2], views[3]];
        let latest = docref_select(&no_ccd, &[]).unwrap();
        assert_eq!(latest.len(), 1);
        assert!(docref_select(&[], &[]).unwrap().is_empty());
        // Typed: every current document of the type, latest first.
        assert_eq!(sel(&[("type", "http://loinc.org|34133-9")]), vec![1, 0]);
        assert_eq!(sel(&[("type", "18842-5")]), vec![2]);
        assert!(sel(&[("type", "11506-3")]).is_empty());
        // Care dates: the discharge (2014-09-09..16) and the CCD of 2014-10.
        assert_eq!(
            sel(&[("type", "18842-5"), ("start", "2014-09-10")]),
            vec![2]
        );
        assert!(sel(&[("type", "18842-5"), ("start", "2014-09-18")]).is_empty());
        let in_sept = sel(&[("start", "2014-09-01"), ("end", "2014-09-30")]);
        assert!(in_sept.contains(&2) && !in_sept.contains(&1), "{in_sept:?}");
        // Errors.
        let err = |q: &[(&str, &str)]| docref_select(&views, &params(q)).unwrap_err();
        assert!(matches!(
            err(&[("on-demand", "true")]),
            FhirError::NotSupported { .. }
        ));
        assert!(matches!(
            err(&[("on-demand", "maybe")]),
            FhirError::BadParameter { .. }
        ));
        assert!(matches!(
            err(&[("start", "last week")]),
            FhirError::BadParameter { .. }
        ));
        assert!(matches!(
            err(&[("start", "2020"), ("end", "2019")]),
            FhirError::BadParameter { .. }
        ));
        assert!(matches!(
            err(&[("count", "1")]),
            FhirError::UnknownParameter { .. }
        ));
    }

    #[test]
    fn capability_statement_lists_our_resources() {
        let c = capability_statement(
            "https://h.example/fhir/",
            "https://h.example/authorize",
            "https://h.example/token",
            "1.2.3",
        );
        assert_no_empty(&c, "CapabilityStatement");
        assert_eq!(c["resourceType"], "CapabilityStatement");
        assert_eq!(c["status"], "active");
        assert_eq!(c["kind"], "instance");
        assert_eq!(c["fhirVersion"], "4.0.1");
        assert_eq!(c["format"], json!(["json"]));
        assert_eq!(c["software"], json!({"name": "hispd", "version": "1.2.3"}));
        assert_eq!(c["implementation"]["url"], "https://h.example/fhir");
        assert!(fhir_span(c["date"].as_str().unwrap()).is_some());
        let rest = &c["rest"][0];
        assert_eq!(rest["mode"], "server");
        assert_eq!(
            rest["security"]["service"][0]["coding"][0]["code"],
            "SMART-on-FHIR"
        );
        let uris = &rest["security"]["extension"][0];
        assert_eq!(
            uris["url"],
            "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        );
        assert!(uris.to_string().contains("https://h.example/token"));
        assert!(uris.to_string().contains("https://h.example/authorize"));
        let types: Vec<&str> = rest["resource"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Patient", "DocumentReference", "Binary"]);
        let docref = &rest["resource"][1];
        let names: Vec<&str> = docref["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["_id", "patient", "type", "category", "date", "period", "status"]
        );
        assert_eq!(
            docref["operation"][0]["definition"],
            "http://hl7.org/fhir/us/core/OperationDefinition/docref"
        );
        assert_eq!(
            rest["resource"][2]["interaction"],
            json!([{"code": "read"}])
        );
    }
}
