//! HPACK, HTTP/2's header compression (RFC 7541), for serin's own HTTP/2
//! server loop: the `h2` crate has one, but keeps it private.
//!
//! - The decoder is complete: the static and dynamic tables, Huffman-coded
//!   strings and dynamic table size updates. One [`Decoder`] per connection
//!   reads every header block the client sends, in order.
//! - The encoder ([`encode_status`], [`encode_field`]) never adds to the
//!   client's dynamic table and never Huffman-codes: a field is an index into
//!   the static table, or a literal without indexing (with the static table's
//!   index for its name when it has one). That costs bytes on the wire but
//!   the least CPU, and the encoder keeps no state that could get out of step
//!   with the client's decoder, so responses can be encoded in any order.
//!
//! Neither side validates names or values: what a field may hold is the
//! caller's to check (RFC 9113 §8.2), after decoding, before encoding.

mod huffman;

use std::collections::VecDeque;

/// What each entry adds to a table's size besides its name and value
/// (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The most bytes an integer may take after its prefix: 4 of them carry 28
/// bits, more than any length or index a header block can hold.
const MAX_INTEGER_CONTINUATIONS: u32 = 4;

/// The static table (RFC 7541 Appendix A); index `i` is at `i - 1`.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Why a header block could not be decoded: each is a connection error of
/// type COMPRESSION_ERROR (RFC 9113 §4.3), since the dynamic table can no
/// longer be trusted to match the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The block ended inside a field representation.
    #[error("truncated header block")]
    Truncated,
    /// An integer took more than 4 bytes after its prefix.
    #[error("integer too large")]
    IntegerOverflow,
    /// An index of 0, or past the end of the dynamic table.
    #[error("invalid table index")]
    BadIndex,
    /// A Huffman-coded string held EOS, or padding that is longer than 7
    /// bits or not all ones.
    #[error("invalid huffman code")]
    BadHuffman,
    /// A dynamic table size update above the size this side advertised.
    #[error("table size update above the limit")]
    SizeUpdateTooLarge,
    /// A dynamic table size update after a field of the block.
    #[error("table size update after a field")]
    SizeUpdateNotFirst,
}

/// Decodes header blocks from one peer; one per connection.
pub(crate) struct Decoder {
    /// The dynamic table (the static one is [`STATIC_TABLE`]).
    table: DynamicTable,
    /// Where a Huffman-coded name is decoded, reused from field to field.
    name_scratch: Vec<u8>,
    /// Where a Huffman-coded value is decoded, reused from field to field.
    value_scratch: Vec<u8>,
}

impl Decoder {
    /// `max_table_size`: the SETTINGS_HEADER_TABLE_SIZE this side advertised
    /// (serin keeps the default, 4096). The table starts at that size, and
    /// the peer may shrink it (and grow it back) with size updates.
    pub(crate) fn new(max_table_size: usize) -> Self {
        Decoder {
            table: DynamicTable::new(max_table_size),
            name_scratch: Vec::new(),
            value_scratch: Vec::new(),
        }
    }

    /// The dynamic table's size (RFC 7541 §4.1): at most the
    /// `max_table_size` the decoder was made with.
    pub(crate) fn table_size(&self) -> usize {
        self.table.size
    }

    /// Decodes one whole header block (a HEADERS frame's fragment and its
    /// CONTINUATIONs, concatenated), calling `field(name, value)` for each
    /// field in order, with the bytes as sent (after Huffman decoding; no
    /// validation of names or values: that is the caller's, and a malformed
    /// field is a stream error, not a compression error, so the decoder goes
    /// on to keep its table in step).
    ///
    /// On an error, fields before it have been reported and the table may
    /// hold some of them: the connection must end (RFC 9113 §4.3).
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let mut rest = block;
        // Size updates are allowed before the first field only (§4.2).
        let mut fields_started = false;
        while let Some(&first) = rest.first() {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = decode_integer(&mut rest, 7)?;
                let (name, value) = self.table.field(index)?;
                field(name, value);
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing (§6.2.1): name and value
                // are copied into the new entry's buffer before anything is
                // evicted, since the name may be an entry's that goes (§4.4).
                let mut entry = self.table.take_spare();
                let index = decode_integer(&mut rest, 6)?;
                let name = match index {
                    0 => read_string(&mut rest, &mut self.name_scratch)?,
                    _ => self.table.field(index)?.0,
                };
                entry.extend_from_slice(name);
                let name_len = name.len();
                entry.extend_from_slice(read_string(&mut rest, &mut self.value_scratch)?);
                field(&entry[..name_len], &entry[name_len..]);
                self.table.insert(entry, name_len);
            } else if first & 0x20 != 0 {
                // Dynamic table size update (§6.3).
                if fields_started {
                    return Err(DecodeError::SizeUpdateNotFirst);
                }
                let size = decode_integer(&mut rest, 5)?;
                self.table.set_capacity(size)?;
                continue;
            } else {
                // Literal without indexing (§6.2.2, 0000) or never indexed
                // (§6.2.3, 0001): the same to a decoder.
                let index = decode_integer(&mut rest, 4)?;
                let name = match index {
                    0 => read_string(&mut rest, &mut self.name_scratch)?,
                    _ => self.table.field(index)?.0,
                };
                let value = read_string(&mut rest, &mut self.value_scratch)?;
                field(name, value);
            }
            fields_started = true;
        }
        Ok(())
    }
}

