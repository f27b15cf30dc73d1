//! IHE ITI XDM packages ("XDR and XDM for Direct Messaging").
//!
//! An XDM package is a zip holding `IHE_XDM/<SUBSET>/METADATA.XML` (an XDS
//! `SubmitObjectsRequest`), the documents it describes, `INDEX.HTM` and
//! `README.TXT`. [`read`] opens one leniently but safely (nothing is written
//! to disk, path escapes are refused, entry count, per-entry expansion ratio
//! and total size are bounded while decompressing), [`write`] builds one and
//! [`unpack_to`] writes the documents of one into a directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

/// Entries may always expand to this many bytes whatever their compression
/// ratio: small, very repetitive files (an empty XML skeleton, a README of
/// spaces) legitimately compress far better than `max_ratio`.
pub const RATIO_FLOOR: u64 = 1024 * 1024;

/// Most entry names listed in a "no METADATA.XML" error.
const LISTED_ENTRIES: usize = 20;

/// XML nodes allowed in one METADATA.XML.
const METADATA_NODES_LIMIT: u32 = 1_000_000;

const SCHEME_DOC_UNIQUE_ID: &str = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab";
const SCHEME_DOC_PATIENT_ID: &str = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427";
const SCHEME_SS_UNIQUE_ID: &str = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8";
const SCHEME_SS_SOURCE_ID: &str = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832";
const SCHEME_SS_PATIENT_ID: &str = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446";
const SCHEME_SS_AUTHOR: &str = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d";
const NODE_SUBMISSION_SET: &str = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd";
const OBJECT_TYPE_STABLE_DOC: &str = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1";

/// Why a package could not be read, written or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum XdmError {
    #[error("not a zip archive: {0}")]
    NotZip(String),
    #[error("zip entry {entry}: {detail}")]
    Zip { entry: String, detail: String },
    #[error("entry {0} escapes the package (absolute path, drive letter or '..')")]
    PathEscape(String),
    #[error("too many entries ({count}, limit {limit})")]
    TooManyEntries { count: usize, limit: usize },
    #[error("entry {entry} expands {ratio} times (limit {limit})")]
    ExpansionRatio {
        entry: String,
        ratio: u64,
        limit: u64,
    },
    #[error("package expands to {bytes} bytes (limit {limit})")]
    TotalSize { bytes: u64, limit: u64 },
    #[error("entry {0} is encrypted; XDM packages are not")]
    Encrypted(String),
    #[error("no METADATA.XML found (looked for IHE_XDM/*/METADATA.XML; entries: {entries})")]
    NoMetadata { entries: String },
    #[error("{path}: not XML ({detail})")]
    MetadataXml { path: String, detail: String },
    #[error("{path}: DTDs not allowed")]
    MetadataDtd { path: String },
    #[error("document {document}: not found in the package (URI {uri}, hash {hash}; looked in {subset})")]
    DocumentNotFound {
        document: String,
        uri: String,
        hash: String,
        subset: String,
    },
    #[error("document {document}: hash mismatch (metadata {metadata}, actual {actual})")]
    HashMismatch {
        document: String,
        metadata: String,
        actual: String,
    },
    #[error("document {document}: size mismatch (metadata {metadata}, actual {actual})")]
    SizeMismatch {
        document: String,
        metadata: u64,
        actual: u64,
    },
    #[error("{name}: looks like a C-CDA but cannot be read: {error}")]
    Ccda {
        name: String,
        error: super::ccda::CcdaError,
    },
    #[error("cannot write package: {0}")]
    Write(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Bounds applied while reading a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (files and folders) in the zip.
    pub max_entries: usize,
    /// Most bytes all entries may expand to together.
    pub max_total_bytes: u64,
    /// Most an entry may expand relative to its compressed size (entries
    /// below [`RATIO_FLOOR`] bytes are exempt).
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1000,
            max_total_bytes: 100 * 1024 * 1024,
            max_ratio: 100,
        }
    }
}

/// One document of a package, with what the metadata says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdmDocument {
    /// The entry name in the zip (as stored, backslashes turned into '/').
    pub path: String,
    pub mime_type: Option<String>,
    /// XDSDocumentEntry.uniqueId.
    pub unique_id: Option<String>,
    /// SHA-1 hex from the metadata (lower case).
    pub hash_sha1: Option<String>,
    /// Size in bytes from the metadata.
    pub size: Option<u64>,
    /// sourcePatientId slot (else the XDSDocumentEntry.patientId identifier).
    pub patient_id: Option<String>,
    pub data: Vec<u8>,
    /// True when the metadata carries a hash and/or a size and every one
    /// present matched the bytes (a mismatch is an error, never `false`).
    pub verified: bool,
}

/// A package as read by [`read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdmPackage {
    /// Subset folder names as found (e.g. `SUBSET01`), sorted.
    pub subsets: Vec<String>,
    pub documents: Vec<XdmDocument>,
    /// intendedRecipient slot values, raw (XON|XCN|XTN); see [`recipient_address`].
    pub intended_recipients: Vec<String>,
    /// Deviations tolerated while reading (wrapper folder, missing slash,
    /// unreferenced entries, ...).
    pub warnings: Vec<String>,
    pub has_index: bool,
    pub has_readme: bool,
}

/// A document to package with [`write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackDocument {
    /// A human name (shown in INDEX.HTM and the metadata's Name).
    pub name: String,
    pub mime_type: String,
    pub data: Vec<u8>,
    /// Patient id in HL7 CX form, e.g. `1234^^^&1.2.3&ISO`.
    pub patient_id: Option<String>,
    /// XDSDocumentEntry.uniqueId; one is generated (2.25.<random>) if absent.
    pub unique_id: Option<String>,
}

