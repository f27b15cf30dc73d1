//! IMAP command syntax (RFC 3501 section 9): a cursor over one assembled
//! command (its literals spliced in as `{n}\r\n` + bytes) and the typed
//! commands it yields. Every error is a value; the session answers BAD.

use std::fmt;

/// Why a command could not be parsed; the text goes into the BAD reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError(pub String);

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Parsed<T> = Result<T, SyntaxError>;

/// Deepest nesting of parenthesised, NOT and OR search keys. Parsing,
/// matching and dropping a key recurse once per level, so without a bound a
/// command of `(((...` (the session takes 256 KiB of command text, before
/// login) overflows the stack and aborts the whole daemon. Real clients
/// nest a few levels; a long OR chain of n terms nests n - 1.
pub const MAX_SEARCH_DEPTH: usize = 256;

fn err<T>(what: impl Into<String>) -> Parsed<T> {
    Err(SyntaxError(what.into()))
}

/// One end of a sequence range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqBound {
    Num(u64),
    /// `*`: the largest number in use.
    Star,
}

/// A sequence set such as `1:*` or `2,4:5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceSet(pub Vec<(SeqBound, SeqBound)>);

impl SequenceSet {
    /// Whether `n` is in the set, with `*` standing for `star`.
    pub fn contains(&self, n: u64, star: u64) -> bool {
        let value = |b: SeqBound| match b {
            SeqBound::Num(v) => v,
            SeqBound::Star => star,
        };
        self.0.iter().any(|(a, b)| {
            let (a, b) = (value(*a), value(*b));
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            n >= lo && n <= hi
        })
    }
}

/// What part of a message a `BODY[...]` section names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionText {
    Full,
    Header,
    HeaderFields(Vec<String>),
    HeaderFieldsNot(Vec<String>),
    Text,
    Mime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub part: Vec<u32>,
    pub text: SectionText,
}

