//! Overload limits that hold across workers: a local rate limit per client
//! key (`[rate_limit]`, answered 429) and a cap on the requests in flight to
//! each upstream (`max_concurrent`, answered 503).
//!
//! Each worker accepts on its own `SO_REUSEPORT` listener, so one client's
//! connections land on any of them: a limit kept per worker would let a
//! client through once per worker. These limits are therefore the one
//! exception to "no lock shared across requests" (ARCHITECTURE.md). Both are
//! opt-in and cost one branch when unset. The concurrency cap is one atomic
//! compare-and-swap when a request starts and one subtraction when it ends.
//! The rate limiter is split into up to [`SHARDS`] shards by key hash, each
//! a `Mutex` held for one table lookup and a few integer operations: never
//! across an `.await`, and allocating only for a key it has not seen.
//!
//! A limited request is refused before an [`crate::outcome::OutcomeRecord`]
//! exists, so it never enters an upstream's window: the judge never sees it.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

use hashbrown::HashTable;
use http::HeaderName;
use tokio::time::Instant;

use crate::defaults;
use crate::fields::Fields;
use crate::split::cookie;

// === config ===

/// A token bucket's refill rate, to a thousandth of a request per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    millis: NonZeroU32,
}

impl Rate {
    /// The fastest rate accepted: a million requests per second.
    pub const MAX_PER_SECOND: f64 = 1_000_000.0;

    /// `per_second` requests per second, to the nearest 0.001 (0.5 is one
    /// request every 2 s); `None` when that is 0 or above
    /// [`Rate::MAX_PER_SECOND`].
    pub fn per_second(per_second: f64) -> Option<Self> {
        let millis = (per_second * 1000.0).round();
        // NaN is in neither range.
        if !(1.0..=Self::MAX_PER_SECOND * 1000.0).contains(&millis) {
            return None;
        }
        NonZeroU32::new(millis as u32).map(|millis| Self { millis })
    }

    /// Requests per second.
    pub fn as_per_second(self) -> f64 {
        f64::from(self.millis.get()) / 1000.0
    }
}

/// What a client's requests are counted by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RateLimitKey {
    /// The address the connection comes from (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    #[default]
    ClientIp,
    /// The first value of this request header.
    Header(HeaderName),
    /// The value of this cookie.
    Cookie(String),
    /// The verified client certificate's identity (`[tls] client_ca`).
    Identity,
}

/// The local rate limit: one token bucket per client key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// How fast each key's bucket refills.
    pub rate: Rate,
    /// The bucket's size: requests a key may send at once after a quiet
    /// spell (default: the rate, rounded up, at least 1; at most
    /// [`RateLimit::MAX_BURST`]).
    pub burst: NonZeroU32,
    /// What requests are counted by (default the client's address). Requests
    /// that lack the header, cookie or client certificate, or send it
    /// empty, share one bucket.
    pub key: RateLimitKey,
    /// Keys tracked at once (default [`defaults::RATE_LIMIT_MAX_KEYS`]); a
    /// new key beyond them replaces the least recently used one, which
    /// comes back with a full bucket.
    pub max_keys: NonZeroUsize,
}

impl RateLimit {
    /// The largest bucket accepted.
    pub const MAX_BURST: u32 = 1_000_000;

