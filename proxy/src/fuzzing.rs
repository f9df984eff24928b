//! Entry points for the fuzz targets in `fuzz/`; not a stable API.
//!
//! Each function runs one of serin's HTTP/1.1 parsers or encoders on bytes
//! exactly as the request path does (the same functions, not copies) and
//! returns plain values for the fuzz target to check.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::fields::{MapSink, RawFields};
use crate::http1::chunked::{Chunked, Decoded};
use crate::http1::framing::{response_framing, Framing as BodyFraming};
use crate::http1::head::parse_response;
use crate::policy::ConnMeta;
use crate::server::own_h1::{parse, Parsed, Scratch};
use crate::stats::Stats;
use crate::upstream::{EndpointSet, OutlierSettings};
use crate::worker::{Shared, UpstreamLinks, Worker};
use crate::{HeaderPolicy, ProxyConfig, RouteTable, Routes, Upstream, UpstreamProtocol};

/// The upstream's `host:port` the request encoder is given.
pub const UPSTREAM_AUTHORITY: &str = "upstream.test:8081";
/// The client address the request encoder is given.
pub const CLIENT_IP: &str = "192.0.2.7";
/// The scheme the client used, as the request encoder is given it.
pub const CLIENT_PROTO: &str = "http";

/// What serin's own HTTP/1.1 loop does with a request head.
#[derive(Debug)]
pub enum RequestHead {
    /// More bytes are needed.
    Partial,
    /// Hyper takes the connection over (a body, an upgrade, an HTTP/2 preface...).
    Handoff,
    /// Answered by serin itself with this status.
    Refused(u16),
    /// Forwarded: the client's head was `len` bytes, `upstream` is what the
    /// upstream receives, and `generated_id` the request id serin made for
    /// a request that came without one.
    Forwarded {
        len: usize,
        upstream: Vec<u8>,
        generated_id: Option<Vec<u8>>,
    },
}

thread_local! {
    /// One worker per header policy: building one per input would cost the
    /// fuzzer most of its time.
    static WORKERS: RefCell<Vec<(HeaderPolicy, Worker)>> = const { RefCell::new(Vec::new()) };
}

fn worker_for(policy: &HeaderPolicy) -> Worker {
    let upstream = Upstream::parse(
        &format!("http://{UPSTREAM_AUTHORITY}"),
        UpstreamProtocol::Http1,
    )
    .expect("a valid upstream URL");
    let mut config = ProxyConfig::new(
        "127.0.0.1:0".parse().expect("an address"),
        upstream.clone(),
        upstream,
    );
    config.headers = policy.clone();
    // Nothing is sent upstream here: the endpoints are never resolved.
    let endpoints = [&config.stable, &config.canary].map(|upstream| {
        Arc::new(EndpointSet::new(
            "fuzz",
            upstream.targets().to_vec(),
            None,
            OutlierSettings::default(),
            &|_, _| Ok(Vec::new()),
        ))
    });
    let now = tokio::time::Instant::now();
    let stats = Stats::new(1, config.window, now);
    let shared = Arc::new(Shared::new(
        config,
        Routes::new(RouteTable::new(0)),
        None,
        UpstreamLinks {
            endpoints,
            tls: [None, None],
        },
        now,
        None,
        None,
    ));
    Worker::new(0, shared, stats.worker(0))
}

/// Runs a client request head through the own loop's parse, admission and
/// upstream encoder (`server::own_h1::parse`).
pub fn forward_request_head(input: &[u8], policy: &HeaderPolicy) -> RequestHead {
    let meta = ConnMeta {
        peer: CLIENT_IP.parse().expect("an address"),
        client_ip: HeaderValue::from_static(CLIENT_IP),
        proto: HeaderValue::from_static(CLIENT_PROTO),
        identity: None,
    };
    WORKERS.with(|workers| {
        let mut workers = workers.borrow_mut();
        let at = match workers.iter().position(|(p, _)| same_policy(p, policy)) {
            Some(at) => at,
            None => {
                workers.push((policy.clone(), worker_for(policy)));
                workers.len() - 1
            }
        };
        let worker = &workers[at].1;
        let mut scratch = Scratch::default();
        match parse(worker, &meta, input, &mut scratch) {
            Parsed::Partial => RequestHead::Partial,
            Parsed::Handoff => RequestHead::Handoff,
            Parsed::Ready(request) => match &request.refusal {
                Some(refusal) => {
                    RequestHead::Refused(crate::policy::local_answer(refusal).status.as_u16())
                }
                None => RequestHead::Forwarded {
                    len: request.len,
                    upstream: scratch.upstream_head,
                    generated_id: request.request_id.generated().map(<[u8]>::to_vec),
                },
            },
        }
    })
}

