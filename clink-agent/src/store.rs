//! Where objects live between restarts. Standalone mode keeps one YAML file per object in a
//! state directory, `<dir>/<kind>/<namespace>/<name>.yaml`, and writes every change (an
//! apply, a delete) as one journal:
//!
//! 1. the whole change goes to `<dir>/.journal.tmp`, which is fsynced and renamed to
//!    `<dir>/journal.json`, and the directory is fsynced: this rename is the commit point;
//! 2. the journal is replayed into the object files (each through a temporary file renamed
//!    into place), then the files and their directories are fsynced, and the journal is
//!    removed.
//!
//! A crash before the rename leaves the old objects and no journal; a crash after it leaves
//! the journal, which the next start replays before reading anything. So after a crash an
//! apply is there whole or not at all.
//!
//! Loading reads only what the agent wrote: regular files named after the object they hold,
//! at most [`MAX_FILE`] bytes, UTF-8 YAML of one object of the directory's kind. Anything else
//! is moved aside into `<dir>/rejected/` (same relative path), kept for the operator, and
//! reported naming the file; the agent starts with the rest.
//!
//! All of it is blocking file I/O: the agent calls it from `spawn_blocking`, never on the
//! workers that carry connections.

use std::{
    collections::BTreeSet,
    fmt, fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::api::{self, ApiError, Kind, Object, ObjectKey};

/// The largest object file the store writes or reads: far above any object (a Peer with a
/// hundred gateways is a few KiB), small enough that a stray file cannot exhaust memory.
pub const MAX_FILE: u64 = 1024 * 1024;

/// The file name limit where `statvfs` cannot tell (Linux's NAME_MAX).
const NAME_MAX: usize = 255;

/// Linux's PATH_MAX, with the terminating NUL.
const PATH_MAX: usize = 4096;

const JOURNAL: &str = "journal.json";
const JOURNAL_TMP: &str = ".journal.tmp";
/// Temporary object files are `.clink-<n>.tmp`: short, so that an object whose own file name
/// fits also fits while it is written.
const TMP_PREFIX: &str = ".clink-";
const TMP_SUFFIX: &str = ".tmp";
const REJECTED: &str = "rejected";
/// Changes of up to this many objects fsync each file; larger ones flush the file system once.
const SYNC_EACH_UP_TO: usize = 64;

/// One change to the stored objects, written as one unit.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Objects to create or replace; their status is not stored.
    pub put: Vec<Object>,
    pub delete: Vec<ObjectKey>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }
}

/// A state file that could not be loaded: which, why, and where it was moved.
#[derive(Debug)]
pub struct Rejected {
    pub file: PathBuf,
    pub reason: String,
    /// Where the file went; `None` if it could not be moved (then it stays, and is reported
    /// again at the next start).
    pub moved_to: Option<PathBuf>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state file {}: {}; ", self.file.display(), self.reason)?;
        match &self.moved_to {
            Some(to) => write!(f, "moved aside to {}", to.display()),
            None => f.write_str("ignored (it could not be moved aside)"),
        }
    }
}

/// What [`Store::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub rejected: Vec<Rejected>,
}

/// Persistence behind the agent's object set: a directory standalone, nothing in Kubernetes
/// mode ([`ApiServerObjects`]), where the API server keeps the objects.
pub trait Store: Send + Sync {
    /// Every stored object, after finishing a change a crash interrupted. Files that cannot
    /// be loaded are set aside and reported, not fatal.
    fn load(&self) -> io::Result<Loaded>;
    /// Whether the store can hold `object` (its name as a file name, its size): checked for
    /// every object of an apply before anything of it is written.
    fn check(&self, object: &Object) -> Result<(), ApiError>;
    /// Writes `batch` all or nothing: once this returns, it survives a crash whole.
    fn commit(&self, batch: &Batch) -> io::Result<()>;
}

/// The store of Kubernetes mode: the API server holds the objects, and the agent relists
/// them at start-up and after every break in its watches, so it keeps nothing itself.
pub struct ApiServerObjects;

