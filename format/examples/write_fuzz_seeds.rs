//! Writes the seed corpus of the `block_decode` fuzz target: a few valid blocks and near
//! misses, so the fuzzer starts from the format instead of from noise.
//!
//! `cargo run -p mooncake-kv-format --example write_fuzz_seeds [DIR]` (default
//! `fuzz/corpus/block_decode`).

use std::path::PathBuf;

use mooncake_kv_format as format;

fn block(key: &[u8], payload: &[u8], generation: u64, align: usize) -> Vec<u8> {
    let mut buf = vec![0u8; format::encoded_len(key.len(), payload.len(), align)];
    format::encode_into(&mut buf, key, payload, generation, align).expect("valid block");
    buf
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or("fuzz/corpus/block_decode".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let small = block(b"k", b"payload", 1, 64);
    let hashed = block(&[0xab; 32], &[7; 300], 42, 64);
    let sector = block(b"model/tp0/0123456789abcdef", &[1, 2, 3], u64::MAX, 4096);
    let empty = block(b"empty", b"", 3, 1);
    let mut bad_magic = small.clone();
    bad_magic[0] = b'X';
    let seeds: [(&str, &[u8]); 6] = [
        ("valid-small", &small),
        ("valid-hash-key", &hashed),
        ("valid-4k-aligned", &sector),
        ("valid-empty-payload", &empty),
        ("truncated", &hashed[..hashed.len() - 1]),
        ("bad-magic", &bad_magic),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}
