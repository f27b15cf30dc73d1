//! A standalone, self-contained HTML page for a C-CDA: the human-readable
//! half of Blue Button Plus.
//!
//! The CDA narrative block is mapped element by element onto a small HTML
//! whitelist; everything else contributes its text only. All text and
//! attribute values are escaped; no attribute of the document reaches the
//! output except numeric `colspan`/`rowspan`; links are shown as text, never
//! made live; multimedia is omitted. The page carries a strict
//! Content-Security-Policy and its own inline stylesheet, and ignores the
//! document's `xml-stylesheet` entirely.

use super::ccda::{Ccda, Code, InstanceId, Node, Section};
use std::fmt::Write as _;

/// The policy put in the page's `<meta http-equiv>`: nothing may load, only
/// inline styles apply.
pub const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'";

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:60rem;padding:1rem 1.5rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem;margin:.2rem 0 1rem}
h2{font-size:1.25rem;border-bottom:2px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
h3,h4,h5,h6{font-size:1.05rem;margin-top:1.4rem}
table{border-collapse:collapse;margin:.5rem 0;width:100%}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f5f7}
caption{text-align:left;font-weight:600;padding:.2rem 0}
.header th{width:12rem;background:#f3f5f7}
.caption{font-weight:600}
.omitted,.link,.footnote{color:#57606a;font-size:.9em}
nav ul{columns:2;padding-left:1.2rem}
.empty{color:#57606a;font-style:italic}
@media print{nav{display:none}}
";

/// Render `doc` as one complete HTML page.
pub fn render_html(doc: &Ccda) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let title = doc
        .title
        .clone()
        .or_else(|| doc.code.as_ref().and_then(code_label))
        .unwrap_or_else(|| "Clinical document".to_string());

    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    let _ = writeln!(
        out,
        "<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
    );
    out.push_str("<meta name=\"referrer\" content=\"no-referrer\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(out, "<title>{}</title>", esc(&title));
    let _ = writeln!(out, "<style>{STYLE}</style>\n</head>\n<body>");
    let _ = writeln!(out, "<header>\n<h1>{}</h1>", esc(&title));
    header_table(doc, &mut out);
    out.push_str("</header>\n");

    let all = doc.all_sections();
    if all.len() > 1 {
        out.push_str("<nav><h2>Contents</h2><ul>\n");
        for (i, s) in all.iter().enumerate() {
            let _ = writeln!(
                out,
                "<li><a href=\"#section-{}\">{}</a></li>",
                i + 1,
                esc(&section_title(s))
            );
        }
        out.push_str("</ul></nav>\n");
    }

    out.push_str("<main>\n");
    if doc.sections.is_empty() {
        match &doc.non_xml_body_media_type {
            Some(mt) => {
                let _ = writeln!(
                    out,
                    "<p class=\"empty\">This document has an unstructured body ({}) that is not shown here.</p>",
                    esc(mt)
                );
            }
            None => out.push_str("<p class=\"empty\">This document has no sections.</p>\n"),
        }
    }
    let mut counter = 0usize;
    for s in &doc.sections {
        render_section(s, 2, &mut counter, &mut out);
    }
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

fn header_table(doc: &Ccda, out: &mut String) {
    let mut rows: Vec<(&str, String)> = Vec::new();
    for p in &doc.patients {
        let name = if p.names.is_empty() {
            "(no name given)".to_string()
        } else {
            p.names.join("; ")
        };
        rows.push(("Patient", name));
        if let Some(b) = &p.birth_time {
            rows.push(("Date of birth", format_ts(b)));
        }
        if let Some(g) = &p.gender {
            rows.push(("Gender", gender_label(g)));
        }
        let ids: Vec<String> = p.ids.iter().filter_map(id_label).collect();
        if !ids.is_empty() {
            rows.push(("Patient IDs", ids.join("; ")));
        }
    }
    if let Some(c) = doc.code.as_ref().and_then(code_label) {
        rows.push(("Document type", c));
    }
    if let Some(t) = &doc.effective_time {
        rows.push(("Created", format_ts(t)));
    }
    if !doc.authors.is_empty() {
        rows.push(("Author", doc.authors.join("; ")));
    }
    if let Some(c) = &doc.custodian {
        rows.push(("Custodian", c.clone()));
    }
    if let Some(id) = doc.id.as_ref().and_then(id_label) {
        rows.push(("Document ID", id));
    }
    if let Some(v) = &doc.version {
        rows.push(("Version", v.clone()));
    }
    out.push_str("<table class=\"header\">\n");
    for (k, v) in rows {
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            esc(k),
            esc(&v)
        );
    }
    out.push_str("</table>\n");
}

fn render_section(s: &Section, level: usize, counter: &mut usize, out: &mut String) {
    *counter += 1;
    let h = level.min(6);
    let _ = writeln!(
        out,
        "<section id=\"section-{}\">\n<h{h}>{}</h{h}>",
        *counter,
        esc(&section_title(s))
    );
    match &s.narrative {
        Some(n) => {
            out.push_str("<div class=\"narrative\">");
            if let Node::Element { children, .. } = n {
                for c in children {
                    narrative(c, 0, out);
                }
            }
            out.push_str("</div>\n");
        }
        None => out.push_str("<p class=\"empty\">No narrative text.</p>\n"),
    }
    for sub in &s.sections {
        render_section(sub, level + 1, counter, out);
    }
    out.push_str("</section>\n");
}

fn section_title(s: &Section) -> String {
    s.title
        .clone()
        .or_else(|| s.code.as_ref().and_then(code_label))
        .unwrap_or_else(|| "Untitled section".to_string())
}

fn code_label(c: &Code) -> Option<String> {
    c.display_name.clone().or_else(|| c.code.clone())
}

fn id_label(id: &InstanceId) -> Option<String> {
    match (&id.extension, &id.root) {
        (Some(e), Some(r)) => Some(format!("{e} ({r})")),
        (Some(e), None) => Some(e.clone()),
        (None, Some(r)) => Some(r.clone()),
        (None, None) => None,
    }
}

fn gender_label(code: &str) -> String {
    match code {
        "M" => "Male".into(),
        "F" => "Female".into(),
        "UN" => "Undifferentiated".into(),
        other => other.to_string(),
    }
}

/// Format an HL7 TS (`YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+-ZZZZ]`) for people:
/// `2024-01-02 13:04:05 -05:00`. Anything unrecognised is returned as is.
pub fn format_ts(ts: &str) -> String {
    let ts = ts.trim();
    let (main, zone) = match ts.find(['+', '-']) {
        Some(i) => (&ts[..i], Some(&ts[i..])),
        None => (ts, None),
    };
    let main = main.split('.').next().unwrap_or(main);
    let ok_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !ok_digits(main) || ![4, 6, 8, 10, 12, 14].contains(&main.len()) {
        return ts.to_string();
    }
    let mut out = main[..4].to_string();
    if main.len() >= 6 {
        let _ = write!(out, "-{}", &main[4..6]);
    }
    if main.len() >= 8 {
        let _ = write!(out, "-{}", &main[6..8]);
    }
    if main.len() >= 12 {
        let _ = write!(out, " {}:{}", &main[8..10], &main[10..12]);
    } else if main.len() >= 10 {
        let _ = write!(out, " {}:00", &main[8..10]);
    }
    if main.len() >= 14 {
        let _ = write!(out, ":{}", &main[12..14]);
    }
    if let Some(z) = zone {
        let digits = &z[1..];
        if main.len() >= 10 && digits.len() == 4 && ok_digits(digits) {
            let _ = write!(out, " {}{}:{}", &z[..1], &digits[..2], &digits[2..]);
        }
    }
    out
}

/// Escape text for HTML content and double- or single-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            // Control characters (other than tab/newline/CR) have no place in a page.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => {}
            c => o.push(c),
        }
    }
    o
}

