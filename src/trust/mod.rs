//! The one place that decides trust: path validation against a domain's
//! anchors at a given time, and the Applicability Statement's policy on
//! keys, key usage, digests and address binding.

mod anchors;
pub mod bundle;
pub mod revocation;

use anchors::VerifiedPath;
pub use anchors::{parse_certificates, read_certificates, Anchor, AnchorSet};

use crate::address::DirectAddress;
use crate::smime::ffi;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::Id;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::{X509VerifyFlags, X509VerifyParam};
use openssl::x509::{X509NameRef, X509Ref, X509StoreContext, X509VerifyResult, X509};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("anchor file {path}: {why}")]
    AnchorFile { path: PathBuf, why: String },
    #[error("no trust anchors are configured for {domain} ({direction})")]
    NoAnchors { domain: String, direction: String },
    #[error("certificate \"{subject}\" does not chain to any of the {anchors} {direction} anchor(s) of {domain} (issuer \"{issuer}\" not found)")]
    Untrusted {
        subject: String,
        issuer: String,
        domain: String,
        direction: Direction,
        anchors: usize,
    },
    #[error("certificate \"{subject}\" expired on {not_after}")]
    Expired { subject: String, not_after: String },
    #[error("certificate \"{subject}\" is not valid before {not_before}")]
    NotYetValid { subject: String, not_before: String },
    #[error("certificate \"{subject}\" is revoked")]
    Revoked { subject: String },
    #[error("the CRL of certificate \"{subject}\" could not be obtained from {url}: {why} (the CRL policy is hard-fail)")]
    CrlUnavailable {
        subject: String,
        url: String,
        why: String,
    },
    #[error("path validation of \"{subject}\" failed: {reason}")]
    PathInvalid { subject: String, reason: String },
    #[error(
        "certificate \"{subject}\" has a {bits}-bit RSA key; at least {min} bits are required"
    )]
    WeakRsaKey {
        subject: String,
        bits: u32,
        min: u32,
    },
    #[error("certificate \"{subject}\" has an unsupported key: {kind}")]
    UnsupportedKey { subject: String, kind: String },
    #[error("certificate \"{subject}\" lacks the {usage} key usage")]
    KeyUsage {
        subject: String,
        usage: &'static str,
    },
    #[error("digest algorithm {0} is forbidden by the Applicability Statement (SHA-256, SHA-384 or SHA-512 required)")]
    ForbiddenDigest(String),
    #[error("certificate \"{subject}\" is not bound to {target}: {why}")]
    NotBound {
        subject: String,
        target: String,
        why: String,
    },
    #[error("OpenSSL error during path validation: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// Direction of trust, as anchors are kept per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Anchors that decide whether a message's signer is trusted.
    Incoming,
    /// Anchors that decide whether a recipient's certificate is trusted.
    Outgoing,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Incoming => "incoming",
            Direction::Outgoing => "outgoing",
        })
    }
}

/// `CN=x, O=y` for a name.
pub fn subject_line(name: &X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?").to_string();
            let value = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// SHA-256 of the DER certificate, lower-case hex.
pub fn fingerprint(cert: &X509Ref) -> String {
    cert.digest(MessageDigest::sha256())
        .map(|d| hex::encode(&*d))
        .unwrap_or_default()
}

pub fn subject(cert: &X509Ref) -> String {
    subject_line(cert.subject_name())
}

/// A certificate as reports show it.
#[derive(Clone, Debug, Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub fingerprint: String,
    pub not_before: String,
    pub not_after: String,
}

impl CertSummary {
    pub fn of(cert: &X509Ref) -> CertSummary {
        CertSummary {
            subject: subject(cert),
            issuer: subject_line(cert.issuer_name()),
            fingerprint: fingerprint(cert),
            not_before: cert.not_before().to_string(),
            not_after: cert.not_after().to_string(),
        }
    }
}

/// The result of a successful path validation.
#[derive(Clone, Debug, Serialize)]
pub struct TrustPath {
    /// Subjects from the leaf up to and including the anchor.
    pub chain: Vec<String>,
    pub anchor: CertSummary,
    pub anchor_source: String,
}

