//! Interoperability with the `openssl cms` tool as an independent S/MIME peer.

mod common;

use common::peers::*;
use common::world::*;
use hispd::address::DirectAddress;
use hispd::agent::{AgentSettings, SealRequest};
use hispd::pki::{self, KeyKind, LeafSpec};
use hispd::smime::{ContentCipher, KeyTransport};

fn seal(world: &World, settings: AgentSettings, original: &[u8]) -> Vec<u8> {
    world
        .agent(settings)
        .seal(SealRequest {
            from: DirectAddress::parse(ALICE).unwrap(),
            recipients: vec![DirectAddress::parse(BOB).unwrap()],
            message: original,
            recipient_certificates: vec![world.receiver.cert.clone()],
            at: hispd::agent::now(),
        })
        .expect("seal")
        .message
}

#[test]
fn openssl_decrypts_and_verifies_what_we_seal() {
    let world = World::new();
    let original = message("lab results", "Potassium 4.1 mmol/L");
    let sealed = seal(&world, AgentSettings::default(), &original);
    let text = String::from_utf8_lossy(&sealed).to_string();
    assert!(text.contains("smime-type=enveloped-data"), "{text}");
    assert!(
        !text.contains("Potassium"),
        "clinical content must not travel in clear"
    );
    assert!(
        !text.contains("lab results"),
        "the default hides the Subject outside"
    );

    let receiver = world.files("receiver");
    let signed = openssl_decrypt(&sealed, &receiver.cert, &receiver.key).expect("openssl decrypts");
    let signed_text = String::from_utf8_lossy(&signed).to_string();
    assert!(signed_text.contains("multipart/signed"), "{signed_text}");
    assert!(signed_text.contains("micalg=sha-256"), "{signed_text}");

    let content = openssl_verify(&signed, &world.files("sender-ca").cert)
        .expect("openssl verifies against the anchor");
    let content_text = String::from_utf8_lossy(&content).to_string();
    assert!(
        content_text.starts_with("Content-Type: message/rfc822"),
        "{content_text}"
    );
    assert!(content_text.contains("Potassium 4.1 mmol/L"));
    assert!(content_text.contains("Subject: lab results"));

    // The other CA does not verify it: openssl_verify is a real check.
    assert!(openssl_verify(&signed, &world.files("receiver-ca").cert).is_err());

    let printed = openssl_cms_print(&sealed, false).expect("print");
    assert!(printed.contains("aes-256-cbc"), "{printed}");
    assert!(printed.contains("rsaEncryption"), "{printed}");
}

#[test]
fn cipher_and_oaep_settings_reach_the_wire() {
    let world = World::new();
    let settings = AgentSettings {
        cipher: ContentCipher::Aes128Cbc,
        key_transport: KeyTransport::RsaOaep,
        ..AgentSettings::default()
    };
    let sealed = seal(&world, settings, &message("x", "y"));
    let printed = openssl_cms_print(&sealed, false).expect("print");
    assert!(printed.contains("aes-128-cbc"), "{printed}");
    assert!(printed.contains("rsaesOaep"), "{printed}");
    let receiver = world.files("receiver");
    let signed =
        openssl_decrypt(&sealed, &receiver.cert, &receiver.key).expect("openssl decrypts OAEP");
    openssl_verify(&signed, &world.files("sender-ca").cert).expect("verifies");
}

/// openssl signs the wrapped message, then encrypts it, as another HISP would.
fn openssl_message(world: &World, digest: &str, cipher: &str, oaep: bool) -> Vec<u8> {
    let alice = world.files("alice");
    let wrapped = hispd::smime::wrap(&message("from openssl", "hello from openssl"));
    let signed = openssl_sign(&wrapped, &alice.cert, &alice.key, digest).expect("sign");
    let receiver = world.files("receiver");
    let encrypted =
        openssl_encrypt(&signed, &[receiver.cert.as_path()], cipher, oaep).expect("encrypt");
    with_outer_headers(&encrypted)
}

#[test]
fn we_open_what_openssl_makes_with_every_allowed_algorithm() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    let cases = [
        ("aes-128-cbc", false, "AES-128-CBC", "enveloped-data"),
        ("aes-256-cbc", false, "AES-256-CBC", "enveloped-data"),
        ("aes-256-gcm", false, "id-aes256-GCM", "authEnveloped-data"),
        ("aes-256-cbc", true, "AES-256-CBC", "enveloped-data"),
        ("aes-128-gcm", true, "id-aes128-GCM", "authEnveloped-data"),
    ];
    for (cipher, oaep, expected_cipher, structure) in cases {
        let msg = openssl_message(&world, "sha256", cipher, oaep);
        let opened = agent
            .open(open_request(&msg))
            .unwrap_or_else(|e| panic!("{cipher} oaep={oaep}: {e}"));
        assert!(String::from_utf8_lossy(&opened.message).contains("hello from openssl"));
        let r = &opened.report;
        assert_eq!(r.envelope.content_cipher, expected_cipher, "{cipher}");
        assert_eq!(r.envelope.structure, structure);
        let kt = if oaep { "RSAES-OAEP" } else { "rsaEncryption" };
        assert_eq!(r.envelope.key_transport, vec![kt.to_string()]);
        assert_eq!(r.signer.digest, "SHA256");
        assert!(r.wrapped);
        assert_eq!(r.from, ALICE);
    }
}

