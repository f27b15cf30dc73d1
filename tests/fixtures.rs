//! Real messages from the Direct reference implementations
//! (../shared/fixtures/interop), opened by the library and by the CLI.

use hispd::agent::{self, Agent, AgentSettings, LocalDomain, OpenRequest, PrivateCredential};
use hispd::pki::Credential;
use hispd::trust::{self, AnchorSet};
use openssl::pkey::PKey;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel)
}

fn ryan() -> PrivateCredential {
    let cert = trust::read_certificates(&fixture("interop/java-ri/ryan.der"))
        .expect("ryan.der")
        .remove(0);
    let key = PKey::private_key_from_der(
        &std::fs::read(fixture("interop/java-ri/ryanKey.der")).expect("key"),
    )
    .expect("PKCS#8 DER key");
    PrivateCredential::new(
        Credential {
            cert,
            key,
            chain: Vec::new(),
        },
        "ryan",
    )
}

fn java_domain(anchor: &str) -> LocalDomain {
    LocalDomain {
        name: "securehealthemail.com".into(),
        credentials: vec![ryan()],
        incoming_anchors: AnchorSet::load(&fixture(anchor)).expect("anchor"),
        outgoing_anchors: AnchorSet::new(),
    }
}

fn open_java(anchor: &str) -> Result<agent::Opened, agent::AgentError> {
    let message = std::fs::read(fixture("interop/java-ri/EncryptedMessage2.eml")).expect("fixture");
    let agent = Agent::new(AgentSettings::default());
    agent.open_for_domain(
        &java_domain(anchor),
        OpenRequest {
            message: &message,
            mail_from: None,
            rcpt_to: Vec::new(),
            at: agent::now(),
        },
    )
}

#[test]
fn java_ri_message_opens_with_ryans_key_and_the_simpleinterop_anchor() {
    let opened = open_java("interop/java-ri/SimpleInterop-anchor.der").expect("trusted");
    let r = &opened.report;
    assert!(r.wrapped);
    assert_eq!(r.subject.as_deref(), Some("test pic"));
    assert_eq!(r.signer.digest, "SHA256");
    assert_eq!(r.envelope.content_cipher, "AES-128-CBC");
    assert_eq!(r.envelope.key_transport, vec!["rsaEncryption".to_string()]);
    assert!(r.signer.trust.anchor.subject.contains("SimpleInterop"));
    assert_eq!(r.from, "gm2552@securehealthemail.com");
    let inner = String::from_utf8_lossy(&opened.message).to_string();
    assert!(inner.contains("Subject: test pic"));
    assert!(
        inner.to_ascii_lowercase().contains("image/png"),
        "the PNG attachment is kept"
    );
}

#[test]
fn java_ri_message_is_refused_with_an_unrelated_anchor() {
    let err = open_java("interop/java-ri/unrelated-anchor.der")
        .err()
        .expect("must be refused");
    assert_eq!(err.rule(), "signer-trust");
    assert!(err.to_string().contains("does not chain"), "{err}");
}

#[test]
fn dotnet_ri_message_decrypts_with_oaep_then_is_refused_for_sha1() {
    let message =
        std::fs::read(fixture("interop/dotnet-ri/envelopeSignature.eml")).expect("fixture");
    let cred = agent::load_pkcs12(
        &fixture("interop/dotnet-ri/nhind_umamalga1_vm1.pfx"),
        "passw0rd!",
    )
    .expect("legacy PKCS#12 opens");
    let envelope = hispd::smime::parse_encrypted(&message).expect("parses");
    assert_eq!(envelope.info.key_transport, vec!["RSAES-OAEP".to_string()]);
    assert!(envelope.is_recipient(&cred.credential.cert));
    // Decryption itself works (OAEP): the content is the signed message.
    let decrypted = envelope.decrypt(&cred.credential).expect("OAEP decrypts");
    assert!(String::from_utf8_lossy(&decrypted).contains("multipart/signed"));

    let domain = LocalDomain {
        name: "nhind.hsgincubator.com".into(),
        incoming_anchors: AnchorSet::from_certs(
            vec![cred.credential.cert.clone()],
            Path::new("self"),
        ),
        credentials: vec![cred],
        outgoing_anchors: AnchorSet::new(),
    };
    let err = Agent::new(AgentSettings::default())
        .open_for_domain(
            &domain,
            OpenRequest {
                message: &message,
                mail_from: None,
                rcpt_to: Vec::new(),
                at: agent::now(),
            },
        )
        .err()
        .expect("SHA-1 must be refused");
    assert_eq!(err.rule(), "digest");
    let text = err.to_string();
    assert!(
        text.contains("SHA1") && text.contains("forbidden"),
        "{text}"
    );
}

fn hispd(args: &[&str], stdin_file: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hispd"))
        .args(args)
        .stdin(std::fs::File::open(stdin_file).expect("stdin file"))
        .output()
        .expect("run hispd")
}

#[test]
fn cli_opens_the_java_ri_message_from_der_files() {
    let cert = fixture("interop/java-ri/ryan.der");
    let key = fixture("interop/java-ri/ryanKey.der");
    let good = fixture("interop/java-ri/SimpleInterop-anchor.der");
    let bad = fixture("interop/java-ri/unrelated-anchor.der");
    let msg = fixture("interop/java-ri/EncryptedMessage2.eml");
    let args = |anchor: &Path| {
        vec![
            "message".to_string(),
            "open".into(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--anchors".into(),
            anchor.display().to_string(),
        ]
    };
    let ok_args = args(&good);
    let out = hispd(
        &ok_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &msg,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Subject: test pic"));

    let bad_args = args(&bad);
    let out = hispd(
        &bad_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &msg,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("hispd: refused [signer-trust]"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn cli_refuses_the_dotnet_ri_message_for_sha1() {
    let pfx = fixture("interop/dotnet-ri/nhind_umamalga1_vm1.pfx");
    let anchor = fixture("interop/java-ri/SimpleInterop-anchor.der");
    let msg = fixture("interop/dotnet-ri/envelopeSignature.eml");
    let out = hispd(
        &[
            "message",
            "open",
            "--pkcs12",
            &pfx.display().to_string(),
            "--password",
            "passw0rd!",
            "--anchors",
            &anchor.display().to_string(),
        ],
        &msg,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("hispd: refused [digest]"), "{err}");
    assert!(err.contains("SHA1"), "{err}");
}
