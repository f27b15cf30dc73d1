//! SMTP: inbound sessions (MX and submission) and the outbound client.

pub mod client;
pub mod server;
