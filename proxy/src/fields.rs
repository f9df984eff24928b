//! A message's header fields, wherever they are held: read through
//! [`Fields`], written through [`FieldSink`].
//!
//! The request policy, the split decision, the outcome classifier and the
//! HTTP/1.1 framing rules read header fields. On hyper's path the fields are
//! in a [`HeaderMap`]; on serin's own HTTP/1.1 path ([`crate::server::own_h1`])
//! they are still in the raw bytes of the head, and building a map just to
//! read three of them would cost more than the rest of the request. The
//! rewrites write fields as HTTP/1.1 wire bytes, into a map, or as HPACK
//! (the own HTTP/2 loop's responses). These traits let each rule be written
//! once for every path.

use crate::policy::X_REQUEST_ID;
use crate::trace::TRACEPARENT;
use bytes::Bytes;
use http::header::CONNECTION;
use http::{HeaderMap, HeaderName, HeaderValue};

/// A message's header fields.
pub trait Fields {
    /// The values of every field called `name`, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;

    /// Every field as (name, value), in order.
    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    /// The first value of field `name`.
    fn value<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    }
}

impl Fields for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        // Once, not per field: for a standard name it is a large match.
        let name = name.as_str();
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter().map(|h| (h.name.as_bytes(), h.value))
    }
}

// === sinks ===

/// Where rewritten header fields go.
pub(crate) trait FieldSink {
    /// Appends one field. `name` is a valid field name and `value` a valid
    /// field value: both come from a parsed message or from serin itself.
    fn field(&mut self, name: &[u8], value: &[u8]);

    /// Appends one field whose value is `parts` joined with ", ".
    fn joined_field<'a>(&mut self, name: &[u8], parts: impl Iterator<Item = &'a [u8]>) {
        let mut value = Vec::new();
        for part in parts {
            if !value.is_empty() {
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(part);
        }
        self.field(name, &value);
    }
}

/// HTTP/1.1 wire form: `name: value\r\n`.
impl FieldSink for Vec<u8> {
    #[inline]
    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        self.extend_from_slice(value);
        self.extend_from_slice(b"\r\n");
    }

    fn joined_field<'a>(&mut self, name: &[u8], parts: impl Iterator<Item = &'a [u8]>) {
        self.extend_from_slice(name);
        self.extend_from_slice(b": ");
        for (i, part) in parts.enumerate() {
            if i > 0 {
                self.extend_from_slice(b", ");
            }
            self.extend_from_slice(part);
        }
        self.extend_from_slice(b"\r\n");
    }
}

/// A [`HeaderMap`] being filled. Values that are slices of `shared` (a
/// parsed head kept as [`Bytes`]) are shared with it instead of copied.
///
/// Fields whose value is new on every request (`x-request-id`,
/// `traceparent`) are marked sensitive, which HTTP/2 (a request to an h2c
/// upstream) sends as a literal never indexed (RFC 7541 §6.2.3). Indexed,
/// each request would insert its id into the connection's HPACK table,
/// evict an entry the next could have reused, and lengthen the chain of
/// same-named entries every later encode walks and compares.
pub(crate) struct MapSink<'a> {
    pub(crate) map: &'a mut HeaderMap,
    pub(crate) shared: Option<&'a Bytes>,
}

impl FieldSink for MapSink<'_> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        let Ok(name) = HeaderName::from_bytes(name) else {
            return;
        };
        let within = |b: &Bytes| {
            let start = b.as_ptr() as usize;
            let at = value.as_ptr() as usize;
            at >= start && at + value.len() <= start + b.len()
        };
        let value = match self.shared {
            Some(head) if !value.is_empty() && within(head) => {
                HeaderValue::from_maybe_shared(head.slice_ref(value))
            }
            _ => HeaderValue::from_bytes(value),
        };
        if let Ok(mut value) = value {
            if new_on_every_request(name.as_str().as_bytes()) {
                value.set_sensitive(true);
            }
            self.map.append(name, value);
        }
    }
}

/// A response head's fields in the form the server side that sends them
/// takes: hyper a [`HeaderMap`], the own HTTP/2 loop an HPACK block
/// ([`crate::server::own_h2`]), so that a head is written once, straight
/// into that form.
pub(crate) trait ResponseFields {
    /// Room for about `fields` fields.
    fn with_capacity(fields: usize) -> Self;

    /// Where the fields go. Values that are slices of `shared` (a parsed
    /// head kept as [`Bytes`]) may be shared with it instead of copied.
    fn sink<'a>(&'a mut self, shared: Option<&'a Bytes>) -> impl FieldSink + 'a;
}

impl ResponseFields for HeaderMap {
    fn with_capacity(fields: usize) -> Self {
        HeaderMap::with_capacity(fields)
    }

    fn sink<'a>(&'a mut self, shared: Option<&'a Bytes>) -> impl FieldSink + 'a {
        MapSink { map: self, shared }
    }
}

/// Whether field `name` (in any case) has a value new on every request,
/// which HTTP/2 sends never indexed ([`MapSink`] says why).
pub(crate) fn new_on_every_request(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(X_REQUEST_ID.as_str().as_bytes())
        || name.eq_ignore_ascii_case(TRACEPARENT.as_str().as_bytes())
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
        let name = name.as_str().as_bytes();
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    fn each(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.iter()
    }
}

/// The comma-separated tokens of every field called `name`, trimmed.
pub(crate) fn tokens<'a, F: Fields + ?Sized>(
    fields: &'a F,
    name: &'a HeaderName,
) -> Tokens<'a, impl Iterator<Item = &'a [u8]> + 'a> {
    Tokens {
        values: fields.values(name),
        current: None,
    }
}

/// See [`tokens`]. Written out rather than as `flat_map(split)`: it runs for
/// `Connection` on every request and response.
pub(crate) struct Tokens<'a, I> {
    values: I,
    /// What is left of the value being split.
    current: Option<&'a [u8]>,
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for Tokens<'a, I> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = match self.current {
            Some(rest) => rest,
            None => self.values.next()?,
        };
        match rest.iter().position(|&b| b == b',') {
            Some(i) => {
                self.current = Some(&rest[i + 1..]);
                Some(rest[..i].trim_ascii())
            }
            None => {
                self.current = None;
                Some(rest.trim_ascii())
            }
        }
    }
}

/// Whether an HTTP/1.`minor` message lets its connection carry another
/// one: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
/// `Connection: keep-alive` (RFC 9112 §9.3).
pub(crate) fn keeps_alive<F: Fields + ?Sized>(fields: &F, minor: u8) -> bool {
    let (mut close, mut keep_alive) = (false, false);
    for token in tokens(fields, &CONNECTION) {
        close |= token.eq_ignore_ascii_case(b"close");
        keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    !close && (minor == 1 || keep_alive)
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
