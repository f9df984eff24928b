//! The chunked transfer coding (RFC 9112 §7.1), decoded and encoded.
//!
//! The decoder never copies data: it strips the framing from a read buffer
//! and says how many data bytes are at its front, for the caller to take.

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::fields::FieldSink;

/// Why a chunked body could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ChunkedError(pub(crate) &'static str);

/// Where a chunked body's decoder stands.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// What [`Chunked::decode`] found.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// This many data bytes are at the front of the buffer; the caller
    /// consumes them.
    Data(usize),
    /// The body ended, with these trailers.
    End(Option<HeaderMap>),
}

/// The longest chunk-size line accepted (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// The largest trailer section accepted.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

impl Chunked {
    /// Decodes what `buf` holds: a piece of data, the end, or `None` when
    /// more bytes are needed. Framing bytes are removed from `buf`; data is
    /// left for the caller to take.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, ChunkedError> {
        loop {
            match self {
                Chunked::Size => {
                    // The same limit whether the line arrives whole or in
                    // pieces (a line with its CRLF fits in the window), and
                    // no search past it.
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
                    let line_end = match find_crlf(window) {
                        Some(end) => end,
                        None if window.len() == MAX_CHUNK_LINE + 2 => {
                            return Err(ChunkedError("chunk size line too long"))
                        }
                        None => return Ok(None),
                    };
                    let size = match httparse::parse_chunk_size(&buf[..line_end + 2]) {
                        Ok(httparse::Status::Complete((_, size))) => size,
                        _ => return Err(ChunkedError("bad chunk size")),
                    };
                    buf.advance(line_end + 2);
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (*remaining).min(buf.len() as u64);
                    *remaining -= take;
                    if *remaining == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Some(Decoded::Data(take as usize)));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkedError("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        return Ok(Some(Decoded::End(None)));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes());
                                let value = HeaderValue::from_bytes(f.value);
                                if let (Ok(name), Ok(value)) = (name, value) {
                                    trailers.append(name, value);
                                }
                            }
                            buf.advance(len);
                            return Ok(Some(Decoded::End(Some(trailers))));
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_TRAILER_BYTES => {
                            return Ok(None)
                        }
                        _ => return Err(ChunkedError("bad chunked trailers")),
                    }
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Appends `data` to `out` as one chunk (nothing for empty data, which
/// would read as the last chunk).
pub(crate) fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut size = [0u8; 16];
    let digits = (64 - (data.len() as u64).leading_zeros())
        .div_ceil(4)
        .max(1) as usize;
    let mut n = data.len();
    for slot in size[..digits].iter_mut().rev() {
        *slot = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
    }
    out.extend_from_slice(&size[..digits]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk, with these trailers.
pub(crate) fn encode_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.field(name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), ChunkedError> {
        let mut chunked = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        // One byte at a time: every partial state is exercised.
        for &b in input {
            buf.extend_from_slice(&[b]);
            while let Some(decoded) = chunked.decode(&mut buf)? {
                match decoded {
                    Decoded::Data(n) => body.extend_from_slice(&buf.split_to(n)),
                    Decoded::End(t) => return Ok((body, t)),
                }
            }
        }
        Err(ChunkedError("ended early"))
    }

    #[test]
    fn chunked_bodies_decode_byte_by_byte() {
        let (body, trailers) =
            decode_all(b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello world!");
        assert!(trailers.is_none());

        let (body, trailers) =
            decode_all(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-t"], "1");
    }

    #[test]
    fn a_size_line_at_the_limit_decodes_however_it_arrives() {
        let mut body = b"1;".to_vec();
        body.resize(MAX_CHUNK_LINE, b'x');
        body.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        // decode_all feeds one byte at a time.
        assert_eq!(decode_all(&body).unwrap().0, b"a");
        body.insert(2, b'x');
        assert!(decode_all(&body).is_err(), "one byte over the limit");
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(b"zz\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n").is_err());
    }

    #[test]
    fn encoded_chunks_decode_to_the_same_bytes() {
        let mut wire = Vec::new();
        for piece in [&b"a"[..], &[7u8; 300][..], b"", b"end"] {
            encode_chunk(&mut wire, piece);
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        encode_last_chunk(&mut wire, Some(&trailers));
        let (body, got) = decode_all(&wire).unwrap();
        let mut expected = b"a".to_vec();
        expected.extend_from_slice(&[7u8; 300]);
        expected.extend_from_slice(b"end");
        assert_eq!(body, expected);
        assert_eq!(got.unwrap()["grpc-status"], "0");
    }
}
