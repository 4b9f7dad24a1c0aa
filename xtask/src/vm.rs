//! `cargo xtask vm-test`: run commands as root in a VM that boots a kTLS-capable kernel.
//!
//! The build machines' kernel has no CONFIG_TLS, so the kernel-TLS data path is tested under
//! Debian's 6.1 kernel (`linux-image-amd64`, `CONFIG_TLS=m`), booted by virtme-ng in qemu
//! under software emulation (KVM is not usable here). The guest sees the host's root file
//! system read-only, so binaries built under `target/` run in it unchanged; `/sys/fs/bpf`,
//! cgroup2 and the network namespaces in it are the guest kernel's own. The one directory the
//! guest may write (`--rwdir`, a temporary directory of ours) carries a script in and its
//! output and exit status back out.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
// Set in the guest: tests that need kTLS fail there instead of skipping.
use clink_testbed::REQUIRE_KTLS;

use crate::run::{self, cargo, interrupted, show, step};

/// Host variables the guest's commands see as well; the guest starts with an empty
/// environment otherwise.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "CI",
    "RUST_BACKTRACE",
    "RUST_LOG",
    "CLINK_LOG",
    "CLINK_BIN_DIR",
];

/// What the script reports instead of an exit status when `modprobe tls` fails (and no
/// command ran): a word, so no command's status can be mistaken for it.
const NO_KTLS_MODULE: &str = "no-tls-module";

#[derive(clap::Args)]
pub struct Options {
    /// Kernel image to boot [default: the newest /boot/vmlinuz-6.1*].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Seconds the whole VM run (boot, commands, power-off) may take before it is killed.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Build test binaries with `cargo test --no-run ARGS` (one string, for example
    /// "-p clink-tests --test kernel_tls") and run each of them in the VM, from its package's
    /// directory as cargo would, with COMMAND as its arguments (a test filter, --nocapture).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cargo_test: Option<String>,
    /// The command to run in the VM, after `--` (with --cargo-test: the test binaries'
    /// arguments).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// One command for the guest, and the directory it runs in.
#[derive(Debug, PartialEq)]
pub struct GuestCommand {
    pub dir: PathBuf,
    pub argv: Vec<String>,
}

pub fn vm_test(opts: Options) -> Result<ExitCode> {
    vm_test_with_env(opts, &[]).map(|run| run.code)
}

/// [`vm_test`], with variables for the guest on top of [`PASSED_ENV`].
pub fn vm_test_with_env(opts: Options, env: &[(&str, &Path)]) -> Result<VmRun> {
    let commands = match &opts.cargo_test {
        Some(args) => {
            let args: Vec<&str> = args.split_whitespace().collect();
            test_binaries(&args)?
                .into_iter()
                .map(|(exe, dir)| GuestCommand {
                    dir,
                    argv: std::iter::once(exe.display().to_string())
                        .chain(opts.command.iter().cloned())
                        .collect(),
                })
                .collect()
        }
        None if opts.command.is_empty() => {
            bail!("nothing to run: give a command after `--`, or --cargo-test")
        }
        None => vec![GuestCommand {
            dir: std::env::current_dir()?,
            argv: opts.command.clone(),
        }],
    };
    run_in_vm(
        opts.kernel,
        Duration::from_secs(opts.timeout),
        &commands,
        env,
        &[],
    )
}

/// Boots the VM and runs `commands` in it as root (after `modprobe tls`), with `env` on top
/// of [`PASSED_ENV`]; `rwdirs` are host directories the guest may write besides the VM's
/// own shared directory (mounted at the same paths). Prints the guest's output as it comes.
pub fn run_in_vm(
    kernel: Option<PathBuf>,
    timeout: Duration,
    commands: &[GuestCommand],
    env: &[(&str, &Path)],
    rwdirs: &[&Path],
) -> Result<VmRun> {
    run::catch_interrupts()?;
    let kernel = match kernel {
        Some(kernel) => kernel,
        None => newest_kernel(Path::new("/boot"))?,
    };
    check_kernel(&kernel)?;
    let mut guest_env: Vec<(String, String)> = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .filter(|(k, _)| !env.iter().any(|(e, _)| e == k))
        .collect();
    guest_env.extend(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string())),
    );
    guest_env.push((REQUIRE_KTLS.to_owned(), "1".to_owned()));

    let dir = tempfile::Builder::new()
        .prefix("clink-vm-")
        .tempdir()
        .context("create the VM's shared directory")?;
    let script = dir.path().join("run.sh");
    fs::write(&script, guest_script(dir.path(), &guest_env, commands))?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;

    let mut vng = vng_command(&kernel, dir.path(), &script, rwdirs)?;
    step(&format!(
        "{} (boots in about half a minute under emulation; killed after {} s)",
        show(&vng),
        timeout.as_secs()
    ));
    let run = boot(&mut vng, dir.path(), timeout)?;
    let guest_log = fs::read_to_string(dir.path().join("guest.log")).unwrap_or_default();
    let timing = run.timing();
    let (passed, failed) = libtest_totals(&guest_log);
    let done = |code| VmRun {
        code,
        passed,
        failed,
    };
    match run.outcome {
        Outcome::Finished(0) => {
            step(&format!("vm-test passed: {timing}"));
            Ok(done(ExitCode::SUCCESS))
        }
        Outcome::NoKtlsModule => bail!(
            "`modprobe tls` failed in the VM: {} has no kTLS module ({timing})",
            kernel.display()
        ),
        Outcome::Finished(code) => {
            step(&format!(
                "vm-test FAILED: a command exited with {code} ({timing})"
            ));
            Ok(done(ExitCode::FAILURE))
        }
        Outcome::NoStatus(status) => bail!(
            "the VM ended ({status}) before its commands did ({timing}); the last lines \
             vng printed:\n{}",
            tail(
                &fs::read_to_string(dir.path().join("vng.log")).unwrap_or_default(),
                30
            )
        ),
    }
}

