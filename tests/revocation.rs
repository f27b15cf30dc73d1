//! Revocation and AIA chain completion in certificate discovery, against a
//! real authoritative DNS server (BIND, CERT records) and CRLs / issuer
//! certificates served by Python's http.server: DCDT D17 (revoked
//! certificates) and D18 (an intermediate only reachable through AIA), the
//! soft- and hard-fail CRL policies, and the receiving side's
//! `validate_with_crls`.

mod common;

use common::servers::{cert_rr, free_port, Bind, HttpServer};
use hispd::address::DirectAddress;
use hispd::discovery::{
    CertificateSet, Discovered, Discovery, DiscoveryConfig, SourceKind, TrustContext,
};
use hispd::http::FetchLimits;
use hispd::pki::{self, Credential};
use hispd::trust::revocation::{self, CrlPolicy, RevocationChecker};
use hispd::trust::{self, AnchorSet, Direction, TrustError};
use openssl::asn1::{Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{
    X509Builder, X509Crl, X509CrlBuilder, X509Extension, X509NameBuilder, X509RevokedBuilder, X509,
};
use std::path::Path;
use std::time::Duration;

// ---------------------------------------------------------------------------
// PKI with CRL distribution points and AIA
// ---------------------------------------------------------------------------

fn now() -> i64 {
    hispd::agent::now()
}

/// Extensions naming where to fetch things.
#[derive(Default, Clone, Copy)]
struct Urls<'a> {
    crl: Option<&'a str>,
    ca_issuers: Option<&'a str>,
}

/// A certificate signed by `issuer` (or self-signed): a CA when `email` is
/// `None`, else an address-bound Direct leaf for `email`.
fn certificate(
    issuer: Option<&Credential>,
    common_name: &str,
    email: Option<&str>,
    urls: Urls,
) -> Credential {
    let key = PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey");
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .expect("cn");
    let name = name.build();
    let mut b = X509Builder::new().expect("builder");
    b.set_version(2).expect("version");
    let mut serial = BigNum::new().expect("bn");
    serial
        .rand(120, MsbOption::MAYBE_ZERO, false)
        .expect("rand");
    b.set_serial_number(&serial.to_asn1_integer().expect("serial"))
        .expect("serial");
    b.set_subject_name(&name).expect("subject");
    b.set_issuer_name(issuer.map_or(&*name, |i| i.cert.subject_name()))
        .expect("issuer");
    b.set_pubkey(&key).expect("key");
    b.set_not_before(&Asn1Time::from_unix(now() - 3600).expect("time"))
        .expect("nb");
    b.set_not_after(&Asn1Time::from_unix(now() + 365 * 86400).expect("time"))
        .expect("na");
    match email {
        None => {
            b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
                .expect("bc");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .expect("ku"),
            )
            .expect("ku");
        }
        Some(address) => {
            b.append_extension(BasicConstraints::new().critical().build().expect("bc"))
                .expect("bc");
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .key_encipherment()
                    .build()
                    .expect("ku"),
            )
            .expect("ku");
            b.append_extension(
                ExtendedKeyUsage::new()
                    .email_protection()
                    .build()
                    .expect("eku"),
            )
            .expect("eku");
            let san = SubjectAlternativeName::new()
                .email(address)
                .build(&b.x509v3_context(issuer.map(|i| &*i.cert), None))
                .expect("san");
            b.append_extension(san).expect("san");
        }
    }
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(issuer.map(|i| &*i.cert), None))
        .expect("ski");
    b.append_extension(ski).expect("ski");
    if let Some(i) = issuer {
        let aki = AuthorityKeyIdentifier::new()
            .keyid(false)
            .build(&b.x509v3_context(Some(&i.cert), None))
            .expect("aki");
        b.append_extension(aki).expect("aki");
    }
    #[allow(deprecated)]
    {
        if let Some(url) = urls.crl {
            let ext = X509Extension::new_nid(
                None,
                None,
                Nid::CRL_DISTRIBUTION_POINTS,
                &format!("URI:{url}"),
            )
            .expect("cdp");
            b.append_extension(ext).expect("cdp");
        }
        if let Some(url) = urls.ca_issuers {
            let ext = X509Extension::new_nid(
                None,
                None,
                Nid::INFO_ACCESS,
                &format!("caIssuers;URI:{url}"),
            )
            .expect("aia");
            b.append_extension(ext).expect("aia");
        }
    }
    let signer = issuer.map_or(&key, |i| &i.key);
    b.sign(signer, MessageDigest::sha256()).expect("sign");
    Credential {
        cert: b.build(),
        key,
        chain: Vec::new(),
    }
}

