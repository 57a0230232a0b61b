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
//! Streams that cross the first `GOAWAY` are served as usual; none is refused. Frames are only
//! ever added between whole frames of the server's stream. A `GOAWAY` from either side, a
//! server push, or a frame this cannot follow leaves the connection relayed untouched until it
//! ends.
//!
//! Pure: the bytes of each direction in; what to pass on out.

use std::{borrow::Cow, collections::BTreeMap};

pub use surge_common::h2::CLIENT_PREFACE as PREFACE;
use surge_common::h2::{
    ACK, DATA, END_STREAM, FRAME_HEADER_LEN as HEADER, GOAWAY, HEADERS, PING, PUSH_PROMISE, RST_STREAM,
    SETTINGS,
};
/// The opaque data of the holder's `PING`, told apart from the server's own by it.
const OPAQUE: [u8; 8] = *b"surge-go";
/// The largest stream id: "no stream is refused yet".
const ANY_STREAM: u32 = (1 << 31) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a moment with no stream open.
    Serving,
    /// The first `GOAWAY` and the `PING` are out; waiting for the `PING`'s ACK.
    Pinged,
    /// The final `GOAWAY` is out; waiting for the streams it lets finish.
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

/// The server's frames as they pass: a frame header in progress and the payload bytes still
/// to pass.
#[derive(Debug, Default)]
struct ServerFrames {
    header: [u8; HEADER],
    have: usize,
    payload_left: usize,
    /// Whole frames passed so far.
    passed: u64,
}

impl ServerFrames {
    /// Between two frames, after the first.
    fn at_boundary(&self) -> bool {
        self.passed > 0 && self.payload_left == 0 && self.have == 0
    }
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

/// A `GOAWAY` with no error naming `last` as the last stream that may still be served.
fn goaway(last: u32) -> [u8; HEADER + 8] {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&last.to_be_bytes());
    control(GOAWAY, payload)
}

/// One relayed HTTP/2 connection's way out of the holder's path.
#[derive(Debug)]
pub struct Exit {
    phase: Phase,
    /// Preface bytes of the client's still to pass.
    preface_left: usize,
    /// Payload bytes of the client's current frame still to pass.
    client_payload_left: usize,
    from_server: ServerFrames,
    /// Client bytes kept back: a frame header not yet whole, or a `PING` ACK not yet whole.
    kept: Vec<u8>,
    /// Bytes at the start of `kept` that already went to the server (with the held bytes).
    kept_sent: usize,
    streams: BTreeMap<u32, Halves>,
    /// The largest stream id the client has opened.
    last_stream: u32,
    /// Frames for the client, sent between two of the server's frames.
    outbox: Vec<u8>,
    /// The first `GOAWAY` went to the client.
    told: bool,
    /// The agent is stopping: the client is told at once, whether streams are open or not.
    hurried: bool,
}

impl Exit {
    /// A connection whose client has sent `sent` so far, all of it passed to the server
    /// already (the held bytes, starting with [`PREFACE`]).
    pub fn new(sent: &[u8]) -> Self {
        let mut exit = Self {
            phase: Phase::Serving,
            preface_left: PREFACE.len(),
            client_payload_left: 0,
            from_server: ServerFrames::default(),
            kept: Vec::new(),
            kept_sent: 0,
            streams: BTreeMap::new(),
            last_stream: 0,
            outbox: Vec::new(),
            told: false,
            hurried: false,
        };
        let _ = exit.on_requests(sent);
        exit.kept_sent = exit.kept.len();
        exit
    }

