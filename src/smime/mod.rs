//! S/MIME as Direct uses it: wrap, sign (multipart/signed), encrypt
//! (application/pkcs7-mime), and the reverse. Decides nothing about trust:
//! that is `trust`'s job, and `agent` puts the two together.

pub mod ffi;
pub mod mime;

use crate::pki::Credential;
use mime::{to_crlf, Entity, MimeError};
use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::stack::Stack;
use openssl::symm::Cipher;
use openssl::x509::X509;
use serde::Serialize;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum SmimeError {
    #[error("malformed MIME: {0}")]
    Mime(#[from] MimeError),
    #[error("the message is not encrypted (Content-Type {0}); Direct requires application/pkcs7-mime enveloped-data")]
    NotEncrypted(String),
    #[error("the decrypted content is not signed (Content-Type {0}); Direct requires a signature")]
    NotSigned(String),
    #[error("the encrypted body is not a CMS structure: {0}")]
    BadCms(String),
    #[error("the CMS structure is {0}, not enveloped-data or authEnveloped-data")]
    NotEnveloped(String),
    #[error("the signature part is not a CMS SignedData: {0}")]
    BadSignature(String),
    #[error("the message is not encrypted to any of our certificates ({tried} tried; it has {recipients} key transport recipient(s))")]
    NotForUs { tried: usize, recipients: usize },
    #[error("decryption failed with the key of \"{subject}\": {why}")]
    DecryptFailed { subject: String, why: String },
    #[error("the signature does not verify (content altered or signature corrupt): {0}")]
    SignatureInvalid(String),
    #[error("the SignedData names no signer certificate that it carries")]
    NoSignerCertificate,
    #[error("multipart/signed must have 2 parts, this one has {0}")]
    SignedParts(usize),
    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: String },
    #[error("OpenSSL error: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// OpenSSL's reasons without its source paths and codes, for people and for
/// SMTP replies: "bad decrypt; wrong final block length".
pub fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    let mut reasons: Vec<String> = Vec::new();
    for err in e.errors() {
        let r = err.reason().unwrap_or("unknown error").to_string();
        if !reasons.contains(&r) {
            reasons.push(r);
        }
    }
    if reasons.is_empty() {
        "unknown OpenSSL error".into()
    } else {
        reasons.join("; ")
    }
}

/// Content encryption for sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ContentCipher {
    #[serde(rename = "aes-128-cbc")]
    Aes128Cbc,
    #[serde(rename = "aes-256-cbc")]
    Aes256Cbc,
}

impl ContentCipher {
    fn openssl(self) -> Cipher {
        match self {
            ContentCipher::Aes128Cbc => Cipher::aes_128_cbc(),
            ContentCipher::Aes256Cbc => Cipher::aes_256_cbc(),
        }
    }
}

impl FromStr for ContentCipher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "aes-128-cbc" | "aes128-cbc" | "aes128" => Ok(ContentCipher::Aes128Cbc),
            "aes-256-cbc" | "aes256-cbc" | "aes256" => Ok(ContentCipher::Aes256Cbc),
            _ => Err(format!(
                "unknown cipher {s:?}: use aes-128-cbc or aes-256-cbc"
            )),
        }
    }
}

/// Key transport for sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KeyTransport {
    #[serde(rename = "rsa-pkcs1")]
    RsaPkcs1,
    #[serde(rename = "rsa-oaep")]
    RsaOaep,
}

impl FromStr for KeyTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rsa-pkcs1" | "pkcs1" | "rsa" => Ok(KeyTransport::RsaPkcs1),
            "rsa-oaep" | "oaep" => Ok(KeyTransport::RsaOaep),
            _ => Err(format!(
                "unknown key transport {s:?}: use rsa-pkcs1 or rsa-oaep"
            )),
        }
    }
}

/// Signing digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SigningDigest {
    #[serde(rename = "sha-256")]
    Sha256,
    #[serde(rename = "sha-384")]
    Sha384,
    #[serde(rename = "sha-512")]
    Sha512,
}

impl SigningDigest {
    fn openssl(self) -> MessageDigest {
        match self {
            SigningDigest::Sha256 => MessageDigest::sha256(),
            SigningDigest::Sha384 => MessageDigest::sha384(),
            SigningDigest::Sha512 => MessageDigest::sha512(),
        }
    }

    /// The `micalg` parameter (RFC 5751 §3.4.3.2 spelling).
    pub fn micalg(self) -> &'static str {
        match self {
            SigningDigest::Sha256 => "sha-256",
            SigningDigest::Sha384 => "sha-384",
            SigningDigest::Sha512 => "sha-512",
        }
    }
}

