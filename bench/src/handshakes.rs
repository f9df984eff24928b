//! A TLS handshake generator: what a TLS-terminating proxy pays per new
//! client connection.
//!
//! `connections` tasks each open connection after connection until the
//! deadline: TCP connect, TLS handshake (SNI [`SERVER_NAME`], ALPN
//! `http/1.1`), one `GET /` with `Connection: close`, the response read to
//! EOF, and the connection dropped. So every request costs the server a TCP
//! accept and a handshake: full ones, or with `resume` TLS 1.3 resumptions
//! from tickets the earlier connections received.
//!
//! The client does **not** verify the server's certificate, as h2load and
//! wrk do not: the benchmark measures the server's cost, and the client has
//! no reason to trust a throwaway test certificate. [`client_config`] is also
//! the TLS client of `serin-bench openloop --tls`.
//!
//! It runs in its own process, pinned to the load generator's core, and
//! prints one JSON [`HandshakeResult`].

use std::cell::{Cell, OnceCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The server name sent as SNI: the test certificates are issued for it.
pub const SERVER_NAME: &str = "bench.serin.test";

/// The one request each connection makes.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// How long one connection may take, from connect to EOF, before it is
/// given up and counted as an error.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures in a row after which a task stops: a server that is not there
/// refuses in microseconds, and spinning on it until the deadline measures
/// nothing.
const MAX_CONSECUTIVE_ERRORS: u32 = 1_000;

/// Sessions the resuming client remembers (rustls's default).
const SESSION_CACHE: usize = 256;

/// What one handshake run asks for.
#[derive(Clone, Debug)]
pub struct Handshakes {
    /// The TLS server.
    pub addr: SocketAddr,
    /// Resume sessions (TLS 1.3 tickets) after the first connections, or make
    /// every handshake a full one.
    pub resume: bool,
    /// How long new connections are started for.
    pub duration: Duration,
    /// Connections in flight at once.
    pub connections: usize,
}

/// The outcome of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HandshakeResult {
    /// Connections that got a `200` and read it to EOF.
    pub completed: u64,
    /// Of those, how many resumed a session.
    pub resumed: u64,
    /// Connections that failed: connect, handshake, read, timeout or a
    /// status other than 200.
    pub errors: u64,
    /// Completed connections per second.
    pub per_sec: f64,
    /// The first completed handshake's protocol version, cipher suite and
    /// key exchange group, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
    pub negotiated: String,
}

/// The client TLS configuration of the generators: ring, TLS 1.2 and 1.3,
/// ALPN `http/1.1`, no certificate verification (see the module header), and
/// session resumption in memory when `resume`, none otherwise.
pub fn client_config(resume: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AcceptAnyCertificate {
        schemes: provider
            .signature_verification_algorithms
            .supported_schemes(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring's default provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = if resume {
        Resumption::in_memory_sessions(SESSION_CACHE)
    } else {
        Resumption::disabled()
    };
    Arc::new(config)
}

/// [`SERVER_NAME`] as rustls takes it.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name")
}

/// Accepts any certificate and any signature: the generators measure the
/// server, they do not authenticate it.
#[derive(Debug)]
struct AcceptAnyCertificate {
    schemes: Vec<rustls::SignatureScheme>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes.clone()
    }
}

/// What the tasks count.
#[derive(Default)]
struct Tally {
    completed: Cell<u64>,
    resumed: Cell<u64>,
    errors: Cell<u64>,
    negotiated: OnceCell<String>,
    first_error: OnceCell<String>,
}

/// Opens connections until the deadline and counts them.
pub fn run(spec: &Handshakes) -> std::io::Result<HandshakeResult> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&runtime, run_async(spec.clone())))
}

