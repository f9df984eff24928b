//! TLS to upstreams, end to end: a real `Proxy` in front of real TLS
//! upstreams (HTTP/1.1 and HTTP/2 by ALPN, certificates from a test CA,
//! client certificates required or not), driven by real clients. Covers
//! trust (system roots are not enough for a private CA; `ca` is), the name
//! checked, mTLS, ALPN, session resumption, uploads and upgrades through
//! TLS, and the CA, certificate and key reloaded from disk.

use std::time::Duration;

use http::{Request, StatusCode};
use serin_proxy::{
    Proxy, ProxyConfig, RouteTable, Routes, Upstream, UpstreamProtocol, UpstreamTls,
};
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often the proxy under test reads its TLS files.
const RELOAD_INTERVAL: Duration = Duration::from_millis(50);
/// How long a reload may take to show on a busy machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// A proxy whose stable upstream is `stable` (TLS, or not) with `tls`
/// settings, and whose canary is a plain upstream that never answers here.
struct Harness {
    proxy: Proxy,
    _canary: TestUpstream,
}

impl Harness {
    async fn start(
        stable: &TestUpstream,
        protocol: UpstreamProtocol,
        tls: UpstreamTls,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Self {
        let canary = TestUpstream::start("canary").await;
        let mut upstream = Upstream::parse(&stable.url(), protocol).unwrap();
        upstream.tls = Some(tls);
        let mut config = ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            Upstream::parse(&canary.url(), UpstreamProtocol::Http1).unwrap(),
        );
        config.tls_reload_interval = RELOAD_INTERVAL;
        tweak(&mut config);
        let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
        Self {
            proxy,
            _canary: canary,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.local_addr())
    }

    async fn get(&self, path: &str) -> Answer {
        get(&http1_client(), &self.url(path), &[]).await
    }

