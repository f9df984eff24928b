//! serin's own HTTP/1.1 client, for upstream connections.
//!
//! Why not hyper's client: `hyper::client::conn::http1` runs every
//! connection as a separate task and hands each request to it through a
//! channel and a want/give handshake, and each response back through a
//! oneshot and a body channel. For a proxy whose request already runs on its
//! client connection's task, that is two extra task wake-ups, several
//! allocations and many copies of the request and response per request: the
//! profile put 13% of serin's CPU in that connection task alone. Here the
//! request's own task writes the request and reads the response straight
//! from the socket, the way pingora keeps its own HTTP/1 client. hyper still
//! serves clients, and still speaks h2c to gRPC upstreams.
//!
//! What it implements of RFC 9112: request framing (none, `Content-Length`,
//! or chunked for a body of unknown length); response framing (bodiless for
//! HEAD, 204 and 304; `Content-Length`; chunked, with trailers; or until the
//! connection closes); interim 1xx responses skipped; 101 handed over as a
//! tunnel; keep-alive by HTTP/1.0 and 1.1 rules. A response may arrive while
//! the request body is still being sent (an early 413, say): the upload stops
//! and the connection is not reused.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{request, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

use crate::fields::{keeps_alive, Fields, RawFields, Span};
use crate::forward::{Pool, RequestBody};

/// The largest response head accepted (status line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields accepted in a response (hyper's default is 100).
const MAX_HEADERS: usize = 128;
/// The first read of a connection asks for this much; it grows while reads
/// fill the buffer (a large body), up to `MAX_READ`.
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;
/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before its message was complete.
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    /// The upstream sent something that is not valid HTTP/1.1.
    #[error("invalid response from the upstream: {0}")]
    Invalid(&'static str),
}

/// How an exchange failed, as the pool needs to know it.
pub(crate) enum ExchangeError {
    /// A reused connection failed before any of the response arrived: the
    /// upstream had most likely closed it while it sat idle. Replaying a
    /// bodiless request on a new connection is safe.
    Stale(Http1Error),
    /// The upstream failed.
    Upstream(Http1Error),
    /// The client's request body broke off.
    Client(hyper::Error),
}

/// One keep-alive connection to an upstream.
pub(crate) struct Connection {
    io: TcpStream,
    /// Bytes read but not yet consumed.
    read: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
    /// Encoded bytes waiting to be written (request head, body chunks).
    write: Vec<u8>,
    /// Has carried a request before.
    reused: bool,
    /// Where the fields of the last response head sit in `read`.
    spans: Vec<Span>,
}

