//! The upstream side: where an upstream is, how serin talks to it, and what
//! can go wrong.
//!
//! Each worker owns one [`Pool`] per upstream ([`pool`]). HTTP/1.1 goes
//! through serin's own client ([`connection`], [`upload`], [`body`]), built on
//! the same codec as the server ([`crate::http1`]); an h2c upstream is spoken
//! to with hyper's client over one shared connection per worker.
//!
//! Dependencies run one way: `pool` → `body` → `idle` → `connection` →
//! `upload`; none of them knows the server side.

mod body;
mod connection;
mod endpoints;
mod idle;
mod pool;
mod socket;
pub mod tls;
mod upload;

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

pub(crate) use body::{Copied, ResponseBody, Tunnel, UpstreamResponse};
pub(crate) use endpoints::{system_resolve, Target};
pub use endpoints::{EndpointSet, EndpointSnapshot, OutlierSettings};
pub(crate) use pool::H1Request;
pub use pool::Pool;
pub use tls::UpstreamTls;
pub(crate) use upload::RequestFraming;

use crate::client_body::{ClientBody, ClientBodyError};
use crate::http1::chunked::ChunkedError;
use crate::http1::framing::FramingError;
use crate::http1::head::HeadError;

/// Which HTTP version serin speaks to an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive (the default; what most apps speak).
    #[default]
    Http1,
    /// HTTP/2: with prior knowledge (h2c) over plain TCP, by ALPN `h2`
    /// over TLS. Needed for gRPC upstreams.
    Http2,
    /// Over TLS only: whichever ALPN chooses, `h2` or `http/1.1`, learned
    /// from each worker's first connection (Envoy's `auto_config`).
    Auto,
}

/// Why an upstream URL was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamUrlError {
    /// Not a parseable URI.
    #[error("`{url}` is not a valid URL: {reason}")]
    Invalid { url: String, reason: String },
    /// Only http and https are proxied to.
    #[error("`{url}` must start with http:// or https://")]
    Scheme { url: String },
    /// `protocol = "auto"` needs TLS, where ALPN chooses.
    #[error("`{url}`: protocol \"auto\" needs https:// (ALPN chooses between h2 and http/1.1); write http1 or http2 for http://")]
    AutoWithoutTls { url: String },
    /// A list mixes http:// and https://.
    #[error("`{url}` mixes http:// and https://; an upstream's URLs must all be one or the other")]
    MixedSchemes { url: String },
    /// A path or query would be silently ignored.
    #[error("`{url}` has a path; write only scheme, host and port, e.g. http://127.0.0.1:8080")]
    Path { url: String },
}

/// Where an upstream is and how to talk to it. Built once at start-up.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The URL, or comma-separated URLs, as the user wrote them (for status
    /// output).
    pub url: String,
    /// Each URL's host and port: the endpoints' source.
    targets: Vec<Target>,
    /// The first URL's `host:port`, used as the `Host` header when
    /// `rewrite_host` is on.
    pub(crate) authority: HeaderValue,
    /// The protocol spoken to it.
    pub protocol: UpstreamProtocol,
    /// TLS settings: `Some` exactly for `https://` URLs.
    pub tls: Option<UpstreamTls>,
    /// How often a host name is resolved again (default 5 s).
    pub resolve_interval: Duration,
    /// When an endpoint is taken out of rotation.
    pub outlier: OutlierSettings,
}

impl Upstream {
    /// Parses `http://host[:port]` (port 80 by default) or
    /// `https://host[:port]` (port 443 by default, TLS with default
    /// settings), or several such URLs separated by commas, all of one
    /// scheme: an upstream of several endpoints.
    pub fn parse(url: &str, protocol: UpstreamProtocol) -> Result<Self, UpstreamUrlError> {
        let mut targets = Vec::new();
        let mut first: Option<(bool, HeaderValue)> = None;
        for one in url.split(',').map(str::trim) {
            let (tls, authority, target) = Self::parse_one(one)?;
            match &first {
                None => first = Some((tls, authority)),
                Some((first_tls, _)) if *first_tls != tls => {
                    return Err(UpstreamUrlError::MixedSchemes {
                        url: url.to_string(),
                    })
                }
                Some(_) => {}
            }
            targets.push(target);
        }
        let (tls, authority) = first.expect("split yields at least one part");
        if protocol == UpstreamProtocol::Auto && !tls {
            return Err(UpstreamUrlError::AutoWithoutTls {
                url: url.to_string(),
            });
        }
        Ok(Self {
            url: url.to_string(),
            targets,
            authority,
            protocol,
            tls: tls.then(UpstreamTls::default),
            resolve_interval: crate::defaults::RESOLVE_INTERVAL,
            outlier: OutlierSettings::default(),
        })
    }

