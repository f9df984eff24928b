//! serin's own HTTP/2 server loop (`proxy/src/server/own_h2.rs`), asserted
//! on the wire, the way the h2spec conformance suite checks a server.
//!
//! Why it exists: every HTTP/2 client connection (h2c with prior knowledge,
//! or TLS with ALPN `h2`) is now served by serin's own frame loop, HPACK
//! decoder and request checks instead of hyper's. A real HTTP/2 client
//! never sends what a server has to refuse, so most of these tests drive
//! the loop with a raw-frame client that writes exact frames (header blocks
//! HPACK-encoded by hand, literals only) and reads exact frames back. Each
//! case states the outcome RFC 9113 (and RFC 7541 for HPACK) requires.
//!
//! Most cases are rows of three tables, each run by one test:
//!
//! - [`connection_error_cases`] (test `connection_errors`): a GOAWAY with
//!   the error code, then the connection closes with nothing more sent, and
//!   the proxy still serves a new connection;
//! - [`stream_error_cases`] (test `stream_errors`): an RST_STREAM with the
//!   error code on that stream (or, where RFC 9113 §5.1 allows either, a
//!   stream or a connection error), and a later request on the same
//!   connection is still answered;
//! - [`served_cases`] (test `served`): what must work: CONTINUATION,
//!   padding, trailers, PRIORITY and unknown frames, HPACK's dynamic table.
//!
//! A case is a unique name and a script of [`Step`]s: frames to write (made
//! by the functions under "frames to send") and what must be read back.
//! Every case runs on a proxy and upstream of its own (so request counts
//! and held answers are the case's own), over one fresh connection, a few
//! cases at once. Unless the server ended the connection (a `Goaway…` step,
//! or `RstOrGoaway` met by a GOAWAY), the runner then asserts that a GET on
//! the next stream of the same connection is answered 200; after a
//! connection error, that a GET on a new connection is. Each
//! table test collects every failed case, by name, with what failed, and
//! fails once listing them all.
//!
//! To add a case: append `case("unique_snake_case_name", steps![...])` to
//! the table it belongs in; a request head serin must reset with
//! PROTOCOL_ERROR (or, for `refused`, may answer 400) is a line `name:
//! fields;` in a `heads!` block of [`stream_error_cases`]. A
//! connection-error case ends with a `Goaway…` step; a stream error is an
//! `Rst(stream, code)` step. Optionally `.upstream(n)`: exactly `n` of the
//! case's requests reach the upstream (the runner's closing GET not
//! counted); `.config(..)`: the proxy's settings; `.before_settings()`: the
//! steps start right after the preface, before the SETTINGS handshake.
//!
//! Tests with logic of their own stay functions below the tables: the
//! server's first frames, a bad preface and one split in two writes, PING,
//! flow control both ways (windows that the server must respect, and
//! credit it must give back as the upstream consumes a body), 431 and HPACK
//! state across refused requests, the size update a lowered
//! SETTINGS_HEADER_TABLE_SIZE calls for, REFUSED_STREAM, a client reset
//! cancelling the upstream request, frames on a stream serin reset long
//! ago, graceful shutdown and a client's GOAWAY, the fields of
//! responses, and all of it over TLS too. End-to-end cases use hyper's
//! HTTP/2 client as well. Every wait is bounded by [`WAIT`] and ends as
//! soon as the expected frame arrives; nothing sleeps.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serin_proxy::{Proxy, ProxyConfig, RouteTable, Routes, Target, Upstream, UpstreamProtocol};
use serin_tests::{
    closed_port_url, eventually, h2c_client, send, Behavior, Gate, TestBody, TestCert, TestUpstream,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Failure bound for every wait in this file; never a pause.
const WAIT: Duration = Duration::from_secs(10);
/// The most frames a test reads on one connection.
const MAX_FRAMES: usize = 20_000;
/// Table cases in flight at once (each has its own proxy).
const PARALLEL: usize = 6;

// === the protocol's numbers (RFC 9113 §6, §7, §11) ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The window every flow-control window starts with.
const DEFAULT_WINDOW: u32 = 65_535;
/// The largest frame payload before SETTINGS_MAX_FRAME_SIZE says otherwise.
const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest window (2^31 - 1).
const MAX_WINDOW: u32 = (1 << 31) - 1;

fn kind_name(kind: u8) -> String {
    match kind {
        DATA => "DATA".into(),
        HEADERS => "HEADERS".into(),
        PRIORITY => "PRIORITY".into(),
        RST_STREAM => "RST_STREAM".into(),
        SETTINGS => "SETTINGS".into(),
        PUSH_PROMISE => "PUSH_PROMISE".into(),
        PING => "PING".into(),
        GOAWAY => "GOAWAY".into(),
        WINDOW_UPDATE => "WINDOW_UPDATE".into(),
        CONTINUATION => "CONTINUATION".into(),
        other => format!("type {other:#x}"),
    }
}

// === a proxy in front of one upstream ===

/// A proxy in front of a stable upstream (weight 0: every request goes
/// there; the canary is a closed port nothing reaches).
struct Setup {
    proxy: Proxy,
    up: TestUpstream,
}

impl Setup {
    async fn start() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tweak: impl FnOnce(&mut ProxyConfig)) -> Self {
        let up = TestUpstream::start("stable").await;
        let mut config = ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            Upstream::parse(&up.url(), UpstreamProtocol::Http1).unwrap(),
            Upstream::parse(&closed_port_url(), UpstreamProtocol::Http1).unwrap(),
        );
        config.response_timeout = Duration::from_secs(120);
        tweak(&mut config);
        let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
        Self { proxy, up }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.local_addr()
    }

    /// A connection past the handshake (preface and SETTINGS both ways).
    async fn client(&self) -> H2 {
        H2::handshake(self.addr(), &[]).await
    }

    /// From now on the upstream holds every answer until the gate opens.
    fn gate(&self) -> Gate {
        let gate = Gate::closed();
        self.hold(&gate);
        gate
    }

    /// From now on the upstream holds every answer until `gate` opens.
    fn hold(&self, gate: &Gate) {
        self.up.set(Behavior {
            hold: Some(gate.clone()),
            ..Behavior::default()
        });
    }

    /// A connection with a GET on each of `streams`, received and held by
    /// the upstream until the returned gate opens.
    async fn held(&self, streams: &[u32]) -> (H2, Gate) {
        let gate = self.gate();
        let mut c = self.client().await;
        for &stream in streams {
            c.send_get(stream, "/").await;
        }
        self.upstream_received(streams.len() as u64).await;
        (c, gate)
    }

    /// Waits until the upstream has received `n` requests in all.
    async fn upstream_received(&self, n: u64) {
        eventually(WAIT, "the request reaches the upstream", || async {
            self.up.requests() >= n
        })
        .await;
    }

    /// A GET over a fresh connection is answered 200 by the upstream.
    async fn still_serves(&self) {
        let mut c = self.client().await;
        c.assert_ok(1).await;
    }
}

// === a raw HTTP/2 client ===

/// A byte stream to the proxy: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One frame, as read off the wire or to write.
#[derive(Clone)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The error code of an RST_STREAM or a GOAWAY.
    fn error_code(&self) -> u32 {
        match self.kind {
            RST_STREAM => u32_at(&self.payload),
            GOAWAY => u32_at(&self.payload[4..]),
            _ => panic!("{self:?} has no error code"),
        }
    }

    /// The frame as written on the wire.
    fn bytes(&self) -> Vec<u8> {
        let mut out = frame_header(self.payload.len(), self.kind, self.flags, self.stream);
        out.extend_from_slice(&self.payload);
        out
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} flags={:#x} stream={} len={}",
            kind_name(self.kind),
            self.flags,
            self.stream,
            self.payload.len()
        )?;
        match self.kind {
            RST_STREAM | GOAWAY if self.payload.len() >= 4 => {
                write!(f, " code={:#x}", self.error_code())
            }
            WINDOW_UPDATE if self.payload.len() == 4 => {
                write!(f, " increment={}", u32_at(&self.payload))
            }
            _ => Ok(()),
        }
    }
}

fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A response read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    fields: Vec<(String, String)>,
    /// The head's header block as sent, before decoding.
    head_block: Vec<u8>,
    body: Vec<u8>,
    /// The fields of a header block after the body, if any.
    trailers: Option<Vec<(String, String)>>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/2 client connection: writes exact frames, reads exact frames.
struct H2 {
    io: Box<dyn Io>,
    /// Every frame read so far, for failure messages.
    seen: Vec<String>,
    /// The server's SETTINGS, as first sent.
    server_settings: Vec<(u16, u32)>,
    /// What the server lets this client send, as the client counts it.
    send_window: i64,
    stream_window: i64,
    /// Frames [`H2::response`] read for other streams than the one it
    /// waited for, kept for when it reads theirs.
    stash: std::collections::VecDeque<Frame>,
}

