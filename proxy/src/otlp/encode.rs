//! The OTLP protobuf messages serin sends, encoded by hand: a `Span` per
//! request, and the `ExportTraceServiceRequest` around a batch of them.
//!
//! Only these few messages are needed, so they are written here instead of
//! generated (prost, tonic and their tree cost more build time than the rest
//! of the data plane). Field numbers are those of opentelemetry-proto's
//! `trace/v1/trace.proto`, `common/v1/common.proto`,
//! `resource/v1/resource.proto` and `collector/trace/v1/trace_service.proto`.
//!
//! Encoding a span never allocates: it appends to the caller's buffer, which
//! only grows. A length-delimited field is opened with a one-byte length and
//! closed when its contents are written; a length of 128 or more moves the
//! contents up to make room, so every length is in its shortest form and the
//! bytes are exactly what the official encoders produce.

use std::io::Write;
use std::net::IpAddr;

use http::{StatusCode, Version};

use crate::outcome::OutcomeClass;
use crate::split::Target;

// === wire format ===

/// Wire types (protobuf encoding guide, "Message Structure").
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire_type)));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, VARINT);
    varint(out, v);
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, I64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Starts a length-delimited field whose length is not known yet; returns
/// where its contents start, for [`close`].
fn open(out: &mut Vec<u8>, field: u32) -> usize {
    tag(out, field, LEN);
    out.push(0);
    out.len()
}

/// Ends the field [`open`] started at `start`: writes its length, moving the
/// contents up when the length needs more than one byte.
fn close(out: &mut Vec<u8>, start: usize) {
    let end = out.len();
    let len = (end - start) as u64;
    let extra = varint_len(len) - 1;
    if extra > 0 {
        out.resize(end + extra, 0);
        out.copy_within(start..end, start + extra);
    }
    let mut at = start - 1;
    let mut v = len;
    while v >= 0x80 {
        out[at] = v as u8 | 0x80;
        v >>= 7;
        at += 1;
    }
    out[at] = v as u8;
}

/// A `string` field from bytes that should be UTF-8: each invalid sequence
/// becomes U+FFFD, as `String::from_utf8_lossy` does (protobuf parsers
/// reject a `string` that is not UTF-8).
fn lossy_string_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    let start = open(out, field);
    for chunk in bytes.utf8_chunks() {
        out.extend_from_slice(chunk.valid().as_bytes());
        if !chunk.invalid().is_empty() {
            out.extend_from_slice(
                char::REPLACEMENT_CHARACTER
                    .encode_utf8(&mut [0; 4])
                    .as_bytes(),
            );
        }
    }
    close(out, start);
}

// === common.proto ===

/// `KeyValue`: key = 1, value = 2. `AnyValue`: string_value = 1, int_value = 3.
mod key_value {
    pub(super) const KEY: u32 = 1;
    pub(super) const VALUE: u32 = 2;
    pub(super) const STRING_VALUE: u32 = 1;
    pub(super) const INT_VALUE: u32 = 3;
}

/// Appends one `KeyValue` as field `field` (the attributes of a span or of
/// a resource); `value` writes the `AnyValue`'s one field.
fn attribute(out: &mut Vec<u8>, field: u32, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    let attribute = open(out, field);
    bytes_field(out, key_value::KEY, key.as_bytes());
    let any = open(out, key_value::VALUE);
    value(out);
    close(out, any);
    close(out, attribute);
}

/// Appends one `KeyValue` with a `string_value`.
fn string_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: &[u8]) {
    attribute(out, field, key, |out| {
        lossy_string_field(out, key_value::STRING_VALUE, value);
    });
}

/// Appends one `KeyValue` with an `int_value`.
fn int_attribute(out: &mut Vec<u8>, field: u32, key: &str, value: i64) {
    // int64 is a varint of the two's complement (ten bytes when negative).
    attribute(out, field, key, |out| {
        varint_field(out, key_value::INT_VALUE, value as u64);
    });
}

// === trace.proto: Span ===