    /// One URL: whether it is https, its authority, and its target.
    fn parse_one(url: &str) -> Result<(bool, HeaderValue, Target), UpstreamUrlError> {
        let invalid = |reason: String| UpstreamUrlError::Invalid {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
        let (tls, default_port) = match uri.scheme_str() {
            Some("http") => (false, 80),
            Some("https") => (true, 443),
            _ => {
                return Err(UpstreamUrlError::Scheme {
                    url: url.to_string(),
                })
            }
        };
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(UpstreamUrlError::Path {
                url: url.to_string(),
            });
        }
        let authority = uri
            .authority()
            .ok_or_else(|| invalid("no host".to_string()))?;
        let target = Target {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(default_port),
        };
        let header =
            HeaderValue::from_str(authority.as_str()).map_err(|e| invalid(e.to_string()))?;
        Ok((tls, header, target))
    }

    /// The first URL's host (without brackets for IPv6).
    pub fn host(&self) -> &str {
        &self.targets[0].host
    }

    /// The hosts of its URLs.
    pub(crate) fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Checks that the TLS files of an `https://` upstream load, as serin
    /// would load them (`serin check`).
    pub fn check_tls(&self) -> Result<(), crate::tls::TlsError> {
        match &self.tls {
            Some(tls) => tls::check(tls, &self.targets, self.protocol),
            None => Ok(()),
        }
    }
}

/// Timeouts and limits of the upstream side.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Time allowed to open a TCP connection (default 3 s).
    pub connect_timeout: Duration,
    /// A pooled connection unused for longer is closed instead of reused (default 60 s).
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream per worker (default 256).
    pub max_idle: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            connect_timeout: crate::defaults::CONNECT_TIMEOUT,
            idle_timeout: crate::defaults::UPSTREAM_IDLE_TIMEOUT,
            max_idle: crate::defaults::MAX_IDLE_PER_UPSTREAM,
        }
    }
}

// === errors ===