impl Store for ApiServerObjects {
    fn load(&self) -> io::Result<Loaded> {
        Ok(Loaded::default())
    }

    fn check(&self, _: &Object) -> Result<(), ApiError> {
        Ok(())
    }

    fn commit(&self, _: &Batch) -> io::Result<()> {
        Ok(())
    }
}

pub struct FileStore {
    dir: PathBuf,
    name_max: usize,
    /// Commits and loads one at a time: both use the journal and the temporary names.
    lock: Mutex<()>,
}

fn kind_dir(kind: Kind) -> &'static str {
    match kind {
        Kind::Peer => "peers",
        Kind::Export => "exports",
        Kind::Import => "imports",
        Kind::AccessPolicy => "accesspolicies",
        Kind::PrivilegedAccessPolicy => "privilegedaccesspolicies",
    }
}

/// An I/O error that names the path it happened on.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| at(dir, e))
}

/// Writes `data` to `tmp` and renames it to `path`; with `sync`, the data is on disk first.
fn write_replace(tmp: &Path, path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
    let mut file = fs::File::create(tmp).map_err(|e| at(tmp, e))?;
    file.write_all(data).map_err(|e| at(tmp, e))?;
    if sync {
        file.sync_all().map_err(|e| at(tmp, e))?;
    }
    drop(file);
    fs::rename(tmp, path).map_err(|e| at(path, e))
}

