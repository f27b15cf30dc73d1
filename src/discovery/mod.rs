//! Certificate discovery ("Certificate Discovery for Direct"): find a
//! recipient's certificates through a chain of sources — local domains, a
//! public-certificate directory, DNS CERT, LDAP — judge each candidate, pick
//! the winners, and explain every step.

mod cache;
mod dns;
mod ldap;
mod local;
pub mod publish;

pub use cache::Cache;
pub use dns::DnsSource;
pub use ldap::{order_srv_targets, LdapSource, SrvTarget};
pub use local::CertificateSet;

use crate::address::DirectAddress;
use crate::http::FetchLimits;
use crate::trust::revocation::{self, CrlPolicy, RevocationChecker};
use crate::trust::{self, AnchorSet, Binding, Direction, KeyUse, TrustError};
use openssl::x509::{X509Crl, X509};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("DNS resolver: {0}")]
    Resolver(String),
    #[error("public certificate directory {path}: {why}")]
    PublicDir { path: String, why: String },
}

/// The kinds of source, in the configurable order they are asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Local,
    Public,
    Dns,
    Ldap,
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(SourceKind::Local),
            "public" => Ok(SourceKind::Public),
            "dns" => Ok(SourceKind::Dns),
            "ldap" => Ok(SourceKind::Ldap),
            other => Err(format!(
                "unknown discovery source {other:?}: use local, public, dns or ldap"
            )),
        }
    }
}

/// Discovery settings.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub sources: Vec<SourceKind>,
    /// Nameservers `ip:port`; empty means the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    pub dns_timeout: Duration,
    pub dns_attempts: usize,
    pub ldap_timeout: Duration,
    pub http: FetchLimits,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            sources: vec![
                SourceKind::Local,
                SourceKind::Public,
                SourceKind::Dns,
                SourceKind::Ldap,
            ],
            nameservers: Vec::new(),
            dns_timeout: Duration::from_secs(3),
            dns_attempts: 2,
            ldap_timeout: Duration::from_secs(3),
            http: FetchLimits::default(),
            positive_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(300),
        }
    }
}

/// One step of a lookup, for the explanation.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub source: SourceKind,
    pub query: String,
    pub result: String,
}

/// A certificate a source returned, with where it came from.
#[derive(Clone)]
pub struct Found {
    pub cert: X509,
    pub origin: String,
}

/// What one source answered for one query.
pub struct Answer {
    pub found: Vec<Found>,
    pub steps: Vec<Step>,
    /// The source could not answer (timeout, server failure): a negative
    /// result must not be cached.
    pub temporary_failure: bool,
    /// DNS itself did not answer: later DNS and LDAP queries would only wait
    /// for the same timeout, so they are skipped.
    pub resolver_down: bool,
}

impl Answer {
    pub fn step(source: SourceKind, query: impl Into<String>, result: impl Into<String>) -> Answer {
        Answer {
            found: Vec::new(),
            steps: vec![Step {
                source,
                query: query.into(),
                result: result.into(),
            }],
            temporary_failure: false,
            resolver_down: false,
        }
    }
}

/// How a usable certificate is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Address,
    Domain,
}

/// A candidate and the verdict on it.
#[derive(Clone, Debug, Serialize)]
pub struct CandidateReport {
    pub source: String,
    pub subject: String,
    pub san: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    pub fingerprint_sha256: String,
    pub usable: bool,
    pub bound: Option<Bound>,
    /// Why it was taken or refused.
    pub reason: String,
}

/// A chosen certificate, as `--json` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Chosen {
    pub source: String,
    pub subject: String,
    pub san: Vec<String>,
    pub fingerprint_sha256: String,
    pub bound: Bound,
}

/// The whole explanation of one discovery.
#[derive(Clone, Debug, Serialize)]
pub struct DiscoveryReport {
    pub address: String,
    pub from_cache: bool,
    pub steps: Vec<Step>,
    pub candidates: Vec<CandidateReport>,
    pub chosen: Vec<Chosen>,
    pub temporary_failure: bool,
    pub warnings: Vec<String>,
}

/// The result: the report and the chosen certificates.
#[derive(Clone)]
pub struct Discovered {
    pub report: DiscoveryReport,
    pub certificates: Vec<X509>,
}

/// What decides usability: the sending domain's outgoing anchors (or none,
/// for an operator's look without anchors), the time and the key policy.
#[derive(Clone)]
pub struct TrustContext {
    pub domain: String,
    pub anchors: Option<AnchorSet>,
    pub at: i64,
    pub min_rsa_bits: u32,
}

fn san_list(cert: &X509) -> Vec<String> {
    let (emails, dns) = trust::san_names(cert);
    emails
        .into_iter()
        .map(|e| format!("email:{e}"))
        .chain(dns.into_iter().map(|d| format!("DNS:{d}")))
        .collect()
}

