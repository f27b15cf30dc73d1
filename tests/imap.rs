//! The IMAP server against real clients over loopback: Python's imaplib,
//! curl (plain and STARTTLS) and mbsync (isync), plus raw garbage.

use hispd::edge::{imap, EdgeBackend, EdgeConfig};
use hispd::store::{SledStore, Storage};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ACCOUNT: &str = "bob@b.example";
const PASSWORD: &str = "bob-password-1";

const MSG1: &[u8] = b"From: Alice Example <alice@a.example>\r\n\
To: Bob <bob@b.example>\r\n\
Subject: Lab results\r\n\
Date: Mon, 3 Jun 2024 10:00:00 +0000\r\n\
Message-ID: <m1@a.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
Your lab results are ready.\r\n\
Regards, Alice\r\n";

const MSG2: &[u8] = b"From: Carol <carol@c.example>\r\n\
To: bob@b.example\r\n\
Subject: Referral for Mr. Smith\r\n\
Date: Tue, 4 Jun 2024 11:30:00 +0200\r\n\
Message-ID: <m2@c.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Please see Mr. Smith on Friday. Caf=C3=A9 at noon?\r\n";

const MSG3: &[u8] = b"From: Dave <dave@d.example>\r\n\
To: bob@b.example\r\n\
Cc: Erin <erin@e.example>\r\n\
Subject: CCDA document attached\r\n\
Date: Wed, 5 Jun 2024 09:15:00 -0500\r\n\
Message-ID: <m3@d.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"==b0undary==\"\r\n\
\r\n\
This is a multi-part message in MIME format.\r\n\
--==b0undary==\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
The summary of care is attached.\r\n\
--==b0undary==\r\n\
Content-Type: application/xml; name=\"ccda.xml\"\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment; filename=\"ccda.xml\"\r\n\
\r\n\
PENsaW5pY2FsRG9jdW1lbnQgeG1sbnM9InVybjpobDctb3JnOnYzIj48L0NsaW5pY2FsRG9j\r\n\
dW1lbnQ+Cg==\r\n\
--==b0undary==--\r\n";

const MSG4: &[u8] = b"From: Frank <frank@f.example>\r\n\
To: bob@b.example\r\n\
Subject: Arrived during IDLE\r\n\
Message-ID: <m4@f.example>\r\n\
\r\n\
New message.\r\n";

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
        if let Ok(mut f) = self.fetched.lock() {
            f.push((mailbox.to_string(), uid));
        }
    }
    fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }
}

impl TestBackend {
    fn deliver(&self, data: &[u8], message_id: &str) {
        self.store
            .deliver_local(ACCOUNT, Some(message_id), data)
            .expect("deliver");
        let _ = self.changes.send(ACCOUNT.to_string());
    }

    fn fetched(&self) -> Vec<(String, u64)> {
        self.fetched.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

struct Server {
    port: u16,
    backend: Arc<TestBackend>,
    dir: tempfile::TempDir,
}

fn acceptor() -> Arc<openssl::ssl::SslAcceptor> {
    use openssl::asn1::Asn1Time;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::Rsa;
    use openssl::x509::{X509NameBuilder, X509};
    let key = PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", "localhost").expect("cn");
    let name = name.build();
    let mut cert = X509::builder().expect("x509");
    cert.set_version(2).expect("version");
    cert.set_subject_name(&name).expect("subject");
    cert.set_issuer_name(&name).expect("issuer");
    cert.set_pubkey(&key).expect("pubkey");
    cert.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("nb");
    cert.set_not_after(&Asn1Time::days_from_now(30).expect("time"))
        .expect("na");
    let serial = openssl::bn::BigNum::from_u32(7)
        .and_then(|b| b.to_asn1_integer())
        .expect("serial");
    cert.set_serial_number(&serial).expect("serial");
    cert.sign(&key, MessageDigest::sha256()).expect("sign");
    let cert = cert.build();
    let mut builder =
        openssl::ssl::SslAcceptor::mozilla_intermediate_v5(openssl::ssl::SslMethod::tls())
            .expect("acceptor");
    builder.set_private_key(&key).expect("key");
    builder.set_certificate(&cert).expect("cert");
    Arc::new(builder.build())
}

fn start(tls: bool) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(&dir.path().join("store")).expect("store");
    let (changes, _) = tokio::sync::broadcast::channel(16);
    let backend = Arc::new(TestBackend {
        store,
        fetched: Mutex::new(Vec::new()),
        changes,
    });
    backend.deliver(MSG1, "<m1@a.example>");
    backend.deliver(MSG2, "<m2@c.example>");
    backend.deliver(MSG3, "<m3@d.example>");
    let config = Arc::new(EdgeConfig {
        hostname: "imap.b.example".into(),
        tls: tls.then(acceptor),
        timeout: Duration::from_secs(60),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let b = backend.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            imap::listen(listener, config, b).await;
        });
    });
    Server { port, backend, dir }
}

