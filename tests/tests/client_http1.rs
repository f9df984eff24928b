//! serin's own HTTP/1.1 server path (`proxy/src/server/own_h1.rs`), asserted on
//! the wire.
//!
//! When both upstreams speak HTTP/1.1, serin no longer lets hyper serve
//! plain HTTP/1.x clients: its own loop parses each request head in place,
//! writes the upstream request straight from those bytes and writes the
//! client's response head straight from the upstream's, framing the body
//! itself (length, chunked, or until close). hyper only takes a connection
//! over when a request needs it (a body, an upgrade, a malformed head).
//! A hyper client in front of that loop would smooth over exactly what this
//! code now owns, so these tests drive it with a raw TCP client that writes
//! exact bytes and reads exact bytes: status lines, `Connection` handling,
//! HTTP/1.0 rules, pipelining, chunked framing and trailers, hop-by-hop
//! rewrites in both directions, and the handoff to hyper mid-connection.
//! Where the bytes the upstream sends or receives matter, a raw scripted
//! upstream replaces the support library's hyper upstream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serin_proxy::{Proxy, ProxyConfig, RouteTable, Routes, Target, Upstream, UpstreamProtocol};
use serin_tests::{closed_port_url, eventually, Behavior, Gate, TestCert, TestUpstream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Failure bound for every wait in this file; never a pause.
const WAIT: Duration = Duration::from_secs(10);

// === a proxy ===

/// A proxy in front of `stable` and `canary`, weight 0 (everything to stable
/// unless a request overrides it).
fn start_proxy(stable: &str, canary: &str) -> Proxy {
    Proxy::start(
        proxy_config(stable, canary),
        Routes::new(RouteTable::new(0)),
    )
    .unwrap()
}

/// The config of [`start_proxy`], for a test to change before it starts.
fn proxy_config(stable: &str, canary: &str) -> ProxyConfig {
    let mut config = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Upstream::parse(stable, UpstreamProtocol::Http1).unwrap(),
        Upstream::parse(canary, UpstreamProtocol::Http1).unwrap(),
    );
    config.response_timeout = WAIT;
    config
}

/// The usual setup: a stable upstream, a proxy whose canary is down, and
/// one client connection to the proxy.
async fn stable_only() -> (TestUpstream, Proxy, Client) {
    let up = TestUpstream::start("stable").await;
    let proxy = start_proxy(&up.url(), &closed_port_url());
    let client = Client::connect(proxy.local_addr()).await;
    (up, proxy, client)
}

// === a raw client ===

/// How a response's body was delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body by the rules (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// The server closed the connection.
    Close,
}

/// A response as it came off the wire.
#[derive(Debug)]
struct Response {
    /// `HTTP/1.1` or `HTTP/1.0`.
    version: String,
    status: u16,
    /// Header fields in order, names lowercased, values trimmed.
    headers: Vec<(String, String)>,
    /// The body, chunked framing removed.
    body: Vec<u8>,
    /// Chunked trailer fields, names lowercased.
    trailers: Vec<(String, String)>,
    framing: Framing,
    /// The head as received, for failure messages.
    head: String,
}

impl Response {
    /// The first value of `name` (any case).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many fields are called `name` (any case).
    fn count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The field names, sorted.
    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names
    }
}

/// Bytes waiting unread in the receive queue of the proxy's socket at
/// `proxy` connected to `client` (IPv4), from `/proc/net/tcp`.
fn proxy_receive_queue(proxy: SocketAddr, client: SocketAddr) -> Option<u64> {
    let hex = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => panic!("the tests listen on 127.0.0.1"),
    };
    let (local, remote) = (hex(proxy), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        let (_, rx) = columns.get(4)?.split_once(':')?;
        (columns.get(1) == Some(&local.as_str()) && columns.get(2) == Some(&remote.as_str()))
            .then(|| u64::from_str_radix(rx, 16).ok())
            .flatten()
    })
}

