//! Round trip of a client request head through serin's own HTTP/1.1 loop
//! (the head parse of `h1_server::parse_request`, then the real upstream
//! encoder), under every `rewrite_host` × `via` policy.
//!
//! Property: whatever serin forwards parses back (httparse, completely and
//! to its last byte) to the client's method and target and to the client's
//! fields in order, minus the hop-by-hop ones (`Connection`, `Keep-Alive`,
//! `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `Trailer`, `TE` unless
//! it is `trailers`, and every field named in `Connection`), then `Host`
//! (when rewritten or missing), `X-Forwarded-For` (the client's own chain,
//! then the client address), `X-Forwarded-Proto`, `X-Request-Id` (unless
//! forwarded) and `Via` (when enabled).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serin_proxy::fuzzing::{
    forward_request_head, RequestHead, CLIENT_IP, CLIENT_PROTO, GENERATED_REQUEST_ID,
    UPSTREAM_AUTHORITY,
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
        };
        if let RequestHead::Forwarded { len, upstream } = forward_request_head(input, &policy) {
            let client = parse(&input[..len]);
            let forwarded = parse(&upstream);
            assert_eq!(forwarded.method, client.method, "method changed");
            assert_eq!(forwarded.target, client.target, "target changed");
            assert_eq!(
                forwarded.fields,
                expected_fields(&client, &policy),
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
    fields: Vec<(String, String)>,
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
fn expected_fields(client: &Head, policy: &HeaderPolicy) -> Vec<(String, String)> {
    // Connection options name hop-by-hop fields, except the two that are
    // options of the connection itself.
    let named: Vec<String> = client
        .values("connection")
        .flat_map(|v| v.split(','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect();
    let hop_by_hop = |name: &str| HOP_BY_HOP.contains(&name) || named.iter().any(|n| n == name);
    let mut fields = Vec::new();
    let mut chain = String::new();
    for (name, value) in &client.fields {
        match name.as_str() {
            // gRPC needs `te: trailers` end to end, as serin documents.
            "te" if value.eq_ignore_ascii_case("trailers") => {
                fields.push(("te".to_string(), "trailers".to_string()))
            }
            "te" => {}
            n if hop_by_hop(n) => {}
            "x-forwarded-for" => {
                chain.push_str(value);
                chain.push_str(", ");
            }
            "x-forwarded-proto" => {}
            "host" if policy.rewrite_host => {}
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
        // The client's id (even one it named in `Connection`), else a new one.
        let client_id = client.values("x-request-id").next();
        let generated = GENERATED_REQUEST_ID.escape_ascii().to_string();
        add("x-request-id", client_id.unwrap_or(&generated));
    }
    if policy.via {
        add("via", "1.1 serin");
    }
    fields
}