/// The dynamic table (RFC 7541 §2.3.2), and the index space it shares with
/// the static table (§2.3.3).
struct DynamicTable {
    /// Newest first: dynamic index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    /// The sum of the entries' sizes (§4.1).
    size: usize,
    /// The size the entries may take, as the peer last set it (§4.2).
    capacity: usize,
    /// The highest capacity the peer may set: this side's setting.
    max_capacity: usize,
    /// An evicted entry's buffer, for the next insertion to reuse.
    spare: Vec<u8>,
}

/// A dynamic table entry: its name then its value, in one buffer.
struct Entry {
    field: Vec<u8>,
    name_len: usize,
}

impl Entry {
    /// The entry's size (§4.1).
    fn size(&self) -> usize {
        self.field.len() + ENTRY_OVERHEAD
    }
}

impl DynamicTable {
    fn new(max_capacity: usize) -> Self {
        DynamicTable {
            entries: VecDeque::new(),
            size: 0,
            capacity: max_capacity,
            max_capacity,
            spare: Vec::new(),
        }
    }

    /// The field at `index` in the static then dynamic table (§2.3.3).
    fn field(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        if let Some(&(name, value)) = index.checked_sub(1).and_then(|i| STATIC_TABLE.get(i)) {
            return Ok((name, value));
        }
        let entry = index
            .checked_sub(STATIC_TABLE.len() + 1)
            .and_then(|i| self.entries.get(i))
            .ok_or(DecodeError::BadIndex)?;
        let (name, value) = entry.field.split_at(entry.name_len);
        Ok((name, value))
    }

    /// An empty buffer for a new entry.
    fn take_spare(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf
    }

    /// Adds a field (its name is `field[..name_len]`) as the newest entry,
    /// evicting the oldest ones to make room; an entry larger than the
    /// table empties it and is not added (§4.4).
    fn insert(&mut self, field: Vec<u8>, name_len: usize) {
        let entry = Entry { field, name_len };
        let size = entry.size();
        if size > self.capacity {
            self.evict_to(0);
            self.keep_spare(entry.field);
            return;
        }
        self.evict_to(self.capacity - size);
        self.entries.push_front(entry);
        self.size += size;
    }

    /// Applies a dynamic table size update (§6.3).
    fn set_capacity(&mut self, capacity: usize) -> Result<(), DecodeError> {
        if capacity > self.max_capacity {
            return Err(DecodeError::SizeUpdateTooLarge);
        }
        self.capacity = capacity;
        self.evict_to(capacity);
        Ok(())
    }

    /// Evicts the oldest entries until the size is at most `size`.
    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let oldest = self
                .entries
                .pop_back()
                .expect("the table's size is its entries' sum");
            self.size -= oldest.size();
            self.keep_spare(oldest.field);
        }
    }

    /// Keeps `buf` for a later entry if it is larger than the spare buffer
    /// and no larger than the table.
    fn keep_spare(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.spare.capacity() && buf.capacity() <= self.max_capacity {
            self.spare = buf;
        }
    }
}

/// Reads an integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1) at the
/// front of `rest`; the bits above the prefix are the caller's.
fn decode_integer(rest: &mut &[u8], prefix_bits: u8) -> Result<usize, DecodeError> {
    let (&first, mut tail) = rest.split_first().ok_or(DecodeError::Truncated)?;
    let max_prefix = (1usize << prefix_bits) - 1;
    let mut value = usize::from(first) & max_prefix;
    if value == max_prefix {
        let mut shift = 0;
        loop {
            let (&byte, after) = tail.split_first().ok_or(DecodeError::Truncated)?;
            tail = after;
            if shift == 7 * MAX_INTEGER_CONTINUATIONS {
                return Err(DecodeError::IntegerOverflow);
            }
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *rest = tail;
    Ok(value)
}

/// Reads a string literal (RFC 7541 §5.2) at the front of `rest`: a slice
/// of the block, or of `scratch` when Huffman-coded.
fn read_string<'s, 'b: 's>(
    rest: &mut &'b [u8],
    scratch: &'s mut Vec<u8>,
) -> Result<&'s [u8], DecodeError> {
    let huffman = rest.first().is_some_and(|&first| first & 0x80 != 0);
    let len = decode_integer(rest, 7)?;
    if len > rest.len() {
        return Err(DecodeError::Truncated);
    }
    let (string, tail) = rest.split_at(len);
    *rest = tail;
    if !huffman {
        return Ok(string);
    }
    scratch.clear();
    huffman::decode(string, scratch)?;
    Ok(scratch)
}

