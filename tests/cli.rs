//! The `hispd` command line as operators use it: the real binary, run in
//! temporary directories, with certificates made by `hispd certs` and checked
//! with the `openssl` tool. These tests pin what scripts and people rely on:
//! exit statuses (0 ok, 1 refused, 2 error), one-line reasons on stderr, the
//! files written, JSON reports, and configuration handling.
#![cfg(unix)]

use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tempfile::TempDir;

const HISPD: &str = env!("CARGO_BIN_EXE_hispd");

const SENDER: &str = "alice@a.example";
const RECIPIENT: &str = "bob@b.example";

/// A message with Date and Message-ID already present (so sealing adds no
/// header) and bare LF line endings, as a script would pipe it in.
const MESSAGE: &str = "From: Alice <alice@a.example>\n\
To: Bob <bob@b.example>\n\
Subject: Lab results for Bob\n\
Date: Fri, 04 Dec 2026 10:00:00 +0000\n\
Message-ID: <cli-test-1@a.example>\n\
MIME-Version: 1.0\n\
Content-Type: text/plain; charset=utf-8\n\
\n\
Hello Bob,\n\
your potassium is 4.1 mmol/L.\n";

/// What one run of the binary did.
struct Run {
    args: String,
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn describe(&self) -> String {
        format!(
            "hispd {}\nexit: {:?}\nstderr:\n{}\nstdout:\n{}",
            self.args,
            self.code,
            self.stderr,
            self.stdout_text()
        )
    }

    fn assert_ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "expected success\n{}", self.describe());
        self
    }

    fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}\n{}",
            self.describe()
        );
        self
    }

    fn assert_failed(&self) -> &Run {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a non-zero exit\n{}",
            self.describe()
        );
        self
    }

    /// The single line an operator sees for an error or refusal.
    fn one_error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one line on stderr\n{}",
            self.describe()
        );
        assert!(lines[0].starts_with("hispd: "), "{}", self.describe());
        lines[0]
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{}", self.describe()))
    }
}

/// Runs `hispd ARGS` in `cwd` with `stdin`, without any HISPD__* variable
/// from the test's own environment, plus `env`.
fn hispd_env(cwd: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(HISPD);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HISPD__") {
            cmd.env_remove(key);
        }
    }
    // Log lines would break the one-line-on-stderr contract under test.
    cmd.env_remove("RUST_LOG");
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("start hispd");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    let input = stdin.to_vec();
    // Written from a thread so a large stdout cannot deadlock us; hispd may
    // exit before reading stdin (argument errors), so a broken pipe is fine.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for hispd");
    writer.join().expect("stdin writer");
    let run = Run {
        args: args.join(" "),
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        run.code.is_some(),
        "hispd was killed by a signal\n{}",
        run.describe()
    );
    assert!(
        !run.stderr.contains("panicked"),
        "hispd panicked\n{}",
        run.describe()
    );
    run
}

