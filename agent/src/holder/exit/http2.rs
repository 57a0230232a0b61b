//! When a relayed HTTP/2 connection (gRPC included) can leave the holder's path. A gRPC channel
//! opened while its service was cold would otherwise send every later call through the agent,
//! for as long as the channel lives. So the holder tells the client, on the server's behalf, to
//! open new streams on a new connection, the graceful way (RFC 9113 §6.8):
//!
//! 1. when no stream is open, a `GOAWAY` with the largest stream id (2^31−1), then a `PING`;
//! 2. when the client's `PING` ACK comes back (it is kept from the server, which never sent that
//!    `PING`), every stream the client opened before it has been seen: a final `GOAWAY` names
//!    the last of them;
//! 3. once those streams are done, both connections close. The client's next call opens a new
//!    connection, and the connect hook sends that one straight to a replica.
//!
//! Streams that cross the first `GOAWAY` are served as usual; none is refused. A stream the
//! client opens after the final `GOAWAY` (which says it was not processed, so the client may
//! retry it elsewhere) never reaches the server. Frames are only ever added between whole
//! frames of the server's stream, never inside a header block. A server's own `GOAWAY` after
//! the client was told ends what the holder says, and never names a stream above the holder's.
//! A `GOAWAY` of either side before that, a server push, or a server that does not speak HTTP/2
//! leaves the connection relayed untouched until it ends.
//!
//! Pure: the bytes of each direction in; what to pass on out. Bytes are only ever held back
//! while a frame header (or a `PING` ACK, or a `GOAWAY`'s stream id) is not whole yet.

use std::{borrow::Cow, collections::BTreeMap, ops::Range};

pub use surge_common::h2::CLIENT_PREFACE as PREFACE;
use surge_common::h2::{
    ACK, DATA, END_HEADERS, END_STREAM, FRAME_HEADER_LEN as HEADER, GOAWAY, HEADERS, PING, PUSH_PROMISE,
    RST_STREAM, SETTINGS,
};

/// The opaque data of the holder's `PING`, told apart from the server's own by it.
const OPAQUE: [u8; 8] = *b"surge-go";
/// The largest stream id: "no stream is refused yet".
const ANY_STREAM: u32 = (1 << 31) - 1;
pub(super) const CONTINUATION: u8 = 0x9;
const WINDOW_UPDATE: u8 = 0x8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a moment with no stream open.
    Serving,
    /// The first `GOAWAY` and the `PING` are out (or due); waiting for the `PING`'s ACK.
    Pinged,
    /// The final `GOAWAY` is out (or due); waiting for the streams it lets finish.
    Final,
    /// Every stream is done and the client has all the frames: close both connections.
    Done,
    /// Relay untouched until the connection ends.
    Off,
}

/// Which halves of an open stream have ended.
#[derive(Debug, Clone, Copy, Default)]
struct Halves {
    client: bool,
    server: bool,
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

fn parse_head(h: &[u8]) -> FrameHead {
    FrameHead {
        len: (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize,
        kind: h[3],
        flags: h[4],
        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & ANY_STREAM,
    }
}

/// A control frame on stream 0 with an 8-byte payload.
fn control(kind: u8, payload: [u8; 8]) -> [u8; HEADER + 8] {
    let mut f = [0u8; HEADER + 8];
    f[2] = 8;
    f[3] = kind;
    f[HEADER..].copy_from_slice(&payload);
    f
}

/// A connection-level WINDOW_UPDATE of `increment` bytes.
fn window_update(increment: u32) -> [u8; HEADER + 4] {
    let mut f = [0u8; HEADER + 4];
    f[2] = 4;
    f[3] = WINDOW_UPDATE;
    f[HEADER..].copy_from_slice(&increment.to_be_bytes());
    f
}

/// A `GOAWAY` with no error naming `last` as the last stream that may still be served.
fn goaway(last: u32) -> [u8; HEADER + 8] {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&last.to_be_bytes());
    control(GOAWAY, payload)
}

/// One direction's bytes as they pass: what is kept back, where the current frame stands.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes kept back: the start of a frame whose header (or first bytes that matter) is not
    /// whole yet.
    kept: Vec<u8>,
    /// Bytes at the start of `kept` that were passed on already (held bytes, or server bytes
    /// that reached the client before the connection's protocol was known).
    kept_sent: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: usize,
    /// The current frame's bytes are dropped rather than passed.
    dropping: bool,
    /// A header block (HEADERS or PUSH_PROMISE without END_HEADERS, then CONTINUATION) is open:
    /// nothing may come between its frames.
    in_block: bool,
    /// A stream whose END_STREAM takes effect once the current frame (and header block) has
    /// passed whole.
    end_pending: Option<u32>,
    /// A stream whose RST_STREAM takes effect once the current frame has passed whole.
    reset_pending: Option<u32>,
    /// Whole frames passed so far.
    passed: u64,
}

