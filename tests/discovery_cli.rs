//! `hispd certs publish` output loaded into real BIND and OpenLDAP, then
//! `hispd certs discover` and `hispd message seal` finding certificates
//! through them: the two sides of discovery, end to end.

mod common;

use common::servers::{ldif_dc, Bind, Slapd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn hispd(args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hispd"))
        .args(args)
        .env_remove("HISPD__DISCOVERY__NAMESERVERS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hispd");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstderr: {}\nstdout: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl x509 -fingerprint -sha256`, as lower-case hex without colons.
fn openssl_fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .replace(':', "")
        .to_ascii_lowercase()
}

/// A receiving domain `pub.example` (address-bound alice and a domain-bound
/// certificate) and a sending domain `send.example`, each with its config.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Setup { dir };
        let p = |x: &str| s.path(x);
        ok(&hispd(
            &["certs", "new-ca", "--out", &p("ca-pub"), "--name", "Pub CA"],
            b"",
        ));
        ok(&hispd(
            &[
                "certs",
                "new-ca",
                "--out",
                &p("ca-send"),
                "--name",
                "Send CA",
            ],
            b"",
        ));
        for (args, out) in [
            (
                vec!["--ca", &*p("ca-pub"), "--address", "alice@pub.example"],
                "alice",
            ),
            (
                vec!["--ca", &*p("ca-pub"), "--domain", "pub.example"],
                "pubdomain",
            ),
            (
                vec!["--ca", &*p("ca-send"), "--domain", "send.example"],
                "senddomain",
            ),
        ] {
            let mut a = vec!["certs", "issue", "--out"];
            let outp = p(out);
            a.push(&outp);
            a.extend(args);
            ok(&hispd(&a, b""));
        }
        // The on-disk layout of certs/README.md.
        let layout = [
            ("pub/certs/pub.example/private/alice.pem", "alice/cert.pem"),
            ("pub/certs/pub.example/private/alice.key", "alice/key.pem"),
            (
                "pub/certs/pub.example/private/domain.pem",
                "pubdomain/cert.pem",
            ),
            (
                "pub/certs/pub.example/private/domain.key",
                "pubdomain/key.pem",
            ),
            (
                "pub/certs/pub.example/anchors/both/send-ca.pem",
                "ca-send/cert.pem",
            ),
            (
                "send/certs/send.example/private/domain.pem",
                "senddomain/cert.pem",
            ),
            (
                "send/certs/send.example/private/domain.key",
                "senddomain/key.pem",
            ),
            (
                "send/certs/send.example/anchors/both/pub-ca.pem",
                "ca-pub/cert.pem",
            ),
        ];
        for (to, from) in layout {
            let to = s.dir.path().join(to);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(s.dir.path().join(from), &to).expect("copy");
        }
        std::fs::write(
            s.dir.path().join("pub/hispd.toml"),
            "[[domains]]\nname = \"pub.example\"\n",
        )
        .expect("conf");
        s
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    fn sender_config(&self, nameserver: &str, sources: &str) -> PathBuf {
        let path = self.dir.path().join("send/hispd.toml");
        std::fs::write(
            &path,
            format!(
                "[discovery]\nsources = [{sources}]\nnameservers = [\"{nameserver}\"]\ndns_timeout_ms = 2000\n\n[[domains]]\nname = \"send.example\"\n"
            ),
        )
        .expect("conf");
        path
    }
}

#[test]
fn published_zone_records_are_discovered_and_used_to_seal() {
    let s = Setup::new();
    let pub_conf = s.path("pub/hispd.toml");
    let zone = ok(&hispd(
        &["--config", &pub_conf, "certs", "publish", "--zone"],
        b"",
    ));
    assert!(
        zone.contains("alice.pub.example. IN CERT PKIX 0 0 "),
        "{zone}"
    );
    assert!(zone.contains("\npub.example. IN CERT PKIX 0 0 "), "{zone}");
    let bind = Bind::start(&[("example", &zone)]).expect("BIND loads the published records");
    let ns = bind.addr().to_string();

    // Discover, as an operator would, with the sender's anchors.
    let out = hispd(
        &[
            "certs",
            "discover",
            "alice@pub.example",
            "--nameserver",
            &ns,
            "--anchors",
            &s.path("ca-pub/cert.pem"),
            "--json",
        ],
        b"",
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).expect("json");
    let chosen = json["chosen"].as_array().expect("chosen");
    assert_eq!(chosen.len(), 1, "{json:#}");
    assert_eq!(chosen[0]["bound"], "address");
    assert_eq!(
        chosen[0]["fingerprint_sha256"],
        openssl_fingerprint(Path::new(&s.path("alice/cert.pem")))
    );
    assert!(
        chosen[0]["source"]
            .as_str()
            .unwrap_or_default()
            .contains("DNS CERT"),
        "{json:#}"
    );
    assert!(chosen[0]["san"]
        .to_string()
        .contains("email:alice@pub.example"));

    // A recipient without an address-bound certificate gets the domain-bound one.
    let out = hispd(
        &[
            "certs",
            "discover",
            "bob@pub.example",
            "--nameserver",
            &ns,
            "--anchors",
            &s.path("ca-pub/cert.pem"),
        ],
        b"",
    );
    let text = ok(&out);
    assert!(text.contains("(domain-bound)"), "{text}");

    // Without the right anchor: nothing usable, exit 2, and the reason shown.
    let out = hispd(
        &[
            "certs",
            "discover",
            "alice@pub.example",
            "--nameserver",
            &ns,
            "--anchors",
            &s.path("ca-send/cert.pem"),
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REFUSED") && text.contains("does not chain"),
        "{text}"
    );

    // Seal through discovery (no --recipient-cert), then open at the receiver.
    let send_conf = s.sender_config(&ns, "\"dns\"");
    let message = b"From: desk@send.example\r\nTo: alice@pub.example\r\nSubject: discovered\r\nMessage-ID: <d1@send.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\r\nfound you in DNS\r\n";
    let sealed = hispd(
        &[
            "--config",
            &send_conf.display().to_string(),
            "message",
            "seal",
            "--from",
            "desk@send.example",
            "--to",
            "alice@pub.example",
        ],
        message,
    );
    let sealed = ok(&sealed);
    let opened = hispd(
        &["--config", &pub_conf, "message", "open", "--json"],
        sealed.as_bytes(),
    );
    let report: serde_json::Value = serde_json::from_str(&ok(&opened)).expect("json");
    assert_eq!(report["trusted"], true);
    assert!(
        report["report"]["decrypted_with"]["subject"]
            .to_string()
            .contains("alice@pub.example"),
        "{report:#}"
    );

    // A recipient nobody publishes: sealing is refused, naming the recipient.
    let out = hispd(
        &[
            "--config",
            &send_conf.display().to_string(),
            "message",
            "seal",
            "--from",
            "desk@send.example",
            "--to",
            "carol@nowhere.example",
        ],
        b"From: desk@send.example\r\nTo: carol@nowhere.example\r\n\r\nhi\r\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no usable certificate for carol@nowhere.example"),
        "{err}"
    );
}

#[test]
fn published_ldif_is_discovered_through_srv_and_ldap() {
    let s = Setup::new();
    let pub_conf = s.path("pub/hispd.toml");
    let ldif = ok(&hispd(
        &["--config", &pub_conf, "certs", "publish", "--ldif"],
        b"",
    ));
    assert!(
        ldif.contains("dn: cn=alice@pub.example,dc=pub,dc=example"),
        "{ldif}"
    );
    let ldap =
        Slapd::start(&format!("{}{ldif}", ldif_dc("pub"))).expect("slapd loads the published LDIF");
    let zone = format!(
        "ldap1 A 127.0.0.1\n_ldap._tcp.pub SRV 0 0 {} ldap1\n",
        ldap.port
    );
    let bind = Bind::start(&[("example", &zone)]).expect("named");
    let ns = bind.addr().to_string();

    let out = hispd(
        &[
            "certs",
            "discover",
            "alice@pub.example",
            "--nameserver",
            &ns,
            "--anchors",
            &s.path("ca-pub/cert.pem"),
            "--json",
        ],
        b"",
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).expect("json");
    assert_eq!(json["chosen"][0]["bound"], "address", "{json:#}");
    assert!(
        json["chosen"][0]["source"]
            .as_str()
            .unwrap_or_default()
            .starts_with("LDAP ldap://127.0.0.1:"),
        "{json:#}"
    );
    assert_eq!(
        json["chosen"][0]["fingerprint_sha256"],
        openssl_fingerprint(Path::new(&s.path("alice/cert.pem")))
    );
}

#[test]
fn discover_exit_codes_are_0_found_2_none_1_usage() {
    let zone = "";
    let bind = Bind::start(&[("example", zone)]).expect("named");
    let ns = bind.addr().to_string();
    let out = hispd(
        &[
            "certs",
            "discover",
            "nobody@none.example",
            "--nameserver",
            &ns,
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no usable certificate found"), "{text}");

    let out = hispd(
        &["certs", "discover", "not-an-address", "--nameserver", &ns],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-address"));
    let out = hispd(&["certs", "discover"], b"");
    assert_eq!(out.status.code(), Some(1));
    let out = hispd(
        &[
            "certs",
            "discover",
            "a@b.example",
            "--nameserver",
            "nonsense",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nameserver"));
}
