//! The little MIME that S/MIME needs, kept byte-exact: splitting an entity
//! into headers and body, reading Content-Type parameters, cutting a
//! multipart body into the exact bytes of its parts (a signature covers those
//! bytes), and writing canonical CRLF text.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MimeError {
    #[error("the message is empty")]
    Empty,
    #[error("the header section never ends (no empty line before the body)")]
    NoBody,
    #[error("malformed header line {0:?}")]
    BadHeader(String),
    #[error("multipart body has no boundary parameter")]
    NoBoundary,
    #[error("multipart body has no part delimited by boundary {0:?}")]
    NoParts(String),
    #[error("multipart body is truncated: no closing delimiter --{0}--")]
    Unterminated(String),
    #[error("base64 content is corrupt: {0}")]
    Base64(String),
}

/// One header field, unfolded.
#[derive(Clone, Debug)]
pub struct Header {
    pub name: String,
    pub value: String,
    /// The raw bytes of the field including its line ending(s).
    pub raw: Vec<u8>,
}

/// A MIME entity (a whole message or one body part), borrowing its bytes.
#[derive(Debug)]
pub struct Entity<'a> {
    pub headers: Vec<Header>,
    pub body: &'a [u8],
}

/// A parsed Content-Type: lower-case `type/subtype` and parameters (names lower-case).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentType {
    pub mime_type: String,
    pub params: Vec<(String, String)>,
}

impl ContentType {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is(&self, mime_type: &str) -> bool {
        self.mime_type.eq_ignore_ascii_case(mime_type)
    }
}

/// The start of a bad line, printable, for error messages.
fn excerpt(line: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(line)
        .chars()
        .take(60)
        .map(|c| {
            if c.is_control() || c == '\u{fffd}' {
                '.'
            } else {
                c
            }
        })
        .collect();
    if line.len() > 60 {
        format!("{text}...")
    } else {
        text
    }
}

/// Splits bytes into lines, each including its terminator (CRLF, LF).
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split_inclusive(|&b| b == b'\n')
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl<'a> Entity<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Entity<'a>, MimeError> {
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(MimeError::Empty);
        }
        let mut headers: Vec<Header> = Vec::new();
        let mut offset = 0usize;
        for line in lines(data) {
            let start = offset;
            offset += line.len();
            let content = trim_eol(line);
            if content.is_empty() {
                return Ok(Entity {
                    headers,
                    body: &data[offset..],
                });
            }
            if !line.ends_with(b"\n") {
                break;
            }
            if content[0] == b' ' || content[0] == b'\t' {
                match headers.last_mut() {
                    Some(h) => {
                        h.value.push(' ');
                        h.value.push_str(String::from_utf8_lossy(content).trim());
                        h.raw.extend_from_slice(&data[start..offset]);
                    }
                    None => return Err(MimeError::BadHeader(excerpt(content))),
                }
                continue;
            }
            let colon = content
                .iter()
                .position(|&b| b == b':')
                .ok_or_else(|| MimeError::BadHeader(excerpt(content)))?;
            let name = String::from_utf8_lossy(&content[..colon])
                .trim()
                .to_string();
            if name.is_empty() || name.bytes().any(|b| !(33..=126).contains(&b)) {
                return Err(MimeError::BadHeader(excerpt(content)));
            }
            headers.push(Header {
                name,
                value: String::from_utf8_lossy(&content[colon + 1..])
                    .trim()
                    .to_string(),
                raw: data[start..offset].to_vec(),
            });
        }
        Err(MimeError::NoBody)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// The Content-Type, defaulting to `text/plain` as RFC 2045 says.
    pub fn content_type(&self) -> ContentType {
        self.header("Content-Type")
            .map(parse_content_type)
            .unwrap_or_else(|| ContentType {
                mime_type: "text/plain".into(),
                params: Vec::new(),
            })
    }

    /// The body with its Content-Transfer-Encoding undone (base64 only; other
    /// encodings are returned as they are, which is what CMS needs).
    /// At least the first `limit` bytes of [`Entity::decoded_body`] (all
    /// of it when shorter), decoding no more than needed.
    pub fn decoded_head(&self, limit: usize) -> Result<Vec<u8>, MimeError> {
        if self.is_base64() {
            decode_base64_prefix(self.body, limit)
        } else {
            Ok(self.body[..self.body.len().min(limit)].to_vec())
        }
    }

    pub fn is_base64(&self) -> bool {
        self.header("Content-Transfer-Encoding")
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("base64"))
    }

    pub fn decoded_body(&self) -> Result<Vec<u8>, MimeError> {
        if self.is_base64() {
            decode_base64(self.body)
        } else {
            Ok(self.body.to_vec())
        }
    }

    /// The exact bytes of each part of a multipart body (RFC 2046 §5.1.1: the
    /// line break before a delimiter belongs to the delimiter).
    pub fn multipart_parts(&self) -> Result<Vec<&'a [u8]>, MimeError> {
        let ct = self.content_type();
        let boundary = ct
            .param("boundary")
            .ok_or(MimeError::NoBoundary)?
            .to_string();
        split_multipart(self.body, &boundary)
    }

    /// `multipart_parts` that tolerates a missing closing delimiter.
    pub fn multipart_parts_lenient(&self) -> Result<Vec<&'a [u8]>, MimeError> {
        let ct = self.content_type();
        let boundary = ct
            .param("boundary")
            .ok_or(MimeError::NoBoundary)?
            .to_string();
        split_multipart_lenient(self.body, &boundary)
    }
}

