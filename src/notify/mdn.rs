//! Message disposition notifications (RFC 8098) as the "Implementation Guide
//! for Delivery Notification in Direct" uses them: `processed` once security
//! and trust processing succeeded, `dispatched` (with the
//! X-DIRECT-FINAL-DESTINATION-DELIVERY extension) once the message reached
//! its final destination, `failed` when it could not.

use crate::smime::mime::{to_crlf, Entity};

/// The disposition of an MDN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Disposition {
    Processed,
    Dispatched,
    Failed,
    Displayed,
    Deleted,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Processed => "processed",
            Disposition::Dispatched => "dispatched",
            Disposition::Failed => "failed",
            Disposition::Displayed => "displayed",
            Disposition::Deleted => "deleted",
        }
    }

    fn parse(s: &str) -> Option<Disposition> {
        match s.trim().to_ascii_lowercase().as_str() {
            "processed" => Some(Disposition::Processed),
            "dispatched" => Some(Disposition::Dispatched),
            "failed" | "failure" | "error" => Some(Disposition::Failed),
            "displayed" => Some(Disposition::Displayed),
            "deleted" => Some(Disposition::Deleted),
            _ => None,
        }
    }
}

/// What an MDN says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mdn {
    pub original_message_id: String,
    pub final_recipient: String,
    pub disposition: Disposition,
    pub reporting_ua: Option<String>,
    /// The X-DIRECT-FINAL-DESTINATION-DELIVERY extension field is present.
    pub final_destination_delivery: bool,
}

/// Whether a message asks for timely and reliable delivery notification
/// (`Disposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true`).
pub fn wants_final_delivery(message: &[u8]) -> bool {
    let Ok(entity) = Entity::parse(message) else {
        return false;
    };
    entity
        .headers
        .iter()
        .filter(|h| {
            h.name
                .eq_ignore_ascii_case("Disposition-Notification-Options")
        })
        .any(|h| {
            h.value
                .to_ascii_lowercase()
                .replace(' ', "")
                .contains("x-direct-final-destination-delivery=optional,true")
        })
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The data of one MDN to build.
pub struct MdnRequest<'a> {
    /// The recipient of the original message, who sends the MDN.
    pub from: &'a str,
    /// The original sender.
    pub to: &'a str,
    pub original_message_id: &'a str,
    pub original_subject: Option<&'a str>,
    pub disposition: Disposition,
    /// Our Reporting-UA product name and host.
    pub reporting_ua: &'a str,
    pub final_destination_delivery: bool,
    /// A failure reason (for `failed`).
    pub error: Option<&'a str>,
}

/// A complete RFC 5322 MDN: multipart/report; report-type=disposition-notification.
pub fn build_mdn(req: &MdnRequest<'_>) -> Vec<u8> {
    let mut rand = [0u8; 12];
    let _ = openssl::rand::rand_bytes(&mut rand);
    let boundary = format!("=_hispd_mdn_{}", hex::encode(rand));
    let domain = req
        .from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("localhost");
    let message_id = format!("<mdn-{}@{}>", hex::encode(rand), clean(domain));
    let subject = req.original_subject.map(clean).unwrap_or_default();
    let verb = match req.disposition {
        Disposition::Processed => "Processed",
        Disposition::Dispatched => "Dispatched",
        Disposition::Failed => "Failed",
        Disposition::Displayed => "Displayed",
        Disposition::Deleted => "Deleted",
    };
    let human = match req.disposition {
        Disposition::Processed => {
            "Your message was received and passed security and trust processing.".to_string()
        }
        Disposition::Dispatched => {
            "Your message was delivered to its final destination.".to_string()
        }
        Disposition::Failed => format!(
            "Your message could not be delivered to its final destination: {}",
            clean(req.error.unwrap_or("delivery failed"))
        ),
        _ => format!("Your message was {}.", req.disposition.as_str()),
    };
    let mut fields = format!(
        "Reporting-UA: {}\r\nFinal-Recipient: rfc822; {}\r\nOriginal-Message-ID: {}\r\nDisposition: automatic-action/MDN-sent-automatically; {}\r\n",
        clean(req.reporting_ua),
        clean(req.from),
        clean(req.original_message_id),
        req.disposition.as_str()
    );
    if req.final_destination_delivery {
        fields.push_str("X-DIRECT-FINAL-DESTINATION-DELIVERY: \r\n");
    }
    if let (Disposition::Failed, Some(e)) = (req.disposition, req.error) {
        fields.push_str(&format!("Error: {}\r\n", clean(e)));
    }
    let text = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {verb}: {subject}\r\nDate: {date}\r\nMessage-ID: {message_id}\r\nMIME-Version: 1.0\r\n\
Auto-Submitted: auto-replied\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary=\"{boundary}\"\r\n\r\n\
--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{human}\r\n\
--{boundary}\r\nContent-Type: message/disposition-notification\r\n\r\n{fields}\r\n--{boundary}--\r\n",
        from = clean(req.from),
        to = clean(req.to),
        date = chrono::Utc::now().to_rfc2822(),
    );
    to_crlf(text.as_bytes()).into_owned()
}

