//! The POP3 server against real clients on loopback: Python's `poplib`,
//! curl's pop3 support, and a raw socket for what clients never send
//! (garbage, over-long lines, unknown commands).

use base64::Engine;
use hispd::edge::pop3::listen;
use hispd::edge::{EdgeBackend, EdgeConfig};
use hispd::store::{SledStore, Storage};
use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509NameBuilder, X509};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ACCOUNT: &str = "bob@b.example";
const PASSWORD: &str = "bob-password-1";

// ---------------------------------------------------------------- backend

struct TestBackend {
    store: SledStore,
    fetched: Mutex<Vec<(String, u64)>>,
    changes: tokio::sync::broadcast::Sender<String>,
}

impl EdgeBackend for TestBackend {
    fn authenticate(&self, user: &str, password: &str) -> Option<String> {
        (user.eq_ignore_ascii_case(ACCOUNT) && password == PASSWORD).then(|| ACCOUNT.to_string())
    }
    fn storage(&self) -> &dyn Storage {
        &self.store
    }
    fn fetched(&self, mailbox: &str, uid: u64) {
        self.fetched
            .lock()
            .unwrap()
            .push((mailbox.to_string(), uid));
    }
    fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }
}

impl TestBackend {
    fn fetched(&self) -> Vec<(String, u64)> {
        self.fetched.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- messages

fn message_1() -> Vec<u8> {
    b"From: Alice Clinician <alice@a.example>\r\n\
To: Bob <bob@b.example>\r\n\
Subject: Appointment reminder\r\n\
Date: Mon, 2 Jun 2025 09:00:00 +0000\r\n\
Message-ID: <m1@a.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
Your appointment is on Tuesday at 10:00.\r\n"
        .to_vec()
}

/// Real MIME with the awkward parts: lines starting with ".", a line that
/// is only ".", a line of 990 octets, a base64 attachment.
fn message_2() -> Vec<u8> {
    let ccda = "<?xml version=\"1.0\"?><ClinicalDocument xmlns=\"urn:hl7-org:v3\">\
<title>Discharge summary</title></ClinicalDocument>"
        .repeat(6);
    let encoded = base64::engine::general_purpose::STANDARD.encode(ccda);
    let mut attachment = String::new();
    for chunk in encoded.as_bytes().chunks(76) {
        attachment.push_str(std::str::from_utf8(chunk).unwrap());
        attachment.push_str("\r\n");
    }
    let long_line: String = (0..990)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    format!(
        "From: Alice Clinician <alice@a.example>\r\n\
To: Bob <bob@b.example>\r\n\
Subject: Discharge summary\r\n\
Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n\
Message-ID: <m2@a.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"part-boundary-1\"\r\n\
\r\n\
This is a multi-part message in MIME format.\r\n\
\r\n\
--part-boundary-1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
Dear Bob,\r\n\
.this line starts with a dot\r\n\
..and this one with two\r\n\
.\r\n\
{long_line}\r\n\
Regards, Alice\r\n\
\r\n\
--part-boundary-1\r\n\
Content-Type: application/xml; name=\"ccda.xml\"\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment; filename=\"ccda.xml\"\r\n\
\r\n\
{attachment}\
--part-boundary-1--\r\n"
    )
    .into_bytes()
}

/// Stored with bare LF line ends: POP3 sends (and counts) CRLF.
fn message_3() -> Vec<u8> {
    b"From: Carol <carol@c.example>\n\
To: Bob <bob@b.example>\n\
Subject: Lab results\n\
Message-ID: <m3@c.example>\n\
MIME-Version: 1.0\n\
Content-Type: text/plain; charset=us-ascii\n\
\n\
All values are within the normal range.\n\
.\n"
    .to_vec()
}

fn messages() -> Vec<Vec<u8>> {
    vec![message_1(), message_2(), message_3()]
}

/// A message as POP3 sends it: CRLF line ends.
fn on_the_wire(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &b) in message.iter().enumerate() {
        if b == b'\n' && (i == 0 || message[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// A message split into lines as poplib returns them.
fn lines_of(message: &[u8]) -> Vec<Vec<u8>> {
    let wire = on_the_wire(message);
    let text = wire.strip_suffix(b"\r\n").unwrap_or(&wire);
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
        lines.push(rest[..pos].to_vec());
        rest = &rest[pos + 2..];
    }
    lines.push(rest.to_vec());
    lines
}

// ---------------------------------------------------------------- server

struct Server {
    addr: SocketAddr,
    backend: Arc<TestBackend>,
    _dir: tempfile::TempDir,
}

fn start(tls: Option<SslAcceptor>, timeout: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    for (i, m) in messages().iter().enumerate() {
        store
            .deliver_local(ACCOUNT, Some(&format!("<m{}@test>", i + 1)), m)
            .unwrap();
    }
    let (changes, _) = tokio::sync::broadcast::channel(16);
    let backend = Arc::new(TestBackend {
        store,
        fetched: Mutex::new(Vec::new()),
        changes,
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Arc::new(EdgeConfig {
        hostname: "pop.b.example".to_string(),
        tls: tls.map(Arc::new),
        timeout,
    });
    let served = backend.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            listen(listener, config, served).await;
        });
    });
    Server {
        addr,
        backend,
        _dir: dir,
    }
}

/// A self-signed certificate for `name`, and a server acceptor using it.
fn self_signed(name: &str) -> SslAcceptor {
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
    let serial = openssl::bn::BigNum::from_u32(3).unwrap().to_asn1_integer();
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
    acceptor.build()
}

/// Runs a Python script; its stdout is JSON.
fn python(script: &str, port: u16) -> serde_json::Value {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(port.to_string())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Bytes poplib returned, carried through JSON as latin-1 text.
fn latin1(value: &serde_json::Value) -> Vec<u8> {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap())
        .collect()
}

fn latin1_lines(value: &serde_json::Value) -> Vec<Vec<u8>> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(latin1)
        .collect()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    latin1_lines(value)
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect()
}

fn curl(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A POP3 client on a raw socket, for what real clients never send.
struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = raw.line();
        assert!(greeting.starts_with("+OK"), "{greeting}");
        assert!(!greeting.contains('<'), "no APOP timestamp: {greeting}");
        raw
    }
    fn line(&mut self) -> String {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).unwrap();
        String::from_utf8_lossy(&line).into_owned()
    }
    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }
    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.line()
    }
    /// The lines of a multi-line reply after the status line, unstuffed.
    fn body(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            let line = line.trim_end_matches("\r\n");
            if line == "." {
                return lines;
            }
            lines.push(line.strip_prefix('.').unwrap_or(line).to_string());
        }
    }
    fn login(&mut self) {
        assert!(self.cmd(&format!("USER {ACCOUNT}")).starts_with("+OK"));
        let reply = self.cmd(&format!("PASS {PASSWORD}"));
        assert!(reply.starts_with("+OK"), "{reply}");
    }
}