pub fn split_multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<&'a [u8]>, MimeError> {
    split_multipart_inner(body, boundary, false)
}

/// Like `split_multipart`, but a body without the closing delimiter (as some
/// implementations send notifications) ends its last part at the end.
pub fn split_multipart_lenient<'a>(
    body: &'a [u8],
    boundary: &str,
) -> Result<Vec<&'a [u8]>, MimeError> {
    split_multipart_inner(body, boundary, true)
}

fn split_multipart_inner<'a>(
    body: &'a [u8],
    boundary: &str,
    lenient: bool,
) -> Result<Vec<&'a [u8]>, MimeError> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut current_start: Option<usize> = None;
    let mut closed = false;
    // Candidate delimiters are found with memmem; each must start a line.
    for start in memchr::memmem::find_iter(body, delimiter.as_bytes()) {
        if start > 0 && body[start - 1] != b'\n' {
            continue;
        }
        let line_end = memchr::memchr(b'\n', &body[start..])
            .map(|i| start + i + 1)
            .unwrap_or(body.len());
        let rest = trim_eol(&body[start + delimiter.len()..line_end]);
        let is_close = rest.starts_with(b"--");
        let trailing = if is_close { &rest[2..] } else { rest };
        if !trailing.iter().all(|b| *b == b' ' || *b == b'\t') {
            continue;
        }
        if let Some(part_start) = current_start.take() {
            // Drop the line break that precedes the delimiter.
            let mut end = start;
            if end > part_start && body[end - 1] == b'\n' {
                end -= 1;
                if end > part_start && body[end - 1] == b'\r' {
                    end -= 1;
                }
            }
            parts.push(&body[part_start..end.max(part_start)]);
        }
        if is_close {
            closed = true;
            break;
        }
        current_start = Some(line_end);
    }
    if !closed && lenient {
        if let Some(start) = current_start {
            parts.push(&body[start.min(body.len())..]);
        }
        closed = true;
    }
    if parts.is_empty() {
        return Err(MimeError::NoParts(boundary.to_string()));
    }
    if !closed {
        return Err(MimeError::Unterminated(boundary.to_string()));
    }
    Ok(parts)
}

/// Parses `type/subtype; name=value; name="quoted value"`.
pub fn parse_content_type(value: &str) -> ContentType {
    let mut pieces = split_params(value).into_iter();
    let mime_type = pieces
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let params = pieces
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let value = value.trim();
            let value = if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
                unquote(&value[1..value.len() - 1])
            } else {
                value.to_string()
            };
            Some((name.trim().to_ascii_lowercase(), value))
        })
        .collect();
    ContentType { mime_type, params }
}

