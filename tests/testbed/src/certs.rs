//! Fabric certificates, made by the real `clink` CLI as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// `clink fabric create` and one `clink peer-cert create` per peer, into `dir`:
/// `dir/<fabric>/{ca.pem,ca.key}` and `dir/<peer>/{cert.pem,key.pem,ca.pem}`.
pub fn make_certificates(clink: &Path, dir: &Path, fabric: &str, peers: &[&str]) -> Result<()> {
    let mut commands = vec![vec!["fabric", "create", "--name", fabric]];
    for peer in peers {
        commands.push(vec![
            "peer-cert",
            "create",
            "--name",
            peer,
            "--fabric",
            fabric,
        ]);
    }
    for args in commands {
        let mut cmd = Command::new(clink);
        cmd.args(&args).arg("--path").arg(dir).stdin(Stdio::null());
        let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "clink {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// A new certificate for `peer` of fabric `fabric` (whose CA is in `certs/<fabric>/`), made
/// by `clink peer-cert create` into `<into>/<peer>/` as an operator rotating it would; returns
/// that directory. `certs/<peer>/` is left as it is.
pub fn reissue_certificate(
    clink: &Path,
    certs: &Path,
    fabric: &str,
    peer: &str,
    into: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(into).with_context(|| format!("create {}", into.display()))?;
    let link = into.join(fabric);
    if !link.exists() {
        std::os::unix::fs::symlink(certs.join(fabric), &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    let args = ["peer-cert", "create", "--name", peer, "--fabric", fabric];
    let out = Command::new(clink)
        .args(args)
        .arg("--path")
        .arg(into)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} {}", clink.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "clink {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(into.join(peer))
}

/// The files of a peer certificate directory.
pub const PEER_FILES: [&str; 3] = ["cert.pem", "key.pem", "ca.pem"];

/// Turns `dir` (holding [`PEER_FILES`]) into the layout of a Kubernetes Secret volume, with
/// the same content: the files move into a timestamped directory `..<stamp>`, `..data` is a
/// symbolic link to it, and each file is a symbolic link `<file> -> ..data/<file>`. Each
/// file is replaced by a rename, so a reader never finds it missing.
pub fn kubelet_layout(dir: &Path) -> Result<()> {
    let stamp = kubelet_stamp(dir)?;
    std::fs::create_dir(dir.join(&stamp))?;
    for file in PEER_FILES {
        std::fs::copy(dir.join(file), dir.join(&stamp).join(file))
            .with_context(|| format!("copy {file} into {stamp}"))?;
    }
    std::os::unix::fs::symlink(&stamp, dir.join("..data"))?;
    for file in PEER_FILES {
        let tmp = dir.join(format!(".{file}.link"));
        std::os::unix::fs::symlink(Path::new("..data").join(file), &tmp)?;
        std::fs::rename(&tmp, dir.join(file))?;
    }
    Ok(())
}

/// Updates a directory in [`kubelet_layout`] to the files in `from` as the kubelet updates a
/// Secret volume: the new files go into a new timestamped directory, a symbolic link
/// `..data_tmp` to it is renamed over `..data` (the one atomic step), and the old directory is
/// removed.
pub fn kubelet_update(dir: &Path, from: &Path) -> Result<()> {
    let old = std::fs::read_link(dir.join("..data"))
        .with_context(|| format!("{} is not in the kubelet's layout", dir.display()))?;
    let stamp = kubelet_stamp(dir)?;
    std::fs::create_dir(dir.join(&stamp))?;
    for file in PEER_FILES {
        std::fs::copy(from.join(file), dir.join(&stamp).join(file))
            .with_context(|| format!("copy {}", from.join(file).display()))?;
    }
    std::os::unix::fs::symlink(&stamp, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    std::fs::remove_dir_all(dir.join(old))?;
    Ok(())
}

/// A timestamped name like the kubelet's (`..<seconds>.<nanoseconds>`), not yet taken in
/// `dir`.
fn kubelet_stamp(dir: &Path) -> Result<String> {
    loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let stamp = format!("..{}.{:09}", now.as_secs(), now.subsec_nanos());
        if !dir.join(&stamp).exists() {
            return Ok(stamp);
        }
    }
}

/// Replaces each of `dir`'s [`PEER_FILES`] with the one in `from`, as a careful operator
/// would in standalone mode: written to a temporary name in `dir`, then renamed over it.
pub fn replace_files(dir: &Path, from: &Path) -> Result<()> {
    for file in PEER_FILES {
        let tmp = dir.join(format!(".{file}.new"));
        std::fs::copy(from.join(file), &tmp)
            .with_context(|| format!("copy {}", from.join(file).display()))?;
        std::fs::rename(&tmp, dir.join(file))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_files(dir: &Path, content: &str) {
        std::fs::create_dir_all(dir).unwrap();
        for file in PEER_FILES {
            std::fs::write(dir.join(file), format!("{content} {file}")).unwrap();
        }
    }

    fn read_files(dir: &Path) -> Vec<String> {
        PEER_FILES
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
            .collect()
    }

    #[test]
    fn the_kubelet_layout_keeps_the_content_and_an_update_swaps_it_whole() {
        let root = tempfile::tempdir().unwrap();
        let (dir, next) = (root.path().join("live"), root.path().join("next"));
        write_files(&dir, "old");
        write_files(&next, "new");
        kubelet_layout(&dir).unwrap();
        assert_eq!(
            read_files(&dir),
            ["old cert.pem", "old key.pem", "old ca.pem"]
        );
        assert!(std::fs::symlink_metadata(dir.join("cert.pem"))
            .unwrap()
            .file_type()
            .is_symlink());
        let before = std::fs::read_link(dir.join("..data")).unwrap();

        kubelet_update(&dir, &next).unwrap();
        assert_eq!(
            read_files(&dir),
            ["new cert.pem", "new key.pem", "new ca.pem"]
        );
        let after = std::fs::read_link(dir.join("..data")).unwrap();
        assert_ne!(before, after);
        assert!(!dir.join(&before).exists(), "the old directory is removed");
        assert_eq!(
            std::fs::read_link(dir.join("key.pem")).unwrap(),
            Path::new("..data/key.pem"),
            "the files' own links never change"
        );

        write_files(&next, "newer");
        let plain = root.path().join("plain");
        write_files(&plain, "old");
        replace_files(&plain, &next).unwrap();
        assert_eq!(
            read_files(&plain),
            ["newer cert.pem", "newer key.pem", "newer ca.pem"]
        );
    }
}