/// How a VM run ended, and the tests its commands reported (libtest's summary lines).
pub struct VmRun {
    pub code: ExitCode,
    pub passed: u64,
    pub failed: u64,
}

/// The sums of `test result: ... N passed; M failed; ...` lines in a test run's output.
fn libtest_totals(output: &str) -> (u64, u64) {
    let count = |line: &str, what: &str| -> u64 {
        line.split(';')
            .find_map(|part| {
                let part = part.trim();
                let n = part.strip_suffix(what)?.trim();
                n.rsplit(' ').next()?.parse().ok()
            })
            .unwrap_or(0)
    };
    output
        .lines()
        .filter(|l| l.starts_with("test result: "))
        .fold((0, 0), |(p, f), l| {
            (p + count(l, "passed"), f + count(l, "failed"))
        })
}

/// The newest `vmlinuz-6.1*` in `boot`: the 6.1 series is what `linux-image-amd64` gives on
/// Debian 12, and the kernel the kTLS facts in ARCHITECTURE.md ("kTLS data path") were checked on.
fn newest_kernel(boot: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(boot)
        .with_context(|| format!("read {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-6.1.") || n.starts_with("vmlinuz-6.1-"))
        })
        .collect();
    found.sort_by_key(|p| version_key(&p.to_string_lossy()));
    found.pop().with_context(|| {
        format!(
            "no vmlinuz-6.1* in {}: `cargo xtask setup` installs Debian's linux-image-amd64",
            boot.display()
        )
    })
}

/// The numbers in a kernel version, in order, so that 6.1.0-57 sorts after 6.1.0-9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The kernel must be readable and have its modules (kTLS is `tls.ko`) where the guest,
/// which sees the host's root file system, will look for them.
fn check_kernel(kernel: &Path) -> Result<()> {
    fs::File::open(kernel).with_context(|| format!("open the kernel {}", kernel.display()))?;
    let release = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"));
    if let Some(release) = release {
        let modules = Path::new("/lib/modules").join(release);
        if !modules.is_dir() {
            bail!(
                "{} has no modules in {}: reinstall its linux-image package",
                kernel.display(),
                modules.display()
            );
        }
    }
    Ok(())
}

fn venv_bin() -> PathBuf {
    venv_dir().join("bin")
}

/// Where `cargo xtask setup` installs virtme-ng.
pub fn venv_dir() -> PathBuf {
    crate::setup::cache_dir().join("clink-vm/venv")
}

fn vng_command(kernel: &Path, dir: &Path, script: &Path, rwdirs: &[&Path]) -> Result<Command> {
    let bin = venv_bin();
    let vng = bin.join("vng");
    if !vng.exists() {
        bail!(
            "{} is missing: `cargo xtask setup` installs virtme-ng",
            vng.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))?;
    let mut cmd = Command::new(vng);
    cmd.env("PATH", path)
        .arg("--run")
        .arg(kernel)
        .args(["--disable-kvm", "--memory", "2G", "--cpus", "2"])
        // The guest's kernel distrusts the emulated TSC and falls back to the HPET, whose
        // every read is an emulated MMIO access: 5-9% of the guest's CPU in a kTLS bench,
        // in each TCP send and receive. Real hosts read the TSC. (docs/performance.md,
        // "Where the VM's CPU goes")
        .args(["--append", "clocksource=tsc tsc=reliable"])
        .arg("--rwdir")
        .arg(dir);
    for rwdir in rwdirs {
        cmd.arg("--rwdir").arg(rwdir);
    }
    cmd.arg("--exec")
        .arg(format!("sh {}", quote(&script.to_string_lossy())));
    Ok(cmd)
}