impl H2 {
    /// A TCP connection, nothing sent yet.
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        Self::over(Box::new(tcp))
    }

    fn over(io: Box<dyn Io>) -> Self {
        Self {
            io,
            seen: Vec::new(),
            server_settings: Vec::new(),
            send_window: i64::from(DEFAULT_WINDOW),
            stream_window: i64::from(DEFAULT_WINDOW),
            stash: std::collections::VecDeque::new(),
        }
    }

    /// A connection past the handshake: the preface and a SETTINGS with
    /// `settings` sent, the server's SETTINGS read and acknowledged, and
    /// the server's acknowledgement of ours read.
    async fn handshake(addr: SocketAddr, settings: &[(u16, u32)]) -> Self {
        let mut c = Self::connect(addr).await;
        c.start(settings).await;
        c
    }

    async fn start(&mut self, values: &[(u16, u32)]) {
        self.send(PREFACE).await;
        self.settle(values).await;
    }

    /// The handshake once the preface is sent: our SETTINGS with `values`
    /// written, the server's read and acknowledged, and its ACK of ours read.
    async fn settle(&mut self, values: &[(u16, u32)]) {
        self.write(settings(values)).await;
        let (mut theirs, mut acked) = (false, false);
        while !(theirs && acked) {
            let f = self.expect_frame("the server's SETTINGS and its ACK").await;
            match (f.kind, f.has(ACK)) {
                (SETTINGS, false) => {
                    assert!(!theirs, "a second SETTINGS: {:?}", self.seen);
                    theirs = true;
                    self.server_settings = f
                        .payload
                        .chunks(6)
                        .map(|e| (u16::from_be_bytes([e[0], e[1]]), u32_at(&e[2..])))
                        .collect();
                    if let Some(&(_, w)) = self
                        .server_settings
                        .iter()
                        .find(|(id, _)| *id == SETTINGS_INITIAL_WINDOW_SIZE)
                    {
                        self.stream_window = i64::from(w);
                    }
                    self.write(frame(SETTINGS, ACK, 0, &[])).await;
                }
                (SETTINGS, true) => acked = true,
                (WINDOW_UPDATE, _) if f.stream == 0 => {
                    self.send_window += i64::from(u32_at(&f.payload));
                }
                _ => panic!("unexpected during the handshake: {:?}", self.seen),
            }
        }
    }

    // --- writing ---

    /// Writes raw bytes; a failed write shows up as what the next read
    /// gets, so it is not an error here.
    async fn send(&mut self, bytes: &[u8]) {
        if self.io.write_all(bytes).await.is_ok() {
            let _ = self.io.flush().await;
        }
    }

    async fn write(&mut self, frame: Frame) {
        self.send(&frame.bytes()).await;
    }

    /// Writes `frames` at once, before the server can answer any of them.
    async fn write_burst(&mut self, frames: &[Frame]) {
        self.send(&frames.iter().flat_map(Frame::bytes).collect::<Vec<_>>())
            .await;
    }

    /// A GET of `path`, ending the stream with its head.
    async fn send_get(&mut self, stream: u32, path: &str) {
        self.write(get_on(stream, path)).await;
    }

    // --- reading ---

    /// The next frame, or `None` once the server closed the connection (or
    /// reset it). Panics when nothing comes within [`WAIT`].
    async fn next(&mut self) -> Option<Frame> {
        // Bounds every loop that reads until some frame comes.
        assert!(
            self.seen.len() < MAX_FRAMES,
            "more than {MAX_FRAMES} frames on one connection"
        );
        let read = async {
            let mut head = [0u8; 9];
            self.io.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            self.io.read_exact(&mut payload).await.ok()?;
            Some(Frame {
                kind: head[3],
                flags: head[4],
                stream: u32_at(&head[5..]) & MAX_WINDOW,
                payload,
            })
        };
        let frame = match tokio::time::timeout(WAIT, read).await {
            Ok(frame) => frame,
            Err(_) => panic!(
                "nothing from the server within {WAIT:?}; frames so far: {:?}",
                self.seen
            ),
        };
        self.seen.push(match &frame {
            Some(f) => format!("{f:?}"),
            None => "<closed>".into(),
        });
        frame
    }

    /// The next frame; panics if the connection closed instead.
    async fn expect_frame(&mut self, what: &str) -> Frame {
        match self.next().await {
            Some(f) => f,
            None => panic!("closed while waiting for {what}: {:?}", self.seen),
        }
    }

    /// Reads until a frame that `stop` picks (skipping the others) and
    /// returns it; panics if the connection closes first.
    async fn skip_until(&mut self, what: &str, stop: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let f = self.expect_frame(what).await;
            if stop(&f) {
                return f;
            }
        }
    }

    /// Reads until a GOAWAY or a frame of one of `kinds` on `stream`.
    async fn skip_to(&mut self, what: &str, stream: u32, kinds: &[u8]) -> Frame {
        self.skip_until(what, |f| {
            f.kind == GOAWAY || f.stream == stream && kinds.contains(&f.kind)
        })
        .await
    }

    /// Reads until a GOAWAY (skipping other frames), asserts that `want`
    /// (described by `what`) accepts its code and returns its last stream id.
    async fn expect_goaway_where(&mut self, what: &str, want: impl Fn(u32) -> bool) -> u32 {
        let f = self.skip_until("a GOAWAY", |f| f.kind == GOAWAY).await;
        assert!(
            want(f.error_code()),
            "GOAWAY code {:#x}, expected {what}: frames {:?}, debug data {:?}",
            f.error_code(),
            self.seen,
            String::from_utf8_lossy(&f.payload[8..])
        );
        assert_eq!(f.stream, 0, "{:?}", self.seen);
        u32_at(&f.payload) & MAX_WINDOW
    }

    /// Reads until a GOAWAY (skipping other frames), asserts its code and
    /// returns its last stream id.
    async fn expect_goaway(&mut self, code: u32) -> u32 {
        self.expect_goaway_where(&format!("{code:#x}"), |got| got == code)
            .await
    }

    /// Reads until the server's SETTINGS ACK (skipping other frames),
    /// which carries nothing.
    async fn expect_settings_ack(&mut self) {
        let f = self
            .skip_until("a SETTINGS ACK", |f| f.kind == SETTINGS && f.has(ACK))
            .await;
        assert!(f.payload.is_empty(), "{:?}", self.seen);
    }

    /// The server closes the connection; no frame comes before it.
    async fn expect_closed(&mut self) {
        if let Some(f) = self.next().await {
            panic!("{f:?} instead of the connection closing: {:?}", self.seen);
        }
    }

    /// A connection error: a GOAWAY whose code `want` (described by `what`)
    /// accepts, then the connection closes with nothing more sent.
    async fn expect_connection_error_where(&mut self, what: &str, want: impl Fn(u32) -> bool) {
        self.expect_goaway_where(what, want).await;
        self.expect_closed().await;
    }

    /// A connection error: GOAWAY with `code`, then the connection closes
    /// with nothing more sent.
    async fn expect_connection_error(&mut self, code: u32) {
        self.expect_goaway(code).await;
        self.expect_closed().await;
    }

    /// Reads until the server closes the connection (up to 1000 frames),
    /// returning what it sent meanwhile.
    async fn read_to_close(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        for _ in 0..1000 {
            match self.next().await {
                Some(f) => frames.push(f),
                None => return frames,
            }
        }
        panic!("the connection never closed: {:?}", self.seen);
    }

    /// Reads until an RST_STREAM on `stream` and asserts its code; a GOAWAY,
    /// a response on that stream or the connection closing first fails.
    async fn expect_rst(&mut self, stream: u32, code: u32) {
        let f = self
            .skip_to("an RST_STREAM", stream, &[RST_STREAM, HEADERS, DATA])
            .await;
        match f.kind {
            RST_STREAM => assert_eq!(f.error_code(), code, "RST_STREAM code: {:?}", self.seen),
            GOAWAY => panic!(
                "a connection error instead of a stream error: {:?}",
                self.seen
            ),
            _ => panic!("stream {stream} answered instead of reset: {:?}", self.seen),
        }
    }

    /// The request on `stream` is refused: reset with PROTOCOL_ERROR or
    /// answered 400 by serin; a GOAWAY first fails.
    async fn expect_refused(&mut self, stream: u32) {
        let f = self
            .skip_to("a refusal", stream, &[RST_STREAM, HEADERS])
            .await;
        match f.kind {
            RST_STREAM => assert_eq!(f.error_code(), PROTOCOL_ERROR, "{:?}", self.seen),
            HEADERS => assert_eq!(decode_block(&f.payload)[0].1, "400", "{:?}", self.seen),
            _ => panic!("{:?}", self.seen),
        }
    }

    /// RFC 9113 §5.1, "closed": a stream error on `stream` or a connection
    /// error, either of type `code`; an answer on any stream first fails.
    /// Returns whether the connection closed.
    async fn expect_rst_or_goaway(&mut self, stream: u32, code: u32) -> bool {
        let f = self
            .skip_until("an error for the stream", |f| {
                [GOAWAY, HEADERS, DATA].contains(&f.kind)
                    || f.kind == RST_STREAM && f.stream == stream
            })
            .await;
        if f.kind == HEADERS || f.kind == DATA {
            panic!("a closed stream answered: {:?}", self.seen);
        }
        assert_eq!(f.error_code(), code, "{:?}", self.seen);
        if f.kind == GOAWAY {
            self.expect_closed().await;
        }
        f.kind == GOAWAY
    }

    /// Reads the response on `stream` (head, body, trailers), giving the
    /// server back the credit of every DATA frame as a client would. Other
    /// streams' frames are skipped; a GOAWAY with NO_ERROR is allowed.
    async fn response(&mut self, stream: u32) -> Resp {
        let mut block = Vec::new();
        let mut head: Option<Vec<(String, String)>> = None;
        let mut head_block = Vec::new();
        let mut body = Vec::new();
        let mut ends = false;
        let mut trailers = None;
        loop {
            let f = match self.stash.iter().position(|f| f.stream == stream) {
                Some(i) => self.stash.remove(i).unwrap(),
                None => self.expect_frame("a response").await,
            };
            match f.kind {
                GOAWAY if f.error_code() == NO_ERROR => continue,
                GOAWAY => panic!("connection error: {:?}", self.seen),
                RST_STREAM if f.stream == stream => {
                    panic!("stream {stream} was reset: {:?}", self.seen)
                }
                _ if f.stream != stream => {
                    if f.stream != 0 {
                        self.stash.push_back(f);
                    }
                    continue;
                }
                // Credit for the request body, sent before its end.
                WINDOW_UPDATE => continue,
                HEADERS | CONTINUATION => {
                    assert_eq!(f.flags & (PADDED | PRIORITY_FLAG), 0, "{:?}", self.seen);
                    block.extend_from_slice(&f.payload);
                    if f.kind == HEADERS {
                        ends = f.has(END_STREAM);
                    }
                    if !f.has(END_HEADERS) {
                        continue;
                    }
                    let raw = std::mem::take(&mut block);
                    let fields = decode_block(&raw);
                    if head.is_none() {
                        head = Some(fields);
                        head_block = raw;
                    } else {
                        assert!(ends, "trailers without END_STREAM: {:?}", self.seen);
                        trailers = Some(fields);
                    }
                    if ends {
                        break;
                    }
                }
                DATA => {
                    assert!(head.is_some(), "DATA before HEADERS: {:?}", self.seen);
                    body.extend_from_slice(&f.payload);
                    let n = f.payload.len() as u32;
                    if n > 0 {
                        self.write(window_update(0, n)).await;
                    }
                    if f.has(END_STREAM) {
                        break;
                    }
                    if n > 0 {
                        self.write(window_update(stream, n)).await;
                    }
                }
                _ => panic!("unexpected {f:?} on stream {stream}: {:?}", self.seen),
            }
        }
        let fields = head.unwrap();
        let status = fields
            .iter()
            .find(|(n, _)| n == ":status")
            .unwrap_or_else(|| panic!("no :status in {fields:?}"))
            .1
            .parse()
            .unwrap();
        Resp {
            status,
            fields,
            head_block,
            body,
            trailers,
        }
    }

    /// A GET of `/` on `stream` is answered 200 by the upstream.
    async fn assert_ok(&mut self, stream: u32) {
        self.send_get(stream, "/").await;
        let r = self.response(stream).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "stable"),
            "{r:?} {:?}",
            self.seen
        );
    }
}

// === frames to send ===

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Frame {
    Frame {
        kind,
        flags,
        stream,
        payload: payload.to_vec(),
    }
}

/// Just a frame header announcing `len` bytes of payload.
fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut out = (len as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out
}

fn headers(stream: u32, flags: u8, block: &[u8]) -> Frame {
    frame(HEADERS, flags, stream, block)
}

fn continuation(stream: u32, flags: u8, fragment: &[u8]) -> Frame {
    frame(CONTINUATION, flags, stream, fragment)
}

fn data(stream: u32, flags: u8, data: &[u8]) -> Frame {
    frame(DATA, flags, stream, data)
}

