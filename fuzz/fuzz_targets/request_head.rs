//! The request head a peer sends on the gateway port (`CONNECT <export>.<ns>:443` or
//! `GET /healthz`), read as `dataplane::inbound` reads it: whatever the bytes, the parser
//! answers with a request, "need more" or a typed error, never a panic.
#![no_main]

use clink_agent::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((request, len))) = wire::parse_request(data) else {
        return;
    };
    assert!(len <= data.len(), "head length {len} past the input");
    // The head alone parses the same: what followed it is tunnel payload, not head.
    let (again, again_len) = wire::parse_request(&data[..len])
        .expect("the head parsed once")
        .expect("the head is complete");
    assert_eq!((&again, again_len), (&request, len));

    if let Some((export, namespace)) = wire::parse_authority(&request.target) {
        assert!(!export.is_empty() && !namespace.is_empty());
        assert!(
            !namespace.contains('.'),
            "namespace {namespace:?} has a dot"
        );
    }
    for value in request.header_values(wire::SOURCE_HEADER) {
        let _ = value.split_once('=');
    }
    let _ = request.header_values(wire::IMPORT_HEADER).next();
});
