//! A YAML stream as `clink apply -f` and the store read it (`api::parse_yaml`): several
//! documents, each an object. Accepted objects must round-trip through JSON and YAML.
#![no_main]

use clink_agent::api;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(objects) = api::parse_yaml("fuzz.yaml", text) {
        for object in &objects {
            clink_fuzz::assert_round_trips(object);
        }
    }
});
