//! TLS termination for the client-facing listener (rustls with the
//! `aws-lc-rs` provider: built by the C compiler alone, no cmake; its RSA
//! signing costs about half of `ring`'s, which decides how many full
//! handshakes an RSA certificate allows per core). ALPN offers `h2` and
//! `http/1.1`; the server then serves whichever the client picked.
//!
//! **Client certificates** (`[tls] client_ca`): rustls's webpki verifier
//! checks them against the CA bundle, `required` (no certificate, no
//! handshake) or `optional` (none is fine; a bad one still fails the
//! handshake). [`client_identity`] reads the verified leaf's identity once
//! per connection, at the handshake: its first URI SAN (a SPIFFE ID), else
//! its first DNS SAN. The certificate is parsed with `rustls-webpki`, the
//! parser that has just verified it: it is already in the tree through
//! rustls, so no X.509 crate is added and the names read are those the
//! verifier accepted.
//!
//! **Live reload.** One `serin-tls-reload` thread reads the certificate,
//! key and client CA every `reload_interval` (following symlinks, so a
//! Kubernetes Secret's `..data` swap is seen as well as a renewal in place).
//! When their contents changed and are valid, it builds a new
//! [`ServerConfig`] and swaps it into the one `ArcSwap` the accept loop
//! loads once per connection ([`Acceptor`]): no lock, and connections
//! already open keep the config they were made with. A file that is
//! unreadable, unparsable or does not match its partner is refused: the
//! old material stays, the failure is logged and counted.
//!
//! The whole config is swapped, rather than a certificate resolver and a
//! client verifier each behind an `ArcSwap` of its own, for two reasons:
//! rustls asks the verifier for the CA names it sends in its
//! `CertificateRequest` as a borrow, which a verifier loaded per handshake
//! cannot lend; and a new client CA comes with new session-ticket keys and
//! a new session cache, so a session made under a CA that was since removed
//! cannot be resumed (a resumed session skips the client certificate). A
//! new server certificate keeps both.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::crypto::aws_lc_rs::Ticketer;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoClientAuth, ServerConnection, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::reload::{read_file, FileContents, Reloader};
use crate::{ClientAuth, ClientAuthMode, TlsFiles};

/// Why the TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("cannot read TLS certificate chain from {path}: {reason} (expected a PEM file with one or more CERTIFICATE blocks)")]
    Cert { path: PathBuf, reason: String },
    /// The key file could not be read or holds no key.
    #[error("cannot read TLS private key from {path}: {reason} (expected a PEM file with a PKCS#8, PKCS#1 or SEC1 key)")]
    Key { path: PathBuf, reason: String },
    /// A CA bundle could not be read or holds no certificate.
    #[error("cannot read CA certificates from {path}: {reason} (expected a PEM file with one or more CERTIFICATE blocks)")]
    Ca { path: PathBuf, reason: String },
    /// An upstream's TLS would trust nobody.
    #[error("no CA certificates to trust: the system has none (install ca-certificates) and no `ca` file is set")]
    NoRoots,
    /// The name to check an upstream's certificate against is not a DNS name or IP address.
    #[error("`{name}` cannot be a TLS server name: {reason} (set `server_name` to the name in the upstream's certificate)")]
    ServerName { name: String, reason: String },
    /// rustls refused to build a client config.
    #[error("cannot set up TLS to the upstream: {reason}")]
    Client { reason: String },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("TLS certificate {cert} and key {key} do not work together: {reason}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// The client CA bundle could not be read or holds no usable CA.
    #[error("cannot read the client CA bundle (tls.client_ca) from {path}: {reason} (expected a PEM file with one or more CERTIFICATE blocks: the CAs that issue client certificates)")]
    ClientCa { path: PathBuf, reason: String },
}

/// Reloads of the listener's TLS files since start.
#[derive(Debug, Default)]
pub struct TlsReloadCounters {
    /// Changes that were loaded and are now served: a certificate and key
    /// pair, or a client CA bundle.
    pub reloads: AtomicU64,
    /// Changes that were refused (unreadable, not PEM, a key that is not
    /// the certificate's, a CA bundle with no CA); the previous material is
    /// still served.
    pub failures: AtomicU64,
}

