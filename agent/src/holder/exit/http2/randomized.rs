//! Randomized exchanges through the exit: a client model and a server model (each opening,
//! ending and resetting streams, with header blocks split over CONTINUATION frames, pings and
//! window updates, answering the holder's PING, stopping at its final GOAWAY; the server maybe
//! going away itself) talk through [`crate::holder::exit::Exit`], their bytes cut at random
//! points. Checked for every connection:
//! - the server gets exactly what the client sent, less the holder's PING answer and the frames
//!   of streams above the final GOAWAY, in order;
//! - the client gets exactly what the server sent, with the holder's frames only between whole
//!   frames, never inside a header block nor before the server's SETTINGS, and GOAWAY ids that
//!   never go up;
//! - the holder gives back exactly the connection window the dropped DATA took;
//! - when the exit is done, every stream the server saw has ended both ways; when it is not
//!   (and nothing is left to send), the connection was left alone on purpose.
use super::*;
use std::collections::BTreeMap;

/// xorshift64: a seed gives the same connection every time.
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
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pct(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
}

fn fr(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn payload(rng: &mut Rng) -> Vec<u8> {
    let n = if rng.pct(70) {
        rng.below(12)
    } else {
        rng.below(200)
    };
    (0..n).map(|_| rng.next() as u8).collect()
}

/// A header block: HEADERS (+ CONTINUATIONs).
fn block(rng: &mut Rng, stream: u32, end_stream: bool) -> Vec<u8> {
    let es = if end_stream { END_STREAM } else { 0 };
    if rng.pct(70) {
        fr(HEADERS, es | END_HEADERS, stream, &payload(rng))
    } else {
        let mut v = fr(HEADERS, es, stream, &payload(rng));
        for _ in 0..rng.below(2) {
            v.extend(fr(CONTINUATION, 0, stream, &payload(rng)));
        }
        v.extend(fr(CONTINUATION, END_HEADERS, stream, &payload(rng)));
        v
    }
}

/// The server model's connection window updates: an increment the holder never gives.
const SERVER_WINDOW_UPDATE: [u8; 4] = [0x40, 0, 0, 0];

#[derive(Default, Debug, Clone, Copy)]
struct St {
    mine_ended: bool,
    theirs_ended: bool,
}

/// The streams on which this side has not ended its half yet.
fn still_sending(streams: &BTreeMap<u32, St>) -> Vec<u32> {
    streams
        .iter()
        .filter(|(_, s)| !s.mine_ended)
        .map(|(k, _)| *k)
        .collect()
}

#[derive(Default)]
struct Parser {
    buf: Vec<u8>,
    pos: usize,
}
impl Parser {
    fn next(&mut self) -> Option<(FrameHead, Vec<u8>)> {
        let b = &self.buf[self.pos..];
        if b.len() < HEADER {
            return None;
        }
        let h = parse_head(&b[..HEADER]);
        if b.len() < HEADER + h.len {
            return None;
        }
        let p = b[HEADER..HEADER + h.len].to_vec();
        self.pos += HEADER + h.len;
        Some((h, p))
    }
}

#[derive(Default)]
struct Client {
    out: Vec<u8>,
    sent: Vec<Vec<u8>>, // frames in order
    next_id: u32,
    streams: BTreeMap<u32, St>,
    recv: Parser,
    from_server: Vec<u8>, // received, less the holder's frames
    in_block: bool,
    seen_settings: bool,
    goaways: Vec<u32>,
    final_last: Option<u32>,
    /// stream -> (server end seen, server reset seen)
    seen: BTreeMap<u32, (bool, bool)>,
    /// Connection window the holder gave back.
    window_given: u64,
}

#[derive(Default)]
struct Server {
    out: Vec<u8>,
    sent: Vec<u8>,
    streams: BTreeMap<u32, St>,
    recv: Parser,
    /// Streams whose client half was delivered ended / reset.
    client_done: BTreeMap<u32, bool>,
    client_rst: BTreeMap<u32, bool>,
    send_goaway: bool,
}

impl Client {
    fn push(&mut self, f: Vec<u8>) {
        let mut rest = &f[..];
        while !rest.is_empty() {
            let h = parse_head(&rest[..HEADER]);
            self.sent.push(rest[..HEADER + h.len].to_vec());
            rest = &rest[HEADER + h.len..];
        }
        self.out.extend_from_slice(&f);
    }
    fn act(&mut self, rng: &mut Rng, draining: bool) {
        let open = still_sending(&self.streams);
        match rng.below(10) {
            0..=2 if !draining && self.final_last.is_none() && self.next_id < 200 => {
                let id = self.next_id;
                self.next_id += 2;
                let es = rng.pct(40);
                let b = block(rng, id, es);
                self.push(b);
                self.streams.insert(
                    id,
                    St {
                        mine_ended: es,
                        theirs_ended: false,
                    },
                );
            }
            3..=6 if !open.is_empty() => {
                let id = open[rng.below(open.len())];
                let es = draining || rng.pct(40);
                let f = fr(DATA, if es { END_STREAM } else { 0 }, id, &payload(rng));
                self.push(f);
                self.streams.get_mut(&id).unwrap().mine_ended = es;
            }
            7 if !open.is_empty() && rng.pct(30) => {
                let id = open[rng.below(open.len())];
                self.push(fr(RST_STREAM, 0, id, &[0, 0, 0, 8]));
                self.streams.remove(&id);
            }
            8 => self.push(fr(0x8, 0, 0, &[0, 0, 1, 0])),
            9 if rng.pct(1) => self.push(fr(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0])),
            9 => self.push(fr(PING, 0, 0, b"client!!")),
            _ => {}
        }
    }
    fn read(&mut self, bytes: &[u8]) {
        self.recv.buf.extend_from_slice(bytes);
        while let Some((h, p)) = self.recv.next() {
            if h.kind == GOAWAY && h.len == 12 {
                assert!(!self.in_block);
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                if let Some(&prev) = self.goaways.last() {
                    assert!(
                        last <= prev,
                        "server GOAWAY id went up: {:?} then {last}",
                        self.goaways
                    );
                }
                self.goaways.push(last);
                // normalised id
                let mut q = p.clone();
                q[..4].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
                self.from_server
                    .extend_from_slice(&fr(h.kind, h.flags, h.stream, &q));
                continue;
            }
            if h.kind == 0x8 && h.stream == 0 && p[..] != SERVER_WINDOW_UPDATE {
                assert!(!self.in_block, "holder frame inside a header block");
                self.window_given += u64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                continue;
            }
            let holder = h.kind == GOAWAY || (h.kind == PING && h.flags & ACK == 0 && p == OPAQUE);
            if holder {
                assert!(!self.in_block, "holder frame inside a header block");
                assert!(self.seen_settings, "holder frame before the server's SETTINGS");
                if h.kind == PING {
                    self.push(fr(PING, ACK, 0, &OPAQUE));
                } else {
                    let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                    if let Some(&prev) = self.goaways.last() {
                        assert!(last <= prev, "GOAWAY ids went up: {:?} then {last}", self.goaways);
                    }
                    self.goaways.push(last);
                    if last != ANY_STREAM {
                        self.final_last = Some(last);
                        self.streams.retain(|&id, _| id <= last);
                    }
                }
                continue;
            }
            self.from_server
                .extend_from_slice(&fr(h.kind, h.flags, h.stream, &p));
            if h.kind == SETTINGS {
                self.seen_settings = true;
            }
            match h.kind {
                HEADERS => self.in_block = h.flags & END_HEADERS == 0,
                CONTINUATION => self.in_block = h.flags & END_HEADERS == 0,
                _ => {}
            }
            if matches!(h.kind, HEADERS | DATA) && h.flags & END_STREAM != 0 {
                if let Some(s) = self.streams.get_mut(&h.stream) {
                    s.theirs_ended = true;
                }
            }
            if h.kind == RST_STREAM {
                self.streams.remove(&h.stream);
            }
            if matches!(h.kind, HEADERS | DATA) && h.flags & END_STREAM != 0 || h.kind == RST_STREAM {
                let e = self.seen.entry(h.stream).or_default();
                e.0 = true;
                e.1 |= h.kind == RST_STREAM;
            }
            if h.kind == PING && h.flags & ACK == 0 {
                self.push(fr(PING, ACK, 0, &p));
            }
            self.streams.retain(|_, s| !(s.mine_ended && s.theirs_ended));
        }
    }
}

