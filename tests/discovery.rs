//! Certificate discovery against a real authoritative DNS server (BIND) with
//! CERT and SRV records and real OpenLDAP servers, one test per group of the
//! ONC Direct Certificate Discovery Tool (DCDT) cases D1–D16, plus the
//! untrusted and wrong-SAN refusals, the cache, the local and public sources
//! in their configured order, and the fallback to domain-bound certificates.

mod common;

use common::servers::{cert_rr, free_port, ldif_person, Bind, HttpServer, Slapd, LDAP_SUFFIX};
use hispd::address::DirectAddress;
use hispd::discovery::{
    Bound, CertificateSet, Discovered, Discovery, DiscoveryConfig, SourceKind, TrustContext,
};
use hispd::pki::{self, Credential, KeyKind, LeafSpec};
use hispd::trust::{self, AnchorSet};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// Every certificate of the DCDT setup, made once per test binary.
struct Pki {
    ca: Credential,
    certs: HashMap<&'static str, Credential>,
}

fn expired(spec: LeafSpec) -> LeafSpec {
    LeafSpec {
        not_before_offset: -40 * 86400,
        not_after_offset: -86400,
        ..spec
    }
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = pki::new_ca("DCDT test CA", 2048).expect("ca");
        let rogue = pki::new_ca("Rogue CA", 2048).expect("rogue");
        let big = |a: &str| LeafSpec {
            key: KeyKind::Rsa(4096),
            ..LeafSpec::address(a)
        };
        let specs: Vec<(&'static str, &Credential, LeafSpec)> = vec![
            ("d1-addr", &ca, LeafSpec::address("alice@d1.example")),
            (
                "d1-dom-expired",
                &ca,
                expired(LeafSpec::domain("d1.example")),
            ),
            (
                "d1-ldap-expired",
                &ca,
                expired(LeafSpec::address("alice@d1.example")),
            ),
            ("d2-dom", &ca, LeafSpec::domain("d2.example")),
            ("d3-addr", &ca, LeafSpec::address("alice@d3.example")),
            ("d4-dom", &ca, LeafSpec::domain("d4.example")),
            (
                "d5-expired",
                &ca,
                expired(LeafSpec::address("alice@d5.example")),
            ),
            ("d6-expired", &ca, expired(LeafSpec::domain("d6.example"))),
            (
                "d7-expired",
                &ca,
                expired(LeafSpec::address("alice@d7.example")),
            ),
            ("d8-expired", &ca, expired(LeafSpec::domain("d8.example"))),
            ("d9-valid", &ca, LeafSpec::address("alice@d9.example")),
            (
                "d9-expired",
                &ca,
                expired(LeafSpec::address("alice@d9.example")),
            ),
            ("d10-addr", &ca, LeafSpec::address("alice@d10.example")),
            ("d14-a", &ca, big("alice@d14.example")),
            ("d14-b", &ca, big("alice@d14.example")),
            ("d14-c", &ca, big("alice@d14.example")),
            ("d15-valid", &ca, LeafSpec::address("alice@d15.example")),
            (
                "d15-expired",
                &ca,
                expired(LeafSpec::address("alice@d15.example")),
            ),
            ("d16-addr", &ca, LeafSpec::address("alice@d16.example")),
            ("d17-rogue", &rogue, LeafSpec::address("alice@d17.example")),
            ("d18-bob", &ca, LeafSpec::address("bob@d18.example")),
            // Sources other than DNS CERT and userCertificate;binary.
            ("p1-public", &ca, LeafSpec::address("carol@p1.example")),
            ("p1-dns", &ca, LeafSpec::address("carol@p1.example")),
            ("l1-local", &ca, LeafSpec::domain("l1.example")),
            (
                "f1-addr-expired",
                &ca,
                expired(LeafSpec::address("alice@f1.example")),
            ),
            ("f1-dom", &ca, LeafSpec::domain("f1.example")),
            ("g2-smime", &ca, LeafSpec::address("alice@g2.example")),
        ];
        let certs = specs
            .into_iter()
            .map(|(name, issuer, spec)| (name, pki::issue(issuer, &spec).expect(name)))
            .collect();
        Pki { ca, certs }
    })
}

fn der(name: &str) -> Vec<u8> {
    pki().certs[name].cert.to_der().expect("der")
}

