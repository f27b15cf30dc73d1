//! The outbound SMTP client against real servers on loopback: Postfix's
//! `smtp-sink` (package `postfix`) as an independent SMTP peer, and, where
//! smtp-sink cannot do it (STARTTLS, per-recipient replies, broken
//! servers), small scripted servers on real sockets.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::sink::{dump_files, SmtpSink};
use hispd::smtp::client::{deliver, ClientConfig, Envelope, Outcome, TlsPolicy};
use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod};
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

// ---------------------------------------------------------------- helpers

fn config(tls: TlsPolicy) -> ClientConfig {
    ClientConfig {
        helo_name: "client.test".to_string(),
        tls,
        verify_tls: false,
        ca_file: None,
        connect_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(20),
        data_timeout: Duration::from_secs(20),
        reuse_connections: false,
    }
}

fn recipients(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn envelope<'a>(rcpt_to: &'a [String]) -> Envelope<'a> {
    Envelope {
        mail_from: "alice@sender.test",
        rcpt_to,
        size: None,
    }
}

/// A port nothing listens on (just released by us).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn assert_all(report: &hispd::smtp::client::DeliveryReport, check: fn(&Outcome) -> bool) {
    assert!(!report.per_recipient.is_empty());
    for (recipient, outcome) in &report.per_recipient {
        assert!(check(outcome), "{recipient}: {outcome}");
    }
}

fn reason(outcome: &Outcome) -> &str {
    outcome.reason().unwrap_or_default()
}

/// The message as smtp-sink writes it to its dump: lines end in LF.
fn as_dumped(message: &[u8]) -> Vec<u8> {
    let text = message.to_vec();
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' => {
                if text.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                out.push(b'\n');
            }
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

// ------------------------------------------------------------- smtp-sink

/// Splits a dump into smtp-sink's own header lines and the message: the
/// message starts after the three-line `Received:` header smtp-sink adds.
fn split_dump(dump: &[u8]) -> (String, Vec<u8>) {
    let text = dump;
    let start = text
        .windows(10)
        .position(|w| w == b"Received: ")
        .expect("smtp-sink Received header");
    let mut end = start;
    for _ in 0..3 {
        end += text[end..]
            .iter()
            .position(|&b| b == b'\n')
            .expect("Received header line")
            + 1;
    }
    let headers = String::from_utf8_lossy(&text[..start]).into_owned();
    // smtp-sink ends each transaction with one empty line of its own.
    let message = text[end..text.len() - 1].to_vec();
    (headers, message)
}

// --------------------------------------------------------- smtp-sink tests

#[tokio::test]
async fn three_recipients_delivered_to_smtp_sink_arrive_intact() {
    let sink = SmtpSink::start(&[]);
    let to = recipients(&["bob@a.test", "carol@a.test", "dave@b.test"]);
    // 8-bit content (smtp-sink advertises 8BITMIME) and a final line
    // without its line end.
    let message = "From: alice@sender.test\r\nTo: bob@a.test\r\nSubject: three\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\r\nGrüße, line one\r\nline two\r\nno newline"
        .as_bytes();
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Opportunistic),
        &envelope(&to),
        message,
    )
    .await;

    assert_eq!(report.per_recipient.len(), 3);
    for ((recipient, outcome), expected) in report.per_recipient.iter().zip(&to) {
        assert_eq!(recipient, expected);
        assert_eq!(outcome, &Outcome::Completed);
    }
    assert!(report.all_completed());
    assert!(!report.tls, "smtp-sink does not offer STARTTLS");
    assert_eq!(
        report.server,
        format!("localhost[127.0.0.1]:{}", sink.addr.port())
    );

    let (headers, body) = split_dump(&sink.single_dump());
    assert_eq!(body, as_dumped(message));
    assert!(headers.contains("X-Helo-Args: client.test\n"), "{headers}");
    assert!(
        headers.contains("X-Mail-Args: <alice@sender.test> BODY=8BITMIME\n"),
        "{headers}"
    );
    let rcpts: Vec<&str> = headers
        .lines()
        .filter_map(|l| l.strip_prefix("X-Rcpt-Args: "))
        .collect();
    assert_eq!(rcpts, ["<bob@a.test>", "<carol@a.test>", "<dave@b.test>"]);
}