fn hispd(cwd: &Path, args: &[&str], stdin: &[u8]) -> Run {
    hispd_env(cwd, args, stdin, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Normalises line endings to CRLF, the form hispd writes.
fn crlf(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .replace("\r\n", "\n")
        .replace('\n', "\r\n")
}

/// Runs the `openssl` tool and returns its stdout; it must succeed.
fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn new_ca(cwd: &Path, out: &Path, name: &str) {
    hispd(
        cwd,
        &["certs", "new-ca", "--out", s(out), "--name", name],
        b"",
    )
    .assert_ok();
}

fn issue(cwd: &Path, ca: &Path, binding: &[&str], out: &Path, extra: &[&str]) {
    let mut args = vec!["certs", "issue", "--ca", s(ca), "--out", s(out)];
    args.extend_from_slice(binding);
    args.extend_from_slice(extra);
    hispd(cwd, &args, b"").assert_ok();
}

/// Two domains, each with its own CA: alice@a.example has an address-bound
/// certificate under CA A, b.example a domain-bound one under CA B.
struct TwoDomains {
    dir: TempDir,
    ca_a: PathBuf,
    ca_b: PathBuf,
    alice: PathBuf,
    bob: PathBuf,
}

impl TwoDomains {
    fn new(sender_extra: &[&str]) -> TwoDomains {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let (ca_a, ca_b) = (root.join("ca-a"), root.join("ca-b"));
        let (alice, bob) = (root.join("alice"), root.join("b.example"));
        new_ca(root, &ca_a, "CA A");
        new_ca(root, &ca_b, "CA B");
        issue(root, &ca_a, &["--address", SENDER], &alice, sender_extra);
        issue(root, &ca_b, &["--domain", "b.example"], &bob, &[]);
        TwoDomains {
            dir,
            ca_a,
            ca_b,
            alice,
            bob,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Seals MESSAGE from alice to bob with key flags; returns the sealed message.
    fn seal(&self) -> Vec<u8> {
        let run = hispd(
            self.root(),
            &[
                "message",
                "seal",
                "--from",
                SENDER,
                "--to",
                RECIPIENT,
                "--sign-cert",
                s(&self.alice.join("cert.pem")),
                "--sign-key",
                s(&self.alice.join("key.pem")),
                "--recipient-cert",
                s(&self.bob.join("cert.pem")),
                "--anchors",
                s(&self.ca_b.join("cert.pem")),
            ],
            MESSAGE.as_bytes(),
        );
        run.assert_ok();
        assert!(!run.stdout.is_empty(), "{}", run.describe());
        run.stdout.clone()
    }

    /// Opens `sealed` as b.example, trusting `anchors`, with extra flags.
    fn open(&self, sealed: &[u8], anchors: &Path, extra: &[&str]) -> Run {
        let cert = self.bob.join("cert.pem");
        let key = self.bob.join("key.pem");
        let anchors = anchors.join("cert.pem");
        let mut args = vec![
            "message",
            "open",
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "--anchors",
            s(&anchors),
        ];
        args.extend_from_slice(extra);
        hispd(self.root(), &args, sealed)
    }
}

// 1. certs new-ca / certs issue

#[test]
fn certs_new_ca_and_issue_write_direct_certificates_and_private_keys() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = root.join("ca");
    let run = hispd(
        root,
        &["certs", "new-ca", "--out", s(&ca), "--name", "X"],
        b"",
    );
    run.assert_ok();
    assert!(run.stdout_text().contains("CN=X"), "{}", run.describe());
    assert!(ca.join("cert.pem").is_file());
    assert_eq!(
        mode(&ca.join("key.pem")),
        0o600,
        "CA key.pem must be private"
    );
    let ca_ext = openssl(&[
        "x509",
        "-in",
        s(&ca.join("cert.pem")),
        "-noout",
        "-ext",
        "basicConstraints,keyUsage",
    ]);
    assert!(ca_ext.contains("CA:TRUE"), "{ca_ext}");
    assert!(ca_ext.contains("Certificate Sign"), "{ca_ext}");

    let address = root.join("d2");
    let run = hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&ca),
            "--address",
            "a@x.example",
            "--out",
            s(&address),
        ],
        b"",
    );
    run.assert_ok();
    assert!(
        run.stdout_text().contains("a@x.example"),
        "{}",
        run.describe()
    );
    assert!(address.join("cert.pem").is_file());
    assert_eq!(
        mode(&address.join("key.pem")),
        0o600,
        "leaf key.pem must be private"
    );
    let ext = openssl(&[
        "x509",
        "-in",
        s(&address.join("cert.pem")),
        "-noout",
        "-ext",
        "subjectAltName,keyUsage,extendedKeyUsage",
    ]);
    assert!(ext.contains("email:a@x.example"), "{ext}");
    assert!(ext.contains("Digital Signature"), "{ext}");
    assert!(ext.contains("Key Encipherment"), "{ext}");
    assert!(ext.contains("E-mail Protection"), "{ext}");
    // An independent verifier accepts the chain and the S/MIME purpose.
    let verified = openssl(&[
        "verify",
        "-CAfile",
        s(&ca.join("cert.pem")),
        "-purpose",
        "smimeencrypt",
        s(&address.join("cert.pem")),
    ]);
    assert!(verified.contains("OK"), "{verified}");

    let domain = root.join("d3");
    hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&ca),
            "--domain",
            "y.example",
            "--out",
            s(&domain),
        ],
        b"",
    )
    .assert_ok();
    assert!(domain.join("cert.pem").is_file());
    assert_eq!(mode(&domain.join("key.pem")), 0o600);
    let ext = openssl(&[
        "x509",
        "-in",
        s(&domain.join("cert.pem")),
        "-noout",
        "-ext",
        "subjectAltName,keyUsage",
    ]);
    assert!(ext.contains("DNS:y.example"), "{ext}");
    assert!(
        !ext.contains("email:"),
        "a domain-bound certificate has no e-mail SAN: {ext}"
    );
    assert!(
        ext.contains("Digital Signature") && ext.contains("Key Encipherment"),
        "{ext}"
    );
}

