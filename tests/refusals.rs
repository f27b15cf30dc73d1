//! Every refusal of the agent, one test each: a real PKI (`hispd::pki`), a
//! sender and a receiver domain, a message sealed by us or crafted (with
//! `hispd::smime` primitives or the `openssl` CLI) when our own `seal` would
//! refuse to produce it, and an assertion on the rule AND on the words that
//! tell an operator why. `conforming_messages_open` is the positive control:
//! each way of building a message used here opens when nothing is wrong.

// `AgentError` is the library's error type; its size is the library's
// concern (clippy reports it there too), not this file's.

mod common;

use common::peers::{openssl_encrypt, openssl_sign};
use hispd::address::DirectAddress;
use hispd::agent::{
    self, Agent, AgentError, AgentSettings, LocalDomain, OpenRequest, Opened, PrivateCredential,
    SealRequest, Sealed,
};
use hispd::pki::{self, Credential, KeyKind, LeafSpec};
use hispd::smime::{self, ContentCipher, KeyTransport, SigningDigest, SmimeError};
use hispd::trust::{AnchorSet, TrustError};
use openssl::x509::X509;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const ALICE: &str = "alice@sender.example";
const BOB: &str = "bob@receiver.example";
const SENDER_DOMAIN: &str = "sender.example";
const RECEIVER_DOMAIN: &str = "receiver.example";
const BODY: &str = "Hello Bob, potassium is 4.1 mmol/L.";

// ---------------------------------------------------------------------------
// fixture
// ---------------------------------------------------------------------------

/// The keys every test shares (RSA generation is the slow part): the two
/// domains' CAs, a CA nobody trusts, Alice (address-bound) and the receiver
/// (domain-bound).
struct Pki {
    sender_ca: Credential,
    receiver_ca: Credential,
    rogue_ca: Credential,
    alice: Credential,
    receiver: Credential,
}

fn shared() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let sender_ca = pki::new_ca("Sender CA", 2048).expect("sender CA");
        let receiver_ca = pki::new_ca("Receiver CA", 2048).expect("receiver CA");
        let rogue_ca = pki::new_ca("Rogue CA", 2048).expect("rogue CA");
        let alice = pki::issue(&sender_ca, &LeafSpec::address(ALICE)).expect("alice");
        let receiver =
            pki::issue(&receiver_ca, &LeafSpec::domain(RECEIVER_DOMAIN)).expect("receiver");
        Pki {
            sender_ca,
            receiver_ca,
            rogue_ca,
            alice,
            receiver,
        }
    })
}

/// `sender.example` signs with `signer` and trusts the receiver's CA;
/// `receiver.example` holds the receiver's key and trusts the sender's CA.
struct Fixture {
    pki: &'static Pki,
    agent: Agent,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_signer(shared().alice.clone())
    }

    fn with_signer(signer: Credential) -> Fixture {
        let pki = shared();
        let anchors = |ca: &Credential, name: &str| {
            AnchorSet::from_certs(vec![ca.cert.clone()], Path::new(name))
        };
        let mut agent = Agent::new(AgentSettings::default());
        agent.add_domain(LocalDomain {
            name: SENDER_DOMAIN.into(),
            credentials: vec![PrivateCredential::new(signer, "sender-key")],
            incoming_anchors: anchors(&pki.receiver_ca, "receiver-ca"),
            outgoing_anchors: anchors(&pki.receiver_ca, "receiver-ca"),
        });
        agent.add_domain(LocalDomain {
            name: RECEIVER_DOMAIN.into(),
            credentials: vec![PrivateCredential::new(pki.receiver.clone(), "receiver-key")],
            incoming_anchors: anchors(&pki.sender_ca, "sender-ca"),
            outgoing_anchors: anchors(&pki.sender_ca, "sender-ca"),
        });
        Fixture { pki, agent }
    }

    /// Seals the standard message from Alice to Bob for `certs`.
    fn seal_for(&self, certs: Vec<X509>, at: i64) -> Result<Sealed, AgentError> {
        let original = message();
        self.agent.seal(SealRequest {
            from: addr(ALICE),
            recipients: vec![addr(BOB)],
            message: &original,
            recipient_certificates: certs,
            at,
        })
    }

    fn seal(&self, at: i64) -> Sealed {
        self.seal_for(vec![self.pki.receiver.cert.clone()], at)
            .unwrap_or_else(|e| panic!("seal refused ({}): {e}", e.rule()))
    }

    /// The receiving domain's certificate, as recipients of `craft`/`envelope`.
    fn receiver(&self) -> &[X509] {
        std::slice::from_ref(&self.pki.receiver.cert)
    }

    fn open(&self, message: &[u8]) -> Result<Opened, AgentError> {
        self.open_at(message, agent::now())
    }

    fn open_at(&self, message: &[u8], at: i64) -> Result<Opened, AgentError> {
        self.agent.open(OpenRequest {
            message,
            mail_from: Some(ALICE.into()),
            rcpt_to: vec![addr(BOB)],
            at,
        })
    }
}

