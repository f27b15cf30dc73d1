//! MIME parsing of delivery notifications: MDN (`notify::mdn`) and DSN
//! (`notify::dsn`) readers on an arbitrary message, and the byte-exact MIME
//! layer (`smime::mime`) they share with the agent.
#![no_main]

use hispd::notify::{dsn, mdn};
use hispd::smime::mime::Entity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    if let Some(m) = mdn::parse_mdn(data) {
        let _ = m.disposition.as_str();
    }
    let _ = mdn::wants_final_delivery(data);
    if let Some(recipients) = dsn::parse_dsn(data) {
        for r in &recipients {
            let _ = format!("{r:?}");
        }
    }
    let _ = dsn::is_report(data);
    if let Some(headers) = mail_parser::MessageParser::default().parse_headers(data) {
        let _ = dsn::is_notification_report(&headers);
    }
    if let Ok(entity) = Entity::parse(data) {
        let ct = entity.content_type();
        let _ = ct.param("boundary");
        let _ = entity.decoded_body();
        for parts in [entity.multipart_parts(), entity.multipart_parts_lenient()]
            .into_iter()
            .flatten()
        {
            for part in parts {
                if let Ok(p) = Entity::parse(part) {
                    let _ = p.decoded_body();
                }
            }
        }
    }
});
