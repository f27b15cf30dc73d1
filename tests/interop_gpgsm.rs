//! Interoperability with GnuPG's gpgsm as an independent S/MIME peer. gpgsm
//! reads and writes bare CMS: the MIME around it is built here, as a mail
//! client would.

mod common;

use common::peers::*;
use common::world::*;
use hispd::address::DirectAddress;
use hispd::agent::{AgentSettings, SealRequest};
use hispd::smime::mime::{encode_base64_lines, Entity};

/// A gpgsm keyring holding both domains' certificates, trusting both CAs,
/// with `identity`'s private key.
fn gpgsm_with(world: &World, identity: &str) -> Gpgsm {
    let g = Gpgsm::new().expect("gpgsm home");
    g.trust_ca(&world.files("sender-ca").cert)
        .expect("trust sender CA");
    g.trust_ca(&world.files("receiver-ca").cert)
        .expect("trust receiver CA");
    let id = world.files(identity);
    g.import_identity(&id.cert, &id.key)
        .expect("import identity");
    for other in ["alice", "receiver"] {
        if other != identity {
            g.import_cert(&world.files(other).cert)
                .expect("import peer cert");
        }
    }
    g
}

#[test]
fn we_open_a_message_gpgsm_signed_and_encrypted() {
    let world = World::new();
    let g = gpgsm_with(&world, "alice");
    let alice_fpr = fpr_of(&world.files("alice").cert).expect("fpr");
    let receiver_fpr = fpr_of(&world.files("receiver").cert).expect("fpr");

    let wrapped = hispd::smime::wrap(&message("from gpgsm", "signed by GnuPG"));
    let signature = g.sign_detached(&wrapped, &alice_fpr).expect("gpgsm signs");
    let mut signed = b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256; boundary=\"gpgsm-b\"\r\n\r\n--gpgsm-b\r\n".to_vec();
    signed.extend_from_slice(&wrapped);
    signed.extend_from_slice(b"\r\n--gpgsm-b\r\nContent-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    signed.extend_from_slice(&encode_base64_lines(&signature));
    signed.extend_from_slice(b"--gpgsm-b--\r\n");

    let enveloped = g.encrypt(&signed, &receiver_fpr).expect("gpgsm encrypts");
    let msg = with_outer_headers(&hispd::smime::enveloped_entity(&enveloped));

    let opened = world
        .agent(AgentSettings::default())
        .open(open_request(&msg))
        .expect("a gpgsm message opens");
    assert!(String::from_utf8_lossy(&opened.message).contains("signed by GnuPG"));
    let r = &opened.report;
    assert_eq!(r.signer.digest, "SHA256");
    assert_eq!(r.envelope.content_cipher, "AES-256-CBC");
    assert!(r.signer.certificate.subject.contains(ALICE));
    assert_eq!(r.from, ALICE);
}

#[test]
fn gpgsm_decrypts_and_verifies_what_we_seal() {
    let world = World::new();
    let g = gpgsm_with(&world, "receiver");
    let sealed = world
        .agent(AgentSettings::default())
        .seal(SealRequest {
            from: DirectAddress::parse(ALICE).unwrap(),
            recipients: vec![DirectAddress::parse(BOB).unwrap()],
            message: &message("to gpgsm", "read by GnuPG"),
            recipient_certificates: vec![world.receiver.cert.clone()],
            at: hispd::agent::now(),
        })
        .expect("seal")
        .message;

    let outer = Entity::parse(&sealed).expect("outer");
    let der = outer.decoded_body().expect("base64");
    let signed = g.decrypt(&der).expect("gpgsm decrypts");

    let signed_entity = Entity::parse(&signed).expect("signed entity");
    let parts = signed_entity.multipart_parts().expect("two parts");
    assert_eq!(parts.len(), 2);
    let signature = Entity::parse(parts[1])
        .expect("sig part")
        .decoded_body()
        .expect("base64");
    g.verify_detached(&signature, parts[0])
        .expect("gpgsm verifies our signature");
    assert!(String::from_utf8_lossy(parts[0]).contains("read by GnuPG"));

    // gpgsm's verification is real: one changed byte fails it.
    let mut tampered = parts[0].to_vec();
    let at = tampered.len() - 3;
    tampered[at] ^= 0x01;
    assert!(g.verify_detached(&signature, &tampered).is_err());
}