/// Checks that the files hold a certificate chain and its private key, and
/// the client CA bundle when one is set, as the listener would load them
/// (`serin check`).
pub fn check(files: &TlsFiles) -> Result<(), TlsError> {
    let contents = Contents::read(files);
    let provider = provider();
    certified_key(files, &contents, &provider)?;
    client_verifier(files.client_auth.as_ref(), &contents, &provider).map(drop)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The files' bytes as last read (`Err`: the read's error).
#[derive(PartialEq)]
struct Contents {
    cert: FileContents,
    key: FileContents,
    /// The client CA bundle, when `client_ca` is set.
    ca: Option<FileContents>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Self {
        let read = |path: &PathBuf| read_file(path);
        Self {
            cert: read(&files.cert),
            key: read(&files.key),
            ca: files.client_auth.as_ref().map(|auth| read(&auth.ca)),
        }
    }

    fn same_pair(&self, other: &Self) -> bool {
        self.cert == other.cert && self.key == other.key
    }
}

/// Parses the pair and checks that the key is the certificate's.
fn certified_key(
    files: &TlsFiles,
    contents: &Contents,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.clone(),
        reason,
    };
    let certs = contents.cert.as_ref().map_err(|e| cert_error(e.clone()))?;
    let certs = CertificateDer::pem_slice_iter(certs)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(pem_reason(e)))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate found".into()));
    }
    let key_error = |reason: String| TlsError::Key {
        path: files.key.clone(),
        reason,
    };
    let key = contents.key.as_ref().map_err(|e| key_error(e.clone()))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| key_error(pem_reason(e)))?;
    let pair = CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(pair))
}

/// The client-certificate verifier for `auth` over the CA bundle in
/// `contents` (no client authentication without `auth`).
fn client_verifier(
    auth: Option<&ClientAuth>,
    contents: &Contents,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let (Some(auth), Some(ca)) = (auth, &contents.ca) else {
        return Ok(Arc::new(NoClientAuth));
    };
    let error = |reason: String| TlsError::ClientCa {
        path: auth.ca.clone(),
        reason,
    };
    let ca = ca.as_ref().map_err(|e| error(e.clone()))?;
    let mut roots = RootCertStore::empty();
    for (n, cert) in CertificateDer::pem_slice_iter(ca).enumerate() {
        let cert = cert.map_err(|e| error(pem_reason(e)))?;
        roots
            .add(cert)
            .map_err(|e| error(format!("certificate {} is not a usable CA: {e}", n + 1)))?;
    }
    if roots.is_empty() {
        return Err(error("no certificate found".into()));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = match auth.mode {
        ClientAuthMode::Required => builder,
        ClientAuthMode::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|e| error(e.to_string()))
}

/// A listener config serving `key` and verifying clients with `verifier`.
///
/// Sessions resume by stateless tickets (TLS 1.3 and 1.2), as with nginx's
/// and haproxy's defaults, encrypted under keys made at start and rotated
/// every 6 hours: any number of clients resume, and serin keeps no state
/// for them. The session cache is left for TLS 1.2 clients without tickets.
/// `earlier`, a config this one replaces, passes its ticket keys and
/// session cache on, so that sessions made under it still resume.
fn server_config(
    provider: &Arc<CryptoProvider>,
    key: &Arc<CertifiedKey>,
    verifier: &Arc<dyn ClientCertVerifier>,
    earlier: Option<&ServerConfig>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    match earlier {
        Some(earlier) => {
            config.ticketer = earlier.ticketer.clone();
            config.session_storage = earlier.session_storage.clone();
        }
        None => config.ticketer = Ticketer::new()?,
    }
    Ok(Arc::new(config))
}

/// What is wrong with a PEM file, in words (the parser's own text shows
/// bytes as numbers).
pub(crate) fn pem_reason(e: pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "no \"-----END {}-----\" line (is the file cut short?)",
            String::from_utf8_lossy(&end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!(
                "a malformed BEGIN line: {:?}",
                String::from_utf8_lossy(&line)
            )
        }
        pem::Error::NoItemsFound => "none found".into(),
        other => other.to_string(),
    }
}

