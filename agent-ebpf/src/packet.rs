//! Parsing of the IP and TCP headers of a segment seen by a cgroup_skb program, whose data
//! starts at the network header.

use core::{
    ffi::c_void,
    mem::{size_of, MaybeUninit},
};

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::SkBuffContext};
use surge_common::ConnKey;

#[derive(Clone, Copy)]
pub enum Direction {
    /// Arriving at a local socket: the local endpoint is the destination.
    Ingress,
    /// Leaving a local socket: the local endpoint is the source.
    Egress,
}

/// The parts of a TCP segment the accounting needs.
pub struct Segment {
    pub conn: ConnKey,
    /// The sequence number of the payload's first byte (a SYN's own number is the SYN's).
    pub seq: u32,
    pub payload_offset: usize,
    pub payload_len: usize,
    pub fin: bool,
    pub rst: bool,
}

const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// Not a TCP segment Surge can account (not IP, not TCP, a fragment, truncated).
const SKIP: i64 = -1;

impl Segment {
    #[inline(always)]
    pub fn parse(ctx: &SkBuffContext, dir: Direction) -> Result<Self, i64> {
        // As few loads as can be (the helper call is the expensive part): an IPv4 header
        // without options and the TCP header's first 16 bytes come in one; other headers take
        // one more. Loaded into uninitialized words and taken apart by shifts: zeroing or
        // copying byte arrays costs a byte loop per array in BPF.
        let head: [u32; 9] = load(ctx, 0)?;
        let ip = [head[0], head[1], head[2], head[3], head[4]];
        let byte = |word: u32, i: u32| (word >> (8 * i)) as u8;
        let first = byte(ip[0], 0);
        let (src, dst, l4) = match first >> 4 {
            4 => {
                if byte(ip[2], 1) != IPPROTO_TCP {
                    return Err(SKIP);
                }
                // Fragment offset or more-fragments set: not the first fragment of a segment.
                let frag = u16::from_be_bytes([byte(ip[1], 2), byte(ip[1], 3)]);
                if frag & 0x3fff != 0 {
                    return Err(SKIP);
                }
                (v4_mapped(ip[3]), v4_mapped(ip[4]), ((first & 0x0f) as usize) * 4)
            }
            6 => {
                if byte(ip[1], 2) != IPPROTO_TCP {
                    return Err(SKIP);
                }
                let src: [u32; 4] = load(ctx, 8)?;
                let dst: [u32; 4] = load(ctx, 24)?;
                (src, dst, 40)
            }
            _ => return Err(SKIP),
        };
        if !(20..=60).contains(&l4) {
            return Err(SKIP);
        }
        // Ports, sequence number, acknowledgment number, data offset and flags.
        let tcp: [u32; 4] = if l4 == 20 {
            [head[5], head[6], head[7], head[8]]
        } else {
            load(ctx, l4)?
        };
        let sport = u16::from_be_bytes([byte(tcp[0], 0), byte(tcp[0], 1)]);
        let dport = u16::from_be_bytes([byte(tcp[0], 2), byte(tcp[0], 3)]);
        // TCP Fast Open: a SYN's payload starts one past the SYN's own sequence number.
        let seq = u32::from_be(tcp[1]).wrapping_add((byte(tcp[3], 1) & TCP_SYN != 0) as u32);
        let tcp_len = ((byte(tcp[3], 0) >> 4) as usize) * 4;
        let flags = byte(tcp[3], 1);
        let (src, dst) = (words_to_bytes(src), words_to_bytes(dst));
        let payload_offset = l4 + tcp_len;
        let total = ctx.len() as usize;
        let payload_len = total.saturating_sub(payload_offset);
        let conn = match dir {
            Direction::Ingress => ConnKey {
                local_addr: dst,
                remote_addr: src,
                local_port: dport,
                remote_port: sport,
            },
            Direction::Egress => ConnKey {
                local_addr: src,
                remote_addr: dst,
                local_port: sport,
                remote_port: dport,
            },
        };
        Ok(Segment {
            conn,
            seq,
            payload_offset,
            payload_len,
            fin: flags & TCP_FIN != 0,
            rst: flags & TCP_RST != 0,
        })
    }
}

/// `size_of::<T>()` bytes at `offset` of the packet, loaded into an uninitialized `T` (the
/// helper takes uninitialized memory; no zeroing first). `T` is a plain array of integers.
#[inline(always)]
pub fn load<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Result<T, i64> {
    let mut out = MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes into `out` or fails.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            offset as u32,
            out.as_mut_ptr() as *mut c_void,
            size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        return Err(ret);
    }
    // SAFETY: every byte was written; any bit pattern is a valid integer array.
    Ok(unsafe { out.assume_init() })
}

/// An IPv4 address (as it lies in the header) as an IPv4-mapped IPv6 address, in words.
#[inline(always)]
fn v4_mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

/// The address bytes as they lie in memory.
#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, any bit pattern is valid.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}
