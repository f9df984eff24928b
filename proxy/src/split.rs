//! The stable/canary split: which upstream serves a request.
//!
//! The only state that changes at run time, the canary weight, lives in one
//! immutable [`RouteTable`] behind one `ArcSwap` ([`Routes`]). The control plane
//! builds a new table and swaps it in whole; the request path does one
//! `load()` per request and never locks.
//!
//! The decision, in order (NGINX's precedence):
//! 1. override header `x-serin-canary: always|never`;
//! 2. override cookie `serin-canary=always|never`;
//! 3. sticky key hashed to a bucket 0..9999: the client certificate's
//!    verified identity when `sticky_identity` is on and the connection has
//!    one, else a configured cookie or header;
//! 4. a random bucket 0..9999.
//!
//! A rolled-back canary is closed: every request goes to stable, overrides
//! included, until someone brings the canary back.
//!
//! A request goes to the canary exactly when its bucket is below the weight in
//! basis points, so raising the weight keeps every sticky user already on the
//! canary there, and lowering it moves only the excess back.
//!
//! The same table carries the shadow share (phase `shadowing`): the basis
//! points of stable's requests that are also copied to the canary
//! ([`crate::shadow`]), so the weight and the shadow change together in one
//! swap.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderName, COOKIE};

use crate::fields::Fields;

/// The full scale of a weight: 10 000 basis points = 100%.
pub const MAX_BASIS_POINTS: u16 = 10_000;

/// The default override header.
pub const OVERRIDE_HEADER: &str = "x-serin-canary";
/// The default override cookie.
pub const OVERRIDE_COOKIE: &str = "serin-canary";

/// One of the two upstreams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The current production version.
    Stable,
    /// The version under test.
    Canary,
}

impl Target {
    /// Both targets, stable first.
    pub const ALL: [Target; 2] = [Target::Stable, Target::Canary];

    /// 0 for stable, 1 for canary: an index into per-target arrays.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// `"stable"` or `"canary"`: the label used in headers, metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Stable => "stable",
            Target::Canary => "canary",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl RouteTable ===

/// Everything about routing that changes at run time, swapped in as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    /// Share of traffic for the canary, in basis points (0..=10 000).
    pub canary_weight_bp: u16,
    /// The canary was rolled back: nothing reaches it, not even requests
    /// that ask for it with an override header or cookie.
    pub closed: bool,
    /// Share of stable's requests also copied to the canary, whose answers
    /// are judged and discarded, in basis points (0: no shadow).
    pub shadow_bp: u16,
}

impl RouteTable {
    /// A table sending `canary_weight_bp` basis points to the canary (clamped to 10 000).
    pub fn new(canary_weight_bp: u16) -> Self {
        Self {
            canary_weight_bp: canary_weight_bp.min(MAX_BASIS_POINTS),
            closed: false,
            shadow_bp: 0,
        }
    }

    /// A table for phase `shadowing`: no user reaches the canary by weight,
    /// and `shadow_bp` basis points (clamped to 10 000) of stable's requests
    /// are copied to it.
    pub fn shadowing(shadow_bp: u16) -> Self {
        Self {
            shadow_bp: shadow_bp.min(MAX_BASIS_POINTS),
            ..Self::new(0)
        }
    }

    /// A table for a rolled-back canary: weight 0 and overrides ignored.
    pub fn closed() -> Self {
        Self {
            canary_weight_bp: 0,
            closed: true,
            shadow_bp: 0,
        }
    }

    #[inline]
    fn target_for_bucket(&self, bucket: u16) -> Target {
        if bucket < self.canary_weight_bp {
            Target::Canary
        } else {
            Target::Stable
        }
    }
}

/// The shared handle on the current [`RouteTable`]. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Routes(Arc<ArcSwap<RouteTable>>);

impl Routes {
    /// A handle starting at `table`.
    pub fn new(table: RouteTable) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(table)))
    }

    /// The current table (one atomic load; no lock).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.0.load()
    }

    /// Replaces the table; requests that already loaded the old one finish on it.
    pub fn store(&self, table: RouteTable) {
        self.0.store(Arc::new(table));
    }

    /// A view for one worker thread (see [`LocalRoutes`]).
    pub fn local(&self) -> LocalRoutes {
        LocalRoutes(RefCell::new(arc_swap::Cache::new(self.0.clone())))
    }
}

