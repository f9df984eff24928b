//! The chunked body decoder (`http1::chunked::Chunked::decode`) fed the way a socket
//! feeds it: all at once, one byte at a time, and in pieces the fuzzer
//! chooses (the first two input bytes seed the cut points; the rest is the
//! body).
//!
//! Properties: it never panics and always makes progress; all three feeds
//! give the same data, trailers, body length and verdict (complete,
//! incomplete or error); and the decoded data and trailers, chunked again,
//! decode back to themselves.
#![no_main]

use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use serin_proxy::fuzzing::{decode_chunked, Dechunked};

fuzz_target!(|input: &[u8]| {
    let [a, b, body @ ..] = input else {
        return;
    };
    let seed = u16::from_le_bytes([*a, *b]);
    let whole = decode_chunked(&[body]);
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    same(&whole, &decode_chunked(&bytes), "byte by byte");
    same(&whole, &decode_chunked(&cut(body, seed)), "in pieces");

    let trailers = match &whole.end {
        Ok(Some(end)) => end.trailers.clone(),
        _ => None,
    };
    let encoded = encode(&whole.data, trailers.as_ref(), seed);
    let again = decode_chunked(&[&encoded]);
    assert_eq!(again.data, whole.data, "data after re-encoding");
    let end = again.end.expect("re-encoded body is an error");
    let end = end.expect("re-encoded body is incomplete");
    assert_eq!(end.len, encoded.len(), "re-encoded body length");
    assert_eq!(non_empty(end.trailers), non_empty(trailers), "trailers");
});

/// Asserts two decodes of the same bytes agree.
fn same(a: &Dechunked, b: &Dechunked, how: &str) {
    assert_eq!(a.data, b.data, "data, all at once vs {how}");
    match (&a.end, &b.end) {
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (Ok(Some(x)), Ok(Some(y))) => {
            assert_eq!(x.len, y.len, "body length, all at once vs {how}");
            assert_eq!(x.trailers, y.trailers, "trailers, all at once vs {how}");
        }
        (x, y) => panic!("verdict differs: all at once {x:?}, {how} {y:?}"),
    }
}

/// Cuts `body` into pieces of 1 to 64 bytes, by a generator seeded with `seed`.
fn cut(body: &[u8], seed: u16) -> Vec<&[u8]> {
    let mut state = u64::from(seed);
    let mut pieces = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let n = ((state >> 33) % 64 + 1) as usize;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// Chunks `data` (chunk sizes cut by `seed`), then the last chunk and trailers.
fn encode(data: &[u8], trailers: Option<&HeaderMap>, seed: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in cut(data, seed) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// No trailers and an empty trailer section are the same.
fn non_empty(trailers: Option<HeaderMap>) -> Option<HeaderMap> {
    trailers.filter(|t| !t.is_empty())
}