/// `ScopeSpans.spans` = 2, and the fields of `Span` and `Status`.
mod span {
    pub(super) const SCOPE_SPANS_SPANS: u32 = 2;
    pub(super) const TRACE_ID: u32 = 1;
    pub(super) const SPAN_ID: u32 = 2;
    pub(super) const PARENT_SPAN_ID: u32 = 4;
    pub(super) const NAME: u32 = 5;
    pub(super) const KIND: u32 = 6;
    pub(super) const START_TIME_UNIX_NANO: u32 = 7;
    pub(super) const END_TIME_UNIX_NANO: u32 = 8;
    pub(super) const ATTRIBUTES: u32 = 9;
    pub(super) const STATUS: u32 = 15;
    pub(super) const STATUS_CODE: u32 = 3;
    /// `Span.SpanKind.SPAN_KIND_SERVER`.
    pub(super) const KIND_SERVER: u64 = 2;
    /// `Status.StatusCode.STATUS_CODE_ERROR`.
    pub(super) const STATUS_ERROR: u64 = 2;
}

/// One request as a server span, borrowed from wherever the request path
/// keeps it. Byte fields are the request's own bytes; any that are not
/// UTF-8 are sent with U+FFFD in place of each invalid sequence.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpanFields<'a> {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    /// The caller's span, from its `traceparent`; `None` for a root span.
    pub(crate) parent_span_id: Option<[u8; 8]>,
    pub(crate) start_unix_nanos: u64,
    pub(crate) end_unix_nanos: u64,
    /// The method as sent. The span's name and `http.request.method` are
    /// this method when it is one of HTTP's own, else `HTTP` and `_OTHER`
    /// (with `http.request.method_original`), as the conventions ask.
    pub(crate) method: &'a [u8],
    /// The client came over TLS: `url.scheme` is `https`, else `http`.
    pub(crate) tls: bool,
    /// The `Host` field or `:authority` as sent: `server.address` and
    /// `server.port` (the scheme's port when it names none). Empty: neither.
    pub(crate) host: &'a [u8],
    /// `url.path`.
    pub(crate) path: &'a [u8],
    /// `url.query`, without the `?`.
    pub(crate) query: Option<&'a [u8]>,
    /// `client.address`: the peer's address.
    pub(crate) client_address: IpAddr,
    /// `network.protocol.version`: `1.1`, `2`, …
    pub(crate) version: Version,
    /// `http.response.status_code`, when a response was sent.
    pub(crate) status: Option<StatusCode>,
    /// The span's status is ERROR, and `error.type` says why (the status
    /// code, or `_OTHER` when there was none); otherwise it is left unset.
    pub(crate) error: bool,
    /// `serin.upstream`; `None` when serin answered itself.
    pub(crate) upstream: Option<Target>,
    /// `serin.outcome`.
    pub(crate) outcome: OutcomeClass,
    /// `serin.request_id`.
    pub(crate) request_id: &'a [u8],
}