fn addr(a: &str) -> DirectAddress {
    DirectAddress::parse(a).expect("address")
}

fn leaf(ca: &Credential, spec: LeafSpec) -> Credential {
    pki::issue(ca, &spec).expect("issue leaf")
}

/// Alice's standard message (CRLF).
fn message() -> Vec<u8> {
    format!(
        "From: Alice <{ALICE}>\r\nTo: Bob <{BOB}>\r\nSubject: Lab results\r\n\
         Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <refusals-1@sender.example>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{BODY}\r\n"
    )
    .into_bytes()
}

/// Outer headers above an S/MIME entity, as a sending HISP writes them.
fn with_outer_headers(entity: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "From: {ALICE}\r\nTo: {BOB}\r\nSubject: Direct secure message\r\nMIME-Version: 1.0\r\n"
    )
    .into_bytes();
    out.extend_from_slice(entity);
    out
}

/// Encrypts an entity to `to` with our primitives and adds outer headers.
fn envelope(entity: &[u8], to: &[X509]) -> Vec<u8> {
    let der = smime::encrypt(entity, to, ContentCipher::Aes256Cbc, KeyTransport::RsaPkcs1)
        .expect("encrypt");
    with_outer_headers(&smime::enveloped_entity(&der))
}

/// Wraps, signs (SHA-256) and encrypts the standard message with the
/// primitives, skipping every policy check `seal` makes on the signer.
fn craft(signer: &Credential, to: &[X509]) -> Vec<u8> {
    let signed =
        smime::sign(&smime::wrap(&message()), signer, SigningDigest::Sha256).expect("sign");
    envelope(&signed, to)
}

/// Writes a credential's certificate and key as PEM files for the CLI.
fn pem_files(dir: &Path, name: &str, cred: &Credential) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, cred.cert.to_pem().expect("cert pem")).expect("write cert");
    std::fs::write(&key, cred.key.private_key_to_pem_pkcs8().expect("key pem")).expect("write key");
    (cert, key)
}

/// Signs the wrapped standard message with `openssl cms -sign -md DIGEST` as
/// Alice and encrypts it with `openssl cms -encrypt` to the receiver.
fn openssl_crafted(fx: &Fixture, digest: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice_cert, alice_key) = pem_files(dir.path(), "alice", &fx.pki.alice);
    let (receiver_cert, _) = pem_files(dir.path(), "receiver", &fx.pki.receiver);
    let signed = openssl_sign(&smime::wrap(&message()), &alice_cert, &alice_key, digest)
        .expect("openssl cms -sign");
    let encrypted = openssl_encrypt(&signed, &[receiver_cert.as_path()], "aes-256-cbc", false)
        .expect("openssl cms -encrypt");
    let mut out =
        format!("From: {ALICE}\r\nTo: {BOB}\r\nSubject: Direct secure message\r\n").into_bytes();
    out.extend_from_slice(&encrypted);
    out
}

/// The error of a refused call; panics (naming the test's line) on success.
#[track_caller]
fn refused<T>(result: Result<T, AgentError>) -> AgentError {
    match result {
        Ok(_) => panic!("expected a refusal, but it was accepted"),
        Err(e) => e,
    }
}

/// Asserts the rule name and that the message names each of `why`.
#[track_caller]
fn assert_refusal(err: &AgentError, rule: &str, why: &[&str]) {
    let text = err.to_string();
    eprintln!("[{}] {text}", err.rule());
    assert_eq!(err.rule(), rule, "wrong rule; message: {text}; {err:?}");
    for w in why {
        assert!(
            text.contains(w),
            "refusal {rule:?} should mention {w:?}: {text}"
        );
    }
}

#[track_caller]
fn accepted(result: Result<Opened, AgentError>) -> Opened {
    result.unwrap_or_else(|e| panic!("refused ({}): {e}", e.rule()))
}

fn now() -> i64 {
    agent::now()
}

// ---------------------------------------------------------------------------
// positive control
// ---------------------------------------------------------------------------