/// What the network gave for judging one candidate beyond the candidate
/// itself: intermediates fetched through AIA, CRLs of its path, and the CRLs
/// that could not be had (soft-fail).
#[derive(Default)]
pub struct PathMaterial {
    pub intermediates: Vec<X509>,
    pub crls: Vec<X509Crl>,
    /// One entry per certificate whose revocation could not be checked.
    pub unchecked: Vec<String>,
}

/// Judges one candidate for `address` (no AIA intermediates, no CRLs).
pub fn evaluate(
    cert: &X509,
    address: &DirectAddress,
    ctx: &TrustContext,
) -> Result<(Bound, String), TrustError> {
    evaluate_with(cert, address, ctx, &PathMaterial::default())
}

/// The checks that need no network: binding, dates, key usage and key.
fn policy_checks(
    cert: &X509,
    address: &DirectAddress,
    ctx: &TrustContext,
) -> Result<Binding, TrustError> {
    let binding = trust::check_binding(cert, address, true)?;
    trust::check_validity(cert, ctx.at)?;
    trust::check_key_usage(cert, KeyUse::Encrypt)?;
    trust::check_key(cert, KeyUse::Encrypt, ctx.min_rsa_bits)?;
    Ok(binding)
}

/// Judges one candidate for `address`, with the intermediates and CRLs of
/// `material` (a revoked certificate on the path refuses it).
pub fn evaluate_with(
    cert: &X509,
    address: &DirectAddress,
    ctx: &TrustContext,
    material: &PathMaterial,
) -> Result<(Bound, String), TrustError> {
    let binding = policy_checks(cert, address, ctx)?;
    let trust_note = match &ctx.anchors {
        Some(anchors) => {
            let path = trust::validate_with_crls(
                cert,
                &material.intermediates,
                anchors,
                &material.crls,
                ctx.at,
                &ctx.domain,
                Direction::Outgoing,
            )?;
            let mut note = format!("chains to anchor \"{}\"", path.anchor.subject);
            if !material.intermediates.is_empty() {
                note.push_str(&format!(
                    " through {} intermediate(s) fetched via AIA",
                    material.intermediates.len()
                ));
            }
            if !material.unchecked.is_empty() {
                note.push_str(", revocation NOT checked (CRL unavailable, soft-fail)");
            } else if !material.crls.is_empty() {
                note.push_str(", not revoked (CRL checked)");
            }
            note
        }
        None => "trust not checked (no anchors given)".to_string(),
    };
    let bound = match binding {
        Binding::Address(_) => Bound::Address,
        Binding::Domain(_) => Bound::Domain,
    };
    Ok((
        bound,
        format!("{binding}, valid, keyEncipherment, {trust_note}"),
    ))
}

/// The discovery chain.
pub struct Discovery {
    pub config: DiscoveryConfig,
    local: CertificateSet,
    public: CertificateSet,
    dns: Option<DnsSource>,
    ldap: Option<LdapSource>,
    cache: Cache,
    revocation: Option<Arc<RevocationChecker>>,
}

/// The network part of judging one candidate, before [`evaluate_with`].
#[derive(Default)]
struct Prepared {
    material: PathMaterial,
    steps: Vec<Step>,
    warnings: Vec<String>,
    /// The CRL could not be had under hard-fail: the candidate is refused.
    refusal: Option<TrustError>,
}

