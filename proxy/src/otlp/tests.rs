//! The exporter against collectors over real sockets on 127.0.0.1.
//!
//! The spans' encoding is checked by a fake collector that decodes with the
//! official OTLP classes: PyPI's opentelemetry-proto, pinned in
//! `proxy/tests/otlp/requirements.txt`, run by `proxy/tests/otlp/collector.py`
//! from `SERIN_OTLP_PYTHON`, or else from the venv that
//! `proxy/tests/otlp/venv.sh` creates once under
//! `${XDG_CACHE_HOME:-~/.cache}/serin-otlp-venv`. Failures (a collector that
//! is down, never answers, answers 503, or closes a kept connection) are
//! played by small collectors written here. Every wait polls with a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use http::{StatusCode, Version};
use serde_json::{json, Value};

use super::*;
use crate::outcome::OutcomeClass;
use crate::split::Target;

const DEADLINE: Duration = Duration::from_secs(30);

// === the official classes ===

fn otlp_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp"))
}

fn python() -> &'static str {
    serin_tests::otlp_collector::python()
}

/// `collector.py` in a child process, killed when dropped.
struct Collector {
    child: Child,
    port: u16,
    lines: mpsc::Receiver<String>,
}

impl Collector {
    /// Starts the collector on `socket` (a listening socket it inherits), or
    /// on a port of its own.
    fn start(socket: Option<socket2::Socket>) -> Self {
        let stdin = match socket {
            Some(socket) => Stdio::from(std::os::fd::OwnedFd::from(socket)),
            None => Stdio::null(),
        };
        let mut child = Command::new(python())
            .arg(otlp_dir().join("collector.py"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start proxy/tests/otlp/collector.py");
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(DEADLINE)
            .expect("collector.py did not start listening within 30 s");
        let port = first
            .rsplit_once("listening on 127.0.0.1:")
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from collector.py: {first}"));
        Self { child, port, lines }
    }

    /// The next span the collector printed.
    fn next_span(&self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === helpers ===

fn config(addr: SocketAddr, timeout: Duration, max_queued_batches: usize) -> OtlpConfig {
    OtlpConfig {
        endpoint: format!("http://{addr}/v1/traces"),
        service_name: "checkout".to_string(),
        timeout,
        max_queued_batches,
    }
}

fn span(n: u8) -> SpanFields<'static> {
    SpanFields {
        trace_id: [n; 16],
        span_id: [n; 8],
        parent_span_id: None,
        start_unix_nanos: 1_700_000_000_000_000_000 + u64::from(n),
        end_unix_nanos: 1_700_000_000_250_000_000 + u64::from(n),
        method: b"GET",
        tls: false,
        host: b"shop.example:8080",
        path: b"/cart",
        query: None,
        client_address: IpAddr::from([192, 0, 2, 7]),
        version: Version::HTTP_11,
        status: Some(StatusCode::OK),
        error: false,
        upstream: Some(Target::Stable),
        outcome: OutcomeClass::Success,
        request_id: b"req-1",
    }
}

/// A batch of `spans`, in a recycled buffer when one is back.
fn batch(exporter: &Exporter, spans: &[SpanFields<'_>]) -> Vec<u8> {
    let mut buf = exporter.recycled().unwrap_or_default();
    for s in spans {
        encode_span(&mut buf, s);
    }
    buf
}

/// Polls `done` every 10 ms (as `serin_tests::eventually` does) until it
/// holds, for at most [`DEADLINE`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after 30 s waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

/// What `serin_proxy::otlp` logs, from every thread: a global subscriber,
/// installed once for this test process (a scoped one misses events when
/// tracing rebuilds its callsite cache on another thread). Tests tell their
/// lines apart by their collector's address.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> &'static Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_env_filter("serin_proxy::otlp=info")
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other test of this crate sets a global subscriber");
            logs
        })
    }