impl Connection {
    /// Wraps a freshly connected socket.
    pub(crate) fn new(io: TcpStream) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            read_size: FIRST_READ,
            write: Vec::new(),
            reused: false,
            spans: Vec::new(),
        }
    }

    /// True if an idle connection can no longer be used: the upstream closed
    /// it or sent something unasked. Costs no system call unless the socket
    /// has reported readable since it went idle.
    pub(crate) async fn closed_while_idle(&self) -> bool {
        poll_fn(|cx| {
            Poll::Ready(match self.io.poll_read_ready(cx) {
                Poll::Pending => false,
                Poll::Ready(Err(_)) => true,
                Poll::Ready(Ok(())) => !matches!(
                    self.io.try_read(&mut [0u8; 1]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock
                ),
            })
        })
        .await
    }

    /// Sends one request and reads the response head. The body streams
    /// from the returned response; the connection goes back to `pool` when
    /// it ends, if it can be reused.
    pub(crate) async fn exchange(
        mut self,
        head: &request::Parts,
        body: RequestBody,
        pool: &Rc<Pool>,
    ) -> Result<Response<ResponseBody>, ExchangeError> {
        let framing = if body.is_end_stream() {
            RequestFraming::None
        } else if head.headers.contains_key(CONTENT_LENGTH) {
            RequestFraming::Length
        } else {
            RequestFraming::Chunked
        };
        self.write.clear();
        encode_head(&mut self.write, head, framing);
        let (info, sent) = self.transact(body, framing).await?;
        let state = self
            .body_state(&info, head.method == Method::HEAD)
            .map_err(ExchangeError::Upstream)?;
        let bytes = self.read.split_to(info.len).freeze();
        let headers = header_map(&bytes, &self.spans).map_err(ExchangeError::Upstream)?;
        let mut resp = Response::new(ResponseBody {
            state,
            conn: Some(self),
            pool: pool.clone(),
            reusable: info.keep_alive && sent,
        });
        *resp.status_mut() = info.status;
        *resp.version_mut() = info.version;
        *resp.headers_mut() = headers;
        resp.body_mut().start();
        Ok(resp)
    }

    /// Sends a bodiless request whose head `encode` writes, and reads the
    /// response head, which stays in the connection's buffer for the caller
    /// to read in place (serin's own HTTP/1.1 server path).
    pub(crate) async fn exchange_raw(
        mut self,
        encode: impl FnOnce(&mut Vec<u8>),
        is_head: bool,
        pool: &Rc<Pool>,
    ) -> Result<RawResponse, ExchangeError> {
        self.write.clear();
        encode(&mut self.write);
        let (info, _) = self
            .transact(RequestBody::Empty, RequestFraming::None)
            .await?;
        if info.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ExchangeError::Upstream(Http1Error::Invalid(
                "101 to a request that asked for no upgrade",
            )));
        }
        let state = self
            .body_state(&info, is_head)
            .map_err(ExchangeError::Upstream)?;
        Ok(RawResponse {
            body: ResponseBody {
                state,
                conn: Some(self),
                pool: pool.clone(),
                reusable: info.keep_alive,
            },
            info,
        })
    }

    /// Writes the encoded head and the body, and reads the final response
    /// head. Returns the head and whether all of the request was sent.
    async fn transact(
        &mut self,
        body: RequestBody,
        framing: RequestFraming,
    ) -> Result<(HeadInfo, bool), ExchangeError> {
        let mut upload = Upload {
            body,
            framing,
            written: 0,
            finished: framing == RequestFraming::None,
            done: false,
        };
        let reused = self.reused;
        self.reused = true;
        // A write that fails may be the upstream refusing the rest of an
        // upload after answering it (an early 413, then a reset): the answer
        // wins if it can still be read, else the write error stands.
        let mut write_failed = None;
        // Whether any of the response arrived (an interim 1xx counts): then
        // the connection was not stale, whatever happens next.
        let mut received = false;
        let info = poll_fn(|cx| {
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
        Ok((info, upload.done))
    }

    /// How the body of the response whose head is at the front of `read`
    /// is delimited.
    fn body_state(&self, info: &HeadInfo, is_head: bool) -> Result<State, Http1Error> {
        let status = info.status;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            Ok(State::Tunnel)
        } else if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
        {
            Ok(State::Done)
        } else {
            response_framing(&RawFields {
                head: &self.read[..info.len],
                spans: &self.spans,
            })
        }
    }

    /// Reads until a final response head has arrived; skips interim 1xx.
    /// `received` records that some of the response has come in.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        reused: bool,
        received: &mut bool,
    ) -> Poll<Result<HeadInfo, ExchangeError>> {
        loop {
            if !self.read.is_empty() {
                match parse_head(&self.read, &mut self.spans).map_err(ExchangeError::Upstream)? {
                    Some(head) if head.status.is_informational() => {
                        if head.status == StatusCode::SWITCHING_PROTOCOLS {
                            return Poll::Ready(Ok(head));
                        }
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
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < 1024 {
            self.read.reserve(self.read_size);
        }
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            let room = self.read.capacity() - self.read.len();
            match self.io.try_read_buf(&mut self.read) {
                Ok(n) => {
                    if n == room {
                        self.read_size = (self.read_size * 2).min(MAX_READ);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// No body.
    None,
    /// The client's `Content-Length` stands.
    Length,
    /// Length unknown (a chunked HTTP/1.1 upload, or HTTP/2 without
    /// `content-length`): chunked.
    Chunked,
}

/// Writes the request line and headers. The request's headers have been
/// prepared by the server (hop-by-hop removed, origin-form URI).
fn encode_head(out: &mut Vec<u8>, head: &request::Parts, framing: RequestFraming) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if framing == RequestFraming::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

enum UploadError {
    Io(io::Error),
    Client(hyper::Error),
}

/// Writes the encoded head and then the request body, gathering what the
/// body has ready into one write.
struct Upload {
    body: RequestBody,
    framing: RequestFraming,
    /// Bytes of the write buffer already written.
    written: usize,
    /// The body has ended (its last bytes may still be in the buffer).
    finished: bool,
    /// Everything is written.
    done: bool,
}

impl Upload {
    /// The body has ended: a chunked body gets its last chunk.
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.finished = true;
        if self.framing == RequestFraming::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut TcpStream,
        out: &mut Vec<u8>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            // Gather what the body has ready.
            let mut body_pending = false;
            while !self.finished && out.len() < WRITE_BATCH {
                match Pin::new(&mut self.body).poll_frame(cx) {
                    Poll::Pending => {
                        body_pending = true;
                        break;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(UploadError::Client(e))),
                    Poll::Ready(Some(Ok(frame))) => {
                        // Request trailers are dropped: HTTP/1.1 upstreams
                        // rarely accept them, and nothing here needs them.
                        if let Ok(data) = frame.into_data() {
                            if data.is_empty() {
                                continue;
                            }
                            if self.framing == RequestFraming::Chunked {
                                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                                out.extend_from_slice(&data);
                                out.extend_from_slice(b"\r\n");
                            } else {
                                out.extend_from_slice(&data);
                            }
                        }
                    }
                    Poll::Ready(None) => self.finish(out),
                }
                if !self.finished && self.body.is_end_stream() {
                    self.finish(out);
                }
            }
            // Write it.
            while self.written < out.len() {
                match ready!(Pin::new(&mut *io).poll_write(cx, &out[self.written..])) {
                    Ok(0) => {
                        return Poll::Ready(Err(UploadError::Io(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => self.written += n,
                    Err(e) => return Poll::Ready(Err(UploadError::Io(e))),
                }
            }
            out.clear();
            self.written = 0;
            if self.finished {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                // The body's waker is registered: it wakes this task.
                return Poll::Pending;
            }
        }
    }
}

/// A parsed response head; its fields are in [`Connection::spans`].
pub(crate) struct HeadInfo {
    /// Length of the head in bytes.
    pub(crate) len: usize,
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    /// The upstream allows another request on this connection.
    pub(crate) keep_alive: bool,
}

/// Parses a response head at the front of `buf` (left in place), recording
/// where its fields are in `spans`; `None` if more bytes are needed.
pub(crate) fn parse_head(
    buf: &[u8],
    spans: &mut Vec<Span>,
) -> Result<Option<HeadInfo>, Http1Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        .map_err(|e| {
            Http1Error::Invalid(match e {
                httparse::Error::TooManyHeaders => "more than 128 header fields",
                httparse::Error::Status => "bad status code",
                httparse::Error::Version => "bad HTTP version",
                _ => "malformed response head",
            })
        })?;
    let len = match parsed {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => {
            return Err(Http1Error::Invalid("response head over 64 KiB"))
        }
        httparse::Status::Partial => return Ok(None),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| Http1Error::Invalid("bad status code"))?;
    spans.clear();
    spans.extend(resp.headers.iter().map(|h| Span::of(buf, h)));
    let minor = resp.version.unwrap_or(0);
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let keep_alive = keeps_alive(&*resp.headers, minor);
    Ok(Some(HeadInfo {
        len,
        status,
        version,
        keep_alive,
    }))
}

/// Builds the header map of a head: its values are shared slices of `head`.
pub(crate) fn header_map(head: &Bytes, spans: &[Span]) -> Result<HeaderMap, Http1Error> {
    let fields = RawFields { head, spans };
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, value) in fields.iter() {
        let name =
            HeaderName::from_bytes(name).map_err(|_| Http1Error::Invalid("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(value))
            .map_err(|_| Http1Error::Invalid("bad header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// How the body of a response with a body is delimited (RFC 9112 §6.3).
pub(crate) fn response_framing<H: Fields + ?Sized>(headers: &H) -> Result<State, Http1Error> {
    if let Some(te) = headers.values(&TRANSFER_ENCODING).last() {
        let chunked_last = te
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked_last {
            State::Chunked(Chunked::Size)
        } else {
            State::UntilClose
        });
    }
    let mut length = None;
    for value in headers.values(&CONTENT_LENGTH) {
        for part in value.split(|&b| b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Http1Error::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Http1Error::Invalid("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => State::Done,
        Some(n) => State::Length(n),
        None => State::UntilClose,
    })
}

// === impl ResponseBody ===

/// Where a response body stands.
pub(crate) enum State {
    /// The whole body was read with the head.
    Full(Option<Bytes>),
    /// This many bytes are still to come.
    Length(u64),
    /// A chunked body.
    Chunked(Chunked),
    /// Delimited by the upstream closing the connection.
    UntilClose,
    /// A 101: the connection is now the tunnel's, see [`ResponseBody::take_tunnel`].
    Tunnel,
    /// Ended.
    Done,
}

/// An upgraded upstream connection, and what it sent after the 101.
pub(crate) struct Tunnel {
    pub(crate) io: TcpStream,
    pub(crate) early: Bytes,
}

/// A response body read straight from its upstream connection. When it has
/// been read to the end the connection goes back to its pool; dropped
/// early, it closes the connection.
pub struct ResponseBody {
    state: State,
    conn: Option<Connection>,
    pool: Rc<Pool>,
    /// Keep-alive on both sides and the request fully sent.
    reusable: bool,
}

impl ResponseBody {
    /// Takes a body that arrived with the head (the common small response),
    /// so the connection is free before the response is even returned.
    fn start(&mut self) {
        match self.state {
            State::Done => self.release(),
            State::Length(n) => {
                let conn = self.conn.as_mut().expect("a new body has its connection");
                if conn.read.len() as u64 >= n {
                    let data = conn.read.split_to(n as usize).freeze();
                    self.state = State::Full(Some(data));
                    self.release();
                }
            }
            _ => {}
        }
    }

    /// Hands the connection back to the pool, if it can carry another request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable && conn.read.is_empty() {
                // The socket is still marked readable from the response just
                // read. Clearing the mark (no system call) lets the next
                // exchange, and the idle check, trust it again: without this
                // each request paid one recv(2) that found nothing. A close
                // or data that arrives later sets it anew.
                let _ = conn.io.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                self.pool.checkin(conn);
            }
        }
    }

    /// After a 101, takes the upgraded connection.
    pub(crate) fn take_tunnel(&mut self) -> Option<Tunnel> {
        if !matches!(self.state, State::Tunnel) {
            return None;
        }
        self.state = State::Done;
        let mut conn = self.conn.take()?;
        Some(Tunnel {
            early: conn.read.split().freeze(),
            io: conn.io,
        })
    }

    fn fail(&mut self, error: Http1Error) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        Poll::Ready(Some(Err(self.broke(error))))
    }
}

/// A response whose head is still in its connection's read buffer: the
/// server path reads the fields in place, then takes the body.
pub(crate) struct RawResponse {
    info: HeadInfo,
    body: ResponseBody,
}

impl RawResponse {
    pub(crate) fn status(&self) -> StatusCode {
        self.info.status
    }

    /// The head's fields, in place.
    pub(crate) fn fields(&self) -> RawFields<'_> {
        let conn = self
            .body
            .conn
            .as_ref()
            .expect("a new response has its connection");
        RawFields {
            head: &conn.read[..self.info.len],
            spans: &conn.spans,
        }
    }

    /// The body's end is known from the head (`Content-Length`, or no body);
    /// otherwise it is chunked or runs until the upstream closes.
    pub(crate) fn length_delimited(&self) -> bool {
        matches!(self.body.state, State::Length(_) | State::Done)
    }

    /// Drops the head from the buffer and returns the body.
    pub(crate) fn into_body(mut self) -> ResponseBody {
        if let Some(conn) = self.body.conn.as_mut() {
            conn.read.advance(self.info.len);
        }
        if matches!(self.body.state, State::Done) {
            self.body.release();
        }
        self.body
    }
}

/// What [`ResponseBody::poll_copy`] did.
pub(crate) enum Copied {
    /// Appended some of the body (or found `out` already holding bytes to
    /// send): send them, then copy again.
    More,
    /// The body has ended, with these trailers.
    End(Option<HeaderMap>),
}

impl ResponseBody {
    /// Appends the body bytes that have arrived to `out`, in chunked framing
    /// if `chunked`. It reads the socket only when `out` is empty, so bytes
    /// already waiting there (the response head) go out first.
    pub(crate) fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
        chunked: bool,
    ) -> Poll<Result<Copied, Http1Error>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                if let State::Full(Some(data)) = &mut self.state {
                    append(out, data, chunked);
                    self.state = State::Done;
                }
                return Poll::Ready(Ok(Copied::End(None)));
            };
            match &mut self.state {
                State::Full(_) | State::Tunnel | State::Done => {
                    return Poll::Ready(Ok(Copied::End(None)))
                }
                State::Length(remaining) => {
                    if !conn.read.is_empty() {
                        let take = (*remaining).min(conn.read.len() as u64) as usize;
                        append(out, &conn.read[..take], chunked);
                        conn.read.advance(take);
                        *remaining -= take as u64;
                        if *remaining > 0 {
                            return Poll::Ready(Ok(Copied::More));
                        }
                        self.state = State::Done;
                        self.release();
                        return Poll::Ready(Ok(Copied::End(None)));
                    }
                }
                State::Chunked(decoder) => match decoder.decode(&mut conn.read) {
                    Err(e) => return Poll::Ready(Err(self.broke(e))),
                    Ok(Some(Decoded::Data(n))) => {
                        append(out, &conn.read[..n], chunked);
                        conn.read.advance(n);
                        return Poll::Ready(Ok(Copied::More));
                    }
                    Ok(Some(Decoded::End(trailers))) => {
                        self.state = State::Done;
                        self.release();
                        return Poll::Ready(Ok(Copied::End(trailers)));
                    }
                    Ok(None) => {}
                },
                State::UntilClose => {
                    if !conn.read.is_empty() {
                        append(out, &conn.read, chunked);
                        conn.read.clear();
                        return Poll::Ready(Ok(Copied::More));
                    }
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Ok(Copied::More));
            }
            let conn = self.conn.as_mut().expect("checked above");
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(self.state, State::UntilClose) => {
                    self.state = State::Done;
                    self.conn = None;
                    return Poll::Ready(Ok(Copied::End(None)));
                }
                Ok(0) => return Poll::Ready(Err(self.broke(Http1Error::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(self.broke(e.into()))),
            }
        }
    }

    /// The body broke: the connection is closed, never reused.
    fn broke(&mut self, error: Http1Error) -> Http1Error {
        self.state = State::Done;
        self.conn = None;
        error
    }
}

/// Appends body bytes to `out`, as one chunk if `chunked`.
fn append(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if !chunked {
        out.extend_from_slice(data);
        return;
    }
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

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return match &mut this.state {
                    State::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
                    _ => Poll::Ready(None),
                };
            };
            match &mut this.state {
                State::Full(_) | State::Tunnel | State::Done => return Poll::Ready(None),
                State::Length(remaining) => {
                    if !conn.read.is_empty() {
                        let take = (*remaining).min(conn.read.len() as u64);
                        let data = conn.read.split_to(take as usize).freeze();
                        *remaining -= take;
                        if *remaining == 0 {
                            this.state = State::Done;
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunked) => match chunked.decode(&mut conn.read) {
                    Err(e) => return this.fail(e),
                    Ok(Some(Decoded::Data(n))) => {
                        let data = conn.read.split_to(n).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Some(Decoded::End(trailers))) => {
                        this.state = State::Done;
                        this.release();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(None) => {}
                },
                State::UntilClose => {
                    if !conn.read.is_empty() {
                        let data = conn.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let conn = this.conn.as_mut().expect("checked above");
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Http1Error::Closed),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Full(data) => data.is_none(),
            State::Tunnel | State::Done => true,
            State::Length(_) | State::Chunked(_) | State::UntilClose => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            State::Length(n) => SizeHint::with_exact(*n),
            State::Full(None) | State::Tunnel | State::Done => SizeHint::with_exact(0),
            State::Chunked(_) | State::UntilClose => SizeHint::default(),
        }
    }
}

// === chunked decoding ===

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

pub(crate) enum Decoded {
    /// This many data bytes are at the front of the buffer; the caller
    /// consumes them.
    Data(usize),
    End(Option<HeaderMap>),
}

/// The longest chunk-size line accepted (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;

impl Chunked {
    /// Decodes what `buf` holds: a piece of data, the end, or `None` when
    /// more bytes are needed. Framing bytes are removed from `buf`; data is
    /// left for the caller to take.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, Http1Error> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(line_end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(Http1Error::Invalid("chunk size line too long"));
                        }
                        return Ok(None);
                    };
                    let size = match httparse::parse_chunk_size(&buf[..line_end + 2]) {
                        Ok(httparse::Status::Complete((_, size))) => size,
                        _ => return Err(Http1Error::Invalid("bad chunk size")),
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
                        return Err(Http1Error::Invalid("chunk data not followed by CRLF"));
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
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {
                            return Ok(None)
                        }
                        _ => return Err(Http1Error::Invalid("bad chunked trailers")),
                    }
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), Http1Error> {
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
        Err(Http1Error::Closed)
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
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(b"zz\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n").is_err());
    }

    /// A parsed head and its fields as a map.
    struct Parsed {
        status: StatusCode,
        keep_alive: bool,
        headers: HeaderMap,
    }

    fn head(text: &str) -> Result<Option<Parsed>, Http1Error> {
        let bytes = Bytes::copy_from_slice(text.as_bytes());
        let mut spans = Vec::new();
        let Some(info) = parse_head(&bytes, &mut spans)? else {
            return Ok(None);
        };
        Ok(Some(Parsed {
            status: info.status,
            keep_alive: info.keep_alive,
            headers: header_map(&bytes.slice(..info.len), &spans)?,
        }))
    }

    #[test]
    fn response_heads_parse_with_keep_alive_rules() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-A: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 200);
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-a"], "b");
        assert!(matches!(response_framing(&h.headers), Ok(State::Length(7))));

        let h = head("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert!(matches!(
            response_framing(&h.headers),
            Ok(State::UntilClose)
        ));

        let h = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);

        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(
            response_framing(&h.headers),
            Ok(State::Chunked(_))
        ));

        assert!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        assert!(head("HTTP/1.1 2000 OK\r\n\r\n").is_err());
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(response_framing(&h.headers).is_err());
    }

    #[test]
    fn request_heads_carry_framing() {
        let (parts, ()) = http::Request::post("/p?q=1")
            .header("host", "h")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        encode_head(&mut out, &parts, RequestFraming::Chunked);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