#[test]
fn sha384_and_sha512_signatures_are_accepted() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    for (digest, name) in [("sha384", "SHA384"), ("sha512", "SHA512")] {
        let msg = openssl_message(&world, digest, "aes-256-cbc", false);
        let opened = agent
            .open(open_request(&msg))
            .unwrap_or_else(|e| panic!("{digest}: {e}"));
        assert_eq!(opened.report.signer.digest, name);
        assert!(
            opened.report.warnings.is_empty(),
            "{:?}",
            opened.report.warnings
        );
    }
}

#[test]
fn x_pkcs7_mime_and_micalg_spellings_are_accepted() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    let alice = world.files("alice");
    let receiver = world.files("receiver");
    let wrapped = hispd::smime::wrap(&message("spelling", "body"));
    let signed = openssl_sign(&wrapped, &alice.cert, &alice.key, "sha256").expect("sign");
    // micalg without the hyphen, as some implementations write it.
    let signed = String::from_utf8_lossy(&signed).replace("micalg=\"sha-256\"", "micalg=sha256");
    assert!(signed.contains("micalg=sha256"), "{signed}");
    let encrypted = openssl_encrypt(
        signed.as_bytes(),
        &[receiver.cert.as_path()],
        "aes-256-cbc",
        false,
    )
    .expect("enc");
    let encrypted = String::from_utf8_lossy(&encrypted)
        .replace("application/pkcs7-mime", "application/x-pkcs7-mime");
    let msg = with_outer_headers(encrypted.as_bytes());
    let opened = agent.open(open_request(&msg)).expect("opens");
    assert_eq!(
        opened.report.envelope.media_type,
        "application/x-pkcs7-mime"
    );
    assert_eq!(opened.report.micalg.as_deref(), Some("sha256"));
    assert!(
        opened.report.warnings.is_empty(),
        "{:?}",
        opened.report.warnings
    );
}

#[test]
fn unwrapped_messages_open_with_a_warning() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    let alice = world.files("alice");
    let receiver = world.files("receiver");
    let entity = b"Content-Type: text/plain\r\n\r\nunwrapped body\r\n";
    let signed = openssl_sign(entity, &alice.cert, &alice.key, "sha256").expect("sign");
    let encrypted =
        openssl_encrypt(&signed, &[receiver.cert.as_path()], "aes-256-cbc", false).expect("enc");
    let msg = with_outer_headers(&encrypted);
    let opened = agent.open(open_request(&msg)).expect("opens");
    assert!(!opened.report.wrapped);
    assert!(opened
        .report
        .warnings
        .iter()
        .any(|w| w.contains("not wrapped")));
    let text = String::from_utf8_lossy(&opened.message).to_string();
    assert!(text.starts_with(&format!("From: {ALICE}")), "{text}");
    assert!(text.contains("unwrapped body"));
    assert!(text.contains("Content-Type: text/plain"));
}

#[test]
fn ecdsa_signers_on_p256_and_p384_are_accepted() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    let receiver = world.files("receiver");
    for (kind, label) in [
        (KeyKind::EcP256, "ECDSA P-256"),
        (KeyKind::EcP384, "ECDSA P-384"),
    ] {
        let spec = LeafSpec {
            key: kind,
            ..LeafSpec::address(ALICE)
        };
        let ec = pki::issue(&world.sender_ca, &spec).expect("ec leaf");
        let dir = world.path(label);
        pki::save(&ec, &dir).expect("save");
        let wrapped = hispd::smime::wrap(&message("ec", "signed with ECDSA"));
        let signed = openssl_sign(
            &wrapped,
            &dir.join("cert.pem"),
            &dir.join("key.pem"),
            "sha256",
        )
        .expect("sign");
        let encrypted = openssl_encrypt(&signed, &[receiver.cert.as_path()], "aes-256-cbc", false)
            .expect("enc");
        let msg = with_outer_headers(&encrypted);
        let opened = agent
            .open(open_request(&msg))
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(opened.report.signer.key, label);
        assert!(
            opened.report.signer.signature_algorithm.contains("ecdsa"),
            "{}",
            opened.report.signer.signature_algorithm
        );
    }
}

