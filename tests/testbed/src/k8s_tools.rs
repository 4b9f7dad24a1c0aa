//! The Kubernetes tools the tests run: a static helm and kubectl, kubernetes-validate, and
//! the Python environment of the API-server emulator (tests/k8s/apiserver.py), all installed
//! by `cargo xtask setup` into one cache directory. No real API server is obtainable here:
//! helm renders offline, kubernetes-validate checks against bundled schemas, and kubectl,
//! kube-rs and the agent talk to the emulator (`crate::ApiServer`).

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

/// The static kubectl taken from the same npm package as helm.
pub fn kubectl_path() -> PathBuf {
    k8s_tools_dir().join("bin/kubectl")
}

/// kubernetes-validate from PyPI, in a virtual environment of its own.
pub fn kubernetes_validate_path() -> PathBuf {
    k8s_tools_dir().join("venv/bin/kubernetes-validate")
}

/// kmock's command, in the same virtual environment: present once setup has installed what the
/// emulator runs on (kmock 0.8 with aiohttp and jsonpatch).
pub fn kmock_path() -> PathBuf {
    k8s_tools_dir().join("venv/bin/kmock")
}

/// The Python of that virtual environment, which runs the emulator.
pub fn k8s_python_path() -> PathBuf {
    k8s_tools_dir().join("venv/bin/python")
}

/// The API-server emulator's program in this repository.
pub fn apiserver_script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/apiserver.py"))
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
