//! Free-space check before `cargo xtask test`: a clean run writes several GiB of build
//! outputs, and a disk that fills half-way through fails as an LLVM "IO failure on output
//! stream" twenty minutes in. Checking first turns that into one clear line.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::statvfs::statvfs;

const GIB: u64 = 1 << 30;

/// What a clean clone's `cargo xtask test` may leave in its target directories: 9.9 GiB in
/// `target/` and 3.1 GiB in `fuzz/target/` on 2026-12-03, with room for the build's temporary
/// files and for dependencies that grow.
pub const TEST_NEED: u64 = 16 * GIB;

/// Fails when the disk holding `targets[0]` has less free space than `need` minus what the
/// `targets` already hold (a warm tree rebuilds little, so it needs less).
pub fn ensure_free(targets: &[PathBuf], need: u64) -> Result<()> {
    let first = targets.first().context("no target directory to check")?;
    let probe = existing_ancestor(first);
    let stat = statvfs(&probe).with_context(|| format!("statvfs {}", probe.display()))?;
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    let built: u64 = targets.iter().map(|t| dir_size(t)).sum();
    let missing = need.saturating_sub(built);
    if free < missing {
        bail!(
            "not enough disk space: this run needs about {} GiB for build outputs ({} GiB are \
             already built in {}), but {} has {:.1} GiB free; free some (`cargo clean` in old \
             clones, stale target directories) or point CARGO_TARGET_DIR at a larger disk",
            gib(missing),
            gib(built),
            first.display(),
            probe.display(),
            free as f64 / GIB as f64,
        );
    }
    println!(
        "disk: {:.1} GiB free on {}, about {} GiB still to build",
        free as f64 / GIB as f64,
        probe.display(),
        gib(missing)
    );
    Ok(())
}

fn gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// `path` or the closest directory above it that exists (a clean clone has no target/ yet).
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Bytes in regular files under `dir` (0 if it does not exist); symlinks are not followed.
fn dir_size(dir: &Path) -> u64 {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // Missing (a clean clone) or unreadable: nothing that this run can reuse.
        Err(_) => return 0,
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_size(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_below_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        fs::write(dir.path().join("a/x"), vec![0u8; 1000]).unwrap();
        fs::write(dir.path().join("y"), vec![0u8; 24]).unwrap();
        assert_eq!(dir_size(dir.path()), 1024);
        assert_eq!(dir_size(&dir.path().join("missing")), 0);
    }

    #[test]
    fn a_warm_tree_needs_less_and_a_full_disk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        // Nothing built yet, and no disk has an exabyte free.
        let err = ensure_free(std::slice::from_ref(&target), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not enough disk space"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        // What is already built counts: a tree holding the whole need asks for nothing.
        fs::create_dir(&target).unwrap();
        fs::write(target.join("lib.rlib"), vec![0u8; 4096]).unwrap();
        ensure_free(&[target], 4096).unwrap();
    }
}
