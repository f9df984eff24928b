//! W3C trace context (`traceparent`): kept, started, or continued by serin's
//! own span, so a trace can follow a request through the proxy and the
//! access log can name the trace.
//!
//! By default serin forwards `traceparent` untouched and only reads its
//! trace id for the access log. Two settings change that (`[trace]`):
//! - `start`: a request without a valid `traceparent` gets a new trace, so
//!   the upstream's spans and serin's access-log line share one trace id;
//! - span export (OTLP): serin records one server span per request, and the
//!   upstream receives serin's span as its parent, as Envoy does.
//!
//! Everything here is computed only when one of those is on, or the access
//! log is: otherwise the request path never looks at `traceparent`.

use crate::access_log::QueryPolicy;
use crate::fields::Fields;
use crate::split::FastRng;

pub(crate) static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The trace settings (`[trace]`).
#[derive(Clone, Debug)]
pub struct TraceSettings {
    /// Start a trace for a request that has none (default off).
    pub start: bool,
    /// The share of started traces marked sampled (0 to 1; default 1).
    pub sample: f64,
    /// Record one span per request and export it (default off).
    pub export: Option<SpanExport>,
    /// What of a request's query its span keeps in `url.query` (default:
    /// every value redacted, as spans leave for another system).
    pub query: QueryPolicy,
}

/// Where spans go (`[trace] otlp_endpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanExport {
    /// The collector's OTLP/HTTP traces URL (`http://` only).
    pub endpoint: String,
    /// `service.name` on every span.
    pub service_name: String,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self {
            start: crate::defaults::TRACE_START,
            sample: crate::defaults::TRACE_SAMPLE,
            export: None,
            query: QueryPolicy::Redact(Vec::new()),
        }
    }
}

impl TraceSettings {
    /// Whether any request needs a trace context from these settings.
    pub(crate) fn active(&self) -> bool {
        self.start || self.export.is_some()
    }
}

/// One request's trace context, as serin forwards it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TraceContext {
    /// A version-00 `traceparent` for the trace: the client's (normalised),
    /// or the one serin sends upstream when it starts or continues the trace.
    header: [u8; 55],
    /// serin sends `header` upstream instead of the client's field; its
    /// parent id is then serin's own span.
    replaces: bool,
    /// The client's parent span id (hex), when it sent a trace.
    client_parent: Option<[u8; 16]>,
}

impl TraceContext {
    /// The context for a request with these fields: the client's, or a new
    /// one when `settings.start`; `None` when there is none to keep.
    pub(crate) fn of<F: Fields + ?Sized>(
        fields: &F,
        settings: &TraceSettings,
        rng: &FastRng,
    ) -> Option<TraceContext> {
        let client = fields.value(&TRACEPARENT).and_then(parse);
        let (trace_id, parent, sampled) = match &client {
            Some(client) => (client.trace_id, client.parent, client.sampled),
            None if settings.start => {
                let sampled = rng.chance(settings.sample);
                (new_id::<32>(rng), new_id::<16>(rng), sampled)
            }
            None => return None,
        };
        // serin's own span becomes the upstream's parent when serin
        // records spans.
        let exports = settings.export.is_some();
        let parent = if exports && client.is_some() {
            new_id::<16>(rng)
        } else {
            parent
        };
        let mut header = *b"00-00000000000000000000000000000000-0000000000000000-00";
        header[3..35].copy_from_slice(&trace_id);
        header[36..52].copy_from_slice(&parent);
        // Flags other than sampled are not defined for version 00 yet.
        header[54] = if sampled { b'1' } else { b'0' };
        Some(TraceContext {
            header,
            replaces: exports || client.is_none(),
            client_parent: client.map(|c| c.parent),
        })
    }

    /// The trace is sampled: its flags' low bit.
    pub(crate) fn sampled(&self) -> bool {
        self.header[54] == b'1'
    }

    /// serin's own span's ids, as OTLP carries them; `None` unless serin
    /// made a span for the request.
    pub(crate) fn span_ids(&self) -> Option<SpanIds> {
        if !self.replaces {
            return None;
        }
        Some(SpanIds {
            trace_id: unhex(&self.header[3..35]),
            span_id: unhex(&self.header[36..52]),
            parent: self.client_parent.map(|p| unhex(&p)),
        })
    }

    /// The trace id, 32 hex digits.
    pub(crate) fn trace_id(&self) -> &[u8] {
        &self.header[3..35]
    }

    /// The `traceparent` to send upstream instead of the client's, if serin
    /// replaces it.
    pub(crate) fn forward(&self) -> Option<&[u8]> {
        self.replaces.then_some(&self.header[..])
    }
}

