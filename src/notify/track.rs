//! Tracking of outgoing messages as the sending HISP: each recipient moves
//! pending → processed → dispatched, or failed (a failure DSN, a failed MDN,
//! or no MDN within the timeout). Kept as store records, one per Message-ID.

use super::mdn::Disposition;
use crate::store::{Storage, StoreError};
use serde::{Deserialize, Serialize};

pub const KIND: &str = "tracking";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Processed,
    Dispatched,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// Unix seconds.
    pub at: i64,
    pub what: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrackedRecipient {
    pub address: String,
    pub state: State,
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Tracking {
    pub message_id: String,
    pub sender: String,
    pub subject: Option<String>,
    /// Unix seconds.
    pub created: i64,
    /// Timely and reliable delivery was requested: a dispatched MDN is due.
    pub timely: bool,
    /// The edge asked for notifications (Disposition-Notification-To): relay MDNs to it.
    pub relay_mdns: bool,
    pub recipients: Vec<TrackedRecipient>,
}

/// What a notification did to the tracking.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// State moved on; relay it to the edge if it asked.
    Recorded,
    /// The recipient had already failed, or got this state already: suppress.
    /// For a failure: the sender has heard of one already.
    Suppressed,
    /// We never sent that message (or forgot it).
    Unknown,
}

impl Tracking {
    pub fn new(message_id: &str, sender: &str, recipients: &[String], created: i64) -> Tracking {
        Tracking {
            message_id: message_id.to_string(),
            sender: sender.to_string(),
            subject: None,
            created,
            timely: false,
            relay_mdns: false,
            recipients: recipients
                .iter()
                .map(|r| TrackedRecipient {
                    address: r.to_ascii_lowercase(),
                    state: State::Pending,
                    events: vec![Event {
                        at: created,
                        what: "accepted for delivery".into(),
                    }],
                })
                .collect(),
        }
    }

    fn recipient(&mut self, address: &str) -> Option<&mut TrackedRecipient> {
        let a = address
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_ascii_lowercase();
        self.recipients.iter_mut().find(|r| r.address == a)
    }

    /// Applies an MDN from `recipient`.
    pub fn apply_mdn(&mut self, recipient: &str, disposition: Disposition, at: i64) -> Applied {
        let Some(r) = self.recipient(recipient) else {
            return Applied::Unknown;
        };
        let next = match disposition {
            Disposition::Processed => State::Processed,
            Disposition::Dispatched | Disposition::Displayed => State::Dispatched,
            Disposition::Failed | Disposition::Deleted => State::Failed,
        };
        let rank = |s: State| match s {
            State::Pending => 0,
            State::Processed => 1,
            State::Dispatched => 2,
            State::Failed => 3,
        };
        if r.state == State::Failed || rank(next) <= rank(r.state) {
            r.events.push(Event {
                at,
                what: format!(
                    "{} MDN suppressed (late or duplicate)",
                    disposition.as_str()
                ),
            });
            return Applied::Suppressed;
        }
        r.state = next;
        r.events.push(Event {
            at,
            what: format!("{} MDN received", disposition.as_str()),
        });
        Applied::Recorded
    }

    /// Records a failure (a DSN, a failed delivery, a timeout):
    /// [`Applied::Recorded`] when it is the recipient's first, so the sender
    /// is to hear of it; [`Applied::Suppressed`] when the recipient had
    /// failed already or was dispatched (noted in the timeline);
    /// [`Applied::Unknown`] when it is not a recipient of this message.
    pub fn fail(&mut self, recipient: &str, why: &str, at: i64) -> Applied {
        let Some(r) = self.recipient(recipient) else {
            return Applied::Unknown;
        };
        if matches!(r.state, State::Failed | State::Dispatched) {
            r.events.push(Event {
                at,
                what: format!("failure suppressed (late or duplicate): {why}"),
            });
            return Applied::Suppressed;
        }
        r.state = State::Failed;
        r.events.push(Event {
            at,
            what: format!("failed: {why}"),
        });
        Applied::Recorded
    }

    /// Applies one recipient of a DSN from the other side (`action` as RFC
    /// 3464 has it): a failure as [`Tracking::fail`]; any other action
    /// (delayed, delivered, relayed, expanded) is news unless the recipient
    /// already failed.
    pub fn apply_dsn(&mut self, recipient: &str, action: &str, why: &str, at: i64) -> Applied {
        let action = action.trim().to_ascii_lowercase();
        if action == "failed" {
            return self.fail(recipient, &format!("DSN {why}"), at);
        }
        let Some(r) = self.recipient(recipient) else {
            return Applied::Unknown;
        };
        if r.state == State::Failed {
            r.events.push(Event {
                at,
                what: format!("{action} DSN suppressed (after a failure): {why}"),
            });
            return Applied::Suppressed;
        }
        r.events.push(Event {
            at,
            what: format!("{action} DSN received: {why}"),
        });
        Applied::Recorded
    }