/// One worker's view of the route table. It keeps the table it last saw and
/// checks for a newer one with a single pointer load (`arc_swap::Cache`),
/// where a full `ArcSwap` load also claims and releases a debt slot: the
/// difference is a third of the split decision's cost. A stored table is
/// seen by the next request.
pub struct LocalRoutes(RefCell<arc_swap::Cache<Arc<ArcSwap<RouteTable>>, Arc<RouteTable>>>);

impl LocalRoutes {
    /// Runs `f` on the current table.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&RouteTable) -> R) -> R {
        f(self.0.borrow_mut().load())
    }
}

// === impl SplitRules ===

/// Where a sticky key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickyKey {
    /// The value of this request header.
    Header(HeaderName),
    /// The value of this cookie.
    Cookie(String),
}

/// Why a request went where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The canary is rolled back and closed to everyone.
    Closed,
    /// The override header said so.
    Header,
    /// The override cookie said so.
    Cookie,
    /// The sticky key's bucket said so.
    Sticky,
    /// A random bucket said so.
    Weight,
}

/// The fixed (start-up) rules of the split.
#[derive(Clone, Debug)]
pub struct SplitRules {
    /// Override header name (default `x-serin-canary`).
    pub override_header: HeaderName,
    /// Override cookie name (default `serin-canary`).
    pub override_cookie: String,
    /// Sticky key, if any (default none: every request is split at random).
    pub sticky: Option<StickyKey>,
    /// The verified client certificate's identity is the sticky key when the
    /// connection has one, before [`SplitRules::sticky`] (default false).
    pub sticky_identity: bool,
}

impl Default for SplitRules {
    fn default() -> Self {
        Self {
            override_header: HeaderName::from_static(OVERRIDE_HEADER),
            override_cookie: OVERRIDE_COOKIE.to_string(),
            sticky: None,
            sticky_identity: crate::defaults::STICKY_IDENTITY,
        }
    }
}

impl SplitRules {
    /// Picks the upstream for a request with these headers, on a connection
    /// whose client certificate gave this verified `identity`.
    #[inline]
    pub fn decide<H: Fields + ?Sized>(
        &self,
        table: &RouteTable,
        headers: &H,
        identity: Option<&[u8]>,
        rng: &FastRng,
    ) -> (Target, Reason) {
        if table.closed {
            return (Target::Stable, Reason::Closed);
        }
        if let Some(t) = headers
            .value(&self.override_header)
            .and_then(parse_override)
        {
            return (t, Reason::Header);
        }
        if let Some(t) = cookie(headers, &self.override_cookie).and_then(parse_override) {
            return (t, Reason::Cookie);
        }
        let sticky = match &self.sticky {
            _ if self.sticky_identity && identity.is_some() => identity,
            Some(StickyKey::Header(name)) => headers.value(name),
            Some(StickyKey::Cookie(name)) => cookie(headers, name),
            None => None,
        };
        match sticky {
            Some(key) if !key.is_empty() => {
                (table.target_for_bucket(sticky_bucket(key)), Reason::Sticky)
            }
            _ => (table.target_for_bucket(rng.bucket()), Reason::Weight),
        }
    }
}

fn parse_override(value: &[u8]) -> Option<Target> {
    if value.eq_ignore_ascii_case(b"always") {
        Some(Target::Canary)
    } else if value.eq_ignore_ascii_case(b"never") {
        Some(Target::Stable)
    } else {
        None
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, without allocating.
pub(crate) fn cookie<'a, H: Fields + ?Sized>(headers: &'a H, name: &str) -> Option<&'a [u8]> {
    for header in headers.values(&COOKIE) {
        for pair in header.split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if let Some(rest) = pair.strip_prefix(name.as_bytes()) {
                if let Some(value) = rest.strip_prefix(b"=") {
                    let value = value.trim_ascii();
                    let value = value
                        .strip_prefix(b"\"")
                        .and_then(|v| v.strip_suffix(b"\""))
                        .unwrap_or(value);
                    return Some(value);
                }
            }
        }
    }
    None
}

