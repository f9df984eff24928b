//! Outcome classification: is a response an error for the upstream that sent it?
//!
//! HTTP statuses are checked against a configurable set (default: every 5xx).
//! gRPC answers with HTTP 200 and puts its status in `grpc-status`, either in
//! the response headers (trailers-only responses) or in the trailers; the
//! configured codes (default UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE)
//! count as errors. When the status can only come in trailers, the decision is
//! deferred to the end of the body (see [`crate::body`]).

use http::header::{HeaderMap, HeaderName, CONTENT_TYPE};
use http::StatusCode;

use crate::defaults;
use crate::fields::Fields;

/// The verdict on a response's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not an error.
    Success,
    /// An error for the upstream.
    Error,
    /// A gRPC response whose status will arrive in trailers.
    AwaitTrailers,
}

/// Which responses count as errors. Built once from config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classifier {
    /// Bit `s` set = HTTP status `s` is an error (statuses 0..640).
    statuses: [u64; 10],
    /// Bit `c` set = gRPC code `c` is an error (codes 0..=16).
    grpc_codes: u32,
}

impl Default for Classifier {
    /// [`defaults::ERROR_STATUSES`] (every 5xx) and
    /// [`defaults::GRPC_ERROR_CODES`] (2, 4, 13 and 14).
    fn default() -> Self {
        let mut c = Self::none();
        for &(low, high) in defaults::ERROR_STATUSES {
            c.add_status_range(low, high);
        }
        for &code in defaults::GRPC_ERROR_CODES {
            c.add_grpc_code(code);
        }
        c
    }
}

impl Classifier {
    /// A classifier that counts nothing as an error (add to it).
    pub fn none() -> Self {
        Self {
            statuses: [0; 10],
            grpc_codes: 0,
        }
    }

    /// Counts HTTP statuses `low..=high` (within 100..=599) as errors.
    pub fn add_status_range(&mut self, low: u16, high: u16) {
        for s in low.max(100)..=high.min(599) {
            self.statuses[usize::from(s / 64)] |= 1 << (s % 64);
        }
    }

    /// Counts gRPC status `code` (0..=16) as an error.
    pub fn add_grpc_code(&mut self, code: u8) {
        if code <= 16 {
            self.grpc_codes |= 1 << code;
        }
    }

    /// Is this HTTP status an error?
    #[inline]
    pub fn is_error_status(&self, status: StatusCode) -> bool {
        let s = status.as_u16();
        self.statuses[usize::from(s / 64)] & (1 << (s % 64)) != 0
    }

    /// Is this `grpc-status` value an error? Unparseable values are errors
    /// (the gRPC spec treats them as UNKNOWN).
    #[inline]
    pub fn is_error_grpc(&self, value: &[u8]) -> bool {
        let code = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(2);
        code > 16 || self.grpc_codes & (1 << code) != 0
    }

    /// Classifies a response from its status and headers.
    #[inline]
    pub fn classify<H: Fields + ?Sized>(&self, status: StatusCode, headers: &H) -> Outcome {
        if self.is_error_status(status) {
            return Outcome::Error;
        }
        if !is_grpc(headers) {
            return Outcome::Success;
        }
        match headers.value(&GRPC_STATUS) {
            Some(v) if self.is_error_grpc(v) => Outcome::Error,
            Some(_) => Outcome::Success,
            None => Outcome::AwaitTrailers,
        }
    }

    /// Classifies the trailers of a gRPC response (`None`: the stream ended
    /// without trailers, which gRPC treats as an error).
    pub fn classify_trailers(&self, trailers: Option<&HeaderMap>) -> Outcome {
        match trailers.and_then(|t| t.get(&GRPC_STATUS)) {
            Some(v) if !self.is_error_grpc(v.as_bytes()) => Outcome::Success,
            _ => Outcome::Error,
        }
    }
}

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

fn is_grpc<H: Fields + ?Sized>(headers: &H) -> bool {
    headers
        .value(&CONTENT_TYPE)
        .is_some_and(|v| v.starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn grpc(status: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        if let Some(s) = status {
            h.insert("grpc-status", HeaderValue::from_static(s));
        }
        h
    }

    #[test]
    fn default_counts_5xx_only() {
        let c = Classifier::default();
        let h = HeaderMap::new();
        for (s, want) in [
            (200, Outcome::Success),
            (404, Outcome::Success),
            (429, Outcome::Success),
            (500, Outcome::Error),
            (503, Outcome::Error),
            (599, Outcome::Error),
        ] {
            assert_eq!(
                c.classify(StatusCode::from_u16(s).unwrap(), &h),
                want,
                "{s}"
            );
        }
    }

    #[test]
    fn custom_ranges() {
        let mut c = Classifier::none();
        c.add_status_range(429, 429);
        c.add_status_range(502, 504);
        let h = HeaderMap::new();
        assert_eq!(
            c.classify(StatusCode::TOO_MANY_REQUESTS, &h),
            Outcome::Error
        );
        assert_eq!(
            c.classify(StatusCode::INTERNAL_SERVER_ERROR, &h),
            Outcome::Success
        );
        assert_eq!(c.classify(StatusCode::GATEWAY_TIMEOUT, &h), Outcome::Error);
    }

    #[test]
    fn grpc_status_in_headers_and_trailers() {
        let c = Classifier::default();
        assert_eq!(
            c.classify(StatusCode::OK, &grpc(Some("0"))),
            Outcome::Success
        );
        assert_eq!(
            c.classify(StatusCode::OK, &grpc(Some("5"))),
            Outcome::Success,
            "NOT_FOUND is the caller's problem"
        );
        assert_eq!(
            c.classify(StatusCode::OK, &grpc(Some("14"))),
            Outcome::Error
        );
        assert_eq!(
            c.classify(StatusCode::OK, &grpc(Some("junk"))),
            Outcome::Error
        );
        assert_eq!(
            c.classify(StatusCode::OK, &grpc(None)),
            Outcome::AwaitTrailers
        );
        assert_eq!(c.classify_trailers(Some(&grpc(Some("13")))), Outcome::Error);
        assert_eq!(
            c.classify_trailers(Some(&grpc(Some("0")))),
            Outcome::Success
        );
        assert_eq!(c.classify_trailers(None), Outcome::Error);
    }
}