#[tokio::test]
async fn lines_starting_with_a_dot_arrive_unstuffed() {
    let sink = SmtpSink::start(&[]);
    let to = recipients(&["bob@a.test"]);
    // Bare LF and bare CR line ends too: they go out as CRLF.
    let message = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...three\nbare lf\n.after lf\rbare cr\r\n. \r\nend\r\n";
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        message,
    )
    .await;
    assert_all(&report, Outcome::is_completed);

    let (headers, body) = split_dump(&sink.single_dump());
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&as_dumped(message))
    );
    // 7-bit: no BODY parameter.
    assert!(
        headers.contains("X-Mail-Args: <alice@sender.test>\n"),
        "{headers}"
    );
}

#[tokio::test]
async fn null_reverse_path_is_sent_as_empty_brackets() {
    let sink = SmtpSink::start(&[]);
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &Envelope {
            mail_from: "",
            rcpt_to: &to,
            size: None,
        },
        b"Subject: bounce\r\n\r\nDSN\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    let (headers, _) = split_dump(&sink.single_dump());
    assert!(headers.contains("X-Mail-Args: <>\n"), "{headers}");
}

#[tokio::test]
async fn hard_rejected_recipients_fail_permanently_and_data_is_skipped() {
    let sink = SmtpSink::start(&["-f", "RCPT"]);
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_permanent);
    for (_, outcome) in &report.per_recipient {
        assert!(reason(outcome).starts_with("500 5.3.0"), "{outcome}");
        assert!(reason(outcome).contains("RCPT TO"), "{outcome}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let dumped: Vec<u8> = dump_files(sink.dumps.path())
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap_or_default())
        .collect();
    assert!(
        !String::from_utf8_lossy(&dumped).contains("body"),
        "no DATA without an accepted recipient"
    );
}

#[tokio::test]
async fn soft_rejected_recipients_fail_temporarily() {
    let sink = SmtpSink::start(&["-r", "RCPT"]);
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(reason(&report.per_recipient[0].1).starts_with("450 4.3.0"));
}

#[tokio::test]
async fn soft_rejected_mail_from_fails_every_recipient_temporarily() {
    let sink = SmtpSink::start(&["-r", "MAIL"]);
    let to = recipients(&["bob@a.test", "carol@a.test", "dave@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    for (_, outcome) in &report.per_recipient {
        assert!(reason(outcome).contains("MAIL FROM"), "{outcome}");
    }
}

#[tokio::test]
async fn hard_rejected_mail_from_fails_every_recipient_permanently() {
    let sink = SmtpSink::start(&["-f", "MAIL"]);
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_permanent);
}

#[tokio::test]
async fn hard_rejected_end_of_data_fails_permanently() {
    let sink = SmtpSink::start(&["-f", "."]);
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_permanent);
    assert!(reason(&report.per_recipient[0].1).contains("end of DATA"));
}

#[tokio::test]
async fn soft_rejected_data_fails_temporarily() {
    let sink = SmtpSink::start(&["-r", "DATA"]);
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(reason(&report.per_recipient[0].1).contains("in reply to DATA"));
}

#[tokio::test]
async fn a_421_and_disconnect_fails_temporarily() {
    let sink = SmtpSink::start(&["-Q", "RCPT"]);
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(reason(&report.per_recipient[0].1).starts_with("421"));
}

#[tokio::test]
async fn a_silent_disconnect_fails_temporarily() {
    let sink = SmtpSink::start(&["-q", "DATA"]);
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(
        reason(&report.per_recipient[0].1).contains("closed"),
        "{report:?}"
    );
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo() {
    let sink = SmtpSink::start(&["-f", "EHLO"]);
    let to = recipients(&["bob@a.test"]);
    let message = b"Subject: helo\r\n\r\nplain old SMTP\r\n";
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Opportunistic),
        &envelope(&to),
        message,
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    let (headers, body) = split_dump(&sink.single_dump());
    assert!(headers.contains("X-Client-Proto: SMTP\n"), "{headers}");
    assert_eq!(body, as_dumped(message));
}