/// Appends the `:status` field of a response head (indexed from the static
/// table for 200, 204, 206, 304, 400, 404, 500; otherwise a literal without
/// indexing with the static name index 8). `status` has three digits, as
/// `http::StatusCode` guarantees.
pub(crate) fn encode_status(status: u16, out: &mut Vec<u8>) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            debug_assert!((100..1000).contains(&status), "status {status}");
            let digit = |n: u16| b'0' + (n % 10) as u8;
            out.extend_from_slice(&[
                0x08,
                3,
                digit(status / 100),
                digit(status / 10),
                digit(status),
            ]);
            return;
        }
    };
    out.push(0x80 | index);
}

/// Appends a dynamic table size update to 0 (RFC 7541 §6.3): what the
/// first header block after the peer lowered SETTINGS_HEADER_TABLE_SIZE
/// must start with (§4.2). 0 always fits, and this encoder never indexes.
pub(crate) fn encode_table_size_update_to_zero(out: &mut Vec<u8>) {
    out.push(0x20);
}

/// Appends one field as a literal without indexing (RFC 7541 §6.2.2), or,
/// when `sensitive`, as a literal never indexed (§6.2.3: no intermediary
/// down the line may index it either), with the static table's name index
/// when the name is one of its names, a literal name otherwise. The name is
/// sent in lowercase, as HTTP/2 requires (RFC 9113 §8.2.1), whatever its
/// case in an HTTP/1.1 upstream's response. No Huffman.
pub(crate) fn encode_field(name: &[u8], value: &[u8], sensitive: bool, out: &mut Vec<u8>) {
    let first = out.len();
    let uppercase = name.iter().any(u8::is_ascii_uppercase);
    let index = if !uppercase {
        static_name_index(name)
    } else if name.len() <= LONGEST_STATIC_NAME {
        let mut lower = [0; LONGEST_STATIC_NAME];
        let lower = &mut lower[..name.len()];
        lower.copy_from_slice(name);
        lower.make_ascii_lowercase();
        static_name_index(lower)
    } else {
        None
    };
    match index {
        Some(index) => encode_integer(usize::from(index), 4, out),
        None => {
            out.push(0x00);
            encode_integer(name.len(), 7, out);
            // After the length: a length byte may look like a letter.
            let at = out.len();
            out.extend_from_slice(name);
            out[at..].make_ascii_lowercase();
        }
    }
    if sensitive {
        out[first] |= NEVER_INDEXED;
    }
    encode_string(value, out);
}

/// The pattern of a literal never indexed, above its 4-bit name index.
const NEVER_INDEXED: u8 = 0x10;

/// Appends a string literal without Huffman coding (§5.2).
fn encode_string(string: &[u8], out: &mut Vec<u8>) {
    encode_integer(string.len(), 7, out);
    out.extend_from_slice(string);
}

/// Appends `value` as an integer with a `prefix_bits`-bit prefix (§5.1), the
/// bits above the prefix 0 (what every representation the encoder writes
/// has there).
fn encode_integer(value: usize, prefix_bits: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(value as u8);
        return;
    }
    out.push(max_prefix as u8);
    let mut rest = value - max_prefix;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The length of the static table's longest name
/// (`access-control-allow-origin`).
const LONGEST_STATIC_NAME: usize = 27;