impl Server {
    fn push(&mut self, f: Vec<u8>) {
        self.out.extend_from_slice(&f);
        self.sent.extend_from_slice(&f);
    }
    fn act(&mut self, rng: &mut Rng, draining: bool) {
        let open = still_sending(&self.streams);
        match rng.below(10) {
            0..=6 if !open.is_empty() => {
                let id = open[rng.below(open.len())];
                let es = (draining && rng.pct(50)) || rng.pct(30);
                let f = if rng.pct(50) {
                    block(rng, id, es)
                } else {
                    fr(DATA, if es { END_STREAM } else { 0 }, id, &payload(rng))
                };
                self.push(f);
                self.streams.get_mut(&id).unwrap().mine_ended = es;
            }
            7 if !open.is_empty() && rng.pct(20) => {
                let id = open[rng.below(open.len())];
                self.push(fr(RST_STREAM, 0, id, &[0, 0, 0, 8]));
                self.streams.remove(&id);
            }
            8 => self.push(fr(0x8, 0, 0, &SERVER_WINDOW_UPDATE)),
            9 => self.push(fr(PING, 0, 0, b"server!!")),
            _ => {}
        }
        if self.send_goaway && rng.pct(3) {
            self.send_goaway = false;
            self.push(fr(
                GOAWAY,
                0,
                0,
                &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, b's', b'r', b'v', b'!'],
            ));
        }
    }
    fn read(&mut self, bytes: &[u8]) {
        self.recv.buf.extend_from_slice(bytes);
        while let Some((h, p)) = self.recv.next() {
            assert!(
                !(h.kind == PING && h.flags & ACK != 0 && p == OPAQUE),
                "holder's PING ACK reached the server"
            );
            if h.kind == HEADERS && h.stream % 2 == 1 && !self.client_done.contains_key(&h.stream) {
                self.streams.insert(h.stream, St::default());
                self.client_done.insert(h.stream, false);
            }
            if matches!(h.kind, HEADERS | DATA) && h.flags & END_STREAM != 0 || h.kind == RST_STREAM {
                self.client_done.insert(h.stream, true);
                if h.kind == RST_STREAM {
                    self.client_rst.insert(h.stream, true);
                }
                if let Some(s) = self.streams.get_mut(&h.stream) {
                    s.theirs_ended = true;
                }
                if h.kind == RST_STREAM {
                    self.streams.remove(&h.stream);
                }
            }
            if h.kind == PING && h.flags & ACK == 0 {
                self.push(fr(PING, ACK, 0, &p));
            }
            self.streams.retain(|_, s| !(s.mine_ended && s.theirs_ended));
        }
    }
}

