//! Blue Button Plus Push between two HISPs: an EHR submits a C-CDA for a
//! patient with a push rule at A; the patient's chosen destination at B
//! receives a Direct message carrying the C-CDA (XML) and its HTML page.

mod common;

use common::hisp::*;
use std::process::Command;
use std::time::Duration;

use common::ccda_fixture as fixture;

#[test]
fn a_submitted_ccda_is_pushed_to_the_patients_chosen_address() {
    let mut net = Net::new(|b| b.mx_port);
    let ccd = fixture("hl7-ccd-1.xml");
    let inspect = Command::new(hispd_bin())
        .args(["ccda", "inspect", "--json"])
        .arg(&ccd)
        .output()
        .expect("hispd");
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("json");
    let id = &doc["patients"][0]["ids"][0];
    let identifier = format!(
        "{}^{}",
        id["root"].as_str().expect("root"),
        id["extension"].as_str().expect("extension")
    );

    net.a.stop();
    let out = net.a.cli(
        &[
            "patients",
            "add",
            "jane",
            "--name",
            "Jane Doe",
            "--identifier",
            &identifier,
            "--password-stdin",
        ],
        b"jane-password-1
",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = net.a.cli(
        &["push", "add", "--patient", "jane", "--to", "phr@b.example"],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    net.a.start();

    // The EHR (Alice) sends the CCD to Bob as an attachment.
    let xml = std::fs::read(&ccd).expect("fixture");
    let b64 = String::from_utf8_lossy(&hispd::smime::mime::encode_base64_lines(&xml)).to_string();
    let data = format!(
        "From: {ALICE}\r\nTo: {BOB}\r\nSubject: visit summary\r\nMessage-ID: <ccd-1@a.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nsummary attached\r\n\
--b1\r\nContent-Type: application/xml; name=\"ccd.xml\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}--b1--\r\n"
    );
    let results = submit(
        net.a.submission_port,
        &serde_json::json!([{"id": "ccd-1", "to": [BOB], "data": data}]),
    );
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert!(
        net.a
            .wait_log(Duration::from_secs(30), |l| l.contains("\"push\"")),
        "{}",
        net.a.log_text()
    );
    assert!(
        net.b.wait_log(Duration::from_secs(60), |l| l
            .lines()
            .any(|x| x.contains("phr@b.example") && x.contains("\"delivered\""))),
        "the push reaches B\nA:\n{}\nB:\n{}",
        net.a.log_text(),
        net.b.log_text()
    );
    net.a.stop();
    net.b.stop();

    let list = net.b.cli(&["mailbox", "list", "phr@b.example"], b"");
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    let uid = list
        .split_whitespace()
        .next()
        .expect("a pushed message")
        .to_string();
    let shown = net.b.cli(&["mailbox", "show", "phr@b.example", &uid], b"");
    let pushed = shown.stdout;
    let text = String::from_utf8_lossy(&pushed);
    assert!(text.contains("at the request of Jane Doe"), "{text}");
    assert_eq!(parts_of_type(&pushed, "application/xml").len(), 1, "{text}");
    let ccdas = hispd::documents::index::ccdas_in_message(&pushed);
    assert_eq!(ccdas.len(), 1, "the C-CDA travels as XML");
    assert_eq!(ccdas[0], xml, "byte for byte");

    // The readable page: the document's own rendering, decoded from its part.
    let pages = parts_of_type(&pushed, "text/html");
    assert_eq!(pages.len(), 1, "one HTML part\n{text}");
    let html = String::from_utf8(pages[0].clone()).expect("UTF-8 HTML");
    for needle in [
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none';",
        "<h1>Patient Chart Summary</h1>",
        "Eve Everywoman",
        "ADVANCE DIRECTIVES",
        "ALLERGIES AND ADVERSE REACTIONS",
    ] {
        assert!(html.contains(needle), "{needle} missing from\n{html}");
    }
    assert!(!html.to_lowercase().contains("<script"), "{html}");
    let doc = hispd::documents::ccda::parse(&xml, &Default::default()).expect("C-CDA");
    assert_eq!(
        html,
        hispd::documents::render::render_html(&doc),
        "the page is the document's rendering"
    );

    // The rule has sent the document once; the document is indexed once.
    let rules = net.a.cli(&["push", "list"], b"");
    assert!(
        String::from_utf8_lossy(&rules.stdout).contains("active\t1 sent"),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    let patients = net.a.cli(&["patients", "list"], b"");
    assert!(
        String::from_utf8_lossy(&patients.stdout).contains("1 document(s)"),
        "{}",
        String::from_utf8_lossy(&patients.stdout)
    );
    // Revoking takes the store, so the daemon is stopped (as it is here).
    // That a revoked rule then sends nothing more, neither for a new
    // document nor at the next start, is tested in documents::index's unit
    // tests (`index_push_and_supersede`,
    // `the_start_up_scan_keeps_to_revocation_once_and_rule_age`).
    let line = String::from_utf8_lossy(&rules.stdout).to_string();
    let rule = line
        .split('\t')
        .next()
        .expect("a rule id")
        .trim()
        .to_string();
    let out = net.a.cli(&["push", "revoke", &rule], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = net.a.cli(&["push", "list"], b"");
    assert!(
        String::from_utf8_lossy(&rules.stdout).contains("revoked\t1 sent"),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    drop(net.bind.take());
}

/// The decoded bodies of the parts of `mime_type` anywhere in a message
/// (inside multiparts and message/rfc822 parts).
fn parts_of_type(message: &[u8], mime_type: &str) -> Vec<Vec<u8>> {
    use hispd::smime::mime::Entity;
    fn walk(bytes: &[u8], mime_type: &str, depth: usize, out: &mut Vec<Vec<u8>>) {
        let entity = Entity::parse(bytes).expect("a MIME entity");
        let ct = entity.content_type();
        if ct.mime_type.starts_with("multipart/") {
            for part in entity.multipart_parts_lenient().expect("parts") {
                walk(part, mime_type, depth + 1, out);
            }
        } else if ct.is("message/rfc822") && depth < 8 {
            walk(
                &entity.decoded_body().expect("body"),
                mime_type,
                depth + 1,
                out,
            );
        } else if ct.is(mime_type) {
            out.push(entity.decoded_body().expect("decoded body"));
        }
    }
    let mut out = Vec::new();
    walk(message, mime_type, 0, &mut out);
    out
}