impl Section {
    /// The section as echoed in the FETCH response.
    pub fn render(&self) -> String {
        let mut s: Vec<String> = self.part.iter().map(|p| p.to_string()).collect();
        let text = match &self.text {
            SectionText::Full => None,
            SectionText::Header => Some("HEADER".to_string()),
            SectionText::Text => Some("TEXT".to_string()),
            SectionText::Mime => Some("MIME".to_string()),
            SectionText::HeaderFields(f) => Some(format!("HEADER.FIELDS ({})", f.join(" "))),
            SectionText::HeaderFieldsNot(f) => Some(format!("HEADER.FIELDS.NOT ({})", f.join(" "))),
        };
        if let Some(t) = text {
            s.push(t);
        }
        s.join(".")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAtt {
    Flags,
    Uid,
    InternalDate,
    Rfc822Size,
    Rfc822,
    Rfc822Header,
    Rfc822Text,
    Envelope,
    BodyStructure,
    /// `BODY` without a section: the non-extensible structure.
    Body,
    Section {
        peek: bool,
        section: Section,
        partial: Option<(u64, u64)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    Replace,
    Add,
    Remove,
}

/// A search key (RFC 3501 section 6.4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchKey {
    All,
    /// A flag that must be set (`true`) or clear (`false`).
    Flag(String, bool),
    New,
    Old,
    Recent,
    Header(String, String),
    Body(String),
    Text(String),
    Before(i64),
    On(i64),
    Since(i64),
    SentBefore(i64),
    SentOn(i64),
    SentSince(i64),
    Larger(u64),
    Smaller(u64),
    Uid(SequenceSet),
    Seq(SequenceSet),
    Not(Box<SearchKey>),
    Or(Box<SearchKey>, Box<SearchKey>),
    And(Vec<SearchKey>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    Id,
    Namespace,
    Login(String, String),
    Authenticate(String, Option<String>),
    Select(String),
    Examine(String),
    Create(String),
    Delete(String),
    Rename(String, String),
    Subscribe(String),
    Unsubscribe(String),
    List(String, String),
    Lsub(String, String),
    Status(String, Vec<String>),
    Append {
        mailbox: String,
        flags: Vec<String>,
        message: Vec<u8>,
    },
    Check,
    Close,
    Unselect,
    Expunge,
    Search {
        uid: bool,
        key: SearchKey,
    },
    Fetch {
        uid: bool,
        set: SequenceSet,
        atts: Vec<FetchAtt>,
    },
    Store {
        uid: bool,
        set: SequenceSet,
        mode: StoreMode,
        silent: bool,
        flags: Vec<String>,
    },
    Copy {
        uid: bool,
        set: SequenceSet,
        mailbox: String,
    },
    UidExpunge(SequenceSet),
    Idle,
}

/// A cursor over one command.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

fn is_list_char(b: u8) -> bool {
    is_atom_char(b) || matches!(b, b'%' | b'*' | b']')
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> Parsed<()> {
        if self.eat(b) {
            Ok(())
        } else {
            err(format!("expected '{}'", b as char))
        }
    }

    pub fn sp(&mut self) -> Parsed<()> {
        self.expect(b' ')
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        &self.buf[start..self.pos]
    }

    pub fn atom(&mut self) -> Parsed<String> {
        let a = self.take_while(is_atom_char);
        if a.is_empty() {
            return err("expected an atom");
        }
        Ok(String::from_utf8_lossy(a).into_owned())
    }

    fn number(&mut self) -> Parsed<u64> {
        let d = self.take_while(|b| b.is_ascii_digit());
        if d.is_empty() || d.len() > 19 {
            return err("expected a number");
        }
        std::str::from_utf8(d)
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or_else(|| err("bad number"), Ok)
    }

    fn quoted(&mut self) -> Parsed<Vec<u8>> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None | Some(b'\r') | Some(b'\n') => return err("unterminated quoted string"),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            out.push(c);
                            self.pos += 1;
                        }
                        _ => return err("bad escape in quoted string"),
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn literal(&mut self) -> Parsed<Vec<u8>> {
        self.expect(b'{')?;
        let n = self.number()?;
        self.eat(b'+');
        self.expect(b'}')?;
        self.expect(b'\r')?;
        self.expect(b'\n')?;
        let n = usize::try_from(n).map_err(|_| SyntaxError("literal too large".into()))?;
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return err("literal shorter than announced");
        };
        let data = self.buf[self.pos..end].to_vec();
        self.pos = end;
        Ok(data)
    }

    /// A quoted string or a literal.
    pub fn string(&mut self) -> Parsed<Vec<u8>> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal(),
            _ => err("expected a string"),
        }
    }

    pub fn astring_bytes(&mut self) -> Parsed<Vec<u8>> {
        match self.peek() {
            Some(b'"') | Some(b'{') => self.string(),
            _ => {
                let a = self.take_while(is_astring_char);
                if a.is_empty() {
                    return err("expected an astring");
                }
                Ok(a.to_vec())
            }
        }
    }

    pub fn astring(&mut self) -> Parsed<String> {
        let b = self.astring_bytes()?;
        String::from_utf8(b).map_or_else(|_| err("string is not UTF-8"), Ok)
    }

    fn list_mailbox(&mut self) -> Parsed<String> {
        match self.peek() {
            Some(b'"') | Some(b'{') => {
                let b = self.string()?;
                String::from_utf8(b).map_or_else(|_| err("string is not UTF-8"), Ok)
            }
            _ => {
                let a = self.take_while(is_list_char);
                if a.is_empty() {
                    return err("expected a mailbox pattern");
                }
                Ok(String::from_utf8_lossy(a).into_owned())
            }
        }
    }

    fn flag(&mut self) -> Parsed<String> {
        if self.eat(b'\\') {
            if self.eat(b'*') {
                return Ok("\\*".into());
            }
            Ok(format!("\\{}", self.atom()?))
        } else {
            self.atom()
        }
    }

    /// `(flag flag ...)`.
    fn flag_list(&mut self) -> Parsed<Vec<String>> {
        self.expect(b'(')?;
        let mut flags = Vec::new();
        if self.eat(b')') {
            return Ok(flags);
        }
        loop {
            flags.push(self.flag()?);
            if self.eat(b')') {
                return Ok(flags);
            }
            self.sp()?;
        }
    }

    pub fn sequence_set(&mut self) -> Parsed<SequenceSet> {
        let mut ranges = Vec::new();
        loop {
            let a = self.seq_bound()?;
            let b = if self.eat(b':') { self.seq_bound()? } else { a };
            ranges.push((a, b));
            if !self.eat(b',') {
                return Ok(SequenceSet(ranges));
            }
        }
    }

    fn seq_bound(&mut self) -> Parsed<SeqBound> {
        if self.eat(b'*') {
            return Ok(SeqBound::Star);
        }
        match self.number()? {
            0 => err("sequence number 0"),
            n => Ok(SeqBound::Num(n)),
        }
    }

    fn fetch_atts(&mut self) -> Parsed<Vec<FetchAtt>> {
        if self.eat(b'(') {
            let mut atts = Vec::new();
            loop {
                atts.push(self.fetch_att()?);
                if self.eat(b')') {
                    return Ok(atts);
                }
                self.sp()?;
            }
        }
        let save = self.pos;
        let word = self
            .take_while(|b| b.is_ascii_alphabetic())
            .to_ascii_uppercase();
        match word.as_slice() {
            b"ALL" => Ok(vec![
                FetchAtt::Flags,
                FetchAtt::InternalDate,
                FetchAtt::Rfc822Size,
                FetchAtt::Envelope,
            ]),
            b"FAST" => Ok(vec![
                FetchAtt::Flags,
                FetchAtt::InternalDate,
                FetchAtt::Rfc822Size,
            ]),
            b"FULL" => Ok(vec![
                FetchAtt::Flags,
                FetchAtt::InternalDate,
                FetchAtt::Rfc822Size,
                FetchAtt::Envelope,
                FetchAtt::Body,
            ]),
            _ => {
                self.pos = save;
                Ok(vec![self.fetch_att()?])
            }
        }
    }

    fn fetch_att(&mut self) -> Parsed<FetchAtt> {
        let word = self
            .take_while(|b| b.is_ascii_alphanumeric() || b == b'.')
            .to_ascii_uppercase();
        let att = match word.as_slice() {
            b"FLAGS" => FetchAtt::Flags,
            b"UID" => FetchAtt::Uid,
            b"INTERNALDATE" => FetchAtt::InternalDate,
            b"RFC822.SIZE" => FetchAtt::Rfc822Size,
            b"RFC822" => FetchAtt::Rfc822,
            b"RFC822.HEADER" => FetchAtt::Rfc822Header,
            b"RFC822.TEXT" => FetchAtt::Rfc822Text,
            b"ENVELOPE" => FetchAtt::Envelope,
            b"BODYSTRUCTURE" => FetchAtt::BodyStructure,
            b"BODY" | b"BODY.PEEK" => {
                let peek = word.as_slice() == b"BODY.PEEK";
                if self.peek() != Some(b'[') {
                    if peek {
                        return err("BODY.PEEK needs a section");
                    }
                    return Ok(FetchAtt::Body);
                }
                let section = self.section()?;
                let partial = if self.eat(b'<') {
                    let start = self.number()?;
                    self.expect(b'.')?;
                    let len = self.number()?;
                    self.expect(b'>')?;
                    Some((start, len))
                } else {
                    None
                };
                FetchAtt::Section {
                    peek,
                    section,
                    partial,
                }
            }
            _ => {
                return err(format!(
                    "unknown fetch attribute {}",
                    String::from_utf8_lossy(&word)
                ))
            }
        };
        Ok(att)
    }

    fn section(&mut self) -> Parsed<Section> {
        self.expect(b'[')?;
        let mut part = Vec::new();
        let mut text = SectionText::Full;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            let n = self.number()?;
            let n = u32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .map_or_else(|| err("bad section part"), Ok)?;
            part.push(n);
            if !self.eat(b'.') {
                break;
            }
        }
        if self.peek() != Some(b']') {
            let word = self
                .take_while(|b| b.is_ascii_alphabetic() || b == b'.')
                .to_ascii_uppercase();
            text = match word.as_slice() {
                b"HEADER" => SectionText::Header,
                b"TEXT" => SectionText::Text,
                b"MIME" if !part.is_empty() => SectionText::Mime,
                b"HEADER.FIELDS" | b"HEADER.FIELDS.NOT" => {
                    self.sp()?;
                    self.expect(b'(')?;
                    let mut fields = Vec::new();
                    loop {
                        fields.push(self.astring()?);
                        if self.eat(b')') {
                            break;
                        }
                        self.sp()?;
                    }
                    if word.as_slice() == b"HEADER.FIELDS" {
                        SectionText::HeaderFields(fields)
                    } else {
                        SectionText::HeaderFieldsNot(fields)
                    }
                }
                _ => return err("bad section"),
            };
        }
        self.expect(b']')?;
        Ok(Section { part, text })
    }

    fn date(&mut self) -> Parsed<i64> {
        let raw = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            self.take_while(|b| b.is_ascii_alphanumeric() || b == b'-')
                .to_vec()
        };
        let s = String::from_utf8_lossy(&raw);
        parse_search_date(&s).map_or_else(|| err("bad date"), Ok)
    }

    fn search_keys(&mut self) -> Parsed<SearchKey> {
        let mut keys = vec![self.search_key(0)?];
        while self.eat(b' ') {
            keys.push(self.search_key(0)?);
        }
        Ok(if keys.len() == 1 {
            keys.remove(0)
        } else {
            SearchKey::And(keys)
        })
    }

    /// One search key, `depth` parentheses, NOTs and ORs down.
    fn search_key(&mut self, depth: usize) -> Parsed<SearchKey> {
        if depth >= MAX_SEARCH_DEPTH {
            return err(format!(
                "search keys nested more than {MAX_SEARCH_DEPTH} deep"
            ));
        }
        if self.eat(b'(') {
            let mut keys = vec![self.search_key(depth + 1)?];
            while self.eat(b' ') {
                keys.push(self.search_key(depth + 1)?);
            }
            self.expect(b')')?;
            return Ok(SearchKey::And(keys));
        }
        if self.peek().is_some_and(|b| b.is_ascii_digit() || b == b'*') {
            return Ok(SearchKey::Seq(self.sequence_set()?));
        }
        let word = self.atom()?.to_ascii_uppercase();
        let flag = |f: &str, set: bool| Ok(SearchKey::Flag(f.to_string(), set));
        match word.as_str() {
            "ALL" => Ok(SearchKey::All),
            "ANSWERED" => flag("\\Answered", true),
            "DELETED" => flag("\\Deleted", true),
            "DRAFT" => flag("\\Draft", true),
            "FLAGGED" => flag("\\Flagged", true),
            "SEEN" => flag("\\Seen", true),
            "UNANSWERED" => flag("\\Answered", false),
            "UNDELETED" => flag("\\Deleted", false),
            "UNDRAFT" => flag("\\Draft", false),
            "UNFLAGGED" => flag("\\Flagged", false),
            "UNSEEN" => flag("\\Seen", false),
            "NEW" => Ok(SearchKey::New),
            "OLD" => Ok(SearchKey::Old),
            "RECENT" => Ok(SearchKey::Recent),
            "KEYWORD" | "UNKEYWORD" => {
                self.sp()?;
                let k = self.atom()?;
                Ok(SearchKey::Flag(k, word == "KEYWORD"))
            }
            "BCC" | "CC" | "FROM" | "TO" | "SUBJECT" => {
                self.sp()?;
                let v = self.astring_lossy()?;
                Ok(SearchKey::Header(word.clone(), v))
            }
            "HEADER" => {
                self.sp()?;
                let name = self.astring_lossy()?;
                self.sp()?;
                let v = self.astring_lossy()?;
                Ok(SearchKey::Header(name, v))
            }
            "BODY" => {
                self.sp()?;
                Ok(SearchKey::Body(self.astring_lossy()?))
            }
            "TEXT" => {
                self.sp()?;
                Ok(SearchKey::Text(self.astring_lossy()?))
            }
            "BEFORE" | "ON" | "SINCE" | "SENTBEFORE" | "SENTON" | "SENTSINCE" => {
                self.sp()?;
                let d = self.date()?;
                Ok(match word.as_str() {
                    "BEFORE" => SearchKey::Before(d),
                    "ON" => SearchKey::On(d),
                    "SINCE" => SearchKey::Since(d),
                    "SENTBEFORE" => SearchKey::SentBefore(d),
                    "SENTON" => SearchKey::SentOn(d),
                    _ => SearchKey::SentSince(d),
                })
            }
            "LARGER" => {
                self.sp()?;
                Ok(SearchKey::Larger(self.number()?))
            }
            "SMALLER" => {
                self.sp()?;
                Ok(SearchKey::Smaller(self.number()?))
            }
            "UID" => {
                self.sp()?;
                Ok(SearchKey::Uid(self.sequence_set()?))
            }
            "NOT" => {
                self.sp()?;
                Ok(SearchKey::Not(Box::new(self.search_key(depth + 1)?)))
            }
            "OR" => {
                self.sp()?;
                let a = self.search_key(depth + 1)?;
                self.sp()?;
                let b = self.search_key(depth + 1)?;
                Ok(SearchKey::Or(Box::new(a), Box::new(b)))
            }
            _ => err(format!("unknown search key {word}")),
        }
    }

    fn astring_lossy(&mut self) -> Parsed<String> {
        Ok(String::from_utf8_lossy(&self.astring_bytes()?).into_owned())
    }

    fn end(&self) -> Parsed<()> {
        if self.at_end() {
            Ok(())
        } else {
            err("unexpected characters at end of command")
        }
    }
}

