//! A table-driven HTTP conformance corpus for serin as a gateway (a reverse
//! proxy, in RFC 9110's words), asserted on the wire.
//!
//! Why it exists: serin parses client requests on two code paths (its own
//! HTTP/1.1 loop for bodiless requests over plain TCP or TLS, hyper for
//! everything else), so every MUST of RFC 9112 (message syntax, framing, `Host`,
//! connection management) and RFC 9110 §7.6 (what an intermediary removes,
//! adds and rewrites) has to hold on each of them, and on TLS and HTTP/2
//! too. Request smuggling lives exactly in the places where two parsers
//! disagree, so each case states the one outcome the RFCs require (or, where
//! they allow a choice, the safe one: 400 and close for any framing doubt)
//! and runs on every path:
//!
//! - `own`: the raw bytes on a fresh plain-TCP connection: serin's own loop
//!   serves them, or hands the connection to hyper when it must;
//! - `hyper`: the same request with a 5-byte body added (`Content-Length: 5`,
//!   `hello`), which makes the own loop hand the connection to hyper; a case
//!   that already frames a body, or holds several requests, is instead sent
//!   after a warm-up request with a body has moved the connection to hyper;
//! - `tls`: the raw bytes over TLS (ALPN http/1.1): the own loop again, or
//!   hyper when it hands the connection over, as on `own`;
//! - `h2`: cases marked `h2`, rebuilt as an HTTP/2 request (h2c, prior
//!   knowledge): the upstream must receive the same head.
//!
//! Each run gets its own proxy in front of two raw recording upstreams (all
//! on 127.0.0.1, port 0) that record every byte they receive and answer a
//! fixed response. A case then asserts the statuses the client reads, what
//! the upstream received (nothing, no complete request, or exactly these
//! bytes), and whether serin closed the client connection afterwards.
//! Beside the four per-path tests, `own_loop_and_hyper_forward_identical_heads`
//! checks that both HTTP/1.1 paths send the upstream the same head, and
//! `http_desync_guardian_corpus` runs the AWS http_desync_guardian cases
//! (vendored YAML under `tests/corpus/http_desync_guardian/`).
//!
//! Each test collects every mismatch of its path and fails once with all of
//! them, so one run lists all the work left. Expectations are the RFCs',
//! not today's behaviour: a failing case is work for the proxy, not for this
//! file.
//!
//! To add a case: append a `Case` to [`CASES`], starting from [`REFUSED`]
//! (400 and close, nothing upstream), [`REFUSED_KEEPABLE`] (400, nothing
//! upstream, connection may go on) or [`BASE`] with `upstream:
//! Up::Exactly(up!(...))` for a forwarded request. Give it a unique `name`
//! and the `rule` it checks. Send your own `x-request-id` in forwarded cases
//! so the upstream's bytes are exact. Expected upstream bytes may use
//! `{proto}` (`http`, or `https` on TLS) and `{upstream}` (the stable
//! upstream's `host:port`); they are compared with field names lowercased
//! and field lines stably sorted by name (RFC 9110 §5.1, §5.3: names are
//! case-insensitive, and only the order of lines with the same name
//! matters), request lines, values and bodies byte for byte. Mark `h2: true`
//! when the case means something in HTTP/2 (no connection-specific fields).

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serin_proxy::{Proxy, ProxyConfig, RouteTable, Routes, TlsFiles, Upstream, UpstreamProtocol};
use serin_tests::TestCert;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a client waits for one response (or a write, or the upstream
/// connections to close after the proxy stopped). A failure bound, never a
/// pause: every wait polls and ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(4);
/// serin's response timeout: an upstream that never answers (because it
/// framed the request differently) turns into a 504 well within [`WAIT`].
const UPSTREAM_PATIENCE: Duration = Duration::from_secs(2);
/// How often a read that may be cut short looks at its stop condition.
const POLL: Duration = Duration::from_millis(20);
/// Runs in flight at once within one test (each has its own proxy).
const PARALLEL: usize = 6;

/// What the recording upstreams answer unless a case says otherwise.
const OK_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
/// A request the recording upstreams leave out of their record; it checks
/// whether the client connection is still open after a case.
const PROBE: &[u8] = b"GET /__probe HTTP/1.1\r\nHost: probe\r\n\r\n";
/// A probe with a body: it hands a plain connection to hyper's path.
const WARM_UP: &[u8] = b"POST /__probe HTTP/1.1\r\nHost: probe\r\nContent-Length: 5\r\n\r\nhello";

// === the corpus ===

/// One conformance case.
#[derive(Clone, Copy)]
struct Case {
    /// Unique, snake_case.
    name: &'static str,
    /// The requirement it checks, e.g. "RFC 9112 §5.1: ...".
    rule: &'static str,
    /// The raw bytes the client sends.
    request: &'static [u8],
    /// Statuses of the responses the client must read, in order.
    statuses: &'static [u16],
    /// What the upstreams must have received.
    upstream: Up,
    /// What becomes of the client connection afterwards.
    conn: Conn,
    /// The raw response of the recording upstreams.
    reply: &'static [u8],
    /// The first response as the client must see it, if the case checks it.
    response: Option<ClientSees>,
    /// Run with `headers.via` on.
    via: bool,
    /// Also run over HTTP/2.
    h2: bool,
    /// What the RFC-compliant outcome is instead where hyper parses the
    /// request (`hyper`), when hyper normalises a message that
    /// serin's own loop refuses. The README's conformance notes list these.
    behind_hyper: Option<&'static Case>,
}

/// What the upstreams must have received during a case.
#[derive(Clone, Copy)]
enum Up {
    /// Not a byte: serin answered itself.
    Nothing,
    /// No complete request. serin streams request bodies, so it may have
    /// sent the head before it found the body broken, but it must not let
    /// the upstream see a complete message.
    Incomplete,
    /// Exactly these bytes (see the module doc for the comparison).
    Exactly(&'static [u8]),
}

/// The client connection after the case's responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conn {
    /// serin must close it.
    Close,
    /// serin must keep it and serve the next request.
    Open,
    /// Either is allowed.
    Any,
}

/// The client's first response, apart from framing: its end-to-end fields
/// and its body.
#[derive(Clone, Copy)]
struct ClientSees {
    /// Every field except `date`, `content-length`, `transfer-encoding` and
    /// a `connection: close`/`keep-alive` of serin's own, in any order.
    fields: &'static [(&'static str, &'static str)],
    body: &'static [u8],
}

/// A forwarded case's defaults: one 200 and a connection that stays open.
const BASE: Case = Case {
    name: "",
    rule: "",
    request: b"",
    statuses: &[200],
    upstream: Up::Nothing,
    conn: Conn::Open,
    reply: OK_REPLY,
    response: None,
    via: false,
    h2: false,
    behind_hyper: None,
};

/// A message that is broken or whose framing is in doubt: 400, nothing
/// upstream, and the connection closed (RFC 9112 §2.2: "SHOULD respond with
/// a 400 (Bad Request) response and close the connection"; MUST in §6.1 and
/// §6.3 for framing).
const REFUSED: Case = Case {
    statuses: &[400],
    conn: Conn::Close,
    ..BASE
};

/// A well-framed request with a field serin must refuse: 400 and nothing
/// upstream; keeping the connection is allowed.
const REFUSED_KEEPABLE: Case = Case {
    statuses: &[400],
    conn: Conn::Any,
    ..BASE
};

/// A request whose chunked body is broken: 400 and close, and the upstream
/// never sees a complete message.
const BROKEN_BODY: Case = Case {
    upstream: Up::Incomplete,
    ..REFUSED
};

/// The upstream request serin makes: `$head` (request line and fields,
/// CRLF-terminated) plus serin's `X-Forwarded-For` (the client's chain and
/// 127.0.0.1) and `X-Forwarded-Proto`, then an optional body.
macro_rules! up {
    ($head:literal) => {
        up!($head, xff = "127.0.0.1", body = "")
    };
    ($head:literal, xff = $xff:literal) => {
        up!($head, xff = $xff, body = "")
    };
    ($head:literal, body = $body:literal) => {
        up!($head, xff = "127.0.0.1", body = $body)
    };
    ($head:literal, xff = $xff:literal, body = $body:literal) => {
        concat!(
            $head,
            "x-forwarded-for: ",
            $xff,
            "\r\nx-forwarded-proto: {proto}\r\n\r\n",
            $body
        )
        .as_bytes()
    };
}

/// 20 field names, 460 bytes as a `Connection` value.
macro_rules! twenty_names {
    () => {
        "x-hop-field-number-01, x-hop-field-number-02, x-hop-field-number-03, \
         x-hop-field-number-04, x-hop-field-number-05, x-hop-field-number-06, \
         x-hop-field-number-07, x-hop-field-number-08, x-hop-field-number-09, \
         x-hop-field-number-10, x-hop-field-number-11, x-hop-field-number-12, \
         x-hop-field-number-13, x-hop-field-number-14, x-hop-field-number-15, \
         x-hop-field-number-16, x-hop-field-number-17, x-hop-field-number-18, \
         x-hop-field-number-19, x-hop-field-number-20"
    };
}

/// The 20 fields [`twenty_names`] names.
macro_rules! twenty_fields {
    () => {
        "x-hop-field-number-01: 1\r\nx-hop-field-number-02: 2\r\n\
         x-hop-field-number-03: 3\r\nx-hop-field-number-04: 4\r\n\
         x-hop-field-number-05: 5\r\nx-hop-field-number-06: 6\r\n\
         x-hop-field-number-07: 7\r\nx-hop-field-number-08: 8\r\n\
         x-hop-field-number-09: 9\r\nx-hop-field-number-10: 10\r\n\
         x-hop-field-number-11: 11\r\nx-hop-field-number-12: 12\r\n\
         x-hop-field-number-13: 13\r\nx-hop-field-number-14: 14\r\n\
         x-hop-field-number-15: 15\r\nx-hop-field-number-16: 16\r\n\
         x-hop-field-number-17: 17\r\nx-hop-field-number-18: 18\r\n\
         x-hop-field-number-19: 19\r\nx-hop-field-number-20: 20\r\n"
    };
}

/// A request with both `Content-Length` and `Transfer-Encoding`, in both orders.
const TE_AND_CL: &[u8] =
    b"POST /u HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nContent-Length: 5\r\n\
                            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
const CL_AFTER_TE: &[u8] = b"POST /u HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\
                              Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";

/// What hyper makes of [`TE_AND_CL`]: the other choice RFC 9112 §6.3 allows
/// an intermediary, Content-Length removed and the chunked body forwarded,
/// then the connection closed (§6.1).
const TE_AND_CL_NORMALISED: Case = Case {
    name: "transfer_encoding_and_content_length",
    rule: "RFC 9112 §6.1, §6.3: hyper drops Content-Length, forwards the chunked body, then closes",
    statuses: &[200],
    upstream: Up::Exactly(up!(
        "POST /u HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\ntransfer-encoding: chunked\r\n",
        body = "0\r\n\r\n"
    )),
    conn: Conn::Close,
    ..BASE
};

/// The request of the response cases, and what the upstream gets of it.
const RESPONSE_REQUEST: &[u8] = b"GET /r HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\r\n";
const RESPONSE_UPSTREAM: Up =
    Up::Exactly(up!("GET /r HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n"));
/// The end-to-end fields a plain upstream response reaches the client with.
const PLAIN_FIELDS: &[(&str, &str)] = &[("x-request-id", "c1"), ("x-serin-upstream", "stable")];

static CASES: &[Case] = &[
    // --- RFC 9112 §2-§5: message syntax ---
    Case {
        name: "plain_get_is_forwarded",
        rule: "RFC 9110 §7.6: the baseline every rewrite below is measured against",
        request: b"GET /p?q=1 HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p?q=1 HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        h2: true,
        ..BASE
    },
    Case {
        name: "request_line_with_two_spaces",
        rule: "RFC 9112 §3: request-line = method SP request-target SP HTTP-version",
        request: b"GET  /p HTTP/1.1\r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "space_inside_request_target",
        rule: "RFC 9112 §3.2: no whitespace is allowed in the request-target",
        request: b"GET /a b HTTP/1.1\r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "tab_as_request_line_separator",
        rule: "RFC 9112 §3: the request-line separators are single SP",
        request: b"GET\t/p HTTP/1.1\r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "lowercase_http_name",
        rule: "RFC 9112 §2.3: HTTP-name is case-sensitive \"HTTP\"",
        request: b"GET /p http/1.1\r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "space_after_http_version",
        rule: "RFC 9112 §3: the request-line ends right after HTTP-version",
        request: b"GET /p HTTP/1.1 \r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "bare_cr_in_request_target",
        rule: "RFC 9112 §2.2: a bare CR MUST be treated as invalid (or replaced by SP)",
        request: b"GET /p\rx HTTP/1.1\r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "whitespace_before_the_first_field",
        rule: "RFC 9112 §2.2: whitespace between start-line and first field MUST be rejected (or the line ignored)",
        request: b"GET /p HTTP/1.1\r\n X-Evil: 1\r\nHost: app\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "bare_cr_in_field_value",
        rule: "RFC 9112 §2.2: a bare CR MUST be treated as invalid (or replaced by SP)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A: a\rb\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "space_between_field_name_and_colon",
        rule: "RFC 9112 §5.1: whitespace between field name and colon MUST be rejected with 400",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A : 1\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "tab_between_field_name_and_colon",
        rule: "RFC 9112 §5.1: whitespace between field name and colon MUST be rejected with 400",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A\t: 1\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "obs_fold_with_space",
        rule: "RFC 9112 §5.2: obs-fold in a request MUST be rejected with 400 (or replaced by SP)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A: a\r\n b\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "obs_fold_with_tab",
        rule: "RFC 9112 §5.2: obs-fold in a request MUST be rejected with 400 (or replaced by SP)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A: a\r\n\tb\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "space_inside_field_name",
        rule: "RFC 9112 §5.1, RFC 9110 §5.1: field-name = token",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX A: 1\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "separator_inside_field_name",
        rule: "RFC 9110 §5.1: field-name = token (\"@\" is not a tchar)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX@A: 1\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "empty_field_name",
        rule: "RFC 9110 §5.1: field-name = token (at least one tchar)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\n: 1\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "field_line_without_colon",
        rule: "RFC 9112 §5: field-line = field-name \":\" OWS field-value OWS",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A 1\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "nul_in_field_value",
        rule: "RFC 9110 §5.5: NUL in a value MUST be rejected (or replaced by SP)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A: a\0b\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "control_character_in_field_value",
        rule: "RFC 9110 §5.5: CTLs other than HTAB are invalid in a value (serin rejects)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A: a\x01b\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "del_in_field_value",
        rule: "RFC 9110 §5.5: DEL is a CTL, invalid in a value (serin rejects)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nX-A: a\x7fb\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "whitespace_around_a_value_is_not_part_of_it",
        rule: "RFC 9112 §5.1: OWS before and after a field value is excluded by parsers",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nX-A: \t v \t\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nx-a: v\r\n")),
        ..BASE
    },
    Case {
        name: "obs_text_in_a_value_is_forwarded",
        rule: "RFC 9110 §5.5: field-vchar includes obs-text (%x80-FF)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nX-A: caf\xe9\r\n\r\n",
        upstream: Up::Exactly(
            b"GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nx-a: caf\xe9\r\n\
              x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: {proto}\r\n\r\n",
        ),
        ..BASE
    },
    // --- RFC 9112 §6-§7: message body framing ---
    Case {
        name: "content_length_body_is_forwarded",
        rule: "RFC 9112 §6.2: Content-Length frames the body",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nContent-Length: 5\r\n\r\nhello",
        upstream: Up::Exactly(up!(
            "POST /u HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\ncontent-length: 5\r\n",
            body = "hello"
        )),
        ..BASE
    },
    Case {
        name: "chunked_body_is_forwarded_chunked",
        rule: "RFC 9112 §7.1: the chunked coding frames the body",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n",
        upstream: Up::Exactly(up!(
            "POST /u HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\ntransfer-encoding: chunked\r\n",
            body = "5\r\nhello\r\n0\r\n\r\n"
        )),
        ..BASE
    },
    Case {
        name: "chunk_extensions_are_ignored",
        rule: "RFC 9112 §7.1.1: a recipient MUST ignore unrecognized chunk extensions",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5;ext=\"1\"\r\nhello\r\n0\r\n\r\n",
        upstream: Up::Exactly(up!(
            "POST /u HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\ntransfer-encoding: chunked\r\n",
            body = "5\r\nhello\r\n0\r\n\r\n"
        )),
        ..BASE
    },
    Case {
        name: "transfer_encoding_and_content_length",
        rule: "RFC 9112 §6.1: TE and CL together MUST close the connection after responding (serin rejects)",
        request: TE_AND_CL,
        behind_hyper: Some(&TE_AND_CL_NORMALISED),
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_before_content_length",
        rule: "RFC 9112 §6.1: TE and CL together MUST close the connection after responding (serin rejects)",
        request: CL_AFTER_TE,
        behind_hyper: Some(&TE_AND_CL_NORMALISED),
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_in_http10",
        rule: "RFC 9112 §6.1: TE in an HTTP/1.0 message MUST be treated as faulty framing, then close",
        request: b"POST /u HTTP/1.0\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_not_chunked",
        rule: "RFC 9112 §6.3: TE whose final coding is not chunked: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_chunked_not_final",
        rule: "RFC 9112 §6.3: TE whose final coding is not chunked: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, gzip\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_identity",
        rule: "RFC 9112 §6.3: TE whose final coding is not chunked: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: identity\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_unknown_coding_then_chunked",
        rule: "RFC 9112 §6.1: a coding serin cannot apply (501 allowed; serin picks 400) and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_in_two_lines",
        rule: "RFC 9112 §6.1: a coding serin cannot apply (501 allowed; serin picks 400) and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_chunked_twice",
        rule: "RFC 9112 §7: chunked MUST NOT be applied more than once: faulty framing",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, chunked\r\n\r\n\
                   5\r\nhello\r\n0\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "transfer_encoding_unknown_token",
        rule: "RFC 9112 §6.3: TE whose final coding is not chunked: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ..REFUSED
    },
    Case {
        name: "content_length_not_a_number",
        rule: "RFC 9112 §6.3: an invalid Content-Length: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: abc\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "content_length_negative",
        rule: "RFC 9112 §6.3: an invalid Content-Length: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: -1\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "content_length_with_plus_sign",
        rule: "RFC 9112 §6.3: an invalid Content-Length (1*DIGIT): MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "content_length_conflicting_lines",
        rule: "RFC 9112 §6.3: differing Content-Length values: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ..REFUSED
    },
    Case {
        name: "content_length_conflicting_list",
        rule: "RFC 9112 §6.3: differing Content-Length values: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ..REFUSED
    },
    Case {
        name: "content_length_identical_lines",
        rule: "RFC 9112 §6.3: duplicate Content-Length MAY be rejected or merged (serin rejects)",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nContent-Length: 5\r\n\
                   Content-Length: 5\r\n\r\nhello",
        behind_hyper: Some(&Case {
            name: "content_length_identical_lines",
            rule: "RFC 9110 §8.6: hyper merges identical Content-Length lines into one",
            statuses: &[200],
            upstream: Up::Exactly(up!(
                "POST /u HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\ncontent-length: 5\r\n",
                body = "hello"
            )),
            conn: Conn::Any,
            ..BASE
        }),
        ..REFUSED
    },
    Case {
        name: "content_length_identical_list",
        rule: "RFC 9112 §6.3: duplicate Content-Length MAY be rejected or merged (serin rejects)",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "content_length_overflows_64_bits",
        rule: "RFC 9112 §6.3: an invalid Content-Length: MUST respond 400 and close",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nContent-Length: 18446744073709551616\r\n\r\nhello",
        ..REFUSED
    },
    Case {
        name: "chunk_size_not_hex",
        rule: "RFC 9112 §7.1: chunk-size = 1*HEXDIG; an invalid body is an unrecoverable error",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ..BROKEN_BODY
    },
    Case {
        name: "chunk_size_overflows_64_bits",
        rule: "RFC 9112 §7.1: chunk-size too large to represent is an unrecoverable error",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n\
                   1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ..BROKEN_BODY
    },
    Case {
        name: "chunk_data_longer_than_its_size",
        rule: "RFC 9112 §7.1: chunk-data is followed by CRLF",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
        ..BROKEN_BODY
    },
    Case {
        name: "chunk_size_with_leading_space",
        rule: "RFC 9112 §7.1: chunk-size = 1*HEXDIG, nothing before it",
        request: b"POST /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        ..BROKEN_BODY
    },
    // --- RFC 9112 §3.2: Host and the request target ---
    Case {
        name: "http11_without_host",
        rule: "RFC 9112 §3.2: an HTTP/1.1 request without Host MUST get 400",
        request: b"GET /p HTTP/1.1\r\nx-request-id: c1\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "two_host_lines",
        rule: "RFC 9112 §3.2: more than one Host line MUST get 400",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "host_with_a_list",
        rule: "RFC 9112 §3.2: an invalid Host value MUST get 400",
        request: b"GET /p HTTP/1.1\r\nHost: app, other\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "host_with_a_space",
        rule: "RFC 9112 §3.2: an invalid Host value MUST get 400",
        request: b"GET /p HTTP/1.1\r\nHost: app other\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "host_with_userinfo",
        rule: "RFC 9112 §3.2: an invalid Host value (uri-host [\":\" port]) MUST get 400",
        request: b"GET /p HTTP/1.1\r\nHost: user@app\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "host_with_a_bad_port",
        rule: "RFC 9112 §3.2: an invalid Host value (port = *DIGIT) MUST get 400",
        request: b"GET /p HTTP/1.1\r\nHost: app:http\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "host_with_a_path",
        rule: "RFC 9112 §3.2: an invalid Host value MUST get 400",
        request: b"GET /p HTTP/1.1\r\nHost: app/p\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "host_with_an_ipv6_literal",
        rule: "RFC 9112 §3.2: uri-host may be an IP-literal",
        request: b"GET /p HTTP/1.1\r\nHost: [::1]:8080\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: [::1]:8080\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "http10_without_host_is_forwarded_with_one",
        rule: "RFC 9112 §3.2: serin, as the upstream's client, MUST send Host in HTTP/1.1",
        request: b"GET /p HTTP/1.0\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: {upstream}\r\nx-request-id: c1\r\n")),
        conn: Conn::Close,
        ..BASE
    },
    Case {
        name: "absolute_form_overrides_host",
        rule: "RFC 9112 §3.2.2: with an absolute-form target, Host MUST be ignored and replaced by its authority",
        request: b"GET http://a.example/p?q=1 HTTP/1.1\r\nHost: b.example\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p?q=1 HTTP/1.1\r\nhost: a.example\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "absolute_form_without_host",
        rule: "RFC 9112 §3.2: an HTTP/1.1 request without Host MUST get 400, whatever its target",
        request: b"GET http://a.example/p HTTP/1.1\r\nx-request-id: c1\r\n\r\n",
        ..REFUSED_KEEPABLE
    },
    Case {
        name: "asterisk_form_options_is_forwarded",
        rule: "RFC 9112 §3.2.4: OPTIONS * is forwarded in asterisk-form",
        request: b"OPTIONS * HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("OPTIONS * HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    // --- RFC 9112 §9: connection management ---
    Case {
        name: "connection_close_is_answered_then_closed",
        rule: "RFC 9112 §9.6: after a \"close\" option, MUST close after the response",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: close\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        conn: Conn::Close,
        ..BASE
    },
    Case {
        name: "http10_closes_by_default",
        rule: "RFC 9112 §9.3: an HTTP/1.0 connection does not persist without keep-alive",
        request: b"GET /p HTTP/1.0\r\nHost: app\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        conn: Conn::Close,
        ..BASE
    },
    Case {
        name: "http10_keep_alive_persists",
        rule: "RFC 9112 §9.3, Appendix C.2.2: serin honours HTTP/1.0 keep-alive; the option is not forwarded",
        request: b"GET /p HTTP/1.0\r\nHost: app\r\nx-request-id: c1\r\nConnection: keep-alive\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "pipelined_requests_are_answered_in_order",
        rule: "RFC 9112 §9.3.2: responses MUST be sent in the order the requests were received",
        request: b"GET /a HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\r\n\
                   GET /b HTTP/1.1\r\nHost: app\r\nx-request-id: c2\r\n\r\n",
        statuses: &[200, 200],
        upstream: Up::Exactly(
            concat!(
                "GET /a HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n",
                "x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: {proto}\r\n\r\n",
                "GET /b HTTP/1.1\r\nhost: app\r\nx-request-id: c2\r\n",
                "x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: {proto}\r\n\r\n",
            )
            .as_bytes(),
        ),
        ..BASE
    },
    Case {
        name: "nothing_after_connection_close_is_served",
        rule: "RFC 9112 §9.6: after a \"close\" request, MUST NOT process further requests",
        request: b"GET /a HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: close\r\n\r\n\
                   GET /b HTTP/1.1\r\nHost: app\r\nx-request-id: c2\r\n\r\n",
        upstream: Up::Exactly(up!("GET /a HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        conn: Conn::Close,
        ..BASE
    },
    // --- RFC 9110 §7.6: what an intermediary removes, adds and rewrites ---
    Case {
        name: "connection_named_field_is_removed",
        rule: "RFC 9110 §7.6.1: fields named in Connection MUST be removed before forwarding",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: x-a\r\nx-a: 1\r\nx-b: 2\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nx-b: 2\r\n")),
        ..BASE
    },
    Case {
        name: "connection_names_match_any_case",
        rule: "RFC 9110 §7.6.1: connection options are case-insensitive field names",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: X-A\r\nx-a: 1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "twenty_connection_named_fields_are_removed",
        rule: "RFC 9110 §7.6.1: EVERY field named in Connection MUST be removed (20 names, 460 bytes)",
        request: concat!(
            "GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: ",
            twenty_names!(),
            "\r\n",
            twenty_fields!(),
            "x-end: kept\r\n\r\n"
        )
        .as_bytes(),
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nx-end: kept\r\n")),
        ..BASE
    },
    Case {
        name: "connection_in_several_lines",
        rule: "RFC 9110 §7.6.1: the options of every Connection line count",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: x-a\r\nConnection: x-b\r\n\
                   x-a: 1\r\nx-b: 2\r\nx-c: 3\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nx-c: 3\r\n")),
        ..BASE
    },
    Case {
        name: "connection_may_name_x_forwarded_for",
        rule: "RFC 9110 §7.6.1: a client's X-Forwarded-For named in Connection is removed before serin adds its own",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nConnection: X-Forwarded-For\r\n\
                   X-Forwarded-For: 203.0.113.9\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "keep_alive_is_removed",
        rule: "RFC 9110 §7.6.1: Keep-Alive is hop-by-hop",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nKeep-Alive: timeout=5\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "proxy_connection_is_removed",
        rule: "RFC 9110 §7.6.1: Proxy-Connection is hop-by-hop",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nProxy-Connection: keep-alive\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "te_other_than_trailers_is_removed",
        rule: "RFC 9110 §7.6.1, §10.1.4: TE is hop-by-hop",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nTE: gzip\r\nConnection: TE\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "te_trailers_is_sent_with_its_connection_option",
        rule: "RFC 9110 §10.1.4: a sender of TE (serin keeps `te: trailers` for gRPC) MUST also send Connection: TE",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nTE: trailers\r\nConnection: TE\r\n\r\n",
        upstream: Up::Exactly(up!(
            "GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nte: trailers\r\nconnection: te\r\n"
        )),
        h2: true,
        ..BASE
    },
    Case {
        name: "upgrade_without_an_upgrade_option_is_removed",
        rule: "RFC 9110 §7.6.1, §7.8: Upgrade is hop-by-hop when the request does not upgrade",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nUpgrade: websocket\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "trailer_is_removed",
        rule: "serin's hop-by-hop list (after RFC 2616 §13.5.1): serin re-frames bodies, so Trailer is not forwarded",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nTrailer: x-t\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        ..BASE
    },
    Case {
        name: "via_is_added",
        rule: "RFC 9110 §7.6.3: a gateway MUST send Via in each inbound request (headers.via on)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nvia: 1.1 serin\r\n")),
        via: true,
        h2: true,
        ..BASE
    },
    Case {
        name: "via_is_appended_to_the_clients",
        rule: "RFC 9110 §7.6.3: each intermediary appends its own Via member, in order",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nVia: 1.0 fred\r\n\r\n",
        upstream: Up::Exactly(up!(
            "GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nvia: 1.0 fred\r\nvia: 1.1 serin\r\n"
        )),
        via: true,
        h2: true,
        ..BASE
    },
    Case {
        name: "via_names_the_protocol_received",
        rule: "RFC 9110 §7.6.3: received-protocol is the version of the message received (HTTP/1.0 here)",
        request: b"GET /p HTTP/1.0\r\nHost: app\r\nx-request-id: c1\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nvia: 1.0 serin\r\n")),
        conn: Conn::Close,
        via: true,
        ..BASE
    },
    Case {
        name: "max_forwards_zero_on_options_is_answered_by_serin",
        rule: "RFC 9110 §7.6.2: OPTIONS with Max-Forwards 0 MUST NOT be forwarded; serin answers 200",
        request: b"OPTIONS /p HTTP/1.1\r\nHost: app\r\nMax-Forwards: 0\r\n\r\n",
        conn: Conn::Any,
        h2: true,
        ..BASE
    },
    Case {
        name: "max_forwards_zero_on_options_asterisk_is_answered_by_serin",
        rule: "RFC 9110 §7.6.2: OPTIONS with Max-Forwards 0 MUST NOT be forwarded; serin answers 200",
        request: b"OPTIONS * HTTP/1.1\r\nHost: app\r\nMax-Forwards: 0\r\n\r\n",
        conn: Conn::Any,
        ..BASE
    },
    Case {
        name: "max_forwards_zero_on_trace_is_answered_by_serin",
        rule: "RFC 9110 §7.6.2: TRACE with Max-Forwards 0 MUST NOT be forwarded; serin answers 405",
        request: b"TRACE /p HTTP/1.1\r\nHost: app\r\nMax-Forwards: 0\r\n\r\n",
        statuses: &[405],
        conn: Conn::Any,
        h2: true,
        ..BASE
    },
    Case {
        name: "max_forwards_on_options_is_decremented",
        rule: "RFC 9110 §7.6.2: a forwarded OPTIONS MUST carry Max-Forwards decremented by one",
        request: b"OPTIONS /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nMax-Forwards: 5\r\n\r\n",
        upstream: Up::Exactly(up!(
            "OPTIONS /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nmax-forwards: 4\r\n"
        )),
        h2: true,
        ..BASE
    },
    Case {
        name: "max_forwards_on_trace_is_decremented",
        rule: "RFC 9110 §7.6.2: a forwarded TRACE MUST carry Max-Forwards decremented by one",
        request: b"TRACE /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nMax-Forwards: 1\r\n\r\n",
        upstream: Up::Exactly(up!("TRACE /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nmax-forwards: 0\r\n")),
        h2: true,
        ..BASE
    },
    Case {
        name: "max_forwards_on_get_is_forwarded_as_it_is",
        rule: "RFC 9110 §7.6.2: Max-Forwards applies to OPTIONS and TRACE only (MAY be ignored elsewhere)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nMax-Forwards: 0\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\nmax-forwards: 0\r\n")),
        h2: true,
        ..BASE
    },
    Case {
        name: "x_forwarded_for_one_line",
        rule: "X-Forwarded-For: the client's chain, then the client's address",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n",
        upstream: Up::Exactly(up!(
            "GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n",
            xff = "203.0.113.7, 127.0.0.1"
        )),
        h2: true,
        ..BASE
    },
    Case {
        name: "x_forwarded_for_two_lines_are_joined_in_order",
        rule: "X-Forwarded-For: every line of the chain, in order, on every path (RFC 9110 §5.3: lines combine)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nX-Forwarded-For: 203.0.113.7\r\n\
                   Accept: */*\r\nX-Forwarded-For: 198.51.100.2\r\n\r\n",
        upstream: Up::Exactly(up!(
            "GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\naccept: */*\r\n",
            xff = "203.0.113.7, 198.51.100.2, 127.0.0.1"
        )),
        h2: true,
        ..BASE
    },
    Case {
        name: "x_forwarded_for_list_and_line_are_joined_in_order",
        rule: "X-Forwarded-For: every member of the chain, in order (RFC 9110 §5.3: lines combine)",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\n\
                   X-Forwarded-For: 203.0.113.7, 198.51.100.2\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n",
        upstream: Up::Exactly(up!(
            "GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n",
            xff = "203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1"
        )),
        h2: true,
        ..BASE
    },
    Case {
        name: "x_forwarded_proto_is_serins",
        rule: "X-Forwarded-Proto: the scheme serin received, whatever the client claimed",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nX-Forwarded-Proto: https\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        h2: true,
        ..BASE
    },
    Case {
        name: "x_forwarded_proto_in_two_lines_becomes_one",
        rule: "X-Forwarded-Proto: one value, serin's",
        request: b"GET /p HTTP/1.1\r\nHost: app\r\nx-request-id: c1\r\nX-Forwarded-Proto: https\r\n\
                   X-Forwarded-Proto: ftp\r\n\r\n",
        upstream: Up::Exactly(up!("GET /p HTTP/1.1\r\nhost: app\r\nx-request-id: c1\r\n")),
        h2: true,
        ..BASE
    },
    // --- responses: what of the upstream's response reaches the client ---
    Case {
        name: "response_hop_by_hop_fields_are_removed",
        rule: "RFC 9110 §7.6.1: hop-by-hop fields of a response (and those its Connection names) are not forwarded",
        request: RESPONSE_REQUEST,
        upstream: RESPONSE_UPSTREAM,
        reply: b"HTTP/1.1 200 OK\r\nconnection: x-up, keep-alive\r\nx-up: 1\r\nkeep-alive: timeout=5\r\n\
                 proxy-connection: keep-alive\r\nupgrade: h2c\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok",
        response: Some(ClientSees {
            fields: &[
                ("x-kept", "yes"),
                ("x-request-id", "c1"),
                ("x-serin-upstream", "stable"),
            ],
            body: b"ok",
        }),
        h2: true,
        ..BASE
    },
    Case {
        name: "response_twenty_connection_named_fields_are_removed",
        rule: "RFC 9110 §7.6.1: EVERY field the response's Connection names is removed (20 names, 460 bytes)",
        request: RESPONSE_REQUEST,
        upstream: RESPONSE_UPSTREAM,
        reply: concat!(
            "HTTP/1.1 200 OK\r\nconnection: ",
            twenty_names!(),
            "\r\n",
            twenty_fields!(),
            "x-kept: yes\r\ncontent-length: 2\r\n\r\nok"
        )
        .as_bytes(),
        response: Some(ClientSees {
            fields: &[
                ("x-kept", "yes"),
                ("x-request-id", "c1"),
                ("x-serin-upstream", "stable"),
            ],
            body: b"ok",
        }),
        h2: true,
        ..BASE
    },
    Case {
        name: "response_with_transfer_encoding_and_content_length",
        rule: "RFC 9112 §6.1, §6.3: Transfer-Encoding overrides Content-Length; never both to the client",
        request: RESPONSE_REQUEST,
        upstream: RESPONSE_UPSTREAM,
        reply: b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n",
        response: Some(ClientSees {
            fields: PLAIN_FIELDS,
            body: b"hello",
        }),
        h2: true,
        ..BASE
    },
    Case {
        name: "response_x_serin_fields_come_only_from_serin",
        rule: "serin: an upstream's x-serin-upstream / x-serin-fallback never reach the client",
        request: RESPONSE_REQUEST,
        upstream: RESPONSE_UPSTREAM,
        reply: b"HTTP/1.1 200 OK\r\nx-serin-upstream: canary\r\nx-serin-fallback: canary\r\n\
                 content-length: 2\r\n\r\nok",
        response: Some(ClientSees {
            fields: PLAIN_FIELDS,
            body: b"ok",
        }),
        h2: true,
        ..BASE
    },
    Case {
        name: "response_connection_close_is_the_upstreams_hop_only",
        rule: "RFC 9110 §7.6.1: the upstream's Connection: close ends the upstream connection, not the client's",
        request: RESPONSE_REQUEST,
        upstream: RESPONSE_UPSTREAM,
        reply: b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        response: Some(ClientSees {
            fields: PLAIN_FIELDS,
            body: b"ok",
        }),
        h2: true,
        ..BASE
    },
];