/// The script the guest runs as root: load kTLS, run each command from its directory with
/// the given environment, and leave the output in `guest.log` and the first non-zero exit
/// status (else 0) in `status`. `started` tells the host the VM has booted.
fn guest_script(dir: &Path, env: &[(String, String)], commands: &[GuestCommand]) -> String {
    let d = quote(&dir.to_string_lossy());
    let mut s = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask vm-test`; runs as root inside the VM.\n\
         : > {d}/started\n\
         exec > {d}/guest.log 2>&1\n\
         finish() {{ echo \"$1\" > {d}/status.tmp && mv {d}/status.tmp {d}/status; exit 0; }}\n\
         echo \"vm: Linux $(uname -r), $(nproc) CPUs, clock source \
         $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"\n\
         modprobe tls || {{ echo 'vm: modprobe tls failed'; finish {NO_KTLS_MODULE}; }}\n\
         status=0\n"
    );
    for (key, value) in env {
        s += &format!("export {key}={}\n", quote(value));
    }
    for cmd in commands {
        let line: Vec<String> = cmd.argv.iter().map(|a| quote(a)).collect();
        let line = line.join(" ");
        s += &format!(
            "echo {shown}\n\
             (cd {dir} && {line})\n\
             rc=$?\n\
             echo \"vm: exit status $rc\"\n\
             [ $status -ne 0 ] || status=$rc\n",
            shown = quote(&format!("vm: {}", cmd.argv.join(" "))),
            dir = quote(&cmd.dir.to_string_lossy()),
        );
    }
    s += "finish $status\n";
    s
}

/// `s` as one POSIX shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

enum Outcome {
    /// The script ran to its end: the first non-zero exit status of its commands, else 0.
    Finished(i32),
    /// `modprobe tls` failed; no command ran.
    NoKtlsModule,
    /// vng exited (this status) without the script's result.
    NoStatus(String),
}

struct Run {
    outcome: Outcome,
    /// From starting vng until the guest's script began.
    boot: Option<Duration>,
    /// From then until the script wrote its status.
    commands: Option<Duration>,
    total: Duration,
}

impl Run {
    fn timing(&self) -> String {
        let secs =
            |d: Option<Duration>| d.map_or("?".to_owned(), |d| format!("{:.0} s", d.as_secs_f64()));
        format!(
            "boot {}, commands {}, whole VM run {:.0} s",
            secs(self.boot),
            secs(self.commands),
            self.total.as_secs_f64()
        )
    }
}

/// Runs vng to its end, noting when the guest's script starts and ends. Kills vng and its
/// qemu after `timeout`, on Ctrl-C, and on every early return.
fn boot(vng: &mut Command, dir: &Path, timeout: Duration) -> Result<Run> {
    let log = fs::File::create(dir.join("vng.log"))?;
    let start = Instant::now();
    // Its own process group: qemu is vng's child, and the group is what we kill.
    let child = vng
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("run {}", show(vng)))?;
    let mut vm = VmGuard(child);
    let (mut booted, mut finished) = (None, None);
    let mut shown = GuestLog::new(dir.join("guest.log"));
    let exit = loop {
        shown.print_new();
        if booted.is_none() && dir.join("started").exists() {
            booted = Some(start.elapsed());
        }
        if finished.is_none() && dir.join("status").exists() {
            finished = Some(start.elapsed());
        }
        if let Some(status) = vm.0.try_wait()? {
            shown.print_new();
            break status;
        }
        if interrupted() {
            vm.kill();
            run::check_interrupt()?;
        }
        if start.elapsed() >= timeout {
            vm.kill();
            shown.print_new();
            bail!(
                "the VM did not finish within {timeout:?} (booted: {}; the guest's output so \
                 far is above); the last lines vng printed:\n{}",
                booted.is_some(),
                tail(
                    &fs::read_to_string(dir.join("vng.log")).unwrap_or_default(),
                    30
                )
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let total = start.elapsed();
    let status = fs::read_to_string(dir.join("status")).ok();
    let outcome = match status.as_deref().map(str::trim) {
        Some(NO_KTLS_MODULE) => Outcome::NoKtlsModule,
        Some(code) => match code.parse() {
            Ok(code) => Outcome::Finished(code),
            Err(_) => Outcome::NoStatus(format!("{exit}, status file says {code:?}")),
        },
        None => Outcome::NoStatus(exit.to_string()),
    };
    let finished = finished.or(status.is_some().then_some(total));
    Ok(Run {
        outcome,
        boot: booted,
        commands: booted.zip(finished).map(|(b, f)| f.saturating_sub(b)),
        total,
    })
}

/// The guest's output, printed while the VM runs: a bench in it runs for minutes.
struct GuestLog {
    path: PathBuf,
    printed: u64,
}

impl GuestLog {
    fn new(path: PathBuf) -> Self {
        Self { path, printed: 0 }
    }

    /// Prints what the guest added since the last call.
    fn print_new(&mut self) {
        use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        let mut new = Vec::new();
        if file.seek(SeekFrom::Start(self.printed)).is_ok() && file.read_to_end(&mut new).is_ok() {
            self.printed += new.len() as u64;
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&new);
            let _ = stdout.flush();
        }
    }
}

/// vng and everything it started (qemu), killed when dropped unless already gone.
struct VmGuard(Child);

impl VmGuard {
    fn kill(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let group = Pid::from_raw(self.0.id() as i32);
        // SIGTERM first so virtme-ng removes its own temporary files, then no more waiting.
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Builds the test binaries `cargo test --no-run ARGS` selects and returns each executable
/// with its package's directory (where cargo would run it).
pub fn test_binaries(args: &[&str]) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .args(args);
    step(&show(&cmd));
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", show(&cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", show(&cmd), out.status);
    }
    let found = test_executables(&String::from_utf8_lossy(&out.stdout))?;
    if found.is_empty() {
        bail!("{} built no test binary", show(&cmd));
    }
    Ok(found)
}

/// The test executables in cargo's JSON messages, with their packages' directories.
fn test_executables(messages: &str) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut found = Vec::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let msg: serde_json::Value = serde_json::from_str(line).context("parse cargo's JSON")?;
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        let dir = Path::new(manifest).parent().unwrap_or(Path::new("/"));
        found.push((PathBuf::from(exe), dir.to_path_buf()));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {

    #[test]
    fn libtest_summaries_are_summed() {
        let log = "running 4 tests\n\
                   test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 68 filtered out\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
                   test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out\n";
        assert_eq!(libtest_totals(log), (6, 1));
        assert_eq!(libtest_totals("no tests here"), (0, 0));
    }
    use super::*;

    #[test]
    fn newest_kernel_compares_versions_as_numbers() {
        let boot = tempfile::tempdir().unwrap();
        for name in [
            "vmlinuz-6.1.0-9-amd64",
            "vmlinuz-6.1.0-57-amd64",
            "vmlinuz-6.12.0-1-amd64",
            "vmlinuz-6.1.0-10-amd64",
            "config-6.1.0-99-amd64",
        ] {
            fs::write(boot.path().join(name), "").unwrap();
        }
        assert_eq!(
            newest_kernel(boot.path()).unwrap(),
            boot.path().join("vmlinuz-6.1.0-57-amd64")
        );
        let empty = tempfile::tempdir().unwrap();
        let err = newest_kernel(empty.path()).unwrap_err().to_string();
        assert!(err.contains("cargo xtask setup"), "{err}");
    }

    #[test]
    fn quote_makes_one_shell_word() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn guest_script_runs_every_command_and_keeps_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let commands = [
            GuestCommand {
                dir: dir.path().to_path_buf(),
                argv: vec!["sh".into(), "-c".into(), "echo one; exit 3".into()],
            },
            GuestCommand {
                dir: "/".into(),
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo \"two $GREETING\"; exit 4".into(),
                ],
            },
        ];
        let env = [("GREETING".to_owned(), "it's me".to_owned())];
        // Outside a VM `modprobe tls` fails (no module), so run the script without that line.
        let script = guest_script(dir.path(), &env, &commands)
            .lines()
            .filter(|l| !l.starts_with("modprobe"))
            .collect::<Vec<_>>()
            .join("\n");
        let status = Command::new("sh").arg("-c").arg(&script).status().unwrap();
        assert!(status.success());
        assert!(dir.path().join("started").exists());
        assert_eq!(
            fs::read_to_string(dir.path().join("status"))
                .unwrap()
                .trim(),
            "3"
        );
        let log = fs::read_to_string(dir.path().join("guest.log")).unwrap();
        assert!(log.contains("one\nvm: exit status 3"), "{log}");
        assert!(log.contains("two it's me\nvm: exit status 4"), "{log}");
    }

    #[test]
    fn test_executables_come_from_test_artifacts_only() {
        let messages = r#"
{"reason":"compiler-artifact","profile":{"test":false},"executable":null,"manifest_path":"/w/tests/testbed/Cargo.toml"}
{"reason":"compiler-artifact","profile":{"test":true},"executable":"/w/target/debug/deps/kernel_tls-0123","manifest_path":"/w/tests/Cargo.toml"}
{"reason":"compiler-artifact","profile":{"test":false},"executable":"/w/target/debug/clink-sockets","manifest_path":"/w/tests/Cargo.toml"}
{"reason":"build-finished","success":true}
"#;
        assert_eq!(
            test_executables(messages).unwrap(),
            [(
                PathBuf::from("/w/target/debug/deps/kernel_tls-0123"),
                PathBuf::from("/w/tests")
            )]
        );
    }
}
