//! What makes a *blocking* `recv` on a socket in a sockmap fail with EAGAIN (issue 10;
//! ARCHITECTURE.md, "Sockmap data path", "Blocking readers"). The reproducer of the finding,
//! and the guard that notices when a kernel fixes it.
//!
//! Its own minimal set-up, no agent: a connected loopback pair in a fresh network namespace,
//! both sockets put into a SOCKMAP or a SOCKHASH from userspace (no cgroup, no `sock_ops`), and
//! an `sk_msg` verdict program on the map that moves each send into the other socket's ingress
//! queue (as `clink_skmsg` does), or lets it take TCP while a control map says so (as flow
//! control's `passing` does). The same cases run on a plain pair as the control. Every case
//! changes one thing; each runs [`RUNS`] times per kind of pair. Everything is a descriptor of
//! this process in a namespace of its own, gone when the test ends, also on failure.
//!
//! ```text
//! cargo test -p clink-tests --test sockmap_eagain -- --nocapture
//! ```
//! prints the table; `SOCKMAP_EAGAIN_RUNS=<n>` runs each case n times. Needs root and a kernel
//! with sockmap, sockhash and sk_msg: skipped with a message otherwise, a failure with CI=true.

use std::{
    io::{self, Read as _, Write as _},
    mem::size_of,
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    thread,
    time::{Duration, Instant},
};

use clink_testbed::Netns;
use clink_tests::{require_root, tcp_state};

/// Runs of each case on each kind of pair.
const RUNS: usize = 10;
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";
const ANSWER: &[u8] = &[b'x'; 1000];

/// What the client's socket is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No map: the control.
    Plain,
    SockMap,
    SockHash,
}

const KINDS: [Kind; 3] = [Kind::Plain, Kind::SockMap, Kind::SockHash];

/// One thing changed at a time. "c" is the blocking client whose reads are watched, "s" its
/// peer (the agent's socket in the real set-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// c sends, half-closes, and reads only once s's answer and FIN are there.
    PeerFinBeforeRecv,
    /// c sends, half-closes, waits until its FIN is ACKed (FIN_WAIT2), then reads; s's FIN
    /// comes 100 ms into the read.
    PeerFinWhileBlocked,
    /// c sends, half-closes and reads at once; s answers and half-closes at once, so s's FIN
    /// mostly carries the ACK of c's FIN (a server that answers at once: probably what issue
    /// 10's minimal test, which saw no EAGAIN, did).
    PeerFinCarriesAckOfOwnFin,
    /// c sends, half-closes and reads at once (the Python client); s answers 100 ms later, the
    /// way the agent answers after the tunnel's round trip. s's kernel ACKs c's FIN on its
    /// delayed-ACK timer in between, while c waits.
    OwnFinAckedWhileBlocked,
    /// c's reader thread waits; 100 ms later c's writer thread half-closes (nothing sent).
    OwnShutdownFromOtherThread,
    /// As the case before, but c's socket leaves the map (and s's sends take TCP) 50 ms into
    /// the wait, before the half-close: what an agent could do when it sees the client's FIN.
    RemovedFromMapThenOwnShutdown,
    /// c waits (no half-close); s sends by redirect 100 ms later, then half-closes.
    RedirectedDataWhileBlocked,
    /// As above, but s's sends take TCP (the verdict passes them, like `passing`).
    TcpDataWhileBlocked,
}

const CASES: [Case; 8] = [
    Case::PeerFinBeforeRecv,
    Case::PeerFinWhileBlocked,
    Case::PeerFinCarriesAckOfOwnFin,
    Case::OwnFinAckedWhileBlocked,
    Case::OwnShutdownFromOtherThread,
    Case::RemovedFromMapThenOwnShutdown,
    Case::RedirectedDataWhileBlocked,
    Case::TcpDataWhileBlocked,
];

/// How c's reads to end of stream went.
#[derive(Debug)]
struct Outcome {
    /// A read failed with EAGAIN (`WouldBlock`) although c is blocking and has no timeout.
    eagain: bool,
    /// c's state before the read, and every read: bytes (or EAGAIN), ms into the read, state.
    trace: String,
}

/// The kernel interface this needs, by raw `bpf(2)` calls: three map types, one program type.
/// Not the project's programs: those need `sock_ops`, a cgroup and the agent's maps, and know
/// only a sockhash; here userspace fills the map, so nothing is attached to any cgroup.
mod bpf {
    use super::*;

