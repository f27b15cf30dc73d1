//! Typed settings: the embedded default, then `--config FILE`, then
//! `HISPD__SECTION__KEY` environment variables. Every problem is collected
//! and reported together, with its key and file, before anything starts.

use crate::address::normalize_domain;
use crate::agent::{self, Agent, AgentSettings, LocalDomain, OuterSubject, PrivateCredential};
use crate::discovery::{CertificateSet, Discovery, DiscoveryConfig, SourceKind};
use crate::http::FetchLimits;
use crate::trust::AnchorSet;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The annotated default configuration, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../conf/hispd.toml");

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub source: String,
    pub message: String,
}

/// Every problem found, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {} ({}): {}", p.key, p.source, p.message)?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    server: RawServer,
    notify: RawNotify,
    documents: RawDocuments,
    delivery: RawDelivery,
    smime: RawSmime,
    policy: RawPolicy,
    certs: RawCerts,
    discovery: RawDiscovery,
    pull: RawPull,
    #[serde(default)]
    domains: Vec<RawDomain>,
    #[serde(default)]
    bundles: Vec<RawBundle>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    name: String,
    url: String,
    #[serde(default = "default_refresh")]
    refresh_secs: u64,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default = "default_direction")]
    direction: String,
    signer: Option<String>,
    #[serde(default)]
    allow_expired_signer: bool,
    #[serde(default = "default_bundle_bytes")]
    max_bytes: usize,
}

fn default_refresh() -> u64 {
    86400
}

fn default_direction() -> String {
    "both".into()
}

fn default_bundle_bytes() -> usize {
    5 * 1024 * 1024
}

/// A trust bundle subscription.
#[derive(Debug, Clone)]
pub struct BundleConfig {
    pub name: String,
    pub url: String,
    pub refresh: Duration,
    /// Local domains it applies to (empty: all).
    pub domains: Vec<String>,
    pub incoming: bool,
    pub outgoing: bool,
    pub signer: Option<PathBuf>,
    pub allow_expired_signer: bool,
    pub max_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    hostname: String,
    data_dir: String,
    mx_listen: String,
    submission_listen: String,
    tls_cert: String,
    tls_key: String,
    max_message_size: usize,
    max_recipients: usize,
    max_connections: usize,
    max_connections_per_ip: usize,
    command_timeout_secs: u64,
    data_timeout_secs: u64,
    imap_listen: String,
    pop3_listen: String,
    log_format: String,
    #[serde(default)]
    submission_trusted_networks: Vec<String>,
    #[serde(default)]
    worker_threads: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPull {
    listen: String,
    base_url: String,
    tls_cert: String,
    tls_key: String,
    open_registration: bool,
    access_token_secs: u64,
    refresh_token_secs: u64,
    code_secs: u64,
    #[serde(default)]
    registries: Vec<RawRegistry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    name: String,
    issuer: String,
    #[serde(default)]
    jwks_file: String,
    #[serde(default)]
    jwks_url: String,
}

/// Blue Button Plus Pull: the OAuth2 + FHIR listener.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// None: Pull is disabled.
    pub listen: Option<std::net::SocketAddr>,
    /// The public base URL (no trailing slash) apps see: issuer and endpoints.
    pub base_url: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub open_registration: bool,
    pub access_token: Duration,
    pub refresh_token: Duration,
    pub code: Duration,
    pub registries: Vec<RegistryConfig>,
}

/// A trusted app registry (Blue Button Plus trusted registration).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub name: String,
    /// The `iss` of its software statements.
    pub issuer: String,
    pub jwks: JwksSource,
}

#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocuments {
    push_from: String,
    holder_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    mdn_timeout_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    port: u16,
    smart_host: String,
    require_tls: bool,
    retry_base_secs: u64,
    max_age_secs: u64,
    connect_timeout_secs: u64,
    concurrency: usize,
    memory_budget_mb: u64,
}

/// Listener and daemon settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub hostname: String,
    pub data_dir: PathBuf,
    pub mx_listen: std::net::SocketAddr,
    pub submission_listen: std::net::SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub imap_listen: Option<std::net::SocketAddr>,
    pub pop3_listen: Option<std::net::SocketAddr>,
    /// Clients that may submit without AUTH, from local domains only.
    pub submission_trusted_networks: Vec<crate::smtp::server::Network>,
    pub json_logs: bool,
    /// As the sending HISP: how long to wait for processed/dispatched MDNs.
    pub mdn_timeout: Duration,
    /// Threads of the async runtime (sessions, sealing, delivery); 0: one
    /// per CPU.
    pub worker_threads: usize,
}

