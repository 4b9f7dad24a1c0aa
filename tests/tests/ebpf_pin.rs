//! The eBPF loader as an operator sees it: programs and maps pinned under the pin directory,
//! listed by `bpftool` under their names, map contents readable with `bpftool map dump`, and
//! nothing left behind afterwards.
//!
//! Needs root (skipped otherwise, except with CI=true where that is a failure) and
//! `/usr/sbin/bpftool`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clink_agent::kernel::{
    host,
    loader::{self, LoadedEbpf},
    pins::{DEFAULT_PIN_DIR, MAP_PINS, PIN_MAP_PORTS, PIN_MAP_SOCKS, PROGRAM_PINS},
};
use clink_common::{PortFlags, BPF_OBJ_NAME_LEN};
use clink_testbed::{require_root, PinDir};
use serde_json::{json, Value};

const BPFTOOL: &str = "/usr/sbin/bpftool";

/// A pin directory of its own under the default one (tests run in parallel), removed with
/// everything in it when the test ends, however it ends; the shared parent goes too once no
/// test or agent uses it.
struct Pins {
    /// Declared first: dropped, and so unpinned by the loader itself, before `dir` goes.
    loaded: Option<LoadedEbpf>,
    dir: PinDir,
}

impl Pins {
    fn new() -> Self {
        Self {
            loaded: None,
            dir: PinDir::within(Path::new(DEFAULT_PIN_DIR), "test"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn load(&mut self) -> &mut LoadedEbpf {
        let loaded =
            loader::load(self.dir.path(), None, true).expect("load and pin the eBPF programs");
        self.loaded.insert(loaded)
    }
}

/// `bpftool <args> --json`, parsed.
fn bpftool(args: &[&str]) -> Value {
    let output = Command::new(BPFTOOL)
        .args(args)
        .arg("--json")
        .output()
        .unwrap_or_else(|e| panic!("running {BPFTOOL}: {e}"));
    assert!(
        output.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("bpftool --json prints JSON")
}

/// The name as `bpftool` shows it: the kernel keeps `BPF_OBJ_NAME_LEN - 1` characters.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(BPF_OBJ_NAME_LEN - 1)]
}

/// `bpftool <kind> show pinned <path>`: checks name and type and returns the id.
fn show_pinned(kind: &str, path: &Path, name: &str, ty: &str) -> u64 {
    let shown = bpftool(&[kind, "show", "pinned", path.to_str().unwrap()]);
    assert_eq!(shown["name"], kernel_name(name), "{shown}");
    assert_eq!(shown["type"], ty, "{shown}");
    shown["id"].as_u64().expect("id")
}

/// `bpftool <kind> show`: the object `id` is listed under `name`.
fn assert_listed(kind: &str, id: u64, name: &str) {
    let all = bpftool(&[kind, "show"]);
    let object = all
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|o| o["id"] == id)
        .unwrap_or_else(|| panic!("bpftool {kind} show does not list id {id}"));
    assert_eq!(object["name"], kernel_name(name), "{object}");
}

/// `bpftool map dump pinned <path>`: the entries.
fn dump(path: &str) -> Vec<Value> {
    match bpftool(&["map", "dump", "pinned", path]) {
        Value::Array(entries) => entries,
        other => panic!("bpftool map dump: not an array: {other}"),
    }
}

#[test]
fn programs_and_maps_are_pinned_and_listed_by_name() {
    if !require_root("programs_and_maps_are_pinned_and_listed_by_name") {
        return;
    }
    let mut dir = Pins::new();
    let pin_dir = dir.path().to_owned();
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
        assert_listed("prog", id, name);
    }
    for (name, pin, ty) in MAP_PINS {
        let id = show_pinned("map", &pin_dir.join(pin), name, ty);
        assert_listed("map", id, name);
    }

    assert_eq!(loaded.skmsg_counters().unwrap(), Default::default());
}

#[test]
fn ports_are_visible_with_bpftool_map_dump() {
    if !require_root("ports_are_visible_with_bpftool_map_dump") {
        return;
    }
    let mut dir = Pins::new();
    let ports_pin = dir.path().join(PIN_MAP_PORTS);
    let ports_pin = ports_pin.to_str().unwrap();
    let loaded = dir.load();

    loaded.add_port(15001, PortFlags::BOTH).unwrap();
    let entries = dump(ports_pin);
    assert_eq!(entries.len(), 1, "{entries:?}");
    // The map carries BTF, so bpftool shows the entry with its field names...
    assert_eq!(
        entries[0]["formatted"],
        json!({"key": {"port": 15001}, "value": {"bits": 3}}),
        "{entries:?}"
    );
    // ...next to the raw bytes: port 15001 = 0x3a99 and flags 3, in host byte order.
    assert_eq!(
        entries[0]["key"],
        json!(["0x99", "0x3a", "0x00", "0x00"]),
        "{entries:?}"
    );
    assert_eq!(
        entries[0]["value"],
        json!(["0x03", "0x00", "0x00", "0x00"]),
        "{entries:?}"
    );

    loaded.remove_port(15001).unwrap();
    loaded.remove_port(15001).unwrap();
    let entries = dump(ports_pin);
    assert!(entries.is_empty(), "{entries:?}");
}

#[test]
fn remove_unpins_everything_and_removes_the_directory() {
    if !require_root("remove_unpins_everything_and_removes_the_directory") {
        return;
    }
    let mut dir = Pins::new();
    dir.load();
    assert!(dir.path().join(PIN_MAP_SOCKS).exists());

    dir.loaded.take().unwrap().remove().unwrap();
    assert!(
        !dir.path().exists(),
        "{} still exists",
        dir.path().display()
    );
}

#[test]
fn dropping_unpins_everything() {
    if !require_root("dropping_unpins_everything") {
        return;
    }
    let mut dir = Pins::new();
    dir.load();
    drop(dir.loaded.take());
    assert!(
        !dir.path().exists(),
        "{} still exists",
        dir.path().display()
    );
}

/// An agent that starts over the pins of one that did not shut down replaces them, and the
/// old one, if it is still around, does not take them away when it goes.
#[test]
fn a_second_load_replaces_the_pins_and_keeps_them() {
    if !require_root("a_second_load_replaces_the_pins_and_keeps_them") {
        return;
    }
    let mut dir = Pins::new();
    let first = loader::load(dir.path(), None, true).expect("first load");
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
    if !require_root("feature_check_reports_sockmap_support") {
        return;
    }
    // The build and test machines run a kernel with everything the splice needs (ARCHITECTURE.md, "Sockmap data path").
    let features = host::feature_check().unwrap();
    assert!(features.sockmap(), "{features:?}");
}
