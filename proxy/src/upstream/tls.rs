//! TLS to an upstream (`https://` URLs): rustls's client with the `aws-lc-rs`
//! provider, like the listener.
//!
//! - **Trust:** the system's roots (read once at start), plus the PEM
//!   bundle `ca` when one is set: a private CA works without giving up
//!   public ones.
//! - **Name:** SNI and the certificate check use `server_name`, else the
//!   URL's host (an IP address is checked against the certificate's IP
//!   names).
//! - **mTLS:** `cert` and `key` present a client certificate.
//! - **ALPN** offers only the protocol the upstream is configured to speak
//!   (`http/1.1`, or `h2` for gRPC), or both with `protocol = "auto"`; an
//!   upstream that picks another is refused at the handshake rather than
//!   misread.
//! - **Resumption:** every worker's connections to the upstream share one
//!   in-memory session cache, so a new connection usually resumes
//!   (an abbreviated handshake) instead of paying for a full one.
//!
//! The files are reloaded live ([`crate::reload`]): a changed valid set
//! builds a new client config that new connections use; pooled connections
//! keep theirs. A bad file keeps the old config, is logged, and counted.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Target, UpstreamProtocol};
use crate::reload::{FileContents, WatchedFiles};
use crate::tls::{pem_reason, TlsError, TlsReloadCounters};

/// Sessions each upstream's cache keeps for resumption.
const SESSION_CACHE: usize = 256;
/// ALPN's names of the two protocols.
const H2: &[u8] = b"h2";
const HTTP1: &[u8] = b"http/1.1";

/// How serin speaks TLS to an upstream: the `[stable.tls]` / `[canary.tls]`
/// settings. An `https://` URL has them (all defaulted); `http://` has none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The name sent as SNI and checked against the upstream's certificate
    /// (default: the URL's host).
    pub server_name: Option<String>,
    /// PEM bundle of CAs trusted in addition to the system's roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, presented for mTLS (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl UpstreamTls {
    /// The files read, in a fixed order: `ca`, `cert`, `key`.
    fn paths(&self) -> Vec<PathBuf> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// Checks that an upstream's TLS settings load, as serin would load them
/// (`serin check`).
pub(crate) fn check(
    tls: &UpstreamTls,
    targets: &[Target],
    protocol: UpstreamProtocol,
) -> Result<(), TlsError> {
    let files = WatchedFiles::read(&tls.paths());
    server_names(tls, targets)?;
    build(tls, &files, &Roots::system(), protocol).map(drop)
}

/// Checks that each target's host, or `server_name`, can be checked
/// against a certificate (a DNS name or an IP address).
fn server_names(tls: &UpstreamTls, targets: &[Target]) -> Result<(), TlsError> {
    for target in targets {
        let name = tls.server_name.as_deref().unwrap_or(&target.host);
        ServerName::try_from(name).map_err(|e| TlsError::ServerName {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// The system's trusted roots, read once.
#[derive(Clone)]
struct Roots(Arc<Vec<CertificateDer<'static>>>);

impl Roots {
    fn system() -> Self {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "a system CA certificate could not be read");
        }
        Self(Arc::new(found.certs))
    }
}

/// Builds the client config from the files' `contents` (in
/// [`UpstreamTls::paths`] order).
fn build(
    tls: &UpstreamTls,
    contents: &[FileContents],
    roots: &Roots,
    protocol: UpstreamProtocol,
) -> Result<ClientConfig, TlsError> {
    let mut contents = contents.iter();
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(roots.0.iter().cloned());
    if let Some(path) = &tls.ca {
        let error = |reason: String| TlsError::Ca {
            path: path.clone(),
            reason,
        };
        let pem = contents.next().expect("one per path").as_ref();
        let certs = certs(pem.map_err(|e| error(e.clone()))?).map_err(error)?;
        for cert in certs {
            store.add(cert).map_err(|e| error(e.to_string()))?;
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Client {
            reason: e.to_string(),
        })?
        .with_root_certificates(store);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert_path), Some(key_path)) => {
            let cert_error = |reason: String| TlsError::Cert {
                path: cert_path.clone(),
                reason,
            };
            let pem = contents.next().expect("one per path").as_ref();
            let chain = certs(pem.map_err(|e| cert_error(e.clone()))?).map_err(cert_error)?;
            let key_error = |reason: String| TlsError::Key {
                path: key_path.clone(),
                reason,
            };
            let pem = contents.next().expect("one per path").as_ref();
            let key = PrivateKeyDer::from_pem_slice(pem.map_err(|e| key_error(e.clone()))?)
                .map_err(|e| key_error(pem_reason(e)))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        UpstreamProtocol::Http1 => vec![HTTP1.to_vec()],
        UpstreamProtocol::Http2 => vec![H2.to_vec()],
        UpstreamProtocol::Auto => vec![H2.to_vec(), HTTP1.to_vec()],
    };
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE);
    Ok(config)
}

/// The certificates of a PEM file; none is an error.
fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_reason)?;
    if certs.is_empty() {
        return Err("no certificate found".into());
    }
    Ok(certs)
}