// === the paths ===

/// Where a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Own,
    Hyper,
    Tls,
    H2,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Own => "own",
            Path::Hyper => "hyper",
            Path::Tls => "tls",
            Path::H2 => "h2",
        })
    }
}

impl Path {
    fn proto(self) -> &'static str {
        if self == Path::Tls {
            "https"
        } else {
            "http"
        }
    }
}

/// `request` with a 5-byte body, if it is one bodiless request head: the
/// hyper path's variant of a case.
fn with_body(request: &[u8]) -> Option<Vec<u8>> {
    let head_end = find(request, b"\r\n\r\n")? + 4;
    let framed = split_crlf(&request[..head_end - 4])
        .iter()
        .skip(1)
        .any(|line| is_framing_field(name_of(line)));
    if head_end != request.len() || framed {
        return None;
    }
    let mut out = request[..head_end - 2].to_vec();
    out.extend_from_slice(b"Content-Length: 5\r\n\r\nhello");
    Some(out)
}

/// The bytes the upstream must receive for `case` on `path`.
fn expected_upstream(case: &Case, path: Path, with_body: bool) -> Option<Vec<u8>> {
    let Up::Exactly(template) = case.upstream else {
        return None;
    };
    let mut want = replace(template, b"{proto}", path.proto().as_bytes());
    if path == Path::H2 {
        want = replace(&want, b"via: 1.1 serin", b"via: 2 serin");
    }
    if with_body {
        let line_end = find(&want, b"\r\n").expect("a request line") + 2;
        want.splice(line_end..line_end, b"content-length: 5\r\n".iter().copied());
        want.extend_from_slice(b"hello");
    }
    Some(want)
}