fn same_policy(a: &HeaderPolicy, b: &HeaderPolicy) -> bool {
    (a.rewrite_host, a.via, a.upstream_header, &a.identity_header)
        == (b.rewrite_host, b.via, b.upstream_header, &b.identity_header)
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (0 included).
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// An upstream response head, as serin reads it.
#[derive(Debug)]
pub struct ResponseHead {
    /// Length of the head in bytes.
    pub len: usize,
    pub status: u16,
    /// True for HTTP/1.1, false for HTTP/1.0.
    pub http11: bool,
    pub keep_alive: bool,
    /// The fields in order, as (name, value) slices of the head.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// The fields as a header map, as hyper's path builds it (values
    /// shared with the head's bytes).
    pub map: Result<HeaderMap, String>,
    /// The body's framing from the fields, for a response that has a body
    /// (a 200 to a GET).
    pub framing: Result<Framing, String>,
}

/// Parses a response head at the front of `input`; `Ok(None)` when more
/// bytes are needed.
pub fn parse_response_head(input: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut spans = Vec::new();
    let Some(head) = parse_response(input, &mut spans, 64 * 1024).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let bytes = Bytes::copy_from_slice(&input[..head.len]);
    let raw = RawFields {
        head: &bytes,
        spans: &spans,
    };
    let framing = match response_framing(&Method::GET, StatusCode::OK, &raw) {
        Ok(BodyFraming::Length(n)) => Ok(Framing::Length(n)),
        Ok(BodyFraming::Empty) => Ok(Framing::Length(0)),
        Ok(BodyFraming::Chunked) => Ok(Framing::Chunked),
        Ok(BodyFraming::UntilClose) => Ok(Framing::UntilClose),
        Ok(BodyFraming::Tunnel) => unreachable!("a 200 is no tunnel"),
        Err(e) => Err(e.to_string()),
    };
    let mut map = HeaderMap::new();
    for (name, value) in raw.iter() {
        crate::fields::FieldSink::field(
            &mut MapSink {
                map: &mut map,
                shared: Some(&bytes),
            },
            name,
            value,
        );
    }
    Ok(Some(ResponseHead {
        len: head.len,
        status: head.status.as_u16(),
        // httparse skips empty lines before a message's start line.
        http11: input
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .is_some_and(|start| input[start..].starts_with(b"HTTP/1.1")),
        keep_alive: head.keep_alive,
        fields: raw.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
        map: Ok(map),
        framing,
    }))
}

/// A chunked body decoded from pieces, as serin's response body reads it.
#[derive(Debug)]
pub struct Dechunked {
    /// The data decoded, up to the end or the error.
    pub data: Vec<u8>,
    /// `Ok(None)`: the pieces ended before the body did.
    pub end: Result<Option<ChunkedEnd>, String>,
}

/// How a chunked body ended.
#[derive(Debug)]
pub struct ChunkedEnd {
    pub trailers: Option<HeaderMap>,
    /// Bytes of the input the body took; the rest belongs to what follows.
    pub len: usize,
}

/// Feeds `pieces` one after another to the chunked decoder, taking the data
/// it reports as the body readers do.
pub fn decode_chunked(pieces: &[&[u8]]) -> Dechunked {
    let mut decoder = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut fed = 0;
    for piece in pieces {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(Decoded::Data(n))) => {
                    // The readers loop on `decode`: no progress would hang them.
                    assert!(n > 0, "decode reported 0 data bytes");
                    data.extend_from_slice(&buf.split_to(n));
                }
                Ok(Some(Decoded::End(trailers))) => {
                    let len = fed - buf.len();
                    let end = Ok(Some(ChunkedEnd { trailers, len }));
                    return Dechunked { data, end };
                }
                Err(e) => {
                    let end = Err(e.to_string());
                    return Dechunked { data, end };
                }
            }
        }
    }
    Dechunked {
        data,
        end: Ok(None),
    }
}

/// Decodes `input` as two header blocks with one HPACK decoder
/// (`http2::hpack::Decoder`, with the 4096-byte table serin advertises), so
/// that the second block sees the dynamic table the first one left: the
/// first input byte is the first block's length, the rest are the blocks.
/// Returns the number of fields decoded, or the first error's message.
///
/// Asserts that the dynamic table never exceeds its limit, and that the
/// fields, encoded again by serin's encoder (`encode_status` for a
/// three-digit `:status`, `encode_field` otherwise), decode back to
/// themselves, with their names in lowercase (what the encoder sends).
pub fn hpack_decode(input: &[u8]) -> Result<usize, String> {
    use crate::http2::hpack::{encode_field, encode_status, Decoder};

    const TABLE_SIZE: usize = 4096;
    let Some((&cut, blocks)) = input.split_first() else {
        return Ok(0);
    };
    let (first, second) = blocks.split_at(usize::from(cut).min(blocks.len()));
    let mut decoder = Decoder::new(TABLE_SIZE);
    let mut fields = Vec::new();
    for block in [first, second] {
        let decoded = decoder.decode(block, |name, value| {
            fields.push((name.to_vec(), value.to_vec()));
        });
        assert!(
            decoder.table_size() <= TABLE_SIZE,
            "table size {} above {TABLE_SIZE}",
            decoder.table_size()
        );
        decoded.map_err(|e| e.to_string())?;
    }

    let mut encoded = Vec::new();
    for (name, value) in &fields {
        let status = std::str::from_utf8(value)
            .ok()
            .filter(|v| v.len() == 3 && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|s| *s >= 100);
        match status {
            Some(status) if name == b":status" => encode_status(status, &mut encoded),
            _ => encode_field(name, value, false, &mut encoded),
        }
    }
    let mut again = Vec::new();
    Decoder::new(TABLE_SIZE)
        .decode(&encoded, |name, value| {
            again.push((name.to_vec(), value.to_vec()));
        })
        .expect("serin's encoding decodes");
    for (name, _) in &mut fields {
        name.make_ascii_lowercase();
    }
    assert_eq!(again, fields, "fields after re-encoding");
    Ok(fields.len())
}
