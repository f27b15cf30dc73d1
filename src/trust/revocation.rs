//! Revocation and chain completion: missing intermediates fetched through
//! the Authority Information Access caIssuers URLs of a certificate, and the
//! CRLs named by the CRL distribution points of every certificate on a path.
//!
//! Fetching is the network half; deciding is [`check_revoked`] (used by
//! [`super::validate_with_crls`]): a certificate is revoked when its serial
//! is listed in a CRL that its issuer signed and that is already in force.
//! This is done here rather than with OpenSSL's `CRL_CHECK_ALL`, which fails
//! every certificate that has no distribution point.

use super::{parse_certificates, subject, AnchorSet, TrustError};
use crate::http::{self, FetchLimits};
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::nid::Nid;
use openssl::x509::{CrlStatus, X509Crl, X509CrlRef, X509Ref, X509VerifyResult, X509};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// How many issuers [`RevocationChecker::complete_chain`] fetches at most
/// for one certificate (a path of leaf, up to four fetched CAs, anchor).
pub const MAX_AIA_FETCHES: usize = 4;

/// Longest path [`path_to_anchor`] builds, against loops and silly chains.
const MAX_PATH: usize = 10;

/// What a CRL that cannot be fetched (or is not signed by the issuer) means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrlPolicy {
    /// Accept the certificate, with a warning that revocation was not checked.
    #[default]
    SoftFail,
    /// Refuse the certificate: its revocation status is unknown.
    HardFail,
}

impl std::fmt::Display for CrlPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CrlPolicy::SoftFail => "soft-fail",
            CrlPolicy::HardFail => "hard-fail",
        })
    }
}

impl std::str::FromStr for CrlPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "soft-fail" | "soft" | "softfail" => Ok(CrlPolicy::SoftFail),
            "hard-fail" | "hard" | "hardfail" => Ok(CrlPolicy::HardFail),
            other => Err(format!(
                "unknown CRL policy {other:?}: use soft-fail or hard-fail"
            )),
        }
    }
}

/// What [`RevocationChecker::check_crls`] gathered for a path.
#[derive(Default)]
pub struct CrlOutcome {
    /// Verified CRLs (signed by the issuer of the certificate they cover).
    pub crls: Vec<X509Crl>,
    /// What was fetched or taken from the cache.
    pub notes: Vec<String>,
    /// CRLs that could not be had under [`CrlPolicy::SoftFail`]: the
    /// certificates they cover were not checked for revocation.
    pub warnings: Vec<String>,
}

/// Fetches issuers and CRLs over HTTP, keeping each CRL until its nextUpdate.
pub struct RevocationChecker {
    limits: FetchLimits,
    policy: CrlPolicy,
    /// CRLs by URL; used while before their nextUpdate.
    cache: Mutex<HashMap<String, X509Crl>>,
}

