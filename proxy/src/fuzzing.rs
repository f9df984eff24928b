//! Entry points for the fuzz targets in fuzz/; not a stable API.
//!
//! Each function runs one of serin's HTTP/1.1 parsers or encoders on bytes
//! the way the request path does, and returns plain values for the fuzz
//! target to check. They stay thin so that they are easy to re-point when
//! the parsers move.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Method};

use crate::fields::{Fields, RawFields};
use crate::h1::{header_map, parse_head, response_framing, Chunked, Decoded, State};
use crate::h1_server::encode_upstream_head_with;
use crate::server::{ConnMeta, X_REQUEST_ID};
use crate::HeaderPolicy;

/// The upstream's `host:port` the request encoder is given.
pub const UPSTREAM_AUTHORITY: &str = "upstream.test:8081";
/// The client address the request encoder is given.
pub const CLIENT_IP: &str = "192.0.2.7";
/// The scheme the client used, as the request encoder is given it.
pub const CLIENT_PROTO: &str = "http";
/// The request id serin would generate for a request without one.
pub const GENERATED_REQUEST_ID: &[u8; 24] = b"00000000000000aa00000001";

/// `h1_server::MAX_HEADERS`: the most request fields serin's own loop parses.
const MAX_REQUEST_HEADERS: usize = 64;

/// What serin's HTTP/1.1 loop does with a request head.
#[derive(Debug)]
pub enum RequestHead {
    /// More bytes are needed.
    Partial,
    /// Hyper takes the connection over (malformed, a body, an upgrade...).
    Handoff,
    /// Answered by serin itself (an HTTP/1.1 request without `Host`).
    Refused,
    /// Forwarded: the client's head was `len` bytes and `upstream` is what
    /// the upstream receives.
    Forwarded { len: usize, upstream: Vec<u8> },
}

/// Parses a client request head as `h1_server::parse_request` does and, if
/// it is forwarded, encodes the upstream request with the real encoder.
pub fn forward_request_head(input: &[u8], policy: &HeaderPolicy) -> RequestHead {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, input, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return RequestHead::Partial,
        Err(_) => return RequestHead::Handoff,
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return RequestHead::Handoff;
    };
    let fields = &*req.headers;
    let bodiless = fields.value(&TRANSFER_ENCODING).is_none()
        && fields.values(&CONTENT_LENGTH).all(|v| v == b"0");
    if !path.starts_with('/')
        || !bodiless
        || fields.value(&UPGRADE).is_some()
        || fields.value(&EXPECT).is_some()
        || Method::from_bytes(method.as_bytes()).is_err()
    {
        return RequestHead::Handoff;
    }
    if minor == 1 && fields.value(&HOST).is_none() {
        return RequestHead::Refused;
    }
    let request_id = fields.value(&X_REQUEST_ID).unwrap_or(GENERATED_REQUEST_ID);
    let meta = ConnMeta {
        client_ip: HeaderValue::from_static(CLIENT_IP),
        proto: HeaderValue::from_static(CLIENT_PROTO),
    };
    let mut upstream = Vec::new();
    encode_upstream_head_with(
        policy,
        UPSTREAM_AUTHORITY.as_bytes(),
        &meta,
        &req,
        request_id,
        &mut upstream,
    );
    RequestHead::Forwarded { len, upstream }
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
    /// The fields as the map hyper's path gets (`h1::header_map`).
    pub map: Result<HeaderMap, String>,
    /// The body's framing from the raw fields (`h1::response_framing`), for
    /// a response that has a body.
    pub framing: Result<Framing, String>,
}

/// Parses a response head at the front of `input` (`h1::parse_head`);
/// `Ok(None)` when more bytes are needed.
pub fn parse_response_head(input: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut spans = Vec::new();
    let Some(info) = parse_head(input, &mut spans).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let raw = RawFields {
        head: &input[..info.len],
        spans: &spans,
    };
    let framing = match response_framing(&raw) {
        Ok(State::Length(n)) => Ok(Framing::Length(n)),
        Ok(State::Done) => Ok(Framing::Length(0)),
        Ok(State::Chunked(_)) => Ok(Framing::Chunked),
        Ok(State::UntilClose) => Ok(Framing::UntilClose),
        Ok(State::Full(_) | State::Tunnel) => unreachable!("not a framing of a head"),
        Err(e) => Err(e.to_string()),
    };
    Ok(Some(ResponseHead {
        len: info.len,
        status: info.status.as_u16(),
        http11: info.version == http::Version::HTTP_11,
        keep_alive: info.keep_alive,
        fields: raw.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
        map: header_map(&Bytes::copy_from_slice(&input[..info.len]), &spans)
            .map_err(|e| e.to_string()),
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

/// Feeds `pieces` one after another to `h1::Chunked::decode`, taking the
/// data it reports as the body readers do.
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
