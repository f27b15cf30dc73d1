//! POP3 for edge clients: RFC 1939 with CAPA and response codes (RFC 2449),
//! STLS (RFC 2595) and the AUTH response code (RFC 3206).
//!
//! The maildrop is the account's INBOX, snapshotted at login: message
//! numbers 1..n follow the store UIDs in ascending order, and the unique-id
//! of a message is its store UID in decimal, so it stays the same across
//! sessions. DELE only marks; the store is changed at QUIT (UPDATE state).
//! The session is generic over the stream so STLS can swap the TCP stream
//! for a TLS one, as the SMTP server does for STARTTLS.

use super::{mailbox_name, EdgeBackend, EdgeConfig};
use crate::store::{MailboxEntry, StoreError};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// RFC 2449: a command line is at most 255 octets, CRLF included.
const MAX_LINE: usize = 255;
/// Protocol errors tolerated before the session is closed.
const MAX_ERRORS: u32 = 50;
/// Failed PASS commands tolerated before the session is closed.
const MAX_AUTH_FAILURES: u32 = 3;
/// Slows down password guessing; the same for unknown users and bad passwords.
const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(500);

/// Accepts connections forever (spawning a task per connection).
pub async fn listen<B: EdgeBackend>(
    listener: tokio::net::TcpListener,
    config: Arc<EdgeConfig>,
    backend: Arc<B>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(
                    stream,
                    remote,
                    config.clone(),
                    backend.clone(),
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(%error, "POP3 accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs one POP3 session on a TCP connection.
pub async fn serve_connection<B: EdgeBackend>(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    config: Arc<EdgeConfig>,
    backend: Arc<B>,
) {
    let mut plain = stream;
    let mut session = Session::new(remote, &config, &backend, false);
    // No `<...>` in the greeting: that would announce APOP, which is not offered.
    let greeting = format!("+OK {} POP3 server (hispd) ready\r\n", config.hostname);
    if session
        .write(&mut plain, greeting.as_bytes())
        .await
        .is_err()
    {
        return;
    }
    match session.run(&mut plain).await {
        Next::Close => {}
        Next::StartTls => {
            let Some(acceptor) = config.tls.clone() else {
                return;
            };
            let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
                return;
            };
            let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, plain) else {
                return;
            };
            let handshake = tokio::time::timeout(config.timeout, Pin::new(&mut tls).accept()).await;
            if !matches!(handshake, Ok(Ok(()))) {
                tracing::info!(%remote, "POP3 TLS handshake failed");
                return;
            }
            // RFC 2595: nothing learnt before STLS carries over (no pending
            // USER; pipelined bytes after STLS were dropped with the plain reader).
            let mut session = Session::new(remote, &config, &backend, true);
            let _ = session.run(&mut tls).await;
        }
    }
}

enum Next {
    Close,
    StartTls,
}

/// One line read from the client.
enum Input {
    Line(Vec<u8>),
    TooLong,
    /// End of stream, read error or idle timeout.
    Gone {
        timed_out: bool,
    },
}

/// Splits the stream into command lines, refusing over-long ones without
/// losing step: the rest of a long line is read and thrown away.
struct LineReader {
    pending: Vec<u8>,
    discarding: bool,
}

impl LineReader {
    fn new() -> LineReader {
        LineReader {
            pending: Vec::new(),
            discarding: false,
        }
    }

    async fn next<S: AsyncRead + Unpin>(&mut self, stream: &mut S, timeout: Duration) -> Input {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=pos).collect();
                if self.discarding {
                    self.discarding = false;
                    return Input::TooLong;
                }
                if line.len() > MAX_LINE {
                    return Input::TooLong;
                }
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Input::Line(line);
            }
            if self.discarding {
                self.pending.clear();
            } else if self.pending.len() >= MAX_LINE {
                self.pending.clear();
                self.discarding = true;
            }
            match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
                Err(_) => return Input::Gone { timed_out: true },
                Ok(Ok(0)) | Ok(Err(_)) => return Input::Gone { timed_out: false },
                Ok(Ok(n)) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// One message of the snapshot taken at login.
struct Message {
    uid: u64,
    flags: Vec<String>,
    /// Octets as sent (CRLF line ends), known once the message was read.
    size: Option<usize>,
    deleted: bool,
}

/// The TRANSACTION state: the locked, snapshotted maildrop.
struct Maildrop {
    account: String,
    mailbox: String,
    messages: Vec<Message>,
    _lock: MaildropLock,
}

/// RFC 1939 asks for an exclusive-access lock on the maildrop, so two POP3
/// sessions cannot both believe they own the same message numbers. The key
/// names the storage instance as well, so independent stores (tests, several
/// daemons in one process) do not share locks.
struct MaildropLock {
    key: (usize, String),
}

fn locks() -> &'static Mutex<HashSet<(usize, String)>> {
    static LOCKS: OnceLock<Mutex<HashSet<(usize, String)>>> = OnceLock::new();
    LOCKS.get_or_init(|| Mutex::new(HashSet::new()))
}

