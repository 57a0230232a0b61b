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
        let first: u8 = ctx.load(0).map_err(|e| e as i64)?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        let l4 = match first >> 4 {
            4 => {
                let proto: u8 = ctx.load(9).map_err(|e| e as i64)?;
                if proto != IPPROTO_TCP {
                    return Err(SKIP);
                }
                // Fragment offset or more-fragments set: not the first fragment of a segment.
                let frag: u16 = u16::from_be(ctx.load(6).map_err(|e| e as i64)?);
                if frag & 0x3fff != 0 {
                    return Err(SKIP);
                }
                let s: [u8; 4] = ctx.load(12).map_err(|e| e as i64)?;
                let d: [u8; 4] = ctx.load(16).map_err(|e| e as i64)?;
                v4_mapped(&mut src, s);
                v4_mapped(&mut dst, d);
                ((first & 0x0f) as usize) * 4
            }
            6 => {
                let next: u8 = ctx.load(6).map_err(|e| e as i64)?;
                if next != IPPROTO_TCP {
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
        let ports: [u8; 4] = ctx.load(l4).map_err(|e| e as i64)?;
        let sport = u16::from_be_bytes([ports[0], ports[1]]);
        let dport = u16::from_be_bytes([ports[2], ports[3]]);
        let seq = u32::from_be(ctx.load(l4 + 4).map_err(|e| e as i64)?);
        let off_flags: [u8; 2] = ctx.load(l4 + 12).map_err(|e| e as i64)?;
        let tcp_len = ((off_flags[0] >> 4) as usize) * 4;
        let flags = off_flags[1];
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

#[inline(always)]
fn v4_mapped(out: &mut [u8; 16], a: [u8; 4]) {
    out[10] = 0xff;
    out[11] = 0xff;
    out[12] = a[0];
    out[13] = a[1];
    out[14] = a[2];
    out[15] = a[3];
}
