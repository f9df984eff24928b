//! Shared support for serin's integration tests: scriptable upstream servers
//! and real HTTP/1.1, HTTP/2 and TLS clients, all on 127.0.0.1 with port 0.
//!
//! An upstream answers every request with its name as the body, unless its
//! [`Behavior`] says otherwise (a status, a delay, a [`Gate`] that holds
//! answers until the test opens it, a failure ratio, a reset, a gRPC status
//! in trailers). A few paths do special jobs: `/echo-headers`
//! returns the request headers, `/upgrade` switches protocols and echoes bytes, `/upload` counts the request body's bytes (and the upstream the bytes of every upload), and
//! `/download/N` streams N bytes. An upstream can speak TLS
//! ([`TestUpstream::start_tls`]) with a certificate from a [`TestCa`], which
//! also issues client certificates for mTLS. Nothing here sleeps to wait for
//! a condition: use [`eventually`] to poll with a deadline.

pub mod kube_api;
pub mod otlp_collector;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// How an upstream answers. `Default` is a plain 200.
#[derive(Clone, Debug, Default)]
pub struct Behavior {
    /// Status for normal answers (default 200).
    pub status: Option<u16>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Hold every answer until this gate opens.
    pub hold: Option<Gate>,
    /// This fraction of requests (spread evenly, deterministically) get 500.
    pub error_ratio: f64,
    /// Drop the connection instead of answering.
    pub reset: bool,
    /// Answer as gRPC with this `grpc-status` in the trailers.
    pub grpc_status: Option<u8>,
}

/// Holds an upstream's answers ([`Behavior::hold`]) until the test opens it.
#[derive(Clone, Debug)]
pub struct Gate(Arc<tokio::sync::watch::Sender<bool>>);

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
    }

    /// Lets every held answer, and every later one, through.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn pass(&self) {
        let _ = self.0.subscribe().wait_for(|&open| open).await;
    }
}

struct UpstreamState {
    name: &'static str,
    behavior: Mutex<Behavior>,
    requests: AtomicU64,
    connections: AtomicU64,
    aborted_uploads: AtomicU64,
    /// Delayed answers dropped before their delay ended (the client left).
    cancelled: AtomicU64,
    /// Speaks TLS.
    tls: bool,
    /// TLS connections that resumed a session.
    resumed: AtomicU64,
    /// TLS connections that negotiated h2.
    http2: AtomicU64,
    /// TLS handshakes that failed.
    failed_handshakes: AtomicU64,
    /// The header fields of the last request received.
    last_headers: Mutex<Option<HeaderMap>>,
    /// `/upload` body bytes received, all requests together.
    uploaded: AtomicU64,
}

/// A scriptable upstream HTTP server (HTTP/1.1 and h2c) on 127.0.0.1.
/// Dropping it closes its listener and every connection, as a killed
/// process would.
pub struct TestUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl TestUpstream {
    /// Starts an upstream whose body is `name`.
    pub async fn start(name: &'static str) -> Self {
        Self::serve(name, "127.0.0.1:0".parse().unwrap(), None).await
    }

    /// Starts an upstream whose body is `name` on `addr`: e.g. where one
    /// that was dropped listened, as a restarted process would.
    pub async fn start_at(name: &'static str, addr: SocketAddr) -> Self {
        Self::serve(name, addr, None).await
    }