/// A positive span of at most 1000, as written (digits only).
fn span_attr(n: &Node, name: &str) -> Option<u32> {
    let v = n.attr(name)?.trim();
    if v.is_empty() || v.len() > 4 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u32>().ok().filter(|&x| (1..=1000).contains(&x))
}

/// Inline wrappers for a `styleCode` (Bold, Italics, Underline, Emphasis).
fn style_wrappers(n: &Node) -> Vec<&'static str> {
    let mut w = Vec::new();
    if let Some(sc) = n.attr("styleCode") {
        for tok in sc.split_whitespace() {
            let tag = match tok.to_ascii_lowercase().as_str() {
                "bold" => "b",
                "italics" => "i",
                "underline" => "u",
                "emphasis" => "em",
                _ => continue,
            };
            if !w.contains(&tag) {
                w.push(tag);
            }
        }
    }
    w
}

/// Elements whose content is code, not text: dropped entirely.
const DROP: &[&str] = &["script", "style", "{http://www.w3.org/1999/xhtml}script"];

/// Render the children of `n` (through the whitelist), wrapped in the
/// element's styleCode wrappers.
fn inner(n: &Node, depth: usize, out: &mut String) {
    let Node::Element { children, .. } = n else {
        return;
    };
    let wrappers = style_wrappers(n);
    for w in &wrappers {
        let _ = write!(out, "<{w}>");
    }
    for c in children {
        narrative(c, depth + 1, out);
    }
    for w in wrappers.iter().rev() {
        let _ = write!(out, "</{w}>");
    }
}

