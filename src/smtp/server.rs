//! Inbound SMTP sessions: the state machine around `smtp-proto`'s request
//! parser, generic over the stream so STARTTLS can swap a TCP stream for a
//! TLS one. What is accepted is decided by an `SmtpHandler`.

use base64::Engine;
use smtp_proto::request::receiver::{DataReceiver, RequestReceiver};
use smtp_proto::{Error as ProtoError, Request, AUTH_LOGIN, AUTH_PLAIN};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Which listener a session belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Mail from other HISPs: local recipients only, no AUTH.
    Mx,
    /// Mail from edge clients: AUTH (after TLS) required.
    Submission,
}

/// An SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: String,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: status.to_string(),
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The wire form; multi-line text is sent as a multi-line reply, and
    /// control characters never reach the client.
    fn render(&self) -> Vec<u8> {
        let clean: String = self
            .text
            .chars()
            .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
            .collect();
        let lines: Vec<&str> = clean.lines().filter(|l| !l.trim().is_empty()).collect();
        let lines = if lines.is_empty() { vec![""] } else { lines };
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            // Keep each line well under the 512-octet limit of RFC 5321.
            let line: String = line.chars().take(400).collect();
            if self.status.is_empty() {
                out.push_str(&format!("{}{sep}{line}\r\n", self.code));
            } else {
                out.push_str(&format!("{}{sep}{} {line}\r\n", self.code, self.status));
            }
        }
        out.into_bytes()
    }
}

/// The envelope of one transaction.
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub auth_user: Option<String>,
    pub remote: Option<SocketAddr>,
    pub tls: bool,
    pub helo: String,
    /// The client is in `submission_trusted_networks`: it may submit
    /// without AUTH (an EHR relaying by IP, like Postfix's mynetworks).
    pub trusted_relay: bool,
}

/// An IP network (`192.0.2.0/24`, `::1/128`, or a single address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (e.g. 10.1.2.0/24)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0-{max}"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(i)) => {
                (u32::from(n) as u128, u32::from(i) as u128, 32)
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(i)) => {
                (u128::from(n), u128::from(i), 128)
            }
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        if shift >= 128 {
            return true;
        }
        (a >> shift) == (b >> shift)
    }
}

pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// What the server consults; implemented by the daemon (and by tests).
pub trait SmtpHandler: Send + Sync + 'static {
    /// The account name when the credentials are right.
    fn authenticate(&self, user: &str, password: &str) -> Option<String>;
    fn check_mail_from(
        &self,
        kind: ListenerKind,
        envelope: &Envelope,
        from: &str,
    ) -> Result<(), Reply>;
    fn check_rcpt(&self, kind: ListenerKind, envelope: &Envelope, rcpt: &str) -> Result<(), Reply>;
    /// Takes the message; replies 250 only once it is durably stored.
    fn data<'a>(
        &'a self,
        kind: ListenerKind,
        envelope: &'a Envelope,
        message: Vec<u8>,
    ) -> HandlerFuture<'a>;
}

/// Limits and identity of a listener.
#[derive(Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub kind: ListenerKind,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    /// Clients that may submit without AUTH (submission listener only).
    pub trusted_networks: Vec<Network>,
    /// When set, a large message is received only as fast as the memory
    /// budget allows (see [`crate::budget`]).
    pub memory: Option<Arc<crate::budget::MemoryBudget>>,
}

/// Session state that survives STARTTLS.
struct State {
    envelope: Envelope,
    helo_done: bool,
    in_transaction: bool,
    errors: u32,
}

enum Next {
    Close,
    StartTls,
}

const MAX_ERRORS: u32 = 20;

/// Runs a whole session on `stream`, upgrading to TLS on STARTTLS.
pub async fn serve_connection<H, S>(
    stream: S,
    remote: SocketAddr,
    config: Arc<SessionConfig>,
    handler: Arc<H>,
) where
    H: SmtpHandler,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let trusted_relay = config.kind == ListenerKind::Submission
        && config
            .trusted_networks
            .iter()
            .any(|n| n.contains(remote.ip()));
    let mut state = State {
        envelope: Envelope {
            remote: Some(remote),
            trusted_relay,
            ..Envelope::default()
        },
        helo_done: false,
        in_transaction: false,
        errors: 0,
    };
    let mut plain = stream;
    let greeting = Reply::new(220, "", format!("{} ESMTP hispd", config.hostname));
    if plain.write_all(&greeting.render()).await.is_err() {
        return;
    }
    match session(&mut plain, &mut state, &config, handler.as_ref()).await {
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
            if tokio::time::timeout(config.command_timeout, Pin::new(&mut tls).accept())
                .await
                .map(|r| r.is_err())
                .unwrap_or(true)
            {
                tracing::info!(%remote, "TLS handshake failed");
                return;
            }
            // RFC 3207: forget everything learnt before TLS.
            state.envelope = Envelope {
                remote: Some(remote),
                tls: true,
                trusted_relay,
                ..Envelope::default()
            };
            state.helo_done = false;
            state.in_transaction = false;
            let _ = session(&mut tls, &mut state, &config, handler.as_ref()).await;
        }
    }
}

