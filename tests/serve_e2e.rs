//! Two `hispd serve` processes, a.example and b.example, their certificates
//! and MX records in a real BIND: a message submitted with Python's smtplib
//! to A arrives decrypted in B's mailbox, S/MIME on the wire between them;
//! a recipient without a certificate gets its sender a DSN; the MX refuses
//! what is unsigned, untrusted or not for it; nobody relays unauthenticated.

mod common;

use common::hisp::*;
use common::peers::openssl_decrypt;
use common::servers::free_port;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A TCP proxy to `target` that records what the client sends and hides
/// STARTTLS from the server's EHLO answer, as an attacker on the path could:
/// the content must still be protected (and readable for the test).
type Tap = Arc<Mutex<Vec<u8>>>;

fn tapping_proxy(target: u16) -> (u16, Tap) {
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("proxy");
    let tap = Arc::new(Mutex::new(Vec::new()));
    let tap2 = tap.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut c_read, mut s_write) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let tap = tap2.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    tap.lock().expect("tap").extend_from_slice(&buf[..n]);
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = s_read.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).replace("STARTTLS", "XXXXXXXX");
                    if c_write.write_all(text.as_bytes()).is_err() {
                        break;
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, tap)
}

fn cli_ok(node: &Node, args: &[&str]) -> String {
    let out = node.cli(args, b"");
    assert!(
        out.status.success(),
        "hispd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_message_crosses_two_hisps_sealed_and_a_recipient_without_certificate_gets_a_dsn() {
    let tap_holder: Arc<Mutex<Option<Tap>>> = Arc::new(Mutex::new(None));
    let holder = tap_holder.clone();
    let mut net = Net::new(move |b| {
        let (port, tap) = tapping_proxy(b.mx_port);
        *holder.lock().expect("holder") = Some(tap);
        port
    });
    let tap = tap_holder.lock().expect("holder").clone().expect("tap");

    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(
            &[BOB, "dave@c.example"],
            "e2e-1",
            "Potassium 4.1 mmol/L"
        )]),
    );
    assert_eq!(results[0]["ok"], true, "{results:?}");

    assert!(
        net.b
            .wait_log(Duration::from_secs(60), |l| l.contains("e2e-1@a.example")
                && l.contains("delivered")),
        "B delivers the message\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| l
            .contains("DSN delivered to the sender")),
        "A sends Alice a DSN for dave\nA:\n{}",
        net.a.log_text()
    );
    net.a.stop();
    net.b.stop();

    // B's mailbox holds the decrypted message.
    let list = cli_ok(&net.b, &["mailbox", "list", BOB]);
    assert!(list.contains("<e2e-1@a.example>"), "{list}");
    let uid = list.split_whitespace().next().expect("uid").to_string();
    let delivered = cli_ok(&net.b, &["mailbox", "show", BOB, &uid]);
    assert!(
        delivered.contains("Potassium 4.1 mmol/L") && delivered.contains("Subject: test e2e-1"),
        "{delivered}"
    );

    // Between A and B only S/MIME travelled: B's key decrypts it with openssl.
    let wire = tap.lock().expect("tap").clone();
    let wire_text = String::from_utf8_lossy(&wire).to_string();
    assert!(
        !wire_text.contains("Potassium"),
        "no clinical content in clear on the wire"
    );
    let start = wire_text.find("DATA\r\n").expect("DATA on the wire") + 6;
    let end = wire_text[start..].find("\r\n.\r\n").expect("end of data") + start + 2;
    let data = &wire[start..end];
    assert!(String::from_utf8_lossy(data).contains("application/pkcs7-mime"));
    let key_dir = net.b.dir.join("certs/b.example/private");
    let signed = openssl_decrypt(data, &key_dir.join("cert.pem"), &key_dir.join("key.pem"))
        .expect("openssl decrypts for B");
    assert!(String::from_utf8_lossy(&signed).contains("multipart/signed"));

    // Alice got a DSN naming dave and why.
    let list = cli_ok(&net.a, &["mailbox", "list", ALICE]);
    let uid = list
        .split_whitespace()
        .next()
        .expect("a DSN in Alice's mailbox")
        .to_string();
    let dsn = cli_ok(&net.a, &["mailbox", "show", ALICE, &uid]);
    let parsed = hispd::notify::dsn::parse_dsn(dsn.as_bytes()).expect("a DSN");
    assert_eq!(parsed.len(), 1, "only dave failed: {parsed:?}");
    assert_eq!(parsed[0].0, "dave@c.example");
    assert_eq!(parsed[0].1, "failed");
    assert!(
        parsed[0]
            .3
            .as_deref()
            .unwrap_or_default()
            .contains("no usable certificate"),
        "{parsed:?}"
    );
    drop(net.bind.take());
}

