use super::*;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn settings() -> Vec<u8> {
    frame(SETTINGS, 0, 0, &[])
}

fn settings_ack() -> Vec<u8> {
    frame(SETTINGS, ACK, 0, &[])
}

/// A client's preface, its SETTINGS, and a unary call on `stream` (headers, then a message
/// that ends its half).
fn held_call(stream: u32) -> Vec<u8> {
    [PREFACE.to_vec(), settings(), call(stream)].concat()
}

fn call(stream: u32) -> Vec<u8> {
    [
        frame(HEADERS, 0x4, stream, b"hpack"),
        frame(DATA, END_STREAM, stream, b"message"),
    ]
    .concat()
}

/// A server's answer on `stream`: headers, a message, trailers that end the stream.
fn answer(stream: u32) -> Vec<u8> {
    [
        frame(HEADERS, 0x4, stream, b"status"),
        frame(DATA, 0, stream, b"reply"),
        frame(HEADERS, 0x4 | END_STREAM, stream, b"trailers"),
    ]
    .concat()
}

fn first_goaway() -> Vec<u8> {
    [goaway(ANY_STREAM).to_vec(), control(PING, OPAQUE).to_vec()].concat()
}

fn ping_ack() -> Vec<u8> {
    frame(PING, ACK, 0, &OPAQUE)
}

#[test]
fn after_the_held_call_is_answered_the_client_is_told_to_go_away_gracefully() {
    let mut exit = Exit::new(&held_call(1));
    assert!(!exit.told_to_leave());
    let server = [settings(), settings_ack(), answer(1)].concat();
    let out = exit.on_responses(&server);
    assert_eq!(
        *out,
        [server.clone(), first_goaway()].concat(),
        "after the stream's end"
    );
    assert!(exit.told_to_leave());
    assert!(!exit.done());

    // The client's answer to the holder's PING is kept from the server, and calls for the
    // final GOAWAY, which names the last stream the client opened.
    let from_client = [settings_ack(), ping_ack()].concat();
    assert_eq!(
        exit.on_requests(&from_client).as_deref(),
        Some(&settings_ack()[..])
    );
    assert!(exit.has_for_client());
    assert_eq!(exit.take_for_client(), Some(goaway(1).to_vec()));
    assert!(exit.done(), "no stream is open: both connections close");
    assert!(exit.told_to_leave());
    assert_eq!(exit.on_requests(&frame(DATA, 0, 0, b"late")), None);
}

#[test]
fn an_idle_connection_is_told_after_the_servers_settings() {
    let mut exit = Exit::new(&[PREFACE.to_vec(), settings()].concat());
    let out = exit.on_responses(&settings()).into_owned();
    assert_eq!(out, [settings(), first_goaway()].concat());
}

#[test]
fn nothing_comes_before_the_servers_first_frame() {
    let mut exit = Exit::new(&[PREFACE.to_vec(), settings()].concat());
    assert!(!exit.has_for_client());
    assert_eq!(exit.take_for_client(), None);
}

#[test]
fn a_client_that_answers_the_goaway_with_its_own_is_leaving_as_asked() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    let theirs = frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(exit.on_requests(&theirs).as_deref(), Some(&theirs[..]));
    assert!(exit.told_to_leave());
    assert_eq!(exit.on_requests(&ping_ack()).as_deref(), Some(&[][..]));
    assert_eq!(exit.take_for_client(), Some(goaway(1).to_vec()));
    assert!(exit.done());
}

#[test]
fn a_server_that_goes_away_itself_after_the_client_was_told_takes_over() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    assert_eq!(exit.on_requests(&ping_ack()).as_deref(), Some(&[][..]));
    // The server's own GOAWAY passes before the holder's final one could: that one is dropped.
    let theirs = frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(*exit.on_responses(&theirs), theirs);
    assert_eq!(exit.take_for_client(), None);
    assert!(exit.told_to_leave(), "the client was told, and leaves");
    assert!(!exit.done(), "the server closes the connection itself");
}