fn settings(values: &[(u16, u32)]) -> Frame {
    let mut payload = Vec::new();
    for (id, value) in values {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

fn window_update(stream: u32, increment: u32) -> Frame {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

fn rst(stream: u32, code: u32) -> Frame {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

fn ping(flags: u8, data: [u8; 8]) -> Frame {
    frame(PING, flags, 0, &data)
}

fn priority(stream: u32, depends_on: u32) -> Frame {
    let mut payload = depends_on.to_be_bytes().to_vec();
    payload.push(15);
    frame(PRIORITY, 0, stream, &payload)
}

fn goaway(last: u32, code: u32) -> Frame {
    let mut payload = last.to_be_bytes().to_vec();
    payload.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &payload)
}

/// A GET of `path` on `stream`, ending the stream with its head.
fn get_on(stream: u32, path: &str) -> Frame {
    headers(stream, END_STREAM | END_HEADERS, &block(&get(path)))
}

/// `data` padded with `pad` zero bytes (the PADDED flag's layout).
fn padded(data: &[u8], pad: u8) -> Vec<u8> {
    let mut out = vec![pad];
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0, usize::from(pad)));
    out
}

/// `frames` written at once, before the server can answer any of them.
fn burst(frames: &[Frame]) -> Step {
    Step::Burst(frames.to_vec())
}

/// GETs of `/` with an uppercase field name, which serin resets with
/// PROTOCOL_ERROR, on the first `n` client streams (1, 3, 5, ...).
fn uppercase_requests(n: u32) -> Vec<Frame> {
    let fields = block(&get_with(&[("X-Upper", "1")]));
    (0..n)
        .map(|i| headers(2 * i + 1, END_STREAM | END_HEADERS, &fields))
        .collect()
}

/// A rapid reset (CVE-2023-44487): a GET on each of `n` streams from
/// `first` on, each reset (CANCEL) right after its HEADERS.
fn rapid_resets(first: u32, n: u32) -> Vec<Frame> {
    (0..n)
        .map(|i| first + 2 * i)
        .flat_map(|stream| [get_on(stream, "/"), rst(stream, CANCEL)])
        .collect()
}

// === HPACK by hand (RFC 7541), literals only, no Huffman ===

/// The static table's names (RFC 7541 Appendix A), index `i` at `i - 1`.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// The `:status` values of static indices 8 to 14.
const STATIC_STATUSES: [&str; 7] = ["200", "204", "206", "304", "400", "404", "500"];

/// Appends `value` with an `n`-bit prefix, `high` in the bits above it.
fn encode_int(out: &mut Vec<u8>, n: u8, high: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

fn encode_str(out: &mut Vec<u8>, s: &str) {
    encode_int(out, 7, 0, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// A header block of literals without indexing: the static table's index
/// for the name when it has the name (lowercase), a literal name otherwise.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        match STATIC_NAMES.iter().position(|n| n == name) {
            Some(i) => encode_int(&mut out, 4, 0, i + 1),
            None => {
                out.push(0);
                encode_str(&mut out, name);
            }
        }
        encode_str(&mut out, value);
    }
    out
}

/// A GET of `path` from `localhost`.
fn get(path: &str) -> Vec<(&'static str, &str)> {
    vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
    ]
}

/// A GET of `/` with `extra` fields after the pseudo-headers.
fn get_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut fields = get("/");
    fields.extend_from_slice(extra);
    fields
}

/// A POST of `path`, with a `content-length` if given.
fn post(path: &str, length: Option<&'static str>) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
    ];
    if let Some(length) = length {
        fields.push(("content-length", length));
    }
    block(&fields)
}

/// A dynamic table size update to `size` (RFC 7541 §6.3).
fn size_update(size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    encode_int(&mut out, 5, 0x20, size);
    out
}

/// A literal with incremental indexing and a new name: the decoder adds it
/// to its dynamic table (RFC 7541 §6.2.1).
fn indexed_field(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x40];
    encode_str(&mut out, name);
    encode_str(&mut out, value);
    out
}

fn decode_int(block: &mut &[u8], n: u8) -> usize {
    let max = (1usize << n) - 1;
    let mut value = usize::from(block[0]) & max;
    *block = &block[1..];
    if value < max {
        return value;
    }
    let mut shift = 0;
    loop {
        let b = block[0];
        *block = &block[1..];
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return value;
        }
    }
}

fn decode_str(block: &mut &[u8]) -> String {
    assert_eq!(block[0] & 0x80, 0, "the server Huffman-coded a string");
    let len = decode_int(block, 7);
    let s = String::from_utf8_lossy(&block[..len]).into_owned();
    *block = &block[len..];
    s
}

/// Decodes a response block the way serin's encoder writes them: `:status`
/// indexed (static 8 to 14), every other field a literal without indexing
/// or never indexed, with a static name index or a literal name.
fn decode_block(mut block: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while !block.is_empty() {
        let first = block[0];
        if first & 0x80 != 0 {
            let index = decode_int(&mut block, 7);
            assert!(
                (8..=14).contains(&index),
                "indexed field {index}: serin indexes only :status"
            );
            fields.push((":status".into(), STATIC_STATUSES[index - 8].into()));
            continue;
        }
        if first & 0xe0 == 0x20 {
            // RFC 7541 §4.2: a dynamic table size update, only at the start.
            assert!(fields.is_empty(), "a table size update after {fields:?}");
            let size = decode_int(&mut block, 5);
            assert!(size <= 4096, "a table size update to {size}");
            continue;
        }
        assert_eq!(
            first & 0xe0,
            0,
            "serin writes only literals without indexing or never indexed, got {first:#x}"
        );
        let index = decode_int(&mut block, 4);
        let name = match index {
            0 => decode_str(&mut block),
            i => STATIC_NAMES[i - 1].to_string(),
        };
        let value = decode_str(&mut block);
        fields.push((name, value));
    }
    fields
}

// === the case tables: one proxy and one connection a case ===