impl MaildropLock {
    fn acquire<B: EdgeBackend>(backend: &B, mailbox: &str) -> Option<MaildropLock> {
        let storage = backend.storage() as *const dyn crate::store::Storage as *const () as usize;
        let key = (storage, mailbox.to_string());
        let inserted = locks()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        // Built only once the table is unlocked: dropping a lock locks it.
        if inserted {
            Some(MaildropLock { key })
        } else {
            None
        }
    }
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        let mut held = locks().lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.key);
    }
}

/// A store call failed or its task did not finish.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("storage task failed")]
    Task,
}

/// Runs blocking store or password work off the async threads.
async fn blocking<B, T, F>(backend: &Arc<B>, work: F) -> Result<T, BackendError>
where
    B: EdgeBackend,
    T: Send + 'static,
    F: FnOnce(&B) -> T + Send + 'static,
{
    let backend = backend.clone();
    tokio::task::spawn_blocking(move || work(&backend))
        .await
        .map_err(|_| BackendError::Task)
}

struct Session<'a, B: EdgeBackend> {
    remote: SocketAddr,
    config: &'a EdgeConfig,
    backend: &'a Arc<B>,
    tls: bool,
    /// The name given by USER, waiting for PASS.
    user: Option<String>,
    maildrop: Option<Maildrop>,
    errors: u32,
    auth_failures: u32,
}

/// What a command asks the session loop to do after its reply is sent.
enum After {
    Continue,
    Close,
    StartTls,
}

/// A command's reply: the wire bytes and what happens next.
struct Reply {
    bytes: Vec<u8>,
    after: After,
    /// The message to report as fetched once the reply was written.
    fetched: Option<u64>,
    error: bool,
}

impl Reply {
    fn ok(text: impl AsRef<str>) -> Reply {
        Reply {
            bytes: status_line("+OK", text.as_ref()),
            after: After::Continue,
            fetched: None,
            error: false,
        }
    }

    fn err(text: impl AsRef<str>) -> Reply {
        Reply {
            bytes: status_line("-ERR", text.as_ref()),
            after: After::Continue,
            fetched: None,
            error: true,
        }
    }

    /// A positive multi-line reply; `body` is already byte-stuffed with CRLF ends.
    fn multi(text: impl AsRef<str>, body: &[u8]) -> Reply {
        let mut bytes = status_line("+OK", text.as_ref());
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(b".\r\n");
        Reply {
            bytes,
            after: After::Continue,
            fetched: None,
            error: false,
        }
    }

    fn then(mut self, after: After) -> Reply {
        self.after = after;
        self
    }
}

/// A status line with no control characters, within RFC 2449's 512 octets.
fn status_line(status: &str, text: &str) -> Vec<u8> {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect();
    if clean.is_empty() {
        format!("{status}\r\n").into_bytes()
    } else {
        format!("{status} {clean}\r\n").into_bytes()
    }
}

/// Client-supplied text fit to quote in a reply.
fn quote(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(40)
        .map(|b| {
            if b.is_ascii_graphic() {
                *b as char
            } else {
                '?'
            }
        })
        .collect()
}