#[test]
fn a_stopping_agent_tells_the_client_while_its_stream_is_still_open() {
    let mut exit = Exit::new(&held_call(1));
    let status = frame(HEADERS, 0x4, 1, b"status");
    assert_eq!(
        *exit.on_responses(&[settings(), status.clone()].concat()),
        [settings(), status].concat()
    );
    assert!(!exit.has_for_client(), "stream 1 is open");
    exit.hurry();
    assert!(exit.has_for_client());
    assert_eq!(exit.take_for_client(), Some(first_goaway()));
    assert_eq!(exit.on_requests(&ping_ack()).as_deref(), Some(&[][..]));
    assert_eq!(exit.take_for_client(), Some(goaway(1).to_vec()));
    assert!(!exit.done(), "stream 1 is still served");
    let rest = [
        frame(DATA, 0, 1, b"reply"),
        frame(HEADERS, 0x4 | END_STREAM, 1, b"trailers"),
    ]
    .concat();
    assert_eq!(*exit.on_responses(&rest), rest);
    assert!(exit.done());
}

#[test]
fn a_client_reset_counts_once_its_whole_frame_has_passed() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    let _ = exit.on_requests(&[call(3), ping_ack()].concat());
    assert_eq!(exit.take_for_client(), Some(goaway(3).to_vec()));
    // The client cancels stream 3; its RST_STREAM arrives in two reads.
    let reset = frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]);
    assert_eq!(
        exit.on_requests(&reset[..HEADER]).as_deref(),
        Some(&reset[..HEADER])
    );
    assert_eq!(exit.take_for_client(), None);
    assert!(!exit.done(), "4 bytes of the reset are still owed to the server");
    assert_eq!(
        exit.on_requests(&reset[HEADER..]).as_deref(),
        Some(&reset[HEADER..])
    );
    assert!(exit.has_for_client());
    assert_eq!(exit.take_for_client(), None);
    assert!(exit.done());
}

#[test]
fn a_stream_that_crosses_the_first_goaway_is_served_and_named_in_the_final_one() {
    let mut exit = Exit::new(&held_call(1));
    let out = exit.on_responses(&[settings(), answer(1)].concat()).into_owned();
    assert!(out.ends_with(&first_goaway()));

    // Stream 3 left the client before it read the GOAWAY; its PING answer comes after.
    let from_client = [call(3), ping_ack()].concat();
    assert_eq!(exit.on_requests(&from_client).as_deref(), Some(&call(3)[..]));
    assert_eq!(exit.take_for_client(), Some(goaway(3).to_vec()));
    assert!(!exit.done(), "stream 3 is still being answered");

    let answer3 = answer(3);
    assert_eq!(*exit.on_responses(&answer3), answer3);
    assert!(exit.done());
}

#[test]
fn frames_go_in_only_between_whole_server_frames() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&settings());
    // The last DATA frame ends the stream, and its payload arrives over three reads, the
    // header itself split in two (its first part is kept back until it is whole).
    let last = frame(DATA, END_STREAM, 1, b"0123456789");
    let headers = frame(HEADERS, 0x4, 1, b"status");
    let (a, rest) = last.split_at(4);
    let (b, c) = rest.split_at(8);
    assert_eq!(
        *exit.on_responses(&[headers.clone(), a.to_vec()].concat()),
        headers
    );
    assert_eq!(*exit.on_responses(b), [a, b].concat());
    assert_eq!(exit.take_for_client(), None, "mid-frame");
    assert_eq!(*exit.on_responses(c), [c.to_vec(), first_goaway()].concat());
}

#[test]
fn a_ping_answer_split_over_reads_is_still_kept_from_the_server() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    let ack = ping_ack();
    let (a, b) = ack.split_at(5);
    assert_eq!(
        exit.on_requests(a).as_deref(),
        Some(&[][..]),
        "kept back until whole"
    );
    let (b1, b2) = b.split_at(6);
    assert_eq!(exit.on_requests(b1).as_deref(), Some(&[][..]));
    let window = frame(0x8, 0, 0, &[0, 0, 1, 0]);
    let out = exit
        .on_requests(&[b2.to_vec(), window.clone()].concat())
        .map(Cow::into_owned);
    assert_eq!(out, Some(window));
    assert_eq!(exit.take_for_client(), Some(goaway(1).to_vec()));
}

#[test]
fn the_servers_own_pings_and_their_answers_pass() {
    let mut exit = Exit::new(&held_call(1));
    let server_ping = frame(PING, 0, 0, b"server!!");
    assert_eq!(
        *exit.on_responses(&[settings(), server_ping.clone()].concat()),
        [settings(), server_ping].concat()
    );
    let their_ack = frame(PING, ACK, 0, b"server!!");
    assert_eq!(exit.on_requests(&their_ack).as_deref(), Some(&their_ack[..]));
}