fn fp(name: &str) -> String {
    trust::fingerprint(&pki().certs[name].cert)
}

fn person(mail: &str, names: &[&str]) -> String {
    let ders: Vec<Vec<u8>> = names.iter().map(|n| der(n)).collect();
    ldif_person(LDAP_SUFFIX, mail, &ders, "userCertificate;binary")
}

/// BIND with the DCDT zone and two LDAP servers (A holds the valid data, B
/// the priority-1 server of D15 with an invalid certificate).
struct Dcdt {
    bind: Bind,
    ldap_a: Slapd,
    ldap_b: Slapd,
    dead_port: u16,
}

impl Dcdt {
    fn start() -> Dcdt {
        let mut a = String::new();
        a.push_str(&person("alice@d1.example", &["d1-ldap-expired"]));
        a.push_str(&person("alice@d3.example", &["d3-addr"]));
        a.push_str(&person("d4.example", &["d4-dom"]));
        a.push_str(&person("alice@d7.example", &["d7-expired"]));
        a.push_str(&person("d8.example", &["d8-expired"]));
        a.push_str(&person("alice@d10.example", &["d10-addr"]));
        a.push_str(&person("alice@d15.example", &["d15-valid"]));
        a.push_str(&person("alice@d16.example", &["d16-addr"]));
        let ldap_a = Slapd::start(&a).expect("slapd A");
        let ldap_b = Slapd::start(&person("alice@d15.example", &["d15-expired"])).expect("slapd B");
        let dead_port = free_port();
        let (pa, pb, pd) = (ldap_a.port, ldap_b.port, dead_port);
        let mut zone = String::from("ldapa A 127.0.0.1\nldapb A 127.0.0.1\nldapdead A 127.0.0.1\n");
        for (owner, name) in [
            ("alice.d1", "d1-addr"),
            ("d1", "d1-dom-expired"),
            ("d2", "d2-dom"),
            ("alice.d5", "d5-expired"),
            ("d6", "d6-expired"),
            ("alice.d9", "d9-valid"),
            ("alice.d9", "d9-expired"),
            ("alice.d14", "d14-a"),
            ("alice.d14", "d14-b"),
            ("alice.d14", "d14-c"),
            ("alice.d17", "d17-rogue"),
            ("alice.d18", "d18-bob"),
        ] {
            zone.push_str(&cert_rr(owner, &der(name)));
        }
        zone.push_str(&format!(
            "_ldap._tcp.d1 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d3 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d4 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d7 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d8 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d10 SRV 0 0 {pd} ldapdead\n\
             _ldap._tcp.d10 SRV 1 0 {pa} ldapa\n\
             _ldap._tcp.d12 SRV 0 0 {pd} ldapdead\n\
             _ldap._tcp.d13 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d15 SRV 0 0 {pa} ldapa\n\
             _ldap._tcp.d15 SRV 1 0 {pb} ldapb\n\
             _ldap._tcp.d16 SRV 0 100 {pd} ldapdead\n\
             _ldap._tcp.d16 SRV 0 0 {pa} ldapa\n"
        ));
        let bind = Bind::start(&[("example", &zone)]).expect("named");
        Dcdt {
            bind,
            ldap_a,
            ldap_b,
            dead_port,
        }
    }

    fn config(&self) -> DiscoveryConfig {
        DiscoveryConfig {
            sources: vec![SourceKind::Dns, SourceKind::Ldap],
            nameservers: vec![self.bind.addr()],
            dns_timeout: Duration::from_secs(2),
            dns_attempts: 2,
            ldap_timeout: Duration::from_secs(2),
            positive_ttl: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            ..DiscoveryConfig::default()
        }
    }

    fn discovery(&self) -> Discovery {
        Discovery::new(self.config(), CertificateSet::new(), CertificateSet::new())
            .expect("discovery")
    }
}

fn ctx() -> TrustContext {
    TrustContext {
        domain: "sender.example".into(),
        anchors: Some(AnchorSet::from_certs(
            vec![pki().ca.cert.clone()],
            Path::new("dcdt-ca"),
        )),
        at: hispd::agent::now(),
        min_rsa_bits: 2048,
    }
}

fn discover(d: &Discovery, address: &str) -> Discovered {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(d.discover(&DirectAddress::parse(address).expect("address"), &ctx()))
}

