//! The upstream response-head parser (`http1::head::parse_response`, the header map
//! hyper's path builds, `http1::framing::response_framing`) on arbitrary bytes.
//!
//! Properties: it never panics; a parsed head is no longer than the input,
//! has a three-digit status, parses the same on its own, and every shorter prefix of it is merely
//! incomplete (so a head split across reads parses as one); the header map
//! holds exactly the raw fields, or is refused only for a field `http`
//! rejects; keep-alive follows RFC 9112 §9.3; and the body framing follows
//! RFC 9112 §6.3: the last `Transfer-Encoding` decides if there is one,
//! otherwise every `Content-Length` value must be the same decimal number
//! (conflicting or malformed lengths are errors), otherwise until close.
#![no_main]

use http::{HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serin_proxy::fuzzing::{parse_response_head, Framing, ResponseHead};

fuzz_target!(|input: &[u8]| {
    let Ok(Some(head)) = parse_response_head(input) else {
        return;
    };
    assert!(head.len <= input.len(), "head longer than its input");
    assert!((100..1000).contains(&head.status), "status {}", head.status);
    let alone = parse_response_head(&input[..head.len]);
    let alone = alone
        .expect("the head alone is an error")
        .expect("the head alone is partial");
    assert_eq!(alone.len, head.len);
    assert_eq!(alone.fields, head.fields);
    for cut in prefixes(head.len) {
        match parse_response_head(&input[..cut]) {
            Ok(None) => {}
            Ok(Some(h)) => panic!("a {cut}-byte prefix is a complete {}-byte head", h.len),
            Err(e) => panic!("a {cut}-byte prefix is an error ({e})"),
        }
    }
    check_map(&head);
    assert_eq!(head.keep_alive, keeps_alive(&head), "keep-alive");
    assert_eq!(
        head.framing.as_ref().ok(),
        framing(&head).as_ref(),
        "framing"
    );
});

/// Prefix lengths to try: all of them for a short head, else a spread.
fn prefixes(len: usize) -> impl Iterator<Item = usize> {
    let step = (len / 256).max(1);
    (0..len).step_by(step).chain(len.checked_sub(1))
}

fn check_map(head: &ResponseHead) {
    let valid = |(n, v): &(Vec<u8>, Vec<u8>)| {
        HeaderName::from_bytes(n).is_ok() && HeaderValue::from_bytes(v).is_ok()
    };
    match &head.map {
        Ok(map) => {
            assert_eq!(map.len(), head.fields.len(), "map size");
            for name in map.keys() {
                let raw: Vec<&[u8]> = values(head, name.as_str()).collect();
                let mapped: Vec<&[u8]> = map.get_all(name).iter().map(|v| v.as_bytes()).collect();
                assert_eq!(raw, mapped, "values of {name}");
            }
        }
        Err(e) => assert!(
            !head.fields.iter().all(valid),
            "map refused ({e}) though every field is valid"
        ),
    }
}

fn values<'a>(head: &'a ResponseHead, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    head.fields
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_slice())
}

/// The comma-separated elements of every field called `name`, trimmed.
fn elements<'a>(head: &'a ResponseHead, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    values(head, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

fn keeps_alive(head: &ResponseHead) -> bool {
    let says = |option: &[u8]| elements(head, "connection").any(|t| t.eq_ignore_ascii_case(option));
    !says(b"close") && (head.http11 || says(b"keep-alive"))
}

/// The framing, or `None` for a malformed or conflicting length.
fn framing(head: &ResponseHead) -> Option<Framing> {
    if let Some(te) = values(head, "transfer-encoding").last() {
        let last = te.split(|&b| b == b',').next_back().unwrap_or_default();
        return Some(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for element in elements(head, "content-length") {
        if element.is_empty() || !element.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(element).ok()?.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    Some(length.map_or(Framing::UntilClose, Framing::Length))
}