#[test]
fn the_clients_reset_of_its_last_stream_lets_it_be_told() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), frame(HEADERS, 0x4, 1, b"status")].concat());
    assert!(!exit.has_for_client());
    let reset = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]);
    assert_eq!(exit.on_requests(&reset).as_deref(), Some(&reset[..]));
    assert!(exit.has_for_client());
    assert_eq!(exit.take_for_client(), Some(first_goaway()));
}

#[test]
fn a_goaway_of_either_side_or_a_push_leaves_the_connection_untouched() {
    let mut exit = Exit::new(&held_call(1));
    let theirs = [
        settings(),
        frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
        answer(1),
    ]
    .concat();
    assert_eq!(*exit.on_responses(&theirs), theirs);
    assert!(!exit.told_to_leave());
    assert!(!exit.has_for_client());

    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_requests(&frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]));
    let server = [settings(), answer(1)].concat();
    assert_eq!(*exit.on_responses(&server), server);

    let mut exit = Exit::new(&held_call(1));
    let pushed = [settings(), frame(PUSH_PROMISE, 0x4, 1, &[0, 0, 0, 2]), answer(1)].concat();
    assert_eq!(*exit.on_responses(&pushed), pushed);
    assert!(!exit.done());
}

#[test]
fn a_server_that_does_not_speak_http2_is_left_alone() {
    let mut exit = Exit::new(&held_call(1));
    let refusal = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(&*exit.on_responses(refusal), refusal);
    assert!(!exit.has_for_client());
    assert_eq!(exit.take_for_client(), None);
}

fn window_update() -> Vec<u8> {
    window_update_of(256)
}

fn window_update_of(increment: u32) -> Vec<u8> {
    frame(0x8, 0, 0, &increment.to_be_bytes())
}

#[test]
fn a_frame_header_split_at_the_end_of_the_held_bytes_is_passed_once() {
    // The held bytes (already written to the replica) end 3 bytes into a frame header.
    let wu = window_update();
    let mut exit = Exit::new(&[held_call(1), wu[..3].to_vec()].concat());
    let mut to_server = Vec::new();
    // The rest of the header comes in two reads, the first too short to complete it.
    for chunk in [&wu[3..5], &wu[5..]] {
        to_server.extend_from_slice(&exit.on_requests(chunk).expect("open"));
    }
    assert_eq!(to_server, wu[3..]);

    // The same, with the replica going away of its own accord in between.
    let mut exit = Exit::new(&[held_call(1), wu[..3].to_vec()].concat());
    let _ = exit.on_responses(&[settings(), frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0])].concat());
    assert_eq!(exit.on_requests(&wu[3..]).as_deref(), Some(&wu[3..]));
}

#[test]
fn a_kept_frame_header_passes_whole_when_the_server_goes_away() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&settings());
    let wu = window_update();
    // A read ends 4 bytes into a frame header: kept back until it is whole.
    let mut to_server = exit.on_requests(&wu[..4]).expect("open").into_owned();
    assert!(to_server.is_empty());
    let _ = exit.on_responses(&frame(GOAWAY, 0, 0, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0]));
    to_server.extend_from_slice(&exit.on_requests(&wu[4..]).expect("open"));
    assert_eq!(to_server, wu);
}

#[test]
fn nothing_goes_inside_a_header_block() {
    // An answer whose header block takes two frames: HEADERS with END_STREAM but without
    // END_HEADERS, then a CONTINUATION (RFC 9113 §6.10: nothing may come between them).
    let mut exit = Exit::new(&held_call(1));
    let block = [
        settings(),
        frame(HEADERS, END_STREAM, 1, b"block part 1"),
        frame(CONTINUATION, END_HEADERS, 1, b"block part 2"),
    ]
    .concat();
    assert_eq!(
        exit.on_responses(&block).into_owned(),
        [block, first_goaway()].concat()
    );

    // The final GOAWAY waits for the end of a block too, and so does the close.
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    let _ = exit.on_requests(&call(3));
    let _ = exit.on_responses(&frame(HEADERS, 0, 3, b"block part 1"));
    let _ = exit.on_requests(&ping_ack());
    assert_eq!(exit.take_for_client(), None, "inside stream 3's header block");
    let rest = frame(CONTINUATION, END_HEADERS, 3, b"block part 2");
    assert_eq!(
        exit.on_responses(&rest).into_owned(),
        [rest, goaway(3).to_vec()].concat()
    );
    let trailers = frame(HEADERS, END_STREAM, 3, b"trailers part 1");
    assert_eq!(*exit.on_responses(&trailers), trailers);
    assert!(!exit.done(), "the trailers' CONTINUATION is still owed");
    let rest = frame(CONTINUATION, END_HEADERS, 3, b"trailers part 2");
    assert_eq!(*exit.on_responses(&rest), rest);
    assert!(exit.done());
}

