//! An HTTP/1.1 upstream's response: its head, read in place, and its body,
//! read straight off the connection by one state machine.
//!
//! The body can be taken two ways: as `http_body` frames (hyper's path) or
//! copied into the bytes serin writes to its client (the own loop, which
//! never makes a frame). Both are [`ResponseBody::poll_piece`]; they differ
//! only in what they do with a piece. When the body has been read to the
//! end, the connection goes back to its pool; dropped early, it is closed.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};

use super::connection::Connection;
use super::idle::Busy;
use super::socket::UpstreamIo;
use super::Http1Error;
use crate::fields::RawFields;
use crate::http1::chunked::{encode_chunk, Chunked, Decoded};
use crate::http1::framing::Framing;
use crate::http1::head::ResponseHead;

/// Body bytes gathered before the own loop writes them.
const WRITE_BATCH: usize = 64 * 1024;

/// A response whose head is still in its connection's read buffer: the
/// server reads the fields in place, then takes the body.
pub(crate) struct UpstreamResponse {
    head: ResponseHead,
    body: ResponseBody,
}

impl UpstreamResponse {
    pub(crate) fn new(
        head: ResponseHead,
        framing: Framing,
        conn: Connection,
        busy: Busy,
        reusable: bool,
    ) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size),
            Framing::UntilClose => State::UntilClose,
            Framing::Tunnel => State::Tunnel,
        };
        Self {
            head,
            body: ResponseBody {
                state,
                conn: Some(conn),
                busy,
                reusable: reusable && head.keep_alive,
                copied: 0,
            },
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.head.status
    }

    /// The head's fields, in place.
    pub(crate) fn fields(&self) -> RawFields<'_> {
        let conn = self
            .body
            .conn
            .as_ref()
            .expect("a new response has its connection");
        RawFields {
            head: &conn.read[..self.head.len],
            spans: &conn.spans,
        }
    }

    /// The body's end is known from the head (a length, or no body);
    /// otherwise it is chunked or runs until the upstream closes.
    pub(crate) fn length_delimited(&self) -> bool {
        matches!(self.body.state, State::Length(_) | State::Done)
    }

    /// Drops the head from the buffer and returns the body.
    pub(crate) fn into_body(mut self) -> ResponseBody {
        if let Some(conn) = self.body.conn.as_mut() {
            conn.read.advance(self.head.len);
        }
        if matches!(self.body.state, State::Done) {
            self.body.release();
        }
        self.body
    }

    /// Takes the head out of the buffer as shared bytes, for a caller whose
    /// fields may point into it (a header map's values), and returns the body.
    /// A body that arrived with the head is taken too, so the connection is
    /// free before the response is even passed on.
    pub(crate) fn split(mut self, f: impl FnOnce(RawFields<'_>, &Bytes)) -> ResponseBody {
        let conn = self
            .body
            .conn
            .as_mut()
            .expect("a new response has its connection");
        let head = conn.read.split_to(self.head.len).freeze();
        f(
            RawFields {
                head: &head,
                spans: &conn.spans,
            },
            &head,
        );
        match self.body.state {
            State::Done => self.body.release(),
            State::Length(n) if conn.read.len() as u64 >= n => {
                let data = conn.read.split_to(n as usize).freeze();
                self.body.state = State::Full(Some(data));
                self.body.release();
            }
            _ => {}
        }
        self.body
    }
}

