//! DNS CERT records (RFC 4398): PKIX (type 1) is a DER certificate; IPKIX
//! (4) and URI (253) carry a URL of a certificate or a PKCS#7 collection.
//! Answers too large for UDP come back truncated and are asked again over
//! TCP (hickory does this when a server has both).

use super::{Answer, DiscoveryConfig, DiscoveryError, Found, SourceKind, Step};
use crate::address::DirectAddress;
use crate::http::{self, FetchLimits};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::cert::CertType;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use openssl::x509::X509;
use std::time::Duration;

/// The DNS side of discovery; also resolves SRV and A for LDAP.
#[derive(Clone)]
pub struct DnsSource {
    pub(super) resolver: TokioResolver,
}

/// `local@domain` → `local.domain.` (the address-bound CERT owner name).
pub fn address_name(address: &DirectAddress) -> String {
    format!("{}.{}.", address.local(), address.domain())
}

impl DnsSource {
    pub fn new(config: &DiscoveryConfig) -> Result<DnsSource, DiscoveryError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| DiscoveryError::Resolver(format!("reading /etc/resolv.conf: {e}")))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in ns.connections.iter_mut() {
                        c.port = addr.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = config.dns_timeout;
        opts.attempts = config.dns_attempts;
        // Our own cache decides what is remembered, and for how long.
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        let resolver = builder
            .build()
            .map_err(|e| DiscoveryError::Resolver(e.to_string()))?;
        Ok(DnsSource { resolver })
    }

    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// CERT records at `name`, with URL records fetched.
    pub async fn lookup(&self, name: &str, limits: &FetchLimits) -> Answer {
        let query = format!("CERT {name}");
        let lookup = match self.resolver.lookup(name, RecordType::CERT).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() => {
                return Answer::step(SourceKind::Dns, query, "no CERT records");
            }
            Err(e) => {
                let mut a = Answer::step(SourceKind::Dns, query, format!("lookup failed: {e}"));
                a.temporary_failure = true;
                a.resolver_down = true;
                return a;
            }
        };
        let mut answer = Answer {
            found: Vec::new(),
            steps: Vec::new(),
            temporary_failure: false,
            resolver_down: false,
        };
        let mut notes = Vec::new();
        for record in lookup.answers() {
            let RData::CERT(cert) = &record.data else {
                continue;
            };
            match cert.cert_type {
                CertType::PKIX => match X509::from_der(&cert.cert_data) {
                    Ok(x) => answer.found.push(Found {
                        cert: x,
                        origin: format!("DNS CERT PKIX {name}"),
                    }),
                    Err(_) => {
                        notes.push("a PKIX record does not hold a DER certificate".to_string())
                    }
                },
                CertType::IPKIX | CertType::URI => {
                    let url = String::from_utf8_lossy(&cert.cert_data).trim().to_string();
                    match http::fetch(&url, *limits).await {
                        Ok(body) => match crate::trust::parse_certificates(&body) {
                            Ok(certs) => {
                                notes.push(format!(
                                    "fetched {} certificate(s) from {url}",
                                    certs.len()
                                ));
                                for x in certs {
                                    answer.found.push(Found {
                                        cert: x,
                                        origin: format!("DNS CERT URL {url}"),
                                    });
                                }
                            }
                            Err(why) => notes.push(format!("{url}: {why}")),
                        },
                        Err(e) => {
                            answer.temporary_failure = true;
                            notes.push(format!("fetch failed: {e}"));
                        }
                    }
                }
                other => notes.push(format!("CERT type {other:?} ignored (not X.509)")),
            }
        }
        let mut result = format!("{} certificate(s)", answer.found.len());
        if !notes.is_empty() {
            result.push_str("; ");
            result.push_str(&notes.join("; "));
        }
        answer.steps.push(Step {
            source: SourceKind::Dns,
            query,
            result,
        });
        answer
    }
}
