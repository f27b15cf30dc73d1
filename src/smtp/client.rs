//! Outbound SMTP client: hands one message to one server for a set of
//! recipients and says, per recipient, whether that worked.
//!
//! The caller (the queue) resolves MX hosts and tries them in order; this
//! module speaks to one of them. The result is typed ([`Outcome`]) so that
//! retry-or-bounce is a `match`, never a string test.
//!
//! The session is generic over the stream, so STARTTLS swaps a plain TCP
//! session for an OpenSSL one without the protocol code knowing.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::EhloResponse;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// Longest reply line we accept (RFC 5321 §4.5.3.1.5 allows 512; servers
/// are sloppier, so be generous but bounded).
const MAX_REPLY_LINE: usize = 4096;
/// Most lines one reply may have (a long EHLO list is ~30).
const MAX_REPLY_LINES: usize = 100;
/// RCPT commands sent in one pipelined batch: bounded so that neither side's
/// socket buffer can fill while the other is still writing (RFC 2920 §3.1).
const PIPELINE_BATCH: usize = 50;
/// DATA content is written in pieces of this size, each under the timeout.
const WRITE_CHUNK: usize = 64 * 1024;
/// The message is already delivered when QUIT is sent: never wait long.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// When to use STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Never send STARTTLS, even when offered.
    Never,
    /// Use STARTTLS when offered; deliver in plain text when it is not
    /// offered, refused, or the handshake fails (on a fresh connection).
    Opportunistic,
    /// Deliver only over TLS: a server that does not offer STARTTLS, or a
    /// handshake that fails, is a temporary failure.
    Required,
}

/// How the client behaves; parsed once from the configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Our name in EHLO/HELO.
    pub helo_name: String,
    pub tls: TlsPolicy,
    /// Verify the server certificate (hostname + chain against the system
    /// roots, or only against `ca_file` when given)?
    pub verify_tls: bool,
    /// PEM file of the CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Greeting and each command reply (RFC 5321 §4.5.3.2: 5 minutes), and
    /// each write of DATA content.
    pub command_timeout: Duration,
    /// The reply to the final "." (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub data_timeout: Duration,
    /// Keep a connection after a delivered message and use it for the next
    /// message to the same server (within [`IDLE_REUSE`]), as Postfix's
    /// connection cache does: no new TCP, EHLO and TLS handshake per message.
    pub reuse_connections: bool,
}

impl ClientConfig {
    /// The RFC 5321 timeouts, opportunistic TLS with verification.
    pub fn new(helo_name: impl Into<String>) -> Self {
        ClientConfig {
            helo_name: helo_name.into(),
            tls: TlsPolicy::Opportunistic,
            verify_tls: true,
            ca_file: None,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            reuse_connections: false,
        }
    }
}

/// What happened to a recipient (or to the whole transaction).
///
/// The text is the server's reply, e.g. `550 5.1.1 no such user (in reply
/// to RCPT TO)`, or our own reason, e.g. `connection refused`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Try again later (4xx, network trouble, timeouts, policy not met).
    TemporaryFailure(String),
    /// Do not retry: bounce (5xx).
    PermanentFailure(String),
}

impl Outcome {
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed)
    }

    pub fn is_temporary(&self) -> bool {
        matches!(self, Outcome::TemporaryFailure(_))
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, Outcome::PermanentFailure(_))
    }

    /// Why it failed; `None` when completed.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Completed => None,
            Outcome::TemporaryFailure(reason) | Outcome::PermanentFailure(reason) => Some(reason),
        }
    }

    /// The outcome a server reply means for the command it answered.
    fn from_reply(reply: &Reply, stage: Stage) -> Outcome {
        let text = format!("{reply} (in reply to {stage})");
        match reply.code {
            200..=299 => Outcome::Completed,
            500..=599 => Outcome::PermanentFailure(text),
            // 4xx, and anything the command should not have had, is retried.
            _ => Outcome::TemporaryFailure(text),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed => f.write_str("completed"),
            Outcome::TemporaryFailure(reason) => write!(f, "temporary failure: {reason}"),
            Outcome::PermanentFailure(reason) => write!(f, "permanent failure: {reason}"),
        }
    }
}

/// The SMTP envelope of one delivery.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The reverse-path; `""` for the null reverse-path (`MAIL FROM:<>`).
    pub mail_from: &'a str,
    pub rcpt_to: &'a [String],
    /// The size to announce with `SIZE=`; the message length when `None`.
    pub size: Option<usize>,
}

/// The result of one delivery attempt to one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One entry per envelope recipient, in envelope order.
    pub per_recipient: Vec<(String, Outcome)>,
    /// Was the message (or the attempt) carried over TLS?
    pub tls: bool,
    /// Which server, as `host[ip]:port`.
    pub server: String,
}

impl DeliveryReport {
    /// The outcome for `recipient`, if it was in the envelope.
    pub fn outcome(&self, recipient: &str) -> Option<&Outcome> {
        self.per_recipient
            .iter()
            .find(|(r, _)| r == recipient)
            .map(|(_, o)| o)
    }

    pub fn all_completed(&self) -> bool {
        self.per_recipient.iter().all(|(_, o)| o.is_completed())
    }
}