    /// Starts an upstream whose body is `name`, speaking TLS with `config`
    /// (its ALPN decides between HTTP/1.1 and HTTP/2).
    pub async fn start_tls(name: &'static str, config: Arc<rustls::ServerConfig>) -> Self {
        let addr = "127.0.0.1:0".parse().unwrap();
        Self::serve(name, addr, Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn serve(
        name: &'static str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name,
            behavior: Mutex::new(Behavior::default()),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            aborted_uploads: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            tls: tls.is_some(),
            resumed: AtomicU64::new(0),
            http2: AtomicU64::new(0),
            failed_handshakes: AtomicU64::new(0),
            last_headers: Mutex::new(None),
            uploaded: AtomicU64::new(0),
        });
        let accept_state = state.clone();
        let connections = Arc::new(Mutex::new(Vec::<tokio::task::AbortHandle>::new()));
        let tasks = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                accept_state.connections.fetch_add(1, Ordering::SeqCst);
                let state = accept_state.clone();
                let tls = tls.clone();
                let connection = tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let Some(tls) = tls else {
                        let svc = hyper::service::service_fn(move |req| answer(state.clone(), req));
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                        return;
                    };
                    let Ok(stream) = tls.accept(stream).await else {
                        state.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let session = stream.get_ref().1;
                    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        state.resumed.fetch_add(1, Ordering::SeqCst);
                    }
                    let h2 = session.alpn_protocol() == Some(b"h2");
                    if h2 {
                        state.http2.fetch_add(1, Ordering::SeqCst);
                    }
                    let svc = hyper::service::service_fn(move |req| answer(state.clone(), req));
                    let io = TokioIo::new(stream);
                    let _ = if h2 {
                        builder
                            .http2_only()
                            .serve_connection_with_upgrades(io, svc)
                            .await
                    } else {
                        builder.serve_connection_with_upgrades(io, svc).await
                    };
                });
                let mut tasks = tasks.lock().unwrap();
                tasks.retain(|t| !t.is_finished());
                tasks.push(connection.abort_handle());
            }
        });
        Self {
            addr,
            state,
            task,
            connections,
        }
    }

    /// `http://127.0.0.1:PORT`, or `https://` for a TLS upstream.
    pub fn url(&self) -> String {
        let scheme = if self.state.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// TLS connections that resumed an earlier session.
    pub fn resumed(&self) -> u64 {
        self.state.resumed.load(Ordering::SeqCst)
    }

    /// TLS connections that negotiated HTTP/2 (ALPN `h2`).
    pub fn http2_connections(&self) -> u64 {
        self.state.http2.load(Ordering::SeqCst)
    }

    /// TLS handshakes that failed (e.g. no or an untrusted client certificate).
    pub fn failed_handshakes(&self) -> u64 {
        self.state.failed_handshakes.load(Ordering::SeqCst)
    }

    /// Changes how it answers from now on.
    pub fn set(&self, behavior: Behavior) {
        *self.state.behavior.lock().unwrap() = behavior;
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// `/upload` bodies that broke off before their end.
    pub fn aborted_uploads(&self) -> u64 {
        self.state.aborted_uploads.load(Ordering::SeqCst)
    }

    /// Delayed answers that were dropped before their delay ended, because
    /// the client (the proxy) closed the connection meanwhile.
    pub fn cancelled(&self) -> u64 {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The header fields of the last request received, if any.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.state.last_headers.lock().unwrap().clone()
    }

    /// `/upload` body bytes received so far, all requests together.
    pub fn uploaded(&self) -> u64 {
        self.state.uploaded.load(Ordering::SeqCst)
    }
}

/// An address on 127.0.0.1 where nothing listens (bound, then released).
pub fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// Response body used by test upstreams.
pub struct TestBody {
    frames: VecDeque<Frame<Bytes>>,
    /// Bytes still to generate for `/download/N`.
    generate: u64,
}

impl TestBody {
    fn text(s: impl Into<Bytes>) -> Self {
        Self {
            frames: VecDeque::from([Frame::data(s.into())]),
            generate: 0,
        }
    }

    /// A body that streams `n` bytes in 64 KiB chunks without holding them.
    pub fn generated(n: u64) -> Self {
        Self {
            frames: VecDeque::new(),
            generate: n,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.generate > 0 {
            let n = this.generate.min(64 * 1024);
            this.generate -= n;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; n as usize])))));
        }
        Poll::Ready(this.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.generate == 0 && self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.frames.iter().all(|f| f.is_data()) {
            let queued: u64 = self
                .frames
                .iter()
                .map(|f| f.data_ref().map_or(0, |d| d.len() as u64))
                .sum();
            SizeHint::with_exact(queued + self.generate)
        } else {
            SizeHint::default()
        }
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, std::io::Error> {
    *state.last_headers.lock().unwrap() = Some(req.headers().clone());
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let behavior = state.behavior.lock().unwrap().clone();
    if !behavior.delay.is_zero() {
        // Counts the answer as cancelled if hyper drops it mid-delay.
        struct Delaying<'a>(&'a AtomicU64);
        impl Drop for Delaying<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let delaying = Delaying(&state.cancelled);
        tokio::time::sleep(behavior.delay).await;
        std::mem::forget(delaying);
    }
    if let Some(gate) = &behavior.hold {
        gate.pass().await;
    }
    if behavior.reset {
        return Err(std::io::Error::other("scripted reset"));
    }
    let path = req.uri().path().to_string();
    if let (Some(protocol), "/upgrade") = (req.headers().get("upgrade").cloned(), path.as_str()) {
        // Switch protocols, then echo every byte back until the client closes.
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = Response::new(TestBody::text(""));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        resp.headers_mut().insert("upgrade", protocol);
        return Ok(resp);
    }
    if path == "/echo-headers" {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        return Ok(Response::new(TestBody::text(text)));
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                state.aborted_uploads.fetch_add(1, Ordering::SeqCst);
                std::io::Error::other(e)
            })?;
            total += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        state.uploaded.fetch_add(total, Ordering::SeqCst);
        return Ok(Response::new(TestBody::text(format!("received {total}"))));
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let n: u64 = n.parse().unwrap_or(0);
        return Ok(Response::new(TestBody::generated(n)));
    }
    if let Some(code) = behavior.grpc_status {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(u16::from(code)));
        let body = TestBody {
            frames: VecDeque::from([
                Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                Frame::trailers(trailers),
            ]),
            generate: 0,
        };
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return Ok(resp);
    }
    let failing = behavior.error_ratio > 0.0
        && ((n + 1) as f64 * behavior.error_ratio).floor()
            > (n as f64 * behavior.error_ratio).floor();
    let status = if failing {
        500
    } else {
        behavior.status.unwrap_or(200)
    };
    let mut resp = Response::new(TestBody::text(state.name));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(resp)
}