#[test]
fn certs_refuse_weak_keys_and_bad_addresses_without_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let weak_ca = root.join("weak-ca");
    let run = hispd(
        root,
        &["certs", "new-ca", "--out", s(&weak_ca), "--bits", "1024"],
        b"",
    );
    run.assert_failed();
    let line = run.one_error_line();
    assert!(
        line.contains("1024") && line.contains("2048"),
        "{}",
        run.describe()
    );
    assert!(!weak_ca.exists(), "nothing is written for a refused CA");

    let ca = root.join("ca");
    new_ca(root, &ca, "CA");
    let weak = root.join("weak");
    let run = hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&ca),
            "--address",
            "a@x.example",
            "--out",
            s(&weak),
            "--bits",
            "1024",
        ],
        b"",
    );
    run.assert_failed();
    assert!(run.one_error_line().contains("1024"), "{}", run.describe());
    assert!(!weak.exists());

    for bad in ["not an address", "no-at-sign.example", "a@", "@x.example"] {
        let out = root.join("bad");
        let run = hispd(
            root,
            &[
                "certs",
                "issue",
                "--ca",
                s(&ca),
                "--address",
                bad,
                "--out",
                s(&out),
            ],
            b"",
        );
        run.assert_failed();
        let line = run.one_error_line();
        assert!(
            line.contains(bad),
            "the message names the refused value\n{}",
            run.describe()
        );
        assert!(!out.exists(), "nothing is written for {bad:?}");
    }

    let out = root.join("bad-domain");
    let run = hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&ca),
            "--domain",
            "bad domain",
            "--out",
            s(&out),
        ],
        b"",
    );
    run.assert_failed();
    assert!(
        run.one_error_line().contains("--domain"),
        "{}",
        run.describe()
    );
    assert!(!out.exists());
}

// 2. seal and open round trip

#[test]
fn seal_then_open_round_trips_the_message_and_reports_the_signer() {
    let pki = TwoDomains::new(&[]);
    let sealed = pki.seal();
    let sealed_text = String::from_utf8_lossy(&sealed);
    assert!(
        sealed_text.contains("application/pkcs7-mime"),
        "{sealed_text}"
    );
    assert!(
        !sealed_text.contains("potassium"),
        "the body must not travel in clear"
    );
    assert!(
        !sealed_text.contains("Lab results"),
        "the Subject must not travel in clear by default"
    );

    // Plain: the protected message on stdout.
    let run = pki.open(&sealed, &pki.ca_a, &[]);
    run.assert_ok();
    assert_eq!(
        crlf(&run.stdout),
        crlf(MESSAGE.as_bytes()),
        "{}",
        run.describe()
    );

    // --json: the report instead of the message.
    let run = pki.open(&sealed, &pki.ca_a, &["--json"]);
    run.assert_ok();
    let json = run.json();
    assert_eq!(json["trusted"], true, "{json:#}");
    let report = &json["report"];
    assert_eq!(report["domain"], "b.example", "{json:#}");
    assert_eq!(report["from"], SENDER, "{json:#}");
    assert_eq!(report["message_id"], "<cli-test-1@a.example>", "{json:#}");
    assert_eq!(report["wrapped"], true, "{json:#}");
    let signer = &report["signer"];
    assert_eq!(signer["binding"]["kind"], "address", "{json:#}");
    assert_eq!(signer["binding"]["value"], SENDER, "{json:#}");
    assert!(
        signer["certificate"]["subject"]
            .as_str()
            .unwrap_or("")
            .contains(SENDER),
        "{json:#}"
    );
    assert!(
        signer["certificate"]["issuer"]
            .as_str()
            .unwrap_or("")
            .contains("CN=CA A"),
        "{json:#}"
    );
    assert_eq!(signer["digest"], "SHA256", "{json:#}");
    assert!(
        signer["trust"]["anchor"]["subject"]
            .as_str()
            .unwrap_or("")
            .contains("CN=CA A"),
        "{json:#}"
    );
    assert!(
        report["decrypted_with"]["subject"]
            .as_str()
            .unwrap_or("")
            .contains("b.example"),
        "{json:#}"
    );
    assert!(
        !run.stdout_text().contains("potassium"),
        "--json prints the report, not the message"
    );

    // --out FILE --json: the message in FILE, the report on stdout.
    let file = pki.root().join("opened.eml");
    let run = pki.open(&sealed, &pki.ca_a, &["--out", s(&file), "--json"]);
    run.assert_ok();
    assert_eq!(run.json()["trusted"], true);
    let written = std::fs::read(&file).expect("--out file written");
    assert_eq!(crlf(&written), crlf(MESSAGE.as_bytes()));
}

