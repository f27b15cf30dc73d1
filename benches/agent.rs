//! Seal and open for a 5 KB and a 1 MB message. Run with `cargo bench` or
//! `scripts/bench.sh`, which also measures `openssl speed rsa2048` in the
//! same run and writes the ratios that docs/PERFORMANCE.md records.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hispd::address::DirectAddress;
use hispd::agent::{
    Agent, AgentSettings, LocalDomain, OpenRequest, PrivateCredential, SealRequest,
};
use hispd::pki::{self, LeafSpec};
use hispd::trust::AnchorSet;
use std::path::Path;

const ALICE: &str = "alice@sender.example";
const BOB: &str = "bob@receiver.example";

fn setup() -> (Agent, openssl::x509::X509) {
    let sender_ca = pki::new_ca("Sender CA", 2048).expect("ca");
    let receiver_ca = pki::new_ca("Receiver CA", 2048).expect("ca");
    let alice = pki::issue(&sender_ca, &LeafSpec::address(ALICE)).expect("leaf");
    let bob = pki::issue(&receiver_ca, &LeafSpec::domain("receiver.example")).expect("leaf");
    let mut agent = Agent::new(AgentSettings::default());
    agent.add_domain(LocalDomain {
        name: "sender.example".into(),
        credentials: vec![PrivateCredential::new(alice, "bench")],
        incoming_anchors: AnchorSet::from_certs(vec![receiver_ca.cert.clone()], Path::new("bench")),
        outgoing_anchors: AnchorSet::from_certs(vec![receiver_ca.cert.clone()], Path::new("bench")),
    });
    agent.add_domain(LocalDomain {
        name: "receiver.example".into(),
        credentials: vec![PrivateCredential::new(bob.clone(), "bench")],
        incoming_anchors: AnchorSet::from_certs(vec![sender_ca.cert.clone()], Path::new("bench")),
        outgoing_anchors: AnchorSet::from_certs(vec![sender_ca.cert.clone()], Path::new("bench")),
    });
    (agent, bob.cert)
}

/// A message of about `size` bytes: text lines of 76 characters.
fn message(size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {ALICE}\r\nTo: {BOB}\r\nSubject: bench\r\nMessage-ID: <b@sender.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog; 0123456789 ABCDEFGHIJKLMNOPQR\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

fn bench(c: &mut Criterion) {
    let (agent, bob_cert) = setup();
    let mut group = c.benchmark_group("agent");
    for (label, size) in [("5KB", 5 * 1024), ("1MB", 1024 * 1024)] {
        let original = message(size);
        let seal = || {
            agent
                .seal(SealRequest {
                    from: DirectAddress::parse(ALICE).expect("addr"),
                    recipients: vec![DirectAddress::parse(BOB).expect("addr")],
                    message: &original,
                    recipient_certificates: vec![bob_cert.clone()],
                    at: hispd::agent::now(),
                })
                .expect("seal")
                .message
        };
        let sealed = seal();
        group.throughput(Throughput::Bytes(original.len() as u64));
        if size > 100_000 {
            group.sample_size(20);
        }
        group.bench_function(BenchmarkId::new("seal", label), |b| b.iter(seal));
        group.bench_function(BenchmarkId::new("open", label), |b| {
            b.iter(|| {
                agent
                    .open(OpenRequest {
                        message: &sealed,
                        mail_from: Some(ALICE.into()),
                        rcpt_to: vec![DirectAddress::parse(BOB).expect("addr")],
                        at: hispd::agent::now(),
                    })
                    .expect("open")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
