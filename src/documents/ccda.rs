//! Recognising and parsing HL7 C-CDA documents (`ClinicalDocument` in the
//! `urn:hl7-org:v3` namespace) for Blue Button Plus.
//!
//! Safety: documents with a DOCTYPE (and so any DTD, entity declaration,
//! XXE or "billion laughs" payload) are refused; the size is bounded before
//! parsing and the element depth right after it; nothing is ever fetched
//! (an `xml-stylesheet` processing instruction is reported, never used).
//!
//! The narrative block of each section is kept as a small owned tree
//! ([`Node`]) that [`super::render`] turns into whitelisted HTML.

use serde::Serialize;

/// The HL7 v3 namespace of every CDA element.
pub const HL7_V3_NS: &str = "urn:hl7-org:v3";

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum CcdaError {
    #[error("not XML: {0}")]
    NotXml(String),
    #[error("not a C-CDA: root element is {0}")]
    NotCcda(String),
    #[error("document too large ({size} bytes, limit {limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("too deeply nested (limit {limit})")]
    TooDeep { limit: usize },
    #[error("DTDs are not allowed (a DOCTYPE declaration was found)")]
    DtdNotAllowed,
}

/// Resource bounds applied to every document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted document, in bytes (checked before parsing).
    pub max_bytes: usize,
    /// Deepest accepted element nesting (the root element is depth 1).
    /// Values above [`HARD_MAX_DEPTH`] are treated as that.
    pub max_depth: usize,
}

/// The nesting limit is never raised past this, whatever [`Limits`] says:
/// narrative trees are walked recursively.
pub const HARD_MAX_DEPTH: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 20 * 1024 * 1024,
            max_depth: 256,
        }
    }
}

/// An HL7 instance identifier (`II`): `root` OID/UUID plus optional `extension`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InstanceId {
    pub root: Option<String>,
    pub extension: Option<String>,
}

/// A coded value (`CD`/`CE`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Code {
    pub code: Option<String>,
    pub code_system: Option<String>,
    pub display_name: Option<String>,
}

/// One `recordTarget/patientRole`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Patient {
    pub ids: Vec<InstanceId>,
    /// Each `patient/name`, parts joined with spaces (prefix given family suffix).
    pub names: Vec<String>,
    /// `birthTime/@value`, as written (HL7 TS, e.g. `19750501`).
    pub birth_time: Option<String>,
    /// `administrativeGenderCode/@code` (e.g. `M`, `F`, `UN`).
    pub gender: Option<String>,
    /// The parts of each `patient/name` that has any (names written as
    /// plain text have none), in document order.
    pub name_parts: Vec<NameParts>,
}

/// The parts of a person name (`PN`), each collapsed and non-empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NameParts {
    pub prefix: Vec<String>,
    pub given: Vec<String>,
    /// Every `family` part, joined with spaces.
    pub family: Option<String>,
    pub suffix: Vec<String>,
}

/// A light owned XML tree for narrative blocks.
///
/// Element names are local names for elements in the HL7 v3 namespace, and
/// `{namespace}local` for any other namespace; attribute names likewise
/// (`local` without a namespace, `{namespace}local` with one). Comments and
/// processing instructions are dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Node {
    Element {
        name: String,
        attrs: Vec<(String, String)>,
        children: Vec<Node>,
    },
    Text(String),
}

impl Node {
    /// The value of attribute `name`, if this is an element that has it.
    pub fn attr(&self, name: &str) -> Option<&str> {
        match self {
            Node::Element { attrs, .. } => attrs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            Node::Text(_) => None,
        }
    }

    /// All descendant text, concatenated.
    pub fn text_content(&self) -> String {
        let mut out = String::new();
        self.collect_text(&mut out);
        out
    }

    fn collect_text(&self, out: &mut String) {
        match self {
            Node::Text(t) => out.push_str(t),
            Node::Element { children, .. } => {
                for c in children {
                    c.collect_text(out);
                }
            }
        }
    }
}

/// A `section` of the structured body, with its nested sections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Section {
    pub code: Option<Code>,
    pub title: Option<String>,
    /// The section's `<text>` element (the CDA narrative block), if any.
    pub narrative: Option<Node>,
    /// `section/component/section`, in document order.
    pub sections: Vec<Section>,
}

