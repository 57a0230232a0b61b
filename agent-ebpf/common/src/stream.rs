//! HTTP/1.x message framing over a TCP byte stream, one direction of one connection: where each
//! request (or response) starts, so pipelined messages are counted one by one. Start lines are
//! classified by [`crate::http::classify`]; header lines are scanned only for `Content-Length`
//! and `Transfer-Encoding: chunked`; bodies are skipped by count without being read.
//!
//! The kernel and the userspace twin run this same code: the kernel's bounded loop calls
//! [`Cursor::round`], which skips body bytes or frames one byte of a chunk of at most [`CHUNK`]
//! bytes it loaded; [`Framer::feed`] runs the same rounds over a byte slice. Every loop is bounded by a constant, there is
//! no allocation, and no input makes it panic. A stream it cannot frame (garbage, a protocol
//! switch, a body that runs to the end of the connection) puts it in [`LOST`], where it counts
//! nothing until [`Framer::resync`] finds a message start at the beginning of a segment.
//!
//! HTTP/2 (h2c, gRPC): the client's connection preface, or a server's first frame (SETTINGS on
//! stream 0), switches the framer to frames: 9-byte headers are read, payloads skipped by count.
//! On the request side a HEADERS frame on a new (higher) stream id starts a stream; on the
//! response side a DATA or HEADERS frame with END_STREAM, or a RST_STREAM, ends one.

use crate::http::{classify, SegmentStart, PREFIX_LEN};

/// Bytes per load at most: a short response's whole header block takes two or three.
pub const CHUNK: usize = 64;
/// Bytes a header name or a start line head is matched on at once.
const WINDOW: usize = PREFIX_LEN;

/// Phases (`Framer::phase`).
pub const START: u8 = 0;
const HEAD: u8 = 1;
const LINE: u8 = 2;
const HDR_START: u8 = 3;
const HDR_NAME: u8 = 4;
const HDR_SKIP: u8 = 5;
const CL_VALUE: u8 = 6;
const TE_VALUE: u8 = 7;
const HDR_END: u8 = 8;
const BODY: u8 = 9;
const CHUNK_SIZE: u8 = 10;
const CHUNK_EXT: u8 = 11;
const CHUNK_DATA: u8 = 12;
const CHUNK_DATA_END: u8 = 13;
const TRAILER_START: u8 = 14;
const TRAILER_SKIP: u8 = 15;
const TRAILER_END: u8 = 16;
/// The stream cannot be framed; nothing is counted until a resync.
pub const LOST: u8 = 17;
/// HTTP/2: the last 8 bytes of the client's connection preface (skipped by count).
const H2_PREFACE: u8 = 18;
/// HTTP/2: reading a 9-byte frame header.
const H2_HEADER: u8 = 19;
/// HTTP/2: a frame's payload (skipped by count).
const H2_PAYLOAD: u8 = 20;
/// In a request's `User-Agent` value: does it name a health probe?
const UA_VALUE: u8 = 21;

/// The first 16 bytes of the HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 16] = b"PRI * HTTP/2.0\r\n";
use crate::h2::{
    DATA as H2_DATA, END_STREAM as H2_END_STREAM, HEADERS as H2_HEADERS, RST_STREAM as H2_RST_STREAM,
    SETTINGS as H2_SETTINGS,
};

/// `Framer::flags`.
const F_CHUNKED: u8 = 1;
const F_NO_BODY: u8 = 2;
const F_RESPONSE: u8 = 4;
const F_TO_CLOSE: u8 = 8;
const F_HAS_CL: u8 = 16;
/// After a `101 Switching Protocols`: the next bytes must be an HTTP/2 server preface (an h2c
/// upgrade), or the stream is given up (a WebSocket, say).
const F_SWITCHED: u8 = 32;

/// Which side of the conversation a framer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Client to server: requests.
    Requests,
    /// Server to client: responses.
    Responses,
}

/// Messages that started in the bytes fed, and the connection's HEAD requests still waiting
/// for their responses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Starts {
    /// Requests (on the request side) or final responses (on the response side).
    pub messages: u32,
    /// Interim (1xx) responses.
    pub interim: u32,
    /// Requests whose `User-Agent` names a health probe (`kube-probe/…`, as the kubelet sends,
    /// or `surge-probe`, the local actuator's): counted in `messages` too, and told apart so
    /// that probes are not traffic. Found in the headers, so maybe in a later segment than
    /// the request's start.
    pub probes: u32,
    /// HTTP/2: how many of `ids` are set (at most [`STREAM_IDS`]).
    pub id_count: u32,
    /// HTTP/2: the stream ids of the first messages counted in the bytes fed, in order (the
    /// streams a request opened, or a response ended), so each end is matched to its own
    /// stream's start whatever order the server answers in.
    pub ids: [u32; STREAM_IDS],
    /// HTTP/2, request side: streams the client reset (RST_STREAM) after opening them, the first
    /// [`CANCEL_IDS`] of them: a cancelled call that the server never ends is no longer in flight.
    pub cancel_count: u32,
    pub cancel_ids: [u32; CANCEL_IDS],
    /// Which open requests are HEAD, oldest first; carried between segments and between the
    /// two directions by the caller (the kernel keeps it in the connection's state).
    pub heads: HeadQueue,
    /// HTTP/1: bit `i` set when the `i`th message of the bytes fed is a probe's request (on the
    /// request side) or a final response answering one (on the response side): neither opens
    /// nor ends a request.
    pub probe_mask: u32,
    /// Requests that started before the bytes fed and turned out to be probes in them: the
    /// newest open requests, which end now.
    pub late_probes: u32,
    /// 1 + the index of the last request started in the bytes fed (0: none).
    pub last_start: u32,
}

