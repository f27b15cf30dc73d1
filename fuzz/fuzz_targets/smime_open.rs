//! The whole incoming security and trust agent on arbitrary bytes, as if
//! they were a message received over SMTP: `Agent::open` with and without an
//! envelope, for an Agent whose keys and anchors are the fuzzing-only PKI in
//! `fuzz/pki/` (the corpus holds messages sealed for it, so mutations reach
//! decryption, signature verification, trust and unwrapping). The signed
//! layer is also parsed and verified on the raw input, because mutated
//! ciphertext rarely decrypts.
#![no_main]

use hispd::address::DirectAddress;
use hispd::agent::{Agent, AgentSettings, LocalDomain, OpenRequest, PrivateCredential};
use hispd::pki::Credential;
use hispd::trust::AnchorSet;
use libfuzzer_sys::fuzz_target;
use openssl::pkey::PKey;
use openssl::x509::X509;
use std::path::Path;
use std::sync::OnceLock;

const CLINIC: &str = "direct.sunrise-clinic.example";
const APP: &str = "direct.patient-app.example";
const JAVA_RI: &str = "securehealthemail.com";

struct World {
    agent: Agent,
    /// The fixed moment validity is judged at (inside the PKI's validity).
    at: i64,
    mail_from: String,
    rcpt_to: Vec<DirectAddress>,
}

fn pem_credential(cert: &[u8], key: &[u8]) -> PrivateCredential {
    let credential = Credential {
        cert: X509::from_pem(cert).expect("fuzz/pki certificate"),
        key: PKey::private_key_from_pem(key).expect("fuzz/pki key"),
        chain: Vec::new(),
    };
    PrivateCredential::new(credential, "fuzz/pki")
}

fn anchors(certs: Vec<X509>) -> AnchorSet {
    AnchorSet::from_certs(certs, Path::new("fuzz/pki"))
}

/// `$HISPD_FIXTURES` or `../shared/fixtures` beside the project.
fn fixtures() -> std::path::PathBuf {
    std::env::var_os("HISPD_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"))
}

/// The Java RI's test recipient credential and its anchor, if present.
fn java_ri() -> Option<(Credential, X509)> {
    let dir = fixtures().join("interop/java-ri");
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    let credential = Credential {
        cert: X509::from_der(&read("ryan.der")?).ok()?,
        key: PKey::private_key_from_der(&read("ryanKey.der")?).ok()?,
        chain: Vec::new(),
    };
    let anchor = X509::from_der(&read("SimpleInterop-anchor.der")?).ok()?;
    Some((credential, anchor))
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let clinic_ca = X509::from_pem(include_bytes!("../pki/clinic-ca.pem")).expect("clinic CA");
        let app_ca = X509::from_pem(include_bytes!("../pki/app-ca.pem")).expect("app CA");
        let mut agent = Agent::new(AgentSettings::default());
        agent.add_domain(LocalDomain {
            name: CLINIC.into(),
            credentials: vec![pem_credential(
                include_bytes!("../pki/clinic-cert.pem"),
                include_bytes!("../pki/clinic-key.pem"),
            )],
            incoming_anchors: anchors(vec![app_ca.clone()]),
            outgoing_anchors: anchors(vec![app_ca.clone()]),
        });
        agent.add_domain(LocalDomain {
            name: APP.into(),
            credentials: vec![pem_credential(
                include_bytes!("../pki/app-cert.pem"),
                include_bytes!("../pki/app-key.pem"),
            )],
            incoming_anchors: anchors(vec![clinic_ca.clone()]),
            outgoing_anchors: anchors(vec![clinic_ca]),
        });
        // The Java reference implementation's test recipient, read in place
        // from the shared fixtures when they are there, so that its message
        // (which scripts/fuzz.sh adds to the working corpus) opens too.
        if let Some((ryan, java_anchor)) = java_ri() {
            agent.add_domain(LocalDomain {
                name: JAVA_RI.into(),
                credentials: vec![PrivateCredential::new(ryan, "fixtures/interop/java-ri")],
                incoming_anchors: anchors(vec![java_anchor.clone()]),
                outgoing_anchors: anchors(vec![java_anchor]),
            });
        }
        let at = include_str!("../pki/at")
            .trim()
            .parse()
            .expect("fuzz/pki/at: Unix seconds");
        World {
            agent,
            at,
            mail_from: "dr.lee@direct.sunrise-clinic.example".into(),
            rcpt_to: vec![
                DirectAddress::parse("jane.doe@direct.patient-app.example").expect("address")
            ],
        }
    })
}

fn exercise(result: Result<hispd::agent::Opened, hispd::agent::AgentError>) {
    match result {
        Ok(opened) => {
            let _ = opened.report.summary();
            let _ = serde_json::to_string(&opened.report);
        }
        Err(e) => {
            let _ = e.rule();
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    let w = world();
    // As received over SMTP, with an envelope...
    exercise(w.agent.open(OpenRequest {
        message: data,
        mail_from: Some(w.mail_from.clone()),
        rcpt_to: w.rcpt_to.clone(),
        at: w.at,
    }));
    // ...and without one (`hispd message open`): the headers name the domain.
    exercise(w.agent.open(OpenRequest {
        message: data,
        mail_from: None,
        rcpt_to: Vec::new(),
        at: w.at,
    }));
    // The signed layer on its own (what decryption normally yields).
    if let Ok(mut signed) = hispd::smime::parse_signed(data) {
        let _ = signed.digests();
        if let Ok(verified) = signed.verify() {
            for s in &verified.signers {
                let _ = hispd::trust::check_digest(s.digest);
                let _ = hispd::trust::bindings(&s.cert);
            }
        }
    }
});
