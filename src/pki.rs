//! A development PKI: a CA and Direct certificates with the extensions the
//! Applicability Statement and the Certificate Policy expect. For test
//! systems, demos and interop testing, not for production trust.

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{
    X509Builder, X509Crl, X509CrlBuilder, X509Extension, X509NameBuilder, X509RevokedBuilder, X509,
};
use std::fs;
use std::path::{Path, PathBuf};

/// A certificate with its private key and the chain above it (not including the anchor).
#[derive(Clone)]
pub struct Credential {
    pub cert: X509,
    pub key: PKey<Private>,
    pub chain: Vec<X509>,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("OpenSSL failed while building a certificate: {0}")]
    OpenSsl(#[from] ErrorStack),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {what}")]
    BadFile { path: PathBuf, what: String },
    #[error("RSA key size {0} is not allowed: choose 2048, 3072 or 4096")]
    KeySize(u32),
    #[error("{0} already holds a key.pem; refusing to overwrite it (use --force)")]
    Exists(PathBuf),
    #[error("{0} is not a CA certificate (basicConstraints cA is not set)")]
    NotCa(PathBuf),
    #[error("--days must be at least 1")]
    Days,
}

/// The public key algorithm of a new certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa(u32),
    EcP256,
    EcP384,
}

/// What to put in a leaf certificate. The defaults make a conforming Direct
/// certificate; tests change single fields to make non-conforming ones.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub common_name: String,
    /// Email address placed in the subject DN (not a binding by itself).
    pub subject_email: Option<String>,
    pub san_emails: Vec<String>,
    pub san_dns: Vec<String>,
    pub key: KeyKind,
    /// Seconds relative to now.
    pub not_before_offset: i64,
    pub not_after_offset: i64,
    pub digital_signature: bool,
    pub key_encipherment: bool,
    /// CRL distribution point (a URL where the issuer's CRL is published).
    pub crl_url: Option<String>,
    /// AIA caIssuers URL (where the issuer's certificate can be fetched).
    pub ca_issuers_url: Option<String>,
}

impl LeafSpec {
    fn base(cn: &str) -> LeafSpec {
        LeafSpec {
            common_name: cn.to_string(),
            subject_email: None,
            san_emails: Vec::new(),
            san_dns: Vec::new(),
            key: KeyKind::Rsa(2048),
            not_before_offset: -3600,
            not_after_offset: 365 * 86400,
            digital_signature: true,
            key_encipherment: true,
            crl_url: None,
            ca_issuers_url: None,
        }
    }

    /// An address-bound certificate: subjectAltName rfc822Name = address.
    pub fn address(address: &str) -> LeafSpec {
        LeafSpec {
            subject_email: Some(address.to_string()),
            san_emails: vec![address.to_string()],
            ..LeafSpec::base(address)
        }
    }

    /// A domain-bound certificate: subjectAltName dNSName = domain.
    pub fn domain(domain: &str) -> LeafSpec {
        LeafSpec {
            san_dns: vec![domain.to_string()],
            ..LeafSpec::base(domain)
        }
    }

    pub fn days(mut self, days: u32) -> LeafSpec {
        self.not_after_offset = i64::from(days) * 86400;
        self
    }
}

fn new_key(kind: KeyKind) -> Result<PKey<Private>, PkiError> {
    Ok(match kind {
        KeyKind::Rsa(bits) => PKey::from_rsa(Rsa::generate(bits)?)?,
        KeyKind::EcP256 => {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
            PKey::from_ec_key(EcKey::generate(&group)?)?
        }
        KeyKind::EcP384 => {
            let group = EcGroup::from_curve_name(Nid::SECP384R1)?;
            PKey::from_ec_key(EcKey::generate(&group)?)?
        }
    })
}

fn serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

fn time(offset_secs: i64) -> Result<Asn1Time, ErrorStack> {
    let now = chrono::Utc::now().timestamp();
    Asn1Time::from_unix(now + offset_secs)
}

/// A v3 certificate builder with serial, names, key and validity set.
fn builder(
    subject: &openssl::x509::X509NameRef,
    issuer: &openssl::x509::X509NameRef,
    key: &PKey<Private>,
    not_before_offset: i64,
    not_after_offset: i64,
) -> Result<X509Builder, PkiError> {
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let serial_number = serial()?;
    b.set_serial_number(&serial_number)?;
    b.set_subject_name(subject)?;
    b.set_issuer_name(issuer)?;
    b.set_pubkey(key)?;
    let (not_before, not_after) = (time(not_before_offset)?, time(not_after_offset)?);
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    Ok(b)
}

/// A new self-signed CA (an anchor), valid ten years.
pub fn new_ca(common_name: &str, bits: u32) -> Result<Credential, PkiError> {
    let key = new_key(KeyKind::Rsa(bits))?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "hispd development PKI")?;
    let name = name.build();
    let mut b = builder(&name, &name, &key, -3600, 10 * 365 * 86400)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(Credential {
        cert: b.build(),
        key,
        chain: Vec::new(),
    })
}

