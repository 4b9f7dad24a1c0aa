//! OCI image archives: an image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) in
//! one tar file, the format of `skopeo copy ... oci-archive:`, `docker save` (25+), and what
//! `ctr images import`, `kind load image-archive` and `k3d image import` read.
//!
//! Written here, not by buildah or umoci: one layer of files from a directory and three JSON
//! documents are all an image `FROM scratch` is, and writing them directly keeps the archive
//! reproducible (same binaries and commit, same digest: entries sorted, owned by root, dated
//! at the commit; `gzip -n`), needs no container storage or privileges, and lets the index
//! carry the full image name in containerd's annotation, which `ctr images import` (and so
//! kind and k3d) names the image by. GNU tar and gzip do the byte formats. [`open`] reads an
//! archive back and checks every digest and size, for `cargo xtask image --check`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::run::check;

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The index annotation containerd names an imported image by (a full reference).
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation for the image's tag within the layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const LAYOUT_VERSION: &str = "1.0.0";

/// A blob as an image refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }

    fn from_json(value: &Value) -> Result<Self> {
        let field = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("descriptor without {name}: {value}"))
        };
        Ok(Self {
            media_type: field("mediaType")?,
            digest: field("digest")?,
            size: value["size"]
                .as_u64()
                .with_context(|| format!("descriptor without size: {value}"))?,
        })
    }

    fn blob_path(&self, layout: &Path) -> Result<PathBuf> {
        let hex = self
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("not a sha256 digest: {}", self.digest))?;
        Ok(layout.join("blobs/sha256").join(hex))
    }
}

/// What goes into the image besides its files.
pub struct Image<'a> {
    /// The directory whose contents become the image's one layer.
    pub rootfs: &'a Path,
    /// The image config's `config` member (Entrypoint, Env, Labels, ...).
    pub config: Value,
    /// RFC 3339, and the same instant as `mtime` (seconds since the epoch), which every file
    /// in the layer and the archive gets.
    pub created: &'a str,
    pub mtime: i64,
    /// Index annotations: the image's names.
    pub annotations: BTreeMap<String, String>,
}

/// Writes `image` as an OCI archive at `output` (replaced at the end, so a failed run leaves
/// no half archive), using `scratch` (an empty directory) for the layout. Returns the
/// manifest's descriptor: the image's digest is its digest.
pub fn write_archive(image: &Image, scratch: &Path, output: &Path) -> Result<Descriptor> {
    let layout = scratch.join("layout");
    fs::create_dir_all(layout.join("blobs/sha256"))?;

    let layer_tar = scratch.join("layer.tar");
    tar_create(image.rootfs, &layer_tar, image.mtime)?;
    let diff_id = sha256_file(&layer_tar)?;
    // -n leaves out the file name and time, which would change the digest on every build.
    let gzip = File::create(scratch.join("layer.tar.gz"))?;
    check(
        Command::new("gzip")
            .args(["-n", "-9", "-c"])
            .arg(&layer_tar)
            .stdout(gzip),
    )?;
    let layer = add_blob_file(&layout, &scratch.join("layer.tar.gz"), MEDIA_LAYER)?;
    fs::remove_file(&layer_tar)?;

    let config = json!({
        "created": image.created,
        "architecture": "amd64",
        "os": "linux",
        "config": image.config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": image.created, "created_by": "cargo xtask image"}],
    });
    let config = add_blob_json(&layout, &config, MEDIA_CONFIG)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    });
    let manifest = add_blob_json(&layout, &manifest, MEDIA_MANIFEST)?;
    let mut entry = manifest.to_json();
    entry["platform"] = json!({"architecture": "amd64", "os": "linux"});
    entry["annotations"] = json!(image.annotations);
    let index = json!({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]});
    fs::write(layout.join("index.json"), to_bytes(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        to_bytes(&json!({"imageLayoutVersion": LAYOUT_VERSION}))?,
    )?;

    if let Some(dir) = output.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let partial = output.with_extension("tar.partial");
    tar_create(&layout, &partial, image.mtime)?;
    fs::rename(&partial, output).with_context(|| format!("write {}", output.display()))?;
    Ok(manifest)
}

