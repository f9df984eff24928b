//! Round trip of a client request head through serin's own HTTP/1.1 loop
//! (`server::own_h1::parse`: the head parse, the request policy's admission
//! and the real upstream encoder), under every `rewrite_host` × `via` policy.
//!
//! Property: whatever serin forwards parses back (httparse, completely and
//! to its last byte) to the client's method and target and to the client's
//! fields in order, minus the hop-by-hop ones (`Connection`, `Keep-Alive`,
//! `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `Trailer`, `TE` unless
//! it is `trailers`, which goes with `connection: te`, and every field named
//! in `Connection` but the request id), with `Max-Forwards` decremented on
//! OPTIONS and TRACE, then `Host` (when rewritten or missing),
//! `X-Forwarded-For` (the client's own chain, then the client address),
//! `X-Forwarded-Proto`, `X-Request-Id` (unless forwarded) and `Via` (when
//! enabled, naming the client's HTTP version).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serin_proxy::fuzzing::{
    forward_request_head, RequestHead, CLIENT_IP, CLIENT_PROTO, UPSTREAM_AUTHORITY,
};
use serin_proxy::HeaderPolicy;

/// Fields never forwarded (RFC 9110 §7.6.1, and the legacy two).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "trailer",
];

fuzz_target!(|input: &[u8]| {
    for (rewrite_host, via) in [(false, false), (true, false), (false, true), (true, true)] {
        let policy = HeaderPolicy {
            rewrite_host,
            via,
            upstream_header: true,
            identity_header: None,
        };
        if let RequestHead::Forwarded {
            len,
            upstream,
            generated_id,
        } = forward_request_head(input, &policy)
        {
            let client = parse(&input[..len]);
            let forwarded = parse(&upstream);
            assert_eq!(forwarded.method, client.method, "method changed");
            assert_eq!(forwarded.target, client.target, "target changed");
            let generated = generated_id.map(|id| id.escape_ascii().to_string());
            assert_eq!(
                forwarded.fields,
                expected_fields(&client, &policy, generated.as_deref()),
                "forwarded fields (rewrite_host={rewrite_host}, via={via}) of\n{}\nin\n{}",
                input[..len].escape_ascii(),
                upstream.escape_ascii(),
            );
        }
    }
});

/// A request head: field names lowercased, values as sent (escaped, so
/// that a failed assertion shows them as text).
struct Head {
    method: String,
    target: String,
    http10: bool,
    fields: Vec<(String, String)>,
    /// The field names `Connection` lists, lowercased, split and trimmed
    /// from the raw bytes and not escaped (the escaped values would keep a
    /// tab as `\t`, and a `'` as `\'`).
    connection_names: Vec<String>,
}

impl Head {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a whole request head; panics unless `head` is exactly one.
fn parse(head: &[u8]) -> Head {
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        other => panic!("not one request head ({other:?}):\n{}", head.escape_ascii()),
    }
    Head {
        method: req.method.expect("complete").to_string(),
        target: req.path.expect("complete").to_string(),
        http10: req.version == Some(0),
        connection_names: req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            // Not escaped: field names are compared unescaped, and a token
            // may hold a `'`, which `escape_ascii` would write as `\'`.
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
            .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
            .collect(),
        fields: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    h.value.escape_ascii().to_string(),
                )
            })
            .collect(),
    }
}

/// What the upstream must receive for `client`'s fields.
fn expected_fields(
    client: &Head,
    policy: &HeaderPolicy,
    generated_id: Option<&str>,
) -> Vec<(String, String)> {
    let named = &client.connection_names;
    let hop_by_hop = |name: &str| HOP_BY_HOP.contains(&name) || named.iter().any(|n| n == name);
    // OPTIONS and TRACE: the first Max-Forwards, if a number, is decremented
    // and stands for all of them.
    let max_forwards = (client.method == "OPTIONS" || client.method == "TRACE")
        .then(|| client.values("max-forwards").next())
        .flatten()
        .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
        .map(|v| (v.parse::<u64>().expect("digits") - 1).min(u64::from(u32::MAX)));
    let mut max_forwards_sent = false;
    let mut fields = Vec::new();
    let mut chain = String::new();
    for (name, value) in &client.fields {
        match name.as_str() {
            // gRPC needs `te: trailers` end to end, with its connection option.
            "te" if value.eq_ignore_ascii_case("trailers") => {
                fields.push(("te".to_string(), "trailers".to_string()));
                fields.push(("connection".to_string(), "te".to_string()));
            }
            "te" => {}
            // The client's id stays, even one it named in `Connection`.
            "x-request-id" => fields.push((name.clone(), value.clone())),
            n if hop_by_hop(n) => {}
            "x-forwarded-for" => {
                chain.push_str(value);
                chain.push_str(", ");
            }
            "x-forwarded-proto" => {}
            "host" if policy.rewrite_host => {}
            "max-forwards" if max_forwards.is_some() => {
                if !max_forwards_sent {
                    max_forwards_sent = true;
                    let n = max_forwards.expect("checked").to_string();
                    fields.push((name.clone(), n));
                }
            }
            _ => fields.push((name.clone(), value.clone())),
        }
    }
    let forwards = |name: &str| fields.iter().any(|(n, _)| n == name);
    let (host, id) = (!forwards("host"), !forwards("x-request-id"));
    let mut add = |name: &str, value: &str| fields.push((name.to_string(), value.to_string()));
    if host {
        add("host", UPSTREAM_AUTHORITY);
    }
    chain.push_str(CLIENT_IP);
    add("x-forwarded-for", &chain);
    add("x-forwarded-proto", CLIENT_PROTO);
    if id {
        add("x-request-id", generated_id.expect("serin made an id"));
    }
    if policy.via {
        add(
            "via",
            if client.http10 {
                "1.0 serin"
            } else {
                "1.1 serin"
            },
        );
    }
    fields
}