impl RevocationChecker {
    pub fn new(limits: FetchLimits, policy: CrlPolicy) -> Self {
        RevocationChecker {
            limits,
            policy,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> CrlPolicy {
        self.policy
    }

    /// How many CRLs are cached.
    pub fn cached_crls(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Fetches missing intermediates through AIA caIssuers (DER, PEM or
    /// PKCS#7 "p7c"; at most [`MAX_AIA_FETCHES`] fetches) until the chain
    /// reaches one of `anchors` or no AIA URL remains. Returns the fetched
    /// certificates that are on the path (leaf side first) and notes saying
    /// what was fetched and what failed.
    pub async fn complete_chain(
        &self,
        leaf: &X509Ref,
        untrusted: &[X509],
        anchors: &AnchorSet,
    ) -> (Vec<X509>, Vec<String>) {
        let anchor_fps: HashSet<String> = anchors.iter().map(|a| a.fingerprint()).collect();
        let mut found: Vec<X509> = Vec::new();
        // Certificates a fetched bundle brought along, usable further up.
        let mut pool: Vec<X509> = untrusted.to_vec();
        let mut notes = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut current = leaf.to_owned();
        let mut fetches = 0;
        for _ in 0..MAX_PATH {
            seen.insert(super::fingerprint(&current));
            if anchor_fps.contains(&super::fingerprint(&current))
                || anchors.iter().any(|a| is_issuer(&a.cert, &current))
            {
                break;
            }
            if let Some(next) = pool
                .iter()
                .find(|c| !seen.contains(&super::fingerprint(c)) && is_issuer(c, &current))
                .cloned()
            {
                if !untrusted.iter().any(|u| same_cert(u, &next)) {
                    found.push(next.clone());
                }
                current = next;
                continue;
            }
            if self_issued(&current) {
                break;
            }
            let urls = ca_issuer_urls(&current);
            if urls.is_empty() {
                if !found.is_empty() {
                    notes.push(format!(
                        "\"{}\" has no AIA caIssuers URL: the chain cannot be completed further",
                        subject(&current)
                    ));
                }
                break;
            }
            if fetches >= MAX_AIA_FETCHES {
                notes.push(format!(
                    "AIA: stopped after {MAX_AIA_FETCHES} fetched issuers, below \"{}\"",
                    subject(&current)
                ));
                break;
            }
            fetches += 1;
            let mut next = None;
            for url in urls {
                if !is_http(&url) {
                    notes.push(format!(
                        "AIA: {url} skipped (only http caIssuers URLs are fetched)"
                    ));
                    continue;
                }
                let certs = match http::fetch(&url, self.limits).await {
                    Ok(body) => parse_certificates(&body),
                    Err(e) => Err(fetch_error(&url, &e)),
                };
                match certs {
                    Ok(certs) => match certs.iter().position(|c| is_issuer(c, &current)) {
                        Some(i) => {
                            let issuer = certs[i].clone();
                            notes.push(format!(
                                "AIA: fetched the issuer \"{}\" of \"{}\" from {url}",
                                subject(&issuer),
                                subject(&current)
                            ));
                            pool.extend(
                                certs
                                    .into_iter()
                                    .enumerate()
                                    .filter(|(j, _)| *j != i)
                                    .map(|(_, c)| c),
                            );
                            next = Some(issuer);
                            break;
                        }
                        None => notes.push(format!(
                            "AIA: {url} holds no issuer of \"{}\" ({} certificate(s), none signed it)",
                            subject(&current),
                            certs.len()
                        )),
                    },
                    Err(why) => notes.push(format!(
                        "AIA: fetching the issuer of \"{}\" from {url} failed: {why}",
                        subject(&current)
                    )),
                }
            }
            match next {
                Some(issuer) => {
                    found.push(issuer.clone());
                    current = issuer;
                }
                None => break,
            }
        }
        (found, notes)
    }

    /// Fetches (or takes from the cache while before nextUpdate) the CRLs of
    /// every certificate in `chain` that has CRL distribution points (http
    /// only; DER or PEM CRLs). `chain` runs from the leaf up to the anchor, as
    /// [`path_to_anchor`] builds it: a certificate is checked when its issuer
    /// is in `chain` (that key must have signed the CRL); the anchor at the
    /// top and self-issued certificates are not. Under
    /// [`CrlPolicy::HardFail`] a CRL that cannot be had is an error; under
    /// soft-fail it is a warning (returned among the notes, starting with
    /// "warning: ").
    pub async fn crls_for(
        &self,
        chain: &[X509],
    ) -> Result<(Vec<X509Crl>, Vec<String>), TrustError> {
        let outcome = self.check_crls(chain).await?;
        let mut notes = outcome.notes;
        notes.extend(
            outcome
                .warnings
                .into_iter()
                .map(|w| format!("warning: {w}")),
        );
        Ok((outcome.crls, notes))
    }

    /// [`Self::crls_for`] with the warnings kept apart from the notes.
    pub async fn check_crls(&self, chain: &[X509]) -> Result<CrlOutcome, TrustError> {
        let mut out = CrlOutcome::default();
        for (i, cert) in chain.iter().enumerate() {
            if self_issued(cert) {
                continue;
            }
            let urls = crl_urls(cert);
            if urls.is_empty() {
                continue;
            }
            let Some(issuer) = chain
                .iter()
                .enumerate()
                .find(|(j, c)| *j != i && is_issuer(c, cert))
                .map(|(_, c)| c)
            else {
                if i + 1 < chain.len() {
                    out.notes.push(format!(
                        "CRL of \"{}\" not checked: its issuer is not in the chain",
                        subject(cert)
                    ));
                }
                // The top of the path is the anchor: trusted as configured.
                continue;
            };
            let mut failures: Vec<(String, String)> = Vec::new();
            let mut got = None;
            for url in &urls {
                if !is_http(url) {
                    failures.push((url.clone(), "only http CRL URLs are fetched".into()));
                    continue;
                }
                match self.crl(url, issuer).await {
                    Ok((crl, cached)) => {
                        let next = crl
                            .next_update()
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "none".into());
                        let entries = crl.get_revoked().map(|r| r.len()).unwrap_or(0);
                        out.notes.push(format!(
                            "CRL of \"{}\" for \"{}\" {} {url} ({entries} revoked, next update {next})",
                            subject(issuer),
                            subject(cert),
                            if cached { "taken from the cache of" } else { "fetched from" },
                        ));
                        if crl.next_update().is_some_and(past) {
                            out.warnings.push(format!(
                                "the CRL at {url} is past its nextUpdate ({next}); used anyway"
                            ));
                        }
                        got = Some(crl);
                        break;
                    }
                    Err(why) => failures.push((url.clone(), why)),
                }
            }
            match got {
                Some(crl) => {
                    if !out.crls.iter().any(|c| same_crl(c, &crl)) {
                        out.crls.push(crl);
                    }
                }
                None => {
                    let (url, why) = failures
                        .first()
                        .cloned()
                        .unwrap_or_else(|| ("-".into(), "no CRL URL".into()));
                    let all = failures
                        .iter()
                        .map(|(u, w)| format!("{u}: {w}"))
                        .collect::<Vec<_>>()
                        .join("; ");
                    match self.policy {
                        CrlPolicy::HardFail => {
                            return Err(TrustError::CrlUnavailable {
                                subject: subject(cert),
                                url,
                                why,
                            })
                        }
                        CrlPolicy::SoftFail => out.warnings.push(format!(
                            "the CRL of \"{}\" could not be fetched ({all}): its revocation is not checked (CRL policy soft-fail)",
                            subject(cert)
                        )),
                    }
                }
            }
        }
        Ok(out)
    }

    /// The CRL at `url`, verified against `issuer`: from the cache while
    /// before its nextUpdate, else fetched. `true` when cached.
    async fn crl(&self, url: &str, issuer: &X509Ref) -> Result<(X509Crl, bool), String> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(url).and_then(|crl| dup_crl(crl)));
        if let Some(crl) = cached {
            let fresh = crl.next_update().is_some_and(|t| !past(t));
            if fresh && now().is_ok_and(|n| crl_signed_by(&crl, issuer, &n)) {
                return Ok((crl, true));
            }
        }
        let body = http::fetch(url, self.limits)
            .await
            .map_err(|e| fetch_error(url, &e))?;
        let crl = parse_crl(&body)?;
        if crl.issuer_name().to_der().ok() != issuer.subject_name().to_der().ok() {
            return Err(format!(
                "the CRL is issued by \"{}\", not by \"{}\"",
                super::subject_line(crl.issuer_name()),
                subject(issuer)
            ));
        }
        if !now().is_ok_and(|n| crl_signed_by(&crl, issuer, &n)) {
            return Err(format!(
                "the CRL is not signed by \"{}\" or is not yet in force",
                subject(issuer)
            ));
        }
        if crl.next_update().is_some_and(|t| !past(t)) {
            if let (Ok(mut c), Some(copy)) = (self.cache.lock(), dup_crl(&crl)) {
                c.insert(url.to_string(), copy);
            }
        }
        Ok((crl, false))
    }
}

/// Parses a DER or PEM CRL.
pub fn parse_crl(data: &[u8]) -> Result<X509Crl, String> {
    if data.windows(11).any(|w| w == b"-----BEGIN ") {
        X509Crl::from_pem(data).map_err(|e| format!("bad PEM CRL: {e}"))
    } else {
        X509Crl::from_der(data).map_err(|_| "neither a DER nor a PEM CRL".to_string())
    }
}

/// The URIs of a certificate's CRL distribution points.
pub fn crl_urls(cert: &X509Ref) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(points) = cert.crl_distribution_points() {
        for p in points.iter() {
            if let Some(names) = p.distpoint().and_then(|d| d.fullname()) {
                out.extend(names.iter().filter_map(|n| n.uri().map(str::to_string)));
            }
        }
    }
    out
}