/// The methods the HTTP semantic conventions name (RFC 9110 and PATCH).
const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Appends one span to `out` as a `ScopeSpans.spans` entry (its field tag,
/// its length, the `Span`), so that a batch is the concatenation of the
/// spans appended. Allocates nothing but the growth of `out`.
pub(crate) fn encode_span(out: &mut Vec<u8>, s: &SpanFields<'_>) {
    use span::*;
    let method = KNOWN_METHODS.into_iter().find(|m| m.as_bytes() == s.method);
    let message = open(out, SCOPE_SPANS_SPANS);
    bytes_field(out, TRACE_ID, &s.trace_id);
    bytes_field(out, SPAN_ID, &s.span_id);
    if let Some(parent) = &s.parent_span_id {
        bytes_field(out, PARENT_SPAN_ID, parent);
    }
    bytes_field(out, NAME, method.unwrap_or("HTTP").as_bytes());
    varint_field(out, KIND, KIND_SERVER);
    fixed64_field(out, START_TIME_UNIX_NANO, s.start_unix_nanos);
    fixed64_field(out, END_TIME_UNIX_NANO, s.end_unix_nanos);

    let attr = |out: &mut Vec<u8>, key: &str, value: &[u8]| {
        string_attribute(out, ATTRIBUTES, key, value);
    };
    match method {
        Some(method) => attr(out, "http.request.method", method.as_bytes()),
        None => {
            attr(out, "http.request.method", b"_OTHER");
            attr(out, "http.request.method_original", s.method);
        }
    }
    attr(out, "url.scheme", if s.tls { b"https" } else { b"http" });
    attr(out, "url.path", s.path);
    if let Some(query) = s.query {
        attr(out, "url.query", query);
    }
    if !s.host.is_empty() {
        let (address, port) = split_host(s.host);
        attr(out, "server.address", address);
        let port = port.unwrap_or(if s.tls { 443 } else { 80 });
        int_attribute(out, ATTRIBUTES, "server.port", i64::from(port));
    }
    // The longest address text is 45 bytes (IPv6 with an IPv4 tail).
    let mut text = [0u8; 45];
    let mut rest = &mut text[..];
    // Cannot fail: every address fits.
    let _ = write!(rest, "{}", s.client_address);
    let unused = rest.len();
    attr(out, "client.address", &text[..text.len() - unused]);
    attr(out, "network.protocol.version", protocol_version(s.version));
    if let Some(status) = s.status {
        int_attribute(
            out,
            ATTRIBUTES,
            "http.response.status_code",
            i64::from(status.as_u16()),
        );
    }
    if s.error {
        let code = s.status.as_ref().map(StatusCode::as_str);
        attr(out, "error.type", code.unwrap_or("_OTHER").as_bytes());
    }
    if let Some(upstream) = s.upstream {
        attr(out, "serin.upstream", upstream.as_str().as_bytes());
    }
    attr(out, "serin.outcome", s.outcome.as_str().as_bytes());
    attr(out, "serin.request_id", s.request_id);

    if s.error {
        let status = open(out, STATUS);
        varint_field(out, STATUS_CODE, STATUS_ERROR);
        close(out, status);
    }
    close(out, message);
}

/// `network.protocol.version`'s value for `version`.
fn protocol_version(version: Version) -> &'static [u8] {
    match version {
        Version::HTTP_09 => b"0.9",
        Version::HTTP_10 => b"1.0",
        Version::HTTP_2 => b"2",
        Version::HTTP_3 => b"3",
        _ => b"1.1",
    }
}

/// A `Host` value's host and port: `example.com:8080`, `[::1]:80`,
/// `example.com`. An IPv6 address loses its brackets; a port that is not a
/// number is left in the host.
fn split_host(host: &[u8]) -> (&[u8], Option<u16>) {
    let (address, port) = match host.iter().rposition(|&b| b == b':') {
        // An IPv6 literal's colons are inside its brackets.
        Some(colon) if !host[colon..].contains(&b']') => {
            let port = std::str::from_utf8(&host[colon + 1..])
                .ok()
                .and_then(|p| p.parse().ok());
            match port {
                Some(port) => (&host[..colon], Some(port)),
                None => (host, None),
            }
        }
        _ => (host, None),
    };
    let address = match address {
        [b'[', inner @ .., b']'] => inner,
        address => address,
    };
    (address, port)
}

// === the request around a batch ===

/// `ExportTraceServiceRequest.resource_spans` = 1; `ResourceSpans`:
/// resource = 1, scope_spans = 2; `ScopeSpans.scope` = 1; `Resource.attributes`
/// = 1; `InstrumentationScope`: name = 1, version = 2.
mod envelope {
    pub(super) const RESOURCE_SPANS: u32 = 1;
    pub(super) const RESOURCE: u32 = 1;
    pub(super) const SCOPE_SPANS: u32 = 2;
    pub(super) const SCOPE: u32 = 1;
    pub(super) const RESOURCE_ATTRIBUTES: u32 = 1;
    pub(super) const SCOPE_NAME: u32 = 1;
    pub(super) const SCOPE_VERSION: u32 = 2;
}

/// What every export request carries around its spans: one `ResourceSpans`
/// (the resource: `service.name`) with one `ScopeSpans` (the scope: `serin`
/// and its version). Encoded once; each request only adds two lengths.
pub(super) struct Envelope {
    /// `ResourceSpans.resource`, tag and length included.
    resource: Vec<u8>,
    /// `ScopeSpans.scope`, tag and length included.
    scope: Vec<u8>,
}

impl Envelope {
    pub(super) fn new(service_name: &str) -> Self {
        use envelope::*;
        let mut resource = Vec::new();
        let message = open(&mut resource, RESOURCE);
        string_attribute(
            &mut resource,
            RESOURCE_ATTRIBUTES,
            "service.name",
            service_name.as_bytes(),
        );
        close(&mut resource, message);
        let mut scope = Vec::new();
        let message = open(&mut scope, SCOPE);
        bytes_field(&mut scope, SCOPE_NAME, b"serin");
        bytes_field(
            &mut scope,
            SCOPE_VERSION,
            env!("CARGO_PKG_VERSION").as_bytes(),
        );
        close(&mut scope, message);
        Self { resource, scope }
    }

