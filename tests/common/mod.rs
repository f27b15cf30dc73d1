#![allow(dead_code)]
pub mod browser;
pub mod fhir;
pub mod hisp;
pub mod peers;
pub mod servers;
pub mod sink;
pub mod world;

/// A C-CDA document of the shared fixtures.
pub fn ccda_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/ccda")
        .join(name)
}
