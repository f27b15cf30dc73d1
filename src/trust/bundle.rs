//! Trust bundles (Trust Bundle Distribution guide): PKCS#7 certs-only
//! bundles, optionally wrapped in a CMS SignedData by the bundle's publisher,
//! fetched from a URL or read from disk, and kept as the last good copy so a
//! bad or unreachable bundle never takes away the anchors already trusted.

use crate::http::{self, FetchLimits, HttpError};
use crate::smime::{ffi, openssl_reason};
use crate::trust::subject;
use openssl::asn1::Asn1Time;
use openssl::base64;
use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::nid::Nid;
use openssl::stack::Stack;
use openssl::x509::{X509Ref, X509};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a trust bundle (neither PKCS#7 certificates nor a CMS-signed bundle): {why}")]
    NotABundle { why: String },
    #[error("the trust bundle carries no certificates")]
    NoCertificates,
    #[error("the signed bundle's content is not a PKCS#7 certificates bundle: {why}")]
    BadSignedContent { why: String },
    #[error("the bundle is not signed, but a signer (\"{signer}\") is configured: only a bundle signed by it is accepted")]
    Unsigned { signer: String },
    #[error("signature does not verify against the configured signer \"{signer}\": {why}")]
    SignatureInvalid { signer: String, why: String },
    #[error("the bundle is signed, but its signature does not verify against the certificates it carries (no signer is configured): {why}")]
    SignatureUnverifiable { why: String },
    #[error("signer certificate \"{signer}\" expired on {not_after} (allow_expired_signer accepts bundles from an expired signer)")]
    SignerExpired { signer: String, not_after: String },
    #[error("signer certificate \"{signer}\" is not valid before {not_before}")]
    SignerNotYetValid { signer: String, not_before: String },
    #[error("OpenSSL error while reading the bundle: {0}")]
    OpenSsl(String),
    /// A bundle refused by `parse_bundle`, named.
    #[error("trust bundle \"{bundle}\": {source}")]
    Rejected {
        bundle: String,
        #[source]
        source: Box<BundleError>,
    },
    #[error("trust bundle \"{bundle}\": fetch failed: {source}")]
    Fetch {
        bundle: String,
        #[source]
        source: HttpError,
    },
    #[error("trust bundle \"{bundle}\": {path} is larger than the limit of {limit} bytes")]
    TooLarge {
        bundle: String,
        path: PathBuf,
        limit: usize,
    },
    #[error("trust bundle \"{bundle}\": {url}: only http://, https://, file:// URLs and plain paths are supported")]
    UnsupportedUrl { bundle: String, url: String },
    #[error("trust bundle name \"{name}\" is not allowed: use letters, digits, '.', '-' and '_' (not starting with '.')")]
    BadName { name: String },
    #[error("trust bundle \"{bundle}\": {action} {path}: {source}")]
    Io {
        bundle: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BundleError {
    /// The error beneath any naming wrapper (`Rejected`).
    pub fn root(&self) -> &BundleError {
        match self {
            BundleError::Rejected { source, .. } => source.root(),
            other => other,
        }
    }

    fn named(self, bundle: &str) -> BundleError {
        match self {
            e @ BundleError::Rejected { .. } => e,
            e => BundleError::Rejected {
                bundle: bundle.to_string(),
                source: Box::new(e),
            },
        }
    }
}

impl From<openssl::error::ErrorStack> for BundleError {
    fn from(e: openssl::error::ErrorStack) -> Self {
        BundleError::OpenSsl(openssl_reason(&e))
    }
}

/// Where a bundle comes from and how it must be signed.
#[derive(Clone, Debug)]
pub struct BundleSource {
    /// Names the cached copy (`<name>.p7b`, `<name>.json`).
    pub name: String,
    /// `http(s)://`, `file://` or a plain path.
    pub url: String,
    /// When set, only a bundle signed by exactly this certificate is accepted.
    pub signer: Option<X509>,
    pub allow_expired_signer: bool,
    pub max_bytes: usize,
    pub timeout: Duration,
}

impl BundleSource {
    /// A source with the default fetch limits and no signer.
    pub fn new(name: &str, url: &str) -> BundleSource {
        let limits = FetchLimits::default();
        BundleSource {
            name: name.to_string(),
            url: url.to_string(),
            signer: None,
            allow_expired_signer: false,
            max_bytes: limits.max_bytes,
            timeout: limits.timeout,
        }
    }
}

/// The anchors of one bundle and how it was signed.
#[derive(Debug)]
pub struct ParsedBundle {
    pub certs: Vec<X509>,
    /// The bundle was a CMS SignedData around a certs-only bundle.
    pub signed: bool,
    /// The signature verified against the configured signer (never true
    /// without a configured signer: then a signed bundle's content is taken
    /// as is, which is worth a log line).
    pub signature_verified: bool,
}

/// Parses bundle bytes: DER or PEM PKCS#7 certs-only, or a CMS SignedData
/// (DER, PEM or bare base64) whose encapsulated content is itself a DER or
/// PEM PKCS#7 certs-only bundle. With `signer`, a signed bundle must verify
/// against exactly that certificate (the signature check, not a chain to
/// system roots), and an unsigned bundle is refused; the signer's validity is
/// checked at `at` (Unix seconds) unless `allow_expired_signer`. Without
/// `signer`, a signed bundle's content is accepted once its signature verifies
/// against the certificates it carries, with `signature_verified` false.
pub fn parse_bundle(
    bytes: &[u8],
    signer: Option<&X509Ref>,
    allow_expired_signer: bool,
    at: i64,
) -> Result<ParsedBundle, BundleError> {
    let der = to_der(bytes).map_err(|why| BundleError::NotABundle { why })?;
    let mut cms = signed_data(&der).map_err(|why| match X509::from_der(&der) {
        Ok(cert) => BundleError::NotABundle {
            why: format!(
                "it is a single certificate (\"{}\"), not a PKCS#7 bundle",
                subject(&cert)
            ),
        },
        Err(_) => BundleError::NotABundle { why },
    })?;
    let signer_infos = ffi::signer_algorithms(&cms).len();
    if signer_infos == 0 {
        if let Some(signer) = signer {
            return Err(BundleError::Unsigned {
                signer: subject(signer),
            });
        }
        return Ok(ParsedBundle {
            certs: certs_only(&cms)?,
            signed: false,
            signature_verified: false,
        });
    }
    let content = match signer {
        Some(signer) => {
            let content = verify_against(&mut cms, &der, signer)?;
            if !allow_expired_signer {
                check_signer_validity(signer, at)?;
            }
            content
        }
        None => {
            let mut out = Vec::new();
            cms.verify(
                None,
                None,
                None,
                Some(&mut out),
                CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY,
            )
            .map_err(|e| BundleError::SignatureUnverifiable {
                why: openssl_reason(&e),
            })?;
            out
        }
    };
    let bad = |why: String| BundleError::BadSignedContent { why };
    let inner_der = to_der(&content).map_err(bad)?;
    let inner = signed_data(&inner_der).map_err(bad)?;
    if !ffi::signer_algorithms(&inner).is_empty() {
        return Err(bad(
            "it is itself signed; nested signed bundles are not supported".into(),
        ));
    }
    Ok(ParsedBundle {
        certs: certs_only(&inner)?,
        signed: true,
        signature_verified: signer.is_some(),
    })
}

/// Verifies the SignedData against `signer` only (no other certificate is
/// looked at, and the signer is not chained anywhere); returns the content.
fn verify_against(
    cms: &mut CmsContentInfo,
    der: &[u8],
    signer: &X509Ref,
) -> Result<Vec<u8>, BundleError> {
    let mut certs = Stack::new()?;
    certs.push(signer.to_owned())?;
    let flags = CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY | CMSOptions::NOINTERN;
    let mut out = Vec::new();
    let invalid = |why: String| BundleError::SignatureInvalid {
        signer: subject(signer),
        why,
    };
    if let Err(e) = cms.verify(Some(&certs), None, None, Some(&mut out), flags) {
        let reason = openssl_reason(&e);
        let why = match actual_signers(der) {
            Some(who) if reason.contains("signer certificate not found") => {
                format!("the bundle is signed by {who}")
            }
            Some(who) => format!("{reason} (the bundle names {who} as its signer)"),
            None => reason,
        };
        return Err(invalid(why));
    }
    let wanted = signer.to_der()?;
    let matched = ffi::signers(cms);
    if matched.is_empty()
        || matched
            .iter()
            .any(|c| c.to_der().map(|d| d != wanted).unwrap_or(true))
    {
        return Err(invalid(
            "the signature was not made by this certificate".into(),
        ));
    }
    Ok(out)
}

/// Who signed, by the certificates the SignedData carries, for messages.
fn actual_signers(der: &[u8]) -> Option<String> {
    let mut cms = CmsContentInfo::from_der(der).ok()?;
    let flags = CMSOptions::NO_SIGNER_CERT_VERIFY
        | CMSOptions::BINARY
        | CMSOptions::NO_CONTENT_VERIFY
        | CMSOptions::NO_ATTR_VERIFY;
    cms.verify(None, None, None, None, flags).ok()?;
    let names: Vec<String> = ffi::signers(&cms)
        .iter()
        .map(|c| format!("\"{}\"", subject(c)))
        .collect();
    if names.is_empty() {
        None
    } else {
        Some(names.join(", "))
    }
}

fn check_signer_validity(signer: &X509Ref, at: i64) -> Result<(), BundleError> {
    let at_time = Asn1Time::from_unix(at)?;
    if signer.not_after() < at_time {
        return Err(BundleError::SignerExpired {
            signer: subject(signer),
            not_after: signer.not_after().to_string(),
        });
    }
    if signer.not_before() > at_time {
        return Err(BundleError::SignerNotYetValid {
            signer: subject(signer),
            not_before: signer.not_before().to_string(),
        });
    }
    Ok(())
}

/// The certificates of a certs-only SignedData, without duplicates.
fn certs_only(cms: &CmsContentInfo) -> Result<Vec<X509>, BundleError> {
    let mut certs: Vec<X509> = Vec::new();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    for cert in ffi::certificates(cms) {
        let der = cert.to_der()?;
        if !seen.contains(&der) {
            seen.push(der);
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(BundleError::NoCertificates);
    }
    Ok(certs)
}

/// A CMS SignedData from DER (BER) bytes.
fn signed_data(der: &[u8]) -> Result<CmsContentInfo, String> {
    let cms = CmsContentInfo::from_der(der)
        .map_err(|e| format!("not a CMS/PKCS#7 structure ({})", openssl_reason(&e)))?;
    let kind = ffi::content_type(&cms);
    if kind != Nid::PKCS7_SIGNED {
        return Err(format!(
            "the PKCS#7 structure is {}, not signedData",
            kind.long_name().unwrap_or("of an unknown type")
        ));
    }
    Ok(cms)
}

/// DER bytes from DER, the first PEM block (which must be PKCS7 or CMS), or
/// bare base64.
fn to_der(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let trimmed = bytes[start..]
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(&bytes[start..]);
    if trimmed.is_empty() {
        return Err("the file is empty".into());
    }
    if trimmed[0] == 0x30 {
        return Ok(trimmed.to_vec());
    }
    if let Some(pos) = find(trimmed, b"-----BEGIN ") {
        return pem_block(&trimmed[pos..]);
    }
    let text: Vec<u8> = trimmed
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let looks_base64 = text
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if looks_base64 && text.len() >= 16 {
        if let Ok(der) = std::str::from_utf8(&text)
            .map_err(|_| ())
            .and_then(|t| base64::decode_block(t).map_err(|_| ()))
        {
            if der.first() == Some(&0x30) {
                return Ok(der);
            }
        }
    }
    Err("neither DER, PEM nor base64".into())
}

fn pem_block(pem: &[u8]) -> Result<Vec<u8>, String> {
    let text = String::from_utf8_lossy(pem);
    let header_end = text.find('\n').ok_or("truncated PEM header")?;
    let header = text[..header_end].trim();
    let label = header
        .trim_start_matches("-----BEGIN ")
        .trim_end_matches('-')
        .trim()
        .to_string();
    if !matches!(label.as_str(), "PKCS7" | "PKCS #7 SIGNED DATA" | "CMS") {
        return Err(format!("the PEM block is {label}, not PKCS7"));
    }
    let end_marker = format!("-----END {label}-----");
    let body_end = text[header_end..]
        .find(&end_marker)
        .ok_or_else(|| format!("the PEM block has no {end_marker} line"))?;
    let body: String = text[header_end..header_end + body_end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::decode_block(&body)
        .map_err(|e| format!("bad base64 in the PEM block ({})", openssl_reason(&e)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What is kept about the last good copy of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMetadata {
    pub name: String,
    pub url: String,
    /// SHA-256 of the bytes as fetched, lower-case hex.
    pub sha256: String,
    /// Unix seconds.
    pub fetched_at: i64,
    pub anchors: usize,
    pub signed: bool,
    pub signature_verified: bool,
}

/// The anchors of the last good copy of a bundle.
#[derive(Debug)]
pub struct LoadedBundle {
    pub certs: Vec<X509>,
    pub meta: BundleMetadata,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The bundle's bytes are those of the last good copy.
    Unchanged,
    /// A new good copy replaced the last one.
    Updated { anchors: usize },
}

/// Keeps the last good copy of each bundle under a directory: `<name>.p7b`
/// (the bytes as fetched) and `<name>.json` (`BundleMetadata`), each written
/// atomically (temporary file, fsync, rename, fsync of the directory).
#[derive(Clone, Debug)]
pub struct BundleCache {
    dir: PathBuf,
}

impl BundleCache {
    pub fn new(dir: &Path) -> Result<BundleCache, BundleError> {
        fs::create_dir_all(dir).map_err(|source| BundleError::Io {
            bundle: "*".into(),
            action: "creating the bundle cache directory",
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(BundleCache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn bundle_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.p7b"))
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The anchors of the last good copy, re-parsed and re-verified from disk
    /// at `at` with the source's signer settings; `None` when there is none.
    pub fn load(
        &self,
        source: &BundleSource,
        at: i64,
    ) -> Result<Option<LoadedBundle>, BundleError> {
        check_name(&source.name)?;
        let path = self.bundle_path(&source.name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source_err) => {
                return Err(BundleError::Io {
                    bundle: source.name.clone(),
                    action: "reading the cached copy",
                    path,
                    source: source_err,
                })
            }
        };
        let parsed = parse_bundle(
            &bytes,
            source.signer.as_deref(),
            source.allow_expired_signer,
            at,
        )
        .map_err(|e| e.named(&source.name))?;
        let digest = sha256_hex(&bytes);
        let meta = match self.metadata(&source.name) {
            Some(m) if m.sha256 == digest => m,
            // No metadata, or the process stopped between the two renames:
            // the bundle file is the truth, it was just verified.
            other => BundleMetadata {
                name: source.name.clone(),
                url: other
                    .as_ref()
                    .map(|m| m.url.clone())
                    .unwrap_or_else(|| source.url.clone()),
                sha256: digest,
                fetched_at: other.map(|m| m.fetched_at).unwrap_or(0),
                anchors: parsed.certs.len(),
                signed: parsed.signed,
                signature_verified: parsed.signature_verified,
            },
        };
        Ok(Some(LoadedBundle {
            certs: parsed.certs,
            meta,
        }))
    }

    /// Fetches the bundle and, if its digest changed, parses and verifies it
    /// at `at` and makes it the last good copy. On any error nothing on disk
    /// changes (the caller keeps trusting the previous anchors).
    pub async fn refresh(
        &self,
        source: &BundleSource,
        at: i64,
    ) -> Result<RefreshOutcome, BundleError> {
        check_name(&source.name)?;
        let bytes = fetch_source(source).await?;
        let cache = self.clone();
        let source = source.clone();
        tokio::task::spawn_blocking(move || cache.apply(&source, &bytes, at))
            .await
            .map_err(|e| BundleError::Io {
                bundle: "*".into(),
                action: "updating the bundle cache in",
                path: self.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Makes `bytes` the last good copy of `source` unless they are already.
    fn apply(
        &self,
        source: &BundleSource,
        bytes: &[u8],
        at: i64,
    ) -> Result<RefreshOutcome, BundleError> {
        let digest = sha256_hex(bytes);
        if let Some(meta) = self.metadata(&source.name) {
            let on_disk = fs::read(self.bundle_path(&source.name))
                .map(|b| sha256_hex(&b))
                .unwrap_or_default();
            if meta.sha256 == digest && on_disk == digest {
                if meta.url != source.url {
                    let meta = BundleMetadata {
                        url: source.url.clone(),
                        ..meta
                    };
                    self.write_meta(&meta)?;
                }
                return Ok(RefreshOutcome::Unchanged);
            }
        }
        let parsed = parse_bundle(
            bytes,
            source.signer.as_deref(),
            source.allow_expired_signer,
            at,
        )
        .map_err(|e| e.named(&source.name))?;
        if parsed.signed && !parsed.signature_verified {
            tracing::warn!(
                bundle = %source.name,
                url = %source.url,
                "signed trust bundle accepted without checking its signer: no signer is configured"
            );
        }
        let meta = BundleMetadata {
            name: source.name.clone(),
            url: source.url.clone(),
            sha256: digest,
            fetched_at: at,
            anchors: parsed.certs.len(),
            signed: parsed.signed,
            signature_verified: parsed.signature_verified,
        };
        write_atomic(&source.name, &self.bundle_path(&source.name), bytes)?;
        self.write_meta(&meta)?;
        tracing::info!(
            bundle = %source.name,
            url = %source.url,
            anchors = meta.anchors,
            sha256 = %meta.sha256,
            "trust bundle updated"
        );
        Ok(RefreshOutcome::Updated {
            anchors: meta.anchors,
        })
    }

    fn write_meta(&self, meta: &BundleMetadata) -> Result<(), BundleError> {
        let path = self.meta_path(&meta.name);
        let json = serde_json::to_vec_pretty(meta).map_err(|e| BundleError::Io {
            bundle: meta.name.clone(),
            action: "encoding",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&meta.name, &path, &json)
    }

    /// The metadata of the last good copy, if any (and readable).
    pub fn metadata(&self, name: &str) -> Option<BundleMetadata> {
        check_name(name).ok()?;
        let path = self.meta_path(name);
        let data = fs::read(&path).ok()?;
        match serde_json::from_slice(&data) {
            Ok(meta) => Some(meta),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable trust bundle metadata");
                None
            }
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(openssl::sha::sha256(bytes))
}

fn check_name(name: &str) -> Result<(), BundleError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(BundleError::BadName {
            name: name.to_string(),
        })
    }
}

/// Reads the bundle from its URL or path, within the source's size limit.
async fn fetch_source(source: &BundleSource) -> Result<Vec<u8>, BundleError> {
    let lower = source.url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let limits = FetchLimits {
            timeout: source.timeout,
            max_bytes: source.max_bytes,
        };
        return http::fetch(&source.url, limits)
            .await
            .map_err(|e| BundleError::Fetch {
                bundle: source.name.clone(),
                source: e,
            });
    }
    let path = local_path(&source.url).ok_or_else(|| BundleError::UnsupportedUrl {
        bundle: source.name.clone(),
        url: source.url.clone(),
    })?;
    let name = source.name.clone();
    let limit = source.max_bytes;
    tokio::task::spawn_blocking(move || read_limited(&name, &path, limit))
        .await
        .map_err(|e| BundleError::Io {
            bundle: source.name.clone(),
            action: "reading",
            path: PathBuf::from(&source.url),
            source: std::io::Error::other(e.to_string()),
        })?
}

/// The path of a `file://` URL or a plain path; `None` for other schemes.
fn local_path(url: &str) -> Option<PathBuf> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("file://") {
        let rest = &url["file://".len()..];
        // file:///path or file://localhost/path
        let path = if rest.starts_with('/') {
            rest
        } else if rest.to_ascii_lowercase().starts_with("localhost/") {
            &rest["localhost".len()..]
        } else {
            return None;
        };
        return Some(PathBuf::from(percent_decode(path)?));
    }
    if url.contains("://") || url.is_empty() {
        return None;
    }
    Some(PathBuf::from(url))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let value = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(value);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn read_limited(bundle: &str, path: &Path, limit: usize) -> Result<Vec<u8>, BundleError> {
    let io = |source: std::io::Error| BundleError::Io {
        bundle: bundle.to_string(),
        action: "reading",
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    let mut data = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(io)?;
    if data.len() > limit {
        return Err(BundleError::TooLarge {
            bundle: bundle.to_string(),
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(data)
}

/// Writes `path` atomically: a unique temporary file beside it, fsync,
/// rename over `path`, fsync of the directory.
fn write_atomic(bundle: &str, path: &Path, data: &[u8]) -> Result<(), BundleError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source: std::io::Error| BundleError::Io {
            bundle: bundle.to_string(),
            action,
            path: p,
            source,
        }
    };
    let written = (|| {
        let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(data).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io("renaming into place", path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/bundles")
            .join(name)
    }

    fn read(name: &str) -> Vec<u8> {
        fs::read(fixture(name)).expect("fixture")
    }

    fn signer() -> X509 {
        X509::from_der(&read("java-bundleSigner.der")).expect("signer")
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    }

    /// 2022-06-01, while the Java signer was valid.
    const BEFORE_EXPIRY: i64 = 1_654_041_600;

    fn fingerprints(certs: &[X509]) -> Vec<String> {
        let mut fps: Vec<String> = certs.iter().map(|c| crate::trust::fingerprint(c)).collect();
        fps.sort();
        fps
    }

    #[test]
    fn unsigned_bundles_count_their_anchors() {
        for (name, count) in [
            ("java-providerTestBundle.p7b", 6),
            ("java-signedbundle.p7b", 1),
            ("dotnet-bundleNoMetadata.p7b", 2),
            ("dotnet-bundlePEM.p7b", 8),
            ("dotnet-bundleWithMetadata.p7b", 2),
        ] {
            let parsed = parse_bundle(&read(name), None, false, now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(parsed.certs.len(), count, "{name}");
            assert!(!parsed.signed, "{name}");
            assert!(!parsed.signature_verified, "{name}");
        }
    }

    #[test]
    fn signed_java_bundle_verifies_against_its_signer() {
        let bytes = read("java-signedbundle.p7m");
        let signer = signer();

        // without a signer: the content is taken, flagged unverified
        let parsed = parse_bundle(&bytes, None, false, now()).expect("no signer");
        assert_eq!(parsed.certs.len(), 1);
        assert!(parsed.signed && !parsed.signature_verified);

        // the signer expired on 2022-12-03: refused by default today
        let err =
            parse_bundle(&bytes, Some(&signer), false, now()).expect_err("expired signer refused");
        assert!(matches!(err, BundleError::SignerExpired { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("expired on Dec  3") && text.contains("2022"),
            "{text}"
        );

        // accepted when allowed, or at a time it was valid
        for (allow, at) in [(true, now()), (false, BEFORE_EXPIRY)] {
            let parsed = parse_bundle(&bytes, Some(&signer), allow, at).expect("verified");
            assert_eq!(parsed.certs.len(), 1);
            assert!(parsed.signed && parsed.signature_verified);
        }
        // the anchor is the content's (sm1 root), not the signer (sm2)
        let parsed = parse_bundle(&bytes, Some(&signer), true, now()).expect("verified");
        assert!(subject(&parsed.certs[0]).contains("sm1.direct.com Root CA"));

        // the same structure as PEM and as bare base64
        let der = to_der(&bytes).expect("der");
        let cms = CmsContentInfo::from_der(&der).expect("cms");
        let pem = cms.to_pem().expect("pem");
        let b64 = base64::encode_block(&der);
        for form in [pem, b64.into_bytes()] {
            let parsed = parse_bundle(&form, Some(&signer), false, BEFORE_EXPIRY).expect("form");
            assert!(parsed.signature_verified);
            assert_eq!(parsed.certs.len(), 1);
        }
    }

    #[test]
    fn the_invalid_bundle_is_refused_clearly() {
        let err =
            parse_bundle(&read("java-invalidBundle.der"), None, false, now()).expect_err("refused");
        assert!(matches!(err, BundleError::NotABundle { .. }), "{err}");
        assert!(
            err.to_string().contains(
                "not a trust bundle (neither PKCS#7 certificates nor a CMS-signed bundle)"
            ),
            "{err}"
        );
        // a bare certificate is not a bundle either
        let err =
            parse_bundle(&read("java-bundleSigner.der"), None, false, now()).expect_err("refused");
        assert!(matches!(err, BundleError::NotABundle { .. }), "{err}");
        assert!(err.to_string().contains("single certificate"), "{err}");
        assert!(parse_bundle(b"", None, false, now()).is_err());
    }

    #[test]
    fn wrong_signer_and_unsigned_bundles_are_refused() {
        let other = pki::new_ca("Not the bundle signer", 2048).expect("ca");
        let err = parse_bundle(
            &read("java-signedbundle.p7m"),
            Some(&other.cert),
            true,
            now(),
        )
        .expect_err("wrong signer refused");
        assert!(matches!(err, BundleError::SignatureInvalid { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("signature does not verify against the configured signer")
                && text.contains("sm2.direct.com"),
            "{text}"
        );

        let err = parse_bundle(
            &read("dotnet-bundleNoMetadata.p7b"),
            Some(&signer()),
            true,
            now(),
        )
        .expect_err("unsigned refused");
        assert!(matches!(err, BundleError::Unsigned { .. }), "{err}");
    }

    #[test]
    fn a_bundle_signed_here_verifies_and_tampering_is_caught() {
        let publisher = pki::new_ca("Bundle publisher", 2048).expect("ca");
        let content = read("dotnet-bundleNoMetadata.p7b");
        let cms = CmsContentInfo::sign(
            Some(&publisher.cert),
            Some(&publisher.key),
            None,
            Some(&content),
            CMSOptions::BINARY,
        )
        .expect("sign");
        let der = cms.to_der().expect("der");
        let parsed = parse_bundle(&der, Some(&publisher.cert), false, now()).expect("verified");
        assert_eq!(parsed.certs.len(), 2);
        assert!(parsed.signed && parsed.signature_verified);

        // flip one byte inside the encapsulated content
        let pos = find(&der, &content[40..60]).expect("content inside");
        let mut tampered = der.clone();
        tampered[pos + 5] ^= 0x01;
        let err = parse_bundle(&tampered, Some(&publisher.cert), false, now())
            .expect_err("tampered refused");
        assert!(matches!(err, BundleError::SignatureInvalid { .. }), "{err}");
        assert!(parse_bundle(&tampered, None, false, now()).is_err());
    }

    fn copy_fixture(name: &str, to: &Path) {
        let tmp = to.with_extension("tmp");
        fs::write(&tmp, read(name)).expect("write");
        fs::rename(&tmp, to).expect("rename");
    }

    #[tokio::test]
    async fn cache_keeps_the_last_good_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let published = dir.path().join("published.p7b");
        let cache_dir = dir.path().join("cache");
        copy_fixture("java-providerTestBundle.p7b", &published);
        let source = BundleSource::new("provider", &format!("file://{}", published.display()));
        let cache = BundleCache::new(&cache_dir).expect("cache");
        assert!(cache.load(&source, now()).expect("load").is_none());
        assert!(cache.metadata("provider").is_none());

        assert_eq!(
            cache.refresh(&source, 1000).await.expect("first"),
            RefreshOutcome::Updated { anchors: 6 }
        );
        let first = cache.load(&source, now()).expect("load").expect("copy");
        assert_eq!(first.certs.len(), 6);
        assert_eq!(first.meta.anchors, 6);
        assert_eq!(first.meta.fetched_at, 1000);
        assert_eq!(
            first.meta.sha256,
            sha256_hex(&read("java-providerTestBundle.p7b"))
        );
        assert_eq!(cache.metadata("provider").expect("meta"), first.meta);
        assert_eq!(
            fs::read(cache_dir.join("provider.p7b")).expect("raw"),
            read("java-providerTestBundle.p7b")
        );

        assert_eq!(
            cache.refresh(&source, 2000).await.expect("again"),
            RefreshOutcome::Unchanged
        );
        assert_eq!(cache.metadata("provider").expect("meta").fetched_at, 1000);

        // a broken publication: refused, nothing on disk changes
        copy_fixture("java-invalidBundle.der", &published);
        let err = cache.refresh(&source, 3000).await.expect_err("refused");
        assert!(
            matches!(err.root(), BundleError::NotABundle { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("\"provider\""), "{err}");
        let kept = cache.load(&source, now()).expect("load").expect("copy");
        assert_eq!(fingerprints(&kept.certs), fingerprints(&first.certs));
        assert_eq!(
            cache.metadata("provider").expect("meta").sha256,
            first.meta.sha256
        );

        // a new good publication replaces it
        copy_fixture("dotnet-bundlePEM.p7b", &published);
        assert_eq!(
            cache.refresh(&source, 4000).await.expect("updated"),
            RefreshOutcome::Updated { anchors: 8 }
        );
        let second = cache.load(&source, now()).expect("load").expect("copy");
        assert_eq!(second.certs.len(), 8);
        assert_eq!(
            fingerprints(&second.certs),
            fingerprints(
                &parse_bundle(&read("dotnet-bundlePEM.p7b"), None, false, 0)
                    .expect("p")
                    .certs
            )
        );

        // no temporary files are left behind
        let names: Vec<String> = fs::read_dir(&cache_dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // restart: a new cache over the same directory, the source gone
        fs::remove_file(&published).expect("remove");
        let restarted = BundleCache::new(&cache_dir).expect("cache");
        let err = restarted
            .refresh(&source, 5000)
            .await
            .expect_err("source gone");
        assert!(matches!(err, BundleError::Io { .. }), "{err}");
        assert!(err.to_string().contains("published.p7b"), "{err}");
        let loaded = restarted.load(&source, now()).expect("load").expect("copy");
        assert_eq!(fingerprints(&loaded.certs), fingerprints(&second.certs));
        assert_eq!(loaded.meta.fetched_at, 4000);
    }

    #[tokio::test]
    async fn cache_checks_the_signer_and_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BundleCache::new(&dir.path().join("cache")).expect("cache");
        let signed = fixture("java-signedbundle.p7m");
        let mut source = BundleSource::new("java", &signed.display().to_string());
        source.signer = Some(signer());

        let err = cache.refresh(&source, now()).await.expect_err("expired");
        assert!(
            matches!(err.root(), BundleError::SignerExpired { .. }),
            "{err}"
        );
        assert!(cache.metadata("java").is_none());

        source.allow_expired_signer = true;
        assert_eq!(
            cache.refresh(&source, now()).await.expect("allowed"),
            RefreshOutcome::Updated { anchors: 1 }
        );
        let meta = cache.metadata("java").expect("meta");
        assert!(meta.signed && meta.signature_verified);

        // load re-verifies: without the allowance the copy is refused
        source.allow_expired_signer = false;
        assert!(cache.load(&source, now()).is_err());
        assert!(cache.load(&source, BEFORE_EXPIRY).expect("then").is_some());

        let mut small = BundleSource::new("small", &signed.display().to_string());
        small.max_bytes = 100;
        let err = cache.refresh(&small, now()).await.expect_err("too large");
        assert!(matches!(err, BundleError::TooLarge { .. }), "{err}");

        let bad = BundleSource::new("../escape", "/dev/null");
        assert!(matches!(
            cache.refresh(&bad, now()).await,
            Err(BundleError::BadName { .. })
        ));
        let ftp = BundleSource::new("ftp", "ftp://example.com/b.p7b");
        assert!(matches!(
            cache.refresh(&ftp, now()).await,
            Err(BundleError::UnsupportedUrl { .. })
        ));
    }

    /// A loopback HTTP server answering every request with `body`.
    async fn serve(body: Vec<u8>, requests: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for _ in 0..requests {
                if let Ok((mut s, _)) = listener.accept().await {
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                }
            }
        });
        format!("http://{addr}/bundle.p7b")
    }

    #[tokio::test]
    async fn refreshes_over_http() {
        let url = serve(read("dotnet-bundleWithMetadata.p7b"), 2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BundleCache::new(dir.path()).expect("cache");
        let source = BundleSource::new("dotnet", &url);
        assert_eq!(
            cache.refresh(&source, now()).await.expect("http"),
            RefreshOutcome::Updated { anchors: 2 }
        );
        assert_eq!(
            cache.refresh(&source, now()).await.expect("http again"),
            RefreshOutcome::Unchanged
        );
        let loaded = cache.load(&source, now()).expect("load").expect("copy");
        assert_eq!(loaded.certs.len(), 2);
        assert_eq!(loaded.meta.url, url);

        // nothing listening any more: a fetch error, the copy stays
        let err = cache.refresh(&source, now()).await.expect_err("down");
        assert!(matches!(err, BundleError::Fetch { .. }), "{err}");
        assert!(cache.load(&source, now()).expect("load").is_some());
    }

    #[test]
    fn file_urls_and_paths() {
        assert_eq!(
            local_path("file:///a/b%20c.p7b"),
            Some(PathBuf::from("/a/b c.p7b"))
        );
        assert_eq!(local_path("file://localhost/x"), Some(PathBuf::from("/x")));
        assert_eq!(
            local_path("/plain/path"),
            Some(PathBuf::from("/plain/path"))
        );
        assert_eq!(local_path("file://host/x"), None);
        assert_eq!(local_path("ldap://x/y"), None);
    }
}
