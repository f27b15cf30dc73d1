//! Trust bundles and revocation in a running daemon: B trusts A only through
//! a bundle served over HTTP; changing the bundle changes what the running
//! B trusts after the refresh interval, without a restart.

mod common;

use common::hisp::*;
use common::servers::{free_port, HttpServer};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A DER PKCS#7 certs-only bundle of the PEM certificates given.
fn make_bundle(out: &Path, certs: &[&Path]) {
    let mut cmd = Command::new("openssl");
    cmd.args(["crl2pkcs7", "-nocrl", "-outform", "DER", "-out"])
        .arg(out);
    for c in certs {
        cmd.arg("-certfile").arg(c);
    }
    assert!(cmd.status().expect("openssl").success());
}

fn submit_and_wait(net: &Net, id: &str, refused_before: usize) -> bool {
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], id, "via the bundle")]),
    );
    assert_eq!(results[0]["ok"], true);
    let needle = format!("{id}@a.example");
    let delivered = net.b.wait_log(Duration::from_secs(30), |l| {
        l.lines()
            .any(|x| x.contains(&needle) && x.contains("\"delivered\""))
            || l.matches("incoming-refused").count() > refused_before
    });
    assert!(delivered, "B decided\n{}", net.b.log_text());
    net.b
        .log_text()
        .lines()
        .any(|x| x.contains(&needle) && x.contains("\"delivered\""))
}