    /// The lines that mention `addr`, once one of them contains `needle`.
    fn wait_for(&self, addr: SocketAddr, needle: &str) -> String {
        let addr = addr.to_string();
        let mut lines = String::new();
        wait_for(&format!("a log line about {addr} with {needle:?}"), || {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            lines = text
                .lines()
                .filter(|line| line.contains(&addr))
                .collect::<Vec<_>>()
                .join("\n");
            lines.contains(needle)
        });
        lines
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// === the official classes decode what serin sends ===

fn attr(key: &str, value: Value) -> Value {
    let kind = if value.is_i64() {
        "int_value"
    } else {
        "string_value"
    };
    json!({ "key": key, "value": { kind: value } })
}

/// What `collector.py` prints for `s`: every field of the span.
fn expected(s: &SpanFields<'_>, name: &str, attributes: Vec<Value>) -> Value {
    let mut span = json!({
        "trace_id": hex(&s.trace_id),
        "span_id": hex(&s.span_id),
        "parent_span_id": s.parent_span_id.map(|p| hex(&p)).unwrap_or_default(),
        "trace_state": "",
        "flags": 0,
        "name": name,
        "kind": "SPAN_KIND_SERVER",
        "start_time_unix_nano": s.start_unix_nanos,
        "end_time_unix_nano": s.end_unix_nanos,
        "attributes": attributes,
        "dropped_attributes_count": 0,
        "events": [],
        "dropped_events_count": 0,
        "links": [],
        "dropped_links_count": 0,
    });
    if s.error {
        span["status"] = json!({ "code": "STATUS_CODE_ERROR", "message": "" });
    }
    span
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn spans_decode_exactly_with_the_official_otlp_classes() {
    let collector = Collector::start(None);
    let addr = SocketAddr::from(([127, 0, 0, 1], collector.port));
    let exporter = Exporter::start(&config(addr, Duration::from_secs(10), 4)).unwrap();
    let counters = exporter.counters().clone();

    // A plain GET; a child span over TLS and HTTP/2 with a query; a canary
    // 503; a method of its own; a client that left before any answer, from
    // IPv6; a request serin answered itself, with bytes that are not UTF-8.
    let plain = span(1);
    let child = SpanFields {
        parent_span_id: Some(*b"\xa1\xa2\xa3\xa4\xa5\xa6\xa7\xa8"),
        tls: true,
        host: b"shop.example",
        query: Some(b"id=7&x=%20"),
        version: Version::HTTP_2,
        ..span(2)
    };
    let canary_error = SpanFields {
        method: b"POST",
        status: Some(StatusCode::SERVICE_UNAVAILABLE),
        error: true,
        upstream: Some(Target::Canary),
        outcome: OutcomeClass::Error,
        ..span(3)
    };
    let own_method = SpanFields {
        method: b"PURGE",
        host: b"[2001:db8::1]:9000",
        outcome: OutcomeClass::Fallback,
        ..span(4)
    };
    let abandoned = SpanFields {
        client_address: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x42)),
        status: None,
        error: true,
        outcome: OutcomeClass::Abandoned,
        version: Version::HTTP_10,
        host: b"",
        ..span(5)
    };
    let long_path = format!("/{}\u{e9}", "a".repeat(300));
    let mut invalid_path = long_path.clone().into_bytes();
    invalid_path.push(0xff);
    let local = SpanFields {
        path: &invalid_path,
        request_id: b"id-\xc3",
        status: Some(StatusCode::BAD_REQUEST),
        upstream: None,
        ..span(6)
    };
    let spans = [plain, child, canary_error, own_method, abandoned, local];

    let want = [
        expected(
            &spans[0],
            "GET",
            vec![
                attr("http.request.method", json!("GET")),
                attr("url.scheme", json!("http")),
                attr("url.path", json!("/cart")),
                attr("server.address", json!("shop.example")),
                attr("server.port", json!(8080)),
                attr("client.address", json!("192.0.2.7")),
                attr("network.protocol.version", json!("1.1")),
                attr("http.response.status_code", json!(200)),
                attr("serin.upstream", json!("stable")),
                attr("serin.outcome", json!("success")),
                attr("serin.request_id", json!("req-1")),
            ],
        ),
        expected(
            &spans[1],
            "GET",
            vec![
                attr("http.request.method", json!("GET")),
                attr("url.scheme", json!("https")),
                attr("url.path", json!("/cart")),
                attr("url.query", json!("id=7&x=%20")),
                attr("server.address", json!("shop.example")),
                attr("server.port", json!(443)),
                attr("client.address", json!("192.0.2.7")),
                attr("network.protocol.version", json!("2")),
                attr("http.response.status_code", json!(200)),
                attr("serin.upstream", json!("stable")),
                attr("serin.outcome", json!("success")),
                attr("serin.request_id", json!("req-1")),
            ],
        ),
        expected(
            &spans[2],
            "POST",
            vec![
                attr("http.request.method", json!("POST")),
                attr("url.scheme", json!("http")),
                attr("url.path", json!("/cart")),
                attr("server.address", json!("shop.example")),
                attr("server.port", json!(8080)),
                attr("client.address", json!("192.0.2.7")),
                attr("network.protocol.version", json!("1.1")),
                attr("http.response.status_code", json!(503)),
                attr("error.type", json!("503")),
                attr("serin.upstream", json!("canary")),
                attr("serin.outcome", json!("error")),
                attr("serin.request_id", json!("req-1")),
            ],
        ),
        expected(
            &spans[3],
            "HTTP",
            vec![
                attr("http.request.method", json!("_OTHER")),
                attr("http.request.method_original", json!("PURGE")),
                attr("url.scheme", json!("http")),
                attr("url.path", json!("/cart")),
                attr("server.address", json!("2001:db8::1")),
                attr("server.port", json!(9000)),
                attr("client.address", json!("192.0.2.7")),
                attr("network.protocol.version", json!("1.1")),
                attr("http.response.status_code", json!(200)),
                attr("serin.upstream", json!("stable")),
                attr("serin.outcome", json!("fallback")),
                attr("serin.request_id", json!("req-1")),
            ],
        ),
        expected(
            &spans[4],
            "GET",
            vec![
                attr("http.request.method", json!("GET")),
                attr("url.scheme", json!("http")),
                attr("url.path", json!("/cart")),
                attr("client.address", json!("2001:db8::42")),
                attr("network.protocol.version", json!("1.0")),
                attr("error.type", json!("_OTHER")),
                attr("serin.upstream", json!("stable")),
                attr("serin.outcome", json!("abandoned")),
                attr("serin.request_id", json!("req-1")),
            ],
        ),
        expected(
            &spans[5],
            "GET",
            vec![
                attr("http.request.method", json!("GET")),
                attr("url.scheme", json!("http")),
                attr("url.path", json!(format!("{long_path}\u{fffd}"))),
                attr("server.address", json!("shop.example")),
                attr("server.port", json!(8080)),
                attr("client.address", json!("192.0.2.7")),
                attr("network.protocol.version", json!("1.1")),
                attr("http.response.status_code", json!(400)),
                attr("serin.outcome", json!("success")),
                attr("serin.request_id", json!("id-\u{fffd}")),
            ],
        ),
    ];

    // Three batches of one, two and three spans. The first is waited for, so
    // that its buffer comes back for the second; the last is sent as the
    // exporter is dropped, which exports it before returning.
    assert!(exporter.try_send(batch(&exporter, &spans[..1]), 1).is_ok());
    let deadline = Instant::now() + DEADLINE;
    let mut got = vec![collector.next_span(deadline).expect("the first span")];
    let mut reused = None;
    wait_for("the first batch's buffer back", || {
        reused = exporter.recycled();
        reused.is_some()
    });
    let reused = reused.unwrap();
    assert!(reused.is_empty() && reused.capacity() > 0);
    let mut second = reused;
    for s in &spans[1..3] {
        encode_span(&mut second, s);
    }
    assert!(exporter.try_send(second, 2).is_ok());
    assert!(exporter.try_send(batch(&exporter, &spans[3..]), 3).is_ok());
    drop(exporter);
    while got.len() < spans.len() {
        got.push(collector.next_span(deadline).expect("all six spans"));
    }

    let port = got[0]["request"]["client_port"].clone();
    for (line, want) in got.iter().zip(&want) {
        assert_eq!(line["span"], *want, "{line:#}");
        assert_eq!(
            line["request"],
            json!({
                "path": "/v1/traces",
                "content_type": "application/x-protobuf",
                "client_port": port,
                "canonical": true,
            }),
            "one kept connection, and bytes the official encoder would write"
        );
        assert_eq!(
            line["resource"],
            json!({
                "attributes": [attr("service.name", json!("checkout"))],
                "dropped_attributes_count": 0,
                "entity_refs": [],
            })
        );
        assert_eq!(
            line["scope"],
            json!({
                "name": "serin",
                "version": env!("CARGO_PKG_VERSION"),
                "attributes": [],
                "dropped_attributes_count": 0,
            })
        );
    }
    assert_eq!(count(&counters.spans_exported), 6);
    assert_eq!(count(&counters.spans_dropped), 0);
    assert_eq!(count(&counters.export_failures), 0);
}

// === failures cost spans, never waiting ===

#[test]
fn a_collector_that_is_down_costs_spans_not_waits_and_export_resumes_when_it_is_back() {
    // A bound socket that does not listen: its port refuses connections
    // until the collector is started on it.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let logs = Logs::capture();
    let exporter = Exporter::start(&config(addr, Duration::from_secs(5), 2)).unwrap();
    let counters = exporter.counters().clone();

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut refused_by_queue = 0;
    for n in 0..200u8 {
        let buf = batch(&exporter, &[span(n)]);
        let sent = Instant::now();
        let result = exporter.try_send(buf, 1);
        slowest = slowest.max(sent.elapsed());
        refused_by_queue += u32::from(result.is_err());
    }
    assert!(
        slowest < Duration::from_millis(100),
        "try_send took {slowest:?}"
    );
    wait_for("every span counted as dropped", || {
        count(&counters.spans_dropped) == 200
    });
    assert_eq!(count(&counters.spans_exported), 0);
    assert!(count(&counters.export_failures) >= 1);
    let warning = format!(
        "OTLP export to http://{addr}/v1/traces: connection refused; \
         is the collector running and listening there?; spans are being dropped"
    );
    let text = logs.wait_for(addr, &warning);
    let warnings = text.matches(&warning).count();
    let most = 1 + started.elapsed().as_secs() / MAX_BACKOFF.as_secs();
    assert!(
        (1..=most as usize).contains(&warnings),
        "{warnings} warnings: {text}"
    );
    eprintln!("{refused_by_queue} batches refused by the full queue");

    // The collector comes up on that port; a new batch goes through once
    // the backoff is over.
    socket.listen(128).unwrap();
    let collector = Collector::start(Some(socket));
    assert_eq!(collector.port, addr.port());
    let deadline = Instant::now() + DEADLINE;
    let mut next = 0u8;
    let resumed = loop {
        assert!(
            Instant::now() < deadline,
            "export did not resume within 30 s"
        );
        let buf = batch(&exporter, &[span(next)]);
        let _ = exporter.try_send(buf, 1);
        next = next.wrapping_add(1);
        // Wait a little for it; the backoff may still drop it.
        if let Some(line) = collector.next_span(Instant::now() + Duration::from_millis(200)) {
            break line;
        }
    };
    assert_eq!(resumed["request"]["path"], "/v1/traces");
    wait_for("the export counted", || {
        count(&counters.spans_exported) >= 1
    });
    logs.wait_for(addr, "works again");
}

/// A collector written here: each connection is served by `serve` on a
/// thread of its own. Stops accepting when dropped.
struct FakeCollector {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeCollector {
    fn start(serve: fn(TcpStream)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Relaxed) {
                    break;
                }
                let stream = stream.unwrap();
                std::thread::spawn(move || serve(stream));
            }
        });
        Self {
            addr,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for FakeCollector {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wakes the accept loop, which sees the flag.
        let _ = TcpStream::connect(self.addr);
        let _ = self.accept.take().unwrap().join();
    }
}

