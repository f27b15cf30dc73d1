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

/// The header of the `message/rfc822` entity that wraps a message.
pub const WRAPPER_HEADER: &[u8] = b"Content-Type: message/rfc822\r\n\r\n";

/// Wraps an RFC 5322 message as a `message/rfc822` entity, in canonical CRLF.
pub fn wrap(message: &[u8]) -> Vec<u8> {
    let mut out = WRAPPER_HEADER.to_vec();
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
    let signed = SignedFrame::sign(&[&content], signer, digest)?;
    let mut out = Vec::with_capacity(signed.head.len() + content.len() + signed.tail.len());
    out.extend_from_slice(&signed.head);
    out.extend_from_slice(&content);
    out.extend_from_slice(&signed.tail);
    Ok(out)
}

/// A `multipart/signed` entity without its first part: `head`, then the
/// signed content, then `tail` (the signature part and the closing
/// boundary) make the whole entity. Large content is never copied into it.
pub struct SignedFrame {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
}

impl SignedFrame {
    /// Signs the concatenation of `pieces` (canonical CRLF: the bytes are
    /// signed as they are).
    pub fn sign(
        pieces: &[&[u8]],
        signer: &Credential,
        digest: SigningDigest,
    ) -> Result<SignedFrame, SmimeError> {
        let mut chain = Stack::new()?;
        for c in &signer.chain {
            chain.push(c.clone())?;
        }
        let cms =
            ffi::sign_detached_pieces(pieces, &signer.cert, &signer.key, &chain, digest.openssl())?;
        let der = cms.to_der()?;
        let boundary = mime::new_boundary();
        let head = format!(
            "Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg={}; boundary=\"{boundary}\"\r\n\r\nThis is an S/MIME signed message.\r\n--{boundary}\r\n",
            digest.micalg()
        )
        .into_bytes();
        let mut tail = Vec::with_capacity(der.len() * 2 + 256);
        tail.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        tail.extend_from_slice(
            b"Content-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7s\"\r\n\r\n",
        );
        mime::encode_base64_lines_into(&der, &mut tail);
        tail.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Ok(SignedFrame { head, tail })
    }
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

/// Encrypts the entity made of `pieces` (in order) to every certificate and
/// appends the `application/pkcs7-mime` entity, headers and base64 body, to
/// `out`. Streams: the EnvelopedData is BER (indefinite lengths, as S/MIME
/// allows and OpenSSL's own streaming writes) and is base64-encoded as it is
/// made, so the memory it takes beyond `out` is a few buffers of 64 KiB
/// whatever the size of the entity.
pub fn encrypt_entity_into(
    pieces: &[&[u8]],
    recipients: &[X509],
    cipher: ContentCipher,
    transport: KeyTransport,
    out: &mut Vec<u8>,
) -> Result<(), SmimeError> {
    let content: usize = pieces.iter().map(|p| p.len()).sum();
    // Content rounded up to the cipher block, the recipient infos, and the
    // BER headers of each 64 KiB chunk, base64 in lines of 76 + CRLF.
    let ber = content + 16 + recipients.len() * 600 + 512 + content / 4096;
    out.reserve(ENVELOPED_HEADERS.len() + ber.div_ceil(57) * 78);
    out.extend_from_slice(ENVELOPED_HEADERS);
    let mut lines = mime::Base64Lines::new(out);
    ffi::encrypt_streaming(
        pieces,
        recipients,
        cipher.openssl(),
        transport == KeyTransport::RsaOaep,
        &mut |chunk| lines.write(chunk),
    )?;
    lines.finish();
    Ok(())
}

const ENVELOPED_HEADERS: &[u8] = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=\"smime.p7m\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7m\"\r\n\r\n";

/// The MIME headers of an enveloped-data body, followed by the base64 body.
pub fn enveloped_entity(der: &[u8]) -> Vec<u8> {
    let mut out = ENVELOPED_HEADERS.to_vec();
    mime::encode_base64_lines_into(der, &mut out);
    out
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
    /// The size of the encoded structure: the content is no longer.
    size_hint: usize,
    /// For a large message, the encrypted content, kept out of `cms` (see
    /// [`DETACH_ABOVE`]): the buffer and where in it the content lies.
    detached: Option<(Vec<u8>, std::ops::Range<usize>)>,
}

/// Structures larger than this are parsed without their encrypted content,
/// which is decrypted straight from the received buffer: OpenSSL would copy
/// it, and a chunked (BER) content it joins by growing a buffer, briefly
/// holding it twice more (a 100 MB message peaked at 2.6 times its size).
const DETACH_ABOVE: usize = 1 << 20;

fn nid_name(nid: Nid) -> String {
    nid.short_name()
        .map(str::to_string)
        .unwrap_or_else(|_| format!("nid {}", nid.as_raw()))
}

use ffi::AUTH_ENVELOPED_SN;

/// Parses an encrypted message or entity (its Content-Type must be
/// application/(x-)pkcs7-mime).
pub fn parse_encrypted(message: &[u8]) -> Result<Encrypted, SmimeError> {
    let entity = encrypted_entity(message)?;
    parse_enveloped(entity.decoded_body()?, entity.content_type().mime_type)
}

/// [`parse_encrypted`] of a message the caller gives up: it is dropped once
/// its body is decoded, so the message, its decoding and the parsed
/// structure are never all in memory. Also returns the message's header
/// section (its headers and the empty line).
pub fn parse_encrypted_owned(mut message: Vec<u8>) -> Result<(Encrypted, Vec<u8>), SmimeError> {
    // The body is decoded where it lies: the received message and its
    // decoding are never both held whole.
    let (body, base64, media_type) = {
        let entity = encrypted_entity(&message)?;
        let at = entity.body.as_ptr() as usize - message.as_ptr() as usize;
        (
            at..at + entity.body.len(),
            entity.is_base64(),
            entity.content_type().mime_type,
        )
    };
    let headers = message[..body.start].to_vec();
    if base64 {
        mime::decode_base64_in_place(&mut message, body)?;
    } else {
        message.truncate(body.end);
        message.drain(..body.start);
    }
    Ok((parse_enveloped(message, media_type)?, headers))
}

/// The entity of an encrypted message: refuses anything else.
fn encrypted_entity(message: &[u8]) -> Result<Entity<'_>, SmimeError> {
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
    Ok(entity)
}