fn unquote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits on `;` outside quoted strings and drops (comments).
fn split_params(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut comment = 0usize;
    for c in value.chars() {
        if quoted {
            cur.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            '(' => comment += 1,
            ')' if comment > 0 => comment -= 1,
            _ if comment > 0 => {}
            '"' => {
                quoted = true;
                cur.push(c);
            }
            ';' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Decodes base64 leniently: whitespace anywhere, padding optional.
pub fn decode_base64(data: &[u8]) -> Result<Vec<u8>, MimeError> {
    decode_base64_prefix(data, usize::MAX)
}

/// Standard base64, padding optional (senders differ).
fn lenient_decoder() -> GeneralPurpose {
    GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// The first `limit` bytes that `data` decodes to, or up to 48 KiB more
/// (all of it when shorter): only that much of it is decoded.
pub fn decode_base64_prefix(data: &[u8], limit: usize) -> Result<Vec<u8>, MimeError> {
    let engine = lenient_decoder();
    // Whitespace-free characters are decoded 64 KiB at a time (whole groups
    // of four), so the encoded body is never copied whole.
    const CHUNK: usize = 64 * 1024;
    let mut out = Vec::with_capacity((data.len() / 4 * 3).min(limit.saturating_add(3)));
    let mut clean = Vec::with_capacity(CHUNK + 128);
    let decode = |clean: &[u8], out: &mut Vec<u8>| {
        engine
            .decode_vec(clean, out)
            .map_err(|e| MimeError::Base64(e.to_string()))
    };
    for piece in data
        .split(|&b| b == b'\n')
        .flat_map(|line| line.trim_ascii().chunks(CHUNK))
    {
        if piece.iter().any(u8::is_ascii_whitespace) {
            clean.extend(piece.iter().filter(|b| !b.is_ascii_whitespace()));
        } else {
            clean.extend_from_slice(piece);
        }
        if clean.len() >= CHUNK {
            let whole = clean.len() / 4 * 4;
            decode(&clean[..whole], &mut out)?;
            clean.drain(..whole);
            if out.len() >= limit {
                return Ok(out);
            }
        }
    }
    decode(&clean, &mut out)?;
    Ok(out)
}

/// Decodes the base64 in `buf[range]` into the start of `buf` itself and
/// truncates it to the decoded bytes, releasing the rest: a large body is
/// never held twice. (The decoded bytes never overtake the encoded ones
/// still to be read: every four characters become at most three bytes.)
pub fn decode_base64_in_place(
    buf: &mut Vec<u8>,
    range: std::ops::Range<usize>,
) -> Result<(), MimeError> {
    let engine = lenient_decoder();
    const CHUNK: usize = 64 * 1024;
    let end = range.end.min(buf.len());
    let mut read = range.start.min(end);
    let mut written = 0usize;
    let mut clean: Vec<u8> = Vec::with_capacity(2 * CHUNK);
    let mut decoded = vec![0u8; 2 * CHUNK / 4 * 3 + 16];
    loop {
        let last = read == end;
        if clean.len() >= CHUNK || (last && !clean.is_empty()) {
            let whole = if last {
                clean.len()
            } else {
                clean.len() / 4 * 4
            };
            let n = engine
                .decode_slice(&clean[..whole], &mut decoded)
                .map_err(|e| MimeError::Base64(e.to_string()))?;
            // written + n <= 3/4 of the characters read so far < read.
            buf[written..written + n].copy_from_slice(&decoded[..n]);
            written += n;
            clean.drain(..whole);
        }
        if last {
            break;
        }
        let take = (end - read).min(CHUNK);
        clean.extend(
            buf[read..read + take]
                .iter()
                .filter(|b| !b.is_ascii_whitespace()),
        );
        read += take;
    }
    buf.truncate(written);
    buf.shrink_to_fit();
    Ok(())
}

/// Base64 in 76-character lines with CRLF, as RFC 2045 asks.
pub fn encode_base64_lines(data: &[u8]) -> Vec<u8> {
    let lines = data.len().div_ceil(57);
    let mut out = Vec::with_capacity(lines * 78);
    encode_base64_lines_into(data, &mut out);
    out
}

/// [`encode_base64_lines`] appending to `out`, without an intermediate copy
/// of the whole encoding (large messages: one buffer less).
pub fn encode_base64_lines_into(data: &[u8], out: &mut Vec<u8>) {
    use base64::Engine;
    out.reserve(data.len().div_ceil(57) * 78);
    let mut line = [0u8; 76];
    for chunk in data.chunks(57) {
        // 57 bytes make exactly 76 characters; the last chunk fewer.
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(chunk, &mut line)
            .expect("57 bytes encode to at most 76 characters");
        out.extend_from_slice(&line[..n]);
        out.extend_from_slice(b"\r\n");
    }
}

/// [`encode_base64_lines_into`] for data that arrives in pieces: the
/// lines are the same as for the whole data at once.
pub struct Base64Lines<'a> {
    out: &'a mut Vec<u8>,
    /// Fewer than 57 bytes not yet encoded.
    pending: Vec<u8>,
}

impl<'a> Base64Lines<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Base64Lines<'a> {
        Base64Lines {
            out,
            pending: Vec::with_capacity(57),
        }
    }

    pub fn write(&mut self, mut data: &[u8]) {
        if !self.pending.is_empty() {
            let take = (57 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < 57 {
                return;
            }
            encode_base64_lines_into(&self.pending, self.out);
            self.pending.clear();
        }
        let whole = data.len() / 57 * 57;
        encode_base64_lines_into(&data[..whole], self.out);
        self.pending.extend_from_slice(&data[whole..]);
    }

    /// Encodes what is left (the last, shorter line).
    pub fn finish(self) {
        encode_base64_lines_into(&self.pending, self.out);
    }
}

/// Converts every line ending (LF or CRLF; a lone CR stays) to CRLF,
/// borrowing when the data is already canonical (the usual case).
pub fn to_crlf(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let bare_lf = |i: usize| i == 0 || data[i - 1] != b'\r';
    let Some(first) = memchr::memchr_iter(b'\n', data).find(|&i| bare_lf(i)) else {
        return std::borrow::Cow::Borrowed(data);
    };
    let mut out = Vec::with_capacity(data.len() + data.len() / 32 + 2);
    out.extend_from_slice(&data[..first]);
    let mut start = first;
    for i in memchr::memchr_iter(b'\n', &data[first..]).map(|i| i + first) {
        if bare_lf(i) {
            out.extend_from_slice(&data[start..i]);
            out.extend_from_slice(b"\r\n");
            start = i + 1;
        }
    }
    out.extend_from_slice(&data[start..]);
    std::borrow::Cow::Owned(out)
}

/// A MIME boundary that cannot occur in base64 or in the wrapped content by chance.
pub fn new_boundary() -> String {
    let mut bytes = [0u8; 12];
    if openssl::rand::rand_bytes(&mut bytes).is_err() {
        // The boundary only needs to be unlikely in content; fall back to time.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes[..12].copy_from_slice(&nanos.to_le_bytes()[..12]);
    }
    format!("=_hispd_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {

    #[test]
    fn base64_lines_are_76_characters_of_the_standard_encoding() {
        use base64::Engine;
        for len in [0usize, 1, 2, 3, 56, 57, 58, 113, 114, 115, 1000, 4096] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let out = encode_base64_lines(&data);
            let text = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = text.split("\r\n").collect();
            assert_eq!(lines.last(), Some(&""), "ends with CRLF");
            assert!(lines.iter().all(|l| l.len() <= 76));
            assert_eq!(
                lines.concat(),
                base64::engine::general_purpose::STANDARD.encode(&data),
                "length {len}"
            );
        }
    }

    use super::*;

    #[test]
    fn base64_decoded_in_place_matches_a_decoding_into_a_new_buffer() {
        // Several 64 KiB chunks, CRLF lines of 76, then odd whitespace.
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut encoded = b"Header: x\r\n\r\n".to_vec();
        let start = encoded.len();
        encoded.extend_from_slice(&encode_base64_lines(&data));
        encoded.extend_from_slice(b"  \r\n\t\r\n");
        let end = encoded.len();
        encoded.extend_from_slice(b"trailing bytes not part of the body");
        assert_eq!(decode_base64(&encoded[start..end]).unwrap(), data);
        let mut buf = encoded.clone();
        decode_base64_in_place(&mut buf, start..end).unwrap();
        assert_eq!(buf, data);

        let mut short = b"aGVsbG8gd29y bGQ=\r\n".to_vec();
        let len = short.len();
        decode_base64_in_place(&mut short, 0..len).unwrap();
        assert_eq!(short, b"hello world");

        let mut bad = b"aGVs*G8=".to_vec();
        assert!(matches!(
            decode_base64_in_place(&mut bad, 0..8),
            Err(MimeError::Base64(_))
        ));
    }

    #[test]
    fn base64_in_pieces_makes_the_same_lines() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Vec::new();
        encode_base64_lines_into(&data, &mut whole);
        for sizes in [
            &[1usize, 56, 57, 58, 3][..],
            &[0, 114, 1],
            &[999],
            &[1000],
            &[500, 0, 500],
        ] {
            let mut out = b"prefix".to_vec();
            let mut lines = Base64Lines::new(&mut out);
            let mut at = 0;
            for &n in sizes.iter().cycle() {
                let end = (at + n.max(1)).min(data.len());
                lines.write(&data[at..end]);
                at = end;
                if at == data.len() {
                    break;
                }
            }
            lines.finish();
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(out[6..], whole, "pieces of {sizes:?}");
        }
        let mut empty = Vec::new();
        Base64Lines::new(&mut empty).finish();
        assert!(empty.is_empty());
    }

    #[test]
    fn large_base64_decodes_in_chunks_and_heads_decode_only_the_start() {
        use base64::Engine;
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 13 % 256) as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
        // 76-character CRLF lines, one long line, and lines with spaces and
        // tabs inside (lenient senders).
        let mut lines = Vec::new();
        encode_base64_lines_into(&data, &mut lines);
        let spaced: Vec<u8> = b64
            .as_bytes()
            .chunks(60)
            .flat_map(|c| [&c[..30], b" \t", &c[30..], b"\n"].concat())
            .collect();
        for encoded in [lines, b64.clone().into_bytes(), spaced] {
            assert_eq!(decode_base64(&encoded).expect("decodes"), data);
            let head = decode_base64_prefix(&encoded, 1000).expect("head");
            assert!(
                head.len() >= 1000 && head.len() < data.len(),
                "{}",
                head.len()
            );
            assert_eq!(head, data[..head.len()]);
        }
        let entity = [
            &b"Content-Transfer-Encoding: BASE64\r\n\r\n"[..],
            b64.as_bytes(),
        ]
        .concat();
        let entity = Entity::parse(&entity).expect("entity");
        assert_eq!(entity.decoded_body().expect("body"), data);
        assert_eq!(entity.decoded_head(10).expect("head")[..10], data[..10]);
        let plain = Entity::parse(b"Subject: x\r\n\r\nhello world").expect("entity");
        assert_eq!(plain.decoded_head(5).expect("head"), b"hello");
        assert_eq!(plain.decoded_head(500).expect("head"), b"hello world");
        let mut bad = b64.into_bytes();
        bad[200_000] = b'*';
        assert!(decode_base64(&bad).is_err(), "a bad character far in");
    }

    #[test]
    fn headers_unfold_and_body_is_exact() {
        let raw = b"Subject: a\r\n long\r\nContent-Type: multipart/signed;\r\n\tboundary=\"b 1\"; micalg=SHA-256\r\n\r\nbody\r\n";
        let e = Entity::parse(raw).unwrap();
        assert_eq!(e.header("subject"), Some("a long"));
        let ct = e.content_type();
        assert!(ct.is("multipart/signed"));
        assert_eq!(ct.param("boundary"), Some("b 1"));
        assert_eq!(ct.param("MICALG"), Some("SHA-256"));
        assert_eq!(e.body, b"body\r\n");
    }

    #[test]
    fn multipart_parts_exclude_the_delimiter_line_break() {
        let body =
            b"preamble\r\n--xy\r\nA: 1\r\n\r\none\r\n\r\n--xy\r\n\r\ntwo\r\n--xy--\r\nepilogue";
        let parts = split_multipart(body, "xy").unwrap();
        assert_eq!(parts, vec![&b"A: 1\r\n\r\none\r\n"[..], &b"\r\ntwo"[..]]);
        // LF-only messages
        let parts = split_multipart(b"--xy\nA\n--xy--\n", "xy").unwrap();
        assert_eq!(parts, vec![&b"A"[..]]);
    }

    #[test]
    fn truncated_and_garbage_give_errors() {
        assert_eq!(
            split_multipart(b"--xy\r\nA\r\n", "xy"),
            Err(MimeError::NoParts("xy".into()))
        );
        assert_eq!(
            split_multipart(b"--xy\r\nA\r\n--xy\r\nB", "xy"),
            Err(MimeError::Unterminated("xy".into()))
        );
        assert_eq!(Entity::parse(b"").err(), Some(MimeError::Empty));
        assert_eq!(
            Entity::parse(b"Subject: x\r\n").err(),
            Some(MimeError::NoBody)
        );
        assert!(matches!(
            Entity::parse(b"no colon here\r\n\r\n"),
            Err(MimeError::BadHeader(_))
        ));
        assert!(decode_base64(b"!!!!").is_err());
    }

    #[test]
    fn crlf_and_base64_round_trip() {
        assert_eq!(&*to_crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
        assert_eq!(&*to_crlf(b"\nx\r\n\n"), b"\r\nx\r\n\r\n");
        assert_eq!(&*to_crlf(b"lone\rcr"), b"lone\rcr");
        assert!(matches!(
            to_crlf(b"a\r\nb\r\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let enc = encode_base64_lines(&data);
        assert!(enc.split(|b| *b == b'\n').all(|l| l.len() <= 77));
        assert_eq!(decode_base64(&enc).unwrap(), data);
    }
}