/// Reads one request (head and `content-length` body); false at the
/// connection's end.
fn read_request(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return true;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn an_error_answer_costs_the_batch_and_counts_a_failure() {
    let collector = FakeCollector::start(|mut stream| {
        while read_request(&mut stream) {
            let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy";
            if stream.write_all(answer).is_err() {
                break;
            }
        }
    });
    let logs = Logs::capture();
    let exporter = Exporter::start(&config(collector.addr, DEADLINE, 4)).unwrap();
    let counters = exporter.counters().clone();
    assert!(exporter
        .try_send(batch(&exporter, &[span(1), span(2), span(3)]), 3)
        .is_ok());
    wait_for("the failed export counted", || {
        count(&counters.export_failures) == 1
    });
    assert_eq!(count(&counters.spans_dropped), 3);
    assert_eq!(count(&counters.spans_exported), 0);
    logs.wait_for(
        collector.addr,
        "the collector answered 503 Service Unavailable; \
         the collector is overloaded or refusing data; spans are being dropped",
    );
}

#[test]
fn a_collector_that_never_answers_costs_one_timeout_and_never_holds_up_a_sender() {
    // Connections complete in the kernel's backlog; nothing ever answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_secs(1);
    let logs = Logs::capture();
    let exporter = Exporter::start(&config(addr, timeout, 2)).unwrap();
    let counters = exporter.counters().clone();

    // While the thread waits for the answer, the queue fills, and the rest
    // come back at once.
    let mut refused = 0;
    for n in 0..20u8 {
        let buf = batch(&exporter, &[span(n)]);
        let sent = Instant::now();
        if let Err(back) = exporter.try_send(buf, 1) {
            assert!(!back.is_empty(), "the batch comes back as it was");
            refused += 1;
        }
        assert!(sent.elapsed() < timeout / 2, "try_send waited");
    }
    assert!(refused > 0, "a queue of 2 took 20 batches");

    // Dropping the exporter while it waits for the answer: it waits at most
    // the timeout for the thread.
    let dropping = Instant::now();
    drop(exporter);
    assert!(
        dropping.elapsed() < timeout + Duration::from_millis(500),
        "drop took {:?}",
        dropping.elapsed()
    );
    wait_for("the timed out export counted", || {
        count(&counters.export_failures) == 1
    });
    wait_for("every span counted as dropped", || {
        count(&counters.spans_dropped) == 20
    });
    logs.wait_for(
        addr,
        "no answer within 1s; is the collector overloaded, or the address wrong?",
    );
}

#[test]
fn a_kept_connection_the_collector_closed_is_replaced_without_losing_a_batch() {
    // Answers as if it kept the connection, then closes it.
    let collector = FakeCollector::start(|mut stream| {
        if read_request(&mut stream) {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let exporter = Exporter::start(&config(collector.addr, DEADLINE, 4)).unwrap();
    let counters = exporter.counters().clone();
    for n in 1..=3u64 {
        assert!(exporter
            .try_send(batch(&exporter, &[span(n as u8)]), 1)
            .is_ok());
        wait_for("the batch exported", || {
            count(&counters.spans_exported) == n
        });
    }
    assert_eq!(count(&counters.export_failures), 0);
    assert_eq!(count(&counters.spans_dropped), 0);
}

#[test]
fn a_bad_config_is_refused_with_what_to_write() {
    let refused = |config: OtlpConfig| match Exporter::start(&config) {
        Ok(_) => panic!("{config:?} was accepted"),
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            e.to_string()
        }
    };
    let https = refused(OtlpConfig {
        endpoint: "https://collector:4318/v1/traces".to_string(),
        ..OtlpConfig::default()
    });
    assert!(https.contains("https is not supported yet"), "{https}");
    let timeout = refused(OtlpConfig {
        timeout: Duration::ZERO,
        ..OtlpConfig::default()
    });
    assert!(timeout.contains("the default is 10s"), "{timeout}");
    let queue = refused(OtlpConfig {
        max_queued_batches: 0,
        ..OtlpConfig::default()
    });
    assert!(queue.contains("the default is 64"), "{queue}");
}

// === Backoff ===

#[test]
fn backoff_doubles_to_its_bound_and_warns_once_per_bound() {
    let start = Instant::now();
    let mut backoff = Backoff::default();
    assert!(!backoff.waiting(start));
    backoff.dropped = 3;
    assert_eq!(backoff.failed(start), Some(3), "the first failure warns");
    assert!(backoff.waiting(start + FIRST_BACKOFF / 2));
    assert!(!backoff.waiting(start + FIRST_BACKOFF));

    // Failing on: 0.1, 0.2, … 3.2 s, then 5 s pauses; a warning only when
    // 5 s have passed since the last one.
    let mut now = start;
    let mut last_warning = start;
    for _ in 0..20 {
        now += backoff.delay;
        assert!(!backoff.waiting(now));
        if backoff.failed(now).is_some() {
            assert!(now - last_warning >= MAX_BACKOFF);
            last_warning = now;
        }
        assert!(backoff.delay <= MAX_BACKOFF);
    }
    assert_eq!(backoff.delay, MAX_BACKOFF);
    assert!(now - last_warning <= MAX_BACKOFF, "it kept warning");

    backoff.dropped += 7;
    assert_eq!(backoff.succeeded(), Some(10));
    assert!(!backoff.waiting(now));
    assert_eq!(backoff.succeeded(), None, "already working");
    // A new outage right after the last warning waits for the next.
    assert_eq!(backoff.failed(now), None);
    assert_eq!(backoff.delay, FIRST_BACKOFF);
    assert_eq!(backoff.failed(last_warning + MAX_BACKOFF), Some(0));
}
