//! Parsing of the IP and TCP headers of a segment seen by a cgroup_skb program, whose data
//! starts at the network header.

use aya_ebpf::programs::SkBuffContext;
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
    pub seq: u32,
    pub payload_offset: usize,
    pub payload_len: usize,
    pub fin: bool,
    pub rst: bool,
}

const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Not a TCP segment Surge can account (not IP, not TCP, a fragment, truncated).
const SKIP: i64 = -1;

impl Segment {
    #[inline(always)]
    pub fn parse(ctx: &SkBuffContext, dir: Direction) -> Result<Self, i64> {
        // One load per header (the helper call is the expensive part): the IPv4 header's fixed
        // 20 bytes (the IPv6 header's first 20, then its addresses), then the TCP header's first 14.
        let mut v4 = [0u8; 20];
        load_into(ctx, 0, &mut v4)?;
        let first = v4[0];
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        let l4 = match first >> 4 {
            4 => {
                let ip = &v4;
                if ip[9] != IPPROTO_TCP {
                    return Err(SKIP);
                }
                // Fragment offset or more-fragments set: not the first fragment of a segment.
                let frag = u16::from_be_bytes([ip[6], ip[7]]);
                if frag & 0x3fff != 0 {
                    return Err(SKIP);
                }
                v4_mapped(&mut src, [ip[12], ip[13], ip[14], ip[15]]);
                v4_mapped(&mut dst, [ip[16], ip[17], ip[18], ip[19]]);
                ((first & 0x0f) as usize) * 4
            }
            6 => {
                if v4[6] != IPPROTO_TCP {
                    return Err(SKIP);
                }
                src = ctx.load(8).map_err(|e| e as i64)?;
                dst = ctx.load(24).map_err(|e| e as i64)?;
                40
            }
            _ => return Err(SKIP),
        };
        if !(20..=60).contains(&l4) {
            return Err(SKIP);
        }
        let mut tcp = [0u8; 14];
        load_into(ctx, l4, &mut tcp)?;
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let tcp_len = ((tcp[12] >> 4) as usize) * 4;
        let flags = tcp[13];
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

/// Copies `N` bytes at `offset` of the packet straight into `buf` (no temporary on the stack,
/// which the verifier's 512-byte limit makes scarce).
#[inline(always)]
fn load_into<const N: usize>(ctx: &SkBuffContext, offset: usize, buf: &mut [u8; N]) -> Result<(), i64> {
    // SAFETY: the helper writes at most N bytes into `buf` and checks the packet's bounds.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const core::ffi::c_void,
            offset as u32,
            buf.as_mut_ptr() as *mut core::ffi::c_void,
            N as u32,
        )
    };
    if ret < 0 {
        Err(ret)
    } else {
        Ok(())
    }
}

#[inline(always)]
fn v4_mapped(out: &mut [u8; 16], a: [u8; 4]) {
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = a[0];
    out[13] = a[1];
    out[14] = a[2];
    out[15] = a[3];
}
