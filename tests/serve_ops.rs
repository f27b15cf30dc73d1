//! Operations of `hispd serve`: retries while the destination is down, the
//! maximum age and its DSN, and SIGHUP reloading anchors without a restart
//! or a dropped session, under systemd's notify protocol.

mod common;

use common::hisp::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// The next sd_notify datagram that contains `wanted` (others, such as
/// watchdog pats, are skipped); panics after the socket's read timeout.
fn next_notification(socket: &UnixDatagram, wanted: &str) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {wanted} from hispd: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if let Some(line) = text.lines().find(|l| *l == wanted) {
            return line.to_string();
        }
    }
}

/// One SMTP reply (all its lines).
fn smtp_reply(stream: &mut std::net::TcpStream) -> String {
    let mut reply = String::new();
    let mut byte = [0u8; 1];
    loop {
        let mut line = String::new();
        while !line.ends_with("\r\n") {
            let n = stream.read(&mut byte).expect("SMTP reply");
            assert!(n == 1, "connection closed after {reply}{line}");
            line.push(byte[0] as char);
        }
        reply.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return reply;
        }
    }
}

fn dsn_in_alices_mailbox(net: &Net) -> Vec<(String, String, String, Option<String>)> {
    let out = net.a.cli(&["mailbox", "list", ALICE], b"");
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    let mut all = Vec::new();
    for uid in list.lines().filter_map(|l| l.split('\t').next()) {
        let shown = net.a.cli(&["mailbox", "show", ALICE, uid], b"");
        if let Some(parsed) = hispd::notify::dsn::parse_dsn(&shown.stdout) {
            all.extend(parsed);
        }
    }
    all
}

#[test]
fn delivery_is_retried_until_the_destination_is_back() {
    let mut net = Net::new(|b| b.mx_port);
    net.b.stop();
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "retry-1", "later")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.a
            .wait_log(Duration::from_secs(30), |l| l.contains("retry-1")
                || l.contains("temporary failure")),
        "{}",
        net.a.log_text()
    );
    assert!(
        net.a
            .wait_log(Duration::from_secs(30), |l| l.contains("temporary failure")),
        "the first attempt fails temporarily:\n{}",
        net.a.log_text()
    );
    net.b.start();
    assert!(
        net.b
            .wait_log(Duration::from_secs(60), |l| l.contains("retry-1@a.example")
                && l.contains("delivered")),
        "a later attempt delivers it:\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    drop(net.bind.take());
}

#[test]
fn after_the_maximum_age_the_sender_gets_a_dsn() {
    let mut net = Net::new(|b| b.mx_port);
    net.b.stop();
    net.a.stop();
    net.a
        .env
        .push(("HISPD__DELIVERY__MAX_AGE_SECS".into(), "2".into()));
    net.a.start();
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "old-1", "never")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| l
            .contains("DSN delivered to the sender")),
        "{}",
        net.a.log_text()
    );
    net.a.stop();
    let dsn = dsn_in_alices_mailbox(&net);
    assert_eq!(dsn.len(), 1, "{dsn:?}");
    assert_eq!(dsn[0].0, BOB);
    assert_eq!(dsn[0].2, "4.4.7", "{dsn:?}");
    assert!(
        dsn[0]
            .3
            .as_deref()
            .unwrap_or_default()
            .contains("delivery time expired"),
        "{dsn:?}"
    );
    drop(net.bind.take());
}

#[test]
fn sighup_reloads_anchors_without_a_restart() {
    let mut net = Net::new(|b| b.mx_port);
    // B runs as under systemd (Type=notify, WatchdogSec): it says READY,
    // pats the watchdog, and says STOPPING when told to stop.
    let notify_dir = tempfile::tempdir().expect("tempdir");
    let notify_path = notify_dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    net.b.stop();
    net.b
        .env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    net.b.env.push(("WATCHDOG_USEC".into(), "400000".into()));
    net.b.start();
    assert_eq!(next_notification(&notify, "READY=1"), "READY=1");
    assert_eq!(next_notification(&notify, "WATCHDOG=1"), "WATCHDOG=1");

    let anchor = net
        .b
        .dir
        .join("certs/b.example/anchors/both/a.example-ca.pem");
    let saved = std::fs::read(&anchor).expect("anchor");
    let pid_before = net.b.child.as_ref().map(|c| c.id());
    // A session open on B's MX across the reload.
    let mut session = std::net::TcpStream::connect(("127.0.0.1", net.b.mx_port)).expect("MX");
    session
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    assert!(smtp_reply(&mut session).starts_with("220"));
    session.write_all(b"EHLO probe.example\r\n").expect("EHLO");
    assert!(smtp_reply(&mut session).starts_with("250"));

    // B stops trusting A: the next message is refused, and Alice hears why.
    std::fs::remove_file(&anchor).expect("remove anchor");
    // A configuration without any anchor for B is refused by reload, so give
    // it an unrelated one: the reload must take effect.
    std::fs::copy(
        net.b.dir.join("certs/b.example/private/cert.pem"),
        net.b.dir.join("certs/b.example/anchors/both/self.pem"),
    )
    .expect("other anchor");
    net.b.hup();
    assert!(
        net.b
            .wait_log(Duration::from_secs(10), |l| l.contains("reloaded")),
        "{}",
        net.b.log_text()
    );
    // The session opened before the reload still answers.
    session.write_all(b"NOOP\r\n").expect("NOOP");
    assert!(smtp_reply(&mut session).starts_with("250"), "session kept");
    session.write_all(b"QUIT\r\n").expect("QUIT");
    assert!(smtp_reply(&mut session).starts_with("221"));
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "hup-1", "refused")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.b
            .wait_log(Duration::from_secs(30), |l| l.contains("incoming-refused")
                && l.contains("signer-trust")),
        "{}",
        net.b.log_text()
    );
    assert!(
        net.a.wait_log(Duration::from_secs(30), |l| l
            .contains("DSN delivered to the sender")),
        "{}",
        net.a.log_text()
    );

    // Trust restored, reloaded again: the next message is delivered.
    std::fs::write(&anchor, saved).expect("restore anchor");
    net.b.hup();
    assert!(
        net.b
            .wait_log(Duration::from_secs(10), |l| l.matches("reloaded").count()
                >= 2),
        "{}",
        net.b.log_text()
    );
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "hup-2", "accepted")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.b
            .wait_log(Duration::from_secs(30), |l| l.contains("hup-2@a.example")
                && l.contains("delivered")),
        "{}",
        net.b.log_text()
    );
    assert_eq!(
        net.b.child.as_ref().map(|c| c.id()),
        pid_before,
        "the same process throughout"
    );
    net.b.stop();
    assert_eq!(next_notification(&notify, "STOPPING=1"), "STOPPING=1");
    net.a.stop();
    let dsn = dsn_in_alices_mailbox(&net);
    assert!(
        dsn.iter().any(|(r, action, _, why)| r == BOB
            && action == "failed"
            && why.as_deref().unwrap_or_default().contains("signer-trust")),
        "{dsn:?}"
    );
    drop(net.bind.take());
}