/// A leaf certificate signed by `ca` as `spec` describes.
pub fn issue(ca: &Credential, spec: &LeafSpec) -> Result<Credential, PkiError> {
    let key = new_key(spec.key)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, &spec.common_name)?;
    if let Some(email) = &spec.subject_email {
        name.append_entry_by_nid(Nid::PKCS9_EMAILADDRESS, email)?;
    }
    let name = name.build();
    let mut b = builder(
        &name,
        ca.cert.subject_name(),
        &key,
        spec.not_before_offset,
        spec.not_after_offset,
    )?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    let mut ku = KeyUsage::new();
    ku.critical();
    if spec.digital_signature {
        ku.digital_signature();
    }
    if spec.key_encipherment {
        ku.key_encipherment();
    }
    if spec.digital_signature || spec.key_encipherment {
        b.append_extension(ku.build()?)?;
    }
    b.append_extension(ExtendedKeyUsage::new().email_protection().build()?)?;
    if !spec.san_emails.is_empty() || !spec.san_dns.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for e in &spec.san_emails {
            san.email(e);
        }
        for d in &spec.san_dns {
            san.dns(d);
        }
        let ext = san.build(&b.x509v3_context(Some(&ca.cert), None))?;
        b.append_extension(ext)?;
    }
    // The openssl crate has no builders for these two: the config-string form.
    #[allow(deprecated)]
    {
        if let Some(url) = &spec.crl_url {
            b.append_extension(X509Extension::new_nid(
                None,
                None,
                Nid::CRL_DISTRIBUTION_POINTS,
                &format!("URI:{url}"),
            )?)?;
        }
        if let Some(url) = &spec.ca_issuers_url {
            b.append_extension(X509Extension::new_nid(
                None,
                None,
                Nid::INFO_ACCESS,
                &format!("caIssuers;URI:{url}"),
            )?)?;
        }
    }
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(aki)?;
    b.sign(&ca.key, MessageDigest::sha256())?;
    let mut chain = ca.chain.clone();
    if ca.cert.subject_name().to_der()? != ca.cert.issuer_name().to_der()? {
        chain.insert(0, ca.cert.clone());
    }
    Ok(Credential {
        cert: b.build(),
        key,
        chain,
    })
}

/// A self-signed TLS server certificate for `hostname` (and 127.0.0.1, ::1),
/// for listeners that have no configured certificate.
pub fn self_signed_server(hostname: &str) -> Result<Credential, PkiError> {
    let key = new_key(KeyKind::Rsa(2048))?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, hostname)?;
    let name = name.build();
    let mut b = builder(&name, &name, &key, -3600, 5 * 365 * 86400)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    let san = SubjectAlternativeName::new()
        .dns(hostname)
        .ip("127.0.0.1")
        .ip("::1")
        .build(&b.x509v3_context(None, None))?;
    b.append_extension(san)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(Credential {
        cert: b.build(),
        key,
        chain: Vec::new(),
    })
}

/// A CRL of `ca` listing `revoked` (valid for a day from an hour ago), with
/// the authorityKeyIdentifier and cRLNumber extensions.
pub fn crl(ca: &Credential, revoked: &[&X509], number: u8) -> Result<X509Crl, PkiError> {
    let mut b = X509CrlBuilder::new()?;
    b.set_issuer_name(ca.cert.subject_name())?;
    let (last, next): (Asn1Time, Asn1Time) = (time(-3600)?, time(86400)?);
    b.set_last_update(&last)?;
    b.set_next_update(&next)?;
    for cert in revoked {
        let mut r = X509RevokedBuilder::new()?;
        let serial: Asn1Integer = cert.serial_number().to_bn()?.to_asn1_integer()?;
        r.set_serial_number(&serial)?;
        let date: Asn1Time = time(-600)?;
        r.set_revocation_date(&date)?;
        b.add_revoked(r.build())?;
    }
    let ext = |oid: &str, der: &[u8]| -> Result<X509Extension, ErrorStack> {
        let object: openssl::asn1::Asn1Object = openssl::asn1::Asn1Object::from_str(oid)?;
        let value: openssl::asn1::Asn1OctetString =
            openssl::asn1::Asn1OctetString::new_from_bytes(der)?;
        X509Extension::new_from_der(&object, false, &value)
    };
    if let Some(key_id) = ca.cert.subject_key_id() {
        let key_id = key_id.as_slice();
        let mut aki = vec![0x30, (key_id.len() + 2) as u8, 0x80, key_id.len() as u8];
        aki.extend(key_id);
        b.append_extension(ext("2.5.29.35", &aki)?)?;
    }
    b.append_extension(ext("2.5.29.20", &[0x02, 0x01, number])?)?;
    b.sort()?;
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(b.build()?)
}

