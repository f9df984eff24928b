//! The HTTP/2 frame layer (RFC 9113 §4 and §6): frame headers read, the
//! payloads serin's server acts on parsed and checked for size, and frames
//! appended to a write buffer.
//!
//! What a frame means for the connection (stream states, flow control,
//! which error ends what) is the server loop's; this module only knows the
//! wire format.

/// What a client sends first (RFC 9113 §3.4), before its SETTINGS.
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame header's length.
pub(crate) const HEADER_LEN: usize = 9;

/// The largest frame payload before SETTINGS_MAX_FRAME_SIZE says otherwise,
/// and the largest serin accepts.
pub(crate) const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;

/// The flow-control window before any SETTINGS or WINDOW_UPDATE.
pub(crate) const DEFAULT_WINDOW: u32 = 65_535;

/// The largest flow-control window (RFC 9113 §6.9.1).
pub(crate) const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Frame types (RFC 9113 §6).
pub(crate) mod kind {
    pub(crate) const DATA: u8 = 0x0;
    pub(crate) const HEADERS: u8 = 0x1;
    pub(crate) const PRIORITY: u8 = 0x2;
    pub(crate) const RST_STREAM: u8 = 0x3;
    pub(crate) const SETTINGS: u8 = 0x4;
    pub(crate) const PUSH_PROMISE: u8 = 0x5;
    pub(crate) const PING: u8 = 0x6;
    pub(crate) const GOAWAY: u8 = 0x7;
    pub(crate) const WINDOW_UPDATE: u8 = 0x8;
    pub(crate) const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub(crate) mod flag {
    pub(crate) const END_STREAM: u8 = 0x1;
    pub(crate) const ACK: u8 = 0x1;
    pub(crate) const END_HEADERS: u8 = 0x4;
    pub(crate) const PADDED: u8 = 0x8;
    pub(crate) const PRIORITY: u8 = 0x20;
}

/// SETTINGS identifiers (RFC 9113 §6.5.2).
pub(crate) mod setting {
    pub(crate) const HEADER_TABLE_SIZE: u16 = 0x1;
    pub(crate) const ENABLE_PUSH: u16 = 0x2;
    pub(crate) const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub(crate) const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub(crate) const MAX_FRAME_SIZE: u16 = 0x5;
    pub(crate) const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (RFC 9113 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    NoError = 0x0,
    Protocol = 0x1,
    Internal = 0x2,
    FlowControl = 0x3,
    StreamClosed = 0x5,
    FrameSize = 0x6,
    RefusedStream = 0x7,
    Compression = 0x9,
    EnhanceYourCalm = 0xb,
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) len: usize,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
}

impl FrameHeader {
    /// Reads the header at the start of `buf`, which holds at least
    /// [`HEADER_LEN`] bytes. The stream identifier's reserved bit is ignored.
    pub(crate) fn parse(buf: &[u8]) -> Self {
        Self {
            len: usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]),
            kind: buf[3],
            flags: buf[4],
            stream: u32_at(&buf[5..]) & MAX_WINDOW,
        }
    }

    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A big-endian `u32` at the start of `buf`.
pub(crate) fn u32_at(buf: &[u8]) -> u32 {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])
}

/// The payload of a padded frame without its padding; `None` when the pad
/// length is not less than what it pads (a PROTOCOL_ERROR).
pub(crate) fn unpadded(header: &FrameHeader, payload: &[u8]) -> Option<(usize, usize)> {
    if !header.has(flag::PADDED) {
        return Some((0, payload.len()));
    }
    let pad = usize::from(*payload.first()?);
    (pad < payload.len()).then(|| (1, payload.len() - pad))
}

/// A HEADERS frame's priority fields: the stream it depends on.
pub(crate) fn priority_dependency(fields: &[u8]) -> u32 {
    u32_at(fields) & MAX_WINDOW
}

/// Appends a frame header.
pub(crate) fn write_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&header_bytes(len, kind, flags, stream));
}

fn header_bytes(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; HEADER_LEN] {
    debug_assert!(len < 1 << 24);
    let id = stream.to_be_bytes();
    let len = [(len >> 16) as u8, (len >> 8) as u8, len as u8];
    [
        len[0], len[1], len[2], kind, flags, id[0], id[1], id[2], id[3],
    ]
}

