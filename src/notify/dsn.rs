//! RFC 3464 delivery status notifications.
//!
//! hispd sends a DSN to a local edge sender when delivery to some recipients
//! failed (or is taking long); it parses DSNs that come back so the tracker
//! can close out recipients, and it recognises reports of any kind so that a
//! report is never answered with another one.
//!
//! What is built is plain RFC 5322 with CRLF line endings and no line longer
//! than 998 octets; the caller seals it like any other outgoing message.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

/// RFC 5322 hard limit on a line, without the CRLF.
const MAX_LINE: usize = 998;
/// Where header and report fields are folded when they can be.
const FOLD_AT: usize = 78;
/// Width of the human-readable explanation.
const TEXT_WIDTH: usize = 76;

/// One recipient the message did not reach (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedRecipient {
    pub address: String,
    /// RFC 3463 status code, e.g. "5.7.1" or "4.4.7".
    pub status: String,
    pub action: Action,
    /// Human reason, e.g. "no usable certificate: ..." or an SMTP reply.
    pub diagnostic: String,
    /// The host that gave the reason, when one did.
    pub remote_mta: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Given up: the message will not be delivered to this recipient.
    Failed,
    /// Still being retried.
    Delayed,
}

impl Action {
    /// The RFC 3464 action-value.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        }
    }
}

pub struct DsnRequest<'a> {
    /// Our host name, as used in Reporting-MTA and the Message-ID.
    pub reporting_mta: &'a str,
    /// The envelope sender of the original message; the DSN goes there.
    pub original_sender: &'a str,
    /// The original message (only its header block is used).
    pub original_message: &'a [u8],
    pub recipients: &'a [FailedRecipient],
    /// When hispd accepted the original message.
    pub arrival_date: Option<DateTime<Utc>>,
}

/// One recipient as a DSN reports it: (final recipient, action, status,
/// diagnostic). See `parse_dsn`.
pub type ReportedRecipient = (String, String, String, Option<String>);

/// The conventional sender of DSNs from `reporting_mta`.
pub fn default_from(reporting_mta: &str) -> String {
    format!("MAILER-DAEMON@{}", ascii_field(reporting_mta))
}

