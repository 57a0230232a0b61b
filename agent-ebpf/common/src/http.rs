//! Where HTTP/1.x messages start: the one classifier both the kernel programs and the userspace
//! tests and fuzzers run. It looks only at a fixed-size prefix of a TCP segment's payload and
//! uses constant indexing only, so the verifier accepts it and no `memcmp` is needed.

/// How many payload bytes the kernel copies out of a segment for classification.
pub const PREFIX_LEN: usize = 16;

/// What the first bytes of a segment say about the HTTP message stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentStart {
    /// The first line of a request: a method, a space, then a request target.
    Request,
    /// A final response status line (`HTTP/1.x` then a status from 200 to 599, or 1xx
    /// `101 Switching Protocols`, which ends the HTTP exchange).
    FinalResponse,
    /// An interim `1xx` response (such as `100 Continue`): the request is still in flight.
    InterimResponse,
    /// Anything else: a body, a continuation, TLS, garbage.
    Other,
}

/// `true` when `p` (its first `len` bytes valid, the rest zero) starts with `pat`.
#[inline(always)]
fn starts_with(p: &[u8; PREFIX_LEN], len: usize, pat: &[u8]) -> bool {
    if len < pat.len() || pat.len() > PREFIX_LEN {
        return false;
    }
    let mut i = 0;
    while i < pat.len() {
        if p[i] != pat[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The request methods of RFC 9110 plus PATCH, each with its trailing space.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

/// Length of the method (with its trailing space) that `p` starts with, if any.
#[inline(always)]
fn method_len(p: &[u8; PREFIX_LEN], len: usize) -> Option<usize> {
    let mut m = 0;
    while m < METHODS.len() {
        if starts_with(p, len, METHODS[m]) {
            return Some(METHODS[m].len());
        }
        m += 1;
    }
    None
}

/// A request target starts with `/` (origin form), `*` (asterisk form) or a letter (absolute
/// form `http://…`, or the authority form of CONNECT).
#[inline(always)]
fn is_target_start(b: u8) -> bool {
    b == b'/' || b == b'*' || b.is_ascii_alphabetic()
}

/// Classifies the first `len` bytes of a segment payload (copied into `p`, the rest zeroed).
#[inline(always)]
pub fn classify(p: &[u8; PREFIX_LEN], len: usize) -> SegmentStart {
    if let Some(m) = method_len(p, len) {
        // Safe index: the longest method plus one byte is within PREFIX_LEN.
        if m < len && m < PREFIX_LEN && is_target_start(p[m]) {
            return SegmentStart::Request;
        }
        return SegmentStart::Other;
    }
    // "HTTP/1.1 200" is 12 bytes: version, space, three status digits.
    if starts_with(p, len, b"HTTP/1.") && len >= 12 && p[8] == b' ' {
        let (h, t, u) = (p[9], p[10], p[11]);
        if !(h.is_ascii_digit() && t.is_ascii_digit() && u.is_ascii_digit()) {
            return SegmentStart::Other;
        }
        return match h {
            b'1' if t == b'0' && u == b'1' => SegmentStart::FinalResponse,
            b'1' => SegmentStart::InterimResponse,
            b'2'..=b'5' => SegmentStart::FinalResponse,
            _ => SegmentStart::Other,
        };
    }
    SegmentStart::Other
}

/// Copies up to `PREFIX_LEN` bytes of `payload` into a zeroed prefix buffer, as the kernel does.
pub fn prefix_of(payload: &[u8]) -> ([u8; PREFIX_LEN], usize) {
    let mut p = [0u8; PREFIX_LEN];
    let len = payload.len().min(PREFIX_LEN);
    p[..len].copy_from_slice(&payload[..len]);
    (p, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_bytes(b: &[u8]) -> SegmentStart {
        let (p, len) = prefix_of(b);
        classify(&p, len)
    }

    #[test]
    fn request_lines_are_request_starts() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /upload HTTP/1.1\r\n",
            b"DELETE /x HTTP/1.0",
            b"OPTIONS * HTTP/1.1",
            b"CONNECT example:443 HTTP/1.1",
            b"GET http://a/ HTTP/1.1",
        ] {
            assert_eq!(classify_bytes(line), SegmentStart::Request, "{:?}", line);
        }
    }

    #[test]
    fn status_lines_are_classified_by_code() {
        assert_eq!(
            classify_bytes(b"HTTP/1.1 200 OK\r\n"),
            SegmentStart::FinalResponse
        );
        assert_eq!(
            classify_bytes(b"HTTP/1.0 503 Unavailable"),
            SegmentStart::FinalResponse
        );
        assert_eq!(
            classify_bytes(b"HTTP/1.1 100 Continue"),
            SegmentStart::InterimResponse
        );
        assert_eq!(
            classify_bytes(b"HTTP/1.1 101 Switching"),
            SegmentStart::FinalResponse
        );
        assert_eq!(classify_bytes(b"HTTP/1.1 600 Nope"), SegmentStart::Other);
        assert_eq!(classify_bytes(b"HTTP/1.1 2x0 OK"), SegmentStart::Other);
    }

    #[test]
    fn bodies_garbage_and_short_segments_are_other() {
        for b in [
            &b""[..],
            b"GET",
            b"GET ",
            b"GET \x00",
            b"get / HTTP/1.1",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"HTTP/1.1 20",
            b"{\"json\": true}",
            b"PRI * HTTP/2.0\r\n",
        ] {
            assert_eq!(classify_bytes(b), SegmentStart::Other, "{:?}", b);
        }
    }
}