/// One thing a case does on its connection, in order.
enum Step {
    /// Writes a frame (see "frames to send").
    Write(Frame),
    /// Writes these bytes at once: what is not a whole frame.
    Raw(Vec<u8>),
    /// Writes these frames at once (see [`burst`]).
    Burst(Vec<Frame>),
    /// Reads until the server's SETTINGS ACK.
    SettingsAck,
    /// The upstream holds every answer from now on, until the steps are
    /// done.
    Hold,
    /// Waits until the upstream has received this many requests.
    Reached(u64),
    /// A GET of `/` on this stream is answered 200 by the upstream.
    Served(u32),
    /// The response on this stream has this status and body.
    Answer(u32, u16, &'static str),
    /// The response on this stream is a 200 whose body (the upstream's echo
    /// of the request's fields, from `/echo-headers`) has this line.
    Echoes(u32, &'static str),
    /// A stream error: an RST_STREAM on this stream with this code.
    Rst(u32, u32),
    /// The request on this stream is reset with PROTOCOL_ERROR or answered
    /// 400 by serin.
    Refused(u32),
    /// A stream error on this stream or a connection error, with this code.
    RstOrGoaway(u32, u32),
    /// A connection error: a GOAWAY with this code, then the connection
    /// closes with nothing more sent.
    Goaway(u32),
    /// A connection error with either code.
    GoawayEither(u32, u32),
    /// A connection error with any code but NO_ERROR.
    GoawayAnyError,
}

impl From<Frame> for Step {
    fn from(frame: Frame) -> Self {
        Step::Write(frame)
    }
}

impl Step {
    /// The stream the step is about, or 0.
    fn stream(&self) -> u32 {
        match self {
            Step::Write(f) => f.stream,
            Step::Burst(frames) => frames.iter().map(|f| f.stream).max().unwrap_or(0),
            Step::Served(s)
            | Step::Answer(s, ..)
            | Step::Echoes(s, _)
            | Step::Rst(s, _)
            | Step::Refused(s)
            | Step::RstOrGoaway(s, _) => *s,
            _ => 0,
        }
    }

    fn is_goaway(&self) -> bool {
        matches!(
            self,
            Step::Goaway(_) | Step::GoawayEither(..) | Step::GoawayAnyError
        )
    }
}

/// Steps from frames and [`Step`]s alike.
macro_rules! steps {
    ($($step:expr),* $(,)?) => {
        vec![$(Step::from($step)),*]
    };
}

/// `[$make(name, &fields), ...]` from `$make; name: fields; ...`: cases
/// that differ only in a request head, laid out as rustfmt leaves them.
macro_rules! heads {
    ($make:ident; $($name:ident: $fields:expr;)*) => {
        [$($make(stringify!($name), &$fields)),*]
    };
}

/// One row of a table (see the module doc).
struct Case {
    /// Unique, snake_case: what the client does and what it must get.
    name: &'static str,
    steps: Vec<Step>,
    /// How many of the case's requests reach the upstream, if it checks.
    upstream: Option<u64>,
    /// Changes the proxy's settings.
    config: fn(&mut ProxyConfig),
    /// The steps start right after the preface, before the SETTINGS
    /// handshake.
    before_settings: bool,
}

fn case(name: &'static str, steps: Vec<Step>) -> Case {
    Case {
        name,
        steps,
        upstream: None,
        config: |_| {},
        before_settings: false,
    }
}

impl Case {
    fn upstream(self, n: u64) -> Self {
        Self {
            upstream: Some(n),
            ..self
        }
    }

    fn config(self, config: fn(&mut ProxyConfig)) -> Self {
        Self { config, ..self }
    }

    fn before_settings(self) -> Self {
        Self {
            before_settings: true,
            ..self
        }
    }
}

/// `fields` as a request on stream 1 is reset with PROTOCOL_ERROR and never
/// reaches the upstream (RFC 9113 §8.1.1).
fn malformed(name: &'static str, fields: &[(&str, &str)]) -> Case {
    let request = headers(1, END_STREAM | END_HEADERS, &block(fields));
    case(name, steps![request, Step::Rst(1, PROTOCOL_ERROR)]).upstream(0)
}

/// `fields` as a request on stream 1 is refused ([`Step::Refused`]) and
/// never reaches the upstream.
fn refused(name: &'static str, fields: &[(&str, &str)]) -> Case {
    let request = headers(1, END_STREAM | END_HEADERS, &block(fields));
    case(name, steps![request, Step::Refused(1)]).upstream(0)
}

/// Runs `cases`, each on a proxy of its own, [`PARALLEL`] at once, and
/// fails once with every case that failed, by name.
async fn run_table(what: &str, cases: Vec<Case>) {
    let mut names = HashSet::new();
    for case in &cases {
        assert!(
            names.insert(case.name),
            "two {what} cases named {}",
            case.name
        );
    }
    let runs = cases.len();
    let results = futures_util::stream::iter(cases.into_iter().map(|case| async move {
        let name = case.name;
        let failure = tokio::spawn(run_case(case)).await.err()?;
        let message = match failure.try_into_panic() {
            Ok(panic) => match panic.downcast::<String>() {
                Ok(message) => *message,
                Err(panic) => panic
                    .downcast::<&str>()
                    .map_or("a panic".into(), |m| m.to_string()),
            },
            Err(failure) => failure.to_string(),
        };
        Some(format!("{name}: {message}"))
    }))
    .buffer_unordered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    let mut bad: Vec<String> = results.into_iter().flatten().collect();
    bad.sort();
    assert!(
        bad.is_empty(),
        "{} of {runs} {what} cases failed:\n\n{}\n",
        bad.len(),
        bad.join("\n\n")
    );
}

/// One case: its steps on a fresh connection, then a GET on the next
/// stream, or after a connection error a GET on a new connection.
async fn run_case(case: Case) {
    let s = Setup::with(case.config).await;
    let mut c = if case.before_settings {
        let mut c = H2::connect(s.addr()).await;
        c.send(PREFACE).await;
        c
    } else {
        s.client().await
    };
    let gate = Gate::closed();
    let mut last_stream = 0;
    let mut closed = false;
    for step in &case.steps {
        assert!(!closed, "a step after the connection closed");
        last_stream = last_stream.max(step.stream());
        closed = play(step, &mut c, &s, &gate).await;
    }
    gate.open();
    let closing_get = if closed {
        0
    } else {
        c.assert_ok((last_stream + 1) | 1).await;
        1
    };
    if let Some(n) = case.upstream {
        assert_eq!(
            s.up.requests(),
            n + closing_get,
            "requests that reached the upstream: {:?}",
            c.seen
        );
    }
    if closed {
        s.still_serves().await;
    }
}

/// Does one step; returns whether the connection closed.
async fn play(step: &Step, c: &mut H2, s: &Setup, gate: &Gate) -> bool {
    match step {
        Step::Write(f) => c.write(f.clone()).await,
        Step::Raw(bytes) => c.send(bytes).await,
        Step::Burst(frames) => c.write_burst(frames).await,
        Step::SettingsAck => c.expect_settings_ack().await,
        Step::Hold => s.hold(gate),
        Step::Reached(n) => s.upstream_received(*n).await,
        Step::Served(stream) => c.assert_ok(*stream).await,
        Step::Answer(stream, status, body) => {
            let r = c.response(*stream).await;
            assert_eq!((r.status, r.text().as_str()), (*status, *body), "{r:?}");
        }
        Step::Echoes(stream, line) => {
            let r = c.response(*stream).await;
            assert_eq!(r.status, 200, "{r:?}");
            assert!(r.text().contains(&format!("{line}\n")), "{}", r.text());
        }
        Step::Rst(stream, code) => c.expect_rst(*stream, *code).await,
        Step::Refused(stream) => c.expect_refused(*stream).await,
        Step::RstOrGoaway(stream, code) => return c.expect_rst_or_goaway(*stream, *code).await,
        Step::Goaway(code) => c.expect_connection_error(*code).await,
        Step::GoawayEither(a, b) => {
            c.expect_connection_error_where(&format!("{a:#x} or {b:#x}"), |got| {
                got == *a || got == *b
            })
            .await
        }
        Step::GoawayAnyError => {
            c.expect_connection_error_where("an error", |got| got != NO_ERROR)
                .await
        }
    }
    step.is_goaway()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors() {
    let cases = connection_error_cases();
    for case in &cases {
        let last = case.steps.last();
        assert!(
            last.is_some_and(Step::is_goaway),
            "{} ends without a GOAWAY",
            case.name
        );
    }
    run_table("connection-error", cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_errors() {
    run_table("stream-error", stream_error_cases()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served() {
    run_table("served", served_cases()).await;
}

/// Connection errors: each ends with a GOAWAY step.
fn connection_error_cases() -> Vec<Case> {
    use Step::*;
    let get_root = block(&get("/"));
    let junk = vec![0u8; 4000];
    vec![
        // --- the preface and SETTINGS ---
        case(
            "a_first_frame_other_than_settings_is_a_protocol_error",
            steps![ping(0, *b"12345678"), Goaway(PROTOCOL_ERROR)],
        )
        .before_settings(),
        case(
            "a_settings_ack_as_the_first_frame_is_a_protocol_error",
            steps![frame(SETTINGS, ACK, 0, &[]), Goaway(PROTOCOL_ERROR)],
        )
        .before_settings(),
        case(
            "settings_with_a_length_not_a_multiple_of_6_is_a_frame_size_error",
            steps![
                frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0]),
                Goaway(FRAME_SIZE_ERROR)
            ],
        ),
        case(
            "a_settings_ack_with_a_payload_is_a_frame_size_error",
            steps![
                frame(SETTINGS, ACK, 0, &[0, 3, 0, 0, 0, 100]),
                Goaway(FRAME_SIZE_ERROR)
            ],
        ),
        case(
            "settings_on_a_stream_is_a_protocol_error",
            steps![frame(SETTINGS, 0, 1, &[]), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "an_initial_window_size_above_the_maximum_is_a_flow_control_error",
            steps![
                settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW + 1)]),
                Goaway(FLOW_CONTROL_ERROR),
            ],
        ),
        case(
            "a_max_frame_size_below_the_default_is_a_protocol_error",
            steps![
                settings(&[(SETTINGS_MAX_FRAME_SIZE, 16_383)]),
                Goaway(PROTOCOL_ERROR)
            ],
        ),
        case(
            "a_max_frame_size_above_2_pow_24_minus_1_is_a_protocol_error",
            steps![
                settings(&[(SETTINGS_MAX_FRAME_SIZE, 1 << 24)]),
                Goaway(PROTOCOL_ERROR)
            ],
        ),
        case(
            "enable_push_other_than_0_or_1_is_a_protocol_error",
            steps![
                // 0 and 1 are fine (and acknowledged); unknown settings are
                // ignored.
                settings(&[(SETTINGS_ENABLE_PUSH, 0), (0x99, 7)]),
                SettingsAck,
                settings(&[(SETTINGS_ENABLE_PUSH, 2)]),
                Goaway(PROTOCOL_ERROR),
            ],
        ),
        // --- PING, frame size, GOAWAY, PUSH_PROMISE ---
        case(
            "a_ping_of_another_length_is_a_frame_size_error",
            steps![frame(PING, 0, 0, b"1234567"), Goaway(FRAME_SIZE_ERROR)],
        ),
        case(
            "a_ping_on_a_stream_is_a_protocol_error",
            steps![frame(PING, 0, 1, b"12345678"), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "a_frame_larger_than_the_max_frame_size_is_a_frame_size_error",
            steps![
                // Only the header: the server must refuse on the length
                // alone (and leaves no unread payload behind to turn its
                // close into a reset).
                Raw(frame_header(
                    DEFAULT_MAX_FRAME + 1,
                    HEADERS,
                    END_STREAM | END_HEADERS,
                    1
                )),
                Goaway(FRAME_SIZE_ERROR),
            ],
        ),
        case(
            "a_push_promise_from_the_client_is_a_protocol_error",
            steps![
                Served(1),
                frame(
                    PUSH_PROMISE,
                    END_HEADERS,
                    1,
                    &[&2u32.to_be_bytes()[..], &get_root].concat()
                ),
                Goaway(PROTOCOL_ERROR),
            ],
        ),
        case(
            "a_goaway_on_a_stream_is_a_protocol_error",
            steps![frame(GOAWAY, 0, 1, &[0; 8]), Goaway(PROTOCOL_ERROR)],
        ),
        // --- HEADERS, CONTINUATION, HPACK ---
        case(
            "headers_on_stream_0_is_a_protocol_error",
            steps![get_on(0, "/"), Goaway(PROTOCOL_ERROR)],
        )
        .upstream(0),
        case(
            "headers_on_an_even_stream_is_a_protocol_error",
            steps![get_on(2, "/"), Goaway(PROTOCOL_ERROR)],
        )
        .upstream(0),
        case(
            "headers_on_a_stream_below_one_already_used_is_a_connection_error",
            steps![
                Served(5),
                get_on(3, "/"),
                // RFC 9113 §5.1.1 asks for PROTOCOL_ERROR; stream 3 is also
                // closed (§5.1.1: implicitly, by the use of 5), where §5.1
                // allows STREAM_CLOSED.
                GoawayEither(PROTOCOL_ERROR, STREAM_CLOSED),
            ],
        )
        .upstream(1),
        case(
            "a_header_block_interrupted_by_another_frame_is_a_protocol_error",
            steps![
                headers(1, END_STREAM, &get_root[..4]),
                priority(3, 0),
                Goaway(PROTOCOL_ERROR)
            ],
        )
        .upstream(0),
        case(
            // RFC 9113 §6.10: any frame other than CONTINUATION, unknown
            // types too.
            "a_header_block_interrupted_by_an_unknown_frame_is_a_protocol_error",
            steps![
                headers(1, END_STREAM, &get_root[..4]),
                frame(0x42, 0, 1, b"extension"),
                Goaway(PROTOCOL_ERROR),
            ],
        ),
        case(
            "a_continuation_on_another_stream_is_a_protocol_error",
            steps![
                headers(1, END_STREAM, &get_root[..4]),
                continuation(3, END_HEADERS, &get_root[4..]),
                Goaway(PROTOCOL_ERROR),
            ],
        )
        .upstream(0),
        case(
            "a_continuation_without_headers_is_a_protocol_error",
            steps![
                continuation(1, END_HEADERS, &get_root),
                Goaway(PROTOCOL_ERROR)
            ],
        ),
        case(
            "a_continuation_after_end_headers_is_a_protocol_error",
            steps![
                Hold,
                get_on(1, "/"),
                continuation(1, END_HEADERS, &block(&[("x-a", "b")])),
                Goaway(PROTOCOL_ERROR),
            ],
        ),
        case(
            "an_hpack_index_0_is_a_compression_error",
            steps![
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[&get_root[..], &[0x80]].concat()
                ),
                Goaway(COMPRESSION_ERROR),
            ],
        )
        .upstream(0),
        case(
            "an_hpack_index_past_both_tables_is_a_compression_error",
            steps![
                // Nothing in the dynamic table: 62 is already past it.
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[&get_root[..], &[0x80 | 70]].concat()
                ),
                Goaway(COMPRESSION_ERROR),
            ],
        ),
        case(
            "a_truncated_hpack_block_is_a_compression_error",
            steps![
                // The value is cut short.
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[&get_root[..], &[0x00, 3, b'x', b'-', b'a', 10, b'v']].concat()
                ),
                Goaway(COMPRESSION_ERROR),
            ],
        ),
        case(
            "an_hpack_table_size_update_above_the_limit_is_a_compression_error",
            steps![
                // RFC 7541 §6.3: above SETTINGS_HEADER_TABLE_SIZE (4096).
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[size_update(4097), get_root.clone()].concat()
                ),
                Goaway(COMPRESSION_ERROR),
            ],
        ),
        case(
            "an_hpack_table_size_update_after_a_field_is_a_compression_error",
            steps![
                // RFC 7541 §4.2: a size update must come at the start of a
                // block.
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[get_root.clone(), size_update(100)].concat()
                ),
                Goaway(COMPRESSION_ERROR),
            ],
        ),
        case(
            "headers_padding_as_long_as_the_payload_is_a_protocol_error",
            steps![
                headers(
                    1,
                    END_STREAM | END_HEADERS | PADDED,
                    &[&[get_root.len() as u8 + 1][..], &get_root].concat()
                ),
                Goaway(PROTOCOL_ERROR),
            ],
        )
        .upstream(0),
        case(
            "headers_too_short_for_their_priority_fields_are_a_frame_size_error",
            steps![
                headers(1, END_STREAM | END_HEADERS | PRIORITY_FLAG, &[0, 0, 0]),
                Goaway(FRAME_SIZE_ERROR),
            ],
        ),
        case(
            // HPACK never makes a head more than twice as large on the wire
            // as decoded: a block far beyond that is not buffered without
            // end.
            "a_header_block_far_above_max_header_bytes_ends_the_connection",
            steps![
                headers(1, END_STREAM, &junk),
                continuation(1, 0, &junk),
                continuation(1, 0, &junk),
                continuation(1, 0, &junk),
                continuation(1, 0, &junk),
                GoawayAnyError,
            ],
        )
        .config(|c| c.max_header_bytes = 4096),
        // --- DATA, WINDOW_UPDATE, RST_STREAM, PRIORITY, SETTINGS ---
        case(
            "data_on_stream_0_is_a_protocol_error",
            steps![data(0, 0, b"hello"), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "data_on_an_idle_stream_is_a_protocol_error",
            steps![data(1, END_STREAM, b"hello"), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "data_padding_as_long_as_the_payload_is_a_protocol_error",
            steps![
                Hold,
                headers(1, END_HEADERS, &post("/upload", None)),
                data(1, PADDED, &[5, 0, 0, 0, 0]),
                Goaway(PROTOCOL_ERROR),
            ],
        ),
        case(
            "a_window_update_of_0_on_the_connection_is_a_protocol_error",
            steps![window_update(0, 0), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "a_connection_window_above_the_maximum_is_a_flow_control_error",
            steps![
                window_update(0, MAX_WINDOW - DEFAULT_WINDOW), // exactly the maximum
                Served(1),
                window_update(0, 1),
                Goaway(FLOW_CONTROL_ERROR),
            ],
        ),
        case(
            "a_window_update_of_another_length_is_a_frame_size_error",
            steps![
                frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1]),
                Goaway(FRAME_SIZE_ERROR)
            ],
        ),
        case(
            "a_window_update_on_an_idle_stream_is_a_protocol_error",
            steps![window_update(1, 100), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            // RFC 9113 §6.9.2: a connection error, whichever window it
            // overflows.
            "a_settings_change_that_overflows_a_stream_window_is_a_flow_control_error",
            steps![
                Hold,
                get_on(1, "/"),
                Reached(1),
                window_update(1, MAX_WINDOW - DEFAULT_WINDOW), // exactly the maximum
                settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW + 1)]),
                Goaway(FLOW_CONTROL_ERROR),
            ],
        ),
        case(
            "rst_stream_on_stream_0_is_a_protocol_error",
            steps![rst(0, CANCEL), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "rst_stream_on_an_idle_stream_is_a_protocol_error",
            steps![Served(1), rst(3, CANCEL), Goaway(PROTOCOL_ERROR)],
        ),
        case(
            "rst_stream_of_another_length_is_a_frame_size_error",
            steps![
                Hold,
                get_on(1, "/"),
                frame(RST_STREAM, 0, 1, &[0, 0, 0, 8, 0]),
                Goaway(FRAME_SIZE_ERROR),
            ],
        ),
        case(
            "priority_on_stream_0_is_a_protocol_error",
            steps![priority(0, 1), Goaway(PROTOCOL_ERROR)],
        ),
        // --- resets without end (each burst ends on the frame that ends
        // the connection: nothing is left unread to turn the close into a
        // TCP reset) ---
        case(
            // CVE-2023-44487: more than 100 streams reset before their
            // answer, at least half of those opened.
            "rapid_reset_of_101_streams_is_enhance_your_calm",
            steps![
                Hold,
                burst(&rapid_resets(1, 101)),
                Goaway(ENHANCE_YOUR_CALM)
            ],
        ),
        case(
            "rapid_reset_of_half_the_streams_opened_is_enhance_your_calm",
            served_then(
                102,
                steps![
                    Hold,
                    burst(&rapid_resets(205, 102)),
                    Goaway(ENHANCE_YOUR_CALM)
                ],
            ),
        ),
        case(
            // More than 1024 streams serin had to reset for errors.
            "a_1025th_stream_error_is_enhance_your_calm",
            steps![burst(&uppercase_requests(1025)), Goaway(ENHANCE_YOUR_CALM)],
        )
        .upstream(0),
    ]
}

