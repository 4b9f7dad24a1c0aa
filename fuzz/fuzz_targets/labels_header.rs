//! The `clink-peer-labels` header a peer announces on heartbeats, which becomes its
//! `status.labels` and so what egress policies match: only valid labels may come out, and
//! what the agent announces (`format_labels`) must read back unchanged.
#![no_main]

use clink_agent::{api, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &str| {
    let labels = wire::parse_labels(value);
    for (k, v) in &labels {
        assert!(
            api::check_label(k, v).is_ok(),
            "invalid label {k:?}={v:?} kept"
        );
    }
    let header = wire::format_labels(&labels);
    assert_eq!(wire::parse_labels(&header), labels, "header {header:?}");
});