impl FileStore {
    pub fn open(dir: &Path) -> io::Result<FileStore> {
        fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
        let name_max = nix::sys::statvfs::statvfs(dir)
            .ok()
            .and_then(|s| usize::try_from(s.name_max()).ok())
            .filter(|&n| n > 0)
            .unwrap_or(NAME_MAX);
        Ok(FileStore {
            dir: dir.to_owned(),
            name_max,
            lock: Mutex::new(()),
        })
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        let mut p = self.dir.join(kind_dir(key.kind));
        if !key.namespace.is_empty() {
            p.push(&key.namespace);
        }
        p.push(file_name(&key.name));
        p
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the journal's changes into the object files, makes them durable, and removes
    /// the journal. Replaying twice is harmless.
    fn replay(&self, batch: &Batch) -> io::Result<()> {
        let mut dirs = BTreeSet::new();
        for (n, object) in batch.put.iter().enumerate() {
            let path = self.path_of(&object.key());
            let dir = path.parent().expect("object paths have a parent");
            if !dirs.contains(dir) {
                fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
                dirs.extend(
                    dir.ancestors()
                        .take_while(|d| d.starts_with(&self.dir))
                        .map(Path::to_owned),
                );
            }
            let tmp = dir.join(format!("{TMP_PREFIX}{n}{TMP_SUFFIX}"));
            write_replace(&tmp, &path, stored_yaml(object).as_bytes(), false)?;
        }
        for key in &batch.delete {
            let path = self.path_of(key);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(at(&path, e)),
            }
            dirs.insert(
                path.parent()
                    .expect("object paths have a parent")
                    .to_owned(),
            );
        }
        // The journal stays until every file and rename is durable. A small change fsyncs its
        // files and directories. A large one flushes the whole file system once: on ext4 each
        // fsync of a freshly written file is a journal commit of its own (measured: 5,000
        // files, 11 s of fsyncs against 0.9 s for one syncfs), and those commits hold up every
        // other writer on the file system meanwhile. syncfs also waits for whatever else is
        // dirty there, which is why small changes do not use it.
        if batch.put.len() <= SYNC_EACH_UP_TO {
            for object in &batch.put {
                let path = self.path_of(&object.key());
                fs::File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| at(&path, e))?;
            }
            for dir in dirs.iter().rev() {
                sync_dir(dir)?;
            }
        } else {
            let dir = fs::File::open(&self.dir).map_err(|e| at(&self.dir, e))?;
            nix::unistd::syncfs(&dir).map_err(|e| at(&self.dir, io::Error::from(e)))?;
        }
        let journal = self.dir.join(JOURNAL);
        fs::remove_file(&journal).map_err(|e| at(&journal, e))?;
        sync_dir(&self.dir)
    }

    /// Finishes a committed change that a crash (or a failed replay) left as a journal, and
    /// drops an uncommitted one. Returns the journal's problem if it could not be read.
    fn finish_journal(&self) -> io::Result<Option<Rejected>> {
        let tmp = self.dir.join(JOURNAL_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => {
                info!(file = %tmp.display(), "removed an uncommitted change (the agent stopped while writing it)")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&tmp, e)),
        }
        let journal = self.dir.join(JOURNAL);
        let mut problem = None;
        match read_bounded(&journal, 64 * MAX_FILE) {
            Ok(bytes) => match serde_json::from_slice::<Batch>(&bytes) {
                Ok(batch) => {
                    info!(
                        put = batch.put.len(),
                        delete = batch.delete.len(),
                        "finishing a change the agent committed before it stopped"
                    );
                    self.replay(&batch)?;
                }
                Err(e) => {
                    problem = Some(self.reject(&journal, format!("unreadable journal: {e}")));
                }
            },
            Err(Unreadable::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(Unreadable::Io(e)) => return Err(at(&journal, e)),
            Err(bad) => problem = Some(self.reject(&journal, bad.to_string())),
        }
        Ok(problem)
    }

    /// Moves `file` to the same place under `rejected/`, with `.1`, `.2`, ... if a file of
    /// that name was rejected before.
    fn reject(&self, file: &Path, reason: String) -> Rejected {
        let relative = file.strip_prefix(&self.dir).unwrap_or(file);
        let target = self.dir.join(REJECTED).join(relative);
        let moved = target
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                let mut to = target.clone();
                let mut n = 0;
                while fs::symlink_metadata(&to).is_ok() {
                    n += 1;
                    to = PathBuf::from(format!("{}.{n}", target.display()));
                }
                fs::rename(file, &to).map(|()| to)
            });
        let moved_to = match moved {
            Ok(to) => Some(to),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot move a rejected state file aside");
                None
            }
        };
        Rejected {
            file: file.to_owned(),
            reason,
            moved_to,
        }
    }

    /// Loads the objects of `kind`, rejecting what does not belong.
    fn load_kind(&self, kind: Kind, loaded: &mut Loaded) -> io::Result<()> {
        let dir = self.dir.join(kind_dir(kind));
        let meta = match fs::symlink_metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(at(&dir, e)),
        };
        if !meta.is_dir() {
            let reason = format!("expected the directory of the {kind} objects");
            loaded.rejected.push(self.reject(&dir, reason));
            return Ok(());
        }
        if !kind.namespaced() {
            return self.load_files(kind, &dir, "", loaded);
        }
        for (path, file_type) in sorted_entries(&dir)? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !file_type.is_dir() {
                let reason = format!(
                    "expected a namespace directory ({kind} objects are kept in \
                     {}/<namespace>/<name>.yaml)",
                    dir.display()
                );
                loaded.rejected.push(self.reject(&path, reason));
            } else if let Err(e) = api::check_dns_label(&name) {
                let reason = format!("not a namespace directory: {e}");
                loaded.rejected.push(self.reject(&path, reason));
            } else {
                self.load_files(kind, &path, &name, loaded)?;
            }
        }
        Ok(())
    }

    fn load_files(
        &self,
        kind: Kind,
        dir: &Path,
        namespace: &str,
        loaded: &mut Loaded,
    ) -> io::Result<()> {
        for (path, file_type) in sorted_entries(dir)? {
            match load_file(kind, namespace, &path, file_type) {
                Ok(object) => loaded.objects.push(object),
                Err(reason) => loaded.rejected.push(self.reject(&path, reason)),
            }
        }
        Ok(())
    }
}