/// Every construction the refusal tests use, with a conforming certificate,
/// opens: the refusals below cannot come from the construction itself.
#[test]
fn conforming_messages_open() {
    let fx = Fixture::new();

    let sealed = fx.seal(now());
    let opened = accepted(fx.open(&sealed.message));
    assert!(String::from_utf8_lossy(&opened.message).contains(BODY));
    assert_eq!(opened.report.from, ALICE);
    assert!(opened.report.wrapped);
    assert_eq!(opened.report.signer.digest, "SHA256");

    // Crafted with the smime primitives (as most refusal tests do).
    let crafted = craft(&fx.pki.alice, fx.receiver());
    let opened = accepted(fx.open(&crafted));
    assert!(String::from_utf8_lossy(&opened.message).contains(BODY));

    // Crafted with the openssl CLI at SHA-256 (as the SHA-1 test does).
    let by_openssl = openssl_crafted(&fx, "sha256");
    let opened = accepted(fx.open(&by_openssl));
    assert!(String::from_utf8_lossy(&opened.message).contains(BODY));

    // An ECDSA P-256 signer is as good as RSA.
    let ec_alice = leaf(
        &fx.pki.sender_ca,
        LeafSpec {
            key: KeyKind::EcP256,
            ..LeafSpec::address(ALICE)
        },
    );
    let ec = Fixture::with_signer(ec_alice);
    let opened = accepted(ec.open(&ec.seal(now()).message));
    assert_eq!(opened.report.signer.key, "ECDSA P-256");

    // The envelope checks pass with the right envelope, and without one.
    let no_envelope = fx.agent.open(OpenRequest {
        message: &sealed.message,
        mail_from: None,
        rcpt_to: Vec::new(),
        at: now(),
    });
    accepted(no_envelope);
}

// ---------------------------------------------------------------------------
// incoming refusals
// ---------------------------------------------------------------------------

#[test]
fn tampered_body_is_signature_invalid() {
    let fx = Fixture::new();
    let mut signed = smime::sign(
        &smime::wrap(&message()),
        &fx.pki.alice,
        SigningDigest::Sha256,
    )
    .expect("sign");
    // Flip one byte of the body inside the signed first part.
    let at = signed
        .windows(BODY.len())
        .position(|w| w == BODY.as_bytes())
        .expect("the body is in the signed part");
    signed[at] ^= 0x01; // 'H' -> 'I'
    let tampered = envelope(&signed, fx.receiver());

    let err = refused(fx.open(&tampered));
    assert!(
        matches!(err, AgentError::Smime(SmimeError::SignatureInvalid(_))),
        "{err:?}"
    );
    assert_refusal(&err, "signature-invalid", &["does not verify"]);
}

#[test]
fn message_for_another_certificate_is_not_for_us() {
    let fx = Fixture::new();
    // A second, perfectly valid certificate of the receiving domain whose key
    // the receiving HISP does not hold.
    let other = leaf(&fx.pki.receiver_ca, LeafSpec::domain(RECEIVER_DOMAIN));
    let sealed = fx
        .seal_for(vec![other.cert.clone()], now())
        .unwrap_or_else(|e| panic!("seal to the other certificate: {e}"));

    let err = refused(fx.open(&sealed.message));
    assert!(
        matches!(err, AgentError::Smime(SmimeError::NotForUs { .. })),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "not-for-us",
        &["not encrypted to any of our certificates", "1 tried"],
    );
}

#[test]
fn signer_not_chaining_to_incoming_anchors_is_untrusted() {
    let rogue_alice = leaf(&shared().rogue_ca, LeafSpec::address(ALICE));
    let fx = Fixture::with_signer(rogue_alice);
    // Our seal does not judge its own chain: it signs.
    let sealed = fx.seal(now());

    let err = refused(fx.open(&sealed.message));
    assert!(
        matches!(err, AgentError::SignerTrust(TrustError::Untrusted { .. })),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "signer-trust",
        &[
            "\"CN=alice@sender.example",
            "does not chain",
            "incoming anchor",
            RECEIVER_DOMAIN,
            "Rogue CA",
        ],
    );
}

