//! Kernel TLS: whether this kernel offers it, and the rule for tests that need it.
//!
//! The build machines' kernel has no CONFIG_TLS. `cargo xtask vm-test` runs tests under a
//! kernel that has it and sets [`REQUIRE_KTLS`] there, so that a kTLS test can skip on the
//! host but never in the VM.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::libc;

/// Set to `1` where the kernel must offer kTLS (by `cargo xtask vm-test`, in its VM).
pub const REQUIRE_KTLS: &str = "CLINK_REQUIRE_KTLS";

/// Whether a test that needs kernel TLS can run.
///
/// True when the kernel offers it. Otherwise, with `CLINK_REQUIRE_KTLS=1` it panics, so that
/// a kTLS test cannot pass unnoticed in the VM; elsewhere it prints why `what` is skipped and
/// returns false.
pub fn require_ktls(what: &str) -> bool {
    let Err(why) = ktls_available() else {
        return true;
    };
    if std::env::var(REQUIRE_KTLS).as_deref() == Ok("1") {
        panic!("{what} needs kernel TLS, and {REQUIRE_KTLS}=1 says this kernel has it: {why}");
    }
    eprintln!("skipping {what}: {why}; `cargo xtask vm-test` runs it under a kernel with kTLS");
    false
}

/// Ok when a connected loopback TCP socket takes the "tls" upper-layer protocol; else why
/// not, in words for the operator.
pub fn ktls_available() -> Result<(), String> {
    // The listener stays open: closing it would reset the connection, and the kernel takes
    // the ULP only on a connected socket.
    let pair = || -> io::Result<(TcpListener, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let sock = TcpStream::connect(listener.local_addr()?)?;
        Ok((listener, sock))
    };
    let (_listener, sock) =
        pair().map_err(|e| format!("cannot open a loopback TCP pair to probe kTLS: {e}"))?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    set_tls_ulp(sock.as_fd()).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => format!(
            "this kernel ({}) has no kernel TLS: TCP_ULP \"tls\" is unknown to it (ENOENT: no \
             CONFIG_TLS, or the tls module cannot be loaded)",
            release.trim()
        ),
        _ => format!("TCP_ULP \"tls\" on a connected socket failed: {e}"),
    })
}

/// Turns a connected TCP socket into a kTLS socket (`setsockopt(TCP_ULP, "tls")`); the keys
/// come after, with `SOL_TLS`/`TLS_TX` and `TLS_RX`.
pub fn set_tls_ulp(sock: BorrowedFd<'_>) -> io::Result<()> {
    const ULP: &[u8] = b"tls";
    // SAFETY: the option value is a valid buffer of the given length for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ULP.as_ptr().cast(),
            ULP.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