#[test]
fn a_servers_own_goaway_never_names_more_than_the_holders() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    let _ = exit.on_requests(&[call(3), ping_ack()].concat());
    assert_eq!(exit.take_for_client(), Some(goaway(3).to_vec()));
    // Stream 3 is being served when the replica starts its own graceful shutdown (GOAWAY for
    // any stream first, as h2, hyper, tonic and grpc-go do), its id split over two reads.
    let theirs = frame(GOAWAY, 0, 0, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    let first = exit.on_responses(&theirs[..11]).into_owned();
    let out = [first, exit.on_responses(&theirs[11..]).into_owned()].concat();
    assert_eq!(out, goaway(3));
    let answer3 = answer(3);
    assert_eq!(*exit.on_responses(&answer3), answer3);
    assert!(!exit.done(), "the replica closes the connection itself");
    assert_eq!(exit.take_for_client(), None);
}

#[test]
fn a_stream_opened_after_the_final_goaway_never_reaches_the_server() {
    let mut exit = Exit::new(&held_call(1));
    let _ = exit.on_responses(&[settings(), answer(1)].concat());
    let _ = exit.on_requests(&[call(3), ping_ack()].concat());
    assert_eq!(exit.take_for_client(), Some(goaway(3).to_vec()));
    // The GOAWAY told the client stream 5 was not processed: it may retry it elsewhere.
    let late = [call(5), window_update()].concat();
    assert_eq!(exit.on_requests(&late).as_deref(), Some(&window_update()[..]));
    // The client counted stream 5's DATA against the connection's window, which the server,
    // never seeing it, will not give back: the holder does.
    assert!(exit.has_for_client());
    let message = b"message".len() as u32;
    assert_eq!(exit.take_for_client(), Some(window_update_of(message)));
    let answer3 = answer(3);
    assert_eq!(*exit.on_responses(&answer3), answer3);
    assert!(exit.done(), "stream 5 was never open");
}

/// A real client (the h2 crate) whose second request waits for a stream slot (the server
/// allows one stream at a time) opens that stream in the same write as its answer to the
/// holder's PING: the final GOAWAY names it, so it is served and not retried.
#[tokio::test]
async fn a_queued_stream_sent_with_the_ping_answer_is_named_in_the_final_goaway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_for(s: &mut tokio::io::DuplexStream, ms: u64) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 4096];
        let _ = tokio::time::timeout(std::time::Duration::from_millis(ms), async {
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                all.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        all
    }
    fn opened(mut b: &[u8]) -> Vec<u32> {
        let mut v = Vec::new();
        while b.len() >= HEADER {
            let h = parse_head(&b[..HEADER]);
            if h.kind == HEADERS {
                v.push(h.stream);
            }
            b = &b[HEADER + h.len..];
        }
        v
    }

    let (c, mut s) = tokio::io::duplex(1 << 16);
    let (client, connection) = h2::client::handshake(c).await.expect("handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let get = || http::Request::get("http://x/").body(()).expect("request");
    let (_r1, _) = client.send_request(get(), true).expect("request 1");
    let mut exit = Exit::new(&read_for(&mut s, 200).await);
    // The replica: one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS = 1).
    let server = [frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 1]), settings_ack()].concat();
    assert_eq!(*exit.on_responses(&server), server);
    s.write_all(&server).await.expect("write");
    let mut client = client.ready().await.expect("ready");
    let (_r3, _) = client.send_request(get(), true).expect("request 2, queued");
    let got = read_for(&mut s, 200).await;
    let _ = exit.on_requests(&got);
    let answer1 = frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0x88]);
    let out = exit.on_responses(&answer1).into_owned();
    assert!(out.ends_with(&first_goaway()));
    s.write_all(&out).await.expect("write");
    let forwarded = exit
        .on_requests(&read_for(&mut s, 200).await)
        .expect("open")
        .into_owned();
    let last = *opened(&forwarded).last().unwrap_or(&1);
    assert_eq!(exit.take_for_client(), Some(goaway(last).to_vec()));
}