/// Connects to `addr` (server name `host` for TLS SNI and verification),
/// and delivers `message` to the envelope recipients: EHLO (HELO when EHLO
/// gets a 5xx), STARTTLS per policy, MAIL FROM (with `SIZE=` and
/// `BODY=8BITMIME` when advertised and useful), RCPT TO for each (pipelined
/// when advertised), DATA with CRLF normalisation and dot-stuffing, QUIT.
///
/// Never fails as a function: every problem becomes an [`Outcome`] for the
/// recipients it affects.
pub async fn deliver(
    addr: SocketAddr,
    host: &str,
    config: &ClientConfig,
    envelope: &Envelope<'_>,
    message: &[u8],
) -> DeliveryReport {
    let server = format!("{}[{}]:{}", host, addr.ip(), addr.port());
    let mut attempt = Attempt::new(envelope);
    if !attempt.recipients.is_empty() {
        let mut result = attempt_once(addr, host, config, config.tls, envelope, message).await;
        if config.tls == TlsPolicy::Opportunistic {
            if let Err(failure @ SessionError::TlsHandshake(_)) = &result.1 {
                // Opportunistic TLS must not make a server unreachable: the
                // handshake ruined that connection, so start a plain one.
                tracing::warn!(%server, %failure, "retrying delivery without TLS");
                result =
                    attempt_once(addr, host, config, TlsPolicy::Never, envelope, message).await;
            }
        }
        let (done, end) = result;
        attempt = done;
        if let Err(failure) = end {
            tracing::info!(%server, %failure, "delivery attempt failed");
            attempt.finish_pending(&failure.outcome());
        }
    }
    let report = attempt.into_report(server);
    for (recipient, outcome) in &report.per_recipient {
        tracing::info!(server = %report.server, %recipient, tls = report.tls, %outcome, "delivery");
    }
    report
}

/// One connection's worth of work; the attempt state is returned even on
/// failure so the caller knows which recipients already have an outcome.
async fn attempt_once<'a>(
    addr: SocketAddr,
    host: &str,
    config: &ClientConfig,
    policy: TlsPolicy,
    envelope: &Envelope<'a>,
    message: &[u8],
) -> (Attempt<'a>, Result<(), SessionError>) {
    let mut attempt = Attempt::new(envelope);
    let result = run(addr, host, config, policy, envelope, message, &mut attempt).await;
    (attempt, result)
}

async fn run(
    addr: SocketAddr,
    host: &str,
    config: &ClientConfig,
    policy: TlsPolicy,
    envelope: &Envelope<'_>,
    message: &[u8],
    attempt: &mut Attempt<'_>,
) -> Result<(), SessionError> {
    let key = CacheKey {
        addr,
        host: host.to_string(),
        helo: config.helo_name.clone(),
        policy,
        verify: config.verify_tls,
        ca_file: config.ca_file.clone(),
    };
    if config.reuse_connections {
        while let Some(idle) = idle_connections().take(&key) {
            let mut session = Session::new(idle.conn, config);
            let result = session
                .transaction(&idle.capabilities, envelope, message, attempt)
                .await;
            match result {
                // The server closed the idle connection: nothing was
                // decided, so try another one or a fresh connection.
                Err(ref e) if e.stale_connection() && attempt.untouched() => continue,
                result => {
                    attempt.tls = idle.tls;
                    return session
                        .release(result, idle.capabilities, idle.tls, key)
                        .await;
                }
            }
        }
    }
    let tcp = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(SessionError::ConnectTimeout(config.connect_timeout)),
        Ok(Err(e)) => return Err(SessionError::Connect(e)),
        Ok(Ok(tcp)) => tcp,
    };
    // Commands and pipelined groups go out as whole writes: without this,
    // Nagle's algorithm holds each small write until the server's delayed
    // ACK (40 ms on Linux), which capped deliveries at 25 per second per
    // connection.
    let _ = tcp.set_nodelay(true);
    let mut session = Session::new(tcp, config);

    let result = session.opening().await;
    let capabilities = match result {
        Ok(capabilities) => capabilities,
        Err(e) => return session.close_after(e).await,
    };

    if policy != TlsPolicy::Never {
        if capabilities.starttls {
            session.send(b"STARTTLS\r\n", Stage::StartTls).await?;
            let reply = session
                .read_reply(Stage::StartTls, config.command_timeout)
                .await?;
            if reply.code == 220 {
                let secure = session.start_tls(host).await?;
                let mut secure = Session::new(Conn::Tls(Box::new(secure.stream)), config);
                attempt.tls = true;
                // RFC 3207 §4.2: forget what was learnt before TLS.
                let capabilities = match secure.hello().await {
                    Ok(capabilities) => capabilities,
                    Err(e) => return secure.close_after(e).await,
                };
                let result = secure
                    .transaction(&capabilities, envelope, message, attempt)
                    .await;
                return secure.release(result, capabilities, true, key).await;
            }
            if policy == TlsPolicy::Required {
                let e = SessionError::TlsPolicy(format!("STARTTLS refused by the server: {reply}"));
                return session.close_after(e).await;
            }
            tracing::info!(%host, %reply, "STARTTLS refused, continuing without TLS");
        } else if policy == TlsPolicy::Required {
            let e = SessionError::TlsPolicy(
                "TLS is required but the server does not offer STARTTLS".to_string(),
            );
            return session.close_after(e).await;
        }
    }

    let result = session
        .transaction(&capabilities, envelope, message, attempt)
        .await;
    let session = Session {
        stream: Conn::Plain(session.stream),
        pending: session.pending,
        config,
        reusable: session.reusable,
    };
    session.release(result, capabilities, false, key).await
}

/// How long a connection may wait in the cache for its next message.
pub const IDLE_REUSE: Duration = Duration::from_secs(10);
/// Idle connections kept per server.
const IDLE_PER_SERVER: usize = 16;

/// A connection to one server with one configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    addr: SocketAddr,
    host: String,
    helo: String,
    policy: TlsPolicy,
    verify: bool,
    ca_file: Option<PathBuf>,
}

/// A plain or TLS connection, for the cache.
enum Conn {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

struct Idle {
    conn: Conn,
    capabilities: Capabilities,
    tls: bool,
    since: std::time::Instant,
}

#[derive(Default)]
struct IdleConnections {
    by_server: std::sync::Mutex<std::collections::HashMap<CacheKey, Vec<Idle>>>,
}

impl IdleConnections {
    fn take(&self, key: &CacheKey) -> Option<Idle> {
        let mut map = self.by_server.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < IDLE_REUSE {
                return Some(idle);
            }
        }
        None
    }