fn file_name(name: &str) -> String {
    format!("{name}.yaml")
}

/// The entries of `dir`, sorted, with their types (symbolic links not followed).
fn sorted_entries(dir: &Path) -> io::Result<Vec<(PathBuf, fs::FileType)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| at(dir, e))? {
        let entry = entry.map_err(|e| at(dir, e))?;
        let file_type = entry.file_type().map_err(|e| at(&entry.path(), e))?;
        out.push((entry.path(), file_type));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_tmp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TMP_PREFIX) && n.ends_with(TMP_SUFFIX))
}

/// Removes the temporary files an interrupted replay left in a kind's directory.
fn remove_tmp_files(dir: &Path, namespaced: bool) -> io::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if namespaced && file_type.is_dir() {
            remove_tmp_files(&path, false)?;
        } else if file_type.is_file() && is_tmp(&path) {
            fs::remove_file(&path).map_err(|e| at(&path, e))?;
        }
    }
    Ok(())
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error("a symbolic link (the store reads only regular files)")]
    Symlink,
    #[error("not a regular file")]
    NotRegular,
    #[error("{0} bytes, more than the {1} a state file may have")]
    TooLarge(u64, u64),
    #[error(transparent)]
    Io(io::Error),
}

/// Reads a regular file of at most `max` bytes, never following a symbolic link and never
/// blocking on a device or FIFO.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, Unreadable> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Unreadable::Symlink,
            _ => Unreadable::Io(e),
        })?;
    let meta = file.metadata().map_err(Unreadable::Io)?;
    if !meta.is_file() {
        return Err(Unreadable::NotRegular);
    }
    if meta.size() > max {
        return Err(Unreadable::TooLarge(meta.size(), max));
    }
    let mut bytes = Vec::with_capacity(meta.size() as usize);
    // The size can change after the check; the read is bounded regardless.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(Unreadable::Io)?;
    if bytes.len() as u64 > max {
        return Err(Unreadable::TooLarge(bytes.len() as u64, max));
    }
    Ok(bytes)
}

/// One object file: a regular `<name>.yaml` of at most [`MAX_FILE`] bytes holding exactly one
/// `kind` object named `<name>` in `namespace`. The error is the reason, without the path.
fn load_file(
    kind: Kind,
    namespace: &str,
    path: &Path,
    file_type: fs::FileType,
) -> Result<Object, String> {
    if file_type.is_symlink() {
        return Err(Unreadable::Symlink.to_string());
    }
    if !file_type.is_file() {
        return Err(format!(
            "{}, where the store keeps one file per object",
            if file_type.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            }
        ));
    }
    let Some(stem) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".yaml"))
    else {
        return Err("not an object file (those are named <name>.yaml)".to_owned());
    };
    let bytes = read_bounded(path, MAX_FILE).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let mut objects = api::parse_yaml("file", &text).map_err(|e| {
        // The source is the path already given; say only what is wrong inside.
        e.to_string()
            .strip_prefix("file: ")
            .map(str::to_owned)
            .unwrap_or_else(|| e.to_string())
    })?;
    let object = match (objects.len(), objects.first().map(Object::kind)) {
        (1, Some(k)) if k == kind => objects.remove(0),
        (1, Some(k)) => return Err(format!("holds an object of kind {k}, not {kind}")),
        (n, _) => return Err(format!("holds {n} objects, not one {kind}")),
    };
    let key = object.key();
    if key.name != stem {
        return Err(format!(
            "metadata.name: {:?} does not match the file name (expected {stem:?})",
            key.name
        ));
    }
    if key.namespace != namespace {
        return Err(format!(
            "metadata.namespace: {:?} does not match the directory (expected {namespace:?})",
            key.namespace
        ));
    }
    Ok(object)
}

/// An object as the store keeps it: without status, which is observed again after a restart.
fn stored_yaml(object: &Object) -> String {
    let mut object = object.clone();
    *object.status_mut() = api::Status::default();
    object.to_yaml()
}

