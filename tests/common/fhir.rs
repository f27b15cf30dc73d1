//! FHIR R4 validation of server responses with the FHIR 4.0.1 models of
//! Python's `fhir.resources` 6.1.0, through `tests/fhir_validate.py`.
//!
//! The Python comes from `HISPD_TEST_FHIR_PYTHON` (scripts/test.sh exports it)
//! or else `target/fhir-venv/bin/python` (the venv scripts/test.sh makes). With
//! neither, every call panics: a validator that quietly skips could not fail.
//! Call [`self_check`] once first to prove that the validator rejects.

use std::path::{Path, PathBuf};
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fhir_validate.py");

/// The Python that has `fhir.resources` 6.1.0 and pydantic v1.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("HISPD_TEST_FHIR_PYTHON").filter(|p| !p.is_empty()) {
        let python = PathBuf::from(python);
        assert!(
            python.is_file(),
            "HISPD_TEST_FHIR_PYTHON={} does not exist; run scripts/test.sh to make target/fhir-venv",
            python.display()
        );
        return python;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fhir-venv/bin/python");
    assert!(
        venv.is_file(),
        "no FHIR validator: HISPD_TEST_FHIR_PYTHON is unset and {} is missing; run scripts/test.sh \
         (it makes that venv with fhir.resources==6.1.0 and pydantic<2)",
        venv.display()
    );
    venv
}

/// Validates each `(name, resource)`; panics with the validator's report if
/// any is not valid FHIR R4. `name` becomes `<name>.json` in the report.
pub fn validate(resources: &[(String, serde_json::Value)]) {
    let bodies: Vec<(String, String)> = resources
        .iter()
        .map(|(name, value)| (name.clone(), value.to_string()))
        .collect();
    validate_raw(&bodies);
}

/// Like [`validate`] for response bodies as received, byte for byte (so that
/// duplicate keys and the like, which a parsed `Value` has lost, are seen).
pub fn validate_raw(resources: &[(String, String)]) {
    assert!(!resources.is_empty(), "fhir::validate: nothing to validate");
    let (code, report) = run(resources);
    let ok = report.lines().filter(|l| l.starts_with("ok ")).count();
    if code != Some(0) || ok != resources.len() {
        panic!(
            "FHIR validation failed (exit {code:?}, {ok} of {} valid):\n{report}",
            resources.len()
        );
    }
}

/// Proves the validator can fail: a valid Patient passes, and resources
/// that pydantic alone would let through (a coerced number, an empty
/// string, a code outside its required value set) and an unknown element
/// are each reported as failures.
pub fn self_check() {
    let good = serde_json::json!({
        "resourceType": "Patient",
        "id": "self-check",
        "name": [{"family": "Doe", "given": ["Jane"]}],
        "gender": "female",
        "birthDate": "1970-01-01"
    });
    let bad = [
        (
            "bad-coerced",
            serde_json::json!({"resourceType": "Patient", "gender": 42}),
        ),
        (
            "bad-empty-string",
            serde_json::json!({"resourceType": "Patient", "name": [{"family": ""}]}),
        ),
        (
            "bad-code",
            serde_json::json!({"resourceType": "Patient", "gender": "Female"}),
        ),
        (
            "bad-element",
            serde_json::json!({"resourceType": "Patient", "colour": "blue"}),
        ),
    ];
    validate(&[("good".to_string(), good.clone())]);
    let mut all = vec![("good".to_string(), good.to_string())];
    all.extend(bad.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    let (code, report) = run(&all);
    assert_eq!(
        code,
        Some(1),
        "validator self-check: expected exit 1:\n{report}"
    );
    assert!(
        report.lines().any(|l| l == "ok good.json Patient"),
        "validator self-check: the good Patient did not pass:\n{report}"
    );
    for (name, _) in &bad {
        let fail = format!("FAIL {name}.json: ");
        assert!(
            report.lines().any(|l| l.starts_with(&fail)),
            "validator self-check: {name} was not rejected:\n{report}"
        );
    }
}

/// Runs the script over the resources; (exit code, stdout + stderr).
fn run(resources: &[(String, String)]) -> (Option<i32>, String) {
    let dir = tempfile::Builder::new()
        .prefix("hispd-fhir-")
        .tempdir()
        .expect("fhir: temp dir");
    for (name, body) in resources {
        assert!(
            !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.'),
            "fhir: bad resource name {name:?}"
        );
        let path = dir.path().join(format!("{name}.json"));
        assert!(!path.exists(), "fhir: resource name {name:?} given twice");
        std::fs::write(&path, body)
            .unwrap_or_else(|e| panic!("fhir: write {}: {e}", path.display()));
    }
    let python = python();
    let out = Command::new(&python)
        .arg(SCRIPT)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("fhir: cannot run {} {SCRIPT}: {e}", python.display()));
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), report)
}