/// GETs of `/` on the first `n` streams, each answered 200 in turn, then
/// `rest`.
fn served_then(n: u32, rest: Vec<Step>) -> Vec<Step> {
    (0..n)
        .map(|i| Step::Served(2 * i + 1))
        .chain(rest)
        .collect()
}

/// Stream errors: the connection goes on after each.
fn stream_error_cases() -> Vec<Case> {
    use Step::*;
    // `trailer` after a body's first bytes is reset with PROTOCOL_ERROR.
    let trailers = |name, trailer| {
        let post = headers(1, END_HEADERS, &post("/upload", None));
        let steps = steps![
            Hold,
            post,
            data(1, 0, b"hi"),
            trailer,
            Rst(1, PROTOCOL_ERROR)
        ];
        case(name, steps)
    };
    // `frame` on stream 1 once the client ended it (and the upstream has
    // the request) is reset with STREAM_CLOSED.
    let after_the_end = |name, frame| {
        let steps = steps![
            Hold,
            get_on(1, "/"),
            Reached(1),
            frame,
            Rst(1, STREAM_CLOSED)
        ];
        case(name, steps)
    };
    // Malformed requests (RFC 9113 §8.1.1).
    let malformed = heads! { malformed;
        // A GET of `/` with one field more.
        malformed_an_uppercase_field_name: get_with(&[("X-Upper", "1")]);
        malformed_a_connection_field: get_with(&[("connection", "keep-alive")]);
        malformed_a_transfer_encoding_field: get_with(&[("transfer-encoding", "chunked")]);
        malformed_an_upgrade_field: get_with(&[("upgrade", "websocket")]);
        malformed_a_keep_alive_field: get_with(&[("keep-alive", "timeout=5")]);
        malformed_a_proxy_connection_field: get_with(&[("proxy-connection", "keep-alive")]);
        malformed_te_other_than_trailers: get_with(&[("te", "gzip")]);
        malformed_an_unknown_pseudo_header: get_with(&[(":foo", "bar")]);
        malformed_a_value_with_leading_whitespace: get_with(&[("x-a", " v")]);
        malformed_a_value_with_trailing_whitespace: get_with(&[("x-a", "v\t")]);
        malformed_a_value_with_cr_lf: get_with(&[("x-a", "v\r\nx-injected: 1")]);
        malformed_a_value_with_nul: get_with(&[("x-a", "v\0w")]);
        malformed_a_field_name_with_a_space: get_with(&[("x a", "1")]);
        malformed_an_empty_field_name: get_with(&[("", "1")]);
        malformed_a_content_length_that_is_not_a_number: get_with(&[("content-length", "1x")]);
        // Other heads.
        malformed_a_pseudo_header_after_a_regular_field: [
            (":method", "GET"),
            (":scheme", "http"),
            ("x-a", "1"),
            (":path", "/"),
        ];
        malformed_a_response_pseudo_header_in_a_request: [
            (":status", "200"),
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
        ];
        malformed_a_duplicated_path: [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":path", "/"),
        ];
        malformed_a_duplicated_method: [
            (":method", "GET"),
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
        ];
        malformed_no_method: [(":scheme", "http"), (":path", "/"), (":authority", "localhost")];
        malformed_no_scheme: [(":method", "GET"), (":path", "/"), (":authority", "localhost")];
        malformed_no_path: [(":method", "GET"), (":scheme", "http"), (":authority", "localhost")];
        malformed_an_empty_path: get("");
        malformed_connect_with_a_scheme: [
            (":method", "CONNECT"),
            (":scheme", "http"),
            (":authority", "localhost:443"),
        ];
        malformed_connect_with_a_path: [
            (":method", "CONNECT"),
            (":path", "/"),
            (":authority", "localhost:443"),
        ];
        malformed_connect_without_an_authority: [(":method", "CONNECT")];
        malformed_two_different_content_lengths: get_with(&[
            ("content-length", "0"),
            ("content-length", "1"),
        ]);
    };
    // Against the rules HTTP/1.1 has for the target and Host: reset, or
    // answered 400.
    let refused = heads! { refused;
        malformed_an_asterisk_path_on_a_get: get("*");
        malformed_an_authority_with_userinfo: [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "user:pw@localhost"),
        ];
        malformed_an_authority_with_a_port_that_is_not_a_number: [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "localhost:notaport"),
        ];
    };
    let others = vec![
        // --- bodies and trailers ---
        case(
            "more_data_than_the_content_length_is_a_protocol_error",
            steps![
                headers(1, END_HEADERS, &post("/upload", Some("3"))),
                data(1, END_STREAM, b"hello"),
                Rst(1, PROTOCOL_ERROR),
            ],
        ),
        case(
            "less_data_than_the_content_length_is_a_protocol_error",
            steps![
                headers(1, END_HEADERS, &post("/upload", Some("10"))),
                data(1, 0, b"hel"),
                data(1, END_STREAM, b"lo"),
                Rst(1, PROTOCOL_ERROR),
            ],
        ),
        case(
            "a_content_length_with_end_stream_on_the_headers_is_a_protocol_error",
            steps![
                headers(1, END_STREAM | END_HEADERS, &post("/upload", Some("5"))),
                Rst(1, PROTOCOL_ERROR),
                // A content-length of 0 with END_STREAM is consistent.
                headers(3, END_STREAM | END_HEADERS, &post("/upload", Some("0"))),
                Answer(3, 200, "received 0"),
            ],
        )
        .upstream(1),
        case(
            "frames_in_flight_after_the_server_reset_a_stream_are_ignored",
            steps![
                // All of it written before reading anything: the DATA of 5
                // bytes breaks the content-length of 3, so serin resets
                // stream 1 while the rest is on its way. The connection goes
                // on (an RST_STREAM for what was ignored is tolerated; a
                // GOAWAY is not).
                burst(&[
                    headers(1, END_HEADERS, &post("/upload", Some("3"))),
                    data(1, 0, b"hello"),
                    data(1, 0, b"more"),
                    headers(1, END_STREAM | END_HEADERS, &block(&[("x-trailer", "1")])),
                ]),
                Rst(1, PROTOCOL_ERROR),
            ],
        ),
        trailers(
            "trailers_without_end_stream_are_a_protocol_error",
            headers(1, END_HEADERS, &block(&[("x-checksum", "abc")])),
        ),
        trailers(
            "a_pseudo_header_in_trailers_is_a_protocol_error",
            headers(1, END_STREAM | END_HEADERS, &block(&[(":path", "/x")])),
        ),
        // --- frames on half-closed and closed streams ---
        after_the_end(
            "data_after_the_client_ended_the_stream_is_stream_closed",
            data(1, END_STREAM, b"late"),
        ),
        after_the_end(
            "headers_after_the_client_ended_the_stream_are_stream_closed",
            headers(1, END_STREAM | END_HEADERS, &block(&[("x-late", "1")])),
        ),
        // RFC 9113 §5.1, "closed": a stream error or a connection error of
        // type STREAM_CLOSED.
        case(
            "headers_on_a_closed_stream_is_a_stream_closed_error",
            steps![Served(1), get_on(1, "/"), RstOrGoaway(1, STREAM_CLOSED)],
        )
        .upstream(1),
        case(
            "data_on_a_closed_stream_is_stream_closed",
            steps![
                Served(1),
                data(1, END_STREAM, b"late"),
                RstOrGoaway(1, STREAM_CLOSED)
            ],
        ),
        // --- PRIORITY and WINDOW_UPDATE ---
        case(
            "headers_depending_on_their_own_stream_are_a_protocol_error",
            steps![
                headers(
                    1,
                    END_STREAM | END_HEADERS | PRIORITY_FLAG,
                    &[&1u32.to_be_bytes()[..], &[15], &block(&get("/"))].concat()
                ),
                Rst(1, PROTOCOL_ERROR),
            ],
        )
        .upstream(0),
        case(
            "a_priority_frame_depending_on_its_own_stream_is_a_protocol_error",
            steps![
                Hold,
                get_on(1, "/"),
                priority(1, 1),
                Rst(1, PROTOCOL_ERROR),
                // On an idle stream too (h2spec 5.3.1).
                priority(3, 3),
                Rst(3, PROTOCOL_ERROR),
            ],
        ),
        case(
            "a_priority_frame_of_another_length_is_a_frame_size_error",
            steps![
                Hold,
                headers(1, END_HEADERS, &block(&get("/"))),
                frame(PRIORITY, 0, 1, &[0, 0, 0, 0]),
                Rst(1, FRAME_SIZE_ERROR),
            ],
        ),
        case(
            // One short of the limit that ends the connection (see
            // `a_1025th_stream_error_is_enhance_your_calm`).
            "1024_stream_errors_keep_the_connection",
            steps![burst(&uppercase_requests(1024)), Rst(2047, PROTOCOL_ERROR)],
        )
        .upstream(0),
        case(
            "a_window_update_of_0_on_a_stream_is_a_protocol_error",
            steps![
                Hold,
                get_on(1, "/"),
                window_update(1, 0),
                Rst(1, PROTOCOL_ERROR)
            ],
        ),
        case(
            "a_stream_window_above_the_maximum_is_a_flow_control_error",
            steps![
                Hold,
                get_on(1, "/"),
                window_update(1, MAX_WINDOW - DEFAULT_WINDOW), // exactly the maximum
                window_update(1, 1),
                Rst(1, FLOW_CONTROL_ERROR),
            ],
        ),
    ];
    malformed.into_iter().chain(refused).chain(others).collect()
}

