//! The addresses behind one upstream, shared by every worker: which there
//! are, how each is doing, and which are ejected.
//!
//! An upstream is one or more URLs. A URL whose host is an IP address is
//! one endpoint; a host name is re-resolved every `resolve_interval`
//! (Envoy's "strict DNS"), and each of its addresses is an endpoint. The
//! [`EndpointSet`] publishes the current list behind an `ArcSwap` with a
//! generation number; each worker's pool checks the number per request (one
//! atomic load) and rebuilds its per-endpoint connection lists only when it
//! moved. An address that stays across a re-resolution keeps its
//! [`Endpoint`], with its counters and ejection state.
//!
//! **Outlier detection**, as Envoy's passive kind: an endpoint that gives
//! `consecutive_failures` failures in a row (a 5xx, or no connection) is
//! ejected for `base_ejection` times the number of times it has been
//! ejected (at most `max_ejection`), and served again after. Never more than
//! `max_ejection_percent` of the endpoints are out, and never all of them.
//! The judge is unaffected: it judges the upstream as a whole, from the
//! answers clients got.
//!
//! Counters here are shared atomics, written with relaxed adds (wait-free);
//! a success costs one relaxed load of the failure streak.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use tokio::time::Instant;

/// Passive outlier detection settings (`[stable.outlier]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Failures in a row (5xx answers, or no connection) that eject an
    /// endpoint (default 5).
    pub consecutive_failures: u32,
    /// How long a first ejection lasts; the n-th lasts n times as long
    /// (default 30 s).
    pub base_ejection: Duration,
    /// The longest an ejection lasts (default 300 s).
    pub max_ejection: Duration,
    /// The most endpoints out at once, in percent of them (default 50);
    /// one can always be ejected when there are two or more, and the last
    /// one never is.
    pub max_ejection_percent: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: crate::defaults::OUTLIER_CONSECUTIVE_FAILURES,
            base_ejection: crate::defaults::OUTLIER_BASE_EJECTION,
            max_ejection: crate::defaults::OUTLIER_MAX_EJECTION,
            max_ejection_percent: crate::defaults::OUTLIER_MAX_EJECTION_PERCENT,
        }
    }
}

/// One URL of an upstream: where to find its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// The host as written (no brackets): an IP address, or a name.
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Target {
    /// The address, when the host is an IP address (no resolution needed).
    fn fixed(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// One address of an upstream.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    /// The name its TLS certificate is checked against, for `https://`.
    pub(crate) server_name: Option<ServerName<'static>>,
    /// Answers (or failures to connect) counted for it.
    requests: AtomicU64,
    /// Of those, failures: 5xx answers, or no connection.
    failures: AtomicU64,
    /// The current streak of failures.
    streak: AtomicU32,
    /// Times it was ejected.
    ejections: AtomicU32,
    /// Until when it is ejected, in milliseconds since the set's base
    /// (0: not ejected).
    ejected_until: AtomicU64,
}

impl Endpoint {
    fn new(addr: SocketAddr, server_name: Option<ServerName<'static>>) -> Self {
        Self {
            addr,
            server_name,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }
}

/// What `/status` and the metrics show of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSnapshot {
    /// `ip:port`.
    pub address: String,
    /// Out of rotation now (outlier detection).
    pub ejected: bool,
    /// Answers counted for it, and failures to connect.
    pub requests: u64,
    /// Of those, 5xx answers and failures to connect.
    pub failures: u64,
    /// Times it was ejected since start.
    pub ejections: u32,
}

/// The current endpoints, and the generation that names this list.
struct Published {
    generation: u64,
    endpoints: Vec<Arc<Endpoint>>,
}

/// An upstream's endpoints, shared by every worker.
pub struct EndpointSet {
    /// The upstream's name in logs (`stable`, `canary`).
    name: &'static str,
    targets: Vec<Target>,
    /// The TLS name override (`server_name`), for `https://`.
    tls_name: Option<String>,
    tls: bool,
    outlier: OutlierSettings,
    published: ArcSwap<Published>,
    generation: AtomicU64,
    base: Instant,
    /// Each target's addresses at its last successful resolution: what a
    /// failed one keeps. Only [`EndpointSet::refresh`] locks it.
    resolved: Mutex<Vec<Vec<SocketAddr>>>,
    /// Re-resolutions of a name that failed.
    resolve_failures: AtomicU64,
}

impl std::fmt::Debug for EndpointSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSet")
            .field("name", &self.name)
            .field("endpoints", &self.published.load().endpoints.len())
            .finish()
    }
}

/// How a name is resolved: the system's resolver, or a test's.
pub(crate) type Resolve<'a> = &'a dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

/// The system's resolver (getaddrinfo), blocking.
pub(crate) fn system_resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