impl<'a, B: EdgeBackend> Session<'a, B> {
    fn new(
        remote: SocketAddr,
        config: &'a EdgeConfig,
        backend: &'a Arc<B>,
        tls: bool,
    ) -> Session<'a, B> {
        Session {
            remote,
            config,
            backend,
            tls,
            user: None,
            maildrop: None,
            errors: 0,
            auth_failures: 0,
        }
    }

    async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S, bytes: &[u8]) -> Result<(), ()> {
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.config.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S) -> Next {
        let mut reader = LineReader::new();
        loop {
            let reply = match reader.next(stream, self.config.timeout).await {
                Input::Gone { timed_out } => {
                    if timed_out {
                        // RFC 1939 autologout: close without entering UPDATE.
                        tracing::info!(remote = %self.remote, "POP3 session idle, closing");
                        let _ = self
                            .write(stream, b"-ERR idle timeout, closing connection\r\n")
                            .await;
                    }
                    return Next::Close;
                }
                Input::TooLong => Reply::err(format!(
                    "line too long (at most {MAX_LINE} octets with CRLF)"
                )),
                Input::Line(line) => self.command(&line).await,
            };
            if reply.error {
                self.errors += 1;
            }
            if self.write(stream, &reply.bytes).await.is_err() {
                return Next::Close;
            }
            if let (Some(uid), Some(maildrop)) = (reply.fetched, &self.maildrop) {
                // The whole message went out: it reached its final destination.
                self.backend.fetched(&maildrop.mailbox, uid);
            }
            match reply.after {
                After::Continue => {}
                After::Close => return Next::Close,
                After::StartTls => return Next::StartTls,
            }
            if self.errors > MAX_ERRORS {
                let _ = self
                    .write(stream, b"-ERR too many errors, closing connection\r\n")
                    .await;
                return Next::Close;
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Reply {
        let (keyword, argument) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        let keyword = keyword.to_ascii_uppercase();
        let Ok(argument) = std::str::from_utf8(argument) else {
            return Reply::err("arguments must be UTF-8");
        };
        match keyword.as_slice() {
            b"CAPA" => self.capa(),
            b"QUIT" => self.quit().await,
            b"NOOP" if self.maildrop.is_some() => Reply::ok(""),
            b"USER" | b"PASS" | b"STLS" | b"APOP" | b"AUTH" if self.maildrop.is_some() => {
                Reply::err("already authenticated")
            }
            b"USER" => self.user(argument),
            b"PASS" => self.pass(argument).await,
            b"STLS" => self.stls(),
            b"APOP" => Reply::err("APOP is not supported: use USER and PASS"),
            b"AUTH" => Reply::err("SASL is not supported: use USER and PASS"),
            b"STAT" | b"LIST" | b"UIDL" | b"RETR" | b"TOP" | b"DELE" | b"RSET" | b"NOOP"
                if self.maildrop.is_none() =>
            {
                Reply::err("not authenticated: log in with USER and PASS first")
            }
            b"STAT" => self.stat().await,
            b"LIST" => self.list(argument).await,
            b"UIDL" => self.uidl(argument),
            b"RETR" => self.retr(argument).await,
            b"TOP" => self.top(argument).await,
            b"DELE" => self.dele(argument),
            b"RSET" => self.rset(),
            _ if keyword.is_empty() => Reply::err("empty command"),
            _ => Reply::err(format!("unknown command {}", quote(&keyword))),
        }
    }

    /// Whether USER/PASS may be used: always over TLS, and in the clear only
    /// when no TLS is configured at all (loopback and tests).
    fn plaintext_allowed(&self) -> bool {
        self.tls || self.config.tls.is_none()
    }

    fn capa(&self) -> Reply {
        let mut lines = Vec::new();
        if self.maildrop.is_none() {
            if self.plaintext_allowed() {
                lines.push("USER");
            }
            if self.config.tls.is_some() && !self.tls {
                lines.push("STLS");
            }
        }
        lines.extend([
            "TOP",
            "UIDL",
            "PIPELINING",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "EXPIRE NEVER",
            "IMPLEMENTATION hispd",
        ]);
        let mut body = Vec::new();
        for line in lines {
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        Reply::multi("capability list follows", &body)
    }

    fn stls(&self) -> Reply {
        if self.tls {
            Reply::err("TLS is already active")
        } else if self.config.tls.is_none() {
            Reply::err("STLS is not available on this server")
        } else {
            Reply::ok("begin TLS negotiation").then(After::StartTls)
        }
    }

    fn user(&mut self, argument: &str) -> Reply {
        if !self.plaintext_allowed() {
            return Reply::err(
                "[AUTH] plaintext login refused on an unencrypted connection: issue STLS first",
            );
        }
        let name = argument.trim();
        if name.is_empty() {
            return Reply::err("USER needs a name");
        }
        self.user = Some(name.to_string());
        // Same reply for every name: whether the account exists is not told.
        Reply::ok("send PASS")
    }

    async fn pass(&mut self, argument: &str) -> Reply {
        if !self.plaintext_allowed() {
            return Reply::err(
                "[AUTH] plaintext login refused on an unencrypted connection: issue STLS first",
            );
        }
        let Some(user) = self.user.take() else {
            return Reply::err("send USER first");
        };
        // RFC 1939: the password may contain spaces; take the rest of the line.
        let password = argument.to_string();
        let name = user.clone();
        let account = blocking(self.backend, move |b| b.authenticate(&name, &password)).await;
        let account = match account {
            Ok(Some(account)) => account,
            Ok(None) => {
                self.auth_failures += 1;
                tracing::info!(remote = %self.remote, user = %user, "POP3 login failed");
                tokio::time::sleep(AUTH_FAILURE_DELAY).await;
                let reply = Reply::err("[AUTH] invalid user name or password");
                return if self.auth_failures >= MAX_AUTH_FAILURES {
                    Reply::err("[AUTH] invalid user name or password; too many failures, closing")
                        .then(After::Close)
                } else {
                    reply
                };
            }
            Err(error) => {
                tracing::warn!(remote = %self.remote, %error, "POP3 authentication error");
                return Reply::err("[SYS/TEMP] cannot check credentials now, try again later");
            }
        };
        let mailbox = mailbox_name(&account, "INBOX");
        let Some(lock) = MaildropLock::acquire(self.backend.as_ref(), &mailbox) else {
            return Reply::err(format!(
                "[IN-USE] the maildrop of {account} is open in another POP3 session"
            ));
        };
        let name = mailbox.clone();
        let entries = blocking(self.backend, move |b| b.storage().mailbox(&name)).await;
        let mut entries: Vec<MailboxEntry> = match entries.and_then(|r| Ok(r?)) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(remote = %self.remote, %mailbox, %error, "POP3 cannot open maildrop");
                return Reply::err(format!("[SYS/TEMP] cannot open the maildrop: {error}"));
            }
        };
        entries.sort_by_key(|e| e.uid);
        let messages: Vec<Message> = entries
            .into_iter()
            .map(|e| Message {
                uid: e.uid,
                flags: e.flags,
                size: None,
                deleted: false,
            })
            .collect();
        let count = messages.len();
        tracing::info!(remote = %self.remote, %account, messages = count, tls = self.tls, "POP3 login");
        self.maildrop = Some(Maildrop {
            account: account.clone(),
            mailbox,
            messages,
            _lock: lock,
        });
        Reply::ok(format!(
            "{account} logged in, maildrop has {count} message{}",
            if count == 1 { "" } else { "s" }
        ))
    }

    async fn quit(&mut self) -> Reply {
        let Some(maildrop) = self.maildrop.take() else {
            return Reply::ok(format!("{} POP3 server signing off", self.config.hostname))
                .then(After::Close);
        };
        // UPDATE state.
        let deleted: Vec<u64> = maildrop
            .messages
            .iter()
            .filter(|m| m.deleted)
            .map(|m| m.uid)
            .collect();
        let left = maildrop.messages.len() - deleted.len();
        let result = if deleted.is_empty() {
            Ok(())
        } else {
            let name = maildrop.mailbox.clone();
            let uids = deleted.clone();
            blocking(self.backend, move |b| b.storage().expunge(&name, &uids))
                .await
                .and_then(|r| Ok(r?))
        };
        let account = maildrop.account.clone();
        // Unlock before replying, so a client reconnecting at once finds it free.
        drop(maildrop);
        match result {
            Ok(()) => {
                tracing::info!(remote = %self.remote, %account, deleted = deleted.len(), "POP3 logout");
                Reply::ok(format!(
                    "{} POP3 server signing off ({} deleted, {left} left)",
                    self.config.hostname,
                    deleted.len()
                ))
                .then(After::Close)
            }
            Err(error) => {
                tracing::warn!(remote = %self.remote, %account, %error, "POP3 could not remove deleted messages");
                Reply::err(format!(
                    "[SYS/TEMP] some deleted messages were not removed: {error}"
                ))
                .then(After::Close)
            }
        }
    }

    /// The message `argument` names, 1-based, when it exists and is not deleted.
    fn message_number(&self, argument: &str) -> Result<usize, Reply> {
        let Some(maildrop) = &self.maildrop else {
            return Err(Reply::err("not authenticated"));
        };
        let argument = argument.trim();
        if argument.is_empty() || !argument.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Reply::err("a message number is required"));
        }
        let n: usize = match argument.parse() {
            Ok(n) if n >= 1 && n <= maildrop.messages.len() => n,
            _ => {
                return Err(Reply::err(format!(
                    "no such message {}",
                    quote(argument.as_bytes())
                )))
            }
        };
        if maildrop.messages[n - 1].deleted {
            return Err(Reply::err(format!("message {n} is already deleted")));
        }
        Ok(n)
    }

    /// The message as sent: CRLF line ends, ending with CRLF.
    async fn load(&mut self, n: usize) -> Result<Vec<u8>, Reply> {
        let Some(maildrop) = &self.maildrop else {
            return Err(Reply::err("not authenticated"));
        };
        let uid = maildrop.messages[n - 1].uid;
        let name = maildrop.mailbox.clone();
        let data = blocking(self.backend, move |b| {
            b.storage().mailbox_message(&name, uid)
        })
        .await
        .and_then(|r| Ok(r?));
        match data {
            Ok(data) => {
                let wire = crlf(&data);
                if let Some(m) = self
                    .maildrop
                    .as_mut()
                    .and_then(|d| d.messages.get_mut(n - 1))
                {
                    m.size = Some(wire.len());
                }
                Ok(wire)
            }
            Err(BackendError::Store(StoreError::NotFound { .. })) => Err(Reply::err(format!(
                "message {n} was removed by another session"
            ))),
            Err(error) => {
                tracing::warn!(remote = %self.remote, uid, %error, "POP3 cannot read message");
                Err(Reply::err(format!(
                    "[SYS/TEMP] cannot read message {n}: {error}"
                )))
            }
        }
    }

    /// The size of message `n` as sent, reading it the first time.
    async fn size(&mut self, n: usize) -> Result<usize, Reply> {
        let known = self
            .maildrop
            .as_ref()
            .and_then(|d| d.messages.get(n - 1))
            .and_then(|m| m.size);
        match known {
            Some(size) => Ok(size),
            None => self.load(n).await.map(|wire| wire.len()),
        }
    }

    /// Numbers of the messages not marked deleted.
    fn live(&self) -> Vec<usize> {
        self.maildrop
            .as_ref()
            .map(|d| {
                d.messages
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| !m.deleted)
                    .map(|(i, _)| i + 1)
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn stat(&mut self) -> Reply {
        let live = self.live();
        let mut total = 0usize;
        for n in &live {
            match self.size(*n).await {
                Ok(size) => total += size,
                Err(reply) => return reply,
            }
        }
        Reply::ok(format!("{} {total}", live.len()))
    }

    async fn list(&mut self, argument: &str) -> Reply {
        if !argument.trim().is_empty() {
            let n = match self.message_number(argument) {
                Ok(n) => n,
                Err(reply) => return reply,
            };
            return match self.size(n).await {
                Ok(size) => Reply::ok(format!("{n} {size}")),
                Err(reply) => reply,
            };
        }
        let live = self.live();
        let mut body = String::new();
        let mut total = 0usize;
        for n in &live {
            match self.size(*n).await {
                Ok(size) => {
                    total += size;
                    body.push_str(&format!("{n} {size}\r\n"));
                }
                Err(reply) => return reply,
            }
        }
        Reply::multi(
            format!("{} messages ({total} octets)", live.len()),
            body.as_bytes(),
        )
    }

    fn uidl(&self, argument: &str) -> Reply {
        let Some(maildrop) = &self.maildrop else {
            return Reply::err("not authenticated");
        };
        if !argument.trim().is_empty() {
            return match self.message_number(argument) {
                Ok(n) => Reply::ok(format!("{n} {}", maildrop.messages[n - 1].uid)),
                Err(reply) => reply,
            };
        }
        let mut body = String::new();
        for n in self.live() {
            body.push_str(&format!("{n} {}\r\n", maildrop.messages[n - 1].uid));
        }
        Reply::multi("unique-id listing follows", body.as_bytes())
    }

    async fn retr(&mut self, argument: &str) -> Reply {
        let n = match self.message_number(argument) {
            Ok(n) => n,
            Err(reply) => return reply,
        };
        let wire = match self.load(n).await {
            Ok(wire) => wire,
            Err(reply) => return reply,
        };
        let Some(maildrop) = &mut self.maildrop else {
            return Reply::err("not authenticated");
        };
        let message = &mut maildrop.messages[n - 1];
        let uid = message.uid;
        // Mark it read for IMAP clients of the same mailbox; the message is
        // delivered whether or not the flag could be stored.
        if !message
            .flags
            .iter()
            .any(|f| f.eq_ignore_ascii_case("\\Seen"))
        {
            message.flags.push("\\Seen".to_string());
            let flags = message.flags.clone();
            let name = maildrop.mailbox.clone();
            let stored = blocking(self.backend, move |b| {
                b.storage().set_flags(&name, uid, &flags)
            })
            .await
            .and_then(|r| Ok(r?));
            if let Err(error) = stored {
                tracing::warn!(remote = %self.remote, uid, %error, "POP3 cannot set \\Seen");
            }
        }
        let mut reply = Reply::multi(format!("{} octets", wire.len()), &byte_stuff(&wire));
        reply.fetched = Some(uid);
        reply
    }

    async fn top(&mut self, argument: &str) -> Reply {
        let mut args = argument.split(' ').filter(|a| !a.is_empty());
        let (Some(number), Some(lines), None) = (args.next(), args.next(), args.next()) else {
            return Reply::err("TOP needs a message number and a line count");
        };
        let n = match self.message_number(number) {
            Ok(n) => n,
            Err(reply) => return reply,
        };
        let lines: usize = match lines.parse() {
            Ok(l) if lines.bytes().all(|b| b.is_ascii_digit()) => l,
            _ => return Reply::err("the line count must be a non-negative number"),
        };
        let wire = match self.load(n).await {
            Ok(wire) => wire,
            Err(reply) => return reply,
        };
        // A peek: neither \Seen nor reported as fetched.
        Reply::multi("top of message follows", &byte_stuff(&top_of(&wire, lines)))
    }

    fn dele(&mut self, argument: &str) -> Reply {
        let n = match self.message_number(argument) {
            Ok(n) => n,
            Err(reply) => return reply,
        };
        if let Some(m) = self
            .maildrop
            .as_mut()
            .and_then(|d| d.messages.get_mut(n - 1))
        {
            m.deleted = true;
        }
        Reply::ok(format!("message {n} deleted"))
    }

    fn rset(&mut self) -> Reply {
        let Some(maildrop) = &mut self.maildrop else {
            return Reply::err("not authenticated");
        };
        for m in &mut maildrop.messages {
            m.deleted = false;
        }
        Reply::ok(format!("maildrop has {} messages", maildrop.messages.len()))
    }
}

/// Normalises line ends to CRLF and ends the message with CRLF.
fn crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32 + 2);
    let mut previous = 0u8;
    for &b in data {
        if b == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        previous = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// RFC 1939 byte-stuffing: a line starting with "." gets another ".".
/// `wire` has CRLF line ends and ends with CRLF.
fn byte_stuff(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire.len() + 16);
    let mut at_line_start = true;
    for &b in wire {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// The header, the blank line and the first `lines` body lines of `wire`.
fn top_of(wire: &[u8], lines: usize) -> Vec<u8> {
    let mut end = 0;
    let mut in_body = false;
    let mut body_lines = 0;
    for line in wire.split_inclusive(|b| *b == b'\n') {
        if in_body {
            if body_lines == lines {
                break;
            }
            body_lines += 1;
        } else if line == b"\r\n" {
            in_body = true;
        }
        end += line.len();
    }
    wire[..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_become_crlf_once() {
        assert_eq!(crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc\r\n");
        assert_eq!(crlf(b""), b"");
        assert_eq!(crlf(b"x\r\n"), b"x\r\n");
    }

    #[test]
    fn dots_at_line_start_are_stuffed() {
        assert_eq!(byte_stuff(b".a\r\nb.\r\n..\r\n"), b"..a\r\nb.\r\n...\r\n");
    }

    #[test]
    fn top_keeps_headers_and_n_body_lines() {
        let wire = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top_of(wire, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top_of(wire, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top_of(wire, 9), wire);
        assert_eq!(top_of(b"A: 1\r\n", 3), b"A: 1\r\n");
    }
}