/// An archive unpacked into a scratch directory, every digest and size checked.
pub struct Opened {
    /// The only image's index entry annotations (its names).
    pub annotations: BTreeMap<String, String>,
    pub manifest: Descriptor,
    pub config_descriptor: Descriptor,
    /// The image config.
    pub config: Value,
    pub layer: Descriptor,
    /// The layer, decompressed.
    pub layer_tar: PathBuf,
}

/// Unpacks `archive` into `scratch` and checks that it is an OCI layout with one image of
/// one layer whose blobs all match their digests and sizes.
pub fn open(archive: &Path, scratch: &Path) -> Result<Opened> {
    let layout = scratch.join("layout");
    fs::create_dir_all(&layout)?;
    check(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout),
    )?;
    let oci_layout = read_json(&layout.join("oci-layout"))?;
    ensure!(
        oci_layout["imageLayoutVersion"] == LAYOUT_VERSION,
        "oci-layout: {oci_layout}"
    );
    let index = read_json(&layout.join("index.json"))?;
    ensure!(index["schemaVersion"] == 2, "index.json: schemaVersion");
    let [entry] = index["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        bail!("index.json must list exactly one image: {index}");
    };
    let manifest = Descriptor::from_json(entry)?;
    ensure!(
        manifest.media_type == MEDIA_MANIFEST,
        "index.json: {manifest:?}"
    );
    let annotations =
        serde_json::from_value(entry["annotations"].clone()).context("index.json: annotations")?;

    let manifest_json: Value = serde_json::from_slice(&read_blob(&layout, &manifest)?)
        .context("the manifest is not JSON")?;
    ensure!(
        manifest_json["mediaType"] == MEDIA_MANIFEST && manifest_json["schemaVersion"] == 2,
        "manifest: {manifest_json}"
    );
    let config_descriptor = Descriptor::from_json(&manifest_json["config"])?;
    ensure!(
        config_descriptor.media_type == MEDIA_CONFIG,
        "manifest config: {config_descriptor:?}"
    );
    let config: Value = serde_json::from_slice(&read_blob(&layout, &config_descriptor)?)
        .context("the image config is not JSON")?;
    let [layer] = manifest_json["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        bail!("the manifest must have exactly one layer: {manifest_json}");
    };
    let layer = Descriptor::from_json(layer)?;
    ensure!(layer.media_type == MEDIA_LAYER, "layer: {layer:?}");
    read_blob(&layout, &layer)?;

    let layer_tar = scratch.join("layer.tar");
    check(
        Command::new("gzip")
            .arg("-dc")
            .arg(layer.blob_path(&layout)?)
            .stdout(File::create(&layer_tar)?),
    )?;
    let diff_id = sha256_file(&layer_tar)?;
    ensure!(
        config["rootfs"] == json!({"type": "layers", "diff_ids": [diff_id]}),
        "the config's rootfs does not name the layer's content ({diff_id}): {}",
        config["rootfs"]
    );
    Ok(Opened {
        annotations,
        manifest,
        config_descriptor,
        config,
        layer,
        layer_tar,
    })
}

/// `dir`'s contents as a reproducible tar: sorted, owned by root, all dated `mtime`.
fn tar_create(dir: &Path, output: &Path, mtime: i64) -> Result<()> {
    let mut entries = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    entries.sort();
    check(
        Command::new("tar")
            .args(["--create", "--format=gnu", "--sort=name", "--numeric-owner"])
            .args(["--owner=0", "--group=0", &format!("--mtime=@{mtime}")])
            .arg("--file")
            .arg(output)
            .arg("-C")
            .arg(dir)
            .args(entries),
    )
}