#[tokio::test]
async fn tls_required_but_not_offered_fails_temporarily() {
    let sink = SmtpSink::start(&[]);
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        sink.addr,
        "localhost",
        &config(TlsPolicy::Required),
        &envelope(&to),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    for (_, outcome) in &report.per_recipient {
        assert!(reason(outcome).contains("STARTTLS"), "{outcome}");
    }
    assert!(!report.tls);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dump_files(sink.dumps.path()).is_empty(),
        "nothing sent in plain text"
    );
}

// ------------------------------------------------------- scripted servers

/// How a scripted server behaves.
#[derive(Clone, Default)]
struct Script {
    /// Offer STARTTLS with this acceptor.
    tls: Option<SslAcceptor>,
    pipelining: bool,
    size: Option<usize>,
    /// After the 220 to STARTTLS, also send this in plain text.
    inject_after_starttls: Option<&'static str>,
    /// Reply to DATA (default 354).
    data_reply: Option<&'static str>,
    /// Close the connection right after accepting a message (as a server
    /// whose idle timeout ends a cached connection).
    close_after_message: bool,
    /// Answer DATA with 354 even when no recipient was accepted (RFC 2920
    /// says 503 or 554; a lax server might not).
    lax_data: bool,
}

/// What a scripted server saw.
#[derive(Default, Debug)]
struct Seen {
    connections: usize,
    tls_sessions: usize,
    /// Every command line, as received, with "[tls]" before those over TLS.
    commands: Vec<String>,
    messages: Vec<Vec<u8>>,
    /// For each command, the complete lines that had already arrived
    /// behind it when it was read (those the client sent in the same group).
    behind: Vec<usize>,
}

struct ScriptedServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl ScriptedServer {
    async fn start(script: Script) -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                shared.lock().unwrap().connections += 1;
                tokio::spawn(serve(tcp, script.clone(), shared.clone()));
            }
        });
        ScriptedServer { addr, seen }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    fn commands(&self) -> Vec<String> {
        self.seen().commands.clone()
    }
}

enum Next {
    Done,
    StartTls,
}

async fn serve(tcp: tokio::net::TcpStream, script: Script, seen: Arc<Mutex<Seen>>) {
    let mut plain = BufReader::new(tcp);
    // A multi-line greeting: the client must read all of it.
    if plain
        .get_mut()
        .write_all(b"220-mx.test ESMTP scripted\r\n220 second greeting line\r\n")
        .await
        .is_err()
    {
        return;
    }
    if let Next::StartTls = converse(&mut plain, &script, &seen, false).await {
        let Some(acceptor) = &script.tls else { return };
        let ssl = Ssl::new(acceptor.context()).expect("ssl");
        let mut tls = tokio_openssl::SslStream::new(ssl, plain.into_inner()).expect("ssl stream");
        if Pin::new(&mut tls).accept().await.is_err() {
            return;
        }
        seen.lock().unwrap().tls_sessions += 1;
        converse(&mut BufReader::new(tls), &script, &seen, true).await;
    }
}