fn root(cn: &str) -> Credential {
    pki::new_ca(cn, 2048).expect("root")
}

fn ca(issuer: &Credential, cn: &str, urls: Urls) -> Credential {
    certificate(Some(issuer), cn, None, urls)
}

fn leaf(issuer: &Credential, cn: &str, address: &str, urls: Urls) -> Credential {
    certificate(Some(issuer), cn, Some(address), urls)
}

/// A CRL by `ca` listing `revoked`, in force from an hour ago for a day.
fn crl(ca: &Credential, revoked: &[&X509]) -> X509Crl {
    crl_signed_with(ca, &ca.key, revoked)
}

fn crl_signed_with(
    ca: &Credential,
    key: &PKey<openssl::pkey::Private>,
    revoked: &[&X509],
) -> X509Crl {
    let mut b = X509CrlBuilder::new().expect("crl builder");
    b.set_issuer_name(ca.cert.subject_name()).expect("issuer");
    b.set_last_update(&Asn1Time::from_unix(now() - 3600).expect("time"))
        .expect("last");
    b.set_next_update(&Asn1Time::from_unix(now() + 86400).expect("time"))
        .expect("next");
    for cert in revoked {
        let mut r = X509RevokedBuilder::new().expect("revoked");
        let serial = cert
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_asn1_integer())
            .expect("serial");
        r.set_serial_number(&serial).expect("serial");
        r.set_revocation_date(&Asn1Time::from_unix(now() - 600).expect("time"))
            .expect("date");
        b.add_revoked(r.build()).expect("add");
    }
    // authorityKeyIdentifier { keyIdentifier [0] } and cRLNumber 1, in DER.
    let key_id = ca
        .cert
        .subject_key_id()
        .map(|k| k.as_slice().to_vec())
        .expect("the CA has a subjectKeyIdentifier");
    let mut aki = vec![0x30, (key_id.len() + 2) as u8, 0x80, key_id.len() as u8];
    aki.extend(&key_id);
    let ext = |oid: &str, der: &[u8]| {
        X509Extension::new_from_der(
            &Asn1Object::from_str(oid).expect("oid"),
            false,
            &Asn1OctetString::new_from_bytes(der).expect("octets"),
        )
        .expect("extension")
    };
    b.append_extension(ext("2.5.29.35", &aki)).expect("aki");
    b.append_extension(ext("2.5.29.20", &[0x02, 0x01, 0x01]))
        .expect("crl number");
    b.sort().expect("sort");
    b.sign(key, MessageDigest::sha256()).expect("sign");
    b.build().expect("crl")
}

// ---------------------------------------------------------------------------
// servers and discovery
// ---------------------------------------------------------------------------

/// BIND serving the CERT records `(owner, certificate)` in zone `example`.
fn bind(records: &[(&str, &X509)]) -> Bind {
    let zone: String = records
        .iter()
        .map(|(owner, cert)| cert_rr(owner, &cert.to_der().expect("der")))
        .collect();
    Bind::start(&[("example", &zone)]).expect("named")
}

fn discovery(bind: &Bind) -> Discovery {
    let config = DiscoveryConfig {
        sources: vec![SourceKind::Dns],
        nameservers: vec![bind.addr()],
        dns_timeout: Duration::from_secs(2),
        http: FetchLimits {
            timeout: Duration::from_secs(3),
            ..FetchLimits::default()
        },
        positive_ttl: Duration::ZERO,
        negative_ttl: Duration::ZERO,
        ..DiscoveryConfig::default()
    };
    Discovery::new(config, CertificateSet::new(), CertificateSet::new()).expect("discovery")
}

fn ctx(anchor: &Credential) -> TrustContext {
    TrustContext {
        domain: "sender.example".into(),
        anchors: Some(anchors(anchor)),
        at: now(),
        min_rsa_bits: 2048,
    }
}

fn anchors(anchor: &Credential) -> AnchorSet {
    AnchorSet::from_certs(vec![anchor.cert.clone()], Path::new("test-anchor"))
}

fn discover(d: &Discovery, address: &str, anchor: &Credential) -> Discovered {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(d.discover(
        &DirectAddress::parse(address).expect("address"),
        &ctx(anchor),
    ))
}

fn chosen(found: &Discovered) -> Vec<String> {
    found
        .report
        .chosen
        .iter()
        .map(|c| c.fingerprint_sha256.clone())
        .collect()
}

