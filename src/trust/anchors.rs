//! Trust anchors on disk: files of one or many certificates, PEM or DER.

use super::{fingerprint, subject_line, TrustError, TrustPath};
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::hash::MessageDigest;
use openssl::x509::{X509Ref, X509};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Paths already validated against exactly these anchors (shared by
    /// clones; a changed set starts a new one).
    verified: Arc<Mutex<HashMap<Vec<u8>, VerifiedPath>>>,
}

/// A successful path validation, reused while the time of a check is
/// within every certificate's validity and for at most [`VERIFIED_TTL`].
#[derive(Clone)]
pub(super) struct VerifiedPath {
    pub path: TrustPath,
    pub certs: Vec<X509>,
    /// The leaf and intermediates it was validated from: a hit must be
    /// these very certificates, not only share their key.
    inputs: Vec<X509>,
    valid_from: i64,
    valid_until: i64,
    stored: Instant,
}

/// How long a validated path is reused. Revocation is not part of it (CRLs
/// are checked on every use); expiry is, through the validity window.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
const VERIFIED_MAX: usize = 4096;

fn unix(t: &Asn1TimeRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

impl VerifiedPath {
    pub(super) fn new(
        path: TrustPath,
        certs: Vec<X509>,
        leaf: &X509Ref,
        untrusted: &[X509],
    ) -> Option<VerifiedPath> {
        let mut valid_from = i64::MIN;
        let mut valid_until = i64::MAX;
        for c in &certs {
            valid_from = valid_from.max(unix(c.not_before())?);
            valid_until = valid_until.min(unix(c.not_after())?);
        }
        let mut inputs = vec![leaf.to_owned()];
        inputs.extend(untrusted.iter().cloned());
        Some(VerifiedPath {
            path,
            certs,
            inputs,
            valid_from,
            valid_until,
            stored: Instant::now(),
        })
    }
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
            self.verified = Arc::default();
        }
    }

    /// The key of a validation of `leaf` with `untrusted` intermediates:
    /// their SHA-1 fingerprints, which OpenSSL keeps with each certificate
    /// (a SHA-256 one would re-encode and hash it every time). A hit is
    /// then compared in full (`X509_cmp`), so a collision finds nothing.
    pub(super) fn path_key(leaf: &X509Ref, untrusted: &[X509]) -> Option<Vec<u8>> {
        let mut key = leaf.digest(MessageDigest::sha1()).ok()?.to_vec();
        for c in untrusted {
            key.extend_from_slice(&c.digest(MessageDigest::sha1()).ok()?);
        }
        Some(key)
    }

    pub(super) fn verified_path(
        &self,
        key: &[u8],
        at: i64,
        leaf: &X509Ref,
        untrusted: &[X509],
    ) -> Option<VerifiedPath> {
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|v| {
                v.inputs.len() == untrusted.len() + 1
                    && v.inputs[0].as_ref() == leaf
                    && v.inputs[1..] == *untrusted
            })
            .filter(|v| v.valid_from <= at && at <= v.valid_until)
            .filter(|v| v.stored.elapsed() < VERIFIED_TTL)
            .cloned()
    }

    pub(super) fn remember_path(&self, key: Vec<u8>, verified: VerifiedPath) {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_MAX {
            cache.retain(|_, v| v.stored.elapsed() < VERIFIED_TTL);
            if cache.len() >= VERIFIED_MAX {
                cache.clear();
            }
        }
        cache.insert(key, verified);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, LeafSpec};
    use crate::trust::{validate, Direction};

    fn cached(set: &AnchorSet) -> usize {
        set.verified.lock().unwrap().len()
    }

    #[test]
    fn a_validated_path_is_reused_but_never_past_a_certificates_validity_or_a_changed_set() {
        let ca = pki::new_ca("Cache Test CA", 2048).unwrap();
        let leaf = pki::issue(&ca, &LeafSpec::address("bob@b.example").days(10)).unwrap();
        let mut set = AnchorSet::from_certs(vec![ca.cert.clone()], Path::new("ca.pem"));
        let now = crate::agent::now();
        let first = validate(&leaf.cert, &[], &set, now, "a.example", Direction::Outgoing).unwrap();
        assert_eq!(cached(&set), 1);
        let again = validate(
            &leaf.cert,
            &[],
            &set,
            now + 60,
            "a.example",
            Direction::Outgoing,
        )
        .unwrap();
        assert_eq!(again.chain, first.chain);
        assert_eq!(cached(&set), 1);
        // Another certificate of the same CA is validated on its own.
        let other_leaf = pki::issue(&ca, &LeafSpec::address("carol@b.example")).unwrap();
        let other_path = validate(
            &other_leaf.cert,
            &[],
            &set,
            now,
            "a.example",
            Direction::Outgoing,
        )
        .unwrap();
        assert!(
            other_path.chain[0].contains("carol"),
            "{:?}",
            other_path.chain
        );
        assert_eq!(cached(&set), 2);

        // Eleven days on the leaf has expired: the cached path must not hide it.
        let later = now + 11 * 86_400;
        assert!(matches!(
            validate(
                &leaf.cert,
                &[],
                &set,
                later,
                "a.example",
                Direction::Outgoing
            ),
            Err(TrustError::Expired { .. })
        ));
        // Nor may it outlive the anchors it was validated against.
        let other = AnchorSet::from_certs(
            vec![pki::new_ca("Other CA", 2048).unwrap().cert],
            Path::new("other.pem"),
        );
        assert!(validate(
            &leaf.cert,
            &[],
            &other,
            now,
            "a.example",
            Direction::Outgoing
        )
        .is_err());
        let shared = set.clone();
        set.add(Anchor {
            cert: pki::new_ca("Added CA", 2048).unwrap().cert,
            source: PathBuf::from("added.pem"),
        });
        assert_eq!(
            cached(&set),
            0,
            "a changed set starts with nothing validated"
        );
        assert_eq!(cached(&shared), 2, "an unchanged clone keeps its paths");
    }
}
