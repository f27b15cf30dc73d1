//! `hispd serve`: the listeners, the queue worker, and the two message paths
//! of DESIGN.md wired together.
//!
//! Outgoing: submission (TLS + AUTH) → spool + job (fsynced, flushed) → 250 →
//! worker: discover each recipient's certificates, seal per destination
//! domain, deliver to the MX (or, for our own domains, straight into the
//! incoming path) → per-recipient outcome → DSN to the sender for failures.
//!
//! Incoming: MX → DATA → the agent opens the message for each local domain
//! (5xx naming the rule when it fails) → mailbox (once per Message-ID) or an
//! edge-relay job → 250.

use crate::address::DirectAddress;
use crate::agent::{self, Agent, OpenRequest, SealRequest};
use crate::config::{DomainConfig, Settings};
use crate::discovery::{Discovery, TrustContext};
use crate::notify::dsn::{self, Action, DsnRequest, FailedRecipient};
use crate::smtp::client::{self, ClientConfig, Outcome, TlsPolicy};
use crate::smtp::server::{
    self as smtp, Envelope, HandlerFuture, ListenerKind, Reply, SessionConfig, SmtpHandler,
};
use crate::store::{
    Job, JobKind, LocalDelivery, RecipientState, RecipientStatus, SledStore, Storage, StoreError,
};
use crate::users::Users;
use hickory_resolver::proto::rr::{RData, RecordType};
use mail_parser::MessageParser;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("development PKI: {0}")]
    Bootstrap(String),
}

/// The development domain `hispd serve` creates when none is configured.
pub const DEV_DOMAIN: &str = "direct.test";
pub const DEV_USER: &str = "demo@direct.test";