/// Runs every case that applies to `path` and returns the mismatches.
async fn run_table(path: Path, cert: Option<&TestCert>) -> Vec<String> {
    let cases = CASES.iter().filter(|c| path != Path::H2 || c.h2);
    let runs = futures_util::stream::iter(cases.map(|case| async move {
        let body_variant = if path == Path::Hyper {
            with_body(case.request)
        } else {
            None
        };
        let mut run = if path == Path::H2 {
            exchange_h2(case).await
        } else {
            let request = body_variant.as_deref().unwrap_or(case.request);
            let x = Exchange {
                request,
                warm_up: path == Path::Hyper && body_variant.is_none(),
                responses: case.statuses.len(),
                probe: case.conn != Conn::Any,
                stop_at_upstream_head: false,
                reply: case.reply,
                via: case.via,
            };
            exchange_h1(&x, if path == Path::Tls { cert } else { None }).await
        };
        let case = match (path, case.behind_hyper) {
            (Path::Hyper, Some(normalised)) => normalised,
            _ => case,
        };
        let mut want = expected_upstream(case, path, body_variant.is_some());
        let mut case = *case;
        if path == Path::H2 {
            // The h2→h1 conversion legitimately differs only in framing
            // fields (HTTP/2 frames bodies itself), and h2 has no
            // connection to keep or close.
            want = want.map(|w| without_framing_fields(&w));
            run.upstream = without_framing_fields(&run.upstream);
            case.conn = Conn::Any;
        }
        judge(&case, path, &run, want.as_deref())
    }))
    .buffer_unordered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    let mut bad: Vec<String> = runs.into_iter().flatten().collect();
    bad.sort();
    bad
}

