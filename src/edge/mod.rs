//! Edge access: IMAP and POP3 for clinicians' mail clients and EHR
//! integrations, on the built-in mailboxes.
//!
//! Mailbox names in the store: an account's INBOX is the account name (its
//! Direct address, lower case); its other folders are `account/Name`.

use crate::store::Storage;
use std::sync::Arc;
use std::time::Duration;

/// What the IMAP and POP3 servers need from the daemon.
pub trait EdgeBackend: Send + Sync + 'static {
    /// The account name when the credentials are right.
    fn authenticate(&self, user: &str, password: &str) -> Option<String>;
    fn storage(&self) -> &dyn Storage;
    /// A client has read a whole message: it reached its final destination
    /// (the daemon sends a dispatched MDN when the sender asked for one).
    fn fetched(&self, mailbox: &str, uid: u64);
    /// Names of mailboxes that received messages, as they arrive (IDLE).
    fn changes(&self) -> tokio::sync::broadcast::Receiver<String>;
}

/// Listener settings shared by IMAP and POP3.
#[derive(Clone)]
pub struct EdgeConfig {
    pub hostname: String,
    pub tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    /// Idle timeout of a session (RFC 3501: at least 30 minutes for IMAP).
    pub timeout: Duration,
}

/// The store name of an account's folder (`INBOX` is the account itself).
pub fn mailbox_name(account: &str, folder: &str) -> String {
    if folder.eq_ignore_ascii_case("INBOX") {
        account.to_ascii_lowercase()
    } else {
        format!("{}/{}", account.to_ascii_lowercase(), folder)
    }
}
pub mod imap;
pub mod pop3;