const PROBE_PY: &str = r#"
import json, smtplib, sys
mx, sub = int(sys.argv[1]), int(sys.argv[2])
sealed_untrusted = open(sys.argv[3], "rb").read()
out = {}
def attempt(name, port, fn):
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
        s.ehlo("probe.test")
        fn(s)
        out[name] = "accepted"
    except smtplib.SMTPResponseException as e:
        out[name] = "%d %s" % (e.smtp_code, e.smtp_error.decode(errors="replace"))
    except smtplib.SMTPRecipientsRefused as e:
        code, text = list(e.recipients.values())[0]
        out[name] = "%d %s" % (code, text.decode(errors="replace"))
    except Exception as e:
        out[name] = "error " + repr(e)
plain = b"From: alice@a.example\r\nTo: bob@b.example\r\nSubject: plain\r\n\r\nnot encrypted\r\n"
attempt("unencrypted", mx, lambda s: s.sendmail("alice@a.example", ["bob@b.example"], plain))
attempt("untrusted", mx, lambda s: s.sendmail("alice@a.example", ["bob@b.example"], sealed_untrusted))
attempt("relay_mx", mx, lambda s: s.sendmail("x@b.example", ["victim@elsewhere.example"], plain))
def no_auth(s):
    s.starttls(); s.ehlo("probe.test")
    s.sendmail("alice@a.example", ["victim@elsewhere.example"], plain)
attempt("relay_submission", sub, no_auth)
def auth_in_clear(s):
    s.docmd("AUTH", "PLAIN AGFsaWNlQGEuZXhhbXBsZQBhbGljZS1wYXNzd29yZC0x")
    code, text = s.docmd("AUTH", "PLAIN AGFsaWNlQGEuZXhhbXBsZQBhbGljZS1wYXNzd29yZC0x")
    raise smtplib.SMTPResponseException(code, text)
attempt("auth_without_tls", sub, auth_in_clear)
def wrong_sender(s):
    s.starttls(); s.ehlo("probe.test"); s.login("alice@a.example", "alice-password-1")
    s.sendmail("mallory@a.example", ["bob@b.example"], plain)
attempt("spoofed_sender", sub, wrong_sender)
print(json.dumps(out))
"#;