async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    script: &Script,
    seen: &Mutex<Seen>,
    in_tls: bool,
) -> Next {
    let mut accepted = 0;
    loop {
        let mut line = Vec::new();
        match stream.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return Next::Done,
            Ok(_) => {}
        }
        let command = String::from_utf8_lossy(&line).trim_end().to_string();
        let behind = stream.buffer().iter().filter(|&&b| b == b'\n').count();
        seen.lock().unwrap().behind.push(behind);
        seen.lock().unwrap().commands.push(if in_tls {
            format!("[tls] {command}")
        } else {
            command.clone()
        });
        let verb = command
            .split([' ', ':'])
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => {
                let mut r = String::from("250-mx.test\r\n250-8BITMIME\r\n");
                if script.pipelining {
                    r.push_str("250-PIPELINING\r\n");
                }
                if let Some(size) = script.size {
                    r.push_str(&format!("250-SIZE {size}\r\n"));
                }
                if script.tls.is_some() && !in_tls {
                    r.push_str("250-STARTTLS\r\n");
                }
                r.push_str("250 ENHANCEDSTATUSCODES\r\n");
                r
            }
            "HELO" | "RSET" | "NOOP" => "250 2.0.0 ok\r\n".into(),
            "STARTTLS" if script.tls.is_some() && !in_tls => {
                let mut r = String::from("220 2.0.0 ready to start TLS\r\n");
                if let Some(extra) = script.inject_after_starttls {
                    r.push_str(extra);
                }
                let _ = stream.get_mut().write_all(r.as_bytes()).await;
                return Next::StartTls;
            }
            "MAIL" => "250 2.1.0 sender ok\r\n".into(),
            "RCPT" => {
                let local = command
                    .split('<')
                    .nth(1)
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if local.starts_with("temp") {
                    "450 4.2.1 mailbox busy\r\n".into()
                } else if local.starts_with("perm") {
                    "550 5.1.1 no such user\r\n".into()
                } else if local.starts_with("multi") {
                    "550-5.7.1 first line of refusal\r\n550 5.7.1 second line of refusal\r\n".into()
                } else {
                    accepted += 1;
                    "250 2.1.5 recipient ok\r\n".into()
                }
            }
            "DATA" if accepted == 0 && !script.lax_data => {
                "554 5.5.1 no valid recipients\r\n".into()
            }
            "DATA" => {
                let data_reply = script.data_reply.unwrap_or("354 go ahead\r\n");
                let _ = stream.get_mut().write_all(data_reply.as_bytes()).await;
                if !data_reply.starts_with("354") {
                    continue;
                }
                let mut message = Vec::new();
                loop {
                    let mut line = Vec::new();
                    match stream.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return Next::Done,
                        Ok(_) => {}
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    let unstuffed = if line.starts_with(b".") {
                        &line[1..]
                    } else {
                        &line[..]
                    };
                    message.extend_from_slice(unstuffed);
                }
                seen.lock().unwrap().messages.push(message);
                accepted = 0;
                if script.close_after_message {
                    let _ = stream.get_mut().write_all(b"250 2.0.0 queued\r\n").await;
                    return Next::Done;
                }
                "250 2.0.0 queued\r\n".into()
            }
            "QUIT" => {
                let _ = stream.get_mut().write_all(b"221 2.0.0 bye\r\n").await;
                return Next::Done;
            }
            _ => "500 5.5.1 unknown command\r\n".into(),
        };
        if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return Next::Done;
        }
    }
}

/// A self-signed certificate for `name`, and a server acceptor using it.
fn self_signed(name: &str) -> (X509, SslAcceptor) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_text("CN", name).unwrap();
    let subject = subject.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&subject).unwrap();
    cert.set_issuer_name(&subject).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    let serial = openssl::bn::BigNum::from_u32(7).unwrap().to_asn1_integer();
    cert.set_serial_number(&serial.unwrap()).unwrap();
    let san = SubjectAlternativeName::new()
        .dns(name)
        .build(&cert.x509v3_context(None, None))
        .unwrap();
    cert.append_extension(san).unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    let cert = cert.build();

    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    acceptor.set_private_key(&key).unwrap();
    acceptor.set_certificate(&cert).unwrap();
    (cert, acceptor.build())
}

// ------------------------------------------------- scripted-server tests

#[tokio::test]
async fn starttls_is_used_when_offered() {
    let (_, acceptor) = self_signed("mx.test");
    let server = ScriptedServer::start(Script {
        tls: Some(acceptor),
        ..Script::default()
    })
    .await;
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let message = b"Subject: secret\r\n\r\nover TLS\r\n";
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Opportunistic),
        &envelope(&to),
        message,
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    assert!(report.tls);
    assert_eq!(server.seen().tls_sessions, 1);
    assert_eq!(server.seen().messages, vec![message.to_vec()]);
    let commands = server.commands();
    assert_eq!(commands[0], "EHLO client.test");
    assert_eq!(commands[1], "STARTTLS");
    // Everything after STARTTLS, starting with a fresh EHLO, is encrypted.
    assert_eq!(commands[2], "[tls] EHLO client.test");
    assert!(commands[2..].iter().all(|c| c.starts_with("[tls] ")));
}