fn candidate<'a>(found: &'a Discovered, cert: &X509) -> &'a hispd::discovery::CandidateReport {
    let fp = trust::fingerprint(cert);
    found
        .report
        .candidates
        .iter()
        .find(|c| c.fingerprint_sha256 == fp)
        .unwrap_or_else(|| panic!("candidate listed\n{}", found.report.explain()))
}

fn write(dir: &Path, file: &str, data: &[u8]) {
    std::fs::write(dir.join(file), data).expect("write");
}

// ---------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------

/// DCDT D17: three address-bound certificates in DNS, two revoked by the CRL
/// at their distribution point: only the third is chosen, and the
/// explanation says the others are revoked.
#[test]
fn d17_revoked_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let http = HttpServer::start(dir.path());
    let crl_url = http.url("d17.crl");
    let anchor = root("D17 test CA");
    let urls = Urls {
        crl: Some(&crl_url),
        ..Urls::default()
    };
    let a = leaf(&anchor, "alice d17 A", "alice@d17.example", urls);
    let b = leaf(&anchor, "alice d17 B", "alice@d17.example", urls);
    let c = leaf(&anchor, "alice d17 C", "alice@d17.example", urls);
    write(
        dir.path(),
        "d17.crl",
        &crl(&anchor, &[&a.cert, &c.cert]).to_der().expect("der"),
    );
    let named = bind(&[
        ("alice.d17", &a.cert),
        ("alice.d17", &b.cert),
        ("alice.d17", &c.cert),
    ]);
    let d = discovery(&named);

    let found = discover(&d, "alice@d17.example", &anchor);
    let text = found.report.explain();
    assert_eq!(
        chosen(&found),
        vec![trust::fingerprint(&b.cert)],
        "D17\n{text}"
    );
    assert_eq!(found.report.candidates.len(), 3, "{text}");
    for revoked in [&a, &c] {
        let cand = candidate(&found, &revoked.cert);
        assert!(
            !cand.usable && cand.reason.contains("revoked"),
            "{}\n{text}",
            cand.reason
        );
    }
    let good = candidate(&found, &b.cert);
    assert!(good.usable, "{text}");
    assert!(good.reason.contains("not revoked"), "{}", good.reason);
    assert_eq!(text.matches("is revoked").count(), 2, "{text}");
    assert!(
        text.contains("fetched from") && text.contains(&crl_url),
        "the CRL fetch is explained\n{text}"
    );
    assert!(found.report.warnings.is_empty(), "{text}");

    // The CRL is cached until its nextUpdate: with the file gone, the next
    // discovery still knows about the revocations.
    let checker = d.revocation().expect("revocation is on by default");
    assert_eq!(checker.cached_crls(), 1);
    std::fs::remove_file(dir.path().join("d17.crl")).expect("rm");
    let again = discover(&d, "alice@d17.example", &anchor);
    let text = again.report.explain();
    assert_eq!(chosen(&again), vec![trust::fingerprint(&b.cert)], "{text}");
    assert!(text.contains("taken from the cache"), "{text}");
}

