//! IMAP4rev1 (RFC 3501) for edge clients, with IDLE (RFC 2177), LITERAL+,
//! SASL-IR, NAMESPACE, ID, UNSELECT and UIDPLUS (mbsync relies on
//! APPENDUID to find what it uploaded). Sessions are generic over the stream
//! so STARTTLS swaps a TCP stream for a TLS one; commands are read whole
//! (literals included, within limits) and parsed by `parse`.
//!
//! Folders are the account's store mailboxes (`mailbox_name`); a folder
//! comes into existence with its first message, and `INBOX` and `Sent`
//! always exist. UIDVALIDITY is constant: the store never reuses UIDs.

mod message;
mod parse;

use super::{mailbox_name, EdgeBackend, EdgeConfig};
use crate::store::{MailboxEntry, StoreError};
use message::{
    header_end, header_values, push_body_structure, push_envelope, push_literal, push_string,
    section_bytes,
};
use parse::{Command, FetchAtt, SearchKey, Section, SectionText, SequenceSet, StoreMode};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest literal accepted (an APPEND'ed message).
pub const MAX_LITERAL: usize = 50 * 1024 * 1024;
/// The longest command line outside literals.
const MAX_LINE: usize = 64 * 1024;
/// The most command text (outside literals) in one command.
const MAX_COMMAND_TEXT: usize = 256 * 1024;
const MAX_ERRORS: u32 = 20;
const MAX_AUTH_FAILURES: u32 = 3;
const UID_VALIDITY: u32 = 1;
const SYSTEM_FLAGS: [&str; 5] = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"];
/// Write FETCH output in pieces of about this size.
const FLUSH_AT: usize = 256 * 1024;
/// How often an idling session looks for changes nobody announced.
const IDLE_POLL: Duration = Duration::from_secs(20);

/// Accepts connections until the listener fails; one task per session.
pub async fn listen<B: EdgeBackend>(
    listener: tokio::net::TcpListener,
    config: Arc<EdgeConfig>,
    backend: Arc<B>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let config = config.clone();
                let backend = backend.clone();
                tokio::spawn(serve_connection(stream, remote, config, backend));
            }
            Err(e) => {
                tracing::warn!(error = %e, "IMAP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs a whole IMAP session on `stream`, upgrading to TLS on STARTTLS.
pub async fn serve_connection<B: EdgeBackend>(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    config: Arc<EdgeConfig>,
    backend: Arc<B>,
) {
    let mut session = Session {
        config: config.clone(),
        backend,
        remote,
        tls: false,
        account: None,
        selected: None,
        created: Vec::new(),
        errors: 0,
        auth_failures: 0,
    };
    let mut plain = stream;
    let greeting = format!(
        "* OK [CAPABILITY {}] {} IMAP4rev1 hispd ready\r\n",
        session.capabilities(),
        config.hostname
    );
    if plain.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut pending = Vec::new();
    if let Next::StartTls = session.run(&mut plain, &mut pending).await {
        let Some(acceptor) = config.tls.clone() else {
            return;
        };
        let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
            return;
        };
        let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, plain) else {
            return;
        };
        if tokio::time::timeout(config.timeout, Pin::new(&mut tls).accept())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            tracing::info!(%remote, "IMAP TLS handshake failed");
            return;
        }
        session.tls = true;
        // Anything sent before the handshake is discarded (RFC 3501 11.1).
        let mut pending = Vec::new();
        let _ = session.run(&mut tls, &mut pending).await;
    }
}

enum Next {
    Close,
    StartTls,
}

enum ReadError {
    Closed,
    TooLong,
    /// A literal over the limit; the command text so far.
    LiteralTooLarge {
        text: Vec<u8>,
        synchronizing: bool,
    },
}

enum Flow {
    Continue,
    Logout,
    StartTls,
}

/// The selected mailbox and its message sequence (the UID of each number).
struct Selected {
    store: String,
    read_only: bool,
    uids: Vec<u64>,
    /// By UID, how many bytes of the whole message (from its start) partial
    /// `BODY[]<start.len>` fetches have sent so far in this session.
    partly_sent: HashMap<u64, u64>,
}

struct Session<B: EdgeBackend> {
    config: Arc<EdgeConfig>,
    backend: Arc<B>,
    remote: SocketAddr,
    tls: bool,
    account: Option<String>,
    selected: Option<Selected>,
    /// Folders created in this session that hold no message yet.
    created: Vec<String>,
    errors: u32,
    auth_failures: u32,
}

/// A tagged reply.
struct Done {
    status: &'static str,
    text: String,
}

fn ok(text: impl Into<String>) -> Done {
    Done {
        status: "OK",
        text: text.into(),
    }
}
fn no(text: impl Into<String>) -> Done {
    Done {
        status: "NO",
        text: text.into(),
    }
}
fn bad(text: impl Into<String>) -> Done {
    Done {
        status: "BAD",
        text: text.into(),
    }
}

fn storage_failed(e: &StoreError) -> Done {
    tracing::error!(error = %e, "IMAP storage operation failed");
    no("[UNAVAILABLE] the message store failed; try again later")
}

/// Drops control characters from text sent in a response line.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(400)
        .collect()
}

async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<(), ReadError> {
    let mut buf = [0u8; 16 * 1024];
    match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => Err(ReadError::Closed),
        Ok(Ok(n)) => {
            pending.extend_from_slice(&buf[..n]);
            Ok(())
        }
    }
}

/// Takes one line (without its CRLF) from `pending` if it holds one.
fn take_line(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let pos = memchr::memchr(b'\n', pending)?;
    let mut line: Vec<u8> = pending.drain(..=pos).collect();
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Some(line)
}

async fn read_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, ReadError> {
    loop {
        if let Some(line) = take_line(pending) {
            if line.len() > MAX_LINE {
                return Err(ReadError::TooLong);
            }
            return Ok(line);
        }
        if pending.len() > MAX_LINE {
            return Err(ReadError::TooLong);
        }
        read_some(stream, pending, timeout).await?;
    }
}

/// `{n}` or `{n+}` at the end of a line: (n, synchronizing).
fn literal_announcement(line: &[u8]) -> Option<(usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let mut digits = &inner[open + 1..];
    let synchronizing = match digits.strip_suffix(b"+") {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, synchronizing))
}