#[test]
fn sealed_output_is_standard_smime_that_openssl_decrypts_and_verifies() {
    let pki = TwoDomains::new(&[]);
    let sealed_path = pki.root().join("sealed.eml");
    std::fs::write(&sealed_path, pki.seal()).unwrap();
    let signed_path = pki.root().join("signed.eml");
    openssl(&[
        "cms",
        "-decrypt",
        "-in",
        s(&sealed_path),
        "-recip",
        s(&pki.bob.join("cert.pem")),
        "-inkey",
        s(&pki.bob.join("key.pem")),
        "-out",
        s(&signed_path),
    ]);
    let content = openssl(&[
        "cms",
        "-verify",
        "-in",
        s(&signed_path),
        "-CAfile",
        s(&pki.ca_a.join("cert.pem")),
    ]);
    assert!(
        content.contains("message/rfc822"),
        "the signed content is the wrapped message: {content}"
    );
    assert!(content.contains("potassium"), "{content}");
}

// 3. refusals

#[test]
fn open_with_the_wrong_anchors_is_refused_with_one_line_naming_the_rule() {
    let pki = TwoDomains::new(&[]);
    let sealed = pki.seal();

    // CA B vouches for the recipient, not for the signer.
    let run = pki.open(&sealed, &pki.ca_b, &[]);
    run.assert_code(1);
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "exactly one line on stderr\n{}",
        run.describe()
    );
    assert!(
        run.stderr.starts_with("hispd: refused [signer-trust]:"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.is_empty(),
        "a refused message must not be printed\n{}",
        run.describe()
    );

    let run = pki.open(&sealed, &pki.ca_b, &["--json"]);
    run.assert_code(1);
    let json = run.json();
    assert_eq!(json["trusted"], false, "{json:#}");
    assert_eq!(json["rule"], "signer-trust", "{json:#}");
    assert!(
        json["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{json:#}"
    );
    assert!(!run.stdout_text().contains("potassium"));

    // --out with a refusal writes no file.
    let file = pki.root().join("refused.eml");
    pki.open(&sealed, &pki.ca_b, &["--out", s(&file)])
        .assert_code(1);
    assert!(!file.exists(), "nothing is written for a refused message");

    // The wrong private key: refused, and the rule says why.
    let run = hispd(
        pki.root(),
        &[
            "message",
            "open",
            "--cert",
            s(&pki.alice.join("cert.pem")),
            "--key",
            s(&pki.alice.join("key.pem")),
            "--anchors",
            s(&pki.ca_a.join("cert.pem")),
        ],
        &sealed,
    );
    run.assert_code(1);
    assert!(
        run.one_error_line()
            .starts_with("hispd: refused [not-for-us]:"),
        "{}",
        run.describe()
    );

    // An envelope recipient the message was not addressed to.
    let run = pki.open(&sealed, &pki.ca_a, &["--rcpt-to", "carol@b.example"]);
    run.assert_code(1);
    assert!(
        run.one_error_line()
            .starts_with("hispd: refused [envelope-recipient]:"),
        "{}",
        run.describe()
    );
}

// 4. --at

#[test]
fn open_at_judges_validity_at_the_given_time() {
    let pki = TwoDomains::new(&["--days", "1"]);
    let sealed = pki.seal();

    let later = (chrono::Utc::now() + chrono::TimeDelta::days(2)).to_rfc3339();
    let run = pki.open(&sealed, &pki.ca_a, &["--at", &later]);
    run.assert_code(1);
    let line = run.one_error_line();
    assert!(
        line.starts_with("hispd: refused [signer-trust]:"),
        "{}",
        run.describe()
    );
    assert!(line.contains("expired"), "{}", run.describe());

    let now = chrono::Utc::now().to_rfc3339();
    let run = pki.open(&sealed, &pki.ca_a, &["--at", &now]);
    run.assert_ok();
    assert_eq!(crlf(&run.stdout), crlf(MESSAGE.as_bytes()));

    // RFC 3339 with an offset other than Z.
    let now_offset = chrono::Utc::now()
        .with_timezone(&chrono::FixedOffset::west_opt(5 * 3600).unwrap())
        .to_rfc3339();
    pki.open(&sealed, &pki.ca_a, &["--at", &now_offset])
        .assert_ok();

    for bad in ["yesterday", "2026-12-04", "1733320000"] {
        let run = pki.open(&sealed, &pki.ca_a, &["--at", bad]);
        run.assert_code(2);
        let line = run.one_error_line();
        assert!(
            line.contains("--at"),
            "the message names --at\n{}",
            run.describe()
        );
        assert!(
            line.contains(bad),
            "the message names the value\n{}",
            run.describe()
        );
    }
}

// 5. bad input

/// Deterministic pseudo-random bytes (no RNG crate needed).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect()
}