async fn tcp_to(addr: SocketAddr) -> TcpStream {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect to the proxy");
    stream.set_nodelay(true).unwrap();
    stream
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A client socket: plain TCP, or TLS over it.
trait Wire: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Wire for T {}

/// One client connection that writes raw bytes and parses raw responses.
/// Bytes read past one response stay buffered for the next.
struct Client {
    stream: Box<dyn Wire>,
    buf: Vec<u8>,
    /// The connection's (client, proxy) addresses.
    ends: (SocketAddr, SocketAddr),
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tcp_to(addr).await;
        Self {
            ends: (stream.local_addr().unwrap(), addr),
            stream: Box::new(stream),
            buf: Vec::new(),
        }
    }

    /// A TLS connection offering only `http/1.1` by ALPN, trusting `cert`.
    async fn connect_tls(addr: SocketAddr, cert: &TestCert) -> Self {
        let mut config = (*cert.client).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tcp = tcp_to(addr).await;
        let ends = (tcp.local_addr().unwrap(), addr);
        let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake with the proxy");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        Self {
            stream: Box::new(tls),
            buf: Vec::new(),
            ends,
        }
    }

    /// Closes the connection as a well-behaved client does: over TLS a
    /// `close_notify` alert, then the end of the TCP stream.
    async fn leave(mut self) {
        self.close_sending().await;
    }

    /// Ends the client's sending side (over TLS with `close_notify`); it
    /// can still read.
    async fn close_sending(&mut self) {
        let _ = tokio::time::timeout(WAIT, self.stream.shutdown()).await;
    }

    /// Waits until the proxy has read every byte this client sent: its
    /// socket's receive queue (`/proc/net/tcp`) is empty. While an upstream
    /// holds the proxy's answer, only its watch for a close reads.
    async fn wait_until_proxy_read_all(&self) {
        let (client, proxy) = self.ends;
        eventually(WAIT, "the proxy read all the client sent", || async move {
            proxy_receive_queue(proxy, client) == Some(0)
        })
        .await;
    }

    /// Writes `bytes` in one write.
    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write to the proxy");
    }

    /// One read into the buffer; 0 means the proxy closed the connection.
    async fn fill(&mut self, deadline: Instant, what: &str) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
        let n = match read {
            Err(_) => panic!(
                "timed out waiting for {what}; read so far: {:?}",
                lossy(&self.buf)
            ),
            Ok(Err(e)) => panic!(
                "read failed waiting for {what}: {e}; read so far: {:?}",
                lossy(&self.buf)
            ),
            Ok(Ok(n)) => n,
        };
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one line ending in CRLF (returned without it).
    async fn line(&mut self, deadline: Instant, what: &str) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return String::from_utf8(line).expect("an ASCII line");
            }
            if self.fill(deadline, what).await == 0 {
                panic!("closed in the middle of {what}: {:?}", lossy(&self.buf));
            }
        }
    }

    /// Reads the response to a request other than HEAD.
    async fn response(&mut self) -> Response {
        self.read_response(false).await
    }

    /// Reads the response to a HEAD request: no body, whatever the head says.
    async fn head_response(&mut self) -> Response {
        self.read_response(true).await
    }

    async fn read_response(&mut self, to_head: bool) -> Response {
        let deadline = Instant::now() + WAIT;
        let head_len = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.fill(deadline, "a response head").await == 0 {
                panic!(
                    "closed before a complete response head: {:?}",
                    lossy(&self.buf)
                );
            }
        };
        let head = String::from_utf8(self.buf.drain(..head_len).collect()).expect("ASCII head");
        let mut lines = head.trim_end_matches("\r\n").split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap().to_string();
        assert!(
            version == "HTTP/1.1" || version == "HTTP/1.0",
            "not a status line: {head:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        assert!(
            parts.next().is_some(),
            "no space after the status code: {head:?}"
        );
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (name, value) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad field line {l:?} in {head:?}"));
                assert_eq!(name, name.trim(), "whitespace in a field name: {head:?}");
                (name.to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        let mut resp = Response {
            version,
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
            framing: Framing::None,
            head,
        };
        let bodiless = to_head || status / 100 == 1 || status == 204 || status == 304;
        resp.framing = if bodiless {
            Framing::None
        } else if let Some(te) = resp.header("transfer-encoding") {
            assert!(
                te.rsplit(',').next().unwrap().trim() == "chunked",
                "unexpected transfer-encoding: {}",
                resp.head
            );
            Framing::Chunked
        } else if resp.header("content-length").is_some() {
            Framing::Length
        } else {
            Framing::Close
        };
        match resp.framing {
            Framing::None => {}
            Framing::Length => {
                assert_eq!(
                    resp.count("content-length"),
                    1,
                    "one content-length: {}",
                    resp.head
                );
                let length: usize = resp.header("content-length").unwrap().parse().unwrap();
                while self.buf.len() < length {
                    if self.fill(deadline, "a body by content-length").await == 0 {
                        panic!(
                            "closed after {} of {length} body bytes: {}",
                            self.buf.len(),
                            resp.head
                        );
                    }
                }
                resp.body = self.buf.drain(..length).collect();
            }
            Framing::Chunked => loop {
                let size_line = self.line(deadline, "a chunk size line").await;
                let size = size_line.split(';').next().unwrap().trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
                if size == 0 {
                    loop {
                        let line = self.line(deadline, "the trailer section").await;
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line
                            .split_once(':')
                            .unwrap_or_else(|| panic!("bad trailer line {line:?}"));
                        resp.trailers
                            .push((name.to_ascii_lowercase(), value.trim().to_string()));
                    }
                    break;
                }
                while self.buf.len() < size + 2 {
                    if self.fill(deadline, "chunk data").await == 0 {
                        panic!("closed inside a chunk: {}", resp.head);
                    }
                }
                assert_eq!(
                    &self.buf[size..size + 2],
                    b"\r\n",
                    "chunk data ends in CRLF"
                );
                resp.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
            },
            Framing::Close => {
                while self.fill(deadline, "a body delimited by close").await > 0 {}
                resp.body = std::mem::take(&mut self.buf);
            }
        }
        resp
    }

    /// Asserts that nothing more arrives and the proxy closes the connection
    /// (a read returns 0).
    async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes after the response: {:?}",
            lossy(&self.buf)
        );
        let n = self
            .fill(Instant::now() + WAIT, "the proxy to close the connection")
            .await;
        assert_eq!(
            n,
            0,
            "expected the connection to close, got {:?}",
            lossy(&self.buf)
        );
    }
}