#[test]
fn several_recipients_each_decrypt_one_message() {
    let world = World::new();
    let carol_cert = pki::issue(
        &world.receiver_ca,
        &LeafSpec::address("carol@receiver.example"),
    )
    .expect("carol");
    let carol_dir = world.path("carol");
    pki::save(&carol_cert, &carol_dir).expect("save");
    let sealed = world
        .agent(AgentSettings::default())
        .seal(SealRequest {
            from: DirectAddress::parse(ALICE).unwrap(),
            recipients: vec![
                DirectAddress::parse(BOB).unwrap(),
                DirectAddress::parse("carol@receiver.example").unwrap(),
            ],
            message: &message("to two", "both read this"),
            recipient_certificates: vec![world.receiver.cert.clone(), carol_cert.cert.clone()],
            at: hispd::agent::now(),
        })
        .expect("seal");
    assert_eq!(sealed.report.recipients.len(), 2);
    for dir in [world.path("receiver"), carol_dir] {
        let signed = openssl_decrypt(&sealed.message, &dir.join("cert.pem"), &dir.join("key.pem"))
            .expect("decrypt");
        let content = openssl_verify(&signed, &world.files("sender-ca").cert).expect("verify");
        assert!(String::from_utf8_lossy(&content).contains("both read this"));
    }
}

#[test]
fn the_java_ri_large_message_survives_seal_openssl_and_open_byte_for_byte() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/interop/java-ri/LargeMsgWithAttachments.eml");
    let original = std::fs::read(path).expect("LargeMsgWithAttachments.eml");
    assert!(original.len() > 800_000);
    // Readdress it from Alice to Bob so that both domains are ours.
    let mut message = format!("From: {ALICE}\r\nTo: {BOB}\r\n").into_bytes();
    let body_start = hispd::smime::mime::Entity::parse(&original).expect("parses");
    let keep: Vec<u8> = body_start
        .headers
        .iter()
        .filter(|h| !["from", "to", "cc"].contains(&h.name.to_ascii_lowercase().as_str()))
        .flat_map(|h| h.raw.clone())
        .collect();
    message.extend_from_slice(&keep);
    message.extend_from_slice(b"\r\n");
    message.extend_from_slice(body_start.body);

    let world = World::new();
    let sealed = seal(&world, AgentSettings::default(), &message);
    let receiver = world.files("receiver");
    let signed = openssl_decrypt(&sealed, &receiver.cert, &receiver.key).expect("openssl decrypts");
    openssl_verify(&signed, &world.files("sender-ca").cert).expect("openssl verifies");

    let opened = world
        .agent(AgentSettings::default())
        .open(open_request(&sealed))
        .expect("opens");
    // Unchanged, but for the Message-ID that sealing adds when it is missing.
    let expected = crlf(&message);
    let got = &opened.message;
    assert!(got.starts_with(b"Message-ID: <"), "a Message-ID was added");
    let added = got
        .iter()
        .position(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    assert!(
        got[added..] == expected[..],
        "the 865 KB message comes back unchanged"
    );
}

/// The daemon hands a received message over to the agent
/// (`open_owned_for_domain`, which drops it once decoded): the result must
/// be exactly what opening a borrowed message gives, for a message we
/// sealed (wrapped) and for one openssl made (unwrapped: its headers come
/// from the outer message, which is no longer there whole).
#[test]
fn opening_a_handed_over_message_gives_the_same_result() {
    let world = World::new();
    let agent = world.agent(AgentSettings::default());
    let alice = world.files("alice");
    let receiver = world.files("receiver");
    let ours = seal(
        &world,
        AgentSettings::default(),
        &message("handed over", "Sodium 140 mmol/L"),
    );
    let signed = openssl_sign(
        b"Content-Type: text/plain\r\n\r\nunwrapped body\r\n",
        &alice.cert,
        &alice.key,
        "sha256",
    )
    .expect("sign");
    let theirs = with_outer_headers(
        &openssl_encrypt(&signed, &[receiver.cert.as_path()], "aes-128-cbc", false).expect("enc"),
    );
    // Over 1 MiB the EnvelopedData is parsed without its encrypted content
    // and decrypted from the received buffer: the same result again, from
    // us (streamed BER, AES-256-CBC) and from openssl (AES-256-GCM).
    let big_body =
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(24_000);
    let ours_large = seal(
        &world,
        AgentSettings::default(),
        &message("handed over, large", &big_body),
    );
    let big_signed = openssl_sign(
        format!("Content-Type: text/plain\r\n\r\n{big_body}").as_bytes(),
        &alice.cert,
        &alice.key,
        "sha256",
    )
    .expect("sign");
    let theirs_large = with_outer_headers(
        &openssl_encrypt(
            &big_signed,
            &[receiver.cert.as_path()],
            "aes-256-gcm",
            false,
        )
        .expect("enc"),
    );
    assert!(ours_large.len() > 2 << 20 && theirs_large.len() > 2 << 20);
    let domain = agent.domain("receiver.example").expect("local domain");
    for msg in [ours, theirs, ours_large, theirs_large] {
        let borrowed = agent.open(open_request(&msg)).expect("opens borrowed");
        let owned = agent
            .open_owned_for_domain(domain, msg.clone(), open_request(&[]))
            .expect("opens handed over");
        assert_eq!(owned.message, borrowed.message);
        let text = owned.message.trim_ascii_end();
        assert!(
            (text.ends_with(b"0123456789abcdef") && text.len() > big_body.len())
                || text.ends_with(b"Sodium 140 mmol/L")
                || text.ends_with(b"unwrapped body"),
            "the content comes out whole: {:?}",
            String::from_utf8_lossy(&text[text.len().saturating_sub(60)..])
        );
        assert_eq!(
            serde_json::to_value(&owned.report).unwrap(),
            serde_json::to_value(&borrowed.report).unwrap()
        );
    }
    // What fails, fails the same way.
    let plain = b"From: alice@sender.example\r\nTo: bob@receiver.example\r\n\r\nhello\r\n";
    let a = agent.open(open_request(plain)).err().expect("refused");
    let b = agent
        .open_owned_for_domain(domain, plain.to_vec(), open_request(&[]))
        .err()
        .expect("refused");
    assert_eq!(a.to_string(), b.to_string());
}