impl FromStr for SigningDigest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('-', "").as_str() {
            "sha256" => Ok(SigningDigest::Sha256),
            "sha384" => Ok(SigningDigest::Sha384),
            "sha512" => Ok(SigningDigest::Sha512),
            _ => Err(format!(
                "unknown or forbidden digest {s:?}: use sha-256, sha-384 or sha-512"
            )),
        }
    }
}

/// Wraps an RFC 5322 message as a `message/rfc822` entity, in canonical CRLF.
pub fn wrap(message: &[u8]) -> Vec<u8> {
    let mut out = b"Content-Type: message/rfc822\r\n\r\n".to_vec();
    out.extend_from_slice(&to_crlf(message));
    out
}

/// Signs a MIME entity: returns a `multipart/signed` entity (headers and
/// body) whose first part is exactly `entity` (canonical CRLF).
pub fn sign(
    entity: &[u8],
    signer: &Credential,
    digest: SigningDigest,
) -> Result<Vec<u8>, SmimeError> {
    let content = to_crlf(entity);
    let mut chain = Stack::new()?;
    for c in &signer.chain {
        chain.push(c.clone())?;
    }
    let cms = ffi::sign_detached(
        &content,
        &signer.cert,
        &signer.key,
        &chain,
        digest.openssl(),
    )?;
    let der = cms.to_der()?;
    let boundary = mime::new_boundary();
    let mut out = Vec::with_capacity(content.len() + der.len() * 2 + 512);
    out.extend_from_slice(
        format!(
            "Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg={}; boundary=\"{boundary}\"\r\n\r\n",
            digest.micalg()
        )
        .as_bytes(),
    );
    out.extend_from_slice(b"This is an S/MIME signed message.\r\n");
    out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
    out.extend_from_slice(&content);
    out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
    out.extend_from_slice(
        b"Content-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7s\"\r\n\r\n",
    );
    mime::encode_base64_lines_into(&der, &mut out);
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Ok(out)
}

/// Encrypts a MIME entity to every certificate: returns the DER EnvelopedData.
pub fn encrypt(
    entity: &[u8],
    recipients: &[X509],
    cipher: ContentCipher,
    transport: KeyTransport,
) -> Result<Vec<u8>, SmimeError> {
    let cms = ffi::encrypt(
        entity,
        recipients,
        cipher.openssl(),
        transport == KeyTransport::RsaOaep,
    )?;
    Ok(cms.to_der()?)
}

/// The MIME headers of an enveloped-data body, followed by the base64 body.
pub fn enveloped_entity(der: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    enveloped_entity_into(der, &mut out);
    out
}

/// [`enveloped_entity`] appended to `out` (no intermediate copy).
pub fn enveloped_entity_into(der: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=\"smime.p7m\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7m\"\r\n\r\n");
    mime::encode_base64_lines_into(der, out);
}

/// What kind of encryption an incoming message used.
#[derive(Clone, Debug, Serialize)]
pub struct EnvelopeInfo {
    /// `enveloped-data` or `authEnveloped-data`.
    pub structure: String,
    /// e.g. `aes-256-cbc`, `id-aes256-GCM`.
    pub content_cipher: String,
    /// Key transport algorithm of each recipient (`rsaEncryption`, `rsaesOaep`).
    pub key_transport: Vec<String>,
    /// `application/pkcs7-mime` or `application/x-pkcs7-mime`.
    pub media_type: String,
}

/// An encrypted message, parsed.
pub struct Encrypted {
    pub cms: CmsContentInfo,
    pub info: EnvelopeInfo,
}

fn nid_name(nid: Nid) -> String {
    nid.short_name()
        .map(str::to_string)
        .unwrap_or_else(|_| format!("nid {}", nid.as_raw()))
}

const AUTH_ENVELOPED_SN: &str = "id-smime-ct-authEnvelopedData";

