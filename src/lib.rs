//! hispd: a Direct-protocol HISP. See DESIGN.md for the architecture.

pub mod address;
pub mod agent;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod http;
pub mod pki;
pub mod smime;
pub mod trust;