/// The lowest static table index with this name, if any.
fn static_name_index(name: &[u8]) -> Option<u8> {
    let index = match name.len() {
        3 => match name {
            b"age" => 21,
            b"via" => 60,
            _ => return None,
        },
        4 => match name {
            b"date" => 33,
            b"etag" => 34,
            b"from" => 37,
            b"host" => 38,
            b"link" => 45,
            b"vary" => 59,
            _ => return None,
        },
        5 => match name {
            b":path" => 4,
            b"allow" => 22,
            b"range" => 50,
            _ => return None,
        },
        6 => match name {
            b"accept" => 19,
            b"cookie" => 32,
            b"expect" => 35,
            b"server" => 54,
            _ => return None,
        },
        7 => match name {
            b":method" => 2,
            b":scheme" => 6,
            b":status" => 8,
            b"expires" => 36,
            b"referer" => 51,
            b"refresh" => 52,
            _ => return None,
        },
        8 => match name {
            b"if-match" => 39,
            b"if-range" => 42,
            b"location" => 46,
            _ => return None,
        },
        10 => match name {
            b":authority" => 1,
            b"set-cookie" => 55,
            b"user-agent" => 58,
            _ => return None,
        },
        11 => match name {
            b"retry-after" => 53,
            _ => return None,
        },
        12 => match name {
            b"content-type" => 31,
            b"max-forwards" => 47,
            _ => return None,
        },
        13 => match name {
            b"accept-ranges" => 18,
            b"authorization" => 23,
            b"cache-control" => 24,
            b"content-range" => 30,
            b"if-none-match" => 41,
            b"last-modified" => 44,
            _ => return None,
        },
        14 => match name {
            b"accept-charset" => 15,
            b"content-length" => 28,
            _ => return None,
        },
        15 => match name {
            b"accept-encoding" => 16,
            b"accept-language" => 17,
            _ => return None,
        },
        16 => match name {
            b"content-encoding" => 26,
            b"content-language" => 27,
            b"content-location" => 29,
            b"www-authenticate" => 61,
            _ => return None,
        },
        17 => match name {
            b"if-modified-since" => 40,
            b"transfer-encoding" => 57,
            _ => return None,
        },
        18 => match name {
            b"proxy-authenticate" => 48,
            _ => return None,
        },
        19 => match name {
            b"content-disposition" => 25,
            b"if-unmodified-since" => 43,
            b"proxy-authorization" => 49,
            _ => return None,
        },
        25 => match name {
            b"strict-transport-security" => 56,
            _ => return None,
        },
        27 => match name {
            b"access-control-allow-origin" => 20,
            _ => return None,
        },
        _ => return None,
    };
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded or expected field.
    type Field = (Vec<u8>, Vec<u8>);

    /// Bytes from a hex dump as RFC 7541 prints it.
    fn hex(dump: &str) -> Vec<u8> {
        let digits: Vec<u8> = dump.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<Field>, DecodeError> {
        let mut decoded = Vec::new();
        decoder
            .decode(block, |name, value| {
                decoded.push((name.to_vec(), value.to_vec()))
            })
            .map(|()| decoded)
    }

    /// The dynamic table's entries, newest first.
    fn entries(decoder: &Decoder) -> Vec<Field> {
        decoder
            .table
            .entries
            .iter()
            .map(|e| {
                let (name, value) = e.field.split_at(e.name_len);
                (name.to_vec(), value.to_vec())
            })
            .collect()
    }

    /// One header block of Appendix C and the state it leaves.
    struct Example {
        section: &'static str,
        block: &'static str,
        fields: &'static [(&'static str, &'static str)],
        /// The dynamic table after the block, newest first.
        table: &'static [(&'static str, &'static str)],
        table_size: usize,
    }

    /// Decodes the examples in order with one decoder.
    fn run(max_table_size: usize, examples: &[Example]) {
        let mut decoder = Decoder::new(max_table_size);
        for example in examples {
            let decoded = decode(&mut decoder, &hex(example.block));
            assert_eq!(decoded, Ok(fields(example.fields)), "{}", example.section);
            assert_eq!(
                entries(&decoder),
                fields(example.table),
                "{}",
                example.section
            );
            assert_eq!(
                decoder.table_size(),
                example.table_size,
                "{}",
                example.section
            );
        }
    }

    #[test]
    fn appendix_c_2_field_representations() {
        run(
            4096,
            &[Example {
                section: "C.2.1 literal with indexing",
                block: "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
                fields: &[("custom-key", "custom-header")],
                table: &[("custom-key", "custom-header")],
                table_size: 55,
            }],
        );
        run(
            4096,
            &[Example {
                section: "C.2.2 literal without indexing",
                block: "040c 2f73 616d 706c 652f 7061 7468",
                fields: &[(":path", "/sample/path")],
                table: &[],
                table_size: 0,
            }],
        );
        run(
            4096,
            &[Example {
                section: "C.2.3 literal never indexed",
                block: "1008 7061 7373 776f 7264 0673 6563 7265 74",
                fields: &[("password", "secret")],
                table: &[],
                table_size: 0,
            }],
        );
        run(
            4096,
            &[Example {
                section: "C.2.4 indexed",
                block: "82",
                fields: &[(":method", "GET")],
                table: &[],
                table_size: 0,
            }],
        );
    }

    const REQUEST_1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQUEST_2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQUEST_3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const AFTER_REQUEST_1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const AFTER_REQUEST_2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const AFTER_REQUEST_3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];

    #[test]
    fn appendix_c_3_requests_without_huffman() {
        run(
            4096,
            &[
                Example {
                    section: "C.3.1",
                    block: "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    fields: REQUEST_1,
                    table: AFTER_REQUEST_1,
                    table_size: 57,
                },
                Example {
                    section: "C.3.2",
                    block: "8286 84be 5808 6e6f 2d63 6163 6865",
                    fields: REQUEST_2,
                    table: AFTER_REQUEST_2,
                    table_size: 110,
                },
                Example {
                    section: "C.3.3",
                    block: "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 \
                            0c63 7573 746f 6d2d 7661 6c75 65",
                    fields: REQUEST_3,
                    table: AFTER_REQUEST_3,
                    table_size: 164,
                },
            ],
        );
    }

    #[test]
    fn appendix_c_4_requests_with_huffman() {
        run(
            4096,
            &[
                Example {
                    section: "C.4.1",
                    block: "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                    fields: REQUEST_1,
                    table: AFTER_REQUEST_1,
                    table_size: 57,
                },
                Example {
                    section: "C.4.2",
                    block: "8286 84be 5886 a8eb 1064 9cbf",
                    fields: REQUEST_2,
                    table: AFTER_REQUEST_2,
                    table_size: 110,
                },
                Example {
                    section: "C.4.3",
                    block: "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                    fields: REQUEST_3,
                    table: AFTER_REQUEST_3,
                    table_size: 164,
                },
            ],
        );
    }

    const RESPONSE_1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const RESPONSE_2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const RESPONSE_3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", "https://www.example.com"),
        ("content-encoding", "gzip"),
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
    ];
    const AFTER_RESPONSE_1: &[(&str, &str)] = &[
        ("location", "https://www.example.com"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    const AFTER_RESPONSE_2: &[(&str, &str)] = &[
        (":status", "307"),
        ("location", "https://www.example.com"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("cache-control", "private"),
    ];
    const AFTER_RESPONSE_3: &[(&str, &str)] = &[
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
        ("content-encoding", "gzip"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ];

    #[test]
    fn appendix_c_5_responses_without_huffman_evicting() {
        run(
            256,
            &[
                Example {
                    section: "C.5.1",
                    block: "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 \
                            4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 \
                            7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    fields: RESPONSE_1,
                    table: AFTER_RESPONSE_1,
                    table_size: 222,
                },
                Example {
                    section: "C.5.2",
                    block: "4803 3330 37c1 c0bf",
                    fields: RESPONSE_2,
                    table: AFTER_RESPONSE_2,
                    table_size: 222,
                },
                Example {
                    section: "C.5.3",
                    block: "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a \
                            3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f 6f3d 4153 \
                            444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 \
                            553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
                            3d31",
                    fields: RESPONSE_3,
                    table: AFTER_RESPONSE_3,
                    table_size: 215,
                },
            ],
        );
    }

    #[test]
    fn appendix_c_6_responses_with_huffman_evicting() {
        run(
            256,
            &[
                Example {
                    section: "C.6.1",
                    block: "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 \
                            9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 \
                            e9ae 82ae 43d3",
                    fields: RESPONSE_1,
                    table: AFTER_RESPONSE_1,
                    table_size: 222,
                },
                Example {
                    section: "C.6.2",
                    block: "4883 640e ffc1 c0bf",
                    fields: RESPONSE_2,
                    table: AFTER_RESPONSE_2,
                    table_size: 222,
                },
                Example {
                    section: "C.6.3",
                    block: "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d \
                            1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b \
                            3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed \
                            4ee5 b106 3d50 07",
                    fields: RESPONSE_3,
                    table: AFTER_RESPONSE_3,
                    table_size: 215,
                },
            ],
        );
    }

    fn decode_fresh(block: &[u8]) -> Result<Vec<Field>, DecodeError> {
        decode(&mut Decoder::new(4096), block)
    }

    #[test]
    fn bad_indexes_are_rejected() {
        assert_eq!(decode_fresh(&[0x80]), Err(DecodeError::BadIndex));
        // 62 is the first dynamic index: empty here.
        assert_eq!(decode_fresh(&[0xbe]), Err(DecodeError::BadIndex));
        // The same for a name index, in each literal representation.
        assert_eq!(decode_fresh(&[0x7e, 0x00]), Err(DecodeError::BadIndex));
        assert_eq!(
            decode_fresh(&[0x0f, 0x2f, 0x00]),
            Err(DecodeError::BadIndex)
        );
        assert_eq!(
            decode_fresh(&[0x1f, 0x2f, 0x00]),
            Err(DecodeError::BadIndex)
        );
        // One entry: 62 is valid, 63 is not.
        let mut decoder = Decoder::new(4096);
        assert_eq!(
            decode(&mut decoder, &[0x41, 0x01, b'x', 0xbe]),
            Ok(fields(&[(":authority", "x"), (":authority", "x")]))
        );
        assert_eq!(decode(&mut decoder, &[0xbf]), Err(DecodeError::BadIndex));
        assert_eq!(
            decode_fresh(&[0xbd]),
            Ok(fields(&[("www-authenticate", "")]))
        );
    }

    #[test]
    fn truncated_blocks_are_rejected() {
        for block in [
            &[0xff][..],                     // indexed, integer cut after its prefix
            &[0xff, 0x80],                   // ... and after a continuation byte
            &[0x04],                         // literal, value missing
            &[0x04, 0x85, 0x00],             // value shorter than its length
            &[0x04, 0x03, b'a', b'b'],       // ...
            &[0x00, 0x03, b'a', b'b'],       // name shorter than its length
            &[0x00, 0x01, b'a'],             // value missing after a literal name
            &[0x40, 0x7f],                   // name length cut
            &[0x82, 0x40, 0x01, b'a', 0x7f], // after whole fields
        ] {
            assert_eq!(
                decode_fresh(block),
                Err(DecodeError::Truncated),
                "{block:x?}"
            );
        }
    }

    #[test]
    fn integers_are_bounded() {
        // 4 bytes after the prefix: 127 + 2^21, a bad index but a valid integer.
        assert_eq!(
            decode_fresh(&[0xff, 0x80, 0x80, 0x80, 0x01]),
            Err(DecodeError::BadIndex)
        );
        // A fifth one is too many, whatever its value.
        assert_eq!(
            decode_fresh(&[0xff, 0x80, 0x80, 0x80, 0x80, 0x00]),
            Err(DecodeError::IntegerOverflow)
        );
        assert_eq!(
            decode_fresh(&[0x04, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(DecodeError::IntegerOverflow)
        );
        // A string length that fits but passes the end of the block.
        assert_eq!(
            decode_fresh(&[0x04, 0x7f, 0xff, 0xff, 0xff, 0x7f]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn bad_huffman_is_rejected_in_names_and_values() {
        // :path (4) without indexing, a Huffman value: "a" padded right.
        assert_eq!(
            decode_fresh(&[0x04, 0x81, 0x1f]),
            Ok(fields(&[(":path", "a")]))
        );
        // 'a' then 11 ones of padding; padding of zeros; an explicit EOS.
        for value in [
            &[0x82, 0x1f, 0xff][..],
            &[0x81, 0x18],
            &[0x84, 0xff, 0xff, 0xff, 0xff],
        ] {
            let mut block = vec![0x04];
            block.extend_from_slice(value);
            assert_eq!(
                decode_fresh(&block),
                Err(DecodeError::BadHuffman),
                "{value:x?}"
            );
            let mut block = vec![0x40];
            block.extend_from_slice(value);
            block.extend_from_slice(&[0x00]);
            assert_eq!(
                decode_fresh(&block),
                Err(DecodeError::BadHuffman),
                "{value:x?}"
            );
        }
    }

    #[test]
    fn size_updates_are_checked() {
        // 4096 (31 + 0x61 + 0x1f << 7) is the limit; 4097 is above it.
        assert_eq!(
            decode_fresh(&[0x3f, 0xe1, 0x1f, 0x82]),
            Ok(fields(&[(":method", "GET")]))
        );
        assert_eq!(
            decode_fresh(&[0x3f, 0xe2, 0x1f]),
            Err(DecodeError::SizeUpdateTooLarge)
        );
        assert_eq!(
            decode(&mut Decoder::new(256), &[0x3f, 0xe2, 0x01]),
            Err(DecodeError::SizeUpdateTooLarge)
        );
        // Only before the first field.
        assert_eq!(
            decode_fresh(&[0x82, 0x20]),
            Err(DecodeError::SizeUpdateNotFirst)
        );
        assert_eq!(
            decode_fresh(&[0x20, 0x82, 0x3f, 0xe1, 0x1f]),
            Err(DecodeError::SizeUpdateNotFirst)
        );
        // Several in a row are fine (§4.2: the smallest, then the final one).
        assert_eq!(
            decode_fresh(&[0x20, 0x3f, 0xe1, 0x1f, 0x20, 0x82]).map(|f| f.len()),
            Ok(1)
        );
        // A size update at the start of a later block.
        let mut decoder = Decoder::new(4096);
        assert_eq!(decode(&mut decoder, &[0x82]).map(|f| f.len()), Ok(1));
        assert_eq!(decode(&mut decoder, &[0x20]), Ok(Vec::new()));
    }

    #[test]
    fn size_updates_evict_and_bound_the_table() {
        let mut decoder = Decoder::new(4096);
        // Three entries of 32 + 10 + 1 = 43 bytes.
        let block = hex("4101 61 4101 62 4101 63");
        assert_eq!(decode(&mut decoder, &block).map(|f| f.len()), Ok(3));
        assert_eq!(decoder.table_size(), 129);
        // Down to 100: the oldest goes.
        assert_eq!(decode(&mut decoder, &[0x3f, 0x45]), Ok(Vec::new()));
        assert_eq!(
            entries(&decoder),
            fields(&[(":authority", "c"), (":authority", "b")])
        );
        assert_eq!(decoder.table_size(), 86);
        // At 100, a new entry evicts one more; then 0 empties the table.
        assert_eq!(
            decode(&mut decoder, &[0x41, 0x01, b'd']).map(|f| f.len()),
            Ok(1)
        );
        assert_eq!(
            entries(&decoder),
            fields(&[(":authority", "d"), (":authority", "c")])
        );
        assert_eq!(
            decode(&mut decoder, &[0x20, 0xbe]),
            Err(DecodeError::BadIndex)
        );
        assert_eq!(decoder.table_size(), 0);
        // Back up to the limit: entries are added again.
        assert_eq!(
            decode(&mut decoder, &[0x3f, 0xe1, 0x1f, 0x41, 0x01, b'e', 0xbe]).map(|f| f.len()),
            Ok(2)
        );
        assert_eq!(decoder.table_size(), 43);
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut decoder = Decoder::new(64);
        assert_eq!(
            decode(&mut decoder, &[0x41, 0x01, b'a']).map(|f| f.len()),
            Ok(1)
        );
        assert_eq!(decoder.table_size(), 43);
        // 10 + 23 + 32 = 65 bytes: reported, not added, and the table is empty.
        let mut block = vec![0x41, 23];
        block.extend_from_slice(&[b'v'; 23]);
        let decoded = decode(&mut decoder, &block).unwrap();
        assert_eq!(decoded, vec![(b":authority".to_vec(), vec![b'v'; 23])]);
        assert_eq!(decoder.table_size(), 0);
        assert_eq!(entries(&decoder), Vec::<Field>::new());
        // Exactly the table's size fits.
        let mut block = vec![0x41, 22];
        block.extend_from_slice(&[b'v'; 22]);
        assert_eq!(decode(&mut decoder, &block).map(|f| f.len()), Ok(1));
        assert_eq!(decoder.table_size(), 64);
    }

    #[test]
    fn a_name_from_an_entry_being_evicted_survives() {
        // One entry fits: the new one names the old one, which goes.
        let mut decoder = Decoder::new(79);
        let block = [
            0x40, 0x04, b'n', b'a', b'm', b'e', 0x05, b'v', b'a', b'l', b'u', b'e',
        ];
        assert_eq!(decode(&mut decoder, &block).map(|f| f.len()), Ok(1));
        let decoded = decode(&mut decoder, &[0x7e, 0x03, b'x', b'y', b'z', 0xbe]);
        assert_eq!(decoded, Ok(fields(&[("name", "xyz"), ("name", "xyz")])));
        assert_eq!(entries(&decoder), fields(&[("name", "xyz")]));
        assert_eq!(decoder.table_size(), 39);
    }

    #[test]
    fn errors_have_short_lowercase_messages() {
        for error in [
            DecodeError::Truncated,
            DecodeError::IntegerOverflow,
            DecodeError::BadIndex,
            DecodeError::BadHuffman,
            DecodeError::SizeUpdateTooLarge,
            DecodeError::SizeUpdateNotFirst,
        ] {
            let message = error.to_string();
            assert!(!message.is_empty() && message.len() < 40, "{message}");
            assert_eq!(message, message.to_lowercase());
        }
    }

    #[test]
    fn static_statuses_are_indexed_others_literal() {
        for (status, index) in [
            (200, 8),
            (204, 9),
            (206, 10),
            (304, 11),
            (400, 12),
            (404, 13),
            (500, 14),
        ] {
            let mut out = Vec::new();
            encode_status(status, &mut out);
            assert_eq!(out, [0x80 | index]);
            let value = status.to_string();
            assert_eq!(decode_fresh(&out), Ok(fields(&[(":status", &value)])));
        }
        for status in [100, 101, 201, 302, 307, 429, 502, 503, 999] {
            let mut out = Vec::new();
            encode_status(status, &mut out);
            let value = status.to_string();
            let mut expected = vec![0x08, 0x03];
            expected.extend_from_slice(value.as_bytes());
            assert_eq!(out, expected);
            assert_eq!(decode_fresh(&out), Ok(fields(&[(":status", &value)])));
        }
    }

    #[test]
    fn static_name_lookup_matches_the_table() {
        for (at, (name, _)) in STATIC_TABLE.iter().enumerate() {
            let first = STATIC_TABLE.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_name_index(name), Some(first as u8), "{at}");
        }
        for name in [
            "",
            "x-request-id",
            "accept-charsets",
            ":authorit",
            "Host",
            "hosts",
            "te",
        ] {
            assert_eq!(static_name_index(name.as_bytes()), None, "{name}");
        }
        let longest = STATIC_TABLE.iter().map(|(n, _)| n.len()).max();
        assert_eq!(longest, Some(LONGEST_STATIC_NAME));
    }

    #[test]
    fn names_in_any_case_are_sent_in_lowercase() {
        // Lengths whose prefix byte is an ASCII capital (65 is `A`, 90 `Z`;
        // 127 + 65 = 192 puts one in the integer's continuation byte).
        let long = |len: usize| format!("X-{}", "N".repeat(len - 2));
        let longs = [long(42), long(65), long(90), long(192), long(217)];
        let mut names = vec![
            ("Content-Type", true),
            ("ACCESS-CONTROL-ALLOW-ORIGIN", true),
            ("X-Custom", false),
        ];
        names.extend(longs.iter().map(|l| (l.as_str(), false)));
        for (name, indexed) in names {
            let mut out = Vec::new();
            encode_field(name.as_bytes(), b"Value", false, &mut out);
            // A static name index fits the first byte; a literal name starts 0x00.
            assert_eq!(out[0] != 0x00, indexed, "{name}");
            let lower = name.to_ascii_lowercase();
            assert_eq!(
                decode_fresh(&out),
                Ok(fields(&[(&lower, "Value")])),
                "{name}"
            );
        }
    }

    #[test]
    fn fields_round_trip_across_integer_prefix_boundaries() {
        let long_name = "x".repeat(127);
        for name in [
            ":authority",
            "age",
            "content-type",
            "www-authenticate",
            "x-custom",
            &long_name,
        ] {
            for len in [0, 1, 14, 15, 16, 126, 127, 128, 300] {
                let value = "v".repeat(len);
                let mut out = Vec::new();
                encode_field(name.as_bytes(), value.as_bytes(), false, &mut out);
                assert_eq!(
                    decode_fresh(&out),
                    Ok(fields(&[(name, &value)])),
                    "{name} {len}"
                );
            }
        }
        // The wire form: name index 31 takes a continuation byte (4-bit
        // prefix); value lengths 126, 127, 128, 300 around the 7-bit prefix.
        let mut out = Vec::new();
        encode_field(b"content-type", &[b'v'; 126], false, &mut out);
        assert_eq!(out[..3], [0x0f, 0x10, 0x7e]);
        for (len, prefix) in [
            (127, &[0x7f, 0x00][..]),
            (128, &[0x7f, 0x01]),
            (300, &[0x7f, 0xad, 0x01]),
        ] {
            let mut out = Vec::new();
            encode_field(b"age", &vec![b'v'; len], false, &mut out);
            // Name index 21: 15 in the prefix, then 6.
            assert_eq!(out[..2], [0x0f, 0x06]);
            assert_eq!(&out[2..2 + prefix.len()], prefix, "{len}");
            assert_eq!(out.len(), 2 + prefix.len() + len);
        }
        let mut out = Vec::new();
        encode_field(b"x-a", b"", false, &mut out);
        assert_eq!(out, [0x00, 0x03, b'x', b'-', b'a', 0x00]);
    }

    /// A xorshift generator: deterministic pseudo-random numbers for tests.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, max_len: usize) -> Vec<u8> {
            let len = self.below(max_len + 1);
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn pseudo_random_fields_round_trip_through_the_encoder() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut decoder = Decoder::new(4096);
        for _ in 0..300 {
            let mut sent = Vec::new();
            let mut block = Vec::new();
            if rng.below(2) == 0 {
                let status = 100 + rng.below(900) as u16;
                encode_status(status, &mut block);
                sent.push((b":status".to_vec(), status.to_string().into_bytes()));
            }
            for _ in 0..rng.below(30) {
                let name = match rng.below(3) {
                    0 => STATIC_TABLE[rng.below(STATIC_TABLE.len())].0.to_vec(),
                    1 => rng.bytes(40),
                    _ => rng.bytes(300),
                };
                let max_len = if rng.below(4) == 0 { 400 } else { 40 };
                let value = rng.bytes(max_len);
                encode_field(&name, &value, rng.below(2) == 0, &mut block);
                sent.push((name.to_ascii_lowercase(), value));
            }
            assert_eq!(decode(&mut decoder, &block), Ok(sent));
            // The encoder never indexes.
            assert_eq!(decoder.table_size(), 0);
        }
    }

    /// The decoder's table, modelled as simply as possible.
    struct Model {
        entries: VecDeque<Field>,
        capacity: usize,
    }

    impl Model {
        fn size(&self) -> usize {
            self.entries
                .iter()
                .map(|(n, v)| n.len() + v.len() + 32)
                .sum()
        }

        fn insert(&mut self, field: Field) {
            self.entries.push_front(field);
            while self.size() > self.capacity {
                self.entries.pop_back();
            }
        }

        fn field(&self, index: usize) -> Field {
            match index {
                1..=61 => {
                    let (n, v) = STATIC_TABLE[index - 1];
                    (n.to_vec(), v.to_vec())
                }
                _ => self.entries[index - 62].clone(),
            }
        }
    }

    /// Appends a string literal, Huffman-coded or not.
    fn put_string(rng: &mut XorShift, string: &[u8], out: &mut Vec<u8>) {
        if rng.below(2) == 0 {
            encode_string(string, out);
        } else {
            let coded = huffman::tests::encode(string);
            let at = out.len();
            encode_integer(coded.len(), 7, out);
            out[at] |= 0x80;
            out.extend_from_slice(&coded);
        }
    }

    #[test]
    fn pseudo_random_blocks_of_every_representation_match_a_model() {
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        let mut decoder = Decoder::new(512);
        let mut model = Model {
            entries: VecDeque::new(),
            capacity: 512,
        };
        for _ in 0..300 {
            let mut block = Vec::new();
            let mut sent = Vec::new();
            if rng.below(8) == 0 {
                let capacity = rng.below(513);
                let at = block.len();
                encode_integer(capacity, 5, &mut block);
                block[at] |= 0x20;
                model.capacity = capacity;
                while model.size() > capacity {
                    model.entries.pop_back();
                }
            }
            for _ in 0..rng.below(12) {
                let indexes = 61 + model.entries.len();
                let representation = rng.below(4);
                if representation == 0 {
                    let index = 1 + rng.below(indexes);
                    let at = block.len();
                    encode_integer(index, 7, &mut block);
                    block[at] |= 0x80;
                    sent.push(model.field(index));
                    continue;
                }
                // A literal: indexed name or not, with 6-bit (incremental
                // indexing) or 4-bit (without, never) prefix.
                let (prefix_bits, pattern) = match representation {
                    1 => (6, 0x40),
                    2 => (4, 0x00),
                    _ => (4, 0x10),
                };
                let name_index = if rng.below(2) == 0 {
                    0
                } else {
                    1 + rng.below(indexes)
                };
                let at = block.len();
                encode_integer(name_index, prefix_bits, &mut block);
                block[at] |= pattern;
                let name = match name_index {
                    0 => {
                        let name = rng.bytes(20);
                        put_string(&mut rng, &name, &mut block);
                        name
                    }
                    _ => model.field(name_index).0,
                };
                let max_len = if rng.below(8) == 0 { 600 } else { 60 };
                let value = rng.bytes(max_len);
                put_string(&mut rng, &value, &mut block);
                sent.push((name.clone(), value.clone()));
                if representation == 1 {
                    model.insert((name, value));
                }
            }
            assert_eq!(decode(&mut decoder, &block), Ok(sent));
            assert_eq!(entries(&decoder), Vec::from(model.entries.clone()));
            assert_eq!(decoder.table_size(), model.size());
        }
    }
}
