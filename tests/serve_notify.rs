//! Delivery notifications between two HISPs (Implementation Guide for
//! Delivery Notification in Direct): B answers with a processed MDN, and
//! with a dispatched MDN once Bob's client fetched the whole message over
//! IMAP (peeking or not) when timely and reliable delivery was asked, or a
//! failed MDN when its edge relay never takes it; A records them; with B
//! down, Alice hears of the failure once, after the (shortened) timeout;
//! late and unasked-for notifications are not passed on; nobody answers an
//! MDN.

mod common;

use common::hisp::*;
use std::process::Command;
use std::time::Duration;

const BOB_PASSWORD: &str = "bob-password-1";

fn timely_message(id: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "to": [BOB],
        "data": format!(
            "From: {ALICE}\r\nTo: {BOB}\r\nSubject: timely {id}\r\nMessage-ID: <{id}@a.example>\r\n\
    Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nDisposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true\r\n\r\nplease confirm\r\n"
        ),
    })
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Fetches every message in Bob's INBOX with the given item, as mbsync
/// and Thunderbird do with BODY.PEEK[], and prints the flags afterwards.
const FETCH_PY: &str = r#"
import imaplib, ssl, sys
port, user, password, item = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
m = imaplib.IMAP4("127.0.0.1", port)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
m.starttls(ctx)
m.login(user, password)
m.select("INBOX")
typ, data = m.search(None, "ALL")
for num in data[0].split():
    typ, msg = m.fetch(num, "(" + item + ")")
    assert typ == "OK", msg
    print(len(msg[0][1]))
    typ, flags = m.fetch(num, "(FLAGS)")
    print(flags[0].decode())
m.logout()
"#;

fn fetch_bobs_mail(net: &Net, item: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            FETCH_PY,
            &net.b.imap_port.to_string(),
            BOB,
            BOB_PASSWORD,
            item,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "imaplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn processed_and_dispatched_mdns_reach_the_sender_and_are_tracked() {
    let mut net = Net::new(|b| b.mx_port);
    net.b.stop();
    let out = net.b.cli(
        &["users", "add", BOB],
        format!("{BOB_PASSWORD}\n").as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    net.b.start();

    let results = submit(
        net.a.submission_port,
        &serde_json::json!([
            message(&[BOB], "plain-1", "just processed"),
            timely_message("timely-1")
        ]),
    );
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");

    // Both get a processed MDN.
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| {
            l.lines()
                .filter(|x| {
                    x.contains("MDN received") && x.contains("processed") && x.contains("Recorded")
                })
                .count()
                >= 2
        }),
        "A records two processed MDNs\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    assert!(
        !net.a.log_text().contains("dispatched"),
        "no dispatched MDN before Bob reads it"
    );

    // Headers only are not the message: it has not reached its final
    // destination yet (B reports that synchronously, before the FETCH reply).
    fetch_bobs_mail(&net, "BODY.PEEK[HEADER]");
    assert_eq!(
        count(&net.b.log_text(), "reached its final destination"),
        0,
        "{}",
        net.b.log_text()
    );
    // Bob's client reads his mail over IMAP with BODY.PEEK[], as mbsync and
    // Thunderbird do: the timely one is now at its final destination,
    // though still unseen.
    let fetched = fetch_bobs_mail(&net, "BODY.PEEK[]");
    assert!(!fetched.contains("\\Seen"), "a peek: {fetched}");
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| l
            .lines()
            .any(|x| x.contains("MDN received")
                && x.contains("dispatched")
                && x.contains("timely-1"))),
        "A records the dispatched MDN\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );

    // No MDN for an MDN: A queued none, B exactly three (2 processed, 1 dispatched).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        count(&net.a.log_text(), "MDN queued"),
        0,
        "A never answers MDNs"
    );
    assert_eq!(
        count(&net.b.log_text(), "MDN queued"),
        3,
        "{}",
        net.b.log_text()
    );

    net.a.stop();
    net.b.stop();
    let track = net.a.cli(&["track", "<timely-1@a.example>", "--json"], b"");
    assert!(
        track.status.success(),
        "{}",
        String::from_utf8_lossy(&track.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&track.stdout).expect("json");
    assert_eq!(t["timely"], true);
    assert_eq!(t["recipients"][0]["state"], "dispatched", "{t:#}");
    let track = net.a.cli(&["track", "<plain-1@a.example>", "--json"], b"");
    let t: serde_json::Value = serde_json::from_slice(&track.stdout).expect("json");
    assert_eq!(t["recipients"][0]["state"], "processed", "{t:#}");
    drop(net.bind.take());
}

