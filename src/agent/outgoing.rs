//! Sealing: check the recipients' certificates, wrap, sign, encrypt.

use super::{Agent, AgentError, LocalDomain, OuterSubject, PrivateCredential};
use crate::address::DirectAddress;
use crate::smime::{self, mime};
use crate::trust::{self, Binding, CertSummary, Direction, KeyUse, TrustError};
use openssl::x509::{X509Ref, X509};
use serde::Serialize;

/// What to seal.
pub struct SealRequest<'a> {
    pub from: DirectAddress,
    pub recipients: Vec<DirectAddress>,
    /// The original RFC 5322 message (LF or CRLF line ends).
    pub message: &'a [u8],
    /// Candidate certificates for the recipients (from discovery or files).
    pub recipient_certificates: Vec<X509>,
    /// Unix seconds at which validity is judged.
    pub at: i64,
}

#[derive(Debug, Serialize)]
pub struct RecipientReport {
    pub address: String,
    pub certificates: Vec<CertSummary>,
    pub bindings: Vec<Binding>,
    pub anchors: Vec<String>,
}

/// What sealing did.
#[derive(Debug, Serialize)]
pub struct SealReport {
    pub signer: CertSummary,
    pub signer_binding: Vec<Binding>,
    pub digest: String,
    pub cipher: String,
    pub key_transport: String,
    pub wrapped: bool,
    pub message_id: Option<String>,
    pub recipients: Vec<RecipientReport>,
    /// Recipient certificates that were given but not used, and why.
    pub warnings: Vec<String>,
}

pub struct Sealed {
    pub message: Vec<u8>,
    pub report: SealReport,
}

/// Headers copied to the outer message; the rest stay protected inside.
const OUTER_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
];

/// A recipient, its usable certificates, and why the first unusable one was not.
type RecipientCandidates = (DirectAddress, Vec<Usable>, Option<(String, TrustError)>);

struct Usable {
    cert: X509,
    binding: Binding,
    anchor: String,
}

fn check_recipient_certificate(
    domain: &LocalDomain,
    cert: &X509Ref,
    recipient: &DirectAddress,
    at: i64,
    min_rsa_bits: u32,
) -> Result<(Binding, String), TrustError> {
    let binding = trust::check_binding(cert, recipient, true)?;
    let path = trust::validate(
        cert,
        &[],
        &domain.outgoing_anchors,
        at,
        &domain.name,
        Direction::Outgoing,
    )?;
    trust::check_key(cert, KeyUse::Encrypt, min_rsa_bits)?;
    trust::check_key_usage(cert, KeyUse::Encrypt)?;
    Ok((binding, path.anchor.subject))
}

fn check_signing_credential(
    cred: &PrivateCredential,
    at: i64,
    min_rsa_bits: u32,
) -> Result<(), TrustError> {
    let cert = &cred.credential.cert;
    trust::check_key(cert, KeyUse::Sign, min_rsa_bits)?;
    trust::check_key_usage(cert, KeyUse::Sign)?;
    trust::check_validity(cert, at)?;
    Ok(())
}

/// The Date and Message-ID lines a message lacks (canonical CRLF, possibly
/// none), to go before it, and its Message-ID: every Direct message needs a
/// Message-ID for delivery notifications to refer to.
pub fn missing_headers(
    message: &[u8],
    from: &DirectAddress,
) -> Result<(Vec<u8>, Option<String>), AgentError> {
    let entity = mime::Entity::parse(message)?;
    let mut prefix = Vec::new();
    if entity.header("Date").is_none() {
        prefix
            .extend_from_slice(format!("Date: {}\r\n", chrono::Utc::now().to_rfc2822()).as_bytes());
    }
    let message_id = match entity.header("Message-ID") {
        Some(id) => Some(id.to_string()),
        None => {
            let mut rand = [0u8; 16];
            openssl::rand::rand_bytes(&mut rand).map_err(smime::SmimeError::from)?;
            let id = format!("<{}@{}>", hex::encode(rand), from.domain());
            prefix.extend_from_slice(format!("Message-ID: {id}\r\n").as_bytes());
            Some(id)
        }
    };
    Ok((prefix, message_id))
}

impl Agent {
    /// Seals `req.message` from `req.from` for every recipient.
    pub fn seal(&self, req: SealRequest<'_>) -> Result<Sealed, AgentError> {
        let domain = self
            .domain(req.from.domain())
            .ok_or_else(|| AgentError::NotLocal {
                domain: req.from.domain().to_string(),
            })?;
        self.seal_for_domain(domain, req)
    }