// ---------------------------------------------------------------- tests

const POPLIB_SESSION: &str = r#"
import json, poplib, sys
port = int(sys.argv[1])
def text(b): return b.decode('latin-1')
def lines(ls): return [text(l) for l in ls]
out = {}
p = poplib.POP3('127.0.0.1', port, timeout=20)
out['welcome'] = text(p.getwelcome())
out['capa'] = sorted(p.capa().keys())
p.user('bob@b.example')
p.pass_('bob-password-1')
out['stat'] = list(p.stat())
resp, ls, _ = p.list()
out['list'] = lines(ls)
out['list_2'] = text(p.list(2))
resp, ls, _ = p.uidl()
out['uidl'] = lines(ls)
out['uidl_3'] = text(p.uidl(3))
out['retr'] = []
for n in (1, 2, 3):
    resp, ls, octets = p.retr(n)
    out['retr'].append({'lines': lines(ls), 'octets': octets})
resp, ls, _ = p.top(2, 0)
out['top_0'] = lines(ls)
resp, ls, _ = p.top(2, 3)
out['top_3'] = lines(ls)
out['dele'] = text(p.dele(1))
try:
    p.retr(1)
    out['retr_deleted'] = 'accepted'
except poplib.error_proto as e:
    out['retr_deleted'] = str(e)
out['quit'] = text(p.quit())

p = poplib.POP3('127.0.0.1', port, timeout=20)
p.user('bob@b.example')
p.pass_('bob-password-1')
out['stat_after'] = list(p.stat())
resp, ls, _ = p.uidl()
out['uidl_after'] = lines(ls)
resp, ls, _ = p.retr(1)
out['retr_after'] = lines(ls)
p.quit()

for user, password in (('bob@b.example', 'wrong-password'), ('nobody@b.example', 'bob-password-1')):
    p = poplib.POP3('127.0.0.1', port, timeout=20)
    p.user(user)
    try:
        p.pass_(password)
        out.setdefault('bad_login', []).append('accepted')
    except poplib.error_proto as e:
        out.setdefault('bad_login', []).append(e.args[0].decode('latin-1'))
    p.quit()