fn to_bytes(value: &Value) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn add_blob_json(layout: &Path, value: &Value, media_type: &str) -> Result<Descriptor> {
    let bytes = to_bytes(value)?;
    let descriptor = Descriptor {
        media_type: media_type.to_owned(),
        digest: format!("sha256:{:x}", Sha256::digest(&bytes)),
        size: bytes.len() as u64,
    };
    fs::write(descriptor.blob_path(layout)?, bytes)?;
    Ok(descriptor)
}

fn add_blob_file(layout: &Path, file: &Path, media_type: &str) -> Result<Descriptor> {
    let descriptor = Descriptor {
        media_type: media_type.to_owned(),
        digest: sha256_file(file)?,
        size: fs::metadata(file)?.len(),
    };
    fs::rename(file, descriptor.blob_path(layout)?)?;
    Ok(descriptor)
}

fn read_blob(layout: &Path, descriptor: &Descriptor) -> Result<Vec<u8>> {
    let path = descriptor.blob_path(layout)?;
    let bytes =
        fs::read(&path).with_context(|| format!("the archive lacks {}", descriptor.digest))?;
    ensure!(
        bytes.len() as u64 == descriptor.size,
        "{}: {} bytes, its descriptor says {}",
        descriptor.digest,
        bytes.len(),
        descriptor.size
    );
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    ensure!(
        digest == descriptor.digest,
        "blob {} has the content of {digest}",
        descriptor.digest
    );
    Ok(bytes)
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    io::copy(&mut file, &mut hasher)?;
    Ok(format!("sha256:{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(rootfs: &Path) -> Image<'_> {
        Image {
            rootfs,
            config: json!({"Entrypoint": ["/bin/x"]}),
            created: "2026-01-02T03:04:05Z",
            mtime: 1_767_323_045,
            annotations: BTreeMap::from([(REF_NAME.to_owned(), "1.0".to_owned())]),
        }
    }

    fn rootfs(dir: &Path) -> PathBuf {
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::write(rootfs.join("bin/x"), "x").unwrap();
        rootfs
    }

    #[test]
    fn an_archive_reads_back_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = rootfs(dir.path());
        let mut digests = Vec::new();
        for run in ["a", "b"] {
            let scratch = dir.path().join(format!("scratch-{run}"));
            let archive = dir.path().join(format!("{run}.tar"));
            fs::create_dir(&scratch).unwrap();
            let manifest = write_archive(&image(&rootfs), &scratch, &archive).unwrap();
            let opened_dir = dir.path().join(format!("open-{run}"));
            let opened = open(&archive, &opened_dir).unwrap();
            assert_eq!(opened.manifest, manifest);
            assert_eq!(opened.config["config"]["Entrypoint"][0], "/bin/x");
            assert_eq!(opened.annotations[REF_NAME], "1.0");
            let listing = fs::read(&opened.layer_tar).unwrap();
            assert!(listing.windows(5).any(|w| w == b"bin/x"));
            digests.push((manifest.digest, fs::read(&archive).unwrap()));
        }
        assert!(
            digests[0] == digests[1],
            "two runs wrote different archives"
        );
    }

    #[test]
    fn a_changed_blob_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = rootfs(dir.path());
        let scratch = dir.path().join("scratch");
        fs::create_dir(&scratch).unwrap();
        let archive = dir.path().join("image.tar");
        write_archive(&image(&rootfs), &scratch, &archive).unwrap();
        // Rewrite the config in the archive with other content of the same length.
        let layout = scratch.join("layout");
        let opened = open(&archive, &dir.path().join("first")).unwrap();
        let config = opened.config_descriptor.blob_path(&layout).unwrap();
        let text = fs::read_to_string(&config)
            .unwrap()
            .replace("/bin/x", "/bin/y");
        fs::write(&config, text).unwrap();
        tar_create(&layout, &archive, 0).unwrap();
        let err = open(&archive, &dir.path().join("open")).err().unwrap();
        assert!(format!("{err:#}").contains("has the content of"), "{err:#}");
    }
}
