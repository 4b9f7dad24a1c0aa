//! `cargo xtask image`: the agent's container image, as an OCI archive, built on this machine
//! without a container engine and without pulling a base image.
//!
//! `clink-agent` and `clink` are built static for `x86_64-unknown-linux-musl` (release code,
//! the `dist` profile; the eBPF object is built by clink-agent's build.rs with nightly as for
//! every build and embedded) and put into one layer `FROM scratch`: no shell, no libc, no
//! CA bundle (peers use the fabric CA from the `cl-peer` Secret). The paths below are the
//! ones the Helm chart mounts and passes; the root Dockerfile builds the same image with
//! Docker, and a test keeps the two in step.

mod elf;
mod oci;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::run::{cargo, check, output, show, step, workspace_root, Workspace};
use crate::setup;

/// Where the binaries go; also the image's PATH, so `kubectl exec <pod> -- clink status`
/// finds the CLI (which finds the agent at its default admin socket).
pub const BIN_DIR: &str = "/usr/local/bin";
pub const BINARIES: [&str; 2] = ["clink-agent", "clink"];
/// The chart passes only arguments.
pub const ENTRYPOINT: &str = "/usr/local/bin/clink-agent";
/// Empty directories for what the chart mounts (the peer certificate, the state directory,
/// the admin socket's directory, the host's cgroup v2) and the agent's defaults write to
/// (`--admin /run/clusterlink/admin.sock`), so the image also runs with a read-only root
/// file system. There is no /tmp: the agent writes nowhere else.
pub const DIRS: [&str; 4] = [
    "/etc/clusterlink/certs",
    "/run/clusterlink",
    "/run/clusterlink/cgroupv2",
    "/var/lib/clusterlink",
];
/// The chart's default `image.repository`; the tag defaults to the version, the chart's
/// `appVersion`.
pub const REPOSITORY: &str = "clusterlink-rs/clink-agent";
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// Release without debug info (root Cargo.toml).
pub const PROFILE: &str = "dist";
/// Every crate shares the workspace's version.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The OCI labels the image carries; version, revision and source are per build.
pub const LABEL_TITLE: &str = "org.opencontainers.image.title";
pub const LABEL_DESCRIPTION: &str = "org.opencontainers.image.description";
pub const LABEL_LICENSES: &str = "org.opencontainers.image.licenses";
pub const LABEL_VERSION: &str = "org.opencontainers.image.version";
pub const LABEL_REVISION: &str = "org.opencontainers.image.revision";
pub const LABEL_SOURCE: &str = "org.opencontainers.image.source";
const TITLE: &str = "clink-agent";
const DESCRIPTION: &str = "ClusterLink-rs gateway agent (clink-agent) and CLI (clink)";
const LICENSES: &str = "Apache-2.0";

/// Debian packages the image command needs besides the eBPF toolchain.
const PACKAGES: &[(&str, &str)] = &[
    (
        "musl-tools",
        "musl-gcc (found by the cc crate) compiles aws-lc's and ring's C and assembly for the \
         musl target",
    ),
    (
        "skopeo",
        "checks the archive the way podman, buildah and skopeo read it",
    ),
];

#[derive(clap::Args)]
pub struct Options {
    /// Image name REPOSITORY[:TAG] [default: clusterlink-rs/clink-agent:<version>, what the
    /// chart runs].
    #[arg(long, value_name = "REPOSITORY[:TAG]")]
    tag: Option<String>,
    /// Archive to write [default: target/image/clink-agent-<version>.oci.tar].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The org.opencontainers.image.source label [default: the URL of the git remote
    /// `origin`, if there is one].
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// Check an existing archive instead of building one: its format and digests, the
    /// entrypoint, labels and files, and that its binaries are static and run here.
    #[arg(long, value_name = "ARCHIVE", conflicts_with_all = ["tag", "output", "source"])]
    check: Option<PathBuf>,
}

