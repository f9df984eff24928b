//! How an HTTP/1.1 message body is delimited (RFC 9112 §6).

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, StatusCode};

use crate::fields::{tokens, Fields};

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304, or a length of 0).
    Empty,
    /// This many bytes.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Until the connection closes.
    UntilClose,
    /// A 101: what follows belongs to the upgraded protocol.
    Tunnel,
}

/// Why a response's framing is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("bad content-length")]
    BadLength,
    #[error("conflicting content-length values")]
    ConflictingLengths,
}

/// How the body of a response to `method` with this head is delimited
/// (RFC 9112 §6.3): no body for HEAD, 1xx, 204 and 304; then
/// `Transfer-Encoding` (chunked if chunked is last, else until close), which
/// overrides `Content-Length`; then `Content-Length`; else until close.
pub(crate) fn response_framing<F: Fields + ?Sized>(
    method: &Method,
    status: StatusCode,
    fields: &F,
) -> Result<Framing, FramingError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Framing::Tunnel);
    }
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if fields.value(&TRANSFER_ENCODING).is_some() {
        let chunked_last = tokens(fields, &TRANSFER_ENCODING)
            .last()
            .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked_last {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let length = content_length(fields)?;
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// A message's `Content-Length`, if it has one: every value, and every
/// comma-separated part of one, must be the same decimal number.
pub(crate) fn content_length<F: Fields + ?Sized>(fields: &F) -> Result<Option<u64>, FramingError> {
    let mut length = None;
    for part in tokens(fields, &CONTENT_LENGTH) {
        let n = decimal(part).ok_or(FramingError::BadLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(FramingError::ConflictingLengths);
        }
        length = Some(n);
    }
    Ok(length)
}

/// `1*DIGIT` (as `Content-Length` and `Max-Forwards` are written) that fits
/// in 64 bits.
pub(crate) fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn framing(
        status: u16,
        fields: &[(&'static str, &'static str)],
    ) -> Result<Framing, FramingError> {
        let mut map = HeaderMap::new();
        for (n, v) in fields {
            map.append(*n, v.parse().unwrap());
        }
        response_framing(&Method::GET, StatusCode::from_u16(status).unwrap(), &map)
    }

    #[test]
    fn response_bodies_are_delimited_by_rfc_9112_rules() {
        assert_eq!(
            framing(200, &[("content-length", "7")]),
            Ok(Framing::Length(7))
        );
        assert_eq!(framing(200, &[]), Ok(Framing::UntilClose));
        assert_eq!(framing(204, &[("content-length", "7")]), Ok(Framing::Empty));
        assert_eq!(framing(101, &[]), Ok(Framing::Tunnel));
        assert_eq!(
            framing(
                200,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ]
            ),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(200, &[("transfer-encoding", "gzip")]),
            Ok(Framing::UntilClose)
        );
        assert_eq!(
            framing(200, &[("content-length", "3"), ("content-length", "4")]),
            Err(FramingError::ConflictingLengths)
        );
        assert_eq!(
            framing(200, &[("content-length", "3, 3")]),
            Ok(Framing::Length(3))
        );
        assert_eq!(
            framing(200, &[("content-length", "-1")]),
            Err(FramingError::BadLength)
        );
    }
}
