//! What FETCH and SEARCH read from a message: raw header fields, body
//! sections, and the ENVELOPE and BODYSTRUCTURE descriptions computed with
//! mail-parser. Raw bytes are never altered; sections are slices of them.

use super::parse::{Section, SectionText};
use mail_parser::{
    Address, HeaderName, HeaderValue, Message, MessageParser, MimeHeaders, PartType,
};

/// Deeper MIME nesting is not described (and not walked).
const MAX_DEPTH: usize = 20;

/// Appends an IMAP string: quoted when safe, a literal otherwise.
pub fn push_string(out: &mut Vec<u8>, s: &[u8]) {
    let quotable = s.len() <= 1000 && s.iter().all(|b| *b >= 0x20 && *b < 0x7f);
    if quotable {
        out.push(b'"');
        for b in s {
            if *b == b'"' || *b == b'\\' {
                out.push(b'\\');
            }
            out.push(*b);
        }
        out.push(b'"');
    } else {
        push_literal(out, s);
    }
}

pub fn push_literal(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
    out.extend_from_slice(s);
}

pub fn push_nstring(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => push_string(out, s),
        None => out.extend_from_slice(b"NIL"),
    }
}

/// Where the header ends (just after the blank line), or the whole length.
pub fn header_end(raw: &[u8]) -> usize {
    if raw.starts_with(b"\r\n") {
        return 2;
    }
    if raw.starts_with(b"\n") {
        return 1;
    }
    let crlf = memchr::memmem::find(raw, b"\r\n\r\n").map(|p| p + 4);
    let lf = memchr::memmem::find(raw, b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => raw.len(),
    }
}

/// The header fields in order: (name, raw lines including the name and
/// the line ending).
pub fn header_fields(header: &[u8]) -> Vec<(String, &[u8])> {
    let mut fields: Vec<(String, &[u8])> = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < header.len() {
        let line_end = memchr::memchr(b'\n', &header[pos..]).map_or(header.len(), |p| pos + p + 1);
        let line = &header[pos..line_end];
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation && pos > start {
            push_field(&mut fields, &header[start..pos]);
            start = pos;
        }
        pos = line_end;
    }
    if pos > start {
        push_field(&mut fields, &header[start..pos]);
    }
    fields
}

fn push_field<'a>(fields: &mut Vec<(String, &'a [u8])>, raw: &'a [u8]) {
    if raw == b"\r\n" || raw == b"\n" {
        return;
    }
    if let Some(colon) = memchr::memchr(b':', raw) {
        let name = String::from_utf8_lossy(&raw[..colon]).trim().to_string();
        fields.push((name, raw));
    }
}

/// The unfolded value of the first header field called `name`.
pub fn header_value(header: &[u8], name: &str) -> Option<String> {
    header_values(header, name).into_iter().next()
}

pub fn header_values(header: &[u8], name: &str) -> Vec<String> {
    header_fields(header)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .filter_map(|(_, raw)| {
            let colon = memchr::memchr(b':', raw)?;
            let v = String::from_utf8_lossy(&raw[colon + 1..]);
            Some(v.replace("\r\n", "").replace('\n', "").trim().to_string())
        })
        .collect()
}

/// The bytes of a section, before any partial range is applied; `None`
/// when the message has no such part.
pub fn section_bytes(raw: &[u8], section: &Section) -> Option<Vec<u8>> {
    resolve(raw, &section.part, &section.text, 0)
}

fn whole_message_section(raw: &[u8], text: &SectionText) -> Option<Vec<u8>> {
    let end = header_end(raw);
    Some(match text {
        SectionText::Full => raw.to_vec(),
        SectionText::Header | SectionText::Mime => raw[..end].to_vec(),
        SectionText::Text => raw[end..].to_vec(),
        SectionText::HeaderFields(names) | SectionText::HeaderFieldsNot(names) => {
            let keep = matches!(text, SectionText::HeaderFields(_));
            let mut out = Vec::new();
            for (name, field) in header_fields(&raw[..end]) {
                let listed = names.iter().any(|n| n.eq_ignore_ascii_case(&name));
                if listed == keep {
                    out.extend_from_slice(field);
                    if !field.ends_with(b"\n") {
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
            out.extend_from_slice(b"\r\n");
            out
        }
    })
}

fn is_message_rfc822(part: &mail_parser::MessagePart<'_>) -> bool {
    part.content_type().is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case("message")
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("rfc822"))
    })
}