/// Checks an RSA size given on the command line.
pub fn check_bits(bits: u32) -> Result<u32, PkiError> {
    match bits {
        2048 | 3072 | 4096 => Ok(bits),
        other => Err(PkiError::KeySize(other)),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |error| PkiError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Writes a file; `private` files are created with mode 0600 from the start.
fn write(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io(path))?;
    #[cfg(unix)]
    if private {
        // An existing file keeps its mode on open: tighten it too.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io(path))?;
    }
    file.write_all(data).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(io(path))
}

/// Writes `cert.pem` (the certificate, then its chain) and `key.pem` (PKCS#8,
/// mode 0600). Refuses to replace an existing key unless `overwrite`: every
/// certificate issued from a CA key would be orphaned.
pub fn save_checked(cred: &Credential, dir: &Path, overwrite: bool) -> Result<(), PkiError> {
    let key_path = dir.join("key.pem");
    if !overwrite && key_path.exists() {
        return Err(PkiError::Exists(dir.to_path_buf()));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut pem = cred.cert.to_pem()?;
    for c in &cred.chain {
        pem.extend(c.to_pem()?);
    }
    write(&dir.join("cert.pem"), &pem, false)?;
    write(&key_path, &cred.key.private_key_to_pem_pkcs8()?, true)
}

/// `save_checked` that overwrites (for fresh directories such as the demo's).
pub fn save(cred: &Credential, dir: &Path) -> Result<(), PkiError> {
    save_checked(cred, dir, true)
}

/// Loads a CA saved with `save`, checking it can issue certificates.
pub fn load_ca(dir: &Path) -> Result<Credential, PkiError> {
    let ca = load(dir)?;
    if !crate::smime::ffi::is_ca(&ca.cert) {
        return Err(PkiError::NotCa(dir.join("cert.pem")));
    }
    Ok(ca)
}

/// Validity in days as given on the command line.
pub fn check_days(days: u32) -> Result<u32, PkiError> {
    if days == 0 {
        Err(PkiError::Days)
    } else {
        Ok(days)
    }
}

/// Reads what `save` wrote.
pub fn load(dir: &Path) -> Result<Credential, PkiError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let certs = X509::stack_from_pem(&read(&cert_path)?).map_err(|e| PkiError::BadFile {
        path: cert_path.clone(),
        what: format!("not PEM certificates: {}", crate::smime::openssl_reason(&e)),
    })?;
    let mut certs = certs.into_iter();
    let cert = certs.next().ok_or_else(|| PkiError::BadFile {
        path: cert_path.clone(),
        what: "no certificate in the file".into(),
    })?;
    let key = PKey::private_key_from_pem(&read(&key_path)?).map_err(|e| PkiError::BadFile {
        path: key_path.clone(),
        what: format!(
            "not a PEM private key: {}",
            crate::smime::openssl_reason(&e)
        ),
    })?;
    if !cert.public_key()?.public_eq(&key) {
        return Err(PkiError::BadFile {
            path: key_path,
            what: "this key does not belong to the certificate in cert.pem".into(),
        });
    }
    Ok(Credential {
        cert,
        key,
        chain: certs.collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_leaf_has_direct_extensions_and_chains() {
        let ca = new_ca("Test CA", 2048).unwrap();
        let leaf = issue(&ca, &LeafSpec::address("alice@a.example")).unwrap();
        let emails: Vec<String> = leaf
            .cert
            .subject_alt_names()
            .unwrap()
            .iter()
            .filter_map(|n| n.email().map(str::to_string))
            .collect();
        assert_eq!(emails, vec!["alice@a.example"]);
        assert!(leaf.cert.verify(&ca.cert.public_key().unwrap()).unwrap());
        assert_eq!(
            leaf.cert.signature_algorithm().object().nid(),
            Nid::SHA256WITHRSAENCRYPTION
        );
        assert!(
            leaf.chain.is_empty(),
            "a self-signed CA is the anchor, not chain"
        );
    }

    #[test]
    fn save_and_load_round_trip_and_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("Test CA", 2048).unwrap();
        save(&ca, dir.path()).unwrap();
        let back = load(dir.path()).unwrap();
        assert_eq!(back.cert.to_der().unwrap(), ca.cert.to_der().unwrap());
        let other = new_ca("Other", 2048).unwrap();
        fs::write(
            dir.path().join("key.pem"),
            other.key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        let err = load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("does not belong"), "{err}");
    }

    #[test]
    fn existing_keys_are_not_overwritten_and_leaves_are_not_cas() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("Test CA", 2048).unwrap();
        save_checked(&ca, dir.path(), false).unwrap();
        let before = fs::read(dir.path().join("key.pem")).unwrap();
        let other = new_ca("Other", 2048).unwrap();
        assert!(matches!(
            save_checked(&other, dir.path(), false),
            Err(PkiError::Exists(_))
        ));
        assert_eq!(fs::read(dir.path().join("key.pem")).unwrap(), before);
        assert!(load_ca(dir.path()).is_ok());
        let leaf_dir = tempfile::tempdir().unwrap();
        save(
            &issue(&ca, &LeafSpec::domain("x.example")).unwrap(),
            leaf_dir.path(),
        )
        .unwrap();
        assert!(matches!(load_ca(leaf_dir.path()), Err(PkiError::NotCa(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(leaf_dir.path().join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn key_sizes_outside_the_policy_are_refused() {
        assert!(check_bits(1024).is_err());
        assert_eq!(check_bits(3072).unwrap(), 3072);
    }
}
