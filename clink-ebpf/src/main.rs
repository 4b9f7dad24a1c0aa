//! The eBPF programs of the local-leg splice (DESIGN.md §6.2).
//!
//! - `clink_sockops` (`sock_ops`, attached to a cgroup by the agent): puts each newly
//!   established TCP socket whose local or remote port the agent owns (`CLINK_PORTS`) into
//!   the `CLINK_SOCKS` sockhash, keyed by its 4-tuple as seen from that socket.
//! - `clink_skmsg` (`sk_msg`, attached to `CLINK_SOCKS`): runs on every send of those sockets,
//!   looks up the other end of the connection under the reversed 4-tuple and moves the data
//!   straight into that socket's receive queue, skipping the TCP/IP stack on the local hop.
//!
//! The maps are BTF-defined (`#[btf_map]`), so `bpftool map dump` shows keys and values with
//! their field names. On the host the programs compile too, with a stub `main`, so the
//! workspace's clippy checks them like any other crate.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, sk_action::SK_PASS, sk_msg_md, BPF_F_INGRESS,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    btf_maps::{HashMap, PerCpuArray, SockHash},
    macros::{btf_map, sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use clink_common::{
    PortFlags, PortKey, SockKey, PORTS_MAX_ENTRIES, SKMSG_BYTES_IDX, SKMSG_COUNTERS,
    SKMSG_MSGS_IDX, SOCKS_MAX_ENTRIES,
};

#[btf_map]
static CLINK_SOCKS: SockHash<SockKey, { SOCKS_MAX_ENTRIES as usize }> = SockHash::new();

#[btf_map]
static CLINK_PORTS: HashMap<PortKey, PortFlags, { PORTS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
static CLINK_SKMSG_BYTES: PerCpuArray<u64, { SKMSG_COUNTERS as usize }> = PerCpuArray::new();

/// Return value of a `sock_ops` program that lets the socket proceed unchanged. Returning 0
/// would turn the result of every other `sock_ops` program on the cgroup into an error.
const SOCK_OPS_OK: u32 = 1;

#[sock_ops]
pub fn clink_sockops(ctx: SockOpsContext) -> u32 {
    match try_clink_sockops(&ctx) {
        Ok(()) => {}
        Err(errno) => debug!(&ctx, "clink_sockops: sockhash update failed: {}", errno),
    }
    SOCK_OPS_OK
}

fn try_clink_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // SAFETY: `ctx.ops` is the context pointer the kernel passed to this program.
    let mut key = unsafe { sock_ops_key(ctx.ops) };
    if !owned(&key) {
        return Ok(());
    }
    // SAFETY: as above; the helper only reads the socket behind the context.
    let ops = unsafe { &mut *ctx.ops };
    CLINK_SOCKS.update(&mut key, ops, 0)?;
    debug!(
        ctx,
        "clink_sockops: added socket {} -> {}", key.src_port, key.dst_port
    );
    Ok(())
}

/// Whether the agent owns the connection: its local port is registered with
/// [`PortFlags::LOCAL`] or its remote port with [`PortFlags::REMOTE`].
#[inline(always)]
fn owned(key: &SockKey) -> bool {
    port_has(key.src_port, PortFlags::LOCAL) || port_has(key.dst_port, PortFlags::REMOTE)
}

#[inline(always)]
fn port_has(port: u32, flag: PortFlags) -> bool {
    match CLINK_PORTS.get_ptr(PortKey { port }) {
        // SAFETY: the kernel returned a pointer to a live `PortFlags` value; the read is a
        // copy, so a concurrent update from userspace cannot tear anything we keep.
        Some(flags) => unsafe { *flags }.contains(flag),
        None => false,
    }
}

#[sk_msg]
pub fn clink_skmsg(ctx: SkMsgContext) -> u32 {
    try_clink_skmsg(&ctx);
    SK_PASS
}

/// Redirects the message to the peer socket if it is in `CLINK_SOCKS`. Without a peer the
/// message takes the normal TCP path, so a connection whose other end the agent does not own
/// keeps working.
fn try_clink_skmsg(ctx: &SkMsgContext) {
    // SAFETY: `ctx.msg` is the context pointer the kernel passed to this program.
    let mut peer = unsafe { sk_msg_key(ctx.msg) }.reversed();
    let size = ctx.size();
    if CLINK_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        return;
    }
    count(SKMSG_BYTES_IDX, u64::from(size));
    count(SKMSG_MSGS_IDX, 1);
}

#[inline(always)]
fn count(index: u32, n: u64) {
    if let Some(slot) = CLINK_SKMSG_BYTES.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: only this CPU writes it while the program runs.
        unsafe { *slot += n };
    }
}

// The context fields are read one `u32` at a time: the verifier rejects context loads of
// any other width, and copying an IPv6 array wholesale may be lowered to 64-bit loads.

/// # Safety
/// `ops` must be the `bpf_sock_ops` context of the running program.
#[inline(always)]
unsafe fn sock_ops_key(ops: *const bpf_sock_ops) -> SockKey {
    unsafe {
        SockKey::from_ctx(
            rd(&raw const (*ops).family),
            rd(&raw const (*ops).local_ip4),
            rd(&raw const (*ops).remote_ip4),
            rd_ip6(&raw const (*ops).local_ip6),
            rd_ip6(&raw const (*ops).remote_ip6),
            rd(&raw const (*ops).local_port),
            rd(&raw const (*ops).remote_port),
        )
    }
}

/// # Safety
/// `msg` must be the `sk_msg_md` context of the running program.
#[inline(always)]
unsafe fn sk_msg_key(msg: *const sk_msg_md) -> SockKey {
    unsafe {
        SockKey::from_ctx(
            rd(&raw const (*msg).family),
            rd(&raw const (*msg).local_ip4),
            rd(&raw const (*msg).remote_ip4),
            rd_ip6(&raw const (*msg).local_ip6),
            rd_ip6(&raw const (*msg).remote_ip6),
            rd(&raw const (*msg).local_port),
            rd(&raw const (*msg).remote_port),
        )
    }
}

/// # Safety
/// `field` must point into the program's context.
#[inline(always)]
unsafe fn rd(field: *const u32) -> u32 {
    unsafe { core::ptr::read_volatile(field) }
}

/// # Safety
/// `field` must point into the program's context.
#[inline(always)]
unsafe fn rd_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let field = field.cast::<u32>();
    unsafe {
        [
            rd(field),
            rd(field.add(1)),
            rd(field.add(2)),
            rd(field.add(3)),
        ]
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// The kernel only checks whether this string is GPL-compatible; none of the helpers used here
/// require that.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