#[test]
fn open_refuses_garbage_with_one_clear_line_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = root.join("ca");
    let leaf = root.join("leaf");
    new_ca(root, &ca, "CA");
    issue(root, &ca, &["--domain", "b.example"], &leaf, &[]);
    let open = |stdin: &[u8]| {
        hispd(
            root,
            &[
                "message",
                "open",
                "--cert",
                s(&leaf.join("cert.pem")),
                "--key",
                s(&leaf.join("key.pem")),
                "--anchors",
                s(&ca.join("cert.pem")),
            ],
            stdin,
        )
    };

    let p7m = "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n\
Content-Transfer-Encoding: base64\r\n\r\n";
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", noise(20_000, 1)),
        ("random bytes 2", noise(777, 42)),
        ("every byte value", (0..=255u8).cycle().take(4096).collect()),
        ("plain text", b"hello world\n".to_vec()),
        ("one huge line", vec![b'X'; 100_000]),
        ("blank lines", b"\r\n\r\n".to_vec()),
        (
            "unencrypted mail",
            b"From: a@a.example\r\nSubject: x\r\n\r\nbody\r\n".to_vec(),
        ),
        (
            "corrupt base64",
            format!("{p7m}!!!not base64!!!\r\n").into_bytes(),
        ),
        (
            "base64 of not-CMS",
            format!("{p7m}QUFBQUFBQUFBQUFB\r\n").into_bytes(),
        ),
        (
            "truncated multipart",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n".to_vec(),
        ),
    ];
    for (what, input) in inputs {
        let run = open(&input);
        run.assert_failed();
        let line = run.one_error_line();
        assert!(
            line.len() < 1000,
            "{what}: the error line stays short\n{}",
            run.describe()
        );
        assert!(
            run.stdout.is_empty(),
            "{what}: nothing on stdout\n{}",
            run.describe()
        );
    }

    let run = open(b"");
    run.assert_failed();
    assert!(
        run.one_error_line().contains("no message"),
        "{}",
        run.describe()
    );
}

// 6. demo

#[test]
fn demo_prints_a_trusted_message_and_keeps_its_pki_with_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = root.join("demo");
    let run = hispd(root, &["demo", "--out", s(&out)], b"");
    run.assert_ok();
    let text = run.stdout_text();
    assert!(text.contains("trusted message from"), "{}", run.describe());
    assert!(run.stderr.is_empty(), "{}", run.describe());

    let sealed = std::fs::read(out.join("sealed.eml")).expect("sealed.eml");
    let opened = std::fs::read(out.join("opened.eml")).expect("opened.eml");
    assert!(!String::from_utf8_lossy(&sealed).contains("<ClinicalDocument"));
    assert!(String::from_utf8_lossy(&opened).contains("<ClinicalDocument"));
    let sender_domain = "direct.sunrise-clinic.example";
    let recipient_domain = "direct.patient-app.example";
    for d in [
        format!("ca-{sender_domain}"),
        format!("ca-{recipient_domain}"),
        format!("certs/{sender_domain}/private"),
        format!("certs/{recipient_domain}/private"),
    ] {
        assert!(out.join(&d).join("cert.pem").is_file(), "{d}/cert.pem");
        assert_eq!(mode(&out.join(&d).join("key.pem")), 0o600, "{d}/key.pem");
    }
    // The recipient reads exactly what the EHR sent.
    let original = std::fs::read(out.join("original.eml")).expect("original.eml");
    assert_eq!(original, opened);

    // The kept PKI is usable: open the demo's sealed message with the CLI,
    // once with its files as flags and once with the written configuration.
    let run = hispd(
        root,
        &[
            "message",
            "open",
            "--cert",
            s(&out
                .join("certs")
                .join(recipient_domain)
                .join("private/cert.pem")),
            "--key",
            s(&out
                .join("certs")
                .join(recipient_domain)
                .join("private/key.pem")),
            "--anchors",
            s(&out.join(format!("ca-{sender_domain}")).join("cert.pem")),
        ],
        &sealed,
    );
    run.assert_ok();
    assert_eq!(crlf(&run.stdout), crlf(&opened));
    let run = hispd(
        root,
        &["--config", s(&out.join("hispd.toml")), "message", "open"],
        &sealed,
    );
    run.assert_ok();
    assert_eq!(run.stdout, opened);
}

