//! The userspace twin of the kernel's framing, fuzzed: pipelined messages split into random
//! segments are counted exactly, garbage counts nothing, and nothing panics.

extern crate std;

use std::{format, vec, vec::Vec};

use proptest::prelude::*;

use super::*;

/// The kernel's bound on rounds per segment.
const MAX_ROUNDS: usize = 8192;

fn feed_all(segments: &[&[u8]], side: Side) -> (Starts, Framer) {
    let mut f = Framer::new();
    let mut total = Starts::default();
    for s in segments {
        let st = f.feed(s, side, MAX_ROUNDS);
        total.messages += st.messages;
        total.interim += st.interim;
        total.probes += st.probes;
    }
    (total, f)
}

/// A small deterministic generator, so the million-case loops are fast and replayable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// `User-Agent` lines, and whether each names a health probe.
const USER_AGENTS: [(&str, bool); 9] = [
    ("User-Agent: kube-probe/1.31\r\n", true),
    ("user-agent:kube-probe/1.28.3\r\n", true),
    ("USER-AGENT: \t surge-probe\r\n", true),
    ("User-Agent: surge-probe/0.1\r\n", true),
    ("User-Agent: kube-probe\r\n", false),
    ("User-Agent: Kube-Probe/1.31\r\n", false),
    ("User-Agent: curl/8.5.0\r\n", false),
    ("User-Agent: Mozilla/5.0 (kube-probe/1.31)\r\n", false),
    ("User-Agents: kube-probe/1.31\r\n", false),
];

/// One request: a method, headers in random case, and a body framed by length, chunks, or none.
/// Bodies may contain text that looks like a request line: it must not count.
fn request(r: &mut Rng) -> Vec<u8> {
    request_maybe_probe(r).0
}

/// [`request`], some with a `User-Agent` (a health probe's or not): also whether it is a probe.
fn request_maybe_probe(r: &mut Rng) -> (Vec<u8>, bool) {
    let method = METHODS[r.below(METHODS.len() as u64) as usize];
    let mut out = format!(
        "{method} /p{}?q={} HTTP/1.1\r\nHost: x\r\n",
        r.below(1000),
        r.below(1 << 20)
    )
    .into_bytes();
    let mut probe = false;
    for _ in 0..r.below(4) {
        if r.below(3) == 0 && !probe {
            let (line, is_probe) = USER_AGENTS[r.below(USER_AGENTS.len() as u64) as usize];
            out.extend_from_slice(line.as_bytes());
            probe = is_probe;
            continue;
        }
        out.extend_from_slice(
            format!("X-H{}: {}\r\n", r.below(100), "v".repeat(r.below(40) as usize)).as_bytes(),
        );
    }
    (with_body(r, out), probe)
}

