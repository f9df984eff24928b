//! Client certificates on the listener (mTLS), end to end: a real `Proxy`
//! serving TLS with `client_ca`, real rustls clients with and without
//! certificates from the right CA and from another, over HTTP/1.1 and
//! HTTP/2, in front of upstreams that echo the headers they get. What the
//! client sees (a refused handshake, a status) and what the upstream gets
//! (the identity header) are asserted; the CA file is swapped on disk while
//! connections are open.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{PrivateKeyDer, ServerName};
use serin_proxy::split::sticky_bucket;
use serin_proxy::{
    ClientAuth, ClientAuthMode, Proxy, ProxyConfig, Rate, RateLimit, RateLimitKey, RouteTable,
    Routes, TlsFiles, Upstream, UpstreamProtocol,
};
use serin_tests::*;

/// How often the proxy under test reads its TLS files.
const RELOAD_INTERVAL: Duration = Duration::from_millis(50);
/// How long a reload may take to show on a busy machine.
const DEADLINE: Duration = Duration::from_secs(20);
/// The identity header the tests configure.
const IDENTITY: &str = "x-client-identity";
const SPIFFE_A: &str = "spiffe://cluster.local/ns/a/sa/a";
const SPIFFE_B: &str = "spiffe://cluster.local/ns/b/sa/b";

struct Harness {
    proxy: Proxy,
    /// Issued the proxy's server certificate; clients trust it.
    server_ca: TestCa,
    /// The `client_ca` file the proxy reads.
    ca_file: std::path::PathBuf,
    _dir: TempDir,
    _stable: TestUpstream,
    _canary: TestUpstream,
}