#[test]
fn expired_signer_is_refused_unless_judged_at_a_time_it_was_valid() {
    // Valid from 50 min ago until 10 min ago (the CAs date from 1 h ago, so
    // the whole chain is valid 30 min ago).
    let expired = leaf(
        &shared().sender_ca,
        LeafSpec {
            not_before_offset: -3000,
            not_after_offset: -600,
            ..LeafSpec::address(ALICE)
        },
    );
    let fx = Fixture::with_signer(expired);
    let then = now() - 1800;

    // Our seal refuses it now, and names why...
    let err = refused(fx.seal_for(vec![fx.pki.receiver.cert.clone()], now()));
    assert_refusal(&err, "signing-certificate", &["expired"]);
    // ...but seals it when judged 30 min ago.
    let sealed = fx.seal(then);

    let err = refused(fx.open(&sealed.message));
    assert!(
        matches!(err, AgentError::SignerTrust(TrustError::Expired { .. })),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "signer-trust",
        &["expired", "\"CN=alice@sender.example"],
    );

    // `--at`: judged at a time within the validity, the same message opens.
    let opened = accepted(fx.open_at(&sealed.message, then));
    assert!(String::from_utf8_lossy(&opened.message).contains(BODY));
}

#[test]
fn not_yet_valid_signer_is_refused() {
    let future = leaf(
        &shared().sender_ca,
        LeafSpec {
            not_before_offset: 86400,
            ..LeafSpec::address(ALICE)
        },
    );
    let fx = Fixture::with_signer(future);
    let later = now() + 2 * 86400;
    let sealed = fx.seal(later);

    let err = refused(fx.open(&sealed.message));
    assert!(
        matches!(err, AgentError::SignerTrust(TrustError::NotYetValid { .. })),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "signer-trust",
        &["not valid before", "\"CN=alice@sender.example"],
    );

    // Judged two days from now it is valid.
    accepted(fx.open_at(&sealed.message, later));
}

#[test]
fn rsa_1024_signer_key_is_refused() {
    let weak = leaf(
        &shared().sender_ca,
        LeafSpec {
            key: KeyKind::Rsa(1024),
            ..LeafSpec::address(ALICE)
        },
    );
    let fx = Fixture::with_signer(weak.clone());

    // Our own seal will not sign with it.
    let err = refused(fx.seal_for(vec![fx.pki.receiver.cert.clone()], now()));
    assert_refusal(&err, "signing-certificate", &["1024"]);

    let crafted = craft(&weak, fx.receiver());
    let err = refused(fx.open(&crafted));
    assert!(
        matches!(
            err,
            AgentError::SignerKey(TrustError::WeakRsaKey { bits: 1024, .. })
        ),
        "{err:?}"
    );
    assert_refusal(&err, "signer-key", &["1024", "2048"]);
}

#[test]
fn sha1_signature_is_refused() {
    let fx = Fixture::new();
    let sha1 = openssl_crafted(&fx, "sha1");

    let err = refused(fx.open(&sha1));
    assert!(
        matches!(err, AgentError::Digest(TrustError::ForbiddenDigest(_))),
        "{err:?}"
    );
    assert_refusal(&err, "digest", &["forbidden"]);
    let text = err.to_string();
    assert!(text.to_ascii_lowercase().contains("sha1"), "{text}");
}

#[test]
fn address_only_in_subject_dn_is_not_a_binding() {
    let dn_only = leaf(
        &shared().sender_ca,
        LeafSpec {
            subject_email: Some(ALICE.into()),
            san_emails: Vec::new(),
            san_dns: Vec::new(),
            ..LeafSpec::address(ALICE)
        },
    );
    let fx = Fixture::new();
    let crafted = craft(&dn_only, fx.receiver());

    let err = refused(fx.open(&crafted));
    assert!(
        matches!(err, AgentError::SignerBinding(TrustError::NotBound { .. })),
        "{err:?}"
    );
    assert_refusal(&err, "signer-binding", &["subject DN", ALICE]);

    // Our seal does not pick such a certificate to sign for Alice either.
    let err =
        refused(Fixture::with_signer(dn_only).seal_for(vec![fx.pki.receiver.cert.clone()], now()));
    assert_refusal(&err, "signing-certificate", &[ALICE]);
}

#[test]
fn wildcard_dns_name_is_not_a_binding() {
    let wildcard = leaf(
        &shared().sender_ca,
        LeafSpec {
            san_dns: vec!["*.sender.example".into()],
            ..LeafSpec::domain(SENDER_DOMAIN)
        },
    );
    let fx = Fixture::new();
    let crafted = craft(&wildcard, fx.receiver());

    let err = refused(fx.open(&crafted));
    assert!(
        matches!(err, AgentError::SignerBinding(TrustError::NotBound { .. })),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "signer-binding",
        &["wildcard", "*.sender.example", ALICE],
    );
}

