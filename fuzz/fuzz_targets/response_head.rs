//! What a peer answers to a CONNECT or a heartbeat, read as `peer::probe` and the outbound
//! side read it: `wire::read_response` (head, then the short body of a refusal) and the
//! labels header. The input is the whole byte stream the peer sent before closing.
#![no_main]

use std::future::Future as _;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use clink_agent::{api, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, len))) = wire::parse_response(data) {
        assert!(len <= data.len(), "head length {len} past the input");
    }

    // A byte slice is a reader that never waits, so one poll finishes the read.
    let mut stream = data;
    let mut buf = BytesMut::new();
    let read = pin!(wire::read_response(&mut stream, &mut buf));
    let Poll::Ready(result) = read.poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("read_response waited on a reader that never waits");
    };
    let Ok(response) = result else {
        return;
    };
    let labels = response
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(wire::LABELS_HEADER))
        .map(|(_, v)| wire::parse_labels(v))
        .unwrap_or_default();
    for (k, v) in &labels {
        assert!(
            api::check_label(k, v).is_ok(),
            "invalid label {k:?}={v:?} kept"
        );
    }
});
