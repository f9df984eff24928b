//! serin's own HTTP/1.1 upstream client, end to end: a real proxy in front of
//! a raw-socket upstream that answers with exactly the bytes each test
//! scripts. These are the framings and failures a well-behaved hyper
//! upstream never produces: chunked trailers split across writes, HTTP/1.0
//! bodies delimited by close, interim 1xx responses, an early 413 during an
//! upload, an idle connection closed under the pool, garbage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use serin_proxy::{Proxy, ProxyConfig, RouteTable, Routes, Target, Upstream, UpstreamProtocol};
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream does with one request.
enum Reply {
    /// Writes these pieces (a short pause between them, so they arrive as
    /// separate reads) and keeps the connection open.
    Pieces(Vec<&'static [u8]>),
    /// Writes these bytes and closes the connection.
    ThenClose(&'static [u8]),
    /// Closes without answering.
    Close,
    /// Answers at once, without reading the request body.
    Early(&'static [u8]),
}

/// A raw HTTP/1.1 upstream: for each request head it reads, it asks the
/// script (given the connection's request count and the head) what to send.
struct Scripted {
    url: String,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl Scripted {
    async fn start(script: fn(u64, &str) -> Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script, r.clone()));
            }
        });
        Self {
            url,
            connections,
            requests,
        }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, script: fn(u64, &str) -> Reply, requests: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        // Read one head (and a Content-Length body, unless answering early).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        buf.drain(..head_end);
        requests.fetch_add(1, Ordering::SeqCst);
        let reply = script(n, &head);
        n += 1;
        if !matches!(reply, Reply::Early(_)) {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < length {
                let mut chunk = [0u8; 65536];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            buf.drain(..length);
        }
        match reply {
            Reply::Pieces(pieces) => {
                for piece in pieces {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Reply::ThenClose(bytes) | Reply::Early(bytes) => {
                let _ = stream.write_all(bytes).await;
                let _ = stream.shutdown().await;
                return;
            }
            Reply::Close => return,
        }
    }
}

/// A proxy sending everything to `upstream` (as stable, weight 0).
fn proxy_to(upstream: &Scripted) -> (Proxy, String) {
    let mut config = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Upstream::parse(&upstream.url, UpstreamProtocol::Http1).unwrap(),
        Upstream::parse(&closed_port_url(), UpstreamProtocol::Http1).unwrap(),
    );
    config.response_timeout = Duration::from_secs(10);
    let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
    let base = format!("http://{}", proxy.local_addr());
    (proxy, base)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_split_across_reads_arrive_whole() {
    let up = Scripted::start(|_, _| {
        Reply::Pieces(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n5\r",
            b"\nhel",
            b"lo\r\n6;ext=1\r\n world\r\n0\r\n",
            b"x-trailer: t\r\n\r\n",
        ])
    })
    .await;
    let (_proxy, base) = proxy_to(&up);
    let client = http1_client();
    for _ in 0..3 {
        let a = get(&client, &format!("{base}/"), &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, "hello world");
        assert_eq!(a.headers["x-a"], "1");
    }
    assert_eq!(
        up.connections(),
        1,
        "a chunked body that ended cleanly is reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_delimited_by_close_and_connection_close_are_not_reused() {
    let up = Scripted::start(|n, _| match n % 2 {
        0 => Reply::ThenClose(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close"),
        _ => Reply::ThenClose(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nclose",
        ),
    })
    .await;
    let (_proxy, base) = proxy_to(&up);
    let client = http1_client();
    for i in 0..4 {
        let a = get(&client, &format!("{base}/"), &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, "until close", "request {i}");
        assert_eq!(a.headers.get("connection"), None, "hop-by-hop stripped");
    }
    assert_eq!(up.connections(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_skipped_and_bodiless_responses_end() {
    let up = Scripted::start(|_, head| {
        if head.starts_with("head ") {
            // A HEAD response announces a length it does not send.
            Reply::Pieces(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"])
        } else if head.starts_with("delete ") {
            Reply::Pieces(vec![b"HTTP/1.1 204 No Content\r\n\r\n"])
        } else {
            Reply::Pieces(vec![
                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
            ])
        }
    })
    .await;
    let (_proxy, base) = proxy_to(&up);
    let client = http1_client();
    let a = get(&client, &format!("{base}/"), &[]).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "final"));
    let head = Request::head(format!("{base}/")).body(empty()).unwrap();
    let a = send(&client, head).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-length"], "1000");
    let delete = Request::delete(format!("{base}/")).body(empty()).unwrap();
    assert_eq!(send(&client, delete).await.status, StatusCode::NO_CONTENT);
    // The same upstream connection carried all three: nothing was left unread.
    let a = get(&client, &format!("{base}/"), &[]).await;
    assert_eq!(a.body, "final");
    assert_eq!(up.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closed_by_the_upstream_is_not_used_again() {
    // Every connection answers once, then closes after the response, as an
    // upstream with a short keep-alive timeout does.
    let up = Scripted::start(|_, _| Reply::ThenClose(OK)).await;
    let (proxy, base) = proxy_to(&up);
    let client = http1_client();
    for i in 1..=5 {
        let a = get(&client, &format!("{base}/"), &[]).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    assert_eq!(up.connections(), 5);
    assert_eq!(proxy.stats().totals(Target::Stable).errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_to_a_closing_connection_is_replayed_only_when_safe() {
    // The second request on each connection is dropped unanswered: the race
    // of a keep-alive connection closing just as a request is sent.
    let up = Scripted::start(|n, _| {
        if n == 0 {
            Reply::Pieces(vec![OK])
        } else {
            Reply::Close
        }
    })
    .await;
    let (proxy, base) = proxy_to(&up);
    let client = http1_client();
    assert_eq!(
        get(&client, &format!("{base}/"), &[]).await.status,
        StatusCode::OK
    );
    // A GET is idempotent and bodiless: replayed on a new connection.
    let a = get(&client, &format!("{base}/"), &[]).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(up.connections(), 2);
    assert_eq!(proxy.stats().totals(Target::Stable).errors, 0);
    // A POST may have been acted on: never replayed, a 502 instead.
    let post = Request::post(format!("{base}/")).body(empty()).unwrap();
    let a = send(&client, post).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    assert_eq!(up.requests(), 4, "the POST was sent exactly once");
    assert_eq!(proxy.stats().totals(Target::Stable).errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_response_during_an_upload_reaches_the_client() {
    let up = Scripted::start(|_, _| {
        Reply::Early(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big\n")
    })
    .await;
    let (proxy, _base) = proxy_to(&up);
    // The client announces 64 MiB and sends 64 KiB, then waits: the upload
    // is far from done when the upstream's 413 arrives, and the 413 must
    // still reach the client. (serin may close the client's connection after
    // the 413, so the client's own write may fail: that is not the point.)
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: 67108864\r\n\r\n")
        .await
        .unwrap();
    let _ = client.write_all(&[b'x'; 65536]).await;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = tokio::time::timeout(Duration::from_secs(20), client.read(&mut chunk))
            .await
            .expect("the early response arrives while the upload is unfinished")
            .unwrap();
        assert!(k > 0, "closed without a response");
        got.extend_from_slice(&chunk[..k]);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    // And the proxy goes on serving.
    let client = http1_client();
    let up_ok = Scripted::start(|_, _| Reply::Pieces(vec![OK])).await;
    let (_p2, base2) = proxy_to(&up_ok);
    assert_eq!(
        get(&client, &format!("{base2}/"), &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_contradictions_from_the_upstream_are_502_and_serving_goes_on() {
    let up = Scripted::start(|_, head| {
        if head.contains("/garbage") {
            Reply::ThenClose(b"HELLO THERE\r\n\r\n")
        } else if head.contains("/two-lengths") {
            Reply::ThenClose(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            )
        } else if head.contains("/bad-chunk") {
            Reply::ThenClose(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        } else {
            Reply::Pieces(vec![OK])
        }
    })
    .await;
    let (proxy, base) = proxy_to(&up);
    let client = http1_client();
    for path in ["/garbage", "/two-lengths"] {
        let a = get(&client, &format!("{base}{path}"), &[]).await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{path}: {}", a.body);
    }
    assert_eq!(proxy.stats().totals(Target::Stable).errors, 2);
    // A body that turns bad after the head: the client's response breaks
    // off (before or after its head, depending on when hyper flushes it).
    let resp = client
        .request(
            Request::get(format!("{base}/bad-chunk"))
                .body(empty())
                .unwrap(),
        )
        .await;
    if let Ok(resp) = resp {
        assert!(http_body_util::BodyExt::collect(resp.into_body())
            .await
            .is_err());
    }
    let a = get(&client, &format!("{base}/fine"), &[]).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_unknown_length_goes_upstream_chunked() {
    // A raw upstream records the bytes serin sends.
    let raw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_url = format!("http://{}", raw.local_addr().unwrap());
    let mut config = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Upstream::parse(&raw_url, UpstreamProtocol::Http1).unwrap(),
        Upstream::parse(&closed_port_url(), UpstreamProtocol::Http1).unwrap(),
    );
    config.response_timeout = Duration::from_secs(10);
    let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
    let seen = tokio::spawn(async move {
        let (mut s, _) = raw.accept().await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.ends_with(b"0\r\n\r\n") {
            let k = s.read(&mut chunk).await.unwrap();
            assert!(k > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..k]);
        }
        s.write_all(OK).await.unwrap();
        String::from_utf8(got).unwrap()
    });
    // The client's chunk boundaries and its Transfer-Encoding are its own
    // hop's business; serin re-frames what it forwards.
    let answer = raw_exchange(
        proxy.local_addr(),
        b"PUT /put?x=1 HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = seen.await.unwrap();
    assert!(seen.starts_with("PUT /put?x=1 HTTP/1.1\r\n"), "{seen}");
    assert!(
        seen.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{seen}"
    );
    assert!(seen.contains("\r\nhost: app\r\n"), "{seen}");
    let body = &seen[seen.find("\r\n\r\n").unwrap() + 4..];
    let mut decoded = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            break;
        }
        decoded.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    assert_eq!(decoded, "hello, world");
}