    /// Seals with the keys and anchors of `domain` (which need not be
    /// registered in the agent: the CLI builds one from flags).
    pub fn seal_for_domain(
        &self,
        domain: &LocalDomain,
        req: SealRequest<'_>,
    ) -> Result<Sealed, AgentError> {
        let settings = &self.settings;
        let mut warnings = Vec::new();

        // Every recipient needs at least one usable certificate.
        let mut per_recipient: Vec<RecipientCandidates> = req
            .recipients
            .iter()
            .map(|r| (r.clone(), Vec::new(), None))
            .collect();
        for cert in &req.recipient_certificates {
            let mut matched = false;
            for (address, usable, first_error) in per_recipient.iter_mut() {
                match check_recipient_certificate(
                    domain,
                    cert,
                    address,
                    req.at,
                    settings.min_rsa_bits,
                ) {
                    Ok((binding, anchor)) => {
                        matched = true;
                        usable.push(Usable {
                            cert: cert.clone(),
                            binding,
                            anchor,
                        });
                    }
                    Err(TrustError::NotBound { .. }) => {}
                    Err(e) => {
                        matched = true;
                        warnings.push(format!(
                            "{address}: certificate \"{}\" not used: {e}",
                            trust::subject(cert)
                        ));
                        if first_error.is_none() {
                            *first_error = Some((trust::subject(cert), e));
                        }
                    }
                }
            }
            if !matched {
                return Err(AgentError::UnmatchedRecipientCertificate(trust::subject(
                    cert,
                )));
            }
        }
        for (address, usable, first_error) in per_recipient.iter_mut() {
            if usable.is_empty() {
                return Err(match first_error.take() {
                    Some((subject, reason)) => AgentError::RecipientCertificate {
                        recipient: address.to_string(),
                        subject,
                        reason: Box::new(reason),
                    },
                    None => AgentError::NoRecipientCertificate(address.to_string()),
                });
            }
        }

        // Sign with the sender's address-bound certificate, else the domain's.
        let candidates = domain.credentials_for(&req.from, false);
        if candidates.is_empty() {
            return Err(AgentError::NoSigningCredential {
                sender: req.from.to_string(),
                domain: domain.name.clone(),
            });
        }
        let mut signer = None;
        let mut first_problem = None;
        for c in candidates {
            match check_signing_credential(c, req.at, settings.min_rsa_bits) {
                Ok(()) => {
                    signer = Some(c);
                    break;
                }
                Err(e) => {
                    first_problem.get_or_insert(e);
                }
            }
        }
        let signer = match (signer, first_problem) {
            (Some(s), _) => s,
            (None, Some(reason)) => {
                return Err(AgentError::SigningCredential {
                    sender: req.from.to_string(),
                    reason: Box::new(reason),
                })
            }
            (None, None) => {
                return Err(AgentError::NoSigningCredential {
                    sender: req.from.to_string(),
                    domain: domain.name.clone(),
                })
            }
        };

        // The message is never copied: the wrapped entity is the wrapper
        // header, any missing Date/Message-ID lines and the message; it is
        // signed piece by piece, and the signed entity around it is encrypted
        // and base64-encoded as a stream straight into the output. A 100 MB
        // message takes its own size plus the output's.
        let (added, message_id) = missing_headers(req.message, &req.from)?;
        let body = mime::to_crlf(req.message);
        let mut outer = Vec::with_capacity(1024);
        {
            // The added lines as a header section of their own.
            let added_section = [&added[..], b"\r\n"].concat();
            let added_entity = match added.is_empty() {
                true => None,
                false => Some(mime::Entity::parse(&added_section)?),
            };
            let original_entity = mime::Entity::parse(&body)?;
            let headers = || {
                added_entity
                    .iter()
                    .flat_map(|e| e.headers.iter())
                    .chain(&original_entity.headers)
            };
            for name in OUTER_HEADERS {
                for h in headers().filter(|h| h.name.eq_ignore_ascii_case(name)) {
                    outer.extend_from_slice(&mime::to_crlf(&h.raw));
                }
            }
            match &settings.outer_subject {
                OuterSubject::Hide(text) => {
                    outer.extend_from_slice(format!("Subject: {text}\r\n").as_bytes())
                }
                OuterSubject::Copy => {
                    for h in headers().filter(|h| h.name.eq_ignore_ascii_case("Subject")) {
                        outer.extend_from_slice(&mime::to_crlf(&h.raw));
                    }
                }
            }
        }
        outer.extend_from_slice(b"MIME-Version: 1.0\r\n");
        let wrapped: [&[u8]; 3] = [smime::WRAPPER_HEADER, &added, &body];
        let signed = smime::SignedFrame::sign(&wrapped, &signer.credential, settings.digest)?;
        let mut certs: Vec<X509> = Vec::new();
        for (_, usable, _) in &per_recipient {
            for u in usable {
                let der = u.cert.to_der().map_err(smime::SmimeError::from)?;
                if !certs
                    .iter()
                    .any(|c| c.to_der().ok().as_deref() == Some(der.as_slice()))
                {
                    certs.push(u.cert.clone());
                }
            }
        }
        let mut out = outer;
        smime::encrypt_entity_into(
            &[
                &signed.head,
                wrapped[0],
                wrapped[1],
                wrapped[2],
                &signed.tail,
            ],
            &certs,
            settings.cipher,
            settings.key_transport,
            &mut out,
        )?;

        let report = SealReport {
            signer: CertSummary::of(&signer.credential.cert),
            signer_binding: signer.bindings.clone(),
            digest: settings.digest.micalg().to_string(),
            cipher: serde_json::to_value(settings.cipher)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            key_transport: serde_json::to_value(settings.key_transport)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            wrapped: true,
            message_id,
            recipients: per_recipient
                .into_iter()
                .map(|(address, usable, _)| RecipientReport {
                    address: address.to_string(),
                    certificates: usable.iter().map(|u| CertSummary::of(&u.cert)).collect(),
                    bindings: usable.iter().map(|u| u.binding.clone()).collect(),
                    anchors: usable.iter().map(|u| u.anchor.clone()).collect(),
                })
                .collect(),
            warnings,
        };
        Ok(Sealed {
            message: out,
            report,
        })
    }
}

impl SealReport {
    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "sealed {} for {} recipient(s)\n  signed by \"{}\" with {}\n  encrypted with {} via {}\n",
            self.message_id.as_deref().unwrap_or("(no Message-ID)"),
            self.recipients.len(),
            self.signer.subject,
            self.digest,
            self.cipher,
            self.key_transport
        );
        for r in &self.recipients {
            for (c, a) in r.certificates.iter().zip(&r.anchors) {
                s.push_str(&format!(
                    "  to {}: \"{}\" (anchor \"{a}\")\n",
                    r.address, c.subject
                ));
            }
        }
        for w in &self.warnings {
            s.push_str(&format!("  warning: {w}\n"));
        }
        s
    }
}