/// What must work.
fn served_cases() -> Vec<Case> {
    use Step::*;
    let get_root = block(&get("/"));
    let split = block(&get_with(&[("x-split", "across three frames")]));
    let (one, rest) = split.split_at(5);
    let (two, three) = rest.split_at(rest.len() / 2);
    let echo = block(&get("/echo-headers"));
    vec![
        case(
            "te_trailers_is_allowed",
            steps![
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &block(&get_with(&[("te", "trailers")]))
                ),
                Answer(1, 200, "stable"),
            ],
        ),
        case(
            "options_asterisk_is_served",
            steps![
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &block(&[
                        (":method", "OPTIONS"),
                        (":scheme", "http"),
                        (":path", "*"),
                        (":authority", "localhost"),
                    ])
                ),
                Answer(1, 200, "stable"),
            ],
        ),
        case(
            // RFC 9113 §8.2.3: split cookie fields are joined with "; "
            // before they go to an HTTP/1.1 upstream.
            "cookie_fields_are_joined_for_the_upstream",
            steps![
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[
                        echo.clone(),
                        block(&[("cookie", "a=1"), ("x-other", "x"), ("cookie", "b=2")])
                    ]
                    .concat()
                ),
                Echoes(1, "cookie: a=1; b=2"),
            ],
        ),
        case(
            "a_data_frame_of_exactly_the_max_frame_size_is_accepted",
            steps![
                headers(1, END_HEADERS, &post("/upload", Some("16384"))),
                data(1, END_STREAM, &[b'x'; DEFAULT_MAX_FRAME]),
                Answer(1, 200, "received 16384"),
            ],
        ),
        case(
            "trailers_are_passed_on_with_the_body",
            steps![
                headers(1, END_HEADERS, &post("/upload", Some("5"))),
                data(1, 0, b"hello"),
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &block(&[("x-checksum", "abc")])
                ),
                Answer(1, 200, "received 5"),
            ],
        ),
        case(
            "unknown_frame_types_are_ignored",
            steps![
                frame(0x42, 0xff, 0, b"whatever"),
                frame(0xfa, 0, 1, b"on an idle stream"),
                Served(1),
                frame(0x42, 0, 1, b"on a closed stream"),
                Served(3),
            ],
        ),
        case(
            "priority_frames_are_accepted_on_idle_and_closed_streams",
            steps![
                priority(3, 0),
                priority(9, 3),
                Served(1),
                priority(1, 0),
                Served(3)
            ],
        ),
        case(
            "padded_headers_and_padded_data_are_served",
            steps![
                headers(1, END_STREAM | END_HEADERS | PADDED, &padded(&get_root, 20)),
                Answer(1, 200, "stable"),
                // HEADERS with padding and priority fields, then padded DATA
                // frames (one of nothing but padding).
                headers(
                    3,
                    END_HEADERS | PADDED | PRIORITY_FLAG,
                    &padded(
                        &[
                            &0u32.to_be_bytes()[..],
                            &[200],
                            &post("/upload", Some("11"))
                        ]
                        .concat(),
                        7
                    )
                ),
                data(3, PADDED, &padded(b"hello", 100)),
                data(3, PADDED, &padded(b"", 5)),
                data(3, PADDED | END_STREAM, &padded(b" world", 0)),
                Answer(3, 200, "received 11"),
            ],
        ),
        case(
            "a_header_block_split_over_headers_and_two_continuations_is_served",
            steps![
                headers(1, END_STREAM, one),
                continuation(1, 0, two),
                continuation(1, END_HEADERS, three),
                Answer(1, 200, "stable"),
                // An empty CONTINUATION is a fragment like any other.
                headers(3, END_STREAM, &echo),
                continuation(3, 0, &[]),
                continuation(3, END_HEADERS, &block(&[("x-split", "yes")])),
                Echoes(3, "x-split: yes"),
            ],
        ),
        // --- resets before the answer, below the rapid-reset limit (see
        // `rapid_reset_of_101_streams_is_enhance_your_calm`) ---
        case(
            "resetting_100_streams_before_their_answer_keeps_the_connection",
            steps![Hold, burst(&rapid_resets(1, 100))],
        ),
        case(
            // 101 resets, but fewer than half of the 203 streams opened.
            "resetting_fewer_than_half_the_streams_opened_keeps_the_connection",
            served_then(102, steps![Hold, burst(&rapid_resets(205, 101))]),
        ),
        case(
            "the_hpack_dynamic_table_carries_over_between_requests",
            steps![
                // Request 1 adds `x-team: blue` to the table: index 62.
                headers(
                    1,
                    END_STREAM | END_HEADERS,
                    &[echo.clone(), indexed_field("x-team", "blue")].concat()
                ),
                Echoes(1, "x-team: blue"),
                // Request 2 refers to it by index, after a size update.
                headers(
                    3,
                    END_STREAM | END_HEADERS,
                    &[size_update(4096), echo.clone(), vec![0x80 | 62]].concat()
                ),
                Echoes(3, "x-team: blue"),
            ],
        ),
    ]
}