/// How many HTTP/2 stream ids one segment's [`Starts`] keeps.
pub const STREAM_IDS: usize = 32;
/// How many client resets of HTTP/2 streams one segment's [`Starts`] keeps.
pub const CANCEL_IDS: usize = 32;

impl Starts {
    /// HTTP/2: a message of stream `id` was counted.
    #[inline(always)]
    fn note_stream(&mut self, id: u32) {
        let i = self.id_count as usize;
        if i < STREAM_IDS {
            self.ids[i & (STREAM_IDS - 1)] = id;
            self.id_count += 1;
        }
    }

    /// HTTP/2: the client reset stream `id`.
    #[inline(always)]
    fn note_cancel(&mut self, id: u32) {
        let i = self.cancel_count as usize;
        if i < CANCEL_IDS {
            self.cancel_ids[i & (CANCEL_IDS - 1)] = id;
            self.cancel_count += 1;
        }
    }

    /// The stream id of the `i`th client reset kept, or 0.
    #[inline(always)]
    pub fn cancelled(&self, i: u32) -> u32 {
        if i < self.cancel_count && (i as usize) < CANCEL_IDS {
            self.cancel_ids[i as usize & (CANCEL_IDS - 1)]
        } else {
            0
        }
    }

    /// The stream id of the `i`th message counted, if it was kept (HTTP/2 only).
    #[inline(always)]
    pub fn stream_of(&self, i: u32) -> u32 {
        if i < self.id_count && (i as usize) < STREAM_IDS {
            self.ids[i as usize & (STREAM_IDS - 1)]
        } else {
            0
        }
    }
}

/// The open requests of a connection, oldest first, each with two marks: a HEAD request, whose
/// response has headers (a Content-Length, even) but never a body (RFC 9110 §9.3.2); and a
/// health probe, whose answer ends no request (a probe is not traffic).
///
/// The kernel frames a connection's two directions on two CPUs at once, so each field has one
/// writer: the request side writes `pushed`, `forgotten` and `tags`; the response side writes
/// `popped`. Each side works on a copy and writes back only its own fields. A request is
/// remembered when fewer than [`HEAD_MEMORY`] are open at its start; later ones count as
/// neither mark until older ones are answered.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadQueue {
    /// Requests started on the connection (wrapping).
    pub pushed: u32,
    /// Final responses that took their request's marks (wrapping).
    pub popped: u32,
    /// Requests before this one were forgotten (the request stream was lost): their answers
    /// take no marks.
    pub forgotten: u32,
    pub _pad: u32,
    /// Request `n`'s marks are in `tags[n % 64]`: its lap `(n / 64) % 64` in the low six bits
    /// (a tag of an older lap is not this request's), [`TAG_HEAD`] and [`TAG_PROBE`].
    pub tags: [u8; HEAD_RING],
}

/// Open requests whose marks are remembered.
pub const HEAD_MEMORY: u32 = 32;
/// Positions in [`HeadQueue::tags`]: twice [`HEAD_MEMORY`], so that a tag is written only once
/// the request 64 before it has been answered.
const HEAD_RING: usize = 64;
const TAG_LAP: u8 = 0x3f;
const TAG_HEAD: u8 = 0x40;
const TAG_PROBE: u8 = 0x80;

impl Default for HeadQueue {
    fn default() -> Self {
        Self {
            pushed: 0,
            popped: 0,
            forgotten: 0,
            _pad: 0,
            tags: [0; HEAD_RING],
        }
    }
}

impl HeadQueue {
    /// The lap tag of request `n`.
    #[inline(always)]
    fn lap(n: u32) -> u8 {
        ((n / HEAD_RING as u32) as u8) & TAG_LAP
    }

    /// The first request whose answer is still to come.
    #[inline(always)]
    fn oldest(&self) -> u32 {
        // The later of the two, in wrapping order.
        if (self.forgotten.wrapping_sub(self.popped) as i32) > 0 {
            self.forgotten
        } else {
            self.popped
        }
    }

    /// Requests open, as this copy knows them (on the request side, `popped` may be older).
    #[inline(always)]
    pub fn open(&self) -> u32 {
        self.pushed.wrapping_sub(self.oldest())
    }

    /// A request started. Request side.
    #[inline(always)]
    pub fn push(&mut self, head: bool) {
        let n = self.pushed;
        let tag = if head { TAG_HEAD } else { 0 };
        // An open count from an older `popped` is only ever too high: a request may be left
        // unremembered, never one remembered over a tag still to be read.
        let remembered = self.open() < HEAD_MEMORY;
        let i = n as usize & (HEAD_RING - 1);
        if remembered {
            self.tags[i] = Self::lap(n) | tag;
        } else if self.open() < HEAD_RING as u32 {
            // Request n - 64 was answered: its tag goes, so that it is not taken for this one's.
            self.tags[i] = Self::lap(n).wrapping_add(1) & TAG_LAP;
        }
        self.pushed = n.wrapping_add(1);
    }

    /// The newest open request is a health probe. False when the queue cannot remember it
    /// (no open request, or it was not remembered). Request side.
    #[inline(always)]
    pub fn mark_probe(&mut self) -> bool {
        // Without branches: the kernel's framing round is verified path by path.
        let newest = self.pushed.wrapping_sub(1);
        let i = newest as usize & (HEAD_RING - 1);
        let tag = self.tags[i];
        let known = ((self.open() != 0) & (tag & TAG_LAP == Self::lap(newest))) as u8;
        self.tags[i] = tag | (known << 7);
        known != 0
    }