async fn run_async(spec: Handshakes) -> HandshakeResult {
    let connector = TlsConnector::from(client_config(spec.resume));
    let tally = Rc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + spec.duration;
    let tasks: Vec<_> = (0..spec.connections.max(1))
        .map(|_| {
            tokio::task::spawn_local(connect_until(
                spec.addr,
                connector.clone(),
                deadline,
                tally.clone(),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(e) = tally.first_error.get() {
        eprintln!(
            "serin-bench handshakes: {} connections to {} failed, the first: {e}",
            tally.errors.get(),
            spec.addr
        );
    }
    HandshakeResult {
        completed: tally.completed.get(),
        resumed: tally.resumed.get(),
        errors: tally.errors.get(),
        per_sec: tally.completed.get() as f64 / elapsed,
        negotiated: tally.negotiated.get().cloned().unwrap_or_default(),
    }
}

/// One task: connection after connection until the deadline, or until
/// [`MAX_CONSECUTIVE_ERRORS`] failures in a row.
async fn connect_until(
    addr: SocketAddr,
    connector: TlsConnector,
    deadline: Instant,
    tally: Rc<Tally>,
) {
    let mut failures_in_a_row = 0;
    while Instant::now() < deadline && failures_in_a_row < MAX_CONSECUTIVE_ERRORS {
        let outcome = tokio::time::timeout(CONNECTION_TIMEOUT, one_connection(addr, &connector))
            .await
            .unwrap_or_else(|_| Err(format!("not done within {CONNECTION_TIMEOUT:?}")));
        match outcome {
            Ok(done) => {
                failures_in_a_row = 0;
                tally.completed.set(tally.completed.get() + 1);
                if done.resumed {
                    tally.resumed.set(tally.resumed.get() + 1);
                }
                tally.negotiated.get_or_init(|| done.negotiated);
            }
            Err(e) => {
                failures_in_a_row += 1;
                tally.errors.set(tally.errors.get() + 1);
                tally.first_error.get_or_init(|| e);
            }
        }
    }
}

/// A connection that got its `200`.
struct Completed {
    resumed: bool,
    negotiated: String,
}

/// Connect, handshake, one request, the response to EOF.
async fn one_connection(addr: SocketAddr, connector: &TlsConnector) -> Result<Completed, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let mut tls = connector
        .connect(server_name(), tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (resumed, negotiated) = {
        let conn = tls.get_ref().1;
        (
            conn.handshake_kind() == Some(HandshakeKind::Resumed),
            negotiated(conn),
        )
    };
    tls.write_all(REQUEST)
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if !response.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&response[..response.len().min(40)]).into_owned();
        return Err(format!("expected HTTP/1.1 200, got {head:?}"));
    }
    Ok(Completed {
        resumed,
        negotiated,
    })
}

/// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`: rustls's names for what the
/// handshake agreed on (`-` for what it did not, such as the group of a
/// resumed TLS 1.2 session).
fn negotiated(conn: &ClientConnection) -> String {
    let version = conn
        .protocol_version()
        .map_or_else(|| "-".to_owned(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "-".to_owned(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or_else(|| "-".to_owned(), |g| format!("{:?}", g.name()));
    format!("{version} {suite} {group}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a real rustls server: without `resume` every connection is a
    /// full handshake; with it, all but the first few resume, and the
    /// server agrees.
    #[test]
    fn counts_full_and_resumed_handshakes_as_the_server_sees_them() {
        let server = tokio::runtime::Runtime::new().unwrap();
        let ca = serin_tests::TestCa::new("handshakes test CA");
        let config = ca
            .server(&[SERVER_NAME])
            .server_config(&[b"http/1.1"], None);
        let upstream = server.block_on(serin_tests::TestUpstream::start_tls("ok", config));
        let addr = upstream
            .url()
            .trim_start_matches("https://")
            .parse()
            .unwrap();
        let spec = |resume| Handshakes {
            addr,
            resume,
            duration: Duration::from_millis(300),
            connections: 2,
        };

        let full = run(&spec(false)).unwrap();
        assert!(full.completed > 0, "{full:?}");
        assert_eq!((full.resumed, full.errors), (0, 0), "{full:?}");
        assert!(full.negotiated.starts_with("TLSv1_3"), "{full:?}");
        assert_eq!(upstream.resumed(), 0);

        let resumed = run(&spec(true)).unwrap();
        assert_eq!(resumed.errors, 0, "{resumed:?}");
        // Each task's first connection has no session yet.
        assert!(
            resumed.completed > 2 && resumed.resumed + 2 >= resumed.completed,
            "{resumed:?}"
        );
        assert_eq!(upstream.resumed(), resumed.resumed);
    }
}