#[tokio::test]
async fn verified_tls_with_a_ca_file_is_required_and_used() {
    let (cert, acceptor) = self_signed("mx.test");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, cert.to_pem().unwrap()).unwrap();
    let server = ScriptedServer::start(Script {
        tls: Some(acceptor),
        ..Script::default()
    })
    .await;
    let to = recipients(&["bob@a.test"]);
    let mut verified = config(TlsPolicy::Required);
    verified.verify_tls = true;
    verified.ca_file = Some(ca_file);

    // The MX name as DNS gives it, with the root dot.
    let report = deliver(
        server.addr,
        "mx.test.",
        &verified,
        &envelope(&to),
        b"Subject: v\r\n\r\nverified\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    assert!(report.tls);

    // The same certificate does not name another host.
    let report = deliver(
        server.addr,
        "other.test",
        &verified,
        &envelope(&to),
        b"Subject: v\r\n\r\nverified\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(
        reason(&report.per_recipient[0].1).contains("TLS handshake failed"),
        "{report:?}"
    );
    assert_eq!(server.seen().messages.len(), 1);
}

#[tokio::test]
async fn opportunistic_tls_falls_back_to_plain_text_when_the_handshake_fails() {
    let (_, acceptor) = self_signed("mx.test");
    let server = ScriptedServer::start(Script {
        tls: Some(acceptor),
        ..Script::default()
    })
    .await;
    let to = recipients(&["bob@a.test"]);
    let mut verifying = config(TlsPolicy::Opportunistic);
    // System roots do not know the self-signed certificate.
    verifying.verify_tls = true;
    let report = deliver(
        server.addr,
        "mx.test",
        &verifying,
        &envelope(&to),
        b"Subject: p\r\n\r\nplain\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    assert!(!report.tls);
    assert_eq!(server.seen().connections, 2);
    assert_eq!(server.seen().messages.len(), 1);
}

#[tokio::test]
async fn plain_text_injected_after_starttls_is_refused() {
    let (_, acceptor) = self_signed("mx.test");
    let server = ScriptedServer::start(Script {
        tls: Some(acceptor),
        inject_after_starttls: Some("250-injected\r\n250 PIPELINING\r\n"),
        ..Script::default()
    })
    .await;
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Required),
        &envelope(&to),
        b"Subject: i\r\n\r\ninjected\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(reason(&report.per_recipient[0].1).contains("after its STARTTLS reply"));
    assert!(server.seen().messages.is_empty());
}

#[tokio::test]
async fn tls_never_ignores_an_offered_starttls() {
    let (_, acceptor) = self_signed("mx.test");
    let server = ScriptedServer::start(Script {
        tls: Some(acceptor),
        ..Script::default()
    })
    .await;
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: n\r\n\r\nnever\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    assert!(!report.tls);
    assert!(!server.commands().iter().any(|c| c == "STARTTLS"));
}

