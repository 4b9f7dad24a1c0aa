//! Fabric certificates, made by the real `clink` CLI as an operator would.

use std::path::Path;
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
