//! C-CDA: `documents::ccda::parse` with the default limits, then
//! `documents::render::render_html` of what parsed.
#![no_main]

use hispd::documents::{ccda, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ccda::is_ccda(data);
    match ccda::parse(data, &ccda::Limits::default()) {
        Ok(doc) => {
            let _ = doc.all_sections();
            let _ = serde_json::to_string(&doc);
            let html = render::render_html(&doc);
            assert!(!html.is_empty());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