// === clients ===

/// A request body for test clients: in memory, or generated on the fly.
pub type ClientBody = http_body_util::Either<http_body_util::Full<Bytes>, TestBody>;

/// A pooled HTTP/1.1 client.
pub fn http1_client() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read in full.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body as text (lossy).
    pub body: String,
    /// HTTP version of the response.
    pub version: http::Version,
}

impl Answer {
    /// The `x-serin-upstream` header, or "" when absent.
    pub fn upstream(&self) -> &str {
        self.headers
            .get("x-serin-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends a GET with these headers and reads the whole answer.
pub async fn get(
    client: &Client<HttpConnector, ClientBody>,
    url: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(client, req.body(empty()).unwrap()).await
}

/// Sends a request and reads the whole answer; panics on transport errors.
pub async fn send(client: &Client<HttpConnector, ClientBody>, req: Request<ClientBody>) -> Answer {
    let resp = client.request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body failed").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        version: parts.version,
    }
}

/// GETs `url` and counts the body's bytes as they stream, without holding them.
pub async fn download_len(client: &Client<HttpConnector, ClientBody>, url: &str) -> u64 {
    let resp = client
        .request(Request::get(url).body(empty()).unwrap())
        .await
        .expect("request failed");
    let mut body = resp.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        total += frame
            .expect("body failed")
            .data_ref()
            .map_or(0, |d| d.len() as u64);
    }
    total
}

/// An empty request body.
pub fn empty() -> ClientBody {
    http_body_util::Either::Left(http_body_util::Full::new(Bytes::new()))
}

/// Polls `check` every 10 ms until it returns true, panicking with `what`
/// after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes raw bytes to `addr` and reads until the server closes or `limit`
/// bytes arrived; for malformed-request tests.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.len() > 12 {
                    // The status line and headers are enough for these tests.
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An unlabelled metric's value from the control API's `/metrics` at `admin`.
pub async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let text = get(&http1_client(), &format!("http://{admin}/metrics"), &[])
        .await
        .body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}")) as u64
}

// === TLS ===

