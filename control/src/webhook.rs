//! Webhooks: tell people and pipelines when the canary is rolled back,
//! promoted, stepped, paused, or held for lack of traffic.
//!
//! [`Webhooks::notify`] never blocks and never waits: it hands the event to a
//! bounded queue (dropping and counting it if the queue is full) and returns.
//! A background task delivers each event to every subscribed receiver as a
//! JSON POST signed with `X-Serin-Signature: sha256=<hex HMAC-SHA256(body)>`,
//! retrying failures with capped exponential backoff and full jitter. The data
//! plane never sees any of this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::client::send;
use crate::config::WebhookSettings;

/// The JSON body of every webhook (README.md, "State, webhooks and metrics").
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WebhookEvent {
    /// Unique id of this event (the same across retries).
    pub id: String,
    /// `rollback`, `promoted`, `step`, `paused` or `judge_blocked`.
    pub event: String,
    /// RFC 3339 UTC time of the transition.
    pub at: String,
    /// Canary weight after the transition, in percent.
    pub canary_weight: f64,
    /// Phase after the transition.
    pub phase: String,
    /// Why it happened, with numbers.
    pub reason: String,
    /// The two windows at the time (same shape as `/status`).
    pub upstreams: serde_json::Value,
}

/// Delivery counters, read by `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Deliveries a receiver accepted (2xx).
    pub delivered: AtomicU64,
    /// Deliveries abandoned after the last retry.
    pub failed: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Attempts that failed and were retried.
    pub retried: AtomicU64,
}

/// Retry policy for one delivery.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 6).
    pub attempts: u32,
    /// Backoff before the first retry (default 250 ms), doubled each time.
    pub base: Duration,
    /// Longest backoff (default 30 s).
    pub cap: Duration,
    /// Time allowed for one attempt (default 5 s).
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Backoff before retry number `retry` (0-based), with full jitter:
    /// uniform in [0, min(cap, base·2^retry)]. `random` is uniform in [0, 1).
    pub fn backoff(&self, retry: u32, random: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .min(self.cap);
        ceiling.mul_f64(random.clamp(0.0, 1.0))
    }
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct Webhooks {
    queue: Option<mpsc::Sender<WebhookEvent>>,
    stats: Arc<DeliveryStats>,
}

impl Webhooks {
    /// Starts the delivery task for `receivers` (none: events are discarded).
    /// Must be called inside a tokio runtime.
    pub fn start(receivers: Vec<WebhookSettings>, policy: RetryPolicy) -> Self {
        let stats = Arc::new(DeliveryStats::default());
        if receivers.is_empty() {
            return Self { queue: None, stats };
        }
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(deliver_all(rx, Arc::new(receivers), policy, stats.clone()));
        Self {
            queue: Some(tx),
            stats,
        }
    }

    /// Queues an event for delivery and returns at once.
    pub fn notify(&self, event: WebhookEvent) {
        let Some(queue) = &self.queue else { return };
        if let Err(e) = queue.try_send(event) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "webhook queue full: event dropped");
        }
    }

    /// Delivery counters.
    pub fn stats(&self) -> &Arc<DeliveryStats> {
        &self.stats
    }
}

async fn deliver_all(
    mut rx: mpsc::Receiver<WebhookEvent>,
    receivers: Arc<Vec<WebhookSettings>>,
    policy: RetryPolicy,
    stats: Arc<DeliveryStats>,
) {
    while let Some(event) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&event).expect("events serialise"));
        for receiver in receivers.iter().filter(|r| r.events.contains(&event.event)) {
            // Each receiver retries on its own, so one slow receiver does not
            // delay the others or the next event.
            tokio::spawn(deliver_one(
                receiver.clone(),
                event.id.clone(),
                body.clone(),
                policy.clone(),
                stats.clone(),
            ));
        }
    }
}

async fn deliver_one(
    receiver: WebhookSettings,
    id: String,
    body: Bytes,
    policy: RetryPolicy,
    stats: Arc<DeliveryStats>,
) {
    let signature = receiver
        .secret
        .as_deref()
        .map(|s| sign(s.as_bytes(), &body));
    for attempt in 0..policy.attempts.max(1) {
        let outcome = tokio::time::timeout(
            policy.timeout,
            post(&receiver.url, &id, &body, signature.as_deref()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", policy.timeout)));
        match outcome {
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(url = %receiver.url, %id, attempt = attempt + 1, "webhook delivered");
                return;
            }
            Err(e) if attempt + 1 < policy.attempts => {
                stats.retried.fetch_add(1, Ordering::Relaxed);
                let wait = policy.backoff(attempt, jitter());
                tracing::warn!(url = %receiver.url, %id, attempt = attempt + 1, error = %e, ?wait, "webhook failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(url = %receiver.url, %id, attempts = policy.attempts, error = %e, "webhook abandoned; check the receiver URL and that it answers 2xx");
            }
        }
    }
}

/// `sha256=<hex HMAC-SHA256(body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded per process from the OS; good enough for jitter.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// One POST; Ok on a 2xx answer.
async fn post(url: &str, id: &str, body: &Bytes, signature: Option<&str>) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("URL has no host")?.to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut req = Request::post(path)
        .header(
            http::header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or(&host),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("serin/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-serin-event-id", id)
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    if let Some(sig) = signature {
        req.headers_mut().insert(
            "x-serin-signature",
            http::HeaderValue::from_str(sig).map_err(|e| e.to_string())?,
        );
    }
    let (status, _) = if https {
        let connector = tokio_rustls::TlsConnector::from(tls_client());
        let name =
            rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("receiver answered {status}"))
    }
}

fn tls_client() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_and_a_cap() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        assert_eq!(
            p.backoff(0, 0.999_999),
            Duration::from_millis(100).mul_f64(0.999_999)
        );
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(200));
        assert_eq!(p.backoff(10, 1.0), Duration::from_secs(1), "capped");
        assert_eq!(p.backoff(40, 1.0), Duration::from_secs(1), "no overflow");
        assert_eq!(
            p.backoff(3, 0.0),
            Duration::ZERO,
            "full jitter reaches zero"
        );
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }
}