/// Builds a complete RFC 5322 message: a multipart/report
/// (report-type=delivery-status) with a human explanation, the
/// message/delivery-status fields and the original message's headers.
///
/// `from` is the DSN's From address; empty means
/// `MAILER-DAEMON@<reporting_mta>`. CRLF line endings, no line over 998
/// octets; long diagnostics are folded, control characters in any input
/// are turned into spaces so nothing can inject header lines.
pub fn build_dsn(req: &DsnRequest<'_>, from: &str) -> Vec<u8> {
    let reporting_mta = ascii_field(req.reporting_mta);
    let original_headers = header_block(req.original_message);
    let original = MessageParser::default().parse_headers(req.original_message);
    let original_subject = original
        .as_ref()
        .and_then(|m| m.subject())
        .map(clean_text)
        .filter(|s| !s.is_empty());
    let original_id = original
        .as_ref()
        .and_then(|m| m.message_id())
        .map(ascii_field)
        .filter(|s| !s.is_empty());

    let all_delayed =
        !req.recipients.is_empty() && req.recipients.iter().all(|r| r.action == Action::Delayed);

    let explanation = human_explanation(
        req,
        &reporting_mta,
        original_subject.as_deref(),
        original_id.as_deref(),
    );
    let (text_body, text_encoding) = if explanation.is_ascii() {
        (crlf_lines(&explanation), "7bit")
    } else {
        (quoted_printable(&explanation), "quoted-printable")
    };
    let status_body = delivery_status(req, &reporting_mta, original_id.as_deref());
    let headers_encoding = if original_headers.is_ascii() {
        "7bit"
    } else {
        "8bit"
    };

    let boundary = pick_boundary(&[&text_body, status_body.as_bytes(), &original_headers]);

    let mut head = String::new();
    let from = clean_text(from);
    let from = if from.is_empty() {
        default_from(&reporting_mta)
    } else {
        from
    };
    if from.contains('<') {
        push_field(&mut head, "From", &from);
    } else {
        push_field(&mut head, "From", &format!("Mail Delivery System <{from}>"));
    }
    let to = clean_text(req.original_sender);
    if to.is_empty() {
        push_field(&mut head, "To", "undisclosed-recipients:;");
    } else if to.contains('<') {
        push_field(&mut head, "To", &to);
    } else {
        push_field(&mut head, "To", &format!("<{to}>"));
    }
    let what = if all_delayed {
        "Delayed Direct message"
    } else {
        "Undelivered Direct message"
    };
    push_subject(&mut head, what, original_subject.as_deref());
    push_field(&mut head, "Date", &Utc::now().to_rfc2822());
    push_field(
        &mut head,
        "Message-ID",
        &format!("<{}@{}>", unique_token(), reporting_mta),
    );
    push_field(&mut head, "Auto-Submitted", "auto-replied");
    push_field(&mut head, "MIME-Version", "1.0");
    push_field(
        &mut head,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    head.push_str("\r\n");
    head.push_str("This is a MIME-encapsulated delivery status notification.\r\n");

    let mut out = head.into_bytes();
    let part_head = |out: &mut Vec<u8>, fields: &[(&str, &str)]| {
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        let mut h = String::new();
        for (name, value) in fields {
            push_field(&mut h, name, value);
        }
        h.push_str("\r\n");
        out.extend_from_slice(h.as_bytes());
    };

    part_head(
        &mut out,
        &[
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Transfer-Encoding", text_encoding),
            ("Content-Description", "Notification"),
        ],
    );
    out.extend_from_slice(&text_body);

    part_head(
        &mut out,
        &[
            ("Content-Type", "message/delivery-status"),
            ("Content-Description", "Delivery report"),
        ],
    );
    out.extend_from_slice(status_body.as_bytes());

    part_head(
        &mut out,
        &[
            ("Content-Type", "text/rfc822-headers"),
            ("Content-Transfer-Encoding", headers_encoding),
            ("Content-Description", "Undelivered message headers"),
        ],
    );
    out.extend_from_slice(&original_headers);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Parses a DSN: per recipient (final recipient, action, status,
/// diagnostic) from the message/delivery-status part.
///
/// The recipient is the address without its "rfc822;" type, the action is
/// lower-cased, the status is the bare code, and the diagnostic is the text
/// after its "smtp;" (or other) type, unfolded. `None` if the message is not
/// a multipart/report with a delivery-status part; a Direct "wrapped"
/// message (message/rfc822 at the top) is looked into once.
pub fn parse_dsn(message: &[u8]) -> Option<Vec<ReportedRecipient>> {
    let parsed = MessageParser::default().parse(message)?;
    let report = unwrap_report(&parsed)?;
    let body = report.parts.iter().find_map(|part| {
        let ct = part.content_type()?;
        let is_status = ct.ctype().eq_ignore_ascii_case("message")
            && ct.subtype().is_some_and(|s| {
                s.eq_ignore_ascii_case("delivery-status")
                    || s.eq_ignore_ascii_case("global-delivery-status")
            });
        is_status.then(|| part.contents())
    })?;
    Some(parse_delivery_status(body))
}

/// Whether a message is itself a DSN or MDN (never answer those with a
/// DSN/MDN): multipart/report with report-type delivery-status or
/// disposition-notification (or their RFC 6533 "global-" forms). A null
/// envelope sender is the caller's business.
pub fn is_report(message: &[u8]) -> bool {
    let Some(parsed) = MessageParser::default().parse(message) else {
        return false;
    };
    unwrap_report(&parsed).is_some_and(is_notification_report)
}

/// `message`'s own header (no parsing of the body) says it is a DSN or an
/// MDN: multipart/report with a delivery-status or disposition-notification
/// report type. For messages parsed with `parse_headers`.
pub fn is_notification_report(message: &Message<'_>) -> bool {
    is_multipart_report(message)
        && message
            .content_type()
            .and_then(|ct| ct.attribute("report-type"))
            .is_some_and(|kind| {
                let kind = kind.trim();
                [
                    "delivery-status",
                    "global-delivery-status",
                    "disposition-notification",
                    "global-disposition-notification",
                ]
                .iter()
                .any(|k| kind.eq_ignore_ascii_case(k))
            })
}

/// The multipart/report message itself, or the one inside a top-level
/// message/rfc822 wrapper.
fn unwrap_report<'a, 'x>(message: &'a Message<'x>) -> Option<&'a Message<'x>> {
    if is_multipart_report(message) {
        return Some(message);
    }
    let ct = message.content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("message")
        || !ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("rfc822"))
    {
        return None;
    }
    match &message.parts.first()?.body {
        PartType::Message(inner) if is_multipart_report(inner) => Some(inner),
        _ => None,
    }
}

fn is_multipart_report(message: &Message<'_>) -> bool {
    message.content_type().is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case("multipart")
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    })
}