fn chosen(found: &Discovered) -> Vec<String> {
    found
        .report
        .chosen
        .iter()
        .map(|c| c.fingerprint_sha256.clone())
        .collect()
}

fn explain(found: &Discovered) -> String {
    found.report.explain()
}

#[test]
fn dns_cases_d1_d2_d5_d6_d9_d14() {
    let _ = pki();
    let env = Dcdt::start();
    let d = env.discovery();

    // D1: the valid address-bound DNS certificate; the expired domain-bound
    // DNS one and the LDAP one are never chosen.
    let found = discover(&d, "alice@d1.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d1-addr")],
        "D1\n{}",
        explain(&found)
    );
    assert_eq!(found.report.chosen[0].bound, Bound::Address);
    assert!(
        found.report.chosen[0].source.contains("DNS"),
        "D1\n{}",
        explain(&found)
    );
    assert!(
        !found
            .report
            .steps
            .iter()
            .any(|s| s.source == SourceKind::Ldap),
        "D1: LDAP is not asked once DNS gave a usable certificate\n{}",
        explain(&found)
    );

    // D2: a valid domain-bound DNS certificate.
    let found = discover(&d, "alice@d2.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d2-dom")],
        "D2\n{}",
        explain(&found)
    );
    assert_eq!(found.report.chosen[0].bound, Bound::Domain);

    // D5 / D6: only an expired address-/domain-bound DNS certificate.
    for (addr, name) in [
        ("alice@d5.example", "d5-expired"),
        ("alice@d6.example", "d6-expired"),
    ] {
        let found = discover(&d, addr);
        assert!(found.certificates.is_empty(), "{addr}\n{}", explain(&found));
        let refused = found
            .report
            .candidates
            .iter()
            .find(|c| c.fingerprint_sha256 == fp(name))
            .unwrap_or_else(|| {
                panic!(
                    "{addr}: the expired certificate is listed\n{}",
                    explain(&found)
                )
            });
        assert!(
            !refused.usable && refused.reason.contains("expired"),
            "{addr}: {}",
            refused.reason
        );
    }

    // D9: one valid and one expired address-bound certificate: the valid one only.
    let found = discover(&d, "alice@d9.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d9-valid")],
        "D9\n{}",
        explain(&found)
    );
    assert_eq!(found.report.candidates.len(), 2);

    // D14: an answer too large for UDP (three 4096-bit certificates) is found over TCP.
    let udp = std::process::Command::new("dig")
        .args([
            "+norec",
            "+ignore",
            "+bufsize=1232",
            "-p",
            &env.bind.port.to_string(),
            "@127.0.0.1",
            "alice.d14.example",
            "CERT",
        ])
        .output()
        .expect("dig");
    let udp = String::from_utf8_lossy(&udp.stdout);
    assert!(
        udp.contains(" tc"),
        "the UDP answer is truncated, so TCP is needed:\n{udp}"
    );
    let found = discover(&d, "alice@d14.example");
    let mut want = vec![fp("d14-a"), fp("d14-b"), fp("d14-c")];
    let mut got = chosen(&found);
    want.sort();
    got.sort();
    assert_eq!(got, want, "D14\n{}", explain(&found));
}

#[test]
fn ldap_cases_d3_d4_d7_d8_d13() {
    let _ = pki();
    let env = Dcdt::start();
    let d = env.discovery();

    // D3: valid address-bound in LDAP.
    let found = discover(&d, "alice@d3.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d3-addr")],
        "D3\n{}",
        explain(&found)
    );
    assert_eq!(found.report.chosen[0].bound, Bound::Address);
    assert!(
        found.report.chosen[0]
            .source
            .starts_with("LDAP ldap://127.0.0.1:"),
        "D3\n{}",
        explain(&found)
    );
    // It searched what the guide says.
    assert!(
        env.ldap_a
            .log()
            .contains("filter=\"(mail=alice@d3.example)\""),
        "{}",
        env.ldap_a.log()
    );

    // D4: valid domain-bound in LDAP (entry with mail=<domain>).
    let found = discover(&d, "alice@d4.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d4-dom")],
        "D4\n{}",
        explain(&found)
    );
    assert_eq!(found.report.chosen[0].bound, Bound::Domain);

    // D7 / D8: only expired certificates in LDAP.
    for (addr, name) in [
        ("alice@d7.example", "d7-expired"),
        ("alice@d8.example", "d8-expired"),
    ] {
        let found = discover(&d, addr);
        assert!(found.certificates.is_empty(), "{addr}\n{}", explain(&found));
        let c = found
            .report
            .candidates
            .iter()
            .find(|c| c.fingerprint_sha256 == fp(name))
            .expect("listed");
        assert!(c.reason.contains("expired"), "{addr}: {}", c.reason);
    }

    // D13: an LDAP server without entries, no CERT records: none.
    let found = discover(&d, "alice@d13.example");
    assert!(
        found.certificates.is_empty() && found.report.candidates.is_empty(),
        "D13\n{}",
        explain(&found)
    );
    assert!(!found.report.temporary_failure, "D13 is a definite answer");
}