fn chunk(rng: &mut Rng, buf: &mut Vec<u8>) -> Vec<u8> {
    if buf.is_empty() {
        return Vec::new();
    }
    let n = if rng.pct(50) {
        1 + rng.below(buf.len().min(12))
    } else {
        1 + rng.below(buf.len())
    };
    buf.drain(..n).collect()
}

use crate::holder::exit::Exit as Outer;

fn inner(e: &Outer) -> Option<&super::Exit> {
    match e {
        Outer::Http2(e) => Some(e),
        _ => None,
    }
}

/// Runs one connection; panics on a broken property.
fn run(seed: u64, server_goaway: bool) {
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let mut c = Client {
        next_id: 1,
        ..Default::default()
    };
    let mut s = Server {
        send_goaway: server_goaway,
        ..Default::default()
    };
    // The client's preface, SETTINGS, and maybe a call.
    c.out.extend_from_slice(PREFACE);
    c.push(fr(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0]));
    if rng.pct(80) {
        c.act(&mut rng, false);
        c.act(&mut rng, false);
    }
    s.push(fr(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
    // Held bytes.
    let k = rng.below(c.out.len() + 1);
    let held: Vec<u8> = c.out.drain(..k).collect();
    // Client bytes given to the exit so far.
    let mut fed = held.len();
    let mut exit = Outer::new(&held);
    // Undecided phase: the server may speak before the client's preface is known.
    if rng.pct(30) {
        let server_first = chunk(&mut rng, &mut s.out);
        let out = exit.on_responses(&server_first).into_owned();
        if matches!(exit, Outer::Undecided { .. }) {
            assert_eq!(out, server_first);
        }
        c.read(&out);
    }
    // What the server model got, from the preface on; it reads the frames after the preface.
    let mut to_server_raw = Vec::new();
    let preface_len = PREFACE.len();
    let mut server_frames_start = false;
    let feed_server = |s: &mut Server, raw: &mut Vec<u8>, bytes: &[u8], started: &mut bool| {
        raw.extend_from_slice(bytes);
        if !*started {
            if raw.len() >= preface_len {
                *started = true;
                assert_eq!(&raw[..preface_len], PREFACE);
                let rest = raw[preface_len..].to_vec();
                s.read(&rest);
            }
        } else {
            s.read(bytes);
        }
    };
    feed_server(&mut s, &mut to_server_raw, &held, &mut server_frames_start);

    let mut hurried = false;
    let mut done = false;
    let mut steps = 0;
    let total = 200 + rng.below(600);
    while steps < total + 5000 {
        steps += 1;
        let draining = steps > total;
        if draining
            && c.out.is_empty()
            && s.out.is_empty()
            && c.streams.values().all(|s| s.mine_ended)
            && s.streams.values().all(|s| s.mine_ended)
        {
            // quiescent?
            if !exit.has_for_client() {
                break;
            }
        }
        match rng.below(8) {
            0 => c.act(&mut rng, draining),
            1 => s.act(&mut rng, draining),
            2..=4 => {
                let b = chunk(&mut rng, &mut c.out);
                if b.is_empty() {
                    continue;
                }
                fed += b.len();
                match exit.on_requests(&b) {
                    None => {
                        assert!(exit.done());
                        done = true;
                        break;
                    }
                    Some(out) => {
                        let out = out.into_owned();
                        feed_server(&mut s, &mut to_server_raw, &out, &mut server_frames_start);
                    }
                }
                if exit.has_for_client() {
                    if let Some(f) = exit.take_for_client() {
                        c.read(&f);
                    }
                    if exit.done() {
                        done = true;
                        break;
                    }
                }
            }
            5..=7 => {
                let b = chunk(&mut rng, &mut s.out);
                if b.is_empty() {
                    continue;
                }
                let out = exit.on_responses(&b).into_owned();
                c.read(&out);
                if exit.done() {
                    done = true;
                    break;
                }
            }
            _ => {}
        }
        if !hurried && rng.pct(1) && rng.pct(20) {
            hurried = true;
            exit.hurry();
            if let Some(f) = exit.take_for_client() {
                c.read(&f);
            }
            if exit.done() {
                done = true;
                break;
            }
        }
    }
    let ctx = format!(
        "seed {seed} goaway {server_goaway} k {k} steps {steps} done {done} exit {:?}",
        inner(&exit).map(|e| (e.phase, &e.streams, e.said, e.said_final, e.server_leaving))
    );
    // Client -> server: what the server got is a prefix of what the client sent, less the
    // holder's PING ACK and the frames of streams above the final GOAWAY.
    let said_final = inner(&exit).and_then(|e| e.said_final);
    let mut expected = PREFACE.to_vec();
    for f in &c.sent {
        let h = parse_head(&f[..HEADER]);
        if h.kind == PING && h.flags & ACK != 0 && f[HEADER..] == OPAQUE {
            continue;
        }
        if h.stream % 2 == 1 && said_final.is_some_and(|l| h.stream > l) {
            continue;
        }
        expected.extend_from_slice(f);
    }
    let got = &to_server_raw;
    let common = got.iter().zip(&expected).take_while(|(a, b)| a == b).count();
    assert!(
        got.len() <= expected.len() && common == got.len(),
        "client->server diverges at {common} (got {}, expected {}) {ctx}",
        got.len(),
        expected.len()
    );
    // Server -> client: less the holder's frames, a prefix of what the server sent.
    let got = &c.from_server;
    let sent = &s.sent;
    let common = got.iter().zip(sent).take_while(|(a, b)| a == b).count();
    let partial_ok = common == got.len() && got.len() <= sent.len();
    {
        assert!(
            partial_ok,
            "server->client diverges at {common} (got {}, sent {}) {ctx}",
            got.len(),
            sent.len()
        );
    }
    // While the connection goes on, the window the dropped DATA took is given back (or owed,
    // until the holder has a boundary to say so): DATA the exit was given whole.
    let mut offset = PREFACE.len();
    let mut dropped_data = 0u64;
    for f in &c.sent {
        let h = parse_head(&f[..HEADER]);
        offset += f.len();
        if offset <= fed && h.kind == DATA && h.stream % 2 == 1 && said_final.is_some_and(|l| h.stream > l) {
            dropped_data += h.len as u64;
        }
    }
    let owed = inner(&exit).map_or(0, |e| u64::from(e.window_owed));
    assert!(
        done || c.window_given + owed == dropped_data,
        "window given back {} (+{owed} owed) for {dropped_data} dropped bytes {ctx}",
        c.window_given
    );
    if done {
        // Every stream the server saw is finished on both sides.
        for (&id, &client_done) in &s.client_done {
            if said_final.is_some_and(|l| id > l) {
                panic!("server saw stream {id} above the final GOAWAY {ctx}");
            }
            let (server_end, server_rst) = c.seen.get(&id).copied().unwrap_or_default();
            let client_rst = s.client_rst.contains_key(&id);
            assert!(
                client_done || server_rst,
                "closed before the server got stream {id}'s client half {ctx}"
            );
            assert!(
                server_end || client_rst,
                "closed before the client got stream {id}'s end {ctx}"
            );
        }
        assert!(
            c.final_last.is_some(),
            "done without a final GOAWAY delivered {ctx}"
        );
    } else if !server_goaway {
        // Quiescent without done: it would be relayed forever.
        let e = inner(&exit);
        let off = e.is_none_or(|e| e.phase == Phase::Off);
        assert!(off, "never done: {ctx}");
    }
}

#[test]
fn randomized_exchanges_through_the_exit() {
    for seed in 0..2_000 {
        for server_goaway in [false, true] {
            run(seed, server_goaway);
        }
    }
}