/// Outbound delivery settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub port: u16,
    pub smart_host: Option<String>,
    pub require_tls: bool,
    pub retry_base: Duration,
    pub max_age: Duration,
    pub connect_timeout: Duration,
    /// Deliveries in progress at once.
    pub concurrency: usize,
    /// Messages in delivery at once add up to at most this many bytes; a
    /// larger one still goes, alone.
    pub memory_budget: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    sources: Vec<String>,
    public_dir: String,
    nameservers: Vec<String>,
    dns_timeout_ms: u64,
    dns_attempts: usize,
    ldap_timeout_ms: u64,
    http_timeout_ms: u64,
    http_max_bytes: usize,
    cache_positive_ttl_secs: u64,
    cache_negative_ttl_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmime {
    cipher: String,
    key_transport: String,
    digest: String,
    outer_subject: String,
    outer_subject_text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    min_rsa_bits: u32,
    require_rcpt_in_headers: bool,
    crl_policy: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCerts {
    dir: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    name: String,
    dir: Option<String>,
    incoming_anchors: Option<Vec<String>>,
    outgoing_anchors: Option<Vec<String>>,
    edge_relay: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    private: Vec<RawPrivate>,
}

/// `[[domains.routes]]`: where one address's received mail goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    address: String,
    /// "host:port" of an edge relay, or "mailbox".
    deliver: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrivate {
    cert: Option<String>,
    key: Option<String>,
    pkcs12: Option<String>,
    password: Option<String>,
}

/// A local domain as configured (paths resolved, nothing loaded yet).
#[derive(Debug, Clone)]
pub struct DomainConfig {
    pub name: String,
    /// Deliver received mail to this SMTP server ("host:port") instead of mailboxes.
    pub edge_relay: Option<String>,
    /// Per address, overriding `edge_relay`: (address, relay "host:port",
    /// or `None` for the built-in mailbox).
    pub routes: Vec<(String, Option<String>)>,
    pub dir: PathBuf,
    pub incoming_anchors: Vec<PathBuf>,
    pub outgoing_anchors: Vec<PathBuf>,
    pub private: Vec<PrivateSource>,
}

#[derive(Debug, Clone)]
pub enum PrivateSource {
    Pem { cert: PathBuf, key: PathBuf },
    Pkcs12 { file: PathBuf, password: String },
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sender of patient-directed pushes (empty: records@<first domain>).
    pub push_from: String,
    /// The data holder's name in pushed messages (empty: the hostname).
    pub holder_name: String,
    pub bundles: Vec<BundleConfig>,
    pub crl_policy: crate::trust::revocation::CrlPolicy,
    pub server: ServerConfig,
    pub delivery: DeliveryConfig,
    pub agent: AgentSettings,
    pub discovery: DiscoveryConfig,
    /// Partners' public certificates for discovery.
    pub public_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub domains: Vec<DomainConfig>,
    pub pull: PullConfig,
    /// Where the settings came from, for messages.
    pub source: String,
}

impl Settings {
    /// Loads the embedded default, then `file`, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigErrors> {
        Self::load_with_env(file, std::env::vars())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigErrors> {
        let (settings, problems) = Self::parse(file, env)?;
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Settings with defaults in place of invalid values, and the problems
    /// found; `Err` only when the sources cannot be read at all.
    fn parse(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Settings, Vec<ConfigProblem>), ConfigErrors> {
        let source = file
            .map(|f| f.display().to_string())
            .unwrap_or_else(|| "embedded default".into());
        let problem = |key: &str, message: String| ConfigProblem {
            key: key.to_string(),
            source: source.clone(),
            message,
        };
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_CONFIG,
            config::FileFormat::Toml,
        ));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigErrors(vec![problem(
                    "--config",
                    "file not found or not a regular file".into(),
                )]));
            }
            builder = builder.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        let env_map: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("HISPD__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("HISPD")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let raw: RawSettings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                let key = match &e {
                    config::ConfigError::Type { key: Some(k), .. } => k.clone(),
                    _ => "(syntax)".to_string(),
                };
                ConfigErrors(vec![problem(&key, e.to_string())])
            })?;

        let base = file
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };

        let mut problems = Vec::new();
        let cipher = raw
            .smime
            .cipher
            .parse()
            .map_err(|e| problems.push(problem("smime.cipher", e)))
            .ok();
        let key_transport = raw
            .smime
            .key_transport
            .parse()
            .map_err(|e| problems.push(problem("smime.key_transport", e)))
            .ok();
        let digest = raw
            .smime
            .digest
            .parse()
            .map_err(|e| problems.push(problem("smime.digest", e)))
            .ok();
        let outer_subject = match raw.smime.outer_subject.as_str() {
            "hide" => {
                let text = raw.smime.outer_subject_text.trim().to_string();
                if text.contains(['\r', '\n']) {
                    problems.push(problem(
                        "smime.outer_subject_text",
                        "must be one line".into(),
                    ));
                }
                Some(OuterSubject::Hide(text))
            }
            "copy" => Some(OuterSubject::Copy),
            other => {
                problems.push(problem(
                    "smime.outer_subject",
                    format!("{other:?} is not \"hide\" or \"copy\""),
                ));
                None
            }
        };
        if raw.policy.min_rsa_bits < 2048 {
            problems.push(problem(
                "policy.min_rsa_bits",
                format!(
                    "{} is below the Applicability Statement's minimum of 2048",
                    raw.policy.min_rsa_bits
                ),
            ));
        }
        let certs_dir = resolve(&raw.certs.dir);
        let d = &raw.discovery;
        let mut sources = Vec::new();
        for name in &d.sources {
            match name.parse::<SourceKind>() {
                Ok(k) if !sources.contains(&k) => sources.push(k),
                Ok(_) => problems.push(problem(
                    "discovery.sources",
                    format!("{name:?} is listed twice"),
                )),
                Err(e) => problems.push(problem("discovery.sources", e)),
            }
        }
        let mut nameservers = Vec::new();
        for ns in &d.nameservers {
            match ns.parse::<std::net::SocketAddr>() {
                Ok(a) => nameservers.push(a),
                Err(_) => problems.push(problem(
                    "discovery.nameservers",
                    format!("{ns:?} is not ip:port (e.g. \"127.0.0.1:53\" or \"[::1]:53\")"),
                )),
            }
        }
        if d.dns_attempts == 0 {
            problems.push(problem(
                "discovery.dns_attempts",
                "must be at least 1".into(),
            ));
        }
        for (key, ms) in [
            ("discovery.dns_timeout_ms", d.dns_timeout_ms),
            ("discovery.ldap_timeout_ms", d.ldap_timeout_ms),
            ("discovery.http_timeout_ms", d.http_timeout_ms),
        ] {
            if ms == 0 {
                problems.push(problem(key, "must be more than 0".into()));
            }
        }
        let discovery = DiscoveryConfig {
            sources,
            nameservers,
            dns_timeout: Duration::from_millis(d.dns_timeout_ms.max(1)),
            dns_attempts: d.dns_attempts.max(1),
            ldap_timeout: Duration::from_millis(d.ldap_timeout_ms.max(1)),
            http: FetchLimits {
                timeout: Duration::from_millis(d.http_timeout_ms.max(1)),
                max_bytes: d.http_max_bytes,
            },
            positive_ttl: Duration::from_secs(d.cache_positive_ttl_secs),
            negative_ttl: Duration::from_secs(d.cache_negative_ttl_secs),
        };
        let public_dir = {
            let p = PathBuf::from(&d.public_dir);
            if p.is_absolute() {
                p
            } else {
                certs_dir.join(p)
            }
        };
        let mut domains: Vec<DomainConfig> = Vec::new();
        for (i, d) in raw.domains.iter().enumerate() {
            let key = |k: &str| format!("domains[{i}].{k}");
            let name = match normalize_domain(&d.name) {
                Ok(n) => n,
                Err(why) => {
                    problems.push(problem(&key("name"), format!("{:?}: {why}", d.name)));
                    continue;
                }
            };
            if domains.iter().any(|x| x.name == name) {
                problems.push(problem(&key("name"), format!("{name} is configured twice")));
                continue;
            }
            let dir = d
                .dir
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| certs_dir.join(&name));
            let defaults = |sub: &str| {
                vec![
                    dir.join("anchors").join(sub),
                    dir.join("anchors").join("both"),
                ]
            };
            let incoming_anchors = d
                .incoming_anchors
                .as_ref()
                .map(|v| v.iter().map(|p| resolve(p)).collect())
                .unwrap_or_else(|| defaults("incoming"));
            let outgoing_anchors = d
                .outgoing_anchors
                .as_ref()
                .map(|v| v.iter().map(|p| resolve(p)).collect())
                .unwrap_or_else(|| defaults("outgoing"));
            let mut private = Vec::new();
            for (j, p) in d.private.iter().enumerate() {
                let pkey = |k: &str| format!("domains[{i}].private[{j}].{k}");
                match (&p.pkcs12, &p.cert, &p.key) {
                    (Some(f), None, None) => private.push(PrivateSource::Pkcs12 {
                        file: resolve(f),
                        password: p.password.clone().unwrap_or_default(),
                    }),
                    (None, Some(c), Some(k)) => private.push(PrivateSource::Pem {
                        cert: resolve(c),
                        key: resolve(k),
                    }),
                    _ => problems.push(problem(
                        &pkey("pkcs12"),
                        "give either pkcs12 (+ password) or both cert and key".into(),
                    )),
                }
            }
            let host_port = |relay: &str| {
                relay
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_some()
            };
            if let Some(relay) = &d.edge_relay {
                if !host_port(relay) {
                    problems.push(problem(
                        &key("edge_relay"),
                        format!("{relay:?} is not host:port"),
                    ));
                }
            }
            let mut routes = Vec::new();
            for (j, route) in d.routes.iter().enumerate() {
                let rkey = |k: &str| key(&format!("routes[{j}].{k}"));
                match crate::address::DirectAddress::parse(&route.address) {
                    Ok(a) if a.domain().eq_ignore_ascii_case(&name) => {}
                    Ok(_) => problems.push(problem(
                        &rkey("address"),
                        format!("{:?} is not an address of {name}", route.address),
                    )),
                    Err(e) => problems.push(problem(&rkey("address"), e.to_string())),
                }
                let deliver = match route.deliver.as_str() {
                    "mailbox" => None,
                    relay if host_port(relay) => Some(relay.to_string()),
                    other => {
                        problems.push(problem(
                            &rkey("deliver"),
                            format!("{other:?} is neither \"mailbox\" nor host:port"),
                        ));
                        None
                    }
                };
                routes.push((route.address.to_ascii_lowercase(), deliver));
            }
            domains.push(DomainConfig {
                edge_relay: d.edge_relay.clone(),
                routes,
                name,
                dir,
                incoming_anchors,
                outgoing_anchors,
                private,
            });
        }
        let srv = &raw.server;
        let mut listen = |key: &str, value: &str| match value.parse::<std::net::SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                problems.push(problem(key, format!("{value:?} is not ip:port")));
                std::net::SocketAddr::from(([127, 0, 0, 1], 0))
            }
        };
        let mx_listen = listen("server.mx_listen", &srv.mx_listen);
        let submission_listen = listen("server.submission_listen", &srv.submission_listen);
        let imap_listen =
            (!srv.imap_listen.is_empty()).then(|| listen("server.imap_listen", &srv.imap_listen));
        let pop3_listen =
            (!srv.pop3_listen.is_empty()).then(|| listen("server.pop3_listen", &srv.pop3_listen));
        let pull_listen =
            (!raw.pull.listen.is_empty()).then(|| listen("pull.listen", &raw.pull.listen));
        let mut submission_trusted_networks = Vec::new();
        for n in &srv.submission_trusted_networks {
            match n.parse() {
                Ok(net) => submission_trusted_networks.push(net),
                Err(e) => problems.push(problem("server.submission_trusted_networks", e)),
            }
        }
        if !matches!(srv.log_format.as_str(), "human" | "json") {
            problems.push(problem(
                "server.log_format",
                format!("{:?} is not \"human\" or \"json\"", srv.log_format),
            ));
        }
        if srv.tls_cert.is_empty() != srv.tls_key.is_empty() {
            problems.push(problem(
                "server.tls_cert",
                "give both tls_cert and tls_key, or neither".into(),
            ));
        }
        let optional_path = |p: &str| if p.is_empty() { None } else { Some(resolve(p)) };
        let server = ServerConfig {
            hostname: srv.hostname.clone(),
            data_dir: resolve(&srv.data_dir),
            mx_listen,
            submission_listen,
            tls_cert: optional_path(&srv.tls_cert),
            tls_key: optional_path(&srv.tls_key),
            max_message_size: srv.max_message_size,
            max_recipients: srv.max_recipients.max(1),
            max_connections: srv.max_connections.max(1),
            max_connections_per_ip: srv.max_connections_per_ip.max(1),
            command_timeout: Duration::from_secs(srv.command_timeout_secs.max(1)),
            data_timeout: Duration::from_secs(srv.data_timeout_secs.max(1)),
            imap_listen,
            submission_trusted_networks,
            pop3_listen,
            json_logs: srv.log_format == "json",
            mdn_timeout: Duration::from_secs(raw.notify.mdn_timeout_secs.max(1)),
            worker_threads: srv.worker_threads,
        };
        let dl = &raw.delivery;
        if !dl.smart_host.is_empty()
            && dl
                .smart_host
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
        {
            problems.push(problem(
                "delivery.smart_host",
                format!("{:?} is not host:port", dl.smart_host),
            ));
        }
        let delivery = DeliveryConfig {
            port: dl.port,
            smart_host: if dl.smart_host.is_empty() {
                None
            } else {
                Some(dl.smart_host.clone())
            },
            require_tls: dl.require_tls,
            retry_base: Duration::from_secs(dl.retry_base_secs.max(1)),
            max_age: Duration::from_secs(dl.max_age_secs),
            connect_timeout: Duration::from_secs(dl.connect_timeout_secs.max(1)),
            concurrency: dl.concurrency.max(1),
            memory_budget: dl.memory_budget_mb.max(1).saturating_mul(1 << 20),
        };
        let mut bundles: Vec<BundleConfig> = Vec::new();
        for (i, b) in raw.bundles.iter().enumerate() {
            let key = |k: &str| format!("bundles[{i}].{k}");
            if b.name.is_empty()
                || !b
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(problem(
                    &key("name"),
                    format!("{:?}: use letters, digits, '-' and '_'", b.name),
                ));
                continue;
            }
            if bundles.iter().any(|x| x.name == b.name) {
                problems.push(problem(
                    &key("name"),
                    format!("{} is configured twice", b.name),
                ));
                continue;
            }
            let lower = b.url.to_ascii_lowercase();
            if !(lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("file://")
                || b.url.starts_with('/'))
            {
                problems.push(problem(
                    &key("url"),
                    format!(
                        "{:?}: use https://, http://, file:// or an absolute path",
                        b.url
                    ),
                ));
            }
            let (incoming, outgoing) = match b.direction.as_str() {
                "in" | "incoming" => (true, false),
                "out" | "outgoing" => (false, true),
                "both" => (true, true),
                other => {
                    problems.push(problem(
                        &key("direction"),
                        format!("{other:?}: use in, out or both"),
                    ));
                    (true, true)
                }
            };
            let signer = b.signer.as_deref().map(resolve);
            if let Some(s) = &signer {
                if !s.is_file() {
                    problems.push(problem(
                        &key("signer"),
                        format!("{} does not exist", s.display()),
                    ));
                }
            }
            bundles.push(BundleConfig {
                name: b.name.clone(),
                url: b.url.clone(),
                refresh: Duration::from_secs(b.refresh_secs.max(1)),
                domains: b.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
                incoming,
                outgoing,
                signer,
                allow_expired_signer: b.allow_expired_signer,
                max_bytes: b.max_bytes,
            });
        }
        let pull = {
            let p = &raw.pull;
            let listen = pull_listen;
            if p.tls_cert.is_empty() != p.tls_key.is_empty() {
                problems.push(problem(
                    "pull.tls_cert",
                    "set both pull.tls_cert and pull.tls_key, or neither".into(),
                ));
            }
            let tls = (!p.tls_cert.is_empty() && !p.tls_key.is_empty())
                .then(|| (resolve(&p.tls_cert), resolve(&p.tls_key)));
            let base_url = if p.base_url.is_empty() {
                let scheme = if tls.is_some() { "https" } else { "http" };
                match listen {
                    Some(a) => format!("{scheme}://{a}"),
                    None => String::new(),
                }
            } else {
                let b = p.base_url.trim_end_matches('/').to_string();
                match url::Url::parse(&b) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.query().is_none() => {}
                    _ => problems.push(problem(
                        "pull.base_url",
                        format!("{:?} is not an http(s) URL without query", p.base_url),
                    )),
                }
                b
            };
            for (key, v) in [
                ("pull.access_token_secs", p.access_token_secs),
                ("pull.refresh_token_secs", p.refresh_token_secs),
                ("pull.code_secs", p.code_secs),
            ] {
                if v == 0 {
                    problems.push(problem(key, "must be more than 0".into()));
                }
            }
            let mut registries: Vec<RegistryConfig> = Vec::new();
            for (i, r) in p.registries.iter().enumerate() {
                let key = |k: &str| format!("pull.registries[{i}].{k}");
                if r.name.is_empty() || registries.iter().any(|x| x.name == r.name) {
                    problems.push(problem(
                        &key("name"),
                        format!("{:?} is empty or configured twice", r.name),
                    ));
                    continue;
                }
                if r.issuer.is_empty() {
                    problems.push(problem(&key("issuer"), "must not be empty".into()));
                }
                let jwks = match (r.jwks_file.is_empty(), r.jwks_url.is_empty()) {
                    (false, true) => {
                        let f = resolve(&r.jwks_file);
                        if !f.is_file() {
                            problems.push(problem(
                                &key("jwks_file"),
                                format!("{} does not exist", f.display()),
                            ));
                        }
                        JwksSource::File(f)
                    }
                    (true, false) => {
                        let lower = r.jwks_url.to_ascii_lowercase();
                        if !(lower.starts_with("https://") || lower.starts_with("http://")) {
                            problems.push(problem(
                                &key("jwks_url"),
                                format!("{:?} is not an http(s) URL", r.jwks_url),
                            ));
                        }
                        JwksSource::Url(r.jwks_url.clone())
                    }
                    _ => {
                        problems.push(problem(
                            &key("jwks_file"),
                            "set exactly one of jwks_file and jwks_url".into(),
                        ));
                        continue;
                    }
                };
                registries.push(RegistryConfig {
                    name: r.name.clone(),
                    issuer: r.issuer.clone(),
                    jwks,
                });
            }
            PullConfig {
                listen,
                base_url,
                tls,
                open_registration: p.open_registration,
                access_token: Duration::from_secs(p.access_token_secs.max(1)),
                refresh_token: Duration::from_secs(p.refresh_token_secs.max(1)),
                code: Duration::from_secs(p.code_secs.max(1)),
                registries,
            }
        };
        let crl_policy = raw.policy.crl_policy.parse().unwrap_or_else(|e: String| {
            problems.push(problem("policy.crl_policy", e));
            crate::trust::revocation::CrlPolicy::SoftFail
        });
        let defaults = AgentSettings::default();
        let settings = Settings {
            push_from: raw.documents.push_from.trim().to_string(),
            holder_name: raw.documents.holder_name.trim().to_string(),
            bundles,
            crl_policy,
            server,
            delivery,
            agent: AgentSettings {
                cipher: cipher.unwrap_or(defaults.cipher),
                key_transport: key_transport.unwrap_or(defaults.key_transport),
                digest: digest.unwrap_or(defaults.digest),
                outer_subject: outer_subject.unwrap_or(defaults.outer_subject),
                min_rsa_bits: raw.policy.min_rsa_bits.max(2048),
                require_rcpt_in_headers: raw.policy.require_rcpt_in_headers,
            },
            discovery,
            public_dir,
            certs_dir,
            domains,
            pull,
            source,
        };
        Ok((settings, problems))
    }

    /// Loads the settings and every domain's keys and anchors: the way to
    /// start anything, since it reports all problems of both kinds together.
    pub fn load_agent(file: Option<&Path>) -> Result<(Settings, Agent), ConfigErrors> {
        let (settings, mut problems) = Self::parse(file, std::env::vars())?;
        match settings.build_agent() {
            Ok(agent) if problems.is_empty() => Ok((settings, agent)),
            Ok(_) => Err(ConfigErrors(problems)),
            Err(ConfigErrors(more)) => {
                problems.extend(more);
                Err(ConfigErrors(problems))
            }
        }
    }

    /// The discovery chain: our domains' certificates as the local source,
    /// the public directory as the public source.
    pub fn build_discovery(&self, agent: &Agent) -> Result<Discovery, ConfigErrors> {
        let problem = |key: &str, message: String| {
            ConfigErrors(vec![ConfigProblem {
                key: key.to_string(),
                source: self.source.clone(),
                message,
            }])
        };
        let mut local = CertificateSet::new();
        for d in agent.domains.values() {
            for c in &d.credentials {
                local.add(
                    c.credential.cert.clone(),
                    format!("local domain {} ({})", d.name, c.source),
                );
            }
        }
        let public = CertificateSet::load_dir(&self.public_dir)
            .map_err(|e| problem("discovery.public_dir", e.to_string()))?;
        Discovery::new(self.discovery.clone(), local, public)
            .map(|d| {
                d.with_revocation(crate::trust::revocation::RevocationChecker::new(
                    self.discovery.http,
                    self.crl_policy,
                ))
            })
            .map_err(|e| problem("discovery.nameservers", e.to_string()))
    }

    /// Where the last good copies of trust bundles are kept.
    pub fn bundle_dir(&self) -> PathBuf {
        self.server.data_dir.join("bundles")
    }

    /// The bundle source of a subscription (its signer read from disk).
    pub fn bundle_source(
        &self,
        b: &BundleConfig,
    ) -> Result<crate::trust::bundle::BundleSource, ConfigProblem> {
        let signer = match &b.signer {
            Some(path) => {
                let certs = crate::trust::read_certificates(path).map_err(|e| ConfigProblem {
                    key: format!("bundles.{}.signer", b.name),
                    source: self.source.clone(),
                    message: e.to_string(),
                })?;
                certs.into_iter().next()
            }
            None => None,
        };
        let mut source = crate::trust::bundle::BundleSource::new(&b.name, &b.url);
        source.signer = signer;
        source.allow_expired_signer = b.allow_expired_signer;
        source.max_bytes = b.max_bytes;
        source.timeout = self.discovery.http.timeout;
        Ok(source)
    }

    /// Anchors of the last good copy of each bundle, per domain and direction.
    fn bundle_anchors(
        &self,
        problems: &mut Vec<ConfigProblem>,
    ) -> Vec<(BundleConfig, Vec<openssl::x509::X509>)> {
        let mut out = Vec::new();
        if self.bundles.is_empty() {
            return out;
        }
        let cache = match crate::trust::bundle::BundleCache::new(&self.bundle_dir()) {
            Ok(c) => c,
            Err(e) => {
                problems.push(ConfigProblem {
                    key: "bundles".into(),
                    source: self.source.clone(),
                    message: e.to_string(),
                });
                return out;
            }
        };
        for b in &self.bundles {
            let source = match self.bundle_source(b) {
                Ok(s) => s,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            match cache.load(&source, crate::agent::now()) {
                Ok(Some(loaded)) => out.push((b.clone(), loaded.certs)),
                Ok(None) => {
                    tracing::warn!(bundle = %b.name, "trust bundle not fetched yet: no anchors from it")
                }
                Err(e) => {
                    tracing::warn!(bundle = %b.name, "last copy of the trust bundle unusable: {e}")
                }
            }
        }
        out
    }

    /// Loads every domain's keys and anchors, reporting all problems together.
    pub fn build_agent(&self) -> Result<Agent, ConfigErrors> {
        let mut agent = Agent::new(self.agent.clone());
        let mut problems = Vec::new();
        let from_bundles = self.bundle_anchors(&mut problems);
        for (i, d) in self.domains.iter().enumerate() {
            let problem = |key: String, message: String| ConfigProblem {
                key,
                source: self.source.clone(),
                message,
            };
            let mut credentials: Vec<PrivateCredential> = Vec::new();
            let private_dir = d.dir.join("private");
            if private_dir.is_dir() {
                match agent::load_private_dir(&private_dir) {
                    Ok(c) => credentials.extend(c),
                    Err(e) => {
                        problems.push(problem(format!("domains[{i}] private"), e.to_string()))
                    }
                }
            }
            for (j, p) in d.private.iter().enumerate() {
                let loaded = match p {
                    PrivateSource::Pem { cert, key } => {
                        agent::load_pem_credentials(&[cert.as_path(), key.as_path()])
                    }
                    PrivateSource::Pkcs12 { file, password } => {
                        agent::load_pkcs12(file, password).map(|c| vec![c])
                    }
                };
                match loaded {
                    Ok(c) => credentials.extend(c),
                    Err(e) => {
                        problems.push(problem(format!("domains[{i}].private[{j}]"), e.to_string()))
                    }
                }
            }
            if credentials.is_empty() {
                problems.push(problem(
                    format!("domains[{i}]"),
                    format!(
                        "{} has no private certificate (looked in {} and domains.private)",
                        d.name,
                        private_dir.display()
                    ),
                ));
            }
            let mut load_anchors = |paths: &[PathBuf], key: &str| {
                let mut set = AnchorSet::new();
                for p in paths {
                    if !p.exists() {
                        continue;
                    }
                    match AnchorSet::load(p) {
                        Ok(s) => set.extend(&s),
                        Err(e) => {
                            problems.push(problem(format!("domains[{i}].{key}"), e.to_string()))
                        }
                    }
                }
                set
            };
            let mut incoming_anchors = load_anchors(&d.incoming_anchors, "incoming_anchors");
            let mut outgoing_anchors = load_anchors(&d.outgoing_anchors, "outgoing_anchors");
            for (b, certs) in &from_bundles {
                if !b.domains.is_empty() && !b.domains.contains(&d.name) {
                    continue;
                }
                let set =
                    AnchorSet::from_certs(certs.clone(), Path::new(&format!("bundle {}", b.name)));
                if b.incoming {
                    incoming_anchors.extend(&set);
                }
                if b.outgoing {
                    outgoing_anchors.extend(&set);
                }
            }
            if incoming_anchors.is_empty() && outgoing_anchors.is_empty() {
                problems.push(problem(
                    format!("domains[{i}]"),
                    format!(
                        "{} has no trust anchors (looked in {})",
                        d.name,
                        d.incoming_anchors
                            .iter()
                            .chain(&d.outgoing_anchors)
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            agent.add_domain(LocalDomain {
                name: d.name.clone(),
                credentials,
                incoming_anchors,
                outgoing_anchors,
            });
        }
        if problems.is_empty() {
            Ok(agent)
        } else {
            Err(ConfigErrors(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn embedded_default_loads() {
        let s = Settings::load_with_env(None, no_env()).unwrap();
        assert_eq!(s.agent.cipher, crate::smime::ContentCipher::Aes256Cbc);
        assert_eq!(s.agent.min_rsa_bits, 2048);
        assert!(s.domains.is_empty());
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = vec![(
            "HISPD__SMIME__CIPHER".to_string(),
            "aes-128-cbc".to_string(),
        )];
        let s = Settings::load_with_env(None, env).unwrap();
        assert_eq!(s.agent.cipher, crate::smime::ContentCipher::Aes128Cbc);
    }

    #[test]
    fn every_problem_is_reported_with_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[smime]\ncipher = \"des\"\ndigest = \"sha1\"\n[policy]\nmin_rsa_bits = 1024\n[[domains]]\nname = \"bad domain\"\n",
        )
        .unwrap();
        let err = Settings::load_with_env(Some(&path), no_env()).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "smime.cipher",
                "smime.digest",
                "policy.min_rsa_bits",
                "domains[0].name"
            ]
        );
        assert!(err.0.iter().all(|p| p.source == path.display().to_string()));
    }

    #[test]
    fn routes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(
            &path,
            "[[domains]]\nname = \"b.example\"\n\
             [[domains.routes]]\naddress = \"carol@other.example\"\ndeliver = \"mailbox\"\n\
             [[domains.routes]]\naddress = \"dave@b.example\"\ndeliver = \"ehr.example\"\n\
             [[domains.routes]]\naddress = \"not an address\"\ndeliver = \"ehr.example:25\"\n",
        )
        .unwrap();
        let err = Settings::load_with_env(Some(&path), no_env()).unwrap_err();
        let problems: Vec<(String, String)> = err
            .0
            .iter()
            .map(|p| (p.key.clone(), p.message.clone()))
            .filter(|(k, _)| k.contains("routes"))
            .collect();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "domains[0].routes[0].address",
                "domains[0].routes[1].deliver",
                "domains[0].routes[2].address"
            ],
            "{problems:?}"
        );
        assert!(problems[0].1.contains("not an address of b.example"));
        assert!(problems[1].1.contains("neither \"mailbox\" nor host:port"));
    }

    #[test]
    fn pull_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pull.toml");
        std::fs::write(
            &path,
            "[pull]\nlisten = \"nowhere\"\nbase_url = \"ftp://x\"\ntls_cert = \"c.pem\"\ncode_secs = 0\n\
             [[pull.registries]]\nname = \"r\"\nissuer = \"https://r.example\"\njwks_file = \"missing.json\"\n\
             [[pull.registries]]\nname = \"s\"\nissuer = \"https://s.example\"\njwks_file = \"a\"\njwks_url = \"https://s.example/jwks\"\n",
        )
        .unwrap();
        let err = Settings::load_with_env(Some(&path), no_env()).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "pull.listen",
            "pull.base_url",
            "pull.tls_cert",
            "pull.code_secs",
            "pull.registries[0].jwks_file",
            "pull.registries[1].jwks_file",
        ] {
            assert!(keys.contains(&k), "{k} not in {keys:?}");
        }
        // The default: plain HTTP on loopback, base URL from the listener.
        let s = Settings::load_with_env(None, no_env()).unwrap();
        assert_eq!(s.pull.base_url, "http://127.0.0.1:8080");
        assert!(s.pull.tls.is_none() && s.pull.open_registration);
        let off = Settings::load_with_env(
            None,
            vec![("HISPD__PULL__LISTEN".to_string(), String::new())],
        )
        .unwrap();
        assert!(off.pull.listen.is_none());
    }

    #[test]
    fn misspelled_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "[smime]\nciphr = \"aes-128-cbc\"\n").unwrap();
        let err = Settings::load_with_env(Some(&path), no_env()).unwrap_err();
        assert!(err.to_string().contains("ciphr"), "{err}");
    }

    #[test]
    fn missing_domain_material_is_reported_for_each_domain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hispd.toml");
        std::fs::write(
            &path,
            "[[domains]]\nname = \"a.example\"\n[[domains]]\nname = \"b.example\"\n",
        )
        .unwrap();
        let settings = Settings::load_with_env(Some(&path), no_env()).unwrap();
        assert_eq!(
            settings.domains[0].dir,
            dir.path().join("certs").join("a.example")
        );
        let err = settings.build_agent().err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("a.example has no private certificate"),
            "{text}"
        );
        assert!(text.contains("b.example has no trust anchors"), "{text}");
        assert_eq!(err.0.len(), 4, "{text}");
    }
}