/// The (Auth)EnvelopedData in `der`, which is dropped once parsed (or, when
/// large, kept for its encrypted content).
fn parse_enveloped(mut der: Vec<u8>, media_type: String) -> Result<Encrypted, SmimeError> {
    let split = match der.len() > DETACH_ABOVE {
        true => der_walk::detach_encrypted_content(&mut der),
        false => None,
    };
    // The cipher is read from the sender's own encoding (DER or BER):
    // re-encoding would copy the whole encrypted content once more.
    let cipher_of = |der: &[u8]| {
        der_walk::content_encryption_oid(der)
            .map(|oid| oid_name(&oid))
            .unwrap_or_else(|| "unknown".into())
    };
    let parse = |der: &[u8]| {
        CmsContentInfo::from_der(der).map_err(|e| SmimeError::BadCms(openssl_reason(&e)))
    };
    let (cms, content_cipher, detached, size_hint) = match split {
        Some((small, range)) => {
            let size = range.len();
            (parse(&small)?, cipher_of(&small), Some((der, range)), size)
        }
        None => (parse(&der)?, cipher_of(&der), None, der.len()),
    };
    let ctype = ffi::content_type(&cms);
    let structure = if ctype == Nid::PKCS7_ENVELOPED {
        "enveloped-data"
    } else if ctype.short_name().ok() == Some(AUTH_ENVELOPED_SN) {
        "authEnveloped-data"
    } else if ctype == Nid::PKCS7_SIGNED {
        return Err(SmimeError::NotEncrypted(format!(
            "{media_type} carrying signed-data"
        )));
    } else {
        return Err(SmimeError::NotEnveloped(nid_name(ctype)));
    };
    let key_transport = ffi::key_transport_recipients(&cms, None)
        .into_iter()
        .map(|(nid, _)| nid_name(nid))
        .collect();
    Ok(Encrypted {
        cms,
        size_hint,
        detached,
        info: EnvelopeInfo {
            structure: structure.into(),
            content_cipher,
            key_transport,
            media_type,
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
        let detached = self
            .detached
            .as_ref()
            .map(|(buf, range)| &buf[range.clone()]);
        ffi::decrypt(&self.cms, &cred.key, &cred.cert, detached, self.size_hint).map_err(|e| {
            SmimeError::DecryptFailed {
                subject: crate::trust::subject(&cred.cert),
                why: openssl_reason(&e),
            }
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
    parse_signed_owned(entity_bytes.to_vec())
}

/// [`parse_signed`] of an entity the caller gives up: the signed content
/// is cut out of it in place rather than copied.
pub fn parse_signed_owned(mut entity_bytes: Vec<u8>) -> Result<Signed, SmimeError> {
    let (mut signed, range) = parse_signed_in(&entity_bytes)?;
    if let Some((start, end)) = range {
        entity_bytes.truncate(end);
        entity_bytes.drain(..start);
        signed.content = entity_bytes;
    }
    Ok(signed)
}

/// The SignedData, and where in `entity_bytes` the detached content is.
type SignedIn = (Signed, Option<(usize, usize)>);

fn parse_signed_in(entity_bytes: &[u8]) -> Result<SignedIn, SmimeError> {
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
        // The part is a slice of entity_bytes.
        let start = parts[0].as_ptr() as usize - entity_bytes.as_ptr() as usize;
        let signed = Signed {
            cms,
            content: Vec::new(),
            detached: true,
            micalg: ct.param("micalg").map(str::to_string),
        };
        return Ok((signed, Some((start, start + parts[0].len()))));
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
                let signed = Signed {
                    cms,
                    content: Vec::new(),
                    detached: false,
                    micalg: None,
                };
                return Ok((signed, None));
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
    /// signer with its algorithms, the certificates carried, and the content
    /// (moved out: `self.content` is empty afterwards).
    pub fn verify(&mut self) -> Result<Verified, SmimeError> {
        let flags = CMSOptions::NO_SIGNER_CERT_VERIFY | CMSOptions::BINARY;
        let mut out = Vec::new();
        let result = if self.detached {
            let verify = |cms: &CmsContentInfo, content: &[u8]| {
                ffi::verify_detached(cms, content, flags.bits())
            };
            let first = verify(&self.cms, &self.content);
            if first.is_err()
                && self
                    .content
                    .windows(2)
                    .any(|w| w[1] == b'\n' && w[0] != b'\r')
            {
                // Some relays turn CRLF into LF; the signature was made over CRLF.
                let canonical = to_crlf(&self.content).into_owned();
                let again = verify(&self.cms, &canonical);
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
            content: std::mem::take(&mut self.content),
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
    /// (tag, content, rest). An indefinite length (BER, as streaming
    /// senders write) runs to its end-of-contents octets, which are in
    /// neither content nor rest.
    fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        tlv_at(data, 0)
    }

    /// Constructed values nested deeper than this are refused (each level
    /// of indefinite length recurses once).
    const MAX_DEPTH: usize = 32;

    fn tlv_at(data: &[u8], depth: usize) -> Option<(u8, &[u8], &[u8])> {
        let tag = *data.first()?;
        let first = *data.get(1)?;
        if tag & 0x1f == 0x1f || depth > MAX_DEPTH {
            // High tag numbers do not occur in CMS.
            return None;
        }
        if first == 0x80 {
            if tag & 0x20 == 0 {
                return None;
            }
            let body = &data[2..];
            let mut rest = body;
            while !rest.starts_with(&[0, 0]) {
                rest = tlv_at(rest, depth + 1)?.2;
            }
            return Some((tag, &body[..body.len() - rest.len()], &rest[2..]));
        }
        let (len, header) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n > 4 {
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

    /// A node's place in a buffer: where its header starts, where its
    /// content starts and ends, and where it ends (after the end-of-contents
    /// octets when its length is indefinite).
    #[derive(Clone, Copy, Debug)]
    struct Node {
        tag: u8,
        start: usize,
        content: usize,
        content_end: usize,
        end: usize,
        indefinite: bool,
    }

    fn node_at(data: &[u8], start: usize) -> Option<Node> {
        let at = data.get(start..)?;
        let (tag, body, rest) = tlv(at)?;
        let content = body.as_ptr() as usize - data.as_ptr() as usize;
        let indefinite = at.get(1) == Some(&0x80);
        let content_end = content + body.len();
        Some(Node {
            tag,
            start,
            content,
            content_end,
            end: data.len() - rest.len(),
            indefinite,
        })
    }

    /// The children of `parent`, in order.
    fn children(data: &[u8], parent: &Node) -> Option<Vec<Node>> {
        let mut out = Vec::new();
        let mut at = parent.content;
        while at < parent.content_end {
            let n = node_at(&data[..parent.content_end], at)?;
            at = n.end;
            out.push(n);
        }
        Some(out)
    }

    fn header(tag: u8, len: Option<usize>) -> Vec<u8> {
        let mut h = vec![tag];
        match len {
            None => h.push(0x80),
            Some(l) if l < 0x80 => h.push(l as u8),
            Some(l) => {
                let bytes = (l as u64).to_be_bytes();
                let skip = bytes.iter().take_while(|b| **b == 0).count();
                h.push(0x80 | (8 - skip) as u8);
                h.extend_from_slice(&bytes[skip..]);
            }
        }
        h
    }

    /// `node` re-encoded with `inner` (a child) replaced by `replacement`.
    fn rebuild(data: &[u8], node: &Node, inner: &Node, replacement: &[u8]) -> Vec<u8> {
        let mut content = data[node.content..inner.start].to_vec();
        content.extend_from_slice(replacement);
        content.extend_from_slice(&data[inner.end..node.content_end]);
        let mut out = header(node.tag, (!node.indefinite).then_some(content.len()));
        out.extend_from_slice(&content);
        if node.indefinite {
            out.extend_from_slice(&[0, 0]);
        }
        out
    }

    /// Takes the encrypted content out of an (Auth)EnvelopedData: returns
    /// the structure without it (as if the content were detached: a few
    /// hundred bytes to parse instead of the whole message) and the range
    /// of `buf` where the encrypted bytes now lie contiguously. A
    /// constructed (BER, chunked) content is joined in place. `None` when
    /// the structure is not one this understands; the caller then parses
    /// it whole.
    pub fn detach_encrypted_content(buf: &mut [u8]) -> Option<(Vec<u8>, std::ops::Range<usize>)> {
        let data: &[u8] = buf;
        let content_info = node_at(data, 0)?;
        let ci = children(data, &content_info)?;
        let explicit = *ci.get(1).filter(|n| n.tag == 0xa0)?;
        let enveloped = node_at(&data[..explicit.content_end], explicit.content)?;
        let eci = *children(data, &enveloped)?
            .iter()
            .skip(1)
            .find(|n| n.tag == 0x30)?;
        let parts = children(data, &eci)?;
        let encrypted = *parts.get(2)?;
        let pieces: Vec<std::ops::Range<usize>> = match encrypted.tag {
            0x80 => std::iter::once(encrypted.content..encrypted.content_end).collect(),
            0xa0 => children(data, &encrypted)?
                .iter()
                .map(|c| (c.tag == 0x04 && !c.indefinite).then_some(c.content..c.content_end))
                .collect::<Option<_>>()?,
            _ => return None,
        };
        let eci_new = rebuild(data, &eci, &encrypted, &[]);
        let enveloped_new = rebuild(data, &enveloped, &eci, &eci_new);
        let explicit_new = rebuild(data, &explicit, &enveloped, &enveloped_new);
        let small = rebuild(data, &content_info, &explicit, &explicit_new);
        // Join the pieces where the first begins: each moves left or stays.
        let start = pieces.first().map(|p| p.start).unwrap_or(encrypted.content);
        let mut end = start;
        for p in pieces {
            let len = p.end - p.start;
            buf.copy_within(p, end);
            end += len;
        }
        Some((small, start..end))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn identity() -> Credential {
        let ca = pki::new_ca("smime test CA", 2048).expect("ca");
        pki::issue(&ca, &pki::LeafSpec::address("a@smime.example")).expect("leaf")
    }

    #[test]
    fn the_cipher_is_read_from_der_and_streamed_ber() {
        let id = identity();
        let to = std::slice::from_ref(&id.cert);
        let entity = b"Content-Type: text/plain\r\n\r\nhello\r\n".repeat(5000);
        for cipher in [ContentCipher::Aes128Cbc, ContentCipher::Aes256Cbc] {
            let der = encrypt(&entity, to, cipher, KeyTransport::RsaPkcs1).expect("encrypt");
            let mut streamed = Vec::new();
            encrypt_entity_into(&[&entity], to, cipher, KeyTransport::RsaOaep, &mut streamed)
                .expect("stream");
            for message in [enveloped_entity(&der), streamed] {
                let parsed = parse_encrypted(&message).expect("parse");
                let name = serde_json::to_value(cipher).unwrap();
                assert_eq!(
                    parsed.info.content_cipher.to_ascii_lowercase(),
                    name.as_str().unwrap()
                );
                assert_eq!(parsed.decrypt(&id).expect("decrypt"), entity);
            }
        }
    }

    #[test]
    fn large_structures_decrypt_from_the_received_buffer_with_the_content_detached() {
        use openssl::cms::CMSOptions;
        let id = identity();
        let to = std::slice::from_ref(&id.cert);
        let mut entity = b"Content-Type: application/octet-stream\r\n\r\n".to_vec();
        entity.extend((0..2_500_000u32).map(|i| (i % 251) as u8));
        let der = encrypt(
            &entity,
            to,
            ContentCipher::Aes256Cbc,
            KeyTransport::RsaPkcs1,
        )
        .expect("encrypt");
        let mut streamed = Vec::new();
        encrypt_entity_into(
            &[&entity],
            to,
            ContentCipher::Aes128Cbc,
            KeyTransport::RsaOaep,
            &mut streamed,
        )
        .expect("stream");
        let mut certs = openssl::stack::Stack::new().unwrap();
        certs.push(id.cert.clone()).unwrap();
        let gcm = CmsContentInfo::encrypt(
            &certs,
            &entity,
            openssl::symm::Cipher::aes_256_gcm(),
            CMSOptions::BINARY,
        )
        .and_then(|c| c.to_der())
        .expect("AuthEnvelopedData");
        for (name, message) in [
            ("DER", enveloped_entity(&der)),
            ("streamed BER", streamed),
            ("AES-GCM", enveloped_entity(&gcm)),
        ] {
            let parsed = parse_encrypted(&message).expect(name);
            assert!(
                parsed.detached.is_some(),
                "{name}: parsed without its content"
            );
            assert_eq!(parsed.decrypt(&id).expect(name), entity, "{name}");
        }
        let tampered = {
            let mut g = gcm.clone();
            let middle = g.len() / 2;
            g[middle] ^= 1;
            enveloped_entity(&g)
        };
        let parsed = parse_encrypted(&tampered).expect("parses");
        assert!(parsed.detached.is_some());
        assert!(
            parsed.decrypt(&id).is_err(),
            "a changed byte fails the GCM tag"
        );

        // A structure without encrypted content, or content given twice.
        let mut whole = der.clone();
        let (small, range) = der_walk::detach_encrypted_content(&mut whole).expect("detach");
        let without = CmsContentInfo::from_der(&small).expect("small parses");
        assert!(ffi::decrypt(&without, &id.key, &id.cert, None, 0).is_err());
        let with = CmsContentInfo::from_der(&der).expect("parses");
        assert!(ffi::decrypt(&with, &id.key, &id.cert, Some(&whole[range.clone()]), 0).is_err());
        assert_eq!(
            ffi::decrypt(&without, &id.key, &id.cert, Some(&whole[range]), 0).expect("detached"),
            entity
        );
        assert!(der_walk::detach_encrypted_content(&mut [0x30, 0x80, 0x02, 0x01]).is_none());
        // Damaged structures: no panic, whatever comes back.
        let header_len = 1200.min(der.len());
        for i in 0..header_len {
            let mut damaged = der[..header_len + 300].to_vec();
            damaged[i] ^= 0x85;
            let _ = der_walk::detach_encrypted_content(&mut damaged);
            let mut cut = der[..i].to_vec();
            let _ = der_walk::detach_encrypted_content(&mut cut);
        }
    }

    #[test]
    fn hostile_ber_nesting_is_refused_without_recursing_far() {
        let deep = [0x30u8, 0x80].repeat(100_000);
        assert_eq!(der_walk::content_encryption_oid(&deep), None);
        // Unterminated and truncated indefinite lengths.
        for bad in [
            &[0x30u8, 0x80][..],
            &[0x30, 0x80, 0x02, 0x01],
            &[0x04, 0x80, 0, 0],
        ] {
            assert_eq!(der_walk::content_encryption_oid(bad), None, "{bad:02x?}");
        }
    }
}