/// A failure DSN from Bob's side about a message Alice sent him.
fn failure_dsn_from_bob(original_id: &str) -> Vec<u8> {
    let original =
        format!("From: {ALICE}\r\nTo: {BOB}\r\nSubject: test\r\nMessage-ID: {original_id}\r\n\r\n");
    hispd::notify::dsn::build_dsn(
        &hispd::notify::dsn::DsnRequest {
            reporting_mta: "ehr.b.example",
            original_sender: ALICE,
            original_message: original.as_bytes(),
            recipients: &[hispd::notify::dsn::FailedRecipient {
                address: BOB.into(),
                status: "5.1.1".into(),
                action: hispd::notify::dsn::Action::Failed,
                diagnostic: "no such patient mailbox".into(),
                remote_mta: None,
            }],
            arrival_date: None,
        },
        BOB,
    )
}

/// Stops both daemons when only A's store is read afterwards. B is killed:
/// that also drops its cached connections into A, which A's orderly stop
/// would otherwise wait for (up to 30 s).
fn stop_reading_only_a(net: &mut Net) {
    net.b.kill9();
    net.a.stop();
}

fn mailbox(node: &Node, address: &str) -> Vec<Vec<u8>> {
    let list = node.cli(&["mailbox", "list", address], b"");
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|uid| !uid.is_empty())
        .map(|uid| node.cli(&["mailbox", "show", address, uid], b"").stdout)
        .collect()
}

/// With B down, Alice hears of the failure once: the notification timeout
/// reports it, and neither the delivery giving up later nor a failure DSN
/// from the other side reports it again. Notifications about messages A
/// never sent: a DSN reaches Alice, an MDN does not.
#[test]
fn without_an_mdn_in_time_the_sender_hears_of_the_failure_once() {
    let mut net = Net::new(|b| b.mx_port);
    net.b.stop();
    let out = net.b.cli(
        &["users", "add", BOB],
        format!("{BOB_PASSWORD}\n").as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    net.a.stop();
    // The timeout (after 1 s) runs out well before the delivery gives up:
    // retries 1, 2, 4 s apart, the first after 4 s at the attempt 7 s in.
    net.a
        .env
        .push(("HISPD__NOTIFY__MDN_TIMEOUT_SECS".into(), "1".into()));
    net.a
        .env
        .push(("HISPD__DELIVERY__MAX_AGE_SECS".into(), "4".into()));
    net.a.start();
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "lost-1", "nobody answers")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| l
            .contains("notification-timeout")),
        "{}",
        net.a.log_text()
    );
    assert!(net.a.wait_log(Duration::from_secs(10), |l| l
        .contains("DSN delivered to the sender")));
    assert!(
        net.a.wait_log(Duration::from_secs(30), |l| l.contains(
            "no DSN: the sender has heard of every failed recipient already"
        )),
        "the expired delivery is not reported again:\n{}",
        net.a.log_text()
    );
    assert_eq!(
        count(&net.a.log_text(), "DSN delivered to the sender"),
        1,
        "{}",
        net.a.log_text()
    );

    // B is back; Bob's side reports the failure too (late), and sends a
    // DSN and an MDN about messages A never sent.
    net.b.start();
    let mdn = hispd::notify::mdn::build_mdn(&hispd::notify::mdn::MdnRequest {
        from: BOB,
        to: ALICE,
        original_message_id: "<never-sent-2@a.example>",
        original_subject: None,
        disposition: hispd::notify::mdn::Disposition::Processed,
        reporting_ua: "ehr.b.example; test",
        final_destination_delivery: false,
        error: None,
    });
    let text = |m: Vec<u8>| String::from_utf8(m).expect("ASCII report");
    let reports_from_bob = [
        text(failure_dsn_from_bob("<lost-1@a.example>")),
        text(failure_dsn_from_bob("<never-sent-1@a.example>")),
        text(mdn),
    ];
    let results = submit_as(
        net.b.submission_port,
        BOB,
        BOB_PASSWORD,
        &serde_json::json!([
            {"id": "late", "to": [ALICE], "data": reports_from_bob[0]},
            {"id": "untracked-dsn", "to": [ALICE], "data": reports_from_bob[1]},
            {"id": "untracked-mdn", "to": [ALICE], "data": reports_from_bob[2]},
        ]),
    );
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| {
            count(l, "DSN received") == 2
                && count(l, "MDN received for a message we do not track") == 1
        }),
        "A:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    stop_reading_only_a(&mut net);
    // B tracks none of the reports Bob sent: no MDN ever answers a report,
    // so tracking one would only end in a false failure DSN to Bob.
    for report in &reports_from_bob {
        let id = report
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap_or_else(|| panic!("a Message-ID: {report}"))
            .trim();
        let out = net.b.cli(&["track", id], b"");
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("is not a message this HISP sent"),
            "B must not track the report {id}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    let reports: Vec<_> = mailbox(&net.a, ALICE)
        .iter()
        .map(|m| {
            let dsn = hispd::notify::dsn::parse_dsn(m).expect("only DSNs reach Alice");
            (String::from_utf8_lossy(m).to_string(), dsn)
        })
        .collect();
    assert_eq!(reports.len(), 2, "{reports:#?}");
    // Ours, for the timeout.
    let (_, ours) = &reports[0];
    assert_eq!(ours[0].0, BOB);
    assert!(
        ours[0]
            .3
            .as_deref()
            .unwrap_or_default()
            .contains("no processed MDN"),
        "{ours:?}"
    );
    // Theirs, about a message A never sent: passed on.
    let (theirs, _) = &reports[1];
    assert!(theirs.contains("<never-sent-1@a.example>"), "{theirs}");

    let track = net.a.cli(&["track", "<lost-1@a.example>"], b"");
    let timeline = String::from_utf8_lossy(&track.stdout).to_string();
    assert!(timeline.contains("Failed"), "{timeline}");
    assert_eq!(
        timeline.matches("failure suppressed").count(),
        2,
        "the expired delivery and the late DSN: {timeline}"
    );
    drop(net.bind.take());
}

