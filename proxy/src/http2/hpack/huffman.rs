//! Huffman decoding of HPACK string literals (RFC 7541 §5.2, Appendix B).
//!
//! The code is read four bits at a time. A state is an internal node of the
//! code tree (a canonical Huffman code over 257 symbols has 256 of them; the
//! root is state 0), and [`TABLE`] gives, for each state and nibble, the
//! next state and the symbol completed on the way, if any: the shortest code
//! is 5 bits long, so a nibble completes at most one. The table is built at
//! compile time from [`CODES`] by a `const fn`, so there is no generated
//! source to keep in step.

use super::DecodeError;

/// Each symbol's code, bits right-aligned, and its length in bits: bytes 0
/// to 255, then EOS (256), as listed in RFC 7541 Appendix B.
pub(super) const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28), // 0x00, 0x01, 0x02, 0x03
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28), // 0x04, 0x05, 0x06, 0x07
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28), // 0x08, 0x09, 0x0a, 0x0b
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28), // 0x0c, 0x0d, 0x0e, 0x0f
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28), // 0x10, 0x11, 0x12, 0x13
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28), // 0x14, 0x15, 0x16, 0x17
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28), // 0x18, 0x19, 0x1a, 0x1b
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28), // 0x1c, 0x1d, 0x1e, 0x1f
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12), // 0x20, '!', '"', '#'
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11), // '$', '%', '&', "'"
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11), // '(', ')', '*', '+'
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6), // ',', '-', '.', '/'
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6), // '0', '1', '2', '3'
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6), // '4', '5', '6', '7'
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8), // '8', '9', ':', ';'
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10), // '<', '=', '>', '?'
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7), // '@', 'A', 'B', 'C'
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7), // 'D', 'E', 'F', 'G'
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7), // 'H', 'I', 'J', 'K'
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7), // 'L', 'M', 'N', 'O'
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7), // 'P', 'Q', 'R', 'S'
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7), // 'T', 'U', 'V', 'W'
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13), // 'X', 'Y', 'Z', '['
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6), // '\\', ']', '^', '_'
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5), // '`', 'a', 'b', 'c'
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6), // 'd', 'e', 'f', 'g'
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7), // 'h', 'i', 'j', 'k'
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5), // 'l', 'm', 'n', 'o'
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5), // 'p', 'q', 'r', 's'
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7), // 't', 'u', 'v', 'w'
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15), // 'x', 'y', 'z', '{'
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28), // '|', '}', '~', 0x7f
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20), // 0x80, 0x81, 0x82, 0x83
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23), // 0x84, 0x85, 0x86, 0x87
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23), // 0x88, 0x89, 0x8a, 0x8b
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23), // 0x8c, 0x8d, 0x8e, 0x8f
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23), // 0x90, 0x91, 0x92, 0x93
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23), // 0x94, 0x95, 0x96, 0x97
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23), // 0x98, 0x99, 0x9a, 0x9b
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24), // 0x9c, 0x9d, 0x9e, 0x9f
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22), // 0xa0, 0xa1, 0xa2, 0xa3
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21), // 0xa4, 0xa5, 0xa6, 0xa7
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24), // 0xa8, 0xa9, 0xaa, 0xab
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23), // 0xac, 0xad, 0xae, 0xaf
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21), // 0xb0, 0xb1, 0xb2, 0xb3
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23), // 0xb4, 0xb5, 0xb6, 0xb7
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22), // 0xb8, 0xb9, 0xba, 0xbb
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23), // 0xbc, 0xbd, 0xbe, 0xbf
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19), // 0xc0, 0xc1, 0xc2, 0xc3
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25), // 0xc4, 0xc5, 0xc6, 0xc7
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27), // 0xc8, 0xc9, 0xca, 0xcb
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25), // 0xcc, 0xcd, 0xce, 0xcf
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27), // 0xd0, 0xd1, 0xd2, 0xd3
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24), // 0xd4, 0xd5, 0xd6, 0xd7
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26), // 0xd8, 0xd9, 0xda, 0xdb
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27), // 0xdc, 0xdd, 0xde, 0xdf
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21), // 0xe0, 0xe1, 0xe2, 0xe3
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23), // 0xe4, 0xe5, 0xe6, 0xe7
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25), // 0xe8, 0xe9, 0xea, 0xeb
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23), // 0xec, 0xed, 0xee, 0xef
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26), // 0xf0, 0xf1, 0xf2, 0xf3
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27), // 0xf4, 0xf5, 0xf6, 0xf7
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27), // 0xf8, 0xf9, 0xfa, 0xfb
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),  // 0xfc, 0xfd, 0xfe, 0xff
    (0x3fffffff, 30), // EOS
];