    pub fn note(&mut self, recipient: &str, what: &str, at: i64) {
        if let Some(r) = self.recipient(recipient) {
            r.events.push(Event {
                at,
                what: what.to_string(),
            });
        }
    }

    /// Recipients whose wait has run out at `now`, with the reason.
    pub fn overdue(&self, now: i64, timeout: i64) -> Vec<(String, String)> {
        if now - self.created <= timeout {
            return Vec::new();
        }
        self.recipients
            .iter()
            .filter_map(|r| match r.state {
                State::Pending => Some((r.address.clone(), format!("no processed MDN within {timeout} s"))),
                State::Processed if self.timely => {
                    Some((r.address.clone(), format!("no dispatched MDN within {timeout} s (timely and reliable delivery was requested)")))
                }
                _ => None,
            })
            .collect()
    }

    pub fn is_settled(&self) -> bool {
        self.recipients.iter().all(|r| match r.state {
            State::Failed | State::Dispatched => true,
            State::Processed => !self.timely,
            State::Pending => false,
        })
    }

    /// The timeline, for `hispd track`.
    pub fn timeline(&self) -> String {
        let when = |t: i64| {
            chrono::DateTime::from_timestamp(t, 0)
                .map(|d| d.to_rfc3339())
                .unwrap_or_default()
        };
        let mut s = format!(
            "{} from {}{}{}\n",
            self.message_id,
            self.sender,
            self.subject
                .as_deref()
                .map(|x| format!(", subject {x:?}"))
                .unwrap_or_default(),
            if self.timely {
                ", timely and reliable delivery requested"
            } else {
                ""
            }
        );
        for r in &self.recipients {
            s.push_str(&format!("  {} — {:?}\n", r.address, r.state));
            for e in &r.events {
                s.push_str(&format!("    {}  {}\n", when(e.at), e.what));
            }
        }
        s
    }
}

pub fn load(store: &dyn Storage, message_id: &str) -> Result<Option<Tracking>, StoreError> {
    match store.get_record(KIND, message_id.trim())? {
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: message_id.to_string(),
                why: e.to_string(),
            }),
        None => Ok(None),
    }
}

pub fn save(store: &dyn Storage, t: &Tracking) -> Result<(), StoreError> {
    let v = serde_json::to_vec(t).map_err(|e| StoreError::Index(e.to_string()))?;
    store.put_record(KIND, t.message_id.trim(), &v)
}

/// [`save`], durable with the store's next flushing write (which the caller
/// makes right after).
pub fn save_deferred(store: &dyn Storage, t: &Tracking) -> Result<(), StoreError> {
    let v = serde_json::to_vec(t).map_err(|e| StoreError::Index(e.to_string()))?;
    store.put_record_deferred(KIND, t.message_id.trim(), &v)
}

pub fn all(store: &dyn Storage) -> Result<Vec<Tracking>, StoreError> {
    store
        .records(KIND)?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: k,
                why: e.to_string(),
            })
        })
        .collect()
}

/// The tracking records still waiting for notifications, by when their
/// wait runs out (created + the MDN timeout), kept in memory: the queue's
/// timeout check reads only the records that are due, instead of every
/// record ever written once a second. Filled from the store once, then as
/// records are created.
#[derive(Default)]
pub struct Deadlines {
    due: std::sync::Mutex<std::collections::BTreeSet<(i64, String)>>,
    loaded: std::sync::atomic::AtomicBool,
}

impl Deadlines {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(i64, String)>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `t` unless nothing more is awaited for it.
    pub fn add(&self, t: &Tracking, timeout: i64) {
        if !t.is_settled() {
            self.set().insert((
                t.created.saturating_add(timeout),
                t.message_id.trim().to_string(),
            ));
        }
    }

    /// Reads every record once (at start-up); later calls do nothing.
    pub fn load_once(&self, store: &dyn Storage, timeout: i64) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.loaded.load(Ordering::SeqCst) {
            return Ok(());
        }
        for t in all(store)? {
            self.add(&t, timeout);
        }
        self.loaded.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The message ids whose wait has run out at `now` (`now - created >
    /// timeout`, as [`Tracking::overdue`] has it), no longer watched.
    pub fn take_due(&self, now: i64) -> Vec<String> {
        let mut set = self.set();
        let later = set.split_off(&(now, String::new()));
        let due = std::mem::replace(&mut *set, later);
        due.into_iter().map(|(_, id)| id).collect()
    }