#[test]
fn a_changed_bundle_changes_what_the_running_daemon_trusts() {
    let mut net = Net::new(|b| b.mx_port);
    let root = net.root.path().to_path_buf();
    let served = root.join("served");
    std::fs::create_dir_all(&served).expect("dir");
    let rogue = root.join("rogue-ca");
    let out = Command::new(hispd_bin())
        .args(["certs", "new-ca", "--out"])
        .arg(&rogue)
        .args(["--name", "Some Other CA"])
        .output()
        .expect("hispd");
    assert!(out.status.success());
    let a_ca = root.join("ca-a.example/cert.pem");
    let other = rogue.join("cert.pem");
    make_bundle(&served.join("community.p7b"), &[&other]);
    let port = free_port();
    let _http = HttpServer::start_on(&served, port);

    // B: A's CA only through the bundle (incoming), refreshed every 2 s.
    net.b.stop();
    std::fs::remove_file(
        net.b
            .dir
            .join("certs/b.example/anchors/both/a.example-ca.pem"),
    )
    .expect("remove file anchor");
    std::fs::create_dir_all(net.b.dir.join("certs/b.example/anchors/outgoing")).expect("dir");
    std::fs::copy(
        &a_ca,
        net.b.dir.join("certs/b.example/anchors/outgoing/a.pem"),
    )
    .expect("outgoing anchor");
    let mut config = std::fs::read_to_string(&net.b.config).expect("config");
    config.push_str(&format!(
        "\n[[bundles]]\nname = \"community\"\nurl = \"http://127.0.0.1:{port}/community.p7b\"\nrefresh_secs = 2\ndirection = \"in\"\n"
    ));
    std::fs::write(&net.b.config, config).expect("config");
    net.b.start();
    assert!(
        net.b
            .wait_log(Duration::from_secs(20), |l| l.contains("bundle-updated")),
        "{}",
        net.b.log_text()
    );

    let listed = net.b.cli(&["bundles", "list"], b"");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("1 anchor(s)"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    let shown = net.b.cli(&["bundles", "show", "community"], b"");
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("Some Other CA"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let anchors = net.b.cli(&["anchors", "list", "--json"], b"");
    let anchors: serde_json::Value = serde_json::from_slice(&anchors.stdout).expect("json");
    assert!(
        anchors
            .as_array()
            .expect("list")
            .iter()
            .any(|e| e["source"] == "bundle community"),
        "{anchors:#}"
    );

    // v1 (another CA): A is not trusted.
    assert!(
        !submit_and_wait(&net, "bundle-1", 0),
        "refused while the bundle lacks A's CA"
    );

    // v2 adds A's CA: trusted after the refresh, same process.
    make_bundle(&served.join("community.p7b"), &[&other, &a_ca]);
    assert!(
        net.b.wait_log(Duration::from_secs(20), |l| l
            .matches("bundle-updated")
            .count()
            >= 2),
        "{}",
        net.b.log_text()
    );
    assert!(
        submit_and_wait(&net, "bundle-2", 1),
        "accepted once the bundle has A's CA"
    );

    // A broken bundle is refused and the last good anchors stay.
    std::fs::write(served.join("community.p7b"), b"not a bundle").expect("write");
    assert!(
        net.b.wait_log(Duration::from_secs(20), |l| l
            .contains("refresh failed, keeping the previous anchors")),
        "{}",
        net.b.log_text()
    );
    assert!(
        submit_and_wait(&net, "bundle-3", 1),
        "still trusted with the last good copy"
    );
    // A restart while the source is still broken starts from the last good
    // copy kept on disk.
    net.b.stop();
    net.b.start();
    assert!(
        submit_and_wait(&net, "bundle-3b", 1),
        "trusted after a restart from the copy on disk\n{}",
        net.b.log_text()
    );

    // v3 drops A's CA again: no longer trusted.
    make_bundle(&served.join("community.p7b"), &[&other]);
    assert!(
        net.b.wait_log(Duration::from_secs(20), |l| l
            .matches("bundle-updated")
            .count()
            >= 3),
        "{}",
        net.b.log_text()
    );
    assert!(
        !submit_and_wait(&net, "bundle-4", 1),
        "refused once A's CA left the bundle"
    );
    drop(net.bind.take());
}

/// Sends `message` to the MX on `port` as alice@a.example to bob@b.example
/// and returns the server's reply to the end of DATA ("554 ..." or "250 ...").
fn send_to_mx(port: u16, message: &Path) -> String {
    const SEND_PY: &str = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.ehlo("test.example")
s.mail("alice@a.example")
s.rcpt("bob@b.example")
code, text = s.data(open(sys.argv[2], "rb").read())
print(code, text.decode())
s.quit()
"#;
    let out = Command::new("python3")
        .args(["-c", SEND_PY, &port.to_string()])
        .arg(message)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_revoked_certificate_neither_signs_nor_is_trusted_on_receipt() {
    let mut net = Net::new(|b| b.mx_port);
    let root = net.root.path().to_path_buf();
    let served = root.join("crl");
    std::fs::create_dir_all(&served).expect("dir");
    let http = HttpServer::start(&served);

    // A's only signing certificate names a CRL (at its distribution point)
    // that revokes it.
    net.a.stop();
    let ca = hispd::pki::load(&root.join("ca-a.example")).expect("A's CA");
    let spec = hispd::pki::LeafSpec {
        crl_url: Some(http.url("a.crl")),
        ..hispd::pki::LeafSpec::domain("a.example")
    };
    let leaf = hispd::pki::issue(&ca, &spec).expect("leaf");
    // A trusts its own CA too (so it knows the issuer that signs the CRL).
    std::fs::copy(
        root.join("ca-a.example/cert.pem"),
        net.a
            .dir
            .join("certs/a.example/anchors/both/a.example-ca.pem"),
    )
    .expect("own anchor");
    let private = net.a.dir.join("certs/a.example/private");
    hispd::pki::save(&leaf, &private).expect("save");
    let crl = hispd::pki::crl(&ca, &[&leaf.cert], 1).expect("crl");
    std::fs::write(served.join("a.crl"), crl.to_der().expect("der")).expect("write crl");
    net.a.start();

    // A does not sign with it: the message stays queued, nothing reaches B.
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "revoked-1", "from a revoked key")]),
    );
    assert_eq!(results[0]["ok"], true, "accepted for later delivery");
    assert!(
        net.a.wait_log(Duration::from_secs(30), |l| l
            .contains("signing-certificate-revoked")
            && l.contains("revoked")),
        "A refuses to sign with its revoked certificate\nA:\n{}",
        net.a.log_text()
    );
    assert!(
        !net.a.log_text().contains("\"sealed\""),
        "nothing was sealed\nA:\n{}",
        net.a.log_text()
    );
    assert!(
        !net.b.log_text().contains("revoked-1"),
        "B never saw it\nB:\n{}",
        net.b.log_text()
    );

    // The same certificate used elsewhere (the CLI seals without asking the
    // CRL): B refuses what it signed, with that reason.
    let sealed = seal_with_cli(
        &private,
        &net.b.dir.join("certs/b.example/private/cert.pem"),
        b"From: alice@a.example\r\nTo: bob@b.example\r\nSubject: revoked\r\n\
          Message-ID: <revoked-cli@a.example>\r\n\r\nfrom a revoked key\r\n",
    );
    let sealed_path = root.join("revoked.eml");
    std::fs::write(&sealed_path, &sealed).expect("write");
    let reply = send_to_mx(net.b.mx_port, &sealed_path);
    assert!(
        reply.starts_with("554") && reply.contains("[signer-revoked]") && reply.contains("revoked"),
        "B refuses the revoked signer with the reason: {reply}\nB:\n{}",
        net.b.log_text()
    );
    assert!(
        !net.b.log_text().contains("\"delivered\""),
        "nothing delivered"
    );

    // With a CRL that no longer lists it, the same certificate signs and is
    // accepted (fresh processes: the CRL cache lives until nextUpdate).
    let clean = hispd::pki::crl(&ca, &[], 2).expect("crl");
    std::fs::write(served.join("a.crl"), clean.to_der().expect("der")).expect("write crl");
    net.a.stop();
    net.a.start();
    net.b.stop();
    net.b.start();
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "revoked-2", "after reinstatement")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.b.wait_log(Duration::from_secs(30), |l| l
            .contains("revoked-2@a.example")
            && l.contains("\"delivered\"")),
        "{}",
        net.b.log_text()
    );
    drop(net.bind.take());
}