fn write_messages(dir: &Path) {
    for (i, m) in [MSG1, MSG2, MSG3, MSG4].iter().enumerate() {
        std::fs::write(dir.join(format!("msg{}.eml", i + 1)), m).expect("write message");
    }
}

fn python(server: &Server, script: &str) -> std::process::Child {
    write_messages(server.dir.path());
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PORT", server.port.to_string())
        .env("MSGDIR", server.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed")
}

fn finish(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const PY_PRELUDE: &str = r#"
import imaplib, os, re, sys
port = int(os.environ['PORT'])
def msg(n):
    return open(os.path.join(os.environ['MSGDIR'], 'msg%d.eml' % n), 'rb').read()
M = imaplib.IMAP4('127.0.0.1', port)
"#;

#[test]
fn imaplib_session_covers_the_common_commands() {
    let server = start(false);
    let script = format!(
        "{PY_PRELUDE}{}",
        r#"
typ, caps = M.capability()
assert typ == 'OK' and b'IMAP4rev1' in caps[0] and b'IDLE' in caps[0] and b'AUTH=PLAIN' in caps[0], caps
typ, _ = M.login('bob@b.example', 'bob-password-1')
assert typ == 'OK'
typ, lst = M.list()
assert typ == 'OK', lst
names = b'\n'.join(lst)
assert b'"/" "INBOX"' in names and b'"/" "Sent"' in names, lst
typ, data = M.select('INBOX')
assert typ == 'OK' and data == [b'3'], data
assert M.untagged_responses.get('UIDVALIDITY') == [b'1'], M.untagged_responses
assert M.untagged_responses.get('UIDNEXT') == [b'4'], M.untagged_responses
assert M.untagged_responses.get('UNSEEN') == [b'1'], M.untagged_responses

typ, data = M.fetch('1:*', '(FLAGS UID RFC822.SIZE ENVELOPE BODYSTRUCTURE)')
assert typ == 'OK', data
lines = [d if isinstance(d, bytes) else d[0] + d[1] for d in data if d != b')']
assert len(lines) == 3, data
assert b'UID 1' in lines[0] and ('RFC822.SIZE %d' % len(msg(1))).encode() in lines[0], lines[0]
assert b'"Lab results"' in lines[0] and b'("Alice Example" NIL "alice" "a.example")' in lines[0], lines[0]
assert b'"<m1@a.example>"' in lines[0], lines[0]
assert b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT"' in lines[0], lines[0]
assert b'"QUOTED-PRINTABLE"' in lines[1], lines[1]
assert b'"MIXED"' in lines[2] and b'"APPLICATION" "XML"' in lines[2] and b'"BASE64"' in lines[2], lines[2]
assert b'("ATTACHMENT" ("FILENAME" "ccda.xml"))' in lines[2], lines[2]

typ, data = M.fetch('1', '(BODY.PEEK[])')
assert typ == 'OK' and data[0][1] == msg(1), data
typ, data = M.fetch('1', '(FLAGS)')
assert b'\\Seen' not in data[0], data
typ, data = M.fetch('2', '(BODY[])')
assert typ == 'OK' and data[0][1] == msg(2), data
assert b'\\Seen' in data[0][0] + data[1], data
typ, data = M.fetch('2', '(FLAGS)')
assert b'\\Seen' in data[0], data

typ, data = M.fetch('3', '(BODY.PEEK[1] BODY.PEEK[2] BODY.PEEK[2.MIME] BODY.PEEK[HEADER.FIELDS (SUBJECT CC)] BODY.PEEK[TEXT]<0.20> RFC822.HEADER)')
assert typ == 'OK', data
parts = {re.search(rb'(BODY\[[^\]]*\](<\d+>)?|RFC822\.HEADER) \{', d[0]).group(1): d[1] for d in data if isinstance(d, tuple)}
assert parts[b'BODY[1]'] == b'The summary of care is attached.', parts
assert parts[b'BODY[2]'].startswith(b'PENsaW5p') and parts[b'BODY[2]'].endswith(b'Cg=='), parts
assert parts[b'BODY[2.MIME]'].startswith(b'Content-Type: application/xml'), parts
assert parts[b'BODY[HEADER.FIELDS (SUBJECT CC)]'] == b'Cc: Erin <erin@e.example>\r\nSubject: CCDA document attached\r\n\r\n', parts
assert parts[b'BODY[TEXT]<0>'] == b'This is a multi-part', parts
assert parts[b'RFC822.HEADER'] == msg(3)[:msg(3).index(b'\r\n\r\n') + 4], parts

typ, data = M.fetch('1', 'FAST')
assert typ == 'OK' and b'INTERNALDATE' in data[0], data
typ, data = M.fetch('1', 'FULL')
assert typ == 'OK' and b'ENVELOPE' in data[0] and b'BODY (' in data[0], data

typ, data = M.search(None, 'UNSEEN')
assert data == [b'1 3'], data
typ, data = M.search(None, 'FROM', 'carol')
assert data == [b'2'], data
typ, data = M.search(None, 'SUBJECT', '"ccda document"')
assert data == [b'3'], data
typ, data = M.search(None, 'OR', 'FROM', 'alice', 'HEADER', 'Cc', 'erin')
assert data == [b'1 3'], data
typ, data = M.search(None, 'NOT', 'SEEN', 'BODY', 'lab')
assert data == [b'1'], data
typ, data = M.search(None, 'SINCE', '1-Jan-2020', 'UID', '2:*')
assert data == [b'2 3'], data
typ, data = M.search(None, 'BEFORE', '1-Jan-2020')
assert data == [b''], data
typ, data = M.uid('SEARCH', None, 'ALL')
assert data == [b'1 2 3'], data

typ, data = M.store('1', '+FLAGS', '(\\Deleted)')
assert typ == 'OK' and b'\\Deleted' in data[0], data
typ, data = M.search(None, 'DELETED')
assert data == [b'1'], data
typ, data = M.expunge()
assert typ == 'OK' and data == [b'1'], data
typ, data = M.select('INBOX')
assert data == [b'2'], data
typ, data = M.uid('FETCH', '2', '(UID BODY.PEEK[HEADER.FIELDS (Subject)])')
assert typ == 'OK' and b'UID 2' in data[0][0] and data[0][1] == b'Subject: Referral for Mr. Smith\r\n\r\n', data
typ, data = M.uid('FETCH', '1:*', '(FLAGS)')
assert len(data) == 2 and b'UID 2' in data[0] and b'UID 3' in data[1], data
typ, data = M.uid('STORE', '3', '+FLAGS.SILENT', '(\\Flagged)')
assert typ == 'OK' and data == [None], data
typ, data = M.fetch('2', '(FLAGS)')
assert b'\\Flagged' in data[0], data
typ, data = M.store('2', '-FLAGS', '(\\Flagged)')
assert b'\\Flagged' not in data[0], data

typ, data = M.append('Sent', '(\\Seen)', None, msg(4))
assert typ == 'OK' and data[0].startswith(b'[APPENDUID 1 1]'), data
typ, lst = M.list('""', 'Sent')
assert len(lst) == 1 and b'"Sent"' in lst[0], lst
typ, data = M.status('Sent', '(MESSAGES UIDNEXT UIDVALIDITY UNSEEN RECENT)')
assert typ == 'OK' and b'MESSAGES 1' in data[0] and b'UNSEEN 0' in data[0] and b'UIDNEXT 2' in data[0] and b'UIDVALIDITY 1' in data[0], data
typ, data = M.copy('1:2', 'Archive')
assert typ == 'OK' and data[0].startswith(b'[COPYUID 1 2,3 1,2]'), data
typ, lst = M.list()
assert any(b'"Archive"' in l for l in lst), lst
typ, data = M.status('Archive', '(MESSAGES UNSEEN)')
assert b'MESSAGES 2' in data[0] and b'UNSEEN 1' in data[0], data
typ, data = M.create('Projects')
assert typ == 'OK', data
typ, lst = M.lsub()
assert any(b'"Projects"' in l for l in lst), lst
typ, data = M.select('Archive', readonly=True)
assert typ == 'OK' and data == [b'2'], data
typ, data = M.fetch('1', '(BODY[])')
assert typ == 'OK' and data[0][1] == msg(2), data
typ, data = M.store('1', '+FLAGS', '(\\Deleted)')
assert typ == 'NO', data
typ, data = M.select('Nonexistent')
assert typ == 'NO', data
typ, data = M.close() if M.state == 'SELECTED' else ('OK', None)
typ, data = M.select('INBOX')
typ, data = M.close()
assert typ == 'OK', data
typ, data = M.noop()
assert typ == 'OK'
M.logout()
print('ok')
"#
    );
    let out = finish(python(&server, &script));
    assert!(out.contains("ok"));
    // Whole-message fetches count, peeking or not: messages 1 (BODY.PEEK[])
    // and 2 (BODY[]) of INBOX, then 2's copy read from the EXAMINE'd
    // Archive; message 3's sections and the header fetches do not.
    assert_eq!(
        server.backend.fetched(),
        vec![
            (ACCOUNT.to_string(), 1),
            (ACCOUNT.to_string(), 2),
            (format!("{ACCOUNT}/archive"), 1)
        ]
    );
}

#[test]
fn imaplib_idle_sees_new_messages_and_authenticate_plain_works() {
    let server = start(false);
    let script = format!(
        "{PY_PRELUDE}{}",
        r#"
typ, _ = M.authenticate('PLAIN', lambda _: b'\0bob@b.example\0bob-password-1')
assert typ == 'OK'
typ, data = M.select('INBOX')
assert data == [b'3'], data
tag = M._new_tag()
M.send(tag + b' IDLE\r\n')
line = M.readline()
assert line.startswith(b'+'), line
print('IDLING', flush=True)
seen = []
while True:
    line = M.readline()
    seen.append(line)
    if line.strip() == b'* 4 EXISTS':
        break
    assert line, seen
M.send(b'DONE\r\n')
line = M.readline()
assert line.startswith(tag + b' OK'), line
typ, data = M.fetch('4', '(BODY.PEEK[])')
assert data[0][1] == msg(4), data
M.logout()
print('ok')
"#
    );
    let mut child = python(&server, &script);
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "IDLING", "python did not start idling");
    std::thread::sleep(Duration::from_millis(200));
    server.backend.deliver(MSG4, "<m4@f.example>");
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success() && rest.contains("ok"),
        "stdout: {rest}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn curl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl must be installed");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn curl_lists_and_fetches_messages() {
    let server = start(false);
    let user = format!("{ACCOUNT}:{PASSWORD}");
    let base = format!("imap://127.0.0.1:{}", server.port);
    let list = curl(&[&format!("{base}/INBOX"), "--user", &user]);
    let list = String::from_utf8_lossy(&list);
    assert!(list.contains("INBOX"), "{list}");
    let all = curl(&[&format!("{base}/"), "--user", &user]);
    let all = String::from_utf8_lossy(&all);
    assert!(all.contains("INBOX") && all.contains("Sent"), "{all}");
    let body = curl(&[&format!("{base}/INBOX;UID=1"), "--user", &user]);
    assert_eq!(body, MSG1);
    let body = curl(&[&format!("{base}/INBOX;UID=3"), "--user", &user]);
    assert_eq!(body, MSG3);
    let fetched = server.backend.fetched();
    assert!(fetched.contains(&(ACCOUNT.to_string(), 1)), "{fetched:?}");
    assert!(fetched.contains(&(ACCOUNT.to_string(), 3)), "{fetched:?}");
}

#[test]
fn curl_uses_starttls_and_plaintext_login_is_refused() {
    let server = start(true);
    let user = format!("{ACCOUNT}:{PASSWORD}");
    let url = format!("imap://127.0.0.1:{}/INBOX;UID=2", server.port);
    let body = curl(&["--ssl-reqd", "-k", &url, "--user", &user]);
    assert_eq!(body, MSG2);

    let mut s = Session::connect(server.port);
    let caps = s.command("a1 CAPABILITY");
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED") && !caps.contains("AUTH="),
        "{caps}"
    );
    let reply = s.command("a2 LOGIN bob@b.example bob-password-1");
    assert!(reply.contains("a2 NO"), "{reply}");
    let reply = s.command("a3 SELECT INBOX");
    assert!(reply.contains("a3 BAD"), "{reply}");
}