/// Ends the head of a request and adds a body, framed by length, chunks, or none.
fn with_body(r: &mut Rng, mut out: Vec<u8>) -> Vec<u8> {
    let body = body(r);
    match r.below(3) {
        0 if body.is_empty() => {}
        0 | 1 => {
            let name = if r.below(2) == 0 {
                "Content-Length"
            } else {
                "content-LENGTH"
            };
            out.extend_from_slice(format!("{name}: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
            return out;
        }
        _ => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            chunked(r, &body, &mut out);
            return out;
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Random bytes that bodies are cut from (generating each body anew would dominate the run).
fn noise() -> &'static [u8] {
    static NOISE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    NOISE.get_or_init(|| Rng(0x5eed).bytes(140_000))
}

fn body(r: &mut Rng) -> Vec<u8> {
    let len = match r.below(8) {
        0 => return Vec::new(),
        1 => return b"GET / HTTP/1.1\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".to_vec(),
        2..=5 => r.below(300),
        6 => r.below(3000),
        _ => r.below(70_000),
    } as usize;
    let start = r.below(70_000) as usize;
    noise()[start..start + len].to_vec()
}

fn chunked(r: &mut Rng, body: &[u8], out: &mut Vec<u8>) {
    let mut rest = body;
    while !rest.is_empty() {
        let n = (1 + r.below(5000) as usize).min(rest.len());
        let ext = if r.below(4) == 0 { ";ext=1" } else { "" };
        out.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    if r.below(3) == 0 {
        out.extend_from_slice(b"Trailer-X: 1\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// One response (with an interim `100 Continue` before it, sometimes).
fn response(r: &mut Rng, interim: &mut u32) -> Vec<u8> {
    let mut out = Vec::new();
    if r.below(5) == 0 {
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        *interim += 1;
    }
    match r.below(4) {
        // A response never counts as a probe, whatever its headers say.
        0 => out.extend_from_slice(
            b"HTTP/1.1 204 No Content\r\nServer: s\r\nUser-Agent: kube-probe/1.31\r\n\r\n",
        ),
        1 => {
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            let b = body(r);
            chunked(r, &b, &mut out);
        }
        _ => {
            let b = body(r);
            out.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", b.len()).as_bytes(),
            );
            out.extend_from_slice(&b);
        }
    }
    out
}

/// Cuts `stream` at random places into segments.
fn split<'a>(r: &mut Rng, stream: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = match r.below(3) {
            0 => 1 + r.below(8),
            1 => 1 + r.below(200),
            _ => 1 + r.below(65_000),
        } as usize;
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

fn pipelined_requests_case(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let n = 1 + r.below(12) as u32;
    let (mut stream, mut probes) = (Vec::new(), 0);
    for _ in 0..n {
        let (request, probe) = request_maybe_probe(&mut r);
        stream.extend(request);
        probes += probe as u32;
    }
    let segments = split(&mut r, &stream);
    let (starts, f) = feed_all(&segments, Side::Requests);
    assert_eq!(starts.messages, n, "seed {seed}");
    assert_eq!(starts.probes, probes, "seed {seed}: health probes");
    assert_eq!(f.phase, START, "seed {seed}: ends between messages");
}

fn pipelined_responses_case(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let n = 1 + r.below(12) as u32;
    let (mut stream, mut interim) = (Vec::new(), 0);
    for _ in 0..n {
        stream.extend(response(&mut r, &mut interim));
    }
    let segments = split(&mut r, &stream);
    let (starts, _) = feed_all(&segments, Side::Responses);
    assert_eq!(
        (starts.messages, starts.interim, starts.probes),
        (n, interim, 0),
        "seed {seed}"
    );
}

fn garbage_case(seed: u64) {
    let mut r = Rng(seed | 1);
    let len = r.below(4000) as usize;
    let stream = r.bytes(len);
    let segments = split(&mut r, &stream);
    for side in [Side::Requests, Side::Responses] {
        let (starts, _) = feed_all(&segments, side);
        assert_eq!(starts, Starts::default(), "seed {seed}");
    }
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Frames that carry no stream event: SETTINGS (ack), PING, WINDOW_UPDATE, PRIORITY.
fn h2_noise(r: &mut Rng, out: &mut Vec<u8>, stream: u32) {
    match r.below(5) {
        0 => h2_frame(out, 4, 1, 0, &[]),
        1 => h2_frame(out, 6, 0, 0, &[7; 8]),
        2 => h2_frame(out, 8, 0, stream, &[0, 0, 1, 0]),
        3 => h2_frame(out, 2, 0, stream, &[0, 0, 0, 0, 16]),
        _ => {}
    }
}

/// A client's h2c/gRPC connection with `n` streams (HEADERS, maybe CONTINUATION, DATA), and the
/// server's side: SETTINGS first, then per stream HEADERS, DATA, and an end (END_STREAM on DATA
/// or trailers, or RST_STREAM).
fn h2_case(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x94D0_49BB_1331_11EB) | 1);
    let n = 1 + r.below(20) as u32;
    let (mut client, mut server) = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), Vec::new());
    h2_frame(&mut client, 4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    h2_frame(&mut server, 4, 0, 0, &[0, 4, 0, 1, 0, 0, 0, 5, 0, 0x40, 0, 0]);
    let mut id = 1;
    for _ in 0..n {
        let len = 1 + r.below(300) as usize;
        let block = r.bytes(len);
        let body_flags = if r.below(2) == 0 { 5 } else { 4 };
        h2_frame(&mut client, 1, body_flags, id, &block);
        if body_flags == 4 {
            h2_frame(&mut client, 9, 4, id, &[1, 2, 3]);
        }
        h2_noise(&mut r, &mut client, id);
        for last in [false, true] {
            let data = body(&mut r);
            h2_frame(
                &mut client,
                0,
                if last { 1 } else { 0 },
                id,
                &data[..data.len().min(16_384)],
            );
        }
        let head = r.bytes(20);
        h2_frame(&mut server, 1, 4, id, &head);
        h2_noise(&mut r, &mut server, id);
        let data = body(&mut r);
        match r.below(3) {
            0 => h2_frame(&mut server, 0, 1, id, &data[..data.len().min(16_384)]),
            1 => {
                h2_frame(&mut server, 0, 0, id, &data[..data.len().min(16_384)]);
                h2_frame(&mut server, 1, 5, id, b"grpc-status: 0");
            }
            _ => h2_frame(&mut server, 3, 0, id, &[0, 0, 0, 8]),
        }
        id += 2 * (1 + r.below(3) as u32);
    }
    // A retransmitted HEADERS on an old stream id starts nothing.
    h2_frame(&mut client, 1, 4, 1, &[0]);
    let segments = split(&mut r, &client);
    let (starts, f) = feed_all(&segments, Side::Requests);
    assert_eq!(starts.messages, n, "seed {seed}: client streams");
    assert!(f.is_h2(), "seed {seed}");
    let segments = split(&mut r, &server);
    let (starts, f) = feed_all(&segments, Side::Responses);
    assert_eq!(starts.messages, n, "seed {seed}: stream ends");
    assert!(f.is_h2(), "seed {seed}");
}

#[test]
fn a_hundred_thousand_h2_connections_are_counted_exactly() {
    for seed in 0..100_000 {
        h2_case(seed);
    }
}

#[test]
fn a_million_pipelined_streams_are_counted_exactly() {
    for seed in 0..150_000 {
        pipelined_requests_case(seed);
        pipelined_responses_case(seed);
    }
}

#[test]
fn a_million_garbage_streams_count_nothing() {
    for seed in 1..1_000_001 {
        garbage_case(seed);
    }
}

#[test]
fn the_kernel_bound_loses_only_huge_header_blocks() {
    // A 1 MB header line in one segment is beyond the rounds: the stream is given up, not
    // miscounted.
    let mut s = b"GET / HTTP/1.1\r\nX: ".to_vec();
    s.extend(std::iter::repeat_n(b'a', 1_000_000));
    s.extend_from_slice(b"\r\n\r\n");
    let (starts, f) = feed_all(&[&s], Side::Requests);
    assert_eq!(starts.messages, 1);
    assert!(f.is_lost());
    // The next request at a segment start resyncs.
    let mut f2 = f;
    assert_eq!(
        f2.feed(b"GET / HTTP/1.1\r\n\r\n", Side::Requests, MAX_ROUNDS)
            .messages,
        1
    );
}

#[test]
fn protocol_switches_and_unframed_responses_stop_counting() {
    let (s, f) = feed_all(
        &[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"],
        Side::Responses,
    );
    assert_eq!(s.messages, 1);
    assert!(f.is_lost());
    let (s, f) = feed_all(&[b"HTTP/1.0 200 OK\r\n\r\nbody until close"], Side::Responses);
    assert_eq!(s.messages, 1);
    assert!(f.is_lost());
    let (s, _) = feed_all(
        &[b"PRI * HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"],
        Side::Requests,
    );
    assert_eq!(s.messages, 1, "a segment-start request resyncs");
    // After an HTTP/2 preface, bytes are frames: no HTTP/1 request line counts.
    let (s, f) = feed_all(
        &[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"],
        Side::Requests,
    );
    assert_eq!(s.messages, 0);
    assert!(f.is_h2());
}

/// A client's RST_STREAM on a stream it opened is a cancel; one on stream 0, or on a stream it
/// never opened, is not.
#[test]
fn client_resets_of_open_streams_are_cancels() {
    let mut requests = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut requests, H2_SETTINGS, 0, 0, &[]);
    for stream in [1, 3, 5] {
        h2_frame(&mut requests, H2_HEADERS, 4, stream, &[0x82]);
    }
    h2_frame(&mut requests, H2_RST_STREAM, 0, 3, &8u32.to_be_bytes());
    h2_frame(&mut requests, H2_RST_STREAM, 0, 0, &8u32.to_be_bytes());
    h2_frame(&mut requests, H2_RST_STREAM, 0, 9, &8u32.to_be_bytes());
    h2_frame(&mut requests, H2_RST_STREAM, 0, 5, &8u32.to_be_bytes());
    let mut f = Framer::new();
    let s = f.feed(&requests, Side::Requests, MAX_ROUNDS);
    assert_eq!(s.messages, 3);
    assert_eq!((s.cancel_count, s.cancelled(0), s.cancelled(1)), (2, 3, 5));
}

/// An h2c upgrade (RFC 7540 §3.2): the upgrade request is an HTTP/1.1 request answered by the
/// 101; then both sides speak HTTP/2, the client's streams starting at 3. Followed whatever the
/// segments.
#[test]
fn an_h2c_upgrade_is_followed_into_http2() {
    let mut requests = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
        Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        .to_vec();
    requests.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    h2_frame(&mut requests, H2_SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    for stream in [3, 5, 7] {
        h2_frame(
            &mut requests,
            H2_HEADERS,
            H2_END_STREAM | 4,
            stream,
            &[0x82, 0x86, 0x84],
        );
    }
    let mut responses =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec();
    h2_frame(&mut responses, H2_SETTINGS, 0, 0, &[]);
    // Stream 1: the upgrade request's answer in HTTP/2, already counted as the 101.
    h2_frame(&mut responses, H2_HEADERS, 4, 1, &[0x88]);
    h2_frame(&mut responses, H2_DATA, H2_END_STREAM, 1, b"upgraded");
    for stream in [5, 3, 7] {
        h2_frame(&mut responses, H2_HEADERS, 4, stream, &[0x88]);
        h2_frame(&mut responses, H2_DATA, H2_END_STREAM, stream, b"ok");
    }
    let mut r = Rng(11);
    for round in 0..2000 {
        let (req_segments, resp_segments) = if round == 0 {
            (vec![&requests[..]], vec![&responses[..]])
        } else {
            (split(&mut r, &requests), split(&mut r, &responses))
        };
        let (s, f) = feed_all(&req_segments, Side::Requests);
        assert_eq!(
            s.messages, 4,
            "round {round}: the upgrade request and streams 3, 5, 7"
        );
        assert!(f.is_h2(), "round {round}");
        let (s, f) = feed_all(&resp_segments, Side::Responses);
        assert_eq!(s.messages, 4, "round {round}: the 101 and streams 5, 3, 7");
        assert!(f.is_h2() && !f.is_lost(), "round {round}");
    }
    // After a 101 to anything but HTTP/2 (a WebSocket), nothing more is counted.
    let (s, f) = feed_all(
        &[
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"\x81\x1bhello over a websocket frame",
        ],
        Side::Responses,
    );
    assert_eq!(s.messages, 1);
    assert!(f.is_lost());
}

/// Requests, some HEAD, then their responses on the same connection: a HEAD response's
/// Content-Length announces a body that never comes, so the next response follows at once.
fn head_case(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1);
    let n = 1 + r.below(10) as u32;
    let (mut requests, mut responses) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let req = if r.below(3) == 0 {
            format!("HEAD /h{} HTTP/1.1\r\nHost: x\r\n\r\n", r.below(100)).into_bytes()
        } else {
            request(&mut r)
        };
        let len = 1 + r.below(5000);
        responses.extend(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes());
        if !req.starts_with(b"HEAD ") {
            responses.extend(std::iter::repeat_n(b'x', len as usize));
        }
        requests.extend(req);
    }
    let mut heads = HeadQueue::default();
    let (mut fq, mut fr) = (Framer::new(), Framer::new());
    let (mut sent, mut answered) = (0, 0);
    for seg in split(&mut r, &requests) {
        sent += fq
            .feed_carrying(seg, Side::Requests, MAX_ROUNDS, &mut heads)
            .messages;
    }
    for seg in split(&mut r, &responses) {
        answered += fr
            .feed_carrying(seg, Side::Responses, MAX_ROUNDS, &mut heads)
            .messages;
    }
    assert_eq!((sent, answered), (n, n), "seed {seed}");
    assert_eq!(fr.phase, START, "seed {seed}: ends between responses");
    assert_eq!(heads.open(), 0, "seed {seed}: every HEAD answered");
}

#[test]
fn a_hundred_thousand_connections_with_head_requests_are_framed_exactly() {
    for seed in 0..100_000 {
        head_case(seed);
    }
}

#[test]
fn a_head_response_has_no_body_whatever_its_content_length() {
    let mut heads = HeadQueue::default();
    let mut q = Framer::new();
    let sent = q.feed_carrying(
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Side::Requests,
        MAX_ROUNDS,
        &mut heads,
    );
    assert_eq!((sent.messages, heads.open()), (2, 2));
    let (mut first, mut second) = (heads, heads);
    assert_eq!(first.pop(), (true, false), "the first is HEAD");
    second.pop();
    assert_eq!(second.pop(), (false, false), "the second is not");
    let mut f = Framer::new();
    let got = f.feed_carrying(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        Side::Responses,
        MAX_ROUNDS,
        &mut heads,
    );
    assert_eq!(got.messages, 2);
    assert_eq!(f.phase, START);
    assert_eq!(heads.open(), 0);
}

#[test]
fn the_head_queue_keeps_order_beyond_its_32_bits() {
    let mut q = HeadQueue::default();
    for i in 0..40 {
        q.push(i % 2 == 0);
    }
    // The first 32 are remembered; the 8 beyond count as not HEAD.
    let popped: Vec<bool> = (0..40).map(|_| q.pop().0).collect();
    let expected: Vec<bool> = (0..40).map(|i| i < 32 && i % 2 == 0).collect();
    assert_eq!(popped, expected);
    assert_eq!(q.pop(), (false, false), "an empty queue says no");
}

/// What the kernel's request side writes back of its copy of the queue (`copy_heads_out`).
fn write_back_requests(shared: &mut HeadQueue, copy: &HeadQueue) {
    shared.pushed = copy.pushed;
    shared.forgotten = copy.forgotten;
    shared.tags = copy.tags;
}

/// What the kernel's response side writes back.
fn write_back_responses(shared: &mut HeadQueue, copy: &HeadQueue) {
    shared.popped = copy.popped;
}

/// The two sides take their copies at once, work on them, and write back in either order, as
/// the kernel's two directions do on two CPUs: every answer still gets its own request's marks,
/// in order. With the whole queue written back by both sides, as before, one side's update
/// undid the other's.
fn both_sides_at_once_case(seed: u64) {
    let mut r = Rng(seed);
    let mut shared = HeadQueue::default();
    // The model: marks of the requests written back and not yet answered, oldest first.
    let mut open = std::collections::VecDeque::new();
    for _ in 0..200 {
        let mut requests = shared;
        let mut responses = shared;
        // Requests: a few start (at most 12 open, all remembered), the newest maybe a probe.
        let mut started = Vec::new();
        for _ in 0..r.below(4) {
            if open.len() + started.len() >= 12 {
                break;
            }
            let head = r.below(2) == 0;
            requests.push(head);
            started.push((head, false));
        }
        if let Some(newest) = started.last_mut() {
            if r.below(3) == 0 {
                assert!(requests.mark_probe(), "seed {seed}");
                newest.1 = true;
            }
        }
        // Answers: only to requests whose start was written back before (causality).
        for _ in 0..r.below(4).min(open.len() as u64) {
            let expected = open.pop_front().expect("open");
            assert_eq!(responses.pop(), expected, "seed {seed}");
        }
        if r.below(2) == 0 {
            write_back_requests(&mut shared, &requests);
            write_back_responses(&mut shared, &responses);
        } else {
            write_back_responses(&mut shared, &responses);
            write_back_requests(&mut shared, &requests);
        }
        open.extend(started);
        assert_eq!(shared.open() as usize, open.len(), "seed {seed}");
    }
}

#[test]
fn the_head_queue_keeps_each_sides_updates_when_both_run_at_once() {
    for seed in 0..20_000 {
        both_sides_at_once_case(seed);
    }
}

#[test]
fn a_forgotten_queue_gives_no_marks_to_the_answers_of_its_requests() {
    let mut q = HeadQueue::default();
    q.push(true);
    q.push(true);
    q.clear();
    assert_eq!(q.open(), 0);
    assert_eq!(q.pop(), (false, false), "nothing is known to be open");
    q.push(true);
    assert_eq!(q.pop(), (true, false), "a request after the loss is remembered");
}

#[test]
fn a_request_past_the_remembered_ones_is_never_given_an_older_ones_marks() {
    let mut q = HeadQueue::default();
    // 64 HEAD requests open, then 64 more that are not remembered, one lap later.
    for _ in 0..128 {
        q.push(true);
    }
    let marks: Vec<(bool, bool)> = (0..128).map(|_| q.pop()).collect();
    let expected: Vec<(bool, bool)> = (0..128).map(|i| (i < 32, false)).collect();
    assert_eq!(marks, expected);
}

#[test]
fn the_head_queue_marks_the_newest_request_a_probe() {
    let mut q = HeadQueue::default();
    assert!(!q.mark_probe(), "no open request");
    q.push(true);
    q.push(false);
    assert!(q.mark_probe());
    q.push(false);
    assert_eq!(q.pop(), (true, false));
    assert_eq!(q.pop(), (false, true));
    assert_eq!(q.pop(), (false, false));
    // A slot reused after a pop starts with no probe bit.
    q.push(false);
    assert!(q.mark_probe());
    assert_eq!(q.pop(), (false, true));
    q.push(false);
    assert_eq!(q.pop(), (false, false));
}

/// A probe's request opens no request and its answer ends none: the request side marks it in
/// `probe_mask` (or, when it started in earlier bytes, in `late_probes`), and the response side
/// marks the answer, in order, behind the requests before it.
#[test]
fn probes_are_marked_on_both_sides_in_order() {
    let mut f = Framer::default();
    let mut heads = HeadQueue::default();
    let req = f.feed_carrying(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nUser-Agent: kube-probe/1.31\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        Side::Requests,
        usize::MAX,
        &mut heads,
    );
    assert_eq!(
        (req.messages, req.probes, req.probe_mask, req.late_probes),
        (3, 1, 0b010, 0)
    );
    let mut r = Framer::default();
    let resp = r.feed_carrying(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
        Side::Responses,
        usize::MAX,
        &mut heads,
    );
    assert_eq!((resp.messages, resp.probe_mask), (3, 0b010));

    // The request line in one segment, the User-Agent in the next: the probe is late.
    let mut f = Framer::default();
    let mut heads = HeadQueue::default();
    let first = f.feed_carrying(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        Side::Requests,
        usize::MAX,
        &mut heads,
    );
    assert_eq!((first.messages, first.probe_mask), (1, 0));
    let second = f.feed_carrying(
        b"User-Agent: surge-probe\r\n\r\n",
        Side::Requests,
        usize::MAX,
        &mut heads,
    );
    assert_eq!(
        (
            second.messages,
            second.probes,
            second.probe_mask,
            second.late_probes
        ),
        (0, 1, 0, 1)
    );
    let mut r = Framer::default();
    let resp = r.feed_carrying(
        b"HTTP/1.1 204 No Content\r\n\r\n",
        Side::Responses,
        usize::MAX,
        &mut heads,
    );
    assert_eq!((resp.messages, resp.probe_mask), (1, 0b1));
}

/// The byte-by-byte reference the kernel's rounds must equal: every byte through
/// [`Framer::step`], bodies skipped by count.
fn feed_bytewise(f: &mut Framer, data: &[u8], side: Side, heads: &mut HeadQueue) -> Starts {
    let mut starts = Starts {
        heads: *heads,
        ..Starts::default()
    };
    let (p, len) = crate::http::prefix_of(data);
    f.resync(&p, len);
    let mut i = 0;
    while i < data.len() && !f.is_lost() {
        if f.in_body() {
            i += f.skip((data.len() - i) as u64) as usize;
        } else {
            f.step(data[i], side, &mut starts);
            i += 1;
        }
    }
    f.settle_heads(side, &mut starts.heads);
    *heads = starts.heads;
    starts
}

/// What must agree after each segment (a skipped header line's name position may differ).
fn observable(f: &Framer) -> (u8, u64, u8, u32) {
    (f.phase, f.remaining, f.flags, f.last_stream)
}

/// Bytes that steer the framer, to mutate realistic streams with.
const STEERING: &[u8] = b"\r\n:; \t0123456789cCtTlL-gGuUaAkK/";

fn rounds_equal_bytewise_case(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x94D0_49BB_1331_11EB) | 1);
    let side = if r.below(2) == 0 {
        Side::Requests
    } else {
        Side::Responses
    };
    let mut stream = Vec::new();
    let mut interim = 0;
    for _ in 0..1 + r.below(6) {
        match side {
            Side::Requests => stream.extend(request(&mut r)),
            Side::Responses => stream.extend(response(&mut r, &mut interim)),
        }
    }
    for _ in 0..r.below(4) {
        let at = r.below(stream.len() as u64) as usize;
        stream[at] = if r.below(2) == 0 {
            STEERING[r.below(STEERING.len() as u64) as usize]
        } else {
            r.next() as u8
        };
    }
    let (mut rounds, mut bytewise) = (Framer::new(), Framer::new());
    let (mut heads_a, mut heads_b) = (HeadQueue::default(), HeadQueue::default());
    for seg in split(&mut r, &stream) {
        let a = rounds.feed_carrying(seg, side, usize::MAX, &mut heads_a);
        let b = feed_bytewise(&mut bytewise, seg, side, &mut heads_b);
        assert_eq!(a, b, "seed {seed}: starts in a segment");
        assert_eq!(
            observable(&rounds),
            observable(&bytewise),
            "seed {seed}: state after a segment"
        );
    }
}

#[test]
fn the_word_at_a_time_newline_search_finds_the_first_newline_in_range() {
    let mut r = Rng(7);
    for _ in 0..200_000 {
        let mut buf = [0u8; CHUNK];
        for b in buf.iter_mut() {
            // Mostly bytes next to '\n' in value, where a bit trick would slip.
            *b = match r.below(4) {
                0 => b'\n',
                1 => 0x0a ^ (1 << r.below(8)) as u8,
                2 => 0x8a,
                _ => r.next() as u8,
            };
        }
        let n = r.below(CHUNK as u64 + 1) as usize;
        let from = r.below(n as u64 + 1) as usize;
        let naive = (from..n).find(|&j| buf[j] == b'\n').unwrap_or(n);
        assert_eq!(find_lf(&buf, from, n), naive, "{buf:?} from {from} n {n}");
    }
}

#[test]
fn a_million_mutated_streams_frame_the_same_in_rounds_as_byte_by_byte() {
    for seed in 0..1_000_000 {
        rounds_equal_bytewise_case(seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_in_any_segments_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        cuts in proptest::collection::vec(1usize..64, 0..20),
    ) {
        let mut segments = Vec::new();
        let mut rest = &data[..];
        for c in cuts {
            let n = c.min(rest.len());
            segments.push(&rest[..n]);
            rest = &rest[n..];
        }
        segments.push(rest);
        for side in [Side::Requests, Side::Responses] {
            let _ = feed_all(&segments, side);
        }
    }

    #[test]
    fn pipelined_requests_are_counted_exactly(seed in any::<u64>()) {
        pipelined_requests_case(seed);
    }

    #[test]
    fn pipelined_responses_are_counted_exactly(seed in any::<u64>()) {
        pipelined_responses_case(seed);
    }

    #[test]
    fn h2_streams_are_counted_exactly(seed in any::<u64>()) {
        h2_case(seed);
    }
}