    pub fn len(&self) -> usize {
        self.set().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_give_each_waiting_message_once_when_its_wait_runs_out() {
        let d = Deadlines::default();
        let mut a = Tracking::new("<a@x>", "s@x", &["r@y".into()], 100);
        let b = Tracking::new("<b@x>", "s@x", &["r@y".into()], 200);
        d.add(&a, 60);
        d.add(&b, 60);
        assert!(d.take_due(160).is_empty(), "160 - 100 is not over 60");
        assert_eq!(d.take_due(161), vec!["<a@x>".to_string()]);
        assert!(d.take_due(161).is_empty(), "given once");
        assert_eq!(d.len(), 1);
        assert_eq!(d.take_due(10_000), vec!["<b@x>".to_string()]);
        // Nothing more is awaited for a settled message.
        a.apply_mdn("r@y", Disposition::Processed, 120);
        d.add(&a, 60);
        assert!(d.is_empty());

        // After a restart, the waiting records come back from the store.
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        save(&store, &a).unwrap();
        save(&store, &b).unwrap();
        let d = Deadlines::default();
        d.load_once(&store, 60).unwrap();
        assert_eq!(d.take_due(10_000), vec!["<b@x>".to_string()]);
        save(&store, &Tracking::new("<c@x>", "s@x", &["r@y".into()], 300)).unwrap();
        d.load_once(&store, 60).unwrap();
        assert!(d.is_empty(), "read once, at start-up");
    }

    #[test]
    fn a_dsn_from_the_other_side_is_news_until_the_recipient_failed() {
        let mut t = Tracking::new("<m@a>", "alice@a", &["bob@b".into()], 100);
        assert_eq!(
            t.apply_dsn("bob@b", "delayed", "4.4.1: still trying", 110),
            Applied::Recorded
        );
        assert_eq!(t.recipients[0].state, State::Pending);
        assert_eq!(
            t.apply_dsn("<Bob@B>", "Failed", "5.1.1: no such user", 120),
            Applied::Recorded
        );
        assert_eq!(t.recipients[0].state, State::Failed);
        assert_eq!(
            t.apply_dsn("bob@b", "failed", "5.1.1: no such user", 130),
            Applied::Suppressed,
            "duplicate"
        );
        assert_eq!(
            t.apply_dsn("carol@b", "failed", "5.1.1: no such user", 130),
            Applied::Unknown
        );
        assert!(t.timeline().contains("failed: DSN 5.1.1: no such user"));
    }

    #[test]
    fn states_advance_and_late_notifications_are_suppressed() {
        let mut t = Tracking::new("<m@a>", "alice@a", &["Bob@B".into(), "carol@b".into()], 100);
        t.timely = true;
        assert_eq!(
            t.apply_mdn("bob@b", Disposition::Processed, 110),
            Applied::Recorded
        );
        assert_eq!(
            t.apply_mdn("bob@b", Disposition::Processed, 111),
            Applied::Suppressed,
            "duplicate"
        );
        assert_eq!(
            t.apply_mdn("bob@b", Disposition::Dispatched, 120),
            Applied::Recorded
        );
        assert_eq!(
            t.apply_mdn("dave@b", Disposition::Processed, 120),
            Applied::Unknown
        );
        assert_eq!(t.overdue(150, 60), vec![], "not yet");
        let overdue = t.overdue(200, 60);
        assert_eq!(overdue.len(), 1);
        assert_eq!(overdue[0].0, "carol@b");
        assert_eq!(
            t.fail("carol@b", "no processed MDN", 200),
            Applied::Recorded
        );
        assert_eq!(
            t.apply_mdn("carol@b", Disposition::Processed, 300),
            Applied::Suppressed,
            "late after failure"
        );
        // The sender hears of a recipient's failure once, whoever reports it.
        assert_eq!(
            t.fail("carol@b", "delivery time expired", 400),
            Applied::Suppressed
        );
        assert_eq!(
            t.apply_dsn("carol@b", "failed", "5.1.1 no such user", 500),
            Applied::Suppressed
        );
        assert_eq!(
            t.apply_dsn("carol@b", "delayed", "4.4.1 still trying", 500),
            Applied::Suppressed
        );
        assert_eq!(
            t.fail("bob@b", "a DSN after the dispatched MDN", 500),
            Applied::Suppressed
        );
        assert_eq!(t.fail("dave@b", "never a recipient", 500), Applied::Unknown);
        assert!(t.is_settled());
        assert!(t
            .timeline()
            .contains("failure suppressed (late or duplicate)"));
    }
}
