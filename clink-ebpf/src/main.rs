//! The eBPF programs of the local-leg splice (ARCHITECTURE.md, "Sockmap data path").
//!
//! - `clink_connect4` / `clink_connect6` (`cgroup/connect4`, `cgroup/connect6`): a TCP
//!   connect to a service address in `CLINK_SERVICES` goes to the import listener on loopback
//!   instead; the address asked for is kept in `CLINK_ORIG_DST` under the socket's cookie.
//! - `clink_sockops` (`sock_ops`): puts each newly established local TCP socket that is an
//!   end of an agent connection into the `CLINK_SOCKS` sockhash, keyed by its 4-tuple as seen
//!   from that socket: both ends of connections to an agent listener, and both ends of the
//!   agent process's own connections to local export targets (`CLINK_PORTS`). It also ties
//!   each redirected connection to the agent's accepted socket (`CLINK_REDIRECTS`).
//! - `clink_skmsg` (`sk_msg`, attached to `CLINK_SOCKS`): runs on every send of those sockets,
//!   looks up the other end of the connection under the reversed 4-tuple and moves the data
//!   straight into that socket's receive queue, skipping the TCP/IP stack on the local hop.
//!
//! The kernel queues a redirected send however far behind the reader is, and never makes the
//! sender wait. So `clink_skmsg` also keeps the flow control the kernel lacks, for the sockets
//! the agent reads: it counts the bytes it sends into each (`CLINK_FLOWS`), the agent counts
//! what it has read (`CLINK_READS`), and once the agent is [`FLOW_WINDOW`] behind, the
//! client's (or target's) sends take the TCP stack, whose receive window makes the sender
//! wait, until the agent has read everything; then the splice again. The agent paces its own
//! sends into the sockets of clients and targets itself (it reads their queue length).
//!
//! Every program leaves sockets outside the agent's network namespace (`CLINK_NETNS_COOKIE`)
//! alone, so agents of several namespaces can share one cgroup, with one exception: when the
//! agent gave a node address (`CLINK_NODE_IP4`), an IPv4 connect from another namespace (a
//! pod on the node) to a service address goes to the import listener at that address, and
//! `clink_sockops` records it in `CLINK_REDIRECTS`. Such sockets are never spliced.
//!
//! On the kTLS path only the connect hooks and the records are used: `CLINK_PORTS` stays
//! empty, so no socket enters `CLINK_SOCKS` (a kTLS socket cannot be in a sockmap, and a
//! socket the agent splices with splice(2) must not receive sk_msg redirects).
//!
//! The maps are BTF-defined (`#[btf_map]`), so `bpftool map dump` shows keys and values with
//! their field names. On the host the programs compile too, with a stub `main`, so the
//! workspace's clippy checks them like any other crate.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        bpf_pidns_info, bpf_sock_addr, bpf_sock_ops, sk_action::SK_PASS, sk_msg_md, BPF_F_INGRESS,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_ns_current_pid_tgid, bpf_get_socket_cookie,
    },
    macros::{btf_map, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext as _, Global,
};
use aya_log_ebpf::debug;
use clink_common::{
    Flow, PortFlags, PortKey, Redirect, ServiceKey, ServiceTarget, SockKey, CONNS_MAX_ENTRIES,
    FLOW_WINDOW, IPPROTO_TCP, LOOPBACK4, LOOPBACK6, PORTS_MAX_ENTRIES, READS_FROZEN,
    SERVICES_MAX_ENTRIES, SKMSG_BYTES_IDX, SKMSG_COUNTERS, SKMSG_FALLBACKS_IDX, SKMSG_MSGS_IDX,
    SKMSG_PASSED_IDX, SKMSG_RESUMES_IDX, SOCKS_MAX_ENTRIES,
};

#[btf_map]
static CLINK_SOCKS: SockHash<SockKey, { SOCKS_MAX_ENTRIES as usize }> = SockHash::new();

#[btf_map]
static CLINK_PORTS: HashMap<PortKey, PortFlags, { PORTS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map]
static CLINK_SKMSG_BYTES: PerCpuArray<u64, { SKMSG_COUNTERS as usize }> = PerCpuArray::new();