    const MAP_CREATE: libc::c_long = 0;
    const MAP_UPDATE_ELEM: libc::c_long = 2;
    const MAP_DELETE_ELEM: libc::c_long = 3;
    const PROG_LOAD: libc::c_long = 5;
    const PROG_ATTACH: libc::c_long = 8;
    const MAP_TYPE_ARRAY: u32 = 2;
    const MAP_TYPE_SOCKMAP: u32 = 15;
    const MAP_TYPE_SOCKHASH: u32 = 18;
    const PROG_TYPE_SK_MSG: u32 = 16;
    const SK_MSG_VERDICT: u32 = 7;
    const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    const FUNC_MSG_REDIRECT_MAP: i32 = 60;
    const FUNC_MSG_REDIRECT_HASH: i32 = 71;
    const F_INGRESS: i32 = 1;
    const SK_PASS: i32 = 1;
    /// `offsetof(struct sk_msg_md, local_port)` (host byte order).
    const MSG_LOCAL_PORT: i16 = 64;

    // Prefixes of `union bpf_attr` for each command; the kernel zero-fills the rest.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct MapElem {
        map_fd: u32,
        pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
    }
    #[repr(C)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }

    fn sys<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a `repr(C)` prefix of `union bpf_attr` for `cmd`, valid for
        // `size_of::<T>()` bytes; the pointers in it point at live buffers of the caller.
        let ret =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret)
    }

    /// A command that returns a new descriptor.
    fn sys_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
        let fd = sys(cmd, attr)?;
        // SAFETY: MAP_CREATE and PROG_LOAD return a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn map_create(map_type: u32, max_entries: u32) -> io::Result<OwnedFd> {
        let mut attr = MapCreate {
            map_type,
            key_size: 4,
            value_size: 4,
            max_entries,
        };
        sys_fd(MAP_CREATE, &mut attr)
    }

    /// `map[key] = value`; for a socket map `value` is the socket's descriptor.
    pub fn update(map: &OwnedFd, key: u32, value: u32) -> io::Result<()> {
        let mut attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: 0,
        };
        sys(MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// Removes `key` from `map` (a socket leaves a socket map).
    pub fn delete(map: &OwnedFd, key: u32) -> io::Result<()> {
        let mut attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: 0,
            flags: 0,
        };
        sys(MAP_DELETE_ELEM, &mut attr).map(drop)
    }

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut raw = [0u8; 8];
        raw[0] = code;
        raw[1] = (src << 4) | dst;
        raw[2..4].copy_from_slice(&off.to_le_bytes());
        raw[4..].copy_from_slice(&imm.to_le_bytes());
        raw
    }

    /// `dst = map` (`BPF_LD_IMM64` with `BPF_PSEUDO_MAP_FD`: two slots).
    fn ld_map(prog: &mut Vec<[u8; 8]>, dst: u8, map: &OwnedFd) {
        prog.push(insn(0x18, dst, 1, 0, map.as_raw_fd()));
        prog.push(insn(0, 0, 0, 0, 0));
    }

    /// The verdict: pass if `control[0] != 0`, else redirect to the ingress of the socket at
    /// key 0 (the client) when sent from `server_port`, else to key 1 (the server).
    fn program(hash: bool, socks: &OwnedFd, control: &OwnedFd, server_port: u16) -> Vec<[u8; 8]> {
        let mut p = vec![
            insn(0xbf, 6, 1, 0, 0),   // r6 = ctx
            insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0
            insn(0xbf, 2, 10, 0, 0),  // r2 = r10
            insn(0x07, 2, 0, 0, -4),  // r2 += -4
        ];
        ld_map(&mut p, 1, control);
        p.push(insn(0x85, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM));
        p.push(insn(0x15, 0, 0, 2, 0)); // if r0 == 0 goto +2
        p.push(insn(0x61, 1, 0, 0, 0)); // r1 = *(u32 *)r0
        let to_pass = p.len();
        p.push([0; 8]); // if r1 != 0 goto pass (filled in below)
        p.push(insn(0x61, 2, 6, MSG_LOCAL_PORT, 0)); // r2 = ctx->local_port
        p.push(insn(0xb7, 3, 0, 0, 1)); // r3 = 1
        p.push(insn(0x55, 2, 0, 1, i32::from(server_port))); // if r2 != port goto +1
        p.push(insn(0xb7, 3, 0, 0, 0)); // r3 = 0
        if hash {
            p.push(insn(0x63, 10, 3, -8, 0)); // *(u32 *)(r10 - 8) = r3
            p.push(insn(0xbf, 3, 10, 0, 0)); // r3 = r10
            p.push(insn(0x07, 3, 0, 0, -8)); // r3 += -8 (the key's address)
        }
        p.push(insn(0xbf, 1, 6, 0, 0)); // r1 = ctx
        ld_map(&mut p, 2, socks);
        p.push(insn(0xb7, 4, 0, 0, F_INGRESS));
        let redirect = if hash {
            FUNC_MSG_REDIRECT_HASH
        } else {
            FUNC_MSG_REDIRECT_MAP
        };
        p.push(insn(0x85, 0, 0, 0, redirect));
        p.push(insn(0x95, 0, 0, 0, 0)); // return the helper's verdict
        let pass = p.len();
        p.push(insn(0xb7, 0, 0, 0, SK_PASS));
        p.push(insn(0x95, 0, 0, 0, 0));
        p[to_pass] = insn(0x55, 1, 0, (pass - to_pass - 1) as i16, 0);
        p
    }

    /// A socket map of two with the verdict attached, and its control map.
    pub struct Splice {
        pub socks: OwnedFd,
        pub control: OwnedFd,
        _prog: OwnedFd,
    }

    impl Splice {
        pub fn new(hash: bool, server_port: u16) -> io::Result<Splice> {
            let socks = map_create(
                if hash {
                    MAP_TYPE_SOCKHASH
                } else {
                    MAP_TYPE_SOCKMAP
                },
                2,
            )?;
            let control = map_create(MAP_TYPE_ARRAY, 1)?;
            let insns = program(hash, &socks, &control, server_port);
            let license = c"GPL";
            let mut log = vec![0u8; 64 * 1024];
            let mut load = ProgLoad {
                prog_type: PROG_TYPE_SK_MSG,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 1,
                log_size: log.len() as u32,
                log_buf: log.as_mut_ptr() as u64,
            };
            let prog = sys_fd(PROG_LOAD, &mut load).map_err(|e| {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                io::Error::new(
                    e.kind(),
                    format!("{e}: {}", String::from_utf8_lossy(&log[..end])),
                )
            })?;
            let mut attach = ProgAttach {
                target_fd: socks.as_raw_fd() as u32,
                attach_bpf_fd: prog.as_raw_fd() as u32,
                attach_type: SK_MSG_VERDICT,
                attach_flags: 0,
            };
            sys(PROG_ATTACH, &mut attach)?;
            Ok(Splice {
                socks,
                control,
                _prog: prog,
            })
        }
    }
}