#[test]
fn anchors_managed_with_the_cli_are_picked_up_by_the_running_daemon() {
    let mut net = Net::new(|b| b.mx_port);
    let listed = net.b.cli(&["anchors", "list", "--json"], b"");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let anchors: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    let a_ca = anchors
        .as_array()
        .expect("list")
        .iter()
        .find(|e| {
            e["subject"]
                .as_str()
                .unwrap_or_default()
                .contains("a.example CA")
        })
        .expect("A's CA is an anchor of B")
        .clone();
    assert_eq!(a_ca["direction"], "both");
    let fp = a_ca["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string();
    let shown = net.b.cli(&["anchors", "show", &fp[..12]], b"");
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("CA       true"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );

    // B keeps one unrelated anchor (a domain with none at all is a
    // configuration problem, and such a reload is refused).
    let own = net.b.dir.join("certs/b.example/private/cert.pem");
    let out = net.b.cli(
        &[
            "anchors",
            "add",
            &own.display().to_string(),
            "--domain",
            "b.example",
            "--direction",
            "out",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Removed with the CLI, no signal: B notices the change on disk.
    let out = net.b.cli(&["anchors", "remove", &fp], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        net.b.wait_log(Duration::from_secs(20), |l| l
            .contains("anchor or key files changed")),
        "{}",
        net.b.log_text()
    );
    assert!(
        net.b
            .wait_log(Duration::from_secs(20), |l| l.contains("reloaded")),
        "{}",
        net.b.log_text()
    );
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "cli-1", "refused")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.b
            .wait_log(Duration::from_secs(30), |l| l.contains("incoming-refused")
                && l.contains("signer-trust")),
        "{}",
        net.b.log_text()
    );

    // Added back for incoming only: delivered again.
    let ca_file = net.root.path().join("ca-a.example/cert.pem");
    let out = net.b.cli(
        &[
            "anchors",
            "add",
            &ca_file.display().to_string(),
            "--domain",
            "b.example",
            "--direction",
            "in",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        net.b.wait_log(Duration::from_secs(20), |l| l
            .matches("anchor or key files changed")
            .count()
            >= 2),
        "{}",
        net.b.log_text()
    );
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "cli-2", "accepted")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.b
            .wait_log(Duration::from_secs(30), |l| l.contains("cli-2@a.example")
                && l.contains("delivered")),
        "{}",
        net.b.log_text()
    );
    drop(net.bind.take());
}

/// The "workers" field of the last "hispd serving" line of a node's log.
fn serving_workers(node: &Node) -> Option<u64> {
    node.log_text()
        .lines()
        .filter(|l| l.contains("hispd serving"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["workers"].as_u64())
        .next_back()
}

#[test]
fn worker_threads_sizes_the_runtime_and_one_thread_still_relays() {
    let mut net = Net::new(|b| b.mx_port);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert_eq!(serving_workers(&net.a), Some(cpus), "{}", net.a.log_text());
    net.a.stop();
    net.a
        .env
        .push(("HISPD__SERVER__WORKER_THREADS".into(), "1".into()));
    net.a.start();
    assert_eq!(serving_workers(&net.a), Some(1), "{}", net.a.log_text());
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "one-worker", "one thread")]),
    );
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert!(
        net.b.wait_log(Duration::from_secs(60), |l| l
            .contains("one-worker@a.example")
            && l.contains("delivered")),
        "B delivers the message\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    net.a.stop();
    net.b.stop();
    drop(net.bind.take());
}