    /// A limit of `rate` per client address, with every other default.
    pub fn new(rate: Rate) -> Self {
        let burst = rate.millis.get().div_ceil(1000).clamp(1, Self::MAX_BURST);
        Self {
            rate,
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            key: RateLimitKey::default(),
            max_keys: NonZeroUsize::new(defaults::RATE_LIMIT_MAX_KEYS).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

// === token bucket ===

/// A bucket's level is counted in picotokens: a nanosecond at a rate of
/// `m` thousandths of a token per second adds exactly `m` of them, so
/// refilling never rounds.
const TOKEN: u64 = 1_000_000_000_000;
const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// One key's token bucket, in exact integer arithmetic.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Picotokens in the bucket at `at`.
    level: u64,
    /// Nanoseconds since the limiter's epoch.
    at: u64,
}

/// A bucket's fixed parameters.
#[derive(Clone, Copy, Debug)]
struct Refill {
    /// Picotokens per nanosecond (thousandths of a token per second).
    rate: u64,
    /// The bucket's size, in picotokens.
    capacity: u64,
}

impl Bucket {
    /// Refills the bucket for the time since it was last seen, then takes
    /// one token; when there is none, the whole seconds until there is one
    /// (at least 1).
    fn take(&mut self, now: u64, refill: Refill) -> Result<(), u32> {
        // Workers read the clock before they lock: a request may come in
        // with an instant older than the bucket's.
        let elapsed = now.saturating_sub(self.at);
        let gained = u128::from(elapsed) * u128::from(refill.rate);
        let level = (u128::from(self.level) + gained).min(u128::from(refill.capacity));
        self.level = level as u64;
        self.at = self.at.max(now);
        if self.level >= TOKEN {
            self.level -= TOKEN;
            return Ok(());
        }
        let per_second = refill.rate * NANOS_PER_SECOND;
        let seconds = (TOKEN - self.level).div_ceil(per_second).max(1);
        Err(u32::try_from(seconds).unwrap_or(u32::MAX))
    }
}

// === key table ===

/// No node: the end of the recency list.
const NIL: u32 = u32::MAX;

/// One key and its bucket, in a shard's recency list.
struct Node {
    key: Box<[u8]>,
    hash: u64,
    bucket: Bucket,
    /// The node used just after this one (towards the newest), or [`NIL`].
    newer: u32,
    /// The node used just before this one (towards the oldest), or [`NIL`].
    older: u32,
}

/// A bounded map from key to bucket that forgets its least recently used
/// key when full: a hash table of indices into a slab of nodes that form a
/// list from the newest to the oldest.
struct Shard {
    table: HashTable<u32>,
    nodes: Vec<Node>,
    capacity: usize,
    newest: u32,
    oldest: u32,
    /// Requests this shard refused.
    limited: u64,
}

impl Shard {
    fn new(capacity: usize) -> Self {
        Self {
            table: HashTable::new(),
            nodes: Vec::new(),
            capacity,
            newest: NIL,
            oldest: NIL,
            limited: 0,
        }
    }

    /// The bucket of `key`, now the most recently used; a new key gets
    /// `fresh`, in place of the least recently used key when the shard is full.
    fn bucket(&mut self, hash: u64, key: &[u8], fresh: Bucket) -> &mut Bucket {
        let nodes = &self.nodes;
        let found = self
            .table
            .find(hash, |&i| *nodes[i as usize].key == *key)
            .copied();
        let index = match found {
            Some(index) => {
                self.unlink(index);
                index
            }
            None if self.nodes.len() < self.capacity => {
                let index = self.nodes.len() as u32;
                self.nodes.push(Node {
                    key: key.into(),
                    hash,
                    bucket: fresh,
                    newer: NIL,
                    older: NIL,
                });
                self.insert(hash, index);
                index
            }
            None => {
                let index = self.oldest;
                self.unlink(index);
                let old_hash = self.nodes[index as usize].hash;
                if let Ok(entry) = self.table.find_entry(old_hash, |&i| i == index) {
                    entry.remove();
                }
                let node = &mut self.nodes[index as usize];
                // Same length (every IPv4 key): the old key's memory is reused.
                if node.key.len() == key.len() {
                    node.key.copy_from_slice(key);
                } else {
                    node.key = key.into();
                }
                node.hash = hash;
                node.bucket = fresh;
                self.insert(hash, index);
                index
            }
        };
        self.push_newest(index);
        &mut self.nodes[index as usize].bucket
    }

    fn insert(&mut self, hash: u64, index: u32) {
        let nodes = &self.nodes;
        self.table
            .insert_unique(hash, index, |&i| nodes[i as usize].hash);
    }

    /// Takes node `index` out of the recency list.
    fn unlink(&mut self, index: u32) {
        let Node { newer, older, .. } = self.nodes[index as usize];
        match newer {
            NIL => self.newest = older,
            n => self.nodes[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.nodes[o as usize].newer = newer,
        }
    }

    /// Puts node `index`, not in the list, at its newest end.
    fn push_newest(&mut self, index: u32) {
        let node = &mut self.nodes[index as usize];
        node.newer = NIL;
        node.older = self.newest;
        match self.newest {
            NIL => self.oldest = index,
            n => self.nodes[n as usize].newer = index,
        }
        self.newest = index;
    }

    fn len(&self) -> usize {
        self.table.len()
    }
}

/// Keeps each shard's lock on its own cache lines.
#[repr(align(128))]
struct ShardLock(Mutex<Shard>);

// === impl RateLimiter ===

/// Shards of the rate limiter's key table, at most.
pub(crate) const SHARDS: usize = 32;
/// Keys a shard holds, at least: each shard forgets its own least recently
/// used key, and a small shard could fill up, and forget keys still in use,
/// long before the table holds `max_keys`. A table of fewer than twice this
/// is one shard, an exact LRU.
const MIN_SHARD_KEYS: usize = 256;

/// The local rate limit's state, shared by every worker. See the module header.
pub(crate) struct RateLimiter {
    key: RateLimitKey,
    refill: Refill,
    /// Time zero of the buckets' clocks.
    epoch: Instant,
    hasher: RandomState,
    shards: Box<[ShardLock]>,
}

impl RateLimiter {
    /// An empty table for `config`, whose clock starts at `epoch`.
    pub(crate) fn new(config: &RateLimit, epoch: Instant) -> Self {
        let max_keys = config.max_keys.get();
        let count = (max_keys / MIN_SHARD_KEYS).clamp(1, SHARDS);
        let shards = (0..count)
            .map(|i| {
                // The shards' sizes add up to `max_keys`: the remainder
                // goes one key each to the first shards.
                let capacity = max_keys / count + usize::from(i < max_keys % count);
                ShardLock(Mutex::new(Shard::new(capacity.min(NIL as usize))))
            })
            .collect();
        let burst = u64::from(config.burst.get().min(RateLimit::MAX_BURST));
        Self {
            key: config.key.clone(),
            refill: Refill {
                rate: u64::from(config.rate.millis.get()),
                capacity: burst * TOKEN,
            },
            epoch,
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Takes a token from the bucket of the request's key (its `fields`, the
    /// `client` address it comes from, or the connection's verified
    /// `identity`), or says in how many whole seconds the bucket will have
    /// one.
    pub(crate) fn take<F: Fields + ?Sized>(
        &self,
        fields: &F,
        client: IpAddr,
        identity: Option<&[u8]>,
        now: Instant,
    ) -> Result<(), u32> {
        let mut address = [0u8; 16];
        let key: &[u8] = match &self.key {
            RateLimitKey::ClientIp => match client.to_canonical() {
                IpAddr::V4(v4) => {
                    address[..4].copy_from_slice(&v4.octets());
                    &address[..4]
                }
                IpAddr::V6(v6) => {
                    address = v6.octets();
                    &address
                }
            },
            RateLimitKey::Header(name) => fields.value(name).unwrap_or_default(),
            RateLimitKey::Cookie(name) => cookie(fields, name).unwrap_or_default(),
            RateLimitKey::Identity => identity.unwrap_or_default(),
        };
        self.take_key(key, now)
    }

    fn take_key(&self, key: &[u8], now: Instant) -> Result<(), u32> {
        let hash = self.hasher.hash_one(key);
        let at = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let fresh = Bucket {
            level: self.refill.capacity,
            at,
        };
        // The table finds a key by the hash's low bits and tags it with its
        // top ones: the shard is chosen by bits in between.
        let shard = &self.shards[(hash >> 32) as usize % self.shards.len()];
        let mut shard = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = shard.bucket(hash, key, fresh).take(at, self.refill);
        if taken.is_err() {
            shard.limited += 1;
        }
        taken
    }

    /// Keys in the table.
    pub(crate) fn keys(&self) -> usize {
        self.each_shard(Shard::len)
    }

    /// Requests refused since start.
    pub(crate) fn limited(&self) -> u64 {
        self.each_shard(|s| s.limited)
    }

    fn each_shard<T: std::iter::Sum<T>>(&self, f: impl Fn(&Shard) -> T) -> T {
        self.shards
            .iter()
            .map(|s| f(&s.0.lock().unwrap_or_else(PoisonError::into_inner)))
            .sum()
    }
}

// === impl ConcurrencyLimit ===

/// The requests in flight to one upstream, across workers, and their cap
/// (`max_concurrent`). On its own cache lines: every worker writes it.
#[repr(align(128))]
pub(crate) struct ConcurrencyLimit {
    inflight: AtomicUsize,
    max: usize,
}

impl ConcurrencyLimit {
    pub(crate) fn new(max: NonZeroUsize) -> Self {
        Self {
            inflight: AtomicUsize::new(0),
            max: max.get(),
        }
    }

    /// Takes a place, unless all `max` are taken.
    pub(crate) fn try_acquire(&self) -> bool {
        self.inflight
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .is_ok()
    }

    /// All `max` places are taken (at this moment).
    pub(crate) fn is_full(&self) -> bool {
        self.inflight.load(Relaxed) >= self.max
    }

    /// Gives back a place [`ConcurrencyLimit::try_acquire`] took.
    pub(crate) fn release(&self) {
        self.inflight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderMap;

    use super::*;

    fn limiter(per_second: f64, burst: u32, max_keys: usize) -> RateLimiter {
        let config = RateLimit {
            burst: NonZeroU32::new(burst).unwrap(),
            max_keys: NonZeroUsize::new(max_keys).unwrap(),
            ..RateLimit::new(Rate::per_second(per_second).unwrap())
        };
        RateLimiter::new(&config, Instant::now())
    }

    fn take(limiter: &RateLimiter, key: &str) -> Result<(), u32> {
        limiter.take_key(key.as_bytes(), Instant::now())
    }

    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_token_per_period() {
        let l = limiter(2.0, 3, 10);
        for _ in 0..3 {
            assert_eq!(take(&l, "a"), Ok(()));
        }
        assert_eq!(take(&l, "a"), Err(1));
        // Another key has its own bucket.
        assert_eq!(take(&l, "b"), Ok(()));
        // One token every 500 ms, not a nanosecond sooner.
        tokio::time::advance(Duration::from_millis(500) - Duration::from_nanos(1)).await;
        assert_eq!(take(&l, "a"), Err(1));
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert_eq!(take(&l, "a"), Ok(()));
        assert_eq!(take(&l, "a"), Err(1));
        // A long quiet spell fills the bucket to its size, no further.
        advance(60_000).await;
        for _ in 0..3 {
            assert_eq!(take(&l, "a"), Ok(()));
        }
        assert_eq!(take(&l, "a"), Err(1));
        assert_eq!(l.limited(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn refilling_never_rounds() {
        // 3 per second is a token every 333.33… ms: polled every millisecond
        // for 10 s, the bucket gives exactly 30 tokens after the first 3.
        let l = limiter(3.0, 3, 10);
        let mut taken = 0;
        for _ in 0..10_000 {
            if take(&l, "k").is_ok() {
                taken += 1;
            }
            advance(1).await;
        }
        assert!(take(&l, "k").is_ok());
        assert_eq!(taken + 1, 3 + 30);
        // The first refill after the burst came at 334 ms, not 333.
        let l = limiter(3.0, 1, 10);
        assert_eq!(take(&l, "k"), Ok(()));
        advance(333).await;
        assert_eq!(take(&l, "k"), Err(1));
        advance(1).await;
        assert_eq!(take(&l, "k"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_the_whole_seconds_until_a_token() {
        // One request every 5 s.
        let l = limiter(0.2, 1, 10);
        assert_eq!(take(&l, "k"), Ok(()));
        assert_eq!(take(&l, "k"), Err(5));
        advance(1).await;
        assert_eq!(take(&l, "k"), Err(5), "4.999 s is 5 whole seconds");
        advance(999).await;
        assert_eq!(take(&l, "k"), Err(4));
        advance(3_999).await;
        assert_eq!(take(&l, "k"), Err(1));
        advance(1).await;
        assert_eq!(take(&l, "k"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_never_holds_more_than_max_keys_and_forgets_the_least_recent() {
        for (max_keys, shards) in [(5, 1), (1000, 3)] {
            let l = limiter(1.0, 1, max_keys);
            assert_eq!(l.shards.len(), shards);
            for i in 0..10 * max_keys {
                let _ = take(&l, &format!("key-{i}"));
                assert!(l.keys() <= max_keys, "{} keys after {i}", l.keys());
            }
            assert_eq!(l.keys(), max_keys);
        }

        // One shard, to see the order: `a` is kept because it was used last.
        let mut one = Shard::new(3);
        let fresh = Bucket { level: 0, at: 0 };
        for key in [b"a", b"b", b"c", b"a", b"d"] {
            one.bucket(u64::from(key[0]), key, fresh).level = 7;
        }
        let mut kept: Vec<&[u8]> = one.nodes.iter().map(|n| &*n.key).collect();
        kept.sort();
        assert_eq!(kept, [b"a", b"c", b"d"]);
        assert_eq!(one.len(), 3);
        // The forgotten `b` comes back with a fresh bucket.
        assert_eq!(one.bucket(u64::from(b'b'), b"b", fresh).level, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_table_spreads_over_every_shard() {
        let l = limiter(1.0, 1, 100_000);
        for i in 0..10_000 {
            assert_eq!(take(&l, &format!("key-{i}")), Ok(()));
        }
        assert_eq!(l.keys(), 10_000);
        for shard in l.shards.iter() {
            assert!(shard.0.lock().unwrap().len() > 100);
        }
        // Every key is found again, whatever its shard.
        for i in 0..10_000 {
            assert_eq!(take(&l, &format!("key-{i}")), Err(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_come_from_the_address_a_header_a_cookie_or_the_identity() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let none = HeaderMap::new();
        let by_ip = limiter(1.0, 1, 10);
        assert_eq!(by_ip.take(&none, v4, None, Instant::now()), Ok(()));
        assert_eq!(by_ip.take(&none, mapped, None, Instant::now()), Err(1));
        assert_eq!(by_ip.take(&none, other, None, Instant::now()), Ok(()));

        let mut by_header = limiter(1.0, 1, 10);
        by_header.key = RateLimitKey::Header(HeaderName::from_static("x-api-key"));
        let mut alice = HeaderMap::new();
        alice.insert("x-api-key", "alice".parse().unwrap());
        assert_eq!(by_header.take(&alice, v4, None, Instant::now()), Ok(()));
        assert_eq!(by_header.take(&alice, other, None, Instant::now()), Err(1));
        // Requests without the header share one bucket.
        assert_eq!(by_header.take(&none, v4, None, Instant::now()), Ok(()));
        assert_eq!(by_header.take(&none, other, None, Instant::now()), Err(1));

        let mut by_cookie = limiter(1.0, 1, 10);
        by_cookie.key = RateLimitKey::Cookie("session".into());
        let mut s1 = HeaderMap::new();
        s1.insert("cookie", "a=1; session=s1".parse().unwrap());
        assert_eq!(by_cookie.take(&s1, v4, None, Instant::now()), Ok(()));
        assert_eq!(by_cookie.take(&s1, other, None, Instant::now()), Err(1));
        assert_eq!(by_cookie.take(&alice, v4, None, Instant::now()), Ok(()));

        let mut by_identity = limiter(1.0, 1, 10);
        by_identity.key = RateLimitKey::Identity;
        let (a, b) = (Some(&b"spiffe://a"[..]), Some(&b"spiffe://b"[..]));
        assert_eq!(by_identity.take(&alice, v4, a, Instant::now()), Ok(()));
        assert_eq!(by_identity.take(&none, other, a, Instant::now()), Err(1));
        assert_eq!(by_identity.take(&alice, v4, b, Instant::now()), Ok(()));
        // Clients without a certificate share one bucket.
        assert_eq!(by_identity.take(&alice, v4, None, Instant::now()), Ok(()));
        assert_eq!(by_identity.take(&none, other, None, Instant::now()), Err(1));
    }

    #[test]
    fn rates_and_default_bursts() {
        assert_eq!(Rate::per_second(0.0), None);
        assert_eq!(Rate::per_second(0.0004), None);
        assert_eq!(Rate::per_second(-1.0), None);
        assert_eq!(Rate::per_second(f64::NAN), None);
        assert_eq!(Rate::per_second(2e6), None);
        assert_eq!(Rate::per_second(0.5).unwrap().as_per_second(), 0.5);
        let burst = |r| RateLimit::new(Rate::per_second(r).unwrap()).burst.get();
        assert_eq!((burst(0.2), burst(2.5), burst(100.0)), (1, 3, 100));
    }

    #[test]
    fn the_concurrency_cap_is_exact() {
        let limit = ConcurrencyLimit::new(NonZeroUsize::new(2).unwrap());
        assert!(limit.try_acquire() && limit.try_acquire());
        assert!(!limit.try_acquire());
        limit.release();
        assert!(limit.try_acquire());
        assert!(!limit.try_acquire());
    }
}
