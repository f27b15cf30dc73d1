//! LDAP discovery: `_ldap._tcp.<domain>` SRV targets in RFC 2782 order
//! (lowest priority first, weighted random within a priority), anonymous
//! bind, base DNs from the root DSE, `(mail=...)` subtree search.

use super::{Answer, DnsSource, Found, SourceKind, Step};
use hickory_resolver::proto::rr::{RData, RecordType};
use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use rand::Rng;
use std::time::Duration;

const CERT_ATTRIBUTES: [&str; 3] = [
    "userCertificate;binary",
    "userCertificate",
    "userSMIMECertificate",
];

/// One SRV target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub host: String,
}

/// Orders SRV targets as RFC 2782 says: by priority, lowest first; within a
/// priority, by weighted random selection (weight-0 targets are possible but
/// rarely first). `pick` returns a number in `0..=total` (random in use).
pub fn order_srv_targets(
    mut targets: Vec<SrvTarget>,
    mut pick: impl FnMut(u32) -> u32,
) -> Vec<SrvTarget> {
    targets.sort_by_key(|t| (t.priority, t.weight));
    let mut ordered = Vec::with_capacity(targets.len());
    let mut rest = targets.as_slice();
    while let Some(first) = rest.first() {
        let end = rest
            .iter()
            .position(|t| t.priority != first.priority)
            .unwrap_or(rest.len());
        let (group, tail) = rest.split_at(end);
        // Weight-0 entries first, as the RFC's selection algorithm asks.
        let mut group: Vec<SrvTarget> = group.to_vec();
        group.sort_by_key(|t| t.weight);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|t| u32::from(t.weight)).sum();
            let r = pick(total).min(total);
            let mut running = 0u32;
            let index = group
                .iter()
                .position(|t| {
                    running += u32::from(t.weight);
                    running >= r
                })
                .unwrap_or(0);
            ordered.push(group.remove(index));
        }
        rest = tail;
    }
    ordered
}

#[derive(Clone)]
pub struct LdapSource {
    dns: DnsSource,
    timeout: Duration,
}

impl LdapSource {
    pub fn new(dns: DnsSource, timeout: Duration) -> LdapSource {
        LdapSource { dns, timeout }
    }