#[test]
fn signer_bound_to_another_address_is_refused() {
    let other = leaf(
        &shared().sender_ca,
        LeafSpec::address("other@sender.example"),
    );
    let fx = Fixture::new();
    let crafted = craft(&other, fx.receiver());

    let err = refused(fx.open(&crafted));
    assert!(
        matches!(err, AgentError::SignerBinding(TrustError::NotBound { .. })),
        "{err:?}"
    );
    assert_refusal(&err, "signer-binding", &["other@sender.example", ALICE]);
}

#[test]
fn unsigned_message_is_refused() {
    let fx = Fixture::new();
    let unsigned = envelope(&smime::wrap(&message()), fx.receiver());

    let err = refused(fx.open(&unsigned));
    assert!(
        matches!(err, AgentError::Smime(SmimeError::NotSigned(_))),
        "{err:?}"
    );
    assert_refusal(&err, "not-signed", &["not signed", "message/rfc822"]);
}

#[test]
fn unencrypted_messages_are_refused() {
    let fx = Fixture::new();

    // Signed but not encrypted.
    let signed = smime::sign(
        &smime::wrap(&message()),
        &fx.pki.alice,
        SigningDigest::Sha256,
    )
    .expect("sign");
    let err = refused(fx.open(&with_outer_headers(&signed)));
    assert!(
        matches!(err, AgentError::Smime(SmimeError::NotEncrypted(_))),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "not-encrypted",
        &[
            "not encrypted",
            "multipart/signed",
            "signed but not encrypted",
        ],
    );

    // Plain text.
    let err = refused(fx.open(&message()));
    assert!(
        matches!(err, AgentError::Smime(SmimeError::NotEncrypted(_))),
        "{err:?}"
    );
    assert_refusal(&err, "not-encrypted", &["not encrypted", "text/plain"]);
}

#[test]
fn envelope_must_agree_with_the_protected_headers() {
    let fx = Fixture::new();
    let sealed = fx.seal(now());

    let err = refused(fx.agent.open(OpenRequest {
        message: &sealed.message,
        mail_from: Some("mallory@sender.example".into()),
        rcpt_to: vec![addr(BOB)],
        at: now(),
    }));
    assert!(matches!(err, AgentError::EnvelopeSender { .. }), "{err:?}");
    assert_refusal(&err, "envelope-sender", &["mallory@sender.example", ALICE]);

    let err = refused(fx.agent.open(OpenRequest {
        message: &sealed.message,
        mail_from: Some(ALICE.into()),
        rcpt_to: vec![addr(BOB), addr("carol@receiver.example")],
        at: now(),
    }));
    assert!(matches!(err, AgentError::EnvelopeRecipient(_)), "{err:?}");
    assert_refusal(&err, "envelope-recipient", &["carol@receiver.example"]);
}