impl PackDocument {
    /// A file to package, typed by its content. A C-CDA is `text/xml` and
    /// gives the metadata its patient (the first recordTarget id with a
    /// root and an extension, as the CX `extension^^^&root&ISO`) and its
    /// uniqueId (the document id as `root^extension`, the form IHE gives
    /// CDA documents). Other XML is `text/xml`, anything else
    /// `application/octet-stream`, both without ids. A file that looks
    /// like a C-CDA but cannot be read is refused, saying why.
    pub fn from_file(name: String, data: Vec<u8>) -> Result<PackDocument, XdmError> {
        use super::ccda;
        let mut patient_id = None;
        let mut unique_id = None;
        if ccda::is_ccda(&data) {
            let doc =
                ccda::parse(&data, &ccda::Limits::default()).map_err(|error| XdmError::Ccda {
                    name: name.clone(),
                    error,
                })?;
            patient_id = doc.patients.iter().flat_map(|p| &p.ids).find_map(|id| {
                match (&id.root, &id.extension) {
                    (Some(root), Some(ext)) => Some(format!("{ext}^^^&{root}&ISO")),
                    _ => None,
                }
            });
            unique_id = doc.id.as_ref().and_then(super::index::id_key);
        }
        let is_xml = data
            .strip_prefix(b"\xef\xbb\xbf".as_slice())
            .unwrap_or(&data)
            .trim_ascii_start()
            .starts_with(b"<");
        Ok(PackDocument {
            name,
            mime_type: if is_xml || unique_id.is_some() {
                "text/xml".into()
            } else {
                "application/octet-stream".into()
            },
            data,
            patient_id,
            unique_id,
        })
    }
}

/// The e-mail address in an intendedRecipient value: the XTN component
/// (`...|...|^^Internet^bob@example.org`) or else the first
/// `@`-bearing component of the XCN.
pub fn recipient_address(value: &str) -> Option<&str> {
    let mut fields = value.split('|');
    let _xon = fields.next();
    let xcn = fields.next().unwrap_or("");
    let xtn = fields.next().unwrap_or("");
    let xtn_addr = xtn.split('^').nth(3).filter(|a| a.contains('@'));
    xtn_addr
        .or_else(|| xcn.split('^').find(|c| c.contains('@')))
        .or_else(|| {
            if !value.contains('|') && !value.contains('^') && value.contains('@') {
                Some(value)
            } else {
                None
            }
        })
}

// ---------------------------------------------------------------- reading

/// One file entry of the zip, already decompressed within the limits.
struct Entry {
    /// Entry name with backslashes turned into '/', empty and `.` parts dropped.
    name: String,
    /// Lower-cased `name`, for case-insensitive lookups.
    key: String,
    data: Vec<u8>,
}

/// A subset found in the package: where its metadata is and how to resolve
/// its URIs.
struct SubsetLoc {
    /// Subset folder name as found (e.g. `SUBSET01`).
    name: String,
    /// Index of METADATA.XML in the entries.
    metadata: usize,
    /// Lower-cased prefix the document URIs are appended to
    /// (`ihe_xdm/subset01/`, or `ihe_xdm/subset01` for the missing-slash
    /// variant).
    prefix: String,
}

/// Reads leniently: case-insensitive names, backslashes as '/', a wrapper
/// folder before IHE_XDM, several subsets, documents matched by URI slot else
/// by hash (SHA-1 of the bytes, as XDS uses); verifies hash and size when
/// present (a mismatch is an error naming the document). Safely: never
/// writes to disk, refuses path escapes (`..`, absolute, drive letters) and
/// bounds entries, per-entry expansion ratio and total size, reading each
/// entry through a bounded reader rather than trusting declared sizes.
pub fn read(zip_bytes: &[u8], limits: &Limits) -> Result<XdmPackage, XdmError> {
    let entries = read_entries(zip_bytes, limits)?;
    let mut warnings = Vec::new();

    let by_key: BTreeMap<&str, usize> = {
        let mut map = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            if map.insert(e.key.as_str(), i).is_some() {
                warnings.push(format!(
                    "entry {} appears more than once (names compared case-insensitively); the last one is used",
                    e.name
                ));
            }
        }
        map
    };

    let (root, subsets) = find_subsets(&entries, &mut warnings)?;

    let mut used: BTreeSet<usize> = BTreeSet::new();
    let mut documents = Vec::new();
    let mut intended_recipients = Vec::new();
    for subset in &subsets {
        used.insert(subset.metadata);
        let meta_entry = &entries[subset.metadata];
        let meta = parse_metadata(&meta_entry.name, &meta_entry.data)?;
        for r in meta.recipients {
            if !intended_recipients.contains(&r) {
                intended_recipients.push(r);
            }
        }
        for doc in meta.documents {
            let idx = locate_document(&entries, &by_key, subset, &doc, &used, &mut warnings)?;
            used.insert(idx);
            documents.push(verify_document(&entries[idx], doc, &mut warnings)?);
        }
    }

    let at_root = |base: &str| by_key.contains_key(format!("{root}{base}").as_str());
    let has_index = at_root("index.htm") || at_root("index.html");
    let has_readme = at_root("readme.txt");
    for (i, e) in entries.iter().enumerate() {
        let base = e.key.strip_prefix(root.as_str()).unwrap_or(&e.key);
        let known = matches!(base, "index.htm" | "index.html" | "readme.txt");
        if !used.contains(&i) && !known {
            warnings.push(format!(
                "entry {} is not described by any METADATA.XML",
                e.name
            ));
        }
    }

    Ok(XdmPackage {
        subsets: subsets.into_iter().map(|s| s.name).collect(),
        documents,
        intended_recipients,
        warnings,
        has_index,
        has_readme,
    })
}