/// DCDT D18: the intermediate CA is published nowhere but at the leaf's AIA
/// caIssuers URL (DER, PKCS#7 "p7c" or PEM): the chain is completed over
/// HTTP and the leaf is usable. With a wrong URL or no server it does not
/// chain.
#[test]
fn d18_intermediates_are_fetched_through_aia() {
    let dir = tempfile::tempdir().expect("dir");
    let http = HttpServer::start(dir.path());
    let anchor = root("D18 root CA");
    let intermediate = ca(&anchor, "D18 intermediate CA", Urls::default());
    write(
        dir.path(),
        "inter.der",
        &intermediate.cert.to_der().expect("der"),
    );
    let pem = dir.path().join("inter.pem");
    write(
        dir.path(),
        "inter.pem",
        &intermediate.cert.to_pem().expect("pem"),
    );
    let status = std::process::Command::new("openssl")
        .args(["crl2pkcs7", "-nocrl", "-outform", "DER", "-out"])
        .arg(dir.path().join("inter.p7c"))
        .arg("-certfile")
        .arg(&pem)
        .status()
        .expect("openssl");
    assert!(status.success());

    let dead = format!("http://127.0.0.1:{}/inter.der", free_port());
    let cases: Vec<(&str, String, bool)> = vec![
        ("alice", http.url("inter.der"), true),
        ("carol", http.url("inter.p7c"), true),
        ("frank", http.url("inter.pem"), true),
        ("dave", http.url("missing.der"), false),
        ("erin", dead, false),
    ];
    let leaves: Vec<(String, Credential, String, bool)> = cases
        .into_iter()
        .map(|(who, url, ok)| {
            let address = format!("{who}@d18.example");
            let cred = leaf(
                &intermediate,
                &format!("{who} d18"),
                &address,
                Urls {
                    ca_issuers: Some(&url),
                    ..Urls::default()
                },
            );
            (address, cred, url, ok)
        })
        .collect();
    let owners: Vec<String> = leaves
        .iter()
        .map(|(a, ..)| a.replace('@', ".").trim_end_matches(".example").to_string())
        .collect();
    let records: Vec<(&str, &X509)> = owners
        .iter()
        .zip(&leaves)
        .map(|(o, (_, cred, ..))| (o.as_str(), &cred.cert))
        .collect();
    let named = bind(&records);
    let d = discovery(&named);

    for (address, cred, url, ok) in &leaves {
        let found = discover(&d, address, &anchor);
        let text = found.report.explain();
        let cand = candidate(&found, &cred.cert);
        if *ok {
            assert_eq!(
                chosen(&found),
                vec![trust::fingerprint(&cred.cert)],
                "{address}\n{text}"
            );
            assert!(
                cand.reason.contains("fetched via AIA"),
                "{address}: {}",
                cand.reason
            );
            assert!(
                text.contains("AIA: fetched the issuer \"CN=D18 intermediate CA\"")
                    && text.contains(url.as_str()),
                "{address}: the AIA fetch is explained\n{text}"
            );
        } else {
            assert!(found.certificates.is_empty(), "{address}\n{text}");
            assert!(
                cand.reason.contains("does not chain")
                    && cand.reason.contains("D18 intermediate CA"),
                "{address}: {}",
                cand.reason
            );
            assert!(
                text.contains("AIA: fetching the issuer") && text.contains(url.as_str()),
                "{address}: the failed AIA fetch is explained\n{text}"
            );
        }
    }

    // Without the checker, nothing is fetched: the leaf does not chain.
    let plain = discovery(&named).without_revocation();
    let found = discover(&plain, "alice@d18.example", &anchor);
    assert!(found.certificates.is_empty(), "{}", found.report.explain());
}

/// An unreachable CRL: accepted with a warning under soft-fail (the
/// default), refused with the CRL named under hard-fail.
#[test]
fn unreachable_crls_soft_fail_and_hard_fail() {
    let anchor = root("Soft fail CA");
    let crl_url = format!("http://127.0.0.1:{}/soft.crl", free_port());
    let alice = leaf(
        &anchor,
        "alice soft",
        "alice@soft.example",
        Urls {
            crl: Some(&crl_url),
            ..Urls::default()
        },
    );
    let named = bind(&[("alice.soft", &alice.cert)]);

    let soft = discovery(&named);
    assert_eq!(
        soft.revocation().map(|r| r.policy()),
        Some(CrlPolicy::SoftFail)
    );
    let found = discover(&soft, "alice@soft.example", &anchor);
    let text = found.report.explain();
    assert_eq!(
        chosen(&found),
        vec![trust::fingerprint(&alice.cert)],
        "{text}"
    );
    assert!(
        found
            .report
            .steps
            .iter()
            .any(|s| s.result.starts_with("warning:") && s.result.contains(&crl_url)),
        "a warning step names the CRL\n{text}"
    );
    assert!(
        found
            .report
            .warnings
            .iter()
            .any(|w| w.contains("soft-fail") && w.contains(&crl_url)),
        "{text}"
    );
    assert!(
        candidate(&found, &alice.cert)
            .reason
            .contains("revocation NOT checked"),
        "{text}"
    );

    let hard = discovery(&named).with_revocation(RevocationChecker::new(
        FetchLimits::default(),
        CrlPolicy::HardFail,
    ));
    let found = discover(&hard, "alice@soft.example", &anchor);
    let text = found.report.explain();
    assert!(found.certificates.is_empty(), "{text}");
    let cand = candidate(&found, &alice.cert);
    assert!(
        !cand.usable && cand.reason.contains("CRL") && cand.reason.contains(&crl_url),
        "{}",
        cand.reason
    );
    assert!(
        found.report.temporary_failure,
        "an unknown revocation status may be known later\n{text}"
    );
}

