//! Certificates held locally: our own domains' public certificates, and the
//! public-certificate directory for partners that publish neither in DNS nor
//! in LDAP.

use super::{Answer, DiscoveryError, Found, SourceKind, Step};
use crate::address::DirectAddress;
use crate::trust::{self, AnchorSet};
use openssl::x509::X509;
use std::path::Path;

/// A set of certificates with where each came from.
#[derive(Clone, Default)]
pub struct CertificateSet {
    certs: Vec<Found>,
}

impl CertificateSet {
    pub fn new() -> CertificateSet {
        CertificateSet::default()
    }

    pub fn add(&mut self, cert: X509, origin: impl Into<String>) {
        self.certs.push(Found {
            cert,
            origin: origin.into(),
        });
    }

    /// Every certificate file in `dir` (PEM, DER or PKCS#7); a missing
    /// directory is an empty set.
    pub fn load_dir(dir: &Path) -> Result<CertificateSet, DiscoveryError> {
        let mut set = CertificateSet::new();
        if !dir.exists() {
            return Ok(set);
        }
        let loaded = AnchorSet::load(dir).map_err(|e| DiscoveryError::PublicDir {
            path: dir.display().to_string(),
            why: e.to_string(),
        })?;
        for a in loaded.iter() {
            set.add(a.cert.clone(), a.source.display().to_string());
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn answer(&self, kind: SourceKind, query: String, matches: impl Fn(&X509) -> bool) -> Answer {
        let found: Vec<Found> = self
            .certs
            .iter()
            .filter(|f| matches(&f.cert))
            .cloned()
            .collect();
        let result = match found.len() {
            0 => format!("none of {} certificate(s) match", self.certs.len()),
            n => format!("{n} certificate(s)"),
        };
        Answer {
            found,
            steps: vec![Step {
                source: kind,
                query,
                result,
            }],
            temporary_failure: false,
            resolver_down: false,
        }
    }

    pub fn lookup_address(&self, kind: SourceKind, address: &DirectAddress) -> Answer {
        self.answer(kind, format!("rfc822Name {address}"), |cert| {
            trust::san_names(cert)
                .0
                .iter()
                .filter_map(|e| DirectAddress::parse(e).ok())
                .any(|e| &e == address)
        })
    }

    pub fn lookup_domain(&self, kind: SourceKind, domain: &str) -> Answer {
        self.answer(kind, format!("dNSName {domain}"), |cert| {
            trust::san_names(cert)
                .1
                .iter()
                .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
        })
    }
}