#[test]
fn srv_cases_d10_d11_d12_d15_d16() {
    let _ = pki();
    let env = Dcdt::start();
    let d = env.discovery();
    let dead = format!("127.0.0.1:{}", env.dead_port);

    // D10: the priority-0 server is unreachable, the priority-1 one is used.
    let found = discover(&d, "alice@d10.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d10-addr")],
        "D10\n{}",
        explain(&found)
    );
    assert!(
        found
            .report
            .steps
            .iter()
            .any(|s| s.query.contains(&dead) && s.result.contains("unreachable")),
        "D10 explains the unreachable server\n{}",
        explain(&found)
    );

    // D11: no CERT and no SRV: none, and that is said.
    let found = discover(&d, "alice@d11.example");
    assert!(found.certificates.is_empty(), "D11");
    let text = explain(&found);
    assert!(
        text.contains("no CERT records") && text.contains("no SRV records"),
        "D11\n{text}"
    );
    assert!(!found.report.temporary_failure);

    // D12: the only SRV target is unreachable: none, reported as such.
    let found = discover(&d, "alice@d12.example");
    assert!(found.certificates.is_empty(), "D12");
    assert!(
        explain(&found).contains("no LDAP server could be reached"),
        "D12\n{}",
        explain(&found)
    );

    // D15: priority 0 (valid) is used, priority 1 (invalid) is never asked.
    let found = discover(&d, "alice@d15.example");
    assert_eq!(
        chosen(&found),
        vec![fp("d15-valid")],
        "D15\n{}",
        explain(&found)
    );
    assert!(
        !env.ldap_b.log().contains("alice@d15.example"),
        "the priority-1 server is not searched"
    );

    // D16: equal priority, weights 100 (unreachable) and 0: whichever order the
    // weighted draw gives, the weight-0 server is reached. Asked many times.
    for _ in 0..10 {
        let found = discover(&d, "alice@d16.example");
        assert_eq!(
            chosen(&found),
            vec![fp("d16-addr")],
            "D16\n{}",
            explain(&found)
        );
    }
}

#[test]
fn untrusted_and_wrong_san_certificates_are_refused_with_the_reason() {
    let _ = pki();
    let env = Dcdt::start();
    let d = env.discovery();

    let found = discover(&d, "alice@d17.example");
    assert!(found.certificates.is_empty());
    let c = &found.report.candidates[0];
    assert!(
        c.reason.contains("does not chain") && c.reason.contains("Rogue CA"),
        "{}",
        c.reason
    );
    assert!(explain(&found).contains("REFUSED"), "{}", explain(&found));

    let found = discover(&d, "alice@d18.example");
    assert!(found.certificates.is_empty());
    let c = &found.report.candidates[0];
    assert!(c.reason.contains("bob@d18.example"), "{}", c.reason);
}