    /// A final response started: whether it answers a HEAD request, and whether a probe.
    /// Response side.
    #[inline(always)]
    pub fn pop(&mut self) -> (bool, bool) {
        let n = self.oldest();
        if n == self.pushed {
            return (false, false);
        }
        let tag = self.tags[n as usize & (HEAD_RING - 1)];
        self.popped = n.wrapping_add(1);
        if tag & TAG_LAP != Self::lap(n) {
            return (false, false);
        }
        (tag & TAG_HEAD != 0, tag & TAG_PROBE != 0)
    }

    /// The request stream was lost: which requests are open is no longer known. Request side.
    #[inline(always)]
    pub fn clear(&mut self) {
        self.forgotten = self.pushed;
    }
}

const CONTENT_LENGTH: &[u8; 15] = b"content-length:";
const TRANSFER_ENCODING: &[u8; 18] = b"transfer-encoding:";
const CHUNKED: &[u8; 7] = b"chunked";
const USER_AGENT: &[u8; 11] = b"user-agent:";
/// The `User-Agent` prefixes of health probes: the kubelet's (`kube-probe/1.31`, which Knative
/// also treats as a probe) and the local actuator's. Same length, matched together.
const KUBE_PROBE: &[u8; 11] = b"kube-probe/";
const SURGE_PROBE: &[u8; 11] = b"surge-probe";
/// `Framer::cand` bits while matching a header name.
const NAME_CL: u8 = 1;
const NAME_TE: u8 = 2;
const NAME_UA: u8 = 4;
/// Larger bodies are not framed (and a larger chunk size is garbage).
const MAX_BODY: u64 = 1 << 40;

/// The framing state of one direction of one connection. Plain integers, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framer {
    /// Body (or chunk) bytes still to skip; the Content-Length or chunk size being parsed.
    pub remaining: u64,
    /// The first bytes of the current start line.
    pub head: [u8; PREFIX_LEN],
    pub phase: u8,
    pub head_len: u8,
    /// Position in the header name being matched.
    pub pos: u8,
    /// Header names still matching: bit 0 Content-Length, bit 1 Transfer-Encoding; in a
    /// Transfer-Encoding value, the position in "chunked".
    pub cand: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
    /// HTTP/2: the stream id of the frame header being read.
    pub stream: u32,
    /// HTTP/2: the highest stream id a request started on.
    pub last_stream: u32,
}

/// Whether `buf[at..]` starts with `name` (lowercase, at most [`WINDOW`] bytes), ignoring case.
#[inline(always)]
fn window_matches(buf: &[u8; CHUNK], at: usize, name: &[u8]) -> bool {
    let mut k = 0;
    while k < name.len() && k < WINDOW {
        // The mask changes nothing (the caller keeps at + WINDOW ≤ CHUNK); it shows the bound
        // to the verifier.
        if lower(buf[(at + k) & (CHUNK - 1)]) != name[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// The index of the first `\n` in `buf[from..n]`, or `n`: eight bytes at a time, with
/// constant indices only.
#[inline(always)]
fn find_lf(buf: &[u8; CHUNK], from: usize, n: usize) -> usize {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const LFS: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    let mut w = 0;
    while w < CHUNK / 8 {
        let base = w * 8;
        if base + 8 > from && base < n {
            let word = u64::from_le_bytes([
                buf[base],
                buf[base + 1],
                buf[base + 2],
                buf[base + 3],
                buf[base + 4],
                buf[base + 5],
                buf[base + 6],
                buf[base + 7],
            ]);
            // The top bit of each byte that is `\n`, exactly (no false positives).
            let x = word ^ LFS;
            let mut m = !(((x & LOW7).wrapping_add(LOW7)) | x | LOW7);
            if from > base {
                m &= u64::MAX << (8 * (from - base));
            }
            if n < base + 8 {
                m &= !(u64::MAX << (8 * (n - base)));
            }
            if m != 0 {
                return base + lowest_byte(m);
            }
        }
        w += 1;
    }
    n
}

/// The index of the lowest byte whose top bit is set in `m` (not zero).
#[inline(always)]
fn lowest_byte(m: u64) -> usize {
    let b = m & m.wrapping_neg();
    let mut k = 0;
    if b & 0xffff_ffff_0000_0000 != 0 {
        k += 4;
    }
    if b & 0xffff_0000_ffff_0000 != 0 {
        k += 2;
    }
    if b & 0xff00_ff00_ff00_ff00 != 0 {
        k += 1;
    }
    k
}

#[inline(always)]
fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() {
        b + 32
    } else {
        b
    }
}

#[inline(always)]
fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some((b - b'0') as u64),
        b'a'..=b'f' => Some((b - b'a' + 10) as u64),
        b'A'..=b'F' => Some((b - b'A' + 10) as u64),
        _ => None,
    }
}

impl Framer {
    pub const fn new() -> Self {
        Self {
            remaining: 0,
            head: [0; PREFIX_LEN],
            phase: START,
            head_len: 0,
            pos: 0,
            cand: 0,
            flags: 0,
            _pad: [0; 3],
            stream: 0,
            last_stream: 0,
        }
    }

    /// Whether the framer is skipping a body (no byte needs to be looked at).
    #[inline(always)]
    pub fn in_body(&self) -> bool {
        (self.phase == BODY
            || self.phase == CHUNK_DATA
            || self.phase == H2_PAYLOAD
            || self.phase == H2_PREFACE)
            && self.remaining > 0
    }