impl Direction {
    /// Between two frames, outside any header block, with nothing kept back.
    fn at_boundary(&self) -> bool {
        self.passed > 0 && self.payload_left == 0 && self.kept.is_empty() && !self.in_block
    }

    /// `data` after what was kept back.
    fn join<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        if self.kept.is_empty() {
            Cow::Borrowed(data)
        } else {
            let mut j = std::mem::take(&mut self.kept);
            j.extend_from_slice(data);
            Cow::Owned(j)
        }
    }

    /// What was kept back but not passed on yet, then `data`: for a direction given up.
    fn flush<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        let sent = std::mem::take(&mut self.kept_sent);
        let kept = std::mem::take(&mut self.kept);
        if kept.len() <= sent {
            return Cow::Borrowed(data);
        }
        let mut out = kept[sent..].to_vec();
        out.extend_from_slice(data);
        Cow::Owned(out)
    }

    /// The bytes to pass on: `joined` cut to `ranges` (in order), and less what went already.
    fn output<'a>(&mut self, joined: Cow<'a, [u8]>, ranges: &[Range<usize>]) -> Cow<'a, [u8]> {
        let out: Cow<'a, [u8]> = match (ranges, joined) {
            ([], _) => Cow::Borrowed(&[]),
            ([only], Cow::Borrowed(b)) => Cow::Borrowed(&b[only.clone()]),
            ([only], Cow::Owned(mut v)) if only.start == 0 => {
                v.truncate(only.end);
                Cow::Owned(v)
            }
            (many, joined) => {
                let mut v = Vec::with_capacity(joined.len());
                for r in many {
                    v.extend_from_slice(&joined[r.clone()]);
                }
                Cow::Owned(v)
            }
        };
        let ahead = self.kept_sent.min(out.len());
        self.kept_sent -= ahead;
        match out {
            Cow::Borrowed(b) => Cow::Borrowed(&b[ahead..]),
            Cow::Owned(mut v) => {
                v.drain(..ahead);
                Cow::Owned(v)
            }
        }
    }
}

/// Ranges of a buffer to pass on, merged as they come.
#[derive(Default)]
struct Ranges(Vec<Range<usize>>);

impl Ranges {
    fn pass(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => self.0.push(r),
        }
    }
}

/// One relayed HTTP/2 connection's way out of the holder's path.
#[derive(Debug)]
pub struct Exit {
    phase: Phase,
    client: Direction,
    server: Direction,
    streams: BTreeMap<u32, Halves>,
    /// The largest stream id the client has opened.
    last_stream: u32,
    /// Frames for the client, sent between two of the server's frames.
    outbox: Vec<u8>,
    /// The last stream id of the last `GOAWAY` in the outbox, if any.
    saying: Option<u32>,
    /// The last stream id of the last `GOAWAY` the client was sent, if any.
    said: Option<u32>,
    /// The final `GOAWAY`'s stream id: client streams above it are dropped.
    said_final: Option<u32>,
    /// The server sent a `GOAWAY` of its own after the client was told: the holder says no
    /// more, and the server closes the connection itself.
    server_leaving: bool,
    /// The agent is stopping: the client is told at once, whether streams are open or not.
    hurried: bool,
    /// DATA bytes of dropped streams that the client counted against the connection's
    /// flow-control window and the server will never credit: the holder gives them back.
    window_owed: u32,
}

