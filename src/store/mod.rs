//! Persistence behind one narrow trait: message bodies in fsynced spool
//! files, everything else (queue jobs, mailbox indexes, users) in a sled
//! index. Nothing is acknowledged before it is on disk: `spool` returns only
//! after the file and its directory are fsynced; every index write is
//! flushed before it returns, except a finished job's removal, which the
//! move of its spool file to `done/` makes stick (see `SledStore`).
//! Submissions go through `SledStore::commit_job` instead: the commit
//! thread (`commit`) syncs the files and flushes the index for several
//! sessions at once, in that order.

mod commit;
mod sled_store;

pub use sled_store::{SledStore, Spooled};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("index database: {0}")]
    Index(String),
    #[error("corrupt index entry {key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("no such {what} {id}")]
    NotFound { what: &'static str, id: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Index(e.to_string())
    }
}

/// What the queue does with a job's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Submitted by an edge client: seal per destination domain and deliver.
    Outgoing,
    /// An MDN we send: sealed and delivered like Outgoing, never answered
    /// with a DSN when it fails.
    Notification,
    /// Received and opened: forward, decrypted, to the domain's edge relay.
    EdgeRelay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecipientStatus {
    Pending,
    Delivered,
    Failed,
}

/// One recipient of a job and where its delivery stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipientState {
    pub address: String,
    pub status: RecipientStatus,
    pub attempts: u32,
    /// Unix seconds before which no new attempt is made.
    pub next_attempt: i64,
    pub last_error: Option<String>,
    /// Enhanced status code of the last result ("5.7.1", "4.4.1").
    pub status_code: Option<String>,
}

impl RecipientState {
    pub fn pending(address: impl Into<String>) -> RecipientState {
        RecipientState {
            address: address.into(),
            status: RecipientStatus::Pending,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            status_code: None,
        }
    }
}

/// A unit of queued work: one message and its recipients.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    /// Spool id of the message bytes.
    pub spool: String,
    pub mail_from: String,
    pub recipients: Vec<RecipientState>,
    /// Unix seconds.
    pub created: i64,
    pub message_id: Option<String>,
    /// Whether a DSN for the failed recipients has been produced.
    pub dsn_sent: bool,
}

impl Job {
    pub fn is_finished(&self) -> bool {
        self.recipients
            .iter()
            .all(|r| r.status != RecipientStatus::Pending)
    }
}

/// One message in a mailbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MailboxEntry {
    pub uid: u64,
    pub spool: String,
    pub message_id: Option<String>,
    pub size: usize,
    /// Unix seconds.
    pub received: i64,
    pub flags: Vec<String>,
}

/// The outcome of a local delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalDelivery {
    Stored {
        uid: u64,
    },
    /// The mailbox already holds this Message-ID: delivered exactly once.
    Duplicate {
        uid: u64,
    },
}

/// The storage contract every protocol module uses.
pub trait Storage: Send + Sync {
    /// Writes a message durably; returns its spool id.
    fn spool(&self, data: &[u8]) -> Result<String, StoreError>;
    fn read(&self, spool: &str) -> Result<Vec<u8>, StoreError>;
    /// The size of a spooled message, without reading it.
    fn spool_len(&self, spool: &str) -> Result<u64, StoreError>;

    /// Records a new job (its message already spooled). Durable on return.
    fn enqueue(&self, job: &Job) -> Result<(), StoreError>;
    fn update_job(&self, job: &Job) -> Result<(), StoreError>;
    /// Removes a finished job and its spool file. Survives a crash of the
    /// process at once; the index removal is flushed with the next write.
    fn finish_job(&self, id: &str) -> Result<(), StoreError>;
    fn job(&self, id: &str) -> Result<Option<Job>, StoreError>;
    fn jobs(&self) -> Result<Vec<Job>, StoreError>;

    /// Stores a message in a mailbox, once per Message-ID. Durable on return.
    fn deliver_local(
        &self,
        mailbox: &str,
        message_id: Option<&str>,
        data: &[u8],
    ) -> Result<LocalDelivery, StoreError>;
    fn mailbox(&self, mailbox: &str) -> Result<Vec<MailboxEntry>, StoreError>;
    fn mailbox_message(&self, mailbox: &str, uid: u64) -> Result<Vec<u8>, StoreError>;

    /// Adds a message with flags (IMAP APPEND); no Message-ID de-duplication.
    fn append(&self, mailbox: &str, data: &[u8], flags: &[String]) -> Result<u64, StoreError>;
    /// Replaces the flags of one message. Durable on return.
    fn set_flags(&self, mailbox: &str, uid: u64, flags: &[String]) -> Result<(), StoreError>;
    /// Removes messages (and their spool files). Durable on return.
    fn expunge(&self, mailbox: &str, uids: &[u64]) -> Result<(), StoreError>;
    /// The UID the next message of the mailbox will get.
    fn uid_next(&self, mailbox: &str) -> Result<u64, StoreError>;
    /// Mailbox names starting with `prefix` that hold or held messages.
    fn mailboxes(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Small records of a kind ("tracking", "dispatch", ...) by key. Durable on return.
    /// A record that owns a spool file names it in a top-level `"spool"`
    /// field of its JSON value, or the file is removed as an orphan when the
    /// store is next opened.
    fn put_record(&self, kind: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// [`Storage::put_record`] made durable by the next write that is (a
    /// job enqueued, updated or finished, a delivery, ...), not on its own:
    /// for a record written just before such a write, one disk flush
    /// instead of two. A crash before that write loses the record.
    fn put_record_deferred(&self, kind: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn remove_record(&self, kind: &str, key: &str) -> Result<(), StoreError>;
    fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// A record decoded from JSON; a value that does not decode is `Corrupt`,
/// naming the kind and key.
pub fn get_json<T: for<'de> serde::Deserialize<'de>>(
    store: &dyn Storage,
    kind: &str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match store.get_record(kind, key)? {
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: format!("{kind} {key}"),
                why: e.to_string(),
            }),
        None => Ok(None),
    }
}

/// Stores a record as JSON (durable on return).
pub fn put_json<T: serde::Serialize>(
    store: &dyn Storage,
    kind: &str,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let v = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: format!("{kind} {key}"),
        why: e.to_string(),
    })?;
    store.put_record(kind, key, &v)
}

/// Every record of a kind, decoded from JSON.
pub fn all_json<T: for<'de> serde::Deserialize<'de>>(
    store: &dyn Storage,
    kind: &str,
) -> Result<Vec<T>, StoreError> {
    store
        .records(kind)?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: format!("{kind} {k}"),
                why: e.to_string(),
            })
        })
        .collect()
}
