//! Adapter: serin's own HTTP/2 server loop, for every HTTP/2 client (h2c
//! with prior knowledge, or ALPN `h2` under TLS).
//!
//! Why it exists: hyper's HTTP/2 server (through the `h2` crate) cost about
//! three times the instructions of serin's own HTTP/1.1 loop per request,
//! most of it in per-stream tasks, locks, channels and moves of large
//! futures (bench/REPORT.md). This loop keeps each connection to one task:
//! it reads frames ([`crate::http2::frame`]), decodes header blocks
//! ([`crate::http2::hpack`]), checks each request the way RFC 9113 §8 asks,
//! and hands it to the same request path hyper's adapter uses
//! ([`super::hyper::answer`]: policy, split, upstream, outcome). The
//! requests wait side by side, each woken on its own ([`requests`]), so a
//! slow upstream holds up only its stream. Each answer's head is encoded
//! as it is made, straight from the upstream's parsed head into HPACK
//! ([`HpackBlock`]); the connection writes it and sends the body within the
//! client's flow-control windows, batching every frame that is ready into
//! one write.
//!
//! Flow control the other way: each request body is an [`Inbox`] the
//! connection fills; credit goes back to the client (WINDOW_UPDATE) as the
//! upstream consumes the bytes, not as they arrive.
//!
//! Errors follow RFC 9113 §5.4: a malformed request or a misbehaving
//! stream is reset (RST_STREAM), anything that breaks the connection's
//! state (HPACK, framing, flow control) ends it with GOAWAY. On shutdown the
//! connection sends GOAWAY, finishes the streams it has, and closes.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::mem;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body::Body as _;
use tokio::sync::watch;

mod requests;

use super::client_io::ClientIo;
use super::hyper::Answered;
use crate::body::ProxyBody;
use crate::client_body::{ClientBody, Credit, Inbox, StreamBody};
use crate::fields::{new_on_every_request, FieldSink, ResponseFields};
use crate::http2::frame::{
    self, flag, kind, setting, ErrorCode, FrameHeader, DEFAULT_MAX_FRAME_SIZE, DEFAULT_WINDOW,
    HEADER_LEN, MAX_WINDOW, PREFACE,
};
use crate::http2::hpack::{self, Decoder};
use crate::policy::{valid_host, ConnMeta, Refusal};
use crate::worker::Worker;
use requests::Requests;

/// Streams a client may have open at once (as hyper's server had).
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Each stream's receive window: what a client may send before serin has
/// passed any of it on.
const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's receive window.
const CONNECTION_WINDOW: u32 = 1 << 20;
/// Frames waiting to be written above which the loop stops reading and
/// stops taking response bytes, until the client has taken some.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// How many of the streams serin reset it remembers, to ignore what their
/// clients had already sent: as many as may be open.
const RESETS_REMEMBERED: usize = MAX_CONCURRENT_STREAMS as usize;
/// DATA payloads at least this large are kept as slices of the read
/// buffer; smaller ones are copied.
const SLICED_DATA: usize = 4096;
/// How long the close waits for the client to take serin's last bytes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Streams serin may reset for a client's error before it ends the
/// connection (the `h2` crate's default).
const MAX_ERROR_RESETS: u32 = 1024;
/// Streams a client may reset before their answer, beyond which the
/// connection ends when they are at least half of the streams it opened
/// (as Envoy's premature-reset rule).
const MAX_PREMATURE_RESETS: u32 = 100;
/// HPACK's table size, as every client assumes it (serin never asks for
/// another).
const HEADER_TABLE_SIZE: usize = 4096;

/// Serves one HTTP/2 connection; `read` holds what was read of it already
/// (some or all of the preface, perhaps more).
pub(crate) async fn serve(
    worker: Rc<Worker>,
    meta: Rc<ConnMeta>,
    io: ClientIo,
    read: BytesMut,
    mut shutdown: watch::Receiver<bool>,
) {
    let max_header_list = worker.config().max_header_bytes;
    let mut conn = Connection {
        worker,
        meta,
        io,
        read,
        write: Vec::with_capacity(16 * 1024),
        written: 0,
        decoder: Decoder::new(HEADER_TABLE_SIZE),
        max_header_list,
        preface_read: false,
        settings_read: false,
        continuation: None,
        streams: Streams::default(),
        last_stream: 0,
        sending: 0,
        send_window: i64::from(DEFAULT_WINDOW),
        peer_stream_window: DEFAULT_WINDOW,
        peer_max_frame: DEFAULT_MAX_FRAME_SIZE as usize,
        recv_window: i64::from(CONNECTION_WINDOW),
        unreleased: 0,
        goaway: None,
        failed: false,
        flush_pending: false,
        table_size_update: false,
        premature_resets: 0,
        error_resets: 0,
        opened: 0,
        next_to_send: 0,
        reset: VecDeque::new(),
        requests: Requests::default(),
        credit: Rc::new(Credit::default()),
        released: Vec::new(),
        answered: Vec::new(),
        ended: Vec::new(),
    };
    conn.start();
    // What was read before the loop took over: the preface, perhaps more.
    if let Err(ConnError(code)) = conn.on_input() {
        conn.fail(code);
    }
    let mut stop = Box::pin(async move {
        let _ = shutdown.wait_for(|&stop| stop).await;
    });
    poll_fn(|cx| {
        if conn.goaway.is_none() && stop.as_mut().poll(cx).is_ready() {
            conn.go_away(ErrorCode::NoError);
        }
        conn.poll(cx)
    })
    .await;
    // Over TLS, a close_notify; a client that no longer reads gets a second.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.io.shutdown()).await;
}

