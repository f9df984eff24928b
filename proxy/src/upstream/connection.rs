//! One keep-alive HTTP/1.1 connection to an upstream, driven by the
//! request's own task.
//!
//! Why not hyper's client: `hyper::client::conn::http1` runs every
//! connection as a separate task and hands each request to it through a
//! channel and a want/give handshake, and each response back through a
//! oneshot and a body channel. For a proxy whose request already runs on its
//! client connection's task, that is two extra task wake-ups, several
//! allocations and many copies of the request and response per request: the
//! profile put 13% of serin's CPU in that connection task alone. Here the
//! request's task writes the request and reads the response straight from
//! the socket, the way pingora keeps its own HTTP/1 client.

use std::future::poll_fn;
use std::io;
use std::task::{ready, Context, Poll};

use super::socket::UpstreamIo;
use super::upload::{Upload, UploadError};
use super::{Http1Error, RequestBody, RequestFraming};
use crate::fields::Span;
use crate::http1::head::{parse_response, ResponseHead};
use bytes::{Buf, BytesMut};
use http::StatusCode;

/// The largest response head accepted (status line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The first read of a connection asks for this much; it grows while reads
/// fill the buffer (a large body), up to `MAX_READ`.
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

/// How an exchange failed, as the pool needs to know it.
pub(crate) enum ExchangeError {
    /// A reused connection failed before any of the response arrived: the
    /// upstream had most likely closed it while it sat idle. Replaying a
    /// bodiless request on a new connection is safe.
    Stale(Http1Error),
    /// The upstream failed.
    Upstream(Http1Error),
    /// The client's request body broke off.
    Client(crate::client_body::ClientBodyError),
}

/// One keep-alive connection to an upstream.
pub(crate) struct Connection {
    pub(crate) io: UpstreamIo,
    /// Bytes read but not yet consumed.
    pub(crate) read: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
    /// The encoded request head, then body chunks, waiting to be written.
    pub(crate) write: Vec<u8>,
    /// Has carried a request before.
    reused: bool,
    /// Where the fields of the last response head sit in `read`.
    pub(crate) spans: Vec<Span>,
}

impl Connection {
    /// Wraps a freshly connected socket.
    pub(crate) fn new(io: UpstreamIo) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            read_size: FIRST_READ,
            write: Vec::new(),
            reused: false,
            spans: Vec::new(),
        }
    }

    /// Writes the request head already encoded in [`Connection::write`] and
    /// the body, and reads the final response head, which stays at the
    /// front of [`Connection::read`] with its fields in
    /// [`Connection::spans`]. Interim 1xx responses are skipped; a 101 is
    /// returned. Returns the head and whether all of the request was sent.
    pub(crate) async fn transact(
        &mut self,
        body: RequestBody,
        framing: RequestFraming,
    ) -> Result<(ResponseHead, bool), ExchangeError> {
        let mut upload = Upload::new(body, framing);
        let reused = self.reused;
        self.reused = true;
        // A write that fails may be the upstream refusing the rest of an
        // upload after answering it (an early 413, then a reset): the answer
        // wins if it can still be read, else the write error stands.
        let mut write_failed = None;
        // Whether any of the response arrived (an interim 1xx counts): then
        // the connection was not stale, whatever happens next.
        let mut received = false;
        let head = poll_fn(|cx| {
            if !upload.done && write_failed.is_none() {
                match upload.poll(cx, &mut self.io, &mut self.write) {
                    Poll::Ready(Err(UploadError::Client(e))) => {
                        return Poll::Ready(Err(ExchangeError::Client(e)))
                    }
                    Poll::Ready(Err(UploadError::Io(e))) => write_failed = Some(e),
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            match ready!(self.poll_head(cx, reused, &mut received)) {
                Err(_) if write_failed.is_some() => {
                    let e = write_failed.take().expect("checked").into();
                    Poll::Ready(Err(if reused {
                        ExchangeError::Stale(e)
                    } else {
                        ExchangeError::Upstream(e)
                    }))
                }
                head => Poll::Ready(head),
            }
        })
        .await?;
        Ok((head, upload.done))
    }

    /// Reads until a final response head has arrived; skips interim 1xx.
    /// `received` records that some of the response has come in.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        reused: bool,
        received: &mut bool,
    ) -> Poll<Result<ResponseHead, ExchangeError>> {
        loop {
            if !self.read.is_empty() {
                let parsed = parse_response(&self.read, &mut self.spans, MAX_HEAD_BYTES)
                    .map_err(|e| ExchangeError::Upstream(e.into()))?;
                match parsed {
                    Some(head)
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        self.read.advance(head.len);
                        continue;
                    }
                    Some(head) => return Poll::Ready(Ok(head)),
                    None => {}
                }
            }
            let nothing_yet = !*received;
            let failed = |e: Http1Error| {
                if reused && nothing_yet {
                    ExchangeError::Stale(e)
                } else {
                    ExchangeError::Upstream(e)
                }
            };
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Err(failed(Http1Error::Closed))),
                Ok(_) => *received = true,
                Err(e) => return Poll::Ready(Err(failed(e.into()))),
            }
        }
    }

    /// Reads what the socket has into the read buffer; `Ok(0)` is the end.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(self.read_size);
        }
        let room = self.read.capacity() - self.read.len();
        let n = ready!(self.io.poll_fill(cx, &mut self.read))?;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Poll::Ready(Ok(n))
    }
}
