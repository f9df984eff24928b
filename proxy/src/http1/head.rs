//! Message heads: request and response heads parsed in place, and the
//! start lines serin writes.
//!
//! Parsing uses httparse with its strict defaults (no whitespace before a
//! field's colon, no obs-fold, no bare CR), and one limit on the number of
//! fields for both directions and both server paths ([`MAX_FIELDS`]; hyper is
//! built with the same number).

use std::mem::MaybeUninit;

use http::StatusCode;

use crate::fields::{keeps_alive, Span};

/// The most header fields accepted in a request or response head.
pub(crate) const MAX_FIELDS: usize = 128;

/// The HTTP/2 connection preface (RFC 9113 §3.4), which an HTTP/1 parser
/// sees as a malformed request.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a head could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    /// Longer than the limit, or more fields than [`MAX_FIELDS`].
    #[error("message head too large")]
    TooLarge,
    /// Not HTTP/1.x syntax.
    #[error("malformed message head: {0}")]
    Malformed(&'static str),
    /// The start of an HTTP/2 connection.
    #[error("an HTTP/2 connection preface")]
    Http2Preface,
}

/// Slots for a head's fields, filled by the parser.
pub(crate) type FieldSlots<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_FIELDS];

/// Empty slots.
pub(crate) fn field_slots<'b>() -> FieldSlots<'b> {
    [const { MaybeUninit::uninit() }; MAX_FIELDS]
}

/// Parses the request head at the front of `buf` into `req`; returns its
/// length, or `None` if more bytes are needed. `max_bytes` bounds a head
/// that is still incomplete.
pub(crate) fn parse_request<'h, 'b>(
    req: &mut httparse::Request<'h, 'b>,
    buf: &'b [u8],
    slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
    max_bytes: usize,
) -> Result<Option<usize>, HeadError> {
    match httparse::ParserConfig::default().parse_request_with_uninit_headers(req, buf, slots) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) if H2_PREFACE.starts_with(buf) || buf.starts_with(H2_PREFACE) => {
            Err(HeadError::Http2Preface)
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(malformed(e))),
    }
}

fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid field name",
        httparse::Error::HeaderValue => "invalid field value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status code",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

/// A parsed response head; its fields are the [`Span`]s it was parsed with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResponseHead {
    /// Length of the head in bytes.
    pub(crate) len: usize,
    pub(crate) status: StatusCode,
    /// The sender allows another message on this connection.
    pub(crate) keep_alive: bool,
}

/// Parses a response head at the front of `buf` (left in place), recording
/// where its fields are in `spans`; `None` if more bytes are needed.
pub(crate) fn parse_response(
    buf: &[u8],
    spans: &mut Vec<Span>,
    max_bytes: usize,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut slots = field_slots();
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        .map_err(|e| match e {
            httparse::Error::TooManyHeaders => HeadError::TooLarge,
            e => HeadError::Malformed(malformed(e)),
        })?;
    let len = match parsed {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= max_bytes => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| HeadError::Malformed("invalid status code"))?;
    spans.clear();
    spans.extend(resp.headers.iter().map(|h| Span::of(buf, h)));
    Ok(Some(ResponseHead {
        len,
        status,
        keep_alive: keeps_alive(&*resp.headers, resp.version.unwrap_or(0)),
    }))
}

/// Writes a request line in origin form (or asterisk form) for HTTP/1.1.
pub(crate) fn write_request_line(out: &mut Vec<u8>, method: &[u8], target: &[u8]) {
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(if target.is_empty() { b"/" } else { target });
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Writes a status line for an HTTP/1.`minor` client.
pub(crate) fn write_status_line(out: &mut Vec<u8>, minor: u8, status: StatusCode) {
    out.extend_from_slice(if minor == 1 {
        b"HTTP/1.1 "
    } else {
        b"HTTP/1.0 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::RawFields;

    fn response(text: &str) -> Result<Option<(ResponseHead, Vec<Span>)>, HeadError> {
        let mut spans = Vec::new();
        Ok(parse_response(text.as_bytes(), &mut spans, 64 * 1024)?.map(|h| (h, spans)))
    }

    #[test]
    fn response_heads_parse_with_keep_alive_rules() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-A: b\r\n\r\n";
        let (h, spans) = response(text).unwrap().unwrap();
        assert_eq!(
            (h.status, h.keep_alive, h.len),
            (StatusCode::OK, true, text.len())
        );
        let fields: Vec<_> = RawFields {
            head: text.as_bytes(),
            spans: &spans,
        }
        .iter()
        .collect();
        assert_eq!(fields[1], (&b"X-A"[..], &b"b"[..]));

        let (h, _) = response("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (h, _) = response("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let (h, _) = response("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        assert!(response("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        assert!(response("HTTP/1.1 2000 OK\r\n\r\n").is_err());
    }

    #[test]
    fn request_heads_are_parsed_strictly() {
        let parse = |text: &[u8]| {
            let mut slots = field_slots();
            let mut req = httparse::Request::new(&mut []);
            parse_request(&mut req, text, &mut slots, 1024)
        };
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(Some(27)));
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n"), Err(HeadError::Http2Preface));
        assert_eq!(parse(&[b'a'; 2000]), Err(HeadError::TooLarge));
    }
}