/// A connected loopback pair, in a socket map or not.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    splice: Option<bpf::Splice>,
}

impl Pair {
    fn new(kind: Kind) -> io::Result<Pair> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        let splice = match kind {
            Kind::Plain => None,
            Kind::SockMap | Kind::SockHash => {
                let port = listener.local_addr()?.port();
                let splice = bpf::Splice::new(kind == Kind::SockHash, port)?;
                bpf::update(&splice.socks, 0, client.as_raw_fd() as u32)?;
                bpf::update(&splice.socks, 1, server.as_raw_fd() as u32)?;
                Some(splice)
            }
        };
        Ok(Pair {
            client,
            server,
            splice,
        })
    }

    /// From now on the server's sends take TCP instead of the redirect.
    fn pass_to_tcp(&self) -> io::Result<()> {
        match &self.splice {
            Some(splice) => bpf::update(&splice.control, 0, 1),
            None => Ok(()),
        }
    }

    /// Something that later takes the client's socket out of the map (after which the
    /// server's sends take TCP: a redirect to a socket not in the map drops them).
    fn unsplicer(&self) -> io::Result<impl FnOnce() + Send + 'static> {
        let maps = match &self.splice {
            Some(splice) => Some((splice.socks.try_clone()?, splice.control.try_clone()?)),
            None => None,
        };
        Ok(move || {
            if let Some((socks, control)) = maps {
                bpf::update(&control, 0, 1).expect("pass to TCP");
                bpf::delete(&socks, 0).expect("take the client's socket out of the map");
            }
        })
    }
}