    /// The client sent `data`: what to pass to the server (without the ACK of the holder's
    /// `PING`, and without a frame header until it is whole). `None` once the connection is
    /// closing.
    pub fn on_requests<'a>(&mut self, data: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        let out = match self.phase {
            Phase::Done => return None,
            Phase::Off => Cow::Borrowed(data),
            _ => self.follow_client(data),
        };
        // What went to the server with the held bytes does not go again.
        let ahead = std::mem::take(&mut self.kept_sent).min(out.len());
        Some(match out {
            Cow::Borrowed(b) => Cow::Borrowed(&b[ahead..]),
            Cow::Owned(mut v) => {
                v.drain(..ahead);
                Cow::Owned(v)
            }
        })
    }

    fn follow_client<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        let mut data = data;
        let mut out: Vec<u8> = Vec::new();
        if self.preface_left > 0 {
            let n = self.preface_left.min(data.len());
            if data[..n] != PREFACE[PREFACE.len() - self.preface_left..][..n] {
                self.phase = Phase::Off;
                return Cow::Borrowed(data);
            }
            out.extend_from_slice(&data[..n]);
            self.preface_left -= n;
            data = &data[n..];
        }
        let joined: Cow<'a, [u8]> = if self.kept.is_empty() {
            Cow::Borrowed(data)
        } else {
            let mut j = std::mem::take(&mut self.kept);
            j.extend_from_slice(data);
            Cow::Owned(j)
        };
        let mut pos = 0;
        let mut from = 0;
        while pos < joined.len() {
            if self.client_payload_left > 0 {
                let n = self.client_payload_left.min(joined.len() - pos);
                self.client_payload_left -= n;
                pos += n;
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
                    out.extend_from_slice(&joined[from..pos]);
                    pos += HEADER + 8;
                    from = pos;
                    self.on_ping_ack();
                    continue;
                }
            }
            self.client_payload_left = head.len;
            pos += HEADER;
            self.on_client_frame(head);
            if self.phase == Phase::Off {
                // Everything from here on passes as it comes.
                pos = joined.len();
            }
        }
        self.kept = joined[pos..].to_vec();
        if out.is_empty() && from == 0 {
            return match joined {
                Cow::Borrowed(b) => Cow::Borrowed(&b[..pos]),
                Cow::Owned(mut v) => {
                    v.truncate(pos);
                    Cow::Owned(v)
                }
            };
        }
        out.extend_from_slice(&joined[from..pos]);
        Cow::Owned(out)
    }

    /// The server sent `data`: what to send the client, with the holder's frames put in
    /// between the server's where their time has come.
    pub fn on_responses<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        self.follow_server(data, true)
    }

    /// Server bytes that went to the client before this followed the connection: what falls
    /// due in them waits for [`Self::take_for_client`].
    pub fn passed_responses(&mut self, data: &[u8]) {
        let _ = self.follow_server(data, false);
    }

    fn follow_server<'a>(&mut self, data: &'a [u8], insert: bool) -> Cow<'a, [u8]> {
        let mut out: Option<Vec<u8>> = None;
        let mut from = 0;
        let mut pos = 0;
        while pos < data.len() && !matches!(self.phase, Phase::Off | Phase::Done) {
            let f = &mut self.from_server;
            if f.payload_left > 0 {
                let n = f.payload_left.min(data.len() - pos);
                f.payload_left -= n;
                pos += n;
            } else {
                let n = (HEADER - f.have).min(data.len() - pos);
                f.header[f.have..f.have + n].copy_from_slice(&data[pos..pos + n]);
                f.have += n;
                pos += n;
                if f.have < HEADER {
                    break;
                }
                f.have = 0;
                let head = parse_head(&f.header);
                f.payload_left = head.len;
                self.on_server_frame(head);
            }
            if self.from_server.payload_left == 0 && self.from_server.have == 0 {
                self.from_server.passed += 1;
                if !insert {
                    self.fall_due();
                } else if let Some(frames) = self.due() {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(data.len() + frames.len()));
                    o.extend_from_slice(&data[from..pos]);
                    o.extend_from_slice(&frames);
                    from = pos;
                }
            }
        }
        match out {
            Some(mut o) => {
                o.extend_from_slice(&data[from..]);
                Cow::Owned(o)
            }
            None => Cow::Borrowed(data),
        }
    }

    /// Frames for the client that can go now, between two of the server's frames: after the
    /// client's side moved things on (its `PING` ACK, the end of its last stream).
    pub fn take_for_client(&mut self) -> Option<Vec<u8>> {
        if !self.from_server.at_boundary() {
            return None;
        }
        self.due()
    }

    /// Whether the client's side moved things on, so that [`Self::take_for_client`] may have
    /// frames to send or the connection may be done.
    pub fn has_for_client(&self) -> bool {
        !self.outbox.is_empty() || self.ready_to_start() || self.ready_to_close()
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
        self.told
    }

    /// No stream is open (or the agent is stopping) and the server has sent its first frame
    /// (the SETTINGS its preface starts with).
    fn ready_to_start(&self) -> bool {
        self.phase == Phase::Serving
            && self.from_server.passed > 0
            && (self.streams.is_empty() || self.hurried)
    }

    fn ready_to_close(&self) -> bool {
        self.phase == Phase::Final && self.streams.is_empty()
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
            self.told = true;
            Some(std::mem::take(&mut self.outbox))
        }
    }

    /// Puts the first `GOAWAY` and the `PING` in the outbox when their time has come.
    fn fall_due(&mut self) {
        if self.ready_to_start() {
            self.outbox.extend_from_slice(&goaway(ANY_STREAM));
            self.outbox.extend_from_slice(&control(PING, OPAQUE));
            self.phase = Phase::Pinged;
        }
    }

    fn on_ping_ack(&mut self) {
        if self.phase == Phase::Pinged {
            // Every stream the client opened before it read the first GOAWAY is known now.
            self.outbox.extend_from_slice(&goaway(self.last_stream));
            self.phase = Phase::Final;
        }
    }

    fn on_client_frame(&mut self, head: FrameHead) {
        match head.kind {
            HEADERS if head.stream % 2 == 1 && head.stream > self.last_stream => {
                self.last_stream = head.stream;
                self.streams.insert(
                    head.stream,
                    Halves {
                        client: head.flags & END_STREAM != 0,
                        server: false,
                    },
                );
            }
            HEADERS | DATA if head.flags & END_STREAM != 0 => self.end_half(head.stream, true),
            RST_STREAM => self.reset(head.stream),
            // The client leaving of its own accord; once told, it is leaving as asked.
            GOAWAY if self.phase == Phase::Serving => self.phase = Phase::Off,
            _ => {}
        }
    }

    fn on_server_frame(&mut self, head: FrameHead) {
        if self.from_server.passed == 0 && head.kind != SETTINGS {
            // An HTTP/2 server's first frame is its SETTINGS: this one does not speak HTTP/2.
            self.phase = Phase::Off;
            return;
        }
        match head.kind {
            HEADERS | DATA if head.flags & END_STREAM != 0 => self.end_half(head.stream, false),
            RST_STREAM => self.reset(head.stream),
            GOAWAY | PUSH_PROMISE => {
                // The server is closing (or pushing) itself: what the holder has not said yet
                // is no longer its to say (a later GOAWAY may not name a larger stream).
                self.phase = Phase::Off;
                self.outbox.clear();
            }
            _ => {}
        }
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
}

#[cfg(test)]
mod tests;
