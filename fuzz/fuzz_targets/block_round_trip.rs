//! Arbitrary key, payload, generation and alignment through encode and decode: what comes
//! out is what went in, and a single flipped bit anywhere in the block is caught.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_kv_format as format;

fuzz_target!(|input: (Vec<u8>, Vec<u8>, u64, u8, u32)| {
    let (key, payload, generation, align_log2, flip) = input;
    let align = 1usize << (align_log2 % 13);
    let len = format::encoded_len(key.len(), payload.len(), align);
    let mut buf = vec![0u8; len];
    let Ok(written) = format::encode_into(&mut buf, &key, &payload, generation, align) else {
        assert!(format::check_key(&key).is_err() || format::check_value(&payload).is_err());
        return;
    };
    assert_eq!(written, len);
    let block = format::decode(&buf).expect("an encoded block decodes");
    assert_eq!(block.key, &key[..]);
    assert_eq!(block.payload, &payload[..]);
    assert_eq!(block.header.generation, generation);
    let bit = flip as usize % (len * 8);
    buf[bit / 8] ^= 1 << (bit % 8);
    assert!(
        format::decode(&buf).is_err(),
        "flipped bit {bit} not detected"
    );
});
