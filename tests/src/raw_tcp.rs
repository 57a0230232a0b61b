//! Hand-made TCP segments, sent with a raw socket (root): what the kernel receives when no
//! socket of its own sent it, such as a client's late segment of a connection the server has
//! already reset away.

use std::net::SocketAddrV4;

/// Sends one TCP segment (ACK and PSH, with `payload`) from `from` to `to` over IPv4; the
/// kernel adds the IP header.
pub fn send_segment(from: SocketAddrV4, to: SocketAddrV4, seq: u32, payload: &[u8]) -> std::io::Result<()> {
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend_from_slice(&from.port().to_be_bytes());
    segment.extend_from_slice(&to.port().to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&1u32.to_be_bytes()); // acknowledgment number
    segment.push(5 << 4); // data offset: 5 words, no options
    segment.push(0x18); // ACK | PSH
    segment.extend_from_slice(&u16::MAX.to_be_bytes()); // window
    segment.extend_from_slice(&[0, 0]); // checksum, below
    segment.extend_from_slice(&[0, 0]); // urgent pointer
    segment.extend_from_slice(payload);
    let sum = checksum(from, to, &segment);
    segment[16..18].copy_from_slice(&sum.to_be_bytes());

    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            segment.as_ptr() as *const libc::c_void,
            segment.len(),
            0,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if sent < 0 {
            return Err(error);
        }
    }
    Ok(())
}

/// The TCP checksum: the ones' complement sum over the IPv4 pseudo-header and the segment.
fn checksum(from: SocketAddrV4, to: SocketAddrV4, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len() + 1);
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.push(0);
    pseudo.push(libc::IPPROTO_TCP as u8);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sequence number of the next byte `stream` will send, read in TCP repair mode (root).
/// With everything sent acknowledged, the bytes just before it are the last ones sent: a
/// segment that carries them again is a retransmission.
pub fn next_send_seq(stream: &std::net::TcpStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = stream.as_raw_fd();
    let set = |option: libc::c_int, value: libc::c_int| {
        // SAFETY: an int option on a descriptor `stream` keeps open.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                option,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    set(TCP_REPAIR, 1)?;
    let read = (|| {
        set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        let mut seq: u32 = 0;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: a u32 option read into `seq`, on a descriptor `stream` keeps open.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                &mut seq as *mut u32 as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(seq)
        }
    })();
    // Out of repair mode whatever happened: the connection goes on as before.
    set(TCP_REPAIR, 0)?;
    read
}