    fn put(&self, key: CacheKey, idle: Idle) {
        let mut map = self.by_server.lock().unwrap_or_else(|p| p.into_inner());
        // Expired connections anywhere are closed (dropped) on the way.
        for list in map.values_mut() {
            list.retain(|i| i.since.elapsed() < IDLE_REUSE);
        }
        map.retain(|_, list| !list.is_empty());
        let list = map.entry(key).or_default();
        if list.len() < IDLE_PER_SERVER {
            list.push(idle);
        }
    }
}

fn idle_connections() -> &'static IdleConnections {
    static IDLE: std::sync::OnceLock<IdleConnections> = std::sync::OnceLock::new();
    IDLE.get_or_init(IdleConnections::default)
}

/// Where each recipient stands during one attempt.
#[derive(Debug, Clone)]
enum RecipientState {
    /// Not yet answered by the server.
    Pending,
    /// RCPT accepted; the outcome depends on DATA.
    Accepted,
    Done(Outcome),
}

struct Attempt<'a> {
    recipients: Vec<(&'a str, RecipientState)>,
    tls: bool,
}

impl<'a> Attempt<'a> {
    fn new(envelope: &Envelope<'a>) -> Self {
        Attempt {
            recipients: envelope
                .rcpt_to
                .iter()
                .map(|r| (r.as_str(), RecipientState::Pending))
                .collect(),
            tls: false,
        }
    }

    /// Gives every recipient without a final outcome this one.
    fn finish_pending(&mut self, outcome: &Outcome) {
        for (_, state) in &mut self.recipients {
            if matches!(state, RecipientState::Pending | RecipientState::Accepted) {
                *state = RecipientState::Done(outcome.clone());
            }
        }
    }

    /// No recipient has an answer yet.
    fn untouched(&self) -> bool {
        self.recipients
            .iter()
            .all(|(_, state)| matches!(state, RecipientState::Pending))
    }

    fn finish_accepted(&mut self, outcome: &Outcome) {
        for (_, state) in &mut self.recipients {
            if matches!(state, RecipientState::Accepted) {
                *state = RecipientState::Done(outcome.clone());
            }
        }
    }

    fn into_report(self, server: String) -> DeliveryReport {
        let per_recipient = self
            .recipients
            .into_iter()
            .map(|(recipient, state)| {
                let outcome = match state {
                    RecipientState::Done(outcome) => outcome,
                    // Unreachable by construction; still, never claim success.
                    RecipientState::Pending | RecipientState::Accepted => {
                        Outcome::TemporaryFailure(
                            "delivery ended without an outcome for this recipient".to_string(),
                        )
                    }
                };
                (recipient.to_string(), outcome)
            })
            .collect();
        DeliveryReport {
            per_recipient,
            tls: self.tls,
            server,
        }
    }
}

/// The protocol step a reply or failure belongs to (named as in Postfix's
/// "in reply to ..." so operators recognise it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    MailFrom,
    RcptTo,
    Data,
    EndOfData,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "the greeting",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::MailFrom => "MAIL FROM",
            Stage::RcptTo => "RCPT TO",
            Stage::Data => "DATA",
            Stage::EndOfData => "end of DATA",
            Stage::Quit => "QUIT",
        })
    }
}

/// Why a session ended early. Each maps to the [`Outcome`] the recipients
/// still waiting get.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connection failed: {0}")]
    Connect(std::io::Error),
    #[error("connection timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("timed out after {after:?} waiting for the reply to {stage}")]
    ReplyTimeout { stage: Stage, after: Duration },
    #[error("timed out after {after:?} sending {stage}")]
    WriteTimeout { stage: Stage, after: Duration },
    #[error("connection lost during {stage}: {source}")]
    Io {
        stage: Stage,
        source: std::io::Error,
    },
    #[error("connection closed by the server during {stage}")]
    Closed { stage: Stage },
    #[error("bad reply to {stage}: {reason}")]
    BadReply { stage: Stage, reason: String },
    /// The server answered, but not with what the step needs.
    #[error("{reply} (in reply to {stage})")]
    Refused { stage: Stage, reply: Reply },
    /// A decision of ours, with its outcome already made.
    #[error("{}", .0.reason().unwrap_or("refused"))]
    Decided(Outcome),
    #[error("{0}")]
    TlsPolicy(String),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
}

impl SessionError {
    fn outcome(&self) -> Outcome {
        match self {
            SessionError::Refused { stage, reply } => match Outcome::from_reply(reply, *stage) {
                // A 2xx where something else was needed (say 250 to DATA).
                Outcome::Completed => Outcome::TemporaryFailure(self.to_string()),
                outcome => outcome,
            },
            SessionError::Decided(outcome) => outcome.clone(),
            other => Outcome::TemporaryFailure(other.to_string()),
        }
    }

    /// The connection died under us (a cached connection the server
    /// closed while idle).
    fn stale_connection(&self) -> bool {
        matches!(
            self,
            SessionError::Io { .. }
                | SessionError::Closed { .. }
                | SessionError::ReplyTimeout { .. }
        )
    }

    /// Can we still say QUIT on this connection?
    fn connection_usable(&self) -> bool {
        matches!(
            self,
            SessionError::Refused { .. } | SessionError::Decided(_) | SessionError::TlsPolicy(_)
        )
    }
}