/// The URIs of a certificate's AIA caIssuers entries.
pub fn ca_issuer_urls(cert: &X509Ref) -> Vec<String> {
    cert.authority_info()
        .map(|aia| {
            aia.iter()
                .filter(|d| d.method().nid() == Nid::AD_CA_ISSUERS)
                .filter_map(|d| d.location().uri().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The certification path from `leaf` up to one of `anchors`, through
/// `untrusted` (leaf first, anchor last), or `None` when no anchor is reached.
/// A leaf that is itself an anchor gives a path of one.
pub fn path_to_anchor(
    leaf: &X509Ref,
    untrusted: &[X509],
    anchors: &AnchorSet,
) -> Option<Vec<X509>> {
    let anchor_fps: HashSet<String> = anchors.iter().map(|a| a.fingerprint()).collect();
    let mut path = vec![leaf.to_owned()];
    let mut seen = HashSet::new();
    while path.len() <= MAX_PATH {
        let current = path.last()?.clone();
        let fp = super::fingerprint(&current);
        if anchor_fps.contains(&fp) {
            return Some(path);
        }
        seen.insert(fp);
        if let Some(a) = anchors.iter().find(|a| is_issuer(&a.cert, &current)) {
            path.push(a.cert.clone());
            return Some(path);
        }
        let next = untrusted
            .iter()
            .find(|c| !seen.contains(&super::fingerprint(c)) && is_issuer(c, &current))?;
        path.push(next.clone());
    }
    None
}

/// Refuses the first certificate of `chain` (leaf first, anchor last, as
/// path validation verified it) whose serial a CRL in `crls` lists. A CRL
/// counts for a certificate when the next certificate of the chain (its
/// issuer) signed it and it was issued at or before `at` (Unix seconds). A
/// CRL past its nextUpdate still counts: a revocation is never undone by a
/// late CRL. The anchor itself is not checked.
pub fn check_revoked(chain: &[X509], crls: &[X509Crl], at: i64) -> Result<(), TrustError> {
    if crls.is_empty() {
        return Ok(());
    }
    let at_time = Asn1Time::from_unix(at)?;
    for pair in chain.windows(2) {
        let (cert, issuer) = (&pair[0], &pair[1]);
        for crl in crls {
            if !crl_signed_by(crl, issuer, &at_time) {
                continue;
            }
            if let CrlStatus::Revoked(_) = crl.get_by_serial(cert.serial_number()) {
                return Err(TrustError::Revoked {
                    subject: subject(cert),
                });
            }
        }
    }
    Ok(())
}

/// `crl` names `issuer` as its issuer, carries its signature and was
/// issued at or before `at`.
fn crl_signed_by(crl: &X509CrlRef, issuer: &X509Ref, at: &Asn1TimeRef) -> bool {
    if crl.issuer_name().to_der().ok() != issuer.subject_name().to_der().ok() {
        return false;
    }
    let signed = issuer
        .public_key()
        .ok()
        .and_then(|k| crl.verify(&k).ok())
        .unwrap_or(false);
    signed && crl.last_update() <= at
}

/// `issuer` issued `cert`: names (and key identifiers) match and its key
/// verifies the signature.
fn is_issuer(issuer: &X509Ref, cert: &X509Ref) -> bool {
    issuer.issued(cert) == X509VerifyResult::OK
        && issuer
            .public_key()
            .ok()
            .and_then(|k| cert.verify(&k).ok())
            .unwrap_or(false)
}

fn self_issued(cert: &X509Ref) -> bool {
    cert.subject_name().to_der().ok() == cert.issuer_name().to_der().ok()
}

fn same_cert(a: &X509Ref, b: &X509Ref) -> bool {
    super::fingerprint(a) == super::fingerprint(b)
}

fn same_crl(a: &X509CrlRef, b: &X509CrlRef) -> bool {
    a.to_der().ok() == b.to_der().ok()
}

/// Why a fetch failed, without the URL the error repeats.
fn fetch_error(url: &str, e: &http::HttpError) -> String {
    let text = e.to_string();
    text.strip_prefix(url)
        .and_then(|rest| rest.strip_prefix(": "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// A copy of a CRL (the crate has no `Clone` for it).
fn dup_crl(crl: &X509CrlRef) -> Option<X509Crl> {
    crl.to_der().ok().and_then(|d| X509Crl::from_der(&d).ok())
}

fn is_http(url: &str) -> bool {
    url.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

fn now() -> Result<Asn1Time, openssl::error::ErrorStack> {
    Asn1Time::from_unix(chrono::Utc::now().timestamp())
}

/// `t` is before now.
fn past(t: &Asn1TimeRef) -> bool {
    now().map(|n| t < n).unwrap_or(false)
}
