//! Trust anchors on disk: files of one or many certificates, PEM or DER.

use super::{fingerprint, subject_line, TrustError};
use openssl::x509::X509;
use std::fs;
use std::path::{Path, PathBuf};

/// One trusted certificate and where it came from.
#[derive(Clone)]
pub struct Anchor {
    pub cert: X509,
    pub source: PathBuf,
}

impl Anchor {
    pub fn subject(&self) -> String {
        subject_line(self.cert.subject_name())
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }
}

/// The anchors of one local domain in one direction.
#[derive(Clone, Default)]
pub struct AnchorSet {
    anchors: Vec<Anchor>,
}

impl AnchorSet {
    pub fn new() -> AnchorSet {
        AnchorSet::default()
    }

    pub fn from_certs(certs: Vec<X509>, source: &Path) -> AnchorSet {
        let mut set = AnchorSet::new();
        for cert in certs {
            set.add(Anchor {
                cert,
                source: source.to_path_buf(),
            });
        }
        set
    }

    /// Adds an anchor unless the same certificate is already there.
    pub fn add(&mut self, anchor: Anchor) {
        let fp = anchor.fingerprint();
        if !self.anchors.iter().any(|a| a.fingerprint() == fp) {
            self.anchors.push(anchor);
        }
    }

    pub fn extend(&mut self, other: &AnchorSet) {
        for a in &other.anchors {
            self.add(a.clone());
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Anchor> {
        self.anchors.iter()
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// Loads a file, or every regular file of a directory (not recursing;
    /// names starting with '.' and README files are skipped).
    pub fn load(path: &Path) -> Result<AnchorSet, TrustError> {
        let meta = fs::metadata(path).map_err(|e| TrustError::AnchorFile {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let mut set = AnchorSet::new();
        if meta.is_dir() {
            let entries = fs::read_dir(path).map_err(|e| TrustError::AnchorFile {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && !skipped(p))
                .collect();
            files.sort();
            for file in files {
                for cert in read_certificates(&file)? {
                    set.add(Anchor {
                        cert,
                        source: file.clone(),
                    });
                }
            }
        } else {
            for cert in read_certificates(path)? {
                set.add(Anchor {
                    cert,
                    source: path.to_path_buf(),
                });
            }
        }
        Ok(set)
    }
}

fn skipped(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.starts_with('.') || name.starts_with("readme")
}

/// Reads every certificate of a file: PEM (one or many), a DER certificate,
/// or a DER/PEM PKCS#7 certs-only structure.
pub fn read_certificates(path: &Path) -> Result<Vec<X509>, TrustError> {
    let data = fs::read(path).map_err(|e| TrustError::AnchorFile {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    parse_certificates(&data).map_err(|why| TrustError::AnchorFile {
        path: path.to_path_buf(),
        why,
    })
}

/// Parses certificates from PEM, DER or PKCS#7 bytes.
pub fn parse_certificates(data: &[u8]) -> Result<Vec<X509>, String> {
    let is_pem = data.windows(11).any(|w| w == b"-----BEGIN ");
    if is_pem {
        if data.windows(17).any(|w| w == b"BEGIN CERTIFICATE") {
            let certs =
                X509::stack_from_pem(data).map_err(|e| format!("bad PEM certificate: {e}"))?;
            if certs.is_empty() {
                return Err("no certificate in the PEM file".into());
            }
            return Ok(certs);
        }
        if let Ok(p7) = openssl::pkcs7::Pkcs7::from_pem(data) {
            return pkcs7_certificates(&p7);
        }
        return Err("PEM file holds no CERTIFICATE or PKCS7 block".into());
    }
    if let Ok(cert) = X509::from_der(data) {
        return Ok(vec![cert]);
    }
    if let Ok(p7) = openssl::pkcs7::Pkcs7::from_der(data) {
        return pkcs7_certificates(&p7);
    }
    Err("neither a PEM nor a DER certificate (nor PKCS#7 certificates)".into())
}

fn pkcs7_certificates(p7: &openssl::pkcs7::Pkcs7) -> Result<Vec<X509>, String> {
    let certs: Vec<X509> = p7
        .signed()
        .and_then(|s| s.certificates())
        .map(|st| st.iter().map(|c| c.to_owned()).collect())
        .unwrap_or_default();
    if certs.is_empty() {
        Err("PKCS#7 structure carries no certificates".into())
    } else {
        Ok(certs)
    }
}