print(json.dumps(out))
"#;

#[test]
fn poplib_reads_deletes_and_sees_stable_uids() {
    let server = start(None, Duration::from_secs(60));
    let out = python(POPLIB_SESSION, server.addr.port());
    let messages = messages();
    let sizes: Vec<usize> = messages.iter().map(|m| on_the_wire(m).len()).collect();
    let total: usize = sizes.iter().sum();

    let capa = strings(&out["capa"]);
    for cap in [
        "USER",
        "UIDL",
        "TOP",
        "PIPELINING",
        "RESP-CODES",
        "IMPLEMENTATION",
    ] {
        assert!(
            capa.contains(&cap.to_string()),
            "CAPA lacks {cap}: {capa:?}"
        );
    }
    assert!(
        !capa.contains(&"STLS".to_string()),
        "no TLS configured: {capa:?}"
    );
    assert_eq!(out["stat"], serde_json::json!([3, total]));
    let list: Vec<String> = (0..3).map(|i| format!("{} {}", i + 1, sizes[i])).collect();
    assert_eq!(strings(&out["list"]), list);
    assert_eq!(out["list_2"], format!("+OK 2 {}", sizes[1]));
    // The store UIDs, in order.
    assert_eq!(strings(&out["uidl"]), ["1 1", "2 2", "3 3"]);
    assert_eq!(out["uidl_3"], "+OK 3 3");

    for (i, message) in messages.iter().enumerate() {
        let retr = &out["retr"][i];
        assert_eq!(
            latin1_lines(&retr["lines"]),
            lines_of(message),
            "RETR {} differs from the delivered message",
            i + 1
        );
        assert_eq!(retr["octets"], sizes[i], "octets of RETR {}", i + 1);
    }
    let message_2 = lines_of(&messages[1]);
    let blank = message_2.iter().position(|l| l.is_empty()).unwrap();
    assert_eq!(latin1_lines(&out["top_0"]), message_2[..=blank].to_vec());
    assert_eq!(latin1_lines(&out["top_3"]), message_2[..blank + 4].to_vec());

    assert!(out["dele"].as_str().unwrap().starts_with("+OK"));
    assert!(
        out["retr_deleted"].as_str().unwrap().contains("-ERR"),
        "{}",
        out["retr_deleted"]
    );
    assert!(out["quit"].as_str().unwrap().starts_with("+OK"));

    // Message 1 is gone for good; the others keep their unique-ids.
    assert_eq!(
        out["stat_after"],
        serde_json::json!([2, sizes[1] + sizes[2]])
    );
    assert_eq!(strings(&out["uidl_after"]), ["1 2", "2 3"]);
    assert_eq!(latin1_lines(&out["retr_after"]), lines_of(&messages[1]));
    let stored: Vec<u64> = server
        .backend
        .store
        .mailbox(ACCOUNT)
        .unwrap()
        .iter()
        .map(|e| e.uid)
        .collect();
    assert_eq!(stored, [2, 3]);

    // Wrong password and unknown user: the same [AUTH] answer.
    let bad = strings(&out["bad_login"]);
    assert_eq!(bad.len(), 2);
    assert!(bad[0].starts_with("-ERR [AUTH]"), "{bad:?}");
    assert_eq!(
        bad[0], bad[1],
        "the reply must not tell whether the user exists"
    );

    // Every RETR (and only RETR, not TOP) was reported as fetched.
    let fetched = server.backend.fetched();
    let expected: Vec<(String, u64)> = [1, 2, 3, 2]
        .iter()
        .map(|uid| (ACCOUNT.to_string(), *uid))
        .collect();
    assert_eq!(fetched, expected);
    // RETR marks the message read for IMAP clients; TOP does not.
    let entries = server.backend.store.mailbox(ACCOUNT).unwrap();
    assert!(entries
        .iter()
        .all(|e| e.flags.contains(&"\\Seen".to_string())));
}