fn wait_for_state(stream: &TcpStream, want: &str) {
    let since = Instant::now();
    while tcp_state(stream) != want {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "never reached {want}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Reads the peer's side to its end. The peer is not what is watched: a spurious EAGAIN
/// there is waited out.
fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("peer read: {e}"),
        }
    }
}

/// c's blocking reads to end of stream, each noted; stops at the first EAGAIN.
fn read_to_end(client: &mut TcpStream, before: &str) -> Outcome {
    let since = Instant::now();
    let mut trace = format!("before: {before};");
    let mut buf = [0u8; 65536];
    loop {
        let result = client.read(&mut buf);
        let at = since.elapsed().as_millis();
        let now = tcp_state(client);
        match result {
            Ok(n) => {
                trace.push_str(&format!(" {n} B at {at} ms ({now})"));
                if n == 0 {
                    return Outcome {
                        eagain: false,
                        trace,
                    };
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                trace.push_str(&format!(" EAGAIN at {at} ms ({now})"));
                return Outcome {
                    eagain: true,
                    trace,
                };
            }
            Err(e) => {
                trace.push_str(&format!(" {e} at {at} ms ({now})"));
                return Outcome {
                    eagain: false,
                    trace,
                };
            }
        }
    }
}

/// Runs `f` on the peer's socket after `ms` milliseconds, on a thread of its own.
fn peer_after(
    ms: u64,
    server: &TcpStream,
    f: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> thread::JoinHandle<()> {
    let mut server = server.try_clone().expect("clone the peer's socket");
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(ms));
        f(&mut server);
    })
}

/// The peer answers and half-closes.
fn answer(server: &mut TcpStream) {
    server.write_all(ANSWER).expect("answer");
    server.shutdown(Shutdown::Write).expect("peer half-close");
}

fn run(case: Case, kind: Kind) -> io::Result<Outcome> {
    let mut pair = Pair::new(kind)?;
    if case == Case::TcpDataWhileBlocked {
        pair.pass_to_tcp()?;
    }
    let unsplice = pair.unsplicer()?;
    let c = &mut pair.client;
    let helpers = match case {
        Case::PeerFinBeforeRecv => {
            c.write_all(REQUEST)?;
            c.shutdown(Shutdown::Write)?;
            drain(&mut pair.server);
            answer(&mut pair.server);
            wait_for_state(c, "CLOSE");
            vec![]
        }
        Case::PeerFinWhileBlocked => {
            c.write_all(REQUEST)?;
            c.shutdown(Shutdown::Write)?;
            drain(&mut pair.server);
            wait_for_state(c, "FIN_WAIT2");
            vec![peer_after(100, &pair.server, |s| {
                s.shutdown(Shutdown::Write).expect("peer half-close")
            })]
        }
        Case::PeerFinCarriesAckOfOwnFin => {
            c.write_all(REQUEST)?;
            c.shutdown(Shutdown::Write)?;
            vec![peer_after(0, &pair.server, |s| {
                drain(s);
                answer(s);
            })]
        }
        Case::OwnFinAckedWhileBlocked => {
            c.write_all(REQUEST)?;
            c.shutdown(Shutdown::Write)?;
            vec![peer_after(100, &pair.server, |s| {
                drain(s);
                answer(s);
            })]
        }
        Case::OwnShutdownFromOtherThread => {
            let writer = c.try_clone()?;
            let half_close = thread::spawn(move || {
                thread::sleep(Duration::from_millis(100));
                writer.shutdown(Shutdown::Write).expect("half-close");
            });
            vec![
                half_close,
                peer_after(300, &pair.server, |s| {
                    drain(s);
                    answer(s);
                }),
            ]
        }
        Case::RemovedFromMapThenOwnShutdown => {
            let writer = c.try_clone()?;
            let half_close = thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                unsplice();
                thread::sleep(Duration::from_millis(50));
                writer.shutdown(Shutdown::Write).expect("half-close");
            });
            vec![
                half_close,
                peer_after(300, &pair.server, |s| {
                    drain(s);
                    answer(s);
                }),
            ]
        }
        Case::RedirectedDataWhileBlocked | Case::TcpDataWhileBlocked => {
            vec![peer_after(100, &pair.server, answer)]
        }
    };
    let before = tcp_state(c);
    let outcome = read_to_end(c, before);
    for helper in helpers {
        helper.join().expect("helper thread");
    }
    Ok(outcome)
}