/// One parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    code: u16,
    /// Enhanced status code (RFC 3463), when the server sent one.
    status: Option<[u8; 3]>,
    /// The text, continuation lines joined with a space.
    text: String,
    /// The reply as received, lines ending in CRLF (for the EHLO parser).
    raw: Vec<u8>,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some([class, subject, detail]) = self.status {
            write!(f, " {class}.{subject}.{detail}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

impl Reply {
    fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Builds a reply from its complete raw lines (already framed and
    /// checked by the reader). smtp-proto separates the enhanced status code.
    fn parse(code: u16, raw: Vec<u8>) -> Reply {
        let parsed = ResponseReceiver::default().parse(&mut raw.iter());
        let (status, message) = match parsed {
            Ok(response) => {
                let status = (response.esc != [0, 0, 0]).then_some(response.esc);
                (status, response.message)
            }
            // Too long for smtp-proto's 4 KiB budget: keep the text as sent.
            Err(_) => {
                let text = raw
                    .split(|&b| b == b'\n')
                    .filter_map(|line| line.get(4..))
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>()
                    .join("\n");
                (None, text)
            }
        };
        Reply {
            code,
            status,
            text: printable(&message),
            raw,
        }
    }
}

/// Reply text goes into logs and DSNs: no control characters, one line.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for part in text.split('\n') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(part.chars().map(|c| if c.is_control() { ' ' } else { c }));
    }
    out
}

/// What EHLO told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Capabilities {
    starttls: bool,
    pipelining: bool,
    eight_bit_mime: bool,
    smtputf8: bool,
    /// `Some(limit)` when SIZE is advertised; a limit of 0 means "no limit".
    size: Option<usize>,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Capabilities {
        match EhloResponse::parse(&mut reply.raw.iter()) {
            Ok(ehlo) => Capabilities {
                starttls: ehlo.has_capability(smtp_proto::EXT_START_TLS),
                pipelining: ehlo.has_capability(smtp_proto::EXT_PIPELINING),
                eight_bit_mime: ehlo.has_capability(smtp_proto::EXT_8BIT_MIME),
                smtputf8: ehlo.has_capability(smtp_proto::EXT_SMTP_UTF8),
                size: ehlo
                    .has_capability(smtp_proto::EXT_SIZE)
                    .then_some(ehlo.size),
            },
            // smtp-proto is strict about parameters (e.g. "SIZE abc");
            // the keywords alone are enough to deliver.
            Err(_) => Capabilities::from_keywords(&reply.raw),
        }
    }

    fn from_keywords(raw: &[u8]) -> Capabilities {
        let mut capabilities = Capabilities::default();
        for line in raw.split(|&b| b == b'\n').skip(1) {
            let line = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).to_uppercase();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("STARTTLS") => capabilities.starttls = true,
                Some("PIPELINING") => capabilities.pipelining = true,
                Some("8BITMIME") => capabilities.eight_bit_mime = true,
                Some("SMTPUTF8") => capabilities.smtputf8 = true,
                Some("SIZE") => {
                    capabilities.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
                }
                _ => {}
            }
        }
        capabilities
    }
}

/// One SMTP connection over some stream (plain TCP, then maybe TLS).
struct Session<'c, S> {
    stream: S,
    /// Bytes read but not yet consumed as reply lines.
    pending: Vec<u8>,
    config: &'c ClientConfig,
    /// The last transaction ended with the message accepted: the
    /// connection is ready for the next MAIL.
    reusable: bool,
}

impl<'c, S: AsyncRead + AsyncWrite + Unpin> Session<'c, S> {
    fn new(stream: S, config: &'c ClientConfig) -> Self {
        Session {
            stream,
            pending: Vec::new(),
            config,
            reusable: false,
        }
    }

    /// Greeting and EHLO/HELO.
    async fn opening(&mut self) -> Result<Capabilities, SessionError> {
        let greeting = self
            .read_reply(Stage::Greeting, self.config.command_timeout)
            .await?;
        if greeting.code != 220 {
            // Even a 554 greeting is not a verdict on the message: like
            // Postfix (smtp_skip_5xx_greeting) we let the queue try another
            // MX or later, rather than bounce.
            return Err(SessionError::Decided(Outcome::TemporaryFailure(format!(
                "{greeting} (in reply to {})",
                Stage::Greeting
            ))));
        }
        self.hello().await
    }

    /// EHLO, falling back to HELO (no extensions) when EHLO gets a 5xx.
    async fn hello(&mut self) -> Result<Capabilities, SessionError> {
        let helo_name = command_safe(&self.config.helo_name);
        let timeout = self.config.command_timeout;
        self.send(format!("EHLO {helo_name}\r\n").as_bytes(), Stage::Ehlo)
            .await?;
        let reply = self.read_reply(Stage::Ehlo, timeout).await?;
        if reply.code == 250 {
            return Ok(Capabilities::from_ehlo(&reply));
        }
        if !(500..600).contains(&reply.code) {
            return Err(SessionError::Refused {
                stage: Stage::Ehlo,
                reply,
            });
        }
        self.send(format!("HELO {helo_name}\r\n").as_bytes(), Stage::Helo)
            .await?;
        let reply = self.read_reply(Stage::Helo, timeout).await?;
        if reply.code == 250 {
            Ok(Capabilities::default())
        } else {
            Err(SessionError::Refused {
                stage: Stage::Helo,
                reply,
            })
        }
    }

