//! The body of `POST /apply` on the admin socket (what `clink apply` sends): a JSON array of
//! objects, each parsed and validated by `Object::from_value`, exactly as `admin` does it.
//! Accepted objects must round-trip through JSON and the store's YAML.
#![no_main]

use clink_agent::api::Object;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(values) = serde_json::from_slice::<Vec<serde_json::Value>>(body) else {
        return;
    };
    for value in values {
        if let Ok(object) = Object::from_value(value) {
            clink_fuzz::assert_round_trips(&object);
        }
    }
});