/// Appends a SETTINGS frame with these values.
pub(crate) fn write_settings(out: &mut Vec<u8>, values: &[(u16, u32)]) {
    write_header(out, values.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in values {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Appends the acknowledgement of the peer's SETTINGS.
pub(crate) fn write_settings_ack(out: &mut Vec<u8>) {
    write_header(out, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Appends the answer to a PING.
pub(crate) fn write_ping_ack(out: &mut Vec<u8>, data: &[u8]) {
    write_header(out, 8, kind::PING, flag::ACK, 0);
    out.extend_from_slice(&data[..8]);
}

/// Appends a GOAWAY: `last` is the last stream serin acts on.
pub(crate) fn write_goaway(out: &mut Vec<u8>, last: u32, code: ErrorCode) {
    write_header(out, 8, kind::GOAWAY, 0, 0);
    out.extend_from_slice(&last.to_be_bytes());
    out.extend_from_slice(&(code as u32).to_be_bytes());
}

/// Appends an RST_STREAM.
pub(crate) fn write_rst_stream(out: &mut Vec<u8>, stream: u32, code: ErrorCode) {
    write_header(out, 4, kind::RST_STREAM, 0, stream);
    out.extend_from_slice(&(code as u32).to_be_bytes());
}

/// Appends a WINDOW_UPDATE.
pub(crate) fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    write_header(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

/// Room for a frame header, to fill in with [`finish_header_block`] once
/// the header block after it is encoded.
pub(crate) fn reserve_header(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    at
}

/// Frames the header block encoded after the room [`reserve_header`] left
/// at `at`: one HEADERS frame, or, when the block is larger than
/// `max_frame`, HEADERS and CONTINUATION frames.
pub(crate) fn finish_header_block(
    out: &mut Vec<u8>,
    at: usize,
    stream: u32,
    end_stream: bool,
    max_frame: usize,
) {
    let end = if end_stream { flag::END_STREAM } else { 0 };
    let len = out.len() - at - HEADER_LEN;
    if len <= max_frame {
        let header = header_bytes(len, kind::HEADERS, end | flag::END_HEADERS, stream);
        out[at..at + HEADER_LEN].copy_from_slice(&header);
        return;
    }
    let block = out.split_off(at + HEADER_LEN);
    out.truncate(at);
    let mut chunks = block.chunks(max_frame).peekable();
    let (mut kind, mut flags) = (kind::HEADERS, end);
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= flag::END_HEADERS;
        }
        write_header(out, chunk.len(), kind, flags, stream);
        out.extend_from_slice(chunk);
        (kind, flags) = (kind::CONTINUATION, 0);
    }
}

/// Appends DATA frames carrying `data`, split at `max_frame`; the last one
/// ends the stream when `end_stream` is set.
pub(crate) fn write_data(
    out: &mut Vec<u8>,
    stream: u32,
    data: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    if data.is_empty() {
        let flags = if end_stream { flag::END_STREAM } else { 0 };
        write_header(out, 0, kind::DATA, flags, stream);
        return;
    }
    let mut chunks = data.chunks(max_frame).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last && end_stream {
            flag::END_STREAM
        } else {
            0
        };
        write_header(out, chunk.len(), kind::DATA, flags, stream);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_what_was_written_without_the_reserved_bit() {
        let mut out = Vec::new();
        write_header(&mut out, 0x01_02_03, kind::HEADERS, flag::END_HEADERS, 7);
        out[5] |= 0x80;
        let header = FrameHeader::parse(&out);
        assert_eq!(
            header,
            FrameHeader {
                len: 0x01_02_03,
                kind: kind::HEADERS,
                flags: flag::END_HEADERS,
                stream: 7
            }
        );
    }

    #[test]
    fn padding_is_stripped_and_padding_as_long_as_the_payload_is_refused() {
        let padded = FrameHeader {
            len: 5,
            kind: kind::DATA,
            flags: flag::PADDED,
            stream: 1,
        };
        assert_eq!(unpadded(&padded, &[2, b'h', b'i', 0, 0]), Some((1, 3)));
        assert_eq!(unpadded(&padded, &[4, 0, 0, 0, 0]), Some((1, 1)));
        assert_eq!(unpadded(&padded, &[5, 0, 0, 0, 0]), None);
        assert_eq!(unpadded(&padded, &[]), None);
        let plain = FrameHeader { flags: 0, ..padded };
        assert_eq!(unpadded(&plain, b"hello"), Some((0, 5)));
    }

    #[test]
    fn a_large_header_block_is_split_into_continuations() {
        let mut out = b"xx".to_vec();
        let at = reserve_header(&mut out);
        out.extend_from_slice(&[7u8; 10]);
        finish_header_block(&mut out, at, 3, true, 4);
        let mut at = 2;
        let mut seen = Vec::new();
        while at < out.len() {
            let h = FrameHeader::parse(&out[at..]);
            seen.push((h.kind, h.flags, h.len));
            at += HEADER_LEN + h.len;
        }
        assert_eq!(
            seen,
            [
                (kind::HEADERS, flag::END_STREAM, 4),
                (kind::CONTINUATION, 0, 4),
                (kind::CONTINUATION, flag::END_HEADERS, 2)
            ]
        );
    }

    #[test]
    fn data_is_split_at_the_frame_size_and_only_the_last_ends_the_stream() {
        let mut out = Vec::new();
        write_data(&mut out, 5, &[1u8; 5], true, 2);
        let flags: Vec<_> = out
            .chunks(HEADER_LEN + 2)
            .map(|f| FrameHeader::parse(f).flags)
            .collect();
        assert_eq!(flags, [0, 0, flag::END_STREAM]);
    }
}