    /// MAIL, RCPT..., DATA for one message, recording each recipient's fate.
    async fn transaction(
        &mut self,
        capabilities: &Capabilities,
        envelope: &Envelope<'_>,
        message: &[u8],
        attempt: &mut Attempt<'_>,
    ) -> Result<(), SessionError> {
        let timeout = self.config.command_timeout;
        let content = DataContent::new(message);
        let size = envelope.size.unwrap_or(content.size);

        if let Some(problem) = address_problem(envelope.mail_from) {
            return Err(SessionError::Decided(Outcome::PermanentFailure(format!(
                "invalid sender address: {problem}"
            ))));
        }
        let needs_smtputf8 =
            !envelope.mail_from.is_ascii() || attempt.recipients.iter().any(|(r, _)| !r.is_ascii());
        if !envelope.mail_from.is_ascii() && !capabilities.smtputf8 {
            return Err(SessionError::Decided(Outcome::PermanentFailure(
                "the sender address needs SMTPUTF8, which the server does not support".to_string(),
            )));
        }
        if let Some(limit) = capabilities.size.filter(|&limit| limit > 0) {
            if size > limit {
                return Err(SessionError::Decided(Outcome::PermanentFailure(format!(
                    "message size {size} exceeds the server's limit of {limit} bytes (SIZE)"
                ))));
            }
        }
        if content.eight_bit && !capabilities.eight_bit_mime {
            // Postfix sends such mail unchanged too; Direct mail is
            // base64 S/MIME, so this is an edge case not worth a bounce.
            tracing::warn!("server does not advertise 8BITMIME; sending 8-bit content as is");
        }

        // Recipients we cannot even name to this server fail on their own.
        for (recipient, state) in &mut attempt.recipients {
            let problem = match address_problem(recipient) {
                Some(problem) => Some(format!("invalid recipient address: {problem}")),
                None if !recipient.is_ascii() && !capabilities.smtputf8 => Some(
                    "the recipient address needs SMTPUTF8, which the server does not support"
                        .to_string(),
                ),
                None => None,
            };
            if let Some(problem) = problem {
                *state = RecipientState::Done(Outcome::PermanentFailure(problem));
            }
        }
        let to_send: Vec<usize> = attempt
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, (_, state))| matches!(state, RecipientState::Pending))
            .map(|(i, _)| i)
            .collect();
        if to_send.is_empty() {
            return Ok(());
        }

        self.reusable = false;
        let mut mail = format!("MAIL FROM:<{}>", envelope.mail_from);
        if capabilities.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if content.eight_bit && capabilities.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs_smtputf8 && capabilities.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");

        // MAIL and the RCPTs go in batches: one command at a time without
        // PIPELINING, many with it. Replies come back in command order.
        let batch = if capabilities.pipelining {
            PIPELINE_BATCH
        } else {
            1
        };
        let mut commands: Vec<Option<usize>> = vec![None];
        commands.extend(to_send.iter().map(|&i| Some(i)));
        // When everything fits in one group, DATA ends it (RFC 2920 allows
        // DATA as the last command of a group): one round trip fewer.
        let data_pipelined = capabilities.pipelining && commands.len() < batch;
        let chunks = commands.len().div_ceil(batch);
        let mut mail_refused: Option<SessionError> = None;
        let mut data_reply = None;
        for (n, chunk) in commands.chunks(batch).enumerate() {
            let mut out = Vec::new();
            for command in chunk {
                match command {
                    None => out.extend_from_slice(mail.as_bytes()),
                    Some(i) => {
                        let recipient = attempt.recipients.get(*i).map_or("", |(r, _)| *r);
                        out.extend_from_slice(format!("RCPT TO:<{recipient}>\r\n").as_bytes());
                    }
                }
            }
            let with_data = data_pipelined && n + 1 == chunks;
            if with_data {
                out.extend_from_slice(b"DATA\r\n");
            }
            let stage = if chunk.first() == Some(&None) {
                Stage::MailFrom
            } else {
                Stage::RcptTo
            };
            self.send(&out, stage).await?;
            for command in chunk {
                match command {
                    None => {
                        let reply = self.read_reply(Stage::MailFrom, timeout).await?;
                        if !reply.is_positive() {
                            mail_refused = Some(SessionError::Refused {
                                stage: Stage::MailFrom,
                                reply,
                            });
                        }
                    }
                    Some(i) => {
                        let reply = self.read_reply(Stage::RcptTo, timeout).await?;
                        // After a refused MAIL the RCPT replies are noise (503).
                        if mail_refused.is_some() {
                            continue;
                        }
                        if let Some((_, state)) = attempt.recipients.get_mut(*i) {
                            *state = match Outcome::from_reply(&reply, Stage::RcptTo) {
                                Outcome::Completed => RecipientState::Accepted,
                                outcome => RecipientState::Done(outcome),
                            };
                        }
                    }
                }
            }
            if with_data {
                data_reply = Some(self.read_reply(Stage::Data, timeout).await?);
            }
            if let Some(refused) = mail_refused {
                self.end_unwanted_data(data_reply.as_ref(), timeout).await?;
                return Err(refused);
            }
        }

        if !attempt
            .recipients
            .iter()
            .any(|(_, state)| matches!(state, RecipientState::Accepted))
        {
            // Nobody to deliver to: no DATA (or, if it went with the
            // group, see end_unwanted_data); QUIT ends the transaction.
            self.end_unwanted_data(data_reply.as_ref(), timeout).await?;
            return Ok(());
        }

        let reply = match data_reply {
            Some(reply) => reply,
            None => {
                self.send(b"DATA\r\n", Stage::Data).await?;
                self.read_reply(Stage::Data, timeout).await?
            }
        };
        if reply.code != 354 {
            return Err(SessionError::Refused {
                stage: Stage::Data,
                reply,
            });
        }
        // The final dot goes with the last piece: one write for a small
        // message.
        let wire: &[u8] = &content.wire;
        let last = wire.len().saturating_sub(1) / WRITE_CHUNK * WRITE_CHUNK;
        for piece in wire[..last].chunks(WRITE_CHUNK) {
            self.send_raw(piece, Stage::Data).await?;
        }
        let mut tail = Vec::with_capacity(wire.len() - last + 3);
        tail.extend_from_slice(&wire[last..]);
        tail.extend_from_slice(b".\r\n");
        self.send_raw(&tail, Stage::EndOfData).await?;
        let reply = self
            .read_reply(Stage::EndOfData, self.config.data_timeout)
            .await?;
        if !reply.is_positive() {
            return Err(SessionError::Refused {
                stage: Stage::EndOfData,
                reply,
            });
        }
        tracing::debug!(%reply, "message accepted");
        attempt.finish_accepted(&Outcome::Completed);
        self.reusable = true;
        Ok(())
    }

    /// DATA went with the group but the transaction failed (MAIL refused,
    /// no recipient accepted): a server that took DATA anyway (354) gets an
    /// empty message, which it has nobody to deliver to.
    async fn end_unwanted_data(
        &mut self,
        data_reply: Option<&Reply>,
        timeout: Duration,
    ) -> Result<(), SessionError> {
        if data_reply.is_some_and(|r| r.code == 354) {
            self.send(b".\r\n", Stage::EndOfData).await?;
            self.read_reply(Stage::EndOfData, timeout).await?;
        }
        Ok(())
    }

    /// Ends the session after `result`: QUIT when the connection is still
    /// in a state to take it. The result is passed through.
    async fn close_with(&mut self, result: Result<(), SessionError>) -> Result<(), SessionError> {
        if result
            .as_ref()
            .err()
            .is_none_or(SessionError::connection_usable)
        {
            self.quit().await;
        }
        result
    }

    async fn close_after(&mut self, error: SessionError) -> Result<(), SessionError> {
        self.close_with(Err(error)).await
    }

    /// QUIT, politely but without caring about the answer: whatever was to
    /// be decided has been.
    async fn quit(&mut self) {
        let timeout = QUIT_TIMEOUT.min(self.config.command_timeout);
        let quit = async {
            self.send(b"QUIT\r\n", Stage::Quit).await?;
            self.read_reply(Stage::Quit, timeout).await?;
            let _ = self.stream.shutdown().await;
            Ok::<(), SessionError>(())
        };
        if let Ok(Err(e)) | Err(e) =
            tokio::time::timeout(timeout, quit)
                .await
                .map_err(|_| SessionError::ReplyTimeout {
                    stage: Stage::Quit,
                    after: timeout,
                })
        {
            tracing::debug!(error = %e, "QUIT");
        }
    }

    /// Sends a command (logged) and flushes.
    async fn send(&mut self, bytes: &[u8], stage: Stage) -> Result<(), SessionError> {
        tracing::debug!(command = %String::from_utf8_lossy(bytes).trim_end(), "smtp client >");
        self.send_raw(bytes, stage).await
    }

    async fn send_raw(&mut self, bytes: &[u8], stage: Stage) -> Result<(), SessionError> {
        let after = self.config.command_timeout;
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(after, write).await {
            Err(_) => Err(SessionError::WriteTimeout { stage, after }),
            Ok(Err(source)) => Err(SessionError::Io { stage, source }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads one complete (possibly multi-line) reply within `after`.
    async fn read_reply(&mut self, stage: Stage, after: Duration) -> Result<Reply, SessionError> {
        let reply = tokio::time::timeout(after, self.read_reply_lines(stage))
            .await
            .map_err(|_| SessionError::ReplyTimeout { stage, after })??;
        tracing::debug!(%reply, "smtp client <");
        Ok(reply)
    }

    async fn read_reply_lines(&mut self, stage: Stage) -> Result<Reply, SessionError> {
        let bad = |reason: String| SessionError::BadReply { stage, reason };
        let mut raw = Vec::new();
        let mut code = None;
        for _ in 0..MAX_REPLY_LINES {
            let line = self.read_line(stage).await?;
            let (line_code, last) = match line.as_slice() {
                [a, b, c, rest @ ..]
                    if (b'2'..=b'5').contains(a) && b.is_ascii_digit() && c.is_ascii_digit() =>
                {
                    let line_code =
                        u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
                    match rest.first() {
                        None | Some(b' ') => (line_code, true),
                        Some(b'-') => (line_code, false),
                        Some(_) => return Err(bad(format!("malformed line {:?}", excerpt(&line)))),
                    }
                }
                _ => return Err(bad(format!("malformed line {:?}", excerpt(&line)))),
            };
            if code.is_some_and(|code| code != line_code) {
                return Err(bad(format!(
                    "reply codes differ between lines ({:?})",
                    excerpt(&line)
                )));
            }
            code = Some(line_code);
            raw.extend_from_slice(&line);
            raw.extend_from_slice(b"\r\n");
            if last {
                return Ok(Reply::parse(line_code, raw));
            }
        }
        Err(bad(format!("more than {MAX_REPLY_LINES} lines")))
    }

    /// One line without its CRLF (or bare LF), at most [`MAX_REPLY_LINE`].
    async fn read_line(&mut self, stage: Stage) -> Result<Vec<u8>, SessionError> {
        let mut scanned = 0;
        loop {
            if let Some(lf) = memchr::memchr(b'\n', &self.pending[scanned..]) {
                let end = scanned + lf;
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > MAX_REPLY_LINE {
                    break;
                }
                return Ok(line);
            }
            scanned = self.pending.len();
            if scanned > MAX_REPLY_LINE {
                break;
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|source| SessionError::Io { stage, source })?;
            if n == 0 {
                return Err(SessionError::Closed { stage });
            }
            self.pending.extend_from_slice(&chunk[..n]);
        }
        Err(SessionError::BadReply {
            stage,
            reason: format!("a line longer than {MAX_REPLY_LINE} bytes"),
        })
    }

    /// After the server's 220 to STARTTLS: the TLS handshake, and the same
    /// session over the TLS stream.
    async fn start_tls(self, host: &str) -> Result<Session<'c, SslStream<S>>, SessionError> {
        let config = self.config;
        if !self.pending.is_empty() {
            // Anything the server sent after its 220 was sent in plain text
            // and must not be read as if it came over TLS (CVE-2011-0411).
            return Err(SessionError::TlsHandshake(
                "the server sent data after its STARTTLS reply".to_string(),
            ));
        }
        let ssl = tls_context(host, config)
            .await
            .map_err(SessionError::TlsHandshake)?;
        let mut stream = SslStream::new(ssl, self.stream)
            .map_err(|e| SessionError::TlsHandshake(e.to_string()))?;
        let after = config.command_timeout;
        match tokio::time::timeout(after, Pin::new(&mut stream).connect()).await {
            Err(_) => {
                return Err(SessionError::TlsHandshake(format!(
                    "timed out after {after:?}"
                )))
            }
            Ok(Err(e)) => {
                let verify = stream.ssl().verify_result();
                let detail = if verify == openssl::x509::X509VerifyResult::OK {
                    e.to_string()
                } else {
                    format!("{e} (certificate: {})", verify.error_string())
                };
                return Err(SessionError::TlsHandshake(detail));
            }
            Ok(Ok(())) => {}
        }
        tracing::debug!(
            version = stream.ssl().version_str(),
            cipher = stream.ssl().current_cipher().map_or("?", |c| c.name()),
            "TLS established"
        );
        Ok(Session::new(stream, config))
    }
}

impl Session<'_, Conn> {
    /// After a transaction: keep the connection for the next message when
    /// reuse is on and the message went through, else end it as usual.
    async fn release(
        mut self,
        result: Result<(), SessionError>,
        capabilities: Capabilities,
        tls: bool,
        key: CacheKey,
    ) -> Result<(), SessionError> {
        if self.config.reuse_connections
            && result.is_ok()
            && self.reusable
            && self.pending.is_empty()
        {
            idle_connections().put(
                key,
                Idle {
                    conn: self.stream,
                    capabilities,
                    tls,
                    since: std::time::Instant::now(),
                },
            );
            return result;
        }
        self.close_with(result).await
    }
}