/// The symbol that ends a code stream; never valid inside a string (§5.2).
const EOS: usize = 256;
/// The number of internal nodes of the code tree, hence of decoder states.
const STATES: usize = 256;

/// A move of the decoder on one nibble.
#[derive(Clone, Copy)]
struct Transition {
    /// The state after the nibble.
    next: u8,
    /// The symbol completed by the nibble, when `flags` has [`EMIT`].
    symbol: u8,
    /// [`EMIT`], [`FAIL`] or neither.
    flags: u8,
}

/// The nibble completed a symbol's code.
const EMIT: u8 = 1;
/// The nibble completed the EOS code.
const FAIL: u8 = 2;

/// The decoder's state machine.
struct Table {
    /// Indexed by state, then nibble.
    transitions: [[Transition; 16]; STATES],
    /// The states a string may end in: the root, and the nodes reached from
    /// it by 1 to 7 one bits (padding is a prefix of EOS, at most 7 bits).
    accepting: [bool; STATES],
}

/// The decoder's state machine, built at compile time.
static TABLE: Table = build_table();

/// Builds the code tree from [`CODES`], then walks it from every internal
/// node with every nibble. Any inconsistency in [`CODES`] (a code that is a
/// prefix of another, a tree that is not complete) fails the build.
const fn build_table() -> Table {
    /// Marks a child that is a leaf; the other bits are its symbol.
    const LEAF: u16 = 0x8000;
    // The children of each internal node; 0 is "none yet" (the root is
    // nobody's child).
    let mut children = [[0u16; 2]; STATES];
    let mut nodes = 1;
    let mut symbol = 0;
    while symbol < CODES.len() {
        let (code, len) = CODES[symbol];
        let mut node = 0;
        let mut bit = len;
        while bit > 1 {
            bit -= 1;
            let side = ((code >> bit) & 1) as usize;
            if children[node][side] == 0 {
                assert!(nodes < STATES, "too many internal nodes");
                children[node][side] = nodes as u16;
                nodes += 1;
            }
            assert!(
                children[node][side] & LEAF == 0,
                "a code is a prefix of another"
            );
            node = children[node][side] as usize;
        }
        let side = (code & 1) as usize;
        assert!(children[node][side] == 0, "a code is a prefix of another");
        children[node][side] = LEAF | symbol as u16;
        symbol += 1;
    }
    assert!(nodes == STATES, "the code is not complete");

    let empty = Transition {
        next: 0,
        symbol: 0,
        flags: 0,
    };
    let mut transitions = [[empty; 16]; STATES];
    let mut state = 0;
    while state < STATES {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut transition = empty;
            let mut bit = 4;
            while bit > 0 {
                bit -= 1;
                let child = children[node][(nibble >> bit) & 1];
                if child & LEAF == 0 {
                    node = child as usize;
                } else if (child & !LEAF) as usize == EOS {
                    transition.flags = FAIL;
                    node = 0;
                    break;
                } else {
                    assert!(transition.flags == 0, "two symbols in a nibble");
                    transition.flags = EMIT;
                    transition.symbol = child as u8;
                    node = 0;
                }
            }
            transition.next = node as u8;
            transitions[state][nibble] = transition;
            nibble += 1;
        }
        state += 1;
    }

    let mut accepting = [false; STATES];
    accepting[0] = true;
    let mut node = 0;
    let mut ones = 0;
    while ones < 7 {
        node = children[node][1] as usize;
        assert!(node & LEAF as usize == 0, "EOS is not all ones");
        accepting[node] = true;
        ones += 1;
    }
    Table {
        transitions,
        accepting,
    }
}

