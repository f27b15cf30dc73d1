//! Opening: decrypt, verify, judge trust, unwrap, check the envelope.

use super::{Agent, AgentError, LocalDomain, PrivateCredential};
use crate::address::DirectAddress;
use crate::smime::{self, mime, EnvelopeInfo, SmimeError};
use crate::trust::{self, Binding, CertSummary, Direction, KeyUse, TrustPath};
use mail_parser::MessageParser;
use serde::Serialize;

/// What to open.
pub struct OpenRequest<'a> {
    pub message: &'a [u8],
    /// SMTP MAIL FROM: `None` when there is no envelope to check, `Some("")`
    /// for the null reverse-path.
    pub mail_from: Option<String>,
    /// SMTP RCPT TO addresses (empty when there is no envelope).
    pub rcpt_to: Vec<DirectAddress>,
    /// Unix seconds at which validity is judged.
    pub at: i64,
}

#[derive(Debug, Serialize)]
pub struct SignerReport {
    pub certificate: CertSummary,
    pub key: String,
    pub digest: String,
    pub signature_algorithm: String,
    pub binding: Binding,
    pub trust: TrustPath,
}

/// What opening found.
#[derive(Debug, Serialize)]
pub struct OpenReport {
    pub domain: String,
    pub decrypted_with: CertSummary,
    pub envelope: EnvelopeInfo,
    pub micalg: Option<String>,
    pub signer: SignerReport,
    pub wrapped: bool,
    pub from: String,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub warnings: Vec<String>,
}

pub struct Opened {
    /// The protected message, unwrapped (what the recipient reads).
    pub message: Vec<u8>,
    pub report: OpenReport,
    /// The accepted signer's certificate and the certificates the signature
    /// carried (for revocation checks, which need the network).
    pub signer_certificate: openssl::x509::X509,
    pub carried: Vec<openssl::x509::X509>,
}

fn addresses(list: Option<&mail_parser::Address<'_>>) -> Vec<DirectAddress> {
    list.map(|l| {
        l.iter()
            .filter_map(|a| a.address())
            .filter_map(|a| DirectAddress::parse(a).ok())
            .collect()
    })
    .unwrap_or_default()
}

/// The unwrapped message: for a wrapped one the message/rfc822 body; else the
/// outer headers (less its MIME ones) around the signed entity.
/// A wrapped message is cut out of `signed_content` in place.
fn unwrap(outer: &[u8], mut signed_content: Vec<u8>) -> Result<(Vec<u8>, bool), AgentError> {
    let entity = mime::Entity::parse(&signed_content)?;
    if entity.content_type().is("message/rfc822") {
        let base64 = entity
            .header("Content-Transfer-Encoding")
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("base64"));
        if base64 {
            return Ok((entity.decoded_body()?, true));
        }
        let start = entity.body.as_ptr() as usize - signed_content.as_ptr() as usize;
        signed_content.drain(..start);
        return Ok((signed_content, true));
    }
    let outer_entity = mime::Entity::parse(outer)?;
    let mut out = Vec::with_capacity(outer.len() / 2 + signed_content.len());
    for h in &outer_entity.headers {
        let lower = h.name.to_ascii_lowercase();
        if !lower.starts_with("content-") {
            out.extend_from_slice(&h.raw);
        }
    }
    out.extend_from_slice(&signed_content);
    Ok((out, false))
}

/// "signed but not encrypted" is worth saying.
fn not_encrypted_hint(e: SmimeError) -> SmimeError {
    match e {
        SmimeError::NotEncrypted(ct) => {
            let hint = if ct.contains("signed") {
                ", signed but not encrypted"
            } else {
                ""
            };
            SmimeError::NotEncrypted(format!("{ct}{hint}"))
        }
        e => e,
    }
}

