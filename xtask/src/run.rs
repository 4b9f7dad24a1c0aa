//! Running commands: steps printed as they happen, failures with context, Ctrl-C awareness.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Prints what happens next.
pub fn step(what: &str) {
    println!("==> {what}");
    let _ = std::io::stdout().flush();
}

/// Makes `cargo install`ed tools (bpf-linker) visible to this process and its children, also
/// when the caller's PATH lacks cargo's bin directory (`$CARGO_INSTALL_ROOT/bin`, else
/// `$CARGO_HOME/bin`).
pub fn prepare_env() {
    let root = std::env::var_os("CARGO_INSTALL_ROOT").map_or_else(cargo_home, PathBuf::from);
    let bin = root.join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|p| p == bin) {
        let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
            .unwrap_or(path);
        // Still single-threaded: nothing else reads the environment yet.
        std::env::set_var("PATH", joined);
    }
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The cargo that runs us (`$CARGO`), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

pub struct Workspace {
    pub target_dir: PathBuf,
}

impl Workspace {
    /// Asks cargo, so that CARGO_TARGET_DIR and build.target-dir are honoured.
    pub fn locate() -> Result<Self> {
        let mut cmd = cargo();
        cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
        let json = output(&mut cmd)?;
        let meta: serde_json::Value =
            serde_json::from_str(&json).context("parse cargo metadata")?;
        let target_dir = meta["target_directory"]
            .as_str()
            .context("cargo metadata has no target_directory")?;
        Ok(Self {
            target_dir: PathBuf::from(target_dir),
        })
    }
}

/// Runs `cmd` with inherited output; fails unless it exits 0.
pub fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("run {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails with its stderr unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line as a user would type it.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}

/// From now on Ctrl-C (and SIGTERM, SIGHUP) only raise a flag that [`interruptible`] waits
/// and [`check_interrupt`] turn into an error, so guards unwind and clean up.
/// Calling it again is a no-op (`cargo xtask test` runs the VM tests after its own).
pub fn catch_interrupts() -> Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        if !INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted: cleaning up");
        }
    })
    .context("install the Ctrl-C handler")?;
    let _ = INSTALLED.set(());
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Like [`clink_testbed::wait_for`], but gives up at once on Ctrl-C.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    clink_testbed::wait_for(what, timeout, || interrupted() || f())?;
    check_interrupt()
}

/// Runs `cmd` to completion, capturing its output; kills it and fails after `timeout` or on
/// Ctrl-C. The child gets its own process group, so Ctrl-C reaches only us and we decide.
pub fn interruptible(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("run {}", show(cmd)))?;
    // Drained concurrently so a chatty child never blocks on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted() || Instant::now() >= deadline {
            kill(&mut child);
            check_interrupt()?;
            bail!("{} did not finish within {timeout:?}", show(cmd));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