// === impl Origin ===

/// One upstream's TLS client, shared by every worker's pool: the config new
/// connections use (swapped on reload). The name each connection checks is
/// its endpoint's ([`super::endpoints::Endpoint::server_name`]).
pub(crate) struct Origin {
    config: ArcSwap<ClientConfig>,
    /// Reloads of this upstream's files, read by [`crate::Stats`].
    pub(crate) counters: Arc<TlsReloadCounters>,
    settings: UpstreamTls,
    protocol: UpstreamProtocol,
    roots: Roots,
    /// The files as last looked at; only the reload thread locks it.
    files: Mutex<WatchedFiles>,
}

impl Origin {
    /// Loads `tls` for the upstream's `targets` (an error stops the start).
    pub(crate) fn load(
        tls: &UpstreamTls,
        targets: &[Target],
        protocol: UpstreamProtocol,
    ) -> Result<Self, TlsError> {
        server_names(tls, targets)?;
        let paths = tls.paths();
        let contents = WatchedFiles::read(&paths);
        let roots = Roots::system();
        let config = build(tls, &contents, &roots, protocol)?;
        Ok(Self {
            config: ArcSwap::from_pointee(config),
            counters: Arc::default(),
            settings: tls.clone(),
            protocol,
            roots,
            files: Mutex::new(WatchedFiles::new(paths, contents)),
        })
    }

    /// Makes a TLS connection over `tcp` to the server named `name`, which
    /// must speak `protocol` (the configured one, or the one an `auto`
    /// upstream's first connection chose; `Auto`: either).
    pub(crate) async fn connect(
        &self,
        tcp: TcpStream,
        name: ServerName<'static>,
        protocol: UpstreamProtocol,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let stream = TlsConnector::from(self.config.load_full())
            .connect(name, tcp)
            .await?;
        let wanted = match protocol {
            UpstreamProtocol::Http1 => HTTP1,
            UpstreamProtocol::Http2 => H2,
            UpstreamProtocol::Auto => return Ok(stream),
        };
        match stream.get_ref().1.alpn_protocol() {
            // No ALPN at all: the upstream did not say; speak as configured.
            None => Ok(stream),
            Some(p) if p == wanted => Ok(stream),
            Some(p) => Err(std::io::Error::other(format!(
                "the upstream chose ALPN protocol {:?}, not {:?} (the configured one, or what its other connections chose)",
                String::from_utf8_lossy(p),
                String::from_utf8_lossy(wanted)
            ))),
        }
    }

    /// Looks at the files; a change that loads is used by new connections,
    /// one that does not is logged and counted.
    pub(crate) fn reload(&self, upstream: &str) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let Some(contents) = files.changed() else {
            return;
        };
        match build(&self.settings, contents, &self.roots, self.protocol) {
            Ok(config) => {
                self.config.store(Arc::new(config));
                self.counters.reloads.fetch_add(1, Relaxed);
                tracing::info!(
                    upstream,
                    "upstream TLS files reloaded; new connections use them"
                );
            }
            Err(e) => {
                self.counters.failures.fetch_add(1, Relaxed);
                tracing::warn!(
                    upstream,
                    error = %e,
                    "upstream TLS files not reloaded; still using the previous ones"
                );
            }
        }
    }
}