impl Agent {
    /// Opens a message for the local domain of its recipients (RCPT TO, or
    /// the To/Cc headers when there is no envelope). Recipients in several
    /// local domains are opened with the first one's keys and anchors: the
    /// SMTP layer opens once per domain.
    pub fn open(&self, req: OpenRequest<'_>) -> Result<Opened, AgentError> {
        let recipients: Vec<DirectAddress> = if req.rcpt_to.is_empty() {
            // Without an envelope the headers name the recipients: they must parse.
            mime::Entity::parse(req.message)?;
            let parsed = MessageParser::default().parse_headers(req.message);
            let mut all = addresses(parsed.as_ref().and_then(|m| m.to()));
            all.extend(addresses(parsed.as_ref().and_then(|m| m.cc())));
            all
        } else {
            req.rcpt_to.clone()
        };
        let domain = recipients
            .iter()
            .find_map(|r| self.domain(r.domain()))
            .ok_or_else(|| {
                AgentError::NoLocalRecipient(if recipients.is_empty() {
                    "the message names no recipient in To or Cc".into()
                } else {
                    recipients
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
            })?;
        self.open_for_domain(domain, req)
    }

    /// Opens with the keys and anchors of `domain`.
    pub fn open_for_domain(
        &self,
        domain: &LocalDomain,
        req: OpenRequest<'_>,
    ) -> Result<Opened, AgentError> {
        let encrypted = smime::parse_encrypted(req.message).map_err(not_encrypted_hint)?;
        self.open_encrypted(domain, encrypted, req.message, req)
    }

    /// [`Agent::open_for_domain`] of a message the caller gives up (what
    /// `req.message` would be; that field is not read): it is dropped as
    /// soon as its body is decoded, keeping only its header section, so a
    /// large message is not in memory beside its decryption.
    pub fn open_owned_for_domain(
        &self,
        domain: &LocalDomain,
        message: Vec<u8>,
        req: OpenRequest<'_>,
    ) -> Result<Opened, AgentError> {
        let (encrypted, headers) =
            smime::parse_encrypted_owned(message).map_err(not_encrypted_hint)?;
        self.open_encrypted(domain, encrypted, &headers, req)
    }

    /// The rest of opening, once parsed: `outer` is the message, or at
    /// least its header section (the unwrapped message's headers come from
    /// it when the sender did not wrap).
    fn open_encrypted(
        &self,
        domain: &LocalDomain,
        encrypted: smime::Encrypted,
        outer: &[u8],
        req: OpenRequest<'_>,
    ) -> Result<Opened, AgentError> {
        let mut warnings = Vec::new();

        // Choose the private key: address-bound, then domain-bound, then any.
        let local_rcpts: Vec<&DirectAddress> = req
            .rcpt_to
            .iter()
            .filter(|r| r.domain() == domain.name)
            .collect();
        let mut candidates: Vec<&PrivateCredential> = Vec::new();
        for r in &local_rcpts {
            for c in domain.credentials_for(r, true) {
                if !candidates.iter().any(|x| std::ptr::eq(*x, c)) {
                    candidates.push(c);
                }
            }
        }
        if local_rcpts.is_empty() {
            candidates.extend(domain.credentials.iter());
        }
        if candidates.is_empty() {
            return Err(AgentError::NoDecryptionKey {
                domain: domain.name.clone(),
            });
        }
        let key = candidates
            .iter()
            .find(|c| encrypted.is_recipient(&c.credential.cert))
            .ok_or(SmimeError::NotForUs {
                tried: candidates.len(),
                recipients: encrypted.recipient_count(),
            })?;
        // Each large buffer goes as soon as the next exists: the encrypted
        // structure once decrypted, the decrypted entity becomes the signed
        // content in place, and that the unwrapped message.
        let decrypted = encrypted.decrypt(&key.credential)?;
        let envelope = encrypted.info.clone();
        drop(encrypted);

        let mut signed = smime::parse_signed_owned(decrypted)?;
        let micalg = signed.micalg.clone();
        // The digest rule comes first: a SHA-1 signature is refused whatever else holds.
        let digests = signed.digests();
        if !digests.iter().any(|d| trust::check_digest(*d).is_ok()) {
            let first = digests.first().copied().unwrap_or(openssl::nid::Nid::UNDEF);
            let err =
                trust::check_digest(first)
                    .err()
                    .unwrap_or(trust::TrustError::ForbiddenDigest(
                        "none (no SignerInfo)".into(),
                    ));
            return Err(AgentError::Digest(err));
        }
        let smime::Verified {
            signers,
            certificates: carried,
            content,
        } = signed.verify()?;
        drop(signed);
        let (inner, wrapped) = unwrap(outer, content)?;
        if !wrapped {
            warnings.push(
                "the message is not wrapped: its outer headers are not protected by the signature"
                    .into(),
            );
        }

        let parsed = MessageParser::default().parse_headers(&inner);
        let from_list = addresses(parsed.as_ref().and_then(|m| m.from()));
        let from = from_list
            .first()
            .cloned()
            .ok_or_else(|| AgentError::NoFrom("no From header with an address".into()))?;
        if let Some(m) = &micalg {
            let spelled = m.to_ascii_lowercase().replace('-', "");
            let actual: Vec<String> = signers
                .iter()
                .filter_map(|s| s.digest.short_name().ok())
                .map(|n| n.to_ascii_lowercase().replace('-', ""))
                .collect();
            if !actual.contains(&spelled) {
                warnings.push(format!(
                    "micalg={m} does not name the digest actually used ({})",
                    actual.join(", ")
                ));
            }
        }

        // A signer is accepted when every rule holds for it; the first
        // signer's failure is the reason given when none is accepted.
        let mut accepted = None;
        let mut first_error = None;
        for s in &signers {
            let result = (|| -> Result<SignerReport, AgentError> {
                trust::check_digest(s.digest).map_err(AgentError::Digest)?;
                let path = trust::validate(
                    &s.cert,
                    &carried,
                    &domain.incoming_anchors,
                    req.at,
                    &domain.name,
                    Direction::Incoming,
                )
                .map_err(AgentError::SignerTrust)?;
                let key = trust::check_key(&s.cert, KeyUse::Sign, self.settings.min_rsa_bits)
                    .map_err(AgentError::SignerKey)?;
                trust::check_key_usage(&s.cert, KeyUse::Sign).map_err(AgentError::SignerKey)?;
                let binding = trust::check_binding(&s.cert, &from, true)
                    .map_err(AgentError::SignerBinding)?;
                Ok(SignerReport {
                    certificate: CertSummary::of(&s.cert),
                    key,
                    digest: s.digest.short_name().unwrap_or("?").to_string(),
                    signature_algorithm: s
                        .signature_algorithm
                        .short_name()
                        .unwrap_or("?")
                        .to_string(),
                    binding,
                    trust: path,
                })
            })();
            match result {
                Ok(r) => {
                    accepted = Some((r, s.cert.clone()));
                    break;
                }
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                    } else {
                        warnings.push(format!("another signer was not accepted: {e}"));
                    }
                }
            }
        }
        let (signer, signer_certificate) = match (accepted, first_error) {
            (Some(s), Some(e)) => {
                warnings.push(format!("a signer was not accepted: {e}"));
                s
            }
            (Some(s), None) => s,
            (None, Some(e)) => return Err(e),
            (None, None) => return Err(SmimeError::NoSignerCertificate.into()),
        };

        // The envelope must agree with the protected headers.
        if let Some(mail_from) = &req.mail_from {
            if mail_from.trim().is_empty() || mail_from.trim() == "<>" {
                warnings.push("null envelope sender: sender check not applicable".into());
            } else {
                let envelope = DirectAddress::parse(mail_from)?;
                let mut allowed = from_list.clone();
                allowed.extend(addresses(parsed.as_ref().and_then(|m| m.sender())));
                if !allowed.contains(&envelope) {
                    return Err(AgentError::EnvelopeSender {
                        mail_from: envelope.to_string(),
                        from: from.to_string(),
                    });
                }
            }
        }
        if self.settings.require_rcpt_in_headers && !req.rcpt_to.is_empty() {
            let mut listed = addresses(parsed.as_ref().and_then(|m| m.to()));
            listed.extend(addresses(parsed.as_ref().and_then(|m| m.cc())));
            if let Some(missing) = req.rcpt_to.iter().find(|r| !listed.contains(r)) {
                return Err(AgentError::EnvelopeRecipient(missing.to_string()));
            }
        }

        let report = OpenReport {
            domain: domain.name.clone(),
            decrypted_with: CertSummary::of(&key.credential.cert),
            envelope,
            micalg,
            signer,
            wrapped,
            from: from.to_string(),
            message_id: parsed
                .as_ref()
                .and_then(|m| m.message_id())
                .map(|s| format!("<{s}>")),
            subject: parsed
                .as_ref()
                .and_then(|m| m.subject())
                .map(str::to_string),
            warnings,
        };
        Ok(Opened {
            message: inner,
            report,
            signer_certificate,
            carried,
        })
    }
}

