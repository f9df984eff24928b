//! Read access to a message's header fields, wherever they are held.
//!
//! The split decision, the outcome classifier and the HTTP/1.1 framing rules
//! only read header fields. On hyper's path the fields are in a
//! [`HeaderMap`]; on serin's own HTTP/1.1 path ([`crate::h1_server`]) they
//! are still in the raw bytes of the head, and building a map just to read
//! three of them would cost more than the rest of the request. This trait
//! lets each rule be written once for both.

use http::header::CONNECTION;
use http::{HeaderMap, HeaderName};

/// A message's header fields.
pub trait Fields {
    /// The values of every field called `name`, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// The first value of field `name`.
    fn value<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

impl Fields for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name.as_str()))
            .map(|h| h.value)
    }
}

/// Where one field's name and value sit in a head's bytes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Span {
    /// The span of `field`, whose slices point into `head`.
    pub(crate) fn of(head: &[u8], field: &httparse::Header<'_>) -> Self {
        let base = head.as_ptr() as usize;
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        Self {
            name: (name as u32, (name + field.name.len()) as u32),
            value: (value as u32, (value + field.value.len()) as u32),
        }
    }
}

/// The fields of a parsed head, as spans over its bytes: kept without
/// borrowing the buffer they were parsed from.
#[derive(Clone, Copy)]
pub(crate) struct RawFields<'a> {
    pub(crate) head: &'a [u8],
    pub(crate) spans: &'a [Span],
}

impl<'a> RawFields<'a> {
    /// Every field as (name, value), in order.
    pub(crate) fn iter(self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        self.spans.iter().map(move |s| {
            (
                &self.head[s.name.0 as usize..s.name.1 as usize],
                &self.head[s.value.0 as usize..s.value.1 as usize],
            )
        })
    }
}

impl Fields for RawFields<'_> {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
            .map(|(_, v)| v)
    }
}

/// The comma-separated tokens of every field called `name`, trimmed.
pub(crate) fn tokens<'a, F: Fields + ?Sized>(
    fields: &'a F,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    fields
        .values(name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// Whether an HTTP/1.`minor` message lets its connection carry another
/// one: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
/// `Connection: keep-alive` (RFC 9112 §9.3).
pub(crate) fn keeps_alive<F: Fields + ?Sized>(fields: &F, minor: u8) -> bool {
    let says = |option: &[u8]| tokens(fields, &CONNECTION).any(|t| t.eq_ignore_ascii_case(option));
    !says(b"close") && (minor == 1 || says(b"keep-alive"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;

    #[test]
    fn raw_fields_match_names_without_case() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Y\r\nconnection: te\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(head).unwrap().is_complete());
        let spans: Vec<Span> = req.headers.iter().map(|h| Span::of(head, h)).collect();
        let raw = RawFields {
            head,
            spans: &spans,
        };
        assert_eq!(raw.value(&HOST), Some(&b"a"[..]));
        let raw_tokens: Vec<_> = tokens(&raw, &CONNECTION).collect();
        assert_eq!(raw_tokens, [&b"close"[..], b"X-Y", b"te"]);
        let parsed: Vec<_> = tokens(req.headers, &CONNECTION).collect();
        assert_eq!(parsed, raw_tokens);
    }
}