/// Parses an MDN (the message itself, or wrapped once in message/rfc822).
pub fn parse_mdn(message: &[u8]) -> Option<Mdn> {
    parse_mdn_in(message, true)
}

/// `parse_mdn`; `may_unwrap` is false inside the wrapper. Looking into one
/// wrapper only bounds the work: each level copies the rest of the message,
/// so following every `message/rfc822` cost memory quadratic in the size and
/// a stack frame per level (a 256 KiB message of nothing but wrappers used
/// 1 GiB and overflowed the stack).
fn parse_mdn_in(message: &[u8], may_unwrap: bool) -> Option<Mdn> {
    let entity = Entity::parse(message).ok()?;
    let ct = entity.content_type();
    if ct.is("message/rfc822") {
        if !may_unwrap {
            return None;
        }
        return parse_mdn_in(&entity.decoded_body().ok()?, false);
    }
    if !ct.is("multipart/report") {
        return None;
    }
    let report_type = ct.param("report-type").unwrap_or("").to_ascii_lowercase();
    if !report_type.ends_with("disposition-notification") {
        return None;
    }
    for part in entity.multipart_parts_lenient().ok()? {
        let Ok(p) = Entity::parse(part) else {
            continue;
        };
        let pct = p.content_type();
        if !(pct.is("message/disposition-notification")
            || pct.is("message/global-disposition-notification"))
        {
            continue;
        }
        let body = p.decoded_body().ok()?;
        // The fields are a header block of their own.
        let mut fields = body.clone();
        fields.extend_from_slice(b"\r\n\r\n");
        let block = Entity::parse(&fields).ok()?;
        let disposition = block.header("Disposition")?;
        let kind = disposition.rsplit(';').next().unwrap_or("");
        let kind = kind.split('/').next().unwrap_or(kind);
        let final_recipient = block.header("Final-Recipient").unwrap_or("");
        let final_recipient = final_recipient
            .split_once(';')
            .map(|(_, a)| a)
            .unwrap_or(final_recipient)
            .trim()
            .to_string();
        return Some(Mdn {
            original_message_id: block
                .header("Original-Message-ID")
                .unwrap_or("")
                .trim()
                .to_string(),
            final_recipient,
            disposition: Disposition::parse(kind)?,
            reporting_ua: block.header("Reporting-UA").map(str::to_string),
            final_destination_delivery: block.headers.iter().any(|h| {
                h.name
                    .eq_ignore_ascii_case("X-DIRECT-FINAL-DESTINATION-DELIVERY")
            }),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/notifications")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn java_ri_mdns_parse() {
        let processed = parse_mdn(&fixture("java-ri-MDNMessage.eml")).expect("processed MDN");
        assert_eq!(processed.disposition, Disposition::Processed);
        assert!(!processed.original_message_id.is_empty());
        assert!(!processed.final_destination_delivery);
        let dispatched =
            parse_mdn(&fixture("java-ri-MDNDispatchedMessage.eml")).expect("dispatched MDN");
        assert_eq!(dispatched.disposition, Disposition::Dispatched);
        assert_eq!(
            dispatched.final_recipient,
            "externUser1@starugh-stateline.com"
        );
        assert_eq!(
            dispatched.original_message_id,
            "<9501051053.aa04167@IETF.CNR I.Reston.VA.US>"
        );
        assert!(dispatched.final_destination_delivery);
        assert!(
            parse_mdn(&fixture("java-ri-DSNMessage.eml")).is_none(),
            "a DSN is not an MDN"
        );
        assert!(crate::notify::dsn::is_report(&fixture(
            "java-ri-MDNMessage.eml"
        )));
    }

    #[test]
    fn built_mdns_round_trip_and_are_reports() {
        for (d, fdd) in [
            (Disposition::Processed, false),
            (Disposition::Dispatched, true),
            (Disposition::Failed, true),
        ] {
            let m = build_mdn(&MdnRequest {
                from: "bob@b.example",
                to: "alice@a.example",
                original_message_id: "<m1@a.example>",
                original_subject: Some("lab\r\nBcc: evil@x"),
                disposition: d,
                reporting_ua: "b.example; hispd",
                final_destination_delivery: fdd,
                error: Some("mailbox full"),
            });
            assert!(crate::notify::dsn::is_report(&m));
            let parsed = parse_mdn(&m).expect("parses");
            assert_eq!(parsed.disposition, d);
            assert_eq!(parsed.final_recipient, "bob@b.example");
            assert_eq!(parsed.original_message_id, "<m1@a.example>");
            assert_eq!(parsed.final_destination_delivery, fdd);
            assert!(
                !String::from_utf8_lossy(&m).contains("\r\nBcc:"),
                "no header injection"
            );
        }
    }

    /// Found by the mdn_dsn fuzz target: every message/rfc822 wrapper was
    /// followed, copying the rest of the message each time, so a message of
    /// nothing but wrappers overflowed the stack (and used memory quadratic
    /// in its size) instead of being "not an MDN".
    #[test]
    fn wrappers_are_looked_into_once_only() {
        let wrapper = b"Content-Type: message/rfc822\r\n\r\n";
        let mdn = build_mdn(&MdnRequest {
            from: "bob@b.example",
            to: "alice@a.example",
            original_message_id: "<m1@a.example>",
            original_subject: None,
            disposition: Disposition::Processed,
            reporting_ua: "b.example; hispd",
            final_destination_delivery: false,
            error: None,
        });
        let wrapped = |n: usize| {
            let mut m = wrapper.repeat(n);
            m.extend_from_slice(&mdn);
            m
        };
        assert!(parse_mdn(&wrapped(0)).is_some());
        assert!(parse_mdn(&wrapped(1)).is_some(), "wrapped once");
        assert!(parse_mdn(&wrapped(2)).is_none(), "wrapped twice");
        // 256 KiB of wrappers, on a thread with a tokio worker's stack.
        let hostile = wrapper.repeat(256 * 1024 / wrapper.len());
        let worker = std::thread::Builder::new().stack_size(2 * 1024 * 1024);
        let parsed = worker
            .spawn(move || parse_mdn(&hostile))
            .expect("thread")
            .join()
            .expect("no stack overflow");
        assert!(parsed.is_none());
    }

    #[test]
    fn timely_and_reliable_requests_are_recognised() {
        assert!(wants_final_delivery(
            b"From: a@x\r\nDisposition-Notification-Options: X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true\r\n\r\nx"
        ));
        assert!(!wants_final_delivery(b"From: a@x\r\n\r\nx"));
    }
}
