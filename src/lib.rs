//! hispd: a Direct-protocol HISP. See DESIGN.md for the architecture.

pub mod address;
pub mod agent;
pub mod anchors;
pub mod budget;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod documents;
pub mod edge;
pub mod http;
pub mod notify;
pub mod pki;
pub mod pull;
pub mod queue;
pub mod server;
pub mod smime;
pub mod smtp;
pub mod store;
pub mod trust;
pub mod users;
