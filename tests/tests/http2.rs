//! serin's own HTTP/2 server loop (`proxy/src/server/own_h2.rs`), asserted
//! on the wire, the way the h2spec conformance suite checks a server.
//!
//! Why it exists: every HTTP/2 client connection (h2c with prior knowledge,
//! or TLS with ALPN `h2`) is now served by serin's own frame loop, HPACK
//! decoder and request checks instead of hyper's. A real HTTP/2 client
//! never sends what a server has to refuse, so most of these tests drive
//! the loop with a raw-frame client that writes exact frames (header blocks
//! HPACK-encoded by hand, literals only) and reads exact frames back. Each
//! case states the outcome RFC 9113 (and RFC 7541 for HPACK) requires:
//!
//! - connection errors: a GOAWAY with the error code, then the connection
//!   closes, and the proxy still serves a new connection;
//! - stream errors: an RST_STREAM with the error code on that stream, and a
//!   later request on the same connection is still answered;
//! - what must work: CONTINUATION, padding, trailers, flow control both
//!   ways (windows that the server must respect, and credit it must give
//!   back as the upstream consumes a body), many concurrent streams, a client
//!   reset cancelling the upstream request, graceful shutdown and a
//!   client's GOAWAY, and all of it over TLS too.
//!
//! End-to-end cases use hyper's HTTP/2 client as well. Every wait is bounded
//! by [`WAIT`] and ends as soon as the expected frame arrives; nothing sleeps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
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
        self.up.set(Behavior {
            hold: Some(gate.clone()),
            ..Behavior::default()
        });
        gate
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