impl Store for FileStore {
    fn load(&self) -> io::Result<Loaded> {
        let _guard = self.guard();
        let mut loaded = Loaded::default();
        loaded.rejected.extend(self.finish_journal()?);
        // What an interrupted replay left; the journal (if any) was just replayed again.
        for kind in Kind::ALL {
            remove_tmp_files(&self.dir.join(kind_dir(kind)), kind.namespaced())?;
        }
        for kind in Kind::ALL {
            self.load_kind(kind, &mut loaded)?;
        }
        for object in &mut loaded.objects {
            *object.status_mut() = api::Status::default();
        }
        Ok(loaded)
    }

    fn check(&self, object: &Object) -> Result<(), ApiError> {
        let key = object.key();
        let fail =
            |field: &str, message: String| Err(ApiError::new(&key.to_string(), field, &message));
        let file = file_name(&key.name);
        if file.len() > self.name_max {
            return fail(
                "metadata.name",
                format!(
                    "too long for the state directory: its file name {file:?} would be {} \
                     bytes, and the file system of {} takes at most {} (NAME_MAX); use a name \
                     of at most {} characters",
                    file.len(),
                    self.dir.display(),
                    self.name_max,
                    self.name_max - ".yaml".len()
                ),
            );
        }
        if key.namespace.len() > self.name_max {
            return fail(
                "metadata.namespace",
                format!(
                    "longer than the {} bytes a directory name may have",
                    self.name_max
                ),
            );
        }
        let path = self.path_of(&key);
        if path.as_os_str().len() >= PATH_MAX {
            return fail(
                "metadata.name",
                format!(
                    "its state file {} would be longer than PATH_MAX",
                    path.display()
                ),
            );
        }
        let size = stored_yaml(object).len() as u64;
        if size > MAX_FILE {
            return fail(
                "object",
                format!("{size} bytes as YAML, more than the {MAX_FILE} a state file may have"),
            );
        }
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let _guard = self.guard();
        // A journal left by a replay that failed is finished first, so changes stay in order.
        if let Some(problem) = self.finish_journal()? {
            warn!("{problem}");
        }
        let mut stored = Batch {
            put: batch.put.clone(),
            delete: batch.delete.clone(),
        };
        for object in &mut stored.put {
            *object.status_mut() = api::Status::default();
        }
        let journal = serde_json::to_vec(&stored).map_err(io::Error::other)?;
        write_replace(
            &self.dir.join(JOURNAL_TMP),
            &self.dir.join(JOURNAL),
            &journal,
            true,
        )?;
        sync_dir(&self.dir)?;
        // Committed. A failure from here on leaves the journal, finished at the next commit
        // or start; the change stands.
        if let Err(e) = self.replay(&stored) {
            warn!(error = %e, "a committed change is not written out yet; the journal keeps it until the next change or start");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const OBJECTS: &str = r#"
apiVersion: clusterlink.net/v1alpha1
kind: Export
metadata: {name: db, namespace: prod}
spec: {host: 127.0.0.1, port: 5432}
---
apiVersion: clusterlink.net/v1alpha1
kind: PrivilegedAccessPolicy
metadata: {name: deny-all}
spec:
  action: deny
  from: [{workloadSelector: {}}]
  to: [{workloadSelector: {}}]
"#;

    fn export(name: &str, port: u16) -> Object {
        let text = format!(
            "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {{name: {name}}}\n\
             spec: {{host: 127.0.0.1, port: {port}}}\n"
        );
        api::parse_yaml("t", &text).unwrap().remove(0)
    }

    fn put(store: &FileStore, objects: &[Object]) {
        store
            .commit(&Batch {
                put: objects.to_vec(),
                delete: vec![],
            })
            .unwrap();
    }

    fn sorted(mut objects: Vec<Object>) -> Vec<Object> {
        objects.sort_by_key(Object::key);
        objects
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commit_load_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let objects = api::parse_yaml("t", OBJECTS).unwrap();
        put(&store, &objects);
        assert!(dir.path().join("exports/prod/db.yaml").is_file());
        assert!(dir
            .path()
            .join("privilegedaccesspolicies/deny-all.yaml")
            .is_file());
        assert!(!dir.path().join(JOURNAL).exists());

        let reopened = FileStore::open(dir.path()).unwrap();
        let loaded = reopened.load().unwrap();
        assert_eq!(sorted(loaded.objects), sorted(objects.clone()));
        assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);

        reopened
            .commit(&Batch {
                put: vec![],
                delete: vec![objects[0].key()],
            })
            .unwrap();
        assert_eq!(reopened.load().unwrap().objects.len(), 1);
        assert!(names_in(&dir.path().join("exports/prod")).is_empty());
    }

    #[test]
    fn status_is_neither_stored_nor_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut db = export("db", 5432);
        db.status_mut()
            .set_condition(api::EXPORT_VALID, true, "Valid", "ok");
        put(&store, &[db]);
        let text = fs::read_to_string(dir.path().join("exports/default/db.yaml")).unwrap();
        assert!(!text.contains("status"), "{text}");
        // An operator's edit that adds one is not taken either.
        fs::write(
            dir.path().join("exports/default/db.yaml"),
            text + "status: {labels: {trusted: 'yes'}}\n",
        )
        .unwrap();
        let loaded = store.load().unwrap();
        assert!(loaded.objects[0].status().is_empty());
    }