fn slice(raw: &[u8], from: u32, to: u32) -> &[u8] {
    let len = raw.len();
    let from = (from as usize).min(len);
    let to = (to as usize).clamp(from, len);
    &raw[from..to]
}

fn resolve(raw: &[u8], path: &[u32], text: &SectionText, depth: usize) -> Option<Vec<u8>> {
    if path.is_empty() {
        return whole_message_section(raw, text);
    }
    if depth > MAX_DEPTH {
        return None;
    }
    let message = MessageParser::default().parse(raw)?;
    let mut id: usize = 0;
    let mut single_part_body = false;
    for (i, n) in path.iter().enumerate() {
        let part = message.parts.get(id)?;
        match &part.body {
            PartType::Multipart(children) => {
                id = *children.get((*n as usize).checked_sub(1)?)? as usize;
            }
            _ if id != 0 && is_message_rfc822(part) => {
                let nested = slice(raw, part.offset_body, part.offset_end);
                return resolve(nested, &path[i..], text, depth + 1);
            }
            _ if id == 0 && *n == 1 && !single_part_body => {
                // A single-part message's body is part 1.
                single_part_body = true;
            }
            _ => return None,
        }
    }
    let part = message.parts.get(id)?;
    let (header, body) = if single_part_body {
        let end = header_end(raw);
        (&raw[..end], &raw[end..])
    } else {
        (
            slice(raw, part.offset_header, part.offset_body),
            slice(raw, part.offset_body, part.offset_end),
        )
    };
    match text {
        SectionText::Full => Some(body.to_vec()),
        SectionText::Mime => Some(header.to_vec()),
        _ if !single_part_body && is_message_rfc822(part) => resolve(body, &[], text, depth + 1),
        _ => None,
    }
}

/// RFC 2047 encodes a display name that is not plain ASCII.
fn encode_word(s: &str) -> Vec<u8> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        s.as_bytes().to_vec()
    } else {
        use base64::Engine;
        format!(
            "=?utf-8?b?{}?=",
            base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
        )
        .into_bytes()
    }
}

fn push_addr(out: &mut Vec<u8>, name: Option<&str>, address: Option<&str>) {
    out.push(b'(');
    push_nstring(out, name.map(encode_word).as_deref());
    out.extend_from_slice(b" NIL ");
    let address = address.unwrap_or("");
    let (mailbox, host) = match address.rsplit_once('@') {
        Some((m, h)) => (m, Some(h)),
        None => (address, None),
    };
    push_string(out, mailbox.as_bytes());
    out.push(b' ');
    match host {
        Some(h) => push_string(out, h.as_bytes()),
        None => push_string(out, b""),
    }
    out.push(b')');
}

fn push_address_list(out: &mut Vec<u8>, value: Option<&HeaderValue<'_>>) {
    let Some(HeaderValue::Address(address)) = value else {
        out.extend_from_slice(b"NIL");
        return;
    };
    let start = out.len();
    out.push(b'(');
    match address {
        Address::List(list) => {
            for a in list {
                push_addr(out, a.name(), a.address());
            }
        }
        Address::Group(groups) => {
            for g in groups {
                let named = g.name.is_some();
                if named {
                    out.extend_from_slice(b"(NIL NIL ");
                    push_nstring(out, g.name.as_deref().map(str::as_bytes));
                    out.extend_from_slice(b" NIL)");
                }
                for a in &g.addresses {
                    push_addr(out, a.name(), a.address());
                }
                if named {
                    out.extend_from_slice(b"(NIL NIL NIL NIL)");
                }
            }
        }
    }
    if out.len() == start + 1 {
        out.truncate(start);
        out.extend_from_slice(b"NIL");
    } else {
        out.push(b')');
    }
}