impl Discovery {
    /// Builds the chain: `local` are the local domains' own certificates,
    /// `public` the partners' certificates kept on disk.
    pub fn new(
        config: DiscoveryConfig,
        local: CertificateSet,
        public: CertificateSet,
    ) -> Result<Discovery, DiscoveryError> {
        let needs_dns = config
            .sources
            .iter()
            .any(|s| matches!(s, SourceKind::Dns | SourceKind::Ldap));
        let dns = if needs_dns {
            Some(DnsSource::new(&config)?)
        } else {
            None
        };
        let ldap = dns
            .as_ref()
            .map(|d| LdapSource::new(d.clone(), config.ldap_timeout));
        Ok(Discovery {
            cache: Cache::new(config.positive_ttl, config.negative_ttl),
            revocation: Some(Arc::new(RevocationChecker::new(
                config.http,
                CrlPolicy::SoftFail,
            ))),
            config,
            local,
            public,
            dns,
            ldap,
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Uses `checker` for AIA chain completion and CRLs (by default a
    /// soft-fail checker with the discovery's HTTP limits).
    pub fn with_revocation(mut self, checker: RevocationChecker) -> Self {
        self.revocation = Some(Arc::new(checker));
        self
    }

    /// Shares `checker` (and its CRL cache) with other users.
    pub fn with_shared_revocation(mut self, checker: Arc<RevocationChecker>) -> Self {
        self.revocation = Some(checker);
        self
    }

    /// No AIA fetching and no CRLs: candidates are judged on what the
    /// sources gave.
    pub fn without_revocation(mut self) -> Self {
        self.revocation = None;
        self
    }

    pub fn revocation(&self) -> Option<&Arc<RevocationChecker>> {
        self.revocation.as_ref()
    }

    /// Completes the candidate's chain through AIA and fetches the CRLs of
    /// its path, when there are anchors to judge against and the candidate
    /// passes the checks that need no network.
    async fn prepare(
        &self,
        kind: SourceKind,
        cert: &X509,
        address: &DirectAddress,
        ctx: &TrustContext,
    ) -> Prepared {
        let mut p = Prepared::default();
        let (Some(checker), Some(anchors)) = (&self.revocation, &ctx.anchors) else {
            return p;
        };
        if anchors.is_empty() || policy_checks(cert, address, ctx).is_err() {
            return p;
        }
        let who = trust::subject(cert);
        let (intermediates, notes) = checker.complete_chain(cert, &[], anchors).await;
        p.steps.extend(notes.into_iter().map(|n| Step {
            source: kind,
            query: format!("issuer of \"{who}\" (AIA)"),
            result: n,
        }));
        p.material.intermediates = intermediates;
        let Some(path) = revocation::path_to_anchor(cert, &p.material.intermediates, anchors)
        else {
            return p;
        };
        let query = format!("revocation of \"{who}\" (CRL)");
        match checker.check_crls(&path).await {
            Ok(outcome) => {
                p.steps.extend(outcome.notes.into_iter().map(|n| Step {
                    source: kind,
                    query: query.clone(),
                    result: n,
                }));
                for w in outcome.warnings {
                    p.steps.push(Step {
                        source: kind,
                        query: query.clone(),
                        result: format!("warning: {w}"),
                    });
                    p.material.unchecked.push(w.clone());
                    p.warnings.push(w);
                }
                p.material.crls = outcome.crls;
            }
            Err(e) => {
                p.steps.push(Step {
                    source: kind,
                    query,
                    result: format!("refused: {e}"),
                });
                p.refusal = Some(e);
            }
        }
        p
    }

    /// The DNS side, when DNS or LDAP is enabled (also used for MX lookups).
    pub fn dns(&self) -> Option<&DnsSource> {
        self.dns.as_ref()
    }

    async fn ask(&self, kind: SourceKind, address: &DirectAddress, domain_query: bool) -> Answer {
        let domain = address.domain();
        match kind {
            SourceKind::Local | SourceKind::Public => {
                let set = if kind == SourceKind::Local {
                    &self.local
                } else {
                    &self.public
                };
                if domain_query {
                    set.lookup_domain(kind, domain)
                } else {
                    set.lookup_address(kind, address)
                }
            }
            SourceKind::Dns => match &self.dns {
                Some(d) if domain_query => d.lookup(&format!("{domain}."), &self.config.http).await,
                Some(d) => {
                    d.lookup(&dns::address_name(address), &self.config.http)
                        .await
                }
                None => Answer::step(kind, "-", "DNS is not enabled"),
            },
            SourceKind::Ldap => match &self.ldap {
                Some(l) => {
                    let mail = if domain_query {
                        domain.to_string()
                    } else {
                        address.to_string()
                    };
                    l.lookup(domain, &mail).await
                }
                None => Answer::step(kind, "-", "LDAP is not enabled"),
            },
        }
    }

    /// Finds the certificates for `address` that `ctx` accepts.
    pub async fn discover(&self, address: &DirectAddress, ctx: &TrustContext) -> Discovered {
        let key = format!(
            "{}|{}",
            address.to_string().to_ascii_lowercase(),
            ctx.domain
        );
        if let Some(mut hit) = self.cache.get(&key) {
            hit.report.from_cache = true;
            return hit;
        }
        let mut report = DiscoveryReport {
            address: address.to_string(),
            from_cache: false,
            steps: Vec::new(),
            candidates: Vec::new(),
            chosen: Vec::new(),
            temporary_failure: false,
            warnings: Vec::new(),
        };
        if ctx.anchors.is_none() {
            report
                .warnings
                .push("no anchors: candidates are not checked for trust".into());
        }
        let mut certificates = Vec::new();
        let mut resolver_down = false;
        'sources: for kind in self.config.sources.clone() {
            for domain_query in [false, true] {
                if resolver_down && matches!(kind, SourceKind::Dns | SourceKind::Ldap) {
                    report.steps.push(Step {
                        source: kind,
                        query: if domain_query {
                            address.domain().to_string()
                        } else {
                            address.to_string()
                        },
                        result: "skipped: the DNS resolver did not answer".into(),
                    });
                    continue;
                }
                let answer = self.ask(kind, address, domain_query).await;
                resolver_down |= answer.resolver_down;
                report.steps.extend(answer.steps);
                report.temporary_failure |= answer.temporary_failure;
                let mut usable: Vec<(Found, Bound)> = Vec::new();
                for found in answer.found {
                    let prepared = self.prepare(kind, &found.cert, address, ctx).await;
                    report.steps.extend(prepared.steps);
                    for w in prepared.warnings {
                        if !report.warnings.contains(&w) {
                            report.warnings.push(w);
                        }
                    }
                    let verdict = match prepared.refusal {
                        Some(e) => {
                            // An unknown revocation status may be known later.
                            report.temporary_failure = true;
                            Err(e)
                        }
                        None => evaluate_with(&found.cert, address, ctx, &prepared.material),
                    };
                    let summary = trust::CertSummary::of(&found.cert);
                    let (is_usable, bound, reason) = match verdict {
                        Ok((bound, why)) => (true, Some(bound), why),
                        Err(e) => (false, None, e.to_string()),
                    };
                    report.candidates.push(CandidateReport {
                        source: found.origin.clone(),
                        subject: summary.subject,
                        san: san_list(&found.cert),
                        not_before: summary.not_before,
                        not_after: summary.not_after,
                        fingerprint_sha256: summary.fingerprint,
                        usable: is_usable,
                        bound,
                        reason,
                    });
                    if let (true, Some(b)) = (is_usable, bound) {
                        usable.push((found, b));
                    }
                }
                // Address-bound certificates win; domain-bound ones only without them.
                let winning = if usable.iter().any(|(_, b)| *b == Bound::Address) {
                    Bound::Address
                } else {
                    Bound::Domain
                };
                let winners: Vec<(Found, Bound)> =
                    usable.into_iter().filter(|(_, b)| *b == winning).collect();
                if !winners.is_empty() {
                    for (found, bound) in winners {
                        let fp = trust::fingerprint(&found.cert);
                        if report.chosen.iter().any(|c| c.fingerprint_sha256 == fp) {
                            continue;
                        }
                        report.chosen.push(Chosen {
                            source: found.origin.clone(),
                            subject: trust::subject(&found.cert),
                            san: san_list(&found.cert),
                            fingerprint_sha256: fp,
                            bound,
                        });
                        certificates.push(found.cert);
                    }
                    break 'sources;
                }
            }
        }
        let result = Discovered {
            report,
            certificates,
        };
        if !(result.certificates.is_empty() && result.report.temporary_failure) {
            self.cache
                .put(key, result.clone(), !result.certificates.is_empty());
        }
        result
    }
}

/// Recipient certificates for sealing: every recipient's chosen certificates,
/// and the reports of those for whom none was found.
pub struct RecipientCertificates {
    pub certificates: Vec<X509>,
    pub missing: Vec<DiscoveryReport>,
}

impl Discovery {
    /// Discovers every recipient (the outgoing path of the agent).
    pub async fn certificates_for(
        &self,
        recipients: &[DirectAddress],
        ctx: &TrustContext,
    ) -> RecipientCertificates {
        let mut out = RecipientCertificates {
            certificates: Vec::new(),
            missing: Vec::new(),
        };
        for r in recipients {
            let found = self.discover(r, ctx).await;
            if found.certificates.is_empty() {
                out.missing.push(found.report);
            } else {
                out.certificates.extend(found.certificates);
            }
        }
        out
    }
}

impl DiscoveryReport {
    /// The explanation, for people.
    pub fn explain(&self) -> String {
        let mut s = format!("discovering certificates for {}", self.address);
        if self.from_cache {
            s.push_str(" (from cache: no lookups made)");
        }
        s.push('\n');
        for w in &self.warnings {
            s.push_str(&format!("  warning: {w}\n"));
        }
        for step in &self.steps {
            s.push_str(&format!(
                "  [{}] {} -> {}\n",
                serde_json::to_value(step.source)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                step.query,
                step.result
            ));
        }
        for c in &self.candidates {
            s.push_str(&format!(
                "  candidate \"{}\" [{}] from {}\n    valid {} .. {}, sha256 {}\n    {}: {}\n",
                c.subject,
                c.san.join(", "),
                c.source,
                c.not_before,
                c.not_after,
                c.fingerprint_sha256,
                if c.usable { "TAKEN" } else { "REFUSED" },
                c.reason
            ));
        }
        if self.chosen.is_empty() {
            s.push_str(if self.temporary_failure {
                "  no usable certificate found (some sources could not answer: try again later)\n"
            } else {
                "  no usable certificate found\n"
            });
        } else {
            for c in &self.chosen {
                s.push_str(&format!(
                    "  chosen: \"{}\" ({}-bound) from {}\n",
                    c.subject,
                    serde_json::to_value(c.bound)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    c.source
                ));
            }
        }
        s
    }
}
