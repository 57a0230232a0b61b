//! What a held client is told when no replica became ready in time, judged from the bytes it
//! sent while it waited:
//! - HTTP/1.x: `503 Service Unavailable` with `Retry-After`, then the connection closes;
//! - HTTP/2 with prior knowledge (h2c, gRPC included): the server's preface, a `503` with
//!   `retry-after` on every stream the client opened (gRPC clients read it as `UNAVAILABLE`, and
//!   `grpc-status: 14` says so explicitly), then `GOAWAY` naming the last of those streams, so
//!   the client knows no later stream was taken and may retry it elsewhere;
//! - anything else: nothing, the connection is closed.

use surge_common::{
    h2::{
        ACK as FLAG_ACK, CLIENT_PREFACE as H2_PREFACE, END_HEADERS as FLAG_END_HEADERS,
        END_STREAM as FLAG_END_STREAM, FRAME_HEADER_LEN, GOAWAY as FRAME_GOAWAY, HEADERS as FRAME_HEADERS,
        SETTINGS as FRAME_SETTINGS,
    },
    http::{classify, prefix_of, SegmentStart},
};

/// Why the connection is refused, in the body (HTTP/1) and in `grpc-message` (HTTP/2).
pub const REASON: &str = "no replica became ready in time";

/// The bytes to send a client that timed out, or `None` to just close.
pub fn timeout_answer(sent: &[u8], retry_after: u32) -> Option<Vec<u8>> {
    if sent.starts_with(H2_PREFACE) {
        return Some(h2_refusal(
            &opened_streams(&sent[H2_PREFACE.len()..]),
            retry_after,
        ));
    }
    let (prefix, len) = prefix_of(sent);
    (classify(&prefix, len) == SegmentStart::Request).then(|| http1_refusal(retry_after))
}

fn http1_refusal(retry_after: u32) -> Vec<u8> {
    let body = format!("{REASON}\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The ids of the streams the client opened (HEADERS frames) in the complete frames of `frames`,
/// in the order they were opened.
fn opened_streams(mut frames: &[u8]) -> Vec<u32> {
    let mut streams = Vec::new();
    while frames.len() >= FRAME_HEADER_LEN {
        let len = u32::from_be_bytes([0, frames[0], frames[1], frames[2]]) as usize;
        let kind = frames[3];
        let stream = u32::from_be_bytes([frames[5], frames[6], frames[7], frames[8]]) & 0x7fff_ffff;
        if kind == FRAME_HEADERS && stream != 0 && !streams.contains(&stream) {
            streams.push(stream);
        }
        let Some(rest) = frames.get(FRAME_HEADER_LEN + len..) else {
            break;
        };
        frames = rest;
    }
    streams
}

fn h2_refusal(streams: &[u32], retry_after: u32) -> Vec<u8> {
    let mut out = Vec::new();
    // The server preface (an empty SETTINGS), and the acknowledgement of the client's.
    frame(&mut out, FRAME_SETTINGS, 0, 0, &[]);
    frame(&mut out, FRAME_SETTINGS, FLAG_ACK, 0, &[]);
    let block = refusal_header_block(retry_after);
    for &stream in streams {
        frame(
            &mut out,
            FRAME_HEADERS,
            FLAG_END_STREAM | FLAG_END_HEADERS,
            stream,
            &block,
        );
    }
    let last = streams.iter().copied().max().unwrap_or(0);
    let mut goaway = last.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
    goaway.extend_from_slice(REASON.as_bytes());
    frame(&mut out, FRAME_GOAWAY, 0, 0, &goaway);
    out
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// `:status: 503`, `retry-after`, `grpc-status: 14` (UNAVAILABLE) and `grpc-message`, HPACK
/// encoded as literals without indexing and without Huffman coding (RFC 7541 §6.2.2), so the
/// client's decoder table is left as it was.
fn refusal_header_block(retry_after: u32) -> Vec<u8> {
    let mut block = Vec::new();
    // Static table: 8 is `:status`, 53 is `retry-after`.
    literal_indexed_name(&mut block, 8, b"503");
    literal_indexed_name(&mut block, 53, retry_after.to_string().as_bytes());
    literal_new_name(&mut block, b"grpc-status", b"14");
    literal_new_name(&mut block, b"grpc-message", REASON.as_bytes());
    block
}

fn literal_indexed_name(block: &mut Vec<u8>, index: usize, value: &[u8]) {
    integer(block, 0x00, 4, index);
    string(block, value);
}

fn literal_new_name(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    block.push(0x00);
    string(block, name);
    string(block, value);
}

/// A string literal without Huffman coding: 7-bit prefix length, then the bytes.
fn string(block: &mut Vec<u8>, s: &[u8]) {
    integer(block, 0x00, 7, s.len());
    block.extend_from_slice(s);
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1) after the `high` bits.
fn integer(block: &mut Vec<u8>, high: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        block.push(high | value as u8);
        return;
    }
    block.push(high | max as u8);
    value -= max;
    while value >= 128 {
        block.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    block.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_examples() {
        // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix.
        let mut b = Vec::new();
        integer(&mut b, 0, 5, 10);
        assert_eq!(b, [0x0a]);
        b.clear();
        integer(&mut b, 0, 5, 1337);
        assert_eq!(b, [0x1f, 0x9a, 0x0a]);
        // `retry-after` (53) with a 4-bit prefix.
        b.clear();
        integer(&mut b, 0, 4, 53);
        assert_eq!(b, [0x0f, 0x26]);
    }

    #[test]
    fn streams_are_read_from_complete_headers_frames_only() {
        let mut frames = Vec::new();
        frame(&mut frames, FRAME_SETTINGS, 0, 0, &[0; 6]);
        frame(&mut frames, FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0x82]);
        frame(&mut frames, 0x0, 0, 1, b"body"); // DATA
        frame(&mut frames, FRAME_HEADERS, FLAG_END_HEADERS, 3, &[0x82]);
        frame(&mut frames, FRAME_HEADERS, FLAG_END_HEADERS, 5, &[0x82, 0x84]);
        // The last frame is cut short: its stream was opened all the same (its header is whole).
        frames.truncate(frames.len() - 1);
        assert_eq!(opened_streams(&frames), [1, 3, 5]);
        // A header cut short names nothing.
        assert_eq!(opened_streams(&frames[..frames.len() - 5]), [1, 3]);
    }

    #[test]
    fn non_http_clients_are_just_closed() {
        assert_eq!(timeout_answer(b"\x16\x03\x01\x02\x00", 1), None);
        assert_eq!(timeout_answer(b"", 1), None);
    }

    #[test]
    fn http1_clients_get_a_503_with_retry_after() {
        let answer = timeout_answer(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 7).expect("an answer");
        let text = String::from_utf8(answer).expect("text");
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\nno replica became ready in time\n"),
            "{text}"
        );
    }
}