impl Harness {
    /// A TLS proxy verifying clients against `clients` in `mode`, sending
    /// the identity in [`IDENTITY`], after `configure`.
    async fn start(
        clients: &TestCa,
        mode: ClientAuthMode,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> Self {
        let (stable, canary) = upstreams().await;
        let server_ca = TestCa::new("server CA");
        let server = server_ca.server(&["localhost", "127.0.0.1"]);
        let dir = temp_dir("mtls");
        let ca_file = dir.join("clients-ca.pem");
        replace(
            &ca_file,
            &std::fs::read_to_string(&clients.cert_path).unwrap(),
        );
        let mut config = proxy_config(&stable, &canary);
        config.tls = Some(TlsFiles {
            cert: server.cert_path.clone(),
            key: server.key_path.clone(),
            client_auth: Some(ClientAuth {
                ca: ca_file.clone(),
                mode,
            }),
        });
        config.tls_reload_interval = RELOAD_INTERVAL;
        config.headers.identity_header = Some(HeaderName::from_static(IDENTITY));
        configure(&mut config);
        let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
        Self {
            proxy,
            server_ca,
            ca_file,
            _dir: dir,
            _stable: stable,
            _canary: canary,
        }
    }

    /// A new connection speaking `alpn` (`h2` or `http/1.1`), presenting
    /// `cert` if given. A refused handshake shows as an error here or on
    /// the first request (in TLS 1.3 the client finishes first).
    async fn connect(&self, alpn: &[u8], cert: Option<&Issued>) -> Result<Sender, String> {
        let client = self.client(alpn, cert);
        self.connect_with(&client).await.map(|(sender, _)| sender)
    }

    /// A client config trusting the proxy, offering `alpn`, presenting
    /// `cert` if given; its connections resume the sessions of earlier ones.
    fn client(&self, alpn: &[u8], cert: Option<&Issued>) -> Arc<rustls::ClientConfig> {
        let roots = {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.server_ca.der.clone()).unwrap();
            roots
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut client = match cert {
            Some(cert) => {
                let key = PrivateKeyDer::try_from(
                    rcgen::KeyPair::from_pem(&cert.key_pem)
                        .unwrap()
                        .serialize_der(),
                )
                .unwrap();
                builder
                    .with_client_auth_cert(vec![cert.der.clone()], key)
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        client.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(client)
    }

    /// A new connection made with `client`, and whether it resumed a session.
    async fn connect_with(
        &self,
        client: &Arc<rustls::ClientConfig>,
    ) -> Result<(Sender, bool), String> {
        let tcp = tokio::net::TcpStream::connect(self.proxy.local_addr())
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let io = TokioIo::new(tls);
        let sender = if client.alpn_protocols[0] == b"h2" {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::spawn(conn);
            Sender::H1(sender)
        };
        Ok((sender, resumed))
    }

    /// One GET of `path` with `headers` on a new connection.
    async fn get(
        &self,
        alpn: &[u8],
        cert: Option<&Issued>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answered, String> {
        self.connect(alpn, cert).await?.get(path, headers).await
    }

    fn reloads(&self) -> u64 {
        let counters = self.proxy.stats().tls_reload("listener").unwrap();
        counters.reloads.load(Relaxed)
    }

    fn failures(&self) -> u64 {
        let counters = self.proxy.stats().tls_reload("listener").unwrap();
        counters.failures.load(Relaxed)
    }
}

/// A client connection's request sender.
enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

/// What a request got back.
#[derive(Debug)]
struct Answered {
    status: StatusCode,
    upstream: String,
    body: String,
}

impl Answered {
    /// The values of `name` in the headers an `/echo-headers` upstream got.
    fn echoed(&self, name: &str) -> Vec<&str> {
        self.body
            .lines()
            .filter_map(|line| line.split_once(": "))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }
}

impl Sender {
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answered, String> {
        let mut req = Request::get(match self {
            Sender::H1(_) => path.to_string(),
            Sender::H2(_) => format!("https://localhost{path}"),
        });
        if let Sender::H1(_) = self {
            req = req.header("host", "localhost");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).unwrap();
        // Once the connection has taken the previous exchange's end.
        let resp = match self {
            Sender::H1(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
            Sender::H2(s) => match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            },
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let upstream = resp
            .headers()
            .get("x-serin-upstream")
            .map_or("", |v| v.to_str().unwrap())
            .to_string();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Answered {
            status,
            upstream,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Stable and canary upstreams (HTTP/1.1) that echo headers on `/echo-headers`.
async fn upstreams() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start("stable").await,
        TestUpstream::start("canary").await,
    )
}

/// A config with every default, on 127.0.0.1 port 0, for these upstreams.
fn proxy_config(stable: &TestUpstream, canary: &TestUpstream) -> ProxyConfig {
    let upstream = |u: &TestUpstream| Upstream::parse(&u.url(), UpstreamProtocol::Http1).unwrap();
    ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        upstream(stable),
        upstream(canary),
    )
}

/// Writes `text` beside `path`, then renames it over `path`.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const PROTOCOLS: [&[u8]; 2] = [b"http/1.1", b"h2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_refuses_clients_without_a_certificate_of_its_ca() {
    let (clients, strangers) = (TestCa::new("clients"), TestCa::new("strangers"));
    let h = Harness::start(&clients, ClientAuthMode::Required, |_| {}).await;
    let good = clients.client(SPIFFE_A);
    let stranger = strangers.client(SPIFFE_B);
    for alpn in PROTOCOLS {
        let none = h.get(alpn, None, "/", &[]).await;
        assert!(none.is_err(), "no certificate was served: {none:?}");
        let other = h.get(alpn, Some(&stranger), "/", &[]).await;
        assert!(
            other.is_err(),
            "another CA's certificate was served: {other:?}"
        );
        let ok = h.get(alpn, Some(&good), "/", &[]).await.unwrap();
        assert_eq!(ok.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_serves_clients_without_a_certificate_but_refuses_a_bad_one() {
    let (clients, strangers) = (TestCa::new("clients"), TestCa::new("strangers"));
    let h = Harness::start(&clients, ClientAuthMode::Optional, |_| {}).await;
    let stranger = strangers.client(SPIFFE_B);
    for alpn in PROTOCOLS {
        let none = h.get(alpn, None, "/echo-headers", &[]).await.unwrap();
        assert_eq!(none.status, StatusCode::OK);
        assert!(none.echoed(IDENTITY).is_empty(), "{}", none.body);
        let other = h.get(alpn, Some(&stranger), "/", &[]).await;
        assert!(
            other.is_err(),
            "another CA's certificate was served: {other:?}"
        );
        let dns = clients.client("client.example");
        let named = h.get(alpn, Some(&dns), "/echo-headers", &[]).await.unwrap();
        assert_eq!(named.echoed(IDENTITY), ["client.example"], "a DNS SAN");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_reaches_the_upstream_and_a_client_cannot_forge_it() {
    let clients = TestCa::new("clients");
    let h = Harness::start(&clients, ClientAuthMode::Optional, |_| {}).await;
    let good = clients.client(SPIFFE_A);
    let forged = [
        (IDENTITY, "spiffe://cluster.local/ns/x/sa/admin"),
        ("X-Client-Identity", "again"),
    ];
    for alpn in PROTOCOLS {
        let with = h
            .get(alpn, Some(&good), "/echo-headers", &forged)
            .await
            .unwrap();
        assert_eq!(with.echoed(IDENTITY), [SPIFFE_A], "{alpn:?}: {}", with.body);
        let without = h.get(alpn, None, "/echo-headers", &forged).await.unwrap();
        assert!(
            without.echoed(IDENTITY).is_empty(),
            "{alpn:?}: {}",
            without.body
        );
        // Every request on the connection, not only the first.
        let mut conn = h.connect(alpn, Some(&good)).await.unwrap();
        for _ in 0..3 {
            let again = conn.get("/echo-headers", &forged).await.unwrap();
            assert_eq!(again.echoed(IDENTITY), [SPIFFE_A], "{}", again.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_keeps_its_identity() {
    let clients = TestCa::new("clients");
    let h = Harness::start(&clients, ClientAuthMode::Required, |_| {}).await;
    let client = h.client(b"http/1.1", Some(&clients.client(SPIFFE_A)));
    let (mut first, resumed) = h.connect_with(&client).await.unwrap();
    assert!(!resumed);
    // The session ticket arrives with the first response.
    first.get("/", &[]).await.unwrap();
    let (mut second, resumed) = h.connect_with(&client).await.unwrap();
    assert!(resumed, "the second connection resumed the first's session");
    let got = second.get("/echo-headers", &[]).await.unwrap();
    assert_eq!(got.echoed(IDENTITY), [SPIFFE_A], "{}", got.body);
}

/// Sessions resume by stateless tickets, so every client resumes however
/// many there are. With rustls's stateful default (a 256-entry cache, two
/// tickets a client) 200 clients do not fit, and those whose tickets were
/// evicted make a full handshake again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_for_more_clients_than_a_session_cache_holds() {
    let clients = TestCa::new("clients");
    let h = Harness::start(&clients, ClientAuthMode::Optional, |_| {}).await;
    let configs: Vec<_> = (0..200).map(|_| h.client(b"http/1.1", None)).collect();
    for client in &configs {
        let (mut conn, resumed) = h.connect_with(client).await.unwrap();
        assert!(!resumed);
        // The session tickets arrive with the first response.
        conn.get("/", &[]).await.unwrap();
    }
    let mut full = Vec::new();
    for (n, client) in configs.iter().enumerate() {
        let (mut conn, resumed) = h.connect_with(client).await.unwrap();
        if !resumed {
            full.push(n);
        }
        conn.get("/", &[]).await.unwrap();
    }
    assert!(full.is_empty(), "clients that did not resume: {full:?}");
}

/// Without TLS no connection has an identity, but the header is still
/// serin's: on its own HTTP/1.1 loop, on hyper's (h2c), and on an HTTP/1.1
/// connection the own loop hands to hyper (a request with a body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listener_strips_the_identity_header_on_every_path() {
    let (stable, canary) = upstreams().await;
    let mut config = proxy_config(&stable, &canary);
    config.headers.identity_header = Some(HeaderName::from_static(IDENTITY));
    let proxy = Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap();
    let url = format!("http://{}/echo-headers", proxy.local_addr());
    let forged = [(IDENTITY, SPIFFE_A), ("x-kept", "yes")];
    for client in [http1_client(), h2c_client()] {
        let answer = get(&client, &url, &forged).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.body.contains("x-kept: yes"), "{}", answer.body);
        assert!(!answer.body.contains(IDENTITY), "{}", answer.body);
    }
    let mut upload = Request::post(&url);
    for (k, v) in forged {
        upload = upload.header(k, v);
    }
    let body = http_body_util::Either::Left(http_body_util::Full::new(Bytes::from("x")));
    let answer = send(&http1_client(), upload.body(body).unwrap()).await;
    assert!(answer.body.contains("x-kept: yes"), "{}", answer.body);
    assert!(!answer.body.contains(IDENTITY), "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_by_identity_keeps_each_client_on_its_side_across_connections() {
    let clients = TestCa::new("clients");
    let h = Harness::start(&clients, ClientAuthMode::Required, |c| {
        c.split.sticky_identity = true;
        c.split.sticky = Some(serin_proxy::StickyKey::Cookie("user".into()));
    })
    .await;
    let (a, b) = (clients.client(SPIFFE_A), clients.client(SPIFFE_B));
    let (bucket_a, bucket_b) = (
        sticky_bucket(SPIFFE_A.as_bytes()),
        sticky_bucket(SPIFFE_B.as_bytes()),
    );
    assert_ne!(bucket_a, bucket_b);
    // A weight between the two buckets: the lower one is on the canary.
    h.proxy
        .routes()
        .store(RouteTable::new(bucket_a.max(bucket_b)));
    let side = |bucket: u16| {
        if bucket < bucket_a.max(bucket_b) {
            "canary"
        } else {
            "stable"
        }
    };
    for _ in 0..5 {
        for alpn in PROTOCOLS {
            // The cookie would put both on one side: the identity comes first.
            let cookie = [("cookie", "user=same")];
            let got_a = h.get(alpn, Some(&a), "/", &cookie).await.unwrap();
            let got_b = h.get(alpn, Some(&b), "/", &cookie).await.unwrap();
            assert_eq!(got_a.upstream, side(bucket_a));
            assert_eq!(got_b.upstream, side(bucket_b));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_counts_each_identity_apart() {
    let clients = TestCa::new("clients");
    let h = Harness::start(&clients, ClientAuthMode::Required, |c| {
        let mut limit = RateLimit::new(Rate::per_second(0.001).unwrap());
        limit.key = RateLimitKey::Identity;
        c.rate_limit = Some(limit);
    })
    .await;
    let (a, b) = (clients.client(SPIFFE_A), clients.client(SPIFFE_B));
    let status = |r: Result<Answered, String>| r.unwrap().status;
    assert_eq!(
        status(h.get(b"h2", Some(&a), "/", &[]).await),
        StatusCode::OK
    );
    assert_eq!(
        status(h.get(b"http/1.1", Some(&a), "/", &[]).await),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status(h.get(b"h2", Some(&b), "/", &[]).await),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_client_ca_verifies_new_handshakes_and_a_bad_one_keeps_the_last_good() {
    let (first, second) = (TestCa::new("first clients"), TestCa::new("second clients"));
    let h = Harness::start(&first, ClientAuthMode::Required, |_| {}).await;
    let (old_client, new_client) = (first.client(SPIFFE_A), second.client(SPIFFE_B));
    // Its session would let a new connection skip the certificate.
    let resuming = h.client(b"http/1.1", Some(&old_client));
    let (mut open, _) = h.connect_with(&resuming).await.unwrap();
    assert_eq!(open.get("/", &[]).await.unwrap().status, StatusCode::OK);
    assert!(h.get(b"h2", Some(&new_client), "/", &[]).await.is_err());

    replace(
        &h.ca_file,
        &std::fs::read_to_string(&second.cert_path).unwrap(),
    );
    eventually(DEADLINE, "the new CA's clients are accepted", || async {
        h.get(b"h2", Some(&new_client), "/", &[]).await.is_ok()
    })
    .await;
    // Counted just after the swap it counts.
    eventually(DEADLINE, "the new CA is counted", || async {
        h.reloads() == 1
    })
    .await;
    assert!(
        h.get(b"h2", Some(&old_client), "/", &[]).await.is_err(),
        "the removed CA's clients are refused on new connections"
    );
    let resumed = match h.connect_with(&resuming).await {
        Ok((mut sender, resumed)) => sender.get("/", &[]).await.map(|_| resumed),
        Err(e) => Err(e),
    };
    assert!(
        resumed.is_err(),
        "a session made under the removed CA was resumed: {resumed:?}"
    );
    let still = open.get("/echo-headers", &[]).await.unwrap();
    assert_eq!(
        still.status,
        StatusCode::OK,
        "the open connection is untouched"
    );
    assert_eq!(still.echoed(IDENTITY), [SPIFFE_A]);

    for bad in ["-----BEGIN CERTIFICATE-----\nbroken\n", "not PEM at all\n"] {
        let failures = h.failures();
        replace(&h.ca_file, bad);
        eventually(DEADLINE, "the bad CA file is counted", || async {
            h.failures() > failures
        })
        .await;
        let served = h.get(b"http/1.1", Some(&new_client), "/", &[]).await;
        assert_eq!(served.unwrap().status, StatusCode::OK, "after {bad:?}");
        assert!(h.get(b"h2", Some(&old_client), "/", &[]).await.is_err());
    }
    assert_eq!(h.reloads(), 1, "a refused file is not a reload");
}
