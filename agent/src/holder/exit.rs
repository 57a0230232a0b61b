//! When a relayed connection can leave the holder's path: a connection accepted while its
//! service was cold would otherwise stay relayed through the agent for as long as its client
//! keeps it open (a keep-alive pool or a gRPC channel sends all its later requests through the
//! agent, and an agent restart cuts them). HTTP/1 clients are told to reconnect with
//! `Connection: close` ([`http1`]), HTTP/2 clients with a graceful `GOAWAY` ([`http2`]); the
//! connect hook sends their next connection straight to a replica. Anything else is relayed
//! untouched until it ends.

use std::borrow::Cow;

pub mod http1;
pub mod http2;

/// Server bytes kept while the protocol is not known yet, at most.
const UNDECIDED_SERVER_BYTES: usize = 64 * 1024;

/// One relayed connection's way out of the holder's path, by its protocol.
#[derive(Debug)]
pub enum Exit {
    /// The client has sent no more than a part of the HTTP/2 preface so far. Everything passes
    /// untouched; what passed is kept to follow the connection once its protocol is known.
    Undecided {
        client: Vec<u8>,
        server: Vec<u8>,
    },
    Http1(http1::Exit),
    Http2(http2::Exit),
    /// Relayed untouched until it ends.
    Off,
}

impl Exit {
    /// A connection whose client has sent `sent` so far (the held bytes): HTTP/2 if they start
    /// with its preface.
    pub fn new(sent: &[u8]) -> Self {
        let mut exit = Self::Undecided {
            client: Vec::new(),
            server: Vec::new(),
        };
        exit.decide(sent);
        exit
    }

    /// Follows the client's bytes (all passed on already) until they tell the protocol.
    fn decide(&mut self, data: &[u8]) {
        let Self::Undecided { client, server } = self else {
            return;
        };
        client.extend_from_slice(data);
        let preface = http2::PREFACE;
        if client.len() < preface.len() && preface.starts_with(client) {
            return;
        }
        *self = if client.starts_with(preface) {
            let mut e = http2::Exit::new(client);
            e.passed_responses(server);
            Self::Http2(e)
        } else if server.is_empty() {
            Self::Http1(http1::Exit::new(client))
        } else {
            // An HTTP/1 server does not speak first: whatever this is, it is left alone.
            Self::Off
        };
    }

    /// The client sent `data`: what to pass to the server. `None` once the connection is
    /// closing: nothing more reaches the server.
    pub fn on_requests<'a>(&mut self, data: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self {
            Self::Undecided { .. } => {
                self.decide(data);
                Some(Cow::Borrowed(data))
            }
            Self::Http1(e) => e.on_requests(data).then_some(Cow::Borrowed(data)),
            Self::Http2(e) => e.on_requests(data),
            Self::Off => Some(Cow::Borrowed(data)),
        }
    }

    /// The server sent `data`: what to send the client.
    pub fn on_responses<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        match self {
            Self::Undecided { server, .. } => {
                if server.len() + data.len() > UNDECIDED_SERVER_BYTES {
                    *self = Self::Off;
                } else {
                    server.extend_from_slice(data);
                }
                Cow::Borrowed(data)
            }
            Self::Http1(e) => e.on_responses(data),
            Self::Http2(e) => e.on_responses(data),
            Self::Off => Cow::Borrowed(data),
        }
    }

    /// Whether what the client sent calls for [`Self::take_for_client`].
    pub fn has_for_client(&self) -> bool {
        match self {
            Self::Http2(e) => e.has_for_client(),
            _ => false,
        }
    }

    /// What to send the client now, between two of the server's messages.
    pub fn take_for_client(&mut self) -> Option<Vec<u8>> {
        match self {
            Self::Http2(e) => e.take_for_client(),
            _ => None,
        }
    }

    /// The agent is stopping: tell the client to reconnect at the next chance, where its
    /// protocol allows that while requests are open (HTTP/2).
    pub fn hurry(&mut self) {
        if let Self::Http2(e) = self {
            e.hurry();
        }
    }

    /// The client has been told to reconnect, and everything it is owed has passed: close both
    /// connections.
    pub fn done(&self) -> bool {
        match self {
            Self::Http1(e) => e.done(),
            Self::Http2(e) => e.done(),
            _ => false,
        }
    }

    /// The client has been told to reconnect.
    pub fn told_to_leave(&self) -> bool {
        match self {
            Self::Http1(e) => e.done(),
            Self::Http2(e) => e.told_to_leave(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    /// A client's SETTINGS and a GET on stream 1 that ends its half.
    const CALL: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 1, 5, 0, 0, 0, 1, 0x82];
    /// The server's answer on stream 1: `:status 200`, ending the stream.
    const ANSWER: &[u8] = &[0, 0, 1, 1, 5, 0, 0, 0, 1, 0x88];

    #[test]
    fn the_protocol_is_told_by_the_clients_first_bytes() {
        assert!(matches!(Exit::new(b"GET / HTTP/1.1\r\n"), Exit::Http1(_)));
        assert!(matches!(Exit::new(http2::PREFACE), Exit::Http2(_)));
        assert!(matches!(Exit::new(b"\x16\x03\x01"), Exit::Http1(_)));
        assert!(matches!(Exit::new(b""), Exit::Undecided { .. }));
        assert!(matches!(Exit::new(b"PRI * HT"), Exit::Undecided { .. }));
    }

    #[test]
    fn an_http2_client_that_spoke_after_its_server_is_followed_from_the_start() {
        // Held with nothing sent: the server's SETTINGS pass before the client's preface.
        let mut exit = Exit::new(b"");
        assert_eq!(&*exit.on_responses(SETTINGS), SETTINGS);
        let (first, rest) = http2::PREFACE.split_at(5);
        assert_eq!(exit.on_requests(first).as_deref(), Some(first));
        let request = [rest, CALL].concat();
        assert_eq!(exit.on_requests(&request).as_deref(), Some(&request[..]));
        assert!(matches!(exit, Exit::Http2(_)));
        // The answer ends the only stream: the first GOAWAY follows it.
        let out = exit.on_responses(ANSWER).into_owned();
        assert!(out.starts_with(ANSWER));
        assert_eq!(out[ANSWER.len() + 3], 7, "a GOAWAY frame: {out:?}");
        assert!(exit.told_to_leave());
    }

    #[test]
    fn an_idle_http2_client_whose_server_spoke_first_is_told_at_once() {
        let mut exit = Exit::new(b"");
        let _ = exit.on_responses(SETTINGS);
        let hello = [http2::PREFACE, SETTINGS].concat();
        assert_eq!(exit.on_requests(&hello).as_deref(), Some(&hello[..]));
        assert!(exit.has_for_client());
        let frames = exit.take_for_client().expect("the first GOAWAY and the PING");
        assert_eq!((frames[3], frames[17 + 3]), (7, 6));
    }

    #[test]
    fn a_server_that_speaks_first_to_anything_else_is_left_alone() {
        let mut exit = Exit::new(b"");
        let banner = b"220 smtp ready\r\n";
        assert_eq!(&*exit.on_responses(banner), banner);
        assert_eq!(
            exit.on_requests(b"EHLO a\r\n").as_deref(),
            Some(&b"EHLO a\r\n"[..])
        );
        assert!(matches!(exit, Exit::Off));
        assert!(!exit.done() && !exit.has_for_client());
    }
}
