//! A minimal blocking HTTP/1.1 client for one OTLP/HTTP endpoint: it POSTs
//! an export request, reads the answer, and keeps the connection for the
//! next export.
//!
//! It runs on the exporter's own thread, never on a worker: blocking is its
//! way of waiting, and each export is bounded by one deadline (the
//! configured timeout), connect, write and read included. Response heads are
//! parsed and bodies delimited by serin's one HTTP/1.1 codec
//! ([`crate::http1`]). Plain `http://` only.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode, Uri};

use crate::defaults;
use crate::fields::{FieldSink, RawFields, Span};
use crate::http1::chunked::{Chunked, Decoded};
use crate::http1::framing::{response_framing, Framing};
use crate::http1::head::{parse_response, write_request_line};

/// The largest response head read from a collector.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

// === Endpoint ===

/// Where spans go: an `http://` URL, checked once at start.
pub(super) struct Endpoint {
    url: String,
    /// The host to resolve (an IPv6 address without its brackets).
    host: String,
    port: u16,
    authority: String,
    /// Path and query, sent as the request target.
    target: String,
}

impl Endpoint {
    /// Parses `url`; the error says what to write instead.
    pub(super) fn parse(url: &str) -> io::Result<Self> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let example = defaults::OTLP_ENDPOINT;
        let uri: Uri = url.parse().map_err(|e| {
            invalid(format!(
                "OTLP endpoint {url:?} is not a URL ({e}); write it as {example}"
            ))
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(format!(
                    "OTLP endpoint {url}: https is not supported yet; send to a collector \
                     on this host or a sidecar over http://, e.g. {example}"
                )))
            }
            _ => {
                return Err(invalid(format!(
                    "OTLP endpoint {url:?} must be an http:// URL, e.g. {example}"
                )))
            }
        }
        let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
            return Err(invalid(format!(
                "OTLP endpoint {url:?} has no host; write it as {example}"
            )));
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Self {
            url: url.to_string(),
            host: host.to_string(),
            port: uri.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            target: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

// === ExportError ===

/// Why one export failed: what happened, then what to check.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExportError {
    #[error("cannot resolve the host ({0}); check the endpoint's host name")]
    Resolve(io::Error),
    #[error("connection refused; is the collector running and listening there?")]
    Refused,
    #[error("cannot connect ({0}); check the endpoint and the network")]
    Connect(io::Error),
    #[error("no answer within {0:?}; is the collector overloaded, or the address wrong?")]
    TimedOut(Duration),
    #[error("the connection failed ({0}); check the collector's logs")]
    Io(io::Error),
    #[error("the collector closed the connection without answering; check its logs")]
    Closed,
    #[error("the answer is not HTTP/1.1 ({0}); is this the collector's OTLP/HTTP port (4318), not its gRPC port (4317)?")]
    Malformed(String),
    #[error("the collector answered {0}; {hint}", hint = status_hint(*.0))]
    Status(StatusCode),
}

fn status_hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        404 => "is the endpoint's path right (the collector's is /v1/traces)?",
        429 | 503 => "the collector is overloaded or refusing data",
        _ => "check the collector's logs",
    }
}

/// A failed attempt, and whether it failed as a connection the peer had
/// already closed does (nothing came back): worth one more try on a new one.
struct Failure {
    error: ExportError,
    stale: bool,
}

/// The time left before `deadline`, as a socket timeout (never zero, which
/// the socket calls refuse).
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

// === Client ===

/// One endpoint's connection, and the buffers every export reuses.
pub(super) struct Client {
    endpoint: Endpoint,
    timeout: Duration,
    conn: Option<TcpStream>,
    /// The request line and the fields every request has.
    head: Vec<u8>,
    request: Vec<u8>,
    read: BytesMut,
    spans: Vec<Span>,
}

