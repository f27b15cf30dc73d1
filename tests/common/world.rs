//! Two Direct domains with a real PKI on disk, for integration tests:
//! `sender.example` (Alice, address-bound) and `receiver.example`
//! (domain-bound). Each domain trusts the other's CA in both directions.

use hispd::address::DirectAddress;
use hispd::agent::{Agent, AgentSettings, LocalDomain, OpenRequest, PrivateCredential};
use hispd::pki::{self, Credential, LeafSpec};
use hispd::trust::AnchorSet;
use std::path::{Path, PathBuf};

pub const ALICE: &str = "alice@sender.example";
pub const BOB: &str = "bob@receiver.example";

pub struct World {
    pub dir: tempfile::TempDir,
    pub sender_ca: Credential,
    pub receiver_ca: Credential,
    pub alice: Credential,
    pub receiver: Credential,
}

/// Paths of a credential saved with `pki::save`.
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let sender_ca = pki::new_ca("Sender CA", 2048).expect("ca");
        let receiver_ca = pki::new_ca("Receiver CA", 2048).expect("ca");
        let alice = pki::issue(&sender_ca, &LeafSpec::address(ALICE)).expect("alice");
        let receiver =
            pki::issue(&receiver_ca, &LeafSpec::domain("receiver.example")).expect("receiver");
        let w = World {
            dir,
            sender_ca,
            receiver_ca,
            alice,
            receiver,
        };
        for (name, cred) in [
            ("sender-ca", &w.sender_ca),
            ("receiver-ca", &w.receiver_ca),
            ("alice", &w.alice),
            ("receiver", &w.receiver),
        ] {
            pki::save(cred, &w.dir.path().join(name)).expect("save");
        }
        w
    }

    pub fn files(&self, name: &str) -> Files {
        Files {
            cert: self.dir.path().join(name).join("cert.pem"),
            key: self.dir.path().join(name).join("key.pem"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn agent(&self, settings: AgentSettings) -> Agent {
        let mut agent = Agent::new(settings);
        let trust_receiver = AnchorSet::from_certs(
            vec![self.receiver_ca.cert.clone()],
            Path::new("receiver-ca"),
        );
        let trust_sender =
            AnchorSet::from_certs(vec![self.sender_ca.cert.clone()], Path::new("sender-ca"));
        agent.add_domain(LocalDomain {
            name: "sender.example".into(),
            credentials: vec![PrivateCredential::new(self.alice.clone(), "alice")],
            incoming_anchors: trust_receiver.clone(),
            outgoing_anchors: trust_receiver,
        });
        agent.add_domain(LocalDomain {
            name: "receiver.example".into(),
            credentials: vec![PrivateCredential::new(self.receiver.clone(), "receiver")],
            incoming_anchors: trust_sender.clone(),
            outgoing_anchors: trust_sender,
        });
        agent
    }
}

/// A plain message from Alice to Bob.
pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Alice <{ALICE}>\r\nTo: Bob <{BOB}>\r\nSubject: {subject}\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@sender.example>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// An open request for Bob with the envelope from Alice.
pub fn open_request(message: &[u8]) -> OpenRequest<'_> {
    OpenRequest {
        message,
        mail_from: Some(ALICE.to_string()),
        rcpt_to: vec![DirectAddress::parse(BOB).expect("bob")],
        at: hispd::agent::now(),
    }
}

/// Puts From/To headers above an S/MIME entity produced by another tool.
pub fn with_outer_headers(entity: &[u8]) -> Vec<u8> {
    let mut out = format!("From: {ALICE}\r\nTo: {BOB}\r\nSubject: interop\r\n").into_bytes();
    out.extend_from_slice(entity);
    out
}

pub fn crlf(data: &[u8]) -> Vec<u8> {
    hispd::smime::mime::to_crlf(data).into_owned()
}