/// Connectors per (verify, CA file): building one loads the system's trust
/// store, which costs tens of milliseconds with OpenSSL 3 — far more than the
/// handshake itself — so it is done once and shared.
type ConnectorCache =
    std::sync::Mutex<std::collections::HashMap<(bool, Option<std::path::PathBuf>), SslConnector>>;

fn connector_cache() -> &'static ConnectorCache {
    static CACHE: std::sync::OnceLock<ConnectorCache> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| std::sync::Mutex::new(std::collections::HashMap::new()))
}

async fn connector(config: &ClientConfig) -> Result<SslConnector, String> {
    let key = (
        config.verify_tls,
        if config.verify_tls {
            config.ca_file.clone()
        } else {
            None
        },
    );
    if let Some(c) = connector_cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        return Ok(c.clone());
    }
    let tls_error = |e: openssl::error::ErrorStack| e.to_string();
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(tls_error)?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(tls_error)?;
    if config.verify_tls {
        if let Some(path) = &config.ca_file {
            let pem = tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            let certs = X509::stack_from_pem(&pem)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            let mut store = X509StoreBuilder::new().map_err(tls_error)?;
            for cert in certs {
                store.add_cert(cert).map_err(tls_error)?;
            }
            // Only these anchors, not the system's as well.
            builder.set_cert_store(store.build());
        }
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    let built = builder.build();
    connector_cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, built.clone());
    Ok(built)
}