/// Fails with every mismatch, or passes.
fn report(what: &str, runs: usize, bad: &[String]) {
    assert!(
        bad.is_empty(),
        "{} mismatch(es) in {runs} {what} runs:\n\n{}\n",
        bad.len(),
        bad.join("\n\n")
    );
}

/// Compares a run with its case; returns one line per mismatch.
fn judge(case: &Case, path: Path, run: &Run, want_upstream: Option<&[u8]>) -> Vec<String> {
    let mut bad = Vec::new();
    let mut mismatch = |what: &str, want: String, got: String| {
        bad.push(format!(
            "{} [{path}] {what}\n    rule:     {}\n    expected: {want}\n    got:      {got}",
            case.name, case.rule
        ));
    };
    let statuses: Vec<u16> = run.responses.iter().map(|r| r.status).collect();
    if statuses != case.statuses || run.error.is_some() {
        let mut got = format!("statuses {statuses:?}");
        if let Some(e) = &run.error {
            got.push_str(&format!(", then {e}"));
        }
        mismatch("responses", format!("statuses {:?}", case.statuses), got);
    }
    for r in &run.responses {
        let lengths = r.count("content-length");
        if lengths > 1 || (lengths > 0 && r.count("transfer-encoding") > 0) {
            mismatch(
                "response framing",
                "at most one of content-length and transfer-encoding".into(),
                r.head.clone(),
            );
        }
    }
    if let (Some(want), Some(first)) = (case.response, run.responses.first()) {
        let mut want_fields: Vec<(String, String)> = want
            .fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        want_fields.sort();
        let got_fields = first.end_to_end_fields();
        if got_fields != want_fields || first.body != want.body {
            mismatch(
                "client response",
                format!("{want_fields:?} with body {:?}", show(want.body)),
                format!("{got_fields:?} with body {:?}", show(&first.body)),
            );
        }
    }
    if let Some(state) = &run.conn {
        let ok = match case.conn {
            Conn::Any => true,
            Conn::Close => *state == ConnState::Closed,
            Conn::Open => matches!(state, ConnState::Open(_)),
        };
        if !ok {
            mismatch(
                "client connection",
                format!("{:?}", case.conn),
                state.to_string(),
            );
        }
    }
    match case.upstream {
        Up::Nothing if !run.upstream.is_empty() => mismatch(
            "upstream",
            "nothing".into(),
            format!("\"{}\"", show(&run.upstream)),
        ),
        Up::Incomplete if run.complete > 0 => mismatch(
            "upstream",
            "no complete request".into(),
            format!("{} complete: \"{}\"", run.complete, show(&run.upstream)),
        ),
        Up::Exactly(_) => {
            let want = canonical(want_upstream.expect("expected bytes"));
            let got = canonical(&run.upstream);
            if want != got {
                mismatch(
                    "upstream bytes (names lowercased, fields sorted by name)",
                    format!("\"{}\"", show(&want)),
                    format!("\"{}\"", show(&got)),
                );
            }
        }
        _ => {}
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_on_serins_own_loop() {
    let bad = run_table(Path::Own, None).await;
    report("own-loop", CASES.len(), &bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_on_hypers_path() {
    let bad = run_table(Path::Hyper, None).await;
    report("hyper-path", CASES.len(), &bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_over_tls() {
    let cert = TestCert::generate();
    let bad = run_table(Path::Tls, Some(&cert)).await;
    report("TLS", CASES.len(), &bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_over_http2() {
    let bad = run_table(Path::H2, None).await;
    report("HTTP/2", CASES.iter().filter(|c| c.h2).count(), &bad);
}

/// For every forwarded single-request case, serin's own loop and hyper's
/// path send the upstream the same head, byte for byte but for field-name
/// case (hyper keeps names lowercase) and the `content-length: 5` of the
/// hyper variant's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_loop_and_hyper_forward_identical_heads() {
    let cases: Vec<(&Case, Vec<u8>)> = CASES
        .iter()
        .filter(|c| matches!(c.upstream, Up::Exactly(_)))
        .filter_map(|c| Some((c, with_body(c.request)?)))
        .collect();
    let total = cases.len();
    let runs = futures_util::stream::iter(cases.into_iter().map(|(case, with_body)| async move {
        let own = Exchange {
            request: case.request,
            warm_up: false,
            responses: 1,
            probe: false,
            stop_at_upstream_head: false,
            reply: case.reply,
            via: case.via,
        };
        let hyper = Exchange {
            request: &with_body,
            ..own
        };
        let own = exchange_h1(&own, None).await;
        let hyper = exchange_h1(&hyper, None).await;
        let own_head = lowercase_names(head_of(&own.upstream));
        let hyper_head = lowercase_names(head_of(&hyper.upstream));
        let hyper_head = replace(&hyper_head, b"\r\ncontent-length: 5\r\n", b"\r\n");
        (own_head != hyper_head).then(|| {
            format!(
                "{}\n    own loop: \"{}\"\n    hyper:    \"{}\"",
                case.name,
                show(&own_head),
                show(&hyper_head)
            )
        })
    }))
    .buffer_unordered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    let mut bad: Vec<String> = runs.into_iter().flatten().collect();
    bad.sort();
    report("cross-path", total, &bad);
}

// === the http_desync_guardian corpus ===

/// One request of the vendored corpus.
struct Desync {
    /// `file.yaml#index: case name`.
    name: String,
    /// Compliant, Acceptable, Ambiguous or Severe.
    tier: String,
    request: Vec<u8>,
}

/// The corpus's `\xNN`-style escapes, as its own harness reads them
/// (`unescape_value` in the crate's `request_analyzer.rs`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                char::from(u8::from_str_radix(&hex, 16).expect("a \\xNN escape"))
            }
            Some('b') => '\x08',
            Some('f') => '\x0c',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some(other) => other,
            None => panic!("a trailing backslash in {s:?}"),
        });
    }
    out
}

/// A YAML scalar as text (some values are plain numbers).
fn scalar(value: &serde_norway::Value) -> String {
    match value {
        serde_norway::Value::String(s) => unescape(s),
        serde_norway::Value::Number(n) => n.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// Text as wire bytes: a char below 256 is that byte (the corpus writes
/// `\xa0` for the byte 0xA0), anything above is UTF-8.
fn latin1(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        match u8::try_from(u32::from(c)) {
            Ok(b) => out.push(b),
            Err(_) => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// Every case of every YAML file in `tests/corpus/http_desync_guardian`.
fn load_desync() -> Vec<Desync> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/http_desync_guardian");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let yaml: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let file = file.file_name().unwrap().to_string_lossy().into_owned();
        for (index, case) in yaml
            .as_sequence()
            .expect("a list of cases")
            .iter()
            .enumerate()
        {
            let field = |name: &str| scalar(&case[name]);
            let mut request = latin1(&format!(
                "{} {} {}\r\n",
                field("method"),
                field("uri"),
                field("version")
            ));
            let mut has_host = false;
            for header in case["headers"].as_sequence().into_iter().flatten() {
                let name = scalar(&header["name"]);
                has_host |= name.eq_ignore_ascii_case("host");
                request.extend(latin1(&format!("{name}: {}\r\n", scalar(&header["value"]))));
            }
            // The corpus judges framing; without Host every HTTP/1.1 case
            // would be refused for that alone.
            if !has_host {
                request.extend_from_slice(b"Host: desync.example\r\n");
            }
            request.extend_from_slice(b"\r\n");
            cases.push(Desync {
                // Names repeat within a file: the index tells them apart.
                name: format!("{file}#{index}: {}", field("name")),
                tier: scalar(&case["expected"]["tier"]),
                request,
            });
        }
    }
    cases
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether a forwarded request head leaves an upstream no room to frame it
/// differently: a strict request line, strict field lines (token names,
/// no CTL but HTAB in values, no folding), one `Host`, and at most one of
/// a single all-digit `Content-Length` and a `Transfer-Encoding: chunked`.
fn unambiguous(upstream: &[u8]) -> Result<(), String> {
    let head = head_of(upstream);
    if !head.ends_with(b"\r\n\r\n") {
        return Err("an incomplete head".into());
    }
    let lines = split_crlf(&head[..head.len() - 4]);
    let mut faults = Vec::new();
    let parts: Vec<&[u8]> = lines[0].split(|&b| b == b' ').collect();
    let line_ok = parts.len() == 3
        && !parts[0].is_empty()
        && parts[0].iter().all(|&b| is_tchar(b))
        && !parts[1].is_empty()
        // Raw non-ASCII bytes are not URI characters, but they frame
        // nothing: the corpus counts them Compliant.
        && parts[1].iter().all(|&b| (0x21..0x7f).contains(&b) || b >= 0x80)
        && parts[2] == b"HTTP/1.1";
    if !line_ok {
        faults.push(format!("request line \"{}\"", show(lines[0])));
    }
    let count = |name: &[u8]| {
        lines[1..]
            .iter()
            .filter(|l| name_of(l).eq_ignore_ascii_case(name))
            .count()
    };
    let (te, cl, host) = (
        count(b"transfer-encoding"),
        count(b"content-length"),
        count(b"host"),
    );
    for line in &lines[1..] {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            faults.push(format!("field line without a colon \"{}\"", show(line)));
            continue;
        };
        let name_ok = colon > 0 && line[..colon].iter().all(|&b| is_tchar(b));
        let value_ok = line[colon + 1..]
            .iter()
            .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b) || b >= 0x80);
        if !name_ok || !value_ok {
            faults.push(format!("field line \"{}\"", show(line)));
        }
        let (name, value) = field_of(line);
        if name.eq_ignore_ascii_case(b"content-length")
            && (value.is_empty() || !value.iter().all(u8::is_ascii_digit))
        {
            faults.push(format!("content-length \"{}\"", show(value)));
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            && !value.eq_ignore_ascii_case(b"chunked")
        {
            faults.push(format!("transfer-encoding \"{}\"", show(value)));
        }
    }
    if te > 0 && cl > 0 {
        faults.push("both transfer-encoding and content-length".into());
    }
    if te > 1 || cl > 1 {
        faults.push(format!(
            "{te} transfer-encoding and {cl} content-length lines"
        ));
    }
    if host != 1 {
        faults.push(format!("{host} host lines"));
    }
    if faults.is_empty() {
        Ok(())
    } else {
        Err(faults.join("; "))
    }
}

/// The head's lines that look like framing fields, however mangled.
fn framing_lines(request: &[u8]) -> String {
    split_crlf(head_of(request))
        .iter()
        .skip(1)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            find(&l, b"encoding").is_some() || find(&l, b"length").is_some()
        })
        .map(|l| format!("\"{}\"", show(l)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every Severe case of the http_desync_guardian corpus gets 400 and a
/// closed connection and reaches no upstream, on serin's own loop and on
/// hyper's path (after a warm-up request moved the connection there).
/// Every other case (Compliant ones too: several use transfer codings a
/// gateway cannot forward) is either refused or forwarded as an unambiguous
/// request; the forwarded ones are printed, with what serin made of their
/// framing fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_desync_guardian_corpus() {
    let cases = load_desync();
    assert_eq!(cases.len(), 158, "every vendored case was read");
    let runs: Vec<(&Desync, Path)> = cases
        .iter()
        .flat_map(|c| [(c, Path::Own), (c, Path::Hyper)])
        .collect();
    let total = runs.len();
    let results = futures_util::stream::iter(runs.into_iter().map(|(case, path)| async move {
        let x = Exchange {
            request: &case.request,
            warm_up: path == Path::Hyper,
            responses: 1,
            probe: case.tier == "Severe",
            stop_at_upstream_head: true,
            reply: OK_REPLY,
            via: false,
        };
        (case, path, exchange_h1(&x, None).await)
    }))
    .buffer_unordered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    let mut bad = Vec::new();
    let mut forwarded = Vec::new();
    for (case, path, run) in results {
        let status = run.responses.first().map(|r| r.status);
        let what = format!("{} {} [{path}]", case.tier, case.name);
        let sent = format!("sent \"{}\"", show(&case.request));
        if case.tier == "Severe" {
            let refused = status == Some(400) && run.error.is_none();
            let closed = run.conn == Some(ConnState::Closed);
            if !refused || !closed || !run.upstream.is_empty() {
                let conn = run.conn.as_ref().map_or("-".into(), |c| c.to_string());
                bad.push(format!(
                    "{what}\n    {sent}\n    expected: 400, closed, nothing upstream\n    \
                     got:      {status:?} {}, connection {conn}, upstream \"{}\"",
                    run.error.as_deref().unwrap_or(""),
                    show(&run.upstream)
                ));
            }
        } else if run.upstream.is_empty() {
            if !matches!(status, Some(s) if s >= 400) {
                bad.push(format!(
                    "{what}\n    {sent}\n    expected: refused (4xx/5xx) or forwarded unambiguously\n    \
                     got:      {status:?} {}, nothing upstream",
                    run.error.as_deref().unwrap_or("")
                ));
            }
        } else if let Err(why) = unambiguous(&run.upstream) {
            bad.push(format!(
                "{what}\n    {sent}\n    expected: refused, or forwarded unambiguously\n    \
                 got:      forwarded {why}: \"{}\"",
                show(head_of(&run.upstream))
            ));
        } else {
            forwarded.push(format!(
                "{what}: {} -> {}",
                framing_lines(&case.request),
                framing_lines(&run.upstream)
            ));
        }
    }
    forwarded.sort();
    println!(
        "{} non-Severe runs were forwarded, normalised:\n{}",
        forwarded.len(),
        forwarded.join("\n")
    );
    bad.sort();
    report("http_desync_guardian", total, &bad);
}

// === one run ===

/// What happened in one run.
#[derive(Default)]
struct Run {
    /// The responses read, in order.
    responses: Vec<Response>,
    /// Why reading stopped before every expected response was read.
    error: Option<String>,
    /// The client connection afterwards, when it was probed.
    conn: Option<ConnState>,
    /// Every byte the upstreams received (probes left out), with the stable
    /// upstream's address written `{upstream}`.
    upstream: Vec<u8>,
    /// Complete requests among them.
    complete: usize,
}

/// One HTTP/1.x client conversation with a fresh proxy.
#[derive(Clone, Copy)]
struct Exchange<'a> {
    request: &'a [u8],
    /// First move the connection to hyper's path with [`WARM_UP`].
    warm_up: bool,
    /// Responses to read.
    responses: usize,
    /// Probe the connection afterwards (see [`ConnState`]).
    probe: bool,
    /// Stop waiting for a response once the upstream has a request head
    /// (the request was forwarded; that is all a desync case needs).
    stop_at_upstream_head: bool,
    reply: &'static [u8],
    via: bool,
}

/// A proxy in front of two recording upstreams, weight 0 (all to stable).
fn start_proxy(rec: &Recorder, cert: Option<&TestCert>, via: bool) -> Proxy {
    let upstream = |addr: SocketAddr| {
        Upstream::parse(&format!("http://{addr}"), UpstreamProtocol::Http1).unwrap()
    };
    let mut config = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        upstream(rec.stable),
        upstream(rec.canary),
    );
    config.response_timeout = UPSTREAM_PATIENCE;
    config.drain_timeout = Duration::from_secs(1);
    config.headers.via = via;
    config.tls = cert.map(|c| TlsFiles {
        cert: c.cert_path.clone(),
        key: c.key_path.clone(),
        client_auth: None,
    });
    Proxy::start(config, Routes::new(RouteTable::new(0))).unwrap()
}

async fn exchange_h1(x: &Exchange<'_>, cert: Option<&TestCert>) -> Run {
    let rec = Recorder::start(x.reply).await;
    let proxy = start_proxy(&rec, cert, x.via);
    let mut run = Run::default();
    let connected = tokio::time::timeout(WAIT, TcpStream::connect(proxy.local_addr())).await;
    match (connected, cert) {
        (Ok(Ok(tcp)), None) => talk(Wire::new(tcp), x, &rec, &mut run).await,
        (Ok(Ok(tcp)), Some(cert)) => {
            // http/1.1 only: these cases are HTTP/1.1 bytes.
            let mut config = (*cert.client).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            match tokio::time::timeout(WAIT, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => talk(Wire::new(tls), x, &rec, &mut run).await,
                Ok(Err(e)) => run.error = Some(format!("TLS handshake failed: {e}")),
                Err(_) => run.error = Some("TLS handshake timed out".into()),
            }
        }
        (Ok(Err(e)), _) => run.error = Some(format!("connect failed: {e}")),
        (Err(_), _) => run.error = Some("connect timed out".into()),
    }
    finish(proxy, rec, &mut run).await;
    run
}

/// The client's side of an exchange; the connection closes when it returns.
async fn talk<S>(mut wire: Wire<S>, x: &Exchange<'_>, rec: &Recorder, run: &mut Run)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if x.warm_up {
        let warmed = match wire.send(WARM_UP).await {
            Ok(()) => wire
                .response(false, &|| false)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let failed = match warmed {
            Ok(r) if r.status == 200 => None,
            Ok(r) => Some(format!("the warm-up got {}", r.status)),
            Err(e) => Some(format!("the warm-up failed: {e}")),
        };
        if failed.is_some() {
            run.error = failed;
            return;
        }
    }
    if let Err(e) = wire.send(x.request).await {
        run.error = Some(e);
        return;
    }
    let to_head = x.request.starts_with(b"HEAD ");
    let stop = || x.stop_at_upstream_head && rec.has_a_head();
    for _ in 0..x.responses {
        match wire.response(to_head, &stop).await {
            Ok(r) => run.responses.push(r),
            Err(e) => {
                run.error = Some(e.to_string());
                return;
            }
        }
    }
    if x.probe {
        run.conn = Some(wire.probe().await);
    }
}

/// Stops the proxy, waits until the upstreams saw every connection close
/// (so every byte serin sent is recorded), and takes the record.
async fn finish(proxy: Proxy, rec: Recorder, run: &mut Run) {
    proxy.shutdown();
    proxy.wait().await;
    if let Err(e) = rec.settled().await {
        run.error.get_or_insert(e);
    }
    let authority = rec.stable.to_string();
    run.upstream = replace(&rec.bytes(), authority.as_bytes(), b"{upstream}");
    run.complete = rec.complete();
}

/// A case's request as an HTTP/2 request: the request line and fields of
/// its head, `Host` as `:authority`; connection-specific fields (RFC 9113
/// §8.2.2) are left out, as an HTTP/2 client must.
fn h2_request(raw: &[u8]) -> http::Request<Full<Bytes>> {
    let head_end = find(raw, b"\r\n\r\n").expect("a head");
    let lines = split_crlf(&raw[..head_end]);
    let mut parts = lines[0].split(|&b| b == b' ');
    let method = parts.next().unwrap();
    let target = std::str::from_utf8(parts.next().unwrap()).unwrap();
    let mut host = "localhost".to_string();
    let mut builder = http::Request::builder().method(method);
    for line in &lines[1..] {
        let (name, value) = field_of(line);
        if name.eq_ignore_ascii_case(b"host") {
            host = String::from_utf8(value.to_vec()).unwrap();
        } else if !name.eq_ignore_ascii_case(b"connection") {
            builder = builder.header(name, value);
        }
    }
    builder
        .uri(format!("http://{host}{target}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn exchange_h2(case: &Case) -> Run {
    let rec = Recorder::start(case.reply).await;
    let proxy = start_proxy(&rec, None, case.via);
    let mut run = Run::default();
    match h2_send(proxy.local_addr(), h2_request(case.request)).await {
        Ok(r) => run.responses.push(r),
        Err(e) => run.error = Some(e),
    }
    finish(proxy, rec, &mut run).await;
    run
}

async fn h2_send(addr: SocketAddr, req: http::Request<Full<Bytes>>) -> Result<Response, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("h2 request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("h2 body: {e}"))?
                .to_bytes();
            let fields: Vec<(String, String)> = parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            let head = format!("{} {fields:?}", parts.status);
            Ok(Response {
                status: parts.status.as_u16(),
                fields,
                body: body.to_vec(),
                head,
            })
        }
        .await;
        conn.abort();
        result
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

// === a raw client ===

/// A response as it came off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Fields in order, names lowercased, values trimmed.
    fields: Vec<(String, String)>,
    /// The body, chunked framing removed.
    body: Vec<u8>,
    /// The head as received, for failure messages.
    head: String,
}

impl Response {
    fn count(&self, name: &str) -> usize {
        self.fields.iter().filter(|(n, _)| n == name).count()
    }

    /// The fields the upstream's response decides, sorted: framing, `date`
    /// and serin's own `connection: close`/`keep-alive` left out.
    fn end_to_end_fields(&self) -> Vec<(String, String)> {
        let mut fields: Vec<(String, String)> = self
            .fields
            .iter()
            .filter(|(n, v)| {
                !matches!(n.as_str(), "date" | "content-length" | "transfer-encoding")
                    && (n != "connection" || !matches!(v.as_str(), "close" | "keep-alive"))
            })
            .cloned()
            .collect();
        fields.sort();
        fields
    }
}

/// Why no (further) response could be read.
enum Stop {
    /// The connection closed with nothing pending.
    Closed,
    TimedOut,
    /// The upstream got a request head (see [`Exchange::stop_at_upstream_head`]).
    Forwarded,
    Failed(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Closed => f.write_str("the connection closed without a response"),
            Stop::TimedOut => write!(f, "no response within {WAIT:?}"),
            Stop::Forwarded => f.write_str("no response yet, and the upstream got a request head"),
            Stop::Failed(why) => f.write_str(why),
        }
    }
}

/// The client connection after a case, as a probe request found it.
#[derive(Debug, PartialEq, Eq)]
enum ConnState {
    Closed,
    /// Another response came back (its head).
    Open(String),
    /// Neither a response nor a close within [`WAIT`].
    Silent,
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnState::Closed => f.write_str("closed"),
            ConnState::Open(head) => write!(f, "open: a further request got {head:?}"),
            ConnState::Silent => write!(f, "open, silent for {WAIT:?}"),
        }
    }
}

