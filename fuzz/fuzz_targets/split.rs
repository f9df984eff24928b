//! The stable/canary split (`split::SplitRules::decide`) over request fields.
//!
//! Input: two bytes of canary weight (basis points, little-endian), a byte
//! of rules (bit 0: override header `x-serin-canary` or `x-canary`; bits
//! 1-2: override cookie; bits 3-4: no sticky key, a sticky cookie, or sticky
//! header `x-user` or `x-canary`; bits 5-6: sticky cookie; bit 7: the
//! client certificate's identity first), a byte of random state (when odd,
//! the connection has a verified identity), then header lines ending in an
//! empty line, as in a request.
//!
//! Properties: it never panics; a closed table sends everything to stable;
//! an override header, else an override cookie, of `always`/`never` (any
//! case) wins exactly when the rules say so; otherwise the identity, when
//! the rules take it and there is one, else a non-empty sticky key, decides
//! by its bucket alone (the same key, the same target at a given
//! weight, whatever the random state, and a canary user stays on the canary
//! when the weight rises); and the decision is the same on a `HeaderMap`
//! (hyper's path) as on raw httparse fields (serin's HTTP/1.1 loop).
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serin_proxy::fields::Fields;
use serin_proxy::split::{sticky_bucket, FastRng, Reason, MAX_BASIS_POINTS};
use serin_proxy::{RouteTable, SplitRules, StickyKey, Target};

/// Cookie names the rules draw from (all valid config values).
const COOKIES: [&str; 4] = ["serin-canary", "canary", "user", "sid"];

fuzz_target!(|input: &[u8]| {
    let [w0, w1, flags, seed, lines @ ..] = input else {
        return;
    };
    let cookie_at = |shift: u8| COOKIES[usize::from(flags >> shift) & 3].to_string();
    let rules = SplitRules {
        override_header: HeaderName::from_static(if flags & 1 == 0 {
            "x-serin-canary"
        } else {
            "x-canary"
        }),
        override_cookie: cookie_at(1),
        sticky: match (flags >> 3) & 3 {
            0 => None,
            1 => Some(StickyKey::Cookie(cookie_at(5))),
            2 => Some(StickyKey::Header(HeaderName::from_static("x-user"))),
            _ => Some(StickyKey::Header(HeaderName::from_static("x-canary"))),
        },
        sticky_identity: flags & 0x80 != 0,
    };
    let identity = (seed & 1 == 1).then_some(&b"spiffe://cluster.local/ns/a/sa/b"[..]);
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let Ok(httparse::Status::Complete((_, raw))) = httparse::parse_headers(lines, &mut slots)
    else {
        return;
    };
    let mut map = HeaderMap::new();
    for field in raw.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes());
        let value = HeaderValue::from_bytes(field.value);
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        } else {
            // hyper would not have let this request through.
            return;
        }
    }
    let seeds = (u64::from(*seed), u64::from(*seed) ^ 0x5eed);
    let raised = u16::from(*seed) * 40;

    let closed = RouteTable::closed();
    let rng = FastRng::new(seeds.0);
    assert_eq!(
        rules.decide(&closed, &map, identity, &rng),
        (Target::Stable, Reason::Closed)
    );

    let table = RouteTable::new(u16::from_le_bytes([*w0, *w1]));
    let decided = rules.decide(&table, &map, identity, &FastRng::new(seeds.0));
    let on_raw = rules.decide(&table, raw, identity, &FastRng::new(seeds.0));
    assert_eq!(decided, on_raw, "HeaderMap and raw fields disagree");

    let header = map.value(&rules.override_header).and_then(parse_override);
    let by_cookie = cookie(&map, &rules.override_cookie).and_then(parse_override);
    let sticky = match &rules.sticky {
        _ if rules.sticky_identity && identity.is_some() => identity,
        Some(StickyKey::Header(name)) => map.value(name),
        Some(StickyKey::Cookie(name)) => cookie(&map, name),
        None => None,
    }
    .filter(|key| !key.is_empty());
    match (header, by_cookie, sticky) {
        (Some(target), _, _) => assert_eq!(decided, (target, Reason::Header)),
        (None, Some(target), _) => assert_eq!(decided, (target, Reason::Cookie)),
        (None, None, Some(key)) => {
            let target = at_weight(sticky_bucket(key), table.canary_weight_bp);
            assert_eq!(decided, (target, Reason::Sticky));
            let other = rules.decide(&table, &map, identity, &FastRng::new(seeds.1));
            assert_eq!(other, decided, "a sticky key moved with the random state");
            let higher = RouteTable::new(table.canary_weight_bp.saturating_add(raised));
            let raised = rules.decide(&higher, &map, identity, &rng);
            if target == Target::Canary {
                assert_eq!(
                    raised.0,
                    Target::Canary,
                    "raising the weight moved a canary user"
                );
            }
        }
        (None, None, None) => {
            assert_eq!(decided.1, Reason::Weight);
            match table.canary_weight_bp {
                0 => assert_eq!(decided.0, Target::Stable),
                MAX_BASIS_POINTS => assert_eq!(decided.0, Target::Canary),
                _ => {}
            }
        }
    }
});

fn at_weight(bucket: u16, weight_bp: u16) -> Target {
    assert!(bucket < MAX_BASIS_POINTS, "bucket {bucket} out of range");
    if bucket < weight_bp {
        Target::Canary
    } else {
        Target::Stable
    }
}

fn parse_override(value: &[u8]) -> Option<Target> {
    match value.to_ascii_lowercase().as_slice() {
        b"always" => Some(Target::Canary),
        b"never" => Some(Target::Stable),
        _ => None,
    }
}

/// The first cookie called `name` in the `Cookie` fields (RFC 6265 §5.4
/// pairs, spaces around them trimmed, one pair of quotes removed).
fn cookie<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    map.get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
        .map(|v| {
            v.strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v)
        })
        .next()
}