#[test]
fn demo_without_out_and_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let run = hispd(dir.path(), &["demo", "--json"], b"");
    run.assert_ok();
    let json = run.json();
    let seal = &json["seal"];
    let open = &json["open"];
    assert!(seal.is_object() && open.is_object(), "{json:#}");
    assert_eq!(seal["cipher"], "aes-256-cbc", "{json:#}");
    assert_eq!(
        seal["recipients"].as_array().map(Vec::len),
        Some(1),
        "{json:#}"
    );
    assert_eq!(
        open["signer"]["binding"]["value"], "dr.lee@direct.sunrise-clinic.example",
        "{json:#}"
    );
    assert_eq!(open["domain"], "direct.patient-app.example", "{json:#}");
    assert_eq!(open["wrapped"], true, "{json:#}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "demo without --out writes nothing"
    );
}

// 7. configuration

/// A HISP configuration for a.example and b.example in the documented
/// layout, built with `hispd certs`. b.example also keeps its own CA in
/// anchors/both, so its anchor counts differ from a.example's.
struct Configured {
    dir: TempDir,
    config: PathBuf,
    /// An unrelated working directory: paths must resolve against the
    /// configuration file, not the current directory.
    elsewhere: PathBuf,
}

impl Configured {
    fn new() -> Configured {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (ca_a, ca_b) = (root.join("pki/ca-a"), root.join("pki/ca-b"));
        new_ca(root, &ca_a, "CA A");
        new_ca(root, &ca_b, "CA B");
        let etc = root.join("etc");
        let certs = etc.join("certs");
        issue(
            root,
            &ca_a,
            &["--address", SENDER],
            &certs.join("a.example/private"),
            &[],
        );
        issue(
            root,
            &ca_b,
            &["--domain", "b.example"],
            &certs.join("b.example/private"),
            &[],
        );
        let anchor = |domain: &str, sub: &str, ca: &Path| {
            let d = certs.join(domain).join("anchors").join(sub);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(ca.join("cert.pem"), d.join("ca.pem")).unwrap();
        };
        anchor("a.example", "incoming", &ca_b);
        anchor("a.example", "outgoing", &ca_b);
        anchor("b.example", "incoming", &ca_a);
        anchor("b.example", "outgoing", &ca_a);
        anchor("b.example", "both", &ca_b);
        let config = etc.join("hispd.toml");
        std::fs::write(
            &config,
            "# two local domains in the default layout under ./certs\n\
[[domains]]\nname = \"a.example\"\n\n[[domains]]\nname = \"b.example\"\n",
        )
        .unwrap();
        let elsewhere = root.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        Configured {
            dir,
            config,
            elsewhere,
        }
    }

    fn recipient_cert(&self) -> PathBuf {
        self.dir.path().join("etc/certs/b.example/private/cert.pem")
    }

    fn seal(&self, env: &[(&str, &str)]) -> Vec<u8> {
        let cert = self.recipient_cert();
        let run = hispd_env(
            &self.elsewhere,
            &[
                "--config",
                s(&self.config),
                "message",
                "seal",
                "--from",
                SENDER,
                "--to",
                RECIPIENT,
                "--recipient-cert",
                s(&cert),
            ],
            MESSAGE.as_bytes(),
            env,
        );
        run.assert_ok();
        run.stdout.clone()
    }

    fn open(&self, sealed: &[u8], extra: &[&str]) -> Run {
        let mut args = vec!["--config", s(&self.config), "message", "open"];
        args.extend_from_slice(extra);
        hispd(&self.elsewhere, &args, sealed)
    }
}

#[test]
fn config_check_lists_each_domain_with_its_counts() {
    let cfg = Configured::new();
    let run = hispd(
        &cfg.elsewhere,
        &["--config", s(&cfg.config), "config", "check"],
        b"",
    );
    run.assert_ok();
    let text = run.stdout_text();
    let line_of = |domain: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{domain}:")))
            .unwrap_or_else(|| panic!("{domain} is listed\n{}", run.describe()))
            .to_string()
    };
    let a = line_of("a.example");
    assert!(a.contains("1 private certificate"), "{a}");
    assert!(a.contains("1 incoming anchor"), "{a}");
    assert!(a.contains("1 outgoing anchor"), "{a}");
    let b = line_of("b.example");
    assert!(b.contains("1 private certificate"), "{b}");
    assert!(
        b.contains("2 incoming anchor"),
        "anchors/both counts for incoming: {b}"
    );
    assert!(
        b.contains("2 outgoing anchor"),
        "anchors/both counts for outgoing: {b}"
    );
    assert!(
        text.contains(s(&cfg.config)),
        "names the file it checked\n{}",
        run.describe()
    );
}