/// The bucket (0..9999) of a sticky key: FNV-1a, then a splitmix64 finaliser.
/// Fixed forever: changing it would move users between versions on upgrade.
pub fn sticky_bucket(key: &[u8]) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    scale(mix(h))
}

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps 64 random bits onto 0..10 000 without modulo bias worth measuring.
#[inline]
fn scale(r: u64) -> u16 {
    (((r >> 32) * u64::from(MAX_BASIS_POINTS)) >> 32) as u16
}

// === impl FastRng ===

/// A per-worker splitmix64 generator: no lock, no syscall, not for secrets.
#[derive(Debug)]
pub struct FastRng(Cell<u64>);

impl FastRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Cell::new(seed))
    }

    /// A generator seeded from the clock and the thread, different per worker.
    pub fn from_entropy(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::new(mix(nanos ^ mix(salt.wrapping_add(0x9e37_79b9_7f4a_7c15))))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&self) -> u64 {
        let s = self.0.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.0.set(s);
        mix(s)
    }

    /// True with probability `p` (always when `p` ≥ 1, never when ≤ 0).
    pub fn chance(&self, p: f64) -> bool {
        p >= 1.0 || ((self.next_u64() >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < p
    }

    /// A uniform bucket in 0..10 000.
    #[inline]
    pub fn bucket(&self) -> u16 {
        scale(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn weight_zero_and_full_are_exact() {
        let rules = SplitRules::default();
        let rng = FastRng::new(7);
        let none = headers(&[]);
        for _ in 0..10_000 {
            assert_eq!(
                rules.decide(&RouteTable::new(0), &none, None, &rng).0,
                Target::Stable
            );
            assert_eq!(
                rules.decide(&RouteTable::new(10_000), &none, None, &rng).0,
                Target::Canary
            );
        }
    }

    #[test]
    fn random_split_matches_weight() {
        let rules = SplitRules::default();
        let rng = FastRng::new(42);
        let none = headers(&[]);
        for bp in [100u16, 1_000, 5_000, 9_000] {
            let table = RouteTable::new(bp);
            let n = 200_000;
            let canary = (0..n)
                .filter(|_| rules.decide(&table, &none, None, &rng).0 == Target::Canary)
                .count();
            let share = canary as f64 / n as f64;
            let want = f64::from(bp) / 10_000.0;
            assert!((share - want).abs() < 0.005, "bp {bp}: got {share}");
        }
    }

    #[test]
    fn overrides_follow_nginx_precedence() {
        let rules = SplitRules {
            sticky: Some(StickyKey::Cookie("user".into())),
            ..SplitRules::default()
        };
        let rng = FastRng::new(1);
        let zero = RouteTable::new(0);
        let full = RouteTable::new(10_000);
        let h = headers(&[
            ("x-serin-canary", "always"),
            ("cookie", "serin-canary=never"),
        ]);
        assert_eq!(
            rules.decide(&zero, &h, None, &rng),
            (Target::Canary, Reason::Header)
        );
        let h = headers(&[("cookie", "a=1; serin-canary=never; user=bob")]);
        assert_eq!(
            rules.decide(&full, &h, None, &rng),
            (Target::Stable, Reason::Cookie)
        );
        // An unknown override value falls through to the next rule.
        let h = headers(&[
            ("x-serin-canary", "maybe"),
            ("cookie", "serin-canary=always"),
        ]);
        assert_eq!(
            rules.decide(&zero, &h, None, &rng),
            (Target::Canary, Reason::Cookie)
        );
        let h = headers(&[("x-serin-canary", "maybe"), ("cookie", "user=bob")]);
        assert_eq!(
            rules.decide(&full, &h, None, &rng),
            (Target::Canary, Reason::Sticky)
        );
        // A rolled-back canary is closed to overrides too.
        let h = headers(&[
            ("x-serin-canary", "always"),
            ("cookie", "serin-canary=always"),
        ]);
        assert_eq!(
            rules.decide(&RouteTable::closed(), &h, None, &rng),
            (Target::Stable, Reason::Closed)
        );
    }

    #[test]
    fn the_verified_identity_is_the_sticky_key_after_the_overrides_and_before_a_cookie() {
        let rules = SplitRules {
            sticky: Some(StickyKey::Cookie("user".into())),
            sticky_identity: true,
            ..SplitRules::default()
        };
        let rng = FastRng::new(5);
        let spiffe = &b"spiffe://cluster.local/ns/a/sa/b"[..];
        // At the identity's own bucket: canary from one basis point above.
        let bucket = sticky_bucket(spiffe);
        let (below, above) = (RouteTable::new(bucket), RouteTable::new(bucket + 1));
        let bob = headers(&[("cookie", "user=bob")]);
        for (table, want) in [(&below, Target::Stable), (&above, Target::Canary)] {
            assert_eq!(
                rules.decide(table, &bob, Some(spiffe), &rng),
                (want, Reason::Sticky)
            );
        }
        let never = headers(&[("x-serin-canary", "never")]);
        assert_eq!(
            rules.decide(&above, &never, Some(spiffe), &rng),
            (Target::Stable, Reason::Header)
        );
        // No certificate: the cookie decides.
        let by_cookie = RouteTable::new(sticky_bucket(b"bob") + 1);
        assert_eq!(
            rules.decide(&by_cookie, &bob, None, &rng),
            (Target::Canary, Reason::Sticky)
        );
        // Off: the identity is not looked at.
        let off = SplitRules {
            sticky_identity: false,
            ..rules.clone()
        };
        assert_eq!(
            off.decide(&by_cookie, &bob, Some(spiffe), &rng),
            off.decide(&by_cookie, &bob, None, &rng)
        );
    }

    #[test]
    fn cookie_parsing_handles_spacing_quotes_and_prefixes() {
        let h = headers(&[("cookie", "serin-canary-x=1;  serin-canary=\"always\" ")]);
        assert_eq!(cookie(&h, "serin-canary"), Some(&b"always"[..]));
        let h = headers(&[("cookie", "a=1"), ("cookie", "user=alice")]);
        assert_eq!(cookie(&h, "user"), Some(&b"alice"[..]));
        assert_eq!(cookie(&h, "use"), None);
    }

    #[test]
    fn sticky_assignment_only_grows_with_weight() {
        let rules = SplitRules {
            sticky: Some(StickyKey::Header(HeaderName::from_static("x-user"))),
            ..SplitRules::default()
        };
        let rng = FastRng::new(3);
        let users: Vec<HeaderMap> = (0..2_000)
            .map(|i| {
                let mut h = HeaderMap::new();
                h.insert(
                    "x-user",
                    HeaderValue::from_str(&format!("user-{i}")).unwrap(),
                );
                h
            })
            .collect();
        let mut previous: Vec<bool> = vec![false; users.len()];
        for bp in [0u16, 500, 2_500, 5_000, 10_000] {
            let table = RouteTable::new(bp);
            let now: Vec<bool> = users
                .iter()
                .map(|h| rules.decide(&table, h, None, &rng).0 == Target::Canary)
                .collect();
            for (i, (&was, &is)) in previous.iter().zip(&now).enumerate() {
                assert!(
                    !was || is,
                    "user {i} left the canary when the weight rose to {bp}"
                );
            }
            let share = now.iter().filter(|&&c| c).count() as f64 / users.len() as f64;
            assert!(
                (share - f64::from(bp) / 1e4).abs() < 0.04,
                "bp {bp}: {share}"
            );
            previous = now;
        }
    }

    #[test]
    fn sticky_bucket_is_fixed() {
        // Pinned values: a change here would move real users between versions
        // on upgrade. They were computed independently of this code.
        assert_eq!(sticky_bucket(b"alice"), 7727);
        assert_eq!(sticky_bucket(b"bob"), 4317);
        assert_eq!(sticky_bucket(b""), 9576);
    }
}