/// Parses an encrypted message or entity (its Content-Type must be
/// application/(x-)pkcs7-mime).
pub fn parse_encrypted(message: &[u8]) -> Result<Encrypted, SmimeError> {
    let entity = Entity::parse(message)?;
    let ct = entity.content_type();
    if !(ct.is("application/pkcs7-mime") || ct.is("application/x-pkcs7-mime")) {
        return Err(SmimeError::NotEncrypted(ct.mime_type));
    }
    if let Some(t) = ct.param("smime-type") {
        let t = t.to_ascii_lowercase();
        if t == "signed-data" || t == "certs-only" {
            return Err(SmimeError::NotEncrypted(format!(
                "{}; smime-type={t}",
                ct.mime_type
            )));
        }
    }
    let der = entity.decoded_body()?;
    let cms = CmsContentInfo::from_der(&der).map_err(|e| SmimeError::BadCms(openssl_reason(&e)))?;
    let ctype = ffi::content_type(&cms);
    let structure = if ctype == Nid::PKCS7_ENVELOPED {
        "enveloped-data"
    } else if ctype.short_name().ok() == Some(AUTH_ENVELOPED_SN) {
        "authEnveloped-data"
    } else if ctype == Nid::PKCS7_SIGNED {
        return Err(SmimeError::NotEncrypted(format!(
            "{} carrying signed-data",
            ct.mime_type
        )));
    } else {
        return Err(SmimeError::NotEnveloped(nid_name(ctype)));
    };
    // Re-encoding gives definite-length DER even when the sender used BER.
    let content_cipher = cms
        .to_der()
        .ok()
        .and_then(|d| der_walk::content_encryption_oid(&d))
        .map(|oid| oid_name(&oid))
        .unwrap_or_else(|| "unknown".into());
    let key_transport = ffi::key_transport_recipients(&cms, None)
        .into_iter()
        .map(|(nid, _)| nid_name(nid))
        .collect();
    Ok(Encrypted {
        cms,
        info: EnvelopeInfo {
            structure: structure.into(),
            content_cipher,
            key_transport,
            media_type: ct.mime_type,
        },
    })
}

fn oid_name(oid: &str) -> String {
    openssl::asn1::Asn1Object::from_str(oid)
        .ok()
        .and_then(|o| o.nid().short_name().ok().map(str::to_string))
        .unwrap_or_else(|| oid.to_string())
}

impl Encrypted {
    /// Whether `cert` is one of the key transport recipients.
    pub fn is_recipient(&self, cert: &X509) -> bool {
        ffi::key_transport_recipients(&self.cms, Some(cert))
            .iter()
            .any(|(_, matches)| *matches)
    }

    pub fn recipient_count(&self) -> usize {
        ffi::key_transport_recipients(&self.cms, None).len()
    }

    /// Decrypts with one credential (which must be a recipient).
    pub fn decrypt(&self, cred: &Credential) -> Result<Vec<u8>, SmimeError> {
        self.cms
            .decrypt(&cred.key, &cred.cert)
            .map_err(|e| SmimeError::DecryptFailed {
                subject: crate::trust::subject(&cred.cert),
                why: openssl_reason(&e),
            })
    }
}

/// A signed entity, parsed: the exact signed bytes and the SignedData.
pub struct Signed {
    pub cms: CmsContentInfo,
    /// The signed content (detached content, or the encapsulated one).
    pub content: Vec<u8>,
    pub detached: bool,
    pub micalg: Option<String>,
}

/// Parses `multipart/signed` or opaque `application/pkcs7-mime; smime-type=signed-data`.
pub fn parse_signed(entity_bytes: &[u8]) -> Result<Signed, SmimeError> {
    let entity = Entity::parse(entity_bytes)?;
    let ct = entity.content_type();
    if ct.is("multipart/signed") {
        let parts = entity.multipart_parts()?;
        if parts.len() != 2 {
            return Err(SmimeError::SignedParts(parts.len()));
        }
        let sig = Entity::parse(parts[1])?;
        let sig_ct = sig.content_type();
        if !(sig_ct.is("application/pkcs7-signature") || sig_ct.is("application/x-pkcs7-signature"))
        {
            return Err(SmimeError::BadSignature(format!(
                "second part is {}",
                sig_ct.mime_type
            )));
        }
        let der = sig.decoded_body()?;
        let cms = CmsContentInfo::from_der(&der)
            .map_err(|e| SmimeError::BadSignature(openssl_reason(&e)))?;
        if ffi::content_type(&cms) != Nid::PKCS7_SIGNED {
            return Err(SmimeError::BadSignature(format!(
                "it is {}",
                nid_name(ffi::content_type(&cms))
            )));
        }
        return Ok(Signed {
            cms,
            content: parts[0].to_vec(),
            detached: true,
            micalg: ct.param("micalg").map(str::to_string),
        });
    }
    if (ct.is("application/pkcs7-mime") || ct.is("application/x-pkcs7-mime"))
        && ct
            .param("smime-type")
            .map(|t| t.eq_ignore_ascii_case("signed-data"))
            .unwrap_or(true)
    {
        let der = entity.decoded_body()?;
        if let Ok(cms) = CmsContentInfo::from_der(&der) {
            if ffi::content_type(&cms) == Nid::PKCS7_SIGNED {
                return Ok(Signed {
                    cms,
                    content: Vec::new(),
                    detached: false,
                    micalg: None,
                });
            }
        }
    }
    Err(SmimeError::NotSigned(ct.mime_type))
}