/// Shared state of the daemon.
pub struct Hub {
    settings: Settings,
    agent: RwLock<Arc<Agent>>,
    discovery: RwLock<Arc<Discovery>>,
    store: Arc<SledStore>,
    users: Users,
    wake: Notify,
    edge_relays: HashMap<String, String>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

fn audit(event: &str, detail: &str) {
    tracing::info!(target: "audit", event, detail);
}

fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The Message-ID of a message, if it has one.
fn message_id_of(message: &[u8]) -> Option<String> {
    MessageParser::default()
        .parse_headers(message)
        .and_then(|m| m.message_id().map(|id| format!("<{id}>")))
}

fn from_addresses(message: &[u8]) -> Vec<String> {
    MessageParser::default()
        .parse_headers(message)
        .and_then(|m| {
            m.from().map(|f| {
                f.iter()
                    .filter_map(|a| a.address().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

impl Hub {
    fn now() -> i64 {
        agent::now()
    }

    fn agent(&self) -> Arc<Agent> {
        self.agent
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn discovery(&self) -> Arc<Discovery> {
        self.discovery
            .read()
            .map(|d| d.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub fn store(&self) -> &Arc<SledStore> {
        &self.store
    }

    /// Reloads the configuration's keys and anchors (SIGHUP); on any problem
    /// the running configuration stays and the problem is logged.
    pub fn reload(&self, config: Option<&Path>) {
        match Settings::load_agent(config) {
            Ok((settings, agent)) if !agent.domains.is_empty() => match settings
                .build_discovery(&agent)
            {
                Ok(discovery) => {
                    if let Ok(mut a) = self.agent.write() {
                        *a = Arc::new(agent);
                    }
                    if let Ok(mut d) = self.discovery.write() {
                        *d = Arc::new(discovery);
                    }
                    tracing::info!("configuration, keys and anchors reloaded");
                }
                Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
            },
            Ok(_) => {
                tracing::warn!("reload: the configuration has no domains; keeping the running one")
            }
            Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
        }
    }

    /// Opens a received (sealed) message for its local recipients and
    /// delivers it: the MX path, also used for our own domains' mail.
    async fn receive_sealed(&self, mail_from: &str, rcpt_to: &[String], message: &[u8]) -> Reply {
        let agent = self.agent();
        let mut by_domain: BTreeMap<String, Vec<DirectAddress>> = BTreeMap::new();
        for r in rcpt_to {
            match DirectAddress::parse(r) {
                Ok(a) => by_domain.entry(a.domain().to_string()).or_default().push(a),
                Err(e) => return Reply::new(550, "5.1.3", e.to_string()),
            }
        }
        let mut opened_all = Vec::new();
        for (domain, rcpts) in &by_domain {
            let Some(local) = agent.domain(domain) else {
                return Reply::new(550, "5.7.1", format!("{domain} is not a local domain"));
            };
            let request = OpenRequest {
                message,
                mail_from: Some(mail_from.to_string()),
                rcpt_to: rcpts.clone(),
                at: Self::now(),
            };
            match agent.open_for_domain(local, request) {
                Ok(opened) => {
                    audit(
                        "incoming-trusted",
                        &format!(
                            "from {} to {} signer \"{}\" anchor \"{}\"",
                            opened.report.from,
                            rcpts
                                .iter()
                                .map(|r| r.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            opened.report.signer.certificate.subject,
                            opened.report.signer.trust.anchor.subject
                        ),
                    );
                    opened_all.push((domain.clone(), rcpts.clone(), opened));
                }
                Err(e) => {
                    audit("incoming-refused", &format!("[{}] {e}", e.rule()));
                    return Reply::new(554, "5.7.1", format!("refused [{}]: {e}", e.rule()));
                }
            }
        }
        for (domain, rcpts, opened) in opened_all {
            let message_id = opened.report.message_id.clone();
            if let Some(relay) = self.edge_relays.get(&domain) {
                let spool = match self.store.spool(&opened.message) {
                    Ok(s) => s,
                    Err(e) => return Reply::new(451, "4.3.0", format!("local storage error: {e}")),
                };
                let job = Job {
                    id: new_job_id(),
                    kind: JobKind::EdgeRelay,
                    spool,
                    mail_from: opened.report.from.clone(),
                    recipients: rcpts
                        .iter()
                        .map(|r| RecipientState::pending(r.to_string()))
                        .collect(),
                    created: Self::now(),
                    message_id,
                    dsn_sent: false,
                };
                if let Err(e) = self.store.enqueue(&job) {
                    return Reply::new(451, "4.3.0", format!("local storage error: {e}"));
                }
                tracing::info!(job = %job.id, relay = %relay, "queued for the edge relay");
                self.wake.notify_one();
            } else {
                for r in &rcpts {
                    match self.store.deliver_local(
                        &r.to_string(),
                        message_id.as_deref(),
                        &opened.message,
                    ) {
                        Ok(LocalDelivery::Stored { uid }) => {
                            tracing::info!(mailbox = %r, uid, message_id = message_id.as_deref().unwrap_or("-"), "delivered")
                        }
                        Ok(LocalDelivery::Duplicate { uid }) => tracing::info!(
                            mailbox = %r,
                            uid,
                            message_id = message_id.as_deref().unwrap_or("-"),
                            "duplicate suppressed (already delivered)"
                        ),
                        Err(e) => {
                            return Reply::new(451, "4.3.0", format!("local storage error: {e}"))
                        }
                    }
                }
            }
        }
        Reply::new(250, "2.0.0", "message accepted")
    }

    async fn accept_submission(&self, envelope: &Envelope, message: Vec<u8>) -> Reply {
        let Some(user) = envelope
            .auth_user
            .as_deref()
            .and_then(|u| self.users.get(u).ok().flatten())
        else {
            return Reply::new(530, "5.7.0", "authentication required");
        };
        for from in from_addresses(&message) {
            if !Users::may_send_as(&user, &from) {
                return Reply::new(
                    550,
                    "5.7.1",
                    format!("{} may not send as {from} (From header)", user.name),
                );
            }
        }
        let spool = match self.store.spool(&message) {
            Ok(s) => s,
            Err(e) => return Reply::new(451, "4.3.0", format!("local storage error: {e}")),
        };
        let job = Job {
            id: new_job_id(),
            kind: JobKind::Outgoing,
            spool,
            mail_from: envelope.mail_from.clone(),
            recipients: envelope
                .rcpt_to
                .iter()
                .map(RecipientState::pending)
                .collect(),
            created: Self::now(),
            message_id: message_id_of(&message),
            dsn_sent: false,
        };
        if let Err(e) = self.store.enqueue(&job) {
            return Reply::new(451, "4.3.0", format!("local storage error: {e}"));
        }
        tracing::info!(
            job = %job.id,
            from = %job.mail_from,
            recipients = job.recipients.len(),
            message_id = job.message_id.as_deref().unwrap_or("-"),
            "accepted for delivery"
        );
        self.wake.notify_one();
        Reply::new(250, "2.0.0", format!("queued as {}", job.id))
    }
}

fn new_job_id() -> String {
    let mut b = [0u8; 12];
    let _ = openssl::rand::rand_bytes(&mut b);
    hex::encode(b)
}

impl SmtpHandler for Hub {
    fn authenticate(&self, user: &str, password: &str) -> Option<String> {
        match self.users.authenticate(user, password) {
            Ok(Some(u)) => {
                audit("auth-ok", &u.name);
                Some(u.name)
            }
            Ok(None) => {
                audit("auth-failed", user);
                None
            }
            Err(e) => {
                tracing::error!("user store: {e}");
                None
            }
        }
    }

    fn check_mail_from(
        &self,
        kind: ListenerKind,
        envelope: &Envelope,
        from: &str,
    ) -> Result<(), Reply> {
        match kind {
            ListenerKind::Mx => Ok(()),
            ListenerKind::Submission => {
                let user = envelope
                    .auth_user
                    .as_deref()
                    .and_then(|u| self.users.get(u).ok().flatten())
                    .ok_or_else(|| Reply::new(530, "5.7.0", "authentication required"))?;
                if Users::may_send_as(&user, from) {
                    Ok(())
                } else {
                    Err(Reply::new(
                        553,
                        "5.7.1",
                        format!("{} may not send as {from}", user.name),
                    ))
                }
            }
        }
    }

    fn check_rcpt(
        &self,
        kind: ListenerKind,
        _envelope: &Envelope,
        rcpt: &str,
    ) -> Result<(), Reply> {
        let address =
            DirectAddress::parse(rcpt).map_err(|e| Reply::new(501, "5.1.3", e.to_string()))?;
        match kind {
            ListenerKind::Mx if self.agent().domain(address.domain()).is_none() => Err(Reply::new(
                550,
                "5.7.1",
                format!(
                    "relaying denied: {} is not a domain of this HISP",
                    address.domain()
                ),
            )),
            _ => Ok(()),
        }
    }

    fn data<'a>(
        &'a self,
        kind: ListenerKind,
        envelope: &'a Envelope,
        message: Vec<u8>,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            match kind {
                ListenerKind::Mx => {
                    self.receive_sealed(&envelope.mail_from, &envelope.rcpt_to, &message)
                        .await
                }
                ListenerKind::Submission => self.accept_submission(envelope, message).await,
            }
        })
    }
}

/// The queue worker: outgoing and edge-relay jobs, retries, DSNs.
pub struct Worker {
    hub: Arc<Hub>,
}

impl Worker {
    fn backoff(&self, attempts: u32) -> i64 {
        let base = self.hub.settings.delivery.retry_base.as_secs() as i64;
        let shift = attempts.saturating_sub(1).min(16);
        (base.saturating_mul(1i64 << shift)).min(3600)
    }

    /// When the earliest pending recipient is due (Unix seconds).
    fn next_due(jobs: &[Job]) -> Option<i64> {
        jobs.iter()
            .flat_map(|j| j.recipients.iter())
            .filter(|r| r.status == RecipientStatus::Pending)
            .map(|r| r.next_attempt)
            .min()
    }

    fn read_jobs(&self) -> Vec<Job> {
        self.hub.store.jobs().unwrap_or_else(|e| {
            tracing::error!("reading the queue: {e}");
            Vec::new()
        })
    }

    async fn run(self) {
        loop {
            let now = Hub::now();
            for job in self.read_jobs() {
                let due = job
                    .recipients
                    .iter()
                    .filter(|r| r.status == RecipientStatus::Pending)
                    .map(|r| r.next_attempt)
                    .min();
                match due {
                    Some(t) if t <= now => self.process(job).await,
                    Some(_) => {}
                    None => self.finish(job).await,
                }
            }
            // Decide the wait from the queue as it is now, after this round's
            // attempts set their own next times.
            // At least a short pause, so a job that cannot be saved does not spin.
            let wait = Self::next_due(&self.read_jobs())
                .map(|t| {
                    Duration::from_millis(((t - Hub::now()).clamp(0, 60) as u64 * 1000).max(200))
                })
                .unwrap_or(Duration::from_secs(60));
            let _ = tokio::time::timeout(wait, self.hub.wake.notified()).await;
        }
    }

    async fn process(&self, mut job: Job) {
        let message = match self.hub.store.read(&job.spool) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(job = %job.id, "spool file unreadable, failing the job: {e}");
                for r in job
                    .recipients
                    .iter_mut()
                    .filter(|r| r.status == RecipientStatus::Pending)
                {
                    r.status = RecipientStatus::Failed;
                    r.last_error = Some(format!("message lost from the spool: {e}"));
                    r.status_code = Some("4.3.0".into());
                }
                let _ = self.hub.store.update_job(&job);
                return;
            }
        };
        match job.kind {
            JobKind::Outgoing => self.outgoing(&mut job, &message).await,
            JobKind::EdgeRelay => self.edge_relay(&mut job, &message).await,
        }
        let now = Hub::now();
        let max_age = self.hub.settings.delivery.max_age.as_secs() as i64;
        for r in job
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            if now - job.created > max_age {
                r.status = RecipientStatus::Failed;
                r.status_code = Some("4.4.7".into());
                r.last_error = Some(format!(
                    "delivery time expired after {} attempts; last error: {}",
                    r.attempts,
                    r.last_error.clone().unwrap_or_default()
                ));
            }
        }
        if let Err(e) = self.hub.store.update_job(&job) {
            tracing::error!(job = %job.id, "saving delivery results: {e}");
            return;
        }
        if job.is_finished() {
            self.finish(job).await;
        }
    }

    fn record(&self, r: &mut RecipientState, outcome: &Outcome) {
        r.attempts += 1;
        match outcome {
            Outcome::Completed => {
                r.status = RecipientStatus::Delivered;
                r.last_error = None;
                r.status_code = Some("2.0.0".into());
            }
            Outcome::PermanentFailure(why) => {
                r.status = RecipientStatus::Failed;
                r.last_error = Some(why.clone());
                r.status_code = Some(status_code(why, "5.0.0"));
            }
            Outcome::TemporaryFailure(why) => {
                r.last_error = Some(why.clone());
                r.status_code = Some(status_code(why, "4.0.0"));
                r.next_attempt = Hub::now() + self.backoff(r.attempts);
            }
        }
    }

    async fn outgoing(&self, job: &mut Job, message: &[u8]) {
        let agent = self.hub.agent();
        let discovery = self.hub.discovery();
        let Ok(from) = DirectAddress::parse(&job.mail_from) else {
            for r in job.recipients.iter_mut() {
                r.status = RecipientStatus::Failed;
                r.last_error = Some(format!("bad sender address {:?}", job.mail_from));
            }
            return;
        };
        let Some(sender_domain) = agent.domain(from.domain()).cloned() else {
            for r in job.recipients.iter_mut() {
                r.status = RecipientStatus::Failed;
                r.last_error = Some(format!("{} is no longer a local domain", from.domain()));
                r.status_code = Some("5.7.1".into());
            }
            return;
        };
        let ctx = TrustContext {
            domain: sender_domain.name.clone(),
            anchors: Some(sender_domain.outgoing_anchors.clone()),
            at: Hub::now(),
            min_rsa_bits: agent.settings.min_rsa_bits,
        };
        let now = Hub::now();
        let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in job.recipients.iter().enumerate() {
            if r.status == RecipientStatus::Pending && r.next_attempt <= now {
                by_domain.entry(domain_of(&r.address)).or_default().push(i);
            }
        }
        for (domain, indexes) in by_domain {
            // Discover each recipient; one without a certificate fails alone.
            let mut certs = Vec::new();
            let mut ready = Vec::new();
            for &i in &indexes {
                let r = &mut job.recipients[i];
                let Ok(address) = DirectAddress::parse(&r.address) else {
                    r.status = RecipientStatus::Failed;
                    r.last_error = Some(format!("{:?} is not a valid address", r.address));
                    r.status_code = Some("5.1.3".into());
                    continue;
                };
                let found = discovery.discover(&address, &ctx).await;
                if found.certificates.is_empty() {
                    let why = found
                        .report
                        .candidates
                        .first()
                        .map(|c| format!("certificate \"{}\" refused: {}", c.subject, c.reason))
                        .unwrap_or_else(|| {
                            "no certificate is published for this address or its domain".into()
                        });
                    if found.report.temporary_failure {
                        r.attempts += 1;
                        r.last_error =
                            Some(format!("certificate discovery could not finish: {why}"));
                        r.status_code = Some("4.4.3".into());
                        r.next_attempt = Hub::now() + self.backoff(r.attempts);
                    } else {
                        r.status = RecipientStatus::Failed;
                        r.last_error =
                            Some(format!("no usable certificate for {}: {why}", r.address));
                        r.status_code = Some("5.7.1".into());
                        audit("recipient-no-certificate", &format!("{}: {why}", r.address));
                    }
                    continue;
                }
                certs.extend(found.certificates);
                ready.push((i, address));
            }
            if ready.is_empty() {
                continue;
            }
            let sealed = agent.seal_for_domain(
                &sender_domain,
                SealRequest {
                    from: from.clone(),
                    recipients: ready.iter().map(|(_, a)| a.clone()).collect(),
                    message,
                    recipient_certificates: certs,
                    at: Hub::now(),
                },
            );
            let sealed = match sealed {
                Ok(s) => s,
                Err(e) => {
                    audit("outgoing-refused", &format!("[{}] {e}", e.rule()));
                    for (i, _) in &ready {
                        let r = &mut job.recipients[*i];
                        r.status = RecipientStatus::Failed;
                        r.last_error = Some(format!("cannot seal: {e}"));
                        r.status_code = Some("5.7.1".into());
                    }
                    continue;
                }
            };
            let rcpts: Vec<String> = ready.iter().map(|(_, a)| a.to_string()).collect();
            if agent.domain(&domain).is_some() {
                // Our own domain: the incoming path, without the network.
                let reply = self
                    .hub
                    .receive_sealed(&job.mail_from, &rcpts, &sealed.message)
                    .await;
                let outcome = reply_outcome(&reply);
                for (i, _) in &ready {
                    self.record(&mut job.recipients[*i], &outcome);
                }
                continue;
            }
            let report = self
                .deliver_remote(&domain, &job.mail_from, &rcpts, &sealed.message)
                .await;
            for (i, address) in &ready {
                let outcome = report
                    .iter()
                    .find(|(a, _)| a.eq_ignore_ascii_case(&address.to_string()))
                    .map(|(_, o)| o.clone())
                    .unwrap_or_else(|| {
                        Outcome::TemporaryFailure("no result from the remote server".into())
                    });
                tracing::info!(job = %job.id, recipient = %address, outcome = %outcome, "delivery attempt");
                self.record(&mut job.recipients[*i], &outcome);
            }
        }
    }

    async fn edge_relay(&self, job: &mut Job, message: &[u8]) {
        let domain = job
            .recipients
            .first()
            .map(|r| domain_of(&r.address))
            .unwrap_or_default();
        let Some(relay) = self.hub.edge_relays.get(&domain).cloned() else {
            for r in job.recipients.iter_mut() {
                r.status = RecipientStatus::Failed;
                r.last_error = Some(format!("{domain} has no edge relay any more"));
            }
            return;
        };
        let rcpts: Vec<String> = job
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
            .map(|r| r.address.clone())
            .collect();
        let report = self
            .deliver_to(
                std::slice::from_ref(&relay),
                &job.mail_from,
                &rcpts,
                message,
                false,
            )
            .await;
        for r in job
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            let outcome = report
                .iter()
                .find(|(a, _)| a.eq_ignore_ascii_case(&r.address))
                .map(|(_, o)| o.clone())
                .unwrap_or_else(|| {
                    Outcome::TemporaryFailure("no result from the edge relay".into())
                });
            tracing::info!(job = %job.id, recipient = %r.address, relay = %relay, outcome = %outcome, "edge relay");
            self.record(r, &outcome);
        }
    }

    /// MX hosts of `domain` (or the smart host), as "host:port" in order.
    async fn route(&self, domain: &str) -> Vec<String> {
        let delivery = &self.hub.settings.delivery;
        if let Some(smart) = &delivery.smart_host {
            return vec![smart.clone()];
        }
        let discovery = self.hub.discovery();
        let Some(dns) = discovery.dns() else {
            return vec![format!("{domain}:{}", delivery.port)];
        };
        match dns
            .resolver()
            .lookup(format!("{domain}."), RecordType::MX)
            .await
        {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_string())),
                        _ => None,
                    })
                    .collect();
                mx.sort();
                mx.into_iter()
                    .map(|(_, host)| format!("{}:{}", host.trim_end_matches('.'), delivery.port))
                    .collect()
            }
            // No MX: the domain itself (RFC 5321 §5.1).
            Err(_) => vec![format!("{domain}:{}", delivery.port)],
        }
    }

    async fn deliver_remote(
        &self,
        domain: &str,
        mail_from: &str,
        rcpts: &[String],
        message: &[u8],
    ) -> Vec<(String, Outcome)> {
        let hosts = self.route(domain).await;
        let require = self.hub.settings.delivery.require_tls;
        self.deliver_to(&hosts, mail_from, rcpts, message, require)
            .await
    }

    /// Tries each "host:port" in turn until one is reached.
    async fn deliver_to(
        &self,
        hosts: &[String],
        mail_from: &str,
        rcpts: &[String],
        message: &[u8],
        require_tls: bool,
    ) -> Vec<(String, Outcome)> {
        let settings = &self.hub.settings;
        let config = ClientConfig {
            helo_name: settings.server.hostname.clone(),
            tls: if require_tls {
                TlsPolicy::Required
            } else {
                TlsPolicy::Opportunistic
            },
            verify_tls: false,
            ca_file: None,
            connect_timeout: settings.delivery.connect_timeout,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        };
        let mut last = rcpts
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    Outcome::TemporaryFailure(format!("no mail server found for {r}")),
                )
            })
            .collect::<Vec<_>>();
        let discovery = self.hub.discovery();
        for host in hosts {
            let Some((name, port)) = host.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            let ips: Vec<IpAddr> = if let Ok(ip) = name.parse::<IpAddr>() {
                vec![ip]
            } else if let Some(dns) = discovery.dns() {
                match dns.resolver().lookup_ip(format!("{name}.")).await {
                    Ok(l) => l.iter().collect(),
                    Err(e) => {
                        last = rcpts
                            .iter()
                            .map(|r| {
                                (
                                    r.clone(),
                                    Outcome::TemporaryFailure(format!(
                                        "cannot resolve {name}: {e}"
                                    )),
                                )
                            })
                            .collect();
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            for ip in ips {
                let envelope = client::Envelope {
                    mail_from,
                    rcpt_to: rcpts,
                    size: Some(message.len()),
                };
                let report =
                    client::deliver(SocketAddr::new(ip, port), name, &config, &envelope, message)
                        .await;
                let reached = report.per_recipient.iter().any(|(_, o)| !o.is_temporary());
                last = report.per_recipient;
                if reached {
                    return last;
                }
            }
        }
        last
    }

    /// A finished job: DSN for failed recipients (to a local sender), then
    /// the job and its spool file go.
    async fn finish(&self, mut job: Job) {
        let failed: Vec<FailedRecipient> = job
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Failed)
            .map(|r| FailedRecipient {
                address: r.address.clone(),
                status: r.status_code.clone().unwrap_or_else(|| "5.0.0".into()),
                action: Action::Failed,
                diagnostic: r
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "delivery failed".into()),
                remote_mta: None,
            })
            .collect();
        if !failed.is_empty()
            && !job.dsn_sent
            && job.kind == JobKind::Outgoing
            && !job.mail_from.is_empty()
        {
            let original = self.hub.store.read(&job.spool).unwrap_or_default();
            let hostname = self.hub.settings.server.hostname.clone();
            let dsn_message = dsn::build_dsn(
                &DsnRequest {
                    reporting_mta: &hostname,
                    original_sender: &job.mail_from,
                    original_message: &original,
                    recipients: &failed,
                    arrival_date: chrono::DateTime::from_timestamp(job.created, 0),
                },
                "",
            );
            let sender_local = self
                .hub
                .agent()
                .domain(&domain_of(&job.mail_from))
                .is_some();
            if sender_local {
                let id = message_id_of(&dsn_message);
                match self
                    .hub
                    .store
                    .deliver_local(&job.mail_from, id.as_deref(), &dsn_message)
                {
                    Ok(_) => {
                        tracing::info!(job = %job.id, to = %job.mail_from, failed = failed.len(), "DSN delivered to the sender")
                    }
                    Err(e) => {
                        tracing::error!(job = %job.id, "storing the DSN: {e}");
                        return;
                    }
                }
            } else {
                tracing::warn!(job = %job.id, sender = %job.mail_from, "sender is not local: no DSN sent");
            }
            job.dsn_sent = true;
            if self.hub.store.update_job(&job).is_err() {
                return;
            }
        }
        if let Err(e) = self.hub.store.finish_job(&job.id) {
            tracing::error!(job = %job.id, "removing a finished job: {e}");
        }
    }
}