/// One client connection.
struct Connection {
    worker: Rc<Worker>,
    meta: Rc<ConnMeta>,
    io: ClientIo,
    /// Bytes read and not yet taken as frames.
    read: BytesMut,
    /// Frames to write, from `written` on.
    write: Vec<u8>,
    written: usize,
    decoder: Decoder,
    /// The largest request head (HPACK's measure), as for HTTP/1.1.
    max_header_list: usize,
    preface_read: bool,
    settings_read: bool,
    /// A header block still waiting for its CONTINUATION frames.
    continuation: Option<Continuation>,
    streams: Streams,
    /// The highest stream the client has opened.
    last_stream: u32,
    /// Streams whose response body is being sent.
    sending: usize,
    /// What the client lets serin send on the connection.
    send_window: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE.
    peer_stream_window: u32,
    /// The client's SETTINGS_MAX_FRAME_SIZE.
    peer_max_frame: usize,
    /// What the client may still send on the connection.
    recv_window: i64,
    /// Bytes passed on but not yet handed back to the client's window.
    unreleased: u32,
    /// The last stream of the GOAWAY serin sent, once it has.
    goaway: Option<u32>,
    /// A connection error was sent: the connection ends once it is written.
    failed: bool,
    /// Bytes written into rustls wait for a flush to reach the socket.
    flush_pending: bool,
    /// The client lowered SETTINGS_HEADER_TABLE_SIZE: the next header block
    /// starts with a table size update (RFC 7541 §4.2).
    table_size_update: bool,
    /// Streams the client reset before their answer, and streams serin reset
    /// for an error: past their limits, the connection is an attack
    /// (CVE-2023-44487, "rapid reset") and ends.
    premature_resets: u32,
    error_resets: u32,
    /// Streams opened, to weigh `premature_resets` against.
    opened: u32,
    /// Where `send_bodies` starts its next round, so that every stream gets
    /// its turn.
    next_to_send: usize,
    /// The streams serin reset last: what the client sent on them before it
    /// saw the reset is ignored (RFC 9113 §5.1).
    reset: VecDeque<u32>,
    requests: Requests,
    credit: Rc<Credit>,
    /// Reused buffers for what `credit` and `requests` hand over.
    released: Vec<(u32, u32)>,
    answered: Vec<(u32, Answered<HpackBlock>)>,
    /// Reused by `send_bodies`: the streams whose body ended, and whether
    /// whole.
    ended: Vec<(u32, bool)>,
}

/// A header block split over HEADERS and CONTINUATION frames.
struct Continuation {
    stream: u32,
    end_stream: bool,
    self_dependent: bool,
    block: Vec<u8>,
}

/// A connection's open streams, by id: a few at a time, typically, so a
/// short list searched in order costs less than any map.
#[derive(Default)]
struct Streams(Vec<(u32, Stream)>);

impl Streams {
    fn position(&self, id: u32) -> Option<usize> {
        self.0.iter().position(|(open, _)| *open == id)
    }

    fn get(&self, id: &u32) -> Option<&Stream> {
        self.0.iter().find(|(open, _)| open == id).map(|(_, s)| s)
    }

    fn get_mut(&mut self, id: &u32) -> Option<&mut Stream> {
        self.0
            .iter_mut()
            .find(|(open, _)| open == id)
            .map(|(_, s)| s)
    }

    fn contains_key(&self, id: &u32) -> bool {
        self.position(*id).is_some()
    }

    fn insert(&mut self, id: u32, stream: Stream) {
        self.0.push((id, stream));
    }

