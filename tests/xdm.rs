//! XDM packages: the ETT and Java RI fixtures, round trips, and hostile zips.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use hispd::documents::ccda;
use hispd::documents::xdm::{self, recipient_address, Limits, PackDocument, XdmError, XdmPackage};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/xdm")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_fixture(name: &str) -> XdmPackage {
    xdm::read(&fixture(name), &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, data) in files {
        zip.start_file(*name, options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn assert_ccda(pkg: &XdmPackage, path: &str, size: u64, hash: &str) {
    assert_eq!(pkg.subsets, vec!["SUBSET01"]);
    assert_eq!(pkg.documents.len(), 1, "{pkg:?}");
    let doc = &pkg.documents[0];
    assert_eq!(doc.path, path);
    let head = String::from_utf8_lossy(&doc.data[..200.min(doc.data.len())]);
    assert!(
        head.trim_start_matches('\u{feff}')
            .trim_start()
            .starts_with('<'),
        "{head}"
    );
    assert!(String::from_utf8_lossy(&doc.data).contains("ClinicalDocument"));
    assert_eq!(doc.size, Some(size));
    assert_eq!(doc.data.len() as u64, size);
    assert_eq!(doc.hash_sha1.as_deref(), Some(hash));
    assert!(doc.verified);
    assert!(doc.unique_id.is_some(), "{doc:?}");
    assert!(doc.patient_id.is_some(), "{doc:?}");
    assert!(pkg.has_index && pkg.has_readme);
}

#[test]
fn ett_well_formed_packages() {
    let pkg = read_fixture("ett-ToC_XDM_Full_Metadata.zip");
    assert_ccda(
        &pkg,
        "IHE_XDM/SUBSET01/TOC.XML",
        140619,
        "e69c370375b4bb4944113a6ce33026ba0fce4d62",
    );
    assert_eq!(
        pkg.documents[0].patient_id.as_deref(),
        Some("444222222^^^&2.16.840.1.113883.4.1&ISO")
    );

    let pkg = read_fixture("ett-ToC_XDM_Limited_Metadata.zip");
    assert_ccda(
        &pkg,
        "IHE_XDM/SUBSET01/TOC.XML",
        140619,
        "e69c370375b4bb4944113a6ce33026ba0fce4d62",
    );

    let pkg = read_fixture("ett-XDM_FULL.ZIP");
    assert_ccda(
        &pkg,
        "IHE_XDM/SUBSET01/CCDAAMB.XML",
        120687,
        "b0bd1f77dca00011cfa4bd7be15cf22aeaba145b",
    );
    assert_eq!(pkg.documents[0].mime_type.as_deref(), Some("text/xml"));

    let pkg = read_fixture("ett-CCDA_Ambulatory_in_XDM.zip");
    assert_ccda(
        &pkg,
        "IHE_XDM/SUBSET01/CCDAAMB.XML",
        79482,
        "986f71360224a1bec649d9e49e91e51bce29de07",
    );
    assert_eq!(
        pkg.documents[0].mime_type.as_deref(),
        Some("application/xml")
    );
}

#[test]
fn ett_bad_xhtml_index_is_irrelevant() {
    let pkg = read_fixture("ett-BadXHTML.zip");
    assert_ccda(
        &pkg,
        "IHE_XDM/SUBSET01/TOC_A.XML",
        78021,
        "ac858e31fab99a2260ff5f666aca0d3f22c46bfc",
    );
}

#[test]
fn java_ri_wrapper_dir_no_uri_matches_by_hash() {
    let pkg = read_fixture("java-ri-wrapper-dir-no-uri.zip");
    assert_eq!(pkg.subsets, vec!["SUBSET01"]);
    assert_eq!(pkg.documents.len(), 1);
    let doc = &pkg.documents[0];
    assert_eq!(doc.path, "samplexdm/IHE_XDM/SUBSET01/Document01.xml");
    assert_eq!(
        doc.hash_sha1.as_deref(),
        Some("2f016bdeba83855ec76bd1102d9da6a79590f1a9")
    );
    assert_eq!(doc.size, None);
    assert!(doc.verified, "hash present and matched");
    assert!(String::from_utf8_lossy(&doc.data).contains("ClinicalDocument"));
    assert!(pkg.has_index && pkg.has_readme);
    assert_eq!(pkg.intended_recipients.len(), 1);
    assert_eq!(
        recipient_address(&pkg.intended_recipients[0]),
        Some("beau@nologs.org")
    );
    let warnings = pkg.warnings.join("\n");
    assert!(warnings.contains("wrapper folder samplexdm/"), "{warnings}");
    assert!(warnings.contains("CCD.xsl is not described"), "{warnings}");
}

#[test]
fn java_ri_missing_slash_is_read_leniently() {
    let pkg = read_fixture("java-ri-missing-slash.zip");
    assert_eq!(pkg.subsets, vec!["SUBSET01"]);
    assert_eq!(pkg.documents.len(), 1);
    let doc = &pkg.documents[0];
    assert_eq!(
        doc.path,
        "IHE_XDM/SUBSET01871efced-488f-4699-b38d-015791e7ef04.txt"
    );
    assert_eq!(doc.data, b"Text");
    assert_eq!(doc.mime_type.as_deref(), Some("text/plain"));
    assert_eq!(
        doc.unique_id.as_deref(),
        Some("71aeb81a-c2a5-4ba5-b036-f7b334278bcc")
    );
    assert!(doc.verified);
    assert_eq!(
        recipient_address(&pkg.intended_recipients[0]),
        Some("recip@test.com")
    );
    assert!(pkg.has_index && pkg.has_readme);
    let warnings = pkg.warnings.join("\n");
    assert!(
        warnings.contains(
            "IHE_XDM/SUBSET01METADATA.xml lacks the '/' between the subset folder and METADATA.XML"
        ),
        "{warnings}"
    );
    assert!(warnings.contains("missing '/'"), "{warnings}");
}

fn two_documents() -> Vec<PackDocument> {
    vec![
        PackDocument {
            name: "Summary of care <Alice & Bob>".into(),
            mime_type: "text/xml".into(),
            data: b"<?xml version=\"1.0\"?><ClinicalDocument xmlns=\"urn:hl7-org:v3\"/>".to_vec(),
            patient_id: Some("1234^^^&1.2.3.4&ISO".into()),
            unique_id: Some("1.2.3.4.5".into()),
        },
        PackDocument {
            name: "Referral letter".into(),
            mime_type: "application/pdf".into(),
            data: b"%PDF-1.4 not really".to_vec(),
            patient_id: None,
            unique_id: None,
        },
    ]
}

#[test]
fn write_then_read_round_trip() {
    let docs = two_documents();
    let recipients = vec!["bob@direct.example.org".to_string()];
    let bytes = xdm::write(&docs, &recipients, "Dr. Alice <alice@direct.example.org>").unwrap();
    let pkg = xdm::read(&bytes, &Limits::default()).unwrap();
    assert_eq!(pkg.subsets, vec!["SUBSET01"]);
    assert!(pkg.has_index && pkg.has_readme);
    assert!(pkg.warnings.is_empty(), "{:?}", pkg.warnings);
    assert_eq!(
        pkg.intended_recipients,
        vec!["||^^Internet^bob@direct.example.org"]
    );
    assert_eq!(
        recipient_address(&pkg.intended_recipients[0]),
        Some("bob@direct.example.org")
    );
    assert_eq!(pkg.documents.len(), 2);
    let (a, b) = (&pkg.documents[0], &pkg.documents[1]);
    assert_eq!(a.path, "IHE_XDM/SUBSET01/DOC0001.XML");
    assert_eq!(a.data, docs[0].data);
    assert!(a.verified);
    assert_eq!(a.mime_type.as_deref(), Some("text/xml"));
    assert_eq!(a.patient_id.as_deref(), Some("1234^^^&1.2.3.4&ISO"));
    assert_eq!(a.unique_id.as_deref(), Some("1.2.3.4.5"));
    assert_eq!(a.size, Some(docs[0].data.len() as u64));
    assert_eq!(b.path, "IHE_XDM/SUBSET01/DOC0002.PDF");
    assert_eq!(b.data, docs[1].data);
    assert!(b.verified);
    assert_eq!(b.patient_id, None);
    assert!(b.unique_id.as_deref().unwrap().starts_with("2.25."));

    // The unzip tool sees the expected entries.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("package.zip");
    std::fs::write(&file, &bytes).unwrap();
    let out = Command::new("unzip")
        .arg("-l")
        .arg(&file)
        .output()
        .expect("the unzip tool is installed");
    assert!(out.status.success(), "{out:?}");
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in [
        "README.TXT",
        "INDEX.HTM",
        "IHE_XDM/SUBSET01/METADATA.XML",
        "IHE_XDM/SUBSET01/DOC0001.XML",
        "IHE_XDM/SUBSET01/DOC0002.PDF",
    ] {
        assert!(listing.contains(name), "{name} missing from\n{listing}");
    }
    // unzip -t also finds every CRC right.
    let out = Command::new("unzip").arg("-t").arg(&file).output().unwrap();
    assert!(out.status.success(), "{out:?}");

    let index = zip_entry(&bytes, "INDEX.HTM");
    assert!(
        index.contains("href=\"IHE_XDM/SUBSET01/DOC0001.XML\""),
        "{index}"
    );
    assert!(
        index.contains("Summary of care &lt;Alice &amp; Bob&gt;"),
        "{index}"
    );
    let readme = zip_entry(&bytes, "README.TXT");
    assert!(readme.contains("hispd"), "{readme}");
    assert!(readme.contains("Dr. Alice"), "{readme}");
}

fn zip_entry(bytes: &[u8], name: &str) -> String {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut s = String::new();
    archive
        .by_name(name)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s
}

#[test]
fn write_refuses_nothing_to_package() {
    let err = xdm::write(&[], &[], "x").unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot write package: no documents to package"
    );
}

#[test]
fn unpack_writes_documents_only() {
    let bytes = xdm::write(
        &two_documents(),
        &["bob@direct.example.org".into()],
        "hispd",
    )
    .unwrap();
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("out");
    let paths = xdm::unpack_to(&bytes, &dir, &Limits::default()).unwrap();
    assert_eq!(
        paths,
        vec![dir.join("DOC0001.XML"), dir.join("DOC0002.PDF")]
    );
    assert_eq!(std::fs::read(&paths[1]).unwrap(), b"%PDF-1.4 not really");
    assert_eq!(listing(&dir), vec!["DOC0001.XML", "DOC0002.PDF"]);
    // A second unpack into the same dir never overwrites.
    let again = xdm::unpack_to(&bytes, &dir, &Limits::default()).unwrap();
    assert_eq!(
        again,
        vec![dir.join("DOC0001-2.XML"), dir.join("DOC0002-2.PDF")]
    );

    let dir = parent.path().join("ett");
    let paths = xdm::unpack_to(
        &fixture("java-ri-wrapper-dir-no-uri.zip"),
        &dir,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(paths, vec![dir.join("Document01.xml")]);
    assert_eq!(listing(parent.path()), vec!["ett", "out"]);
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn path_escape_is_refused_and_nothing_written() {
    let meta = b"<SubmitObjectsRequest/>";
    for evil in [
        "../../evil.txt",
        "/tmp/evil.txt",
        "C:\\evil.txt",
        "IHE_XDM\\..\\..\\evil.txt",
    ] {
        let bytes = zip_of(&[("IHE_XDM/SUBSET01/METADATA.XML", meta), (evil, b"gotcha")]);
        let err = xdm::read(&bytes, &Limits::default()).unwrap_err();
        assert!(matches!(err, XdmError::PathEscape(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("entry {evil} escapes the package (absolute path, drive letter or '..')")
        );

        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("a").join("b");
        let err = xdm::unpack_to(&bytes, &target, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("escapes the package"), "{err}");
        assert_eq!(listing(root.path()), Vec::<String>::new(), "{evil}");
        assert!(!target.exists());
    }
}

#[test]
fn zip_bomb_is_refused_by_ratio() {
    // 50 MB of zeros deflate to about 50 KB (ratio ~1000).
    let zeros = vec![0u8; 50 * 1024 * 1024];
    let bytes = zip_of(&[
        ("IHE_XDM/SUBSET01/METADATA.XML", b"<x/>"),
        ("IHE_XDM/SUBSET01/BOMB.XML", &zeros),
    ]);
    assert!(bytes.len() < 200 * 1024, "{}", bytes.len());
    let err = xdm::read(&bytes, &Limits::default()).unwrap_err();
    assert!(matches!(err, XdmError::ExpansionRatio { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("entry IHE_XDM/SUBSET01/BOMB.XML expands "),
        "{msg}"
    );
    assert!(msg.ends_with("times (limit 100)"), "{msg}");

    // Same bomb with a lying (tiny) declared size in both headers: the
    // bounded reader still refuses it without inflating 50 MB.
    let forged = forge_sizes(&bytes, "IHE_XDM/SUBSET01/BOMB.XML", 10);
    let err = xdm::read(&forged, &Limits::default()).unwrap_err();
    assert!(
        matches!(err, XdmError::ExpansionRatio { .. } | XdmError::Zip { .. }),
        "{err:?}"
    );
}

/// Rewrites the uncompressed size of `name` in its local header and central
/// directory record.
fn forge_sizes(bytes: &[u8], name: &str, size: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let name = name.as_bytes();
    for (sig, size_at, name_len_at, name_at) in [
        (&b"PK\x03\x04"[..], 22usize, 26usize, 30usize),
        (&b"PK\x01\x02"[..], 24, 28, 46),
    ] {
        let mut i = 0;
        while i + name_at <= out.len() {
            if &out[i..i + 4] == sig {
                let len =
                    u16::from_le_bytes([out[i + name_len_at], out[i + name_len_at + 1]]) as usize;
                if out.get(i + name_at..i + name_at + len) == Some(name) {
                    out[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
                }
            }
            i += 1;
        }
    }
    out
}

#[test]
fn many_entries_bomb_is_refused_by_total_size() {
    // 60 entries of 2 MB zeros each: every entry passes the ratio check
    // with a generous ratio limit, the total does not.
    let chunk = vec![0u8; 2 * 1024 * 1024];
    let names: Vec<String> = (0..60)
        .map(|i| format!("IHE_XDM/SUBSET01/Z{i:03}.XML"))
        .collect();
    let mut files: Vec<(&str, &[u8])> = vec![("IHE_XDM/SUBSET01/METADATA.XML", b"<x/>")];
    files.extend(names.iter().map(|n| (n.as_str(), &chunk[..])));
    let bytes = zip_of(&files);
    let limits = Limits {
        max_ratio: 10_000,
        ..Limits::default()
    };
    let err = xdm::read(&bytes, &limits).unwrap_err();
    assert!(matches!(err, XdmError::TotalSize { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("package expands to "), "{msg}");
    assert!(msg.ends_with(" bytes (limit 104857600)"), "{msg}");
}

#[test]
fn too_many_entries_is_refused() {
    let names: Vec<String> = (0..1001)
        .map(|i| format!("IHE_XDM/SUBSET01/F{i}.TXT"))
        .collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    let bytes = zip_of(&files);
    let err = xdm::read(&bytes, &Limits::default()).unwrap_err();
    assert_eq!(err.to_string(), "too many entries (1001, limit 1000)");
    let err =
        xdm::unpack_to(&bytes, Path::new("/nonexistent/never"), &Limits::default()).unwrap_err();
    assert!(matches!(err, XdmError::TooManyEntries { .. }), "{err:?}");
}

#[test]
fn not_a_zip_is_a_clear_error() {
    let err = xdm::read(b"From: alice\r\n\r\nhello", &Limits::default()).unwrap_err();
    assert!(matches!(err, XdmError::NotZip(_)), "{err:?}");
    assert!(err.to_string().starts_with("not a zip archive: "), "{err}");
    let err = xdm::read(b"", &Limits::default()).unwrap_err();
    assert!(err.to_string().starts_with("not a zip archive"), "{err}");
}

#[test]
fn tampered_document_fails_verification() {
    let bytes = fixture("ett-XDM_FULL.ZIP");
    let mut archive = zip::ZipArchive::new(Cursor::new(&bytes[..])).unwrap();
    let mut files = Vec::new();
    for i in 0..archive.len() {
        use std::io::Read;
        let mut f = archive.by_index(i).unwrap();
        if f.is_dir() {
            continue;
        }
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        let name = f.name().unwrap().into_owned();
        if name.ends_with("CCDAAMB.XML") {
            data[200] ^= 0x20;
        }
        files.push((name, data));
    }
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
    let err = xdm::read(&zip_of(&refs), &Limits::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("document IHE_XDM/SUBSET01/CCDAAMB.XML: hash mismatch (metadata b0bd1f77dca00011cfa4bd7be15cf22aeaba145b, actual "),
        "{msg}"
    );
}

fn ccda_fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/ccda")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha1_hex(data: &[u8]) -> String {
    hex::encode(openssl::sha::sha1(data))
}

/// A METADATA.XML describing one text/xml document: a URI slot when `uri`
/// is given, always its SHA-1 hash, and an intendedRecipient.
fn subset_metadata(uri: Option<&str>, data: &[u8], recipient: &str) -> String {
    let uri = uri
        .map(|u| format!("<Slot name=\"URI\"><ValueList><Value>{u}</Value></ValueList></Slot>"))
        .unwrap_or_default();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
         <SubmitObjectsRequest xmlns=\"urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0\">\
         <RegistryObjectList xmlns=\"urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0\">\
         <ExtrinsicObject id=\"Document01\" mimeType=\"text/xml\">\
         <Slot name=\"hash\"><ValueList><Value>{hash}</Value></ValueList></Slot>\
         <Slot name=\"size\"><ValueList><Value>{size}</Value></ValueList></Slot>{uri}\
         </ExtrinsicObject>\
         <RegistryPackage id=\"SubmissionSet01\"><Slot name=\"intendedRecipient\"><ValueList>\
         <Value>||^^Internet^{recipient}</Value></ValueList></Slot></RegistryPackage>\
         </RegistryObjectList></SubmitObjectsRequest>",
        hash = sha1_hex(data),
        size = data.len(),
    )
}

#[test]
fn several_subsets_are_all_read_by_uri_and_by_hash() {
    let ccd = ccda_fixture("hl7-ccd-1.xml");
    let referral = ccda_fixture("hl7-referral-note.xml");
    let meta1 = subset_metadata(Some("CCD.XML"), &ccd, "one@b.example");
    // SUBSET02 names no URI: its document is found by hash.
    let meta2 = subset_metadata(None, &referral, "two@b.example");
    let bytes = zip_of(&[
        ("README.TXT", b"two subsets"),
        ("INDEX.HTM", b"<html></html>"),
        ("IHE_XDM/SUBSET01/METADATA.XML", meta1.as_bytes()),
        ("IHE_XDM/SUBSET01/CCD.XML", &ccd),
        ("IHE_XDM/SUBSET02/METADATA.XML", meta2.as_bytes()),
        ("IHE_XDM/SUBSET02/REFERRAL.XML", &referral),
    ]);
    let pkg = xdm::read(&bytes, &Limits::default()).unwrap();
    assert_eq!(pkg.subsets, vec!["SUBSET01", "SUBSET02"]);
    assert_eq!(pkg.documents.len(), 2, "{pkg:?}");
    let paths: Vec<&str> = pkg.documents.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        vec!["IHE_XDM/SUBSET01/CCD.XML", "IHE_XDM/SUBSET02/REFERRAL.XML"]
    );
    assert_eq!(pkg.documents[0].data, ccd);
    assert_eq!(pkg.documents[1].data, referral);
    for d in &pkg.documents {
        assert!(d.verified, "{}: hash and size checked", d.path);
        assert_eq!(d.hash_sha1.as_deref(), Some(sha1_hex(&d.data).as_str()));
    }
    let titles: Vec<Option<String>> = pkg
        .documents
        .iter()
        .map(|d| {
            ccda::parse(&d.data, &ccda::Limits::default())
                .unwrap()
                .title
        })
        .collect();
    assert_eq!(
        titles,
        vec![
            Some("Patient Chart Summary".to_string()),
            Some("Referral Note".to_string())
        ]
    );
    let mut recipients: Vec<&str> = pkg
        .intended_recipients
        .iter()
        .filter_map(|r| recipient_address(r))
        .collect();
    recipients.sort();
    assert_eq!(recipients, vec!["one@b.example", "two@b.example"]);
    let warnings = pkg.warnings.join("\n");
    assert!(!warnings.contains("not described"), "{warnings}");
}

#[test]
fn a_packed_ccda_gives_the_metadata_its_patient_and_document_ids() {
    let ccd = ccda_fixture("hl7-ccd-1.xml");
    let doc = PackDocument::from_file("hl7-ccd-1.xml".into(), ccd.clone()).unwrap();
    let patient = "444222222^^^&2.16.840.1.113883.4.1&ISO";
    let unique = "2.16.840.1.113883.19.5.99999.1^TT988";
    assert_eq!(doc.mime_type, "text/xml");
    assert_eq!(doc.patient_id.as_deref(), Some(patient));
    assert_eq!(doc.unique_id.as_deref(), Some(unique));

    let bytes = xdm::write(&[doc], &["bob@b.example".into()], "hispd").unwrap();
    let metadata = zip_entry(&bytes, "IHE_XDM/SUBSET01/METADATA.XML");
    let tree = roxmltree::Document::parse(&metadata).unwrap();
    // The ExternalIdentifier values by their XDS label.
    let identifier = |label: &str| {
        tree.descendants()
            .filter(|n| n.has_tag_name("ExternalIdentifier"))
            .find(|n| {
                n.descendants().any(|d| {
                    d.has_tag_name("LocalizedString") && d.attribute("value") == Some(label)
                })
            })
            .and_then(|n| n.attribute("value"))
            .map(str::to_string)
    };
    assert_eq!(
        identifier("XDSDocumentEntry.patientId").as_deref(),
        Some(patient),
        "{metadata}"
    );
    assert_eq!(
        identifier("XDSDocumentEntry.uniqueId").as_deref(),
        Some(unique),
        "{metadata}"
    );
    assert_eq!(
        identifier("XDSSubmissionSet.patientId").as_deref(),
        Some(patient),
        "{metadata}"
    );
    let source_patient: Vec<&str> = tree
        .descendants()
        .filter(|n| n.has_tag_name("Slot") && n.attribute("name") == Some("sourcePatientId"))
        .flat_map(|n| n.descendants().filter(|d| d.has_tag_name("Value")))
        .filter_map(|v| v.text())
        .collect();
    assert_eq!(source_patient, vec![patient], "{metadata}");
    let pkg = xdm::read(&bytes, &Limits::default()).unwrap();
    assert_eq!(pkg.documents[0].patient_id.as_deref(), Some(patient));
    assert_eq!(pkg.documents[0].unique_id.as_deref(), Some(unique));

    // A document id without an extension is its root alone.
    let referral =
        PackDocument::from_file("referral.xml".into(), ccda_fixture("hl7-referral-note.xml"))
            .unwrap();
    assert_eq!(
        referral.unique_id.as_deref(),
        Some("6f1bd58b-c58f-40b7-b314-caf1294ed98b")
    );

    // Not a C-CDA: no ids, typed by content.
    let pdf = PackDocument::from_file("a.pdf".into(), b"%PDF-1.4".to_vec()).unwrap();
    assert_eq!(pdf.mime_type, "application/octet-stream");
    assert_eq!((pdf.patient_id, pdf.unique_id), (None, None));
    let xml = PackDocument::from_file("a.xml".into(), b"<note/>".to_vec()).unwrap();
    assert_eq!(xml.mime_type, "text/xml");
    assert_eq!((xml.patient_id, xml.unique_id), (None, None));

    // A C-CDA that cannot be read is refused, saying so.
    let err = PackDocument::from_file(
        "broken.xml".into(),
        b"<ClinicalDocument xmlns=\"urn:hl7-org:v3\"><id root=\"1\">".to_vec(),
    )
    .unwrap_err();
    assert!(matches!(err, XdmError::Ccda { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("broken.xml: looks like a C-CDA but cannot be read"),
        "{err}"
    );
}