/// The outcome of a cryptographically valid signature.
pub struct Verified {
    pub signers: Vec<SignerResult>,
    /// Every certificate the SignedData carries (possible intermediates).
    pub certificates: Vec<X509>,
    /// The signed content.
    pub content: Vec<u8>,
}

/// One SignerInfo whose signature verified.
pub struct SignerResult {
    pub cert: X509,
    pub digest: Nid,
    pub signature_algorithm: Nid,
}

impl Signed {
    /// Verifies the signatures cryptographically (not trust). Returns each
    /// signer with its algorithms, the certificates carried, and the content.
    pub fn verify(&mut self) -> Result<Verified, SmimeError> {
        let flags = CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY;
        let mut out = Vec::new();
        let result = if self.detached {
            let first = self
                .cms
                .verify(None, None, Some(&self.content), None, flags);
            if first.is_err()
                && self
                    .content
                    .windows(2)
                    .any(|w| w[1] == b'\n' && w[0] != b'\r')
            {
                // Some relays turn CRLF into LF; the signature was made over CRLF.
                let canonical = to_crlf(&self.content).into_owned();
                let again = self.cms.verify(None, None, Some(&canonical), None, flags);
                if again.is_ok() {
                    self.content = canonical;
                }
                again.or(first)
            } else {
                first
            }
        } else {
            self.cms.verify(None, None, None, Some(&mut out), flags)
        };
        if let Err(e) = result {
            let text = openssl_reason(&e);
            if text.contains("signer certificate not found") {
                return Err(SmimeError::NoSignerCertificate);
            }
            return Err(SmimeError::SignatureInvalid(text));
        }
        if !self.detached {
            self.content = out;
        }
        let certs = ffi::signers(&self.cms);
        let algs = ffi::signer_algorithms(&self.cms);
        if certs.is_empty() {
            return Err(SmimeError::NoSignerCertificate);
        }
        let signers = certs
            .into_iter()
            .zip(algs)
            .map(|(cert, (digest, signature_algorithm))| SignerResult {
                cert,
                digest,
                signature_algorithm,
            })
            .collect();
        Ok(Verified {
            signers,
            certificates: ffi::certificates(&self.cms),
            content: self.content.clone(),
        })
    }

    /// Digest algorithms of each SignerInfo, readable before verification.
    pub fn digests(&self) -> Vec<Nid> {
        ffi::signer_algorithms(&self.cms)
            .into_iter()
            .map(|(d, _)| d)
            .collect()
    }
}

/// Just enough DER to find an EnvelopedData's content-encryption algorithm,
/// which OpenSSL does not expose.
mod der_walk {
    /// (tag, content, rest)
    fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *data.first()?;
        let first = *data.get(1)?;
        let (len, header) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *data.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let end = header.checked_add(len)?;
        if end > data.len() {
            return None;
        }
        Some((tag, &data[header..end], &data[end..]))
    }

    fn oid_text(bytes: &[u8]) -> Option<String> {
        let mut parts = Vec::new();
        let mut value: u64 = 0;
        for (i, b) in bytes.iter().enumerate() {
            value = (value << 7) | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                if parts.is_empty() {
                    let first = if value < 80 { value / 40 } else { 2 };
                    parts.push(first);
                    parts.push(value - first * 40);
                } else {
                    parts.push(value);
                }
                value = 0;
            } else if i == bytes.len() - 1 {
                return None;
            }
        }
        Some(
            parts
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("."),
        )
    }

    /// ContentInfo → [0] → (Auth)EnvelopedData → (Auth)EncryptedContentInfo → algorithm OID.
    pub fn content_encryption_oid(der: &[u8]) -> Option<String> {
        let (_, content_info, _) = tlv(der)?;
        let (_, _oid, rest) = tlv(content_info)?;
        let (_, explicit, _) = tlv(rest)?;
        let (_, enveloped, _) = tlv(explicit)?;
        let (_, _version, mut rest) = tlv(enveloped)?;
        loop {
            let (tag, body, next) = tlv(rest)?;
            rest = next;
            if tag == 0x30 {
                let (_, _ctype, after) = tlv(body)?;
                let (_, alg, _) = tlv(after)?;
                let (tag, oid, _) = tlv(alg)?;
                return if tag == 0x06 { oid_text(oid) } else { None };
            }
        }
    }
}