impl Client {
    pub(super) fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        let mut head = Vec::new();
        write_request_line(&mut head, b"POST", endpoint.target.as_bytes());
        head.field(b"host", endpoint.authority.as_bytes());
        head.field(b"content-type", b"application/x-protobuf");
        Self {
            endpoint,
            timeout,
            conn: None,
            head,
            request: Vec::new(),
            read: BytesMut::new(),
            spans: Vec::new(),
        }
    }

    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// POSTs a body of `len` bytes, which `write_body` appends, and waits
    /// for a 2xx answer, for at most the timeout.
    pub(super) fn post(
        &mut self,
        len: usize,
        write_body: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.timeout;
        self.request.clear();
        self.request.extend_from_slice(&self.head);
        // Writing into a Vec cannot fail.
        let _ = write!(self.request, "content-length: {len}\r\n\r\n");
        let body = self.request.len();
        write_body(&mut self.request);
        debug_assert_eq!(self.request.len() - body, len);
        let result = loop {
            let reused = self.conn.is_some();
            let mut stream = match self.conn.take() {
                Some(stream) => stream,
                None => match self.connect(deadline) {
                    Ok(stream) => stream,
                    Err(e) => break Err(e),
                },
            };
            match self.exchange(&mut stream, deadline) {
                Ok((status, keep_alive)) => {
                    if keep_alive {
                        self.conn = Some(stream);
                    }
                    break if status.is_success() {
                        Ok(())
                    } else {
                        Err(ExportError::Status(status))
                    };
                }
                // A kept connection the collector had closed: once more on
                // a new one (the new one is not reused, so this ends).
                Err(Failure { stale: true, .. }) if reused => continue,
                Err(failure) => break Err(failure.error),
            }
        };
        self.request.clear();
        result
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream, ExportError> {
        let addrs = (self.endpoint.host.as_str(), self.endpoint.port)
            .to_socket_addrs()
            .map_err(ExportError::Resolve)?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        for addr in addrs {
            let left = remaining(deadline).map_err(|_| ExportError::TimedOut(self.timeout))?;
            match TcpStream::connect_timeout(&addr, left) {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(ExportError::Connect)?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(match last.kind() {
            io::ErrorKind::ConnectionRefused => ExportError::Refused,
            _ if is_timeout(&last) => ExportError::TimedOut(self.timeout),
            _ => ExportError::Connect(last),
        })
    }

    /// Sends the request and reads the answer: its status, and whether the
    /// connection can carry the next request.
    fn exchange(
        &mut self,
        stream: &mut TcpStream,
        deadline: Instant,
    ) -> Result<(StatusCode, bool), Failure> {
        let timeout = self.timeout;
        let failed = |e: io::Error, received: bool| Failure {
            stale: !received && !is_timeout(&e),
            error: if is_timeout(&e) {
                ExportError::TimedOut(timeout)
            } else {
                ExportError::Io(e)
            },
        };
        let malformed = |why: String| Failure {
            error: ExportError::Malformed(why),
            stale: false,
        };
        write_all(stream, &self.request, deadline).map_err(|e| failed(e, false))?;
        self.read.clear();
        let mut received = false;
        let head = loop {
            if !self.read.is_empty() {
                match parse_response(&self.read, &mut self.spans, MAX_HEAD_BYTES) {
                    Err(e) => return Err(malformed(e.to_string())),
                    Ok(Some(head)) if head.status.is_informational() => {
                        if head.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Err(malformed("an unasked 101".to_string()));
                        }
                        self.read.advance(head.len);
                        continue;
                    }
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                }
            }
            match fill(stream, &mut self.read, deadline) {
                Ok(0) => {
                    return Err(Failure {
                        error: ExportError::Closed,
                        stale: !received,
                    })
                }
                Ok(_) => received = true,
                Err(e) => return Err(failed(e, received)),
            }
        };
        let fields = RawFields {
            head: &self.read[..head.len],
            spans: &self.spans,
        };
        let framing = response_framing(&Method::POST, head.status, &fields)
            .map_err(|e| malformed(e.to_string()))?;
        self.read.advance(head.len);
        // The answer counts once its head is in; a body that breaks off
        // only costs the connection.
        let clean = self.discard_body(stream, framing, deadline);
        let keep_alive = head.keep_alive && clean && self.read.is_empty();
        Ok((head.status, keep_alive))
    }

    /// Reads past the answer's body (serin needs nothing from it); true if
    /// it ended where its framing says, with the connection still usable.
    fn discard_body(
        &mut self,
        stream: &mut TcpStream,
        framing: Framing,
        deadline: Instant,
    ) -> bool {
        match framing {
            Framing::Empty => true,
            Framing::Length(mut left) => loop {
                let take = left.min(self.read.len() as u64);
                self.read.advance(take as usize);
                left -= take;
                if left == 0 {
                    return true;
                }
                if !matches!(fill(stream, &mut self.read, deadline), Ok(n) if n > 0) {
                    return false;
                }
            },
            Framing::Chunked => {
                let mut decoder = Chunked::Size;
                loop {
                    match decoder.decode(&mut self.read) {
                        Ok(Some(Decoded::Data(n))) => self.read.advance(n),
                        Ok(Some(Decoded::End(_))) => return true,
                        Ok(None) => {
                            if !matches!(fill(stream, &mut self.read, deadline), Ok(n) if n > 0) {
                                return false;
                            }
                        }
                        Err(_) => return false,
                    }
                }
            }
            Framing::UntilClose | Framing::Tunnel => {
                loop {
                    self.read.clear();
                    if !matches!(fill(stream, &mut self.read, deadline), Ok(n) if n > 0) {
                        break;
                    }
                }
                false
            }
        }
    }
}

/// Writes all of `buf` before `deadline`.
fn write_all(stream: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads once into the end of `buf`, waiting until `deadline` at most.
fn fill(stream: &mut TcpStream, buf: &mut BytesMut, deadline: Instant) -> io::Result<usize> {
    stream.set_read_timeout(Some(remaining(deadline)?))?;
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let read = loop {
        match stream.read(&mut buf[start..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            read => break read,
        }
    };
    buf.truncate(start + *read.as_ref().unwrap_or(&0));
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_must_be_a_plain_http_url() {
        let e = Endpoint::parse("http://[::1]:4318/v1/traces").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 4318));
        assert_eq!(
            (e.authority.as_str(), e.target.as_str()),
            ("[::1]:4318", "/v1/traces")
        );
        let e = Endpoint::parse("http://collector").unwrap();
        assert_eq!((e.port, e.target.as_str()), (80, "/"));

        let error = |url| Endpoint::parse(url).err().unwrap().to_string();
        let https = error("https://collector:4318/v1/traces");
        assert!(https.contains("https is not supported yet"), "{https}");
        assert!(https.contains("http://127.0.0.1:4318/v1/traces"), "{https}");
        let bare = error("127.0.0.1:4318");
        assert!(bare.contains("must be an http:// URL"), "{bare}");
        let garbage = error("http://exa mple");
        assert!(garbage.contains("is not a URL"), "{garbage}");
    }
}