/// What went wrong talking to an upstream. [`crate::policy::local_answer`]
/// maps it to a status.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream has no address: its host name has not resolved yet.
    #[error("{url} has no address to connect to (its host name does not resolve)")]
    NoEndpoint { url: String },
    /// No TCP connection could be made (refused, unreachable).
    #[error("connect to {url} ({endpoint}) failed: {source}")]
    Connect {
        url: String,
        endpoint: SocketAddr,
        source: io::Error,
    },
    /// The connect (and TLS handshake) did not finish in time.
    #[error("connect to {url} ({endpoint}) timed out after {timeout:?}")]
    ConnectTimeout {
        url: String,
        endpoint: SocketAddr,
        timeout: Duration,
    },
    /// The TLS handshake failed (certificate not trusted, wrong name, ALPN).
    #[error("TLS handshake with {url} ({endpoint}) failed: {source}")]
    Tls {
        url: String,
        endpoint: SocketAddr,
        source: io::Error,
    },
    /// The HTTP handshake failed.
    #[error("handshake with {url} failed: {source}")]
    Handshake { url: String, source: hyper::Error },
    /// The connection broke before a response arrived (reset, closed, bad response).
    #[error("{url} failed before responding: {source}")]
    Broken { url: String, source: WireError },
    /// The client's request body broke off while it was being forwarded:
    /// the client's fault, never counted against the upstream.
    #[error("the client's request body broke off: {source}")]
    ClientAborted { source: ClientBodyError },
    /// No response headers within the response timeout.
    #[error("{url} did not respond within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// Why an HTTP/1.1 exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before its message was complete.
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    /// The upstream's response head is not valid HTTP/1.1.
    #[error("invalid response from the upstream: {0}")]
    Head(#[from] HeadError),
    /// The upstream's response framing is invalid.
    #[error("invalid response from the upstream: {0}")]
    Framing(#[from] FramingError),
    /// The upstream's chunked body is invalid.
    #[error("invalid chunked body from the upstream: {0}")]
    Chunked(#[from] ChunkedError),
    /// The upstream switched protocols unasked.
    #[error("the upstream answered 101 to a request that asked for no upgrade")]
    UnaskedUpgrade,
}

/// How an exchange with an upstream failed on the wire: before the response
/// (`UpstreamError::Broken`) or while its body streamed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// HTTP/1.1 upstream.
    #[error(transparent)]
    Http1(#[from] Http1Error),
    /// h2c upstream.
    #[error(transparent)]
    Http2(#[from] hyper::Error),
}

// === impl RequestBody ===

/// The body sent upstream: the client's, streamed, or none.
pub enum RequestBody {
    /// The client's body, complete when the request is sent (none, or
    /// already received).
    Client(ClientBody),
    /// The client's body, still arriving: streamed through, and its end time
    /// noted so that the response timeout can count from it.
    Upload {
        /// The body.
        body: ClientBody,
        /// Set when the last frame has gone by.
        ended: UploadEnd,
    },
    /// No body.
    Empty,
}

/// How far a streamed request body got: written by the body, read by the
/// response timeout (its end) and the access log (its bytes). Only uploads
/// allocate one.
pub type UploadEnd = Rc<UploadProgress>;

/// See [`UploadEnd`].
#[derive(Debug, Default)]
pub struct UploadProgress {
    /// When the last frame went by.
    pub ended: Cell<Option<Instant>>,
    /// Data bytes that went by.
    pub bytes: Cell<u64>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            RequestBody::Client(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Upload { body, ended } => {
                let frame = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &frame {
                    if let Some(data) = frame.data_ref() {
                        ended.bytes.set(ended.bytes.get() + data.len() as u64);
                    }
                }
                if matches!(frame, Poll::Ready(None)) || body.is_end_stream() {
                    ended.ended.set(Some(Instant::now()));
                }
                frame
            }
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(b) | RequestBody::Upload { body: b, .. } => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(b) | RequestBody::Upload { body: b, .. } => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

// === impl UpstreamBody ===

/// A response body as it comes from an upstream.
pub enum UpstreamBody {
    /// From serin's HTTP/1.1 client: read straight off the connection.
    Http1(ResponseBody),
    /// From a shared h2c connection (hyper).
    Http2(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => Pin::new(b).poll_frame(cx).map_err(WireError::from),
            UpstreamBody::Http2(b) => Pin::new(b).poll_frame(cx).map_err(WireError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Http2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_validated() {
        let at = |u: &Upstream| {
            u.targets
                .iter()
                .map(|t| (t.host.clone(), t.port))
                .collect::<Vec<_>>()
        };
        let u = Upstream::parse("http://127.0.0.1:8080", UpstreamProtocol::Http1).unwrap();
        assert_eq!(at(&u), [("127.0.0.1".into(), 8080)]);
        assert_eq!(u.authority, "127.0.0.1:8080");
        let u = Upstream::parse("http://app.ns.svc/", UpstreamProtocol::Http1).unwrap();
        assert_eq!(at(&u), [("app.ns.svc".into(), 80)]);
        let u = Upstream::parse("http://[::1]:9000", UpstreamProtocol::Http1).unwrap();
        assert_eq!(at(&u), [("::1".into(), 9000)]);
        let u =
            Upstream::parse("http://10.0.0.1:81, http://app:82", UpstreamProtocol::Http1).unwrap();
        assert_eq!(at(&u), [("10.0.0.1".into(), 81), ("app".into(), 82)]);
        assert_eq!(u.authority, "10.0.0.1:81");
        assert!(matches!(
            Upstream::parse("http://a:1,https://b:2", UpstreamProtocol::Http1),
            Err(UpstreamUrlError::MixedSchemes { .. })
        ));
        assert!(Upstream::parse("http://a:1,", UpstreamProtocol::Http1).is_err());
        let u = Upstream::parse("https://app.example", UpstreamProtocol::Http1).unwrap();
        assert_eq!(at(&u), [("app.example".into(), 443)]);
        assert_eq!(u.tls, Some(UpstreamTls::default()));
        assert!(matches!(
            Upstream::parse("ftp://x:1", UpstreamProtocol::Http1),
            Err(UpstreamUrlError::Scheme { .. })
        ));
        assert!(matches!(
            Upstream::parse("http://x:1/api", UpstreamProtocol::Http1),
            Err(UpstreamUrlError::Path { .. })
        ));
        assert!(Upstream::parse("not a url", UpstreamProtocol::Http1).is_err());
    }
}
