//! The security and trust agent: `outgoing` seals a message for its
//! recipients, `incoming` opens a message for a local domain. Both return a
//! report of what they did and refuse with an error that names the rule.

mod incoming;
mod keys;
mod outgoing;

pub use incoming::{OpenReport, OpenRequest, Opened, SignerReport};
pub use keys::{load_pem_credentials, load_pkcs12, load_private_dir, KeyError};
pub use outgoing::{missing_headers, RecipientReport, SealReport, SealRequest, Sealed};

use crate::address::{AddressError, DirectAddress};
use crate::pki::Credential;
use crate::smime::mime::MimeError;
use crate::smime::{ContentCipher, KeyTransport, SigningDigest, SmimeError};
use crate::trust::{AnchorSet, Binding, TrustError};
use std::collections::BTreeMap;

/// What the outer (unprotected) Subject of a sealed message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OuterSubject {
    /// A fixed neutral text, so that no clinical detail travels in clear.
    Hide(String),
    /// The original Subject, for partners whose tools sort on it.
    Copy,
}

/// Algorithm and policy choices, shared by every domain.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub cipher: ContentCipher,
    pub key_transport: KeyTransport,
    pub digest: SigningDigest,
    pub outer_subject: OuterSubject,
    pub min_rsa_bits: u32,
    /// Refuse incoming mail whose RCPT TO is not in the To/Cc headers.
    pub require_rcpt_in_headers: bool,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            cipher: ContentCipher::Aes256Cbc,
            key_transport: KeyTransport::RsaPkcs1,
            digest: SigningDigest::Sha256,
            outer_subject: OuterSubject::Hide(DEFAULT_OUTER_SUBJECT.to_string()),
            min_rsa_bits: 2048,
            require_rcpt_in_headers: true,
        }
    }
}

pub const DEFAULT_OUTER_SUBJECT: &str = "Direct secure message";

/// A private certificate of a local domain with the binding it carries.
#[derive(Clone)]
pub struct PrivateCredential {
    pub credential: Credential,
    pub bindings: Vec<Binding>,
    pub source: String,
}

impl PrivateCredential {
    pub fn new(credential: Credential, source: impl Into<String>) -> PrivateCredential {
        let bindings = crate::trust::bindings(&credential.cert);
        PrivateCredential {
            credential,
            bindings,
            source: source.into(),
        }
    }

    fn bound_to_address(&self, address: &DirectAddress) -> bool {
        let wanted = address.to_string().to_ascii_lowercase();
        self.bindings
            .iter()
            .any(|b| matches!(b, Binding::Address(a) if *a == wanted))
    }

    fn bound_to_domain(&self, domain: &str) -> bool {
        self.bindings
            .iter()
            .any(|b| matches!(b, Binding::Domain(d) if d == domain))
    }
}

/// A domain this HISP serves: its private certificates and its anchors.
#[derive(Clone)]
pub struct LocalDomain {
    pub name: String,
    pub credentials: Vec<PrivateCredential>,
    /// Anchors that decide whether senders to this domain are trusted.
    pub incoming_anchors: AnchorSet,
    /// Anchors that decide whether recipients this domain sends to are trusted.
    pub outgoing_anchors: AnchorSet,
}

impl LocalDomain {
    /// Credentials usable for `address`: address-bound first, then
    /// domain-bound, then (when `any`) every other credential of the domain.
    pub fn credentials_for(&self, address: &DirectAddress, any: bool) -> Vec<&PrivateCredential> {
        let mut out: Vec<&PrivateCredential> = self
            .credentials
            .iter()
            .filter(|c| c.bound_to_address(address))
            .collect();
        out.extend(
            self.credentials
                .iter()
                .filter(|c| !c.bound_to_address(address) && c.bound_to_domain(address.domain())),
        );
        if any {
            for c in &self.credentials {
                if !out.iter().any(|o| std::ptr::eq(*o, c)) {
                    out.push(c);
                }
            }
        }
        out
    }
}

/// The agent: local domains and settings.
#[derive(Clone, Default)]
pub struct Agent {
    pub domains: BTreeMap<String, LocalDomain>,
    pub settings: AgentSettings,
}