/// A client connection that writes raw bytes and parses raw responses.
struct Wire<S> {
    io: S,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let write = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(WAIT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write failed: {e}")),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// Reads one response (`to_head`: to a HEAD request), or says why not;
    /// gives up early when `stop` turns true.
    async fn response(&mut self, to_head: bool, stop: &dyn Fn() -> bool) -> Result<Response, Stop> {
        let deadline = Instant::now() + WAIT;
        let mut eof = false;
        loop {
            match parse_response(&self.buf, to_head, eof) {
                Parsed::Done(resp, used) => {
                    self.buf.drain(..used);
                    return Ok(resp);
                }
                Parsed::Bad(why) => {
                    return Err(Stop::Failed(format!(
                        "a malformed response ({why}): \"{}\"",
                        show(&self.buf)
                    )))
                }
                Parsed::Partial if eof && self.buf.is_empty() => return Err(Stop::Closed),
                Parsed::Partial if eof => {
                    return Err(Stop::Failed(format!(
                        "the connection closed inside a response: \"{}\"",
                        show(&self.buf)
                    )))
                }
                Parsed::Partial => {}
            }
            if stop() {
                return Err(Stop::Forwarded);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Stop::TimedOut);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at((now + POLL).min(deadline), self.io.read(&mut chunk))
                .await
            {
                Err(_) => {}
                // A reset ends the connection as a close does.
                Ok(Ok(0)) | Ok(Err(_)) => eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends [`PROBE`] to learn whether the connection is still served.
    async fn probe(&mut self) -> ConnState {
        if self.send(PROBE).await.is_err() {
            return ConnState::Closed;
        }
        match self.response(false, &|| false).await {
            Ok(r) => ConnState::Open(r.head),
            Err(Stop::Closed) => ConnState::Closed,
            Err(Stop::TimedOut) | Err(Stop::Forwarded) => ConnState::Silent,
            Err(Stop::Failed(why)) => ConnState::Open(why),
        }
    }
}

enum Parsed {
    Partial,
    Bad(String),
    /// A response and the bytes it took.
    Done(Response, usize),
}

fn parse_response(buf: &[u8], to_head: bool, eof: bool) -> Parsed {
    let Some(head_len) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return Parsed::Partial;
    };
    let head = &buf[..head_len];
    let lines = split_crlf(&head[..head_len - 4]);
    let status_line = lines[0];
    let status = match (status_line.starts_with(b"HTTP/1."), status_line.get(9..12)) {
        (true, Some(code)) => std::str::from_utf8(code).ok().and_then(|c| c.parse().ok()),
        _ => None,
    };
    let Some(status) = status else {
        return Parsed::Bad("no status line".into());
    };
    let fields: Vec<(String, String)> = lines[1..]
        .iter()
        .map(|line| {
            let (name, value) = field_of(line);
            (
                String::from_utf8_lossy(name).to_ascii_lowercase(),
                String::from_utf8_lossy(value).into_owned(),
            )
        })
        .collect();
    let mut resp = Response {
        status,
        fields,
        body: Vec::new(),
        head: String::from_utf8_lossy(head).into_owned(),
    };
    let rest = &buf[head_len..];
    if to_head || status / 100 == 1 || status == 204 || status == 304 {
        return Parsed::Done(resp, head_len);
    }
    let field = |name: &str| resp.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    if field("transfer-encoding").is_some() {
        return match decode_chunked(rest) {
            Chunked::Partial => Parsed::Partial,
            Chunked::Bad => Parsed::Bad("bad chunked body".into()),
            Chunked::Done { body, len } => {
                resp.body = body;
                Parsed::Done(resp, head_len + len)
            }
        };
    }
    if let Some(length) = field("content-length") {
        let Ok(length) = length.parse::<usize>() else {
            return Parsed::Bad(format!("content-length {length:?}"));
        };
        if rest.len() < length {
            return Parsed::Partial;
        }
        resp.body = rest[..length].to_vec();
        return Parsed::Done(resp, head_len + length);
    }
    if !eof {
        return Parsed::Partial;
    }
    resp.body = rest.to_vec();
    Parsed::Done(resp, buf.len())
}

// === a raw recording upstream ===

/// Two upstreams (stable and canary) that record every byte they receive,
/// per connection, and answer each complete request with a fixed reply
/// ([`PROBE`] and [`WARM_UP`] are answered and left out of the record).
struct Recorder {
    stable: SocketAddr,
    canary: SocketAddr,
    connections: Arc<Mutex<Vec<Arc<Mutex<Received>>>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// What one upstream connection received.
#[derive(Default)]
struct Received {
    /// Complete requests, in order, probes left out.
    requests: Vec<u8>,
    complete: usize,
    /// Bytes not (yet) a complete request.
    pending: Vec<u8>,
    closed: bool,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Recorder {
    async fn start(reply: &'static [u8]) -> Self {
        let connections = Arc::new(Mutex::new(Vec::new()));
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            let connections = connections.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let received = Arc::new(Mutex::new(Received::default()));
                    connections.lock().unwrap().push(received.clone());
                    tokio::spawn(record(stream, reply, received));
                }
            }));
        }
        Self {
            stable: addrs[0],
            canary: addrs[1],
            connections,
            tasks,
        }
    }