#[derive(Default)]
struct RecipientFields {
    original: Option<String>,
    final_recipient: Option<String>,
    action: Option<String>,
    status: Option<String>,
    diagnostic: Option<String>,
}

impl RecipientFields {
    fn is_recipient(&self) -> bool {
        self.final_recipient.is_some() || self.original.is_some()
    }

    fn into_tuple(self) -> ReportedRecipient {
        (
            self.final_recipient.or(self.original).unwrap_or_default(),
            self.action.unwrap_or_default(),
            self.status.unwrap_or_default(),
            self.diagnostic,
        )
    }
}

/// Reads the fields of a message/delivery-status body: the per-message
/// group, then one group per recipient. Lenient about line endings and
/// about senders that forget the blank line between recipients.
fn parse_delivery_status(body: &[u8]) -> Vec<ReportedRecipient> {
    let text = String::from_utf8_lossy(body);
    let mut groups: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for raw in text.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            if groups.last().is_some_and(|g| !g.is_empty()) {
                groups.push(Vec::new());
            }
            continue;
        }
        let Some(group) = groups.last_mut() else {
            continue;
        };
        if line.starts_with([' ', '\t']) {
            // RFC 5322 unfolding: drop the line break, keep the white space.
            if let Some((_, value)) = group.last_mut() {
                value.push_str(line);
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            group.push((name.trim().to_ascii_lowercase(), value.to_string()));
        }
    }

    let mut recipients = Vec::new();
    for group in groups {
        let mut current = RecipientFields::default();
        for (name, value) in group {
            let value = value.trim();
            match name.as_str() {
                "original-recipient" => {
                    if current.is_recipient() {
                        recipients.push(std::mem::take(&mut current).into_tuple());
                    }
                    current.original = Some(typed_value(value));
                }
                "final-recipient" => {
                    if current.final_recipient.is_some() {
                        recipients.push(std::mem::take(&mut current).into_tuple());
                    }
                    current.final_recipient = Some(typed_value(value));
                }
                "action" => current.action = Some(first_token(value).to_ascii_lowercase()),
                "status" => current.status = Some(first_token(value).to_string()),
                "diagnostic-code" => current.diagnostic = Some(typed_value(value)),
                _ => {}
            }
        }
        if current.is_recipient() {
            recipients.push(current.into_tuple());
        }
    }
    recipients
}

/// "rfc822; a@b" → "a@b"; a value without a type is taken whole.
fn typed_value(value: &str) -> String {
    let rest = value.split_once(';').map_or(value, |(_, rest)| rest).trim();
    rest.strip_prefix('<')
        .and_then(|r| r.strip_suffix('>'))
        .unwrap_or(rest)
        .to_string()
}

fn first_token(value: &str) -> &str {
    value
        .split(|c: char| c.is_whitespace() || c == '(')
        .next()
        .unwrap_or("")
}

fn human_explanation(
    req: &DsnRequest<'_>,
    reporting_mta: &str,
    subject: Option<&str>,
    message_id: Option<&str>,
) -> String {
    let mut text = String::new();
    push_wrapped(
        &mut text,
        &format!("This is the Direct mail system at {reporting_mta}."),
        "",
    );
    text.push('\n');

    let failed: Vec<_> = req
        .recipients
        .iter()
        .filter(|r| r.action == Action::Failed)
        .collect();
    let delayed: Vec<_> = req
        .recipients
        .iter()
        .filter(|r| r.action == Action::Delayed)
        .collect();

    let mut about = String::from("Your message");
    if let Some(subject) = subject {
        about.push_str(&format!(" \"{subject}\""));
    }
    if let Some(id) = message_id {
        about.push_str(&format!(" (Message-ID <{id}>)"));
    }
    if let Some(arrival) = req.arrival_date {
        about.push_str(&format!(
            ", received {}",
            arrival.format("%Y-%m-%d %H:%M:%S UTC")
        ));
    }

    if !failed.is_empty() {
        push_wrapped(
            &mut text,
            &format!(
                "{about} could not be delivered to {}. \
                 The mail system has given up on {}.",
                recipients_phrase(failed.len()),
                if failed.len() == 1 { "it" } else { "them" },
            ),
            "",
        );
        text.push('\n');
        for r in &failed {
            push_recipient(&mut text, r);
        }
    }
    if !delayed.is_empty() {
        let lead = if failed.is_empty() {
            about
        } else {
            "The same message".to_string()
        };
        push_wrapped(
            &mut text,
            &format!(
                "{lead} has not yet been delivered to {}. \
                 The mail system will keep trying; you do not need to resend it yet.",
                recipients_phrase(delayed.len()),
            ),
            "",
        );
        text.push('\n');
        for r in &delayed {
            push_recipient(&mut text, r);
        }
    }
    push_wrapped(
        &mut text,
        "The machine-readable delivery report and the headers of your message \
         are attached.",
        "",
    );
    text
}