/// Opens the zip and decompresses every file entry within `limits`.
fn read_entries(zip_bytes: &[u8], limits: &Limits) -> Result<Vec<Entry>, XdmError> {
    let mut archive =
        ZipArchive::new(Cursor::new(zip_bytes)).map_err(|e| XdmError::NotZip(e.to_string()))?;
    let count = archive.len();
    if count > limits.max_entries {
        return Err(XdmError::TooManyEntries {
            count,
            limit: limits.max_entries,
        });
    }
    let mut entries = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for i in 0..count {
        let mut file = archive.by_index(i).map_err(|e| XdmError::Zip {
            entry: format!("#{}", i + 1),
            detail: e.to_string(),
        })?;
        let raw_name = match file.name() {
            Ok(n) => n.into_owned(),
            Err(_) => String::from_utf8_lossy(file.name_raw()).into_owned(),
        };
        let name = safe_entry_name(&raw_name)?;
        if file.is_dir() || raw_name.ends_with('/') || raw_name.ends_with('\\') {
            continue;
        }
        if file.encrypted() {
            return Err(XdmError::Encrypted(raw_name));
        }
        let Some(name) = name else { continue };

        let compressed = file.compressed_size().max(1);
        let ratio_cap = compressed.saturating_mul(limits.max_ratio).max(RATIO_FLOOR);
        let total_cap = limits.max_total_bytes.saturating_sub(total);
        let cap = ratio_cap.min(total_cap);
        let too_big = |got: u64| {
            if ratio_cap <= total_cap {
                XdmError::ExpansionRatio {
                    entry: raw_name.clone(),
                    ratio: got / compressed,
                    limit: limits.max_ratio,
                }
            } else {
                XdmError::TotalSize {
                    bytes: total.saturating_add(got),
                    limit: limits.max_total_bytes,
                }
            }
        };
        // The declared size may only make us refuse early, never allocate.
        if file.size() > cap {
            return Err(too_big(file.size()));
        }
        let mut data = Vec::new();
        (&mut file)
            .take(cap.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| XdmError::Zip {
                entry: raw_name.clone(),
                detail: e.to_string(),
            })?;
        let got = data.len() as u64;
        if got > cap {
            return Err(too_big(got));
        }
        total += got;
        let key = name.to_lowercase();
        entries.push(Entry { name, key, data });
    }
    Ok(entries)
}

/// Normalizes an entry name ('\\' → '/', empty and `.` parts dropped) and
/// refuses names that could escape a target directory. `Ok(None)` for a name
/// with nothing left (e.g. `./`).
fn safe_entry_name(raw: &str) -> Result<Option<String>, XdmError> {
    let unified = raw.replace('\\', "/");
    let escape = || XdmError::PathEscape(raw.to_string());
    if unified.starts_with('/') || unified.contains('\0') {
        return Err(escape());
    }
    let bytes = unified.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(escape());
    }
    let mut parts = Vec::new();
    for part in unified.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(escape()),
            p if p.contains(':') => return Err(escape()),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        Ok(None)
    } else {
        Ok(Some(parts.join("/")))
    }
}

/// Finds every `IHE_XDM/<subset>/METADATA.XML`, allowing a wrapper folder
/// before `IHE_XDM`, and as a last resort the missing-slash variant
/// `IHE_XDM/<subset>METADATA.XML`. Returns the package root prefix (lower
/// case, `""` or `wrapper/`) and the subsets sorted by name.
fn find_subsets(
    entries: &[Entry],
    warnings: &mut Vec<String>,
) -> Result<(String, Vec<SubsetLoc>), XdmError> {
    let mut found: Vec<(String, SubsetLoc)> = Vec::new();
    let mut broken: Vec<(String, SubsetLoc)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let parts: Vec<&str> = e.key.split('/').collect();
        let orig: Vec<&str> = e.name.split('/').collect();
        let Some(j) = parts.iter().position(|p| *p == "ihe_xdm") else {
            continue;
        };
        let root = parts[..j]
            .iter()
            .map(|p| format!("{p}/"))
            .collect::<String>();
        if parts.len() == j + 3 && parts[j + 2] == "metadata.xml" {
            found.push((
                root,
                SubsetLoc {
                    name: orig[j + 1].to_string(),
                    metadata: i,
                    prefix: format!("{}/", parts[..j + 2].join("/")),
                },
            ));
        } else if parts.len() == j + 2
            && parts[j + 1].len() > "metadata.xml".len()
            && parts[j + 1].ends_with("metadata.xml")
        {
            let cut = orig[j + 1].len().saturating_sub("metadata.xml".len());
            let subset = orig[j + 1].get(..cut).unwrap_or(orig[j + 1]);
            broken.push((
                root,
                SubsetLoc {
                    name: subset.to_string(),
                    metadata: i,
                    prefix: format!("{}/{}", parts[..j + 1].join("/"), subset.to_lowercase()),
                },
            ));
        }
    }
    let missing_slash = found.is_empty() && !broken.is_empty();
    if missing_slash {
        found = broken;
    }
    if found.is_empty() {
        let mut list: Vec<&str> = entries
            .iter()
            .take(LISTED_ENTRIES)
            .map(|e| e.name.as_str())
            .collect();
        if entries.len() > LISTED_ENTRIES {
            list.push("...");
        }
        let entries = if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        };
        return Err(XdmError::NoMetadata { entries });
    }
    // One package root: the shallowest one found.
    found.sort_by(|a, b| {
        (a.0.matches('/').count(), &a.0, &a.1.name).cmp(&(
            b.0.matches('/').count(),
            &b.0,
            &b.1.name,
        ))
    });
    let root = found[0].0.clone();
    let mut subsets = Vec::new();
    for (r, loc) in found {
        if r == root {
            if missing_slash {
                warnings.push(format!(
                    "{} lacks the '/' between the subset folder and METADATA.XML; read as subset {}",
                    entries[loc.metadata].name, loc.name
                ));
            }
            subsets.push(loc);
        } else {
            warnings.push(format!(
                "{} ignored: outside the package root {}",
                entries[loc.metadata].name,
                if root.is_empty() { "/" } else { root.as_str() }
            ));
        }
    }
    if !root.is_empty() {
        let wrapper = entries[subsets[0].metadata]
            .name
            .get(..root.len())
            .unwrap_or(root.as_str())
            .to_string();
        warnings.push(format!("package is inside a wrapper folder {wrapper}"));
    }
    Ok((root, subsets))
}

