//! Bad bytes from the network never crash the agent: thousands of mutated
//! and truncated messages, deterministic (a fixed-seed generator), each must
//! give a value — almost always a refusal — and never a panic.

mod common;

use common::world::*;
use hispd::address::DirectAddress;
use hispd::agent::{AgentSettings, OpenRequest, SealRequest};
use hispd::smime::mime::{split_multipart, Entity};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut m = original.to_vec();
    match rng.below(6) {
        0 => m.truncate(rng.below(m.len())),
        1 => {
            for _ in 0..=rng.below(8) {
                let i = rng.below(m.len());
                m[i] = rng.next() as u8;
            }
        }
        2 => {
            let i = rng.below(m.len());
            let len = rng.below(200);
            m.drain(i..(i + len).min(m.len()));
        }
        3 => {
            let i = rng.below(m.len());
            let junk: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
            m.splice(i..i, junk);
        }
        4 => {
            // Duplicate a slice (repeated boundaries, headers, base64 lines).
            let i = rng.below(m.len());
            let j = (i + rng.below(400)).min(m.len());
            let copy = m[i..j].to_vec();
            let at = rng.below(m.len());
            m.splice(at..at, copy);
        }
        _ => {
            // Line endings mangled: CRLF to LF, or CR removed at random.
            m.retain(|b| *b != b'\r' || !rng.next().is_multiple_of(3));
        }
    }
    m
}

#[test]
fn mutated_sealed_messages_never_panic() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    let sealed = agent
        .seal(SealRequest {
            from: DirectAddress::parse(ALICE).unwrap(),
            recipients: vec![DirectAddress::parse(BOB).unwrap()],
            message: &message("robust", "a body that will be mangled"),
            recipient_certificates: vec![world.receiver.cert.clone()],
            at: hispd::agent::now(),
        })
        .expect("seal")
        .message;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..4000 {
        let m = mutate(&mut rng, &sealed);
        let with_envelope = rng.next().is_multiple_of(2);
        let result = agent.open(OpenRequest {
            message: &m,
            mail_from: with_envelope.then(|| ALICE.to_string()),
            rcpt_to: if with_envelope {
                vec![DirectAddress::parse(BOB).unwrap()]
            } else {
                Vec::new()
            },
            at: hispd::agent::now(),
        });
        match result {
            Ok(opened) => {
                // Only harmless changes (outside the protected content) may pass.
                accepted += 1;
                assert!(String::from_utf8_lossy(&opened.message)
                    .contains("a body that will be mangled"));
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    assert!(
        refused > 1000,
        "most mutations must be refused ({refused} refused, {accepted} accepted)"
    );
}

#[test]
fn mime_parsing_of_random_bytes_never_panics() {
    let mut rng = Rng(42);
    let alphabet = b"-=:;\"\r\n \tabcXYZ0123boundary--Content-Type";
    for _ in 0..5000 {
        let len = rng.below(400);
        let data: Vec<u8> = (0..len)
            .map(|_| {
                if rng.next().is_multiple_of(4) {
                    rng.next() as u8
                } else {
                    alphabet[rng.below(alphabet.len())]
                }
            })
            .collect();
        if let Ok(e) = Entity::parse(&data) {
            let _ = e.content_type();
            let _ = e.decoded_body();
            let _ = e.multipart_parts();
        }
        let _ = split_multipart(&data, "b");
        let _ = hispd::smime::parse_encrypted(&data);
        let _ = hispd::smime::parse_signed(&data);
    }
}
