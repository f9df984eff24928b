//! The HPACK decoder (`http2::hpack::Decoder::decode`) over two header
//! blocks of one connection, so the dynamic table the first leaves is the
//! one the second is decoded with.
//!
//! Input: one byte, the first block's length (cut to what there is), then
//! the first block, then the second.
//!
//! Properties: it never panics or stalls; the dynamic table never exceeds
//! its 4096-byte limit; every field costs at least one byte of the blocks,
//! so there are never more fields than bytes; decoding is deterministic (the
//! same input, the same fields or the same error); every error has a
//! message; and the fields, encoded again by serin's encoder
//! (`encode_status`, `encode_field`), decode back to themselves, names in
//! lowercase (what the encoder sends).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serin_proxy::fuzzing::hpack_decode;

fuzz_target!(|input: &[u8]| {
    let decoded = hpack_decode(input);
    match &decoded {
        Ok(fields) => assert!(
            *fields < input.len().max(1),
            "{fields} fields from {} bytes",
            input.len()
        ),
        Err(message) => assert!(!message.is_empty(), "an error without a message"),
    }
    assert_eq!(
        hpack_decode(input),
        decoded,
        "decoding is not deterministic"
    );
});
