//! The embedded store: sled for the index, one file per message body.

use super::commit::{Committer, Durable};
use super::{Job, LocalDelivery, MailboxEntry, Storage, StoreError};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How many finished spool files are kept for reuse (see [`Done`]).
const KEEP_DONE: usize = 256;

/// Spool files of finished jobs, in `spool/done/`. Moving a finished job's
/// file there (a rename, durable the moment it returns as far as a crashed
/// process is concerned) is what marks the job finished: the job's removal
/// from the index is not flushed on its own, and if a crash loses it the
/// file in `done/` says the job was finished (see `SledStore::open`). Once an
/// index flush has covered the removal ("settled"), the file is free to be
/// overwritten by the next message: reusing files spares the file system an
/// inode allocation and a deletion per message, which on ext4 grow costlier
/// the more files were deleted recently.
#[derive(Default)]
struct Done {
    /// Finished, removal not yet covered by a flush: must stay as they are.
    /// Numbered in the order they were finished.
    unsettled: Vec<(u64, String)>,
    next: u64,
    /// Free for reuse.
    settled: Vec<String>,
}

/// The index flush, shared with the commit thread: a flush frees the
/// `done/` files whose jobs' removal it covered.
#[derive(Clone)]
struct IndexSync {
    db: sled::Db,
    /// sled's log file, synced after each flush: see `flush`.
    log: Arc<fs::File>,
    log_path: PathBuf,
    spool_dir: PathBuf,
    done: Arc<Mutex<Done>>,
}

impl IndexSync {
    fn done_dir(&self) -> PathBuf {
        self.spool_dir.join("done")
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Files finished before this flush starts are free once it is done.
        let before = self.done.lock().unwrap_or_else(|p| p.into_inner()).next;
        self.db.flush()?;
        // sled's flush writes its log with sync_file_range on Linux, which
        // neither empties the disk's write cache nor writes the file's size
        // when the log grew: a power failure could lose an entry it had
        // "flushed". sled itself fsyncs only every half second.
        self.log.sync_data().map_err(io(&self.log_path))?;
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if done.unsettled.first().is_some_and(|(n, _)| *n < before) {
            let covered = done.unsettled.partition_point(|(n, _)| *n < before);
            let names: Vec<(u64, String)> = done.unsettled.drain(..covered).collect();
            for (_, name) in names {
                if done.settled.len() < KEEP_DONE {
                    done.settled.push(name);
                } else {
                    let _ = fs::remove_file(self.done_dir().join(name));
                }
            }
        }
        Ok(())
    }
}

impl Durable for IndexSync {
    /// Makes the names written in the spool directory durable.
    fn sync_spool_dir(&self) -> Result<(), StoreError> {
        fs::File::open(&self.spool_dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.spool_dir))
    }

    fn flush(&self) -> Result<(), StoreError> {
        IndexSync::flush(self)
    }
}

/// A spool file written but not yet known to be on disk: see
/// [`SledStore::commit_job`].
pub struct Spooled {
    pub id: String,
    path: PathBuf,
    file: fs::File,
}

pub struct SledStore {
    db: sled::Db,
    spool_dir: PathBuf,
    sync: IndexSync,
    committer: Committer,
    jobs: sled::Tree,
    mailboxes: sled::Tree,
    dedupe: sled::Tree,
    uidnext: sled::Tree,
    records_tree: sled::Tree,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if openssl::rand::rand_bytes(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes());
    }
    hex::encode(bytes)
}

fn valid_spool_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn mailbox_key(mailbox: &str, uid: u64) -> Vec<u8> {
    let mut k = mailbox.to_ascii_lowercase().into_bytes();
    k.push(0);
    k.extend_from_slice(&uid.to_be_bytes());
    k
}