fn push_envelope_of(out: &mut Vec<u8>, raw: &[u8], message: &Message<'_>) {
    let header = &raw[..header_end(raw)];
    let raw_field = |name: &str| header_value(header, name);
    let headers = message
        .parts
        .first()
        .map(|p| p.headers.as_slice())
        .unwrap_or(&[]);
    let find = |name: HeaderName<'static>| {
        headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| &h.value)
            .filter(|v| matches!(v, HeaderValue::Address(_)))
    };
    out.push(b'(');
    push_nstring(out, raw_field("Date").as_deref().map(str::as_bytes));
    out.push(b' ');
    push_nstring(out, raw_field("Subject").as_deref().map(str::as_bytes));
    let from = find(HeaderName::From);
    for (i, name) in [
        HeaderName::From,
        HeaderName::Sender,
        HeaderName::ReplyTo,
        HeaderName::To,
        HeaderName::Cc,
        HeaderName::Bcc,
    ]
    .into_iter()
    .enumerate()
    {
        out.push(b' ');
        let value = find(name);
        // RFC 3501: Sender and Reply-To default to From.
        let value = if value.is_none() && (i == 1 || i == 2) {
            from
        } else {
            value
        };
        push_address_list(out, value);
    }
    out.push(b' ');
    push_nstring(out, raw_field("In-Reply-To").as_deref().map(str::as_bytes));
    out.push(b' ');
    push_nstring(out, raw_field("Message-ID").as_deref().map(str::as_bytes));
    out.push(b')');
}

/// Appends the ENVELOPE of a message.
pub fn push_envelope(out: &mut Vec<u8>, raw: &[u8]) {
    match MessageParser::default().parse(raw) {
        Some(message) => push_envelope_of(out, raw, &message),
        None => out.extend_from_slice(b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"),
    }
}

/// Appends the BODYSTRUCTURE (`extended`) or BODY of a message.
pub fn push_body_structure(out: &mut Vec<u8>, raw: &[u8], extended: bool) {
    match MessageParser::default().parse(raw) {
        Some(message) if !message.parts.is_empty() => push_part(out, raw, &message, 0, extended, 0),
        _ => {
            let lines = raw.iter().filter(|b| **b == b'\n').count();
            out.extend_from_slice(
                format!(
                    "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" {} {lines})",
                    raw.len()
                )
                .as_bytes(),
            );
        }
    }
}

fn push_params(out: &mut Vec<u8>, attrs: Option<&[mail_parser::Attribute<'_>]>) {
    let attrs = attrs.unwrap_or(&[]);
    if attrs.is_empty() {
        out.extend_from_slice(b"NIL");
        return;
    }
    out.push(b'(');
    for (i, a) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        push_string(out, a.name.to_ascii_uppercase().as_bytes());
        out.push(b' ');
        push_string(out, &encode_word(&a.value));
    }
    out.push(b')');
}

fn push_disposition(out: &mut Vec<u8>, part: &mail_parser::MessagePart<'_>) {
    match part.content_disposition() {
        Some(d) => {
            out.push(b'(');
            push_string(out, d.ctype().to_ascii_uppercase().as_bytes());
            out.push(b' ');
            push_params(out, d.attributes.as_deref());
            out.push(b')');
        }
        None => out.extend_from_slice(b"NIL"),
    }
}

