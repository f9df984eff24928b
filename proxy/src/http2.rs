//! serin's HTTP/2 codec (RFC 9113), for its own HTTP/2 server loop
//! ([`crate::server::own_h2`]):
//! - [`frame`]: the frame layer: headers and payloads read and validated,
//!   frames written;
//! - [`hpack`]: header compression (RFC 7541): a decoder with its dynamic
//!   table, and an encoder that never indexes.
//!
//! As with [`crate::http1`], which fields a message carries is decided in
//! [`crate::policy`]; this module only moves them to and from the wire.

pub(crate) mod frame;
pub(crate) mod hpack;