fn record_key(kind: &str, key: &str) -> Vec<u8> {
    let mut k = kind.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn mailbox_prefix(mailbox: &str) -> Vec<u8> {
    let mut k = mailbox.to_ascii_lowercase().into_bytes();
    k.push(0);
    k
}

/// How long `open` waits for the index lock. sled releases its file lock
/// from a background flusher thread shortly after the last handle is dropped,
/// so a reopen in the same process (a reload, a test) can find it still held
/// for a moment; another process holding it (a running daemon) still fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn open_index(path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            // sled reports the lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(StoreError::Index(format!("{}: {e}", path.display()))),
        }
    }
}

impl SledStore {
    /// Opens (creating) the store under `dir`: `dir/index` and `dir/spool`.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let spool_dir = dir.join("spool");
        fs::create_dir_all(spool_dir.join("tmp")).map_err(io(&spool_dir))?;
        fs::create_dir_all(spool_dir.join("done")).map_err(io(&spool_dir))?;
        let db = open_index(&dir.join("index"))?;
        // sled 0.34 keeps its log in `db` under its directory.
        let log_path = dir.join("index").join("db");
        let log = fs::File::open(&log_path).map_err(io(&log_path))?;
        let sync = IndexSync {
            db: db.clone(),
            log: Arc::new(log),
            log_path,
            spool_dir: spool_dir.clone(),
            done: Arc::new(Mutex::new(Done::default())),
        };
        let store = SledStore {
            committer: Committer::start(sync.clone())?,
            sync,
            jobs: db.open_tree("jobs")?,
            mailboxes: db.open_tree("mailboxes")?,
            dedupe: db.open_tree("dedupe")?,
            uidnext: db.open_tree("uidnext")?,
            records_tree: db.open_tree("records")?,
            db,
            spool_dir,
        };
        store.remove_finished_jobs()?;
        store.remove_orphans()?;
        store.flush()?;
        store.settle_done_files()?;
        Ok(store)
    }

    fn done_dir(&self) -> PathBuf {
        self.sync.done_dir()
    }

    /// Jobs whose spool file is in `done/` were finished by a process that
    /// stopped before the index removal reached the disk: remove them now.
    fn remove_finished_jobs(&self) -> Result<(), StoreError> {
        let done = self.done_dir();
        for job in self.jobs()? {
            if valid_spool_id(&job.spool)
                && !self.spool_dir.join(&job.spool).exists()
                && done.join(&job.spool).exists()
            {
                tracing::info!(job = %job.id, "job was finished before the last stop");
                self.jobs.remove(job.id.as_bytes())?;
            }
        }
        Ok(())
    }

    /// After the start-up flush every file in `done/` is free: keep up to
    /// [`KEEP_DONE`] for reuse, remove the rest and anything else there.
    fn settle_done_files(&self) -> Result<(), StoreError> {
        let dir = self.done_dir();
        let mut free = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_spool_id(&name) && free.len() < KEEP_DONE && entry.path().is_file() {
                free.push(name);
            } else {
                let _ = fs::remove_file(entry.path());
            }
        }
        self.sync
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settled = free;
        Ok(())
    }

    /// Writes `data` over a free file of `done/` and moves it to `dest`,
    /// without syncing it; `None` when there is no free file (or it could
    /// not be used).
    fn reuse_done_file(&self, data: &[u8], dest: &Path) -> Option<fs::File> {
        let name = self
            .sync
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settled
            .pop()?;
        let path = self.done_dir().join(&name);
        let written = (|| -> std::io::Result<fs::File> {
            let mut f = fs::OpenOptions::new().write(true).open(&path)?;
            f.write_all(data)?;
            f.set_len(data.len() as u64)?;
            fs::rename(&path, dest)?;
            Ok(f)
        })();
        match written {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!("reusing spool file {}: {e}", path.display());
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// The sled database, for other trees (users).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn spool_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_spool_id(id) {
            return Err(StoreError::NotFound {
                what: "spool file",
                id: id.to_string(),
            });
        }
        Ok(self.spool_dir.join(id))
    }

    /// Spool files that no job, no mailbox and no record refers to were
    /// written by a transaction that never committed (a crash before 250):
    /// remove them. A record owns a spool file by naming it in a top-level
    /// `"spool"` field of its JSON value (the indexed C-CDA documents do).
    fn remove_orphans(&self) -> Result<(), StoreError> {
        let mut referenced = std::collections::HashSet::new();
        for job in self.jobs()? {
            referenced.insert(job.spool);
        }
        for item in self.records_tree.iter() {
            let (_, v) = item?;
            if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&v) {
                if let Some(serde_json::Value::String(spool)) = map.get("spool") {
                    referenced.insert(spool.clone());
                }
            }
        }
        for item in self.mailboxes.iter() {
            let (k, v) = item?;
            let entry: MailboxEntry =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    why: e.to_string(),
                })?;
            referenced.insert(entry.spool);
        }
        let tmp = self.spool_dir.join("tmp");
        for dir in [&self.spool_dir, &tmp] {
            // (done/ is a directory, skipped here: see settle_done_files.)
            for entry in fs::read_dir(dir).map_err(io(dir))? {
                let entry = entry.map_err(io(dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_file() && !referenced.contains(&name) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.sync.flush()
    }

    /// Writes `data` as a new spool file (reusing a free one of `done/` when
    /// there is one) without waiting for the disk.
    pub fn spool_unsynced(&self, data: &[u8]) -> Result<Spooled, StoreError> {
        let id = new_id();
        let path = self.spool_dir.join(&id);
        let file = match self.reuse_done_file(data, &path) {
            Some(file) => file,
            None => {
                // Written under its final name: until the index refers to
                // it, a crash leaves an orphan, removed at the next start.
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io(&path))?;
                f.write_all(data).map_err(io(&path))?;
                f
            }
        };
        Ok(Spooled { id, path, file })
    }

    /// Enqueues `job`, whose message is `spooled`, once the file is on
    /// disk; returns when the job is durable. Sessions committing at the
    /// same time share the directory sync and the index flush, and the
    /// caller's thread never waits for the disk (see `commit`).
    pub async fn commit_job(&self, spooled: Spooled, job: &Job) -> Result<(), StoreError> {
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Index(e.to_string()))?;
        self.committer
            .commit(
                vec![(spooled.path, spooled.file)],
                vec![(self.jobs.clone(), job.id.as_bytes().to_vec(), value)],
            )
            .await
    }
}

