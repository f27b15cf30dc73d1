//! The document index, patients and patient-directed push rules (Blue
//! Button Plus Push), kept as store records.
//!
//! Every C-CDA that passes through is stored once per document id and
//! indexed by patient identifier (`root^extension`); a newer version of the
//! same setId supersedes the older one. A push rule sends each new document
//! of its patient to a Direct address the patient chose.

use super::ccda::{self, Ccda, InstanceId};
use crate::notify::track;
use crate::smime::mime::Entity;
use crate::store::{Job, JobKind, RecipientState, Storage, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

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
    #[error("document {key} cannot be read again: {error}")]
    Unreadable { key: String, error: ccda::CcdaError },
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

/// The push rules still due for a document: active rules of its patient
/// made before it arrived that have not sent it yet. Nothing is marked here:
/// a push is recorded as sent by [`mark_sent`] only once its job is queued
/// (see [`queue_pushes`]).
pub fn due_pushes(
    store: &dyn Storage,
    doc: &IndexedDocument,
) -> Result<Vec<(PushRule, PatientRecord)>, DocumentError> {
    let mut out = Vec::new();
    if doc.superseded_by.is_some() {
        return Ok(out);
    }
    for rule in rules(store)? {
        // A rule sends the documents that arrive after it, not the
        // patient's history (which a restart's scan would otherwise send).
        if rule.revoked || rule.sent.contains(&doc.key) || doc.received < rule.created {
            continue;
        }
        let Some(p) = patient(store, &rule.patient)? else {
            continue;
        };
        if !doc.patient_ids.iter().any(|i| p.identifiers.contains(i)) {
            continue;
        }
        out.push((rule, p));
    }
    Ok(out)
}

/// Records that `rule` has sent document `doc_key` (a `once` rule ends
/// with it). Durable on return. A rule removed meanwhile is no error.
pub fn mark_sent(store: &dyn Storage, rule_id: &str, doc_key: &str) -> Result<(), DocumentError> {
    let Some(mut rule) = get::<PushRule>(store, RULES, rule_id)? else {
        return Ok(());
    };
    if !rule.sent.iter().any(|k| k == doc_key) {
        rule.sent.push(doc_key.to_string());
    }
    if rule.once {
        rule.revoked = true;
    }
    put(store, RULES, rule_id, &rule)
}

/// Who sends pushes: the envelope and From address, and the data holder
/// the note names.
#[derive(Clone, Debug)]
pub struct PushSender {
    pub from: String,
    pub holder: String,
}

/// The Message-ID (without angle brackets) of the push of one document by
/// one rule: the same on every attempt, so that a job queued just before a
/// crash is recognised instead of queued twice.
pub fn push_message_id(rule_id: &str, doc_key: &str, from: &str) -> String {
    let domain = from.rsplit_once('@').map(|(_, d)| d).unwrap_or("localhost");
    let digest = hex::encode(openssl::sha::sha256(doc_key.as_bytes()));
    let clean: String = rule_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    format!("push-{clean}-{}@{domain}", &digest[..24])
}

/// A push made durable: its message spooled, its job and tracking record
/// stored, the rule marked as having sent the document.
#[derive(Debug)]
pub struct QueuedPush {
    pub document: String,
    pub rule: PushRule,
    pub patient: PatientRecord,
    pub job: Job,
    pub tracking: track::Tracking,
}

/// A push that went wrong, naming the rule and the document.
#[derive(Debug)]
pub struct PushFailure {
    /// None when the document itself could not be looked at.
    pub rule: Option<String>,
    pub document: String,
    pub error: DocumentError,
}

/// What queueing pushes did.
#[derive(Debug, Default)]
pub struct PushOutcome {
    /// New jobs, to hand to the queue worker.
    pub queued: Vec<QueuedPush>,
    /// (rule, document) pushes whose job was already in the queue (stored
    /// before a crash that came before the rule's record): marked only.
    pub recovered: Vec<(String, String)>,
    /// Pushes not queued (still due: retried at the next start), or queued
    /// but not marked (recognised by their Message-ID at the next start).
    pub failed: Vec<PushFailure>,
}

/// Serialises the read-modify-write of push rules by concurrent sessions
/// (two documents for one `once` rule, two marks of one rule).
static PUSHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Queues the pushes a newly indexed document is due: for each rule, the
/// message is spooled, the tracking record and the job stored, and only
/// then is the rule marked as having sent the document. A failure before
/// the job is stored leaves the push due (see [`queue_due_pushes`]).
pub fn queue_pushes(
    store: &dyn Storage,
    entry: &IndexedDocument,
    xml: &[u8],
    doc: &Ccda,
    sender: &PushSender,
    now: i64,
) -> PushOutcome {
    let _guard = PUSHES.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = PushOutcome::default();
    queue_document(
        store,
        entry,
        xml,
        doc,
        sender,
        now,
        &HashSet::new(),
        &mut out,
    );
    out
}

/// At start-up: queues every push still due (a document indexed, or a
/// push that failed, before a crash or a storage error). A job already in
/// the queue for a push (same Message-ID) is not queued again; the rule is
/// only marked.
pub fn queue_due_pushes(
    store: &dyn Storage,
    sender: &PushSender,
    now: i64,
) -> Result<PushOutcome, DocumentError> {
    let _guard = PUSHES.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = PushOutcome::default();
    if rules(store)?.iter().all(|r| r.revoked) {
        return Ok(out);
    }
    let in_queue: HashSet<String> = store
        .jobs()?
        .into_iter()
        .filter_map(|j| j.message_id)
        .collect();
    let mut docs = documents(store)?;
    // In arrival order, so that a `once` rule sends the first one.
    docs.sort_by(|a, b| (a.received, &a.key).cmp(&(b.received, &b.key)));
    for entry in docs {
        if due_pushes(store, &entry)?.is_empty() {
            continue;
        }
        let parsed = store
            .read(&entry.spool)
            .map_err(DocumentError::from)
            .and_then(|xml| {
                ccda::parse(&xml, &ccda::Limits::default())
                    .map(|doc| (xml, doc))
                    .map_err(|error| DocumentError::Unreadable {
                        key: entry.key.clone(),
                        error,
                    })
            });
        match parsed {
            Ok((xml, doc)) => {
                queue_document(store, &entry, &xml, &doc, sender, now, &in_queue, &mut out)
            }
            Err(error) => out.failed.push(PushFailure {
                rule: None,
                document: entry.key.clone(),
                error,
            }),
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn queue_document(
    store: &dyn Storage,
    entry: &IndexedDocument,
    xml: &[u8],
    doc: &Ccda,
    sender: &PushSender,
    now: i64,
    in_queue: &HashSet<String>,
    out: &mut PushOutcome,
) {
    let due = match due_pushes(store, entry) {
        Ok(d) => d,
        Err(error) => {
            out.failed.push(PushFailure {
                rule: None,
                document: entry.key.clone(),
                error,
            });
            return;
        }
    };
    for (rule, patient) in due {
        let fail = |error| PushFailure {
            rule: Some(rule.id.clone()),
            document: entry.key.clone(),
            error,
        };
        let id = push_message_id(&rule.id, &entry.key, &sender.from);
        let bracketed = format!("<{id}>");
        if in_queue.contains(&bracketed) {
            match mark_sent(store, &rule.id, &entry.key) {
                Ok(()) => out.recovered.push((rule.id.clone(), entry.key.clone())),
                Err(e) => out.failed.push(fail(e)),
            }
            continue;
        }
        let message = push_message(
            &sender.from,
            &rule.to,
            &sender.holder,
            &patient.name,
            &id,
            xml,
            doc,
        );
        let queued = (|| -> Result<(Job, track::Tracking), DocumentError> {
            let spool = store.spool(&message)?;
            let tracking = track::Tracking::new(
                &bracketed,
                &sender.from,
                std::slice::from_ref(&rule.to),
                now,
            );
            // Made durable by the enqueue just below.
            track::save_deferred(store, &tracking)?;
            let job = Job {
                id: new_job_id(),
                kind: JobKind::Outgoing,
                spool,
                mail_from: sender.from.clone(),
                recipients: vec![RecipientState::pending(rule.to.clone())],
                created: now,
                message_id: Some(bracketed.clone()),
                dsn_sent: false,
            };
            if let Err(e) = store.enqueue(&job) {
                // No job, no tracking: a message never sent must not time
                // out into a DSN. The push stays due.
                let _ = store.remove_record(track::KIND, &bracketed);
                return Err(e.into());
            }
            Ok((job, tracking))
        })();
        let (job, tracking) = match queued {
            Ok(x) => x,
            Err(e) => {
                out.failed.push(fail(e));
                continue;
            }
        };
        if let Err(e) = mark_sent(store, &rule.id, &entry.key) {
            out.failed.push(fail(e));
        }
        out.queued.push(QueuedPush {
            document: entry.key.clone(),
            rule,
            patient,
            job,
            tracking,
        });
    }
}

fn new_job_id() -> String {
    let mut b = [0u8; 12];
    let _ = openssl::rand::rand_bytes(&mut b);
    hex::encode(b)
}

/// The pushed message: a note, the C-CDA as application/xml and its HTML rendering.
pub fn push_message(
    from: &str,
    to: &str,
    holder: &str,
    patient: &str,
    message_id: &str,
    xml: &[u8],
    doc: &Ccda,
) -> Vec<u8> {
    let mut rand = [0u8; 12];
    let _ = openssl::rand::rand_bytes(&mut rand);
    let boundary = format!("=_hispd_push_{}", hex::encode(rand));
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
        "From: {from}\r\nTo: {to}\r\nSubject: {title}\r\nDate: {date}\r\nMessage-ID: <{id}>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n\
--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
This message was sent by {holder} at the request of {patient}.\r\nIt carries a health record ({title}) as a C-CDA document and as a readable page.\r\n\
--{boundary}\r\nContent-Type: application/xml; name=\"record.xml\"\r\nContent-Disposition: attachment; filename=\"record.xml\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{xml}\
--{boundary}\r\nContent-Type: text/html; charset=utf-8; name=\"record.html\"\r\nContent-Disposition: attachment; filename=\"record.html\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{html}\
--{boundary}--\r\n",
        from = clean(from),
        to = clean(to),
        date = chrono::Utc::now().to_rfc2822(),
        id = clean(message_id),
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
        mark_sent(&store, &due[0].0.id, &entry.key).unwrap();
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
            "push-1@a.example",
            &xml,
            &doc,
        );
        assert_eq!(ccdas_in_message(&msg).len(), 1);
        assert!(String::from_utf8_lossy(&msg).contains("at the request of Test"));
    }

    /// A store whose queue or push-rule writes fail, as a full disk would.
    struct Faulty<'a> {
        inner: &'a SledStore,
        fail_enqueue: bool,
        fail_rule_writes: bool,
    }

    fn refused() -> StoreError {
        StoreError::Index("refused by the test".into())
    }

    impl Storage for Faulty<'_> {
        fn spool(&self, data: &[u8]) -> Result<String, StoreError> {
            self.inner.spool(data)
        }
        fn read(&self, spool: &str) -> Result<Vec<u8>, StoreError> {
            self.inner.read(spool)
        }
        fn spool_len(&self, spool: &str) -> Result<u64, StoreError> {
            self.inner.spool_len(spool)
        }
        fn enqueue(&self, job: &crate::store::Job) -> Result<(), StoreError> {
            if self.fail_enqueue {
                return Err(refused());
            }
            self.inner.enqueue(job)
        }
        fn update_job(&self, job: &crate::store::Job) -> Result<(), StoreError> {
            self.inner.update_job(job)
        }
        fn finish_job(&self, id: &str) -> Result<(), StoreError> {
            self.inner.finish_job(id)
        }
        fn job(&self, id: &str) -> Result<Option<crate::store::Job>, StoreError> {
            self.inner.job(id)
        }
        fn jobs(&self) -> Result<Vec<crate::store::Job>, StoreError> {
            self.inner.jobs()
        }
        fn deliver_local(
            &self,
            mailbox: &str,
            message_id: Option<&str>,
            data: &[u8],
        ) -> Result<crate::store::LocalDelivery, StoreError> {
            self.inner.deliver_local(mailbox, message_id, data)
        }
        fn mailbox(&self, mailbox: &str) -> Result<Vec<crate::store::MailboxEntry>, StoreError> {
            self.inner.mailbox(mailbox)
        }
        fn mailbox_message(&self, mailbox: &str, uid: u64) -> Result<Vec<u8>, StoreError> {
            self.inner.mailbox_message(mailbox, uid)
        }
        fn append(&self, mailbox: &str, data: &[u8], flags: &[String]) -> Result<u64, StoreError> {
            self.inner.append(mailbox, data, flags)
        }
        fn set_flags(&self, mailbox: &str, uid: u64, flags: &[String]) -> Result<(), StoreError> {
            self.inner.set_flags(mailbox, uid, flags)
        }
        fn expunge(&self, mailbox: &str, uids: &[u64]) -> Result<(), StoreError> {
            self.inner.expunge(mailbox, uids)
        }
        fn uid_next(&self, mailbox: &str) -> Result<u64, StoreError> {
            self.inner.uid_next(mailbox)
        }
        fn mailboxes(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
            self.inner.mailboxes(prefix)
        }
        fn put_record(&self, kind: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            if self.fail_rule_writes && kind == RULES {
                return Err(refused());
            }
            self.inner.put_record(kind, key, value)
        }
        fn put_record_deferred(
            &self,
            kind: &str,
            key: &str,
            value: &[u8],
        ) -> Result<(), StoreError> {
            if self.fail_rule_writes && kind == RULES {
                return Err(refused());
            }
            self.inner.put_record_deferred(kind, key, value)
        }
        fn get_record(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_record(kind, key)
        }
        fn remove_record(&self, kind: &str, key: &str) -> Result<(), StoreError> {
            self.inner.remove_record(kind, key)
        }
        fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.records(kind)
        }
    }

    const SENDER: &str = "records@a.example";

    fn sender() -> PushSender {
        PushSender {
            from: SENDER.into(),
            holder: "Clinic".into(),
        }
    }

    /// A store with patient p1 (the identifier of hl7-ccd-1.xml) and the
    /// document parsed.
    fn patient_store(dir: &std::path::Path) -> (SledStore, Vec<u8>, Ccda) {
        let store = SledStore::open(dir).unwrap();
        let xml = fixture("hl7-ccd-1.xml");
        let doc = ccda::parse(&xml, &ccda::Limits::default()).unwrap();
        let pid = doc.patients[0].ids.iter().find_map(id_key).unwrap();
        add_patient(
            &store,
            &PatientRecord {
                id: "p1".into(),
                name: "Test".into(),
                identifiers: vec![pid],
                password_hash: None,
            },
        )
        .unwrap();
        (store, xml, doc)
    }

    fn new_entry(store: &dyn Storage, xml: &[u8], doc: &Ccda, now: i64) -> IndexedDocument {
        match index(store, xml, doc, now).unwrap() {
            Indexed::New(e) => e,
            Indexed::Duplicate => panic!("a new document"),
        }
    }

    fn rule(store: &dyn Storage, id: &str) -> PushRule {
        get(store, RULES, id).unwrap().unwrap()
    }

    #[test]
    fn a_push_that_cannot_be_queued_stays_due_and_the_next_start_sends_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, xml, doc) = patient_store(dir.path());
        let r = add_rule(&store, "p1", "app@phr.example", false, 0).unwrap();
        let entry = new_entry(&store, &xml, &doc, 1);

        let full_disk = Faulty {
            inner: &store,
            fail_enqueue: true,
            fail_rule_writes: false,
        };
        let outcome = queue_pushes(&full_disk, &entry, &xml, &doc, &sender(), 2);
        assert!(outcome.queued.is_empty());
        assert_eq!(outcome.failed.len(), 1, "{outcome:?}");
        assert_eq!(outcome.failed[0].rule.as_deref(), Some(r.id.as_str()));
        assert_eq!(outcome.failed[0].document, entry.key);
        assert!(store.jobs().unwrap().is_empty());
        let id = format!("<{}>", push_message_id(&r.id, &entry.key, SENDER));
        assert!(track::load(&store, &id).unwrap().is_none(), "no tracking");
        assert!(rule(&store, &r.id).sent.is_empty(), "not recorded as sent");
        assert_eq!(due_pushes(&store, &entry).unwrap().len(), 1, "still due");

        // The next start queues it.
        let outcome = queue_due_pushes(&store, &sender(), 3).unwrap();
        assert_eq!(outcome.queued.len(), 1, "{outcome:?}");
        assert!(outcome.failed.is_empty(), "{outcome:?}");
        let jobs = store.jobs().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].mail_from, SENDER);
        assert_eq!(jobs[0].recipients[0].address, "app@phr.example");
        assert_eq!(jobs[0].message_id.as_deref(), Some(id.as_str()));
        let message = store.read(&jobs[0].spool).unwrap();
        assert_eq!(ccdas_in_message(&message), vec![xml.clone()]);
        assert!(String::from_utf8_lossy(&message).contains(&format!("Message-ID: {id}")));
        assert!(track::load(&store, &id).unwrap().is_some(), "tracked");
        assert_eq!(rule(&store, &r.id).sent, vec![entry.key.clone()]);

        // Nothing more is due: a further start queues nothing.
        let outcome = queue_due_pushes(&store, &sender(), 4).unwrap();
        assert!(outcome.queued.is_empty() && outcome.recovered.is_empty());
        assert_eq!(store.jobs().unwrap().len(), 1);
    }

    #[test]
    fn a_push_queued_but_not_recorded_is_not_queued_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (store, xml, doc) = patient_store(dir.path());
        let r = add_rule(&store, "p1", "app@phr.example", false, 0).unwrap();
        let entry = new_entry(&store, &xml, &doc, 1);
        let rules_fail = Faulty {
            inner: &store,
            fail_enqueue: false,
            fail_rule_writes: true,
        };
        let outcome = queue_pushes(&rules_fail, &entry, &xml, &doc, &sender(), 2);
        assert_eq!(outcome.queued.len(), 1, "the job is queued");
        assert_eq!(outcome.failed.len(), 1, "the mark is not");
        assert_eq!(due_pushes(&store, &entry).unwrap().len(), 1);

        let outcome = queue_due_pushes(&store, &sender(), 3).unwrap();
        assert!(outcome.queued.is_empty(), "{outcome:?}");
        assert_eq!(outcome.recovered, vec![(r.id.clone(), entry.key.clone())]);
        assert_eq!(store.jobs().unwrap().len(), 1, "one job, not two");
        assert!(due_pushes(&store, &entry).unwrap().is_empty());
    }

    #[test]
    fn the_start_up_scan_keeps_to_revocation_once_and_rule_age() {
        let dir = tempfile::tempdir().unwrap();
        let (store, xml, doc) = patient_store(dir.path());
        let first = new_entry(&store, &xml, &doc, 10);
        let mut other = doc.clone();
        other.id = Some(InstanceId {
            root: Some("1.2.3".into()),
            extension: Some("second".into()),
        });
        other.set_id = None;
        let second = new_entry(&store, &xml, &other, 20);

        let once = add_rule(&store, "p1", "once@phr.example", true, 5).unwrap();
        let revoked = add_rule(&store, "p1", "revoked@phr.example", false, 5).unwrap();
        revoke_rule(&store, &revoked.id).unwrap();
        let late = add_rule(&store, "p1", "late@phr.example", false, 30).unwrap();

        let outcome = queue_due_pushes(&store, &sender(), 40).unwrap();
        let pushed: Vec<(&str, &str)> = outcome
            .queued
            .iter()
            .map(|p| (p.rule.id.as_str(), p.document.as_str()))
            .collect();
        assert_eq!(
            pushed,
            vec![(once.id.as_str(), first.key.as_str())],
            "the once rule sends the first document only; the revoked rule \
             nothing; a rule sends no document older than itself"
        );
        assert!(rule(&store, &once.id).revoked);
        assert!(rule(&store, &revoked.id).sent.is_empty());
        assert!(rule(&store, &late.id).sent.is_empty());
        for entry in [&first, &second] {
            assert!(due_pushes(&store, entry).unwrap().is_empty());
        }
    }
}