    fn remove(&mut self, id: &u32) -> Option<Stream> {
        self.position(*id).map(|i| self.0.swap_remove(i).1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Stream> {
        self.0.iter_mut().map(|(_, s)| s)
    }
}

/// One stream's state.
struct Stream {
    /// The client may still send on it (no END_STREAM yet).
    recv_open: bool,
    /// Where its request body goes, while the client may still send it.
    inbox: Option<Rc<RefCell<Inbox>>>,
    /// What the client may still send on it.
    recv_window: i64,
    /// Bytes passed on but not yet handed back to its window.
    unreleased: u32,
    /// The request's `content-length`, and the data bytes received.
    expected: Option<u64>,
    received: u64,
    /// What the client lets serin send on it.
    send_window: i64,
    /// The request's slot in `requests`, until it answers.
    request: Option<usize>,
    /// The response's head is sent.
    answered: bool,
    /// The response's body, while it is being sent: from `pending` (bytes
    /// the windows held back), then from the body.
    body: Option<ProxyBody>,
    pending: Bytes,
}

impl Drop for Stream {
    /// A stream that goes before its end (reset, or the connection lost)
    /// breaks off its request body.
    fn drop(&mut self) {
        if let Some(inbox) = &self.inbox {
            inbox.borrow_mut().reset();
        }
    }
}

/// A connection error: GOAWAY with this code, then close.
struct ConnError(ErrorCode);

impl Connection {
    /// serin's SETTINGS and its larger connection window, written first.
    fn start(&mut self) {
        frame::write_settings(
            &mut self.write,
            &[
                (setting::MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
                (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (setting::MAX_HEADER_LIST_SIZE, self.max_header_list as u32),
            ],
        );
        frame::write_window_update(&mut self.write, 0, CONNECTION_WINDOW - DEFAULT_WINDOW);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if !self.failed && self.write.len() < WRITE_HIGH_WATER {
                if self.read.capacity() - self.read.len() < 4096 {
                    self.read.reserve(16 * 1024);
                }
                match self.io.poll_fill(cx, &mut self.read) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(ConnError(code)) = self.on_input() {
                            self.fail(code);
                        }
                    }
                    Poll::Pending => {}
                }
            }
            // Both buffers are taken and put back, so that neither
            // allocates again once it has room.
            let mut answered = mem::take(&mut self.answered);
            self.requests.poll(cx.waker(), &mut answered);
            for (stream, response) in answered.drain(..) {
                progress = true;
                self.respond(stream, response);
            }
            self.answered = answered;
            let mut released = mem::take(&mut self.released);
            self.credit.take(cx.waker(), &mut released);
            for (stream, bytes) in released.drain(..) {
                progress = true;
                self.release(stream, bytes);
            }
            self.released = released;
            if self.sending > 0 && !self.failed {
                self.send_bodies(cx);
            }
            let was_full = self.write.len() >= WRITE_HIGH_WATER;
            match self.flush(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(())) if was_full => progress = true,
                _ => {}
            }
            let flushed = self.write.is_empty() && !self.flush_pending;
            if flushed && (self.failed || (self.goaway.is_some() && self.streams.is_empty())) {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Writes what is queued; `Ready(Ok)` once all of it is written.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        if self.write.is_empty() && !self.flush_pending {
            return Poll::Ready(Ok(()));
        }
        while self.written < self.write.len() {
            match self.io.poll_write(cx, &self.write[self.written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        self.write.clear();
        self.written = 0;
        // Over TLS, rustls takes the bytes before the socket does: they are
        // written only once the flush is done, which may take a wakeup.
        match self.io.poll_flush(cx) {
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Ready(Ok(())) => {
                self.flush_pending = false;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                self.flush_pending = true;
                Poll::Pending
            }
        }
    }

    /// A connection error: GOAWAY, and nothing more is read.
    fn fail(&mut self, code: ErrorCode) {
        tracing::debug!(peer = %self.meta.peer, ?code, "HTTP/2 connection error");
        frame::write_goaway(&mut self.write, self.last_stream, code);
        self.goaway = Some(self.last_stream);
        self.failed = true;
        self.streams.clear();
        self.requests.clear();
        self.sending = 0;
    }

    /// Shutdown: GOAWAY; the streams already open finish.
    fn go_away(&mut self, code: ErrorCode) {
        frame::write_goaway(&mut self.write, self.last_stream, code);
        self.goaway = Some(self.last_stream);
    }

    /// Takes every whole frame in the read buffer.
    fn on_input(&mut self) -> Result<(), ConnError> {
        let mut input = mem::take(&mut self.read);
        let result = self.on_frames(&mut input);
        self.read = input;
        result
    }

    fn on_frames(&mut self, input: &mut BytesMut) -> Result<(), ConnError> {
        if !self.preface_read {
            let n = input.len().min(PREFACE.len());
            if input[..n] != PREFACE[..n] {
                return Err(ConnError(ErrorCode::Protocol));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            input.advance(PREFACE.len());
            self.preface_read = true;
        }
        while input.len() >= HEADER_LEN {
            let header = FrameHeader::parse(input);
            if header.len > DEFAULT_MAX_FRAME_SIZE as usize {
                return Err(ConnError(ErrorCode::FrameSize));
            }
            if input.len() < HEADER_LEN + header.len {
                let wanted = HEADER_LEN + header.len - input.len();
                input.reserve(wanted);
                break;
            }
            if !self.settings_read {
                if header.kind != kind::SETTINGS || header.has(flag::ACK) {
                    return Err(ConnError(ErrorCode::Protocol));
                }
                self.settings_read = true;
            }
            if let Some(continuation) = &self.continuation {
                if header.kind != kind::CONTINUATION || header.stream != continuation.stream {
                    return Err(ConnError(ErrorCode::Protocol));
                }
            }
            if header.kind == kind::DATA {
                let frame = input.split_to(HEADER_LEN + header.len).freeze();
                self.on_data(&header, frame)?;
            } else {
                self.on_frame(&header, &input[HEADER_LEN..HEADER_LEN + header.len])?;
                input.advance(HEADER_LEN + header.len);
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), ConnError> {
        let stream = header.stream;
        match header.kind {
            kind::HEADERS => self.on_headers(header, payload),
            kind::CONTINUATION => {
                let Some(mut continuation) = self.continuation.take() else {
                    return Err(ConnError(ErrorCode::Protocol));
                };
                continuation.block.extend_from_slice(payload);
                if continuation.block.len() > self.max_block() {
                    return Err(ConnError(ErrorCode::Protocol));
                }
                if header.has(flag::END_HEADERS) {
                    self.on_header_block(
                        continuation.stream,
                        continuation.end_stream,
                        continuation.self_dependent,
                        &continuation.block,
                    )
                } else {
                    self.continuation = Some(continuation);
                    Ok(())
                }
            }
            kind::PRIORITY => {
                if stream == 0 {
                    return Err(ConnError(ErrorCode::Protocol));
                }
                if payload.len() != 5 {
                    self.reset(stream, ErrorCode::FrameSize);
                } else if frame::priority_dependency(payload) == stream {
                    self.reset(stream, ErrorCode::Protocol);
                }
                Ok(())
            }
            kind::RST_STREAM => {
                if stream == 0 || stream > self.last_stream {
                    return Err(ConnError(ErrorCode::Protocol));
                }
                if payload.len() != 4 {
                    return Err(ConnError(ErrorCode::FrameSize));
                }
                if self.streams.get(&stream).is_some_and(|s| !s.answered) {
                    self.premature_resets += 1;
                    if self.premature_resets > MAX_PREMATURE_RESETS
                        && self.premature_resets * 2 >= self.opened
                    {
                        return Err(ConnError(ErrorCode::EnhanceYourCalm));
                    }
                }
                self.remove(stream);
                Ok(())
            }
            kind::SETTINGS => self.on_settings(header, payload),
            kind::PUSH_PROMISE => Err(ConnError(ErrorCode::Protocol)),
            kind::PING => {
                if stream != 0 {
                    return Err(ConnError(ErrorCode::Protocol));
                }
                if payload.len() != 8 {
                    return Err(ConnError(ErrorCode::FrameSize));
                }
                if !header.has(flag::ACK) {
                    frame::write_ping_ack(&mut self.write, payload);
                }
                Ok(())
            }
            kind::GOAWAY => {
                if stream != 0 {
                    return Err(ConnError(ErrorCode::Protocol));
                }
                // The client opens no more streams; those open finish.
                if self.goaway.is_none() {
                    self.go_away(ErrorCode::NoError);
                }
                Ok(())
            }
            kind::WINDOW_UPDATE => self.on_window_update(stream, payload),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), ConnError> {
        if header.stream != 0 {
            return Err(ConnError(ErrorCode::Protocol));
        }
        if header.has(flag::ACK) {
            return match payload.len() {
                0 => Ok(()),
                _ => Err(ConnError(ErrorCode::FrameSize)),
            };
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnError(ErrorCode::FrameSize));
        }
        // The last value counts; applied once, not once per entry.
        let mut stream_window = None;
        for entry in payload.chunks(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = frame::u32_at(&entry[2..]);
            match id {
                setting::ENABLE_PUSH if value > 1 => return Err(ConnError(ErrorCode::Protocol)),
                setting::INITIAL_WINDOW_SIZE => {
                    if value > MAX_WINDOW {
                        return Err(ConnError(ErrorCode::FlowControl));
                    }
                    stream_window = Some(value);
                }
                setting::HEADER_TABLE_SIZE if value < HEADER_TABLE_SIZE as u32 => {
                    self.table_size_update = true;
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME_SIZE..=(1 << 24) - 1).contains(&value) {
                        return Err(ConnError(ErrorCode::Protocol));
                    }
                    self.peer_max_frame = value as usize;
                }
                // The rest bind a client, or only advise (and serin never
                // indexes into the client's HPACK table).
                _ => {}
            }
        }
        if let Some(value) = stream_window {
            // Every open stream's window moves by the change (RFC 9113
            // §6.9.2), and may go below zero.
            let delta = i64::from(value) - i64::from(self.peer_stream_window);
            self.peer_stream_window = value;
            for stream in self.streams.values_mut() {
                stream.send_window += delta;
                if stream.send_window > i64::from(MAX_WINDOW) {
                    return Err(ConnError(ErrorCode::FlowControl));
                }
            }
        }
        frame::write_settings_ack(&mut self.write);
        Ok(())
    }

    fn on_window_update(&mut self, stream: u32, payload: &[u8]) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(ConnError(ErrorCode::FrameSize));
        }
        let increment = i64::from(frame::u32_at(payload) & MAX_WINDOW);
        if stream == 0 {
            if increment == 0 {
                return Err(ConnError(ErrorCode::Protocol));
            }
            self.send_window += increment;
            if self.send_window > i64::from(MAX_WINDOW) {
                return Err(ConnError(ErrorCode::FlowControl));
            }
            return Ok(());
        }
        if stream > self.last_stream {
            return Err(ConnError(ErrorCode::Protocol));
        }
        if increment == 0 {
            self.reset(stream, ErrorCode::Protocol);
            return Ok(());
        }
        if let Some(s) = self.streams.get_mut(&stream) {
            s.send_window += increment;
            if s.send_window > i64::from(MAX_WINDOW) {
                self.reset(stream, ErrorCode::FlowControl);
            }
        }
        Ok(())
    }

    fn on_data(&mut self, header: &FrameHeader, frame: Bytes) -> Result<(), ConnError> {
        let id = header.stream;
        if id == 0 {
            return Err(ConnError(ErrorCode::Protocol));
        }
        let Some((start, end)) = frame::unpadded(header, &frame[HEADER_LEN..]) else {
            return Err(ConnError(ErrorCode::Protocol));
        };
        let len = header.len as i64;
        if len > self.recv_window {
            return Err(ConnError(ErrorCode::FlowControl));
        }
        self.recv_window -= len;
        let Some(stream) = self.streams.get_mut(&id).filter(|s| s.recv_open) else {
            if id > self.last_stream {
                return Err(ConnError(ErrorCode::Protocol));
            }
            self.release(0, header.len as u32);
            if !self.was_reset(id) {
                self.reset(id, ErrorCode::StreamClosed);
            }
            return Ok(());
        };
        if len > stream.recv_window {
            self.release(0, header.len as u32);
            self.reset(id, ErrorCode::FlowControl);
            return Ok(());
        }
        stream.recv_window -= len;
        // A small payload is copied: a slice would keep the whole read
        // buffer it came from alive for as long as it waits in the inbox.
        let payload = &frame[HEADER_LEN + start..HEADER_LEN + end];
        let data = if payload.len() < SLICED_DATA {
            Bytes::copy_from_slice(payload)
        } else {
            frame.slice(HEADER_LEN + start..HEADER_LEN + end)
        };
        stream.received += data.len() as u64;
        let end_stream = header.has(flag::END_STREAM);
        let length_broken = match stream.expected {
            Some(expected) => {
                stream.received > expected || (end_stream && stream.received != expected)
            }
            None => false,
        };
        if length_broken {
            self.release(0, header.len as u32);
            self.reset(id, ErrorCode::Protocol);
            return Ok(());
        }
        // Padding is passed on at once.
        let padding = (header.len - data.len()) as u32;
        let data_len = data.len() as u32;
        let taken = match &stream.inbox {
            Some(inbox) if !data.is_empty() => inbox.borrow_mut().push(data),
            _ => false,
        };
        if end_stream {
            stream.recv_open = false;
            if let Some(inbox) = stream.inbox.take() {
                inbox.borrow_mut().end(None);
            }
        }
        self.release(id, padding + if taken { 0 } else { data_len });
        Ok(())
    }

    /// `bytes` were passed on (or dropped): handed back to the connection's
    /// window and, unless `stream` is 0 or no longer receiving, to the
    /// stream's, in WINDOW_UPDATEs of at least half a window.
    fn release(&mut self, stream: u32, bytes: u32) {
        if bytes == 0 {
            return;
        }
        self.unreleased += bytes;
        if self.unreleased >= CONNECTION_WINDOW / 2 {
            frame::write_window_update(&mut self.write, 0, self.unreleased);
            self.recv_window += i64::from(self.unreleased);
            self.unreleased = 0;
        }
        if let Some(s) = self.streams.get_mut(&stream).filter(|s| s.recv_open) {
            s.unreleased += bytes;
            if s.unreleased >= STREAM_WINDOW / 2 {
                frame::write_window_update(&mut self.write, stream, s.unreleased);
                s.recv_window += i64::from(s.unreleased);
                s.unreleased = 0;
            }
        }
    }

    /// The largest header block serin takes in before decoding it: HPACK
    /// never makes a head larger on the wire than twice its decoded size,
    /// whatever the coding, so a longer block can only be an attack.
    fn max_block(&self) -> usize {
        self.max_header_list * 2 + 1024
    }

    fn on_headers(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), ConnError> {
        let stream = header.stream;
        if stream == 0 || stream.is_multiple_of(2) {
            return Err(ConnError(ErrorCode::Protocol));
        }
        let Some((mut start, end)) = frame::unpadded(header, payload) else {
            return Err(ConnError(ErrorCode::Protocol));
        };
        let mut self_dependent = false;
        if header.has(flag::PRIORITY) {
            if end - start < 5 {
                return Err(ConnError(ErrorCode::FrameSize));
            }
            self_dependent = frame::priority_dependency(&payload[start..]) == stream;
            start += 5;
        }
        let fragment = &payload[start..end];
        let end_stream = header.has(flag::END_STREAM);
        if header.has(flag::END_HEADERS) {
            return self.on_header_block(stream, end_stream, self_dependent, fragment);
        }
        if fragment.len() > self.max_block() {
            return Err(ConnError(ErrorCode::Protocol));
        }
        self.continuation = Some(Continuation {
            stream,
            end_stream,
            self_dependent,
            block: fragment.to_vec(),
        });
        Ok(())
    }

    /// A whole header block: a new request, or a request's trailers.
    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: &[u8],
    ) -> Result<(), ConnError> {
        let trailers = self.streams.contains_key(&id);
        let mut head = HeadReader::new(self.max_header_list, trailers);
        // Decoded whatever comes of the request: the HPACK table must stay
        // in step with the client's.
        if let Err(e) = self
            .decoder
            .decode(block, |name, value| head.field(name, value))
        {
            tracing::debug!(peer = %self.meta.peer, error = %e, "HPACK decoding failed");
            return Err(ConnError(ErrorCode::Compression));
        }
        if trailers {
            self.on_trailers(id, end_stream, head);
            return Ok(());
        }
        if id <= self.last_stream {
            if self.was_reset(id) {
                return Ok(());
            }
            return Err(ConnError(ErrorCode::StreamClosed));
        }
        self.last_stream = id;
        if self.goaway.is_some() {
            // Opened after serin's GOAWAY: ignored (RFC 9113 §6.8).
            return Ok(());
        }
        if self_dependent {
            self.reset(id, ErrorCode::Protocol);
            return Ok(());
        }
        if self.streams.len() >= MAX_CONCURRENT_STREAMS as usize {
            self.reset(id, ErrorCode::RefusedStream);
            return Ok(());
        }
        let request = match head.finish() {
            Ok(request) => request,
            Err(Unusable::Malformed) => {
                self.reset(id, ErrorCode::Protocol);
                return Ok(());
            }
            Err(Unusable::TooLarge) => {
                self.open(id, end_stream, None, None, None);
                let answer = super::hyper::refuse_head(&self.worker, &Refusal::HeadTooLarge);
                self.respond(id, answer);
                return Ok(());
            }
        };
        let (parts, expected) = request;
        if end_stream && expected.is_some_and(|length| length > 0) {
            self.reset(id, ErrorCode::Protocol);
            return Ok(());
        }
        let (body, inbox) = if end_stream {
            (StreamBody::empty(id, self.credit.clone()), None)
        } else {
            let inbox = Rc::new(RefCell::new(Inbox::default()));
            let body = StreamBody::streamed(inbox.clone(), id, self.credit.clone(), expected);
            (body, Some(inbox))
        };
        let req = Request::from_parts(parts, ClientBody::Http2(body));
        let answer = Box::pin(super::hyper::answer(
            self.worker.clone(),
            self.meta.clone(),
            req,
        ));
        let slot = self.requests.push(id, answer);
        self.open(id, end_stream, inbox, Some(slot), expected);
        Ok(())
    }

    fn open(
        &mut self,
        id: u32,
        end_stream: bool,
        inbox: Option<Rc<RefCell<Inbox>>>,
        request: Option<usize>,
        expected: Option<u64>,
    ) {
        self.opened += 1;
        self.streams.insert(
            id,
            Stream {
                recv_open: !end_stream,
                inbox,
                recv_window: i64::from(STREAM_WINDOW),
                unreleased: 0,
                expected,
                received: 0,
                send_window: i64::from(self.peer_stream_window),
                request,
                answered: false,
                body: None,
                pending: Bytes::new(),
            },
        );
    }

    fn on_trailers(&mut self, id: u32, end_stream: bool, head: HeadReader) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if !stream.recv_open {
            self.reset(id, ErrorCode::StreamClosed);
            return;
        }
        let complete = stream
            .expected
            .is_none_or(|length| length == stream.received);
        if !end_stream || !head.is_trailers() || !complete {
            self.reset(id, ErrorCode::Protocol);
            return;
        }
        stream.recv_open = false;
        if let Some(inbox) = stream.inbox.take() {
            inbox.borrow_mut().end(Some(head.fields));
        }
    }

    /// Encodes a stream's response head, and sends its body if it has one.
    fn respond(&mut self, id: u32, answered: Answered<HpackBlock>) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.request = None;
        stream.answered = true;
        let Answered {
            status,
            fields,
            body,
        } = answered;
        let at = start_header_block(&mut self.write, &mut self.table_size_update);
        hpack::encode_status(status.as_u16(), &mut self.write);
        self.write.extend_from_slice(&fields.0);
        let end_stream = body.is_end_stream();
        frame::finish_header_block(&mut self.write, at, id, end_stream, self.peer_max_frame);
        if end_stream {
            self.sent(id);
        } else {
            stream.body = Some(body);
            self.sending += 1;
        }
    }

    /// Moves the response bodies on, as far as the windows and the write
    /// buffer let them: round by round, each stream at most a frame's worth
    /// per round, starting one stream further each time, so that a large
    /// body does not hold up the small ones beside it.
    fn send_bodies(&mut self, cx: &mut Context<'_>) {
        let mut ended = mem::take(&mut self.ended);
        let mut out = Outgoing {
            write: &mut self.write,
            window: &mut self.send_window,
            max_frame: self.peer_max_frame,
            table_size_update: &mut self.table_size_update,
        };
        let count = self.streams.len();
        let mut moved = true;
        while moved && out.write.len() < WRITE_HIGH_WATER {
            moved = false;
            self.next_to_send = (self.next_to_send + 1) % count.max(1);
            for turn in 0..count {
                let (id, stream) = &mut self.streams.0[(self.next_to_send + turn) % count];
                let Some(body) = &mut stream.body else {
                    continue;
                };
                let before = out.write.len();
                let outcome = out.send(cx, *id, body, &mut stream.pending, &mut stream.send_window);
                moved |= out.write.len() != before;
                if let Some(whole) = outcome {
                    stream.body = None;
                    ended.push((*id, whole));
                }
            }
        }
        for (id, whole) in ended.drain(..) {
            self.sending -= 1;
            if whole {
                self.sent(id);
            } else {
                // The upstream broke off mid-body: the client must not take
                // a truncated body for a whole one.
                self.reset(id, ErrorCode::Internal);
            }
        }
        self.ended = ended;
    }

    /// A stream's response is all written: the stream closes, at once if
    /// the request had ended, else with RST_STREAM(NO_ERROR) (RFC 9113
    /// §8.1: the rest of the request is not needed).
    fn sent(&mut self, id: u32) {
        match self.streams.get(&id) {
            Some(stream) if stream.recv_open => self.reset(id, ErrorCode::NoError),
            Some(_) => self.remove(id),
            None => {}
        }
    }

    /// A stream error: RST_STREAM, and the stream is gone. A client that
    /// makes serin reset too many streams loses the connection.
    fn reset(&mut self, id: u32, code: ErrorCode) {
        frame::write_rst_stream(&mut self.write, id, code);
        self.remove(id);
        if code != ErrorCode::NoError {
            self.error_resets += 1;
            if self.error_resets > MAX_ERROR_RESETS && !self.failed {
                self.fail(ErrorCode::EnhanceYourCalm);
                return;
            }
        }
        if !self.was_reset(id) {
            if self.reset.len() == RESETS_REMEMBERED {
                self.reset.pop_front();
            }
            self.reset.push_back(id);
        }
    }

    /// Whether serin reset `id` lately.
    fn was_reset(&self, id: u32) -> bool {
        self.reset.contains(&id)
    }

    fn remove(&mut self, id: u32) {
        if let Some(stream) = self.streams.remove(&id) {
            // A stream that goes before its answer takes its request with
            // it: the upstream exchange is dropped, its outcome counted as
            // abandoned.
            if let Some(slot) = stream.request {
                self.requests.cancel(slot);
            }
            if stream.body.is_some() {
                self.sending -= 1;
            }
        }
    }
}

/// What sending a response body needs of its connection.
struct Outgoing<'a> {
    write: &'a mut Vec<u8>,
    /// The connection's send window.
    window: &'a mut i64,
    max_frame: usize,
    table_size_update: &'a mut bool,
}

impl Outgoing<'_> {
    /// Sends up to a frame's worth of one stream's body: `Some(whole)` once
    /// the body has ended (`false`: the upstream broke off).
    fn send(
        &mut self,
        cx: &mut Context<'_>,
        id: u32,
        body: &mut ProxyBody,
        pending: &mut Bytes,
        stream_window: &mut i64,
    ) -> Option<bool> {
        loop {
            if !pending.is_empty() {
                let window = (*stream_window).min(*self.window);
                if window <= 0 {
                    return None;
                }
                let n = pending.len().min(window as usize).min(self.max_frame);
                let chunk = pending.split_to(n);
                let end = pending.is_empty() && body.is_end_stream();
                frame::write_data(self.write, id, &chunk, end, self.max_frame);
                *stream_window -= n as i64;
                *self.window -= n as i64;
                return end.then_some(true);
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return None,
                Poll::Ready(None) => {
                    frame::write_data(self.write, id, &[], true, self.max_frame);
                    return Some(true);
                }
                Poll::Ready(Some(Err(_))) => return Some(false),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        *pending = data;
                        if pending.is_empty() && body.is_end_stream() {
                            frame::write_data(self.write, id, &[], true, self.max_frame);
                            return Some(true);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let at = start_header_block(self.write, self.table_size_update);
                            encode_trailers(&trailers, self.write);
                            frame::finish_header_block(self.write, at, id, true, self.max_frame);
                            return Some(true);
                        }
                    }
                },
            }
        }
    }
}