    /// Stops a commit right after its commit point, as a crash would.
    fn commit_without_replay(store: &FileStore, batch: &Batch) {
        let journal = serde_json::to_vec(batch).unwrap();
        write_replace(
            &store.dir.join(JOURNAL_TMP),
            &store.dir.join(JOURNAL),
            &journal,
            true,
        )
        .unwrap();
    }

    #[test]
    fn a_committed_journal_is_finished_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, &[export("old", 1), export("gone", 2)]);
        // Half replayed: one of the new files written, with a temporary file left behind.
        let batch = Batch {
            put: vec![export("old", 10), export("new", 11)],
            delete: vec![export("gone", 2).key()],
        };
        commit_without_replay(&store, &batch);
        put_file(&store, &export("old", 10));
        fs::write(dir.path().join("exports/default/.clink-1.tmp"), "half").unwrap();

        let loaded = FileStore::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(
            sorted(loaded.objects),
            sorted(vec![export("new", 11), export("old", 10)])
        );
        assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
        assert_eq!(names_in(dir.path()), ["exports"]);
        assert_eq!(
            names_in(&dir.path().join("exports/default")),
            ["new.yaml", "old.yaml"]
        );
    }

    fn put_file(store: &FileStore, object: &Object) {
        fs::write(store.path_of(&object.key()), stored_yaml(object)).unwrap();
    }

    #[test]
    fn an_uncommitted_journal_is_dropped_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, &[export("old", 1)]);
        fs::write(dir.path().join(JOURNAL_TMP), "{\"put\": [").unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.objects, [export("old", 1)]);
        assert!(loaded.rejected.is_empty());
        assert!(!dir.path().join(JOURNAL_TMP).exists());
    }

    #[test]
    fn an_unreadable_journal_is_set_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, &[export("old", 1)]);
        fs::write(
            dir.path().join(JOURNAL),
            "{\"put\": [{\"kind\": \"Gadget\"}]}",
        )
        .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.objects, [export("old", 1)]);
        let report = loaded.rejected[0].to_string();
        assert!(
            report.contains("journal.json: unreadable journal: "),
            "{report}"
        );
        assert!(dir.path().join("rejected/journal.json").is_file());
        // The next change goes ahead.
        put(&store, &[export("new", 2)]);
        assert_eq!(store.load().unwrap().objects.len(), 2);
    }

    #[test]
    fn names_the_file_system_cannot_hold_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        // Valid names (DNS subdomains of 63-character labels), one byte apart.
        let dns_name = |len: usize| -> String {
            (0..len)
                .map(|i| if i % 64 == 63 { '.' } else { 'a' })
                .collect()
        };
        let longest = dns_name(store.name_max - ".yaml".len());
        assert!(store.check(&export(&longest, 1)).is_ok());
        let long = dns_name(longest.len() + 1);
        let err = store.check(&export(&long, 1)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("Export default/{long}: metadata.name: too long")),
            "{err}"
        );
        assert!(err.contains("at most 255 (NAME_MAX)"), "{err}");
        // What passes the check can be written, temporary file included.
        put(&store, &[export(&longest, 1)]);
        assert_eq!(store.load().unwrap().objects.len(), 1);
    }

    #[test]
    fn bad_files_are_moved_aside_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        put(&store, &[export("good", 1), export("twin", 2)]);
        let ns = dir.path().join("exports/default");
        let bad: [(&str, &str); 8] = [
            ("latin1.yaml", "not UTF-8 (invalid byte at offset 18)"),
            ("dir.yaml", "a directory"),
            ("zero.yaml", "a symbolic link"),
            ("fifo.yaml", "not a regular file"),
            ("broken.yaml", "document 1: "),
            (
                "other.yaml",
                "metadata.name: \"twin\" does not match the file name",
            ),
            ("big.yaml", "more than the 1048576 a state file may have"),
            ("notes.txt", "not an object file"),
        ];
        fs::write(ns.join("latin1.yaml"), b"kind: Export # caf\xe9\n").unwrap();
        fs::create_dir(ns.join("dir.yaml")).unwrap();
        symlink("/dev/zero", ns.join("zero.yaml")).unwrap();
        nix::unistd::mkfifo(&ns.join("fifo.yaml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        fs::write(ns.join("broken.yaml"), "kind: [").unwrap();
        fs::copy(ns.join("twin.yaml"), ns.join("other.yaml")).unwrap();
        fs::write(ns.join("big.yaml"), vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        fs::write(ns.join("notes.txt"), "mine").unwrap();
        // An Export filed as a Peer, and a file where a namespace directory belongs.
        fs::create_dir_all(dir.path().join("peers/default")).unwrap();
        fs::copy(
            ns.join("good.yaml"),
            dir.path().join("peers/default/good.yaml"),
        )
        .unwrap();
        fs::write(dir.path().join("peers/stray.yaml"), "x").unwrap();

        let loaded = store.load().unwrap();
        assert_eq!(
            sorted(loaded.objects),
            sorted(vec![export("good", 1), export("twin", 2)])
        );
        let report: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(report.len(), bad.len() + 2, "{report:#?}");
        for (file, reason) in bad {
            let path = ns.join(file);
            let line = report
                .iter()
                .find(|l| l.starts_with(&format!("state file {}: ", path.display())))
                .unwrap_or_else(|| panic!("{file} not reported in {report:#?}"));
            assert!(line.contains(reason), "{line}");
            let kept = dir.path().join("rejected/exports/default").join(file);
            assert!(
                line.ends_with(&format!("moved aside to {}", kept.display())),
                "{line}"
            );
            assert!(fs::symlink_metadata(&kept).is_ok(), "{file} not kept");
        }
        assert!(report.iter().any(
            |l| l.contains("peers/default/good.yaml: holds an object of kind Export, not Peer")
        ));
        assert!(report
            .iter()
            .any(|l| l.contains("peers/stray.yaml: expected a namespace directory")));
        assert_eq!(names_in(&ns), ["good.yaml", "twin.yaml"]);

        // Rejected again under the same name: kept next to the first.
        fs::write(ns.join("broken.yaml"), "kind: [[").unwrap();
        let again = store.load().unwrap();
        assert_eq!(again.rejected.len(), 1);
        assert!(dir
            .path()
            .join("rejected/exports/default/broken.yaml.1")
            .is_file());
        assert_eq!(again.objects.len(), 2);
    }
}