/// Parses `d-Mon-yyyy` into Unix seconds at midnight UTC.
pub fn parse_search_date(s: &str) -> Option<i64> {
    let mut it = s.trim().split('-');
    let day: u32 = it.next()?.parse().ok()?;
    let month = month_number(it.next()?)?;
    let year: i32 = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(year, month, day)?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

fn month_number(m: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let m = m.to_ascii_lowercase();
    MONTHS.iter().position(|x| *x == m).map(|i| i as u32 + 1)
}

/// Splits off the tag; `None` when the line has no valid tag.
pub fn split_tag(line: &[u8]) -> Option<(String, &[u8])> {
    let end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    let tag = &line[..end];
    if tag.is_empty() || !tag.iter().all(|b| is_astring_char(*b) && *b != b'+') {
        return None;
    }
    let rest = if end < line.len() {
        &line[end + 1..]
    } else {
        &[][..]
    };
    Some((String::from_utf8_lossy(tag).into_owned(), rest))
}

/// Parses a command (everything after the tag and its space).
pub fn parse_command(rest: &[u8]) -> Parsed<Command> {
    let mut c = Cursor::new(rest);
    let name = c
        .take_while(|b| b.is_ascii_alphanumeric())
        .to_ascii_uppercase();
    let name = String::from_utf8_lossy(&name).into_owned();
    let cmd = match name.as_str() {
        "CAPABILITY" => Command::Capability,
        "NOOP" => Command::Noop,
        "LOGOUT" => Command::Logout,
        "STARTTLS" => Command::StartTls,
        "CHECK" => Command::Check,
        "CLOSE" => Command::Close,
        "UNSELECT" => Command::Unselect,
        "EXPUNGE" => Command::Expunge,
        "IDLE" => Command::Idle,
        "NAMESPACE" => Command::Namespace,
        "ID" => {
            // The client's identification is only logged by real servers;
            // accept any parameter list.
            c.pos = c.buf.len();
            Command::Id
        }
        "LOGIN" => {
            c.sp()?;
            let user = c.astring()?;
            c.sp()?;
            let pass = c.astring()?;
            Command::Login(user, pass)
        }
        "AUTHENTICATE" => {
            c.sp()?;
            let mech = c.atom()?;
            let initial = if c.eat(b' ') {
                let t =
                    c.take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
                Some(String::from_utf8_lossy(t).into_owned())
            } else {
                None
            };
            Command::Authenticate(mech, initial)
        }
        "SELECT" | "EXAMINE" | "CREATE" | "DELETE" | "SUBSCRIBE" | "UNSUBSCRIBE" => {
            c.sp()?;
            let m = c.astring()?;
            match name.as_str() {
                "SELECT" => Command::Select(m),
                "EXAMINE" => Command::Examine(m),
                "CREATE" => Command::Create(m),
                "DELETE" => Command::Delete(m),
                "SUBSCRIBE" => Command::Subscribe(m),
                _ => Command::Unsubscribe(m),
            }
        }
        "RENAME" => {
            c.sp()?;
            let a = c.astring()?;
            c.sp()?;
            let b = c.astring()?;
            Command::Rename(a, b)
        }
        "LIST" | "LSUB" => {
            c.sp()?;
            let reference = c.astring_or_empty()?;
            c.sp()?;
            let pattern = c.list_mailbox()?;
            if name == "LIST" {
                Command::List(reference, pattern)
            } else {
                Command::Lsub(reference, pattern)
            }
        }
        "STATUS" => {
            c.sp()?;
            let m = c.astring()?;
            c.sp()?;
            c.expect(b'(')?;
            let mut items = Vec::new();
            loop {
                items.push(c.atom()?.to_ascii_uppercase());
                if c.eat(b')') {
                    break;
                }
                c.sp()?;
            }
            Command::Status(m, items)
        }
        "APPEND" => {
            c.sp()?;
            let mailbox = c.astring()?;
            c.sp()?;
            let mut flags = Vec::new();
            if c.peek() == Some(b'(') {
                flags = c.flag_list()?;
                c.sp()?;
            }
            if c.peek() == Some(b'"') {
                // The internal date is not kept: the store stamps arrival.
                c.quoted()?;
                c.sp()?;
            }
            let message = c.literal()?;
            Command::Append {
                mailbox,
                flags,
                message,
            }
        }
        "SEARCH" => search(&mut c, false)?,
        "FETCH" => fetch(&mut c, false)?,
        "STORE" => store(&mut c, false)?,
        "COPY" => copy(&mut c, false)?,
        "UID" => {
            c.sp()?;
            let sub = c.atom()?.to_ascii_uppercase();
            match sub.as_str() {
                "SEARCH" => search(&mut c, true)?,
                "FETCH" => fetch(&mut c, true)?,
                "STORE" => store(&mut c, true)?,
                "COPY" => copy(&mut c, true)?,
                "EXPUNGE" => {
                    c.sp()?;
                    Command::UidExpunge(c.sequence_set()?)
                }
                _ => return err(format!("unknown UID command {sub}")),
            }
        }
        "" => return err("missing command"),
        _ => return err(format!("unknown command {name}")),
    };
    c.end()?;
    Ok(cmd)
}

impl Cursor<'_> {
    /// An astring that may be the empty quoted string (LIST reference).
    fn astring_or_empty(&mut self) -> Parsed<String> {
        let b = self.astring_bytes()?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
}

fn search(c: &mut Cursor<'_>, uid: bool) -> Parsed<Command> {
    c.sp()?;
    let save = c.pos;
    if let Ok(word) = c.atom() {
        if word.eq_ignore_ascii_case("CHARSET") {
            c.sp()?;
            let charset = c.astring()?;
            if !charset.eq_ignore_ascii_case("UTF-8") && !charset.eq_ignore_ascii_case("US-ASCII") {
                return err(format!("[BADCHARSET (UTF-8 US-ASCII)] charset {charset}"));
            }
            c.sp()?;
        } else {
            c.pos = save;
        }
    } else {
        c.pos = save;
    }
    Ok(Command::Search {
        uid,
        key: c.search_keys()?,
    })
}

fn fetch(c: &mut Cursor<'_>, uid: bool) -> Parsed<Command> {
    c.sp()?;
    let set = c.sequence_set()?;
    c.sp()?;
    let atts = c.fetch_atts()?;
    Ok(Command::Fetch { uid, set, atts })
}

fn store(c: &mut Cursor<'_>, uid: bool) -> Parsed<Command> {
    c.sp()?;
    let set = c.sequence_set()?;
    c.sp()?;
    let mode = if c.eat(b'+') {
        StoreMode::Add
    } else if c.eat(b'-') {
        StoreMode::Remove
    } else {
        StoreMode::Replace
    };
    let item = c
        .take_while(|b| b.is_ascii_alphabetic() || b == b'.')
        .to_ascii_uppercase();
    let silent = match item.as_slice() {
        b"FLAGS" => false,
        b"FLAGS.SILENT" => true,
        _ => return err("expected FLAGS or FLAGS.SILENT"),
    };
    c.sp()?;
    let flags = if c.peek() == Some(b'(') {
        c.flag_list()?
    } else {
        let mut flags = vec![c.flag()?];
        while c.eat(b' ') {
            flags.push(c.flag()?);
        }
        flags
    };
    Ok(Command::Store {
        uid,
        set,
        mode,
        silent,
        flags,
    })
}

fn copy(c: &mut Cursor<'_>, uid: bool) -> Parsed<Command> {
    c.sp()?;
    let set = c.sequence_set()?;
    c.sp()?;
    let mailbox = c.astring()?;
    Ok(Command::Copy { uid, set, mailbox })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Command {
        parse_command(s.as_bytes()).expect(s)
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            parse("LOGIN bob \"pass word\""),
            Command::Login("bob".into(), "pass word".into())
        );
        assert_eq!(
            parse("login {3}\r\nbob {2}\r\npw"),
            Command::Login("bob".into(), "pw".into())
        );
        assert_eq!(
            parse("LIST \"\" *"),
            Command::List(String::new(), "*".into())
        );
        match parse("UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (From To)]<0.100>)") {
            Command::Fetch { uid, set, atts } => {
                assert!(uid);
                assert!(set.contains(7, 9));
                assert_eq!(atts.len(), 2);
                assert_eq!(
                    atts[1],
                    FetchAtt::Section {
                        peek: true,
                        section: Section {
                            part: vec![],
                            text: SectionText::HeaderFields(vec!["From".into(), "To".into()])
                        },
                        partial: Some((0, 100))
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse("FETCH 2,4:5 FULL"), Command::Fetch { atts, .. } if atts.len() == 5)
        );
        assert!(matches!(
            parse("FETCH 1 BODY[1.2.MIME]"),
            Command::Fetch { .. }
        ));
        assert!(matches!(
            parse("STORE 1 +FLAGS.SILENT (\\Deleted \\Seen)"),
            Command::Store { silent: true, mode: StoreMode::Add, ref flags, .. } if flags.len() == 2
        ));
        assert!(matches!(
            parse("SEARCH CHARSET UTF-8 OR FROM alice NOT SEEN SINCE 1-Feb-2024"),
            Command::Search { .. }
        ));
        assert!(matches!(
            parse("APPEND Sent (\\Seen) \"01-Jan-2024 10:00:00 +0000\" {5+}\r\nhello"),
            Command::Append { ref message, .. } if message == b"hello"
        ));
    }

    /// Found by the imap_command fuzz target: `a SEARCH ((((...` recursed
    /// once per parenthesis (also NOT and OR) until the stack overflowed.
    #[test]
    fn deeply_nested_search_keys_are_refused_not_a_stack_overflow() {
        // A tokio worker's stack (2 MiB), in an unoptimised build.
        let worker = std::thread::Builder::new().stack_size(2 * 1024 * 1024);
        let outcome = worker
            .spawn(|| {
                for (open, close) in [("(", ")"), ("NOT ", ""), ("OR ALL ", "")] {
                    let nested =
                        |n: usize| format!("SEARCH {}SEEN{}", open.repeat(n), close.repeat(n));
                    assert!(
                        matches!(
                            parse_command(nested(MAX_SEARCH_DEPTH - 1).as_bytes()),
                            Ok(Command::Search { .. })
                        ),
                        "{open}: the deepest allowed nesting parses"
                    );
                    let too_deep = parse_command(nested(MAX_SEARCH_DEPTH).as_bytes());
                    assert!(
                        too_deep.is_err_and(|e| e.0.contains("nested")),
                        "{open}: one level more is refused"
                    );
                    // What a client can send in 256 KiB of command text.
                    let hostile = format!("SEARCH {}", open.repeat(256 * 1024 / open.len()));
                    assert!(parse_command(hostile.as_bytes()).is_err());
                }
            })
            .expect("thread");
        assert!(outcome.join().is_ok());
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            "",
            "FOO",
            "LOGIN",
            "FETCH 0 FLAGS",
            "FETCH 1 (FLAGS",
            "LOGIN {10}\r\nab",
            "STORE 1 FLAGZ x",
            "SEARCH FROB",
            "LOGIN \"a",
            "FETCH 1:99999999999999999999999 FLAGS",
        ] {
            assert!(parse_command(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(split_tag(b"+ x").is_none());
        assert_eq!(split_tag(b"a1 NOOP").map(|t| t.0), Some("a1".into()));
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    #[test]
    fn mangled_commands_never_panic() {
        let samples: [&[u8]; 6] = [
            b"UID FETCH 1:*,3 (FLAGS BODY.PEEK[1.2.HEADER.FIELDS (A B)]<0.9>)",
            b"SEARCH OR (FROM a SINCE 1-Jan-2024) NOT UID 2:* HEADER X y",
            b"APPEND Sent (\\Seen) {3+}\r\nabc",
            b"STORE 1:* -FLAGS.SILENT (\\Deleted)",
            b"LOGIN {3}\r\nabc \"p\\\"w\"",
            b"STATUS INBOX (MESSAGES UIDNEXT)",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for sample in samples {
            assert!(
                parse_command(sample).is_ok(),
                "{}",
                String::from_utf8_lossy(sample)
            );
            for _ in 0..2000 {
                let mut m = sample.to_vec();
                for _ in 0..(1 + next() % 4) {
                    if m.is_empty() {
                        break;
                    }
                    let i = (next() as usize) % m.len();
                    match next() % 3 {
                        0 => m[i] = b"(){}[]<>*:,.\\\" 0123+-\r\n"[(next() % 23) as usize],
                        1 => {
                            m.remove(i);
                        }
                        _ => m.truncate(i),
                    }
                }
                let _ = parse_command(&m);
            }
        }
    }
}
