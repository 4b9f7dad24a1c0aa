//! Properties shared by the fuzz targets in `fuzz_targets/`.

use clink_agent::api::{self, Object};

/// An object the agent accepted must survive both forms it is written in: the JSON the admin
/// API answers with (and `clink apply` sends), and the YAML file the store keeps and reads
/// back at the next start. A difference would change an object across a restart.
pub fn assert_round_trips(object: &Object) {
    let json = object.to_json();
    match Object::from_value(json.clone()) {
        Ok(again) => assert_eq!(&again, object, "changed through JSON {json}"),
        Err(e) => panic!("accepted object rejected through JSON {json}: {e}"),
    }
    let yaml = object.to_yaml();
    match api::parse_yaml("store", &yaml) {
        Ok(again) => assert_eq!(
            again,
            std::slice::from_ref(object),
            "changed through YAML:\n{yaml}"
        ),
        Err(e) => panic!("accepted object rejected through YAML:\n{yaml}\n{e}"),
    }
}
