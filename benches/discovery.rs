//! Discovery lookups per second on loopback against a real BIND and
//! OpenLDAP: uncached (every lookup asks the servers) and cached. Run with
//! `cargo bench --bench discovery` (needs named and slapd, as the tests do).

#[path = "../tests/common/servers.rs"]
#[allow(dead_code)]
mod servers;

use criterion::{criterion_group, criterion_main, Criterion};
use hispd::address::DirectAddress;
use hispd::discovery::{CertificateSet, Discovery, DiscoveryConfig, SourceKind, TrustContext};
use hispd::pki::{self, LeafSpec};
use hispd::trust::AnchorSet;
use servers::{cert_rr, ldif_person, Bind, Slapd, LDAP_SUFFIX};
use std::path::Path;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let ca = pki::new_ca("bench CA", 2048).expect("ca");
    let dns_cert = pki::issue(&ca, &LeafSpec::address("alice@dns.example")).expect("leaf");
    let ldap_cert = pki::issue(&ca, &LeafSpec::address("alice@ldap.example")).expect("leaf");
    let ldap = Slapd::start(&ldif_person(
        LDAP_SUFFIX,
        "alice@ldap.example",
        &[ldap_cert.cert.to_der().expect("der")],
        "userCertificate;binary",
    ))
    .expect("slapd");
    let zone = format!(
        "{}ldap1 A 127.0.0.1\n_ldap._tcp.ldap SRV 0 0 {} ldap1\n",
        cert_rr("alice.dns", &dns_cert.cert.to_der().expect("der")),
        ldap.port
    );
    let bind = Bind::start(&[("example", &zone)]).expect("named");
    let ctx = TrustContext {
        domain: "bench".into(),
        anchors: Some(AnchorSet::from_certs(
            vec![ca.cert.clone()],
            Path::new("bench"),
        )),
        at: hispd::agent::now(),
        min_rsa_bits: 2048,
    };
    let config = |ttl: u64| DiscoveryConfig {
        sources: vec![SourceKind::Dns, SourceKind::Ldap],
        nameservers: vec![bind.addr()],
        positive_ttl: Duration::from_secs(ttl),
        ..DiscoveryConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let uncached =
        Discovery::new(config(0), CertificateSet::new(), CertificateSet::new()).expect("discovery");
    let cached = Discovery::new(config(3600), CertificateSet::new(), CertificateSet::new())
        .expect("discovery");
    let mut group = c.benchmark_group("discovery");
    // Baseline: one bare CERT query with the same resolver library and server,
    // no parsing, no trust checks: the floor an uncached DNS lookup stands on.
    let raw = {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let mut ns = NameServerConfig::udp_and_tcp(bind.addr().ip());
        for conn in ns.connections.iter_mut() {
            conn.port = bind.addr().port();
        }
        let mut b = hickory_resolver::TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        );
        b.options_mut().positive_max_ttl = Some(Duration::ZERO);
        b.build().expect("resolver")
    };
    group.bench_function("baseline/bare CERT query", |b| {
        b.iter(|| {
            rt.block_on(raw.lookup(
                "alice.dns.example.",
                hickory_resolver::proto::rr::RecordType::CERT,
            ))
            .expect("answer")
        })
    });
    for (label, address) in [("dns", "alice@dns.example"), ("ldap", "alice@ldap.example")] {
        let address = DirectAddress::parse(address).expect("address");
        let found = rt.block_on(uncached.discover(&address, &ctx));
        assert_eq!(found.certificates.len(), 1, "{}", found.report.explain());
        group.bench_function(format!("uncached/{label}"), |b| {
            b.iter(|| rt.block_on(uncached.discover(&address, &ctx)))
        });
        rt.block_on(cached.discover(&address, &ctx));
        group.bench_function(format!("cached/{label}"), |b| {
            b.iter(|| rt.block_on(cached.discover(&address, &ctx)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
