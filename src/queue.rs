//! The delivery queue: outgoing jobs (discover, seal per destination domain,
//! deliver by MX), edge-relay jobs, typed per-recipient outcomes, retries
//! with backoff, the maximum age, and DSNs for what failed.

use crate::address::DirectAddress;
use crate::agent::SealRequest;
use crate::discovery::TrustContext;
use crate::notify::dsn::{self, Action, DsnRequest, FailedRecipient};
use crate::notify::{
    mdn::{self, Disposition},
    track,
};
use crate::server::MdnToSend;
use crate::server::{audit, domain_of, message_id_of, Hub};
use crate::smtp::client::{self, ClientConfig, Outcome, TlsPolicy};
use crate::smtp::server::Reply;
use crate::store::{Job, JobKind, RecipientState, RecipientStatus, Storage};
use hickory_resolver::proto::rr::{RData, RecordType};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::Instrument;

/// The queue worker: outgoing and edge-relay jobs, retries, DSNs.
pub struct Worker {
    hub: Arc<Hub>,
}

impl Worker {
    pub fn new(hub: Arc<Hub>) -> Worker {
        Worker { hub }
    }
}

/// When a job's earliest pending recipient is due (Unix seconds); None when
/// nothing is pending (the job only needs finishing).
fn due(job: &Job) -> Option<i64> {
    job.recipients
        .iter()
        .filter(|r| r.status == RecipientStatus::Pending)
        .map(|r| r.next_attempt)
        .min()
}

impl Worker {
    fn backoff(&self, attempts: u32) -> i64 {
        let base = self.hub.settings.delivery.retry_base.as_secs() as i64;
        let shift = attempts.saturating_sub(1).min(16);
        (base.saturating_mul(1i64 << shift)).min(3600)
    }

    fn read_jobs(&self) -> Vec<Job> {
        self.hub.store.jobs().unwrap_or_else(|e| {
            tracing::error!("reading the queue: {e}");
            Vec::new()
        })
    }