/// A self-signed certificate for `localhost`/127.0.0.1, written to PEM files
/// in a fresh temp directory, plus a client config that trusts it.
pub struct TestCert {
    /// The certificate PEM file.
    pub cert_path: std::path::PathBuf,
    /// The private key PEM file.
    pub key_path: std::path::PathBuf,
    /// The certificate's PEM text (what `cert_path` holds).
    pub cert_pem: String,
    /// The private key's PEM text (what `key_path` holds).
    pub key_pem: String,
    /// The certificate, as a server presents it.
    pub der: rustls_pki_types::CertificateDer<'static>,
    /// A client config trusting the certificate, offering h2 and http/1.1.
    pub client: Arc<rustls::ClientConfig>,
    /// Where the files are; removed with the certificate.
    _dir: TempDir,
}

impl TestCert {
    /// Generates the certificate and files.
    pub fn generate() -> Self {
        Self::named("serin test")
    }

    /// Generates a certificate whose subject's common name is `name` (each
    /// has a new key and serial number), and its files.
    pub fn named(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let dir = temp_dir("tls");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, &key_pem).unwrap();
        let der = cert.der().clone();
        Self {
            cert_path,
            key_path,
            cert_pem,
            key_pem,
            client: Self::client_trusting(&[&der]),
            der,
            _dir: dir,
        }
    }

    /// A client config trusting each of `certs`, offering h2 and http/1.1.
    pub fn client_trusting(
        certs: &[&rustls_pki_types::CertificateDer<'static>],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots.add((*cert).clone()).unwrap();
        }
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(client)
    }
}

/// A test certificate authority: issues server certificates (for an
/// upstream serin connects to over TLS) and client certificates (for mTLS),
/// each with a new key, as PEM files in the CA's temp directory.
pub struct TestCa {
    /// The CA certificate's PEM file (what a `ca` or `client_ca` setting names).
    pub cert_path: std::path::PathBuf,
    /// The CA certificate.
    pub der: rustls_pki_types::CertificateDer<'static>,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    dir: TempDir,
    issued: AtomicU64,
}

/// A certificate issued by a [`TestCa`], and its key, as files and PEM text.
pub struct Issued {
    /// The certificate PEM file.
    pub cert_path: std::path::PathBuf,
    /// The private key PEM file.
    pub key_path: std::path::PathBuf,
    /// The certificate's PEM text.
    pub cert_pem: String,
    /// The private key's PEM text.
    pub key_pem: String,
    /// The certificate.
    pub der: rustls_pki_types::CertificateDer<'static>,
}

impl TestCa {
    /// A new CA whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let dir = temp_dir("ca");
        let cert_path = dir.join("ca.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        Self {
            cert_path,
            der: cert.der().clone(),
            cert,
            key,
            dir,
            issued: AtomicU64::new(0),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Issued {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate whose one subject alternative name is `identity`:
    /// a URI (`spiffe://…`) when it has a scheme, else a DNS name.
    pub fn client(&self, identity: &str) -> Issued {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, identity);
        let san = if identity.contains("://") {
            rcgen::SanType::URI(identity.try_into().unwrap())
        } else {
            rcgen::SanType::DnsName(identity.try_into().unwrap())
        };
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: rcgen::CertificateParams) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        let cert_path = self.dir.join(format!("{n}.pem"));
        let key_path = self.dir.join(format!("{n}-key.pem"));
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, &key_pem).unwrap();
        Issued {
            cert_path,
            key_path,
            cert_pem,
            key_pem,
            der: cert.der().clone(),
        }
    }
}