#[test]
fn seal_and_open_with_config_only() {
    let cfg = Configured::new();
    let sealed = cfg.seal(&[]);

    let run = cfg.open(&sealed, &[]);
    run.assert_ok();
    assert_eq!(
        crlf(&run.stdout),
        crlf(MESSAGE.as_bytes()),
        "{}",
        run.describe()
    );

    let run = cfg.open(
        &sealed,
        &["--json", "--mail-from", SENDER, "--rcpt-to", RECIPIENT],
    );
    run.assert_ok();
    let json = run.json();
    assert_eq!(json["trusted"], true, "{json:#}");
    assert_eq!(json["report"]["domain"], "b.example", "{json:#}");
    assert_eq!(
        json["report"]["signer"]["binding"]["value"], SENDER,
        "{json:#}"
    );
    let cipher = json["report"]["envelope"]["content_cipher"]
        .as_str()
        .unwrap_or("");
    assert!(
        cipher.contains("256"),
        "the default cipher is AES-256-CBC: {json:#}"
    );
}

#[test]
fn environment_overrides_the_configured_cipher() {
    let cfg = Configured::new();
    let sealed = cfg.seal(&[("HISPD__SMIME__CIPHER", "aes-128-cbc")]);
    let run = cfg.open(&sealed, &["--json"]);
    run.assert_ok();
    let json = run.json();
    let cipher = json["report"]["envelope"]["content_cipher"]
        .as_str()
        .unwrap_or("");
    assert!(
        cipher.contains("128"),
        "HISPD__SMIME__CIPHER=aes-128-cbc: {json:#}"
    );

    // A bad value in the environment is a configuration error naming the key.
    let run = hispd_env(
        &cfg.elsewhere,
        &["--config", s(&cfg.config), "config", "check"],
        b"",
        &[("HISPD__SMIME__CIPHER", "rot13")],
    );
    run.assert_code(2);
    assert!(run.stderr.contains("smime.cipher"), "{}", run.describe());
}

#[test]
fn config_check_reports_a_domain_without_files_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hispd.toml");
    std::fs::write(&config, "[[domains]]\nname = \"nofiles.example\"\n").unwrap();
    let run = hispd(
        dir.path(),
        &["--config", s(&config), "config", "check"],
        b"",
    );
    run.assert_code(2);
    assert!(run.stderr.contains("domains[0]"), "{}", run.describe());
    assert!(
        run.stderr
            .contains("nofiles.example has no private certificate"),
        "{}",
        run.describe()
    );
    assert!(
        run.stderr.contains("nofiles.example has no trust anchors"),
        "{}",
        run.describe()
    );
    assert!(run.stdout.is_empty(), "{}", run.describe());
}

#[test]
fn config_check_lists_every_problem_of_a_broken_config_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hispd.toml");
    std::fs::write(
        &config,
        "[smime]\ncipher = \"des-cbc\"\n\n[policy]\nmin_rsa_bits = 1024\n\n\
[[domains]]\nname = \"nofiles.example\"\n",
    )
    .unwrap();
    let run = hispd(
        dir.path(),
        &["--config", s(&config), "config", "check"],
        b"",
    );
    run.assert_code(2);
    for key in ["smime.cipher", "policy.min_rsa_bits", "domains[0]"] {
        assert!(
            run.stderr.contains(key),
            "{key} is reported\n{}",
            run.describe()
        );
    }
    assert!(run.stderr.contains("des-cbc"), "{}", run.describe());
    assert!(run.stderr.contains("nofiles.example"), "{}", run.describe());
    assert!(
        run.stderr.contains(s(&config)),
        "names the file\n{}",
        run.describe()
    );
    assert!(run.stdout.is_empty(), "{}", run.describe());
}

#[test]
fn a_missing_config_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = hispd(
        dir.path(),
        &["--config", "missing.toml", "config", "check"],
        b"",
    );
    run.assert_code(2);
    assert!(run.stderr.contains("missing.toml"), "{}", run.describe());
}