#[tokio::test]
async fn each_recipient_keeps_its_own_outcome_with_pipelining() {
    let server = ScriptedServer::start(Script {
        pipelining: true,
        size: Some(1_000_000),
        ..Script::default()
    })
    .await;
    let to = recipients(&[
        "ok1@a.test",
        "temp@a.test",
        "perm@a.test",
        "multi@a.test",
        "ok2@a.test",
    ]);
    let message = "Subject: mixed\r\n\r\n8-bit: ü\r\n".as_bytes();
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        message,
    )
    .await;
    let outcome = |r: &str| report.outcome(r).cloned().expect("recipient in report");
    assert_eq!(outcome("ok1@a.test"), Outcome::Completed);
    assert_eq!(outcome("ok2@a.test"), Outcome::Completed);
    assert_eq!(
        outcome("temp@a.test"),
        Outcome::TemporaryFailure("450 4.2.1 mailbox busy (in reply to RCPT TO)".into())
    );
    assert_eq!(
        outcome("perm@a.test"),
        Outcome::PermanentFailure("550 5.1.1 no such user (in reply to RCPT TO)".into())
    );
    // A multi-line reply is read completely.
    assert_eq!(
        outcome("multi@a.test"),
        Outcome::PermanentFailure(
            "550 5.7.1 first line of refusal second line of refusal (in reply to RCPT TO)".into()
        )
    );
    assert_eq!(server.seen().messages, vec![message.to_vec()]);
    let commands = server.commands();
    assert_eq!(
        commands[1],
        format!(
            "MAIL FROM:<alice@sender.test> SIZE={} BODY=8BITMIME",
            message.len()
        )
    );
    let rcpts: Vec<&String> = commands.iter().filter(|c| c.starts_with("RCPT")).collect();
    assert_eq!(rcpts.len(), 5);
    assert_eq!(rcpts[0], "RCPT TO:<ok1@a.test>");
}

/// Delivers to two recipients the server refuses, one for now and one for
/// good: each keeps its own failure and the session ends with QUIT.
async fn both_recipients_refused(script: Script) -> ScriptedServer {
    let server = ScriptedServer::start(script).await;
    let to = recipients(&["temp@a.test", "perm@a.test"]);
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: none\r\n\r\nnobody\r\n",
    )
    .await;
    assert!(report.outcome("temp@a.test").unwrap().is_temporary());
    assert!(report.outcome("perm@a.test").unwrap().is_permanent());
    let commands = server.commands();
    assert_eq!(commands.last().map(String::as_str), Some("QUIT"));
    server
}

#[tokio::test]
async fn no_data_when_no_recipient_is_accepted() {
    let server = both_recipients_refused(Script::default()).await;
    let commands = server.commands();
    assert!(!commands.iter().any(|c| c == "DATA"), "{commands:?}");
}

#[tokio::test]
async fn with_pipelining_mail_rcpt_and_data_go_in_one_group() {
    let server = ScriptedServer::start(Script {
        pipelining: true,
        ..Script::default()
    })
    .await;
    let to = recipients(&["ok1@a.test", "ok2@a.test"]);
    let message = b"Subject: one group\r\n\r\nbody\r\n";
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        message,
    )
    .await;
    assert_all(&report, Outcome::is_completed);
    assert_eq!(server.seen().messages, vec![message.to_vec()]);
    let commands = server.commands();
    let mail = commands
        .iter()
        .position(|c| c.starts_with("MAIL"))
        .expect("MAIL sent");
    assert_eq!(
        &commands[mail..mail + 4],
        [
            "MAIL FROM:<alice@sender.test>",
            "RCPT TO:<ok1@a.test>",
            "RCPT TO:<ok2@a.test>",
            "DATA"
        ]
    );
    // RCPT, RCPT and DATA had arrived with MAIL: one write, one round trip.
    assert!(server.seen().behind[mail] >= 3, "{:?}", server.seen());
}

#[tokio::test]
async fn with_pipelining_and_no_recipient_accepted_the_refused_data_sends_nothing() {
    for lax_data in [false, true] {
        let server = both_recipients_refused(Script {
            pipelining: true,
            lax_data,
            ..Script::default()
        })
        .await;
        let commands = server.commands();
        assert!(commands.iter().any(|c| c == "DATA"), "{commands:?}");
        // A server that took DATA anyway got an empty message, not this one.
        let expected: Vec<Vec<u8>> = if lax_data {
            vec![Vec::new()]
        } else {
            Vec::new()
        };
        assert_eq!(server.seen().messages, expected, "lax: {lax_data}");
    }
}