/// The client side TLS state for `host`, per the configuration.
async fn tls_context(host: &str, config: &ClientConfig) -> Result<openssl::ssl::Ssl, String> {
    let tls_error = |e: openssl::error::ErrorStack| e.to_string();
    // MX names come from DNS and may end in the root dot.
    let name = host.trim_end_matches('.');
    let connector = connector(config).await?;
    let mut configure = connector.configure().map_err(tls_error)?;
    // SNI carries host names only, never address literals (RFC 6066 §3).
    let is_address = name.parse::<std::net::IpAddr>().is_ok();
    configure.set_use_server_name_indication(!is_address);
    if !config.verify_tls {
        configure.set_verify_hostname(false);
    }
    configure.into_ssl(name).map_err(tls_error)
}

/// The DATA content as sent: line ends normalised to CRLF, dot-stuffed,
/// ending in CRLF (the "." line is sent separately).
struct DataContent<'a> {
    /// The message itself when it is already canonical (CRLF, nothing to
    /// stuff): large sealed messages are sent without a copy.
    wire: std::borrow::Cow<'a, [u8]>,
    /// Octets of the message proper (CRLF line ends, no stuffing): SIZE=.
    size: usize,
    eight_bit: bool,
}

impl<'a> DataContent<'a> {
    fn new(message: &'a [u8]) -> DataContent<'a> {
        if is_canonical(message) {
            return DataContent {
                wire: std::borrow::Cow::Borrowed(message),
                size: message.len(),
                eight_bit: message.iter().any(|&b| b >= 0x80),
            };
        }
        let mut wire = Vec::with_capacity(message.len() + message.len() / 32 + 8);
        let mut stuffed = 0;
        let mut at_line_start = true;
        let mut bytes = message.iter().peekable();
        while let Some(&b) = bytes.next() {
            match b {
                // CRLF, bare CR and bare LF all end a line, as CRLF: the
                // server must see exactly the lines we see (no bare CR or LF
                // that different servers would read differently).
                b'\r' => {
                    if bytes.peek() == Some(&&b'\n') {
                        bytes.next();
                    }
                    wire.extend_from_slice(b"\r\n");
                    at_line_start = true;
                }
                b'\n' => {
                    wire.extend_from_slice(b"\r\n");
                    at_line_start = true;
                }
                _ => {
                    if at_line_start && b == b'.' {
                        wire.push(b'.');
                        stuffed += 1;
                    }
                    wire.push(b);
                    at_line_start = false;
                }
            }
        }
        if !at_line_start {
            wire.extend_from_slice(b"\r\n");
        }
        DataContent {
            size: wire.len() - stuffed,
            eight_bit: message.iter().any(|&b| b >= 0x80),
            wire: std::borrow::Cow::Owned(wire),
        }
    }
}

/// Every line ends in CRLF (no bare CR or LF), the last one included, and
/// no line starts with a dot: the message goes on the wire as it is.
fn is_canonical(message: &[u8]) -> bool {
    if message.is_empty() || message[0] == b'.' || !message.ends_with(b"\r\n") {
        return message.is_empty();
    }
    let mut crs = memchr::memchr_iter(b'\r', message);
    for lf in memchr::memchr_iter(b'\n', message) {
        // Each LF must be the one right after the next CR.
        match crs.next() {
            Some(cr) if cr + 1 == lf => {}
            _ => return false,
        }
        if message.get(lf + 1) == Some(&b'.') {
            return false;
        }
    }
    crs.next().is_none()
}

/// Why `address` cannot go into a MAIL or RCPT command, if it cannot.
fn address_problem(address: &str) -> Option<&'static str> {
    if address.chars().any(char::is_control) {
        Some("it contains control characters")
    } else if address.contains(['<', '>']) {
        Some("it contains angle brackets")
    } else {
        None
    }
}