/// Validates `leaf` up to one of `anchors` at `at` (Unix seconds), using
/// `untrusted` as possible intermediates. Anchors need not be self-signed: a
/// Direct anchor may be an intermediate or even the leaf itself.
pub fn validate(
    leaf: &X509Ref,
    untrusted: &[X509],
    anchors: &AnchorSet,
    at: i64,
    domain: &str,
    direction: Direction,
) -> Result<TrustPath, TrustError> {
    verify_path(leaf, untrusted, anchors, at, domain, direction).map(|(path, _)| path)
}

/// [`validate`], then revocation: refuses with [`TrustError::Revoked`] when a
/// certificate of the verified path (not the anchor) is listed in one of
/// `crls` signed by its issuer (see [`revocation::check_revoked`]).
/// Certificates without a CRL among `crls` are not refused: whether a missing
/// CRL matters is decided when fetching ([`revocation::CrlPolicy`]).
pub fn validate_with_crls(
    leaf: &X509Ref,
    untrusted: &[X509],
    anchors: &AnchorSet,
    crls: &[openssl::x509::X509Crl],
    at: i64,
    domain: &str,
    direction: Direction,
) -> Result<TrustPath, TrustError> {
    let (path, verified) = verify_path(leaf, untrusted, anchors, at, domain, direction)?;
    revocation::check_revoked(&verified, crls, at)?;
    Ok(path)
}

/// Path validation by OpenSSL: the trust path and the verified certificates
/// (leaf first, anchor last).
fn verify_path(
    leaf: &X509Ref,
    untrusted: &[X509],
    anchors: &AnchorSet,
    at: i64,
    domain: &str,
    direction: Direction,
) -> Result<(TrustPath, Vec<X509>), TrustError> {
    if anchors.is_empty() {
        return Err(TrustError::NoAnchors {
            domain: domain.to_string(),
            direction: direction.to_string(),
        });
    }
    // Sending to the same partner validates the same certificate again and
    // again: a path found before is reused (see `VerifiedPath`).
    let key = AnchorSet::path_key(leaf, untrusted);
    if let Some(hit) = key
        .as_deref()
        .and_then(|k| anchors.verified_path(k, at, leaf, untrusted))
    {
        return Ok((hit.path, hit.certs));
    }
    let mut store = X509StoreBuilder::new()?;
    for a in anchors.iter() {
        store.add_cert(a.cert.clone())?;
    }
    let mut param = X509VerifyParam::new()?;
    param.set_time(at as _);
    param.set_flags(X509VerifyFlags::PARTIAL_CHAIN | X509VerifyFlags::USE_CHECK_TIME)?;
    store.set_param(&param)?;
    let store = store.build();
    let mut chain = Stack::new()?;
    for c in untrusted {
        chain.push(c.clone())?;
    }
    let mut ctx = X509StoreContext::new()?;
    let outcome = ctx.init(&store, leaf, &chain, |c| {
        let ok = c.verify_cert()?;
        let verified: Vec<X509> = c
            .chain()
            .map(|s| s.iter().map(|x| x.to_owned()).collect())
            .unwrap_or_default();
        let failing = c.current_cert().map(|x| x.to_owned());
        Ok((ok, c.error(), verified, failing))
    })?;
    let (ok, error, verified, failing) = outcome;
    if ok {
        let anchor_cert = verified.last().cloned().unwrap_or_else(|| leaf.to_owned());
        let fp = fingerprint(&anchor_cert);
        let source = anchors
            .iter()
            .find(|a| a.fingerprint() == fp)
            .map(|a| a.source.display().to_string())
            .unwrap_or_default();
        let path = TrustPath {
            chain: verified.iter().map(|c| subject(c)).collect(),
            anchor: CertSummary::of(&anchor_cert),
            anchor_source: source,
        };
        if let Some(cached) = key.and_then(|k| {
            Some((
                k,
                VerifiedPath::new(path.clone(), verified.clone(), leaf, untrusted)?,
            ))
        }) {
            anchors.remember_path(cached.0, cached.1);
        }
        return Ok((path, verified));
    }
    let at_fault = failing.unwrap_or_else(|| leaf.to_owned());
    Err(map_verify_error(
        error, &at_fault, leaf, anchors, domain, direction,
    ))
}