fn push_part(
    out: &mut Vec<u8>,
    raw: &[u8],
    message: &Message<'_>,
    id: usize,
    extended: bool,
    depth: usize,
) {
    let Some(part) = message.parts.get(id) else {
        out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)");
        return;
    };
    let ct = part.content_type();
    if let PartType::Multipart(children) = &part.body {
        if !children.is_empty() && depth < MAX_DEPTH {
            out.push(b'(');
            for child in children {
                push_part(out, raw, message, *child as usize, extended, depth + 1);
            }
            out.push(b' ');
            let subtype = ct.and_then(|c| c.subtype()).unwrap_or("mixed");
            push_string(out, subtype.to_ascii_uppercase().as_bytes());
            if extended {
                out.push(b' ');
                push_params(out, ct.and_then(|c| c.attributes.as_deref()));
                out.push(b' ');
                push_disposition(out, part);
                out.extend_from_slice(b" NIL NIL");
            }
            out.push(b')');
            return;
        }
    }
    let body = slice(raw, part.offset_body, part.offset_end);
    let (ctype, subtype) = match ct {
        Some(c) => (
            c.ctype().to_ascii_uppercase(),
            c.subtype().unwrap_or("plain").to_ascii_uppercase(),
        ),
        None => ("TEXT".to_string(), "PLAIN".to_string()),
    };
    let (ctype, subtype) = if matches!(part.body, PartType::Multipart(_)) {
        ("TEXT".to_string(), "PLAIN".to_string())
    } else {
        (ctype, subtype)
    };
    out.push(b'(');
    push_string(out, ctype.as_bytes());
    out.push(b' ');
    push_string(out, subtype.as_bytes());
    out.push(b' ');
    match ct.and_then(|c| c.attributes.as_deref()) {
        Some(attrs) if !attrs.is_empty() => push_params(out, Some(attrs)),
        _ if ctype == "TEXT" => out.extend_from_slice(b"(\"CHARSET\" \"US-ASCII\")"),
        _ => out.extend_from_slice(b"NIL"),
    }
    out.push(b' ');
    push_nstring(out, part.content_id().map(str::as_bytes));
    out.push(b' ');
    push_nstring(out, part.content_description().map(encode_word).as_deref());
    out.push(b' ');
    let encoding = part
        .content_transfer_encoding()
        .unwrap_or("7bit")
        .to_ascii_uppercase();
    push_string(out, encoding.as_bytes());
    out.extend_from_slice(format!(" {}", body.len()).as_bytes());
    let lines = body.iter().filter(|b| **b == b'\n').count();
    if ctype == "MESSAGE" && subtype == "RFC822" && depth < MAX_DEPTH {
        out.push(b' ');
        match MessageParser::default().parse(body) {
            Some(nested) if !nested.parts.is_empty() => {
                push_envelope_of(out, body, &nested);
                out.push(b' ');
                push_part(out, body, &nested, 0, extended, depth + 1);
            }
            _ => {
                out.extend_from_slice(b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) ");
                out.extend_from_slice(b"(\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 0 0)");
            }
        }
        out.extend_from_slice(format!(" {lines}").as_bytes());
    } else if ctype == "TEXT" {
        out.extend_from_slice(format!(" {lines}").as_bytes());
    }
    if extended {
        out.extend_from_slice(b" NIL ");
        push_disposition(out, part);
        out.extend_from_slice(b" NIL NIL");
    }
    out.push(b')');
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &[u8] = b"From: Alice <alice@a.example>\r\nTo: bob@b.example\r\nSubject: hi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n--XX\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=a.pdf\r\n\r\nJVBERi0=\r\n--XX--\r\n";

    fn section(part: Vec<u32>, text: SectionText) -> Section {
        Section { part, text }
    }

    #[test]
    fn sections_of_a_multipart_message() {
        assert_eq!(
            section_bytes(MULTI, &section(vec![1], SectionText::Full)).as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(
            section_bytes(MULTI, &section(vec![2], SectionText::Full)).as_deref(),
            Some(&b"JVBERi0="[..])
        );
        let mime = section_bytes(MULTI, &section(vec![2], SectionText::Mime)).unwrap_or_default();
        assert!(
            mime.starts_with(b"Content-Type: application/pdf"),
            "{}",
            String::from_utf8_lossy(&mime)
        );
        assert!(mime.ends_with(b"\r\n\r\n"));
        assert!(section_bytes(MULTI, &section(vec![3], SectionText::Full)).is_none());
        let fields = section_bytes(
            MULTI,
            &section(
                vec![],
                SectionText::HeaderFields(vec!["subject".into(), "TO".into()]),
            ),
        )
        .unwrap_or_default();
        assert_eq!(fields, b"To: bob@b.example\r\nSubject: hi\r\n\r\n");
    }

    #[test]
    fn structure_and_envelope() {
        let mut out = Vec::new();
        push_body_structure(&mut out, MULTI, true);
        let s = String::from_utf8_lossy(&out).into_owned();
        assert!(
            s.starts_with("((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 5 0"),
            "{s}"
        );
        assert!(s.contains("\"APPLICATION\" \"PDF\""), "{s}");
        assert!(s.contains("\"MIXED\" (\"BOUNDARY\" \"XX\")"), "{s}");
        let mut env = Vec::new();
        push_envelope(&mut env, MULTI);
        let e = String::from_utf8_lossy(&env).into_owned();
        assert_eq!(
            e,
            "(NIL \"hi\" ((\"Alice\" NIL \"alice\" \"a.example\")) ((\"Alice\" NIL \"alice\" \"a.example\")) ((\"Alice\" NIL \"alice\" \"a.example\")) ((NIL NIL \"bob\" \"b.example\")) NIL NIL NIL NIL)"
        );
        let single = b"Subject: x\r\n\r\nbody\r\n";
        assert_eq!(
            section_bytes(single, &section(vec![1], SectionText::Full)).as_deref(),
            Some(&b"body\r\n"[..])
        );
    }
}

