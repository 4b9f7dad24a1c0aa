//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` for a fixed time each.
//!
//! The fuzz crate is its own workspace (nightly, sanitizer flags) and is built with
//! `AYA_BUILD_SKIP=1`: the parsers need clink-agent's library, not its eBPF object. Each target
//! starts from its committed seeds (`fuzz/corpus/<target>`, read only) and from what earlier
//! runs found (`target/fuzz-corpus/<target>`, where libFuzzer writes new inputs), so the
//! committed corpus stays small and a local run keeps its progress.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::run::{check, interruptible, output, show, step, workspace_root, Workspace};

/// How long `cargo xtask test` fuzzes each target: short, it guards against regressions and
/// keeps CI small; `cargo xtask fuzz --seconds N` searches longer.
pub const SECONDS_IN_TEST: u64 = 20;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (default: every target in fuzz/).
    pub targets: Vec<String>,
}

pub fn fuzz(opts: &Options) -> Result<()> {
    // Each run is in its own process group (`interruptible`): Ctrl-C reaches us, and we stop it.
    crate::run::catch_interrupts()?;
    let ws = Workspace::locate()?;
    let targets = if opts.targets.is_empty() {
        list()?
    } else {
        opts.targets.clone()
    };
    let mut build = cargo_fuzz();
    build
        .args(["build", "--fuzz-dir", "fuzz"])
        .args(BUILD_FLAGS);
    let started = Instant::now();
    step(&format!("AYA_BUILD_SKIP=1 {}", show(&build)));
    check(&mut build)?;
    println!("    built in {:.0?}", started.elapsed());
    for target in &targets {
        let scratch = ws.target_dir.join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("create {}", scratch.display()))?;
        run_target(target, &scratch, opts.seconds)?;
    }
    Ok(())
}

/// Debug assertions catch overflows that a release build would wrap silently.
const BUILD_FLAGS: &[&str] = &["--debug-assertions"];

/// `cargo fuzz` with the nightly toolchain it needs, in the workspace root.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(workspace_root())
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn list() -> Result<Vec<String>> {
    let out = output(cargo_fuzz().args(["list", "--fuzz-dir", "fuzz"]))?;
    let targets: Vec<String> = out.lines().map(|l| l.trim().to_owned()).collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets in fuzz/");
    }
    Ok(targets)
}

fn run_target(target: &str, scratch: &Path, seconds: u64) -> Result<()> {
    let seeds = workspace_root()
        .canonicalize()
        .context("find the workspace root")?
        .join("fuzz/corpus")
        .join(target);
    let mut run = cargo_fuzz();
    run.args(["run", "--fuzz-dir", "fuzz"])
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A hang is a finding too, and must not eat the run.
        .arg("-timeout=10")
        .arg("-print_final_stats=1");
    step(&format!("{} ({seconds} s)", show(&run)));
    // The build is done already; the margin covers libFuzzer's start and a slow crash report.
    let out = interruptible(&mut run, Duration::from_secs(seconds + 120))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // libFuzzer's progress lines say nothing about the failure; the rest is the input, the
        // panic and the stack, and the command that reproduces it.
        for line in log.lines().filter(|l| !is_progress(l)) {
            eprintln!("{line}");
        }
        bail!(
            "fuzz target {target} failed ({}): the input is in fuzz/artifacts/{target}/, replay \
             it with `AYA_BUILD_SKIP=1 cargo +nightly fuzz run -a {target} <file>`",
            out.status
        );
    }
    println!("    {}", summary(&log));
    Ok(())
}

/// `#1234 NEW cov: ...`, `#65536 pulse ...`: libFuzzer's running commentary.
fn is_progress(line: &str) -> bool {
    line.strip_prefix('#')
        .and_then(|rest| rest.split_once(char::is_whitespace))
        .is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_digit()))
}

/// One line from the final statistics: executions, coverage, corpus size, peak memory.
fn summary(log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
            .to_owned()
    };
    let last_progress = log.lines().rev().find(|l| is_progress(l));
    let field = |key: &str| {
        last_progress
            .and_then(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == key)?;
                words.next()
            })
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "{} executions ({}/s), coverage {}, corpus {} (inputs/size), peak RSS {} MiB",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        field("cov:"),
        field("corp:"),
        stat("peak_rss_mb"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
INFO: Seed: 1234
#2\tINITED cov: 310 ft: 320 corp: 3/240b exec/s: 0 rss: 40Mb
#1024\tpulse  cov: 411 ft: 650 corp: 40/2210b lim: 43 exec/s: 512 rss: 45Mb
#20375\tNEW    cov: 415 ft: 662 corp: 44/2.5Kb lim: 210 exec/s: 1018 rss: 46Mb L: 52/180 MS: 1 ChangeBit-
Done 20375 runs in 21 second(s)
stat::number_of_executed_units: 20375
stat::average_exec_per_sec:     970
stat::new_units_added:          41
stat::slowest_unit_time_sec:    0
stat::peak_rss_mb:              46
";

    #[test]
    fn progress_lines_are_told_from_findings() {
        assert!(is_progress("#1024\tpulse  cov: 411"));
        assert!(is_progress("#7 NEW cov: 1"));
        assert!(!is_progress(
            "==123==ERROR: AddressSanitizer: heap-buffer-overflow"
        ));
        assert!(!is_progress("#[derive(Debug)]"));
        assert!(!is_progress(
            "thread '<unnamed>' panicked at src/lib.rs:1:1:"
        ));
    }

    #[test]
    fn summary_reads_the_final_statistics() {
        assert_eq!(
            summary(LOG),
            "20375 executions (970/s), coverage 415, corpus 44/2.5Kb (inputs/size), peak RSS 46 MiB"
        );
        assert_eq!(
            summary(""),
            "? executions (?/s), coverage ?, corpus ? (inputs/size), peak RSS ? MiB"
        );
    }
}