    /// Whether the stream is HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.phase >= H2_PREFACE
    }

    pub fn is_lost(&self) -> bool {
        self.phase == LOST
    }

    /// Gives up framing this stream.
    #[inline(always)]
    pub fn lose(&mut self) {
        *self = Self::new();
        self.phase = LOST;
    }

    /// A lost stream whose segment starts with a message start line is framed again from there.
    /// `prefix` is the segment's first bytes (`len` of them valid).
    #[inline(always)]
    pub fn resync(&mut self, prefix: &[u8; PREFIX_LEN], len: usize) {
        if self.phase == LOST && classify(prefix, len) != SegmentStart::Other {
            *self = Self::new();
        }
    }

    /// A lost response stream of a connection whose client speaks HTTP/2: the segment is taken
    /// to start at a frame boundary (servers write whole frames).
    #[inline(always)]
    pub fn resync_h2(&mut self) {
        if self.phase == LOST {
            *self = Self::new();
            self.h2_next_frame();
        }
    }

    /// Skips up to `avail` body bytes; returns how many were skipped.
    #[inline(always)]
    pub fn skip(&mut self, avail: u64) -> u64 {
        if !self.in_body() {
            return 0;
        }
        let n = if avail < self.remaining {
            avail
        } else {
            self.remaining
        };
        self.remaining -= n;
        if self.remaining == 0 {
            if self.phase == BODY {
                self.done();
            } else if self.phase == CHUNK_DATA {
                self.phase = CHUNK_DATA_END;
            } else {
                self.h2_next_frame();
            }
        }
        n
    }

    /// HTTP/2: the next byte starts a frame header.
    #[inline(always)]
    fn h2_next_frame(&mut self) {
        self.phase = H2_HEADER;
        self.pos = 0;
        self.remaining = 0;
        self.stream = 0;
    }

    /// HTTP/2: one byte of a frame header (length 3, type 1, flags 1, stream id 4); the last one
    /// decides what the frame means for the streams.
    #[inline(always)]
    fn h2_header_byte(&mut self, b: u8, side: Side, starts: &mut Starts) {
        let p = self.pos;
        if p < 3 {
            self.remaining = (self.remaining << 8) | b as u64;
        } else if p == 3 {
            self.cand = b;
        } else if p == 4 {
            self.flags = b;
        } else {
            self.stream = (self.stream << 8) | b as u32;
        }
        self.pos = p + 1;
        if self.pos < 9 {
            return;
        }
        let id = self.stream & 0x7fff_ffff;
        let (kind, flags) = (self.cand, self.flags);
        match side {
            Side::Requests => {
                if kind == H2_HEADERS && id > self.last_stream {
                    self.last_stream = id;
                    starts.messages += 1;
                    starts.note_stream(id);
                } else if kind == H2_RST_STREAM && id != 0 && id <= self.last_stream {
                    starts.note_cancel(id);
                }
            }
            Side::Responses => {
                // After an h2c upgrade, stream 1 is the upgrade request, answered by the 101.
                if ((kind == H2_DATA || kind == H2_HEADERS)
                    && flags & H2_END_STREAM != 0
                    && id > self.last_stream)
                    || (kind == H2_RST_STREAM && id > self.last_stream)
                {
                    starts.messages += 1;
                    starts.note_stream(id);
                }
            }
        }
        self.flags = 0;
        if self.remaining == 0 {
            self.h2_next_frame();
        } else {
            self.phase = H2_PAYLOAD;
        }
    }

    /// A server's HTTP/2 preface starts: after a `101` (an h2c upgrade), stream 1 is the
    /// upgrade request, whose answer (the 101) was counted already; its end on stream 1 is not.
    #[inline(always)]
    fn after_upgrade(&mut self) {
        if self.flags & F_SWITCHED != 0 {
            self.last_stream = 1;
        }
    }

    /// The current message ended: the next byte starts the next one.
    #[inline(always)]
    fn done(&mut self) {
        self.phase = START;
        self.remaining = 0;
        self.flags = 0;
        self.head_len = 0;
    }

    /// The start line's head is complete: classify it and count the message.
    #[inline(always)]
    fn classify_head(&mut self, side: Side, starts: &mut Starts) {
        if self.flags & F_SWITCHED != 0 {
            // Switched to a protocol that is not HTTP/2.
            self.lose();
            return;
        }
        let len = self.head_len as usize;
        let kind = classify(&self.head, if len > PREFIX_LEN { PREFIX_LEN } else { len });
        self.flags = 0;
        match (side, kind) {
            (Side::Requests, SegmentStart::Request) => {
                starts.messages += 1;
                starts.last_start = starts.messages;
                let h = &self.head;
                starts
                    .heads
                    .push(h[0] == b'H' && h[1] == b'E' && h[2] == b'A' && h[3] == b'D' && h[4] == b' ');
            }
            (Side::Responses, SegmentStart::FinalResponse) => {
                starts.messages += 1;
                self.flags = F_RESPONSE;
                let (to_head, to_probe) = starts.heads.pop();
                let index = starts.messages.wrapping_sub(1);
                starts.probe_mask |= ((to_probe as u32) & (index < 32) as u32) << (index & 31);
                // 101 Switching Protocols: what follows is not HTTP/1.
                if self.head[9] == b'1' {
                    self.flags |= F_TO_CLOSE;
                } else if (self.head[9] == b'2' || self.head[9] == b'3')
                    && self.head[10] == b'0'
                    && self.head[11] == b'4'
                {
                    self.flags |= F_NO_BODY;
                }
                if to_head {
                    self.flags |= F_NO_BODY;
                }
            }
            (Side::Responses, SegmentStart::InterimResponse) => {
                starts.interim += 1;
                self.flags = F_RESPONSE | F_NO_BODY;
            }
            _ => {
                self.lose();
                return;
            }
        }
        self.phase = LINE;
    }

    /// The empty line after the headers: decide how the body is delimited.
    #[inline(always)]
    fn headers_done(&mut self) {
        let f = self.flags;
        if f & F_TO_CLOSE != 0 {
            self.done();
            self.flags = F_SWITCHED;
        } else if f & F_NO_BODY != 0 {
            self.done();
        } else if f & F_CHUNKED != 0 {
            self.phase = CHUNK_SIZE;
            self.remaining = 0;
            self.pos = 0;
        } else if f & F_HAS_CL != 0 {
            if self.remaining == 0 {
                self.done();
            } else {
                self.phase = BODY;
            }
        } else if f & F_RESPONSE != 0 {
            // A response delimited by the connection's end.
            self.lose();
        } else {
            self.done();
        }
    }

    /// Consumes one byte that is not body.
    #[inline(always)]
    // One arm per phase reads best as a state machine, even where an arm is a single `if`.
    #[allow(clippy::collapsible_match)]
    pub fn step(&mut self, b: u8, side: Side, starts: &mut Starts) {
        match self.phase {
            START => {
                // Empty lines before a request are allowed (RFC 9112 §2.2).
                if b == b'\r' || b == b'\n' {
                    return;
                }
                self.head = [0; PREFIX_LEN];
                self.head[0] = b;
                self.head_len = 1;
                self.phase = HEAD;
            }
            HEAD => {
                let i = self.head_len as usize;
                if i < PREFIX_LEN {
                    self.head[i] = b;
                    self.head_len += 1;
                }
                // A server's HTTP/2 preface: SETTINGS (type 4, no flags) on stream 0.
                if side == Side::Responses
                    && self.head_len == 9
                    && self.head[0] == 0
                    && self.head[3] == H2_SETTINGS
                    && self.head[4] == 0
                    && self.head[5] == 0
                    && self.head[6] == 0
                    && self.head[7] == 0
                    && self.head[8] == 0
                {
                    self.remaining = ((self.head[1] as u64) << 8) | self.head[2] as u64;
                    self.after_upgrade();
                    self.flags = 0;
                    self.phase = if self.remaining == 0 {
                        H2_HEADER
                    } else {
                        H2_PAYLOAD
                    };
                    self.pos = 0;
                    self.stream = 0;
                    return;
                }
                if side == Side::Requests && self.head_len as usize == PREFIX_LEN && self.head == *PREFACE {
                    // "SM\r\n\r\n" follows: 8 bytes, then frames.
                    self.phase = H2_PREFACE;
                    self.remaining = 8;
                    self.flags = 0;
                    return;
                }
                if b == b'\n' {
                    self.classify_head(side, starts);
                    if self.phase == LINE {
                        self.phase = HDR_START;
                    }
                } else if self.head_len as usize >= PREFIX_LEN {
                    self.classify_head(side, starts);
                }
            }
            LINE => {
                if b == b'\n' {
                    self.phase = HDR_START;
                }
            }
            HDR_START => {
                if b == b'\r' {
                    self.phase = HDR_END;
                } else if b == b'\n' {
                    self.headers_done();
                } else {
                    self.pos = 0;
                    self.cand = NAME_CL | NAME_TE | NAME_UA;
                    self.phase = HDR_NAME;
                    self.header_name(b);
                }
            }
            HDR_NAME => self.header_name(b),
            HDR_SKIP => {
                if b == b'\n' {
                    self.phase = HDR_START;
                }
            }
            CL_VALUE => self.content_length_byte(b),
            TE_VALUE => {
                if b == b'\n' {
                    self.phase = HDR_START;
                    return;
                }
                let p = self.cand as usize;
                if p < CHUNKED.len() && lower(b) == CHUNKED[p] {
                    self.cand += 1;
                    if self.cand as usize == CHUNKED.len() {
                        self.flags |= F_CHUNKED;
                    }
                } else {
                    self.cand = if lower(b) == CHUNKED[0] { 1 } else { 0 };
                    // Only the last coding decides; "chunked, gzip" is not chunked framing.
                    if b != b' ' && b != b'\t' && b != b'\r' {
                        self.flags &= !F_CHUNKED;
                    }
                }
            }
            UA_VALUE => self.user_agent_byte(b, starts),
            HDR_END => {
                if b == b'\n' {
                    self.headers_done();
                } else {
                    self.lose();
                }
            }
            CHUNK_SIZE => {
                if let Some(v) = hex(b) {
                    self.remaining = self.remaining * 16 + v;
                    self.pos = 1;
                    if self.remaining > MAX_BODY {
                        self.lose();
                    }
                } else if b == b';' || b == b' ' || b == b'\t' {
                    self.phase = CHUNK_EXT;
                } else if b == b'\r' {
                } else if b == b'\n' && self.pos == 1 {
                    self.chunk_size_done();
                } else {
                    self.lose();
                }
            }
            CHUNK_EXT => {
                if b == b'\n' {
                    self.chunk_size_done();
                }
            }
            CHUNK_DATA_END => {
                if b == b'\n' {
                    self.phase = CHUNK_SIZE;
                    self.remaining = 0;
                    self.pos = 0;
                } else if b != b'\r' {
                    self.lose();
                }
            }
            TRAILER_START => {
                if b == b'\r' {
                    self.phase = TRAILER_END;
                } else if b == b'\n' {
                    self.done();
                } else {
                    self.phase = TRAILER_SKIP;
                }
            }
            TRAILER_SKIP => {
                if b == b'\n' {
                    self.phase = TRAILER_START;
                }
            }
            TRAILER_END => {
                if b == b'\n' {
                    self.done();
                } else {
                    self.lose();
                }
            }
            H2_HEADER => self.h2_header_byte(b, side, starts),
            // BODY, CHUNK_DATA and the HTTP/2 skips with nothing left cannot happen (skip moves
            // on); LOST stays.
            _ => {}
        }
    }

    /// One byte of a `Content-Length` value.
    #[inline(always)]
    fn content_length_byte(&mut self, b: u8) {
        if b.is_ascii_digit() {
            self.remaining = self.remaining * 10 + (b - b'0') as u64;
            if self.remaining > MAX_BODY {
                self.lose();
            }
        } else if b == b'\n' {
            self.phase = HDR_START;
        } else if b != b' ' && b != b'\t' && b != b'\r' {
            // "Content-Length: 5, 5" and the like: not framed.
            self.lose();
        }
    }

    /// At the start of a header line, `buf[at..at + WINDOW]` loaded from its first byte (not
    /// `\r` or `\n`): matches the name against `Content-Length:` and `Transfer-Encoding:` at
    /// once, to the state [`Framer::step`] would reach byte by byte. Returns how many bytes it
    /// consumed: none for any other name, whose line is then skipped to its end (a `\n` inside
    /// the name ends the line either way).
    #[inline(always)]
    pub fn take_header_name(&mut self, buf: &[u8; CHUNK], at: usize) -> usize {
        // The first letter tells which name it can be: most headers are none of them and are
        // skipped after one byte, and at most one name is compared.
        let first = lower(buf[at & (CHUNK - 1)]);
        let content_length = first == CONTENT_LENGTH[0] && window_matches(buf, at, CONTENT_LENGTH);
        let transfer_encoding = !content_length
            && first == TRANSFER_ENCODING[0]
            && window_matches(buf, at, &TRANSFER_ENCODING[..WINDOW]);
        let user_agent = !content_length
            && !transfer_encoding
            && first == USER_AGENT[0]
            && self.flags & F_RESPONSE == 0
            && window_matches(buf, at, USER_AGENT);
        if user_agent {
            self.start_user_agent();
            USER_AGENT.len()
        } else if content_length {
            if self.flags & F_HAS_CL != 0 {
                // A second Content-Length: not framed.
                self.lose();
                return CONTENT_LENGTH.len();
            }
            self.pos = CONTENT_LENGTH.len() as u8;
            self.cand = 1;
            self.flags |= F_HAS_CL;
            self.remaining = 0;
            self.phase = CL_VALUE;
            CONTENT_LENGTH.len()
        } else if transfer_encoding {
            // "g:" is left to the byte-by-byte match.
            self.pos = WINDOW as u8;
            self.cand = 2;
            self.phase = HDR_NAME;
            WINDOW
        } else {
            self.pos = 0;
            self.cand = 0;
            self.phase = HDR_SKIP;
            0
        }
    }

    /// In a `Content-Length` value: frames up to [`WINDOW`] bytes of `buf[from..n]` at once,
    /// byte by byte as [`Framer::step`] would, up to the end of the line. Returns how many
    /// bytes it consumed.
    #[inline(always)]
    pub fn take_content_length(&mut self, buf: &[u8; CHUNK], from: usize, n: usize) -> usize {
        let mut used = 0;
        let mut k = 0;
        while k < WINDOW {
            let j = from + k;
            if j >= n || self.phase != CL_VALUE {
                break;
            }
            self.content_length_byte(buf[j & (CHUNK - 1)]);
            used += 1;
            k += 1;
        }
        used
    }

    /// A request's `User-Agent:` name is complete: its value is matched next.
    #[inline(always)]
    fn start_user_agent(&mut self) {
        self.pos = 0;
        self.cand = 3;
        self.phase = UA_VALUE;
    }

    /// One byte of a request's `User-Agent` value (`pos` counts its bytes after leading
    /// whitespace; `cand` bit 0: still `kube-probe/`, bit 1: still `surge-probe`). A match of
    /// either prefix counts the request as a probe; the rest of the line is skipped.
    #[inline(always)]
    fn user_agent_byte(&mut self, b: u8, starts: &mut Starts) {
        if b == b'\n' {
            self.phase = HDR_START;
            return;
        }
        let p = self.pos as usize;
        if p == 0 && (b == b' ' || b == b'\t') {
            return;
        }
        let mut cand = self.cand;
        if !(p < KUBE_PROBE.len() && KUBE_PROBE[p] == b) {
            cand &= !1;
        }
        if !(p < SURGE_PROBE.len() && SURGE_PROBE[p] == b) {
            cand &= !2;
        }
        self.cand = cand;
        self.pos += 1;
        if cand == 0 {
            self.phase = HDR_SKIP;
        } else if p + 1 == KUBE_PROBE.len() {
            starts.probes += 1;
            // The newest request: started in these bytes, or before them (then it ends now).
            let known = starts.heads.mark_probe() as u32;
            let index = starts.last_start.wrapping_sub(1);
            let here = known & (index < 32) as u32;
            starts.probe_mask |= here << (index & 31);
            starts.late_probes += known - here;
            self.phase = HDR_SKIP;
        }
    }

    #[inline(always)]
    fn chunk_size_done(&mut self) {
        if self.remaining == 0 {
            self.phase = TRAILER_START;
        } else {
            self.phase = CHUNK_DATA;
        }
    }

    /// One byte of a header name: still `Content-Length:` or `Transfer-Encoding:`?
    #[inline(always)]
    fn header_name(&mut self, b: u8) {
        if b == b'\n' {
            self.phase = HDR_START;
            return;
        }
        let p = self.pos as usize;
        let c = lower(b);
        let mut cand = self.cand;
        if cand & NAME_CL != 0 && !(p < CONTENT_LENGTH.len() && CONTENT_LENGTH[p] == c) {
            cand &= !NAME_CL;
        }
        if cand & NAME_TE != 0 && !(p < TRANSFER_ENCODING.len() && TRANSFER_ENCODING[p] == c) {
            cand &= !NAME_TE;
        }
        if cand & NAME_UA != 0 && !(p < USER_AGENT.len() && USER_AGENT[p] == c) {
            cand &= !NAME_UA;
        }
        self.cand = cand;
        self.pos += 1;
        if cand == 0 {
            self.phase = HDR_SKIP;
        } else if cand & NAME_UA != 0 && p + 1 == USER_AGENT.len() {
            if self.flags & F_RESPONSE == 0 {
                self.start_user_agent();
            } else {
                self.phase = HDR_SKIP;
            }
        } else if cand & NAME_CL != 0 && p + 1 == CONTENT_LENGTH.len() {
            if self.flags & F_HAS_CL != 0 {
                // A second Content-Length: not framed.
                self.lose();
                return;
            }
            self.flags |= F_HAS_CL;
            self.remaining = 0;
            self.phase = CL_VALUE;
        } else if cand & NAME_TE != 0 && p + 1 == TRANSFER_ENCODING.len() {
            self.cand = 0;
            self.phase = TE_VALUE;
        }
    }

    /// Whether the framer only waits for the end of a line (no byte before it matters).
    #[inline(always)]
    fn waiting_for_lf(&self) -> bool {
        self.phase == LINE || self.phase == HDR_SKIP || self.phase == TRAILER_SKIP || self.phase == CHUNK_EXT
    }

    /// At a message start with at least [`WINDOW`] bytes loaded: takes the start line's head
    /// (up to its `\n`, at most [`WINDOW`] bytes) at once, as [`Framer::step`] would byte by
    /// byte. Returns how many bytes it consumed.
    #[inline(always)]
    pub fn take_head(&mut self, buf: &[u8; CHUNK], side: Side, starts: &mut Starts) -> usize {
        // A server's HTTP/2 preface: SETTINGS (type 4, no flags) on stream 0.
        if side == Side::Responses
            && buf[0] == 0
            && buf[3] == H2_SETTINGS
            && buf[4] == 0
            && buf[5] == 0
            && buf[6] == 0
            && buf[7] == 0
            && buf[8] == 0
        {
            self.remaining = ((buf[1] as u64) << 8) | buf[2] as u64;
            self.after_upgrade();
            self.flags = 0;
            self.phase = if self.remaining == 0 {
                H2_HEADER
            } else {
                H2_PAYLOAD
            };
            self.pos = 0;
            self.stream = 0;
            return 9;
        }
        let mut head = [0u8; WINDOW];
        head.copy_from_slice(&buf[..WINDOW]);
        if side == Side::Requests && head == *PREFACE {
            self.phase = H2_PREFACE;
            self.remaining = 8;
            self.flags = 0;
            return WINDOW;
        }
        self.head = head;
        let lf = find_lf(buf, 0, WINDOW);
        let used = if lf < WINDOW { lf + 1 } else { WINDOW };
        self.head_len = used as u8;
        self.classify_head(side, starts);
        if self.phase == LINE && lf < WINDOW {
            self.phase = HDR_START;
        }
        used
    }

    /// Feeds a whole segment the way the kernel does, `max_rounds` rounds at most (a segment
    /// that needs more loses the stream, like the kernel's bounded loop).
    pub fn feed(&mut self, data: &[u8], side: Side, max_rounds: usize) -> Starts {
        self.feed_carrying(data, side, max_rounds, &mut HeadQueue::default())
    }

    /// [`Framer::feed`] with the connection's HEAD requests carried in `heads`: the request
    /// side adds to it, the response side takes from it.
    pub fn feed_carrying(
        &mut self,
        data: &[u8],
        side: Side,
        max_rounds: usize,
        heads: &mut HeadQueue,
    ) -> Starts {
        let mut starts = Starts {
            heads: *heads,
            ..Starts::default()
        };
        let (p, len) = crate::http::prefix_of(data);
        self.resync(&p, len);
        let mut cur = Cursor::new(0, data.len() as u32);
        let mut load = |off: u32, buf: &mut [u8; CHUNK], n: u32| {
            let (off, n) = (off as usize, n as usize);
            buf[..n].copy_from_slice(&data[off..off + n]);
            true
        };
        let mut rounds = 0;
        while cur.round(self, side, &mut starts, &mut load) {
            rounds += 1;
            if rounds == max_rounds {
                if !cur.finished() {
                    self.lose();
                }
                break;
            }
        }
        self.settle_heads(side, &mut starts.heads);
        *heads = starts.heads;
        starts
    }

    /// After a segment: a request stream that was given up forgets which open requests are
    /// HEAD (their responses are then framed as if they had a body, as before the loss).
    #[inline(always)]
    pub fn settle_heads(&self, side: Side, heads: &mut HeadQueue) {
        if side == Side::Requests && self.is_lost() {
            heads.clear();
        }
    }
}