/// The parts of a C-CDA that a patient needs to see.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ccda {
    pub id: Option<InstanceId>,
    pub set_id: Option<InstanceId>,
    /// `versionNumber/@value`.
    pub version: Option<String>,
    /// The document type (`code`), e.g. LOINC 34133-9 for a CCD.
    pub code: Option<Code>,
    pub title: Option<String>,
    /// `effectiveTime/@value`, as written (HL7 TS).
    pub effective_time: Option<String>,
    pub patients: Vec<Patient>,
    /// Person names, or device / organisation names where no person is given.
    pub authors: Vec<String>,
    /// `custodian/assignedCustodian/representedCustodianOrganization/name`.
    pub custodian: Option<String>,
    /// Top-level sections of `component/structuredBody`; nested ones inside.
    pub sections: Vec<Section>,
    /// `mediaType` of a `component/nonXMLBody/text`, for unstructured documents.
    pub non_xml_body_media_type: Option<String>,
    /// The `href` of an `xml-stylesheet` processing instruction: reported,
    /// never fetched nor used.
    pub stylesheet: Option<String>,
    /// `documentationOf/serviceEvent/effectiveTime/low/@value` of the first
    /// serviceEvent, as written (HL7 TS).
    pub service_start: Option<String>,
    /// `documentationOf/serviceEvent/effectiveTime/high/@value` of the first
    /// serviceEvent, as written (HL7 TS).
    pub service_end: Option<String>,
}

impl Ccda {
    /// Every section, nested ones included, in document order (depth first).
    pub fn all_sections(&self) -> Vec<&Section> {
        fn walk<'a>(s: &'a [Section], out: &mut Vec<&'a Section>) {
            for sec in s {
                out.push(sec);
                walk(&sec.sections, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.sections, &mut out);
        out
    }
}

/// How many bytes of the start of a document [`is_ccda`] looks at.
pub const SNIFF_BYTES: usize = 256 * 1024;

/// Cheap check: does this look like a C-CDA (root element `ClinicalDocument`
/// declaring the HL7 v3 namespace)? Reads at most the first 256 KiB and does
/// not build a tree. A `true` does not promise that [`parse`] will succeed.
pub fn is_ccda(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(SNIFF_BYTES)];
    let text: std::borrow::Cow<'_, str> = match utf16_bom(head) {
        Some(big_endian) => std::borrow::Cow::Owned(decode_utf16(&head[2..], big_endian)),
        None => String::from_utf8_lossy(strip_utf8_bom(head)),
    };
    match root_start_tag(&text) {
        Ok(Some(tag)) => {
            let name_end = tag
                .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
                .unwrap_or(tag.len());
            let name = &tag[..name_end];
            let local = name.rsplit(':').next().unwrap_or(name);
            local == "ClinicalDocument" && tag.contains(HL7_V3_NS)
        }
        _ => false,
    }
}

