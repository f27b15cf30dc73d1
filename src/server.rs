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
use crate::agent::{self, Agent, OpenRequest};
use crate::config::{DomainConfig, Settings};
use crate::discovery::Discovery;
use crate::notify::mdn::{self, Disposition};
use crate::notify::{self, track};
use crate::smtp::server::{
    self as smtp, Envelope, HandlerFuture, ListenerKind, Reply, SessionConfig, SmtpHandler,
};
use crate::store::{Job, JobKind, LocalDelivery, RecipientState, SledStore, Storage, StoreError};
use crate::users::Users;
use mail_parser::MessageParser;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::Instrument;

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

/// Large buffers (message copies while sealing and opening) are returned to
/// the system when freed. glibc raises its mmap threshold after the first
/// large free, and from then on serves multi-megabyte buffers from per-thread
/// arenas that keep the memory: a few large messages left the daemon's RSS
/// at several times their size. A fixed threshold keeps them mmapped.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; called once at
        // start-up before the runtime's threads exist.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 * 1024);
        }
    }
}

/// The development domain `hispd serve` creates when none is configured.
pub const DEV_DOMAIN: &str = "direct.test";
pub const DEV_USER: &str = "demo@direct.test";

/// Shared state of the daemon.
pub struct Hub {
    pub(crate) settings: Settings,
    pub(crate) agent: RwLock<Arc<Agent>>,
    pub(crate) discovery: RwLock<Arc<Discovery>>,
    pub(crate) store: Arc<SledStore>,
    pub(crate) users: Users,
    pub(crate) wake: Notify,
    /// Jobs just queued, handed to the queue worker without a queue scan.
    pub(crate) fresh: tokio::sync::mpsc::UnboundedSender<crate::store::Job>,
    pub(crate) fresh_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<crate::store::Job>>>,
    pub(crate) changes: tokio::sync::broadcast::Sender<String>,
    /// The configuration file, for reloads.
    pub(crate) config_path: Option<std::path::PathBuf>,
    /// CRLs and AIA for signers on receipt (cached across messages).
    pub(crate) revocation: crate::trust::revocation::RevocationChecker,
    /// Replaced on reload, like the agent and discovery.
    edge_routes: RwLock<Arc<EdgeRoutes>>,
    pub(crate) per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// `[delivery] memory_budget_mb`, shared by the queue and the listeners.
    pub(crate) memory: Arc<crate::budget::MemoryBudget>,
    /// Outgoing messages still waiting for MDNs, by deadline.
    pub(crate) deadlines: track::Deadlines,
    /// Held while a tracking record is read, changed and written, so that of
    /// two reports of one failure (a timeout and an expired delivery, a
    /// remote DSN) only one finds it the first.
    tracking: Mutex<()>,
}

pub(crate) fn audit(event: &str, detail: &str) {
    tracing::info!(target: "audit", event, detail);
}

/// Where received mail goes: per address (`[[domains.routes]]`), else per
/// domain (`edge_relay`); `None` is the built-in mailbox.
#[derive(Default)]
pub(crate) struct EdgeRoutes {
    domains: HashMap<String, String>,
    /// Lower-cased address → relay, or `None` for the mailbox.
    addresses: HashMap<String, Option<String>>,
}

impl EdgeRoutes {
    pub(crate) fn new(domains: &[DomainConfig]) -> EdgeRoutes {
        let mut routes = EdgeRoutes::default();
        for d in domains {
            if let Some(relay) = &d.edge_relay {
                routes
                    .domains
                    .insert(d.name.to_ascii_lowercase(), relay.clone());
            }
            for (address, relay) in &d.routes {
                routes
                    .addresses
                    .insert(address.to_ascii_lowercase(), relay.clone());
            }
        }
        routes
    }

    /// The edge relay ("host:port") for `address` of local `domain`.
    pub(crate) fn relay_for(&self, domain: &str, address: &str) -> Option<&str> {
        match self.addresses.get(&address.to_ascii_lowercase()) {
            Some(route) => route.as_deref(),
            None => self
                .domains
                .get(&domain.to_ascii_lowercase())
                .map(String::as_str),
        }
    }
}

