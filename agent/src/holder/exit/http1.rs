//! When a relayed HTTP/1 connection can leave the holder's path. The first final response that
//! answers everything the client has sent gets `Connection: close` (RFC 9112 §9.6): the client
//! opens a new connection for its next request, and the connect hook sends that one straight to
//! a replica. The holder closes the relayed one once that response has passed whole.
//!
//! Pure: the bytes of each direction in, the response bytes to send on (with the header added)
//! and whether to close out. It frames both directions with the kernel's own framer
//! ([`surge_common::stream`]); anything it cannot frame as HTTP/1 (HTTP/2, a protocol switch, a
//! body that runs to the end of the connection) is relayed untouched until it ends.

use std::borrow::Cow;

use surge_common::stream::{Framer, HeadQueue, Side, LOST, START};

const CLOSE: &[u8] = b"Connection: close\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Looking for a response to mark.
    Watching,
    /// A response was marked; its body is still passing.
    Marked,
    /// The marked response has passed whole: close both connections.
    Done,
    /// Not HTTP/1 as far as the framer can tell: relay bytes until the connection ends.
    Off,
}

/// One relayed connection's way out of the holder's path.
#[derive(Debug)]
pub struct Exit {
    requests: Framer,
    responses: Framer,
    /// Requests not yet answered by a final response (and which of them are HEAD).
    open: HeadQueue,
    phase: Phase,
}

impl Exit {
    /// A connection whose client has sent `sent` so far (the held bytes).
    pub fn new(sent: &[u8]) -> Self {
        let mut exit = Self {
            requests: Framer::new(),
            responses: Framer::new(),
            open: HeadQueue::default(),
            phase: Phase::Watching,
        };
        exit.on_requests(sent);
        exit
    }

    /// The client sent `data`. False when the connection is closing: the bytes are not
    /// forwarded (the client was told the connection closes after the marked response).
    pub fn on_requests(&mut self, data: &[u8]) -> bool {
        if self.phase == Phase::Done {
            return false;
        }
        if self.phase != Phase::Off && !data.is_empty() {
            self.requests
                .feed_carrying(data, Side::Requests, rounds_for(data), &mut self.open);
            if self.requests.phase == LOST {
                self.phase = Phase::Off;
            }
        }
        true
    }

    /// The server sent `data`: what to send the client (with `Connection: close` added to the
    /// response it marks).
    pub fn on_responses<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        if matches!(self.phase, Phase::Off | Phase::Done) || data.is_empty() {
            return Cow::Borrowed(data);
        }
        let at_start = self.responses.phase == START;
        let starts = self
            .responses
            .feed_carrying(data, Side::Responses, rounds_for(data), &mut self.open);
        if self.responses.phase == LOST {
            // A marked response whose body runs to the end of the connection still ends it.
            self.phase = Phase::Off;
            return Cow::Borrowed(data);
        }
        match self.phase {
            Phase::Watching => {
                // The response starts these bytes, is the only one in them, is final, and
                // answers the last open request; the client is not midway through another.
                let answers_all = at_start
                    && starts.messages == 1
                    && starts.interim == 0
                    && self.open.open() == 0
                    && self.requests.phase == START;
                if answers_all && is_final(data) {
                    if let Some(marked) = with_close(data) {
                        self.phase = if self.responses.phase == START {
                            Phase::Done
                        } else {
                            Phase::Marked
                        };
                        return Cow::Owned(marked);
                    }
                }
            }
            Phase::Marked if self.responses.phase == START && self.open.open() == 0 => {
                self.phase = Phase::Done;
            }
            _ => {}
        }
        Cow::Borrowed(data)
    }

    /// The marked response has passed whole: the connection leaves the path now.
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// Whether `head` starts a final HTTP/1 response (status 2xx to 5xx). A `101 Switching
/// Protocols` must keep its `Connection: Upgrade`.
fn is_final(head: &[u8]) -> bool {
    head.len() > 9 && head.starts_with(b"HTTP/1.") && head[8] == b' ' && (b'2'..=b'5').contains(&head[9])
}

/// Enough framing rounds for `data` (a round takes at least one byte, or a whole body).
fn rounds_for(data: &[u8]) -> usize {
    data.len().saturating_mul(2).saturating_add(16)
}

/// `head` (a response starting at its status line) with `Connection: close` added as its last
/// header; `None` when the header block does not end within these bytes.
fn with_close(head: &[u8]) -> Option<Vec<u8>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 2;
    let mut out = Vec::with_capacity(head.len() + CLOSE.len());
    out.extend_from_slice(&head[..end]);
    out.extend_from_slice(CLOSE);
    out.extend_from_slice(&head[end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn the_answer_to_the_held_request_closes_the_connection() {
        let mut exit = Exit::new(GET);
        let out = exit.on_responses(OK);
        assert_eq!(
            text(&out),
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        assert!(exit.done());
        assert!(!exit.on_requests(GET), "nothing more reaches the server");
    }

    #[test]
    fn a_body_in_later_segments_is_waited_for() {
        let mut exit = Exit::new(GET);
        let out = exit.on_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello");
        assert!(text(&out).contains("Connection: close\r\n\r\nhello"));
        assert!(!exit.done());
        assert_eq!(&*exit.on_responses(b"world"), b"world");
        assert!(exit.done());
    }

    #[test]
    fn pipelined_requests_wait_for_the_answer_to_the_last() {
        let two = [GET, GET].concat();
        let mut exit = Exit::new(&two);
        assert_eq!(&*exit.on_responses(OK), OK, "one request is still open");
        assert!(!exit.done());
        let out = exit.on_responses(OK);
        assert!(text(&out).contains("Connection: close"));
        assert!(exit.done());
    }

    #[test]
    fn interim_responses_and_upgrades_are_not_marked() {
        let mut exit = Exit::new(GET);
        let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert_eq!(&*exit.on_responses(cont), cont);
        let out = exit.on_responses(OK);
        assert!(text(&out).contains("Connection: close"));

        let upgrade = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let mut exit = Exit::new(upgrade);
        let switching =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(&*exit.on_responses(switching), switching);
        let frames = [0x81u8, 0x02, b'h', b'i'];
        assert_eq!(&*exit.on_responses(&frames), &frames);
        assert!(!exit.done());
    }

    #[test]
    fn http2_and_other_protocols_are_relayed_untouched_by_it() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        let mut exit = Exit::new(preface);
        let settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(&*exit.on_responses(settings), settings);
        assert!(!exit.done());
        let mut exit = Exit::new(b"\x16\x03\x01\x02\x00");
        assert_eq!(
            &*exit.on_responses(b"\x16\x03\x03\x00\x7a"),
            b"\x16\x03\x03\x00\x7a"
        );
        assert!(exit.on_requests(b"more"));
        assert!(!exit.done());
    }

    #[test]
    fn a_head_split_over_reads_is_not_marked_and_the_next_answer_is() {
        let mut exit = Exit::new(GET);
        let first = b"HTTP/1.1 200 OK\r\nContent-";
        assert_eq!(&*exit.on_responses(first), first);
        assert_eq!(&*exit.on_responses(b"Length: 0\r\n\r\n"), b"Length: 0\r\n\r\n");
        assert!(!exit.done());
        assert!(exit.on_requests(GET));
        assert!(text(&exit.on_responses(OK)).contains("Connection: close"));
        assert!(exit.done());
    }
}
