//! IMAP command syntax: `edge::imap::parse::split_tag` then `parse_command`
//! on one assembled command (literals spliced in as `{n}\r\n` + bytes, as the
//! session hands them over), and what the session then does with the parts
//! (sequence sets, sections, search dates).
//!
//! `hispd::edge::imap::parse` is private to the IMAP server, so this target
//! compiles the very same source file as a module of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;

// `hispd::edge::imap::parse` is a private module of the IMAP server, so the
// very same source file is compiled here (it depends on std and chrono only).
#[allow(dead_code)]
#[path = "../../src/edge/imap/parse.rs"]
mod parse;

use parse::{Command, FetchAtt, SearchKey};

fn visit(key: &SearchKey) {
    match key {
        SearchKey::Uid(set) | SearchKey::Seq(set) => {
            let _ = set.contains(1, u64::MAX);
            let _ = set.contains(u64::MAX, 1);
        }
        SearchKey::Not(k) => visit(k),
        SearchKey::Or(a, b) => {
            visit(a);
            visit(b);
        }
        SearchKey::And(keys) => keys.iter().for_each(visit),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The session refuses command text over 256 KiB.
    if data.len() > 256 * 1024 {
        return;
    }
    let Some((tag, rest)) = parse::split_tag(data) else {
        return;
    };
    assert!(!tag.is_empty());
    let Ok(command) = parse::parse_command(rest) else {
        return;
    };
    match &command {
        Command::Fetch { set, atts, .. } => {
            let _ = set.contains(7, 3);
            for att in atts {
                if let FetchAtt::Section { section, .. } = att {
                    let _ = section.render();
                }
            }
        }
        Command::Store { set, .. } | Command::Copy { set, .. } | Command::UidExpunge(set) => {
            let _ = set.contains(2, 0);
        }
        Command::Search { key, .. } => visit(key),
        _ => {}
    }
    let _ = format!("{command:?}");
});
