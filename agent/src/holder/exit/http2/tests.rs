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
    // header itself split in two.
    let last = frame(DATA, END_STREAM, 1, b"0123456789");
    let headers = frame(HEADERS, 0x4, 1, b"status");
    let (a, rest) = last.split_at(4);
    let (b, c) = rest.split_at(8);
    assert_eq!(
        *exit.on_responses(&[headers.clone(), a.to_vec()].concat()),
        [headers, a.to_vec()].concat()
    );
    assert_eq!(*exit.on_responses(b), *b);
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

#[test]
fn a_wrong_preface_leaves_the_connection_untouched() {
    let mut exit = Exit::new(&PREFACE[..10]);
    assert_eq!(exit.on_requests(b"garbage").as_deref(), Some(&b"garbage"[..]));
    assert_eq!(&*exit.on_responses(&settings()), &settings()[..]);
    assert!(!exit.has_for_client());
    assert_eq!(exit.take_for_client(), None);
    assert!(!exit.told_to_leave());
}