#[cfg(test)]
mod nested_tests {
    use super::*;

    const NESTED: &[u8] = b"Subject: outer\r\nContent-Type: multipart/mixed; boundary=A\r\n\r\n--A\r\nContent-Type: multipart/alternative; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nplain\r\n--B\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--B--\r\n--A\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: x@y.example\r\n\r\ninner body\r\n--A--\r\n";

    fn get(part: Vec<u32>, text: SectionText) -> Option<Vec<u8>> {
        section_bytes(NESTED, &Section { part, text })
    }

    #[test]
    fn nested_parts_and_messages() {
        assert_eq!(
            get(vec![1, 1], SectionText::Full).as_deref(),
            Some(&b"plain"[..])
        );
        assert_eq!(
            get(vec![1, 2], SectionText::Full).as_deref(),
            Some(&b"<p>html</p>"[..])
        );
        assert_eq!(
            get(vec![2], SectionText::Full).as_deref(),
            Some(&b"Subject: inner\r\nFrom: x@y.example\r\n\r\ninner body"[..])
        );
        assert_eq!(
            get(vec![2], SectionText::Header).as_deref(),
            Some(&b"Subject: inner\r\nFrom: x@y.example\r\n\r\n"[..])
        );
        assert_eq!(
            get(vec![2], SectionText::Text).as_deref(),
            Some(&b"inner body"[..])
        );
        assert_eq!(
            get(vec![2, 1], SectionText::Full).as_deref(),
            Some(&b"inner body"[..])
        );
        let mut out = Vec::new();
        push_body_structure(&mut out, NESTED, true);
        let s = String::from_utf8_lossy(&out).into_owned();
        assert!(s.contains("\"ALTERNATIVE\""), "{s}");
        assert!(s.contains("\"MESSAGE\" \"RFC822\""), "{s}");
        assert!(s.contains("\"inner\""), "{s}");
    }

    #[test]
    fn mangled_messages_never_panic() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut m = NESTED.to_vec();
            for _ in 0..(next() % 8) {
                let i = (next() as usize) % m.len();
                match next() % 3 {
                    0 => m[i] = next() as u8,
                    1 => {
                        m.remove(i);
                    }
                    _ => m.truncate(i),
                }
                if m.is_empty() {
                    break;
                }
            }
            let mut out = Vec::new();
            push_body_structure(&mut out, &m, true);
            push_envelope(&mut out, &m);
            for part in [vec![], vec![1], vec![2, 1], vec![1, 2], vec![3]] {
                for text in [
                    SectionText::Full,
                    SectionText::Header,
                    SectionText::Text,
                    SectionText::Mime,
                ] {
                    let _ = section_bytes(
                        &m,
                        &Section {
                            part: part.clone(),
                            text,
                        },
                    );
                }
            }
        }
    }
}