/// Parse a C-CDA, refusing DTDs, oversized and over-deep documents.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Ccda, CcdaError> {
    if bytes.len() > limits.max_bytes {
        return Err(CcdaError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let max_depth = limits.max_depth.min(HARD_MAX_DEPTH);
    let text = decode(bytes)?;
    // roxmltree accepts an empty DOCTYPE even with allow_dtd false: refuse
    // any DOCTYPE here, before the parser sees it.
    match root_start_tag(&text) {
        Err(PrologError::Doctype) => return Err(CcdaError::DtdNotAllowed),
        Err(PrologError::Unterminated) | Ok(None) => {
            return Err(CcdaError::NotXml("no root element".into()))
        }
        Ok(Some(_)) => {}
    }
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, opts).map_err(|e| match e {
        roxmltree::Error::DtdDetected => CcdaError::DtdNotAllowed,
        other => CcdaError::NotXml(other.to_string()),
    })?;
    check_depth(&doc, max_depth)?;

    let root = doc.root_element();
    if !(root.tag_name().name() == "ClinicalDocument"
        && root.tag_name().namespace() == Some(HL7_V3_NS))
    {
        return Err(CcdaError::NotCcda(expanded_name(
            root.tag_name().namespace(),
            root.tag_name().name(),
        )));
    }

    let mut ccda = Ccda {
        stylesheet: doc
            .root()
            .children()
            .filter_map(|n| n.pi())
            .find(|pi| pi.target == "xml-stylesheet")
            .and_then(|pi| pi.value.and_then(|v| pseudo_attr(v, "href"))),
        id: child(root, "id").map(instance_id),
        set_id: child(root, "setId").map(instance_id),
        version: child(root, "versionNumber").and_then(|n| attr(n, "value")),
        code: child(root, "code").map(code),
        title: child(root, "title")
            .map(|n| collapse(&all_text(n)))
            .filter(|t| !t.is_empty()),
        effective_time: child(root, "effectiveTime").and_then(|n| attr(n, "value")),
        ..Ccda::default()
    };

    for rt in children(root, "recordTarget") {
        for role in children(rt, "patientRole") {
            ccda.patients.push(patient(role));
        }
    }
    for author in children(root, "author") {
        if let Some(a) = child(author, "assignedAuthor") {
            if let Some(name) = author_name(a) {
                ccda.authors.push(name);
            }
        }
    }
    ccda.custodian = child(root, "custodian")
        .and_then(|c| child(c, "assignedCustodian"))
        .and_then(|c| child(c, "representedCustodianOrganization"))
        .and_then(|o| child(o, "name"))
        .map(|n| collapse(&all_text(n)))
        .filter(|s| !s.is_empty());

    if let Some(time) = children(root, "documentationOf")
        .find_map(|d| child(d, "serviceEvent"))
        .and_then(|e| child(e, "effectiveTime"))
    {
        ccda.service_start = child(time, "low").and_then(|n| attr(n, "value"));
        ccda.service_end = child(time, "high").and_then(|n| attr(n, "value"));
    }

    for comp in children(root, "component") {
        if let Some(body) = child(comp, "structuredBody") {
            for c in children(body, "component") {
                for s in children(c, "section") {
                    ccda.sections.push(section(s, 1, max_depth)?);
                }
            }
        }
        if let Some(body) = child(comp, "nonXMLBody") {
            ccda.non_xml_body_media_type = child(body, "text")
                .and_then(|t| attr(t, "mediaType"))
                .or_else(|| Some("text/plain".into()));
        }
    }
    Ok(ccda)
}

// ---------------------------------------------------------------- decoding

fn strip_utf8_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(b)
}

/// `Some(true)` for a UTF-16BE byte-order mark, `Some(false)` for UTF-16LE.
fn utf16_bom(b: &[u8]) -> Option<bool> {
    match b {
        [0xFE, 0xFF, ..] => Some(true),
        [0xFF, 0xFE, ..] => Some(false),
        _ => None,
    }
}

fn decode_utf16(b: &[u8], big_endian: bool) -> String {
    let units = b.chunks_exact(2).map(|c| {
        if big_endian {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_le_bytes([c[0], c[1]])
        }
    });
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

fn decode(bytes: &[u8]) -> Result<String, CcdaError> {
    if let Some(big_endian) = utf16_bom(bytes) {
        return Ok(decode_utf16(&bytes[2..], big_endian));
    }
    std::str::from_utf8(strip_utf8_bom(bytes))
        .map(str::to_owned)
        .map_err(|e| CcdaError::NotXml(format!("not UTF-8 ({e})")))
}

enum PrologError {
    Doctype,
    Unterminated,
}

/// Skip the prolog (XML declaration, comments, processing instructions,
/// whitespace) and return the root element's start tag, without the `<`.
/// A DOCTYPE in the prolog is an error.
fn root_start_tag(text: &str) -> Result<Option<&str>, PrologError> {
    let mut rest = text.trim_start_matches('\u{feff}');
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(None);
        }
        if let Some(r) = rest.strip_prefix("<?") {
            let end = r.find("?>").ok_or(PrologError::Unterminated)?;
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix("<!--") {
            let end = r.find("-->").ok_or(PrologError::Unterminated)?;
            rest = &r[end + 3..];
        } else if rest.starts_with("<!") {
            // <!DOCTYPE (any case) or anything else declaration-like.
            return Err(PrologError::Doctype);
        } else if let Some(r) = rest.strip_prefix('<') {
            // Find the end of the start tag, honouring quoted attribute values.
            let mut quote: Option<char> = None;
            for (i, c) in r.char_indices() {
                match (quote, c) {
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), _) => {}
                    (None, '"' | '\'') => quote = Some(c),
                    (None, '>') => return Ok(Some(&r[..=i])),
                    (None, _) => {}
                }
            }
            return Ok(Some(r));
        } else {
            return Ok(None);
        }
    }
}