/// What METADATA.XML says about one document.
#[derive(Debug, Default)]
struct MetaDoc {
    id: String,
    mime_type: Option<String>,
    unique_id: Option<String>,
    hash: Option<String>,
    size: Option<String>,
    uri: Option<String>,
    patient_id: Option<String>,
}

#[derive(Debug, Default)]
struct Metadata {
    documents: Vec<MetaDoc>,
    recipients: Vec<String>,
}

fn parse_metadata(path: &str, data: &[u8]) -> Result<Metadata, XdmError> {
    let text = std::str::from_utf8(data).map_err(|e| XdmError::MetadataXml {
        path: path.to_string(),
        detail: format!("not UTF-8: {e}"),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: METADATA_NODES_LIMIT,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| match e {
        roxmltree::Error::DtdDetected => XdmError::MetadataDtd {
            path: path.to_string(),
        },
        other => XdmError::MetadataXml {
            path: path.to_string(),
            detail: other.to_string(),
        },
    })?;

    let mut meta = Metadata::default();
    for node in doc.descendants().filter(|n| n.is_element()) {
        match node.tag_name().name() {
            "ExtrinsicObject" => {
                let slots = slots_of(node);
                let first = |name: &str| {
                    slots
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case(name))
                        .and_then(|(_, v)| v.first().cloned())
                };
                let uri = slots
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("URI"))
                    .and_then(|(_, v)| join_uri(v));
                let ext_id = |scheme: &str, label: &str| {
                    node.children()
                        .filter(|c| c.tag_name().name() == "ExternalIdentifier")
                        .find(|c| {
                            c.attribute("identificationScheme") == Some(scheme)
                                || c.descendants().any(|d| {
                                    d.tag_name().name() == "LocalizedString"
                                        && d.attribute("value") == Some(label)
                                })
                        })
                        .and_then(|c| c.attribute("value"))
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                };
                meta.documents.push(MetaDoc {
                    id: node.attribute("id").unwrap_or("").to_string(),
                    mime_type: node.attribute("mimeType").map(str::to_string),
                    unique_id: ext_id(SCHEME_DOC_UNIQUE_ID, "XDSDocumentEntry.uniqueId"),
                    hash: first("hash"),
                    size: first("size"),
                    uri,
                    patient_id: first("sourcePatientId")
                        .or_else(|| ext_id(SCHEME_DOC_PATIENT_ID, "XDSDocumentEntry.patientId")),
                });
            }
            "RegistryPackage" => {
                for (name, values) in slots_of(node) {
                    if name.eq_ignore_ascii_case("intendedRecipient") {
                        meta.recipients.extend(values);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(meta)
}

/// The `Slot`s directly under `node`: (name, trimmed non-empty values).
fn slots_of(node: roxmltree::Node<'_, '_>) -> Vec<(String, Vec<String>)> {
    node.children()
        .filter(|c| c.tag_name().name() == "Slot")
        .map(|slot| {
            let values = slot
                .descendants()
                .filter(|d| d.tag_name().name() == "Value")
                .map(|v| v.text().unwrap_or("").trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            (slot.attribute("name").unwrap_or("").to_string(), values)
        })
        .collect()
}

/// A URI slot: one value, or a long URI split as `1|part`, `2|part`, ...
fn join_uri(values: &[String]) -> Option<String> {
    if values.len() <= 1 {
        return values.first().cloned();
    }
    let mut parts = Vec::new();
    for v in values {
        let (n, rest) = v.split_once('|')?;
        parts.push((n.trim().parse::<u32>().ok()?, rest));
    }
    parts.sort_by_key(|p| p.0);
    Some(parts.into_iter().map(|p| p.1).collect())
}

fn sha1_hex(data: &[u8]) -> String {
    hex::encode(openssl::sha::sha1(data))
}

fn describe(doc: &MetaDoc) -> String {
    match (&doc.uri, doc.id.is_empty()) {
        (Some(uri), _) => uri.clone(),
        (None, false) => doc.id.clone(),
        (None, true) => "(unnamed)".to_string(),
    }
}

/// Finds the entry a metadata document refers to: by URI relative to the
/// subset folder (also without the slash, as some senders write it), else
/// by SHA-1 hash among the entries not yet used.
fn locate_document(
    entries: &[Entry],
    by_key: &BTreeMap<&str, usize>,
    subset: &SubsetLoc,
    doc: &MetaDoc,
    used: &BTreeSet<usize>,
    warnings: &mut Vec<String>,
) -> Result<usize, XdmError> {
    if let Some(uri) = &doc.uri {
        let rel = uri.replace('\\', "/");
        let rel = rel.trim_start_matches("./").to_lowercase();
        let plain = !rel.is_empty()
            && !rel.starts_with('/')
            && !rel.contains(':')
            && !rel.split('/').any(|p| p == "..");
        if plain {
            let mut candidates = vec![format!("{}{rel}", subset.prefix)];
            if subset.prefix.ends_with('/') {
                let trimmed = subset.prefix.trim_end_matches('/');
                candidates.push(format!("{trimmed}{rel}"));
            } else {
                candidates.push(format!("{}/{rel}", subset.prefix));
            }
            for (n, key) in candidates.iter().enumerate() {
                if let Some(&idx) = by_key.get(key.as_str()) {
                    if n > 0 || !subset.prefix.ends_with('/') {
                        warnings.push(format!(
                            "document {uri} found as {} (missing '/' after the subset folder)",
                            entries[idx].name
                        ));
                    }
                    return Ok(idx);
                }
            }
        } else {
            warnings.push(format!(
                "document URI {uri} is not a plain relative name; matching by hash"
            ));
        }
    }
    if let Some(hash) = &doc.hash {
        let want = hash.trim().to_ascii_lowercase();
        let hit = entries.iter().enumerate().find(|(i, e)| {
            !used.contains(i)
                && e.key.starts_with(&subset_root(subset))
                && sha1_hex(&e.data) == want
        });
        let hit = hit.or_else(|| {
            entries
                .iter()
                .enumerate()
                .find(|(i, e)| !used.contains(i) && sha1_hex(&e.data) == want)
        });
        if let Some((idx, e)) = hit {
            if doc.uri.is_some() {
                warnings.push(format!(
                    "document {} not found by URI; matched {} by hash",
                    describe(doc),
                    e.name
                ));
            }
            return Ok(idx);
        }
    }
    Err(XdmError::DocumentNotFound {
        document: describe(doc),
        uri: doc.uri.clone().unwrap_or_else(|| "none".to_string()),
        hash: doc.hash.clone().unwrap_or_else(|| "none".to_string()),
        subset: subset.name.clone(),
    })
}

/// The lower-case folder prefix holding the subset's files (`ihe_xdm/` for
/// the missing-slash variant, whose files sit directly in IHE_XDM).
fn subset_root(subset: &SubsetLoc) -> String {
    if subset.prefix.ends_with('/') {
        subset.prefix.clone()
    } else {
        match subset.prefix.rfind('/') {
            Some(i) => subset.prefix[..=i].to_string(),
            None => String::new(),
        }
    }
}

fn verify_document(
    entry: &Entry,
    doc: MetaDoc,
    warnings: &mut Vec<String>,
) -> Result<XdmDocument, XdmError> {
    let name = entry.name.clone();
    let hash = doc.hash.as_ref().map(|h| h.trim().to_ascii_lowercase());
    let mut checked = false;
    if let Some(want) = &hash {
        let actual = sha1_hex(&entry.data);
        if *want != actual {
            return Err(XdmError::HashMismatch {
                document: name,
                metadata: want.clone(),
                actual,
            });
        }
        checked = true;
    }
    let size = match &doc.size {
        Some(s) => match s.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                warnings.push(format!(
                    "document {name}: size slot {s:?} is not a number; size not checked"
                ));
                None
            }
        },
        None => None,
    };
    if let Some(want) = size {
        let actual = entry.data.len() as u64;
        if want != actual {
            return Err(XdmError::SizeMismatch {
                document: name,
                metadata: want,
                actual,
            });
        }
        checked = true;
    }
    Ok(XdmDocument {
        path: name,
        mime_type: doc.mime_type,
        unique_id: doc.unique_id,
        hash_sha1: hash,
        size,
        patient_id: doc.patient_id,
        data: entry.data.clone(),
        verified: checked,
    })
}

// ---------------------------------------------------------------- writing

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn extension_for(mime: &str) -> &'static str {
    let base = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "text/xml" | "application/xml" | "application/hl7-v3" => "XML",
        "application/pdf" => "PDF",
        "text/plain" => "TXT",
        "text/html" | "application/xhtml+xml" => "HTM",
        "application/json" | "application/fhir+json" => "JSN",
        "image/jpeg" => "JPG",
        "image/png" => "PNG",
        _ => "BIN",
    }
}

/// Turns a recipient into an XDS intendedRecipient value: values already in
/// XON|XCN|XTN form are kept, bare Direct addresses become `||^^Internet^addr`.
fn recipient_value(r: &str) -> String {
    let r = r.trim();
    if r.contains('|') || r.contains('^') {
        r.to_string()
    } else {
        format!("||^^Internet^{r}")
    }
}

fn slot(out: &mut String, indent: &str, name: &str, values: &[&str]) {
    let _ = writeln!(out, "{indent}<Slot name=\"{}\">", xml_escape(name));
    let _ = writeln!(out, "{indent}  <ValueList>");
    for v in values {
        let _ = writeln!(out, "{indent}    <Value>{}</Value>", xml_escape(v));
    }
    let _ = writeln!(out, "{indent}  </ValueList>");
    let _ = writeln!(out, "{indent}</Slot>");
}

fn localized_name(out: &mut String, indent: &str, element: &str, value: &str) {
    let _ = writeln!(
        out,
        "{indent}<{element}><LocalizedString value=\"{}\"/></{element}>",
        xml_escape(value)
    );
}

fn external_id(out: &mut String, id: &str, object: &str, scheme: &str, value: &str, label: &str) {
    let _ = writeln!(
        out,
        "      <ExternalIdentifier id=\"{id}\" registryObject=\"{}\" identificationScheme=\"{scheme}\" value=\"{}\">",
        xml_escape(object),
        xml_escape(value)
    );
    localized_name(out, "        ", "Name", label);
    let _ = writeln!(out, "      </ExternalIdentifier>");
}

fn new_oid() -> String {
    format!("2.25.{}", rand::random::<u128>())
}

struct Planned<'a> {
    doc: &'a PackDocument,
    file: String,
    id: String,
    unique_id: String,
}