#[tokio::test]
async fn refused_data_fails_accepted_recipients_only() {
    let server = ScriptedServer::start(Script {
        data_reply: Some("452 4.3.1 insufficient system storage\r\n"),
        ..Script::default()
    })
    .await;
    let to = recipients(&["ok@a.test", "perm@a.test"]);
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: d\r\n\r\nstorage\r\n",
    )
    .await;
    assert_eq!(
        report.outcome("ok@a.test"),
        Some(&Outcome::TemporaryFailure(
            "452 4.3.1 insufficient system storage (in reply to DATA)".into()
        ))
    );
    assert!(report.outcome("perm@a.test").unwrap().is_permanent());
}

#[tokio::test]
async fn a_message_over_the_advertised_size_is_not_sent() {
    let server = ScriptedServer::start(Script {
        size: Some(10),
        ..Script::default()
    })
    .await;
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: big\r\n\r\nmore than ten bytes\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_permanent);
    assert!(reason(&report.per_recipient[0].1).contains("SIZE"));
    assert!(!server.commands().iter().any(|c| c.starts_with("MAIL")));
}

#[tokio::test]
async fn addresses_that_would_inject_commands_are_not_sent() {
    let server = ScriptedServer::start(Script::default()).await;
    let to = recipients(&["bob@a.test\r\nRCPT TO:<evil@x.test>", "carol@a.test"]);
    let report = deliver(
        server.addr,
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&to),
        b"Subject: s\r\n\r\nsafe\r\n",
    )
    .await;
    assert!(report.per_recipient[0].1.is_permanent());
    assert_eq!(report.per_recipient[1].1, Outcome::Completed);
    assert!(!server.commands().iter().any(|c| c.contains("evil")));
}

#[tokio::test]
async fn no_recipients_means_no_connection() {
    let report = deliver(
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        "mx.test",
        &config(TlsPolicy::Never),
        &envelope(&[]),
        b"Subject: s\r\n\r\nx\r\n",
    )
    .await;
    assert!(report.per_recipient.is_empty());
}

// ------------------------------------------------------- broken servers

#[tokio::test]
async fn connection_refused_fails_every_recipient_temporarily() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let report = deliver(
        addr,
        "mx.test",
        &config(TlsPolicy::Opportunistic),
        &envelope(&to),
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    assert!(
        reason(&report.per_recipient[0].1).contains("refused"),
        "{report:?}"
    );
    assert!(!report.tls);
}

/// A server that sends `bytes` on every connection and then holds it open
/// without reading or writing anything more.
async fn raw_server(bytes: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let _ = tcp.write_all(&bytes).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(tcp);
            });
        }
    });
    addr
}