pub(crate) fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The Message-ID of a message, if it has one.
pub(crate) fn message_id_of(message: &[u8]) -> Option<String> {
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
    /// `[notify] mdn_timeout_secs`, in seconds.
    pub(crate) fn mdn_timeout(&self) -> i64 {
        self.settings.server.mdn_timeout.as_secs() as i64
    }

    pub(crate) fn now() -> i64 {
        agent::now()
    }

    /// Taken around each read-change-write of a tracking record.
    pub(crate) fn lock_tracking(&self) -> std::sync::MutexGuard<'_, ()> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn agent(&self) -> Arc<Agent> {
        self.agent
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub(crate) fn edge_routes(&self) -> Arc<EdgeRoutes> {
        self.edge_routes
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub(crate) fn discovery(&self) -> Arc<Discovery> {
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
                    if let Ok(mut r) = self.edge_routes.write() {
                        *r = Arc::new(EdgeRoutes::new(&settings.domains));
                    }
                    tracing::info!("configuration, keys, anchors and edge routes reloaded");
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
    pub(crate) async fn receive_sealed(
        &self,
        mail_from: &str,
        rcpt_to: &[String],
        message: Vec<u8>,
    ) -> Reply {
        let agent = self.agent();
        let mut by_domain: BTreeMap<String, Vec<DirectAddress>> = BTreeMap::new();
        for r in rcpt_to {
            match DirectAddress::parse(r) {
                Ok(a) => by_domain.entry(a.domain().to_string()).or_default().push(a),
                Err(e) => return Reply::new(550, "5.1.3", e.to_string()),
            }
        }
        let mut opened_all = Vec::new();
        // With one local domain (the usual case) the message is handed over
        // and dropped as soon as it is decoded; several domains each open it.
        let (mut owned, shared) = match by_domain.len() {
            1 => (Some(message), None),
            _ => (None, Some(message)),
        };
        for (domain, rcpts) in &by_domain {
            let Some(local) = agent.domain(domain) else {
                return Reply::new(550, "5.7.1", format!("{domain} is not a local domain"));
            };
            let request = OpenRequest {
                message: shared.as_deref().unwrap_or_default(),
                mail_from: Some(mail_from.to_string()),
                rcpt_to: rcpts.clone(),
                at: Self::now(),
            };
            let result = match owned.take() {
                Some(message) => agent.open_owned_for_domain(local, message, request),
                None => agent.open_for_domain(local, request),
            };
            match result {
                Ok(opened) => {
                    if let Err(reason) = self
                        .signer_not_revoked(&opened, &local.incoming_anchors)
                        .await
                    {
                        audit("incoming-refused", &format!("[signer-revoked] {reason}"));
                        return Reply::new(
                            554,
                            "5.7.1",
                            format!("refused [signer-revoked]: {reason}"),
                        );
                    }
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
            if notify::dsn::is_report(&opened.message) {
                if let Err(reply) = self.receive_notification(&rcpts, &opened.message) {
                    return reply;
                }
                continue;
            }
            let timely = mdn::wants_final_delivery(&opened.message);
            // Each recipient to its edge relay (per address, else per
            // domain) or, with none, to its mailbox: one job per relay.
            let routes = self.edge_routes();
            let mut relayed: BTreeMap<&str, Vec<&DirectAddress>> = BTreeMap::new();
            let mut mailboxes = Vec::new();
            for r in &rcpts {
                match routes.relay_for(&domain, &r.to_string()) {
                    Some(relay) => relayed.entry(relay).or_default().push(r),
                    None => mailboxes.push(r),
                }
            }
            for (relay, group) in relayed {
                let spool = match self.store.spool(&opened.message) {
                    Ok(s) => s,
                    Err(e) => return Reply::new(451, "4.3.0", format!("local storage error: {e}")),
                };
                let job = Job {
                    id: new_job_id(),
                    kind: JobKind::EdgeRelay,
                    spool,
                    mail_from: opened.report.from.clone(),
                    recipients: group
                        .iter()
                        .map(|r| RecipientState::pending(r.to_string()))
                        .collect(),
                    created: Self::now(),
                    message_id: message_id.clone(),
                    dsn_sent: false,
                };
                if let Err(e) = self.store.enqueue(&job) {
                    return Reply::new(451, "4.3.0", format!("local storage error: {e}"));
                }
                tracing::info!(job = %job.id, relay = %relay, "queued for the edge relay");
                self.queued(&job);
            }
            {
                for r in mailboxes {
                    match self.store.deliver_local(
                        &r.to_string(),
                        message_id.as_deref(),
                        &opened.message,
                    ) {
                        Ok(LocalDelivery::Stored { uid }) => {
                            tracing::info!(mailbox = %r, uid, message_id = message_id.as_deref().unwrap_or("-"), "delivered");
                            let _ = self.changes.send(r.to_string().to_ascii_lowercase());
                            if timely {
                                let pending = PendingDispatch {
                                    original_message_id: message_id.clone().unwrap_or_default(),
                                    from: r.to_string(),
                                    to: opened.report.from.clone(),
                                    subject: opened.report.subject.clone(),
                                };
                                if let Ok(v) = serde_json::to_vec(&pending) {
                                    if let Err(e) = self.store.put_record(
                                        DISPATCH,
                                        &dispatch_key(&r.to_string(), uid),
                                        &v,
                                    ) {
                                        return Reply::new(
                                            451,
                                            "4.3.0",
                                            format!("local storage error: {e}"),
                                        );
                                    }
                                }
                            }
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
            self.documents_arrived(&opened.message);
            // Security and trust processing succeeded: a processed MDN for
            // each recipient, sealed like any outgoing message.
            if let Some(original_id) = &message_id {
                for r in &rcpts {
                    self.send_mdn(&MdnToSend {
                        from: r.to_string(),
                        to: opened.report.from.clone(),
                        original_message_id: original_id.clone(),
                        subject: opened.report.subject.clone(),
                        disposition: Disposition::Processed,
                        final_destination_delivery: false,
                        error: None,
                    });
                }
            }
        }
        Reply::new(250, "2.0.0", "message accepted")
    }

    /// Revocation of the accepted signer's chain (CRLs from the distribution
    /// points, missing intermediates through AIA). Soft-fail by default.
    async fn signer_not_revoked(
        &self,
        opened: &agent::Opened,
        anchors: &crate::trust::AnchorSet,
    ) -> Result<(), String> {
        use crate::trust::revocation;
        let leaf = &opened.signer_certificate;
        let (extra, _) = self
            .revocation
            .complete_chain(leaf, &opened.carried, anchors)
            .await;
        let mut untrusted = opened.carried.clone();
        untrusted.extend(extra);
        let Some(chain) = revocation::path_to_anchor(leaf, &untrusted, anchors) else {
            return Ok(());
        };
        let outcome = self
            .revocation
            .check_crls(&chain)
            .await
            .map_err(|e| e.to_string())?;
        for w in &outcome.warnings {
            tracing::warn!("revocation of the signer not checked: {w}");
        }
        revocation::check_revoked(&chain, &outcome.crls, Self::now()).map_err(|e| e.to_string())
    }

    /// Our own signing certificates for `from` (address-bound, then
    /// domain-bound) that must not sign: a CRL of their chain revokes them,
    /// or, under `crl_policy = "hard-fail"`, a CRL could not be fetched.
    /// Each comes with its fingerprint and the reason. A credential whose
    /// chain names no CRL distribution point costs no more than reading its
    /// extensions. The issuer that signs a CRL comes from the domain's
    /// anchors (with AIA), else from the chain configured with the key;
    /// with neither, the certificate is not checked (with a warning).
    pub(crate) async fn own_signers_barred(
        &self,
        domain: &agent::LocalDomain,
        from: &DirectAddress,
    ) -> Vec<(String, String)> {
        use crate::trust::revocation;
        let mut barred = Vec::new();
        for c in domain.credentials_for(from, false) {
            let cred = &c.credential;
            let has_crl = std::iter::once(&cred.cert)
                .chain(cred.chain.iter())
                .any(|x| !revocation::crl_urls(x).is_empty());
            if !has_crl {
                continue;
            }
            let mut path = None;
            for anchors in [&domain.outgoing_anchors, &domain.incoming_anchors] {
                let (extra, _) = self
                    .revocation
                    .complete_chain(&cred.cert, &cred.chain, anchors)
                    .await;
                let mut untrusted = cred.chain.clone();
                untrusted.extend(extra);
                path = revocation::path_to_anchor(&cred.cert, &untrusted, anchors);
                if path.is_some() {
                    break;
                }
            }
            // Else the certificates configured with it, in the order given
            // (a CRL counts only when the next one signed it).
            let chain = path.unwrap_or_else(|| {
                std::iter::once(cred.cert.clone())
                    .chain(cred.chain.iter().cloned())
                    .collect()
            });
            if chain.len() < 2 {
                tracing::warn!(
                    certificate = %crate::trust::fingerprint(&cred.cert),
                    "revocation of our signing certificate not checked: its issuer is neither \
                     an anchor of {} nor in the chain configured with its key",
                    domain.name
                );
                continue;
            }
            let verdict = match self.revocation.check_crls(&chain).await {
                Ok(outcome) => {
                    for w in &outcome.warnings {
                        tracing::warn!("revocation of our signing certificate not checked: {w}");
                    }
                    revocation::check_revoked(&chain, &outcome.crls, Self::now())
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(reason) = verdict {
                barred.push((crate::trust::fingerprint(&cred.cert), reason));
            }
        }
        barred
    }

    /// Hands a job just stored in the queue to the worker.
    pub(crate) fn queued(&self, job: &crate::store::Job) {
        let _ = self.fresh.send(job.clone());
        self.wake.notify_one();
    }

    /// Whether `address` is in one of our local domains.
    fn is_local_address(&self, address: &str) -> bool {
        DirectAddress::parse(address)
            .ok()
            .is_some_and(|a| self.agent().domain(a.domain()).is_some())
    }

    /// Indexes the C-CDA documents a message carries and runs the patients'
    /// push rules for new ones (Blue Button Plus Push).
    pub(crate) fn documents_arrived(&self, message: &[u8]) {
        use crate::documents::{ccda, index};
        for xml in index::ccdas_in_message(message) {
            let doc = match ccda::parse(&xml, &ccda::Limits::default()) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("a C-CDA attachment could not be read: {e}");
                    continue;
                }
            };
            let entry = match index::index(self.store.as_ref(), &xml, &doc, Self::now()) {
                Ok(index::Indexed::New(e)) => e,
                Ok(index::Indexed::Duplicate) => continue,
                Err(e) => {
                    tracing::error!("indexing a C-CDA: {e}");
                    continue;
                }
            };
            tracing::info!(document = %entry.key, patients = ?entry.patient_ids, "C-CDA indexed");
            let outcome = index::queue_pushes(
                self.store.as_ref(),
                &entry,
                &xml,
                &doc,
                &self.push_sender(),
                Self::now(),
            );
            self.pushes_queued(outcome);
        }
    }

    /// Who pushes: `[documents] push_from` (else `records@<first local
    /// domain>`) and `holder_name` (else the host name).
    fn push_sender(&self) -> crate::documents::index::PushSender {
        let from = if self.settings.push_from.is_empty() {
            let first = self
                .agent()
                .domains
                .keys()
                .next()
                .cloned()
                .unwrap_or_default();
            format!("records@{first}")
        } else {
            self.settings.push_from.clone()
        };
        let holder = if self.settings.holder_name.is_empty() {
            self.settings.server.hostname.clone()
        } else {
            self.settings.holder_name.clone()
        };
        crate::documents::index::PushSender { from, holder }
    }

    /// At start-up: the pushes still due (a document indexed, or a push
    /// that could not be queued, before a crash or a storage error).
    pub(crate) fn queue_due_pushes(&self) {
        use crate::documents::index;
        match index::queue_due_pushes(self.store.as_ref(), &self.push_sender(), Self::now()) {
            Ok(outcome) => self.pushes_queued(outcome),
            Err(e) => tracing::error!("push rules: the pushes still due were not read: {e}"),
        }
    }

    /// Logs what queueing pushes did and hands the new jobs to the worker.
    fn pushes_queued(&self, outcome: crate::documents::index::PushOutcome) {
        for f in &outcome.failed {
            tracing::error!(
                rule = f.rule.as_deref().unwrap_or("(all)"),
                document = %f.document,
                "push not recorded, tried again at the next start: {}",
                f.error
            );
        }
        for (rule, document) in &outcome.recovered {
            tracing::info!(%rule, %document, "push found queued before a restart: recorded as sent");
        }
        for p in outcome.queued {
            self.deadlines.add(&p.tracking, self.mdn_timeout());
            audit(
                "push",
                &format!(
                    "document {} for patient {} to {} (rule {})",
                    p.document, p.patient.id, p.rule.to, p.rule.id
                ),
            );
            self.queued(&p.job);
        }
    }

    /// An MDN or DSN for a message we sent: update the tracking, and pass
    /// it to the edge sender when wanted. Never answered with an MDN.
    ///
    /// Passed on: an MDN that moved a recipient on, when the original asked
    /// for notifications (Disposition-Notification-To), and a failed one in
    /// any case (it is the recipient's first failure); a DSN reporting
    /// something new about at least one recipient. Suppressed: anything
    /// about recipients that had failed already (the sender heard of that
    /// once), duplicates, and an MDN about a message we do not track (we
    /// cannot tell whether its sender asked for it). A DSN about a message
    /// we do not track, or naming a recipient we cannot match, is passed
    /// on: a failure report is the sender's to read, and none of ours can
    /// have preceded it.
    fn receive_notification(&self, rcpts: &[DirectAddress], message: &[u8]) -> Result<(), Reply> {
        let now = Self::now();
        let store_err =
            |e: StoreError| Reply::new(451, "4.3.0", format!("local storage error: {e}"));
        let mut deliver = false;
        if let Some(m) = mdn::parse_mdn(message) {
            let _tracking = self.lock_tracking();
            match track::load(self.store.as_ref(), &m.original_message_id).map_err(store_err)? {
                Some(mut t) => {
                    let applied = t.apply_mdn(&m.final_recipient, m.disposition, now);
                    tracing::info!(
                        original = %m.original_message_id,
                        recipient = %m.final_recipient,
                        disposition = m.disposition.as_str(),
                        outcome = ?applied,
                        "MDN received"
                    );
                    // A first failure is the sender's to hear of, asked or not.
                    let failure =
                        matches!(m.disposition, Disposition::Failed | Disposition::Deleted);
                    deliver = applied == track::Applied::Recorded && (t.relay_mdns || failure);
                    track::save(self.store.as_ref(), &t).map_err(store_err)?;
                }
                None => tracing::info!(
                    original = %m.original_message_id,
                    recipient = %m.final_recipient,
                    disposition = m.disposition.as_str(),
                    outcome = ?track::Applied::Unknown,
                    "MDN received for a message we do not track: not passed on"
                ),
            }
        } else if let Some(reported) = notify::dsn::parse_dsn(message) {
            let original = message_id_of_report(message);
            let _tracking = self.lock_tracking();
            let tracked = match &original {
                Some(id) => track::load(self.store.as_ref(), id).map_err(store_err)?,
                None => None,
            };
            let outcome = match tracked {
                Some(mut t) => {
                    let applied: Vec<track::Applied> = reported
                        .iter()
                        .map(|(addr, action, status, why)| {
                            let why = format!("{status}: {}", why.clone().unwrap_or_default());
                            t.apply_dsn(addr, action, &why, now)
                        })
                        .collect();
                    track::save(self.store.as_ref(), &t).map_err(store_err)?;
                    // Suppressed only when every recipient it names is one
                    // the sender has heard about: one we cannot match (the
                    // other side may name the recipient differently) is
                    // passed on rather than lost.
                    if applied.contains(&track::Applied::Recorded) {
                        track::Applied::Recorded
                    } else if applied.is_empty() || applied.contains(&track::Applied::Unknown) {
                        track::Applied::Unknown
                    } else {
                        track::Applied::Suppressed
                    }
                }
                None => track::Applied::Unknown,
            };
            deliver = outcome != track::Applied::Suppressed;
            tracing::info!(
                original = original.as_deref().unwrap_or("-"),
                outcome = ?outcome,
                passed_on = deliver,
                "DSN received"
            );
        } else {
            // A report of another type, or one we cannot read: the
            // recipient's to read.
            deliver = true;
        }
        if deliver {
            let id = message_id_of(message);
            for r in rcpts {
                self.store
                    .deliver_local(&r.to_string(), id.as_deref(), message)
                    .map_err(store_err)?;
                let _ = self.changes.send(r.to_string().to_ascii_lowercase());
            }
        }
        Ok(())
    }

    /// Queues an MDN (sealed and delivered like any outgoing message).
    pub(crate) fn send_mdn(&self, m: &MdnToSend) {
        let reporting_ua = format!("{}; hispd", self.settings.server.hostname);
        let message = mdn::build_mdn(&mdn::MdnRequest {
            from: &m.from,
            to: &m.to,
            original_message_id: &m.original_message_id,
            original_subject: m.subject.as_deref(),
            disposition: m.disposition,
            reporting_ua: &reporting_ua,
            final_destination_delivery: m.final_destination_delivery,
            error: m.error.as_deref(),
        });
        let spool = match self.store.spool(&message) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("spooling an MDN: {e}");
                return;
            }
        };
        let job = Job {
            id: new_job_id(),
            kind: JobKind::Notification,
            spool,
            mail_from: m.from.clone(),
            recipients: vec![RecipientState::pending(m.to.clone())],
            created: Self::now(),
            message_id: message_id_of(&message),
            dsn_sent: false,
        };
        match self.store.enqueue(&job) {
            Ok(()) => {
                tracing::info!(job = %job.id, original = %m.original_message_id, to = %m.to, disposition = m.disposition.as_str(), "MDN queued");
                self.queued(&job);
            }
            Err(e) => tracing::error!("queueing an MDN: {e}"),
        }
    }

    async fn accept_submission(&self, envelope: &Envelope, message: Vec<u8>) -> Reply {
        let user = envelope
            .auth_user
            .as_deref()
            .and_then(|u| self.users.get(u).ok().flatten());
        match &user {
            Some(user) => {
                for from in from_addresses(&message) {
                    if !Users::may_send_as(user, &from) {
                        return Reply::new(
                            550,
                            "5.7.1",
                            format!("{} may not send as {from} (From header)", user.name),
                        );
                    }
                }
            }
            None if envelope.trusted_relay && envelope.auth_user.is_none() => {
                for from in from_addresses(&message) {
                    if !self.is_local_address(&from) {
                        return Reply::new(
                            550,
                            "5.7.1",
                            format!("{from}: a trusted relay may only send from this HISP's domains (From header)"),
                        );
                    }
                }
            }
            None => return Reply::new(530, "5.7.0", "authentication required"),
        }
        // Notifications refer to the Message-ID: it must exist before the
        // first attempt. The message is copied only when lines are added,
        // and the original is dropped then.
        let added = DirectAddress::parse(&envelope.mail_from)
            .ok()
            .and_then(|from| agent::missing_headers(&message, &from).ok())
            .map(|(added, _)| added)
            .unwrap_or_default();
        let message = if added.is_empty() {
            message
        } else {
            let mut completed = added;
            completed.extend_from_slice(&message);
            drop(message);
            completed
        };
        // Written now, on disk (with the job) once `commit_job` returns.
        let spooled = match self.store.spool_unsynced(&message) {
            Ok(s) => s,
            Err(e) => return Reply::new(451, "4.3.0", format!("local storage error: {e}")),
        };
        let headers = MessageParser::default().parse_headers(&message);
        // A DSN or MDN an edge client sends is tracked by nobody: no MDN
        // ever answers it, so tracking would end in a false failure.
        let notification = headers
            .as_ref()
            .is_some_and(notify::dsn::is_notification_report);
        if let Some(id) = message_id_of(&message).filter(|_| !notification) {
            let mut t =
                track::Tracking::new(&id, &envelope.mail_from, &envelope.rcpt_to, Self::now());
            t.timely = mdn::wants_final_delivery(&message);
            t.relay_mdns = has_header(&message, "Disposition-Notification-To");
            t.subject = headers.and_then(|m| m.subject().map(str::to_string));
            // Durable with the job, committed (and flushed) just below.
            if let Err(e) = track::save_deferred(self.store.as_ref(), &t) {
                return Reply::new(451, "4.3.0", format!("local storage error: {e}"));
            }
            self.deadlines.add(&t, self.mdn_timeout());
        }
        let job = Job {
            id: new_job_id(),
            kind: JobKind::Outgoing,
            spool: spooled.id.clone(),
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
        if let Err(e) = self.store.commit_job(spooled, &job).await {
            return Reply::new(451, "4.3.0", format!("local storage error: {e}"));
        }
        tracing::info!(
            job = %job.id,
            from = %job.mail_from,
            recipients = job.recipients.len(),
            message_id = job.message_id.as_deref().unwrap_or("-"),
            "accepted for delivery"
        );
        self.documents_arrived(&message);
        // The queue reads the message from the spool: this copy goes before
        // it starts, so a large message is not in memory twice.
        drop(message);
        self.queued(&job);
        Reply::new(250, "2.0.0", format!("queued as {}", job.id))
    }
}

/// Records of messages waiting for their dispatched MDN, by mailbox and UID.
pub(crate) const DISPATCH: &str = "dispatch";

pub(crate) fn dispatch_key(mailbox: &str, uid: u64) -> String {
    format!("{}\u{0}{uid}", mailbox.to_ascii_lowercase())
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingDispatch {
    pub original_message_id: String,
    pub from: String,
    pub to: String,
    pub subject: Option<String>,
}

/// An MDN to send.
pub(crate) struct MdnToSend {
    pub from: String,
    pub to: String,
    pub original_message_id: String,
    pub subject: Option<String>,
    pub disposition: Disposition,
    pub final_destination_delivery: bool,
    pub error: Option<String>,
}

fn has_header(message: &[u8], name: &str) -> bool {
    crate::smime::mime::Entity::parse(message)
        .map(|e| e.header(name).is_some())
        .unwrap_or(false)
}

/// The Message-ID a report is about (X-Original-Message-ID, or the headers
/// of the returned message).
fn message_id_of_report(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    for line in text.lines() {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("x-original-message-id:") || lower.starts_with("original-message-id:")
        {
            return line.split_once(':').map(|(_, v)| v.trim().to_string());
        }
    }
    // A text/rfc822-headers part: the second Message-ID in the report.
    text.lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("message-id:"))
        .nth(1)
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
}

fn new_job_id() -> String {
    static FALLBACK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut b = [0u8; 12];
    if openssl::rand::rand_bytes(&mut b).is_err() {
        // Never the same id twice, even without randomness: the time in
        // nanoseconds and a counter.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let n = FALLBACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b[..8].copy_from_slice(&nanos.to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    hex::encode(b)
}

impl crate::edge::EdgeBackend for Hub {
    fn authenticate(&self, user: &str, password: &str) -> Option<String> {
        SmtpHandler::authenticate(self, user, password)
    }

    fn storage(&self) -> &dyn Storage {
        self.store.as_ref()
    }

    fn fetched(&self, mailbox: &str, uid: u64) {
        let key = dispatch_key(mailbox, uid);
        let Ok(Some(v)) = self.store.get_record(DISPATCH, &key) else {
            return;
        };
        let Ok(pending) = serde_json::from_slice::<PendingDispatch>(&v) else {
            return;
        };
        tracing::info!(mailbox, uid, original = %pending.original_message_id, "reached its final destination");
        self.send_mdn(&MdnToSend {
            from: pending.from,
            to: pending.to,
            original_message_id: pending.original_message_id,
            subject: pending.subject,
            disposition: Disposition::Dispatched,
            final_destination_delivery: true,
            error: None,
        });
        if let Err(e) = self.store.remove_record(DISPATCH, &key) {
            tracing::error!("removing a dispatch record: {e}");
        }
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }
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
            ListenerKind::Submission if envelope.auth_user.is_none() && envelope.trusted_relay => {
                if self.is_local_address(from) {
                    Ok(())
                } else {
                    Err(Reply::new(
                        553,
                        "5.7.1",
                        format!("{from}: a trusted relay may only send from this HISP's domains"),
                    ))
                }
            }
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
                    self.receive_sealed(&envelope.mail_from, &envelope.rcpt_to, message)
                        .await
                }
                ListenerKind::Submission => self.accept_submission(envelope, message).await,
            }
        })
    }
}

/// A TLS acceptor from the configured certificate, or a self-signed one
/// for `hostname` kept under the data directory.
fn tls_acceptor(settings: &Settings) -> Result<Arc<openssl::ssl::SslAcceptor>, ServeError> {
    let (cert, key) = match (&settings.server.tls_cert, &settings.server.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = settings.server.data_dir.join("tls-server");
            if !dir.join("key.pem").exists() {
                let ca = crate::pki::self_signed_server(&settings.server.hostname)
                    .map_err(|e| ServeError::Tls(e.to_string()))?;
                crate::pki::save(&ca, &dir).map_err(|e| ServeError::Tls(e.to_string()))?;
            }
            (dir.join("cert.pem"), dir.join("key.pem"))
        }
    };
    acceptor_from(&cert, &key)
}

/// A TLS acceptor (Mozilla intermediate settings) for a PEM chain and key.
pub fn acceptor_from(
    cert: &Path,
    key: &Path,
) -> Result<Arc<openssl::ssl::SslAcceptor>, ServeError> {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    b.set_certificate_chain_file(cert).map_err(|e| {
        ServeError::Tls(format!(
            "{}: {}",
            cert.display(),
            crate::smime::openssl_reason(&e)
        ))
    })?;
    b.set_private_key_file(key, SslFiletype::PEM).map_err(|e| {
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
        routes: Vec::new(),
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
    imap: Option<tokio::net::TcpListener>,
    pop3: Option<tokio::net::TcpListener>,
    pull: Option<(
        tokio::net::TcpListener,
        Arc<crate::pull::Pull>,
        Option<Arc<openssl::ssl::SslAcceptor>>,
    )>,
    edge_config: Arc<crate::edge::EdgeConfig>,
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
        let edge_routes = RwLock::new(Arc::new(EdgeRoutes::new(&settings.domains)));
        let memory = Arc::new(crate::budget::MemoryBudget::new(
            settings.delivery.memory_budget,
        ));
        let session = |kind| {
            Arc::new(SessionConfig {
                hostname: settings.server.hostname.clone(),
                kind,
                max_message_size: settings.server.max_message_size,
                max_recipients: settings.server.max_recipients,
                tls: Some(tls.clone()),
                command_timeout: settings.server.command_timeout,
                data_timeout: settings.server.data_timeout,
                trusted_networks: settings.server.submission_trusted_networks.clone(),
                memory: Some(memory.clone()),
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
        let imap = match settings.server.imap_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let pop3 = match settings.server.pop3_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let pull = match settings.pull.listen {
            Some(addr) => {
                let listener = bind(addr).await?;
                let tls = match &settings.pull.tls {
                    Some((cert, key)) => Some(acceptor_from(cert, key)?),
                    None => None,
                };
                let pull = crate::pull::Pull::new(
                    store.clone(),
                    settings.pull.clone(),
                    &settings.server.data_dir,
                    settings.discovery.http,
                )
                .map_err(|e| ServeError::Config(e.to_string()))?;
                Some((listener, Arc::new(pull), tls))
            }
            None => None,
        };
        let edge_config = Arc::new(crate::edge::EdgeConfig {
            hostname: settings.server.hostname.clone(),
            tls: Some(tls.clone()),
            timeout: Duration::from_secs(30 * 60),
        });
        let (fresh, fresh_rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            agent: RwLock::new(Arc::new(agent)),
            discovery: RwLock::new(Arc::new(discovery)),
            store,
            users,
            wake: Notify::new(),
            fresh,
            fresh_rx: Mutex::new(Some(fresh_rx)),
            edge_routes,
            per_ip: Mutex::new(HashMap::new()),
            memory,
            deadlines: track::Deadlines::default(),
            tracking: Mutex::new(()),
            changes: tokio::sync::broadcast::channel(256).0,
            config_path: config_file.map(Path::to_path_buf),
            revocation: crate::trust::revocation::RevocationChecker::new(
                settings.discovery.http,
                settings.crl_policy,
            ),
            settings,
        });
        hub.queue_due_pushes();
        Ok(Daemon {
            hub,
            mx,
            submission,
            imap,
            pop3,
            pull,
            edge_config,
            mx_config,
            submission_config,
            dev_password,
        })
    }

    pub fn mx_addr(&self) -> Option<SocketAddr> {
        self.mx.local_addr().ok()
    }

    /// The Pull (OAuth2 + FHIR) listener's address, when enabled.
    pub fn pull_addr(&self) -> Option<SocketAddr> {
        self.pull.as_ref().and_then(|(l, _, _)| l.local_addr().ok())
    }

    pub fn submission_addr(&self) -> Option<SocketAddr> {
        self.submission.local_addr().ok()
    }

    /// Accepts connections and runs the queue until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let worker = tokio::spawn(crate::queue::Worker::new(self.hub.clone()).run());
        // Trust bundles: fetched now and at each refresh interval; a new
        // version reloads the anchors.
        let mut bundle_tasks = Vec::new();
        for b in self.hub.settings.bundles.clone() {
            let hub = self.hub.clone();
            bundle_tasks.push(tokio::spawn(async move {
                let cache = match crate::trust::bundle::BundleCache::new(&hub.settings.bundle_dir()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(bundle = %b.name, "{e}");
                        return;
                    }
                };
                loop {
                    match hub.settings.bundle_source(&b) {
                        Ok(source) => match cache.refresh(&source, Hub::now()).await {
                            Ok(crate::trust::bundle::RefreshOutcome::Updated { anchors }) => {
                                audit("bundle-updated", &format!("{}: {anchors} anchor(s)", b.name));
                                hub.reload(hub.config_path.as_deref());
                            }
                            Ok(crate::trust::bundle::RefreshOutcome::Unchanged) => {
                                tracing::debug!(bundle = %b.name, "trust bundle unchanged")
                            }
                            Err(e) => tracing::warn!(bundle = %b.name, "refresh failed, keeping the previous anchors: {e}"),
                        },
                        Err(p) => tracing::error!(bundle = %b.name, "{}", p.message),
                    }
                    tokio::time::sleep(b.refresh).await;
                }
            }));
        }
        // Anchor and key directories are watched: a change reloads them.
        let watched = self.hub.clone();
        let watcher = tokio::spawn(async move {
            let bundle_dir = watched.settings.bundle_dir();
            let signature = || {
                let mut sig = crate::anchors::directory_signature(&watched.settings.domains);
                // `hispd bundles refresh` run beside the daemon writes here.
                if let Ok(entries) = std::fs::read_dir(&bundle_dir) {
                    let mut names: Vec<String> = entries
                        .flatten()
                        .filter_map(|e| {
                            let m = e.metadata().ok()?.modified().ok()?;
                            Some(format!("{}|{:?}", e.path().display(), m))
                        })
                        .collect();
                    names.sort();
                    sig.push_str(&names.join("\n"));
                }
                sig
            };
            let mut last = signature();
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let now = signature();
                if now != last {
                    tracing::info!("anchor or key files changed on disk: reloading");
                    watched.reload(watched.config_path.as_deref());
                    last = now;
                }
            }
        });
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
        let mut edge = Vec::new();
        if let Some(l) = self.imap {
            edge.push(tokio::spawn(crate::edge::imap::listen(
                l,
                self.edge_config.clone(),
                self.hub.clone(),
            )));
        }
        if let Some(l) = self.pop3 {
            edge.push(tokio::spawn(crate::edge::pop3::listen(
                l,
                self.edge_config.clone(),
                self.hub.clone(),
            )));
        }
        if let Some((listener, pull, tls)) = self.pull {
            edge.push(crate::pull::start(pull, listener, tls).await);
        }
        tokio::select! {
            _ = mx => {}
            _ = submission => {}
            _ = shutdown => {}
        }
        for e in &edge {
            e.abort();
        }
        tracing::info!("stopping: no new connections; finishing open sessions");
        let max = self.hub.settings.server.max_connections as u32;
        let _ = tokio::time::timeout(Duration::from_secs(30), connections.acquire_many(max)).await;
        worker.abort();
        watcher.abort();
        for t in &bundle_tasks {
            t.abort();
        }
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
        // Replies are whole writes; Nagle would hold them for the client's ACK.
        let _ = stream.set_nodelay(true);
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
        // One id per SMTP session on every line it causes (audit events
        // included); "accepted for delivery" and "delivered" tie it to the
        // job id and the Message-ID.
        let span = tracing::info_span!(
            "smtp",
            session = %new_job_id(),
            peer = %remote
        );
        tokio::spawn(async move {
            smtp::serve_connection(stream, remote, config, hub.clone())
                .instrument(span)
                .await;
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
