//! Arbitrary bytes into mooncake-kvd's control plane: as a stream of frames (header checks,
//! body checksum, a length that claims more than arrives) and as request and response bodies
//! (bincode under the body limit). Each returns a message or an error, never panics, and
//! whatever decodes re-encodes to a body that decodes to the same message.
//!
//! The protocol is the client crate's, which builds without the engine (and RocksDB).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_kv_client::proto;

fn bodies(body: &[u8]) {
    if let Ok(request) = proto::decode_request(body) {
        let again = proto::encode_body(&request);
        assert_eq!(proto::decode_request(&again).as_ref(), Ok(&request));
    }
    if let Ok(response) = proto::decode_response(body) {
        let again = proto::encode_body(&response);
        assert_eq!(proto::decode_response(&again).as_ref(), Ok(&response));
    }
}

fuzz_target!(|data: &[u8]| {
    bodies(data);
    let mut stream = data;
    let mut body = Vec::new();
    while let Ok(Some(_header)) = proto::read_frame(&mut stream, &mut body) {
        bodies(&body);
    }
});