    /// The reload and failure counts of the stable upstream's TLS files.
    fn reloads(&self) -> (u64, u64) {
        let c = self
            .proxy
            .stats()
            .tls_reload("stable")
            .expect("the stable upstream's files are watched");
        (
            c.reloads.load(std::sync::atomic::Ordering::Relaxed),
            c.failures.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

fn trusting(ca: &TestCa) -> UpstreamTls {
    UpstreamTls {
        ca: Some(ca.cert_path.clone()),
        ..UpstreamTls::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_spoken_to_over_tls_and_sessions_resume() {
    let ca = TestCa::new("upstream ca");
    let cert = ca.server(&["localhost", "127.0.0.1"]);
    let stable = TestUpstream::start_tls("stable", cert.server_config(&[b"http/1.1"], None)).await;
    assert!(stable.url().starts_with("https://"));
    // No idle connections kept: every request makes a new TLS connection.
    let h = Harness::start(&stable, UpstreamProtocol::Http1, trusting(&ca), |c| {
        c.pool.max_idle = 0
    })
    .await;
    for _ in 0..5 {
        let a = h.get("/").await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "stable"));
    }
    assert_eq!(stable.connections(), 5);
    assert!(
        stable.resumed() >= 3,
        "later connections resume the first one's session (resumed {})",
        stable.resumed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_tls_connection_carries_many_requests_bodies_and_upgrades() {
    let ca = TestCa::new("upstream ca");
    let cert = ca.server(&["127.0.0.1"]);
    let stable = TestUpstream::start_tls("stable", cert.server_config(&[b"http/1.1"], None)).await;
    let h = Harness::start(&stable, UpstreamProtocol::Http1, trusting(&ca), |_| {}).await;
    let client = http1_client();
    for _ in 0..50 {
        assert_eq!(get(&client, &h.url("/"), &[]).await.status, StatusCode::OK);
    }
    assert_eq!(stable.connections(), 1, "one keep-alive TLS connection");

    const SIZE: u64 = 8 * 1024 * 1024;
    let req = Request::post(h.url("/upload"))
        .body(http_body_util::Either::Right(TestBody::generated(SIZE)))
        .unwrap();
    assert_eq!(send(&client, req).await.body, format!("received {SIZE}"));
    assert_eq!(
        download_len(&client, &h.url(&format!("/download/{SIZE}"))).await,
        SIZE
    );

    // An upgrade: the TLS connection becomes the tunnel.
    let mut tcp = tokio::net::TcpStream::connect(h.proxy.local_addr())
        .await
        .unwrap();
    tcp.write_all(
        b"GET /upgrade HTTP/1.1\r\nhost: app\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the 101: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    tcp.write_all(b"ping over tls").await.unwrap();
    let mut echoed = vec![0u8; 13];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"ping over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_spoken_when_alpn_agrees_on_h2() {
    let ca = TestCa::new("upstream ca");
    let cert = ca.server(&["127.0.0.1"]);
    let stable = TestUpstream::start_tls("stable", cert.server_config(&[b"h2"], None)).await;
    stable.set(Behavior {
        grpc_status: Some(0),
        ..Behavior::default()
    });
    let h = Harness::start(&stable, UpstreamProtocol::Http2, trusting(&ca), |_| {}).await;
    let client = h2c_client();
    for _ in 0..10 {
        let a = get(
            &client,
            &h.url("/svc/Method"),
            &[("content-type", "application/grpc")],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    assert_eq!(stable.http2_connections(), 1, "one shared h2 connection");
    eventually(DEADLINE, "ten gRPC successes recorded", || async {
        let totals = h.proxy.stats().totals(serin_proxy::Target::Stable);
        (totals.successes, totals.errors) == (10, 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_will_not_speak_the_configured_protocol_is_refused() {
    let ca = TestCa::new("upstream ca");
    let cert = ca.server(&["127.0.0.1"]);
    // Configured for h2 (gRPC); the upstream only offers HTTP/1.1.
    let stable = TestUpstream::start_tls("stable", cert.server_config(&[b"http/1.1"], None)).await;
    let h = Harness::start(&stable, UpstreamProtocol::Http2, trusting(&ca), |_| {}).await;
    let a = h.get("/").await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}");
    assert_eq!(stable.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_checked_against_the_trusted_cas_and_the_name() {
    let ca = TestCa::new("upstream ca");
    // Issued for a name, not the address serin dials.
    let cert = ca.server(&["app.internal"]);
    let stable = TestUpstream::start_tls("stable", cert.server_config(&[b"http/1.1"], None)).await;

    // The system roots do not know the test CA.
    let h = Harness::start(
        &stable,
        UpstreamProtocol::Http1,
        UpstreamTls::default(),
        |_| {},
    )
    .await;
    assert_eq!(h.get("/").await.status, StatusCode::BAD_GATEWAY);
    drop(h);
    // Trusted, but the URL's host (127.0.0.1) is not in the certificate.
    let h = Harness::start(&stable, UpstreamProtocol::Http1, trusting(&ca), |_| {}).await;
    assert_eq!(h.get("/").await.status, StatusCode::BAD_GATEWAY);
    drop(h);
    // `server_name` says which name to check and send as SNI.
    let tls = UpstreamTls {
        server_name: Some("app.internal".into()),
        ..trusting(&ca)
    };
    let h = Harness::start(&stable, UpstreamProtocol::Http1, tls, |_| {}).await;
    assert_eq!(h.get("/").await.body, "stable");
    assert_eq!(
        stable.requests(),
        1,
        "refused handshakes carried no request"
    );
    assert!(stable.failed_handshakes() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_upstream_requires_one() {
    let ca = TestCa::new("mesh ca");
    let cert = ca.server(&["127.0.0.1"]);
    let config = cert.server_config(&[b"http/1.1"], Some(&ca));
    let stable = TestUpstream::start_tls("stable", config).await;

    let h = Harness::start(&stable, UpstreamProtocol::Http1, trusting(&ca), |_| {}).await;
    assert_eq!(h.get("/").await.status, StatusCode::BAD_GATEWAY);
    drop(h);

    let client = ca.client("spiffe://cluster.local/ns/app/sa/serin");
    let tls = UpstreamTls {
        cert: Some(client.cert_path.clone()),
        key: Some(client.key_path.clone()),
        ..trusting(&ca)
    };
    let h = Harness::start(&stable, UpstreamProtocol::Http1, tls, |_| {}).await;
    assert_eq!(h.get("/").await.body, "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ca_is_used_by_new_connections_and_a_bad_one_is_refused() {
    let (old_ca, new_ca) = (TestCa::new("old ca"), TestCa::new("new ca"));
    // The upstream's certificate is from the new CA; serin trusts the old one.
    let cert = new_ca.server(&["127.0.0.1"]);
    let stable = TestUpstream::start_tls("stable", cert.server_config(&[b"http/1.1"], None)).await;
    let dir = temp_dir("upstream-ca");
    let ca_path = dir.join("ca.pem");
    std::fs::copy(&old_ca.cert_path, &ca_path).unwrap();
    let tls = UpstreamTls {
        ca: Some(ca_path.clone()),
        ..UpstreamTls::default()
    };
    let h = Harness::start(&stable, UpstreamProtocol::Http1, tls, |c| {
        c.pool.max_idle = 0
    })
    .await;
    assert_eq!(h.get("/").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(h.reloads(), (0, 0));

    // Replaced as an operator would: written aside, renamed over.
    let aside = dir.join("ca.pem.new");
    std::fs::copy(&new_ca.cert_path, &aside).unwrap();
    std::fs::rename(&aside, &ca_path).unwrap();
    eventually(DEADLINE, "the new CA is loaded", || async {
        h.reloads() == (1, 0)
    })
    .await;
    assert_eq!(h.get("/").await.body, "stable");

    // A broken file: counted, and the loaded CA stays in use.
    std::fs::write(&ca_path, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    eventually(DEADLINE, "the bad CA is refused", || async {
        h.reloads() == (1, 1)
    })
    .await;
    assert_eq!(h.get("/").await.body, "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_auto_speaks_what_alpn_chooses() {
    let ca = TestCa::new("upstream ca");
    let cert = ca.server(&["127.0.0.1"]);
    for (alpn, h2) in [(&b"h2"[..], true), (&b"http/1.1"[..], false)] {
        let stable = TestUpstream::start_tls("stable", cert.server_config(&[alpn], None)).await;
        let h = Harness::start(&stable, UpstreamProtocol::Auto, trusting(&ca), |_| {}).await;
        let client = http1_client();
        for _ in 0..20 {
            assert_eq!(get(&client, &h.url("/"), &[]).await.body, "stable");
        }
        assert_eq!(stable.connections(), 1, "the learning connection is used");
        assert_eq!(stable.http2_connections(), u64::from(h2));
    }
    assert!(matches!(
        Upstream::parse("http://127.0.0.1:1", UpstreamProtocol::Auto),
        Err(serin_proxy::UpstreamUrlError::AutoWithoutTls { .. })
    ));
}
