//! The eBPF loader as an operator sees it: programs and maps pinned under the pin directory,
//! listed by `bpftool` under their names, map contents readable with `bpftool map dump`, and
//! nothing left behind afterwards.
//!
//! Needs root (skipped otherwise, except with CI=true where that is a failure) and
//! `/usr/sbin/bpftool`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use clink_agent::kernel::{
    host,
    loader::{self, LoadedEbpf},
    pins::{DEFAULT_PIN_DIR, MAP_PINS, PIN_MAP_PORTS, PIN_MAP_SOCKS, PROGRAM_PINS},
};
use clink_common::{PortFlags, BPF_OBJ_NAME_LEN};

const BPFTOOL: &str = "/usr/sbin/bpftool";

fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root, and CI=true does not allow skipping it");
    }
    eprintln!("{test}: SKIPPED: loading eBPF programs needs root (run the tests as root)");
    false
}

/// A pin directory of its own (tests run in parallel), removed with everything in it when the
/// test ends, however it ends; the shared parent goes too once no test or agent uses it.
struct PinDir {
    path: PathBuf,
    loaded: Option<LoadedEbpf>,
}

impl PinDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(DEFAULT_PIN_DIR).join(format!("test-{}-{n}", std::process::id()));
        Self { path, loaded: None }
    }

    fn load(&mut self) -> &mut LoadedEbpf {
        let loaded = loader::load(&self.path).expect("load and pin the eBPF programs");
        self.loaded.insert(loaded)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        drop(self.loaded.take());
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("cleanup: removing {}: {e}", self.path.display());
            }
        }
        remove_parent_if_unused();
    }
}

fn remove_parent_if_unused() {
    match fs::remove_dir(DEFAULT_PIN_DIR) {
        Ok(()) => {}
        // Another test (or an agent) still has its pins there, or it went already.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::NotFound
            ) => {}
        Err(e) => panic!("removing {DEFAULT_PIN_DIR}: {e}"),
    }
}

fn bpftool(args: &[&str]) -> String {
    let output = Command::new(BPFTOOL)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {BPFTOOL}: {e}"));
    assert!(
        output.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("bpftool prints UTF-8")
}

/// The name as `bpftool` shows it: the kernel keeps `BPF_OBJ_NAME_LEN - 1` characters.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(BPF_OBJ_NAME_LEN - 1)]
}

/// The top-level objects of a JSON array as printed by `bpftool --json`.
fn json_objects(json: &str) -> Vec<&str> {
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0);
    let mut objects = Vec::new();
    for (i, c) in json.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => {
                if depth == 1 {
                    start = i;
                }
                depth += 1;
            }
            '}' => {
                depth -= 1;
                if depth == 1 {
                    objects.push(&json[start..=i]);
                }
            }
            '[' if depth == 0 => depth = 1,
            _ => {}
        }
    }
    objects
}

/// A scalar field of a bpftool JSON object (its first occurrence, which for `id`, `name` and
/// `type` is the object's own), without quotes.
fn json_field<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let rest = object[object.find(&pattern)? + pattern.len()..].trim_start();
    match rest.strip_prefix('"') {
        Some(string) => string.split('"').next(),
        None => rest.split([',', '}']).next().map(str::trim),
    }
}

/// `bpftool <kind> show pinned <path>`: checks name and type and returns the id.
fn show_pinned(kind: &str, path: &Path, name: &str, ty: &str) -> String {
    let shown = bpftool(&[kind, "show", "pinned", path.to_str().unwrap(), "--json"]);
    assert_eq!(
        json_field(&shown, "name"),
        Some(kernel_name(name)),
        "{shown}"
    );
    assert_eq!(json_field(&shown, "type"), Some(ty), "{shown}");
    json_field(&shown, "id").expect("id").to_owned()
}

/// `bpftool <kind> show`: the object `id` is listed under `name`.
fn assert_listed(kind: &str, id: &str, name: &str) {
    let all = bpftool(&[kind, "show", "--json"]);
    let object = json_objects(&all)
        .into_iter()
        .find(|o| json_field(o, "id") == Some(id))
        .unwrap_or_else(|| panic!("bpftool {kind} show does not list id {id}"));
    assert_eq!(
        json_field(object, "name"),
        Some(kernel_name(name)),
        "{object}"
    );
}