impl EndpointSet {
    /// The set for `targets`, resolved once now with `resolve`; a name that
    /// does not resolve yet has no endpoints until it does.
    pub(crate) fn new(
        name: &'static str,
        targets: Vec<Target>,
        tls: Option<&crate::upstream::UpstreamTls>,
        outlier: OutlierSettings,
        resolve: Resolve<'_>,
    ) -> Self {
        let set = Self {
            name,
            resolved: Mutex::new(vec![Vec::new(); targets.len()]),
            targets,
            tls_name: tls.and_then(|t| t.server_name.clone()),
            tls: tls.is_some(),
            outlier,
            published: ArcSwap::from_pointee(Published {
                generation: 0,
                endpoints: Vec::new(),
            }),
            generation: AtomicU64::new(0),
            base: Instant::now(),
            resolve_failures: AtomicU64::new(0),
        };
        set.refresh(resolve);
        set
    }

    /// Whether any target is a name that needs re-resolving.
    pub(crate) fn resolves(&self) -> bool {
        self.targets.iter().any(|t| t.fixed().is_none())
    }

    /// The generation of the current list: it moves when the list changes.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// The current list, and its generation.
    pub(crate) fn current(&self) -> (u64, Vec<Arc<Endpoint>>) {
        let published = self.published.load();
        (published.generation, published.endpoints.clone())
    }