/// Asserts a 24-hex-digit generated request id.
fn assert_generated_id(id: &str) {
    assert_eq!(id.len(), 24, "{id:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{id:?}"
    );
}

// === a raw scripted upstream ===

/// One request as the upstream received it.
#[derive(Clone, Debug)]
struct Seen {
    /// The head exactly as received, final CRLFCRLF included.
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap()
    }

    fn method(&self) -> &str {
        self.request_line().split(' ').next().unwrap()
    }

    fn path(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap()
    }

    /// The header fields, names lowercased, values exact, sorted.
    fn fields(&self) -> Vec<(String, String)> {
        let mut fields: Vec<(String, String)> = self
            .head
            .trim_end_matches("\r\n")
            .split("\r\n")
            .skip(1)
            .map(|l| {
                let (n, v) = l.split_once(':').expect("a field line");
                (n.to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        fields.sort();
        fields
    }

    fn field(&self, name: &str) -> Option<String> {
        self.fields()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// What the scripted upstream sends back.
enum Reply {
    /// These bytes; the connection stays open for the next request.
    Keep(Vec<u8>),
    /// These bytes, then the upstream closes the connection.
    ThenClose(Vec<u8>),
}

/// A raw HTTP/1.1 upstream: it records every request (head and
/// `Content-Length` body) and answers what the script says.
struct Scripted {
    url: String,
    connections: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(script: fn(&Seen) -> Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (connections.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_scripted(stream, script, s.clone()));
            }
        });
        Self {
            url,
            connections,
            seen,
            task,
        }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_scripted(
    mut stream: TcpStream,
    script: fn(&Seen) -> Reply,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let length = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        let request = Seen {
            head,
            body: buf.drain(..length).collect(),
        };
        let reply = script(&request);
        seen.lock().unwrap().push(request);
        match reply {
            Reply::Keep(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::ThenClose(bytes) => {
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

/// A 200 with a `Content-Length` body.
fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// === 1. pipelining ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_get_their_responses_in_order() {
    let (up, _proxy, mut c) = stable_only().await;
    c.send(
        concat!(
            "GET /echo-headers HTTP/1.1\r\nHost: app\r\nx-request-id: first\r\n\r\n",
            "GET /echo-headers HTTP/1.1\r\nHost: app\r\nx-request-id: second\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app\r\nx-request-id: third\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    for id in ["first", "second"] {
        let r = c.response().await;
        assert_eq!((r.version.as_str(), r.status), ("HTTP/1.1", 200), "{r:?}");
        assert_eq!(r.header("x-request-id"), Some(id), "{}", r.head);
        assert!(
            r.text().contains(&format!("x-request-id: {id}\n")),
            "the upstream saw request {id:?}: {}",
            r.text()
        );
        assert_eq!(r.framing, Framing::Length);
        assert_eq!(r.header("connection"), None, "{}", r.head);
    }
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
    assert_eq!(r.header("x-request-id"), Some("third"));

    // The connection is still open, and a pipelined `Connection: close` is
    // answered, then the connection ends.
    c.send(
        concat!(
            "GET / HTTP/1.1\r\nHost: app\r\nx-request-id: fourth\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: app\r\nx-request-id: fifth\r\nConnection: close\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!((r.status, r.header("x-request-id")), (200, Some("fourth")));
    let r = c.response().await;
    assert_eq!((r.status, r.header("x-request-id")), (200, Some("fifth")));
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    c.expect_closed().await;
    assert_eq!(up.requests(), 5);
}

// === 2. HTTP/1.0 clients ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_client_without_keep_alive_gets_an_http10_response_then_a_close() {
    let (_up, _proxy, mut c) = stable_only().await;
    c.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.0", 200),
        "{}",
        r.head
    );
    assert_eq!(r.text(), "stable");
    assert_eq!(r.framing, Framing::Length);
    assert_eq!(r.header("x-serin-upstream"), Some("stable"));
    assert_eq!(r.header("transfer-encoding"), None);
    // HTTP/1.0 closes by default; an explicit header may only say so.
    assert!(
        matches!(r.header("connection"), None | Some("close")),
        "{}",
        r.head
    );
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_client_asking_for_keep_alive_keeps_its_connection() {
    let (up, _proxy, mut c) = stable_only().await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .await;
        let r = c.response().await;
        assert_eq!(
            (r.version.as_str(), r.status),
            ("HTTP/1.0", 200),
            "{}",
            r.head
        );
        assert_eq!(r.text(), "stable");
        assert_eq!(r.framing, Framing::Length);
        assert_eq!(r.header("connection"), Some("keep-alive"), "{}", r.head);
    }
    // A request without it ends the connection.
    c.send(b"GET /echo-headers HTTP/1.0\r\nHost: app\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.version.as_str(), r.status), ("HTTP/1.0", 200));
    assert!(r.text().contains("host: app\n"), "{}", r.text());
    assert_ne!(r.header("connection"), Some("keep-alive"), "{}", r.head);
    c.expect_closed().await;
    assert_eq!(up.requests(), 3);
}

// === 3. Connection: close ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_an_http11_client_is_answered_then_closed() {
    let (up, proxy, mut c) = stable_only().await;
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.version.as_str(), r.status), ("HTTP/1.1", 200));
    assert_eq!(r.text(), "stable");
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert_eq!(r.count("connection"), 1, "{}", r.head);
    c.expect_closed().await;
    // The client's `Connection: close` was its own hop's business: the
    // upstream connection stayed pooled and carries the next request.
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(c.response().await.status, 200);
    assert_eq!(up.connections(), 1);
}

// === 4. a chunked upstream response ===

/// Chunk data that looks like framing, and bytes that are not UTF-8.
const CHUNKED_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\ncontent-type: application/octet-stream\r\n\r\n5\r\nhello\r\n8\r\n\r\n0\r\n\r\nX\r\n3\r\n\x00\xff!\r\n0\r\nx-checksum: abc123\r\n\r\n";
const CHUNKED_BODY: &[u8] = b"hello\r\n0\r\n\r\nX\x00\xff!";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upstream_response_reaches_http11_clients_chunked_with_trailers() {
    let up = Scripted::start(|_| Reply::Keep(CHUNKED_REPLY.to_vec())).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    for _ in 0..2 {
        c.send(b"GET /stream HTTP/1.1\r\nHost: app\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!((r.version.as_str(), r.status), ("HTTP/1.1", 200));
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
        assert_eq!(r.count("transfer-encoding"), 1, "{}", r.head);
        assert_eq!(r.header("content-length"), None, "{}", r.head);
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.body, CHUNKED_BODY, "{:?}", lossy(&r.body));
        assert_eq!(
            r.trailers,
            [("x-checksum".to_string(), "abc123".to_string())]
        );
        assert_eq!(r.header("connection"), None, "kept alive: {}", r.head);
    }
    assert_eq!(up.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upstream_response_reaches_http10_clients_delimited_by_close() {
    let up = Scripted::start(|_| Reply::Keep(CHUNKED_REPLY.to_vec())).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    // With or without keep-alive asked: the length is unknown, so only the
    // close can end the body.
    for request in [
        &b"GET /stream HTTP/1.0\r\nHost: app\r\n\r\n"[..],
        b"GET /stream HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let mut c = Client::connect(proxy.local_addr()).await;
        c.send(request).await;
        let r = c.response().await;
        assert_eq!(
            (r.version.as_str(), r.status),
            ("HTTP/1.0", 200),
            "{}",
            r.head
        );
        assert_eq!(r.framing, Framing::Close, "{}", r.head);
        assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
        assert_eq!(r.header("content-length"), None, "{}", r.head);
        assert_ne!(r.header("connection"), Some("keep-alive"), "{}", r.head);
        assert_eq!(r.body, CHUNKED_BODY, "{:?}", lossy(&r.body));
        c.expect_closed().await;
    }
}

// === 5. an upstream body delimited by close ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_upstream_body_reaches_http11_clients_chunked_and_keeps_the_connection() {
    let up = Scripted::start(|_| {
        Reply::ThenClose(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close".to_vec())
    })
    .await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
        let r = c.response().await;
        assert_eq!(
            (r.version.as_str(), r.status),
            ("HTTP/1.1", 200),
            "{}",
            r.head
        );
        assert_eq!(r.framing, Framing::Chunked, "{}", r.head);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("connection"), None, "{}", r.head);
        assert_eq!(r.text(), "until close");
        assert!(r.trailers.is_empty());
    }
    assert_eq!(
        up.connections(),
        2,
        "each close-delimited body used up its connection"
    );
}

// === 6. request header rewrites ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_hop_by_hop_headers_are_removed_and_forwarding_headers_rewritten() {
    let up = Scripted::start(|_| Reply::Keep(ok("seen"))).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(
        concat!(
            "GET /headers?q=1 HTTP/1.1\r\n",
            "Host: shop.example\r\n",
            "Connection: x-secret\r\n",
            "x-secret: 1\r\n",
            "keep-alive: 5\r\n",
            "proxy-connection: x\r\n",
            "te: gzip\r\n",
            "X-Forwarded-For: 203.0.113.7\r\n",
            "Accept: */*\r\n",
            "X-Forwarded-For: 198.51.100.2\r\n",
            "X-Forwarded-Proto: https\r\n",
            "x-request-id: client-id-42\r\n",
            "\r\n",
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("client-id-42"), "echoed");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request_line(), "GET /headers?q=1 HTTP/1.1");
    let expected: Vec<(String, String)> = [
        ("accept", "*/*"),
        ("host", "shop.example"),
        ("x-forwarded-for", "203.0.113.7, 198.51.100.2, 127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "client-id-42"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        seen[0].fields(),
        expected,
        "the upstream saw:\n{}",
        seen[0].head
    );

    // `te: trailers` is end to end, with its `Connection` option (RFC 9110
    // §10.1.4); without a client id, one is made, forwarded and returned.
    c.send(b"GET /grpcish HTTP/1.1\r\nHost: shop.example\r\nte: trailers\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    let id = r
        .header("x-request-id")
        .expect("a generated id")
        .to_string();
    assert_generated_id(&id);
    let seen = &up.seen()[1];
    let expected: Vec<(String, String)> = [
        ("connection", "te"),
        ("host", "shop.example"),
        ("te", "trailers"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", id.as_str()),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(seen.fields(), expected, "the upstream saw:\n{}", seen.head);

    // Each request gets its own id.
    c.send(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    let other = c.response().await;
    let other_id = other.header("x-request-id").unwrap();
    assert_generated_id(other_id);
    assert_ne!(other_id, id);
    assert_eq!(
        up.seen()[2].field("x-request-id").as_deref(),
        Some(other_id)
    );
}

// === 7. response header rewrites ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_hop_by_hop_headers_do_not_reach_the_client() {
    let up = Scripted::start(|_| {
        Reply::Keep(
            concat!(
                "HTTP/1.1 200 OK\r\n",
                "connection: x-up\r\n",
                "x-up: 1\r\n",
                "keep-alive: timeout=5\r\n",
                "x-serin-upstream: forged\r\n",
                "x-kept: yes\r\n",
                "content-length: 2\r\n",
                "\r\n",
                "ok",
            )
            .as_bytes()
            .to_vec(),
        )
    })
    .await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.1\r\nHost: app\r\nx-request-id: r7\r\n\r\n")
            .await;
        let r = c.response().await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        assert_eq!(
            r.names(),
            [
                "content-length",
                "x-kept",
                "x-request-id",
                "x-serin-upstream"
            ],
            "{}",
            r.head
        );
        assert_eq!(r.header("x-serin-upstream"), Some("stable"));
        assert_eq!(r.header("x-kept"), Some("yes"));
        assert_eq!(r.header("x-request-id"), Some("r7"));
    }
    assert_eq!(up.connections(), 1, "`connection: x-up` is not a close");
}

// === 8. handoff to hyper ===

/// Echoes what the upstream received: method, path and body length.
fn echo_request(seen: &Seen) -> Reply {
    Reply::Keep(ok(&format!(
        "{} {} {}",
        seen.method(),
        seen.path(),
        seen.body.len()
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_mid_connection_is_handed_to_hyper_and_the_connection_goes_on() {
    let up = Scripted::start(echo_request).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET /one HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /one 0"));
    // A body that looks like a request: it must stay a body.
    let body = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    c.send(
        format!(
            "POST /two HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), format!("POST /two {}", body.len()));
    assert_eq!(r.header("x-serin-upstream"), Some("stable"));
    c.send(b"GET /three HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /three 0"));
    let seen = up.seen();
    let lines: Vec<&str> = seen.iter().map(Seen::request_line).collect();
    assert_eq!(
        lines,
        [
            "GET /one HTTP/1.1",
            "POST /two HTTP/1.1",
            "GET /three HTTP/1.1"
        ]
    );
    assert_eq!(seen[1].body, body.as_bytes());
    assert_eq!(
        seen[1].field("content-length"),
        Some(body.len().to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_request_pipelined_behind_a_get_is_handed_over_with_the_bytes_already_read() {
    let up = Scripted::start(echo_request).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(
        concat!(
            "GET /a HTTP/1.1\r\nHost: app\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\n\r\nhello world",
            "GET /c HTTP/1.1\r\nHost: app\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    for want in ["GET /a 0", "POST /b 11", "GET /c 0"] {
        let r = c.response().await;
        assert_eq!((r.status, r.text().as_str()), (200, want), "{}", r.head);
    }
    assert_eq!(up.seen()[1].body, b"hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_first_request_has_a_body_is_served() {
    let up = Scripted::start(echo_request).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"POST /first HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nabcde")
        .await;
    let r = c.response().await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "POST /first 5"),
        "{}",
        r.head
    );
    c.send(b"GET /after HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "GET /after 0"));
    assert_eq!(up.seen()[0].body, b"abcde");
}

// === 9. malformed requests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_line_is_400_and_the_next_connection_is_served() {
    let (up, proxy, mut c) = stable_only().await;
    c.send(b"GARBAGE\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.1", 400),
        "{}",
        r.head
    );
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "stable"));
    assert_eq!(up.requests(), 1, "the garbage never reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_host_is_400_with_a_plain_text_reason() {
    let (up, _proxy, mut c) = stable_only().await;
    c.send(b"GET / HTTP/1.1\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.1", 400),
        "{}",
        r.head
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.framing, Framing::Length);
    assert!(r.text().contains("Host"), "{:?}", r.text());
    assert_generated_id(r.header("x-request-id").expect("an id"));
    assert_eq!(up.requests(), 0);
}

// === 10. upstream down ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_upstream_is_502_and_the_connection_stays_usable() {
    let canary = TestUpstream::start("canary").await;
    let proxy = start_proxy(&closed_port_url(), &canary.url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.1", 502),
        "{}",
        r.head
    );
    assert_eq!(r.header("x-serin-upstream"), Some("stable"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_generated_id(r.header("x-request-id").expect("an id"));
    assert_eq!(r.framing, Framing::Length);
    assert!(r.text().contains("connect failed"), "{:?}", r.text());
    assert_eq!(r.header("connection"), None, "kept alive: {}", r.head);
    // The same connection goes on: once more to the down upstream, with the
    // client's id, then to the working canary.
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\nx-request-id: again\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.header("x-request-id")), (502, Some("again")));
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\nx-serin-canary: always\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "canary"), "{}", r.head);
    assert_eq!(r.header("x-serin-upstream"), Some("canary"));
}

// === 11. HEAD ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_responses_carry_the_length_without_a_body_and_the_connection_is_reused() {
    let up = Scripted::start(|seen| {
        if seen.method() == "HEAD" {
            Reply::Keep(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec())
        } else {
            Reply::Keep(ok("hello"))
        }
    })
    .await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"HEAD /thing HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.head_response().await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.1", 200),
        "{}",
        r.head
    );
    assert_eq!(r.header("content-length"), Some("5"), "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
    assert_eq!(r.header("connection"), None, "{}", r.head);
    // No body bytes: the next response starts right after the head.
    c.send(b"GET /thing HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{}", r.head);
    assert_eq!(
        up.connections(),
        1,
        "the upstream connection was reused too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_length_next_to_chunked_framing_is_dropped() {
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an
    // intermediary forwarding such a message must remove the length.
    let up = Scripted::start(|_| {
        Reply::Keep(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.framing, Framing::Chunked, "{}", r.head);
    assert_eq!(r.header("content-length"), None, "{}", r.head);
    assert_eq!(r.text(), "hello");
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.framing, Framing::Close, "{}", r.head);
    assert_eq!(r.header("content-length"), None, "{}", r.head);
    assert_eq!(r.text(), "hello");
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_serin_makes_itself_to_head_requests_have_no_body() {
    let canary = TestUpstream::start("canary").await;
    let proxy = start_proxy(&closed_port_url(), &canary.url());
    // A 502 (stable is down), then a request to the working canary on the
    // same connection: its status line must come right after the 502's head.
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let r = c.head_response().await;
    assert_eq!(r.status, 502, "{}", r.head);
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\nx-serin-canary: always\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "canary"), "{}", r.head);
    // The same for the 400 to a HEAD without Host.
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"HEAD / HTTP/1.1\r\n\r\n").await;
    let r = c.head_response().await;
    assert_eq!(r.status, 400, "{}", r.head);
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\nx-serin-canary: always\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "canary"), "{}", r.head);
}

// === 12. a client that leaves while the upstream works ===

/// A proxy whose response timeout (120 s) outlasts every wait here, in
/// front of a stable upstream that answers after 300 s (until a test sets
/// its behaviour back); it terminates TLS with `tls` if given.
async fn slow_stable(tls: Option<&TestCert>) -> (TestUpstream, Proxy) {
    let up = TestUpstream::start("stable").await;
    up.set(Behavior {
        delay: Duration::from_secs(300),
        ..Behavior::default()
    });
    let mut config = proxy_config(&up.url(), &closed_port_url());
    config.response_timeout = Duration::from_secs(120);
    config.tls = tls.map(tls_files);
    let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
    (up, proxy)
}

/// After the client `c` left with its request `nth` still at the upstream:
/// the upstream request was dropped, the request counts as abandoned (in
/// the judge's window, with no error), and the proxy serves the `next`
/// client's request.
async fn assert_abandoned(up: &TestUpstream, proxy: &Proxy, c: Client, nth: u64, mut next: Client) {
    eventually(WAIT, "the upstream got the request", || async {
        up.requests() == nth
    })
    .await;
    c.leave().await;
    eventually(WAIT, "the proxy dropped the upstream request", || async {
        up.cancelled() == 1
    })
    .await;
    let stats = proxy.stats();
    eventually(WAIT, "the request counted as abandoned", || async {
        stats.totals(Target::Stable).abandoned == 1
    })
    .await;
    let totals = stats.totals(Target::Stable);
    assert_eq!((totals.successes, totals.errors), (nth - 1, 0));
    let window = stats.window_snapshot(Target::Stable, Instant::now());
    assert_eq!((window.requests, window.errors), (nth, 0));
    up.set(Behavior::default());
    next.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(next.response().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_upstream_request_on_the_own_loop() {
    let (up, proxy) = slow_stable(None).await;
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let next = Client::connect(proxy.local_addr()).await;
    assert_abandoned(&up, &proxy, c, 1, next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_upstream_request_on_hypers_path() {
    let (up, proxy) = slow_stable(None).await;
    up.set(Behavior::default());
    let mut c = Client::connect(proxy.local_addr()).await;
    // A body hands the connection to hyper for the rest of its life.
    c.send(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_eq!(c.response().await.status, 200);
    up.set(Behavior {
        delay: Duration::from_secs(300),
        ..Behavior::default()
    });
    c.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let next = Client::connect(proxy.local_addr()).await;
    assert_abandoned(&up, &proxy, c, 2, next).await;
}

// === 13. every outcome recorded once ===

/// A stable upstream that promises 100 bytes, sends 10 and closes.
fn breaks_off(_: &Seen) -> Reply {
    Reply::ThenClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec())
}

/// Reads until the proxy closes the connection; returns what came.
async fn read_to_close(c: &mut Client) -> String {
    let deadline = Instant::now() + WAIT;
    while c.fill(deadline, "the connection to close").await > 0 {}
    lossy(&c.buf)
}

/// The response broke off after its head: the client sees the connection
/// close before the body is complete (on the own loop, right after the head
/// and the 10 bytes; hyper may drop what it had not flushed yet), and the
/// judge sees one error and no success, although the head said 200.
async fn assert_broken_off_once(proxy: &Proxy, mut c: Client, own_loop: bool) {
    let got = read_to_close(&mut c).await;
    if own_loop {
        assert!(
            got.contains("200 OK") && got.ends_with("0123456789"),
            "{got:?}"
        );
    }
    let stats = proxy.stats();
    eventually(WAIT, "the broken-off response counted", || async {
        stats.totals(Target::Stable).errors == 1
    })
    .await;
    let totals = stats.totals(Target::Stable);
    assert_eq!((totals.successes, totals.abandoned), (0, 0), "{totals:?}");
    let window = stats.window_snapshot(Target::Stable, Instant::now());
    assert_eq!((window.requests, window.errors), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_off_mid_body_is_one_error_on_the_own_loop() {
    let up = Scripted::start(breaks_off).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_broken_off_once(&proxy, c, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_off_mid_body_is_one_error_on_hypers_path() {
    let up = Scripted::start(breaks_off).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"POST /big HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_broken_off_once(&proxy, c, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_responses_are_one_success_each_on_both_paths() {
    let up = Scripted::start(|_| Reply::Keep(ok("fine"))).await;
    let proxy = start_proxy(&up.url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(c.response().await.text(), "fine");
    c.send(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    assert_eq!(c.response().await.text(), "fine");
    let stats = proxy.stats();
    eventually(WAIT, "both responses counted", || async {
        stats.totals(Target::Stable).successes == 2
    })
    .await;
    let totals = stats.totals(Target::Stable);
    assert_eq!((totals.errors, totals.abandoned), (0, 0), "{totals:?}");
    let window = stats.window_snapshot(Target::Stable, Instant::now());
    assert_eq!((window.requests, window.errors), (2, 0));
}

/// Reads one request head from `conn` (a raw upstream's side).
async fn read_request_head(conn: &mut TcpStream) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&head, b"\r\n\r\n").is_none() {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the request never came");
        head.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_quiet_stream_closes_its_upstream_connection_at_once() {
    // An event stream: the head and a first event, then nothing for as
    // long as the connection lasts.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        read_request_head(&mut conn).await;
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n")
            .await
            .unwrap();
        // Serin must close this connection when its client leaves.
        tokio::time::timeout(WAIT, conn.read(&mut [0u8; 4096])).await
    });
    let proxy = start_proxy(&url, &closed_port_url());
    let mut c = Client::connect(proxy.local_addr()).await;
    c.send(b"GET /events HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let deadline = Instant::now() + WAIT;
    while find(&c.buf, b"data: 1").is_none() {
        assert!(
            c.fill(deadline, "the first event").await > 0,
            "closed early"
        );
    }
    drop(c);
    let closed = upstream.await.unwrap();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the upstream connection outlived the client: {closed:?}"
    );
    let stats = proxy.stats();
    eventually(WAIT, "the stream counted as the success it was", || async {
        stats.totals(Target::Stable).successes == 1
    })
    .await;
    let totals = stats.totals(Target::Stable);
    assert_eq!((totals.errors, totals.abandoned), (0, 0), "{totals:?}");
}

// === 14. over TLS ===

/// A proxy terminating TLS with `cert` in front of `stable`, canary down.
fn start_tls_proxy(stable: &str, cert: &TestCert) -> Proxy {
    let mut config = proxy_config(stable, &closed_port_url());
    config.tls = Some(tls_files(cert));
    Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap()
}

fn tls_files(cert: &TestCert) -> serin_proxy::TlsFiles {
    serin_proxy::TlsFiles {
        cert: cert.cert_path.clone(),
        key: cert.key_path.clone(),
        client_auth: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_pipelined_requests_and_a_body_handed_to_hyper_are_served_in_order() {
    let cert = TestCert::generate();
    let up = Scripted::start(echo_request).await;
    let proxy = start_tls_proxy(&up.url, &cert);
    let mut c = Client::connect_tls(proxy.local_addr(), &cert).await;
    c.send(
        concat!(
            "GET /a HTTP/1.1\r\nHost: app\r\n\r\n",
            "GET /b HTTP/1.1\r\nHost: app\r\n\r\n",
            "POST /c HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\n\r\nhello world",
            "GET /d HTTP/1.1\r\nHost: app\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    for want in ["GET /a 0", "GET /b 0", "POST /c 11", "GET /d 0"] {
        let r = c.response().await;
        assert_eq!((r.status, r.text().as_str()), (200, want), "{}", r.head);
        assert_eq!(r.framing, Framing::Length);
    }
    // hyper serves the rest of the connection.
    c.send(b"GET /e HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await;
    let r = c.response().await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "GET /e 0"),
        "{}",
        r.head
    );
    c.expect_closed().await;
    let seen = up.seen();
    assert_eq!(seen.len(), 5);
    for request in &seen {
        assert_eq!(request.field("x-forwarded-proto").as_deref(), Some("https"));
    }
    assert_eq!(seen[2].body, b"hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_request_sent_while_the_last_is_at_the_upstream_is_served_next() {
    let cert = TestCert::generate();
    let up = TestUpstream::start("stable").await;
    let gate = Gate::closed();
    up.set(Behavior {
        hold: Some(gate.clone()),
        ..Behavior::default()
    });
    let proxy = start_tls_proxy(&up.url(), &cert);
    let mut c = Client::connect_tls(proxy.local_addr(), &cert).await;
    c.send(b"GET /first HTTP/1.1\r\nHost: app\r\nx-request-id: first\r\n\r\n")
        .await;
    eventually(WAIT, "the upstream got the first request", || async {
        up.requests() == 1
    })
    .await;
    // serin reads these while it watches the client for a close; they must
    // wait for the loop, the body one then going to hyper with its bytes.
    c.send(
        concat!(
            "GET / HTTP/1.1\r\nHost: app\r\nx-request-id: second\r\n\r\n",
            "POST /upload HTTP/1.1\r\nHost: app\r\nx-request-id: third\r\nContent-Length: 5\r\n\r\nhello",
        )
        .as_bytes(),
    )
    .await;
    c.wait_until_proxy_read_all().await;
    gate.open();
    for id in ["first", "second", "third"] {
        let r = c.response().await;
        assert_eq!(
            (r.status, r.header("x-request-id")),
            (200, Some(id)),
            "{}",
            r.head
        );
    }
    assert_eq!(up.requests(), 3);
    assert_eq!(up.uploaded(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_large_response_arrives_whole() {
    let cert = TestCert::generate();
    let up = TestUpstream::start("stable").await;
    let proxy = start_tls_proxy(&up.url(), &cert);
    let mut c = Client::connect_tls(proxy.local_addr(), &cert).await;
    let size = 3 * 1024 * 1024 + 17;
    for _ in 0..2 {
        c.send(format!("GET /download/{size} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
            .await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.body.len(), size);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_client_that_leaves_cancels_its_upstream_request() {
    let cert = TestCert::generate();
    let (up, proxy) = slow_stable(Some(&cert)).await;
    let mut c = Client::connect_tls(proxy.local_addr(), &cert).await;
    c.send(b"GET /slow HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let next = Client::connect_tls(proxy.local_addr(), &cert).await;
    assert_abandoned(&up, &proxy, c, 1, next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_client_that_pipelines_then_closes_its_side_gets_the_whole_response() {
    // An upstream that streams its answer in three parts, each when the test
    // says, so that the proxy waits on it more than once.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (go, mut next) = tokio::sync::mpsc::channel::<()>(2);
    let upstream = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        read_request_head(&mut conn).await;
        let parts: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n",
            b"8\r\ndata: 2\n\r\n",
            b"0\r\n\r\n",
        ];
        for (n, part) in parts.into_iter().enumerate() {
            if n > 0 {
                next.recv().await.unwrap();
            }
            conn.write_all(part).await.unwrap();
        }
        conn
    });
    let cert = TestCert::generate();
    let proxy = start_tls_proxy(&url, &cert);
    let mut c = Client::connect_tls(proxy.local_addr(), &cert).await;
    c.send(b"GET /events HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let deadline = Instant::now() + WAIT;
    while find(&c.buf, b"data: 1").is_none() {
        assert!(c.fill(deadline, "the first part").await > 0, "closed early");
    }
    // The next request, then the end of what this client sends: a client
    // that half-closes after its last request still reads the answers.
    c.send(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n").await;
    c.close_sending().await;
    c.wait_until_proxy_read_all().await;
    go.send(()).await.unwrap();
    while find(&c.buf, b"data: 2").is_none() {
        assert!(
            c.fill(deadline, "the second part").await > 0,
            "closed after the first part"
        );
    }
    go.send(()).await.unwrap();
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "data: 1\ndata: 2\n");
    drop(upstream.await.unwrap());
}
