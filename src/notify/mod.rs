//! Delivery notifications: the DSNs (RFC 3464) hispd sends to an edge sender
//! when some recipients could not be reached, and the parsing of DSNs and
//! MDNs that arrive, so that a notification is never answered with another.

pub mod dsn;
pub mod mdn;
pub mod track;
