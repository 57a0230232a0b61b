//! HTTP/2 wire constants (RFC 9113 §3.4, §4.1, §6), shared by the kernel's framer and the
//! agent's holder.

/// The client connection preface.
pub const CLIENT_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame header: 24-bit length, type, flags, 31-bit stream id.
pub const FRAME_HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

/// DATA, HEADERS: the sender's last frame on the stream.
pub const END_STREAM: u8 = 0x1;
/// SETTINGS, PING: an acknowledgement.
pub const ACK: u8 = 0x1;
/// HEADERS: no CONTINUATION follows.
pub const END_HEADERS: u8 = 0x4;