    /// Resolves every name again and publishes the list if it changed. A
    /// name that fails to resolve keeps its previous addresses (logged and
    /// counted).
    pub(crate) fn refresh(&self, resolve: Resolve<'_>) {
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.published.load_full();
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        for (index, target) in self.targets.iter().enumerate() {
            let addrs = match target.fixed() {
                Some(addr) => vec![addr],
                None => match resolve(&target.host, target.port) {
                    Ok(addrs) if !addrs.is_empty() => addrs,
                    failed => {
                        self.resolve_failures.fetch_add(1, Relaxed);
                        let error = match failed {
                            Err(e) => e.to_string(),
                            Ok(_) => "no addresses".into(),
                        };
                        tracing::warn!(
                            upstream = self.name,
                            host = %target.host,
                            %error,
                            "cannot resolve the upstream's host; keeping its previous addresses"
                        );
                        resolved[index].clone()
                    }
                },
            };
            resolved[index].clone_from(&addrs);
            for addr in addrs {
                if endpoints.iter().any(|e| e.addr == addr) {
                    continue;
                }
                let kept = old.endpoints.iter().find(|e| e.addr == addr).cloned();
                endpoints.push(
                    kept.unwrap_or_else(|| Arc::new(Endpoint::new(addr, self.server_name(target)))),
                );
            }
        }
        let same = endpoints.len() == old.endpoints.len()
            && endpoints
                .iter()
                .zip(&old.endpoints)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return;
        }
        let generation = old.generation + 1;
        let addresses = endpoints.iter().map(|e| e.addr).collect::<Vec<_>>();
        if old.generation > 0 || endpoints.len() > 1 {
            tracing::info!(upstream = self.name, endpoints = ?addresses, "upstream endpoints changed");
        }
        self.published.store(Arc::new(Published {
            generation,
            endpoints,
        }));
        self.generation.store(generation, Relaxed);
    }

    fn server_name(&self, target: &Target) -> Option<ServerName<'static>> {
        if !self.tls {
            return None;
        }
        let name = self.tls_name.as_deref().unwrap_or(&target.host);
        // Checked at start (`Origin::load`), so only a bad target host of a
        // list fails here; it is then checked against the first name.
        ServerName::try_from(name.to_string()).ok()
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    /// Whether `endpoint` is out of rotation at `now`.
    #[inline]
    pub(crate) fn ejected(&self, endpoint: &Endpoint, now: Instant) -> bool {
        let until = endpoint.ejected_until.load(Relaxed);
        until != 0 && until > self.now_ms(now)
    }

    /// Records an answer (or a failure to get one) from `endpoint`.
    #[inline]
    pub(crate) fn record(&self, endpoint: &Endpoint, failed: bool, now: Instant) {
        endpoint.requests.fetch_add(1, Relaxed);
        if !failed {
            if endpoint.streak.load(Relaxed) != 0 {
                endpoint.streak.store(0, Relaxed);
            }
            return;
        }
        endpoint.failures.fetch_add(1, Relaxed);
        let streak = endpoint.streak.fetch_add(1, Relaxed) + 1;
        if streak >= self.outlier.consecutive_failures {
            self.eject(endpoint, now);
        }
    }

    /// Ejects `endpoint` if the limits allow it.
    fn eject(&self, endpoint: &Endpoint, now: Instant) {
        if self.ejected(endpoint, now) {
            return;
        }
        let published = self.published.load();
        let total = published.endpoints.len();
        let out = published
            .endpoints
            .iter()
            .filter(|e| self.ejected(e, now))
            .count();
        let percent = usize::from(self.outlier.max_ejection_percent);
        let allowed = match percent {
            0 => 0,
            _ => (total * percent / 100).max(1).min(total.saturating_sub(1)),
        };
        if out >= allowed {
            return;
        }
        let times = endpoint.ejections.fetch_add(1, Relaxed) + 1;
        let duration = self
            .outlier
            .base_ejection
            .saturating_mul(times)
            .min(self.outlier.max_ejection);
        endpoint
            .ejected_until
            .store(self.now_ms(now + duration), Relaxed);
        endpoint.streak.store(0, Relaxed);
        tracing::warn!(
            upstream = self.name,
            endpoint = %endpoint.addr,
            failures = self.outlier.consecutive_failures,
            ?duration,
            "upstream endpoint ejected after failures in a row"
        );
    }

    /// What `/status` and the metrics show of each endpoint.
    pub fn snapshot(&self) -> Vec<EndpointSnapshot> {
        let now = Instant::now();
        self.published
            .load()
            .endpoints
            .iter()
            .map(|e| EndpointSnapshot {
                address: e.addr.to_string(),
                ejected: self.ejected(e, now),
                requests: e.requests.load(Relaxed),
                failures: e.failures.load(Relaxed),
                ejections: e.ejections.load(Relaxed),
            })
            .collect()
    }

    /// Re-resolutions of a name that failed since start.
    pub fn resolve_failures(&self) -> u64 {
        self.resolve_failures.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn target(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn a_name_is_re_resolved_and_kept_addresses_keep_their_state() {
        // The name's answer; `None`: the resolver fails.
        let answer: RefCell<Option<Vec<SocketAddr>>> =
            RefCell::new(Some(vec!["10.0.0.1:80".parse().unwrap()]));
        let resolve = |_: &str, _: u16| {
            answer
                .borrow()
                .clone()
                .ok_or_else(|| std::io::Error::other("SERVFAIL"))
        };
        let set = EndpointSet::new(
            "stable",
            vec![target("app.svc", 80), target("10.0.0.9", 81)],
            None,
            OutlierSettings::default(),
            &resolve,
        );
        assert!(set.resolves());
        let (generation, first) = set.current();
        let addrs =
            |list: &[Arc<Endpoint>]| list.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>();
        assert_eq!(addrs(&first), ["10.0.0.1:80", "10.0.0.9:81"]);
        set.record(&first[0], true, Instant::now());

        set.refresh(&resolve);
        assert_eq!(
            set.generation(),
            generation,
            "the same answer changes nothing"
        );

        *answer.borrow_mut() = Some(vec![
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        ]);
        set.refresh(&resolve);
        let (next, second) = set.current();
        assert_eq!(next, generation + 1);
        assert_eq!(
            addrs(&second),
            ["10.0.0.2:80", "10.0.0.1:80", "10.0.0.9:81"]
        );
        assert!(
            Arc::ptr_eq(&second[1], &first[0]),
            "a kept address keeps its state"
        );
        assert_eq!(set.snapshot()[1].failures, 1);

        *answer.borrow_mut() = None;
        set.refresh(&resolve);
        assert_eq!(
            set.generation(),
            next,
            "a failed resolution keeps the addresses"
        );
        assert_eq!(set.resolve_failures(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_for_a_growing_time_but_never_all() {
        let outlier = OutlierSettings {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        };
        let set = EndpointSet::new(
            "stable",
            vec![
                target("10.0.0.1", 80),
                target("10.0.0.2", 80),
                target("10.0.0.3", 80),
            ],
            None,
            outlier,
            &system_resolve,
        );
        let (_, eps) = set.current();
        let now = Instant::now();
        set.record(&eps[0], true, now);
        set.record(&eps[0], true, now);
        set.record(&eps[0], false, now);
        set.record(&eps[0], true, now);
        set.record(&eps[0], true, now);
        assert!(!set.ejected(&eps[0], now), "a success breaks the streak");
        set.record(&eps[0], true, now);
        assert!(set.ejected(&eps[0], now));
        // 50% of 3 is 1: a second endpoint stays in however it fails.
        for _ in 0..5 {
            set.record(&eps[1], true, now);
        }
        assert!(!set.ejected(&eps[1], now));
        assert!(set.ejected(&eps[0], now + Duration::from_secs(29)));
        assert!(!set.ejected(&eps[0], now + Duration::from_secs(31)));
        // The second ejection lasts twice as long.
        let later = now + Duration::from_secs(31);
        for _ in 0..3 {
            set.record(&eps[0], true, later);
        }
        assert!(set.ejected(&eps[0], later + Duration::from_secs(59)));
        assert!(!set.ejected(&eps[0], later + Duration::from_secs(61)));
        let snapshot = set.snapshot();
        assert_eq!(
            (
                snapshot[0].requests,
                snapshot[0].failures,
                snapshot[0].ejections
            ),
            (9, 8, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_endpoint_is_never_ejected() {
        let set = EndpointSet::new(
            "stable",
            vec![target("10.0.0.1", 80)],
            None,
            OutlierSettings::default(),
            &system_resolve,
        );
        let (_, eps) = set.current();
        for _ in 0..20 {
            set.record(&eps[0], true, Instant::now());
        }
        assert!(!set.ejected(&eps[0], Instant::now()));
    }
}