/// Where a response body stands.
enum State {
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

/// One step of a body: data, or its end.
enum Piece {
    /// This many data bytes are at the front of the connection's buffer.
    Buffered(usize),
    /// Data read with the head.
    Whole(Bytes),
    /// The end, with the trailers of a chunked body.
    End(Option<HeaderMap>),
}

/// An upgraded upstream connection, and what it sent after the 101.
pub(crate) struct Tunnel {
    pub(crate) io: UpstreamIo,
    pub(crate) early: Bytes,
}

/// A response body read straight from its upstream connection.
pub(crate) struct ResponseBody {
    state: State,
    conn: Option<Connection>,
    /// The request's place in its endpoint's in-flight count, and the way
    /// back to the idle list.
    busy: Busy,
    /// Keep-alive on both sides and the request fully sent.
    reusable: bool,
    /// Body bytes [`ResponseBody::poll_copy`] has appended so far.
    copied: u64,
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
    /// Hands the connection back to the pool, if it can carry another request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable {
                self.busy.idle().checkin(conn);
            }
        }
    }

    /// The body broke: the connection is closed, never reused.
    fn broke(&mut self, error: Http1Error) -> Http1Error {
        self.state = State::Done;
        self.conn = None;
        error
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

    /// The next piece of the body from what is buffered, without reading.
    fn buffered_piece(&mut self) -> Result<Option<Piece>, Http1Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Some(match &mut self.state {
                State::Full(data) => match data.take() {
                    Some(data) => Piece::Whole(data),
                    None => Piece::End(None),
                },
                _ => Piece::End(None),
            }));
        };
        match &mut self.state {
            State::Full(_) | State::Tunnel | State::Done => Ok(Some(Piece::End(None))),
            State::Length(remaining) => {
                if conn.read.is_empty() {
                    return Ok(None);
                }
                let take = (*remaining).min(conn.read.len() as u64);
                *remaining -= take;
                if *remaining == 0 {
                    self.state = State::Done;
                }
                Ok(Some(Piece::Buffered(take as usize)))
            }
            State::Chunked(decoder) => match decoder.decode(&mut conn.read)? {
                Some(Decoded::Data(n)) => Ok(Some(Piece::Buffered(n))),
                Some(Decoded::End(trailers)) => {
                    self.state = State::Done;
                    self.release();
                    Ok(Some(Piece::End(trailers)))
                }
                None => Ok(None),
            },
            State::UntilClose if conn.read.is_empty() => Ok(None),
            State::UntilClose => Ok(Some(Piece::Buffered(conn.read.len()))),
        }
    }

    /// The next piece of the body, reading the socket when nothing is
    /// buffered and `may_read`; `Pending` with nothing registered when not.
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        may_read: bool,
    ) -> Poll<Result<Piece, Http1Error>> {
        loop {
            match self.buffered_piece() {
                Ok(Some(piece)) => return Poll::Ready(Ok(piece)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(self.broke(e))),
            }
            if !may_read {
                return Poll::Pending;
            }
            let conn = self
                .conn
                .as_mut()
                .expect("a buffered body has its connection");
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(self.state, State::UntilClose) => {
                    self.state = State::Done;
                    self.conn = None;
                }
                Ok(0) => return Poll::Ready(Err(self.broke(Http1Error::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(self.broke(e.into()))),
            }
        }
    }

    /// Consumes buffered data with `take`; the connection goes back to the
    /// pool if that was the end of the body.
    fn consume<T>(&mut self, take: impl FnOnce(&mut Connection) -> T) -> T {
        let conn = self
            .conn
            .as_mut()
            .expect("buffered data has its connection");
        let taken = take(conn);
        if matches!(self.state, State::Done) {
            self.release();
        }
        taken
    }

    /// Body bytes copied by [`ResponseBody::poll_copy`] so far.
    pub(crate) fn copied(&self) -> u64 {
        self.copied
    }

    /// Appends the body bytes that have arrived to `out`, as chunks if
    /// `chunked`. It reads the socket only when `out` is empty, so bytes
    /// already waiting there (the response head) go out first, in the same
    /// write as the body when it arrived with the head.
    pub(crate) fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
        chunked: bool,
    ) -> Poll<Result<Copied, Http1Error>> {
        let append = |out: &mut Vec<u8>, data: &[u8]| {
            if chunked {
                encode_chunk(out, data);
            } else {
                out.extend_from_slice(data);
            }
        };
        loop {
            match self.poll_piece(cx, out.is_empty()) {
                Poll::Pending if !out.is_empty() => return Poll::Ready(Ok(Copied::More)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(Piece::Buffered(n))) => {
                    self.copied += n as u64;
                    self.consume(|conn| {
                        append(out, &conn.read[..n]);
                        conn.read.advance(n);
                    });
                }
                Poll::Ready(Ok(Piece::Whole(data))) => {
                    self.copied += data.len() as u64;
                    append(out, &data);
                }
                Poll::Ready(Ok(Piece::End(trailers))) => {
                    return Poll::Ready(Ok(Copied::End(trailers)))
                }
            }
            if out.len() >= WRITE_BATCH {
                return Poll::Ready(Ok(Copied::More));
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let this = self.get_mut();
        Poll::Ready(match ready!(this.poll_piece(cx, true)) {
            Err(e) => Some(Err(e)),
            Ok(Piece::Buffered(n)) => {
                let data = this.consume(|conn| conn.read.split_to(n).freeze());
                Some(Ok(Frame::data(data)))
            }
            Ok(Piece::Whole(data)) => Some(Ok(Frame::data(data))),
            Ok(Piece::End(trailers)) => trailers.map(|t| Ok(Frame::trailers(t))),
        })
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