    /// Delivers due jobs, up to `delivery.concurrency` at a time. Jobs just
    /// queued arrive on the hub's channel (no queue scan per message); the
    /// whole queue is scanned for retries when the earliest one is due, at
    /// most every 200 ms and at least once a minute.
    pub async fn run(self) {
        let limit = self.hub.settings.delivery.concurrency.max(1);
        let budget = self.hub.memory.limit();
        // Bytes of the messages being delivered.
        let mut bytes_in_flight = 0u64;
        let mut fresh = self
            .hub
            .fresh_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut task_jobs: HashMap<tokio::task::Id, (String, u64)> = HashMap::new();
        let mut ready: VecDeque<Job> = VecDeque::new();
        let mut ready_ids: HashSet<String> = HashSet::new();
        let mut next_scan = tokio::time::Instant::now();
        let mut last_timeout_check = 0i64;
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_scan {
                let t = Hub::now();
                let jobs = self.read_jobs();
                for job in &jobs {
                    if in_flight.contains(&job.id) || ready_ids.contains(&job.id) {
                        continue;
                    }
                    if due(job).is_none_or(|d| d <= t) {
                        ready_ids.insert(job.id.clone());
                        ready.push_back(job.clone());
                    }
                }
                let wait = jobs
                    .iter()
                    .filter(|j| !in_flight.contains(&j.id))
                    .filter_map(due)
                    .filter(|d| *d > t)
                    .min()
                    .map(|d| Duration::from_secs((d - t).clamp(0, 60) as u64))
                    .unwrap_or(Duration::from_secs(60));
                next_scan = now + wait.max(Duration::from_millis(200));
            }
            while tasks.len() < limit {
                let Some(job) = ready.pop_front() else { break };
                // A missing spool file is the job's own failure to report.
                let size = self.hub.store.spool_len(&job.spool).unwrap_or(0);
                // What sealing and sending it takes, against what the others take.
                let cost = crate::budget::delivery_cost(size);
                if !tasks.is_empty() && self.hub.memory.in_delivery().saturating_add(cost) > budget
                {
                    // Waits, first in line, for deliveries to finish.
                    ready.push_front(job);
                    break;
                }
                ready_ids.remove(&job.id);
                if !in_flight.insert(job.id.clone()) {
                    continue;
                }
                let worker = Worker {
                    hub: self.hub.clone(),
                };
                let id = job.id.clone();
                // Every line about this job, whatever logs it (sealing, the
                // SMTP client, our own MX path, audit events), carries the
                // job id and the Message-ID.
                let span = tracing::info_span!(
                    "job",
                    id = %job.id,
                    message_id = job.message_id.as_deref().unwrap_or("-")
                );
                let handle = tasks.spawn(
                    async move {
                        if due(&job).is_some() {
                            worker.process(job).await;
                        } else {
                            worker.finish(job).await;
                        }
                    }
                    .instrument(span),
                );
                tracing::info!(
                    job = %id,
                    bytes = size,
                    others_in_flight = tasks.len() - 1,
                    others_bytes = bytes_in_flight,
                    "delivery started"
                );
                task_jobs.insert(handle.id(), (id, size));
                bytes_in_flight += size;
                self.hub.memory.delivery_started(cost);
            }
            // Timeouts are in seconds: no need to read every tracking record
            // on each wake-up of a busy queue.
            if Hub::now() != last_timeout_check {
                last_timeout_check = Hub::now();
                self.check_notification_timeouts().await;
            }
            let sleep = tokio::time::sleep_until(
                next_scan.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            );
            tokio::select! {
                done = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let id = match done {
                        Some(Ok((id, ()))) => Some(id),
                        Some(Err(e)) => {
                            tracing::error!("a delivery task failed: {e}");
                            Some(e.id())
                        }
                        None => None,
                    };
                    if let Some((job, size)) = id.and_then(|id| task_jobs.remove(&id)) {
                        in_flight.remove(&job);
                        bytes_in_flight -= size;
                        self.hub.memory.delivery_ended(crate::budget::delivery_cost(size));
                        // A job still pending is rescheduled by the next scan.
                        next_scan = next_scan.min(tokio::time::Instant::now() + Duration::from_millis(200));
                    }
                }
                job = async {
                    match fresh.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match job {
                        Some(job) => {
                            if !in_flight.contains(&job.id) && ready_ids.insert(job.id.clone()) {
                                ready.push_back(job);
                            }
                        }
                        None => fresh = None,
                    }
                }
                _ = sleep => {}
            }
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
            JobKind::Outgoing | JobKind::Notification => self.outgoing(&mut job, &message).await,
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
                // Given up on the edge relay after temporary failures: as
                // final as a refusal, and the sender hears it the same way.
                if job.kind == JobKind::EdgeRelay {
                    self.final_destination_mdn(
                        &job.mail_from,
                        job.message_id.as_deref(),
                        &r.address,
                        Disposition::Failed,
                        r.last_error.clone(),
                        mdn::wants_final_delivery(&message),
                    );
                }
            }
        }
        // A job that is done with nothing to report is removed at once: one
        // index flush instead of two (a crash before the removal delivers it
        // again, as a crash before saving the results would).
        let all_delivered = job
            .recipients
            .iter()
            .all(|r| r.status == RecipientStatus::Delivered);
        if !all_delivered {
            if let Err(e) = self.hub.store.update_job(&job) {
                tracing::error!(job = %job.id, "saving delivery results: {e}");
                return;
            }
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
        let Some(mut sender_domain) = agent.domain(from.domain()).cloned() else {
            for r in job.recipients.iter_mut() {
                r.status = RecipientStatus::Failed;
                r.last_error = Some(format!("{} is no longer a local domain", from.domain()));
                r.status_code = Some("5.7.1".into());
            }
            return;
        };
        // A revoked certificate of ours never signs: the next one in line
        // does (domain-bound after address-bound), and when none is left
        // the job waits, retried with backoff, for the operator to install
        // a new one (SIGHUP); the sender hears only if it outlives max_age.
        let barred = self.hub.own_signers_barred(&sender_domain, &from).await;
        if !barred.is_empty() {
            let why = barred
                .iter()
                .map(|(fp, reason)| format!("{reason} (certificate {fp})"))
                .collect::<Vec<_>>()
                .join("; ");
            audit(
                "signing-certificate-revoked",
                &format!("{}: {why}", job.mail_from),
            );
            sender_domain.credentials.retain(|c| {
                let fp = crate::trust::fingerprint(&c.credential.cert);
                !barred.iter().any(|(b, _)| *b == fp)
            });
            if sender_domain.credentials_for(&from, false).is_empty() {
                tracing::error!(job = %job.id, sender = %job.mail_from, "no signing certificate may sign: {why}");
                let now = Hub::now();
                for r in job.recipients.iter_mut() {
                    if r.status == RecipientStatus::Pending && r.next_attempt <= now {
                        r.attempts += 1;
                        r.last_error = Some(format!(
                            "our signing certificate for {} may not sign: {why}",
                            job.mail_from
                        ));
                        r.status_code = Some("4.7.5".into());
                        r.next_attempt = now + self.backoff(r.attempts);
                    }
                }
                return;
            }
        }
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
            tracing::info!(
                job = %job.id,
                domain = %domain,
                recipients = rcpts.len(),
                signer = %sealed.report.signer.subject,
                cipher = %sealed.report.cipher,
                "sealed"
            );
            if agent.domain(&domain).is_some() {
                // Our own domain: the incoming path, without the network.
                let reply = self
                    .hub
                    .receive_sealed(&job.mail_from, &rcpts, sealed.message)
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
                if let (Outcome::Completed, Some(id)) = (&outcome, &job.message_id) {
                    let _tracking = self.hub.lock_tracking();
                    if let Ok(Some(mut t)) = track::load(self.hub.store.as_ref(), id) {
                        t.note(
                            &address.to_string(),
                            &format!("delivered to the {domain} MX"),
                            Hub::now(),
                        );
                        // Durable with the job's own update or removal.
                        let _ = track::save_deferred(self.hub.store.as_ref(), &t);
                    }
                }
                self.record(&mut job.recipients[*i], &outcome);
            }
        }
    }

    async fn edge_relay(&self, job: &mut Job, message: &[u8]) {
        let timely = mdn::wants_final_delivery(message);
        let first = job
            .recipients
            .first()
            .map(|r| r.address.clone())
            .unwrap_or_default();
        let domain = domain_of(&first);
        let Some(relay) = self
            .hub
            .edge_routes()
            .relay_for(&domain, &first)
            .map(str::to_string)
        else {
            for r in job.recipients.iter_mut() {
                r.status = RecipientStatus::Failed;
                r.last_error = Some(format!("{first} has no edge relay any more"));
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
            // The EHR's server has it (or never will): that is the final
            // destination the sender may have asked to hear about.
            let disposition = match &outcome {
                Outcome::Completed if timely => Some((Disposition::Dispatched, None)),
                Outcome::PermanentFailure(why) => Some((Disposition::Failed, Some(why.clone()))),
                _ => None,
            };
            if let Some((disposition, error)) = disposition {
                self.final_destination_mdn(
                    &job.mail_from,
                    job.message_id.as_deref(),
                    &r.address,
                    disposition,
                    error,
                    timely,
                );
            }
        }
    }

    /// As the receiving HISP: tells the sender that the message to
    /// `recipient` reached the edge relay (dispatched) or never will (failed).
    fn final_destination_mdn(
        &self,
        sender: &str,
        original_message_id: Option<&str>,
        recipient: &str,
        disposition: Disposition,
        error: Option<String>,
        timely: bool,
    ) {
        let Some(original) = original_message_id else {
            return;
        };
        self.hub.send_mdn(&MdnToSend {
            from: recipient.to_string(),
            to: sender.to_string(),
            original_message_id: original.to_string(),
            subject: None,
            disposition,
            final_destination_delivery: timely,
            error,
        });
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
            reuse_connections: true,
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
    /// As the sending HISP: recipients whose MDN did not come in time fail,
    /// and their senders get a DSN.
    async fn check_notification_timeouts(&self) {
        let timeout = self.hub.mdn_timeout();
        let now = Hub::now();
        let store = self.hub.store.as_ref();
        if let Err(e) = self.hub.deadlines.load_once(store, timeout) {
            tracing::error!("reading the tracking records: {e}");
            return;
        }
        for id in self.hub.deadlines.take_due(now) {
            let _tracking = self.hub.lock_tracking();
            let mut t = match track::load(store, &id) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("tracking record {id}: {e}");
                    continue;
                }
            };
            let waiting = t.clone();
            // Only recipients the sender has not heard of: one whose
            // delivery failed here was reported (and marked failed) then.
            let failed: Vec<FailedRecipient> = t
                .overdue(now, timeout)
                .into_iter()
                .filter(|(addr, why)| t.fail(addr, why, now) == track::Applied::Recorded)
                .map(|(address, why)| FailedRecipient {
                    address,
                    status: "4.4.7".into(),
                    action: Action::Failed,
                    diagnostic: why,
                    remote_mta: None,
                })
                .collect();
            if failed.is_empty() {
                continue;
            }
            audit(
                "notification-timeout",
                &format!("{}: {} recipient(s)", t.message_id, failed.len()),
            );
            let headers = format!(
                "From: {}\r\nMessage-ID: {}\r\nSubject: {}\r\n\r\n",
                t.sender,
                t.message_id,
                t.subject.clone().unwrap_or_default()
            );
            // The DSN first, then the record that says it went: a crash in
            // between reports the timeout again rather than never.
            if !self.deliver_dsn(&t.sender, headers.as_bytes(), &failed, t.created) {
                // Due again: tried at the next check.
                self.hub.deadlines.add(&waiting, timeout);
                continue;
            }
            if let Err(e) = track::save(store, &t) {
                tracing::error!("tracking record {id}: {e}");
            }
        }
    }

    /// A DSN into a local sender's mailbox.
    fn deliver_dsn(
        &self,
        sender: &str,
        original: &[u8],
        failed: &[FailedRecipient],
        created: i64,
    ) -> bool {
        let hostname = self.hub.settings.server.hostname.clone();
        let dsn_message = dsn::build_dsn(
            &DsnRequest {
                reporting_mta: &hostname,
                original_sender: sender,
                original_message: original,
                recipients: failed,
                arrival_date: chrono::DateTime::from_timestamp(created, 0),
            },
            "",
        );
        if self.hub.agent().domain(&domain_of(sender)).is_none() {
            tracing::warn!(sender, "sender is not local: no DSN sent");
            return true;
        }
        let id = message_id_of(&dsn_message);
        match self
            .hub
            .store
            .deliver_local(sender, id.as_deref(), &dsn_message)
        {
            Ok(_) => {
                let _ = self.hub.changes.send(sender.to_ascii_lowercase());
                tracing::info!(to = %sender, failed = failed.len(), "DSN delivered to the sender");
                true
            }
            Err(e) => {
                tracing::error!("storing a DSN: {e}");
                false
            }
        }
    }

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
            let store = self.hub.store.as_ref();
            let _tracking = self.hub.lock_tracking();
            let mut tracking =
                job.message_id
                    .as_deref()
                    .and_then(|id| match track::load(store, id) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(job = %job.id, "tracking record {id}: {e}");
                            None
                        }
                    });
            // Failed here means no MDN will ever come: later ones are
            // suppressed. A recipient the sender has heard of already (the
            // notification timeout ran out while delivery was still being
            // retried) is not reported a second time.
            let now = Hub::now();
            let failed: Vec<FailedRecipient> = failed
                .into_iter()
                .filter(|f| {
                    tracking.as_mut().is_none_or(|t| {
                        t.fail(&f.address, &f.diagnostic, now) != track::Applied::Suppressed
                    })
                })
                .collect();
            if failed.is_empty() {
                tracing::info!(job = %job.id, to = %job.mail_from, "no DSN: the sender has heard of every failed recipient already");
            } else {
                let original = store.read(&job.spool).unwrap_or_default();
                if !self.deliver_dsn(&job.mail_from, &original, &failed, job.created) {
                    return;
                }
            }
            if let Some(t) = &tracking {
                if let Err(e) = track::save(store, t) {
                    tracing::error!(job = %job.id, "saving the tracking record: {e}");
                }
            }
            job.dsn_sent = true;
            if store.update_job(&job).is_err() {
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
