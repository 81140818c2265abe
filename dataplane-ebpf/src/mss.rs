//! TCP MSS clamping for tunnelled flows. A client's packet grows by the
//! VXLAN encapsulation on its way to a backend on another node, and so do
//! the backend's replies on their way back: full-size segments no longer
//! fit, and where a firewall drops ICMP "fragmentation needed" between the
//! client and the node (common behind cloud load balancers), path MTU
//! discovery never learns it and large transfers hang. Lowering the MSS the
//! two ends announce in their SYN and SYN-ACK makes them send segments
//! that fit from the start.

use aya_ebpf::programs::TcContext;

use crate::{
    nat::{self, RewriteFailed},
    packet::{Flow, TCP_DATA_OFFSET, TCP_FLAGS, TCP_MIN_HLEN, TCP_SYN},
};

const TCP_MAX_HLEN: usize = 60;
const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_MSS: u8 = 2;
const OPTION_MSS_LEN: u8 = 4;
/// Options take at most 40 bytes and each step of the walk at least one.
const MAX_OPTION_STEPS: usize = TCP_MAX_HLEN - TCP_MIN_HLEN;

/// Lowers the MSS option of a TCP SYN or SYN-ACK to the MSS `clamp`
/// gives (None: no clamping) when it announces more; `clamp` is asked only
/// for a SYN, so the other packets of a flow pay two byte loads. Other packets, and SYNs without an MSS option (the peer
/// then assumes 536), are left alone. An MSS option at an odd offset (no
/// common stack sends one) is left alone too: its value would straddle two
/// checksum words.
#[inline(always)]
pub fn clamp(
    ctx: &TcContext,
    flow: &Flow,
    clamp: impl FnOnce() -> Option<u16>,
) -> Result<(), RewriteFailed> {
    let (Ok(flags), Ok(data_offset)) = (
        ctx.load::<u8>(flow.l4_off + TCP_FLAGS),
        ctx.load::<u8>(flow.l4_off + TCP_DATA_OFFSET),
    ) else {
        return Ok(());
    };
    if flags & TCP_SYN == 0 {
        return Ok(());
    }
    let Some(clamp) = clamp() else {
        return Ok(());
    };
    let header_len = (usize::from(data_offset >> 4) * 4).min(TCP_MAX_HLEN);
    let options_end = flow.l4_off + header_len;
    let mut offset = flow.l4_off + TCP_MIN_HLEN;
    // A load past the end of the packet ends the walk: a truncated SYN is
    // passed on as it is, never dropped for its options.
    for _ in 0..MAX_OPTION_STEPS {
        if offset >= options_end {
            break;
        }
        let Ok(kind) = ctx.load::<u8>(offset) else {
            break;
        };
        if kind == OPTION_END {
            break;
        }
        if kind == OPTION_NOP {
            offset += 1;
            continue;
        }
        if offset + 1 >= options_end {
            break;
        }
        let Ok(len) = ctx.load::<u8>(offset + 1) else {
            break;
        };
        if len < 2 {
            // Malformed: stop rather than walk into the payload.
            break;
        }
        if kind == OPTION_MSS {
            let value = offset + 2;
            if len != OPTION_MSS_LEN
                || offset + usize::from(len) > options_end
                || !(value - flow.l4_off).is_multiple_of(2)
            {
                break;
            }
            let Ok(mss_be) = ctx.load::<u16>(value) else {
                break;
            };
            if u16::from_be(mss_be) > clamp {
                nat::set_l4_u16(ctx, flow, value, mss_be, clamp.to_be())?;
            }
            break;
        }
        offset += usize::from(len);
    }
    Ok(())
}