const POPLIB_PY: &str = r#"
import poplib, ssl, sys
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
p = poplib.POP3("127.0.0.1", port)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
p.stls(ctx)
p.user(user)
p.pass_(password)
count, size = p.stat()
assert count == 1, count
resp, lines, octets = p.retr(1)
print(b"\r\n".join(lines).decode())
p.quit()
"#;

#[test]
fn imap_and_pop3_clients_read_a_real_direct_delivery() {
    let mut net = Net::new(|b| b.mx_port);
    net.b.stop();
    let out = net.b.cli(
        &["users", "add", BOB],
        format!("{BOB_PASSWORD}\n").as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    net.b.start();
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([message(&[BOB], "edge-1", "read me over IMAP and POP3")]),
    );
    assert_eq!(results[0]["ok"], true);
    assert!(
        net.b
            .wait_log(Duration::from_secs(60), |l| l.contains("edge-1@a.example")
                && l.contains("delivered")),
        "{}",
        net.b.log_text()
    );
    let user = format!("{BOB}:{BOB_PASSWORD}");
    let curl = |url: String| {
        let out = Command::new("curl")
            .args([
                "-s",
                "--ssl-reqd",
                "-k",
                "--max-time",
                "20",
                "--user",
                &user,
                &url,
            ])
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {url}: exit {:?}",
            out.status.code()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let via_imap = curl(format!("imap://127.0.0.1:{}/INBOX;UID=1", net.b.imap_port));
    assert!(
        via_imap.contains("read me over IMAP and POP3")
            && via_imap.contains("Message-ID: <edge-1@a.example>"),
        "{via_imap}"
    );
    let via_pop3 = curl(format!("pop3://127.0.0.1:{}/1", net.b.pop3_port));
    assert_eq!(
        via_pop3.replace("\r\n", "\n").trim_end(),
        via_imap.replace("\r\n", "\n").trim_end(),
        "the same message both ways"
    );
    // Python's poplib with STLS.
    let pop = Command::new("python3")
        .args([
            "-c",
            POPLIB_PY,
            &net.b.pop3_port.to_string(),
            BOB,
            BOB_PASSWORD,
        ])
        .output()
        .expect("python3");
    assert!(
        pop.status.success(),
        "poplib: {}",
        String::from_utf8_lossy(&pop.stderr)
    );
    assert!(String::from_utf8_lossy(&pop.stdout).contains("read me over IMAP and POP3"));
    // mbsync (isync) over STARTTLS, trusting the daemon's certificate.
    let maildir = net.root.path().join("maildir");
    std::fs::create_dir_all(&maildir).expect("maildir");
    let rc = net.root.path().join("mbsyncrc");
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount b\nHost 127.0.0.1\nPort {port}\nUser {BOB}\nPass {BOB_PASSWORD}\nSSLType STARTTLS\nCertificateFile {cert}\nSystemCertificates no\n\n\
             IMAPStore remote\nAccount b\n\nMaildirStore local\nPath {md}/\nInbox {md}/INBOX\n\n\
             Channel c\nFar :remote:INBOX\nNear :local:INBOX\nSync Pull\nCreate Near\nSyncState *\n",
            port = net.b.imap_port,
            cert = net.b.dir.join("data/tls-server/cert.pem").display(),
            md = maildir.display(),
        ),
    )
    .expect("mbsyncrc");
    let sync = Command::new("mbsync")
        .arg("-V")
        .arg("-c")
        .arg(&rc)
        .arg("-a")
        .output()
        .expect("mbsync");
    assert!(
        sync.status.success(),
        "mbsync: {}",
        String::from_utf8_lossy(&sync.stderr)
    );
    // Already read (by curl and poplib above), so in cur/ rather than new/.
    let files: Vec<_> = ["INBOX/new", "INBOX/cur"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(maildir.join(d))
                .map(|d| d.flatten().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        files.len(),
        1,
        "mbsync fetched the one message: {} {}",
        String::from_utf8_lossy(&sync.stdout),
        String::from_utf8_lossy(&sync.stderr)
    );
    let fetched = std::fs::read_to_string(files[0].path()).expect("maildir file");
    assert!(
        fetched.contains("read me over IMAP and POP3") && fetched.contains("<edge-1@a.example>")
    );

    // Plain-text logins are refused before STARTTLS/STLS.
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "20",
            "--user",
            &user,
            &format!("imap://127.0.0.1:{}/INBOX;UID=1", net.b.imap_port),
        ])
        .output()
        .expect("curl");
    assert!(!out.status.success(), "IMAP LOGIN without TLS must fail");
    drop(net.bind.take());
}