impl OpenReport {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "trusted message from {} to domain {}\n",
            self.from, self.domain
        ));
        s.push_str(&format!(
            "  encryption: {} {} via {} ({}), decrypted with \"{}\"\n",
            self.envelope.structure,
            self.envelope.content_cipher,
            self.envelope.key_transport.join("/"),
            self.envelope.media_type,
            self.decrypted_with.subject
        ));
        s.push_str(&format!(
            "  signature:  {} with {} ({}), micalg={}\n",
            self.signer.digest,
            self.signer.signature_algorithm,
            self.signer.key,
            self.micalg.as_deref().unwrap_or("-")
        ));
        s.push_str(&format!(
            "  signer:     \"{}\", {}\n",
            self.signer.certificate.subject, self.signer.binding
        ));
        s.push_str(&format!(
            "  trust:      {} -> anchor \"{}\" ({})\n",
            self.signer.trust.chain.join(" -> "),
            self.signer.trust.anchor.subject,
            self.signer.trust.anchor_source
        ));
        s.push_str(&format!(
            "  message:    {} {}, subject {:?}\n",
            if self.wrapped { "wrapped" } else { "unwrapped" },
            self.message_id.as_deref().unwrap_or("(no Message-ID)"),
            self.subject.as_deref().unwrap_or("")
        ));
        for w in &self.warnings {
            s.push_str(&format!("  warning:    {w}\n"));
        }
        s
    }
}