#[test]
fn a_cached_lookup_does_no_network_io() {
    let _ = pki();
    let mut env = Dcdt::start();
    let config = DiscoveryConfig {
        positive_ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(3600),
        ..env.config()
    };
    let d =
        Discovery::new(config, CertificateSet::new(), CertificateSet::new()).expect("discovery");
    let first = discover(&d, "alice@d3.example");
    let none = discover(&d, "alice@d11.example");
    assert_eq!(chosen(&first), vec![fp("d3-addr")]);
    assert!(!first.report.from_cache);

    // Take the servers away and listen on the DNS port ourselves, counting.
    let port = env.bind.port;
    env.bind.stop();
    env.ldap_a.stop();
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("udp");
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).expect("tcp");
    tcp.set_nonblocking(true).expect("nonblocking");

    let again = discover(&d, "alice@d3.example");
    let none_again = discover(&d, "alice@d11.example");
    assert!(again.report.from_cache && none_again.report.from_cache);
    assert_eq!(chosen(&again), chosen(&first));
    assert!(none_again.certificates.is_empty() && none.certificates.is_empty());
    assert_eq!(d.cache().len(), 2);

    let mut buf = [0u8; 512];
    assert!(udp.recv_from(&mut buf).is_err(), "no DNS query over UDP");
    assert!(tcp.accept().is_err(), "no DNS connection over TCP");

    // An address not in the cache does go to the network (and now fails).
    let miss = discover(&d, "alice@d1.example");
    assert!(!miss.report.from_cache);
    assert!(
        udp.recv_from(&mut buf).is_ok() || tcp.accept().is_ok(),
        "a miss asks the nameserver"
    );
}

fn url_rr(owner: &str, cert_type: u16, url: &str) -> String {
    use base64::Engine;
    format!(
        "{owner} IN CERT {cert_type} 0 0 {}\n",
        base64::engine::general_purpose::STANDARD.encode(url)
    )
}

#[test]
fn ipkix_and_uri_records_are_fetched_over_http() {
    let ca = &pki().ca;
    let dir = tempfile::tempdir().expect("dir");
    let alice = pki::issue(ca, &LeafSpec::address("alice@d20.example")).expect("leaf");
    std::fs::write(
        dir.path().join("alice.der"),
        alice.cert.to_der().expect("der"),
    )
    .expect("write");
    // A PKCS#7 certs-only collection, as made by openssl crl2pkcs7.
    let carol = pki::issue(ca, &LeafSpec::address("carol@d21.example")).expect("leaf");
    let pem = dir.path().join("carol.pem");
    std::fs::write(&pem, carol.cert.to_pem().expect("pem")).expect("write");
    let status = std::process::Command::new("openssl")
        .args(["crl2pkcs7", "-nocrl", "-outform", "DER", "-out"])
        .arg(dir.path().join("carol.p7c"))
        .arg("-certfile")
        .arg(&pem)
        .status()
        .expect("openssl");
    assert!(status.success());
    let http = HttpServer::start(dir.path());
    let dead = free_port();
    let zone = format!(
        "{}{}{}",
        url_rr(
            "alice.d20",
            4,
            &format!("http://127.0.0.1:{}/alice.der", http.port)
        ),
        url_rr(
            "carol.d21",
            253,
            &format!("http://127.0.0.1:{}/carol.p7c", http.port)
        ),
        url_rr("dave.d22", 4, &format!("http://127.0.0.1:{dead}/dave.der")),
    );
    let bind = Bind::start(&[("example", &zone)]).expect("named");
    let config = DiscoveryConfig {
        sources: vec![SourceKind::Dns],
        nameservers: vec![bind.addr()],
        positive_ttl: Duration::ZERO,
        negative_ttl: Duration::from_secs(3600),
        ..DiscoveryConfig::default()
    };
    let d =
        Discovery::new(config, CertificateSet::new(), CertificateSet::new()).expect("discovery");

    let found = discover(&d, "alice@d20.example");
    assert_eq!(
        chosen(&found),
        vec![trust::fingerprint(&alice.cert)],
        "IPKIX\n{}",
        explain(&found)
    );
    assert!(found.report.chosen[0].source.contains("alice.der"));

    let found = discover(&d, "carol@d21.example");
    assert_eq!(
        chosen(&found),
        vec![trust::fingerprint(&carol.cert)],
        "URI\n{}",
        explain(&found)
    );

    // An unreachable URL is a temporary failure: reported, and not cached.
    let found = discover(&d, "dave@d22.example");
    assert!(found.certificates.is_empty());
    assert!(found.report.temporary_failure, "{}", explain(&found));
    assert!(
        explain(&found).contains("fetch failed"),
        "{}",
        explain(&found)
    );
    assert!(
        !discover(&d, "dave@d22.example").report.from_cache,
        "temporary failures are asked again"
    );
}