#[test]
fn the_mx_refuses_unsigned_untrusted_and_relayed_mail_and_submission_needs_auth() {
    let net = Net::new(|b| b.mx_port);
    // A message signed by a CA that B does not trust, for B's certificate.
    let root = net.root.path();
    let hispd = hispd_bin();
    let run = |args: &[&str]| {
        let out = Command::new(hispd).args(args).output().expect("hispd");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let rogue = root.join("rogue-ca");
    let rogue_leaf = root.join("rogue-leaf");
    run(&[
        "certs",
        "new-ca",
        "--out",
        &rogue.display().to_string(),
        "--name",
        "Rogue CA",
    ]);
    run(&[
        "certs",
        "issue",
        "--ca",
        &rogue.display().to_string(),
        "--domain",
        "a.example",
        "--out",
        &rogue_leaf.display().to_string(),
    ]);
    let sealed = seal_with_cli(
        &rogue_leaf,
        &net.b.dir.join("certs/b.example/private/cert.pem"),
        b"From: alice@a.example\r\nTo: bob@b.example\r\nSubject: rogue\r\n\r\nfrom a rogue CA\r\n",
    );
    let sealed_path = root.join("untrusted.eml");
    std::fs::write(&sealed_path, &sealed).expect("write");

    let out = Command::new("python3")
        .args([
            "-c",
            PROBE_PY,
            &net.b.mx_port.to_string(),
            &net.a.submission_port.to_string(),
        ])
        .arg(&sealed_path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let get = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    assert!(
        get("unencrypted").starts_with("554") && get("unencrypted").contains("[not-encrypted]"),
        "{r:#}"
    );
    assert!(
        get("untrusted").starts_with("554") && get("untrusted").contains("[signer-trust]"),
        "{r:#}"
    );
    assert!(
        get("untrusted").contains("Rogue CA"),
        "the reason names the issuer: {r:#}"
    );
    assert!(
        get("relay_mx").starts_with("550") && get("relay_mx").contains("relaying denied"),
        "{r:#}"
    );
    assert!(get("relay_submission").starts_with("530"), "{r:#}");
    assert!(get("auth_without_tls").starts_with("538"), "{r:#}");
    assert!(get("spoofed_sender").starts_with("553"), "{r:#}");
    assert!(
        net.b.log_text().contains("incoming-refused"),
        "an audit event for each refusal"
    );
}

#[test]
fn received_mail_goes_decrypted_to_the_domains_edge_relay() {
    let sink = common::sink::SmtpSink::start(&[]);
    let other_ehr = common::sink::SmtpSink::start(&[]);
    let mut net = Net::with_edge_relay(|b| b.mx_port, Some(sink.addr.to_string()));
    // Per address, the route overrides the domain's edge relay: carol keeps
    // a built-in mailbox, dave's mail goes to another EHR. Added to the
    // running B's configuration, taken up on SIGHUP.
    let mut config = std::fs::read_to_string(&net.b.config).expect("config");
    config.push_str(&format!(
        "\n[[domains.routes]]\naddress = \"carol@b.example\"\ndeliver = \"mailbox\"\n\
         \n[[domains.routes]]\naddress = \"Dave@B.example\"\ndeliver = \"{}\"\n",
        other_ehr.addr
    ));
    std::fs::write(&net.b.config, config).expect("config");
    net.b.hup();
    assert!(
        net.b.wait_log(Duration::from_secs(10), |l| l
            .contains("edge routes reloaded")),
        "{}",
        net.b.log_text()
    );
    const CAROL: &str = "carol@b.example";
    const DAVE: &str = "dave@b.example";
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB, CAROL, DAVE], "relay-1", "to the EHR")]),
    );
    assert_eq!(results[0]["ok"], true, "{results:?}");
    let dump = sink.single_dump();
    let text = String::from_utf8_lossy(&dump);
    assert!(
        text.contains("Message-ID: <relay-1@a.example>") && text.contains("to the EHR"),
        "{text}"
    );
    let envelope = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter_map(|l| l.strip_prefix("X-Rcpt-Args: "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(envelope(&text), vec![format!("<{BOB}>")], "{text}");
    let other = String::from_utf8_lossy(&other_ehr.single_dump()).to_string();
    assert!(other.contains("Message-ID: <relay-1@a.example>"), "{other}");
    assert_eq!(envelope(&other), vec![format!("<{DAVE}>")], "{other}");
    assert!(
        !text.contains("pkcs7"),
        "the EHR gets the decrypted message: {text}"
    );
    assert!(
        net.b
            .wait_log(Duration::from_secs(30), |l| l.contains("edge relay")
                && l.contains("completed")),
        "{}",
        net.b.log_text()
    );
    net.b.stop();
    let list = net.b.cli(&["mailbox", "list", BOB], b"");
    assert!(
        String::from_utf8_lossy(&list.stdout).trim().is_empty(),
        "nothing kept in B's mailbox"
    );
    let list = net.b.cli(&["mailbox", "list", CAROL], b"");
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("<relay-1@a.example>"),
        "carol's route keeps her mail in her mailbox: {}",
        String::from_utf8_lossy(&list.stdout)
    );
    drop(net.bind.take());
}