    fn lengths(&self, spans_len: usize) -> (usize, usize) {
        let scope_spans = self.scope.len() + spans_len;
        let resource_spans = self.resource.len() + 1 + varint_len(scope_spans as u64) + scope_spans;
        (resource_spans, scope_spans)
    }

    /// The length of a request whose spans take `spans_len` bytes.
    pub(super) fn request_len(&self, spans_len: usize) -> usize {
        let (resource_spans, _) = self.lengths(spans_len);
        1 + varint_len(resource_spans as u64) + resource_spans
    }

    /// Appends the start of a request whose spans take `spans_len` bytes;
    /// the spans, appended next, complete it.
    pub(super) fn write_head(&self, out: &mut Vec<u8>, spans_len: usize) {
        use envelope::*;
        let (resource_spans, scope_spans) = self.lengths(spans_len);
        tag(out, RESOURCE_SPANS, LEN);
        varint(out, resource_spans as u64);
        out.extend_from_slice(&self.resource);
        tag(out, SCOPE_SPANS, LEN);
        varint(out, scope_spans as u64);
        out.extend_from_slice(&self.scope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn varints_and_fixed64_are_encoded_as_the_protobuf_guide_shows() {
        // The guide's examples: 1, 150 and a tag; then the extremes.
        assert_eq!(encoded(|o| varint(o, 1)), [0x01]);
        assert_eq!(encoded(|o| varint(o, 150)), [0x96, 0x01]);
        assert_eq!(encoded(|o| varint_field(o, 1, 150)), [0x08, 0x96, 0x01]);
        assert_eq!(encoded(|o| varint(o, 0)), [0x00]);
        assert_eq!(
            encoded(|o| varint(o, u64::MAX)),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
        for v in [0, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            assert_eq!(varint_len(v), encoded(|o| varint(o, v)).len(), "{v}");
        }
        // Field 7, wire type 1, then the value little-endian.
        assert_eq!(
            encoded(|o| fixed64_field(o, 7, 0x0102_0304_0506_0708)),
            [0x39, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]
        );
        // The guide's string "testing" as field 2.
        assert_eq!(
            encoded(|o| bytes_field(o, 2, b"testing")),
            [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']
        );
    }

    #[test]
    fn an_opened_field_gets_its_shortest_length_whatever_its_size() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384] {
            let contents: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = vec![0xaa];
            let start = open(&mut out, 9);
            out.extend_from_slice(&contents);
            close(&mut out, start);
            let mut expected = vec![0xaa];
            bytes_field(&mut expected, 9, &contents);
            assert_eq!(out, expected, "length {len}");
        }
    }

    #[test]
    fn attributes_are_key_values_with_a_string_or_int_any_value() {
        // KeyValue{key: "k", value: AnyValue{string_value: "v"}} as field 9.
        assert_eq!(
            encoded(|o| string_attribute(o, 9, "k", b"v")),
            [0x4a, 0x08, 0x0a, 0x01, b'k', 0x12, 0x03, 0x0a, 0x01, b'v']
        );
        // AnyValue{int_value: 200}: field 3, varint 0xc8 0x01.
        assert_eq!(
            encoded(|o| int_attribute(o, 9, "k", 200)),
            [0x4a, 0x08, 0x0a, 0x01, b'k', 0x12, 0x03, 0x18, 0xc8, 0x01]
        );
        // Invalid UTF-8 becomes U+FFFD (EF BF BD), one per invalid sequence.
        assert_eq!(
            encoded(|o| lossy_string_field(o, 1, b"a\xffb\xe2\x82")),
            [0x0a, 0x08, b'a', 0xef, 0xbf, 0xbd, b'b', 0xef, 0xbf, 0xbd]
        );
    }

    fn minimal() -> SpanFields<'static> {
        SpanFields {
            trace_id: [0x11; 16],
            span_id: [0x22; 8],
            parent_span_id: None,
            start_unix_nanos: 1,
            end_unix_nanos: 0x0100,
            method: b"GET",
            tls: false,
            host: b"",
            path: b"/",
            query: None,
            client_address: IpAddr::from([10, 0, 0, 1]),
            version: Version::HTTP_11,
            status: None,
            error: false,
            upstream: None,
            outcome: OutcomeClass::Success,
            request_id: b"r",
        }
    }

    #[test]
    fn a_span_is_a_scope_spans_entry_with_its_fields_in_order() {
        let mut expected = vec![
            0x0a, 0x10, // trace_id: field 1, 16 bytes
        ];
        expected.extend([0x11; 16]);
        expected.extend([0x12, 0x08]); // span_id: field 2, 8 bytes
        expected.extend([0x22; 8]);
        expected.extend([0x2a, 0x03, b'G', b'E', b'T']); // name: field 5
        expected.extend([0x30, 0x02]); // kind: field 6, SERVER
        expected.extend([0x39, 1, 0, 0, 0, 0, 0, 0, 0]); // start: field 7, fixed64
        expected.extend([0x41, 0, 1, 0, 0, 0, 0, 0, 0]); // end: field 8, fixed64
        for (key, value) in [
            ("http.request.method", "GET"),
            ("url.scheme", "http"),
            ("url.path", "/"),
            ("client.address", "10.0.0.1"),
            ("network.protocol.version", "1.1"),
            ("serin.outcome", "success"),
            ("serin.request_id", "r"),
        ] {
            // attributes: field 9, KeyValue{key = 1, value = 2 {string_value = 1}}
            expected.extend([0x4a, (6 + key.len() + value.len()) as u8]);
            expected.extend([0x0a, key.len() as u8]);
            expected.extend(key.as_bytes());
            expected.extend([0x12, (2 + value.len()) as u8, 0x0a, value.len() as u8]);
            expected.extend(value.as_bytes());
        }
        let len = expected.len();
        assert!((128..16_384).contains(&len));
        // ScopeSpans.spans: field 2, a two-byte length.
        let mut framed = vec![0x12, (len as u8 & 0x7f) | 0x80, (len >> 7) as u8];
        framed.extend(expected);

        let mut out = b"earlier".to_vec();
        encode_span(&mut out, &minimal());
        assert_eq!(out[..7], *b"earlier");
        assert_eq!(out[7..], framed);
    }

    #[test]
    fn an_error_span_ends_with_an_error_status() {
        let fields = SpanFields {
            error: true,
            ..minimal()
        };
        let out = encoded(|o| encode_span(o, &fields));
        // status: field 15 {code: field 3 = ERROR}.
        assert!(out.ends_with(&[0x7a, 0x02, 0x18, 0x02]), "{out:x?}");
        // error.type is _OTHER: no status code was sent.
        let error_type = encoded(|o| string_attribute(o, 9, "error.type", b"_OTHER"));
        assert!(out.windows(error_type.len()).any(|w| w == error_type));
    }

    #[test]
    fn an_unknown_method_is_named_as_the_conventions_ask() {
        let fields = SpanFields {
            method: b"PURGE",
            ..minimal()
        };
        let out = encoded(|o| encode_span(o, &fields));
        let contains = |part: Vec<u8>| out.windows(part.len()).any(|w| w == part);
        assert!(contains(encoded(|o| bytes_field(o, 5, b"HTTP"))));
        assert!(contains(encoded(|o| string_attribute(
            o,
            9,
            "http.request.method",
            b"_OTHER"
        ))));
        assert!(contains(encoded(|o| string_attribute(
            o,
            9,
            "http.request.method_original",
            b"PURGE"
        ))));
    }

    #[test]
    fn a_host_field_splits_into_address_and_port() {
        assert_eq!(
            split_host(b"example.com:8080"),
            (&b"example.com"[..], Some(8080))
        );
        assert_eq!(split_host(b"example.com"), (&b"example.com"[..], None));
        assert_eq!(split_host(b"[::1]:9000"), (&b"::1"[..], Some(9000)));
        assert_eq!(split_host(b"[::1]"), (&b"::1"[..], None));
        assert_eq!(split_host(b"host:http"), (&b"host:http"[..], None));
    }

    #[test]
    fn the_envelope_says_the_length_it_writes() {
        let envelope = Envelope::new("checkout");
        for spans_len in [0, 1, 100, 200, 20_000] {
            let mut out = Vec::new();
            envelope.write_head(&mut out, spans_len);
            assert_eq!(out.len() + spans_len, envelope.request_len(spans_len));
        }
    }
}