async fn deliver_to_broken(bytes: Vec<u8>) -> hispd::smtp::client::DeliveryReport {
    let addr = raw_server(bytes).await;
    let to = recipients(&["bob@a.test", "carol@a.test"]);
    let mut impatient = config(TlsPolicy::Opportunistic);
    impatient.command_timeout = Duration::from_secs(1);
    let report = deliver(
        addr,
        "mx.test",
        &impatient,
        &envelope(&to),
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
    report
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let report = deliver_to_broken(Vec::new()).await;
    assert!(
        reason(&report.per_recipient[0].1).contains("timed out"),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_server_that_stops_answering_after_the_greeting_times_out() {
    let report = deliver_to_broken(b"220 mx.test ESMTP\r\n".to_vec()).await;
    assert!(
        reason(&report.per_recipient[0].1)
            .contains("timed out after 1s waiting for the reply to EHLO"),
        "{report:?}"
    );
}

#[tokio::test]
async fn garbage_instead_of_a_greeting_is_a_bad_reply() {
    let report = deliver_to_broken(b"\x00\xffHELLO? this is not SMTP\r\n".to_vec()).await;
    assert!(
        reason(&report.per_recipient[0].1).contains("bad reply"),
        "{report:?}"
    );
}

#[tokio::test]
async fn an_endless_line_is_a_bad_reply() {
    let mut bytes = b"220 ".to_vec();
    bytes.extend(std::iter::repeat_n(b'a', 100_000));
    let report = deliver_to_broken(bytes).await;
    assert!(
        reason(&report.per_recipient[0].1).contains("longer than"),
        "{report:?}"
    );
}

#[tokio::test]
async fn an_endless_multi_line_reply_is_a_bad_reply() {
    let bytes = b"220-more\r\n".repeat(1000);
    let report = deliver_to_broken(bytes).await;
    assert!(
        reason(&report.per_recipient[0].1).contains("more than 100 lines"),
        "{report:?}"
    );
}

#[tokio::test]
async fn mixed_codes_in_one_reply_are_a_bad_reply() {
    let report = deliver_to_broken(b"220-hello\r\n554 go away\r\n".to_vec()).await;
    assert!(
        reason(&report.per_recipient[0].1).contains("bad reply"),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_refusing_greeting_fails_temporarily() {
    let report = deliver_to_broken(b"554 5.7.1 no service for you\r\n".to_vec()).await;
    assert_eq!(
        reason(&report.per_recipient[0].1),
        "554 5.7.1 no service for you (in reply to the greeting)"
    );
}

#[tokio::test]
async fn a_server_that_hangs_up_at_once_fails_temporarily() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    let to = recipients(&["bob@a.test"]);
    let report = deliver(
        addr,
        "mx.test",
        &config(TlsPolicy::Opportunistic),
        &envelope(&to),
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    assert_all(&report, Outcome::is_temporary);
}

#[tokio::test]
async fn with_reuse_one_tls_connection_carries_several_messages() {
    let (_, acceptor) = self_signed("mx.test");
    let server = ScriptedServer::start(Script {
        tls: Some(acceptor),
        pipelining: true,
        ..Script::default()
    })
    .await;
    let mut cfg = config(TlsPolicy::Opportunistic);
    cfg.reuse_connections = true;
    // A HELO name of its own: the cache is process-wide.
    cfg.helo_name = "reuse-tls.test".into();
    let to = recipients(&["bob@a.test"]);
    for i in 0..3 {
        let message = format!("Subject: {i}\r\n\r\nbody {i}\r\n");
        let report = deliver(
            server.addr,
            "mx.test",
            &cfg,
            &envelope(&to),
            message.as_bytes(),
        )
        .await;
        assert_all(&report, Outcome::is_completed);
        assert!(report.tls, "message {i} went over TLS");
    }
    assert_eq!(server.seen().connections, 1);
    assert_eq!(server.seen().tls_sessions, 1);
    assert_eq!(server.seen().messages.len(), 3);
    let commands = server.commands();
    assert_eq!(
        commands.iter().filter(|c| c.contains("MAIL FROM")).count(),
        3
    );
    assert_eq!(commands.iter().filter(|c| c.contains("EHLO")).count(), 2);
    assert!(!commands.iter().any(|c| c.contains("QUIT")));
}

#[tokio::test]
async fn a_cached_connection_the_server_closed_is_replaced_without_failing() {
    let server = ScriptedServer::start(Script {
        close_after_message: true,
        ..Script::default()
    })
    .await;
    let mut cfg = config(TlsPolicy::Never);
    cfg.reuse_connections = true;
    cfg.helo_name = "reuse-stale.test".into();
    let to = recipients(&["bob@a.test"]);
    for i in 0..3 {
        let report = deliver(
            server.addr,
            "mx.test",
            &cfg,
            &envelope(&to),
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
        assert_all(&report, Outcome::is_completed);
        assert_eq!(server.seen().messages.len(), i + 1);
    }
    assert_eq!(server.seen().connections, 3);
}

#[tokio::test]
async fn without_reuse_each_message_has_its_own_connection_and_quit() {
    let server = ScriptedServer::start(Script::default()).await;
    let to = recipients(&["bob@a.test"]);
    for _ in 0..2 {
        let report = deliver(
            server.addr,
            "mx.test",
            &config(TlsPolicy::Never),
            &envelope(&to),
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
        assert_all(&report, Outcome::is_completed);
    }
    assert_eq!(server.seen().connections, 2);
    assert_eq!(server.commands().iter().filter(|c| *c == "QUIT").count(), 2);
}