fn text_only(n: &Node, out: &mut String) {
    out.push_str(&esc(&n.text_content()));
}

/// Whether `href` is shown (as text) for a `linkHtml`: only web and mail
/// addresses; anything else (javascript:, data:, file:...) is not shown.
fn showable_href(href: &str) -> bool {
    let h = href.trim().to_ascii_lowercase();
    h.starts_with("http://") || h.starts_with("https://") || h.starts_with("mailto:")
}

fn narrative(n: &Node, depth: usize, out: &mut String) {
    // The parser bounds depth already (at most 1024); this keeps rendering
    // safe for trees built by other code.
    if depth > 512 {
        text_only(n, out);
        return;
    }
    let (name, children) = match n {
        Node::Text(t) => {
            out.push_str(&esc(t));
            return;
        }
        Node::Element { name, children, .. } => (name.as_str(), children),
    };
    match name {
        "table" => {
            out.push_str("<table>");
            // HTML wants the caption first; CDA puts it first too.
            for c in children {
                if is_el(c, "caption") {
                    out.push_str("<caption>");
                    inner(c, depth, out);
                    out.push_str("</caption>");
                }
            }
            for c in children {
                if !is_el(c, "caption") {
                    narrative(c, depth + 1, out);
                }
            }
            out.push_str("</table>");
        }
        "thead" | "tbody" | "tfoot" | "tr" => {
            let _ = write!(out, "<{name}>");
            for c in children {
                // Whitespace between rows/cells is noise in table context.
                if let Node::Text(t) = c {
                    if t.trim().is_empty() {
                        continue;
                    }
                }
                narrative(c, depth + 1, out);
            }
            let _ = write!(out, "</{name}>");
        }
        "th" | "td" => {
            let _ = write!(out, "<{name}");
            for a in ["colspan", "rowspan"] {
                if let Some(v) = span_attr(n, a) {
                    let _ = write!(out, " {a}=\"{v}\"");
                }
            }
            out.push('>');
            inner(n, depth, out);
            let _ = write!(out, "</{name}>");
        }
        "col" | "colgroup" => {}
        "list" => {
            for c in children {
                if is_el(c, "caption") {
                    out.push_str("<div class=\"caption\">");
                    inner(c, depth, out);
                    out.push_str("</div>");
                }
            }
            let ordered = n
                .attr("listType")
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("ordered"));
            let tag = if ordered { "ol" } else { "ul" };
            let _ = write!(out, "<{tag}>");
            for c in children {
                match c {
                    Node::Text(t) if t.trim().is_empty() => {}
                    c if is_el(c, "caption") => {}
                    c if is_el(c, "item") => {
                        out.push_str("<li>");
                        inner(c, depth + 1, out);
                        out.push_str("</li>");
                    }
                    other => {
                        out.push_str("<li>");
                        narrative(other, depth + 1, out);
                        out.push_str("</li>");
                    }
                }
            }
            let _ = write!(out, "</{tag}>");
        }
        "item" => {
            // An item outside a list: a plain block.
            out.push_str("<div>");
            inner(n, depth, out);
            out.push_str("</div>");
        }
        "paragraph" => {
            out.push_str("<div class=\"paragraph\">");
            inner(n, depth, out);
            out.push_str("</div>");
        }
        "caption" => {
            out.push_str("<span class=\"caption\">");
            inner(n, depth, out);
            out.push_str("</span> ");
        }
        // Text marked as deleted in a revision is not current content.
        "content" if n.attr("revised").is_some_and(|r| r.trim() == "delete") => {}
        "content" => {
            out.push_str("<span>");
            inner(n, depth, out);
            out.push_str("</span>");
        }
        "sub" | "sup" => {
            let _ = write!(out, "<{name}>");
            inner(n, depth, out);
            let _ = write!(out, "</{name}>");
        }
        "br" => out.push_str("<br>"),
        "linkHtml" => {
            out.push_str("<span class=\"link\">");
            text_only(n, out);
            if let Some(href) = n.attr("href").filter(|h| showable_href(h)) {
                let _ = write!(out, " [link: {}]", esc(href.trim()));
            }
            out.push_str("</span>");
        }
        "renderMultiMedia" => {
            out.push_str("<span class=\"omitted\">[multimedia omitted");
            for c in children {
                if is_el(c, "caption") {
                    let t = c.text_content();
                    let t = t.trim();
                    if !t.is_empty() {
                        let _ = write!(out, ": {}", esc(t));
                    }
                }
            }
            out.push_str("]</span>");
        }
        "footnote" => {
            out.push_str("<span class=\"footnote\">[Footnote: ");
            inner(n, depth, out);
            out.push_str("]</span>");
        }
        "footnoteRef" => {
            out.push_str("<sup class=\"footnote\">[");
            out.push_str(&esc(n.attr("IDREF").unwrap_or("note")));
            out.push_str("]</sup>");
        }
        name if DROP.contains(&name) => {}
        _ => text_only(n, out),
    }
}

