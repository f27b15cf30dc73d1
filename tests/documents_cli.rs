//! `hispd ccda` and `hispd xdm` as people run them: the real binary on every
//! fixture of `../shared/fixtures/ccda` and `../shared/fixtures/xdm`, and a
//! package made by `xdm pack` read back by `xdm unpack`.

use hispd::documents::ccda;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

const HISPD: &str = env!("CARGO_BIN_EXE_hispd");

/// What one run of the binary did.
struct Run {
    args: String,
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "hispd {}\nstderr:\n{}\nstdout:\n{}",
            self.args,
            self.stderr,
            self.stdout.chars().take(4000).collect::<String>()
        )
    }

    fn assert_ok(self) -> Run {
        assert!(self.ok, "expected success\n{}", self.describe());
        assert!(self.stderr.is_empty(), "stderr\n{}", self.describe());
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{}", self.describe()))
    }
}

fn hispd(args: &[&str]) -> Run {
    let out = Command::new(HISPD)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run hispd");
    let run = Run {
        args: args.join(" "),
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        out.status.code().is_some() && !run.stderr.contains("panicked"),
        "hispd crashed\n{}",
        run.describe()
    );
    run
}

fn fixture_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(kind)
}

/// Every file of a fixture directory whose name ends with one of `exts`
/// (any case), sorted.
fn fixtures(kind: &str, exts: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture_dir(kind))
        .unwrap_or_else(|e| panic!("../shared/fixtures/{kind}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            exts.iter().any(|ext| name.ends_with(ext))
        })
        .collect();
    files.sort();
    files
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The patient named in each C-CDA fixture (one of the recordTarget's
/// names): checked against the CLI's own reading, not the library's.
const PATIENTS: &[(&str, &str)] = &[
    ("ett-ccda-ambulatory.xml", "Isabella Isa Jones"),
    ("ett-toc-bad-stylesheet.xml", "Alice Newman"),
    ("hl7-ccd-1.xml", "Eve Everywoman"),
    ("hl7-ccd-2.xml", "Isabella Jones"),
    ("hl7-discharge-summary.xml", "Isabella Jones"),
    ("hl7-referral-note.xml", "Eve Everywoman"),
];

fn parsed(path: &Path) -> ccda::Ccda {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ccda::parse(&bytes, &ccda::Limits::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_ccda_fixture_renders_through_the_binary() {
    let files = fixtures("ccda", &[".xml"]);
    assert!(files.len() >= PATIENTS.len(), "{files:?}");
    for file in &files {
        let f = name_of(file);
        let doc = parsed(file);
        let html = hispd(&["ccda", "render", arg(file)]).assert_ok().stdout;
        assert!(html.starts_with("<!DOCTYPE html>"), "{f}");
        assert!(
            html.contains(
                "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none';"
            ),
            "{f}: CSP"
        );
        let title = doc.title.as_deref().expect("a title");
        assert!(
            html.contains(&format!("<title>{}</title>", html_escape(title))),
            "{f}: page title {title}"
        );
        assert!(
            html.contains(&format!("<h1>{}</h1>", html_escape(title))),
            "{f}: heading {title}"
        );
        let sections: Vec<&str> = doc
            .all_sections()
            .into_iter()
            .filter_map(|s| s.title.as_deref())
            .collect();
        assert!(!sections.is_empty(), "{f}: no section titles");
        for t in &sections {
            assert!(html.contains(&html_escape(t)), "{f}: section {t}");
        }
        let lower = html.to_lowercase();
        for bad in ["<script", "javascript:", "<iframe", "<object", "<embed"] {
            assert!(!lower.contains(bad), "{f}: {bad}");
        }
        if let Some(ss) = &doc.stylesheet {
            assert!(
                !html.contains(&format!("href=\"{ss}")),
                "{f}: stylesheet {ss}"
            );
        }
    }
}

#[test]
fn every_ccda_fixture_inspects_through_the_binary() {
    let files = fixtures("ccda", &[".xml"]);
    for (f, _) in PATIENTS {
        assert!(
            files.iter().any(|p| name_of(p) == *f),
            "fixture {f} missing"
        );
    }
    for file in &files {
        let f = name_of(file);
        let doc = parsed(file);
        let patient = PATIENTS
            .iter()
            .find(|(n, _)| *n == f)
            .map(|(_, p)| p.to_string())
            // A fixture added later: the first name the library reads.
            .unwrap_or_else(|| doc.patients[0].names[0].clone());
        let title = doc.title.clone().expect("a title");

        let text = hispd(&["ccda", "inspect", arg(file)]).assert_ok().stdout;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first().copied(), Some(title.as_str()), "{f}\n{text}");
        let patient_line = lines
            .iter()
            .find(|l| l.trim_start().starts_with("patient "))
            .unwrap_or_else(|| panic!("{f}: no patient line\n{text}"));
        assert!(patient_line.contains(&patient), "{f}: {patient_line}");
        let section = doc.sections[0].title.as_deref().expect("a section title");
        assert!(
            text.contains(&format!("  section: {section}\n")),
            "{f}: section {section}\n{text}"
        );
        if f == "ett-toc-bad-stylesheet.xml" {
            assert!(text.contains("stylesheet (ignored): "), "{f}\n{text}");
        }

        let json = hispd(&["ccda", "inspect", "--json", arg(file)])
            .assert_ok()
            .json();
        assert_eq!(json["title"], Value::String(title.clone()), "{f}");
        let names: Vec<&str> = json["patients"][0]["names"]
            .as_array()
            .unwrap_or_else(|| panic!("{f}: patients[0].names\n{json:#}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(names.contains(&patient.as_str()), "{f}: {names:?}");
        let ids = json["patients"][0]["ids"].as_array().expect("ids");
        assert!(!ids.is_empty(), "{f}: patient ids");
        assert_eq!(
            json["sections"].as_array().map(Vec::len),
            Some(doc.sections.len()),
            "{f}: sections"
        );
    }
}

/// The package README's fixture with broken paths: it holds a 4-byte text
/// document and no C-CDA.
const MISSING_SLASH: &str = "java-ri-missing-slash.zip";

#[test]
fn every_xdm_fixture_inspects_and_unpacks_to_its_ccda() {
    let files = fixtures("xdm", &[".zip"]);
    assert!(files.len() >= 7, "{files:?}");
    for file in &files {
        let f = name_of(file);
        let text = hispd(&["xdm", "inspect", arg(file)]).assert_ok().stdout;
        assert!(text.starts_with("subsets: SUBSET01\n"), "{f}\n{text}");
        let json = hispd(&["xdm", "inspect", "--json", arg(file)])
            .assert_ok()
            .json();
        let documents = json["documents"].as_array().expect("documents");
        assert_eq!(documents.len(), 1, "{f}\n{json:#}");
        assert_eq!(documents[0]["verified"], true, "{f}: hash/size verified");

        let parent = tempfile::tempdir().unwrap();
        let out = parent.path().join("out");
        let unpacked = hispd(&["xdm", "unpack", arg(file), "--out", arg(&out)])
            .assert_ok()
            .stdout;
        let paths: Vec<PathBuf> = unpacked.lines().map(PathBuf::from).collect();
        assert_eq!(paths.len(), 1, "{f}\n{unpacked}");
        // Written where asked and nowhere else.
        let written: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(written, vec![name_of(&paths[0])], "{f}");
        assert_eq!(paths[0].parent(), Some(out.as_path()), "{f}");
        let leftovers: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "{f}: only the out directory");
        let data = std::fs::read(&paths[0]).unwrap();
        assert_eq!(
            documents[0]["size"].as_u64(),
            Some(data.len() as u64),
            "{f}"
        );

        if f == MISSING_SLASH {
            // What it found, said plainly: the subset read despite the
            // missing '/', its one document, and that it is no C-CDA.
            assert_eq!(data, b"Text", "{f}");
            assert!(
                text.contains(
                    "  IHE_XDM/SUBSET01871efced-488f-4699-b38d-015791e7ef04.txt (text/plain, 4 bytes, hash/size verified): not a C-CDA\n"
                ),
                "{f}\n{text}"
            );
            assert!(text.contains("C-CDA documents: 0 of 1\n"), "{f}\n{text}");
            assert!(
                text.contains(
                    "warning: IHE_XDM/SUBSET01METADATA.xml lacks the '/' between the subset folder and METADATA.XML; read as subset SUBSET01\n"
                ),
                "{f}\n{text}"
            );
            assert!(
                text.contains("(missing '/' after the subset folder)"),
                "{f}\n{text}"
            );
            assert_eq!(documents[0]["ccda"], Value::Null, "{f}");
            let refused = hispd(&["ccda", "inspect", arg(&paths[0])]);
            assert!(!refused.ok, "{f}: text is no C-CDA\n{}", refused.describe());
            continue;
        }

        // Every other package unpacks to a C-CDA, which the CLI reads.
        let doc = ccda::parse(&data, &ccda::Limits::default())
            .unwrap_or_else(|e| panic!("{f}: the unpacked document: {e}"));
        let title = doc.title.clone().expect("a title");
        assert!(!doc.patients.is_empty(), "{f}: a patient");
        assert!(
            text.contains(&format!("): C-CDA \"{title}\"\n")),
            "{f}\n{text}"
        );
        assert!(text.contains("C-CDA documents: 1 of 1\n"), "{f}\n{text}");
        assert_eq!(documents[0]["ccda"]["title"], Value::String(title.clone()));
        let inspected = hispd(&["ccda", "inspect", "--json", arg(&paths[0])])
            .assert_ok()
            .json();
        assert_eq!(inspected["title"], Value::String(title), "{f}");
        let html = hispd(&["ccda", "render", arg(&paths[0])])
            .assert_ok()
            .stdout;
        assert!(!html.to_lowercase().contains("<script"), "{f}");
    }
    assert!(
        files.iter().any(|p| name_of(p) == MISSING_SLASH),
        "fixture {MISSING_SLASH} missing"
    );
}

fn zip_entry(zip: &[u8], name: &str) -> String {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).expect("a zip");
    let mut s = String::new();
    archive
        .by_name(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .read_to_string(&mut s)
        .expect("UTF-8");
    s
}

#[test]
fn xdm_pack_then_unpack_round_trips_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let ccd = fixture_dir("ccda").join("hl7-ccd-1.xml");
    let binary = dir.path().join("scan.bin");
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    bytes.extend_from_slice(b"\r\n\0 end");
    std::fs::write(&binary, &bytes).unwrap();
    let package = dir.path().join("package.zip");

    let packed = hispd(&[
        "xdm",
        "pack",
        "--out",
        arg(&package),
        "--to",
        "bob@b.example",
        arg(&ccd),
        arg(&binary),
    ])
    .assert_ok()
    .stdout;
    let patient = "444222222^^^&2.16.840.1.113883.4.1&ISO";
    let unique = "2.16.840.1.113883.19.5.99999.1^TT988";
    assert!(
        packed.contains(&format!(
            "  hl7-ccd-1.xml: C-CDA {unique}, patient {patient}\n"
        )),
        "{packed}"
    );
    assert!(
        packed.ends_with(&format!(
            "2 document(s) packed into {}\n",
            package.display()
        )),
        "{packed}"
    );

    // METADATA.XML names the C-CDA's patient and document id.
    let zip = std::fs::read(&package).unwrap();
    let metadata = zip_entry(&zip, "IHE_XDM/SUBSET01/METADATA.XML");
    let tree = roxmltree::Document::parse(&metadata).expect("METADATA.XML is XML");
    let identifiers: Vec<(&str, &str)> = tree
        .descendants()
        .filter(|n| n.has_tag_name("ExternalIdentifier"))
        .filter_map(|n| {
            let label = n
                .descendants()
                .find(|d| d.has_tag_name("LocalizedString"))?
                .attribute("value")?;
            Some((label, n.attribute("value")?))
        })
        .collect();
    for expected in [
        ("XDSDocumentEntry.patientId", patient),
        ("XDSDocumentEntry.uniqueId", unique),
        ("XDSSubmissionSet.patientId", patient),
    ] {
        assert!(
            identifiers.contains(&expected),
            "{expected:?} not in {identifiers:?}\n{metadata}"
        );
    }

    let json = hispd(&["xdm", "inspect", "--json", arg(&package)])
        .assert_ok()
        .json();
    assert_eq!(json["documents"][0]["patient_id"], patient);
    assert_eq!(json["documents"][0]["unique_id"], unique);
    assert_eq!(
        json["documents"][0]["ccda"]["title"],
        "Patient Chart Summary"
    );
    assert_eq!(
        json["documents"][1]["mime_type"],
        "application/octet-stream"
    );
    assert_eq!(json["documents"][1]["patient_id"], Value::Null);
    assert_eq!(json["documents"][1]["ccda"], Value::Null);
    assert_eq!(
        json["intended_recipients"],
        serde_json::json!(["||^^Internet^bob@b.example"])
    );
    assert_eq!(json["warnings"], serde_json::json!([]));

    let out = dir.path().join("out");
    let listed = hispd(&["xdm", "unpack", arg(&package), "--out", arg(&out)])
        .assert_ok()
        .stdout;
    let paths: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();
    assert_eq!(
        paths,
        vec![out.join("DOC0001.XML"), out.join("DOC0002.BIN")],
        "{listed}"
    );
    assert_eq!(
        std::fs::read(&paths[0]).unwrap(),
        std::fs::read(&ccd).unwrap()
    );
    assert_eq!(std::fs::read(&paths[1]).unwrap(), bytes);
}

#[test]
fn xdm_pack_refuses_a_ccda_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.xml");
    std::fs::write(
        &broken,
        b"<?xml version=\"1.0\"?><ClinicalDocument xmlns=\"urn:hl7-org:v3\"><id root=\"1\">",
    )
    .unwrap();
    let package = dir.path().join("package.zip");
    let run = hispd(&["xdm", "pack", "--out", arg(&package), arg(&broken)]);
    assert!(!run.ok, "{}", run.describe());
    assert!(
        run.stderr
            .contains("broken.xml: looks like a C-CDA but cannot be read"),
        "{}",
        run.describe()
    );
    assert!(!package.exists(), "nothing written");
}