/// A response head's fields as an HPACK block ([`ResponseFields`]):
/// encoded as the answer is made, from the upstream's parsed head and
/// serin's own fields, with no header map in between, and copied into the
/// connection's write buffer after the status.
pub(crate) struct HpackBlock(Vec<u8>);

impl ResponseFields for HpackBlock {
    fn with_capacity(fields: usize) -> Self {
        // About what a short name and value take.
        HpackBlock(Vec::with_capacity(fields * 24))
    }

    fn sink<'a>(&'a mut self, _shared: Option<&'a Bytes>) -> impl FieldSink + 'a {
        HpackSink(&mut self.0)
    }
}

struct HpackSink<'a>(&'a mut Vec<u8>);

impl FieldSink for HpackSink<'_> {
    /// One field, less one HTTP/2 forbids (RFC 9113 §8.2.2). A value that is
    /// new on every response goes as a literal never indexed, as
    /// [`crate::fields::MapSink`] marks it.
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if is_connection_specific(name) {
            return;
        }
        // What RFC 9113 §8.2.1 forbids in a value; httparse lets none through.
        debug_assert!(!value.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')));
        hpack::encode_field(name, value, new_on_every_request(name), self.0);
    }
}

/// Appends a body's trailers, by the same rules as a head's fields.
fn encode_trailers(fields: &HeaderMap, out: &mut Vec<u8>) {
    let mut sink = HpackSink(out);
    for (name, value) in fields {
        sink.field(name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Starts a header block (HEADERS frame) in `write`, with the table size
/// update the client is owed first; returns where it starts, for
/// `frame::finish_header_block`.
fn start_header_block(write: &mut Vec<u8>, table_size_update: &mut bool) -> usize {
    let at = frame::reserve_header(write);
    if mem::take(table_size_update) {
        hpack::encode_table_size_update_to_zero(write);
    }
    at
}

/// In any case: the names come from HTTP/1.1 upstreams too.
fn is_connection_specific(name: &[u8]) -> bool {
    match name.len() {
        7 => name.eq_ignore_ascii_case(b"upgrade"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        16 => name.eq_ignore_ascii_case(b"proxy-connection"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// Why a decoded head cannot be served.
enum Unusable {
    /// RFC 9113 §8.1.1: a stream error of type PROTOCOL_ERROR.
    Malformed,
    /// Larger than `max_header_bytes`: answered 431.
    TooLarge,
}

/// A request head (or trailers) as HPACK decodes it, checked field by field
/// as RFC 9113 §8.2 and §8.3 ask.
struct HeadReader {
    method: Option<Method>,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    path: Option<PathAndQuery>,
    fields: HeaderMap,
    /// HPACK's measure of the head so far, and its limit.
    size: usize,
    limit: usize,
    /// Reading trailers: no pseudo-header is allowed.
    trailers: bool,
    regular_seen: bool,
    malformed: bool,
    content_length: Option<u64>,
}

impl HeadReader {
    fn new(limit: usize, trailers: bool) -> Self {
        Self {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            fields: HeaderMap::new(),
            size: 0,
            limit,
            trailers,
            regular_seen: false,
            malformed: false,
            content_length: None,
        }
    }

    fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.malformed || self.size > self.limit {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.regular_seen || self.trailers || !self.pseudo(pseudo, value) {
                self.malformed = true;
            }
            return;
        }
        self.regular_seen = true;
        if !self.regular(name, value) {
            self.malformed = true;
        }
    }

    /// A pseudo-header; `false` if it is unknown, repeated or invalid.
    fn pseudo(&mut self, name: &[u8], value: &[u8]) -> bool {
        fn once<T>(slot: &mut Option<T>, value: Option<T>) -> bool {
            match (slot.is_none(), value) {
                (true, Some(value)) => {
                    *slot = Some(value);
                    true
                }
                _ => false,
            }
        }
        match name {
            b"method" => once(&mut self.method, Method::from_bytes(value).ok()),
            b"scheme" => once(&mut self.scheme, Scheme::try_from(value).ok()),
            b"authority" => once(
                &mut self.authority,
                valid_host(value)
                    .then(|| Authority::try_from(value).ok())
                    .flatten(),
            ),
            b"path" if !value.is_empty() => {
                once(&mut self.path, PathAndQuery::try_from(value).ok())
            }
            _ => false,
        }
    }

    /// A regular field; `false` if HTTP/2 forbids it or it is invalid.
    fn regular(&mut self, name: &[u8], value: &[u8]) -> bool {
        if name.iter().any(u8::is_ascii_uppercase) || is_connection_specific(name) {
            return false;
        }
        let Ok(name) = HeaderName::from_bytes(name) else {
            return false;
        };
        if name == TE && value != b"trailers" {
            return false;
        }
        let untrimmed = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        if untrimmed(value.first()) || untrimmed(value.last()) {
            return false;
        }
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return false;
        };
        if name == CONTENT_LENGTH {
            let length = std::str::from_utf8(value.as_bytes())
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (length, self.content_length) {
                (Some(length), None) => self.content_length = Some(length),
                (Some(length), Some(seen)) if length == seen => {}
                _ => return false,
            }
        }
        self.fields.append(name, value);
        true
    }

    fn is_trailers(&self) -> bool {
        !self.malformed && self.size <= self.limit
    }

    /// The request's parts and its `content-length`.
    fn finish(self) -> Result<(http::request::Parts, Option<u64>), Unusable> {
        if self.size > self.limit {
            return Err(Unusable::TooLarge);
        }
        let Some(method) = self.method.filter(|_| !self.malformed) else {
            return Err(Unusable::Malformed);
        };
        let mut uri = http::uri::Parts::default();
        if method == Method::CONNECT {
            // RFC 9113 §8.5: only `:authority`.
            if self.scheme.is_some() || self.path.is_some() || self.authority.is_none() {
                return Err(Unusable::Malformed);
            }
            uri.authority = self.authority;
        } else {
            let (Some(scheme), Some(path)) = (self.scheme, self.path) else {
                return Err(Unusable::Malformed);
            };
            // RFC 9113 §8.3.1: an absolute path, or `*` for OPTIONS only.
            let origin_form = path.as_str().starts_with('/');
            if !origin_form && (path.as_str() != "*" || method != Method::OPTIONS) {
                return Err(Unusable::Malformed);
            }
            // As hyper's server did: the scheme only with an authority, so
            // that the target stays in origin form without one.
            if self.authority.is_some() {
                uri.scheme = Some(scheme);
                uri.authority = self.authority;
            }
            uri.path_and_query = Some(path);
        }
        let Ok(uri) = Uri::from_parts(uri) else {
            return Err(Unusable::Malformed);
        };
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = method;
        parts.uri = uri;
        parts.version = Version::HTTP_2;
        parts.headers = self.fields;
        Ok((parts, self.content_length))
    }
}