/// The enhanced status code in an SMTP reply text, or `default`.
fn status_code(text: &str, default: &str) -> String {
    text.split_whitespace()
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or(default)
        .to_string()
}

fn reply_outcome(reply: &Reply) -> Outcome {
    let text = format!("{} {} {}", reply.code, reply.status, reply.text);
    match reply.code {
        200..=399 => Outcome::Completed,
        400..=499 => Outcome::TemporaryFailure(text),
        _ => Outcome::PermanentFailure(text),
    }
}

/// A TLS acceptor from the configured certificate, or a self-signed one
/// for `hostname` kept under the data directory.
fn tls_acceptor(settings: &Settings) -> Result<Arc<openssl::ssl::SslAcceptor>, ServeError> {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let (cert, key) = match (&settings.server.tls_cert, &settings.server.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = settings.server.data_dir.join("tls");
            if !dir.join("key.pem").exists() {
                let ca = crate::pki::new_ca(&settings.server.hostname, 2048)
                    .map_err(|e| ServeError::Tls(e.to_string()))?;
                crate::pki::save(&ca, &dir).map_err(|e| ServeError::Tls(e.to_string()))?;
            }
            (dir.join("cert.pem"), dir.join("key.pem"))
        }
    };
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    b.set_certificate_chain_file(&cert).map_err(|e| {
        ServeError::Tls(format!(
            "{}: {}",
            cert.display(),
            crate::smime::openssl_reason(&e)
        ))
    })?;
    b.set_private_key_file(&key, SslFiletype::PEM)
        .map_err(|e| {
            ServeError::Tls(format!(
                "{}: {}",
                key.display(),
                crate::smime::openssl_reason(&e)
            ))
        })?;
    Ok(Arc::new(b.build()))
}

