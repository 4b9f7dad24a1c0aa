//! The Kubernetes tools the chart tests run: a static helm and kubernetes-validate, both
//! installed by `cargo xtask setup` into one cache directory (no API server is needed or
//! obtainable here: helm renders offline, kubernetes-validate checks against bundled schemas).

use std::path::PathBuf;

/// Where `cargo xtask setup` installs the tools: `$XDG_CACHE_HOME/clink-k8s`, else
/// `~/.cache/clink-k8s`.
pub fn k8s_tools_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        })
        .join("clink-k8s")
}

/// The static helm taken from the npm package that carries it.
pub fn helm_path() -> PathBuf {
    k8s_tools_dir().join("bin/helm")
}

/// kubernetes-validate from PyPI, in a virtual environment of its own.
pub fn kubernetes_validate_path() -> PathBuf {
    k8s_tools_dir().join("venv/bin/kubernetes-validate")
}

/// Whether a test that needs `tool` (one of the paths above) can run.
///
/// True when it is installed. Otherwise, in CI (`CI=true`) it panics so that a skipped test
/// cannot pass unnoticed; elsewhere it prints that `what` is skipped and returns false.
pub fn require_k8s_tool(tool: &std::path::Path, what: &str) -> bool {
    if tool.is_file() {
        return true;
    }
    let missing = format!(
        "{what} needs {}, which `cargo xtask setup` installs",
        tool.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{missing}, and CI=true forbids skipping it");
    }
    eprintln!("skipping: {missing}");
    false
}