/// One frame as read off the wire.
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

    async fn start(&mut self, settings: &[(u16, u32)]) {
        self.send(PREFACE).await;
        self.settings(settings).await;
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
                    self.frame(SETTINGS, ACK, 0, &[]).await;
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

    async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.send(&frame_bytes(kind, flags, stream, payload)).await;
    }

    async fn settings(&mut self, values: &[(u16, u32)]) {
        let mut payload = Vec::new();
        for (id, value) in values {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        self.frame(SETTINGS, 0, 0, &payload).await;
    }

    async fn headers(&mut self, stream: u32, flags: u8, block: &[u8]) {
        self.frame(HEADERS, flags, stream, block).await;
    }

    async fn data(&mut self, stream: u32, flags: u8, data: &[u8]) {
        self.frame(DATA, flags, stream, data).await;
    }

    async fn window_update(&mut self, stream: u32, increment: u32) {
        self.frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
            .await;
    }

    async fn rst(&mut self, stream: u32, code: u32) {
        self.frame(RST_STREAM, 0, stream, &code.to_be_bytes()).await;
    }

    async fn ping(&mut self, flags: u8, data: [u8; 8]) {
        self.frame(PING, flags, 0, &data).await;
    }

    async fn priority(&mut self, stream: u32, depends_on: u32) {
        let mut payload = depends_on.to_be_bytes().to_vec();
        payload.push(15);
        self.frame(PRIORITY, 0, stream, &payload).await;
    }

    async fn goaway(&mut self, last: u32, code: u32) {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        self.frame(GOAWAY, 0, 0, &payload).await;
    }

    /// A GET of `path`, ending the stream with its head.
    async fn send_get(&mut self, stream: u32, path: &str) {
        self.headers(stream, END_STREAM | END_HEADERS, &block(&get(path)))
            .await;
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

    /// Reads until a GOAWAY (skipping other frames), asserts its code and
    /// returns its last stream id.
    async fn expect_goaway(&mut self, code: u32) -> u32 {
        loop {
            let f = self.expect_frame("a GOAWAY").await;
            if f.kind == GOAWAY {
                assert_eq!(
                    f.error_code(),
                    code,
                    "GOAWAY code: frames {:?}, debug data {:?}",
                    self.seen,
                    String::from_utf8_lossy(&f.payload[8..])
                );
                assert_eq!(f.stream, 0, "{:?}", self.seen);
                return u32_at(&f.payload) & MAX_WINDOW;
            }
        }
    }

    /// Reads until a GOAWAY (skipping other frames) and returns its code.
    async fn expect_goaway_any(&mut self) -> u32 {
        loop {
            let f = self.expect_frame("a GOAWAY").await;
            if f.kind == GOAWAY {
                assert_eq!(f.stream, 0, "{:?}", self.seen);
                return f.error_code();
            }
        }
    }

    /// The server closes the connection; no frame comes before it.
    async fn expect_closed(&mut self) {
        if let Some(f) = self.next().await {
            panic!("{f:?} instead of the connection closing: {:?}", self.seen);
        }
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
        loop {
            let f = self.expect_frame("an RST_STREAM").await;
            match f.kind {
                RST_STREAM if f.stream == stream => {
                    assert_eq!(f.error_code(), code, "RST_STREAM code: {:?}", self.seen);
                    return;
                }
                GOAWAY => panic!(
                    "a connection error instead of a stream error: {:?}",
                    self.seen
                ),
                HEADERS | DATA if f.stream == stream => {
                    panic!("stream {stream} answered instead of reset: {:?}", self.seen)
                }
                _ => {}
            }
        }
    }

    /// Reads the response on `stream` (head, body, trailers), giving the
    /// server back the credit of every DATA frame as a client would. Other
    /// streams' frames are skipped; a GOAWAY with NO_ERROR is allowed.
    async fn response(&mut self, stream: u32) -> Resp {
        let mut block = Vec::new();
        let mut head: Option<Vec<(String, String)>> = None;
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
                    let fields = decode_block(&std::mem::take(&mut block));
                    if head.is_none() {
                        head = Some(fields);
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
                        self.window_update(0, n).await;
                    }
                    if f.has(END_STREAM) {
                        break;
                    }
                    if n > 0 {
                        self.window_update(stream, n).await;
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

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Just a frame header announcing `len` bytes of payload.
fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut out = (len as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out
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

// === the server's first frames ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_starts_with_its_settings_and_a_larger_connection_window() {
    let s = Setup::with(|c| c.max_header_bytes = 20_000).await;
    let mut c = H2::connect(s.addr()).await;
    c.send(PREFACE).await;
    c.settings(&[]).await;
    let first = c.expect_frame("the server's SETTINGS").await;
    assert_eq!((first.kind, first.flags, first.stream), (SETTINGS, 0, 0));
    let settings: Vec<(u16, u32)> = first
        .payload
        .chunks(6)
        .map(|e| (u16::from_be_bytes([e[0], e[1]]), u32_at(&e[2..])))
        .collect();
    for want in [
        (SETTINGS_MAX_CONCURRENT_STREAMS, 1024),
        (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
        (SETTINGS_MAX_HEADER_LIST_SIZE, 20_000),
    ] {
        assert!(settings.contains(&want), "{want:?} not in {settings:?}");
    }
    let second = c.expect_frame("a WINDOW_UPDATE").await;
    assert_eq!(
        (second.kind, second.stream),
        (WINDOW_UPDATE, 0),
        "{second:?}"
    );
    assert_eq!(u32_at(&second.payload), (1 << 20) - DEFAULT_WINDOW);
    // Our SETTINGS is acknowledged, and a request is served.
    loop {
        let f = c.expect_frame("the SETTINGS ACK").await;
        if f.kind == SETTINGS && f.has(ACK) {
            assert!(f.payload.is_empty());
            break;
        }
    }
    c.frame(SETTINGS, ACK, 0, &[]).await;
    c.assert_ok(1).await;
}

// === connection errors: the preface and SETTINGS ===

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
async fn a_first_frame_other_than_settings_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = H2::connect(s.addr()).await;
    c.send(PREFACE).await;
    c.ping(0, *b"12345678").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_ack_as_the_first_frame_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = H2::connect(s.addr()).await;
    c.send(PREFACE).await;
    c.frame(SETTINGS, ACK, 0, &[]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_with_a_length_not_a_multiple_of_6_is_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0]).await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_ack_with_a_payload_is_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(SETTINGS, ACK, 0, &[0, 3, 0, 0, 0, 100]).await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_on_a_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(SETTINGS, 0, 1, &[]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_window_size_above_the_maximum_is_a_flow_control_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW + 1)])
        .await;
    c.expect_connection_error(FLOW_CONTROL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_frame_size_below_the_default_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.settings(&[(SETTINGS_MAX_FRAME_SIZE, 16_383)]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_frame_size_above_2_pow_24_minus_1_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.settings(&[(SETTINGS_MAX_FRAME_SIZE, 1 << 24)]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_push_other_than_0_or_1_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // 0 and 1 are fine (and acknowledged); unknown settings are ignored.
    c.settings(&[(SETTINGS_ENABLE_PUSH, 0), (0x99, 7)]).await;
    loop {
        let f = c.expect_frame("a SETTINGS ACK").await;
        if f.kind == SETTINGS && f.has(ACK) {
            break;
        }
    }
    c.settings(&[(SETTINGS_ENABLE_PUSH, 2)]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

// === connection errors: PING, frame size, GOAWAY, PUSH_PROMISE ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_is_answered_with_the_same_bytes() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // A PING ACK from the client is not answered: the first PING back is
    // the answer to the second.
    c.ping(ACK, *b"no reply").await;
    c.ping(0, *b"\x00\x01\x02\x03\xfc\xfd\xfe\xff").await;
    loop {
        let f = c.expect_frame("a PING ACK").await;
        if f.kind == PING {
            assert_eq!((f.flags, f.stream), (ACK, 0), "{:?}", c.seen);
            assert_eq!(f.payload, b"\x00\x01\x02\x03\xfc\xfd\xfe\xff");
            break;
        }
    }
    c.assert_ok(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_of_another_length_is_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(PING, 0, 0, b"1234567").await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_on_a_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(PING, 0, 1, b"12345678").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_larger_than_the_max_frame_size_is_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // Only the header: the server must refuse on the length alone (and
    // leaves no unread payload behind to turn its close into a reset).
    c.send(&frame_header(
        DEFAULT_MAX_FRAME + 1,
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
    ))
    .await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_frame_of_exactly_the_max_frame_size_is_accepted() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_HEADERS, &post("/upload", Some("16384")))
        .await;
    c.data(1, END_STREAM, &[b'x'; DEFAULT_MAX_FRAME]).await;
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "received 16384"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_promise_from_the_client_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    c.response(1).await;
    let mut payload = 2u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&block(&get("/")));
    c.frame(PUSH_PROMISE, END_HEADERS, 1, &payload).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_on_a_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(GOAWAY, 0, 1, &[0; 8]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frame_types_are_ignored() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(0x42, 0xff, 0, b"whatever").await;
    c.frame(0xfa, 0, 1, b"on an idle stream").await;
    c.assert_ok(1).await;
    c.frame(0x42, 0, 1, b"on a closed stream").await;
    c.assert_ok(3).await;
}

// === connection errors: HEADERS, CONTINUATION, HPACK ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_stream_0_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.send_get(0, "/").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_an_even_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.send_get(2, "/").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_a_stream_below_one_already_used_is_a_connection_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.assert_ok(5).await;
    c.send_get(3, "/").await;
    // RFC 9113 §5.1.1 asks for PROTOCOL_ERROR; stream 3 is also closed
    // (§5.1.1: implicitly, by the use of 5), where §5.1 allows STREAM_CLOSED.
    let code = c.expect_goaway_any().await;
    assert!(
        code == PROTOCOL_ERROR || code == STREAM_CLOSED,
        "GOAWAY code {code:#x}: {:?}",
        c.seen
    );
    c.expect_closed().await;
    assert_eq!(s.up.requests(), 1);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_a_closed_stream_is_a_stream_closed_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.assert_ok(1).await;
    c.send_get(1, "/").await;
    // RFC 9113 §5.1, "closed": a stream error or a connection error of type
    // STREAM_CLOSED.
    let served = loop {
        let f = c.expect_frame("an error for stream 1").await;
        match f.kind {
            GOAWAY => {
                assert_eq!(f.error_code(), STREAM_CLOSED, "{:?}", c.seen);
                c.expect_closed().await;
                break 1;
            }
            RST_STREAM if f.stream == 1 => {
                assert_eq!(f.error_code(), STREAM_CLOSED, "{:?}", c.seen);
                c.assert_ok(3).await;
                break 2;
            }
            HEADERS | DATA => panic!("a closed stream answered: {:?}", c.seen),
            _ => {}
        }
    };
    assert_eq!(
        s.up.requests(),
        served,
        "the second HEADERS reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_interrupted_by_another_frame_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let b = block(&get("/"));
    c.headers(1, END_STREAM, &b[..4]).await;
    c.priority(3, 0).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_interrupted_by_an_unknown_frame_is_a_protocol_error() {
    // RFC 9113 §6.10: any frame other than CONTINUATION, unknown types too.
    let s = Setup::start().await;
    let mut c = s.client().await;
    let b = block(&get("/"));
    c.headers(1, END_STREAM, &b[..4]).await;
    c.frame(0x42, 0, 1, b"extension").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_on_another_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let b = block(&get("/"));
    c.headers(1, END_STREAM, &b[..4]).await;
    c.frame(CONTINUATION, END_HEADERS, 3, &b[4..]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_without_headers_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(CONTINUATION, END_HEADERS, 1, &block(&get("/")))
        .await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_after_end_headers_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let gate = s.gate();
    c.send_get(1, "/").await;
    c.frame(CONTINUATION, END_HEADERS, 1, &block(&[("x-a", "b")]))
        .await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    gate.open();
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_index_0_is_a_compression_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut b = block(&get("/"));
    b.push(0x80);
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    c.expect_connection_error(COMPRESSION_ERROR).await;
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_index_past_both_tables_is_a_compression_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut b = block(&get("/"));
    b.push(0x80 | 70); // nothing in the dynamic table: 62 is already past it
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    c.expect_connection_error(COMPRESSION_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_hpack_block_is_a_compression_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut b = block(&get("/"));
    b.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 10, b'v']); // value cut short
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    c.expect_connection_error(COMPRESSION_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_table_size_update_above_the_limit_is_a_compression_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // A size update to 4097 (RFC 7541 §6.3: above SETTINGS_HEADER_TABLE_SIZE).
    let mut b = Vec::new();
    encode_int(&mut b, 5, 0x20, 4097);
    b.extend_from_slice(&block(&get("/")));
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    c.expect_connection_error(COMPRESSION_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_table_size_update_after_a_field_is_a_compression_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // RFC 7541 §4.2: a size update must come at the start of a block.
    let mut b = block(&get("/"));
    encode_int(&mut b, 5, 0x20, 100);
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    c.expect_connection_error(COMPRESSION_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpack_dynamic_table_carries_over_between_requests() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // Request 1 adds `x-team: blue` to the table (literal with incremental
    // indexing, new name): it becomes index 62.
    let mut b = block(&get("/echo-headers"));
    b.push(0x40);
    encode_str(&mut b, "x-team");
    encode_str(&mut b, "blue");
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    let r = c.response(1).await;
    assert!(r.text().contains("x-team: blue\n"), "{}", r.text());
    // Request 2 refers to it by index, and to a size update first.
    let mut b = Vec::new();
    encode_int(&mut b, 5, 0x20, 4096);
    b.extend_from_slice(&block(&get("/echo-headers")));
    b.push(0x80 | 62);
    c.headers(3, END_STREAM | END_HEADERS, &b).await;
    let r = c.response(3).await;
    assert!(r.text().contains("x-team: blue\n"), "{}", r.text());
}

// === connection errors: DATA, WINDOW_UPDATE, RST_STREAM, PRIORITY ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_stream_0_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.data(0, 0, b"hello").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_an_idle_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.data(1, END_STREAM, b"hello").await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_update_of_0_on_the_connection_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.window_update(0, 0).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_window_above_the_maximum_is_a_flow_control_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.window_update(0, MAX_WINDOW - DEFAULT_WINDOW).await; // exactly the maximum
    c.assert_ok(1).await;
    c.window_update(0, 1).await;
    c.expect_connection_error(FLOW_CONTROL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_update_of_another_length_is_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1]).await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_update_on_an_idle_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.window_update(1, 100).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_stream_on_stream_0_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.rst(0, CANCEL).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_stream_on_an_idle_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.assert_ok(1).await;
    c.rst(3, CANCEL).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rst_stream_of_another_length_is_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let gate = s.gate();
    c.send_get(1, "/").await;
    c.frame(RST_STREAM, 0, 1, &[0, 0, 0, 8, 0]).await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    gate.open();
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_on_stream_0_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.priority(0, 1).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_frames_are_accepted_on_idle_and_closed_streams() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.priority(3, 0).await;
    c.priority(9, 3).await;
    c.assert_ok(1).await;
    c.priority(1, 0).await;
    c.assert_ok(3).await;
}

// === padding ===

/// `data` padded with `pad` zero bytes (the PADDED flag's layout).
fn padded(data: &[u8], pad: u8) -> Vec<u8> {
    let mut out = vec![pad];
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0, usize::from(pad)));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_headers_and_padded_data_are_served() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(
        1,
        END_STREAM | END_HEADERS | PADDED,
        &padded(&block(&get("/")), 20),
    )
    .await;
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
    // HEADERS with padding and priority fields, then padded DATA frames
    // (one of nothing but padding).
    let mut fields = 0u32.to_be_bytes().to_vec();
    fields.push(200);
    fields.extend_from_slice(&post("/upload", Some("11")));
    c.headers(3, END_HEADERS | PADDED | PRIORITY_FLAG, &padded(&fields, 7))
        .await;
    c.data(3, PADDED, &padded(b"hello", 100)).await;
    c.data(3, PADDED, &padded(b"", 5)).await;
    c.data(3, PADDED | END_STREAM, &padded(b" world", 0)).await;
    let r = c.response(3).await;
    assert_eq!((r.status, r.text().as_str()), (200, "received 11"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_padding_as_long_as_the_payload_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let b = block(&get("/"));
    let mut payload = vec![b.len() as u8 + 1];
    payload.extend_from_slice(&b);
    c.headers(1, END_STREAM | END_HEADERS | PADDED, &payload)
        .await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    assert_eq!(s.up.requests(), 0);
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_padding_as_long_as_the_payload_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let gate = s.gate();
    c.headers(1, END_HEADERS, &post("/upload", None)).await;
    c.data(1, PADDED, &[5, 0, 0, 0, 0]).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    gate.open();
    s.still_serves().await;
}

// === CONTINUATION that works ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_split_over_headers_and_two_continuations_is_served() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let b = block(&get_with(&[("x-split", "across three frames")]));
    let (one, rest) = b.split_at(5);
    let (two, three) = rest.split_at(rest.len() / 2);
    c.headers(1, END_STREAM, one).await;
    c.frame(CONTINUATION, 0, 1, two).await;
    c.frame(CONTINUATION, END_HEADERS, 1, three).await;
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
    // An empty CONTINUATION is a fragment like any other.
    let b = block(&get("/echo-headers"));
    c.headers(3, END_STREAM, &b).await;
    c.frame(CONTINUATION, 0, 3, &[]).await;
    c.frame(CONTINUATION, END_HEADERS, 3, &block(&[("x-split", "yes")]))
        .await;
    let r = c.response(3).await;
    assert!(r.text().contains("x-split: yes\n"), "{}", r.text());
}

// === stream errors: malformed requests (RFC 9113 §8.1.1) ===

/// `fields` as a request on stream 1 is reset with PROTOCOL_ERROR, never
/// reaches the upstream, and the connection serves stream 3.
async fn assert_malformed(fields: &[(&str, &str)]) {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_STREAM | END_HEADERS, &block(fields)).await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    c.assert_ok(3).await;
    assert_eq!(
        s.up.requests(),
        1,
        "the malformed request reached the upstream"
    );
}

macro_rules! malformed {
    ($($(#[$meta:meta])* $name:ident: $fields:expr;)*) => {$(
        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            assert_malformed(&$fields).await;
        }
    )*};
}

malformed! {
    malformed_an_uppercase_field_name: get_with(&[("X-Upper", "1")]);
    malformed_a_connection_field: get_with(&[("connection", "keep-alive")]);
    malformed_a_transfer_encoding_field: get_with(&[("transfer-encoding", "chunked")]);
    malformed_an_upgrade_field: get_with(&[("upgrade", "websocket")]);
    malformed_a_keep_alive_field: get_with(&[("keep-alive", "timeout=5")]);
    malformed_a_proxy_connection_field: get_with(&[("proxy-connection", "keep-alive")]);
    malformed_te_other_than_trailers: get_with(&[("te", "gzip")]);
    malformed_a_pseudo_header_after_a_regular_field: [
        (":method", "GET"),
        (":scheme", "http"),
        ("x-a", "1"),
        (":path", "/"),
    ];
    malformed_an_unknown_pseudo_header: get_with(&[(":foo", "bar")]);
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
    malformed_an_empty_path: [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", ""),
        (":authority", "localhost"),
    ];
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
    malformed_a_value_with_leading_whitespace: get_with(&[("x-a", " v")]);
    malformed_a_value_with_trailing_whitespace: get_with(&[("x-a", "v\t")]);
    malformed_a_value_with_cr_lf: get_with(&[("x-a", "v\r\nx-injected: 1")]);
    malformed_a_value_with_nul: get_with(&[("x-a", "v\0w")]);
    malformed_a_field_name_with_a_space: get_with(&[("x a", "1")]);
    malformed_an_empty_field_name: get_with(&[("", "1")]);
    malformed_two_different_content_lengths: get_with(&[
        ("content-length", "0"),
        ("content-length", "1"),
    ]);
    malformed_a_content_length_that_is_not_a_number: get_with(&[("content-length", "1x")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_is_allowed() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let fields = get_with(&[("te", "trailers")]);
    c.headers(1, END_STREAM | END_HEADERS, &block(&fields))
        .await;
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
}

/// A request refused on stream 1: reset with PROTOCOL_ERROR or answered
/// 400 by serin; either way it never reaches the upstream, and the
/// connection serves stream 3.
async fn assert_refused(fields: &[(&str, &str)]) {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_STREAM | END_HEADERS, &block(fields)).await;
    loop {
        let f = c.expect_frame("a refusal on stream 1").await;
        match f.kind {
            RST_STREAM if f.stream == 1 => {
                assert_eq!(f.error_code(), PROTOCOL_ERROR, "{:?}", c.seen);
                break;
            }
            HEADERS if f.stream == 1 => {
                let status = &decode_block(&f.payload)[0].1;
                assert_eq!(status, "400", "{:?}", c.seen);
                break;
            }
            GOAWAY => panic!("{:?}", c.seen),
            _ => {}
        }
    }
    c.assert_ok(3).await;
    assert_eq!(
        s.up.requests(),
        1,
        "the invalid request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_an_asterisk_path_on_a_get() {
    assert_refused(&get("*")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_an_authority_with_userinfo() {
    assert_refused(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "user:pw@localhost"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_an_authority_with_a_port_that_is_not_a_number() {
    assert_refused(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "localhost:notaport"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_asterisk_is_served() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let fields = [
        (":method", "OPTIONS"),
        (":scheme", "http"),
        (":path", "*"),
        (":authority", "localhost"),
    ];
    c.headers(1, END_STREAM | END_HEADERS, &block(&fields))
        .await;
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_fields_are_joined_for_the_upstream() {
    // RFC 9113 §8.2.3: split cookie fields are joined with "; " before
    // they go to an HTTP/1.1 upstream.
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut fields = get("/echo-headers");
    fields.extend([("cookie", "a=1"), ("x-other", "x"), ("cookie", "b=2")]);
    c.headers(1, END_STREAM | END_HEADERS, &block(&fields))
        .await;
    let r = c.response(1).await;
    assert!(r.text().contains("cookie: a=1; b=2\n"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpack_table_stays_in_step_after_refused_requests() {
    let s = Setup::with(|c| c.max_header_bytes = 4096).await;
    let mut c = s.client().await;
    // Stream 1 is malformed (an uppercase name) and adds `x-first: 1` to
    // the table; stream 3 is too large (431) and adds `x-second: 2`.
    let mut b = block(&get_with(&[("X-Upper", "1")]));
    b.push(0x40);
    encode_str(&mut b, "x-first");
    encode_str(&mut b, "1");
    c.headers(1, END_STREAM | END_HEADERS, &b).await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    let big = "a".repeat(6000);
    let mut b = block(&get_with(&[("x-big", &big)]));
    b.push(0x40);
    encode_str(&mut b, "x-second");
    encode_str(&mut b, "2");
    c.headers(3, END_STREAM | END_HEADERS, &b).await;
    assert_eq!(c.response(3).await.status, 431);
    // Both entries are there, newest first (RFC 7541 §2.3.3).
    let mut b = block(&get("/echo-headers"));
    b.push(0x80 | 62);
    b.push(0x80 | 63);
    c.headers(5, END_STREAM | END_HEADERS, &b).await;
    let r = c.response(5).await;
    assert!(r.text().contains("x-first: 1\n"), "{}", r.text());
    assert!(r.text().contains("x-second: 2\n"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_flight_after_the_server_reset_a_stream_are_ignored() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    // All of it written before reading anything: the DATA of 5 bytes
    // breaks the content-length of 3, so serin resets stream 1 while the
    // rest is on its way.
    let mut burst = frame_bytes(HEADERS, END_HEADERS, 1, &post("/upload", Some("3")));
    burst.extend(frame_bytes(DATA, 0, 1, b"hello"));
    burst.extend(frame_bytes(DATA, 0, 1, b"more"));
    burst.extend(frame_bytes(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block(&[("x-trailer", "1")]),
    ));
    c.send(&burst).await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    // The connection goes on (an RST_STREAM for what was ignored is
    // tolerated here; a GOAWAY is not).
    c.assert_ok(3).await;
}

// === stream errors: bodies and trailers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_data_than_the_content_length_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_HEADERS, &post("/upload", Some("3"))).await;
    c.data(1, END_STREAM, b"hello").await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn less_data_than_the_content_length_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_HEADERS, &post("/upload", Some("10")))
        .await;
    c.data(1, 0, b"hel").await;
    c.data(1, END_STREAM, b"lo").await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_with_end_stream_on_the_headers_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_STREAM | END_HEADERS, &post("/upload", Some("5")))
        .await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    // A content-length of 0 with END_STREAM is consistent.
    c.headers(3, END_STREAM | END_HEADERS, &post("/upload", Some("0")))
        .await;
    let r = c.response(3).await;
    assert_eq!((r.status, r.text().as_str()), (200, "received 0"));
    assert_eq!(s.up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_are_passed_on_with_the_body() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_HEADERS, &post("/upload", Some("5"))).await;
    c.data(1, 0, b"hello").await;
    c.headers(
        1,
        END_STREAM | END_HEADERS,
        &block(&[("x-checksum", "abc")]),
    )
    .await;
    let r = c.response(1).await;
    assert_eq!((r.status, r.text().as_str()), (200, "received 5"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_without_end_stream_are_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let gate = s.gate();
    c.headers(1, END_HEADERS, &post("/upload", None)).await;
    c.data(1, 0, b"hi").await;
    c.headers(1, END_HEADERS, &block(&[("x-checksum", "abc")]))
        .await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    gate.open();
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pseudo_header_in_trailers_is_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let gate = s.gate();
    c.headers(1, END_HEADERS, &post("/upload", None)).await;
    c.data(1, 0, b"hi").await;
    c.headers(1, END_STREAM | END_HEADERS, &block(&[(":path", "/x")]))
        .await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    gate.open();
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_the_client_ended_the_stream_is_stream_closed() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    s.upstream_received(1).await;
    c.data(1, END_STREAM, b"late").await;
    c.expect_rst(1, STREAM_CLOSED).await;
    gate.open();
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_after_the_client_ended_the_stream_are_stream_closed() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    s.upstream_received(1).await;
    c.headers(1, END_STREAM | END_HEADERS, &block(&[("x-late", "1")]))
        .await;
    c.expect_rst(1, STREAM_CLOSED).await;
    gate.open();
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_a_closed_stream_is_stream_closed() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.assert_ok(1).await;
    c.data(1, END_STREAM, b"late").await;
    // RFC 9113 §5.1, "closed": a stream error or a connection error of
    // type STREAM_CLOSED.
    loop {
        let f = c.expect_frame("an error for stream 1").await;
        if f.kind == GOAWAY || f.kind == RST_STREAM && f.stream == 1 {
            assert_eq!(f.error_code(), STREAM_CLOSED, "{:?}", c.seen);
            if f.kind == RST_STREAM {
                c.assert_ok(3).await;
            }
            break;
        }
    }
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
    c.headers(
        1,
        END_STREAM | END_HEADERS,
        &block(&get_with(&[("x-big", &big)])),
    )
    .await;
    let r = c.response(1).await;
    assert_eq!(r.status, 431, "{r:?}");
    // Over CONTINUATION frames too, and with a body that then is not read.
    let b = block(&get_with(&[("x-big", &big)]));
    c.headers(3, 0, &b[..3000]).await;
    c.frame(CONTINUATION, END_HEADERS, 3, &b[3000..]).await;
    let r = c.response(3).await;
    assert_eq!(r.status, 431, "{r:?}");
    c.assert_ok(5).await;
    assert_eq!(s.up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_far_above_max_header_bytes_ends_the_connection() {
    // HPACK never makes a head more than twice as large on the wire as
    // decoded: a block far beyond that is not buffered without end.
    let s = Setup::with(|c| c.max_header_bytes = 4096).await;
    let mut c = s.client().await;
    let junk = vec![0u8; 4000];
    c.headers(1, END_STREAM, &junk).await;
    for _ in 0..4 {
        c.frame(CONTINUATION, 0, 1, &junk).await;
    }
    let code = c.expect_goaway_any().await;
    assert_ne!(code, NO_ERROR, "{:?}", c.seen);
    c.expect_closed().await;
    s.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_short_for_their_priority_fields_are_a_frame_size_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_STREAM | END_HEADERS | PRIORITY_FLAG, &[0, 0, 0])
        .await;
    c.expect_connection_error(FRAME_SIZE_ERROR).await;
    s.still_serves().await;
}

// === stream errors: PRIORITY and WINDOW_UPDATE ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_depending_on_their_own_stream_are_a_protocol_error() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut payload = 1u32.to_be_bytes().to_vec();
    payload.push(15);
    payload.extend_from_slice(&block(&get("/")));
    c.headers(1, END_STREAM | END_HEADERS | PRIORITY_FLAG, &payload)
        .await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    c.assert_ok(3).await;
    assert_eq!(s.up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_frame_depending_on_its_own_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    c.priority(1, 1).await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    // On an idle stream too (h2spec 5.3.1).
    c.priority(3, 3).await;
    c.expect_rst(3, PROTOCOL_ERROR).await;
    gate.open();
    c.assert_ok(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_frame_of_another_length_is_a_frame_size_error() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.headers(1, END_HEADERS, &block(&get("/"))).await;
    c.frame(PRIORITY, 0, 1, &[0, 0, 0, 0]).await;
    c.expect_rst(1, FRAME_SIZE_ERROR).await;
    gate.open();
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_update_of_0_on_a_stream_is_a_protocol_error() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    c.window_update(1, 0).await;
    c.expect_rst(1, PROTOCOL_ERROR).await;
    gate.open();
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_window_above_the_maximum_is_a_flow_control_error() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    c.window_update(1, MAX_WINDOW - DEFAULT_WINDOW).await; // exactly the maximum
    c.window_update(1, 1).await;
    c.expect_rst(1, FLOW_CONTROL_ERROR).await;
    gate.open();
    c.assert_ok(3).await;
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
        let b = block(&get("/"));
        burst.extend_from_slice(&frame_bytes(
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &b,
        ));
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
    c.window_update(0, 10_000_000).await;
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
                    c.settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, value)]).await;
                }
                Some((_, increment)) => {
                    updates += i64::from(increment);
                    c.window_update(1, increment).await;
                }
                None => {
                    let increment = 2 * (initial + updates).min(40_000) as u32;
                    updates += i64::from(increment);
                    c.window_update(1, increment).await;
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
            c.window_update(0, 20_000).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_change_that_overflows_a_stream_window_is_a_flow_control_error() {
    // RFC 9113 §6.9.2: a connection error, whichever window it overflows.
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    s.upstream_received(1).await;
    c.window_update(1, MAX_WINDOW - DEFAULT_WINDOW).await; // exactly the maximum
    c.settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW + 1)])
        .await;
    c.expect_connection_error(FLOW_CONTROL_ERROR).await;
    gate.open();
    s.still_serves().await;
}

// === flow control: the server's receiving ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_larger_than_both_windows_gets_credit_back_as_it_is_consumed() {
    const SIZE: usize = 3 << 20;
    let s = Setup::start().await;
    let mut c = s.client().await;
    assert_eq!((c.send_window, c.stream_window), (1 << 20, 1 << 20));
    c.headers(1, END_HEADERS, &post("/upload", Some("3145728")))
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
            c.data(1, end, &chunk[..n]).await;
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
    c.headers(3, END_HEADERS, &post("/upload", None)).await;
    c.data(3, END_STREAM, b"more").await;
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
    c.rst(1, CANCEL).await;
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
    c.window_update(1, 100).await;
    c.priority(1, 0).await;
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_upload_breaks_off_the_upstream_body() {
    let s = Setup::start().await;
    let mut c = s.client().await;
    c.headers(1, END_HEADERS, &post("/upload", Some("100000")))
        .await;
    c.data(1, 0, &[b'x'; 1000]).await;
    s.upstream_received(1).await;
    c.rst(1, CANCEL).await;
    eventually(WAIT, "the upstream sees the upload break off", || async {
        s.up.aborted_uploads() == 1
    })
    .await;
    c.assert_ok(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_finishes_the_stream_in_flight() {
    let s = Setup::start().await;
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    s.upstream_received(1).await;
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
    let gate = s.gate();
    let mut c = s.client().await;
    c.send_get(1, "/").await;
    c.send_get(3, "/").await;
    s.upstream_received(2).await;
    c.goaway(0, NO_ERROR).await;
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
async fn a_head_response_has_no_body() {
    // RFC 9113 §8.1.1: DATA of non-zero length in a response to HEAD is
    // malformed.
    let s = Setup::start().await;
    let mut c = s.client().await;
    let mut fields = get("/");
    fields[0].1 = "HEAD";
    c.headers(1, END_STREAM | END_HEADERS, &block(&fields))
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
    c.headers(1, END_HEADERS, &block(&fields)).await;
    c.data(1, END_STREAM, b"\0\0\0\0\0").await;
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

async fn tls_client(s: &Setup, cert: &TestCert) -> H2 {
    let mut config = (*cert.client).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(s.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
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
    c.ping(0, *b"over tls").await;
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
    c.headers(
        3,
        END_STREAM | END_HEADERS,
        &block(&get_with(&[("te", "gzip")])),
    )
    .await;
    c.expect_rst(3, PROTOCOL_ERROR).await;
    c.assert_ok(5).await;
    c.window_update(0, 0).await;
    c.expect_connection_error(PROTOCOL_ERROR).await;
    let mut c = tls_client(&s, &cert).await;
    c.assert_ok(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_hypers_client_uploads_and_downloads() {
    const SIZE: u64 = 2 << 20;
    let cert = TestCert::generate();
    let s = tls_setup(&cert).await;
    let mut config = (*cert.client).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(s.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
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