/// With no domain configured: a development domain with a PKI made on the
/// first start under the data directory, and a demo account.
fn bootstrap_dev_domain(
    settings: &mut Settings,
    users: &Users,
) -> Result<Option<String>, ServeError> {
    if !settings.domains.is_empty() {
        return Ok(None);
    }
    let err = |e: &dyn std::fmt::Display| ServeError::Bootstrap(e.to_string());
    let data = settings.server.data_dir.clone();
    let dir = data.join("certs").join(DEV_DOMAIN);
    if !dir.join("private/key.pem").exists() {
        let ca = crate::pki::new_ca("hispd development CA", 2048).map_err(|e| err(&e))?;
        crate::pki::save(&ca, &data.join("dev-ca")).map_err(|e| err(&e))?;
        let leaf = crate::pki::issue(&ca, &crate::pki::LeafSpec::domain(DEV_DOMAIN))
            .map_err(|e| err(&e))?;
        crate::pki::save(&leaf, &dir.join("private")).map_err(|e| err(&e))?;
        std::fs::create_dir_all(dir.join("anchors/both")).map_err(|e| err(&e))?;
        std::fs::write(
            dir.join("anchors/both/dev-ca.pem"),
            ca.cert.to_pem().map_err(|e| err(&e))?,
        )
        .map_err(|e| err(&e))?;
    }
    settings.domains.push(DomainConfig {
        name: DEV_DOMAIN.into(),
        edge_relay: None,
        incoming_anchors: vec![dir.join("anchors/incoming"), dir.join("anchors/both")],
        outgoing_anchors: vec![dir.join("anchors/outgoing"), dir.join("anchors/both")],
        dir,
        private: Vec::new(),
    });
    let password_file = data.join("demo-password.txt");
    let password = if users.get(DEV_USER).ok().flatten().is_none() {
        let mut b = [0u8; 9];
        let _ = openssl::rand::rand_bytes(&mut b);
        let password = hex::encode(b);
        users.add(DEV_USER, &password, &[]).map_err(|e| err(&e))?;
        std::fs::write(&password_file, format!("{password}\n")).map_err(|e| err(&e))?;
        password
    } else {
        std::fs::read_to_string(&password_file)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    Ok(Some(password))
}

/// Everything `serve` needs, opened and checked; the listeners are bound.
pub struct Daemon {
    pub hub: Arc<Hub>,
    mx: tokio::net::TcpListener,
    submission: tokio::net::TcpListener,
    mx_config: Arc<SessionConfig>,
    submission_config: Arc<SessionConfig>,
    pub dev_password: Option<String>,
}

impl Daemon {
    /// Loads everything and binds the listeners; nothing is accepted yet.
    pub async fn prepare(config_file: Option<&Path>) -> Result<Daemon, ServeError> {
        let (mut settings, _) = match Settings::load_agent(config_file) {
            Ok(x) => x,
            Err(e) => return Err(ServeError::Config(e.to_string())),
        };
        std::fs::create_dir_all(&settings.server.data_dir).map_err(|e| {
            ServeError::Config(format!(
                "server.data_dir {}: {e}",
                settings.server.data_dir.display()
            ))
        })?;
        let store = Arc::new(SledStore::open(&settings.server.data_dir)?);
        let users = Users::open(store.db()).map_err(|e| ServeError::Config(e.to_string()))?;
        let dev_password = bootstrap_dev_domain(&mut settings, &users)?;
        let agent = settings
            .build_agent()
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let discovery = settings
            .build_discovery(&agent)
            .map_err(|e| ServeError::Config(e.to_string()))?;
        let tls = tls_acceptor(&settings)?;
        let edge_relays = settings
            .domains
            .iter()
            .filter_map(|d| d.edge_relay.clone().map(|r| (d.name.clone(), r)))
            .collect();
        let session = |kind| {
            Arc::new(SessionConfig {
                hostname: settings.server.hostname.clone(),
                kind,
                max_message_size: settings.server.max_message_size,
                max_recipients: settings.server.max_recipients,
                tls: Some(tls.clone()),
                command_timeout: settings.server.command_timeout,
                data_timeout: settings.server.data_timeout,
            })
        };
        let mx_config = session(ListenerKind::Mx);
        let submission_config = session(ListenerKind::Submission);
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|error| ServeError::Listen { addr, error })
        };
        let mx = bind(settings.server.mx_listen).await?;
        let submission = bind(settings.server.submission_listen).await?;
        let hub = Arc::new(Hub {
            agent: RwLock::new(Arc::new(agent)),
            discovery: RwLock::new(Arc::new(discovery)),
            store,
            users,
            wake: Notify::new(),
            edge_relays,
            per_ip: Mutex::new(HashMap::new()),
            settings,
        });
        Ok(Daemon {
            hub,
            mx,
            submission,
            mx_config,
            submission_config,
            dev_password,
        })
    }

    pub fn mx_addr(&self) -> Option<SocketAddr> {
        self.mx.local_addr().ok()
    }

    pub fn submission_addr(&self) -> Option<SocketAddr> {
        self.submission.local_addr().ok()
    }

    /// Accepts connections and runs the queue until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let worker = tokio::spawn(
            Worker {
                hub: self.hub.clone(),
            }
            .run(),
        );
        let connections = Arc::new(tokio::sync::Semaphore::new(
            self.hub.settings.server.max_connections,
        ));
        let mx = accept_loop(
            self.mx,
            self.mx_config,
            self.hub.clone(),
            connections.clone(),
        );
        let submission = accept_loop(
            self.submission,
            self.submission_config,
            self.hub.clone(),
            connections.clone(),
        );
        tokio::select! {
            _ = mx => {}
            _ = submission => {}
            _ = shutdown => {}
        }
        tracing::info!("stopping: no new connections; finishing open sessions");
        let max = self.hub.settings.server.max_connections as u32;
        let _ = tokio::time::timeout(Duration::from_secs(30), connections.acquire_many(max)).await;
        worker.abort();
        let _ = self.hub.store.db().flush();
    }
}

use std::future::Future;

async fn accept_loop(
    listener: tokio::net::TcpListener,
    config: Arc<SessionConfig>,
    hub: Arc<Hub>,
    connections: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let Ok((stream, remote)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            let mut s = stream;
            let _ = tokio::io::AsyncWriteExt::write_all(
                &mut s,
                b"421 4.3.2 too many connections, try later\r\n",
            )
            .await;
            continue;
        };
        let ip = remote.ip();
        let over_limit = {
            let mut per_ip = hub.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= hub.settings.server.max_connections_per_ip {
                true
            } else {
                *n += 1;
                false
            }
        };
        if over_limit {
            let mut s = stream;
            let _ = tokio::io::AsyncWriteExt::write_all(
                &mut s,
                b"421 4.7.0 too many connections from your address\r\n",
            )
            .await;
            continue;
        }
        let hub = hub.clone();
        let config = config.clone();
        tokio::spawn(async move {
            smtp::serve_connection(stream, remote, config, hub.clone()).await;
            let mut per_ip = hub.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
            drop(permit);
        });
    }
}