impl Exit {
    /// A connection whose client has sent `sent` so far, all of it passed to the server
    /// already (the held bytes, starting with [`PREFACE`]).
    pub fn new(sent: &[u8]) -> Self {
        let mut exit = Self {
            phase: Phase::Serving,
            client: Direction::default(),
            server: Direction::default(),
            streams: BTreeMap::new(),
            last_stream: 0,
            outbox: Vec::new(),
            saying: None,
            said: None,
            said_final: None,
            server_leaving: false,
            hurried: false,
            window_owed: 0,
        };
        let frames = sent.strip_prefix(&PREFACE[..]).unwrap_or_default();
        let _ = exit.follow_client(frames);
        exit.client.kept_sent = exit.client.kept.len();
        exit
    }

    /// The client sent `data`: what to pass to the server (without the ACK of the holder's
    /// `PING`, without streams opened after the final `GOAWAY`, and without a frame header until
    /// it is whole). `None` once the connection is closing.
    pub fn on_requests<'a>(&mut self, data: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self.phase {
            Phase::Done => None,
            Phase::Off => Some(self.client.flush(data)),
            _ => Some(self.follow_client(data)),
        }
    }

    /// The server sent `data`: what to send the client, with the holder's frames put in
    /// between the server's where their time has come.
    pub fn on_responses<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        match self.phase {
            Phase::Done => Cow::Borrowed(data),
            Phase::Off => self.server.flush(data),
            _ => self.follow_server(data, true),
        }
    }

    /// Server bytes that went to the client before this followed the connection: what falls
    /// due in them waits for [`Self::take_for_client`].
    pub fn passed_responses(&mut self, data: &[u8]) {
        let _ = self.follow_server(data, false);
        self.server.kept_sent = self.server.kept.len();
    }

    /// Frames for the client that can go now, between two of the server's frames: after the
    /// client's side moved things on (its `PING` ACK, the end of its last stream).
    pub fn take_for_client(&mut self) -> Option<Vec<u8>> {
        if !self.server.at_boundary() || matches!(self.phase, Phase::Off | Phase::Done) {
            return None;
        }
        self.due()
    }

    /// Whether the client's side moved things on, so that [`Self::take_for_client`] may have
    /// frames to send or the connection may be done.
    pub fn has_for_client(&self) -> bool {
        !matches!(self.phase, Phase::Off | Phase::Done)
            && (!self.outbox.is_empty()
                || self.window_owed > 0
                || self.ready_to_start()
                || self.ready_to_close())
    }

    /// Every stream is done and the client has the final `GOAWAY`: close both connections.
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The agent is stopping: the client is told to go away at the next chance, even while
    /// streams are open (they are still served). Better than a cut at the drain timeout.
    pub fn hurry(&mut self) {
        self.hurried = true;
    }

    /// The client has been told to go away.
    pub fn told_to_leave(&self) -> bool {
        self.said.is_some()
    }

    /// No stream is open (or the agent is stopping) and the server has sent its first frame
    /// (the SETTINGS its preface starts with).
    fn ready_to_start(&self) -> bool {
        self.phase == Phase::Serving && self.server.passed > 0 && (self.streams.is_empty() || self.hurried)
    }

    fn ready_to_close(&self) -> bool {
        self.phase == Phase::Final && self.streams.is_empty() && !self.server_leaving
    }

    /// At a boundary of the server's frames: the frames due now (taken from the outbox), and
    /// the phase they lead to.
    fn due(&mut self) -> Option<Vec<u8>> {
        self.fall_due();
        if self.ready_to_close() {
            // The final GOAWAY (in the outbox, if not sent yet) goes out with this.
            self.phase = Phase::Done;
        }
        if self.outbox.is_empty() {
            None
        } else {
            self.said = self.saying.or(self.said);
            Some(std::mem::take(&mut self.outbox))
        }
    }

    /// Puts what has come due in the outbox: the first `GOAWAY` and the `PING`, or the final
    /// `GOAWAY` (naming the last stream the client opened before it was sent).
    fn fall_due(&mut self) {
        if self.window_owed > 0 {
            self.outbox
                .extend_from_slice(&window_update(std::mem::take(&mut self.window_owed)));
        }
        if self.server_leaving {
            return;
        }
        if self.ready_to_start() {
            self.say(goaway(ANY_STREAM), ANY_STREAM);
            self.outbox.extend_from_slice(&control(PING, OPAQUE));
            self.phase = Phase::Pinged;
        }
        if self.phase == Phase::Final && self.said_final.is_none() {
            let last = self.last_stream;
            self.say(goaway(last), last);
            self.said_final = Some(last);
        }
    }

    fn say(&mut self, frame: [u8; HEADER + 8], last: u32) {
        self.outbox.extend_from_slice(&frame);
        self.saying = Some(last);
    }

    fn follow_client<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        let joined = self.client.join(data);
        let mut pass = Ranges::default();
        let mut pos = 0;
        while pos < joined.len() {
            if self.client.payload_left > 0 {
                let n = self.client.payload_left.min(joined.len() - pos);
                if !self.client.dropping {
                    pass.pass(pos..pos + n);
                }
                self.client.payload_left -= n;
                pos += n;
                if self.client.payload_left == 0 {
                    self.client_frame_passed();
                }
                continue;
            }
            if joined.len() - pos < HEADER {
                break;
            }
            let head = parse_head(&joined[pos..pos + HEADER]);
            if self.phase == Phase::Pinged && head.kind == PING && head.flags & ACK != 0 && head.len == 8 {
                if joined.len() - pos < HEADER + 8 {
                    break;
                }
                if joined[pos + HEADER..pos + HEADER + 8] == OPAQUE {
                    // Kept from the server, which never sent that PING.
                    pos += HEADER + 8;
                    self.client.passed += 1;
                    self.phase = Phase::Final;
                    continue;
                }
            }
            // A stream opened after the final GOAWAY, which told the client it was not
            // processed: the server never sees it, so it is not processed twice.
            self.client.dropping =
                head.stream % 2 == 1 && self.said_final.is_some_and(|last| head.stream > last);
            if self.client.dropping && head.kind == DATA {
                self.window_owed = self.window_owed.saturating_add(head.len as u32).min(ANY_STREAM);
            }
            if !self.client.dropping {
                pass.pass(pos..pos + HEADER);
                self.on_client_frame(head);
            }
            pos += HEADER;
            self.client.payload_left = head.len;
            if head.len == 0 {
                self.client_frame_passed();
            }
            if self.phase == Phase::Off {
                // Everything from here on passes as it comes.
                pass.pass(pos..joined.len());
                pos = joined.len();
            }
        }
        self.client.kept = joined[pos..].to_vec();
        let ranges = std::mem::take(&mut pass.0);
        self.client.output(joined, &ranges)
    }

    fn client_frame_passed(&mut self) {
        self.client.passed += 1;
        self.client.dropping = false;
        if let Some(stream) = self.client.reset_pending.take() {
            self.reset(stream);
        }
        if !self.client.in_block {
            if let Some(stream) = self.client.end_pending.take() {
                self.end_half(stream, true);
            }
        }
    }

    fn on_client_frame(&mut self, head: FrameHead) {
        match head.kind {
            HEADERS if head.stream % 2 == 1 && head.stream > self.last_stream => {
                self.last_stream = head.stream;
                self.streams.insert(head.stream, Halves::default());
            }
            // Once the whole frame has passed: closing before would cut it.
            RST_STREAM => self.client.reset_pending = Some(head.stream),
            // The client leaving of its own accord; once told, it is leaving as asked.
            GOAWAY if self.phase == Phase::Serving => self.off(),
            _ => {}
        }
        track_block(&mut self.client, head);
    }

    fn follow_server<'a>(&mut self, data: &'a [u8], insert: bool) -> Cow<'a, [u8]> {
        let joined = self.server.join(data);
        let mut pass = Ranges::default();
        // Pieces of the output that are not in `joined`: (where they go, the bytes).
        let mut added: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut pos = 0;
        while pos < joined.len() && self.phase != Phase::Off {
            if self.server.payload_left > 0 {
                let n = self.server.payload_left.min(joined.len() - pos);
                pass.pass(pos..pos + n);
                self.server.payload_left -= n;
                pos += n;
            } else {
                if joined.len() - pos < HEADER {
                    break;
                }
                let head = parse_head(&joined[pos..pos + HEADER]);
                if head.kind == GOAWAY && head.len >= 8 && self.said.is_some() {
                    // The server's own GOAWAY after the holder's: it may not name a stream
                    // above the holder's (a GOAWAY's last stream id never goes up).
                    if joined.len() - pos < HEADER + 4 {
                        break;
                    }
                    let at = pos + HEADER;
                    let theirs =
                        u32::from_be_bytes([joined[at], joined[at + 1], joined[at + 2], joined[at + 3]]);
                    let last = (theirs & ANY_STREAM).min(self.said.unwrap_or(ANY_STREAM));
                    pass.pass(pos..at);
                    added.push((at, last.to_be_bytes().to_vec()));
                    pass.0.push(at + 4..at + 4);
                    pos = at + 4;
                    self.server.payload_left = head.len - 4;
                    self.server_leaving = true;
                    self.outbox.clear();
                    self.saying = None;
                } else {
                    pass.pass(pos..pos + HEADER);
                    pos += HEADER;
                    self.server.payload_left = head.len;
                    self.on_server_frame(head);
                    if self.phase == Phase::Off {
                        pass.pass(pos..joined.len());
                        pos = joined.len();
                        break;
                    }
                }
            }
            if self.server.payload_left == 0 {
                self.server.passed += 1;
                if !self.server.in_block {
                    if let Some(stream) = self.server.end_pending.take() {
                        self.end_half(stream, false);
                    }
                    if !insert {
                        self.fall_due();
                    } else if let Some(frames) = self.due() {
                        added.push((pos, frames));
                        pass.0.push(pos..pos);
                    }
                }
            }
        }
        if self.phase == Phase::Off {
            pass.pass(pos..joined.len());
            pos = joined.len();
        }
        self.server.kept = joined[pos..].to_vec();
        let ranges = std::mem::take(&mut pass.0);
        if added.is_empty() {
            return self.server.output(joined, &ranges);
        }
        // Splice the holder's bytes in where they go.
        let mut out = Vec::with_capacity(joined.len() + 64);
        let mut extra = added.into_iter().peekable();
        for r in ranges {
            while let Some((at, _)) = extra.peek() {
                if *at > r.start {
                    break;
                }
                out.extend_from_slice(&extra.next().map(|(_, b)| b).unwrap_or_default());
            }
            out.extend_from_slice(&joined[r]);
        }
        for (_, b) in extra {
            out.extend_from_slice(&b);
        }
        let ahead = self.server.kept_sent.min(out.len());
        self.server.kept_sent -= ahead;
        out.drain(..ahead);
        Cow::Owned(out)
    }

    fn on_server_frame(&mut self, head: FrameHead) {
        if self.server.passed == 0 && head.kind != SETTINGS {
            // An HTTP/2 server's first frame is its SETTINGS: this one does not speak HTTP/2.
            self.off();
            return;
        }
        match head.kind {
            RST_STREAM => self.reset(head.stream),
            // The server closing (or pushing) of its own accord: before the client was told,
            // the connection is left alone; after, the holder says no more and the server
            // ends the connection (the client side is still followed, to keep the holder's
            // PING answer and dropped streams from the server).
            GOAWAY | PUSH_PROMISE if self.said.is_none() => self.off(),
            PUSH_PROMISE => {
                self.server_leaving = true;
                self.outbox.clear();
                self.saying = None;
            }
            _ => {}
        }
        track_block(&mut self.server, head);
    }

    fn end_half(&mut self, stream: u32, client: bool) {
        if let Some(h) = self.streams.get_mut(&stream) {
            if client {
                h.client = true;
            } else {
                h.server = true;
            }
            if h.client && h.server {
                self.streams.remove(&stream);
            }
        }
    }

    fn reset(&mut self, stream: u32) {
        self.streams.remove(&stream);
    }

    /// Relays untouched from now on; nothing more to say.
    fn off(&mut self) {
        self.phase = Phase::Off;
        self.outbox.clear();
        self.saying = None;
    }
}

/// Follows header blocks (HEADERS or PUSH_PROMISE, then CONTINUATION until END_HEADERS), and
/// the END_STREAM of a direction's frames (it takes effect once the frame and its block have
/// passed).
fn track_block(d: &mut Direction, head: FrameHead) {
    match head.kind {
        HEADERS | PUSH_PROMISE => d.in_block = head.flags & END_HEADERS == 0,
        CONTINUATION if head.flags & END_HEADERS != 0 => d.in_block = false,
        _ => {}
    }
    if matches!(head.kind, HEADERS | DATA) && head.flags & END_STREAM != 0 && d.end_pending.is_none() {
        d.end_pending = Some(head.stream);
    }
}

#[cfg(test)]
mod randomized;
#[cfg(test)]
mod tests;