/// The outer (unprotected) header: exactly From, To, Cc, Date, Message-ID,
/// In-Reply-To, References and MIME-Version are copied; the Subject is
/// replaced by the configured text unless `outer_subject = "copy"`; every
/// other header (and the body) travels only inside, where openssl finds it.
#[test]
fn only_the_routing_headers_travel_outside() {
    use hispd::agent::OuterSubject;
    let world = World::new();
    let original = format!(
        "From: Alice <{ALICE}>\r\nTo: Bob <{BOB}>\r\nCc: Carol <carol@receiver.example>\r\n\
         Subject: HIV test result\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <m7@sender.example>\r\nIn-Reply-To: <m6@receiver.example>\r\n\
         References: <m5@sender.example> <m6@receiver.example>\r\nX-Patient-Id: 12345\r\n\
         Keywords: confidential\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nnegative\r\n"
    )
    .into_bytes();
    let header_of = |sealed: &[u8]| -> Vec<(String, String)> {
        let text = String::from_utf8_lossy(sealed).to_string();
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_string();
        head.replace("\r\n ", " ")
            .replace("\r\n\t", " ")
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect()
    };
    let sealed = seal(&world, AgentSettings::default(), &original);
    let outer = header_of(&sealed);
    let names: Vec<&str> = outer.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "From",
        "To",
        "Cc",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "MIME-Version",
        "Subject",
        "Content-Type",
    ] {
        assert!(
            names.iter().any(|n| n.eq_ignore_ascii_case(name)),
            "{name} outside: {outer:?}"
        );
    }
    let allowed = [
        "from",
        "to",
        "cc",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "subject",
        "content-type",
        "content-disposition",
        "content-transfer-encoding",
        "content-description",
    ];
    for (name, value) in &outer {
        assert!(
            allowed.contains(&name.to_ascii_lowercase().as_str()),
            "{name}: {value} must not travel outside"
        );
    }
    let value = |name: &str| {
        outer
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("In-Reply-To"), "<m6@receiver.example>");
    assert_eq!(
        value("References"),
        "<m5@sender.example> <m6@receiver.example>"
    );
    assert!(!value("Subject").contains("HIV"), "{outer:?}");
    // Inside, everything is kept.
    let receiver = world.files("receiver");
    let signed = openssl_decrypt(&sealed, &receiver.cert, &receiver.key).expect("decrypt");
    let inner = openssl_verify(&signed, &world.files("sender-ca").cert).expect("verify");
    let inner = String::from_utf8_lossy(&inner).to_string();
    for line in [
        "Subject: HIV test result",
        "X-Patient-Id: 12345",
        "Keywords: confidential",
    ] {
        assert!(inner.contains(line), "{line} inside: {inner}");
    }

    // outer_subject = "copy": the Subject is copied as written.
    let copy = AgentSettings {
        outer_subject: OuterSubject::Copy,
        ..AgentSettings::default()
    };
    let outer = header_of(&seal(&world, copy, &original));
    assert!(
        outer
            .iter()
            .any(|(n, v)| n == "Subject" && v == "HIV test result"),
        "{outer:?}"
    );
    assert!(!outer.iter().any(|(n, _)| n == "X-Patient-Id"), "{outer:?}");
}