#[test]
fn programs_and_maps_are_pinned_and_listed_by_name() {
    if !root_or_skip("programs_and_maps_are_pinned_and_listed_by_name") {
        return;
    }
    let mut dir = PinDir::new();
    let pin_dir = dir.path.clone();
    let loaded = dir.load();
    assert_eq!(loaded.pin_dir(), pin_dir);

    let mut expected: Vec<PathBuf> = PROGRAM_PINS
        .iter()
        .chain(&MAP_PINS)
        .map(|(_, pin, _)| pin_dir.join(pin))
        .collect();
    let mut pinned: Vec<PathBuf> = loaded.pinned().map(Path::to_path_buf).collect();
    expected.sort();
    pinned.sort();
    assert_eq!(pinned, expected);

    for (name, pin, ty) in PROGRAM_PINS {
        let id = show_pinned("prog", &pin_dir.join(pin), name, ty);
        assert_listed("prog", &id, name);
    }
    for (name, pin, ty) in MAP_PINS {
        let id = show_pinned("map", &pin_dir.join(pin), name, ty);
        assert_listed("map", &id, name);
    }

    assert_eq!(loaded.skmsg_counters().unwrap(), Default::default());
}

#[test]
fn ports_are_visible_with_bpftool_map_dump() {
    if !root_or_skip("ports_are_visible_with_bpftool_map_dump") {
        return;
    }
    let mut dir = PinDir::new();
    let ports_pin = dir.path.join(PIN_MAP_PORTS);
    let ports_pin = ports_pin.to_str().unwrap();
    let loaded = dir.load();

    loaded.add_port(15001, PortFlags::BOTH).unwrap();
    let dump = bpftool(&["map", "dump", "pinned", ports_pin, "--json"]);
    let entries = json_objects(&dump);
    assert_eq!(entries.len(), 1, "{dump}");
    let compact: String = entries[0].split_whitespace().collect();
    // The map carries BTF, so bpftool shows the entry with its field names...
    assert!(
        compact.contains(r#""formatted":{"key":{"port":15001},"value":{"bits":3}}"#),
        "{dump}"
    );
    // ...next to the raw bytes: port 15001 = 0x3a99 and flags 3, in host byte order.
    assert!(
        compact.contains(r#""key":["0x99","0x3a","0x00","0x00"]"#),
        "{dump}"
    );
    assert!(
        compact.contains(r#""value":["0x03","0x00","0x00","0x00"]"#),
        "{dump}"
    );

    loaded.remove_port(15001).unwrap();
    loaded.remove_port(15001).unwrap();
    let dump = bpftool(&["map", "dump", "pinned", ports_pin, "--json"]);
    assert!(json_objects(&dump).is_empty(), "{dump}");
}

#[test]
fn remove_unpins_everything_and_removes_the_directory() {
    if !root_or_skip("remove_unpins_everything_and_removes_the_directory") {
        return;
    }
    let mut dir = PinDir::new();
    dir.load();
    assert!(dir.path.join(PIN_MAP_SOCKS).exists());

    dir.loaded.take().unwrap().remove().unwrap();
    assert!(!dir.path.exists(), "{} still exists", dir.path.display());
}

#[test]
fn dropping_unpins_everything() {
    if !root_or_skip("dropping_unpins_everything") {
        return;
    }
    let mut dir = PinDir::new();
    dir.load();
    drop(dir.loaded.take());
    assert!(!dir.path.exists(), "{} still exists", dir.path.display());
}

/// An agent that starts over the pins of one that did not shut down replaces them, and the
/// old one, if it is still around, does not take them away when it goes.
#[test]
fn a_second_load_replaces_the_pins_and_keeps_them() {
    if !root_or_skip("a_second_load_replaces_the_pins_and_keeps_them") {
        return;
    }
    let mut dir = PinDir::new();
    let first = loader::load(&dir.path).expect("first load");
    let second = dir.load();
    let pins: Vec<PathBuf> = second.pinned().map(Path::to_path_buf).collect();
    drop(first);
    for pin in &pins {
        assert!(
            pin.exists(),
            "{} was removed with the first load",
            pin.display()
        );
    }
}

#[test]
fn feature_check_reports_sockmap_support() {
    if !root_or_skip("feature_check_reports_sockmap_support") {
        return;
    }
    // The build and test machines run a kernel with everything the splice needs (DESIGN §9).
    let features = host::feature_check().unwrap();
    assert!(features.sockmap(), "{features:?}");
}
