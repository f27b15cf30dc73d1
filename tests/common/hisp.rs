//! Two `hispd serve` processes for end-to-end tests: domains a.example and
//! b.example, each with its own CA, trusting each other; their certificates
//! and MX records published by a real BIND on loopback.

use super::servers::{free_port, Bind};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn hispd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hispd")
}

/// One HISP: its directory, configuration, ports and process.
pub struct Node {
    pub domain: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub mx_port: u16,
    pub submission_port: u16,
    pub imap_port: u16,
    pub pop3_port: u16,
    /// Blue Button Plus Pull (OAuth2 + FHIR), plain HTTP.
    pub pull_port: u16,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Extra environment for `serve` (HISPD__SECTION__KEY overrides).
    pub env: Vec<(String, String)>,
    /// Starts so far (the log is appended to across restarts).
    starts: usize,
}

impl Node {
    fn new(root: &Path, domain: &str) -> Node {
        let dir = root.join(domain);
        std::fs::create_dir_all(&dir).expect("node dir");
        Node {
            domain: domain.to_string(),
            config: dir.join("hispd.toml"),
            log: dir.join("serve.log"),
            dir,
            mx_port: free_port(),
            submission_port: free_port(),
            imap_port: free_port(),
            pop3_port: free_port(),
            pull_port: free_port(),
            child: None,
            env: Vec::new(),
            starts: 0,
        }
    }

