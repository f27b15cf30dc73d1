//! The memory budget shared by the queue and the SMTP listeners
//! (`[delivery] memory_budget_mb`).
//!
//! A message being sealed and sent takes about 2.4 times its size
//! ([`delivery_cost`]); a message being received takes its size. The queue
//! does not start a delivery that would take the deliveries' memory over
//! the budget (unless nothing else is in delivery), and a session receiving
//! a message stops reading from its client, for a while, when what it holds
//! plus what the deliveries take is over the budget: the client waits on
//! TCP's flow control instead of the daemon holding a second large message
//! while the first is sealed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// The memory a delivery of a `size`-byte message takes while it is sealed
/// and sent: the message and its encrypted, base64-encoded form, about 2.4
/// times its size (measured: docs/PERFORMANCE.md).
pub fn delivery_cost(size: u64) -> u64 {
    size.saturating_mul(12) / 5
}

pub struct MemoryBudget {
    limit: u64,
    in_delivery: AtomicU64,
    changed: Notify,
}

/// How often a receiving session consults the budget: every this many bytes,
/// or every quarter of the budget when that is smaller.
const CHECK_EVERY: u64 = 1 << 20;

impl MemoryBudget {
    pub fn new(limit: u64) -> MemoryBudget {
        MemoryBudget {
            limit: limit.max(1),
            in_delivery: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes of the messages in delivery now.
    pub fn in_delivery(&self) -> u64 {
        self.in_delivery.load(Ordering::SeqCst)
    }

    pub fn delivery_started(&self, bytes: u64) {
        self.in_delivery.fetch_add(bytes, Ordering::SeqCst);
    }

    pub fn delivery_ended(&self, bytes: u64) {
        // Never below zero, whatever the caller's arithmetic.
        let _ = self
            .in_delivery
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(bytes))
            });
        self.changed.notify_waiters();
    }

    /// The next size at which a session holding `buffered` bytes checks.
    pub fn next_check(&self, buffered: u64) -> u64 {
        buffered + CHECK_EVERY.min(self.limit / 4).max(64 * 1024)
    }

    /// Waits, at most `max_wait`, until `buffered` more bytes fit beside the
    /// deliveries (or none is running). Returns how long it waited: zero
    /// when it did not.
    pub async fn wait_for_room(&self, buffered: u64, max_wait: Duration) -> Duration {
        let start = tokio::time::Instant::now();
        let deadline = start + max_wait;
        let mut waited = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so an end in between is not missed.
            notified.as_mut().enable();
            let busy = self.in_delivery();
            let fits = busy == 0 || busy.saturating_add(buffered) <= self.limit;
            if fits || (waited && tokio::time::Instant::now() >= deadline) {
                break;
            }
            waited = true;
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        match waited {
            true => start.elapsed(),
            false => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_receiver_waits_for_deliveries_to_end_but_not_forever() {
        let budget = Arc::new(MemoryBudget::new(1000));
        // Nothing in delivery: no wait, however large the message.
        assert_eq!(
            budget.wait_for_room(5000, Duration::from_secs(5)).await,
            Duration::ZERO
        );
        budget.delivery_started(800);
        // Fits beside it.
        assert_eq!(
            budget.wait_for_room(200, Duration::from_secs(5)).await,
            Duration::ZERO
        );
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.wait_for_room(300, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "800 + 300 is over 1000");
        budget.delivery_ended(800);
        let waited = waiter.await.unwrap();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert_eq!(budget.in_delivery(), 0);

        // A delivery that never ends only delays the receiver.
        budget.delivery_started(2000);
        let waited = budget.wait_for_room(10, Duration::from_millis(200)).await;
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        budget.delivery_ended(5000);
        assert_eq!(budget.in_delivery(), 0, "never below zero");
    }

    #[test]
    fn sessions_check_at_least_every_quarter_of_the_budget() {
        assert_eq!(MemoryBudget::new(64 << 20).next_check(0), 1 << 20);
        assert_eq!(
            MemoryBudget::new(1 << 20).next_check(100),
            100 + (256 << 10)
        );
        assert_eq!(MemoryBudget::new(1000).next_check(0), 64 * 1024);
    }
}