impl Issued {
    /// A rustls server config presenting this certificate, offering `alpn`,
    /// and, with `client_ca`, requiring a client certificate it issued.
    pub fn server_config(
        &self,
        alpn: &[&[u8]],
        client_ca: Option<&TestCa>,
    ) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der.clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = rustls_pki_types::PrivateKeyDer::try_from(
            rcgen::KeyPair::from_pem(&self.key_pem)
                .unwrap()
                .serialize_der(),
        )
        .unwrap();
        let mut config = builder
            .with_single_cert(vec![self.der.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A fresh, empty directory under the system's temp dir, named after `tag`,
/// the process and a counter, and removed with everything in it when the
/// returned guard is dropped (a test that panics cleans up too).
pub fn temp_dir(tag: &str) -> TempDir {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "serin-test-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A directory made by [`temp_dir`], removed when dropped. It derefs to its
/// path.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

// === serin in-process ===

/// What a serin under test runs in front of: a stable and a canary
/// upstream (answering `stable` and `canary`), a fresh state directory, and
/// the config file of a serin on 127.0.0.1 port 0 (proxy and control API)
/// in front of them, for `Config::parse_toml`.
pub struct Stage {
    /// The stable upstream.
    pub stable: TestUpstream,
    /// The canary upstream.
    pub canary: TestUpstream,
    /// The state directory, removed when dropped.
    pub state: TempDir,
    /// The config file's text, `extra` appended.
    pub toml: String,
}

impl Stage {
    /// Starts both upstreams; `tag` names the state directory.
    pub async fn new(tag: &str, extra: &str) -> Self {
        let stable = TestUpstream::start("stable").await;
        let canary = TestUpstream::start("canary").await;
        let state = temp_dir(tag);
        let toml = format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nstate_dir = '{}'\n\
             stable.url = \"{}\"\ncanary.url = \"{}\"\n{extra}\n",
            state.display(),
            stable.url(),
            canary.url(),
        );
        Self {
            stable,
            canary,
            state,
            toml,
        }
    }
}

// === the serin binary ===

/// A `serin run` child process, started with `kill_on_drop`.
pub struct SerinProcess {
    /// The child process.
    pub child: tokio::process::Child,
    /// The proxy's listen address, read from its stdout.
    pub proxy: SocketAddr,
    /// The control API's address, if it printed one before the proxy line.
    pub admin: Option<SocketAddr>,
}

impl SerinProcess {
    /// Starts `bin` with `args` and waits (up to 30 s) for the line
    /// `serin: proxy listening on ADDR`; an earlier
    /// `serin: control API listening on ADDR` line fills [`SerinProcess::admin`].
    pub async fn spawn<I, S>(bin: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_env(bin, args, &[]).await
    }

    /// As [`SerinProcess::spawn`], with `env` added to the child's
    /// environment (e.g. `KUBECONFIG`).
    pub async fn spawn_env<I, S>(bin: &str, args: I, env: &[(&str, &str)]) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start serin");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut admin = None;
        let proxy = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("serin exited before listening");
                let addr_after = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                };
                if let Some(a) = addr_after("serin: control API listening on ") {
                    admin = Some(a);
                }
                if let Some(a) = addr_after("serin: proxy listening on ") {
                    return a;
                }
            }
        })
        .await
        .expect("serin did not start listening within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            proxy,
            admin,
        }
    }

    /// Starts `serin run` (the binary `bin`) on 127.0.0.1 port 0 for both the
    /// proxy and the control API, in front of `stable` and `canary`, keeping
    /// state in `state_dir`, with `extra` arguments appended.
    pub async fn run(
        bin: &str,
        stable: &TestUpstream,
        canary: &TestUpstream,
        state_dir: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        Self::run_env(bin, stable, canary, state_dir, extra, &[]).await
    }

    /// As [`SerinProcess::run`], with `env` added to the child's environment.
    pub async fn run_env(
        bin: &str,
        stable: &TestUpstream,
        canary: &TestUpstream,
        state_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let (stable, canary) = (stable.url(), canary.url());
        Self::run_urls(bin, &stable, &canary, state_dir, extra, env).await
    }

    /// As [`SerinProcess::run_env`], with the upstreams given as `--stable`
    /// and `--canary` values (e.g. several comma-separated URLs).
    pub async fn run_urls(
        bin: &str,
        stable: &str,
        canary: &str,
        state_dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let state = state_dir.to_str().expect("UTF-8 temp path");
        let mut args = vec![
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--stable",
            stable,
            "--canary",
            canary,
            "--state-dir",
            state,
        ];
        args.extend_from_slice(extra);
        Self::spawn_env(bin, args, env).await
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("serin already exited").to_string();
        let ok = std::process::Command::new("kill")
            .args([format!("-{name}"), pid])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }
}
