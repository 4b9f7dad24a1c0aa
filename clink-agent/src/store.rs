//! Where objects live between restarts. Standalone mode keeps one YAML file per object in a
//! state directory (`<dir>/<kind>/<namespace>/<name>.yaml`), each written atomically
//! (temporary file, fsync, rename, fsync of the directory), so a crash leaves either the old
//! or the new object, never half of one.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use crate::api::{self, Kind, Object, ObjectKey};

/// Persistence behind the agent's object set (the Kubernetes store is a later addition).
pub trait Store: Send + Sync {
    /// Every stored object. Unreadable entries are reported, not fatal.
    fn load_all(&self) -> io::Result<(Vec<Object>, Vec<String>)>;
    fn put(&self, object: &Object) -> io::Result<()>;
    /// Returns false when there was nothing to delete.
    fn delete(&self, key: &ObjectKey) -> io::Result<bool>;
}

pub struct FileStore {
    dir: PathBuf,
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

impl FileStore {
    pub fn open(dir: &Path) -> io::Result<FileStore> {
        fs::create_dir_all(dir)?;
        Ok(FileStore {
            dir: dir.to_owned(),
        })
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        let mut p = self.dir.join(kind_dir(key.kind));
        if !key.namespace.is_empty() {
            p.push(&key.namespace);
        }
        p.push(format!("{}.yaml", key.name));
        p
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

fn yaml_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() && depth > 0 {
            yaml_files(&path, depth - 1, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    Ok(())
}

impl Store for FileStore {
    fn load_all(&self) -> io::Result<(Vec<Object>, Vec<String>)> {
        let mut objects = Vec::new();
        let mut problems = Vec::new();
        for kind in Kind::ALL {
            let mut files = Vec::new();
            yaml_files(
                &self.dir.join(kind_dir(kind)),
                usize::from(kind.namespaced()),
                &mut files,
            )?;
            files.sort();
            for file in files {
                let text = fs::read_to_string(&file)?;
                match api::parse_yaml(&file.display().to_string(), &text) {
                    Ok(mut parsed) if parsed.len() == 1 && parsed[0].kind() == kind => {
                        objects.push(parsed.remove(0));
                    }
                    Ok(_) => problems.push(format!(
                        "{}: expected exactly one {kind}, ignored",
                        file.display()
                    )),
                    Err(e) => problems.push(format!("{e} (file ignored)")),
                }
            }
        }
        Ok((objects, problems))
    }

    /// Writes the object without its status: status is what the agent observes, derived
    /// again after a restart.
    fn put(&self, object: &Object) -> io::Result<()> {
        let path = self.path_of(&object.key());
        let mut object = object.clone();
        *object.status_mut() = api::Status::default();
        let dir = path.parent().expect("object paths have a parent");
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap().to_string_lossy()
        ));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(object.to_yaml().as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    }

    fn delete(&self, key: &ObjectKey) -> io::Result<bool> {
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(path.parent().expect("object paths have a parent"))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn put_load_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let objects = api::parse_yaml("t", OBJECTS).unwrap();
        for o in &objects {
            store.put(o).unwrap();
        }
        assert!(dir.path().join("exports/prod/db.yaml").is_file());
        assert!(dir
            .path()
            .join("privilegedaccesspolicies/deny-all.yaml")
            .is_file());
        fs::write(dir.path().join("exports/prod/broken.yaml"), "kind: [").unwrap();

        let reopened = FileStore::open(dir.path()).unwrap();
        let (mut loaded, problems) = reopened.load_all().unwrap();
        loaded.sort_by_key(Object::key);
        let mut expected = objects.clone();
        expected.sort_by_key(Object::key);
        assert_eq!(loaded, expected);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("broken.yaml"), "{problems:?}");

        assert!(reopened.delete(&objects[0].key()).unwrap());
        assert!(!reopened.delete(&objects[0].key()).unwrap());
        assert_eq!(reopened.load_all().unwrap().0.len(), 1);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("exports/prod"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["broken.yaml"]);
    }
}