/// Value of a pseudo-attribute in a processing instruction's data.
fn pseudo_attr(data: &str, name: &str) -> Option<String> {
    let mut rest = data;
    while let Some(pos) = rest.find(name) {
        let before_ok = pos == 0
            || rest[..pos]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace);
        let after = rest[pos + name.len()..].trim_start();
        if before_ok {
            if let Some(v) = after.strip_prefix('=') {
                let v = v.trim_start();
                let q = v.chars().next()?;
                if q == '"' || q == '\'' {
                    let body = &v[1..];
                    let end = body.find(q)?;
                    return Some(body[..end].to_string());
                }
            }
        }
        rest = &rest[pos + name.len()..];
    }
    None
}

fn check_depth(doc: &roxmltree::Document<'_>, max_depth: usize) -> Result<(), CcdaError> {
    // Node ids are assigned in document order, so a parent always precedes
    // its children: one iterative pass computes every depth.
    let mut depths: Vec<usize> = Vec::new();
    for node in doc.descendants() {
        let id = node.id().get_usize();
        let d = match node.parent() {
            Some(p) => depths.get(p.id().get_usize()).copied().unwrap_or(0) + 1,
            None => 0,
        };
        if node.is_element() && d > max_depth {
            return Err(CcdaError::TooDeep { limit: max_depth });
        }
        if depths.len() <= id {
            depths.resize(id + 1, 0);
        }
        depths[id] = d;
    }
    Ok(())
}

// ------------------------------------------------------------- extraction

type XNode<'a, 'i> = roxmltree::Node<'a, 'i>;

fn expanded_name(ns: Option<&str>, local: &str) -> String {
    match ns {
        Some(ns) => format!("{{{ns}}}{local}"),
        None => local.to_string(),
    }
}

fn is_v3(n: &XNode<'_, '_>, name: &str) -> bool {
    n.is_element() && n.tag_name().name() == name && n.tag_name().namespace() == Some(HL7_V3_NS)
}

fn children<'a, 'i: 'a>(n: XNode<'a, 'i>, name: &'a str) -> impl Iterator<Item = XNode<'a, 'i>> {
    n.children().filter(move |c| is_v3(c, name))
}

fn child<'a, 'i: 'a>(n: XNode<'a, 'i>, name: &'a str) -> Option<XNode<'a, 'i>> {
    n.children().find(|c| is_v3(c, name))
}