#[test]
fn curl_lists_and_retrieves() {
    let server = start(None, Duration::from_secs(60));
    let port = server.addr.port();
    let user = format!("{ACCOUNT}:{PASSWORD}");
    let sizes: Vec<usize> = messages().iter().map(|m| on_the_wire(m).len()).collect();

    let (ok, list, err) = curl(&[&format!("pop3://127.0.0.1:{port}/"), "--user", &user]);
    assert!(ok, "curl LIST: {err}");
    let expected: String = (0..3)
        .map(|i| format!("{} {}\r\n", i + 1, sizes[i]))
        .collect();
    assert_eq!(String::from_utf8_lossy(&list), expected);

    let (ok, body, err) = curl(&[&format!("pop3://127.0.0.1:{port}/2"), "--user", &user]);
    assert!(ok, "curl RETR: {err}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&message_2()),
        "curl's RETR 2 differs from the delivered message"
    );
    assert_eq!(body, message_2());
    assert_eq!(server.backend.fetched(), [(ACCOUNT.to_string(), 2)]);

    let (ok, _, _) = curl(&[
        &format!("pop3://127.0.0.1:{port}/"),
        "--user",
        &format!("{ACCOUNT}:not-the-password"),
    ]);
    assert!(!ok, "curl must fail with a wrong password");
}

const POPLIB_STLS: &str = r#"
import json, poplib, ssl, sys
port = int(sys.argv[1])
out = {}
p = poplib.POP3('127.0.0.1', port, timeout=20)
out['capa_plain'] = sorted(p.capa().keys())
try:
    p.user('bob@b.example')
    out['user_plain'] = 'accepted'
except poplib.error_proto as e:
    out['user_plain'] = e.args[0].decode('latin-1')
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
out['stls'] = p.stls(context=ctx).decode('latin-1')
out['capa_tls'] = sorted(p.capa().keys())
p.user('bob@b.example')
out['pass'] = p.pass_('bob-password-1').decode('latin-1')
out['stat'] = list(p.stat())
resp, ls, _ = p.retr(3)
out['retr'] = [l.decode('latin-1') for l in ls]
out['quit'] = p.quit().decode('latin-1')
print(json.dumps(out))
"#;

#[test]
fn stls_is_required_for_login_when_tls_is_configured() {
    let server = start(Some(self_signed("pop.b.example")), Duration::from_secs(60));
    let port = server.addr.port();
    let user = format!("{ACCOUNT}:{PASSWORD}");

    let (ok, list, err) = curl(&[
        "--ssl-reqd",
        "-k",
        &format!("pop3://127.0.0.1:{port}/"),
        "--user",
        &user,
    ]);
    assert!(ok, "curl over STLS: {err}");
    assert_eq!(String::from_utf8_lossy(&list).lines().count(), 3);

    let (ok, body, err) = curl(&[
        "--ssl-reqd",
        "-k",
        &format!("pop3://127.0.0.1:{port}/2"),
        "--user",
        &user,
    ]);
    assert!(ok, "curl RETR over STLS: {err}");
    assert_eq!(body, message_2());

    // Without TLS, curl finds no way to log in.
    let (ok, list, _) = curl(&[&format!("pop3://127.0.0.1:{port}/"), "--user", &user]);
    assert!(!ok && list.is_empty(), "plaintext login must not work");

    let out = python(POPLIB_STLS, port);
    let capa_plain = strings(&out["capa_plain"]);
    assert!(capa_plain.contains(&"STLS".to_string()), "{capa_plain:?}");
    assert!(!capa_plain.contains(&"USER".to_string()), "{capa_plain:?}");
    let refused = out["user_plain"].as_str().unwrap();
    assert!(refused.starts_with("-ERR"), "USER before STLS: {refused}");
    assert!(refused.contains("STLS"), "the refusal says why: {refused}");
    assert!(out["stls"].as_str().unwrap().starts_with("+OK"));
    let capa_tls = strings(&out["capa_tls"]);
    assert!(capa_tls.contains(&"USER".to_string()), "{capa_tls:?}");
    assert!(!capa_tls.contains(&"STLS".to_string()), "{capa_tls:?}");
    assert!(out["pass"].as_str().unwrap().starts_with("+OK"));
    assert_eq!(out["stat"][0], 3);
    assert_eq!(latin1_lines(&out["retr"]), lines_of(&message_3()));
    assert!(out["quit"].as_str().unwrap().starts_with("+OK"));

    // Raw: PASS is refused in the clear too, and the session goes on.
    let mut raw = Raw::connect(server.addr);
    assert!(raw.cmd(&format!("PASS {PASSWORD}")).starts_with("-ERR"));
    assert!(raw.cmd("STAT").starts_with("-ERR"));
    assert!(raw.cmd("QUIT").starts_with("+OK"));

    assert_eq!(
        server.backend.fetched(),
        [(ACCOUNT.to_string(), 2), (ACCOUNT.to_string(), 3)]
    );
}