#[btf_map]
static CLINK_SERVICES: HashMap<ServiceKey, ServiceTarget, { SERVICES_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map]
static CLINK_ORIG_DST: LruHashMap<u64, ServiceKey, { CONNS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
static CLINK_REDIRECTS: LruHashMap<SockKey, Redirect, { CONNS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
static CLINK_PENDING: LruHashMap<SockKey, u32, { CONNS_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
static CLINK_UNSPLICED: LruHashMap<SockKey, u32, { CONNS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
static CLINK_FLOWS: LruHashMap<u64, Flow, { SOCKS_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
static CLINK_READS: LruHashMap<u64, u64, { SOCKS_MAX_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
static CLINK_COOKIES: LruHashMap<SockKey, u64, { SOCKS_MAX_ENTRIES as usize }> = LruHashMap::new();

// Set by the agent at load time (clink_common::global); read-only to the programs.
#[unsafe(no_mangle)]
static CLINK_NETNS_COOKIE: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static CLINK_AGENT_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CLINK_PIDNS_DEV: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static CLINK_PIDNS_INO: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static CLINK_NODE_IP4: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CLINK_AGENT_CONNECTS: Global<u32> = Global::new(0);

/// Return value of a `sock_ops` program that lets the socket proceed unchanged. Returning 0
/// would turn the result of every other `sock_ops` program on the cgroup into an error.
const SOCK_OPS_OK: u32 = 1;
/// Return value of a `cgroup/connect*` program that lets the connect go on.
const CONNECT_ALLOW: i32 = 1;

#[sock_ops]
pub fn clink_sockops(ctx: SockOpsContext) -> u32 {
    if let Err(errno) = try_clink_sockops(&ctx) {
        debug!(&ctx, "clink_sockops: map update failed: {}", errno);
    }
    SOCK_OPS_OK
}

fn try_clink_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    // SAFETY: `ctx.ops` is the context pointer the kernel passed to this program.
    let key = unsafe { sock_ops_key(ctx.ops) };
    if !in_agent_netns(ctx.as_ptr()) || !key.is_local() {
        // A pod's socket (another namespace, a node address): never spliced, but a connect
        // the hooks redirected is recorded, so the agent knows what its client asked for.
        return on_foreign(ctx, key);
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx, &key),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(ctx, key),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(ctx, key),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            on_close(ctx, &key);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `connect()` is the one moment the agent's own process is the current task: that is when
/// its connections to export targets are told apart from other clients of the same target.
fn on_connect(ctx: &SockOpsContext, key: &SockKey) -> Result<(), i32> {
    let cookie = socket_cookie(ctx.as_ptr());
    if CLINK_ORIG_DST.get_ptr(cookie).is_some() {
        // Redirected by a connect hook: clean up after it however the connection ends.
        ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)?;
    }
    // The flag first: with it 0 the verifier prunes the helper call in `is_agent_task`.
    if CLINK_AGENT_CONNECTS.load() != 0
        && port_has(key.dst_port, PortFlags::TARGET)
        && is_agent_task()
    {
        CLINK_PENDING.insert(key, PENDING_AGENT_CONNECT, 0)?;
    }
    Ok(())
}

/// A socket outside the agent's namespace or loopback: only a connect the hooks redirected
/// to a node address interests us, from connect (close callback armed) to close.
fn on_foreign(ctx: &SockOpsContext, key: SockKey) -> Result<(), i32> {
    let cookie = socket_cookie(ctx.as_ptr());
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB if CLINK_ORIG_DST.get_ptr(cookie).is_some() => {
            ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)?;
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => record_redirect(key, cookie)?,
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = CLINK_ORIG_DST.remove(cookie);
            let _ = CLINK_REDIRECTS.remove(key.reversed());
        }
        _ => {}
    }
    Ok(())
}

/// Ties a connection the connect hooks redirected to the agent's accepted socket (the
/// reverse of `key`), if the socket with `cookie` was redirected.
#[inline(always)]
fn record_redirect(key: SockKey, cookie: u64) -> Result<(), i32> {
    if let Some(service) = CLINK_ORIG_DST.get_ptr(cookie) {
        let redirect = Redirect {
            cookie,
            // SAFETY: a pointer to a live map value, copied at once.
            service: unsafe { *service },
            pad: 0,
        };
        CLINK_REDIRECTS.insert(key.reversed(), redirect, 0)?;
    }
    Ok(())
}

/// `CLINK_PENDING` values: what the socket waiting there is.
/// The agent's own connect to an export target, before it is established.
const PENDING_AGENT_CONNECT: u32 = 1;
/// The accepting end of a connection to an agent listener: the agent's socket.
const PENDING_AGENT_ACCEPT: u32 = 2;
/// The accepting end of the agent's connection to an export target: the target's socket.
const PENDING_TARGET_ACCEPT: u32 = 3;

/// The connecting end is established first (the other end waits for its ACK): it is taken
/// if it connects to an agent listener or is the agent's own connection to an export
/// target, and then leaves word for the accepting end in `CLINK_PENDING`.
///
/// A redirected connect is recorded whether or not its port is spliced: on the kTLS path
/// the listeners are not in `CLINK_PORTS` (nothing is spliced), and only the record is
/// wanted.
fn on_active_established(ctx: &SockOpsContext, key: SockKey) -> Result<(), i32> {
    let cookie = socket_cookie(ctx.as_ptr());
    record_redirect(key, cookie)?;
    let to_listener = port_has(key.dst_port, PortFlags::LISTENER);
    let agent_connect = !to_listener && CLINK_PENDING.remove(key).is_ok();
    if !to_listener && !agent_connect {
        return Ok(());
    }
    add_socket(ctx, key, agent_connect)?;
    let other_end = if to_listener {
        PENDING_AGENT_ACCEPT
    } else {
        PENDING_TARGET_ACCEPT
    };
    CLINK_PENDING.insert(key.reversed(), other_end, 0)?;
    Ok(())
}

/// The accepting end is taken only if its connecting end was: a client the programs do not
/// see (outside the cgroup) leaves the agent's accepted socket alone too.
fn on_passive_established(ctx: &SockOpsContext, key: SockKey) -> Result<(), i32> {
    let Some(pending) = CLINK_PENDING.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: a pointer to a live map value, copied at once.
    let agent_reads = unsafe { *pending } == PENDING_AGENT_ACCEPT;
    let _ = CLINK_PENDING.remove(key);
    add_socket(ctx, key, agent_reads)
}

/// `agent_reads`: the socket is the agent's end, whose reads the agent counts in
/// `CLINK_READS` (sends into it are flow-controlled here).
fn add_socket(ctx: &SockOpsContext, mut key: SockKey, agent_reads: bool) -> Result<(), i32> {
    // A new connection: an entry of an earlier one with the same 4-tuple no longer applies.
    let _ = CLINK_UNSPLICED.remove(key);
    // Flow state first: a sender that finds this socket in `CLINK_SOCKS` finds it too.
    let cookie = socket_cookie(ctx.as_ptr());
    let flow = Flow {
        agent_reads: u32::from(agent_reads),
        ..Flow::default()
    };
    CLINK_FLOWS.insert(cookie, flow, 0)?;
    if agent_reads {
        CLINK_READS.insert(cookie, 0, 0)?;
    }
    CLINK_COOKIES.insert(key, cookie, 0)?;
    // ... and the close callback removes both again.
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)?;
    // SAFETY: `ctx.ops` is the context pointer the kernel passed to this program; the helper
    // only reads the socket behind it.
    let ops = unsafe { &mut *ctx.ops };
    CLINK_SOCKS.update(&mut key, ops, 0)?;
    debug!(
        ctx,
        "clink_sockops: added socket {} -> {}", key.src_port, key.dst_port
    );
    Ok(())
}

fn on_close(ctx: &SockOpsContext, key: &SockKey) {
    let cookie = socket_cookie(ctx.as_ptr());
    let _ = CLINK_ORIG_DST.remove(cookie);
    let _ = CLINK_REDIRECTS.remove(key.reversed());
    let _ = CLINK_FLOWS.remove(cookie);
    let _ = CLINK_READS.remove(cookie);
    let _ = CLINK_COOKIES.remove(*key);
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

/// Whether the socket behind `ctx` (a `sock_ops` or `sock_addr` context) is in the agent's
/// network namespace.
#[inline(always)]
fn in_agent_netns(ctx: *mut core::ffi::c_void) -> bool {
    let agent = CLINK_NETNS_COOKIE.load();
    // SAFETY: `ctx` is the context pointer of a program type that may call this helper.
    agent == 0 || unsafe { bpf_get_netns_cookie(ctx) } == agent
}

#[inline(always)]
fn socket_cookie(ctx: *mut core::ffi::c_void) -> u64 {
    // SAFETY: `ctx` is the context pointer of a program type that may call this helper.
    unsafe { bpf_get_socket_cookie(ctx) }
}

/// Whether the current task belongs to the agent's process, compared in the agent's own pid
/// namespace (the helper fails when the task is not in that namespace at all).
#[inline(always)]
fn is_agent_task() -> bool {
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes at most `size` bytes into `ns`.
    let ret = unsafe {
        bpf_get_ns_current_pid_tgid(
            CLINK_PIDNS_DEV.load(),
            CLINK_PIDNS_INO.load(),
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    ret == 0 && ns.tgid == CLINK_AGENT_TGID.load()
}

#[cgroup_sock_addr(connect4)]
pub fn clink_connect4(ctx: SockAddrContext) -> i32 {
    if let Err(errno) = try_connect::<false>(&ctx) {
        debug!(&ctx, "clink_connect4: map update failed: {}", errno);
    }
    CONNECT_ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn clink_connect6(ctx: SockAddrContext) -> i32 {
    if let Err(errno) = try_connect::<true>(&ctx) {
        debug!(&ctx, "clink_connect6: map update failed: {}", errno);
    }
    CONNECT_ALLOW
}

/// Rewrites a TCP connect to a service address into a connect to the import listener (on
/// loopback from the agent's namespace, on `CLINK_NODE_IP4` from others), and records the
/// address asked for under the socket's cookie.
///
/// `V6` is a constant so each program gets its own code: with a run-time flag the compiler
/// merges the two address writes into one through a computed context offset, which the
/// verifier rejects.
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<(), i32> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed to this program.
    if unsafe { rd(&raw const (*sa).protocol) } != IPPROTO_TCP {
        return Ok(());
    }
    // The agent's own namespace reaches the listener on loopback; another namespace (a pod)
    // on the node address, if the agent has one (IPv4 only).
    let node = CLINK_NODE_IP4.load();
    let own = in_agent_netns(ctx.as_ptr());
    if !own && (V6 || node == 0) {
        return Ok(());
    }
    let listener_ip4 = if own { LOOPBACK4 } else { node };
    // SAFETY: as above.
    let service = unsafe { connect_key(sa, V6) };
    let Some(target) = CLINK_SERVICES.get_ptr(service) else {
        return Ok(());
    };
    // SAFETY: a pointer to a live map value, copied at once.
    let target = unsafe { *target };
    CLINK_ORIG_DST.insert(socket_cookie(ctx.as_ptr()), service, 0)?;
    // SAFETY: as above; the verifier allows 4-byte writes of these fields.
    unsafe {
        if !V6 {
            wr(&raw mut (*sa).user_ip4, listener_ip4);
        } else if service.family == clink_common::AF_INET {
            // An IPv4 service reached through an IPv4-mapped address stays IPv4-mapped.
            let ip6 = (&raw mut (*sa).user_ip6).cast::<u32>();
            wr(ip6.add(3), listener_ip4);
        } else {
            let ip6 = (&raw mut (*sa).user_ip6).cast::<u32>();
            for (i, word) in LOOPBACK6.iter().enumerate() {
                wr(ip6.add(i), *word);
            }
        }
        wr(&raw mut (*sa).user_port, target.user_port());
    }
    debug!(
        ctx,
        "clink_connect: service port {} -> listener port {}", service.port, target.listener_port
    );
    Ok(())
}

/// # Safety
/// `sa` must be the `bpf_sock_addr` context of the running program.
#[inline(always)]
unsafe fn connect_key(sa: *const bpf_sock_addr, v6: bool) -> ServiceKey {
    // SAFETY: the caller passes the running program's context; every field read is in it.
    unsafe {
        let port = rd(&raw const (*sa).user_port);
        if v6 {
            ServiceKey::from_connect6(rd_ip6(&raw const (*sa).user_ip6), port)
        } else {
            ServiceKey::from_connect4(rd(&raw const (*sa).user_ip4), port)
        }
    }
}

#[sk_msg]
pub fn clink_skmsg(ctx: SkMsgContext) -> u32 {
    try_clink_skmsg(&ctx);
    SK_PASS
}

/// Redirects the message to the peer socket if it is in `CLINK_SOCKS` and its reader keeps
/// up. Without a peer the message takes the normal TCP path, so a connection whose other end
/// the agent does not own keeps working; and so does every later message of that socket:
/// bytes already on the TCP path would otherwise be overtaken by redirected ones, which the
/// receiver reads first.
fn try_clink_skmsg(ctx: &SkMsgContext) {
    // SAFETY: `ctx.msg` is the context pointer the kernel passed to this program.
    let key = unsafe { sk_msg_key(ctx.msg) };
    if CLINK_UNSPLICED.get_ptr(key).is_some() {
        return;
    }
    let mut peer = key.reversed();
    let Some(cookie) = CLINK_COOKIES.get_ptr(peer) else {
        let _ = CLINK_UNSPLICED.insert(key, 1, 0);
        return;
    };
    // SAFETY: a pointer to a live map value, copied at once.
    let cookie = unsafe { *cookie };
    let Some(flow) = CLINK_FLOWS.get_ptr_mut(cookie) else {
        let _ = CLINK_UNSPLICED.insert(key, 1, 0);
        return;
    };
    let size = u64::from(ctx.size());
    // SAFETY: a pointer to a live map value, written only by the sends of this socket (the
    // kernel runs them one at a time) and by `add_socket` before the socket is spliced.
    let flow = unsafe { &mut *flow };
    if flow.agent_reads != 0 && !within_window(flow, cookie, size) {
        count(SKMSG_PASSED_IDX, size);
        return;
    }
    if CLINK_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        let _ = CLINK_UNSPLICED.insert(key, 1, 0);
        return;
    }
    count(SKMSG_BYTES_IDX, size);
    count(SKMSG_MSGS_IDX, 1);
}

/// Counts `size` more bytes sent into the agent's socket behind `flow` and says whether they
/// may be redirected: no while the agent is [`FLOW_WINDOW`] behind, and from then on until it
/// has read every byte, so that none of the bytes that take the TCP stack meanwhile is
/// overtaken by a redirected one (the reader gets redirected bytes first).
#[inline(always)]
fn within_window(flow: &mut Flow, cookie: u64, size: u64) -> bool {
    let read = match CLINK_READS.get_ptr(cookie) {
        // SAFETY: a pointer to a live map value that the agent rewrites whole; one aligned
        // 8-byte load.
        Some(read) => unsafe { core::ptr::read_volatile(read) },
        None => 0,
    };
    let behind = flow.sent.saturating_sub(read);
    // Counted before the kernel queues the bytes, so `read` never gets ahead of `sent`.
    flow.sent += size;
    if read & READS_FROZEN != 0 {
        // The agent is taking the connection off the splice.
        flow.passing = 1;
        return false;
    }
    if flow.passing != 0 {
        if behind != 0 {
            return false;
        }
        // Everything that took the TCP stack has been read: nothing left to overtake.
        flow.passing = 0;
        count(SKMSG_RESUMES_IDX, 1);
    } else if behind + size > FLOW_WINDOW {
        flow.passing = 1;
        count(SKMSG_FALLBACKS_IDX, 1);
        return false;
    }
    true
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
    // SAFETY: the caller passes the running program's context; every field read is in it.
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
    // SAFETY: the caller passes the running program's context; every field read is in it.
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
    // SAFETY: the caller guarantees `field` points into the context, which is readable.
    unsafe { core::ptr::read_volatile(field) }
}

/// # Safety
/// `field` must point into the program's context, at a field the program may write.
#[inline(always)]
unsafe fn wr(field: *mut u32, value: u32) {
    // SAFETY: the caller guarantees `field` is a writable field of the context.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// # Safety
/// `field` must point into the program's context.
#[inline(always)]
unsafe fn rd_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let field = field.cast::<u32>();
    // SAFETY: the caller guarantees `field` points at four u32 words of the context.
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
