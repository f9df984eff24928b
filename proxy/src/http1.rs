//! serin's one HTTP/1.1 codec, used by both directions: the own server loop
//! ([`crate::server::own_h1`]) and the upstream client ([`crate::upstream`]).
//!
//! As pingora keeps one HTTP/1 codec for its server and its client, message
//! syntax, body framing and the chunked coding exist once, here:
//! - [`head`]: parsing request and response heads in place (httparse), and
//!   writing status and request lines;
//! - [`framing`]: how a message's body is delimited (RFC 9112 §6.3);
//! - [`chunked`]: the chunked coding, both ways, trailers included.
//!
//! Which fields a message carries is not decided here but in
//! [`crate::policy`]; this module only moves them to and from the wire.

pub(crate) mod chunked;
pub(crate) mod framing;
pub(crate) mod head;
