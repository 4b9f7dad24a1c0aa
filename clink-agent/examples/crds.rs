//! Writes the chart's CRD files from the Rust types: `cargo xtask crds` runs this with the
//! chart's crds/ directory. Files of the group that no type renders any more are removed.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use clink_agent::k8s::crd;

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .context("usage: crds <directory to write the CRD files to>")?,
    );
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let manifests = crd::manifests();
    for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("clusterlink.net_") && !manifests.iter().any(|(file, _)| *file == name)
        {
            fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
            println!("removed {}", path.display());
        }
    }
    for (file, yaml) in manifests {
        let path = dir.join(file);
        if fs::read_to_string(&path).ok().as_deref() == Some(yaml.as_str()) {
            println!("unchanged {}", path.display());
        } else {
            fs::write(&path, yaml).with_context(|| format!("write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