fn recipients_phrase(n: usize) -> String {
    if n == 1 {
        "this recipient".to_string()
    } else {
        format!("these {n} recipients")
    }
}

fn push_recipient(text: &mut String, r: &FailedRecipient) {
    push_wrapped(text, &format!("<{}>", clean_text(&r.address)), "  ");
    let status = valid_status(&r.status, r.action);
    push_wrapped(text, &format!("Status: {status}"), "    ");
    if let Some(mta) = r.remote_mta.as_deref().map(clean_text) {
        if !mta.is_empty() {
            push_wrapped(text, &format!("Remote server: {mta}"), "    ");
        }
    }
    let reason = clean_text(&r.diagnostic);
    if !reason.is_empty() {
        push_wrapped(text, &format!("Reason: {reason}"), "    ");
    }
    text.push('\n');
}

/// Appends `paragraph` word-wrapped at TEXT_WIDTH, each line prefixed with
/// `indent`; a word too long for a line is broken.
fn push_wrapped(text: &mut String, paragraph: &str, indent: &str) {
    let width = TEXT_WIDTH.saturating_sub(indent.chars().count()).max(20);
    let mut line = String::new();
    let mut line_chars = 0usize;
    let flush = |text: &mut String, line: &mut String| {
        text.push_str(indent);
        text.push_str(line);
        text.push('\n');
        line.clear();
    };
    for word in paragraph.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let sep = usize::from(line_chars > 0);
            if line_chars + sep + word.len() <= width {
                if sep == 1 {
                    line.push(' ');
                }
                line.extend(word.iter());
                line_chars += sep + word.len();
                break;
            }
            if line_chars > 0 {
                flush(text, &mut line);
                line_chars = 0;
                continue;
            }
            let rest = word.split_off(width);
            line.extend(word.iter());
            flush(text, &mut line);
            word = rest;
        }
    }
    if line_chars > 0 {
        flush(text, &mut line);
    }
}

fn delivery_status(req: &DsnRequest<'_>, reporting_mta: &str, original_id: Option<&str>) -> String {
    let mut out = String::new();
    push_field(&mut out, "Reporting-MTA", &format!("dns; {reporting_mta}"));
    if let Some(id) = original_id {
        push_field(&mut out, "X-Original-Message-ID", &format!("<{id}>"));
    }
    if let Some(arrival) = req.arrival_date {
        push_field(&mut out, "Arrival-Date", &arrival.to_rfc2822());
    }
    for r in req.recipients {
        out.push_str("\r\n");
        let address = ascii_field(&r.address);
        let address = address
            .strip_prefix('<')
            .and_then(|a| a.strip_suffix('>'))
            .unwrap_or(&address);
        push_field(&mut out, "Final-Recipient", &format!("rfc822; {address}"));
        push_field(&mut out, "Action", r.action.as_str());
        push_field(&mut out, "Status", valid_status(&r.status, r.action));
        if let Some(mta) = r.remote_mta.as_deref().map(ascii_field) {
            if !mta.is_empty() {
                push_field(&mut out, "Remote-MTA", &format!("dns; {mta}"));
            }
        }
        let diagnostic = ascii_field(&r.diagnostic);
        if !diagnostic.is_empty() {
            let kind = if looks_like_smtp_reply(&diagnostic) {
                "smtp"
            } else {
                "x-hispd"
            };
            push_field(
                &mut out,
                "Diagnostic-Code",
                &format!("{kind}; {diagnostic}"),
            );
        }
    }
    out
}