/// The receiving side: a signer listed in its issuer's CRL is refused by
/// `validate_with_crls`; certificates without a CRL, CRLs from another key
/// and plain `validate` are unaffected.
#[test]
fn validate_with_crls_refuses_revoked_signers() {
    let anchor = root("Receiving root");
    let intermediate = ca(&anchor, "Receiving intermediate", Urls::default());
    let signer = leaf(
        &intermediate,
        "sender",
        "sender@far.example",
        Urls::default(),
    );
    let other = leaf(&intermediate, "other", "other@far.example", Urls::default());
    let set = anchors(&anchor);
    let chain = [intermediate.cert.clone()];
    let check = |cert: &X509, crls: &[X509Crl]| {
        trust::validate_with_crls(
            cert,
            &chain,
            &set,
            crls,
            now(),
            "local.example",
            Direction::Incoming,
        )
    };

    let revoking = crl(&intermediate, &[&signer.cert]);
    let err = check(&signer.cert, std::slice::from_ref(&revoking)).unwrap_err();
    assert!(
        matches!(&err, TrustError::Revoked { subject } if subject.contains("sender")),
        "{err}"
    );
    assert!(err.to_string().contains("is revoked"), "{err}");
    assert!(check(&other.cert, std::slice::from_ref(&revoking)).is_ok());
    assert!(check(&signer.cert, &[]).is_ok(), "no CRL, no refusal");
    assert!(trust::validate(
        &signer.cert,
        &chain,
        &set,
        now(),
        "local.example",
        Direction::Incoming
    )
    .is_ok());

    // A CRL with the right name but another key's signature is ignored.
    let forged = crl_signed_with(&intermediate, &root("Forger").key, &[&other.cert]);
    assert!(check(&other.cert, &[forged]).is_ok());

    // A revoked intermediate (in the root's CRL) refuses every leaf below it.
    let root_crl = crl(&anchor, &[&intermediate.cert]);
    let err = check(&other.cert, &[root_crl]).unwrap_err();
    assert!(
        matches!(&err, TrustError::Revoked { subject } if subject.contains("Receiving intermediate")),
        "{err}"
    );

    // A PEM CRL parses as well as a DER one.
    let pem = revoking.to_pem().expect("pem");
    let parsed = revocation::parse_crl(&pem).expect("pem crl");
    assert!(check(&signer.cert, &[parsed]).is_err());
}

/// `crls_for` checks the path it is given: hard-fail errors, the anchor at
/// the top is not checked, and CRLs are verified against the issuer.
#[test]
fn crls_for_fetches_verifies_and_reports() {
    let dir = tempfile::tempdir().expect("dir");
    let http = HttpServer::start(dir.path());
    let anchor_url = http.url("anchor.crl");
    let inter_url = http.url("inter.crl");
    let anchor = root("Path root");
    let intermediate = ca(
        &anchor,
        "Path intermediate",
        Urls {
            crl: Some(&anchor_url),
            ..Urls::default()
        },
    );
    let alice = leaf(
        &intermediate,
        "alice path",
        "alice@path.example",
        Urls {
            crl: Some(&inter_url),
            ..Urls::default()
        },
    );
    write(
        dir.path(),
        "anchor.crl",
        &crl(&anchor, &[]).to_pem().expect("pem"),
    );
    // The intermediate's CRL is (wrongly) signed by the root.
    write(
        dir.path(),
        "inter.crl",
        &crl_signed_with(&intermediate, &anchor.key, &[])
            .to_der()
            .expect("der"),
    );
    let path = revocation::path_to_anchor(
        &alice.cert,
        std::slice::from_ref(&intermediate.cert),
        &anchors(&anchor),
    )
    .expect("a path");
    assert_eq!(path.len(), 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let soft = RevocationChecker::new(FetchLimits::default(), CrlPolicy::SoftFail);
    let (crls, notes) = rt.block_on(soft.crls_for(&path)).expect("soft");
    assert_eq!(crls.len(), 1, "only the root's CRL verifies: {notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("warning:") && n.contains("not signed by")),
        "{notes:?}"
    );

    let hard = RevocationChecker::new(FetchLimits::default(), CrlPolicy::HardFail);
    let err = rt
        .block_on(hard.crls_for(&path))
        .err()
        .expect("hard-fail refuses an unverifiable CRL");
    assert!(
        matches!(&err, TrustError::CrlUnavailable { url, .. } if url == &inter_url),
        "{err}"
    );

    // The intermediate as the anchor: only the leaf is checked.
    let partial = revocation::path_to_anchor(
        &alice.cert,
        &[],
        &AnchorSet::from_certs(vec![intermediate.cert.clone()], Path::new("x")),
    )
    .expect("partial path");
    assert_eq!(partial.len(), 2);
    write(
        dir.path(),
        "inter.crl",
        &crl(&intermediate, &[&alice.cert]).to_der().expect("der"),
    );
    let (crls, notes) = rt.block_on(hard.crls_for(&partial)).expect("hard");
    assert_eq!(crls.len(), 1, "{notes:?}");
    assert!(notes.iter().all(|n| !n.contains("anchor.crl")), "{notes:?}");
}
