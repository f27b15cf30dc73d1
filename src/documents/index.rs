//! The document index, patients and patient-directed push rules (Blue
//! Button Plus Push), kept as store records.
//!
//! Every C-CDA that passes through is stored once per document id and
//! indexed by patient identifier (`root^extension`); a newer version of the
//! same setId supersedes the older one. A push rule sends each new document
//! of its patient to a Direct address the patient chose.

use super::ccda::{self, Ccda, InstanceId};
use crate::smime::mime::Entity;
use crate::store::{Storage, StoreError};
use serde::{Deserialize, Serialize};

pub const DOCS: &str = "document";
pub const PATIENTS: &str = "patient";
pub const RULES: &str = "push";

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no patient {0}")]
    NoPatient(String),
    #[error("patient {0} exists")]
    PatientExists(String),
    #[error("no push rule {0}")]
    NoRule(String),
    #[error("{0:?} is not an identifier: use ROOT^EXTENSION (e.g. 2.16.840.1.113883.19.5^998991)")]
    BadIdentifier(String),
}

/// `root^extension` (or `root`).
pub fn id_key(id: &InstanceId) -> Option<String> {
    match (&id.root, &id.extension) {
        (Some(r), Some(e)) => Some(format!("{r}^{e}")),
        (Some(r), None) => Some(r.clone()),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedDocument {
    pub key: String,
    pub set_id: Option<String>,
    pub version: i64,
    pub title: Option<String>,
    pub patient_ids: Vec<String>,
    pub patient_names: Vec<String>,
    /// Unix seconds.
    pub received: i64,
    pub spool: String,
    pub superseded_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatientRecord {
    pub id: String,
    pub name: String,
    pub identifiers: Vec<String>,
    /// Argon2 PHC string, for patient logins (Blue Button Plus Pull).
    pub password_hash: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushRule {
    pub id: String,
    pub patient: String,
    pub to: String,
    pub once: bool,
    pub revoked: bool,
    pub created: i64,
    /// Document keys already sent.
    pub sent: Vec<String>,
}

fn get<T: for<'de> Deserialize<'de>>(
    store: &dyn Storage,
    kind: &str,
    key: &str,
) -> Result<Option<T>, DocumentError> {
    Ok(crate::store::get_json(store, kind, key)?)
}

fn put<T: Serialize>(
    store: &dyn Storage,
    kind: &str,
    key: &str,
    value: &T,
) -> Result<(), DocumentError> {
    Ok(crate::store::put_json(store, kind, key, value)?)
}

fn all<T: for<'de> Deserialize<'de>>(
    store: &dyn Storage,
    kind: &str,
) -> Result<Vec<T>, DocumentError> {
    Ok(crate::store::all_json(store, kind)?)
}

/// The C-CDA documents a message carries: MIME parts whose content is a
/// ClinicalDocument (any content type), searched recursively, decoded.
pub fn ccdas_in_message(message: &[u8]) -> Vec<Vec<u8>> {
    fn walk(bytes: &[u8], depth: usize, out: &mut Vec<Vec<u8>>) {
        if depth > 8 {
            return;
        }
        let Ok(entity) = Entity::parse(bytes) else {
            return;
        };
        let ct = entity.content_type();
        if ct.mime_type.starts_with("multipart/") {
            if let Ok(parts) = entity.multipart_parts_lenient() {
                for p in parts {
                    walk(p, depth + 1, out);
                }
            }
            return;
        }
        if ct.is("message/rfc822") {
            if let Ok(body) = entity.decoded_body() {
                walk(&body, depth + 1, out);
            }
            return;
        }
        // Only a part that starts like a C-CDA or a zip is decoded whole: a
        // 100 MB image is looked at, not copied.
        let Ok(head) = entity.decoded_head(ccda::SNIFF_BYTES) else {
            return;
        };
        if !(ccda::is_ccda(&head) || head.starts_with(b"PK\x03\x04")) {
            return;
        }
        drop(head);
        if let Ok(body) = entity.decoded_body() {
            if ccda::is_ccda(&body) {
                out.push(body);
            } else if body.starts_with(b"PK\x03\x04") {
                // An XDM package: its C-CDA documents.
                if let Ok(pkg) = super::xdm::read(&body, &super::xdm::Limits::default()) {
                    out.extend(
                        pkg.documents
                            .into_iter()
                            .map(|d| d.data)
                            .filter(|d| ccda::is_ccda(d)),
                    );
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(message, 0, &mut out);
    out
}

/// What indexing did with a document.
#[derive(Debug, PartialEq, Eq)]
pub enum Indexed {
    New(IndexedDocument),
    /// Already stored (same document id).
    Duplicate,
}

/// Stores and indexes one C-CDA (its bytes spooled), superseding older
/// versions of the same setId.
pub fn index(
    store: &dyn Storage,
    xml: &[u8],
    doc: &Ccda,
    now: i64,
) -> Result<Indexed, DocumentError> {
    let key = doc
        .id
        .as_ref()
        .and_then(id_key)
        .unwrap_or_else(|| hex::encode(openssl::sha::sha256(xml)));
    if store.get_record(DOCS, &key)?.is_some() {
        return Ok(Indexed::Duplicate);
    }
    let set_id = doc.set_id.as_ref().and_then(id_key);
    let version = doc
        .version
        .as_deref()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(1);
    let mut superseded_by = None;
    if let Some(set) = &set_id {
        for mut other in all::<IndexedDocument>(store, DOCS)? {
            if other.set_id.as_deref() == Some(set) && other.key != key {
                if other.version < version && other.superseded_by.is_none() {
                    other.superseded_by = Some(key.clone());
                    put(store, DOCS, &other.key.clone(), &other)?;
                } else if other.version > version {
                    superseded_by = Some(other.key.clone());
                }
            }
        }
    }
    let entry = IndexedDocument {
        key: key.clone(),
        set_id,
        version,
        title: doc.title.clone(),
        patient_ids: doc
            .patients
            .iter()
            .flat_map(|p| p.ids.iter().filter_map(id_key))
            .collect(),
        patient_names: doc.patients.iter().flat_map(|p| p.names.clone()).collect(),
        received: now,
        spool: store.spool(xml)?,
        superseded_by,
    };
    put(store, DOCS, &key, &entry)?;
    Ok(Indexed::New(entry))
}

pub fn documents(store: &dyn Storage) -> Result<Vec<IndexedDocument>, DocumentError> {
    all(store, DOCS)
}

/// Current (not superseded) documents of a patient.
pub fn documents_of(
    store: &dyn Storage,
    patient: &PatientRecord,
) -> Result<Vec<IndexedDocument>, DocumentError> {
    Ok(documents(store)?
        .into_iter()
        .filter(|d| {
            d.superseded_by.is_none()
                && d.patient_ids
                    .iter()
                    .any(|i| patient.identifiers.contains(i))
        })
        .collect())
}

pub fn add_patient(store: &dyn Storage, p: &PatientRecord) -> Result<(), DocumentError> {
    for i in &p.identifiers {
        if !i.contains('^') || i.starts_with('^') || i.ends_with('^') {
            return Err(DocumentError::BadIdentifier(i.clone()));
        }
    }
    if store.get_record(PATIENTS, &p.id)?.is_some() {
        return Err(DocumentError::PatientExists(p.id.clone()));
    }
    put(store, PATIENTS, &p.id, p)
}

pub fn patients(store: &dyn Storage) -> Result<Vec<PatientRecord>, DocumentError> {
    all(store, PATIENTS)
}

pub fn patient(store: &dyn Storage, id: &str) -> Result<Option<PatientRecord>, DocumentError> {
    get(store, PATIENTS, id)
}

pub fn remove_patient(store: &dyn Storage, id: &str) -> Result<(), DocumentError> {
    if store.get_record(PATIENTS, id)?.is_none() {
        return Err(DocumentError::NoPatient(id.into()));
    }
    Ok(store.remove_record(PATIENTS, id)?)
}

pub fn add_rule(
    store: &dyn Storage,
    patient: &str,
    to: &str,
    once: bool,
    now: i64,
) -> Result<PushRule, DocumentError> {
    if store.get_record(PATIENTS, patient)?.is_none() {
        return Err(DocumentError::NoPatient(patient.into()));
    }
    let mut b = [0u8; 6];
    let _ = openssl::rand::rand_bytes(&mut b);
    let rule = PushRule {
        id: hex::encode(b),
        patient: patient.into(),
        to: to.into(),
        once,
        revoked: false,
        created: now,
        sent: Vec::new(),
    };
    put(store, RULES, &rule.id, &rule)?;
    Ok(rule)
}

pub fn rules(store: &dyn Storage) -> Result<Vec<PushRule>, DocumentError> {
    all(store, RULES)
}

pub fn revoke_rule(store: &dyn Storage, id: &str) -> Result<(), DocumentError> {
    let mut rule: PushRule =
        get(store, RULES, id)?.ok_or_else(|| DocumentError::NoRule(id.into()))?;
    rule.revoked = true;
    put(store, RULES, id, &rule)
}

/// The push rules a new document triggers, marked as sent (a `once` rule is
/// revoked after its first document). Durable on return.
pub fn due_pushes(
    store: &dyn Storage,
    doc: &IndexedDocument,
) -> Result<Vec<(PushRule, PatientRecord)>, DocumentError> {
    let mut out = Vec::new();
    if doc.superseded_by.is_some() {
        return Ok(out);
    }
    for mut rule in rules(store)? {
        if rule.revoked || rule.sent.contains(&doc.key) {
            continue;
        }
        let Some(p) = patient(store, &rule.patient)? else {
            continue;
        };
        if !doc.patient_ids.iter().any(|i| p.identifiers.contains(i)) {
            continue;
        }
        rule.sent.push(doc.key.clone());
        if rule.once {
            rule.revoked = true;
        }
        put(store, RULES, &rule.id.clone(), &rule)?;
        out.push((rule, p));
    }
    Ok(out)
}

/// The pushed message: a note, the C-CDA as application/xml and its HTML rendering.
pub fn push_message(
    from: &str,
    to: &str,
    holder: &str,
    patient: &str,
    xml: &[u8],
    doc: &Ccda,
) -> Vec<u8> {
    let mut rand = [0u8; 12];
    let _ = openssl::rand::rand_bytes(&mut rand);
    let boundary = format!("=_hispd_push_{}", hex::encode(rand));
    let domain = from.rsplit_once('@').map(|(_, d)| d).unwrap_or("localhost");
    let clean = |s: &str| {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    };
    let title = clean(doc.title.as_deref().unwrap_or("Health record"));
    let html = super::render::render_html(doc);
    let b64 = |d: &[u8]| {
        String::from_utf8_lossy(&crate::smime::mime::encode_base64_lines(d)).into_owned()
    };
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {title}\r\nDate: {date}\r\nMessage-ID: <push-{id}@{domain}>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n\
--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
This message was sent by {holder} at the request of {patient}.\r\nIt carries a health record ({title}) as a C-CDA document and as a readable page.\r\n\
--{boundary}\r\nContent-Type: application/xml; name=\"record.xml\"\r\nContent-Disposition: attachment; filename=\"record.xml\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{xml}\
--{boundary}\r\nContent-Type: text/html; charset=utf-8; name=\"record.html\"\r\nContent-Disposition: attachment; filename=\"record.html\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{html}\
--{boundary}--\r\n",
        from = clean(from),
        to = clean(to),
        date = chrono::Utc::now().to_rfc2822(),
        id = hex::encode(rand),
        holder = clean(holder),
        patient = clean(patient),
        xml = b64(xml),
        html = b64(html.as_bytes()),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/ccda")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn index_push_and_supersede() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let xml = fixture("hl7-ccd-1.xml");
        let doc = ccda::parse(&xml, &ccda::Limits::default()).unwrap();
        let pid = doc.patients[0]
            .ids
            .iter()
            .find_map(id_key)
            .expect("patient id");
        add_patient(
            &store,
            &PatientRecord {
                id: "p1".into(),
                name: "Test".into(),
                identifiers: vec![pid.clone()],
                password_hash: None,
            },
        )
        .unwrap();
        assert!(add_rule(&store, "nobody", "x@y.example", false, 0).is_err());
        let rule = add_rule(&store, "p1", "app@phr.example", false, 0).unwrap();
        let Indexed::New(entry) = index(&store, &xml, &doc, 1).unwrap() else {
            panic!("new")
        };
        assert_eq!(index(&store, &xml, &doc, 2).unwrap(), Indexed::Duplicate);
        let due = due_pushes(&store, &entry).unwrap();
        assert_eq!(due.len(), 1);
        assert!(
            due_pushes(&store, &entry).unwrap().is_empty(),
            "sent once per document"
        );
        revoke_rule(&store, &rule.id).unwrap();
        // a newer version of the same set supersedes
        let mut newer = doc.clone();
        newer.id = Some(InstanceId {
            root: Some("1.2.3".into()),
            extension: Some("v2".into()),
        });
        newer.version = Some("99".into());
        let Indexed::New(e2) = index(&store, &xml, &newer, 3).unwrap() else {
            panic!("new")
        };
        assert!(
            due_pushes(&store, &e2).unwrap().is_empty(),
            "a revoked rule sends nothing"
        );
        let p = patient(&store, "p1").unwrap().unwrap();
        let current = documents_of(&store, &p).unwrap();
        assert_eq!(current.len(), 1);
        assert_eq!(current[0].key, e2.key);
        let msg = push_message(
            "records@a.example",
            "app@phr.example",
            "Clinic",
            "Test",
            &xml,
            &doc,
        );
        assert_eq!(ccdas_in_message(&msg).len(), 1);
        assert!(String::from_utf8_lossy(&msg).contains("at the request of Test"));
    }
}