#[test]
fn garbage_long_lines_and_unknown_commands_keep_the_session() {
    let server = start(None, Duration::from_secs(60));
    let mut raw = Raw::connect(server.addr);

    assert!(raw.cmd("STAT").starts_with("-ERR"), "STAT before login");
    assert!(raw.cmd("PASS x").starts_with("-ERR"), "PASS before USER");
    let reply = raw.cmd("FROBNICATE now");
    assert!(reply.starts_with("-ERR"), "{reply}");
    raw.send(b"\x00\x01\xff\xfe garbage \x1b[31m\r\n");
    assert!(raw.line().starts_with("-ERR"));
    assert!(raw.cmd("").starts_with("-ERR"), "empty line");
    let long = format!("USER {}", "x".repeat(300));
    let reply = raw.cmd(&long);
    assert!(reply.starts_with("-ERR line too long"), "{reply}");
    // Exactly 255 octets with CRLF is still a command.
    let just_fits = format!("NOOP {}", "y".repeat(255 - 2 - 5));
    assert_eq!(just_fits.len() + 2, 255);
    assert!(!raw.cmd(&just_fits).contains("too long"));
    // A very long line arriving in pieces, then a command right behind it.
    raw.send("z".repeat(5000).as_bytes());
    raw.send(b"\r\nCAPA\r\n");
    assert!(raw.line().starts_with("-ERR line too long"));
    assert!(raw.line().starts_with("+OK"));
    let capa = raw.body();
    assert!(
        capa.contains(&"IMPLEMENTATION hispd".to_string()),
        "{capa:?}"
    );

    raw.login();
    assert!(raw.cmd("XYZZY").starts_with("-ERR"));
    assert!(raw.cmd("RETR 0").starts_with("-ERR"));
    assert!(raw.cmd("RETR 4").starts_with("-ERR"));
    assert!(raw.cmd("RETR +1").starts_with("-ERR"));
    assert!(raw.cmd("RETR 99999999999999999999999").starts_with("-ERR"));
    assert!(raw.cmd("TOP 1").starts_with("-ERR"));
    assert!(raw.cmd("TOP 1 -1").starts_with("-ERR"));
    assert!(raw.cmd("DELE").starts_with("-ERR"));
    assert!(
        raw.cmd("USER again").starts_with("-ERR"),
        "already logged in"
    );
    assert!(raw.cmd("NOOP").starts_with("+OK"));

    // DELE then RSET keeps the message.
    assert!(raw.cmd("DELE 1").starts_with("+OK"));
    assert!(raw.cmd("DELE 1").starts_with("-ERR"), "already deleted");
    assert!(raw.cmd("LIST 1").starts_with("-ERR"));
    assert!(raw.cmd("STAT").starts_with("+OK 2 "));
    assert!(raw.cmd("RSET").starts_with("+OK"));
    assert!(raw.cmd("STAT").starts_with("+OK 3 "));

    // A second session on the same maildrop is refused while this one holds it.
    let mut other = Raw::connect(server.addr);
    assert!(other.cmd(&format!("USER {ACCOUNT}")).starts_with("+OK"));
    let reply = other.cmd(&format!("PASS {PASSWORD}"));
    assert!(reply.starts_with("-ERR [IN-USE]"), "{reply}");

    // Pipelined commands are answered in order.
    raw.send(b"NOOP\r\nUIDL 2\r\nLIST 3\r\nQUIT\r\n");
    assert!(raw.line().starts_with("+OK"));
    assert_eq!(raw.line(), "+OK 2 2\r\n");
    assert_eq!(
        raw.line(),
        format!("+OK 3 {}\r\n", on_the_wire(&message_3()).len())
    );
    assert!(raw.line().starts_with("+OK"));
    let mut rest = Vec::new();
    raw.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "closed after QUIT");

    // Now free: nothing was deleted.
    other.login();
    assert!(other.cmd("STAT").starts_with("+OK 3 "));
    assert!(other.cmd("QUIT").starts_with("+OK"));
    assert_eq!(server.backend.store.mailbox(ACCOUNT).unwrap().len(), 3);
    assert!(server.backend.fetched().is_empty());
}

#[test]
fn idle_sessions_are_closed_without_update() {
    let server = start(None, Duration::from_secs(1));
    let mut raw = Raw::connect(server.addr);
    raw.login();
    assert!(raw.cmd("DELE 1").starts_with("+OK"));
    std::thread::sleep(Duration::from_millis(1500));
    let mut rest = String::new();
    raw.reader.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("-ERR"), "{rest:?}");
    // The timeout is no QUIT: the marked message stays.
    assert_eq!(server.backend.store.mailbox(ACCOUNT).unwrap().len(), 3);
}