/// Whether every case gives EAGAIN on 6.18 as found (issue 10), for a pair of `kind`:
/// `None` where the outcome depends on timing (reported, not asserted).
fn expected(case: Case, kind: Kind) -> Option<Expect> {
    if kind == Kind::Plain {
        // tcp_recvmsg waits again after a wake-up without data.
        return Some(Expect::Never);
    }
    match case {
        Case::PeerFinBeforeRecv
        | Case::PeerFinWhileBlocked
        | Case::RedirectedDataWhileBlocked
        | Case::TcpDataWhileBlocked => Some(Expect::Never),
        // Whether the delayed ACK of c's FIN beats s's FIN.
        Case::PeerFinCarriesAckOfOwnFin => None,
        // Whether c is waiting when the delayed ACK comes (a few ms): mostly.
        Case::OwnFinAckedWhileBlocked => Some(Expect::Sometimes),
        // The wait began in tcp_bpf_recvmsg; leaving the map does not change that.
        Case::OwnShutdownFromOtherThread | Case::RemovedFromMapThenOwnShutdown => {
            Some(Expect::Always)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Never,
    Sometimes,
    Always,
}

/// Skips (or fails, with CI=true) when the kernel refuses what the reproducer needs.
fn kernel_refuses(err: &io::Error) -> bool {
    let why = format!(
        "sockmap_eagain needs sockmap, sockhash and sk_msg programs, which this kernel \
         refused: {err}"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}; CI=true forbids skipping");
    }
    eprintln!("skipping: {why}");
    true
}

/// The table of findings, and the guard: on a kernel whose `tcp_bpf_recvmsg` waits again
/// after a wake-up without data, the `Always`/`Sometimes` rows stop giving EAGAIN and this
/// fails, saying that `auto` may consider sockmap again (choice.rs).
#[test]
fn which_wake_ups_make_a_blocking_recv_on_a_spliced_socket_fail_with_eagain() {
    if !require_root("which_wake_ups_make_a_blocking_recv_on_a_spliced_socket_fail_with_eagain") {
        return;
    }
    let runs = std::env::var("SOCKMAP_EAGAIN_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(RUNS);
    let netns = Netns::new("eagain").expect("network namespace");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let rows = netns.enter(|| -> io::Result<Vec<(Case, Kind, usize, String)>> {
        let mut rows = Vec::new();
        for case in CASES {
            for kind in KINDS {
                let mut eagain = 0;
                let mut example = None;
                for _ in 0..runs {
                    let outcome = run(case, kind)?;
                    eagain += usize::from(outcome.eagain);
                    if outcome.eagain || example.is_none() {
                        example = Some(outcome.trace);
                    }
                }
                rows.push((case, kind, eagain, example.unwrap_or_default()));
            }
        }
        Ok(rows)
    });
    let rows = match rows {
        Ok(rows) => rows,
        Err(err) if kernel_refuses(&err) => return,
        Err(err) => panic!("{err}"),
    };
    println!("Linux {release}, {runs} runs each:");
    let mut surprises = Vec::new();
    for (case, kind, eagain, example) in &rows {
        println!("{case:?} / {kind:?}: EAGAIN {eagain}/{runs}; e.g. {example}");
        let fits = match expected(*case, *kind) {
            None => true,
            Some(Expect::Never) => *eagain == 0,
            Some(Expect::Sometimes) => *eagain > 0,
            Some(Expect::Always) => *eagain == runs,
        };
        if !fits {
            surprises.push(format!(
                "{case:?} / {kind:?}: EAGAIN {eagain}/{runs}, expected {:?}",
                expected(*case, *kind)
            ));
        }
    }
    assert!(
        surprises.is_empty(),
        "the kernel's answer to blocking reads on spliced sockets changed (Linux {release}): \
         {surprises:#?}\nIf the EAGAIN rows are gone, the kernel waits again after a wake-up \
         without data: re-check, then let `auto` consider sockmap (clink-agent/src/kernel/\
         choice.rs, ARCHITECTURE.md \"Blocking readers\")."
    );
}