/// A DER PKCS#7 certs-only structure holding `name`'s certificate (what
/// userSMIMECertificate holds), made by `openssl crl2pkcs7`.
fn p7_of(name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("cert.pem");
    std::fs::write(&pem, pki().certs[name].cert.to_pem().expect("pem")).expect("write");
    let out = std::process::Command::new("openssl")
        .args(["crl2pkcs7", "-nocrl", "-outform", "DER", "-certfile"])
        .arg(&pem)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn local_and_public_sources_follow_the_configured_order_and_usersmimecertificate_is_read() {
    let _ = pki();
    // (OpenLDAP stores userCertificate only with ;binary transfer, so the
    // plain name cannot be loaded into slapd; userSMIMECertificate can.)
    let ldif = ldif_person(
        LDAP_SUFFIX,
        "alice@g2.example",
        &[p7_of("g2-smime")],
        "userSMIMECertificate",
    );
    let ldap = Slapd::start(&ldif).expect("slapd");
    let port = ldap.port;
    let mut zone = String::from("ldap A 127.0.0.1\n");
    zone.push_str(&cert_rr("carol.p1", &der("p1-dns")));
    zone.push_str(&cert_rr("alice.f1", &der("f1-addr-expired")));
    zone.push_str(&cert_rr("f1", &der("f1-dom")));
    zone.push_str(&format!("_ldap._tcp.g2 SRV 0 0 {port} ldap\n"));
    let bind = Bind::start(&[("example", &zone)]).expect("named");

    // The partner's certificate kept on disk, and our own domain's.
    let public_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        public_dir.path().join("carol.pem"),
        pki().certs["p1-public"].cert.to_pem().expect("pem"),
    )
    .expect("write");
    let public = CertificateSet::load_dir(public_dir.path()).expect("public dir");
    assert_eq!(public.len(), 1);
    let mut local = CertificateSet::new();
    local.add(pki().certs["l1-local"].cert.clone(), "our l1.example");
    let with = |sources: Vec<SourceKind>| {
        let config = DiscoveryConfig {
            sources,
            nameservers: vec![bind.addr()],
            dns_timeout: Duration::from_secs(2),
            ldap_timeout: Duration::from_secs(2),
            positive_ttl: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            ..DiscoveryConfig::default()
        };
        Discovery::new(config, local.clone(), public.clone()).expect("discovery")
    };
    let asked =
        |found: &Discovered, kind: SourceKind| found.report.steps.iter().any(|s| s.source == kind);

    // The default order: local, public directory, DNS, LDAP. The public
    // directory answers first, so DNS is never asked.
    let d = with(DiscoveryConfig::default().sources);
    let found = discover(&d, "carol@p1.example");
    assert_eq!(chosen(&found), vec![fp("p1-public")], "{}", explain(&found));
    assert!(!asked(&found, SourceKind::Dns), "{}", explain(&found));
    // Our own domain's certificate comes from the local source.
    let found = discover(&d, "anyone@l1.example");
    assert_eq!(chosen(&found), vec![fp("l1-local")], "{}", explain(&found));
    assert!(!asked(&found, SourceKind::Public), "{}", explain(&found));

    // DNS before the directory: DNS's certificate wins.
    let found = discover(
        &with(vec![SourceKind::Dns, SourceKind::Public]),
        "carol@p1.example",
    );
    assert_eq!(chosen(&found), vec![fp("p1-dns")], "{}", explain(&found));
    // A source left out is never asked.
    let found = discover(&with(vec![SourceKind::Dns]), "anyone@l1.example");
    assert!(found.certificates.is_empty(), "{}", explain(&found));
    assert!(!asked(&found, SourceKind::Local), "{}", explain(&found));

    // Every address-bound certificate is unusable (expired): the usable
    // domain-bound one is chosen, and the explanation says why.
    let found = discover(&with(vec![SourceKind::Dns]), "alice@f1.example");
    assert_eq!(chosen(&found), vec![fp("f1-dom")], "{}", explain(&found));
    assert!(explain(&found).contains("expired"), "{}", explain(&found));

    // userSMIMECertificate (a PKCS#7 certs-only structure).
    let found = discover(&with(vec![SourceKind::Ldap]), "alice@g2.example");
    assert_eq!(chosen(&found), vec![fp("g2-smime")], "{}", explain(&found));
}