pub fn image(opts: Options) -> Result<ExitCode> {
    // Ctrl-C then fails the step under way, and the scratch directories are removed.
    crate::run::catch_interrupts()?;
    let ws = Workspace::locate()?;
    let scratch_root = ws.target_dir.join("image");
    fs::create_dir_all(&scratch_root)?;
    if let Some(archive) = &opts.check {
        step("checking what the check needs");
        setup::debian_packages(PACKAGES)?;
        let checked = check_archive(archive, &scratch_root)?;
        summary(&checked, archive)?;
        return Ok(ExitCode::SUCCESS);
    }
    let default_name = format!("{REPOSITORY}:{VERSION}");
    let name = Reference::parse(opts.tag.as_deref().unwrap_or(&default_name))?;
    let output = opts
        .output
        .unwrap_or_else(|| scratch_root.join(format!("clink-agent-{VERSION}.oci.tar")));

    step("image: checking what the build needs");
    setup::ebpf_toolchain()?;
    musl_target()?;
    setup::debian_packages(PACKAGES)?;
    let bin_dir = build_binaries(&ws)?;

    let commit = Commit::head()?;
    let source = match opts.source {
        Some(url) => url,
        None => git_origin().unwrap_or_else(|| {
            println!("    no --source and no git remote `origin`: the source label stays empty");
            String::new()
        }),
    };
    let scratch = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&scratch_root)?;
    let rootfs = scratch.path().join("rootfs");
    stage_rootfs(&bin_dir, &rootfs)?;
    step(&format!("writing {name} to {}", output.display()));
    let manifest = oci::write_archive(
        &oci::Image {
            rootfs: &rootfs,
            config: image_config(&labels(VERSION, &commit.revision, &source)),
            created: &commit.created,
            mtime: commit.epoch,
            annotations: name.annotations(),
        },
        scratch.path(),
        &output,
    )?;
    drop(scratch);

    let checked = check_archive(&output, &scratch_root)?;
    ensure!(
        checked.opened.manifest == manifest,
        "the archive reads back as {:?}, not as the {manifest:?} written",
        checked.opened.manifest
    );
    summary(&checked, &output)?;
    println!(
        "load it: kind load image-archive {0} --name <cluster>\n\
         \x20        k3d image import {0} --cluster <cluster>\n\
         \x20        skopeo copy oci-archive:{0} docker-daemon:{name}",
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The image config's `config`: how a container of it starts.
fn image_config(labels: &BTreeMap<String, String>) -> Value {
    json!({
        "Entrypoint": [ENTRYPOINT],
        "Env": [format!("PATH={BIN_DIR}")],
        "Labels": labels,
    })
}

fn labels(version: &str, revision: &str, source: &str) -> BTreeMap<String, String> {
    [
        (LABEL_TITLE, TITLE),
        (LABEL_DESCRIPTION, DESCRIPTION),
        (LABEL_LICENSES, LICENSES),
        (LABEL_VERSION, version),
        (LABEL_REVISION, revision),
        (LABEL_SOURCE, source),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The image's file system: the binaries and the empty directories, everything root's and
/// not writable by others whatever the umask.
fn stage_rootfs(bin_dir: &Path, rootfs: &Path) -> Result<()> {
    let dest = rootfs.join(BIN_DIR.trim_start_matches('/'));
    fs::create_dir_all(&dest)?;
    for bin in BINARIES {
        fs::copy(bin_dir.join(bin), dest.join(bin))
            .with_context(|| format!("copy {bin} into the image"))?;
    }
    for dir in DIRS {
        fs::create_dir_all(rootfs.join(dir.trim_start_matches('/')))?;
    }
    for path in expected_entries().keys() {
        fs::set_permissions(rootfs.join(path), fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Every entry the layer must hold, as tar lists it (directories end in `/`), and whether
/// it is a directory.
fn expected_entries() -> BTreeMap<String, bool> {
    let mut entries = BTreeMap::new();
    let files = BINARIES.map(|b| format!("{BIN_DIR}/{b}"));
    for path in DIRS.iter().copied().chain([BIN_DIR]) {
        let mut prefix = String::new();
        for part in path.trim_start_matches('/').split('/') {
            prefix = format!("{prefix}{part}/");
            entries.insert(prefix.clone(), true);
        }
    }
    for file in files {
        entries.insert(file.trim_start_matches('/').to_owned(), false);
    }
    entries
}

/// What a check found, for the summary.
struct Checked {
    name: String,
    opened: oci::Opened,
    layer_tar_size: u64,
}

/// Opens `archive` and checks it as described at [`Options::check`]; independently of our
/// reader, skopeo (containers/image, what podman and buildah use) must read it too and copy
/// every blob out of it.
fn check_archive(archive: &Path, scratch_root: &Path) -> Result<Checked> {
    step(&format!("checking {}", archive.display()));
    let scratch = tempfile::Builder::new()
        .prefix("check-")
        .tempdir_in(scratch_root)?;
    let opened = oci::open(archive, scratch.path())
        .with_context(|| format!("{} is not a valid OCI archive", archive.display()))?;
    let name = opened
        .annotations
        .get(oci::CONTAINERD_NAME)
        .context("the index does not name the image for containerd")?
        .clone();
    ensure!(
        opened.annotations.contains_key(oci::REF_NAME),
        "the index has no {} annotation",
        oci::REF_NAME
    );
    let config = &opened.config;
    ensure!(
        config["os"] == "linux" && config["architecture"] == "amd64",
        "not a linux/amd64 image"
    );
    let run = &config["config"];
    ensure!(
        run["Entrypoint"] == json!([ENTRYPOINT]),
        "entrypoint {} instead of [{ENTRYPOINT:?}]",
        run["Entrypoint"]
    );
    ensure!(run["Cmd"].is_null(), "the image has a Cmd: {}", run["Cmd"]);
    ensure!(
        run["Env"] == json!([format!("PATH={BIN_DIR}")]),
        "environment {}",
        run["Env"]
    );
    let labels: BTreeMap<String, String> =
        serde_json::from_value(run["Labels"].clone()).context("labels")?;
    let label = |key: &str| labels.get(key).map(String::as_str).unwrap_or_default();
    for key in [LABEL_TITLE, LABEL_VERSION, LABEL_REVISION, LABEL_LICENSES] {
        ensure!(!label(key).is_empty(), "label {key} missing or empty");
    }
    ensure!(
        labels.contains_key(LABEL_SOURCE),
        "label {LABEL_SOURCE} missing"
    );
    ensure!(
        label(LABEL_TITLE) == TITLE,
        "label {LABEL_TITLE}: {}",
        label(LABEL_TITLE)
    );

    let listing = output(
        Command::new("tar")
            .args(["-tvf"])
            .arg(&opened.layer_tar)
            .arg("--numeric-owner"),
    )?;
    check_entries(&listing)?;
    let rootfs = scratch.path().join("rootfs");
    fs::create_dir(&rootfs)?;
    check(
        Command::new("tar")
            .arg("-xf")
            .arg(&opened.layer_tar)
            .arg("-C")
            .arg(&rootfs),
    )?;
    let bin = rootfs.join(BIN_DIR.trim_start_matches('/'));
    for name in BINARIES {
        elf::check_static(&bin.join(name))?;
    }
    let version = output(Command::new(bin.join("clink-agent")).arg("--version"))?;
    ensure!(
        version.trim() == format!("clink-agent {}", label(LABEL_VERSION)),
        "clink-agent --version says {:?}, the label {:?}",
        version.trim(),
        label(LABEL_VERSION)
    );
    let help = output(Command::new(bin.join("clink")).arg("--help"))?;
    ensure!(help.contains("Usage: clink"), "clink --help: {help}");
    let ran_agent = if nix::unistd::geteuid().is_root() {
        run_agent(&rootfs, scratch.path())?;
        true
    } else {
        println!("    not root: the agent is not started in the image's file system");
        false
    };

    let inspect = output(
        Command::new("skopeo")
            .arg("inspect")
            .arg(oci_archive(archive)?),
    )?;
    let inspect: Value = serde_json::from_str(&inspect).context("skopeo inspect output")?;
    ensure!(
        inspect["Digest"] == opened.manifest.digest.as_str(),
        "skopeo reads digest {} where the index has {}",
        inspect["Digest"],
        opened.manifest.digest
    );
    check(
        Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(oci_archive(archive)?)
            .arg(format!("dir:{}", scratch.path().join("skopeo").display())),
    )?;
    let layer_tar_size = fs::metadata(&opened.layer_tar)?.len();
    println!("    format, digests, entrypoint, labels and files: as expected");
    println!(
        "    {} static; `clink-agent --version` and `clink --help` run",
        BINARIES.join(" and ")
    );
    if ran_agent {
        println!(
            "    the agent serves from the image's file system, read-only, with the chart's paths"
        );
    }
    println!("    skopeo reads it and copies every blob out of it");
    Ok(Checked {
        name,
        opened,
        layer_tar_size,
    })
}

/// Starts the agent in `rootfs` the way a container runtime and the chart would: the image's
/// file system as the read-only root, empty writable mounts for the state directory and
/// /run/clusterlink, the peer certificate at /etc/clusterlink/certs, the chart's arguments
/// (the userspace data path, which needs nothing from the kernel), in namespaces of its own.
/// It must come up, answer `clink status` and leave the root unwritten. Needs root.
fn run_agent(rootfs: &Path, scratch: &Path) -> Result<()> {
    let certs = scratch.join("certs");
    let clink = rootfs.join("usr/local/bin/clink");
    let clink_in =
        |args: &[&str]| output(Command::new(&clink).args(args).arg("--path").arg(&certs)).map(drop);
    clink_in(&["fabric", "create", "--name", "check"])?;
    clink_in(&[
        "peer-cert",
        "create",
        "--name",
        "peer-a",
        "--fabric",
        "check",
    ])?;
    let script = scratch.join("run-agent.sh");
    fs::write(&script, RUN_AGENT)?;
    let out = crate::run::interruptible(
        Command::new("unshare")
            .args(["--mount", "--pid", "--net", "--fork", "sh", "-eu"])
            .arg(&script)
            .arg(rootfs)
            .arg(certs.join("peer-a")),
        std::time::Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stdout.contains("data path:  userspace"),
        "the agent did not serve from the image's file system ({}):\n{stdout}{stderr}",
        out.status
    );
    Ok(())
}

/// `sh -eu run-agent.sh ROOTFS CERTS`, in new mount, PID and network namespaces (so mounts,
/// processes and ports go with it). The mount points a runtime makes (/proc, /dev) are made
/// before the root turns read-only, as runtimes do; the arguments are the chart's
/// (templates/daemonset.yaml).
const RUN_AGENT: &str = r#"
root="$1"; certs="$2"
ip link set lo up
mkdir -p "$root/proc" "$root/dev"
mount --bind "$root" "$root"
mount -o remount,ro,bind "$root"
mount -t tmpfs state "$root/var/lib/clusterlink"
mount -t tmpfs run "$root/run/clusterlink"
mount --bind -o ro "$certs" "$root/etc/clusterlink/certs"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
chroot "$root" /usr/local/bin/clink-agent --name=peer-a --certs=/etc/clusterlink/certs \
    --state=/var/lib/clusterlink --listen=0.0.0.0:8443 --admin=/run/clusterlink/admin.sock \
    --metrics=0.0.0.0:9090 --datapath=userspace --log-level=info --log-format=text &
agent=$!
i=0
until [ -S "$root/run/clusterlink/admin.sock" ]; do
    i=$((i + 1)); [ "$i" -lt 100 ] || { echo "no admin socket after 10 s"; exit 1; }
    kill -0 "$agent" || { echo "the agent exited"; exit 1; }
    sleep 0.1
done
chroot "$root" /usr/local/bin/clink status
if touch "$root/written" 2>/dev/null; then echo "the root file system is writable"; exit 1; fi
kill "$agent"
wait "$agent" || true
"#;

fn oci_archive(archive: &Path) -> Result<String> {
    let path = archive
        .to_str()
        .with_context(|| format!("{} is not UTF-8", archive.display()))?;
    Ok(format!("oci-archive:{path}"))
}

/// Checks `tar -tv --numeric-owner` output of the layer: exactly [`expected_entries`], all
/// owned by root, directories 0755 and binaries 0755.
fn check_entries(listing: &str) -> Result<()> {
    let mut found = BTreeSet::new();
    let expected = expected_entries();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [mode, owner, _size, _date, _time, path] = fields[..] else {
            bail!("unexpected line in the layer's listing: {line:?}");
        };
        let Some(&dir) = expected.get(path) else {
            bail!("unexpected entry in the layer: {path}");
        };
        let want = if dir { "drwxr-xr-x" } else { "-rwxr-xr-x" };
        ensure!(mode == want, "{path}: mode {mode}, want {want}");
        ensure!(owner == "0/0", "{path}: owner {owner}, want 0/0");
        found.insert(path.to_owned());
    }
    let missing: Vec<_> = expected.keys().filter(|p| !found.contains(*p)).collect();
    ensure!(missing.is_empty(), "the layer lacks {missing:?}");
    Ok(())
}

fn summary(checked: &Checked, archive: &Path) -> Result<()> {
    let o = &checked.opened;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let archive_size = fs::metadata(archive)?.len();
    println!("image {}", checked.name);
    println!(
        "  digest   {} (manifest: `ctr images ls`, `skopeo inspect`)",
        o.manifest.digest
    );
    println!(
        "  id       {} (config: `docker images`)",
        o.config_descriptor.digest
    );
    println!(
        "  size     {:.1} MiB unpacked, {:.1} MiB compressed",
        mib(checked.layer_tar_size),
        mib(o.layer.size)
    );
    println!(
        "  archive  {} ({:.1} MiB)",
        archive.display(),
        mib(archive_size)
    );
    Ok(())
}

/// Builds the binaries static and returns their directory.
fn build_binaries(ws: &Workspace) -> Result<PathBuf> {
    let started = Instant::now();
    let mut build = cargo();
    build
        .args([
            "build",
            "--locked",
            "--profile",
            PROFILE,
            "--target",
            TARGET,
        ])
        .args(["-p", "clink-agent", "--bins"]);
    step(&show(&build));
    check(&mut build)?;
    step(&format!(
        "built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let bin_dir = ws.target_dir.join(TARGET).join(PROFILE);
    for bin in BINARIES {
        elf::check_static(&bin_dir.join(bin))?;
    }
    Ok(bin_dir)
}

fn musl_target() -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == TARGET) {
        println!("    rust target {TARGET}: installed");
        return Ok(());
    }
    println!("    rust target {TARGET}: missing (static binaries for the image)");
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]);
    step(&show(&add));
    check(&mut add)
}

/// The commit the image is built from.
struct Commit {
    /// The commit id, `-dirty` appended when tracked files differ from it.
    revision: String,
    /// Its commit time, RFC 3339 and in seconds since the epoch: the image's creation time
    /// and its files' dates, so that a rebuild of one commit gives the same digest.
    created: String,
    epoch: i64,
}

impl Commit {
    fn head() -> Result<Self> {
        let git = |args: &[&str]| {
            output(Command::new("git").args(args).current_dir(workspace_root()))
                .map(|s| s.trim().to_owned())
        };
        let id = git(&["rev-parse", "HEAD"])?;
        let dirty = !Command::new("git")
            .args(["diff", "--quiet", "HEAD", "--"])
            .current_dir(workspace_root())
            .status()
            .context("run git diff")?
            .success();
        let time = git(&["log", "-1", "--format=%ct %cI"])?;
        let (epoch, created) = time
            .split_once(' ')
            .with_context(|| format!("git log: {time:?}"))?;
        Ok(Self {
            revision: if dirty { format!("{id}-dirty") } else { id },
            created: created.to_owned(),
            epoch: epoch.parse().context("git log: commit time")?,
        })
    }
}

fn git_origin() -> Option<String> {
    let url = output(
        Command::new("git")
            .args(["remote", "get-url", "origin"])
            .current_dir(workspace_root()),
    )
    .ok()?;
    Some(url.trim().to_owned()).filter(|u| !u.is_empty())
}

/// An image name, `REPOSITORY[:TAG]`.
#[derive(Debug, PartialEq, Eq)]
struct Reference {
    repository: String,
    tag: String,
}

impl Reference {
    fn parse(name: &str) -> Result<Self> {
        // A colon after the last slash starts the tag; one before it is a registry's port.
        let (repository, tag) = match name.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, tag),
            _ => (name, VERSION),
        };
        let tag_ok = tag.len() <= 128
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        ensure!(tag_ok, "{name:?}: the tag {tag:?} is not a valid image tag");
        let path_ok = repository
            .split('/')
            .skip(usize::from(has_registry(repository)))
            .all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            });
        ensure!(
            path_ok,
            "{name:?}: a repository is lowercase letters, digits and . _ - between slashes"
        );
        Ok(Self {
            repository: repository.to_owned(),
            tag: tag.to_owned(),
        })
    }

    /// The full name containerd and Kubernetes use: Docker Hub's when no registry is named,
    /// as `docker.io/clusterlink-rs/clink-agent:0.1.0` for the chart's `clusterlink-rs/...`.
    fn normalized(&self) -> String {
        let repository = if has_registry(&self.repository) {
            self.repository.clone()
        } else if self.repository.contains('/') {
            format!("docker.io/{}", self.repository)
        } else {
            format!("docker.io/library/{}", self.repository)
        };
        format!("{repository}:{}", self.tag)
    }

    /// The index annotations that name the image: the tag for OCI tools
    /// (`oci-archive:FILE:TAG`), the full name for containerd.
    fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (oci::REF_NAME.to_owned(), self.tag.clone()),
            (oci::CONTAINERD_NAME.to_owned(), self.normalized()),
        ])
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

/// Whether the first component names a registry (`localhost`, or a host with a dot or port).
fn has_registry(repository: &str) -> bool {
    match repository.split_once('/') {
        Some((first, _)) => first == "localhost" || first.contains(['.', ':']),
        None => false,
    }
}

#[cfg(test)]
mod tests;
