//! Pin directories on bpffs for one agent or loader under test: unique, so that two never
//! share pins, and removed on drop with whatever a killed agent left in them.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::names;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A pin directory (`--bpf-pin-dir`), not created: the agent or loader does that.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    /// A parent shared with others (tests running in parallel, an agent), removed once empty.
    shared_parent: Option<PathBuf>,
}

impl PinDir {
    /// `/sys/fs/bpf/clk-<pid>-<n>-<role>`.
    pub fn new(role: &str) -> Self {
        Self {
            path: Path::new(BPFFS).join(names::unique_name(role)),
            shared_parent: None,
        }
    }

    /// `<parent>/clk-<pid>-<n>-<role>`, for a loader whose pins must live under its default
    /// directory `parent`. Dropping it also removes `parent` if nothing else is left there.
    pub fn within(parent: &Path, role: &str) -> Self {
        Self {
            path: parent.join(names::unique_name(role)),
            shared_parent: Some(parent.to_owned()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("testbed: remove {}: {e}", self.path.display()),
        }
        if let Some(parent) = &self.shared_parent {
            match fs::remove_dir(parent) {
                Ok(()) => {}
                // Another test or an agent still has its pins there, or it went already.
                Err(e)
                    if matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::NotFound) => {}
                Err(e) => eprintln!("testbed: remove {}: {e}", parent.display()),
            }
        }
    }
}

/// Removes test bed pin directories in bpffs whose process no longer runs. Returns their
/// paths.
pub(crate) fn remove_stale() -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(BPFFS) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("read {BPFFS}")),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(names::is_stale)
        {
            fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_itself_and_an_empty_shared_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("shared");
        let (one, two) = (PinDir::within(&parent, "x"), PinDir::within(&parent, "x"));
        assert_ne!(one.path(), two.path());
        fs::create_dir_all(one.path().join("map")).unwrap();
        fs::create_dir_all(two.path()).unwrap();
        drop(one);
        assert!(parent.exists(), "still used by the second");
        drop(two);
        assert!(!parent.exists());
    }
}