fn metadata_xml(planned: &[Planned<'_>], recipients: &[String], author: &str, now: &str) -> String {
    let mut out = String::new();
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(
        "<SubmitObjectsRequest xmlns=\"urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0\">\n  <RegistryObjectList xmlns=\"urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0\">\n",
    );
    for p in planned {
        let _ = writeln!(
            out,
            "    <ExtrinsicObject id=\"{}\" objectType=\"{OBJECT_TYPE_STABLE_DOC}\" status=\"urn:oasis:names:tc:ebxml-regrep:StatusType:Approved\" mimeType=\"{}\">",
            p.id,
            xml_escape(&p.doc.mime_type)
        );
        let size = p.doc.data.len().to_string();
        let hash = sha1_hex(&p.doc.data);
        slot(&mut out, "      ", "creationTime", &[now]);
        slot(&mut out, "      ", "hash", &[&hash]);
        slot(&mut out, "      ", "size", &[&size]);
        slot(&mut out, "      ", "URI", &[&p.file]);
        if let Some(pid) = &p.doc.patient_id {
            slot(&mut out, "      ", "sourcePatientId", &[pid]);
        }
        localized_name(&mut out, "      ", "Name", &p.doc.name);
        if let Some(pid) = &p.doc.patient_id {
            external_id(
                &mut out,
                &format!("{}-pid", p.id),
                &p.id,
                SCHEME_DOC_PATIENT_ID,
                pid,
                "XDSDocumentEntry.patientId",
            );
        }
        external_id(
            &mut out,
            &format!("{}-uid", p.id),
            &p.id,
            SCHEME_DOC_UNIQUE_ID,
            &p.unique_id,
            "XDSDocumentEntry.uniqueId",
        );
        out.push_str("    </ExtrinsicObject>\n");
    }

    out.push_str(
        "    <RegistryPackage id=\"SubmissionSet01\" status=\"urn:oasis:names:tc:ebxml-regrep:StatusType:Approved\">\n",
    );
    slot(&mut out, "      ", "submissionTime", &[now]);
    let values: Vec<String> = recipients.iter().map(|r| recipient_value(r)).collect();
    let value_refs: Vec<&str> = values.iter().map(String::as_str).collect();
    if !value_refs.is_empty() {
        slot(&mut out, "      ", "intendedRecipient", &value_refs);
    }
    localized_name(&mut out, "      ", "Name", "XDM package made by hispd");
    let _ = writeln!(
        out,
        "      <Classification id=\"SubmissionSet01-author\" classificationScheme=\"{SCHEME_SS_AUTHOR}\" classifiedObject=\"SubmissionSet01\" nodeRepresentation=\"\">"
    );
    slot(&mut out, "        ", "authorPerson", &[author]);
    out.push_str("      </Classification>\n");
    external_id(
        &mut out,
        "SubmissionSet01-uid",
        "SubmissionSet01",
        SCHEME_SS_UNIQUE_ID,
        &new_oid(),
        "XDSSubmissionSet.uniqueId",
    );
    external_id(
        &mut out,
        "SubmissionSet01-src",
        "SubmissionSet01",
        SCHEME_SS_SOURCE_ID,
        "2.25.0",
        "XDSSubmissionSet.sourceId",
    );
    if let Some(pid) = planned.iter().find_map(|p| p.doc.patient_id.as_deref()) {
        external_id(
            &mut out,
            "SubmissionSet01-pid",
            "SubmissionSet01",
            SCHEME_SS_PATIENT_ID,
            pid,
            "XDSSubmissionSet.patientId",
        );
    }
    out.push_str("    </RegistryPackage>\n");
    let _ = writeln!(
        out,
        "    <Classification id=\"SubmissionSet01-class\" classifiedObject=\"SubmissionSet01\" classificationNode=\"{NODE_SUBMISSION_SET}\"/>"
    );
    for (i, p) in planned.iter().enumerate() {
        let _ = writeln!(
            out,
            "    <Association id=\"Association{:04}\" associationType=\"urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember\" sourceObject=\"SubmissionSet01\" targetObject=\"{}\">",
            i + 1,
            p.id
        );
        slot(&mut out, "      ", "SubmissionSetStatus", &["Original"]);
        out.push_str("    </Association>\n");
    }
    out.push_str("  </RegistryObjectList>\n</SubmitObjectsRequest>\n");
    out
}

fn index_htm(planned: &[Planned<'_>], author: &str) -> String {
    let mut out = String::new();
    out.push_str(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\">\n<head><meta charset=\"UTF-8\"/><title>XDM package</title></head>\n<body>\n<h1>XDM package</h1>\n",
    );
    let _ = writeln!(
        out,
        "<p>Made by hispd for {}. It is meant only for the intended recipients named in the metadata.</p>",
        xml_escape(author)
    );
    out.push_str("<ul>\n<li><a href=\"README.TXT\">README.TXT</a>: who made this package</li>\n");
    out.push_str(
        "<li><a href=\"IHE_XDM/SUBSET01/METADATA.XML\">IHE_XDM/SUBSET01/METADATA.XML</a>: XDS metadata</li>\n",
    );
    for p in planned {
        let _ = writeln!(
            out,
            "<li><a href=\"IHE_XDM/SUBSET01/{0}\">{0}</a>: {1} ({2})</li>",
            p.file,
            xml_escape(&p.doc.name),
            xml_escape(&p.doc.mime_type)
        );
    }
    out.push_str("</ul>\n</body>\n</html>\n");
    out
}

/// Writes a package: `IHE_XDM/SUBSET01/METADATA.XML` (an ExtrinsicObject per
/// document with hash (SHA-1 hex), size, URI, mimeType and sourcePatientId if
/// given; a RegistryPackage with the intendedRecipient slot and the
/// HasMember associations), the documents (`DOC0001.XML`, ... — extension
/// from the MIME type), `INDEX.HTM` and `README.TXT`. Bare addresses in
/// `intended_recipients` are written as `||^^Internet^addr`.
pub fn write(
    documents: &[PackDocument],
    intended_recipients: &[String],
    author: &str,
) -> Result<Vec<u8>, XdmError> {
    if documents.is_empty() {
        return Err(XdmError::Write("no documents to package".to_string()));
    }
    if documents.len() > 9999 {
        return Err(XdmError::Write(format!(
            "{} documents; an XDM subset holds at most 9999 here",
            documents.len()
        )));
    }
    let planned: Vec<Planned<'_>> = documents
        .iter()
        .enumerate()
        .map(|(i, doc)| Planned {
            doc,
            file: format!("DOC{:04}.{}", i + 1, extension_for(&doc.mime_type)),
            id: format!("Document{:04}", i + 1),
            unique_id: doc.unique_id.clone().unwrap_or_else(new_oid),
        })
        .collect();
    let now = chrono::Utc::now();
    let stamp = now.format("%Y%m%d%H%M%S").to_string();
    let metadata = metadata_xml(&planned, intended_recipients, author, &stamp);
    let index = index_htm(&planned, author);
    let readme = format!(
        "This XDM package (IHE ITI XDM, \"XDR and XDM for Direct Messaging\") was made by hispd {} \
         on {} for {}.\r\nOpen INDEX.HTM for links to the documents and the metadata.\r\n",
        env!("CARGO_PKG_VERSION"),
        now.format("%Y-%m-%d %H:%M:%S UTC"),
        author
    );

    let zerr = |e: zip::result::ZipError| XdmError::Write(e.to_string());
    let ierr = |e: std::io::Error| XdmError::Write(e.to_string());
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .large_file(
            documents
                .iter()
                .any(|d| d.data.len() as u64 >= u32::MAX as u64),
        );
    let mut put = |name: &str, data: &[u8]| -> Result<(), XdmError> {
        zip.start_file(name, options).map_err(zerr)?;
        zip.write_all(data).map_err(ierr)
    };
    put("README.TXT", readme.as_bytes())?;
    put("INDEX.HTM", index.as_bytes())?;
    put("IHE_XDM/SUBSET01/METADATA.XML", metadata.as_bytes())?;
    for p in &planned {
        put(&format!("IHE_XDM/SUBSET01/{}", p.file), &p.doc.data)?;
    }
    let cursor = zip.finish().map_err(zerr)?;
    Ok(cursor.into_inner())
}

// -------------------------------------------------------------- unpacking

/// A file name safe on any file system: ASCII letters, digits, '.', '-' and
/// '_' only, no leading dot, not empty.
fn safe_file_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    let cleaned: String = cleaned.chars().take(128).collect();
    if cleaned.is_empty() {
        "document".to_string()
    } else {
        cleaned
    }
}

/// Unpacks a package into `dir` (creating it): the documents only (after
/// [`read`] has checked them), under safe names (the entry's base name,
/// reduced to `[A-Za-z0-9._-]`, with `-2`, `-3`, ... added rather than
/// overwriting anything), never outside `dir`. Returns the written paths.
pub fn unpack_to(zip_bytes: &[u8], dir: &Path, limits: &Limits) -> Result<Vec<PathBuf>, XdmError> {
    let package = read(zip_bytes, limits)?;
    std::fs::create_dir_all(dir).map_err(|source| XdmError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for doc in &package.documents {
        let name = safe_file_name(&doc.path);
        let (stem, ext) = match name.rfind('.') {
            Some(i) if i > 0 => (&name[..i], &name[i..]),
            _ => (name.as_str(), ""),
        };
        let mut n = 1u32;
        loop {
            let candidate = if n == 1 {
                name.clone()
            } else {
                format!("{stem}-{n}{ext}")
            };
            let path = dir.join(&candidate);
            // create_new: never overwrite, never follow a planted symlink.
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(&doc.data)
                        .and_then(|()| f.sync_all())
                        .map_err(|source| XdmError::Io {
                            path: path.clone(),
                            source,
                        })?;
                    written.push(path);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                Err(source) => return Err(XdmError::Io { path, source }),
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in files {
            zip.start_file(*name, SimpleFileOptions::default()).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn metadata(uri: Option<&str>, hash: &str, size: usize) -> String {
        let uri = uri
            .map(|u| format!("<Slot name=\"URI\"><ValueList><Value>{u}</Value></ValueList></Slot>"))
            .unwrap_or_default();
        format!(
            "<SubmitObjectsRequest xmlns=\"urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0\">\
             <RegistryObjectList xmlns=\"urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0\">\
             <ExtrinsicObject id=\"d1\" mimeType=\"text/xml\">\
             <Slot name=\"hash\"><ValueList><Value>{hash}</Value></ValueList></Slot>\
             <Slot name=\"size\"><ValueList><Value>{size}</Value></ValueList></Slot>{uri}\
             </ExtrinsicObject>\
             <RegistryPackage id=\"ss\"><Slot name=\"intendedRecipient\"><ValueList>\
             <Value>||^^Internet^a@b.example</Value></ValueList></Slot></RegistryPackage>\
             </RegistryObjectList></SubmitObjectsRequest>"
        )
    }

    #[test]
    fn entry_names_are_checked() {
        assert_eq!(
            safe_entry_name("a\\b\\c").unwrap().as_deref(),
            Some("a/b/c")
        );
        assert_eq!(safe_entry_name("./a//b").unwrap().as_deref(), Some("a/b"));
        assert_eq!(safe_entry_name("./").unwrap(), None);
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "\\x",
            "C:\\x",
            "c:x",
            "a\\..\\..\\x",
        ] {
            let err = safe_entry_name(bad).unwrap_err();
            assert!(
                err.to_string().contains("escapes the package"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn reads_by_uri_and_verifies() {
        let doc = b"<ClinicalDocument/>";
        let meta = metadata(Some("doc.xml"), &sha1_hex(doc), doc.len());
        let bytes = zip_of(&[
            ("ihe_xdm\\subset01\\metadata.xml", meta.as_bytes()),
            ("IHE_XDM/SUBSET01/DOC.XML", doc),
            ("INDEX.HTM", b"<html/>"),
            ("readme.txt", b"hi"),
        ]);
        let pkg = read(&bytes, &Limits::default()).unwrap();
        assert_eq!(pkg.subsets, vec!["subset01"]);
        assert_eq!(pkg.documents.len(), 1);
        assert!(pkg.documents[0].verified);
        assert_eq!(pkg.documents[0].path, "IHE_XDM/SUBSET01/DOC.XML");
        assert!(pkg.has_index && pkg.has_readme);
        assert_eq!(
            recipient_address(&pkg.intended_recipients[0]),
            Some("a@b.example")
        );
    }

    #[test]
    fn hash_and_size_mismatch_name_the_document() {
        let doc = b"<ClinicalDocument/>";
        let meta = metadata(Some("DOC.XML"), &"0".repeat(40), doc.len());
        let bytes = zip_of(&[
            ("IHE_XDM/SUBSET01/METADATA.XML", meta.as_bytes()),
            ("IHE_XDM/SUBSET01/DOC.XML", doc),
        ]);
        let err = read(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(
            err.contains("IHE_XDM/SUBSET01/DOC.XML: hash mismatch"),
            "{err}"
        );

        let meta = metadata(Some("DOC.XML"), &sha1_hex(doc), 3);
        let bytes = zip_of(&[
            ("IHE_XDM/SUBSET01/METADATA.XML", meta.as_bytes()),
            ("IHE_XDM/SUBSET01/DOC.XML", doc),
        ]);
        let err = read(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(
            err.contains("size mismatch (metadata 3, actual 19)"),
            "{err}"
        );
    }

    #[test]
    fn dtd_and_bad_xml_are_refused() {
        let dtd = "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"b\">]><x>&a;</x>";
        let bytes = zip_of(&[("IHE_XDM/SUBSET01/METADATA.XML", dtd.as_bytes())]);
        let err = read(&bytes, &Limits::default()).unwrap_err().to_string();
        assert_eq!(err, "IHE_XDM/SUBSET01/METADATA.XML: DTDs not allowed");

        let bytes = zip_of(&[("IHE_XDM/SUBSET01/METADATA.XML", b"<a><b></a>")]);
        let err = read(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(
            err.starts_with("IHE_XDM/SUBSET01/METADATA.XML: not XML"),
            "{err}"
        );
    }

    #[test]
    fn missing_document_is_reported() {
        let meta = metadata(Some("GONE.XML"), &"1".repeat(40), 5);
        let bytes = zip_of(&[("IHE_XDM/SUBSET01/METADATA.XML", meta.as_bytes())]);
        let err = read(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(err.contains("document GONE.XML: not found"), "{err}");
    }

    #[test]
    fn no_metadata_lists_entries() {
        let bytes = zip_of(&[("foo/bar.xml", b"x")]);
        let err = read(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(err.contains("no METADATA.XML found"), "{err}");
        assert!(err.contains("foo/bar.xml"), "{err}");
    }

    #[test]
    fn split_uri_is_joined() {
        let v = vec!["2|b.xml".to_string(), "1|a".to_string()];
        assert_eq!(join_uri(&v).as_deref(), Some("ab.xml"));
    }

    #[test]
    fn recipient_forms() {
        assert_eq!(recipient_address("||^^Internet^x@y.org"), Some("x@y.org"));
        assert_eq!(
            recipient_address("|beau@nologs.org^Smith^John^^^Dr^^^&1.3&ISO"),
            Some("beau@nologs.org")
        );
        assert_eq!(recipient_address("x@y.org"), Some("x@y.org"));
        assert_eq!(recipient_address("Org^^^^^^^^^1.2.3"), None);
        assert_eq!(recipient_value("x@y.org"), "||^^Internet^x@y.org");
    }

    #[test]
    fn safe_names() {
        assert_eq!(
            safe_file_name("IHE_XDM/S/..evil name?.xml"),
            "evil_name_.xml"
        );
        assert_eq!(safe_file_name("a/..."), "document");
        assert_eq!(extension_for("text/xml; charset=utf-8"), "XML");
    }
}