/// A position in one segment's payload and the chunk of it loaded last: the state of the
/// kernel's framing loop, whose every round is one [`Cursor::round`] (a body skip or a chunk).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Cursor {
    pub buf: [u8; CHUNK],
    /// Offset of the next byte to consume, and the end of the payload.
    pub off: u32,
    pub end: u32,
    /// Index in `buf` of the byte at `off`, and how many bytes of `buf` are loaded.
    pub pos: u32,
    pub len: u32,
}

impl Cursor {
    pub const fn new(off: u32, end: u32) -> Self {
        Self {
            buf: [0; CHUNK],
            off,
            end,
            pos: 0,
            len: 0,
        }
    }

    /// Starts over on the payload `[off, end)`, in place (the chunk's bytes are left as they
    /// are: nothing reads them before the next load).
    #[inline(always)]
    pub fn reset(&mut self, off: u32, end: u32) {
        self.off = off;
        self.end = end;
        self.pos = 0;
        self.len = 0;
    }

    pub fn finished(&self) -> bool {
        self.off >= self.end
    }

    /// Loads the next chunk (at most [`CHUNK`] bytes) at `off`.
    #[inline(always)]
    fn reload(&mut self, f: &mut Framer, load: &mut impl FnMut(u32, &mut [u8; CHUNK], u32) -> bool) -> bool {
        let mut n = self.end - self.off;
        if n > CHUNK as u32 {
            n = CHUNK as u32;
        }
        // Cannot happen (off < end), but the verifier needs to see the size is not zero.
        if n == 0 {
            return false;
        }
        if !load(self.off, &mut self.buf, n) {
            f.lose();
            return false;
        }
        self.pos = 0;
        self.len = n;
        true
    }

