//! Arbitrary bytes into the block decoder: it must return a block or an error, never panic,
//! never read out of bounds; and whatever it accepts must be self-consistent and re-encode to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_kv_format as format;

fuzz_target!(|data: &[u8]| {
    let header_only = format::decode_header(data);
    let Ok(block) = format::decode(data) else {
        return;
    };
    assert_eq!(header_only.ok(), Some(block.header));
    let len = block.header.block_len();
    assert!(len <= data.len());
    assert_eq!(block.key.len(), usize::from(block.header.key_len));
    assert_eq!(block.payload.len(), block.header.payload_len as usize);
    // An accepted block is exactly what the encoder writes for its contents.
    let align = 1usize << (block.header.payload_offset.trailing_zeros().min(12));
    if format::payload_offset(block.key.len(), align) == block.header.payload_offset as usize {
        let mut again = vec![0u8; len];
        let written = format::encode_into(
            &mut again,
            block.key,
            block.payload,
            block.header.generation,
            align,
        )
        .expect("an accepted block re-encodes");
        assert_eq!(written, len);
        assert_eq!(&again[..], &data[..len]);
    }
});