/// A configured name, stripped of anything that would end the command.
fn command_safe(name: &str) -> String {
    name.chars().filter(|c| !c.is_control()).collect()
}

/// The start of a bad line, for an error message.
fn excerpt(line: &[u8]) -> String {
    let end = line.len().min(80);
    printable(&String::from_utf8_lossy(
        line.get(..end).unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_messages_are_sent_as_they_are() {
        let cases: [&[u8]; 12] = [
            b"",
            b"a\r\n",
            b"a\r\nb\r\n",
            b"a\r\n.b\r\n",
            b".a\r\n",
            b"a\nb\r\n",
            b"a\rb\r\n",
            b"a\r\nb",
            b"a\r\r\n",
            b"a\r\n\r\n",
            b"x\r\n..\r\n",
            b"\r\n",
        ];
        for m in cases {
            let content = DataContent::new(m);
            let borrowed = matches!(content.wire, std::borrow::Cow::Borrowed(_));
            assert_eq!(borrowed, is_canonical(m), "{m:?}");
            if borrowed {
                assert_eq!(&*content.wire, m);
                assert_eq!(content.size, m.len());
            }
        }
        // What the fast path takes is exactly what the slow path would send.
        assert!(is_canonical(b"a\r\nb\r\n"));
        assert!(!is_canonical(b"a\r\n.b\r\n"));
        assert!(!is_canonical(b"a\nb\r\n"));
        assert!(!is_canonical(b"a\rb\r\n"));
        assert!(!is_canonical(b"a\r\nb"));
    }

    #[test]
    fn data_content_normalises_line_ends_and_stuffs_dots() {
        let content = DataContent::new(b"a\nb\r\n.c\r..\rd");
        assert_eq!(&*content.wire, b"a\r\nb\r\n..c\r\n...\r\nd\r\n");
        assert_eq!(content.size, content.wire.len() - 2);
        assert!(!content.eight_bit);
    }

    #[test]
    fn data_content_ends_with_crlf_and_sees_8bit() {
        assert_eq!(&*DataContent::new(b"").wire, b"");
        assert_eq!(&*DataContent::new(b"x\r\n").wire, b"x\r\n");
        assert!(DataContent::new("é\r\n".as_bytes()).eight_bit);
        // A message that is only a dot line must not end the DATA early.
        assert_eq!(&*DataContent::new(b".\r\n").wire, b"..\r\n");
    }

    #[test]
    fn reply_keeps_code_status_and_text() {
        let reply = Reply::parse(550, b"550-5.1.1 no such\r\n550 5.1.1 user\r\n".to_vec());
        assert_eq!(reply.code, 550);
        assert_eq!(reply.status, Some([5, 1, 1]));
        assert_eq!(reply.to_string(), "550 5.1.1 no such user");
        let plain = Reply::parse(250, b"250 ok\r\n".to_vec());
        assert_eq!(plain.to_string(), "250 ok");
        let bare = Reply::parse(250, b"250\r\n".to_vec());
        assert_eq!(bare.to_string(), "250");
    }

    #[test]
    fn reply_text_loses_control_characters() {
        let reply = Reply::parse(450, b"450 a\x1b[31mb\r\n".to_vec());
        assert!(!reply.to_string().contains('\x1b'));
    }

    #[test]
    fn capabilities_from_ehlo_and_from_keywords() {
        let raw = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 STARTTLS\r\n";
        let reply = Reply::parse(250, raw.to_vec());
        let expected = Capabilities {
            starttls: true,
            pipelining: true,
            eight_bit_mime: true,
            smtputf8: false,
            size: Some(1000),
        };
        assert_eq!(Capabilities::from_ehlo(&reply), expected);
        assert_eq!(Capabilities::from_keywords(raw), expected);
        let odd = b"250-mx.example\r\n250-SIZE lots\r\n250 starttls\r\n";
        let caps = Capabilities::from_ehlo(&Reply::parse(250, odd.to_vec()));
        assert!(caps.starttls);
        assert_eq!(caps.size, Some(0));
    }

    #[test]
    fn outcomes_classify_replies() {
        let reply = |code, text: &str| Reply::parse(code, format!("{code} {text}\r\n").into());
        assert!(Outcome::from_reply(&reply(250, "ok"), Stage::RcptTo).is_completed());
        let temporary = Outcome::from_reply(&reply(451, "4.3.0 later"), Stage::MailFrom);
        assert!(temporary.is_temporary());
        assert_eq!(
            temporary.reason(),
            Some("451 4.3.0 later (in reply to MAIL FROM)")
        );
        assert!(Outcome::from_reply(&reply(550, "no"), Stage::RcptTo).is_permanent());
        assert!(Outcome::from_reply(&reply(354, "go"), Stage::RcptTo).is_temporary());
        assert_eq!(
            Outcome::PermanentFailure("550 no".into()).to_string(),
            "permanent failure: 550 no"
        );
    }

    #[test]
    fn addresses_that_would_break_commands_are_refused() {
        assert!(address_problem("a@b.example").is_none());
        assert!(address_problem("").is_none());
        assert!(address_problem("a@b\r\nRCPT TO:<c@d>").is_some());
        assert!(address_problem("a>@b").is_some());
    }
}