#[test]
fn mdns_are_relayed_to_the_edge_sender_when_asked() {
    let mut net = Net::new(|b| b.mx_port);
    let asked = serde_json::json!({
        "id": "dnt-1",
        "to": [BOB],
        "data": format!(
            "From: {ALICE}\r\nTo: {BOB}\r\nSubject: tell me\r\nMessage-ID: <dnt-1@a.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\
    Disposition-Notification-To: {ALICE}\r\n\r\nplease tell me\r\n"
        ),
    });
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([asked, message(&[BOB], "quiet-1", "no notification wanted")]),
    );
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| {
            l.lines()
                .filter(|x| x.contains("MDN received") && x.contains("Recorded"))
                .count()
                >= 2
        }),
        "{}",
        net.a.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    net.a.stop();
    net.b.stop();
    let list = net.a.cli(&["mailbox", "list", ALICE], b"");
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    let uids: Vec<&str> = list.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(
        uids.len(),
        1,
        "only the MDN the edge asked for reaches Alice: {list}"
    );
    let shown = net.a.cli(&["mailbox", "show", ALICE, uids[0]], b"");
    let mdn = hispd::notify::mdn::parse_mdn(&shown.stdout).expect("an MDN");
    assert_eq!(mdn.original_message_id, "<dnt-1@a.example>");
    assert_eq!(mdn.disposition, hispd::notify::mdn::Disposition::Processed);
    drop(net.bind.take());
}

/// B relays received mail to an EHR that never answers: when B gives up
/// after the (shortened) maximum age, Alice, who asked for timely and
/// reliable delivery, gets a failed MDN, and A tracks the recipient failed.
/// She did not ask for MDNs as such: the processed one is not passed on.
#[test]
fn an_edge_relay_that_stays_down_gives_the_sender_a_failed_mdn() {
    let unreachable = format!("127.0.0.1:{}", common::servers::free_port());
    let mut net = Net::with_edge_relay(|b| b.mx_port, Some(unreachable));
    net.b.stop();
    net.b
        .env
        .push(("HISPD__DELIVERY__MAX_AGE_SECS".into(), "2".into()));
    net.b.start();
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([timely_message("relay-down-1")]),
    );
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert!(
        net.a.wait_log(Duration::from_secs(60), |l| l
            .lines()
            .any(|x| x.contains("MDN received")
                && x.contains("failed")
                && x.contains("Recorded"))),
        "A:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    stop_reading_only_a(&mut net);
    // Alice did not ask for MDNs (no Disposition-Notification-To): the
    // processed one stays with A, the failure reaches her all the same.
    let mailbox = mailbox(&net.a, ALICE);
    assert_eq!(mailbox.len(), 1, "{mailbox:?}");
    let mdn = hispd::notify::mdn::parse_mdn(&mailbox[0]).expect("an MDN");
    assert_eq!(mdn.original_message_id, "<relay-down-1@a.example>");
    assert_eq!(mdn.disposition, hispd::notify::mdn::Disposition::Failed);
    let text = String::from_utf8_lossy(&mailbox[0]);
    assert!(
        text.contains("delivery time expired"),
        "B gave up after temporary failures, not on a refusal: {text}"
    );
    let track = net
        .a
        .cli(&["track", "<relay-down-1@a.example>", "--json"], b"");
    let t: serde_json::Value = serde_json::from_slice(&track.stdout).expect("json");
    assert_eq!(t["recipients"][0]["state"], "failed", "{t:#}");
    drop(net.bind.take());
}