impl Agent {
    pub fn new(settings: AgentSettings) -> Agent {
        Agent {
            domains: BTreeMap::new(),
            settings,
        }
    }

    pub fn add_domain(&mut self, domain: LocalDomain) {
        self.domains.insert(domain.name.clone(), domain);
    }

    pub fn domain(&self, name: &str) -> Option<&LocalDomain> {
        self.domains.get(&name.to_ascii_lowercase())
    }
}

/// Why the agent refused a message. Each variant is one rule; `rule()` names
/// it in a stable, machine-readable way.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("bad address: {0}")]
    Address(#[from] AddressError),
    #[error("malformed message: {0}")]
    Malformed(#[from] MimeError),
    #[error("{0}")]
    Smime(#[from] SmimeError),
    #[error("{domain} is not a local domain of this HISP")]
    NotLocal { domain: String },
    #[error("no recipient of this message is in a local domain ({0})")]
    NoLocalRecipient(String),
    #[error("{domain} has no private certificate to decrypt with")]
    NoDecryptionKey { domain: String },
    #[error("no private certificate of {domain} can sign for {sender} (need one bound to the address or the domain)")]
    NoSigningCredential { sender: String, domain: String },
    #[error("our signing certificate for {sender} cannot be used: {reason}")]
    SigningCredential {
        sender: String,
        reason: Box<TrustError>,
    },
    #[error("no certificate was given for recipient {0}")]
    NoRecipientCertificate(String),
    #[error("recipient {recipient}: certificate \"{subject}\" refused: {reason}")]
    RecipientCertificate {
        recipient: String,
        subject: String,
        reason: Box<TrustError>,
    },
    #[error("certificate \"{0}\" is bound to none of the recipients")]
    UnmatchedRecipientCertificate(String),
    #[error("signature digest refused: {0}")]
    Digest(TrustError),
    #[error("signer not trusted: {0}")]
    SignerTrust(TrustError),
    #[error("signer key refused: {0}")]
    SignerKey(TrustError),
    #[error("signer not bound to the sender: {0}")]
    SignerBinding(TrustError),
    #[error("the message has no usable From address: {0}")]
    NoFrom(String),
    #[error("envelope sender {mail_from} matches neither From ({from}) nor Sender")]
    EnvelopeSender { mail_from: String, from: String },
    #[error(
        "envelope recipient {0} is in neither the To nor the Cc header of the protected message"
    )]
    EnvelopeRecipient(String),
}

impl AgentError {
    /// A stable name of the rule that failed (for logs, JSON and SMTP replies).
    pub fn rule(&self) -> &'static str {
        match self {
            AgentError::Address(_) => "address",
            AgentError::Malformed(_) => "malformed",
            AgentError::Smime(e) => match e {
                SmimeError::NotEncrypted(_) => "not-encrypted",
                SmimeError::NotSigned(_) => "not-signed",
                SmimeError::NotForUs { .. } => "not-for-us",
                SmimeError::DecryptFailed { .. } => "decrypt",
                SmimeError::SignatureInvalid(_) => "signature-invalid",
                SmimeError::NoSignerCertificate => "signer-certificate-missing",
                SmimeError::Unsupported { .. } => "unsupported",
                _ => "malformed",
            },
            AgentError::NotLocal { .. } | AgentError::NoLocalRecipient(_) => "not-local",
            AgentError::NoDecryptionKey { .. } => "no-private-key",
            AgentError::NoSigningCredential { .. } | AgentError::SigningCredential { .. } => {
                "signing-certificate"
            }
            AgentError::NoRecipientCertificate(_)
            | AgentError::RecipientCertificate { .. }
            | AgentError::UnmatchedRecipientCertificate(_) => "recipient-certificate",
            AgentError::Digest(_) => "digest",
            AgentError::SignerTrust(_) => "signer-trust",
            AgentError::SignerKey(_) => "signer-key",
            AgentError::SignerBinding(_) => "signer-binding",
            AgentError::NoFrom(_) => "from",
            AgentError::EnvelopeSender { .. } => "envelope-sender",
            AgentError::EnvelopeRecipient(_) => "envelope-recipient",
        }
    }
}

/// Now, in Unix seconds.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