// === client identity ===

/// The identity of the client on `conn`, from its verified certificate:
/// the leaf's first URI SAN (a SPIFFE ID), else its first DNS SAN; `None`
/// without a certificate, or with no such name that is a valid header
/// value. Called once per connection, after the handshake.
pub(crate) fn client_identity(conn: &ServerConnection) -> Option<HeaderValue> {
    identity_of(conn.peer_certificates()?.first()?)
}

fn identity_of(leaf: &CertificateDer<'_>) -> Option<HeaderValue> {
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    cert.valid_uri_names()
        .chain(cert.valid_dns_names())
        .find_map(|name| HeaderValue::from_str(name).ok())
}

// === impl Listener ===

/// The listener's current rustls config: what a new connection's handshake
/// uses, loaded once per connection (one atomic load, no lock).
#[derive(Clone, Debug)]
pub struct Acceptor(Arc<ArcSwap<ServerConfig>>);

impl Acceptor {
    /// Starts the server side of a handshake on `io` with the current config.
    pub fn accept<IO>(&self, io: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tokio_rustls::TlsAcceptor::from(self.0.load_full()).accept(io)
    }
}

/// A TLS listener's config, and the thread that reloads its files: serin's
/// client-facing listener, and `serin inject --serve`'s webhook.
#[derive(Debug)]
pub struct Listener {
    /// What every handshake uses.
    acceptor: Acceptor,
    /// The reload counters, read by [`crate::Stats`].
    counters: Arc<TlsReloadCounters>,
    reloader: Reloader,
}

impl Listener {
    /// Loads the files (an error here stops the start) and starts the
    /// reload thread, which checks them every `interval`. Dropping the
    /// listener ends the thread at its next look; [`Listener::stop`] waits.
    pub fn start(files: &TlsFiles, interval: Duration) -> Result<Self, crate::StartError> {
        let provider = provider();
        let contents = Contents::read(files);
        let key = certified_key(files, &contents, &provider)?;
        let verifier = client_verifier(files.client_auth.as_ref(), &contents, &provider)?;
        let config =
            server_config(&provider, &key, &verifier, None).map_err(|e| TlsError::Config {
                cert: files.cert.clone(),
                key: files.key.clone(),
                reason: e.to_string(),
            })?;
        let current = Arc::new(ArcSwap::new(config));
        let counters = Arc::new(TlsReloadCounters::default());
        let mut reload = Reload {
            files: files.clone(),
            provider,
            current: current.clone(),
            counters: counters.clone(),
            seen: contents,
            key,
            verifier,
        };
        let reloader = Reloader::spawn("serin-tls-reload", interval, move || reload.poll())
            .map_err(crate::StartError::Spawn)?;
        Ok(Self {
            acceptor: Acceptor(current),
            counters,
            reloader,
        })
    }

    /// What new connections' handshakes use (its clones follow reloads).
    pub fn acceptor(&self) -> Acceptor {
        self.acceptor.clone()
    }

    /// The reloads loaded and refused so far.
    pub fn counters(&self) -> &Arc<TlsReloadCounters> {
        &self.counters
    }

    /// Stops the reload thread and waits for it (at most one file read).
    pub fn stop(self) {
        self.reloader.stop();
    }
}