/// Bad bytes give an error value with a reason, never a panic.
#[test]
fn truncated_and_garbage_input_is_an_error() {
    let fx = Fixture::new();
    let sealed = fx.seal(now()).message;

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("empty", Vec::new()));
    cases.push(("blank lines", b"\r\n\r\n\r\n".to_vec()));

    // Deterministic pseudo-random bytes (xorshift64).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    cases.push(("random bytes", random.clone()));
    let mut random_after_headers = with_outer_headers(
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\n",
    );
    random_after_headers.extend_from_slice(&random);
    cases.push(("random bytes after S/MIME headers", random_after_headers));

    cases.push(("sealed, cut in half", sealed[..sealed.len() / 2].to_vec()));
    cases.push((
        "sealed, cut at 90%",
        sealed[..sealed.len() * 9 / 10].to_vec(),
    ));
    cases.push(("sealed, headers only", {
        let end = sealed
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("header end");
        sealed[..end + 2].to_vec()
    }));

    let body_start = sealed
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end")
        + 4;
    let mut not_base64 = sealed[..body_start].to_vec();
    not_base64.extend_from_slice(b"!!!! this is not base64 @@@@\r\n");
    cases.push(("base64 body replaced by non-base64", not_base64));
    let mut base64_garbage = sealed[..body_start].to_vec();
    base64_garbage.extend_from_slice(&hispd::smime::mime::encode_base64_lines(&random));
    cases.push(("base64 body replaced by base64 of garbage", base64_garbage));

    let mut huge = b"X-Huge: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    cases.push(("a 1 MiB header line that never ends", huge.clone()));
    let mut huge_then_garbage = huge.clone();
    huge_then_garbage.extend_from_slice(b"\r\n\r\n");
    huge_then_garbage.extend_from_slice(&random);
    cases.push(("a 1 MiB header line, then garbage", huge_then_garbage));

    // A multipart/signed with no closing delimiter, inside valid encryption.
    let signed = smime::sign(
        &smime::wrap(&message()),
        &fx.pki.alice,
        SigningDigest::Sha256,
    )
    .expect("sign");
    let text = String::from_utf8(signed).expect("ascii");
    let close = text.rfind("--\r\n").expect("closing delimiter");
    let line_start = text[..close].rfind("\r\n").expect("line before") + 2;
    let unterminated = format!("{}{}", &text[..line_start], "trailing junk\r\n");
    assert!(!unterminated.contains(&text[line_start..close + 4]));
    cases.push((
        "multipart/signed without closing delimiter, encrypted",
        envelope(unterminated.as_bytes(), fx.receiver()),
    ));
    // Garbage encrypted to us: decryption works, the content is not MIME.
    cases.push(("encrypted garbage", envelope(&random, fx.receiver())));

    for (name, input) in &cases {
        for with_envelope in [true, false] {
            let result = fx.agent.open(OpenRequest {
                message: input,
                mail_from: with_envelope.then(|| ALICE.to_string()),
                rcpt_to: if with_envelope {
                    vec![addr(BOB)]
                } else {
                    Vec::new()
                },
                at: now(),
            });
            match result {
                Ok(_) => panic!("{name} (envelope: {with_envelope}) was accepted"),
                Err(e) => {
                    let text = e.to_string();
                    assert!(
                        !text.trim().is_empty(),
                        "{name}: empty message for rule {}",
                        e.rule()
                    );
                    eprintln!("{name} (envelope: {with_envelope}): [{}] {text}", e.rule());
                }
            }
        }
    }

    // The unterminated multipart/signed is malformed MIME, and says so.
    let (_, unterminated_case) = cases
        .iter()
        .find(|(n, _)| n.starts_with("multipart/signed without closing"))
        .expect("case");
    let err = refused(fx.open(unterminated_case));
    assert_refusal(&err, "malformed", &["closing delimiter"]);
}

// ---------------------------------------------------------------------------
// outgoing refusals
// ---------------------------------------------------------------------------

#[test]
fn recipient_certificate_refusals() {
    let fx = Fixture::new();

    // Not chaining to the sender domain's outgoing anchors.
    let rogue = leaf(&fx.pki.rogue_ca, LeafSpec::domain(RECEIVER_DOMAIN));
    let err = refused(fx.seal_for(vec![rogue.cert.clone()], now()));
    assert!(
        matches!(
            err,
            AgentError::RecipientCertificate { ref reason, .. } if matches!(**reason, TrustError::Untrusted { .. })
        ),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "recipient-certificate",
        &[BOB, "does not chain", "outgoing anchor", "Rogue CA"],
    );

    // Without keyEncipherment.
    let sign_only = leaf(
        &fx.pki.receiver_ca,
        LeafSpec {
            key_encipherment: false,
            ..LeafSpec::domain(RECEIVER_DOMAIN)
        },
    );
    let err = refused(fx.seal_for(vec![sign_only.cert.clone()], now()));
    assert!(
        matches!(
            err,
            AgentError::RecipientCertificate { ref reason, .. } if matches!(**reason, TrustError::KeyUsage { .. })
        ),
        "{err:?}"
    );
    assert_refusal(&err, "recipient-certificate", &[BOB, "keyEncipherment"]);

    // An EC key cannot take key transport (RSA only).
    let ec = leaf(
        &fx.pki.receiver_ca,
        LeafSpec {
            key: KeyKind::EcP256,
            ..LeafSpec::domain(RECEIVER_DOMAIN)
        },
    );
    let err = refused(fx.seal_for(vec![ec.cert.clone()], now()));
    assert!(
        matches!(
            err,
            AgentError::RecipientCertificate { ref reason, .. } if matches!(**reason, TrustError::UnsupportedKey { .. })
        ),
        "{err:?}"
    );
    assert_refusal(
        &err,
        "recipient-certificate",
        &[BOB, "unsupported key", "RSA"],
    );

    // No certificate at all.
    let err = refused(fx.seal_for(Vec::new(), now()));
    assert!(
        matches!(err, AgentError::NoRecipientCertificate(_)),
        "{err:?}"
    );
    assert_refusal(&err, "recipient-certificate", &[BOB, "no certificate"]);
}