    /// Searches `(mail=<mail>)` on the LDAP servers of `domain`.
    pub async fn lookup(&self, domain: &str, mail: &str) -> Answer {
        let srv_name = format!("_ldap._tcp.{domain}.");
        let query = format!("SRV {srv_name}");
        let srv = match self
            .dns
            .resolver
            .lookup(srv_name.as_str(), RecordType::SRV)
            .await
        {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() => {
                return Answer::step(
                    SourceKind::Ldap,
                    query,
                    "no SRV records: no LDAP server published",
                );
            }
            Err(e) => {
                let mut a = Answer::step(SourceKind::Ldap, query, format!("lookup failed: {e}"));
                a.temporary_failure = true;
                a.resolver_down = true;
                return a;
            }
        };
        let targets: Vec<SrvTarget> = srv
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some(SrvTarget {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    host: s.target.to_string(),
                }),
                _ => None,
            })
            .collect();
        let ordered = {
            let mut rng = rand::rng();
            order_srv_targets(targets, |total| rng.random_range(0..=total))
        };
        let mut answer = Answer {
            found: Vec::new(),
            steps: vec![Step {
                source: SourceKind::Ldap,
                query,
                result: format!(
                    "{} target(s), in order: {}",
                    ordered.len(),
                    ordered
                        .iter()
                        .map(|t| format!(
                            "{}:{} (priority {}, weight {})",
                            t.host, t.port, t.priority, t.weight
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }],
            temporary_failure: false,
            resolver_down: false,
        };
        for target in &ordered {
            if target.host == "." {
                continue;
            }
            let ips = match self.dns.resolver.lookup_ip(target.host.as_str()).await {
                Ok(ips) => ips.iter().collect::<Vec<_>>(),
                Err(e) => {
                    answer.steps.push(Step {
                        source: SourceKind::Ldap,
                        query: format!("address of {}", target.host),
                        result: format!("lookup failed: {e}; next target"),
                    });
                    continue;
                }
            };
            for ip in ips {
                let url = match ip {
                    std::net::IpAddr::V4(v4) => format!("ldap://{v4}:{}", target.port),
                    std::net::IpAddr::V6(v6) => format!("ldap://[{v6}]:{}", target.port),
                };
                match self.search(&url, mail).await {
                    Ok((found, note)) => {
                        answer.steps.push(Step {
                            source: SourceKind::Ldap,
                            query: format!("{url} (mail={mail})"),
                            result: note,
                        });
                        answer.found.extend(found);
                        // The first server that answers is the one used (RFC 2782).
                        return answer;
                    }
                    Err(why) => answer.steps.push(Step {
                        source: SourceKind::Ldap,
                        query: format!("{url} (mail={mail})"),
                        result: format!("unreachable: {why}; next target"),
                    }),
                }
            }
        }
        answer.temporary_failure = !ordered.is_empty();
        answer.steps.push(Step {
            source: SourceKind::Ldap,
            query: format!("mail={mail}"),
            result: "no LDAP server could be reached".into(),
        });
        answer
    }

    async fn search(&self, url: &str, mail: &str) -> Result<(Vec<Found>, String), String> {
        let settings = LdapConnSettings::new().set_conn_timeout(self.timeout);
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, url)
            .await
            .map_err(|e| e.to_string())?;
        ldap3::drive!(conn);
        let work = async {
            ldap.simple_bind("", "")
                .await
                .and_then(|r| r.success())
                .map_err(|e| format!("anonymous bind: {e}"))?;
            let (root, _) = ldap
                .search("", Scope::Base, "(objectClass=*)", vec!["namingContexts"])
                .await
                .and_then(|r| r.success())
                .map_err(|e| format!("root DSE: {e}"))?;
            let bases: Vec<String> = root
                .into_iter()
                .map(SearchEntry::construct)
                .flat_map(|e| e.attrs.get("namingContexts").cloned().unwrap_or_default())
                .collect();
            let filter = format!("(mail={})", ldap3::ldap_escape(mail));
            let mut found = Vec::new();
            let mut notes = Vec::new();
            for base in &bases {
                let (entries, _) = ldap
                    .search(base, Scope::Subtree, &filter, CERT_ATTRIBUTES.to_vec())
                    .await
                    .and_then(|r| r.success())
                    .map_err(|e| format!("search under {base}: {e}"))?;
                for entry in entries.into_iter().map(SearchEntry::construct) {
                    let mut values: Vec<Vec<u8>> = Vec::new();
                    for (name, vals) in &entry.bin_attrs {
                        if CERT_ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                            values.extend(vals.iter().cloned());
                        }
                    }
                    for (name, vals) in &entry.attrs {
                        if CERT_ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                            values.extend(vals.iter().map(|v| v.as_bytes().to_vec()));
                        }
                    }
                    for v in values {
                        match crate::trust::parse_certificates(&v) {
                            Ok(certs) => found.extend(certs.into_iter().map(|cert| Found {
                                cert,
                                origin: format!("LDAP {url} {}", entry.dn),
                            })),
                            Err(why) => notes.push(format!("{}: {why}", entry.dn)),
                        }
                    }
                }
            }
            let mut note = format!(
                "{} certificate(s) under {}",
                found.len(),
                if bases.is_empty() {
                    "no naming context".to_string()
                } else {
                    bases.join(", ")
                }
            );
            if !notes.is_empty() {
                note.push_str("; ");
                note.push_str(&notes.join("; "));
            }
            Ok((found, note))
        };
        let result = tokio::time::timeout(self.timeout * 3, work)
            .await
            .map_err(|_| format!("no answer within {:.1} s", (self.timeout * 3).as_secs_f64()))?;
        let _ = ldap.unbind().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(priority: u16, weight: u16, host: &str) -> SrvTarget {
        SrvTarget {
            priority,
            weight,
            port: 389,
            host: host.into(),
        }
    }

    #[test]
    fn lower_priority_always_comes_first() {
        let ordered =
            order_srv_targets(vec![t(1, 100, "b"), t(0, 0, "a"), t(2, 5, "c")], |total| {
                total
            });
        let hosts: Vec<&str> = ordered.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts, vec!["a", "b", "c"]);
    }

    #[test]
    fn weights_decide_within_a_priority() {
        // r = 0 selects the first entry whose running sum >= 0: the weight-0 one.
        let ordered = order_srv_targets(vec![t(0, 100, "heavy"), t(0, 0, "zero")], |_| 0);
        assert_eq!(ordered[0].host, "zero");
        // Any r >= 1 selects the weight-100 one.
        let ordered = order_srv_targets(vec![t(0, 100, "heavy"), t(0, 0, "zero")], |total| total);
        assert_eq!(ordered[0].host, "heavy");
        assert_eq!(
            ordered[1].host, "zero",
            "the weight-0 target is still tried"
        );
        // Over many random draws the heavy one is first far more often.
        let mut rng = rand::rng();
        let heavy_first = (0..1000)
            .filter(|_| {
                order_srv_targets(vec![t(0, 100, "heavy"), t(0, 0, "zero")], |total| {
                    rng.random_range(0..=total)
                })[0]
                    .host
                    == "heavy"
            })
            .count();
        assert!(heavy_first > 950, "{heavy_first}");
    }
}
