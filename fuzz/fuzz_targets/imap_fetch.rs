//! What an IMAP FETCH computes from a stored message, which came from
//! outside: ENVELOPE, BODY and BODYSTRUCTURE descriptions, header fields and
//! body sections (`edge::imap::message`), on an arbitrary message.
//!
//! `edge::imap::{message, parse}` are private modules of the IMAP server, so
//! this target compiles the very same source files as modules of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/edge/imap/parse.rs"]
mod parse;

#[allow(dead_code)]
#[path = "../../src/edge/imap/message.rs"]
mod message;

use parse::{Section, SectionText};

const PATHS: &[&[u32]] = &[&[], &[1], &[2], &[1, 1], &[2, 1], &[1, 2, 1], &[3, 1, 2]];

fn texts() -> Vec<SectionText> {
    vec![
        SectionText::Full,
        SectionText::Header,
        SectionText::Text,
        SectionText::Mime,
        SectionText::HeaderFields(vec!["From".into(), "Subject".into(), "X-None".into()]),
        SectionText::HeaderFieldsNot(vec!["Received".into(), "To".into()]),
    ]
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    let mut out = Vec::new();
    message::push_envelope(&mut out, data);
    message::push_body_structure(&mut out, data, false);
    message::push_body_structure(&mut out, data, true);
    let end = message::header_end(data);
    assert!(end <= data.len());
    let header = &data[..end];
    let _ = message::header_fields(header);
    let _ = message::header_value(header, "Subject");
    let _ = message::header_values(header, "Received");
    for path in PATHS {
        for text in texts() {
            if matches!(text, SectionText::Mime) && path.is_empty() {
                continue;
            }
            let section = Section {
                part: path.to_vec(),
                text,
            };
            if let Some(bytes) = message::section_bytes(data, &section) {
                message::push_literal(&mut out, &bytes);
                message::push_nstring(&mut out, Some(&bytes[..bytes.len().min(64)]));
            }
        }
    }
});