    #[inline(always)]
    fn advance(&mut self, n: u32) -> bool {
        self.pos += n;
        self.off += n;
        self.off < self.end
    }

    /// One round: skips body bytes by count, takes a whole start line head at once, jumps to the
    /// end of a line that does not matter, or frames one byte; chunks of at most [`CHUNK`] bytes
    /// are loaded with `load(offset, buf, n)` as needed. Returns false when the segment is done
    /// (or the stream lost).
    #[inline(always)]
    pub fn round(
        &mut self,
        f: &mut Framer,
        side: Side,
        starts: &mut Starts,
        load: &mut impl FnMut(u32, &mut [u8; CHUNK], u32) -> bool,
    ) -> bool {
        if f.is_lost() || self.off >= self.end {
            return false;
        }
        if f.in_body() {
            self.off += f.skip((self.end - self.off) as u64) as u32;
            self.pos = 0;
            self.len = 0;
            return self.off < self.end;
        }
        if f.phase == START {
            // A message starts here: load it at the start of the chunk, take its head at once.
            if !self.reload(f, load) {
                return false;
            }
            if self.len >= WINDOW as u32 && self.buf[0] != b'\r' && self.buf[0] != b'\n' {
                let used = f.take_head(&self.buf, side, starts);
                // A start line that goes on past its head is skipped to its end below, in this
                // round; headers starting next are left to the next round's fast path.
                if !self.advance(used as u32) || f.phase != LINE {
                    return self.off < self.end;
                }
            }
        } else if f.phase == HDR_START && self.end - self.off >= WINDOW as u32 {
            // A header line starts here: with its first WINDOW bytes loaded (loaded again from
            // here if the chunk ends sooner), its name is matched at once.
            if self.pos + WINDOW as u32 > self.len && !self.reload(f, load) {
                return false;
            }
            let at = core::hint::black_box(self.pos as usize);
            if at <= CHUNK - WINDOW {
                let first = self.buf[at];
                if first != b'\r' && first != b'\n' {
                    let used = f.take_header_name(&self.buf, at);
                    // Another header's line is skipped to its end and a Content-Length value
                    // read below, in this round.
                    if !self.advance(used as u32) || (f.phase != HDR_SKIP && f.phase != CL_VALUE) {
                        return self.off < self.end;
                    }
                }
            }
        } else if self.pos >= self.len && !self.reload(f, load) {
            return false;
        }
        if f.phase == CL_VALUE {
            let used = f.take_content_length(&self.buf, self.pos as usize, self.len as usize);
            return self.advance(used as u32);
        }
        if f.waiting_for_lf() {
            let lf = find_lf(&self.buf, self.pos as usize, self.len as usize) as u32;
            if lf >= self.len {
                let rest = self.len - self.pos;
                return self.advance(rest);
            }
            let gap = lf - self.pos;
            self.advance(gap);
        }
        // The compiler knows pos < len ≤ CHUNK and would drop this check, which the verifier
        // needs to see on the index it is given.
        let j = core::hint::black_box(self.pos as usize);
        if j < CHUNK {
            f.step(self.buf[j], side, starts);
            // The `\n` of a `\r\n` that ends the headers (or a line) goes in the same round.
            if f.phase == HDR_END && j + 1 < self.len as usize && j + 1 < CHUNK {
                f.step(self.buf[j + 1], side, starts);
                self.advance(1);
            }
        }
        self.advance(1)
    }
}

impl Default for Cursor {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

#[cfg(test)]
mod tests;