/// Reads one command with its literals spliced in as `{n}\r\n` + bytes.
async fn read_command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, ReadError> {
    let mut command = Vec::new();
    let mut text = 0usize;
    let mut literals = 0usize;
    loop {
        let line = read_line(stream, pending, timeout).await?;
        text += line.len();
        if text > MAX_COMMAND_TEXT {
            return Err(ReadError::TooLong);
        }
        command.extend_from_slice(&line);
        let Some((n, synchronizing)) = literal_announcement(&line) else {
            return Ok(command);
        };
        literals = literals.saturating_add(n);
        if literals > MAX_LITERAL {
            return Err(ReadError::LiteralTooLarge {
                text: command,
                synchronizing,
            });
        }
        if synchronizing {
            if stream
                .write_all(b"+ Ready for literal data\r\n")
                .await
                .is_err()
            {
                return Err(ReadError::Closed);
            }
            let _ = stream.flush().await;
        }
        command.extend_from_slice(b"\r\n");
        while pending.len() < n {
            read_some(stream, pending, timeout).await?;
        }
        command.extend(pending.drain(..n));
    }
}

fn internal_date(received: i64) -> String {
    chrono::DateTime::from_timestamp(received, 0)
        .unwrap_or_default()
        .format("%d-%b-%Y %H:%M:%S +0000")
        .to_string()
}

fn has_flag(flags: &[String], flag: &str) -> bool {
    flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
}

/// System flags in their canonical spelling; `\Recent` cannot be stored.
fn normalize_flags(flags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in flags {
        let f = SYSTEM_FLAGS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(f))
            .map(|s| s.to_string())
            .unwrap_or_else(|| f.clone());
        if f.eq_ignore_ascii_case("\\Recent") || f == "\\*" || has_flag(&out, &f) {
            continue;
        }
        out.push(f);
    }
    out
}

fn flag_list(flags: &[String]) -> String {
    format!("({})", flags.join(" "))
}

/// A folder name as stored (lower case) shown with its usual spelling.
fn display_folder(name: &str) -> String {
    const KNOWN: [&str; 6] = ["Sent", "Drafts", "Trash", "Junk", "Archive", "Outbox"];
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name))
        .map(|k| k.to_string())
        .unwrap_or_else(|| name.to_string())
}

/// Whether a folder name is one we can store.
fn valid_folder(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && !name.chars().any(|c| c.is_control() || c == '*' || c == '%')
}

/// LIST pattern matching: `*` matches anything, `%` anything but `/`.
fn pattern_matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| pattern_matches(rest, &name[i..])),
        Some((b'%', rest)) => (0..=name.len())
            .take_while(|i| *i == 0 || name[i - 1] != b'/')
            .any(|i| pattern_matches(rest, &name[i..])),
        Some((p, rest)) => name
            .split_first()
            .is_some_and(|(n, nrest)| p.eq_ignore_ascii_case(n) && pattern_matches(rest, nrest)),
    }
}

fn day_of(timestamp: i64) -> i64 {
    timestamp - timestamp.rem_euclid(86_400)
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// One message as SEARCH sees it.
struct Candidate<'a> {
    seq: u64,
    uid: u64,
    entry: &'a MailboxEntry,
    raw: Option<&'a [u8]>,
    parsed: Option<&'a mail_parser::Message<'a>>,
}

fn key_needs_message(key: &SearchKey) -> bool {
    match key {
        SearchKey::Header(..)
        | SearchKey::Body(_)
        | SearchKey::Text(_)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_) => true,
        SearchKey::Not(k) => key_needs_message(k),
        SearchKey::Or(a, b) => key_needs_message(a) || key_needs_message(b),
        SearchKey::And(keys) => keys.iter().any(key_needs_message),
        _ => false,
    }
}