/// An EHR relaying by IP (submission_trusted_networks): plain SMTP with no
/// AUTH is accepted from A's own domain and sealed to B like any submission;
/// a foreign sender is refused, envelope or From header.
#[test]
fn a_trusted_network_submits_without_auth_from_local_domains_only() {
    let mut net = Net::new(|b| b.mx_port);
    net.a.stop();
    let config = std::fs::read_to_string(&net.a.config).expect("config");
    std::fs::write(
        &net.a.config,
        config.replacen(
            "[server]\n",
            "[server]\nsubmission_trusted_networks = [\"127.0.0.0/8\", \"::1\"]\n",
            1,
        ),
    )
    .expect("config");
    net.a.start();
    let script = r#"
import smtplib, sys, json
port = int(sys.argv[1])
out = []
for sender, header_from in [("alice@a.example", "alice@a.example"), ("mallory@evil.example", "mallory@evil.example"), ("alice@a.example", "mallory@evil.example")]:
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("ehr.a.example")
    try:
        s.sendmail(sender, ["bob@b.example"], f"From: {header_from}\r\nTo: bob@b.example\r\nSubject: relay\r\nMessage-ID: <relay-{len(out)}@a.example>\r\n\r\nrelayed by IP\r\n")
        out.append("ok")
    except smtplib.SMTPException as e:
        out.append(str(e))
    s.close()
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &net.a.submission_port.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<String> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(results[0], "ok", "{results:?}");
    assert!(
        results[1].contains("553") && results[1].contains("trusted relay"),
        "{results:?}"
    );
    assert!(
        results[2].contains("550") && results[2].contains("From header"),
        "{results:?}"
    );
    assert!(
        net.b
            .wait_log(Duration::from_secs(60), |l| l.contains("relay-0@a.example")
                && l.contains("delivered")),
        "B receives the relayed message\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
}

/// `[delivery] memory_budget_mb`: messages that together exceed the budget
/// are delivered one after another (each still goes), while the remote
/// server is slow to answer; every one arrives.
#[test]
fn large_messages_are_delivered_within_the_memory_budget() {
    // smtp-sink waits 1 s before answering DATA: deliveries overlap unless
    // the budget keeps them apart.
    let sink = common::sink::SmtpSink::start(&["-w", "1"]);
    let mut net = Net::new(|_| sink.addr.port());
    net.a.stop();
    let config = std::fs::read_to_string(&net.a.config).expect("config");
    std::fs::write(
        &net.a.config,
        config.replacen("[delivery]\n", "[delivery]\nmemory_budget_mb = 1\n", 1),
    )
    .expect("config");
    net.a.start();
    // 700 KB each: two of them exceed 1 MiB.
    let body =
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(10_600);
    let messages: Vec<_> = (0..3)
        .map(|i| message(&[BOB], &format!("big-{i}"), &body))
        .collect();
    let results = submit(net.a.submission_port, &serde_json::json!(messages));
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");
    assert!(
        net.a.wait_log(Duration::from_secs(90), |log| log
            .matches("delivery attempt")
            .count()
            >= 3),
        "{}",
        net.a.log_text()
    );
    let log = net.a.log_text();
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("delivery started"))
        .collect();
    assert_eq!(started.len(), 3, "{log}");
    for line in &started {
        assert!(
            line.contains(r#""others_in_flight":0,"#) && line.contains(r#""others_bytes":0}"#),
            "each large message went alone: {line}\n{log}"
        );
    }
    assert_eq!(
        log.matches("delivery attempt").count(),
        3,
        "one attempt each, all delivered: {log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("delivery attempt") && l.contains("completed"))
            .count(),
        3,
        "{log}"
    );
    // The three come on one connection, each sent as soon as the previous
    // one is accepted: the second and third are read only once the delivery
    // before them ends (the sink holds each for a second), so no more than
    // one is in memory at a time.
    let paused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("receiving paused for the memory budget"))
        .collect();
    assert_eq!(paused.len(), 2, "{log}");
    let position = |needle: &str, nth: usize| {
        log.lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("no {needle} #{nth}: {log}"))
    };
    for n in 0..2 {
        assert!(
            position("delivery attempt", n) < position("receiving paused", n)
                && position("receiving paused", n) < position("accepted for delivery", n + 1),
            "message {} was read after message {n} was delivered: {log}",
            n + 1
        );
    }
    drop(net.bind.take());
}
