//! Arbitrary bytes into every tcp, shared-memory and RDMA handshake frame decoder: each returns a frame or an
//! error, never panics; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_kv_transfer::wire::{
    MapRequest, MapResponse, QpEndpoint, RdmaGrant, ReadRequest, ReadResponse,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = ReadRequest::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..frame.encode().len()]);
    }
    if let Ok(frame) = ReadResponse::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..frame.encode().len()]);
    }
    if let Ok(frame) = MapRequest::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..frame.encode().len()]);
    }
    if let Ok(frame) = MapResponse::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..frame.encode().len()]);
    }
    if let Ok(frame) = QpEndpoint::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..frame.encode().len()]);
    }
    if let Ok(frame) = RdmaGrant::decode(data) {
        assert_eq!(&frame.encode()[..], &data[..frame.encode().len()]);
    }
});