/// Appends the Huffman decoding of `encoded` to `out`. Rejects an explicit
/// EOS, padding longer than 7 bits and padding that is not all ones
/// (RFC 7541 §5.2).
pub(super) fn decode(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    // Each nibble's symbol is written whether the nibble completes one or
    // not, and counted only if it does: no branch to mispredict on the
    // irregular rhythm of codes. A nibble completes at most one symbol.
    let start = out.len();
    out.resize(start + 2 * encoded.len(), 0);
    let decoded = &mut out[start..];
    let mut len = 0;
    let mut state = 0;
    let mut flags = 0;
    for &byte in encoded {
        for nibble in [byte >> 4, byte & 0x0f] {
            let transition = TABLE.transitions[usize::from(state)][usize::from(nibble)];
            decoded[len] = transition.symbol;
            len += usize::from(transition.flags & EMIT);
            flags |= transition.flags;
            state = transition.next;
        }
    }
    out.truncate(start + len);
    if flags & FAIL == 0 && TABLE.accepting[usize::from(state)] {
        Ok(())
    } else {
        Err(DecodeError::BadHuffman)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Huffman-codes `data`, padding with the most significant bits of EOS.
    pub(in crate::http2::hpack) fn encode(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut bits: u64 = 0;
        let mut pending = 0;
        for &byte in data {
            let (code, len) = CODES[usize::from(byte)];
            bits = (bits << len) | u64::from(code);
            pending += u32::from(len);
            while pending >= 8 {
                pending -= 8;
                out.push((bits >> pending) as u8);
            }
        }
        if pending > 0 {
            out.push(((bits << (8 - pending)) as u8) | (0xff >> pending));
        }
        out
    }

    fn decoded(encoded: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        decode(encoded, &mut out).map(|()| out)
    }

    #[test]
    fn every_byte_round_trips_alone_and_together() {
        for byte in 0..=255u8 {
            assert_eq!(decoded(&encode(&[byte])), Ok(vec![byte]), "byte {byte}");
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encode(&all)), Ok(all));
        assert_eq!(decoded(&[]), Ok(Vec::new()));
    }

    #[test]
    fn pseudo_random_strings_round_trip() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..500 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            // Mostly text, with bytes of every code length.
            let data: Vec<u8> = (0..len)
                .map(|i| {
                    let r = (state >> (i % 56)) as u8;
                    if i % 5 == 0 {
                        r
                    } else {
                        b' ' + r % 95
                    }
                })
                .collect();
            assert_eq!(decoded(&encode(&data)), Ok(data));
        }
    }

    #[test]
    fn padding_up_to_seven_ones_is_accepted() {
        // '0' is 00000, 'a' 00011, ' ' 010100, ':' 1011100: each padded with ones.
        assert_eq!(decoded(&[0b0000_0111]), Ok(b"0".to_vec()));
        assert_eq!(decoded(&[0b0001_1111]), Ok(b"a".to_vec()));
        assert_eq!(decoded(&[0b0101_0011]), Ok(b" ".to_vec()));
        assert_eq!(decoded(&[0b1011_1001]), Ok(b":".to_vec()));
        // Two 5-bit codes, then 6 ones; a 13-bit code (0x00), then 3 ones.
        assert_eq!(decoded(&[0b0000_0000, 0b0011_1111]), Ok(b"00".to_vec()));
        assert_eq!(decoded(&[0xff, 0b1100_0111]), Ok(vec![0]));
        // 'a' (00011), '0' (00000), ':' (1011100), then 7 ones.
        assert_eq!(decoded(&[0x18, 0x2e, 0x7f]), Ok(b"a0:".to_vec()));
    }

    #[test]
    fn bad_padding_and_eos_are_rejected() {
        // 8 ones: padding longer than 7 bits.
        assert_eq!(decoded(&[0xff]), Err(DecodeError::BadHuffman));
        // 'a' then 11 ones; ':' and 'a', then 12 ones.
        assert_eq!(decoded(&[0x1f, 0xff]), Err(DecodeError::BadHuffman));
        assert_eq!(decoded(&[0xb8, 0x3f, 0xff]), Err(DecodeError::BadHuffman));
        // Padding with zeros, or mixed: 'a' then 000 or 101.
        assert_eq!(decoded(&[0b0001_1000]), Err(DecodeError::BadHuffman));
        assert_eq!(decoded(&[0b0001_1101]), Err(DecodeError::BadHuffman));
        // The 13-bit code of 0x00, then 000.
        assert_eq!(decoded(&[0xff, 0b1100_0000]), Err(DecodeError::BadHuffman));
        // An explicit EOS (30 ones), then 2 ones of padding.
        assert_eq!(decoded(&[0xff; 4]), Err(DecodeError::BadHuffman));
        // '0' (00000), then 35 ones: EOS and 5 ones.
        assert_eq!(
            decoded(&[0x07, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::BadHuffman)
        );
    }
}