    /// Runs a `hispd --config` command to completion.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let mut child = Command::new(hispd_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hispd");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin);
        }
        child.wait_with_output().expect("hispd output")
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(hispd_bin())
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("HISPD_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("hispd serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // Listening is not enough: signals (HUP) are handled only once
            // the daemon says it is serving.
            if std::net::TcpStream::connect(("127.0.0.1", self.submission_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.mx_port)).is_ok()
                && self.log_text().matches("hispd serving").count() > self.starts
            {
                self.starts += 1;
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "hispd serve for {} exited ({status}):\n{}",
                        self.domain,
                        self.log_text()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "hispd serve for {} did not listen:\n{}",
            self.domain,
            self.log_text()
        );
    }

    /// SIGTERM and wait (graceful).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGHUP (reload).
    pub fn hup(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-HUP")
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `predicate(log)` holds (bounded); returns whether it did.
    pub fn wait_log(&self, timeout: Duration, predicate: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if predicate(&self.log_text()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Two HISPs and the DNS that ties them together.
pub struct Net {
    pub root: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
    pub bind: Option<Bind>,
}

pub const ALICE: &str = "alice@a.example";
pub const ALICE_PASSWORD: &str = "alice-password-1";
pub const BOB: &str = "bob@b.example";

impl Net {
    /// `a_delivery_port`: where A delivers mail for B (B's MX port, or a proxy).
    pub fn new(a_delivery_port: impl FnOnce(&Node) -> u16) -> Net {
        Net::with_edge_relay(a_delivery_port, None)
    }

    /// Like `new`, with B delivering received mail to `b_edge_relay` ("host:port").
    pub fn with_edge_relay(
        a_delivery_port: impl FnOnce(&Node) -> u16,
        b_edge_relay: Option<String>,
    ) -> Net {
        let root = tempfile::tempdir().expect("root");
        let mut a = Node::new(root.path(), "a.example");
        let mut b = Node::new(root.path(), "b.example");
        // PKI: one CA per domain, a domain-bound certificate each.
        for node in [&a, &b] {
            let ca = root.path().join(format!("ca-{}", node.domain));
            ok(Command::new(hispd_bin())
                .args(["certs", "new-ca", "--out"])
                .arg(&ca)
                .args(["--name", &format!("{} CA", node.domain)]));
            ok(Command::new(hispd_bin())
                .args(["certs", "issue", "--ca"])
                .arg(&ca)
                .args(["--domain", &node.domain, "--out"])
                .arg(node.dir.join("certs").join(&node.domain).join("private")));
        }
        for (node, other) in [(&a, "b.example"), (&b, "a.example")] {
            let anchors = node
                .dir
                .join("certs")
                .join(&node.domain)
                .join("anchors/both");
            std::fs::create_dir_all(&anchors).expect("anchors");
            std::fs::copy(
                root.path().join(format!("ca-{other}/cert.pem")),
                anchors.join(format!("{other}-ca.pem")),
            )
            .expect("anchor");
        }
        // Publish both domains' certificates and MX records.
        let mut zone = String::from("mxa A 127.0.0.1\nmxb A 127.0.0.1\na MX 10 mxa\nb MX 10 mxb\n");
        for node in [&a, &b] {
            write_config(node, 0, None, None);
            let out = node.cli(&["certs", "publish", "--zone"], b"");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            zone.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        let bind = Bind::start(&[("example", &zone)]).expect("named");
        let a_port = a_delivery_port(&b);
        write_config(&a, a_port, Some(bind.addr().to_string()), None);
        write_config(&b, a.mx_port, Some(bind.addr().to_string()), b_edge_relay);
        let out = a.cli(
            &["users", "add", ALICE],
            format!("{ALICE_PASSWORD}\n").as_bytes(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        a.start();
        b.start();
        Net {
            root,
            a,
            b,
            bind: Some(bind),
        }
    }
}

fn ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_config(
    node: &Node,
    delivery_port: u16,
    nameserver: Option<String>,
    edge_relay: Option<String>,
) {
    let ns = nameserver.map(|n| format!("\"{n}\"")).unwrap_or_default();
    let relay = edge_relay
        .map(|r| format!("edge_relay = \"{r}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &node.config,
        format!(
            "[server]\nhostname = \"mx.{d}\"\ndata_dir = \"data\"\nmx_listen = \"127.0.0.1:{mx}\"\nsubmission_listen = \"127.0.0.1:{sub}\"\nimap_listen = \"127.0.0.1:{imap}\"\npop3_listen = \"127.0.0.1:{pop3}\"\nlog_format = \"json\"\n\n[pull]\nlisten = \"127.0.0.1:{pull}\"\n\n\
             [delivery]\nport = {delivery_port}\nretry_base_secs = 1\nconnect_timeout_secs = 5\n\n\
             [discovery]\nsources = [\"local\", \"dns\"]\nnameservers = [{ns}]\ndns_timeout_ms = 2000\ncache_negative_ttl_secs = 0\n\n\
             [[domains]]\nname = \"{d}\"\n{relay}",
            d = node.domain,
            mx = node.mx_port,
            sub = node.submission_port,
            imap = node.imap_port,
            pop3 = node.pop3_port,
            pull = node.pull_port,
        ),
    )
    .expect("config");
}

/// Python smtplib: STARTTLS, AUTH, send; prints one JSON line per message.
pub const SUBMIT_PY: &str = r#"
import json, smtplib, sys
port, user, password, sender = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
messages = json.load(sys.stdin)
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("edge.test"); s.starttls(); s.ehlo("edge.test"); s.login(user, password)
for m in messages:
    try:
        refused = s.sendmail(sender, m["to"], m["data"])
        print(json.dumps({"id": m["id"], "ok": True, "refused": {k: [v[0], v[1].decode()] for k, v in refused.items()}}))
    except smtplib.SMTPException as e:
        print(json.dumps({"id": m["id"], "ok": False, "error": str(e)}))
s.quit()
"#;

/// Submits messages as Alice; returns one JSON value per message.
pub fn submit(port: u16, messages: &serde_json::Value) -> Vec<serde_json::Value> {
    submit_as(port, ALICE, ALICE_PASSWORD, messages)
}

/// Submits messages as `user` (STARTTLS, AUTH, envelope sender `user`) to
/// the submission port; returns one JSON value per message.
pub fn submit_as(
    port: u16,
    user: &str,
    password: &str,
    messages: &serde_json::Value,
) -> Vec<serde_json::Value> {
    let mut child = Command::new("python3")
        .args(["-c", SUBMIT_PY, &port.to_string(), user, password, user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(messages.to_string().as_bytes());
    }
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success(),
        "smtplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// `hispd message seal` from Alice to Bob, signed with the credential saved
/// in `signer` (cert.pem, key.pem), for `recipient_cert`; the sealed bytes.
pub fn seal_with_cli(signer: &Path, recipient_cert: &Path, message: &[u8]) -> Vec<u8> {
    let mut seal = Command::new(hispd_bin())
        .args([
            "message",
            "seal",
            "--from",
            ALICE,
            "--to",
            BOB,
            "--sign-cert",
        ])
        .arg(signer.join("cert.pem"))
        .arg("--sign-key")
        .arg(signer.join("key.pem"))
        .arg("--recipient-cert")
        .arg(recipient_cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hispd message seal");
    if let Some(mut input) = seal.stdin.take() {
        input.write_all(message).expect("seal input");
    }
    let sealed = seal.wait_with_output().expect("seal output");
    assert!(
        sealed.status.success(),
        "{}",
        String::from_utf8_lossy(&sealed.stderr)
    );
    sealed.stdout
}

/// A message from Alice.
pub fn message(to: &[&str], id: &str, body: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "to": to,
        "data": format!(
            "From: {ALICE}\r\nTo: {}\r\nSubject: test {id}\r\nMessage-ID: <{id}@a.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\r\n{body}\r\n",
            to.join(", ")
        ),
    })
}
