//! Group commit. Sessions that accept a message hand its spool file and its
//! index entries to one thread, which makes them durable for everyone who
//! asked meanwhile: each file is synced, the spool directory once per batch,
//! then the entries are written and the index flushed once per batch. The
//! async workers never wait for the disk themselves (a worker blocked in
//! `fsync` is a worker not serving the other sessions), and concurrent
//! sessions share the directory sync and the index flush.
//!
//! Order is what makes a crash safe: an index entry is written only after
//! the files it refers to are on disk, so no entry, flushed or not, can
//! name a spool file that a power failure could leave incomplete.

use super::StoreError;
use std::fs;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a batch waits for more sessions when the last one had company
/// (a busy server). A session alone is never kept waiting; under load, the
/// wait is small against the syncs it lets several sessions share.
const LINGER: Duration = Duration::from_micros(200);

/// One session's share of a batch.
pub(super) struct Request {
    /// Written but not yet synced, each with its path (for errors).
    pub files: Vec<(PathBuf, fs::File)>,
    /// Index entries to write once the files are durable.
    pub entries: Vec<(sled::Tree, Vec<u8>, Vec<u8>)>,
    pub reply: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// What the commit thread needs of the store: syncing the spool directory
/// (after new names appear in it) and the index flush.
pub(super) trait Durable: Send + 'static {
    fn sync_spool_dir(&self) -> Result<(), StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
}

pub(super) struct Committer {
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    pub fn start(store: impl Durable) -> Result<Committer, StoreError> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("hispd-commit".into())
            .spawn(move || run(&rx, &store))
            .map_err(|error| StoreError::Io {
                path: PathBuf::from("(commit thread)"),
                error,
            })?;
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Makes `files` durable, then writes `entries` and flushes the index.
    pub async fn commit(
        &self,
        files: Vec<(PathBuf, fs::File)>,
        entries: Vec<(sled::Tree, Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|tx| {
                tx.send(Request {
                    files,
                    entries,
                    reply,
                })
            });
        match sent {
            Some(Ok(())) => answer.await.unwrap_or_else(|_| Err(stopped())),
            _ => Err(stopped()),
        }
    }

    /// Finishes the batches already asked for and stops the thread.
    pub fn stop(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stopped() -> StoreError {
    StoreError::Index("the commit thread has stopped".into())
}

/// A copy of `e` for each session of the batch it failed.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Io { path, error } => StoreError::Io {
            path: path.clone(),
            error: std::io::Error::new(error.kind(), error.to_string()),
        },
        other => StoreError::Index(other.to_string()),
    }
}

fn run(rx: &mpsc::Receiver<Request>, store: &impl Durable) {
    let mut busy = false;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        if busy {
            // Under load, sessions close behind this one share its syncs.
            let deadline = Instant::now() + LINGER;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
        }
        busy = batch.len() > 1;
        let results = commit_batch(&batch, store);
        for (request, result) in batch.into_iter().zip(results) {
            // A session that gave up waiting (its connection closed) does
            // not stop the others.
            let _ = request.reply.send(result);
        }
    }
}