/// The caller's status if it is a well-formed RFC 3463 code, else the
/// generic code for the action.
fn valid_status(status: &str, action: Action) -> &str {
    let status = status.trim();
    let mut parts = status.split('.');
    let well_formed = matches!(parts.next(), Some("2" | "4" | "5"))
        && parts
            .by_ref()
            .take(2)
            .filter(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            .count()
            == 2
        && parts.next().is_none();
    if well_formed {
        status
    } else {
        match action {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
        }
    }
}

fn looks_like_smtp_reply(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 3
        && matches!(b[0], b'2' | b'4' | b'5')
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && b.get(3).is_none_or(|c| *c == b' ' || *c == b'-')
}

/// Single-line text: control characters become spaces, runs of white space
/// collapse, ends trimmed. Nothing that passes here can start a new line.
fn clean_text(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Like `clean_text`, and non-ASCII characters become '?': report fields
/// are US-ASCII (RFC 3464).
fn ascii_field(text: &str) -> String {
    clean_text(text)
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// Appends "Name: value" CRLF, folded before a space so lines stay within
/// FOLD_AT where the words allow and always within MAX_LINE; a word longer
/// than that is broken (unfolding then shows an extra space in it).
/// `value` must already be a single line (see `clean_text`).
fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut line_len = name.len() + 1;
    let mut line_has_word = false;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        if line_has_word && line_len + 1 + word.len() > FOLD_AT {
            out.push_str("\r\n");
            line_len = 0;
        }
        out.push(' ');
        line_len += 1;
        let mut rest = word;
        while line_len + rest.len() > MAX_LINE {
            let mut cut = MAX_LINE.saturating_sub(line_len);
            while cut > 0 && !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 {
                break;
            }
            out.push_str(&rest[..cut]);
            out.push_str("\r\n ");
            line_len = 1;
            rest = &rest[cut..];
        }
        out.push_str(rest);
        line_len += rest.len();
        line_has_word = true;
    }
    out.push_str("\r\n");
}

/// Subject: `what`, then ": " and the original subject; a non-ASCII
/// original subject goes as RFC 2047 encoded words.
fn push_subject(out: &mut String, what: &str, original: Option<&str>) {
    let Some(original) = original else {
        push_field(out, "Subject", what);
        return;
    };
    if original.is_ascii() {
        push_field(out, "Subject", &format!("{what}: {original}"));
        return;
    }
    use base64::Engine as _;
    // 45 bytes of UTF-8 → 60 base64 characters → a 72-character word.
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in original.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    let encoded: Vec<String> = words
        .iter()
        .map(|w| {
            format!(
                "=?utf-8?B?{}?=",
                base64::engine::general_purpose::STANDARD.encode(w.as_bytes())
            )
        })
        .collect();
    push_field(out, "Subject", &format!("{what}: {}", encoded.join(" ")));
}

/// The original message's header block with CRLF line endings, every line
/// within MAX_LINE (longer ones are folded), ending with CRLF.
fn header_block(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for raw in message.split(|b| *b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let line: Vec<u8> = line
            .iter()
            .map(|b| if *b == b'\r' || *b == 0 { b' ' } else { *b })
            .collect();
        let mut rest = line.as_slice();
        let mut limit = MAX_LINE;
        while rest.len() > limit {
            let mut cut = limit;
            // Do not split a UTF-8 sequence.
            while cut > 1 && (rest[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            out.extend_from_slice(&rest[..cut]);
            out.extend_from_slice(b"\r\n ");
            rest = &rest[cut..];
            limit = MAX_LINE - 1;
        }
        out.extend_from_slice(rest);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// LF or CRLF text → CRLF bytes.
fn crlf_lines(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 40);
    for line in text.lines() {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// RFC 2045 quoted-printable with CRLF line breaks and soft breaks so no
/// encoded line exceeds 76 characters.
fn quoted_printable(text: &str) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(text.len() * 3 / 2);
    for line in text.lines() {
        let bytes = line.as_bytes();
        let mut col = 0usize;
        for (i, &b) in bytes.iter().enumerate() {
            let last = i + 1 == bytes.len();
            let literal =
                ((b == b' ' || b == b'\t') && !last) || ((33..=126).contains(&b) && b != b'=');
            let width = if literal { 1 } else { 3 };
            // Leave room for the "=" of a soft break unless this ends the line.
            let room = if last { 76 } else { 75 };
            if col + width > room {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            if literal {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            col += width;
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn pick_boundary(parts: &[&[u8]]) -> String {
    loop {
        let candidate = format!("=_hispd-dsn-{}", unique_token());
        let needle = candidate.as_bytes();
        let clash = parts
            .iter()
            .any(|p| p.windows(needle.len()).any(|w| w == needle));
        if !clash {
            return candidate;
        }
    }
}

/// 32 hex digits from the system random generator; should that fail, the
/// clock, the process id and a counter, which are still unique.
fn unique_token() -> String {
    let mut bytes = [0u8; 16];
    if openssl::rand::rand_bytes(&mut bytes).is_ok() {
        return hex::encode(bytes);
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    format!(
        "{:016x}{:08x}{:08x}",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    const ORIGINAL: &[u8] = b"From: Dr Alice <alice@direct.clinic.example>\r\n\
To: bob@direct.hospital.example, carol@direct.lab.example\r\n\
Subject: Referral for patient 1234\r\n\
Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n\
Message-ID: <orig-1@clinic.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain\r\n\
\r\n\
Body text that must not appear in the DSN.\r\n";

    fn two_failed() -> Vec<FailedRecipient> {
        vec![
            FailedRecipient {
                address: "bob@direct.hospital.example".into(),
                status: "5.7.1".into(),
                action: Action::Failed,
                diagnostic: "no usable certificate: DNS CERT and LDAP found none for \
                             bob@direct.hospital.example"
                    .into(),
                remote_mta: None,
            },
            FailedRecipient {
                address: "carol@direct.lab.example".into(),
                status: "5.1.1".into(),
                action: Action::Failed,
                diagnostic: "550 5.1.1 mailbox unavailable".into(),
                remote_mta: Some("mx.lab.example".into()),
            },
        ]
    }

    fn request<'a>(recipients: &'a [FailedRecipient], original: &'a [u8]) -> DsnRequest<'a> {
        DsnRequest {
            reporting_mta: "hisp.clinic.example",
            original_sender: "alice@direct.clinic.example",
            original_message: original,
            recipients,
            arrival_date: chrono::DateTime::parse_from_rfc3339("2025-06-02T10:00:05Z")
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    fn assert_wire_format(dsn: &[u8]) {
        let body = dsn.strip_suffix(b"\n").expect("message ends with CRLF");
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            let line = line
                .strip_suffix(b"\r")
                .unwrap_or_else(|| panic!("bare LF at line {i}"));
            assert!(!line.contains(&b'\r'), "bare CR at line {i}");
            assert!(line.len() <= MAX_LINE, "line {i} is {} octets", line.len());
        }
    }

    #[test]
    fn builds_and_parses_back() {
        let recipients = two_failed();
        let dsn = build_dsn(&request(&recipients, ORIGINAL), "");
        assert_wire_format(&dsn);

        let parsed = parse_dsn(&dsn).expect("our DSN parses");
        assert_eq!(
            parsed,
            vec![
                (
                    "bob@direct.hospital.example".to_string(),
                    "failed".to_string(),
                    "5.7.1".to_string(),
                    Some(
                        "no usable certificate: DNS CERT and LDAP found none for \
                         bob@direct.hospital.example"
                            .to_string()
                    ),
                ),
                (
                    "carol@direct.lab.example".to_string(),
                    "failed".to_string(),
                    "5.1.1".to_string(),
                    Some("550 5.1.1 mailbox unavailable".to_string()),
                ),
            ]
        );
        assert!(is_report(&dsn));
    }

    #[test]
    fn structure_seen_by_mail_parser() {
        let recipients = two_failed();
        let dsn = build_dsn(
            &request(&recipients, ORIGINAL),
            "MAILER-DAEMON@hisp.clinic.example",
        );
        let text = String::from_utf8(dsn.clone()).unwrap();
        let message = MessageParser::default().parse(&dsn).unwrap();

        let ct = message.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));

        let PartType::Multipart(children) = &message.parts[0].body else {
            panic!("root is not multipart");
        };
        assert_eq!(children.len(), 3);
        let types: Vec<String> = children
            .iter()
            .map(|&id| {
                let ct = message.parts[id as usize].content_type().unwrap();
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
            })
            .collect();
        assert_eq!(
            types,
            [
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );

        assert_eq!(
            message.subject(),
            Some("Undelivered Direct message: Referral for patient 1234")
        );
        let from = message.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some("MAILER-DAEMON@hisp.clinic.example"));
        let to = message.to().unwrap().first().unwrap();
        assert_eq!(to.address(), Some("alice@direct.clinic.example"));
        assert!(message.date().is_some());
        assert!(message
            .message_id()
            .unwrap()
            .ends_with("@hisp.clinic.example"));
        assert_eq!(
            message.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );

        let human = message.parts[children[0] as usize].text_contents().unwrap();
        assert!(human.contains("bob@direct.hospital.example"));
        assert!(human.contains("no usable certificate"));
        assert!(human.contains("carol@direct.lab.example"));
        assert!(human.contains("mailbox unavailable"));
        assert!(human.contains("mx.lab.example"));

        let status = std::str::from_utf8(message.parts[children[1] as usize].contents()).unwrap();
        assert!(status.starts_with("Reporting-MTA: dns; hisp.clinic.example\r\n"));
        assert!(status.contains("X-Original-Message-ID: <orig-1@clinic.example>\r\n"));
        assert!(status.contains("Arrival-Date: Mon, 2 Jun 2025 10:00:05 +0000\r\n"));
        assert!(status.contains("Final-Recipient: rfc822; bob@direct.hospital.example\r\n"));
        assert!(status.contains("Diagnostic-Code: x-hispd; no usable certificate:"));
        assert!(status.contains("Diagnostic-Code: smtp; 550 5.1.1 mailbox unavailable\r\n"));
        assert!(status.contains("Remote-MTA: dns; mx.lab.example\r\n"));
        assert_eq!(status.matches("Remote-MTA").count(), 1);

        let headers = std::str::from_utf8(message.parts[children[2] as usize].contents()).unwrap();
        assert!(headers.contains("Subject: Referral for patient 1234\r\n"));
        assert!(headers.contains("Message-ID: <orig-1@clinic.example>\r\n"));
        assert!(!text.contains("must not appear"));
    }

    #[test]
    fn java_reference_implementation_dsn() {
        let fixture =
            std::fs::read("/work/shared/fixtures/notifications/java-ri-DSNMessage.eml").unwrap();
        assert!(is_report(&fixture));
        let parsed = parse_dsn(&fixture).expect("RI DSN parses");
        assert_eq!(
            parsed,
            vec![(
                "Carol@Ivory.EDU".to_string(),
                "failed".to_string(),
                "5.0.0".to_string(),
                Some("550 error - no such recipient".to_string()),
            )]
        );

        // The same with bare LF line endings.
        let lf: Vec<u8> = fixture.iter().copied().filter(|b| *b != b'\r').collect();
        assert!(is_report(&lf));
        assert_eq!(parse_dsn(&lf), Some(parsed));
    }

    #[test]
    fn java_reference_implementation_mdns_are_reports_but_not_dsns() {
        for name in ["java-ri-MDNMessage.eml", "java-ri-MDNDispatchedMessage.eml"] {
            let fixture =
                std::fs::read(format!("/work/shared/fixtures/notifications/{name}")).unwrap();
            assert!(is_report(&fixture), "{name}");
            assert_eq!(parse_dsn(&fixture), None, "{name}");
        }
    }

    #[test]
    fn long_diagnostics_are_folded() {
        let spaced: String = (0..500)
            .map(|i| format!("w{i:03}"))
            .collect::<Vec<_>>()
            .join(" ");
        let spaced = spaced[..2000].trim_end().to_string();
        let solid = "x".repeat(2000);
        let recipients = vec![
            FailedRecipient {
                address: "a@d.example".into(),
                status: "5.7.1".into(),
                action: Action::Failed,
                diagnostic: spaced.clone(),
                remote_mta: None,
            },
            FailedRecipient {
                address: "b@d.example".into(),
                status: "4.4.7".into(),
                action: Action::Delayed,
                diagnostic: solid.clone(),
                remote_mta: Some("y".repeat(1500)),
            },
        ];
        let long_header = format!(
            "X-Long: {}\r\nSubject: {}\r\n\r\nbody\r\n",
            "z".repeat(2500),
            "s".repeat(1200)
        );
        let dsn = build_dsn(&request(&recipients, long_header.as_bytes()), "");
        assert_wire_format(&dsn);
        assert!(dsn.len() > 2000);

        let parsed = parse_dsn(&dsn).unwrap();
        assert_eq!(parsed.len(), 2);
        // Folding before existing spaces unfolds to the same text.
        assert_eq!(parsed[0].3.as_deref(), Some(spaced.as_str()));
        // A word too long for any line is broken; only spaces were added.
        assert_eq!(parsed[1].1, "delayed");
        assert_eq!(parsed[1].2, "4.4.7");
        assert_eq!(
            parsed[1].3.as_deref().map(|d| d.replace(' ', "")),
            Some(solid)
        );
    }

    #[test]
    fn delayed_only_subject() {
        let recipients = vec![FailedRecipient {
            address: "b@d.example".into(),
            status: "4.4.7".into(),
            action: Action::Delayed,
            diagnostic: "connection timed out".into(),
            remote_mta: None,
        }];
        let dsn = build_dsn(&request(&recipients, ORIGINAL), "");
        let message = MessageParser::default().parse(&dsn).unwrap();
        assert_eq!(
            message.subject(),
            Some("Delayed Direct message: Referral for patient 1234")
        );
        let from = message.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some("MAILER-DAEMON@hisp.clinic.example"));
    }

    #[test]
    fn non_ascii_and_injection_attempts_stay_contained() {
        // A raw UTF-8 subject (SMTPUTF8 style), so the headers part is 8bit.
        let original = "Subject: Überweisung für Patientin Müller — dringend, bitte heute \
noch bearbeiten\r\nFrom: a@d.example\r\n\r\nbody\r\n";
        let recipients = vec![FailedRecipient {
            address: "b@d.example\r\nBcc: victim@evil.example".into(),
            status: "bogus".into(),
            action: Action::Failed,
            diagnostic: "Zertifikat für „Krankenhaus Süd“ abgelaufen\r\n\r\nInjected: yes".into(),
            remote_mta: None,
        }];
        let dsn = build_dsn(&request(&recipients, original.as_bytes()), "");
        assert_wire_format(&dsn);
        let text = String::from_utf8_lossy(&dsn);
        assert!(!text.contains("\r\nBcc:"));
        assert!(!text.contains("\r\nInjected:"));

        let message = MessageParser::default().parse(&dsn).unwrap();
        assert_eq!(
            message.subject(),
            Some(
                "Undelivered Direct message: Überweisung für Patientin Müller — dringend, \
                 bitte heute noch bearbeiten"
            )
        );
        // The human part keeps the UTF-8 reason.
        let human = message.body_text(0).unwrap();
        assert!(human.contains("Krankenhaus Süd"), "{human}");

        let parsed = parse_dsn(&dsn).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].2, "5.0.0", "malformed status replaced");
        assert!(parsed[0].3.as_deref().unwrap().contains("Krankenhaus S?d"));
        // Headers outside the text part are pure ASCII.
        let head_end = text.find("\r\n\r\n").unwrap();
        assert!(text[..head_end].is_ascii());
    }

    #[test]
    fn plain_messages_are_not_reports() {
        assert!(!is_report(ORIGINAL));
        assert_eq!(parse_dsn(ORIGINAL), None);
        assert!(!is_report(b""));
        assert!(!is_report(b"\xff\xfe garbage"));
        let mixed = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\
Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822; a@b\r\n--x--\r\n";
        assert!(!is_report(mixed));
        assert_eq!(parse_dsn(mixed), None);
        let other_report = b"Content-Type: multipart/report; report-type=feedback-report; \
boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n";
        assert!(!is_report(other_report));
    }

    #[test]
    fn wrapped_report_is_recognised() {
        let recipients = two_failed();
        let dsn = build_dsn(&request(&recipients, ORIGINAL), "");
        let mut wrapped = b"Content-Type: message/rfc822\r\n\r\n".to_vec();
        wrapped.extend_from_slice(&dsn);
        assert!(is_report(&wrapped));
        assert_eq!(parse_dsn(&wrapped).map(|r| r.len()), Some(2));
    }

    #[test]
    fn status_validation() {
        assert_eq!(valid_status("5.7.1", Action::Failed), "5.7.1");
        assert_eq!(valid_status(" 4.4.7 ", Action::Delayed), "4.4.7");
        assert_eq!(valid_status("5.7", Action::Failed), "5.0.0");
        assert_eq!(valid_status("5.7.1.2", Action::Failed), "5.0.0");
        assert_eq!(valid_status("9.1.1", Action::Delayed), "4.0.0");
        assert_eq!(valid_status("", Action::Failed), "5.0.0");
    }

    #[test]
    fn quoted_printable_lines_are_short() {
        let text = "é".repeat(200) + "\n" + &"a ".repeat(100);
        let encoded = quoted_printable(&text);
        for line in encoded.split(|b| *b == b'\n') {
            assert!(line.len() <= 77, "{}", line.len());
        }
    }
}