fn is_el(n: &Node, want: &str) -> bool {
    matches!(n, Node::Element { name, .. } if name == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(name: &str, attrs: &[(&str, &str)], children: Vec<Node>) -> Node {
        Node::Element {
            name: name.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            children,
        }
    }
    fn t(s: &str) -> Node {
        Node::Text(s.into())
    }
    fn render_node(n: &Node) -> String {
        let mut s = String::new();
        narrative(n, 0, &mut s);
        s
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            format_ts("20240102130405-0500"),
            "2024-01-02 13:04:05 -05:00"
        );
        assert_eq!(format_ts("19750501"), "1975-05-01");
        assert_eq!(format_ts("197505"), "1975-05");
        assert_eq!(format_ts("202401021304"), "2024-01-02 13:04");
        assert_eq!(
            format_ts("20240102130405.123+0100"),
            "2024-01-02 13:04:05 +01:00"
        );
        assert_eq!(format_ts("garbage"), "garbage");
    }

    #[test]
    fn tables_and_spans() {
        let n = el(
            "table",
            &[("border", "1"), ("style", "x")],
            vec![
                el(
                    "tbody",
                    &[],
                    vec![
                        t("\n  "),
                        el(
                            "tr",
                            &[],
                            vec![el(
                                "td",
                                &[
                                    ("colspan", "2"),
                                    ("rowspan", "2 onclick=x"),
                                    ("onclick", "y"),
                                ],
                                vec![t("a<b")],
                            )],
                        ),
                    ],
                ),
                el("caption", &[], vec![t("Cap")]),
            ],
        );
        assert_eq!(
            render_node(&n),
            "<table><caption>Cap</caption><tbody><tr><td colspan=\"2\">a&lt;b</td></tr></tbody></table>"
        );
    }

    #[test]
    fn lists_styles_links() {
        let n = el(
            "list",
            &[("listType", "ordered")],
            vec![
                el("caption", &[], vec![t("Meds")]),
                el(
                    "item",
                    &[],
                    vec![el(
                        "content",
                        &[("styleCode", "Bold Italics")],
                        vec![t("one")],
                    )],
                ),
            ],
        );
        assert_eq!(
            render_node(&n),
            "<div class=\"caption\">Meds</div><ol><li><span><b><i>one</i></b></span></li></ol>"
        );
        let l = el("linkHtml", &[("href", "javascript:alert(1)")], vec![t("x")]);
        assert_eq!(render_node(&l), "<span class=\"link\">x</span>");
        let l = el(
            "linkHtml",
            &[("href", "https://e.org/?a=\"b\"")],
            vec![t("x")],
        );
        assert_eq!(
            render_node(&l),
            "<span class=\"link\">x [link: https://e.org/?a=&quot;b&quot;]</span>"
        );
        let m = el(
            "renderMultiMedia",
            &[("referencedObject", "i1")],
            vec![el("caption", &[], vec![t("X-ray")])],
        );
        assert_eq!(
            render_node(&m),
            "<span class=\"omitted\">[multimedia omitted: X-ray]</span>"
        );
    }

    #[test]
    fn unknown_elements_are_text_only() {
        let n = el(
            "a",
            &[("href", "javascript:x")],
            vec![t("click "), el("b", &[], vec![t("<me>")])],
        );
        assert_eq!(render_node(&n), "click &lt;me&gt;");
        let d = el("content", &[("revised", "delete")], vec![t("old")]);
        assert_eq!(render_node(&d), "");
        let s = el("script", &[], vec![t("alert(1)")]);
        assert_eq!(render_node(&s), "");
    }

    #[test]
    fn page_has_csp_and_summary() {
        let doc = Ccda {
            title: Some("A <b> title".into()),
            patients: vec![super::super::ccda::Patient {
                names: vec!["Eve Everywoman".into()],
                birth_time: Some("19750501".into()),
                gender: Some("F".into()),
                ..Default::default()
            }],
            sections: vec![Section {
                title: Some("Allergies".into()),
                ..Default::default()
            }],
            stylesheet: Some("http://evil.example/x.xsl".into()),
            ..Default::default()
        };
        let html = render_html(&doc);
        assert!(html.contains("content=\"default-src 'none'; style-src 'unsafe-inline'"));
        assert!(html.contains("<h1>A &lt;b&gt; title</h1>"));
        assert!(html.contains("Eve Everywoman"));
        assert!(html.contains("1975-05-01"));
        assert!(html.contains("Female"));
        assert!(html.contains("<h2>Allergies</h2>"));
        assert!(!html.contains("evil.example"));
    }
}