/// The reload thread's state.
struct Reload {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Arc<ArcSwap<ServerConfig>>,
    counters: Arc<TlsReloadCounters>,
    /// The contents last looked at: only a change is loaded (or refused,
    /// once).
    seen: Contents,
    /// The pair being served.
    key: Arc<CertifiedKey>,
    /// The client verifier in use.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl Reload {
    /// Reads the files; loads what changed since the last look, each of
    /// the pair and the CA on its own (a bad CA does not hold back a good
    /// renewed certificate). The files are read twice: contents that change
    /// between the two reads (a symlink swapped between reading the
    /// certificate and the key) are left for the next look.
    fn poll(&mut self) {
        let contents = Contents::read(&self.files);
        if contents == self.seen || contents != Contents::read(&self.files) {
            return;
        }
        let mut key = None;
        if !contents.same_pair(&self.seen) {
            match certified_key(&self.files, &contents, &self.provider) {
                Ok(pair) => key = Some(pair),
                Err(e) => self.refused(&e),
            }
        }
        let mut verifier = None;
        if contents.ca != self.seen.ca {
            let auth = self.files.client_auth.as_ref();
            match client_verifier(auth, &contents, &self.provider) {
                Ok(v) => verifier = Some(v),
                Err(e) => self.refused(&e),
            }
        }
        self.seen = contents;
        if key.is_none() && verifier.is_none() {
            return;
        }
        // A new CA starts new ticket keys and a new session cache (see the
        // module's header).
        let earlier = verifier.is_none().then(|| self.current.load_full());
        let (new_key, new_verifier) = (key.as_ref(), verifier.as_ref());
        let config = server_config(
            &self.provider,
            new_key.unwrap_or(&self.key),
            new_verifier.unwrap_or(&self.verifier),
            earlier.as_deref(),
        );
        match config {
            Ok(config) => self.current.store(config),
            Err(e) => {
                self.counters.failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "TLS files not reloaded; still serving the previous ones");
                return;
            }
        }
        if let Some(pair) = key {
            self.key = pair;
            self.counters.reloads.fetch_add(1, Relaxed);
            tracing::info!(
                cert = %self.files.cert.display(),
                key = %self.files.key.display(),
                "TLS certificate reloaded; new connections use it"
            );
        }
        if let Some(verifier) = verifier {
            self.verifier = verifier;
            self.counters.reloads.fetch_add(1, Relaxed);
            if let Some(auth) = &self.files.client_auth {
                tracing::info!(
                    client_ca = %auth.ca.display(),
                    "TLS client CA reloaded; new handshakes verify client certificates with it"
                );
            }
        }
    }

    fn refused(&self, e: &TlsError) {
        self.counters.failures.fetch_add(1, Relaxed);
        let what = match e {
            TlsError::ClientCa { .. } => {
                "TLS client CA not reloaded; still verifying clients with the previous one"
            }
            _ => "TLS certificate not reloaded; still serving the previous one",
        };
        tracing::warn!(error = %e, "{what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_tests::{temp_dir, TestCa, TestCert};

    /// A reload thread's state over `files`, as `Listener::start` makes it
    /// (without the thread: the test calls `poll`).
    fn reload(files: &TlsFiles) -> Reload {
        let provider = provider();
        let seen = Contents::read(files);
        let key = certified_key(files, &seen, &provider).unwrap();
        let verifier = client_verifier(files.client_auth.as_ref(), &seen, &provider).unwrap();
        let config = server_config(&provider, &key, &verifier, None).unwrap();
        Reload {
            files: files.clone(),
            provider,
            current: Arc::new(ArcSwap::new(config)),
            counters: Arc::new(TlsReloadCounters::default()),
            seen,
            key,
            verifier,
        }
    }

    fn count(reload: &Reload) -> (u64, u64) {
        let counters = &reload.counters;
        (
            counters.reloads.load(Relaxed),
            counters.failures.load(Relaxed),
        )
    }

    #[test]
    fn each_change_is_loaded_or_refused_once_and_a_refusal_keeps_the_old_pair() {
        let (first, second) = (TestCert::named("first"), TestCert::named("second"));
        let files = TlsFiles {
            cert: first.cert_path.clone(),
            key: first.key_path.clone(),
            client_auth: None,
        };
        let mut reload = reload(&files);
        reload.poll();
        assert_eq!(
            count(&reload),
            (0, 0),
            "unchanged files are not loaded again"
        );
        // Each step changes one file; two looks count it once.
        let steps = [
            (&files.cert, "not a certificate", (0, 1), &first.der),
            (&files.cert, &second.cert_pem, (0, 2), &first.der),
            (&files.key, &second.key_pem, (1, 2), &second.der),
        ];
        for (path, text, counts, served) in steps {
            std::fs::write(path, text).unwrap();
            reload.poll();
            reload.poll();
            assert_eq!(count(&reload), counts, "after writing {text:?}");
            assert_eq!(&reload.key.cert[0], served, "after writing {text:?}");
        }

        std::fs::remove_file(&files.key).unwrap();
        reload.poll();
        assert_eq!(count(&reload), (1, 3), "a missing file is refused");
        assert_eq!(reload.key.cert[0], second.der);
        let err = certified_key(&files, &Contents::read(&files), &reload.provider).unwrap_err();
        assert!(
            err.to_string().contains(&files.key.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_new_client_ca_is_loaded_with_new_resumption_state_and_a_bad_one_keeps_the_old() {
        let (old_ca, new_ca) = (TestCa::new("old CA"), TestCa::new("new CA"));
        let (first, second) = (TestCert::named("first"), TestCert::named("second"));
        let dir = temp_dir("client-ca");
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_auth: Some(ClientAuth {
                ca: dir.join("ca.pem"),
                mode: ClientAuthMode::Required,
            }),
        };
        let ca = &files.client_auth.as_ref().unwrap().ca;
        std::fs::write(&files.cert, &first.cert_pem).unwrap();
        std::fs::write(&files.key, &first.key_pem).unwrap();
        std::fs::copy(&old_ca.cert_path, ca).unwrap();
        let mut reload = reload(&files);
        let sessions = |reload: &Reload| reload.current.load().session_storage.clone();
        let tickets = |reload: &Reload| reload.current.load().ticketer.clone();
        let verifier = reload.verifier.clone();
        let (cache, keys) = (sessions(&reload), tickets(&reload));
        assert!(keys.enabled(), "sessions resume by tickets");

        // A bad bundle, then one with no certificate: refused, nothing swapped.
        for bad in ["-----BEGIN CERTIFICATE-----\nbroken\n", "no PEM here\n"] {
            std::fs::write(ca, bad).unwrap();
            reload.poll();
            reload.poll();
            assert!(Arc::ptr_eq(&reload.verifier, &verifier), "after {bad:?}");
            assert!(Arc::ptr_eq(&sessions(&reload), &cache), "after {bad:?}");
            assert!(Arc::ptr_eq(&tickets(&reload), &keys), "after {bad:?}");
        }
        assert_eq!(count(&reload), (0, 2));

        // A renewed certificate keeps the session cache and ticket keys.
        std::fs::write(&files.cert, &second.cert_pem).unwrap();
        std::fs::write(&files.key, &second.key_pem).unwrap();
        reload.poll();
        assert_eq!(count(&reload), (1, 2));
        assert_eq!(reload.key.cert[0], second.der);
        assert!(Arc::ptr_eq(&sessions(&reload), &cache));
        assert!(Arc::ptr_eq(&tickets(&reload), &keys));

        // A new CA: a new verifier, session cache and ticket keys.
        std::fs::copy(&new_ca.cert_path, ca).unwrap();
        reload.poll();
        assert_eq!(count(&reload), (2, 2));
        assert!(!Arc::ptr_eq(&reload.verifier, &verifier));
        assert!(!Arc::ptr_eq(&sessions(&reload), &cache));
        assert!(!Arc::ptr_eq(&tickets(&reload), &keys));

        std::fs::remove_file(ca).unwrap();
        let err = check(&files).unwrap_err().to_string();
        assert!(err.contains(&ca.display().to_string()), "{err}");
        assert!(err.contains("tls.client_ca"), "{err}");
    }

    fn cert_with(names: Vec<rcgen::SanType>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = names;
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_identity_is_the_first_uri_san_else_the_first_dns_san() {
        use rcgen::SanType::{DnsName, IpAddress, URI};
        let dns = |n: &str| DnsName(n.try_into().unwrap());
        let uri = |n: &str| URI(n.try_into().unwrap());
        let identity = |names| identity_of(&cert_with(names));
        let spiffe = "spiffe://cluster.local/ns/a/sa/b";
        assert_eq!(
            identity(vec![dns("a.example"), uri(spiffe), uri("spiffe://x/y")]).unwrap(),
            spiffe
        );
        assert_eq!(
            identity(vec![
                IpAddress([10, 0, 0, 1].into()),
                dns("a.example"),
                dns("b.example")
            ])
            .unwrap(),
            "a.example"
        );
        assert_eq!(identity(vec![IpAddress([10, 0, 0, 1].into())]), None);
        assert_eq!(identity(vec![]), None);
    }
}