fn map_verify_error(
    error: X509VerifyResult,
    at_fault: &X509Ref,
    leaf: &X509Ref,
    anchors: &AnchorSet,
    domain: &str,
    direction: Direction,
) -> TrustError {
    use openssl_sys as sys;
    let subject = subject(at_fault);
    match error.as_raw() {
        sys::X509_V_ERR_CERT_HAS_EXPIRED => TrustError::Expired {
            subject,
            not_after: at_fault.not_after().to_string(),
        },
        sys::X509_V_ERR_CERT_NOT_YET_VALID => TrustError::NotYetValid {
            subject,
            not_before: at_fault.not_before().to_string(),
        },
        sys::X509_V_ERR_CERT_REVOKED => TrustError::Revoked { subject },
        sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        | sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | sys::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
        | sys::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        | sys::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN => TrustError::Untrusted {
            subject: crate::trust::subject(leaf),
            issuer: subject_line(at_fault.issuer_name()),
            domain: domain.to_string(),
            direction,
            anchors: anchors.len(),
        },
        _ => TrustError::PathInvalid {
            subject,
            reason: error.error_string().to_string(),
        },
    }
}

/// Checks the certificate's own validity dates at `at` (Unix seconds), for
/// when no path validation is done (our own keys; discovery without anchors).
pub fn check_validity(cert: &X509Ref, at: i64) -> Result<(), TrustError> {
    let at_time = openssl::asn1::Asn1Time::from_unix(at)?;
    if cert.not_after() < at_time {
        return Err(TrustError::Expired {
            subject: subject(cert),
            not_after: cert.not_after().to_string(),
        });
    }
    if cert.not_before() > at_time {
        return Err(TrustError::NotYetValid {
            subject: subject(cert),
            not_before: cert.not_before().to_string(),
        });
    }
    Ok(())
}

/// What a certificate is used for, for the key usage check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUse {
    Sign,
    Encrypt,
}

/// Checks the key: RSA of at least `min_rsa_bits`, or ECDSA P-256/P-384
/// (signing only). Returns a description such as "RSA 2048".
pub fn check_key(cert: &X509Ref, use_: KeyUse, min_rsa_bits: u32) -> Result<String, TrustError> {
    let key = cert.public_key()?;
    match key.id() {
        Id::RSA => {
            let bits = key.bits();
            if bits < min_rsa_bits {
                return Err(TrustError::WeakRsaKey {
                    subject: subject(cert),
                    bits,
                    min: min_rsa_bits,
                });
            }
            Ok(format!("RSA {bits}"))
        }
        Id::EC if use_ == KeyUse::Sign => {
            let curve = key.ec_key().ok().and_then(|k| k.group().curve_name());
            match curve {
                Some(Nid::X9_62_PRIME256V1) => Ok("ECDSA P-256".into()),
                Some(Nid::SECP384R1) => Ok("ECDSA P-384".into()),
                other => Err(TrustError::UnsupportedKey {
                    subject: subject(cert),
                    kind: format!(
                        "EC curve {}",
                        other.and_then(|n| n.short_name().ok()).unwrap_or("unknown")
                    ),
                }),
            }
        }
        Id::EC => Err(TrustError::UnsupportedKey {
            subject: subject(cert),
            kind: "an EC key, which cannot receive RSA key transport; encryption needs an RSA key"
                .into(),
        }),
        other => Err(TrustError::UnsupportedKey {
            subject: subject(cert),
            kind: format!(
                "key type {}",
                Nid::from_raw(other.as_raw())
                    .short_name()
                    .unwrap_or("unknown")
            ),
        }),
    }
}

/// Checks keyUsage: digitalSignature to sign, keyEncipherment to encrypt. A
/// certificate without the extension is not restricted (RFC 5280 §4.2.1.3).
pub fn check_key_usage(cert: &X509Ref, use_: KeyUse) -> Result<(), TrustError> {
    let (bit, usage) = match use_ {
        KeyUse::Sign => (0x0080u32, "digitalSignature"),
        KeyUse::Encrypt => (0x0020u32, "keyEncipherment"),
    };
    match ffi::key_usage(cert) {
        None => Ok(()),
        Some(bits) if bits & bit != 0 => Ok(()),
        Some(_) => Err(TrustError::KeyUsage {
            subject: subject(cert),
            usage,
        }),
    }
}

/// Message digests the Applicability Statement allows.
pub fn check_digest(digest: Nid) -> Result<(), TrustError> {
    match digest {
        Nid::SHA256 | Nid::SHA384 | Nid::SHA512 => Ok(()),
        other => Err(TrustError::ForbiddenDigest(
            other.short_name().unwrap_or("unknown").to_string(),
        )),
    }
}