// === beyond the tables: the server's first frames, the preface, PING ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_starts_with_its_settings_and_a_larger_connection_window() {
    let s = Setup::with(|c| c.max_header_bytes = 20_000).await;
    let mut c = H2::connect(s.addr()).await;
    c.send(PREFACE).await;
    c.write(settings(&[])).await;
    let first = c.expect_frame("the server's SETTINGS").await;
    assert_eq!((first.kind, first.flags, first.stream), (SETTINGS, 0, 0));
    let theirs: Vec<(u16, u32)> = first
        .payload
        .chunks(6)
        .map(|e| (u16::from_be_bytes([e[0], e[1]]), u32_at(&e[2..])))
        .collect();
    for want in [
        (SETTINGS_MAX_CONCURRENT_STREAMS, 1024),
        (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
        (SETTINGS_MAX_HEADER_LIST_SIZE, 20_000),
    ] {
        assert!(theirs.contains(&want), "{want:?} not in {theirs:?}");
    }
    let second = c.expect_frame("a WINDOW_UPDATE").await;
    assert_eq!(
        (second.kind, second.stream),
        (WINDOW_UPDATE, 0),
        "{second:?}"
    );
    assert_eq!(u32_at(&second.payload), (1 << 20) - DEFAULT_WINDOW);
    // Our SETTINGS is acknowledged, and a request is served.
    c.expect_settings_ack().await;
    c.write(frame(SETTINGS, ACK, 0, &[])).await;
    c.assert_ok(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_preface_closes_the_connection() {
    let s = Setup::start().await;
    let mut c = H2::connect(s.addr()).await;
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").await;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, c.io.read_to_end(&mut raw))
        .await
        .expect("the connection closes")
        .ok();
    // RFC 9113 §3.4: a connection error of type PROTOCOL_ERROR, where the
    // GOAWAY may be omitted: what is not a preface may be HTTP/1.1, and
    // refused as such.
    let text = String::from_utf8_lossy(&raw);
    let goaway = raw.len() >= 17 && raw[3] == GOAWAY && u32_at(&raw[13..]) == PROTOCOL_ERROR;
    assert!(
        raw.is_empty() || text.starts_with("HTTP/1.1 400 ") || goaway,
        "{text:?}"
    );
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preface_split_after_its_first_16_bytes_is_still_http2() {
    // "PRI * HTTP/2.0\r\n\r\n" (18 bytes) alone is a whole HTTP/1.x head:
    // serin must wait for the rest before it decides.
    let s = Setup::start().await;
    for split in [16, 18, 20, 23] {
        let tcp = TcpStream::connect(s.addr()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let client = tcp.local_addr().unwrap();
        let mut c = H2::over(Box::new(tcp));
        c.send(&PREFACE[..split]).await;
        wait_until_proxy_read_all(s.addr(), client).await;
        c.send(&PREFACE[split..]).await;
        c.settle(&[]).await;
        c.assert_ok(1).await;
    }
}

/// Waits until the proxy has read every byte `client` sent it: the
/// receive queue of its socket in `/proc/net/tcp` (IPv4) is empty. (A copy
/// of `client_http1.rs`'s.)
async fn wait_until_proxy_read_all(proxy: SocketAddr, client: SocketAddr) {
    let hex = |addr: SocketAddr| {
        let SocketAddr::V4(v4) = addr else {
            panic!("the tests listen on 127.0.0.1")
        };
        let ip = u32::from_le_bytes(v4.ip().octets());
        format!("{ip:08X}:{:04X}", v4.port())
    };
    // The columns: slot, local address, remote address, state, then the
    // send and receive queues as `tx:rx`.
    let (local, remote) = (hex(proxy), hex(client));
    eventually(WAIT, "the proxy read all the client sent", || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let read_all = table.lines().any(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns.len() > 4
                && columns[1] == local
                && columns[2] == remote
                && columns[4].ends_with(":00000000")
        });
        async move { read_all }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_is_answered_with_the_same_bytes() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // A PING ACK from the client is not answered: the first PING back is
    // the answer to the second.
    c.write(ping(ACK, *b"no reply")).await;
    c.write(ping(0, *b"\x00\x01\x02\x03\xfc\xfd\xfe\xff")).await;
    let f = c.skip_until("a PING ACK", |f| f.kind == PING).await;
    assert_eq!((f.flags, f.stream), (ACK, 0), "{:?}", c.seen);
    assert_eq!(f.payload, b"\x00\x01\x02\x03\xfc\xfd\xfe\xff");
    c.assert_ok(1).await;
}

// === beyond the tables: HPACK state, 431, REFUSED_STREAM ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpack_table_stays_in_step_after_refused_requests() {
    let s = Setup::with(|c| c.max_header_bytes = 4096).await;
    let mut c = s.client().await;
    // Stream 1 is malformed (an uppercase name) and adds `x-first: 1` to
    // the table; stream 3 is too large (431) and adds `x-second: 2`.
    let b = [
        block(&get_with(&[("X-Upper", "1")])),
        indexed_field("x-first", "1"),
    ]
    .concat();
    c.write(headers(1, END_STREAM | END_HEADERS, &b)).await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    let big = "a".repeat(6000);
    let b = [
        block(&get_with(&[("x-big", &big)])),
        indexed_field("x-second", "2"),
    ]
    .concat();
    c.write(headers(3, END_STREAM | END_HEADERS, &b)).await;
    assert_eq!(c.response(3).await.status, 431);
    // Both entries are there, newest first (RFC 7541 §2.3.3).
    let mut b = block(&get("/echo-headers"));
    b.push(0x80 | 62);
    b.push(0x80 | 63);
    c.write(headers(5, END_STREAM | END_HEADERS, &b)).await;
    let r = c.response(5).await;
    assert!(r.text().contains("x-first: 1\n"), "{}", r.text());
    assert!(r.text().contains("x-second: 2\n"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_header_table_size_is_followed_by_a_size_update_to_0() {
    // RFC 7541 §4.2: after the client lowers SETTINGS_HEADER_TABLE_SIZE,
    // the next header block starts with a size update (0x20: to 0), once.
    // 0x88 is `:status: 200`, indexed.
    const UPDATE: &[u8] = &[0x20, 0x88];
    const NONE: &[u8] = &[0x88];
    let s = Setup::start().await;
    for (settings_sent, first, second) in [
        (vec![], NONE, NONE),
        (vec![(SETTINGS_HEADER_TABLE_SIZE, 4096)], NONE, NONE),
        (vec![(SETTINGS_HEADER_TABLE_SIZE, 2048)], UPDATE, NONE),
        (vec![(SETTINGS_HEADER_TABLE_SIZE, 0)], UPDATE, NONE),
    ] {
        let mut c = H2::handshake(s.addr(), &settings_sent).await;
        for (stream, starts) in [(1, first), (3, second)] {
            c.send_get(stream, "/").await;
            let r = c.response(stream).await;
            assert!(
                r.head_block.starts_with(starts),
                "{settings_sent:?}, stream {stream}: {:x?}",
                r.head_block
            );
            assert_eq!((r.status, r.text().as_str()), (200, "stable"), "{r:?}");
        }
    }
    // Lowered mid-connection, after a response: the next one has it.
    let mut c = s.client().await;
    c.assert_ok(1).await;
    c.write(settings(&[(SETTINGS_HEADER_TABLE_SIZE, 0)])).await;
    c.expect_settings_ack().await;
    c.send_get(3, "/").await;
    let r = c.response(3).await;
    assert!(r.head_block.starts_with(UPDATE), "{:x?}", r.head_block);
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_above_max_header_bytes_is_answered_431() {
    let s = Setup::with(|c| c.max_header_bytes = 4096).await;
    let mut c = s.client().await;
    assert!(
        c.server_settings
            .contains(&(SETTINGS_MAX_HEADER_LIST_SIZE, 4096)),
        "{:?}",
        c.server_settings
    );
    let big = "a".repeat(6000);
    c.write(headers(
        1,
        END_STREAM | END_HEADERS,
        &block(&get_with(&[("x-big", &big)])),
    ))
    .await;
    let r = c.response(1).await;
    assert_eq!(r.status, 431, "{r:?}");
    // Over CONTINUATION frames too, and with a body that then is not read.
    let b = block(&get_with(&[("x-big", &big)]));
    c.write(headers(3, 0, &b[..3000])).await;
    c.write(continuation(3, END_HEADERS, &b[3000..])).await;
    let r = c.response(3).await;
    assert_eq!(r.status, 431, "{r:?}");
    c.assert_ok(5).await;
    assert_eq!(s.up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_concurrent_streams_are_refused() {
    // An h2c upstream: the 1024 held requests share one connection to it.
    let s = Setup::with(|c| {
        c.stable.protocol = UpstreamProtocol::Http2;
    })
    .await;
    let gate = s.gate();
    let mut c = s.client().await;
    let mut burst = Vec::new();
    for i in 0..1025u32 {
        burst.extend_from_slice(&get_on(2 * i + 1, "/").bytes());
    }
    c.send(&burst).await;
    // RFC 9113 §5.1.2: PROTOCOL_ERROR or REFUSED_STREAM.
    let last = 2 * 1024 + 1;
    loop {
        let f = c.expect_frame("the 1025th stream refused").await;
        match f.kind {
            RST_STREAM => {
                assert_eq!(f.stream, last, "{:?}", c.seen);
                let code = f.error_code();
                assert!(
                    code == REFUSED_STREAM || code == PROTOCOL_ERROR,
                    "{:?}",
                    c.seen
                );
                break;
            }
            GOAWAY | HEADERS | DATA => panic!("{:?}", c.seen),
            _ => {}
        }
    }
    // Once the upstream answers, the 1024 streams finish, and a new one
    // is served.
    gate.open();
    let mut done = 0;
    while done < 1024 {
        let f = c.expect_frame("the 1024 responses").await;
        match f.kind {
            GOAWAY | RST_STREAM => panic!("{:?}", c.seen),
            HEADERS | DATA if f.has(END_STREAM) => done += 1,
            _ => {}
        }
    }
    c.assert_ok(last + 2).await;
}

// === flow control: the server's sending ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_is_sent_within_the_clients_stream_window() {
    const SIZE: usize = 150_000;
    let s = Setup::start().await;
    let mut c = H2::handshake(s.addr(), &[(SETTINGS_INITIAL_WINDOW_SIZE, 1000)]).await;
    // The connection's window is no limit here.
    c.write(window_update(0, 10_000_000)).await;
    c.send_get(1, &format!("/download/{SIZE}")).await;
    // What the client lets the server send: the initial window (changed by
    // SETTINGS on the way), plus every WINDOW_UPDATE.
    let mut initial: i64 = 1000;
    let mut updates: i64 = 0;
    // Each step, when the server has used its window up: a SETTINGS that
    // shrinks it below zero, a WINDOW_UPDATE that leaves it at 100, a
    // SETTINGS that grows it, then WINDOW_UPDATEs.
    let mut script = vec![(SETTINGS, 500u32), (WINDOW_UPDATE, 600), (SETTINGS, 16_384)].into_iter();
    let mut received: i64 = 0;
    let mut headers = false;
    let mut steps = 0;
    loop {
        while received >= initial + updates {
            steps += 1;
            assert!(steps < 100, "{:?}", c.seen);
            match script.next() {
                Some((SETTINGS, value)) => {
                    initial = i64::from(value);
                    c.write(settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, value)]))
                        .await;
                }
                Some((_, increment)) => {
                    updates += i64::from(increment);
                    c.write(window_update(1, increment)).await;
                }
                None => {
                    let increment = 2 * (initial + updates).min(40_000) as u32;
                    updates += i64::from(increment);
                    c.write(window_update(1, increment)).await;
                }
            }
        }
        let f = c.expect_frame("the response").await;
        match f.kind {
            HEADERS => {
                assert_eq!(f.stream, 1);
                assert!(!f.has(END_STREAM));
                assert_eq!(decode_block(&f.payload)[0].1, "200");
                headers = true;
            }
            DATA => {
                assert!(headers);
                assert!(f.payload.len() <= DEFAULT_MAX_FRAME, "{f:?}");
                received += f.payload.len() as i64;
                assert!(
                    received <= initial + updates,
                    "{received} bytes sent, {} allowed: {:?}",
                    initial + updates,
                    c.seen
                );
                if f.has(END_STREAM) {
                    break;
                }
            }
            SETTINGS | WINDOW_UPDATE | PING => {}
            _ => panic!("{:?}", c.seen),
        }
    }
    assert_eq!(received, SIZE as i64);
    assert!(steps >= 4, "the script ran: {steps} steps");
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_share_the_connection_window() {
    const SIZE: i64 = 100_000;
    let s = Setup::start().await;
    // Streams may take a lot; the connection's 65 535 bytes are the limit.
    let mut c = H2::handshake(s.addr(), &[(SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]).await;
    c.send_get(1, &format!("/download/{SIZE}")).await;
    c.send_get(3, &format!("/download/{SIZE}")).await;
    let mut allowed = i64::from(DEFAULT_WINDOW);
    let mut received = [0i64; 2];
    let mut ended = [false; 2];
    let mut updates = 0;
    while ended != [true, true] {
        if received[0] + received[1] >= allowed {
            updates += 1;
            assert!(updates < 50, "{:?}", c.seen);
            c.write(window_update(0, 20_000)).await;
            allowed += 20_000;
        }
        let f = c.expect_frame("the responses").await;
        match f.kind {
            DATA => {
                let i = match f.stream {
                    1 => 0,
                    3 => 1,
                    _ => panic!("{:?}", c.seen),
                };
                received[i] += f.payload.len() as i64;
                assert!(
                    received[0] + received[1] <= allowed,
                    "{received:?} sent, {allowed} allowed: {:?}",
                    c.seen
                );
                ended[i] = f.has(END_STREAM);
            }
            HEADERS | SETTINGS | WINDOW_UPDATE => {}
            _ => panic!("{:?}", c.seen),
        }
    }
    assert_eq!(received, [SIZE, SIZE]);
    assert!(updates >= 7, "{updates} connection WINDOW_UPDATEs needed");
}

// === flow control: the server's receiving ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_larger_than_both_windows_gets_credit_back_as_it_is_consumed() {
    const SIZE: usize = 3 << 20;
    let s = Setup::start().await;
    let mut c = s.client().await;
    assert_eq!((c.send_window, c.stream_window), (1 << 20, 1 << 20));
    c.write(headers(1, END_HEADERS, &post("/upload", Some("3145728"))))
        .await;
    let chunk = vec![b'x'; DEFAULT_MAX_FRAME];
    let mut sent = 0;
    let mut credits = (0u32, 0u32);
    let mut waits = 0;
    while sent < SIZE {
        let n = (SIZE - sent)
            .min(DEFAULT_MAX_FRAME)
            .min(c.send_window.max(0) as usize)
            .min(c.stream_window.max(0) as usize);
        if n > 0 {
            let end = if sent + n == SIZE { END_STREAM } else { 0 };
            c.write(data(1, end, &chunk[..n])).await;
            sent += n;
            c.send_window -= n as i64;
            c.stream_window -= n as i64;
            continue;
        }
        // Both windows used up: only the server's credit lets us go on.
        waits += 1;
        assert!(waits < 1000, "{:?}", c.seen);
        let f = c.expect_frame("a WINDOW_UPDATE").await;
        match f.kind {
            WINDOW_UPDATE => {
                let increment = u32_at(&f.payload);
                assert!(increment > 0);
                match f.stream {
                    0 => {
                        c.send_window += i64::from(increment);
                        credits.0 += increment;
                    }
                    1 => {
                        c.stream_window += i64::from(increment);
                        credits.1 += increment;
                    }
                    _ => panic!("{:?}", c.seen),
                }
            }
            RST_STREAM | GOAWAY | HEADERS => panic!("{:?}", c.seen),
            _ => {}
        }
    }
    let r = c.response(1).await;
    assert_eq!((r.status, r.text()), (200, format!("received {SIZE}")));
    assert!(credits.0 >= 2 << 20, "{credits:?}");
    assert!(credits.1 >= 2 << 20, "{credits:?}");
    assert_eq!(s.up.uploaded(), SIZE as u64);
    // The connection goes on.
    c.write(headers(3, END_HEADERS, &post("/upload", None)))
        .await;
    c.write(data(3, END_STREAM, b"more")).await;
    assert_eq!(c.response(3).await.text(), "received 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypers_client_uploads_a_body_larger_than_both_windows() {
    const SIZE: u64 = 3 << 20;
    let s = Setup::start().await;
    let client = h2c_client();
    let req = Request::post(format!("http://{}/upload", s.addr()))
        .body(http_body_util::Either::Right(TestBody::generated(SIZE)))
        .unwrap();
    let a = tokio::time::timeout(Duration::from_secs(30), send(&client, req))
        .await
        .expect("the upload within 30 s");
    assert_eq!(a.version, http::Version::HTTP_2);
    assert_eq!(
        (a.status, a.body),
        (StatusCode::OK, format!("received {SIZE}"))
    );
    assert_eq!(s.up.uploaded(), SIZE);
}

// === end to end ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams_on_one_connection_are_all_answered() {
    let s = Setup::start().await;
    let tcp = TcpStream::connect(s.addr()).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let base = format!("http://{}", s.addr());
    let answers = join_all((0..100).map(|i| {
        let mut sender = sender.clone();
        let url = format!("{base}/echo-headers");
        async move {
            let req = Request::get(url)
                .header("x-stream-no", i.to_string())
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, status, String::from_utf8_lossy(&body).into_owned())
        }
    }));
    let answers = tokio::time::timeout(Duration::from_secs(30), answers)
        .await
        .expect("100 answers within 30 s");
    for (i, status, body) in answers {
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(&format!("x-stream-no: {i}\n")), "{i}: {body}");
    }
    assert_eq!(s.up.requests(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_cancels_the_upstream_request() {
    let s = Setup::start().await;
    s.up.set(Behavior {
        delay: Duration::from_secs(300),
        ..Behavior::default()
    });
    let mut c = s.client().await;
    c.send_get(1, "/slow").await;
    s.upstream_received(1).await;
    c.write(rst(1, CANCEL)).await;
    eventually(WAIT, "the proxy dropped the upstream request", || async {
        s.up.cancelled() == 1
    })
    .await;
    let stats = s.proxy.stats();
    eventually(WAIT, "the request counted as abandoned", || async {
        stats.totals(Target::Stable).abandoned == 1
    })
    .await;
    let totals = stats.totals(Target::Stable);
    assert_eq!((totals.successes, totals.errors), (0, 0), "{totals:?}");
    // The connection goes on; frames on the reset stream are not an error.
    s.up.set(Behavior::default());
    c.write(window_update(1, 100)).await;
    c.write(priority(1, 0)).await;
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_on_a_stream_reset_100_resets_ago_are_ignored() {
    // serin remembers as many of its resets as streams may be open: the
    // rest of a request it reset long ago is not a connection error, and
    // gets no RST_STREAM either.
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut requests = uppercase_requests(100);
    // Streams 1 and 3 have more to come: a body on 1, trailers on 3 (each
    // on a stream of its own: an RST_STREAM for the one would make serin
    // remember it anew for the other).
    requests[0].flags = END_HEADERS;
    requests[1].flags = END_HEADERS;
    c.write_burst(&requests).await;
    c.expect_rst(199, PROTOCOL_ERROR).await;
    c.write(data(1, 0, b"late")).await;
    c.write(headers(
        3,
        END_STREAM | END_HEADERS,
        &block(&[("x-trailer", "1")]),
    ))
    .await;
    c.assert_ok(201).await;
    // Frames on other streams than 201 were kept while its answer came.
    assert!(c.stash.iter().all(|f| f.stream > 3), "{:?}", c.seen);
    assert_eq!(s.up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_upload_breaks_off_the_upstream_body() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.write(headers(1, END_HEADERS, &post("/upload", Some("100000"))))
        .await;
    c.write(data(1, 0, &[b'x'; 1000])).await;
    s.upstream_received(1).await;
    c.write(rst(1, CANCEL)).await;
    eventually(WAIT, "the upstream sees the upload break off", || async {
        s.up.aborted_uploads() == 1
    })
    .await;
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_finishes_the_stream_in_flight() {
    let s = Setup::start().await;
    let (mut c, gate) = s.held(&[1]).await;
    let Setup { proxy, up } = s;
    proxy.shutdown();
    assert_eq!(c.expect_goaway(NO_ERROR).await, 1, "{:?}", c.seen);
    // A stream opened after the GOAWAY is not served.
    c.send_get(3, "/").await;
    gate.open();
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
    let after = c.read_to_close().await;
    assert!(
        after.iter().all(|f| f.stream != 3),
        "stream 3 was served after the GOAWAY: {:?}",
        c.seen
    );
    tokio::time::timeout(WAIT, proxy.wait())
        .await
        .expect("the proxy stops once the stream is done");
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_an_idle_connection_with_goaway() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.assert_ok(1).await;
    let Setup { proxy, up: _up } = s;
    proxy.shutdown();
    assert_eq!(c.expect_goaway(NO_ERROR).await, 1, "{:?}", c.seen);
    c.expect_closed().await;
    tokio::time::timeout(WAIT, proxy.wait())
        .await
        .expect("the proxy stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_goaway_lets_streams_in_flight_finish_then_closes() {
    let s = Setup::start().await;
    let (mut c, gate) = s.held(&[1, 3]).await;
    c.write(goaway(0, NO_ERROR)).await;
    gate.open();
    for stream in [1, 3] {
        let r = c.response(stream).await;
        assert_eq!((r.status, r.text().as_str()), (200, "stable"));
    }
    let rest = c.read_to_close().await;
    assert!(
        rest.iter().all(|f| f.kind != HEADERS && f.kind != DATA),
        "{:?}",
        c.seen
    );
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_the_proxys_fields_and_no_connection_specific_ones() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    let r = c.response(1).await;
    assert_eq!(r.field("x-serin-upstream"), Some("stable"), "{r:?}");
    assert_eq!(r.field("content-length"), Some("6"), "{r:?}");
    for name in ["connection", "keep-alive", "transfer-encoding", "upgrade"] {
        assert!(r.field(name).is_none(), "{name} in {r:?}");
    }
    let id = r.field("x-request-id").expect("a request id").to_string();
    // The upstream got the request as HTTP/1.1 with a Host from :authority.
    c.send_get(3, "/echo-headers").await;
    let r = c.response(3).await;
    assert!(r.text().contains("host: localhost\n"), "{}", r.text());
    assert_ne!(r.field("x-request-id"), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_upstreams_field_names_reach_the_client_in_lowercase() {
    // HTTP/1.1 names are case-insensitive and servers (nginx among them)
    // send `Content-Type`; HTTP/2 forbids uppercase (RFC 9113 §8.2.1), and
    // a client treats such a response as malformed.
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nServer: Upstream\r\n\
        Content-Type: text/plain\r\nConnection: keep-alive, X-Hop\r\n\
        Keep-Alive: timeout=5\r\nX-Hop: dropped\r\nX-Mixed-Case: Value\r\n\
        X-REQUEST-ID: from-upstream\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf).await {
                    head.extend_from_slice(&buf[..n]);
                    // Bodiless GETs: a request ends at its blank line.
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        if conn.write_all(ANSWER).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let config = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Upstream::parse(&format!("http://{upstream}"), UpstreamProtocol::Http1).unwrap(),
        Upstream::parse(&closed_port_url(), UpstreamProtocol::Http1).unwrap(),
    );
    let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
    let mut c = H2::handshake(proxy.local_addr(), &[]).await;
    for stream in [1, 3] {
        c.send_get(stream, "/").await;
        let r = c.response(stream).await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{r:?}");
        for (name, _) in &r.fields {
            assert_eq!(*name, name.to_ascii_lowercase(), "{r:?}");
        }
        assert_eq!(r.field("server"), Some("Upstream"), "{r:?}");
        assert_eq!(r.field("content-type"), Some("text/plain"), "{r:?}");
        assert_eq!(r.field("x-mixed-case"), Some("Value"), "{r:?}");
        assert_eq!(r.field("x-request-id"), Some("from-upstream"), "{r:?}");
        for name in ["connection", "keep-alive", "x-hop", "transfer-encoding"] {
            assert!(r.field(name).is_none(), "{name} in {r:?}");
        }
        // `content-type` by its static name index (31), not a literal name.
        assert!(
            r.head_block.windows(2).any(|w| w == [0x0f, 0x10]),
            "{:x?}",
            r.head_block
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_has_no_body() {
    // RFC 9113 §8.1.1: DATA of non-zero length in a response to HEAD is
    // malformed.
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut fields = get("/");
    fields[0].1 = "HEAD";
    c.write(headers(1, END_STREAM | END_HEADERS, &block(&fields)))
        .await;
    let r = c.response(1).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "{r:?}");
    assert_eq!(r.field("content-length"), Some("6"), "{r:?}");
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_end_the_stream_in_a_header_block() {
    let s = Setup::with(|c| c.stable.protocol = UpstreamProtocol::Http2).await;
    s.up.set(Behavior {
        grpc_status: Some(0),
        ..Behavior::default()
    });
    let mut c = s.client().await;
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/pkg.Service/Method"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    c.write(headers(1, END_HEADERS, &block(&fields))).await;
    c.write(data(1, END_STREAM, b"\0\0\0\0\0")).await;
    let r = c.response(1).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"\0\0\0\0\0");
    let trailers = r.trailers.expect("trailers");
    assert!(
        trailers.contains(&("grpc-status".into(), "0".into())),
        "{trailers:?}"
    );
}

// === TLS with ALPN h2 ===

/// A TLS connection offering ALPN `h2`.
async fn tls_connect(s: &Setup, cert: &TestCert) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = (*cert.client).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(s.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A raw client over TLS, ALPN `h2`, past the handshake.
async fn tls_client(s: &Setup, cert: &TestCert) -> H2 {
    let tls = tls_connect(s, cert).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut c = H2::over(Box::new(tls));
    c.start(&[]).await;
    c
}

async fn tls_setup(cert: &TestCert) -> Setup {
    Setup::with(|c| {
        c.tls = Some(serin_proxy::TlsFiles {
            cert: cert.cert_path.clone(),
            key: cert.key_path.clone(),
            client_auth: None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_alpn_h2_is_served_by_the_same_loop() {
    let cert = TestCert::generate();
    let s = tls_setup(&cert).await;
    let mut c = tls_client(&s, &cert).await;
    c.write(ping(0, *b"over tls")).await;
    c.send_get(1, "/echo-headers").await;
    let r = c.response(1).await;
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("x-forwarded-proto: https\n"),
        "{}",
        r.text()
    );
    assert!(
        c.seen.iter().any(|f| f.starts_with("PING flags=0x1")),
        "{:?}",
        c.seen
    );
    // A stream error, then a connection error, over TLS.
    c.write(headers(
        3,
        END_STREAM | END_HEADERS,
        &block(&get_with(&[("te", "gzip")])),
    ))
    .await;
    c.expect_rst(3, PROTOCOL_ERROR).await;
    c.assert_ok(5).await;
    c.write(window_update(0, 0)).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    let mut c = tls_client(&s, &cert).await;
    c.assert_ok(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_hypers_client_uploads_and_downloads() {
    const SIZE: u64 = 2 << 20;
    let cert = TestCert::generate();
    let s = tls_setup(&cert).await;
    let tls = tls_connect(&s, &cert).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let base = format!("https://localhost:{}", s.addr().port());
    let exchange = async {
        let req = Request::post(format!("{base}/upload"))
            .body(TestBody::generated(SIZE))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("received {SIZE}").as_bytes());
        let req = Request::get(format!("{base}/download/{SIZE}"))
            .body(TestBody::generated(0))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len() as u64, SIZE);
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("both exchanges within 30 s");
}