fn attr(n: XNode<'_, '_>, name: &str) -> Option<String> {
    n.attribute(name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn all_text(n: XNode<'_, '_>) -> String {
    n.descendants()
        .filter(|d| d.is_text())
        .filter_map(|d| d.text())
        .collect()
}

/// Trim and collapse runs of whitespace to one space.
fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn instance_id(n: XNode<'_, '_>) -> InstanceId {
    InstanceId {
        root: attr(n, "root"),
        extension: attr(n, "extension"),
    }
}

fn code(n: XNode<'_, '_>) -> Code {
    Code {
        code: attr(n, "code"),
        code_system: attr(n, "codeSystem"),
        display_name: attr(n, "displayName"),
    }
}

/// A person name (`PN`): prefix, given, family, suffix in that order; a
/// name written as plain text is used as it is.
fn person_name(n: XNode<'_, '_>) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for kind in ["prefix", "given", "family", "suffix"] {
        for p in children(n, kind) {
            let t = collapse(&all_text(p));
            if !t.is_empty() {
                parts.push(t);
            }
        }
    }
    let joined = if parts.is_empty() {
        collapse(&all_text(n))
    } else {
        parts.join(" ")
    };
    Some(joined).filter(|s| !s.is_empty())
}

/// The structured parts of a person name, if it has any.
fn name_parts(n: XNode<'_, '_>) -> Option<NameParts> {
    let parts = |kind: &str| -> Vec<String> {
        children(n, kind)
            .map(|p| collapse(&all_text(p)))
            .filter(|t| !t.is_empty())
            .collect()
    };
    let family = parts("family");
    let np = NameParts {
        prefix: parts("prefix"),
        given: parts("given"),
        family: Some(family.join(" ")).filter(|f| !f.is_empty()),
        suffix: parts("suffix"),
    };
    (np != NameParts::default()).then_some(np)
}

fn patient(role: XNode<'_, '_>) -> Patient {
    let mut p = Patient {
        ids: children(role, "id").map(instance_id).collect(),
        ..Patient::default()
    };
    if let Some(pat) = child(role, "patient") {
        p.names = children(pat, "name").filter_map(person_name).collect();
        p.name_parts = children(pat, "name").filter_map(name_parts).collect();
        p.birth_time = child(pat, "birthTime").and_then(|n| attr(n, "value"));
        p.gender = child(pat, "administrativeGenderCode").and_then(|n| attr(n, "code"));
    }
    p
}

fn author_name(a: XNode<'_, '_>) -> Option<String> {
    let person = child(a, "assignedPerson")
        .and_then(|p| child(p, "name"))
        .and_then(person_name);
    let device = child(a, "assignedAuthoringDevice").and_then(|d| {
        let parts: Vec<String> = ["manufacturerModelName", "softwareName"]
            .iter()
            .filter_map(|k| child(d, k))
            .map(|n| collapse(&all_text(n)))
            .filter(|s| !s.is_empty())
            .collect();
        Some(parts.join(", ")).filter(|s| !s.is_empty())
    });
    let org = child(a, "representedOrganization")
        .and_then(|o| child(o, "name"))
        .map(|n| collapse(&all_text(n)))
        .filter(|s| !s.is_empty());
    match (person.or(device), org) {
        (Some(who), Some(org)) => Some(format!("{who} ({org})")),
        (who, org) => who.or(org),
    }
}

fn section(s: XNode<'_, '_>, depth: usize, max_depth: usize) -> Result<Section, CcdaError> {
    if depth > max_depth {
        return Err(CcdaError::TooDeep { limit: max_depth });
    }
    let mut sec = Section {
        code: child(s, "code").map(code),
        title: child(s, "title")
            .map(|n| collapse(&all_text(n)))
            .filter(|t| !t.is_empty()),
        narrative: match child(s, "text") {
            Some(t) => Some(to_tree(t, 0, max_depth)?),
            None => None,
        },
        sections: Vec::new(),
    };
    for c in children(s, "component") {
        for sub in children(c, "section") {
            sec.sections.push(section(sub, depth + 1, max_depth)?);
        }
    }
    Ok(sec)
}

fn to_tree(n: XNode<'_, '_>, depth: usize, max_depth: usize) -> Result<Node, CcdaError> {
    if depth > max_depth {
        return Err(CcdaError::TooDeep { limit: max_depth });
    }
    let ns = n.tag_name().namespace();
    let local = n.tag_name().name();
    let name = if ns == Some(HL7_V3_NS) {
        local.to_string()
    } else {
        expanded_name(ns, local)
    };
    let attrs = n
        .attributes()
        .map(|a| {
            (
                expanded_name(a.namespace(), a.name()),
                a.value().to_string(),
            )
        })
        .collect();
    let mut kids = Vec::new();
    for c in n.children() {
        if c.is_element() {
            kids.push(to_tree(c, depth + 1, max_depth)?);
        } else if c.is_text() {
            if let Some(t) = c.text() {
                kids.push(Node::Text(t.to_string()));
            }
        }
    }
    Ok(Node::Element {
        name,
        attrs,
        children: kids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"<?xml version="1.0"?>
<?xml-stylesheet type="text/xsl" href="CDA.xsl"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:sdtc="urn:hl7-org:sdtc">
  <id root="2.16.840.1.113883.19.5" extension="doc-1"/>
  <code code="34133-9" codeSystem="2.16.840.1.113883.6.1" displayName="Summarization of Episode Note"/>
  <title>Test CCD</title>
  <effectiveTime value="20240102130405-0500"/>
  <setId root="1.2.3" extension="set"/>
  <versionNumber value="2"/>
  <recordTarget><patientRole>
    <id root="2.16.840.1.113883.4.1" extension="111-00-2330"/>
    <patient>
      <name><prefix>Ms.</prefix><given>Eve</given><given>B.</given><family>Everywoman</family></name>
      <administrativeGenderCode code="F"/>
      <birthTime value="19750501"/>
    </patient>
  </patientRole></recordTarget>
  <author><assignedAuthor>
    <assignedPerson><name><given>Henry</given><family>Seven</family></name></assignedPerson>
    <representedOrganization><name>Good Health Clinic</name></representedOrganization>
  </assignedAuthor></author>
  <author><assignedAuthor>
    <assignedAuthoringDevice><softwareName>EHR 9</softwareName></assignedAuthoringDevice>
  </assignedAuthor></author>
  <custodian><assignedCustodian><representedCustodianOrganization>
    <name>Good Health Records</name>
  </representedCustodianOrganization></assignedCustodian></custodian>
  <component><structuredBody>
    <component><section>
      <code code="48765-2"/>
      <title>Allergies</title>
      <text><paragraph>None <content styleCode="Bold">known</content></paragraph><!-- c --></text>
      <component><section><title>Nested</title></section></component>
    </section></component>
    <component><section><title>Problems</title></section></component>
  </structuredBody></component>
</ClinicalDocument>"#;

    #[test]
    fn parses_header_and_sections() {
        assert!(is_ccda(MINIMAL.as_bytes()));
        let d = parse(MINIMAL.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(d.title.as_deref(), Some("Test CCD"));
        assert_eq!(d.stylesheet.as_deref(), Some("CDA.xsl"));
        assert_eq!(d.version.as_deref(), Some("2"));
        assert_eq!(d.id.as_ref().unwrap().extension.as_deref(), Some("doc-1"));
        assert_eq!(d.set_id.as_ref().unwrap().root.as_deref(), Some("1.2.3"));
        assert_eq!(d.code.as_ref().unwrap().code.as_deref(), Some("34133-9"));
        assert_eq!(d.effective_time.as_deref(), Some("20240102130405-0500"));
        let p = &d.patients[0];
        assert_eq!(p.names, vec!["Ms. Eve B. Everywoman".to_string()]);
        assert_eq!(p.gender.as_deref(), Some("F"));
        assert_eq!(p.birth_time.as_deref(), Some("19750501"));
        assert_eq!(p.ids[0].extension.as_deref(), Some("111-00-2330"));
        assert_eq!(
            p.name_parts,
            vec![NameParts {
                prefix: vec!["Ms.".into()],
                given: vec!["Eve".into(), "B.".into()],
                family: Some("Everywoman".into()),
                suffix: vec![],
            }]
        );
        assert_eq!(
            d.authors,
            vec![
                "Henry Seven (Good Health Clinic)".to_string(),
                "EHR 9".into()
            ]
        );
        assert_eq!(d.custodian.as_deref(), Some("Good Health Records"));
        assert_eq!(d.sections.len(), 2);
        assert_eq!(d.sections[0].sections[0].title.as_deref(), Some("Nested"));
        assert_eq!(d.all_sections().len(), 3);
        let n = d.sections[0].narrative.as_ref().unwrap();
        assert_eq!(n.text_content(), "None known");
        // Serialises (for the JSON API).
        assert!(serde_json::to_string(&d).unwrap().contains("Everywoman"));
    }

    #[test]
    fn refuses_doctype_even_empty() {
        let x = MINIMAL.replace(
            "<?xml-stylesheet",
            "<!DOCTYPE ClinicalDocument>\n<?xml-stylesheet",
        );
        assert!(matches!(
            parse(x.as_bytes(), &Limits::default()),
            Err(CcdaError::DtdNotAllowed)
        ));
    }

    #[test]
    fn refuses_large_before_parsing() {
        let e = parse(
            b"<x/>",
            &Limits {
                max_bytes: 3,
                max_depth: 10,
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "document too large (4 bytes, limit 3)");
    }

    #[test]
    fn refuses_deep() {
        let mut x = String::from(r#"<ClinicalDocument xmlns="urn:hl7-org:v3">"#);
        x.push_str(&"<a>".repeat(300));
        x.push_str(&"</a>".repeat(300));
        x.push_str("</ClinicalDocument>");
        let e = parse(x.as_bytes(), &Limits::default()).unwrap_err();
        assert!(matches!(e, CcdaError::TooDeep { limit: 256 }), "{e}");
        // A caller's huge limit is capped, so walking cannot exhaust the stack.
        let n = 5000;
        let x = format!(
            r#"<ClinicalDocument xmlns="urn:hl7-org:v3">{}{}</ClinicalDocument>"#,
            "<a>".repeat(n),
            "</a>".repeat(n)
        );
        let huge = Limits {
            max_depth: usize::MAX,
            ..Limits::default()
        };
        let e = parse(x.as_bytes(), &huge).unwrap_err();
        assert!(
            matches!(
                e,
                CcdaError::TooDeep {
                    limit: HARD_MAX_DEPTH
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_other_roots_and_garbage() {
        let e = parse(
            b"<html xmlns='http://www.w3.org/1999/xhtml'/>",
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a C-CDA: root element is {http://www.w3.org/1999/xhtml}html"
        );
        // Right name, wrong namespace.
        let e = parse(b"<ClinicalDocument/>", &Limits::default()).unwrap_err();
        assert!(matches!(e, CcdaError::NotCcda(_)));
        assert!(!is_ccda(b"<ClinicalDocument/>"));
        let e = parse(b"\xff\xfe\x00", &Limits::default()).unwrap_err();
        assert!(e.to_string().starts_with("not XML"), "{e}");
        let e = parse(b"<a><b></a>", &Limits::default()).unwrap_err();
        assert!(e.to_string().starts_with("not XML"), "{e}");
        assert!(!is_ccda(b"hello"));
    }

    #[test]
    fn prefixed_and_utf16() {
        let x = r#"<cda:ClinicalDocument xmlns:cda="urn:hl7-org:v3"><cda:title>T</cda:title></cda:ClinicalDocument>"#;
        assert!(is_ccda(x.as_bytes()));
        assert_eq!(
            parse(x.as_bytes(), &Limits::default())
                .unwrap()
                .title
                .as_deref(),
            Some("T")
        );
        let mut utf16 = vec![0xFF, 0xFE];
        for u in x.encode_utf16() {
            utf16.extend_from_slice(&u.to_le_bytes());
        }
        assert!(is_ccda(&utf16));
        assert_eq!(
            parse(&utf16, &Limits::default()).unwrap().title.as_deref(),
            Some("T")
        );
    }

    #[test]
    fn service_event_period() {
        let xml = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/ccda/hl7-discharge-summary.xml"),
        )
        .unwrap();
        let d = parse(&xml, &Limits::default()).unwrap();
        assert_eq!(d.service_start.as_deref(), Some("201409091904-0500"));
        assert_eq!(d.service_end.as_deref(), Some("201409161904-0500"));
        let xml = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/ccda/hl7-ccd-2.xml"),
        )
        .unwrap();
        let d = parse(&xml, &Limits::default()).unwrap();
        assert_eq!(d.service_start.as_deref(), Some("20141001"));
        assert_eq!(d.service_end.as_deref(), Some("20141015103026-0500"));
        // No documentationOf: nothing.
        let d = parse(MINIMAL.as_bytes(), &Limits::default()).unwrap();
        assert_eq!((d.service_start, d.service_end), (None, None));
    }

    #[test]
    fn pseudo_attributes() {
        assert_eq!(
            pseudo_attr(r#"type="text/xsl" href='a.xsl'"#, "href").as_deref(),
            Some("a.xsl")
        );
        assert_eq!(pseudo_attr(r#"xhref="no""#, "href"), None);
    }
}