#[test]
fn certs_protect_existing_keys_and_refuse_a_leaf_as_ca() {
    let d = TwoDomains::new(&[]);
    let root = d.root();
    let key_before = std::fs::read(d.ca_a.join("key.pem")).unwrap();

    let run = hispd(root, &["certs", "new-ca", "--out", s(&d.ca_a)], b"");
    run.assert_code(2);
    assert!(
        run.one_error_line().contains("refusing to overwrite"),
        "{}",
        run.describe()
    );
    assert_eq!(std::fs::read(d.ca_a.join("key.pem")).unwrap(), key_before);
    hispd(
        root,
        &["certs", "new-ca", "--out", s(&d.ca_a), "--force"],
        b"",
    )
    .assert_ok();
    assert_ne!(std::fs::read(d.ca_a.join("key.pem")).unwrap(), key_before);

    let out = root.join("from-leaf");
    let run = hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&d.alice),
            "--domain",
            "x.example",
            "--out",
            s(&out),
        ],
        b"",
    );
    run.assert_code(2);
    assert!(
        run.one_error_line().contains("is not a CA"),
        "{}",
        run.describe()
    );
    assert!(!out.exists());

    let run = hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&d.ca_b),
            "--domain",
            "x.example",
            "--out",
            s(&out),
            "--days",
            "0",
        ],
        b"",
    );
    run.assert_code(2);
    assert!(
        run.one_error_line().contains("--days"),
        "{}",
        run.describe()
    );

    let run = hispd(
        root,
        &[
            "certs",
            "issue",
            "--ca",
            s(&root.join("nope")),
            "--domain",
            "x.example",
            "--out",
            s(&out),
        ],
        b"",
    );
    run.assert_code(2);
    let line = run.one_error_line();
    assert_eq!(
        line.matches("No such file").count(),
        1,
        "the cause is said once: {line}"
    );
}

#[test]
fn seal_usage_errors_say_what_to_give() {
    let d = TwoDomains::new(&[]);
    let root = d.root();
    let base = ["message", "seal", "--from", SENDER, "--to", RECIPIENT];

    let mut args = base.to_vec();
    let recipient = d.bob.join("cert.pem");
    args.extend(["--recipient-cert", s(&recipient)]);
    let run = hispd(root, &args, MESSAGE.as_bytes());
    run.assert_code(2);
    assert!(
        run.one_error_line().contains("--config"),
        "{}",
        run.describe()
    );

    let sign_cert = d.alice.join("cert.pem");
    args.extend(["--sign-cert", s(&sign_cert)]);
    let run = hispd(root, &args, MESSAGE.as_bytes());
    run.assert_code(2);
    assert!(
        run.one_error_line().contains("holds no private key"),
        "{}",
        run.describe()
    );
}

/// sled's flush writes its log with sync_file_range, which leaves the entry
/// in the disk's write cache (and the log's new size unwritten): a power
/// failure could lose an index entry after its "flush". Every index write
/// the store acknowledges is followed by an fdatasync of sled's log, seen
/// here with strace on a real write (adding a patient).
#[test]
fn an_index_write_is_followed_by_fdatasync_of_the_index_log() {
    let dir = TempDir::new().expect("tempdir");
    let trace = dir.path().join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-e", "trace=openat,sync_file_range,fdatasync", "-o"])
        .arg(&trace)
        .arg(HISPD)
        .args([
            "patients",
            "add",
            "jane",
            "--name",
            "Jane Doe",
            "--identifier",
            "1234^^^&2.16.840.1.113883.19.5&ISO",
        ])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("strace (apt-get install strace)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&trace).expect("strace log");
    // File descriptors of sled's log file (sled's own and the store's).
    let mut db_fds = std::collections::HashSet::new();
    // (line number, fd) of each sync_file_range and fdatasync on them.
    let (mut ranges, mut datasyncs) = (Vec::new(), Vec::new());
    for (n, line) in log.lines().enumerate() {
        let fd_after = |call: &str| -> Option<String> {
            let rest = &line[line.find(call)? + call.len()..];
            Some(rest.split([',', ')']).next()?.trim().to_string())
        };
        if line.contains("openat(") && line.contains("/index/db\"") {
            if let Some(fd) = line.rsplit("= ").next() {
                db_fds.insert(fd.trim().to_string());
            }
        } else if let Some(fd) = fd_after("sync_file_range(") {
            if db_fds.contains(&fd) {
                ranges.push(n);
            }
        } else if let Some(fd) = fd_after("fdatasync(") {
            if db_fds.contains(&fd) {
                datasyncs.push(n);
            }
        }
    }
    let last_range = *ranges
        .last()
        .unwrap_or_else(|| panic!("sled never wrote its log with sync_file_range:\n{log}"));
    assert!(
        datasyncs.iter().any(|&d| d > last_range),
        "no fdatasync of the index log after sled's last sync_file_range:\n{log}"
    );
}