fn mbsync_config(port: u16, maildir: &Path) -> String {
    let version = Command::new("mbsync")
        .arg("--version")
        .output()
        .expect("mbsync (isync) must be installed");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let old = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| {
            let mut it = v.split('.');
            Some((
                it.next()?.parse::<u32>().ok()?,
                it.next()?.parse::<u32>().ok()?,
            ))
        })
        .is_some_and(|(major, minor)| (major, minor) < (1, 5));
    let tls_option = if old { "SSLType None" } else { "TLSType None" };
    format!(
        "IMAPAccount remote\nHost 127.0.0.1\nPort {port}\nUser {ACCOUNT}\nPass {PASSWORD}\n{tls_option}\nAuthMechs LOGIN\n\n\
IMAPStore remote\nAccount remote\n\n\
MaildirStore local\nPath {dir}/\nInbox {dir}/INBOX\n\n\
Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\nSync Pull\nCreate Near\nSyncState *\n",
        dir = maildir.display()
    )
}

#[test]
fn mbsync_pulls_the_inbox_intact() {
    let server = start(false);
    let maildir = server.dir.path().join("maildir");
    std::fs::create_dir_all(&maildir).expect("maildir");
    let rc = server.dir.path().join("mbsyncrc");
    std::fs::write(&rc, mbsync_config(server.port, &maildir)).expect("rc");
    let out = Command::new("mbsync")
        .arg("-c")
        .arg(&rc)
        .arg("-a")
        .env("HOME", server.dir.path())
        .output()
        .expect("mbsync (isync) must be installed");
    assert!(
        out.status.success(),
        "mbsync failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // mbsync stores native line ends and marks each message with X-TUID.
    let normalize = |m: &[u8]| {
        String::from_utf8_lossy(m)
            .replace("\r\n", "\n")
            .lines()
            .filter(|l| !l.starts_with("X-TUID: "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut got = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join("INBOX").join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            got.push(normalize(&std::fs::read(e.path()).expect("read")));
        }
    }
    got.sort();
    let mut want: Vec<String> = [MSG1, MSG2, MSG3].iter().map(|m| normalize(m)).collect();
    want.sort();
    assert_eq!(got, want);
}

/// A raw IMAP connection for exact protocol checks.
struct Session {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Session {
    fn connect(port: u16) -> Session {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut greeting = String::new();
        reader.read_line(&mut greeting).expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        Session { stream, reader }
    }

    fn send(&mut self, data: &str) {
        self.stream.write_all(data.as_bytes()).expect("write");
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read");
        line
    }

    /// Sends a tagged command; returns every line up to its tagged reply.
    fn command(&mut self, command: &str) -> String {
        let tag = command.split(' ').next().unwrap_or("").to_string();
        self.send(&format!("{command}\r\n"));
        self.until_tag(&tag)
    }

    fn until_tag(&mut self, tag: &str) -> String {
        let mut all = String::new();
        loop {
            let line = self.line();
            assert!(!line.is_empty(), "connection closed; got {all}");
            all.push_str(&line);
            if line.starts_with(&format!("{tag} ")) {
                return all;
            }
        }
    }
}

#[test]
fn garbage_gets_bad_and_the_session_survives() {
    let server = start(false);
    let mut s = Session::connect(server.port);
    assert!(s.command("a1 FROBNICATE").contains("a1 BAD"));
    assert!(s.command("a2 SELECT INBOX").contains("a2 BAD"));
    assert!(s.command("a3 FETCH 1 FLAGS").contains("a3 BAD"));
    assert!(s
        .command("a4 LOGIN bob@b.example wrong-password")
        .contains("a4 NO"));
    s.send("\r\n");
    assert!(s.line().starts_with("* BAD"));
    // A huge synchronizing literal is refused without a continuation.
    let reply = s.command("a5 LOGIN {999999999999}");
    assert!(
        reply.starts_with("a5 NO") || reply.starts_with("a5 BAD"),
        "{reply}"
    );
    // A literal password is accepted after the continuation.
    s.send("a6 LOGIN bob@b.example {14}\r\n");
    assert!(s.line().starts_with("+"));
    s.send("bob-password-1\r\n");
    assert!(s.until_tag("a6").contains("a6 OK"));
    assert!(s.command("a7 STARTTLS").contains("a7 BAD"));
    assert!(s.command("a8 SELECT INBOX").contains("* 3 EXISTS"));
    assert!(s.command("a9 FETCH 1:* (FLAGS").contains("a9 BAD"));
    assert!(s.command("b1 FETCH 1 BODY[99]").contains("b1 OK"));
    assert!(s.command("b2 STORE 1 +FLAGS").contains("b2 BAD"));
    assert!(s.command("b3 UID FROB 1").contains("b3 BAD"));
    assert!(s.command("b4 SEARCH CHARSET KOI8-R ALL").contains("b4 BAD"));
    // LITERAL+: no continuation, the data follows at once.
    s.send("b5 APPEND INBOX {6+}\r\nhello!\r\n");
    let append = s.until_tag("b5");
    assert!(
        append.contains("* 4 EXISTS") && append.contains("b5 OK"),
        "{append}"
    );
    assert!(s.command("b6 NOOP").contains("b6 OK"));
    let fetch = s.command("b7 FETCH 4 (UID RFC822.SIZE BODY.PEEK[]<2.3>)");
    assert!(
        fetch.contains("* 4 FETCH (UID 4 RFC822.SIZE 6 BODY[]<2> {3}\r\nllo)"),
        "{fetch}"
    );
    let bytes: Vec<u8> = (0..70_000).map(|_| b'x').collect();
    s.send(&format!("b8 NOOP {}\r\n", String::from_utf8_lossy(&bytes)));
    let reply = s.line();
    assert!(reply.starts_with("* BYE"), "{reply}");
}

#[test]
fn mbsync_pushes_a_new_local_folder_once() {
    let server = start(false);
    let maildir = server.dir.path().join("maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join("Drafts").join(sub)).expect("maildir");
    }
    std::fs::write(
        maildir.join("Drafts/cur/1700000000.1_1.host:2,S"),
        b"From: bob@b.example\nTo: carol@c.example\nSubject: draft reply\n\nStill writing.\n",
    )
    .expect("draft");
    let rc = server.dir.path().join("mbsyncrc");
    let config = mbsync_config(server.port, &maildir).replace(
        "Channel inbox\nFar :remote:INBOX\nNear :local:INBOX\nSync Pull\nCreate Near\n",
        "Channel drafts\nFar :remote:Drafts\nNear :local:Drafts\nSync All\nCreate Far\n",
    );
    std::fs::write(&rc, config).expect("rc");
    for _ in 0..2 {
        let out = Command::new("mbsync")
            .arg("-c")
            .arg(&rc)
            .arg("-a")
            .env("HOME", server.dir.path())
            .output()
            .expect("mbsync (isync) must be installed");
        assert!(
            out.status.success(),
            "mbsync failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = &server.backend.store;
    let drafts = store
        .mailbox(&format!("{ACCOUNT}/drafts"))
        .expect("mailbox");
    assert_eq!(drafts.len(), 1, "{drafts:?}");
    assert!(
        drafts[0].flags.contains(&"\\Seen".to_string()),
        "{drafts:?}"
    );
    let raw = store
        .mailbox_message(&format!("{ACCOUNT}/drafts"), drafts[0].uid)
        .expect("message");
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        raw.contains("Subject: draft reply\r\n") && raw.ends_with("Still writing.\r\n"),
        "{raw}"
    );
}

/// Every byte the server sends in a session covering the common commands
/// parses with imap-codec's strict RFC 3501 decoders (greeting, then
/// responses): an independent check of our response syntax (literals,
/// ENVELOPE and BODYSTRUCTURE quoting, response codes) beyond what the
/// forgiving clients above accept.
#[test]
fn every_response_parses_with_imap_codec() {
    use imap_codec::decode::Decoder;
    use imap_codec::imap_types::response::{Response, Status};
    use imap_codec::{GreetingCodec, ResponseCodec};
    let server = start(false);
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut transcript: Vec<u8> = Vec::new();
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).expect("greeting");
    transcript.extend_from_slice(&line);
    let appended = MSG4.to_vec();
    let commands: Vec<Vec<u8>> = vec![
        b"CAPABILITY".to_vec(),
        format!("LOGIN {ACCOUNT} {PASSWORD}").into_bytes(),
        b"LIST \"\" \"*\"".to_vec(),
        b"LSUB \"\" \"*\"".to_vec(),
        b"STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)".to_vec(),
        b"SELECT INBOX".to_vec(),
        b"FETCH 1:3 (FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY)".to_vec(),
        b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)] BODY.PEEK[TEXT]<0.10>)".to_vec(),
        b"FETCH 3 (BODY[1] BODY[2.MIME] BODY.PEEK[HEADER])".to_vec(),
        b"FETCH 2 (RFC822.HEADER RFC822.TEXT)".to_vec(),
        b"UID FETCH 1:* (FLAGS)".to_vec(),
        b"STORE 1 +FLAGS (\\Flagged)".to_vec(),
        b"UID STORE 2 FLAGS (\\Seen \\Answered)".to_vec(),
        b"SEARCH UNSEEN".to_vec(),
        b"UID SEARCH FROM \"alice\"".to_vec(),
        b"COPY 1 INBOX".to_vec(),
        [
            format!("APPEND INBOX (\\Seen) {{{}+}}\r\n", appended.len()).as_bytes(),
            &appended,
        ]
        .concat(),
        b"STORE 1 +FLAGS (\\Deleted)".to_vec(),
        b"EXPUNGE".to_vec(),
        b"EXAMINE INBOX".to_vec(),
        b"NOOP".to_vec(),
        b"CLOSE".to_vec(),
        b"LOGOUT".to_vec(),
    ];
    for (i, command) in commands.iter().enumerate() {
        let tag = format!("c{i}");
        stream
            .write_all(&[format!("{tag} ").as_bytes(), command, b"\r\n"].concat())
            .expect("send");
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).expect("read");
            assert!(n > 0, "connection closed during {tag}");
            transcript.extend_from_slice(&line);
            // A literal: its bytes follow the line that announces it.
            if let Some(open) = line.iter().rposition(|&b| b == b'{') {
                let count = std::str::from_utf8(&line[open + 1..])
                    .ok()
                    .and_then(|s| s.trim_end().strip_suffix('}'))
                    .and_then(|s| s.parse::<usize>().ok());
                if let Some(count) = count {
                    let mut literal = vec![0u8; count];
                    reader.read_exact(&mut literal).expect("literal");
                    transcript.extend_from_slice(&literal);
                    continue;
                }
            }
            if line.starts_with(format!("{tag} ").as_bytes()) {
                assert!(
                    line.starts_with(format!("{tag} OK").as_bytes()),
                    "{}",
                    String::from_utf8_lossy(&transcript)
                );
                break;
            }
        }
    }

    let (mut rest, _) = GreetingCodec::default()
        .decode(&transcript)
        .unwrap_or_else(|e| panic!("greeting: {e:?}\n{}", String::from_utf8_lossy(&transcript)));
    let (mut tagged_ok, mut responses) = (0, 0);
    while !rest.is_empty() {
        match ResponseCodec::default().decode(rest) {
            Ok((remaining, response)) => {
                responses += 1;
                if let Response::Status(Status::Tagged(t)) = &response {
                    assert_eq!(
                        t.body.kind,
                        imap_codec::imap_types::response::StatusKind::Ok
                    );
                    tagged_ok += 1;
                }
                rest = remaining;
            }
            Err(e) => {
                let shown = &rest[..rest.len().min(300)];
                panic!(
                    "imap-codec cannot parse our response ({e:?}):\n{}",
                    String::from_utf8_lossy(shown)
                );
            }
        }
    }
    assert_eq!(tagged_ok, commands.len(), "every command completed");
    assert!(responses > commands.len() * 2, "{responses} responses");
}