fn commit_batch(batch: &[Request], store: &impl Durable) -> Vec<Result<(), StoreError>> {
    let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    for request in batch {
        let synced = request.files.iter().try_for_each(|(path, file)| {
            file.sync_data().map_err(|error| StoreError::Io {
                path: path.clone(),
                error,
            })
        });
        results.push(synced);
    }
    // New names in the spool directory: one sync for the whole batch.
    if batch.iter().any(|r| !r.files.is_empty()) {
        if let Err(e) = store.sync_spool_dir() {
            for (request, result) in batch.iter().zip(results.iter_mut()) {
                if result.is_ok() && !request.files.is_empty() {
                    *result = Err(copy(&e));
                }
            }
        }
    }
    for (request, result) in batch.iter().zip(results.iter_mut()) {
        if result.is_err() {
            continue;
        }
        for (tree, key, value) in &request.entries {
            if let Err(e) = tree.insert(key.as_slice(), value.as_slice()) {
                *result = Err(e.into());
                break;
            }
        }
    }
    if let Err(e) = store.flush() {
        for result in results.iter_mut().filter(|r| r.is_ok()) {
            *result = Err(copy(&e));
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts flushes; fails them when told to.
    #[derive(Clone)]
    struct Counting {
        dir: PathBuf,
        flushes: Arc<AtomicUsize>,
        fail: bool,
    }

    impl Durable for Counting {
        fn sync_spool_dir(&self) -> Result<(), StoreError> {
            fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|error| StoreError::Io {
                    path: self.dir.clone(),
                    error,
                })
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(StoreError::Index("disk full".into()));
            }
            Ok(())
        }
    }

    fn setup(fail: bool) -> (tempfile::TempDir, Counting, sled::Tree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let durable = Counting {
            dir: dir.path().to_path_buf(),
            flushes: Arc::new(AtomicUsize::new(0)),
            fail,
        };
        let db = sled::Config::new().temporary(true).open().expect("db");
        let tree = db.open_tree("jobs").expect("tree");
        (dir, durable, tree)
    }

    fn written(dir: &std::path::Path, name: &str) -> (PathBuf, fs::File) {
        let path = dir.join(name);
        let mut f = fs::File::create(&path).expect("create");
        f.write_all(name.as_bytes()).expect("write");
        (path, f)
    }

    fn request(
        files: Vec<(PathBuf, fs::File)>,
        tree: &sled::Tree,
        key: &str,
    ) -> (
        Request,
        tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
    ) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let entries = vec![(tree.clone(), key.as_bytes().to_vec(), b"v".to_vec())];
        (
            Request {
                files,
                entries,
                reply,
            },
            answer,
        )
    }

    #[test]
    fn sessions_waiting_together_share_one_flush_and_all_get_their_entries() {
        let (dir, durable, tree) = setup(false);
        let (tx, rx) = mpsc::channel();
        let mut answers = Vec::new();
        for n in 0..5 {
            let key = format!("job{n}");
            let (r, a) = request(vec![written(dir.path(), &key)], &tree, &key);
            tx.send(r).expect("send");
            answers.push(a);
        }
        drop(tx);
        run(&rx, &durable);
        assert_eq!(durable.flushes.load(Ordering::SeqCst), 1);
        for (n, mut a) in answers.into_iter().enumerate() {
            assert!(matches!(a.try_recv(), Ok(Ok(()))), "session {n}");
            assert!(tree.get(format!("job{n}")).expect("get").is_some());
        }
    }

    #[test]
    fn a_file_that_cannot_be_synced_fails_its_session_alone_and_writes_no_entry() {
        let (dir, durable, tree) = setup(false);
        // fdatasync on a pipe fails (EINVAL): a file the disk refused.
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let broken = fs::File::from(std::os::fd::OwnedFd::from(reader));
        let (tx, rx) = mpsc::channel();
        let (r1, mut a1) = request(vec![(dir.path().join("broken"), broken)], &tree, "bad");
        let (r2, mut a2) = request(vec![written(dir.path(), "good")], &tree, "good");
        tx.send(r1).expect("send");
        tx.send(r2).expect("send");
        drop(tx);
        run(&rx, &durable);
        match a1.try_recv() {
            Ok(Err(StoreError::Io { path, .. })) => assert!(path.ends_with("broken")),
            other => panic!("expected an I/O error naming the file, got {other:?}"),
        }
        assert!(
            tree.get("bad").expect("get").is_none(),
            "entry written for an unsynced file"
        );
        assert!(matches!(a2.try_recv(), Ok(Ok(()))));
        assert!(tree.get("good").expect("get").is_some());
    }

    #[test]
    fn a_failed_flush_fails_every_session_of_the_batch() {
        let (dir, durable, tree) = setup(true);
        let (tx, rx) = mpsc::channel();
        let (r1, mut a1) = request(vec![written(dir.path(), "a")], &tree, "a");
        let (r2, mut a2) = request(Vec::new(), &tree, "b");
        tx.send(r1).expect("send");
        tx.send(r2).expect("send");
        drop(tx);
        run(&rx, &durable);
        for a in [&mut a1, &mut a2] {
            match a.try_recv() {
                Ok(Err(e)) => assert!(e.to_string().contains("disk full"), "{e}"),
                other => panic!("expected the flush error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn after_stop_a_commit_is_refused_with_a_reason() {
        let (_dir, durable, tree) = setup(false);
        let committer = Committer::start(durable).expect("start");
        committer
            .commit(
                Vec::new(),
                vec![(tree.clone(), b"k".to_vec(), b"v".to_vec())],
            )
            .await
            .expect("commit while running");
        committer.stop();
        let e = committer
            .commit(Vec::new(), Vec::new())
            .await
            .expect_err("commit after stop");
        assert!(e.to_string().contains("commit thread has stopped"), "{e}");
    }
}