    fn each<T>(&self, f: impl Fn(&Received) -> T) -> Vec<T> {
        let connections = self.connections.lock().unwrap();
        connections.iter().map(|r| f(&r.lock().unwrap())).collect()
    }

    /// Every byte received, connection after connection.
    fn bytes(&self) -> Vec<u8> {
        self.each(|r| [r.requests.as_slice(), &r.pending].concat())
            .concat()
    }

    fn complete(&self) -> usize {
        self.each(|r| r.complete).iter().sum()
    }

    fn has_a_head(&self) -> bool {
        self.each(|r| r.complete > 0 || find(&r.pending, b"\r\n\r\n").is_some())
            .contains(&true)
    }

    /// Waits until every upstream connection has closed.
    async fn settled(&self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        while self.each(|r| r.closed).contains(&false) {
            if Instant::now() >= deadline {
                return Err("an upstream connection stayed open after the proxy stopped".into());
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }
}

async fn record(mut stream: TcpStream, reply: &'static [u8], received: Arc<Mutex<Received>>) {
    let mut chunk = vec![0u8; 16 * 1024];
    'connection: loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut replies = Vec::new();
        {
            let mut r = received.lock().unwrap();
            r.pending.extend_from_slice(&chunk[..n]);
            while let Some(len) = message_len(&r.pending) {
                let message: Vec<u8> = r.pending.drain(..len).collect();
                let target = message.split(|&b| b == b' ').nth(1).unwrap_or_default();
                if target != b"/__probe" {
                    r.requests.extend_from_slice(&message);
                    r.complete += 1;
                }
                replies.push(if message.starts_with(b"HEAD ") {
                    head_of(reply)
                } else {
                    reply
                });
            }
        }
        for reply in replies {
            if stream.write_all(reply).await.is_err() {
                break 'connection;
            }
        }
    }
    received.lock().unwrap().closed = true;
}

/// The length of the complete request at the front of `buf`, framed as an
/// RFC 9112 upstream would: chunked if the last coding is chunked, else
/// `Content-Length`, else no body. `None`: incomplete, or never framable.
fn message_len(buf: &[u8]) -> Option<usize> {
    let head_len = find(buf, b"\r\n\r\n")? + 4;
    let lines = split_crlf(&buf[..head_len - 4]);
    let fields: Vec<(&[u8], &[u8])> = lines[1..].iter().map(|l| field_of(l)).collect();
    let value = |name: &[u8]| {
        fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
    };
    if let Some(te) = value(b"transfer-encoding").last() {
        let last = te.split(|&b| b == b',').next_back().unwrap_or_default();
        if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return None;
        }
        return match decode_chunked(&buf[head_len..]) {
            Chunked::Done { len, .. } => Some(head_len + len),
            _ => None,
        };
    }
    let length = match value(b"content-length").first() {
        Some(v) => std::str::from_utf8(v).ok()?.parse::<usize>().ok()?,
        None => 0,
    };
    (buf.len() >= head_len + length).then_some(head_len + length)
}