/// How a certificate binds to a Direct address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Binding {
    /// subjectAltName rfc822Name equal to the address.
    Address(String),
    /// subjectAltName dNSName equal to the domain.
    Domain(String),
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Binding::Address(a) => write!(f, "address-bound to {a}"),
            Binding::Domain(d) => write!(f, "domain-bound to {d}"),
        }
    }
}

/// The subjectAltName rfc822Names and dNSNames of a certificate.
pub fn san_names(cert: &X509Ref) -> (Vec<String>, Vec<String>) {
    let mut emails = Vec::new();
    let mut dns = Vec::new();
    if let Some(names) = cert.subject_alt_names() {
        for n in names.iter() {
            if let Some(e) = n.email() {
                emails.push(e.to_string());
            }
            if let Some(d) = n.dnsname() {
                dns.push(d.to_string());
            }
        }
    }
    (emails, dns)
}

/// Every binding a certificate carries (for choosing private keys).
pub fn bindings(cert: &X509Ref) -> Vec<Binding> {
    let (emails, dns) = san_names(cert);
    let mut out: Vec<Binding> = emails
        .into_iter()
        .filter_map(|e| DirectAddress::parse(&e).ok())
        .map(|a| Binding::Address(a.to_string().to_ascii_lowercase()))
        .collect();
    out.extend(
        dns.into_iter()
            .filter(|d| !d.starts_with('*'))
            .filter_map(|d| crate::address::normalize_domain(&d).ok())
            .map(Binding::Domain),
    );
    out
}

/// Checks that `cert` binds to `address` (address-bound) or, when
/// `allow_domain`, to its domain (domain-bound), by subjectAltName only.
pub fn check_binding(
    cert: &X509Ref,
    address: &DirectAddress,
    allow_domain: bool,
) -> Result<Binding, TrustError> {
    let (emails, dns) = san_names(cert);
    let wanted = address.to_string();
    if emails
        .iter()
        .filter_map(|e| DirectAddress::parse(e).ok())
        .any(|e| &e == address)
    {
        return Ok(Binding::Address(wanted.to_ascii_lowercase()));
    }
    let domain = address.domain();
    if allow_domain
        && dns
            .iter()
            .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
    {
        return Ok(Binding::Domain(domain.to_string()));
    }
    let fail = |why: String| TrustError::NotBound {
        subject: subject(cert),
        target: wanted.clone(),
        why,
    };
    let subject_emails: Vec<String> = cert
        .subject_name()
        .entries_by_nid(Nid::PKCS9_EMAILADDRESS)
        .filter_map(|e| e.data().to_string().ok())
        .collect();
    if emails.is_empty()
        && dns.is_empty()
        && subject_emails
            .iter()
            .any(|e| e.eq_ignore_ascii_case(&wanted))
    {
        return Err(fail(
            "the address appears only in the subject DN; Direct binds by subjectAltName".into(),
        ));
    }
    let wildcard = dns.iter().find(|d| d.starts_with("*."));
    let mut bound_to: Vec<String> = emails.clone();
    bound_to.extend(dns.iter().filter(|d| !d.starts_with("*.")).cloned());
    let wildcard_note = wildcard
        .map(|w| {
            format!("the wildcard dNSName {w} does not bind (the Applicability Statement requires an exact name)")
        })
        .unwrap_or_default();
    match (bound_to.is_empty(), wildcard.is_some()) {
        (false, false) => Err(fail(format!(
            "it is bound to {} instead",
            bound_to.join(", ")
        ))),
        (false, true) => Err(fail(format!(
            "it is bound to {} instead, and {wildcard_note}",
            bound_to.join(", ")
        ))),
        (true, true) => Err(fail(format!(
            "its only DNS binding is a wildcard: {wildcard_note}"
        ))),
        (true, false) => Err(fail(
            "it has no subjectAltName rfc822Name or dNSName".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha2_digests_are_allowed() {
        for ok in [Nid::SHA256, Nid::SHA384, Nid::SHA512] {
            assert!(check_digest(ok).is_ok(), "{ok:?}");
        }
        for (bad, name) in [
            (Nid::SHA1, "SHA1"),
            (Nid::MD5, "MD5"),
            (Nid::SHA224, "SHA224"),
        ] {
            match check_digest(bad) {
                Err(TrustError::ForbiddenDigest(n)) => assert_eq!(n, name),
                other => panic!("{name} must be forbidden: {other:?}"),
            }
        }
    }
}