fn decoded_header_texts(message: &mail_parser::Message<'_>, name: &str) -> Vec<String> {
    let Some(root) = message.parts.first() else {
        return Vec::new();
    };
    root.headers
        .iter()
        .filter(|h| h.name.as_str().eq_ignore_ascii_case(name))
        .map(|h| match &h.value {
            mail_parser::HeaderValue::Text(t) => t.to_string(),
            mail_parser::HeaderValue::TextList(l) => l.join(" "),
            mail_parser::HeaderValue::Address(a) => a
                .iter()
                .map(|x| format!("{} <{}>", x.name().unwrap_or(""), x.address().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        })
        .collect()
}

fn header_matches(c: &Candidate<'_>, name: &str, value: &str) -> bool {
    let Some(raw) = c.raw else {
        return false;
    };
    let header = &raw[..header_end(raw)];
    let raws = header_values(header, name);
    if raws.is_empty() {
        return false;
    }
    if value.is_empty() || raws.iter().any(|v| contains_ci(v, value)) {
        return true;
    }
    c.parsed.is_some_and(|m| {
        decoded_header_texts(m, name)
            .iter()
            .any(|v| contains_ci(v, value))
    })
}

fn body_matches(c: &Candidate<'_>, value: &str) -> bool {
    let Some(raw) = c.raw else {
        return false;
    };
    if contains_ci(&String::from_utf8_lossy(&raw[header_end(raw)..]), value) {
        return true;
    }
    c.parsed.is_some_and(|m| {
        m.text_bodies()
            .chain(m.html_bodies())
            .filter_map(|p| p.text_contents())
            .any(|t| contains_ci(t, value))
    })
}

fn sent_day(c: &Candidate<'_>) -> Option<i64> {
    let d = c.parsed?.date()?;
    let date = chrono::NaiveDate::from_ymd_opt(d.year.into(), d.month.into(), d.day.into())?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

fn search_matches(key: &SearchKey, c: &Candidate<'_>, max_seq: u64, max_uid: u64) -> bool {
    let flags = &c.entry.flags;
    match key {
        SearchKey::All => true,
        SearchKey::Flag(f, set) => has_flag(flags, f) == *set,
        SearchKey::New | SearchKey::Recent => false,
        SearchKey::Old => true,
        SearchKey::Header(name, value) => {
            let name = match name.as_str() {
                "BCC" => "Bcc",
                "CC" => "Cc",
                "FROM" => "From",
                "TO" => "To",
                "SUBJECT" => "Subject",
                other => other,
            };
            header_matches(c, name, value)
        }
        SearchKey::Body(v) => body_matches(c, v),
        SearchKey::Text(v) => {
            body_matches(c, v)
                || c.raw.is_some_and(|raw| {
                    contains_ci(&String::from_utf8_lossy(&raw[..header_end(raw)]), v)
                })
        }
        SearchKey::Before(d) => day_of(c.entry.received) < *d,
        SearchKey::On(d) => day_of(c.entry.received) == *d,
        SearchKey::Since(d) => day_of(c.entry.received) >= *d,
        SearchKey::SentBefore(d) => sent_day(c).is_some_and(|s| s < *d),
        SearchKey::SentOn(d) => sent_day(c).is_some_and(|s| s == *d),
        SearchKey::SentSince(d) => sent_day(c).is_some_and(|s| s >= *d),
        SearchKey::Larger(n) => c.entry.size as u64 > *n,
        SearchKey::Smaller(n) => (c.entry.size as u64) < *n,
        SearchKey::Uid(set) => set.contains(c.uid, max_uid),
        SearchKey::Seq(set) => set.contains(c.seq, max_seq),
        SearchKey::Not(k) => !search_matches(k, c, max_seq, max_uid),
        SearchKey::Or(a, b) => {
            search_matches(a, c, max_seq, max_uid) || search_matches(b, c, max_seq, max_uid)
        }
        SearchKey::And(keys) => keys.iter().all(|k| search_matches(k, c, max_seq, max_uid)),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = stream.write_all(out).await.is_ok() && stream.flush().await.is_ok();
    out.clear();
    ok
}

impl<B: EdgeBackend> Session<B> {
    fn tls_required(&self) -> bool {
        self.config.tls.is_some() && !self.tls
    }

    fn capabilities(&self) -> String {
        let mut caps = vec![
            "IMAP4rev1",
            "LITERAL+",
            "IDLE",
            "NAMESPACE",
            "ID",
            "UNSELECT",
            "UIDPLUS",
        ];
        if self.account.is_none() {
            if self.tls_required() {
                caps.extend(["STARTTLS", "LOGINDISABLED"]);
            } else {
                caps.extend(["AUTH=PLAIN", "SASL-IR"]);
            }
        }
        caps.join(" ")
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        pending: &mut Vec<u8>,
    ) -> Next {
        let timeout = self.config.timeout;
        loop {
            let command = match read_command(stream, pending, timeout).await {
                Ok(c) => c,
                Err(ReadError::Closed) => {
                    let _ = stream
                        .write_all(b"* BYE idle for too long or connection lost\r\n")
                        .await;
                    return Next::Close;
                }
                Err(ReadError::TooLong) => {
                    let _ = stream.write_all(b"* BYE command line too long\r\n").await;
                    return Next::Close;
                }
                Err(ReadError::LiteralTooLarge {
                    text,
                    synchronizing,
                }) => {
                    let tag = parse::split_tag(&text).map_or_else(|| "*".to_string(), |t| t.0);
                    let reply = format!(
                        "{tag} NO [TOOBIG] literal larger than {MAX_LITERAL} octets refused\r\n"
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() || !synchronizing {
                        // The client is already sending the literal.
                        let _ = stream.write_all(b"* BYE literal too large\r\n").await;
                        return Next::Close;
                    }
                    continue;
                }
            };
            let Some((tag, rest)) = parse::split_tag(&command) else {
                self.errors += 1;
                if stream
                    .write_all(b"* BAD missing or invalid tag\r\n")
                    .await
                    .is_err()
                {
                    return Next::Close;
                }
                if self.errors > MAX_ERRORS {
                    let _ = stream.write_all(b"* BYE too many errors\r\n").await;
                    return Next::Close;
                }
                continue;
            };
            let mut out = Vec::new();
            let (done, flow) = match parse::parse_command(rest) {
                Ok(cmd) => self.execute(stream, pending, cmd, &mut out).await,
                Err(e) => (bad(format!("syntax error: {e}")), Flow::Continue),
            };
            if done.status == "BAD" {
                self.errors += 1;
            }
            out.extend_from_slice(
                format!("{tag} {} {}\r\n", done.status, clean(&done.text)).as_bytes(),
            );
            if matches!(flow, Flow::Logout) {
                let mut bye = b"* BYE logging out\r\n".to_vec();
                bye.append(&mut out);
                let _ = send(stream, &mut bye).await;
                return Next::Close;
            }
            if self.errors > MAX_ERRORS || self.auth_failures >= MAX_AUTH_FAILURES {
                out.extend_from_slice(b"* BYE too many errors\r\n");
                let _ = send(stream, &mut out).await;
                return Next::Close;
            }
            if !send(stream, &mut out).await {
                return Next::Close;
            }
            if matches!(flow, Flow::StartTls) {
                pending.clear();
                return Next::StartTls;
            }
        }
    }

    async fn execute<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        cmd: Command,
        out: &mut Vec<u8>,
    ) -> (Done, Flow) {
        use Command as C;
        let authenticated = self.account.is_some();
        let selected = self.selected.is_some();
        match &cmd {
            C::Capability | C::Noop | C::Logout | C::Id => {}
            C::StartTls | C::Login(..) | C::Authenticate(..) => {
                if authenticated {
                    return (bad("already authenticated"), Flow::Continue);
                }
            }
            C::Check
            | C::Close
            | C::Unselect
            | C::Expunge
            | C::Search { .. }
            | C::Fetch { .. }
            | C::Store { .. }
            | C::Copy { .. }
            | C::UidExpunge(_) => {
                if !authenticated {
                    return (bad("log in first"), Flow::Continue);
                }
                if !selected {
                    return (bad("no mailbox selected; SELECT one first"), Flow::Continue);
                }
            }
            _ => {
                if !authenticated {
                    return (bad("log in first"), Flow::Continue);
                }
            }
        }
        // Expunges may not be announced during FETCH, STORE and SEARCH.
        let may_expunge = !matches!(cmd, C::Fetch { .. } | C::Store { .. } | C::Search { .. });
        let mut flow = Flow::Continue;
        let done = match cmd {
            C::Capability => {
                out.extend_from_slice(
                    format!("* CAPABILITY {}\r\n", self.capabilities()).as_bytes(),
                );
                ok("CAPABILITY completed")
            }
            C::Noop => ok("NOOP completed"),
            C::Check => ok("CHECK completed"),
            C::Logout => {
                flow = Flow::Logout;
                ok("LOGOUT completed")
            }
            C::Id => {
                out.extend_from_slice(b"* ID (\"name\" \"hispd\")\r\n");
                ok("ID completed")
            }
            C::Namespace => {
                out.extend_from_slice(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
                ok("NAMESPACE completed")
            }
            C::StartTls => {
                if self.config.tls.is_none() {
                    bad("STARTTLS is not offered here")
                } else if self.tls {
                    bad("TLS is already active")
                } else {
                    flow = Flow::StartTls;
                    ok("Begin TLS negotiation now")
                }
            }
            C::Login(user, password) => {
                if self.tls_required() {
                    no("[PRIVACYREQUIRED] LOGIN is disabled before STARTTLS")
                } else {
                    self.login(user, password).await
                }
            }
            C::Authenticate(mech, initial) => {
                self.authenticate(stream, pending, mech, initial).await
            }
            C::Select(name) => self.select(&name, false, out),
            C::Examine(name) => self.select(&name, true, out),
            C::Create(name) => self.create(&name),
            C::Delete(name) => self.delete(&name),
            C::Rename(..) => no("[CANNOT] renaming folders is not supported"),
            C::Subscribe(_) | C::Unsubscribe(_) => ok("done; every folder is subscribed"),
            C::List(reference, pattern) => self.list(&reference, &pattern, false, out),
            C::Lsub(reference, pattern) => self.list(&reference, &pattern, true, out),
            C::Status(name, items) => self.status(&name, &items, out),
            C::Append {
                mailbox,
                flags,
                message,
            } => self.append(&mailbox, &flags, &message),
            C::Close => {
                if let Some(sel) = self.selected.take() {
                    if !sel.read_only {
                        if let Err(e) = self.expunge_deleted(&sel, None) {
                            return (storage_failed(&e), flow);
                        }
                    }
                }
                ok("CLOSE completed")
            }
            C::Unselect => {
                self.selected = None;
                ok("UNSELECT completed")
            }
            C::Expunge => self.expunge(None, out),
            C::UidExpunge(set) => self.expunge(Some(&set), out),
            C::Search { uid, key } => self.search(uid, &key, out),
            C::Fetch { uid, set, atts } => self.fetch(stream, uid, &set, &atts, out).await,
            C::Store {
                uid,
                set,
                mode,
                silent,
                flags,
            } => self.store(uid, &set, mode, silent, &flags, out),
            C::Copy { uid, set, mailbox } => self.copy(uid, &set, &mailbox),
            C::Idle => match self.idle(stream, pending, out).await {
                Some(done) => done,
                None => return (bad("connection lost"), Flow::Logout),
            },
        };
        if self.selected.is_some() {
            if let Err(e) = self.refresh(out, may_expunge) {
                tracing::warn!(error = %e, "IMAP mailbox refresh failed");
            }
        }
        (done, flow)
    }

    async fn check_credentials(&mut self, user: String, password: String) -> Done {
        let backend = self.backend.clone();
        let account = tokio::task::spawn_blocking(move || backend.authenticate(&user, &password))
            .await
            .ok()
            .flatten();
        match account {
            Some(account) => {
                tracing::info!(remote = %self.remote, %account, "IMAP login");
                self.account = Some(account.to_ascii_lowercase());
                ok(format!("[CAPABILITY {}] logged in", self.capabilities()))
            }
            None => {
                self.auth_failures += 1;
                tracing::info!(remote = %self.remote, "IMAP authentication failed");
                tokio::time::sleep(Duration::from_millis(300)).await;
                no("[AUTHENTICATIONFAILED] wrong user name or password")
            }
        }
    }

    async fn login(&mut self, user: String, password: String) -> Done {
        self.check_credentials(user, password).await
    }

    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        mech: String,
        initial: Option<String>,
    ) -> Done {
        use base64::Engine;
        if !mech.eq_ignore_ascii_case("PLAIN") {
            return no(format!("mechanism {mech} is not supported; use PLAIN"));
        }
        if self.tls_required() {
            return no("[PRIVACYREQUIRED] authentication is disabled before STARTTLS");
        }
        let response = match initial {
            Some(r) => r,
            None => {
                if stream.write_all(b"+ \r\n").await.is_err() || stream.flush().await.is_err() {
                    return bad("connection lost");
                }
                match read_line(stream, pending, self.config.timeout).await {
                    Ok(line) => String::from_utf8_lossy(&line).trim().to_string(),
                    Err(_) => return bad("no authentication response"),
                }
            }
        };
        if response == "*" {
            return bad("authentication cancelled");
        }
        let decoded = if response == "=" {
            Vec::new()
        } else {
            match base64::engine::general_purpose::STANDARD.decode(response.as_bytes()) {
                Ok(d) => d,
                Err(_) => return bad("authentication response is not base64"),
            }
        };
        let parts: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
        let [authzid, authcid, password] = parts.as_slice() else {
            return bad("PLAIN response must be authzid NUL authcid NUL password");
        };
        let (Ok(authzid), Ok(user), Ok(password)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(authcid),
            std::str::from_utf8(password),
        ) else {
            return bad("PLAIN response is not UTF-8");
        };
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(user) {
            self.auth_failures += 1;
            return no("[AUTHORIZATIONFAILED] acting for another user is not allowed");
        }
        self.check_credentials(user.to_string(), password.to_string())
            .await
    }

    fn account(&self) -> &str {
        self.account.as_deref().unwrap_or("")
    }

    /// The store name of a folder the client named, if it is valid.
    fn store_name(&self, folder: &str) -> Option<String> {
        if folder.eq_ignore_ascii_case("INBOX") {
            return Some(mailbox_name(self.account(), "INBOX"));
        }
        valid_folder(folder).then(|| mailbox_name(self.account(), &folder.to_ascii_lowercase()))
    }

    /// Every folder of the account, as shown to the client.
    fn folders(&self) -> Result<Vec<String>, StoreError> {
        let account = self.account().to_string();
        let mut names = vec!["INBOX".to_string(), "Sent".to_string()];
        let prefix = format!("{account}/");
        for name in self.backend.storage().mailboxes(&account)? {
            let name = name.to_ascii_lowercase();
            if let Some(folder) = name.strip_prefix(&prefix) {
                names.push(display_folder(folder));
            }
        }
        names.extend(self.created.iter().cloned());
        let mut seen = HashSet::new();
        names.retain(|n| seen.insert(n.to_ascii_lowercase()));
        Ok(names)
    }

    fn folder_exists(&self, folder: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .folders()?
            .into_iter()
            .find(|f| f.eq_ignore_ascii_case(folder)))
    }

    fn select(&mut self, name: &str, read_only: bool, out: &mut Vec<u8>) -> Done {
        self.selected = None;
        let Some(store) = self.store_name(name) else {
            return no(format!("invalid mailbox name {name}"));
        };
        match self.folder_exists(name) {
            Ok(Some(_)) => {}
            Ok(None) => return no(format!("[NONEXISTENT] no mailbox called {name}")),
            Err(e) => return storage_failed(&e),
        }
        let storage = self.backend.storage();
        let (entries, uid_next) = match (storage.mailbox(&store), storage.uid_next(&store)) {
            (Ok(e), Ok(u)) => (e, u),
            (Err(e), _) | (_, Err(e)) => return storage_failed(&e),
        };
        let mut uids: Vec<u64> = entries.iter().map(|e| e.uid).collect();
        uids.sort_unstable();
        let flags = SYSTEM_FLAGS.join(" ");
        out.extend_from_slice(format!("* FLAGS ({flags})\r\n").as_bytes());
        if read_only {
            out.extend_from_slice(b"* OK [PERMANENTFLAGS ()] read-only\r\n");
        } else {
            out.extend_from_slice(
                format!("* OK [PERMANENTFLAGS ({flags} \\*)] flags are kept\r\n").as_bytes(),
            );
        }
        out.extend_from_slice(format!("* {} EXISTS\r\n* 0 RECENT\r\n", uids.len()).as_bytes());
        let by_uid: HashMap<u64, &MailboxEntry> = entries.iter().map(|e| (e.uid, e)).collect();
        if let Some(first) = uids
            .iter()
            .position(|u| by_uid.get(u).is_some_and(|e| !has_flag(&e.flags, "\\Seen")))
        {
            out.extend_from_slice(
                format!("* OK [UNSEEN {}] first unseen\r\n", first + 1).as_bytes(),
            );
        }
        out.extend_from_slice(
            format!(
                "* OK [UIDVALIDITY {UID_VALIDITY}] UIDs valid\r\n* OK [UIDNEXT {uid_next}] predicted next UID\r\n"
            )
            .as_bytes(),
        );
        self.selected = Some(Selected {
            store,
            read_only,
            uids,
            partly_sent: HashMap::new(),
        });
        if read_only {
            ok("[READ-ONLY] EXAMINE completed")
        } else {
            ok("[READ-WRITE] SELECT completed")
        }
    }

    fn create(&mut self, name: &str) -> Done {
        let name = name.trim_end_matches('/');
        if name.eq_ignore_ascii_case("INBOX") {
            return no("[ALREADYEXISTS] INBOX always exists");
        }
        if !valid_folder(name) {
            return no(format!("invalid mailbox name {name}"));
        }
        match self.folder_exists(name) {
            Ok(Some(_)) => no(format!("[ALREADYEXISTS] {name} already exists")),
            Ok(None) => {
                self.created.push(name.to_string());
                ok("CREATE completed")
            }
            Err(e) => storage_failed(&e),
        }
    }

    fn delete(&mut self, name: &str) -> Done {
        if name.eq_ignore_ascii_case("INBOX") {
            return no("INBOX cannot be deleted");
        }
        let Some(store) = self.store_name(name) else {
            return no(format!("invalid mailbox name {name}"));
        };
        match self.folder_exists(name) {
            Ok(Some(_)) => {}
            Ok(None) => return no(format!("[NONEXISTENT] no mailbox called {name}")),
            Err(e) => return storage_failed(&e),
        }
        if self.selected.as_ref().is_some_and(|s| s.store == store) {
            self.selected = None;
        }
        let storage = self.backend.storage();
        let result = storage.mailbox(&store).and_then(|entries| {
            let uids: Vec<u64> = entries.iter().map(|e| e.uid).collect();
            storage.expunge(&store, &uids)
        });
        if let Err(e) = result {
            return storage_failed(&e);
        }
        self.created.retain(|c| !c.eq_ignore_ascii_case(name));
        ok("DELETE completed")
    }

    fn list(&self, reference: &str, pattern: &str, lsub: bool, out: &mut Vec<u8>) -> Done {
        let verb = if lsub { "LSUB" } else { "LIST" };
        if pattern.is_empty() && !lsub {
            out.extend_from_slice(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
            return ok("LIST completed");
        }
        let full = format!("{reference}{pattern}");
        let folders = match self.folders() {
            Ok(f) => f,
            Err(e) => return storage_failed(&e),
        };
        for folder in &folders {
            if !pattern_matches(full.as_bytes(), folder.as_bytes()) {
                continue;
            }
            let mut attrs = Vec::new();
            let child_prefix = format!("{}/", folder.to_ascii_lowercase());
            if folders
                .iter()
                .any(|f| f.to_ascii_lowercase().starts_with(&child_prefix))
            {
                attrs.push("\\HasChildren");
            } else {
                attrs.push("\\HasNoChildren");
            }
            if !lsub && folder == "Sent" {
                attrs.push("\\Sent");
            }
            let mut line = format!("* {verb} ({}) \"/\" ", attrs.join(" ")).into_bytes();
            push_string(&mut line, folder.as_bytes());
            line.extend_from_slice(b"\r\n");
            out.extend_from_slice(&line);
        }
        ok(format!("{verb} completed"))
    }

    fn status(&self, name: &str, items: &[String], out: &mut Vec<u8>) -> Done {
        let Some(store) = self.store_name(name) else {
            return no(format!("invalid mailbox name {name}"));
        };
        let folder = match self.folder_exists(name) {
            Ok(Some(f)) => f,
            Ok(None) => return no(format!("[NONEXISTENT] no mailbox called {name}")),
            Err(e) => return storage_failed(&e),
        };
        let storage = self.backend.storage();
        let (entries, uid_next) = match (storage.mailbox(&store), storage.uid_next(&store)) {
            (Ok(e), Ok(u)) => (e, u),
            (Err(e), _) | (_, Err(e)) => return storage_failed(&e),
        };
        let mut values = Vec::new();
        for item in items {
            let value = match item.as_str() {
                "MESSAGES" => entries.len() as u64,
                "RECENT" => 0,
                "UIDNEXT" => uid_next,
                "UIDVALIDITY" => u64::from(UID_VALIDITY),
                "UNSEEN" => entries
                    .iter()
                    .filter(|e| !has_flag(&e.flags, "\\Seen"))
                    .count() as u64,
                other => return bad(format!("unknown STATUS item {other}")),
            };
            values.push(format!("{item} {value}"));
        }
        let mut line = b"* STATUS ".to_vec();
        push_string(&mut line, folder.as_bytes());
        line.extend_from_slice(format!(" ({})\r\n", values.join(" ")).as_bytes());
        out.extend_from_slice(&line);
        ok("STATUS completed")
    }

    fn append(&mut self, name: &str, flags: &[String], message: &[u8]) -> Done {
        let Some(store) = self.store_name(name) else {
            return no(format!("[TRYCREATE] invalid mailbox name {name}"));
        };
        if message.is_empty() {
            return no("refusing to store an empty message");
        }
        let flags = normalize_flags(flags);
        match self.backend.storage().append(&store, message, &flags) {
            Ok(uid) => {
                tracing::debug!(mailbox = %store, uid, "IMAP APPEND");
                self.created.retain(|c| !c.eq_ignore_ascii_case(name));
                ok(format!("[APPENDUID {UID_VALIDITY} {uid}] APPEND completed"))
            }
            Err(e) => storage_failed(&e),
        }
    }

    /// Reports messages that arrived (EXISTS) and, when allowed, those
    /// removed by other sessions (EXPUNGE, highest number first).
    fn refresh(&mut self, out: &mut Vec<u8>, expunges: bool) -> Result<(), StoreError> {
        let Some(sel) = self.selected.as_mut() else {
            return Ok(());
        };
        let entries = self.backend.storage().mailbox(&sel.store)?;
        let current: HashSet<u64> = entries.iter().map(|e| e.uid).collect();
        if expunges {
            for i in (0..sel.uids.len()).rev() {
                if !current.contains(&sel.uids[i]) {
                    out.extend_from_slice(format!("* {} EXPUNGE\r\n", i + 1).as_bytes());
                    sel.uids.remove(i);
                }
            }
        }
        let max = sel.uids.last().copied().unwrap_or(0);
        let mut new: Vec<u64> = current.into_iter().filter(|u| *u > max).collect();
        if !new.is_empty() {
            new.sort_unstable();
            sel.uids.extend(new);
            out.extend_from_slice(format!("* {} EXISTS\r\n", sel.uids.len()).as_bytes());
        }
        Ok(())
    }

    /// Removes messages flagged \Deleted (restricted to `only` UIDs).
    fn expunge_deleted(
        &self,
        sel: &Selected,
        only: Option<&SequenceSet>,
    ) -> Result<(), StoreError> {
        let storage = self.backend.storage();
        let max_uid = sel.uids.last().copied().unwrap_or(0);
        let known: HashSet<u64> = sel.uids.iter().copied().collect();
        let doomed: Vec<u64> = storage
            .mailbox(&sel.store)?
            .into_iter()
            .filter(|e| known.contains(&e.uid) && has_flag(&e.flags, "\\Deleted"))
            .filter(|e| only.is_none_or(|set| set.contains(e.uid, max_uid)))
            .map(|e| e.uid)
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        storage.expunge(&sel.store, &doomed)
    }

    fn expunge(&mut self, only: Option<&SequenceSet>, out: &mut Vec<u8>) -> Done {
        let Some(sel) = self.selected.as_ref() else {
            return bad("no mailbox selected");
        };
        if sel.read_only {
            return no("[READ-ONLY] the mailbox is open read-only");
        }
        if let Err(e) = self.expunge_deleted(sel, only) {
            return storage_failed(&e);
        }
        if let Err(e) = self.refresh(out, true) {
            return storage_failed(&e);
        }
        ok("EXPUNGE completed")
    }

    /// The (sequence number, UID) pairs a set names, in order.
    fn targets(&self, uid: bool, set: &SequenceSet) -> Vec<(u64, u64)> {
        let Some(sel) = self.selected.as_ref() else {
            return Vec::new();
        };
        let count = sel.uids.len() as u64;
        let max_uid = sel.uids.last().copied().unwrap_or(0);
        sel.uids
            .iter()
            .enumerate()
            .map(|(i, u)| (i as u64 + 1, *u))
            .filter(|(seq, u)| {
                if uid {
                    set.contains(*u, max_uid)
                } else {
                    set.contains(*seq, count)
                }
            })
            .collect()
    }

    fn entries(&self) -> Result<HashMap<u64, MailboxEntry>, StoreError> {
        let Some(sel) = self.selected.as_ref() else {
            return Ok(HashMap::new());
        };
        Ok(self
            .backend
            .storage()
            .mailbox(&sel.store)?
            .into_iter()
            .map(|e| (e.uid, e))
            .collect())
    }

    fn search(&self, uid: bool, key: &SearchKey, out: &mut Vec<u8>) -> Done {
        let Some(sel) = self.selected.as_ref() else {
            return bad("no mailbox selected");
        };
        let entries = match self.entries() {
            Ok(e) => e,
            Err(e) => return storage_failed(&e),
        };
        let needs_message = key_needs_message(key);
        let max_seq = sel.uids.len() as u64;
        let max_uid = sel.uids.last().copied().unwrap_or(0);
        let mut hits = Vec::new();
        for (i, u) in sel.uids.iter().enumerate() {
            let Some(entry) = entries.get(u) else {
                continue;
            };
            let raw = if needs_message {
                match self.backend.storage().mailbox_message(&sel.store, *u) {
                    Ok(r) => Some(r),
                    Err(_) => continue,
                }
            } else {
                None
            };
            let parsed = raw
                .as_deref()
                .and_then(|r| mail_parser::MessageParser::default().parse(r));
            let candidate = Candidate {
                seq: i as u64 + 1,
                uid: *u,
                entry,
                raw: raw.as_deref(),
                parsed: parsed.as_ref(),
            };
            if search_matches(key, &candidate, max_seq, max_uid) {
                hits.push(if uid { *u } else { i as u64 + 1 });
            }
        }
        let mut line = String::from("* SEARCH");
        for h in hits {
            line.push_str(&format!(" {h}"));
        }
        line.push_str("\r\n");
        out.extend_from_slice(line.as_bytes());
        ok("SEARCH completed")
    }

    async fn fetch<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        uid: bool,
        set: &SequenceSet,
        atts: &[FetchAtt],
        out: &mut Vec<u8>,
    ) -> Done {
        let Some((mailbox, read_only)) = self
            .selected
            .as_ref()
            .map(|sel| (sel.store.clone(), sel.read_only))
        else {
            return bad("no mailbox selected");
        };
        let storage = self.backend.storage();
        let mut entries = match self.entries() {
            Ok(e) => e,
            Err(e) => return storage_failed(&e),
        };
        let mut atts = atts.to_vec();
        if uid && !atts.contains(&FetchAtt::Uid) {
            atts.insert(0, FetchAtt::Uid);
        }
        let needs_message = atts.iter().any(|a| {
            !matches!(
                a,
                FetchAtt::Flags | FetchAtt::Uid | FetchAtt::InternalDate | FetchAtt::Rfc822Size
            )
        });
        let sets_seen = atts.iter().any(|a| {
            matches!(
                a,
                FetchAtt::Rfc822 | FetchAtt::Rfc822Text | FetchAtt::Section { peek: false, .. }
            )
        });
        let mut failed = false;
        for (seq, u) in self.targets(uid, set) {
            let Some(entry) = entries.get_mut(&u) else {
                continue;
            };
            let raw = if needs_message {
                match storage.mailbox_message(&mailbox, u) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, mailbox = %mailbox, uid = u, "IMAP FETCH could not read a message");
                        failed = true;
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            let mut flags_changed = false;
            if sets_seen && !read_only && !has_flag(&entry.flags, "\\Seen") {
                let mut flags = entry.flags.clone();
                flags.push("\\Seen".into());
                if let Err(e) = storage.set_flags(&mailbox, u, &flags) {
                    return storage_failed(&e);
                }
                entry.flags = flags;
                flags_changed = true;
            }
            let mut items: Vec<Vec<u8>> = Vec::new();
            for att in &atts {
                let mut item = Vec::new();
                match att {
                    FetchAtt::Flags => item
                        .extend_from_slice(format!("FLAGS {}", flag_list(&entry.flags)).as_bytes()),
                    FetchAtt::Uid => item.extend_from_slice(format!("UID {u}").as_bytes()),
                    FetchAtt::InternalDate => item.extend_from_slice(
                        format!("INTERNALDATE \"{}\"", internal_date(entry.received)).as_bytes(),
                    ),
                    FetchAtt::Rfc822Size => {
                        let size = if needs_message { raw.len() } else { entry.size };
                        item.extend_from_slice(format!("RFC822.SIZE {size}").as_bytes())
                    }
                    FetchAtt::Rfc822 => {
                        item.extend_from_slice(b"RFC822 ");
                        push_literal(&mut item, &raw);
                    }
                    FetchAtt::Rfc822Header => {
                        item.extend_from_slice(b"RFC822.HEADER ");
                        push_literal(&mut item, &raw[..header_end(&raw)]);
                    }
                    FetchAtt::Rfc822Text => {
                        item.extend_from_slice(b"RFC822.TEXT ");
                        push_literal(&mut item, &raw[header_end(&raw)..]);
                    }
                    FetchAtt::Envelope => {
                        item.extend_from_slice(b"ENVELOPE ");
                        push_envelope(&mut item, &raw);
                    }
                    FetchAtt::BodyStructure => {
                        item.extend_from_slice(b"BODYSTRUCTURE ");
                        push_body_structure(&mut item, &raw, true);
                    }
                    FetchAtt::Body => {
                        item.extend_from_slice(b"BODY ");
                        push_body_structure(&mut item, &raw, false);
                    }
                    FetchAtt::Section {
                        section, partial, ..
                    } => push_section(&mut item, &raw, section, *partial),
                }
                items.push(item);
            }
            if flags_changed && !atts.contains(&FetchAtt::Flags) {
                items.push(format!("FLAGS {}", flag_list(&entry.flags)).into_bytes());
            }
            out.extend_from_slice(format!("* {seq} FETCH (").as_bytes());
            out.extend_from_slice(&items.join(&b' '));
            out.extend_from_slice(b")\r\n");
            if out.len() > FLUSH_AT && !send(stream, out).await {
                return bad("connection lost");
            }
            // Peeking or not: mbsync and Thunderbird fetch with BODY.PEEK[].
            let size = raw.len() as u64;
            let mut sent = self
                .selected
                .as_ref()
                .and_then(|sel| sel.partly_sent.get(&u).copied())
                .unwrap_or(0);
            // Every item, not only up to the first whole one: each partial
            // one adds to what was sent.
            let mut whole = false;
            for a in &atts {
                whole |= gives_whole_message(a, size, &mut sent);
            }
            if let Some(sel) = self.selected.as_mut() {
                if whole {
                    sel.partly_sent.remove(&u);
                } else if sent > 0 {
                    sel.partly_sent.insert(u, sent);
                }
            }
            if whole {
                self.backend.fetched(&mailbox, u);
            }
        }
        if failed {
            no("some messages could not be read")
        } else {
            ok(format!("{}FETCH completed", if uid { "UID " } else { "" }))
        }
    }

    fn store(
        &self,
        uid: bool,
        set: &SequenceSet,
        mode: StoreMode,
        silent: bool,
        flags: &[String],
        out: &mut Vec<u8>,
    ) -> Done {
        let Some(sel) = self.selected.as_ref() else {
            return bad("no mailbox selected");
        };
        if sel.read_only {
            return no("[READ-ONLY] the mailbox is open read-only");
        }
        let entries = match self.entries() {
            Ok(e) => e,
            Err(e) => return storage_failed(&e),
        };
        let given = normalize_flags(flags);
        for (seq, u) in self.targets(uid, set) {
            let Some(entry) = entries.get(&u) else {
                continue;
            };
            let new = match mode {
                StoreMode::Replace => given.clone(),
                StoreMode::Add => {
                    let mut f = entry.flags.clone();
                    f.extend(given.iter().cloned());
                    normalize_flags(&f)
                }
                StoreMode::Remove => entry
                    .flags
                    .iter()
                    .filter(|f| !has_flag(&given, f))
                    .cloned()
                    .collect(),
            };
            if new != entry.flags {
                if let Err(e) = self.backend.storage().set_flags(&sel.store, u, &new) {
                    return storage_failed(&e);
                }
            }
            if !silent {
                let uid_part = if uid {
                    format!(" UID {u}")
                } else {
                    String::new()
                };
                out.extend_from_slice(
                    format!("* {seq} FETCH (FLAGS {}{uid_part})\r\n", flag_list(&new)).as_bytes(),
                );
            }
        }
        ok("STORE completed")
    }

    fn copy(&mut self, uid: bool, set: &SequenceSet, target: &str) -> Done {
        let Some(sel) = self.selected.as_ref() else {
            return bad("no mailbox selected");
        };
        let Some(target_store) = self.store_name(target) else {
            return no(format!("[TRYCREATE] invalid mailbox name {target}"));
        };
        let entries = match self.entries() {
            Ok(e) => e,
            Err(e) => return storage_failed(&e),
        };
        let storage = self.backend.storage();
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for (_, u) in self.targets(uid, set) {
            let Some(entry) = entries.get(&u) else {
                continue;
            };
            let result = storage
                .mailbox_message(&sel.store, u)
                .and_then(|raw| storage.append(&target_store, &raw, &entry.flags));
            match result {
                Ok(new) => {
                    from.push(u.to_string());
                    to.push(new.to_string());
                }
                Err(e) => return storage_failed(&e),
            }
        }
        self.created.retain(|c| !c.eq_ignore_ascii_case(target));
        if from.is_empty() {
            return ok("COPY completed; nothing matched");
        }
        ok(format!(
            "[COPYUID {UID_VALIDITY} {} {}] COPY completed",
            from.join(","),
            to.join(",")
        ))
    }

    /// IDLE until DONE; `None` when the connection is gone.
    async fn idle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        pending: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Option<Done> {
        enum Event {
            Input(Result<usize, ()>),
            Change(Result<String, tokio::sync::broadcast::error::RecvError>),
            Poll,
            Timeout,
        }
        let mut changes = self.backend.changes();
        let mut listening = true;
        out.extend_from_slice(b"+ idling\r\n");
        if self.refresh(out, true).is_err() {
            tracing::warn!("IMAP refresh before IDLE failed");
        }
        if !send(stream, out).await {
            return None;
        }
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut poll = tokio::time::interval(IDLE_POLL);
        poll.tick().await;
        let mut buf = [0u8; 1024];
        loop {
            if let Some(line) = take_line(pending) {
                return Some(if line.eq_ignore_ascii_case(b"DONE") {
                    ok("IDLE terminated")
                } else {
                    bad("expected DONE to end IDLE")
                });
            }
            if pending.len() > MAX_LINE {
                return None;
            }
            let event = tokio::select! {
                r = stream.read(&mut buf) => Event::Input(r.map_err(|_| ())),
                c = changes.recv(), if listening => Event::Change(c),
                _ = poll.tick() => Event::Poll,
                _ = tokio::time::sleep_until(deadline) => Event::Timeout,
            };
            let announce = match event {
                Event::Input(Ok(0)) | Event::Input(Err(())) => return None,
                Event::Input(Ok(n)) => {
                    pending.extend_from_slice(&buf[..n]);
                    false
                }
                Event::Change(Ok(name)) => self
                    .selected
                    .as_ref()
                    .is_some_and(|s| s.store.eq_ignore_ascii_case(&name)),
                Event::Change(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => true,
                Event::Change(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    listening = false;
                    false
                }
                Event::Poll => true,
                Event::Timeout => {
                    let _ = stream.write_all(b"* BYE idle for too long\r\n").await;
                    return None;
                }
            };
            if announce {
                if let Err(e) = self.refresh(out, true) {
                    tracing::warn!(error = %e, "IMAP refresh during IDLE failed");
                }
                if !send(stream, out).await {
                    return None;
                }
            }
        }
    }
}

/// Whether fetching `att` hands the client the whole message of `size`
/// bytes, i.e. it reached its final destination: RFC822, BODY[] or
/// BODY.PEEK[] (peeking only keeps \Seen unset), or partial fetches of
/// BODY[] that together cover it from its start, as Thunderbird fetches
/// large messages in chunks. `sent` is how much of it, from its start, the
/// session sent before; it grows with a partial fetch that continues it.
/// A header, text or part section is not the whole message.
fn gives_whole_message(att: &FetchAtt, size: u64, sent: &mut u64) -> bool {
    match att {
        FetchAtt::Rfc822 => true,
        FetchAtt::Section {
            section, partial, ..
        } if section.part.is_empty() && section.text == SectionText::Full => match partial {
            None => true,
            Some((start, len)) => {
                if *start <= *sent {
                    *sent = (*sent).max(start.saturating_add(*len).min(size));
                }
                *sent >= size
            }
        },
        _ => false,
    }
}

fn push_section(item: &mut Vec<u8>, raw: &[u8], section: &Section, partial: Option<(u64, u64)>) {
    let data = section_bytes(raw, section).unwrap_or_default();
    item.extend_from_slice(format!("BODY[{}]", section.render()).as_bytes());
    match partial {
        Some((start, len)) => {
            item.extend_from_slice(format!("<{start}> ").as_bytes());
            let from = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
            let to = from
                .saturating_add(usize::try_from(len).unwrap_or(usize::MAX))
                .min(data.len());
            push_literal(item, &data[from..to]);
        }
        None => {
            item.push(b' ');
            push_literal(item, &data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_patterns() {
        assert!(pattern_matches(b"*", b"INBOX"));
        assert!(pattern_matches(b"inbox", b"INBOX"));
        assert!(pattern_matches(b"%", b"Sent"));
        assert!(!pattern_matches(b"%", b"a/b"));
        assert!(pattern_matches(b"a/%", b"a/b"));
        assert!(pattern_matches(b"*b", b"a/b"));
        assert!(!pattern_matches(b"S", b"Sent"));
    }

    #[test]
    fn whole_message_fetches_peek_or_not_and_in_chunks() {
        let section = |peek, text, partial| FetchAtt::Section {
            peek,
            section: Section {
                part: Vec::new(),
                text,
            },
            partial,
        };
        let whole = |att: &FetchAtt| gives_whole_message(att, 100, &mut 0);
        assert!(whole(&FetchAtt::Rfc822));
        assert!(whole(&section(false, SectionText::Full, None)));
        assert!(
            whole(&section(true, SectionText::Full, None)),
            "BODY.PEEK[]"
        );
        assert!(whole(&section(true, SectionText::Full, Some((0, 4096)))));
        assert!(!whole(&section(true, SectionText::Header, None)));
        assert!(!whole(&section(false, SectionText::Text, None)));
        assert!(!whole(&FetchAtt::Rfc822Header));
        assert!(!whole(&FetchAtt::Rfc822Text));
        let part = FetchAtt::Section {
            peek: false,
            section: Section {
                part: vec![1],
                text: SectionText::Full,
            },
            partial: None,
        };
        assert!(!whole(&part));
        // Chunks from the start add up; one that skips ahead does not count.
        let mut sent = 0;
        let chunk = |start, len| section(true, SectionText::Full, Some((start, len)));
        assert!(!gives_whole_message(&chunk(0, 40), 100, &mut sent));
        assert!(!gives_whole_message(&chunk(70, 40), 100, &mut sent));
        assert_eq!(sent, 40);
        assert!(!gives_whole_message(&chunk(40, 40), 100, &mut sent));
        assert!(gives_whole_message(&chunk(80, 40), 100, &mut sent));
        assert!(
            !gives_whole_message(&chunk(50, 50), 100, &mut 0),
            "only the end"
        );
    }

    #[test]
    fn literal_announcements() {
        assert_eq!(literal_announcement(b"a APPEND x {12}"), Some((12, true)));
        assert_eq!(literal_announcement(b"a APPEND x {12+}"), Some((12, false)));
        assert_eq!(literal_announcement(b"a LOGIN x y"), None);
        assert_eq!(literal_announcement(b"a {}"), None);
        assert_eq!(literal_announcement(b"a {99999999999999999}"), None);
    }

    #[test]
    fn flags_are_normalized() {
        let f = normalize_flags(&[
            "\\seen".into(),
            "\\Recent".into(),
            "\\SEEN".into(),
            "$Label".into(),
        ]);
        assert_eq!(f, vec!["\\Seen".to_string(), "$Label".to_string()]);
    }
}