impl Storage for SledStore {
    fn spool(&self, data: &[u8]) -> Result<String, StoreError> {
        let Spooled { id, path, file } = self.spool_unsynced(data)?;
        file.sync_data().map_err(io(&path))?;
        self.sync.sync_spool_dir()?;
        Ok(id)
    }

    fn read(&self, spool: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.spool_path(spool)?;
        fs::read(&path).map_err(io(&path))
    }

    fn spool_len(&self, spool: &str) -> Result<u64, StoreError> {
        let path = self.spool_path(spool)?;
        Ok(fs::metadata(&path).map_err(io(&path))?.len())
    }

    fn enqueue(&self, job: &Job) -> Result<(), StoreError> {
        self.update_job(job)
    }

    fn update_job(&self, job: &Job) -> Result<(), StoreError> {
        let value = serde_json::to_vec(job).map_err(|e| StoreError::Index(e.to_string()))?;
        self.jobs.insert(job.id.as_bytes(), value)?;
        self.flush()
    }

    fn finish_job(&self, id: &str) -> Result<(), StoreError> {
        let Some(job) = self.job(id)? else {
            return Ok(());
        };
        // The move to done/ marks the job finished (see `Done`); the index
        // removal reaches the disk with the next flush, and only a flush
        // that starts after the removal frees the file for reuse.
        let mut moved = false;
        if let Ok(path) = self.spool_path(&job.spool) {
            match fs::rename(&path, self.done_dir().join(&job.spool)) {
                Ok(()) => moved = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { path, error: e }),
            }
        }
        self.jobs.remove(id.as_bytes())?;
        if moved {
            let mut done = self.sync.done.lock().unwrap_or_else(|p| p.into_inner());
            let n = done.next;
            done.next += 1;
            done.unsettled.push((n, job.spool));
        }
        Ok(())
    }

    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: id.to_string(),
                    why: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for item in self.jobs.iter() {
            let (k, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                why: e.to_string(),
            })?);
        }
        Ok(out)
    }

    fn deliver_local(
        &self,
        mailbox: &str,
        message_id: Option<&str>,
        data: &[u8],
    ) -> Result<LocalDelivery, StoreError> {
        let dedupe_key = message_id.map(|m| {
            let mut k = mailbox_prefix(mailbox);
            k.extend_from_slice(m.trim().as_bytes());
            k
        });
        if let Some(k) = &dedupe_key {
            if let Some(uid) = self.dedupe.get(k)? {
                let uid = u64::from_be_bytes(uid.as_ref().try_into().unwrap_or([0; 8]));
                return Ok(LocalDelivery::Duplicate { uid });
            }
        }
        let spool = self.spool(data)?;
        let received = chrono::Utc::now().timestamp();
        let mailbox_name = mailbox.to_ascii_lowercase();
        let result = (&self.mailboxes, &self.dedupe, &self.uidnext).transaction(
            |(boxes, dedupe, uidnext)| {
                if let Some(k) = &dedupe_key {
                    if let Some(uid) = dedupe.get(k)? {
                        let uid = u64::from_be_bytes(uid.as_ref().try_into().unwrap_or([0; 8]));
                        return Ok(LocalDelivery::Duplicate { uid });
                    }
                }
                let uid = uidnext
                    .get(mailbox_name.as_bytes())?
                    .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
                    .unwrap_or(1);
                uidnext.insert(mailbox_name.as_bytes(), &(uid + 1).to_be_bytes())?;
                let entry = MailboxEntry {
                    uid,
                    spool: spool.clone(),
                    message_id: message_id.map(|m| m.trim().to_string()),
                    size: data.len(),
                    received,
                    flags: Vec::new(),
                };
                let value = serde_json::to_vec(&entry).map_err(|e| {
                    ConflictableTransactionError::Abort(StoreError::Index(e.to_string()))
                })?;
                boxes.insert(mailbox_key(&mailbox_name, uid), value)?;
                if let Some(k) = &dedupe_key {
                    dedupe.insert(k.clone(), &uid.to_be_bytes())?;
                }
                Ok(LocalDelivery::Stored { uid })
            },
        );
        let outcome = match result {
            Ok(o) => o,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        if matches!(outcome, LocalDelivery::Duplicate { .. }) {
            let _ = fs::remove_file(self.spool_dir.join(&spool));
        }
        self.flush()?;
        Ok(outcome)
    }

    fn mailbox(&self, mailbox: &str) -> Result<Vec<MailboxEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.mailboxes.scan_prefix(mailbox_prefix(mailbox)) {
            let (k, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                why: e.to_string(),
            })?);
        }
        Ok(out)
    }

    fn append(&self, mailbox: &str, data: &[u8], flags: &[String]) -> Result<u64, StoreError> {
        let spool = self.spool(data)?;
        let name = mailbox.to_ascii_lowercase();
        let received = chrono::Utc::now().timestamp();
        let result = (&self.mailboxes, &self.uidnext).transaction(|(boxes, uidnext)| {
            let uid = uidnext
                .get(name.as_bytes())?
                .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
                .unwrap_or(1);
            uidnext.insert(name.as_bytes(), &(uid + 1).to_be_bytes())?;
            let entry = MailboxEntry {
                uid,
                spool: spool.clone(),
                message_id: None,
                size: data.len(),
                received,
                flags: flags.to_vec(),
            };
            let value = serde_json::to_vec(&entry).map_err(|e| {
                ConflictableTransactionError::Abort(StoreError::Index(e.to_string()))
            })?;
            boxes.insert(mailbox_key(&name, uid), value)?;
            Ok(uid)
        });
        let uid = match result {
            Ok(uid) => uid,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.flush()?;
        Ok(uid)
    }

    fn set_flags(&self, mailbox: &str, uid: u64, flags: &[String]) -> Result<(), StoreError> {
        let key = mailbox_key(mailbox, uid);
        let v = self
            .mailboxes
            .get(&key)?
            .ok_or_else(|| StoreError::NotFound {
                what: "message",
                id: format!("{mailbox} uid {uid}"),
            })?;
        let mut entry: MailboxEntry =
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: format!("{mailbox} uid {uid}"),
                why: e.to_string(),
            })?;
        entry.flags = flags.to_vec();
        let value = serde_json::to_vec(&entry).map_err(|e| StoreError::Index(e.to_string()))?;
        self.mailboxes.insert(key, value)?;
        self.flush()
    }

    fn expunge(&self, mailbox: &str, uids: &[u64]) -> Result<(), StoreError> {
        let mut spools = Vec::new();
        for uid in uids {
            if let Some(v) = self.mailboxes.remove(mailbox_key(mailbox, *uid))? {
                if let Ok(entry) = serde_json::from_slice::<MailboxEntry>(&v) {
                    spools.push(entry.spool);
                }
            }
        }
        self.flush()?;
        for spool in spools {
            if let Ok(path) = self.spool_path(&spool) {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }

    fn uid_next(&self, mailbox: &str) -> Result<u64, StoreError> {
        Ok(self
            .uidnext
            .get(mailbox.to_ascii_lowercase().as_bytes())?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(1))
    }

    fn mailboxes(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .uidnext
            .scan_prefix(prefix.to_ascii_lowercase().as_bytes())
        {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    fn put_record(&self, kind: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_record_deferred(kind, key, value)?;
        self.flush()
    }

    fn put_record_deferred(&self, kind: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.records_tree.insert(record_key(kind, key), value)?;
        Ok(())
    }

    fn get_record(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records_tree
            .get(record_key(kind, key))?
            .map(|v| v.to_vec()))
    }

    fn remove_record(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        self.records_tree.remove(record_key(kind, key))?;
        self.flush()
    }

    fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = record_key(kind, "");
        let mut out = Vec::new();
        for item in self.records_tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            out.push((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                v.to_vec(),
            ));
        }
        Ok(out)
    }

    fn mailbox_message(&self, mailbox: &str, uid: u64) -> Result<Vec<u8>, StoreError> {
        let key = mailbox_key(mailbox, uid);
        let v = self
            .mailboxes
            .get(&key)?
            .ok_or_else(|| StoreError::NotFound {
                what: "message",
                id: format!("{mailbox} uid {uid}"),
            })?;
        let entry: MailboxEntry = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
            key: format!("{mailbox} uid {uid}"),
            why: e.to_string(),
        })?;
        self.read(&entry.spool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{JobKind, RecipientState};

    fn job(store: &SledStore, data: &[u8]) -> Job {
        Job {
            id: new_id(),
            kind: JobKind::Outgoing,
            spool: store.spool(data).unwrap(),
            mail_from: "a@x.example".into(),
            recipients: vec![RecipientState::pending("b@y.example")],
            created: 0,
            message_id: Some("<m@x>".into()),
            dsn_sent: false,
        }
    }

    #[test]
    fn spool_files_named_by_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, orphan);
        {
            let store = SledStore::open(dir.path()).unwrap();
            kept = store.spool(b"<ClinicalDocument/>").unwrap();
            orphan = store.spool(b"never committed").unwrap();
            let value = serde_json::json!({"key": "doc-1", "spool": kept});
            store
                .put_record("document", "doc-1", value.to_string().as_bytes())
                .unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.read(&kept).unwrap(), b"<ClinicalDocument/>");
        assert!(store.read(&orphan).is_err());
    }

    #[test]
    fn open_waits_for_a_lock_released_in_the_same_process() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledStore::open(dir.path()).unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        // The first handle is still open here: without waiting for the lock
        // this open would fail with WouldBlock.
        let second = SledStore::open(dir.path()).unwrap();
        holder.join().unwrap();
        assert!(second.jobs().unwrap().is_empty());
    }

    #[test]
    fn deferred_records_are_readable_at_once_and_kept_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.put_record_deferred("track", "<m1@x>", b"{}").unwrap();
            assert_eq!(
                store.get_record("track", "<m1@x>").unwrap().as_deref(),
                Some(&b"{}"[..])
            );
            store.enqueue(&job(&store, b"hello")).unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            store.records("track").unwrap(),
            vec![("<m1@x>".to_string(), b"{}".to_vec())]
        );
    }

    #[test]
    fn jobs_and_mailboxes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let store = SledStore::open(dir.path()).unwrap();
            let j = job(&store, b"hello");
            id = j.id.clone();
            store.enqueue(&j).unwrap();
            assert_eq!(
                store
                    .deliver_local("Bob@Y.example", Some("<1@x>"), b"one")
                    .unwrap(),
                LocalDelivery::Stored { uid: 1 }
            );
            assert_eq!(
                store
                    .deliver_local("bob@y.example", Some("<1@x>"), b"one again")
                    .unwrap(),
                LocalDelivery::Duplicate { uid: 1 }
            );
            assert_eq!(
                store.deliver_local("bob@y.example", None, b"two").unwrap(),
                LocalDelivery::Stored { uid: 2 }
            );
        }
        let store = SledStore::open(dir.path()).unwrap();
        let j = store.job(&id).unwrap().unwrap();
        assert_eq!(store.read(&j.spool).unwrap(), b"hello");
        let entries = store.mailbox("bob@y.example").unwrap();
        assert_eq!(
            entries.iter().map(|e| e.uid).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(store.mailbox_message("bob@y.example", 1).unwrap(), b"one");
        store.finish_job(&id).unwrap();
        assert!(store.job(&id).unwrap().is_none());
        assert!(
            store.read(&j.spool).is_err(),
            "the spool file goes with the job"
        );
    }

    #[test]
    fn flags_append_expunge_and_uids_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .deliver_local("bob@y.example", Some("<1@x>"), b"one")
                .unwrap();
            let uid = store
                .append("bob@y.example/Sent", b"sent copy", &["\\Seen".to_string()])
                .unwrap();
            assert_eq!(uid, 1);
            store
                .set_flags("bob@y.example", 1, &["\\Seen".into(), "\\Deleted".into()])
                .unwrap();
            store
                .deliver_local("bob@y.example", Some("<2@x>"), b"two")
                .unwrap();
            store.expunge("bob@y.example", &[1]).unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let inbox = store.mailbox("bob@y.example").unwrap();
        assert_eq!(inbox.iter().map(|e| e.uid).collect::<Vec<_>>(), vec![2]);
        assert_eq!(
            store.uid_next("bob@y.example").unwrap(),
            3,
            "UIDs are never reused"
        );
        assert_eq!(
            store.mailbox("bob@y.example/sent").unwrap()[0].flags,
            vec!["\\Seen".to_string()]
        );
        let mut names = store.mailboxes("bob@y.example").unwrap();
        names.sort();
        assert_eq!(
            names,
            vec![
                "bob@y.example".to_string(),
                "bob@y.example/sent".to_string()
            ]
        );
    }

    #[test]
    fn orphaned_spool_files_are_removed_on_open_and_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let orphan;
        {
            let store = SledStore::open(dir.path()).unwrap();
            orphan = store.spool(b"never committed").unwrap();
            let kept = job(&store, b"kept");
            store.enqueue(&kept).unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert!(store.read(&orphan).is_err());
        assert_eq!(store.jobs().unwrap().len(), 1);
        assert!(matches!(
            store.read("../../etc/passwd"),
            Err(StoreError::NotFound { .. })
        ));
    }

    fn done_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("spool").join("done"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_finished_jobs_file_is_reused_only_after_a_flush_and_holds_the_new_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let big = vec![b'x'; 100_000];
        let first = job(&store, &big);
        store.enqueue(&first).unwrap();
        store.finish_job(&first.id).unwrap();
        assert!(store.job(&first.id).unwrap().is_none());
        assert!(store.read(&first.spool).is_err());
        assert_eq!(done_files(dir.path()), vec![first.spool.clone()]);

        // Not flushed yet: the file still marks the job finished.
        let second = job(&store, b"second");
        assert_eq!(done_files(dir.path()), vec![first.spool.clone()]);
        store.enqueue(&second).unwrap();

        // The enqueue flushed the removal: the next message reuses the file,
        // shorter than what it held before.
        let third = job(&store, b"third message");
        assert!(done_files(dir.path()).is_empty());
        assert_eq!(store.read(&third.spool).unwrap(), b"third message");
        assert_eq!(store.spool_len(&third.spool).unwrap(), 13);
        assert_eq!(store.read(&second.spool).unwrap(), b"second");
    }

    #[tokio::test]
    async fn committed_jobs_survive_reopen_with_their_messages_in_new_and_reused_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut committed = Vec::new();
        {
            let store = Arc::new(SledStore::open(dir.path()).unwrap());
            // A finished job whose removal a flush covered leaves a file
            // to reuse: the first message goes into it, the rest into
            // new files; all commit at once.
            let old = job(&store, &vec![b'o'; 10_000]);
            store.enqueue(&old).unwrap();
            store.finish_job(&old.id).unwrap();
            store.flush().unwrap();
            let mut tasks = Vec::new();
            for n in 0..4 {
                let text = format!("message {n}\r\n").repeat(n + 1).into_bytes();
                let spooled = store.spool_unsynced(&text).unwrap();
                let j = Job {
                    spool: spooled.id.clone(),
                    ..job(&store, b"")
                };
                committed.push((j.clone(), text));
                let store = store.clone();
                tasks.push(tokio::spawn(
                    async move { store.commit_job(spooled, &j).await },
                ));
            }
            assert!(
                done_files(dir.path()).is_empty(),
                "the free file was reused"
            );
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        }
        let store = SledStore::open(dir.path()).unwrap();
        for (j, text) in committed {
            assert_eq!(
                store.job(&j.id).unwrap().map(|k| k.spool),
                Some(j.spool.clone())
            );
            assert_eq!(store.read(&j.spool).unwrap(), text);
        }
    }

    #[test]
    fn a_job_finished_before_a_crash_stays_finished_and_a_lost_one_stays_queued() {
        let dir = tempfile::tempdir().unwrap();
        let (finished, lost, pending);
        {
            let store = SledStore::open(dir.path()).unwrap();
            finished = job(&store, b"delivered");
            lost = job(&store, b"lost");
            pending = job(&store, b"pending");
            for j in [&finished, &lost, &pending] {
                store.enqueue(j).unwrap();
            }
        }
        // What a kill between finish_job's move and the index flush leaves:
        // the job in the index, its file in done/. And a file gone from
        // everywhere (a damaged spool) for the queue to report.
        let spool = dir.path().join("spool");
        fs::rename(
            spool.join(&finished.spool),
            spool.join("done").join(&finished.spool),
        )
        .unwrap();
        fs::remove_file(spool.join(&lost.spool)).unwrap();

        let store = SledStore::open(dir.path()).unwrap();
        let mut ids: Vec<String> = store.jobs().unwrap().into_iter().map(|j| j.id).collect();
        ids.sort();
        let mut expected = vec![lost.id.clone(), pending.id.clone()];
        expected.sort();
        assert_eq!(ids, expected);
        assert!(store.read(&lost.spool).is_err());
        assert_eq!(store.read(&pending.spool).unwrap(), b"pending");
        drop(store);
        // The removal was flushed at open: it survives another restart.
        let store = SledStore::open(dir.path()).unwrap();
        assert!(store.job(&finished.id).unwrap().is_none());
        assert_eq!(store.jobs().unwrap().len(), 2);
    }
}