async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    timeout: Duration,
) -> Option<usize> {
    match tokio::time::timeout(timeout, stream.read(buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => None,
        Ok(Ok(n)) => Some(n),
    }
}

/// Reads one line (for AUTH continuations), at most 2048 bytes.
async fn read_line<S: AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Option<String> {
    loop {
        if let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            return Some(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        if pending.len() > 2048 {
            return None;
        }
        let mut buf = [0u8; 1024];
        let n = read_some(stream, &mut buf, timeout).await?;
        pending.extend_from_slice(&buf[..n]);
    }
}

fn ehlo_reply(config: &SessionConfig, state: &State) -> Reply {
    let mut lines = vec![format!(
        "{} greets {}",
        config.hostname, state.envelope.helo
    )];
    lines.push("PIPELINING".into());
    lines.push(format!("SIZE {}", config.max_message_size));
    lines.push("8BITMIME".into());
    lines.push("ENHANCEDSTATUSCODES".into());
    if config.tls.is_some() && !state.envelope.tls {
        lines.push("STARTTLS".into());
    }
    if config.kind == ListenerKind::Submission && state.envelope.tls {
        lines.push("AUTH PLAIN LOGIN".into());
    }
    Reply::new(250, "", lines.join("\n"))
}

async fn session<S, H>(
    stream: &mut S,
    state: &mut State,
    config: &SessionConfig,
    handler: &H,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: SmtpHandler,
{
    let mut receiver = RequestReceiver::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if pending.is_empty() {
            let Some(n) = read_some(stream, &mut buf, config.command_timeout).await else {
                let _ = stream
                    .write_all(
                        &Reply::new(
                            421,
                            "4.4.2",
                            format!("{} timeout, closing", config.hostname),
                        )
                        .render(),
                    )
                    .await;
                return Next::Close;
            };
            pending.extend_from_slice(&buf[..n]);
        }
        let mut replies: Vec<u8> = Vec::new();
        let mut iter = pending.iter();
        let parsed = receiver.ingest(&mut iter).map(|r| r.into_owned());
        let consumed = pending.len() - iter.as_slice().len();
        pending.drain(..consumed);
        let request = match parsed {
            Ok(r) => r,
            Err(ProtoError::NeedsMoreData { .. }) => {
                // Wait for the rest of the line.
                let Some(n) = read_some(stream, &mut buf, config.command_timeout).await else {
                    return Next::Close;
                };
                pending.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e) => {
                state.errors += 1;
                let reply = match e {
                    ProtoError::UnknownCommand => {
                        Reply::new(500, "5.5.1", "command not recognized")
                    }
                    ProtoError::InvalidSenderAddress => {
                        Reply::new(501, "5.1.7", "bad sender address syntax")
                    }
                    ProtoError::InvalidRecipientAddress => {
                        Reply::new(501, "5.1.3", "bad recipient address syntax")
                    }
                    ProtoError::SyntaxError { syntax } => {
                        Reply::new(501, "5.5.2", format!("syntax: {syntax}"))
                    }
                    ProtoError::InvalidParameter { param } => {
                        Reply::new(501, "5.5.4", format!("invalid parameter {param}"))
                    }
                    ProtoError::UnsupportedParameter { param } => {
                        Reply::new(504, "5.5.4", format!("unsupported parameter {param}"))
                    }
                    ProtoError::ResponseTooLong => Reply::new(500, "5.5.6", "line too long"),
                    _ => Reply::new(500, "5.5.2", "syntax error"),
                };
                if stream.write_all(&reply.render()).await.is_err() || state.errors > MAX_ERRORS {
                    return Next::Close;
                }
                continue;
            }
        };
        let reply = match request {
            Request::Ehlo { host } => {
                state.envelope.helo = host;
                state.helo_done = true;
                state.in_transaction = false;
                ehlo_reply(config, state)
            }
            Request::Helo { host } => {
                state.envelope.helo = host;
                state.helo_done = true;
                state.in_transaction = false;
                Reply::new(250, "", format!("{} greets you", config.hostname))
            }
            Request::Lhlo { .. } => Reply::new(500, "5.5.1", "LHLO is for LMTP"),
            Request::StartTls => {
                if config.tls.is_none() || state.envelope.tls {
                    Reply::new(454, "4.7.0", "TLS not available")
                } else {
                    if stream
                        .write_all(&Reply::new(220, "2.0.0", "ready to start TLS").render())
                        .await
                        .is_err()
                    {
                        return Next::Close;
                    }
                    // Pipelined bytes after STARTTLS are a command injection attempt.
                    return Next::StartTls;
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                if config.kind != ListenerKind::Submission {
                    Reply::new(503, "5.5.1", "AUTH is not offered on this port")
                } else if !state.envelope.tls {
                    Reply::new(
                        538,
                        "5.7.11",
                        "encryption required: use STARTTLS before AUTH",
                    )
                } else if state.envelope.auth_user.is_some() {
                    Reply::new(503, "5.5.1", "already authenticated")
                } else {
                    match authenticate(
                        stream,
                        &mut pending,
                        config,
                        handler,
                        mechanism,
                        initial_response,
                    )
                    .await
                    {
                        Some(Ok(user)) => {
                            state.envelope.auth_user = Some(user);
                            Reply::new(235, "2.7.0", "authentication succeeded")
                        }
                        Some(Err(reply)) => {
                            state.errors += 1;
                            reply
                        }
                        None => return Next::Close,
                    }
                }
            }
            Request::Mail { from } => {
                if !state.helo_done {
                    Reply::new(503, "5.5.1", "send EHLO first")
                } else if state.in_transaction {
                    Reply::new(503, "5.5.1", "nested MAIL command")
                } else if config.kind == ListenerKind::Submission
                    && state.envelope.auth_user.is_none()
                    && !state.envelope.trusted_relay
                {
                    Reply::new(530, "5.7.0", "authentication required")
                } else if from.size > config.max_message_size {
                    Reply::new(
                        552,
                        "5.3.4",
                        format!(
                            "message too big: the limit is {} bytes",
                            config.max_message_size
                        ),
                    )
                } else {
                    match handler.check_mail_from(config.kind, &state.envelope, &from.address) {
                        Ok(()) => {
                            state.envelope.mail_from = from.address;
                            state.envelope.rcpt_to.clear();
                            state.in_transaction = true;
                            Reply::new(250, "2.1.0", "sender ok")
                        }
                        Err(r) => r,
                    }
                }
            }
            Request::Rcpt { to } => {
                if !state.in_transaction {
                    Reply::new(503, "5.5.1", "send MAIL first")
                } else if state.envelope.rcpt_to.len() >= config.max_recipients {
                    Reply::new(
                        452,
                        "4.5.3",
                        format!("too many recipients (at most {})", config.max_recipients),
                    )
                } else {
                    match handler.check_rcpt(config.kind, &state.envelope, &to.address) {
                        Ok(()) => {
                            state.envelope.rcpt_to.push(to.address);
                            Reply::new(250, "2.1.5", "recipient ok")
                        }
                        Err(r) => r,
                    }
                }
            }
            Request::Data => {
                if !state.in_transaction {
                    Reply::new(503, "5.5.1", "send MAIL first")
                } else if state.envelope.rcpt_to.is_empty() {
                    Reply::new(554, "5.5.1", "no valid recipients")
                } else {
                    if stream
                        .write_all(&Reply::new(354, "", "end data with <CR><LF>.<CR><LF>").render())
                        .await
                        .is_err()
                    {
                        return Next::Close;
                    }
                    let Some(message) = receive_data(stream, &mut pending, &mut buf, config).await
                    else {
                        return Next::Close;
                    };
                    let reply = match message {
                        Ok(message) => {
                            let envelope = state.envelope.clone();
                            handler.data(config.kind, &envelope, message).await
                        }
                        Err(too_big) => too_big,
                    };
                    state.in_transaction = false;
                    state.envelope.mail_from.clear();
                    state.envelope.rcpt_to.clear();
                    reply
                }
            }
            Request::Bdat { .. } => Reply::new(502, "5.5.1", "BDAT is not supported"),
            Request::Rset => {
                state.in_transaction = false;
                state.envelope.mail_from.clear();
                state.envelope.rcpt_to.clear();
                Reply::new(250, "2.0.0", "reset")
            }
            Request::Noop { .. } => Reply::new(250, "2.0.0", "ok"),
            Request::Quit => {
                let _ = stream
                    .write_all(&Reply::new(221, "2.0.0", "bye").render())
                    .await;
                return Next::Close;
            }
            Request::Vrfy { .. } | Request::Expn { .. } => Reply::new(
                252,
                "2.5.0",
                "cannot verify, but will accept and attempt delivery",
            ),
            Request::Help { .. } => Reply::new(214, "2.0.0", "see RFC 5321"),
            _ => Reply::new(502, "5.5.1", "command not implemented"),
        };
        replies.extend_from_slice(&reply.render());
        if stream.write_all(&replies).await.is_err() {
            return Next::Close;
        }
    }
}

/// Reads DATA until the final dot. `Err(reply)` when it is too big (the
/// rest is still read and discarded so the session stays in step).
async fn receive_data<S: AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    buf: &mut [u8],
    config: &SessionConfig,
) -> Option<Result<Vec<u8>, Reply>> {
    let mut receiver = DataReceiver::new();
    let mut message = Vec::new();
    let mut too_big = false;
    let mut next_check = config.memory.as_ref().map(|m| m.next_check(0));
    loop {
        let mut iter = pending.iter();
        let done = if too_big {
            let mut sink = Vec::new();
            receiver.ingest(&mut iter, &mut sink)
        } else {
            receiver.ingest(&mut iter, &mut message)
        };
        let consumed = pending.len() - iter.as_slice().len();
        pending.drain(..consumed);
        if message.len() > config.max_message_size {
            too_big = true;
            message = Vec::new();
        }
        if done {
            return Some(if too_big {
                Err(Reply::new(
                    552,
                    "5.3.4",
                    format!(
                        "message too big: the limit is {} bytes",
                        config.max_message_size
                    ),
                ))
            } else {
                Ok(message)
            });
        }
        if let (Some(memory), Some(at)) = (&config.memory, next_check) {
            let held = message.len() as u64;
            if held >= at && !too_big {
                // Within the client's 3-minute data block timeout (RFC 5321).
                let waited = memory
                    .wait_for_room(held, DATA_PAUSE_LIMIT.min(config.data_timeout))
                    .await;
                if !waited.is_zero() {
                    tracing::info!(
                        held,
                        in_delivery = memory.in_delivery(),
                        waited_ms = waited.as_millis() as u64,
                        "receiving paused for the memory budget"
                    );
                }
                next_check = Some(memory.next_check(held));
            }
        }
        let n = read_some(stream, buf, config.data_timeout).await?;
        pending.extend_from_slice(&buf[..n]);
    }
}

/// The longest a session stops reading DATA for the memory budget: below
/// the 3 minutes a client waits for a data block (RFC 5321 4.5.3.2.6), so a
/// slow delivery delays a sender but does not fail it.
const DATA_PAUSE_LIMIT: Duration = Duration::from_secs(120);

async fn authenticate<S: AsyncRead + AsyncWrite + Unpin, H: SmtpHandler>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    config: &SessionConfig,
    handler: &H,
    mechanism: u64,
    initial: String,
) -> Option<Result<String, Reply>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |s: &str| {
        b64.decode(s.trim())
            .ok()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    let cancelled = || Reply::new(501, "5.7.0", "authentication cancelled");
    let bad = || Reply::new(535, "5.7.8", "authentication credentials invalid");
    let (user, password) = if mechanism == AUTH_PLAIN {
        let response = if initial.is_empty() || initial == "=" {
            stream.write_all(b"334 \r\n").await.ok()?;
            let line = read_line(stream, pending, config.command_timeout).await?;
            if line == "*" {
                return Some(Err(cancelled()));
            }
            line
        } else {
            initial
        };
        let Some(decoded) = decode(&response) else {
            return Some(Err(Reply::new(501, "5.5.2", "bad base64 in AUTH PLAIN")));
        };
        let mut parts = decoded.split('\0');
        let _authzid = parts.next();
        match (parts.next(), parts.next()) {
            (Some(u), Some(p)) => (u.to_string(), p.to_string()),
            _ => {
                return Some(Err(Reply::new(
                    501,
                    "5.5.2",
                    "malformed AUTH PLAIN response",
                )))
            }
        }
    } else if mechanism == AUTH_LOGIN {
        let user = if initial.is_empty() {
            stream.write_all(b"334 VXNlcm5hbWU6\r\n").await.ok()?;
            let line = read_line(stream, pending, config.command_timeout).await?;
            if line == "*" {
                return Some(Err(cancelled()));
            }
            line
        } else {
            initial
        };
        stream.write_all(b"334 UGFzc3dvcmQ6\r\n").await.ok()?;
        let pass = read_line(stream, pending, config.command_timeout).await?;
        if pass == "*" {
            return Some(Err(cancelled()));
        }
        match (decode(&user), decode(&pass)) {
            (Some(u), Some(p)) => (u, p),
            _ => return Some(Err(Reply::new(501, "5.5.2", "bad base64 in AUTH LOGIN"))),
        }
    } else {
        return Some(Err(Reply::new(
            504,
            "5.5.4",
            "unsupported mechanism: use PLAIN or LOGIN",
        )));
    };
    Some(handler.authenticate(&user, &password).ok_or_else(bad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpStream;

    /// Accepts everything for local.example; remembers messages.
    struct TestHandler {
        messages: std::sync::Mutex<Vec<Vec<u8>>>,
    }

    impl SmtpHandler for TestHandler {
        fn authenticate(&self, user: &str, password: &str) -> Option<String> {
            (user == "u@local.example" && password == "secret-pw").then(|| user.to_string())
        }
        fn check_mail_from(&self, _: ListenerKind, _: &Envelope, _: &str) -> Result<(), Reply> {
            Ok(())
        }
        fn check_rcpt(&self, _: ListenerKind, _: &Envelope, rcpt: &str) -> Result<(), Reply> {
            if rcpt.ends_with("@local.example") {
                Ok(())
            } else {
                Err(Reply::new(550, "5.7.1", "relaying denied"))
            }
        }
        fn data<'a>(
            &'a self,
            _: ListenerKind,
            _: &'a Envelope,
            message: Vec<u8>,
        ) -> HandlerFuture<'a> {
            Box::pin(async move {
                self.messages.lock().unwrap().push(message);
                Reply::new(250, "2.0.0", "stored")
            })
        }
    }

    async fn start(kind: ListenerKind) -> (SocketAddr, Arc<TestHandler>) {
        start_with(kind, Vec::new()).await
    }

    async fn start_with(
        kind: ListenerKind,
        trusted_networks: Vec<Network>,
    ) -> (SocketAddr, Arc<TestHandler>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(TestHandler {
            messages: std::sync::Mutex::new(Vec::new()),
        });
        let config = Arc::new(SessionConfig {
            hostname: "mx.local.example".into(),
            kind,
            max_message_size: 1000,
            max_recipients: 3,
            tls: None,
            command_timeout: Duration::from_secs(5),
            data_timeout: Duration::from_secs(5),
            trusted_networks,
            memory: None,
        });
        let h = handler.clone();
        tokio::spawn(async move {
            while let Ok((stream, remote)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, remote, config.clone(), h.clone()));
            }
        });
        (addr, handler)
    }

    struct Client {
        reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
        writer: tokio::net::tcp::OwnedWriteHalf,
    }

    impl Client {
        async fn connect(addr: SocketAddr) -> Client {
            let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
            let mut c = Client {
                reader: BufReader::new(r),
                writer: w,
            };
            assert!(c.reply().await.starts_with("220"));
            c
        }
        /// The last line of the next reply.
        async fn reply(&mut self) -> String {
            loop {
                let mut line = String::new();
                self.reader.read_line(&mut line).await.unwrap();
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return line;
                }
            }
        }
        async fn cmd(&mut self, line: &str) -> String {
            self.writer
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .unwrap();
            self.reply().await
        }
    }

    #[tokio::test]
    async fn replies_to_bad_syntax_sequence_size_and_recipient_count() {
        let (addr, handler) = start(ListenerKind::Mx).await;
        let mut c = Client::connect(addr).await;
        assert!(
            c.cmd("MAIL FROM:<a@x.example>")
                .await
                .starts_with("503 5.5.1"),
            "MAIL before EHLO"
        );
        assert!(c.cmd("FROBNICATE").await.starts_with("500 5.5.1"));
        assert!(c.cmd("EHLO client.example").await.starts_with("250 "));
        assert!(
            c.cmd("RCPT TO:<b@local.example>").await.starts_with("503"),
            "RCPT before MAIL"
        );
        assert!(c.cmd("DATA").await.starts_with("503"), "DATA before MAIL");
        assert!(c.cmd("MAIL FROM:<not an address").await.starts_with("501"));
        assert!(c
            .cmd("MAIL FROM:<a@x.example> SIZE=5000")
            .await
            .starts_with("552 5.3.4"));
        assert!(c.cmd("MAIL FROM:<a@x.example>").await.starts_with("250"));
        assert!(
            c.cmd("MAIL FROM:<a@x.example>").await.starts_with("503"),
            "nested MAIL"
        );
        assert!(c
            .cmd("RCPT TO:<v@elsewhere.example>")
            .await
            .starts_with("550 5.7.1"));
        for i in 0..3 {
            assert!(c
                .cmd(&format!("RCPT TO:<r{i}@local.example>"))
                .await
                .starts_with("250"));
        }
        assert!(
            c.cmd("RCPT TO:<r4@local.example>")
                .await
                .starts_with("452 4.5.3"),
            "too many recipients"
        );
        assert!(c.cmd("DATA").await.starts_with("354"));
        let big = "x".repeat(80);
        for _ in 0..20 {
            c.writer
                .write_all(format!("{big}\r\n").as_bytes())
                .await
                .unwrap();
        }
        assert!(c.cmd(".").await.starts_with("552 5.3.4"), "oversize data");
        assert!(handler.messages.lock().unwrap().is_empty());
        // The session is still in step: a normal, pipelined transaction works.
        c.writer
            .write_all(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@local.example>\r\nDATA\r\n")
            .await
            .unwrap();
        assert!(c.reply().await.starts_with("250"));
        assert!(c.reply().await.starts_with("250"));
        assert!(c.reply().await.starts_with("354"));
        assert!(c
            .cmd("Subject: hi\r\n\r\n..dot-stuffed line\r\n.")
            .await
            .starts_with("250"));
        assert_eq!(
            handler.messages.lock().unwrap()[0],
            b"Subject: hi\r\n\r\n.dot-stuffed line\r\n".to_vec()
        );
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }

    #[test]
    fn networks_parse_and_match() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(!n.contains(ip("::1")));
        // IPv4-mapped IPv6 peers match IPv4 networks.
        assert!(n.contains(ip("::ffff:10.1.0.9")));
        let one: Network = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Network = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.7")));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("ten/8".parse::<Network>().is_err());
    }

    #[tokio::test]
    async fn trusted_networks_submit_without_auth() {
        let (addr, handler) = start_with(
            ListenerKind::Submission,
            vec!["127.0.0.0/8".parse().unwrap()],
        )
        .await;
        let mut c = Client::connect(addr).await;
        assert!(c.cmd("EHLO ehr.example").await.starts_with("250"));
        assert!(c
            .cmd("MAIL FROM:<u@local.example>")
            .await
            .starts_with("250"));
        assert!(c.cmd("RCPT TO:<b@local.example>").await.starts_with("250"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        assert!(c
            .cmd("Subject: hi\r\n\r\nbody\r\n.")
            .await
            .starts_with("250"));
        assert_eq!(handler.messages.lock().unwrap().len(), 1);
        // Another network is not trusted.
        let (addr, _) = start_with(
            ListenerKind::Submission,
            vec!["10.0.0.0/8".parse().unwrap()],
        )
        .await;
        let mut c = Client::connect(addr).await;
        assert!(c.cmd("EHLO ehr.example").await.starts_with("250"));
        assert!(c
            .cmd("MAIL FROM:<u@local.example>")
            .await
            .starts_with("530 5.7.0"));
    }

    #[tokio::test]
    async fn submission_needs_tls_before_auth_and_auth_before_mail() {
        let (addr, _) = start(ListenerKind::Submission).await;
        let mut c = Client::connect(addr).await;
        assert!(c.cmd("EHLO client.example").await.starts_with("250"));
        assert!(c
            .cmd("MAIL FROM:<u@local.example>")
            .await
            .starts_with("530 5.7.0"));
        assert!(c
            .cmd("AUTH PLAIN AHVAbG9jYWwuZXhhbXBsZQBzZWNyZXQtcHc=")
            .await
            .starts_with("538 5.7.11"));
        assert!(
            c.cmd("STARTTLS").await.starts_with("454"),
            "no TLS configured in this test"
        );
    }
}