enum Chunked {
    Partial,
    Bad,
    Done { body: Vec<u8>, len: usize },
}

/// Decodes a chunked body at the front of `buf` (trailers skipped).
fn decode_chunked(buf: &[u8]) -> Chunked {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let Some(line_len) = find(&buf[at..], b"\r\n") else {
            return Chunked::Partial;
        };
        let line = &buf[at..at + line_len];
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let Some(size) = std::str::from_utf8(size)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok())
        else {
            return Chunked::Bad;
        };
        at += line_len + 2;
        if size == 0 {
            // Trailer fields, up to an empty line.
            loop {
                let Some(len) = find(&buf[at..], b"\r\n") else {
                    return Chunked::Partial;
                };
                at += len + 2;
                if len == 0 {
                    return Chunked::Done { body, len: at };
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Chunked::Partial;
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Chunked::Bad;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

// === bytes ===

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(i) = find(rest, from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn split_crlf(bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut rest = bytes;
    while let Some(i) = find(rest, b"\r\n") {
        lines.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    lines.push(rest);
    lines
}

/// A field line's name (up to the first colon) and its value, OWS trimmed.
fn field_of(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b':') {
        Some(i) => (
            &line[..i],
            line[i + 1..].trim_ascii_start().trim_ascii_end(),
        ),
        None => (line, b""),
    }
}

fn name_of(line: &[u8]) -> &[u8] {
    field_of(line).0
}

fn is_framing_field(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding")
}

/// The first message head in `bytes` (everything, if there is none).
fn head_of(bytes: &[u8]) -> &[u8] {
    find(bytes, b"\r\n\r\n").map_or(bytes, |i| &bytes[..i + 4])
}

/// `head` with every field name lowercased.
fn lowercase_names(head: &[u8]) -> Vec<u8> {
    let lines = split_crlf(head);
    let mut out = Vec::with_capacity(head.len());
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
            let name_len = name_of(line).len();
            out.extend(line[..name_len].to_ascii_lowercase());
            out.extend_from_slice(&line[name_len..]);
        } else {
            out.extend_from_slice(line);
        }
    }
    out
}

/// A canonical form of a stream of requests, for comparing what an upstream
/// received with what it should have: in each head, names lowercased and
/// field lines stably sorted by name (RFC 9110 §5.1: names are
/// case-insensitive; §5.3: only the order of lines with the same name is
/// significant). Request lines, values and bodies are kept byte for byte,
/// and so is anything that is not a complete request.
fn canonical(stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len());
    let mut rest = stream;
    while let Some(len) = message_len(rest) {
        let head = lowercase_names(head_of(&rest[..len]));
        let lines = split_crlf(&head[..head.len() - 4]);
        let mut fields = lines[1..].to_vec();
        fields.sort_by_key(|line| name_of(line).to_vec());
        out.extend_from_slice(lines[0]);
        for field in fields {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(field);
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&rest[head_of(rest).len()..len]);
        rest = &rest[len..];
    }
    out.extend_from_slice(rest);
    out
}

/// `stream` without `content-length` and `transfer-encoding` field lines.
fn without_framing_fields(stream: &[u8]) -> Vec<u8> {
    let head = head_of(stream);
    let mut out: Vec<u8> = split_crlf(head)
        .into_iter()
        .filter(|line| !is_framing_field(name_of(line)))
        .collect::<Vec<_>>()
        .join(&b"\r\n"[..]);
    out.extend_from_slice(&stream[head.len()..]);
    out
}

/// Bytes as printable ASCII with escapes (`\r\n` stays visible).
fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