/// A span's ids as bytes.
pub(crate) struct SpanIds {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    /// The client's span, the parent of serin's; `None` for a trace serin started.
    pub(crate) parent: Option<[u8; 8]>,
}

struct ClientTrace {
    trace_id: [u8; 32],
    parent: [u8; 16],
    sampled: bool,
}

/// Parses a `traceparent` (W3C Trace Context §3.2): version 00, or a later
/// version read as 00 (§4.3); ids of lowercase hex, not all zeros.
fn parse(value: &[u8]) -> Option<ClientTrace> {
    let value = value.trim_ascii();
    if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let (version, rest) = value.split_at(2);
    if !is_hex(version) || version == b"ff" || (version == b"00" && value.len() != 55) {
        return None;
    }
    if rest[0] != b'-' || rest[33] != b'-' || rest[50] != b'-' {
        return None;
    }
    let (trace_id, parent, flags) = (&rest[1..33], &rest[34..50], &rest[51..53]);
    let nonzero = |id: &[u8]| id.iter().any(|&b| b != b'0');
    if !is_hex(trace_id) || !is_hex(parent) || !is_hex(flags) {
        return None;
    }
    if !nonzero(trace_id) || !nonzero(parent) {
        return None;
    }
    let low_bit = matches!(
        flags[1],
        b'1' | b'3' | b'5' | b'7' | b'9' | b'b' | b'd' | b'f'
    );
    Some(ClientTrace {
        trace_id: trace_id.try_into().ok()?,
        parent: parent.try_into().ok()?,
        sampled: low_bit,
    })
}

fn is_hex(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A random id of `N` lowercase hex digits, never all zeros.
fn new_id<const N: usize>(rng: &FastRng) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; N];
    loop {
        for chunk in id.chunks_mut(16) {
            let mut bits = rng.next_u64();
            for slot in chunk {
                *slot = DIGITS[(bits & 0xf) as usize];
                bits >>= 4;
            }
        }
        if id.iter().any(|&b| b != b'0') {
            return id;
        }
    }
}

/// The bytes of `N * 2` lowercase hex digits (checked by [`parse`] or made
/// by [`new_id`]).
fn unhex<const N: usize>(hex: &[u8]) -> [u8; N] {
    let digit = |b: u8| match b {
        b'0'..=b'9' => b - b'0',
        _ => b - b'a' + 10,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0]) << 4 | digit(pair[1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn with(value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("traceparent", HeaderValue::from_str(value).unwrap());
        map
    }

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_client_trace_is_kept_untouched_unless_serin_makes_spans() {
        let rng = FastRng::new(1);
        let kept = TraceContext::of(&with(CLIENT), &TraceSettings::default(), &rng).unwrap();
        assert_eq!(kept.trace_id(), b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(kept.forward().is_none());

        let spans = TraceSettings {
            export: Some(SpanExport {
                endpoint: "http://127.0.0.1:4318/v1/traces".into(),
                service_name: "serin".into(),
            }),
            ..TraceSettings::default()
        };
        let continued = TraceContext::of(&with(CLIENT), &spans, &rng).unwrap();
        let ids = continued.span_ids().unwrap();
        assert_eq!(ids.trace_id[..4], [0x4b, 0xf9, 0x2f, 0x35]);
        let client_parent = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
        assert_eq!(ids.parent, Some(client_parent));
        assert!(continued.sampled() && ids.span_id != [0; 8]);
        let forward = std::str::from_utf8(continued.forward().unwrap()).unwrap();
        assert!(
            forward.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{forward}"
        );
        assert!(forward.ends_with("-01"), "{forward}");
        assert!(
            !forward.contains("00f067aa0ba902b7"),
            "serin's span is the parent now"
        );
    }

    #[test]
    fn a_trace_is_started_only_when_configured() {
        let rng = FastRng::new(2);
        assert!(TraceContext::of(&HeaderMap::new(), &TraceSettings::default(), &rng).is_none());
        let start = TraceSettings {
            start: true,
            sample: 1.0,
            ..TraceSettings::default()
        };
        let started = TraceContext::of(&HeaderMap::new(), &start, &rng).unwrap();
        let forward = started.forward().unwrap();
        assert!(parse(forward).is_some_and(|t| t.sampled && t.trace_id == started.trace_id()));
        let unsampled = TraceSettings {
            sample: 0.0,
            ..start.clone()
        };
        let started = TraceContext::of(&HeaderMap::new(), &unsampled, &rng).unwrap();
        assert!(started.forward().unwrap().ends_with(b"-00"));
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
        // A later version may carry more, after a dash.
        assert!(parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more").is_some());
    }
}
