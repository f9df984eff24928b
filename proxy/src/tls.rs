//! TLS termination for the client-facing listener (rustls with the `ring`
//! provider: no C toolchain or cmake needed). ALPN offers `h2` and
//! `http/1.1`; the server then serves whichever the client picked.
//!
//! The certificate and key are reloaded while serin runs: one
//! `serin-tls-reload` thread reads both files every `reload_interval`
//! (following symlinks, so a Kubernetes Secret's `..data` swap is seen as
//! well as a renewal in place) and, when their contents changed and make a
//! valid pair, swaps the new [`CertifiedKey`] in. A handshake only loads an
//! `Arc` from one `ArcSwap`: no lock, and connections already open keep the
//! key they were made with. A file that is unreadable, unparsable or does
//! not match its partner is refused: the old pair stays, the failure is
//! logged and counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsFiles;

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
}

/// Reloads of the listener's certificate and key since start.
#[derive(Debug, Default)]
pub struct TlsReloadCounters {
    /// Changed files that were loaded and are now served.
    pub reloads: AtomicU64,
    /// Changed files that were refused (unreadable, not PEM, or a key that
    /// is not the certificate's); the previous pair is still served.
    pub failures: AtomicU64,
}

/// Checks that the files hold a certificate chain and its private key, as
/// the listener would load them (`serin check`).
pub fn check(files: &TlsFiles) -> Result<(), TlsError> {
    certified_key(files, &Contents::read(files), &provider()).map(drop)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The two files' bytes as last read (`Err`: the read's error).
#[derive(PartialEq)]
struct Contents {
    cert: Result<Vec<u8>, String>,
    key: Result<Vec<u8>, String>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Self {
        let read = |path: &Path| std::fs::read(path).map_err(|e| e.to_string());
        Self {
            cert: read(&files.cert),
            key: read(&files.key),
        }
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

// === impl Listener ===

/// The listener's rustls config, and the thread that reloads its key pair.
pub(crate) struct Listener {
    /// What every handshake uses.
    pub(crate) config: Arc<ServerConfig>,
    /// The reload counters, read by [`crate::Stats`].
    pub(crate) counters: Arc<TlsReloadCounters>,
    /// Dropped (or sent to) to stop the reload thread.
    stop: Sender<()>,
    reloader: JoinHandle<()>,
}

impl Listener {
    /// Loads the files (an error here stops the start) and starts the
    /// reload thread, which checks them every `interval`.
    pub(crate) fn start(files: &TlsFiles, interval: Duration) -> Result<Self, crate::StartError> {
        let provider = provider();
        let contents = Contents::read(files);
        let current = Arc::new(CurrentKey(ArcSwap::new(certified_key(
            files, &contents, &provider,
        )?)));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                cert: files.cert.clone(),
                key: files.key.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let counters = Arc::new(TlsReloadCounters::default());
        let (stop, stopped) = std::sync::mpsc::channel();
        let reload = Reload {
            files: files.clone(),
            provider,
            current,
            counters: counters.clone(),
            seen: contents,
        };
        let reloader = std::thread::Builder::new()
            .name("serin-tls-reload".into())
            .spawn(move || reload.run(interval, stopped))
            .map_err(crate::StartError::Spawn)?;
        Ok(Self {
            config: Arc::new(config),
            counters,
            stop,
            reloader,
        })
    }

    /// Stops the reload thread and waits for it (at most one file read).
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.reloader.join();
    }
}

/// The key pair new handshakes get.
#[derive(Debug)]
struct CurrentKey(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The reload thread's state.
struct Reload {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Arc<CurrentKey>,
    counters: Arc<TlsReloadCounters>,
    /// The contents last looked at: only a change is loaded (or refused,
    /// once).
    seen: Contents,
}

impl Reload {
    fn run(mut self, interval: Duration, stopped: Receiver<()>) {
        while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
            self.poll();
        }
    }

    /// Reads the files; loads them if they changed since the last look.
    /// They are read twice: contents that change between the two reads
    /// (a symlink swapped between reading the certificate and the key) are
    /// left for the next look.
    fn poll(&mut self) {
        let contents = Contents::read(&self.files);
        if contents == self.seen || contents != Contents::read(&self.files) {
            return;
        }
        match certified_key(&self.files, &contents, &self.provider) {
            Ok(pair) => {
                self.current.0.store(pair);
                self.counters.reloads.fetch_add(1, Relaxed);
                tracing::info!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    "TLS certificate reloaded; new connections use it"
                );
            }
            Err(e) => {
                self.counters.failures.fetch_add(1, Relaxed);
                tracing::warn!(
                    error = %e,
                    "TLS certificate not reloaded; still serving the previous one"
                );
            }
        }
        self.seen = contents;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_tests::TestCert;

    #[test]
    fn each_change_is_loaded_or_refused_once_and_a_refusal_keeps_the_old_pair() {
        let (first, second) = (TestCert::named("first"), TestCert::named("second"));
        let files = TlsFiles {
            cert: first.cert_path.clone(),
            key: first.key_path.clone(),
        };
        let provider = provider();
        let seen = Contents::read(&files);
        let pair = certified_key(&files, &seen, &provider).unwrap();
        let current = Arc::new(CurrentKey(ArcSwap::new(pair)));
        let counters = Arc::new(TlsReloadCounters::default());
        let mut reload = Reload {
            files: files.clone(),
            provider,
            current: current.clone(),
            counters: counters.clone(),
            seen,
        };
        let count = || {
            (
                counters.reloads.load(Relaxed),
                counters.failures.load(Relaxed),
            )
        };
        reload.poll();
        assert_eq!(count(), (0, 0), "unchanged files are not loaded again");
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
            assert_eq!(count(), counts, "after writing {text:?}");
            assert_eq!(&current.0.load().cert[0], served, "after writing {text:?}");
        }

        std::fs::remove_file(&files.key).unwrap();
        reload.poll();
        assert_eq!(count(), (1, 3), "a missing file is refused");
        assert_eq!(current.0.load().cert[0], second.der);
        let err = certified_key(&files, &Contents::read(&files), &reload.provider).unwrap_err();
        assert!(
            err.to_string().contains(&files.key.display().to_string()),
            "{err}"
        );
    }
}
