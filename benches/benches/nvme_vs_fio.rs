//! NVMe tier throughput next to fio on the same file system, in one run: random reads and
//! writes of 512 KiB and 2 MiB at queue depths 1 and 16, `O_DIRECT`, no fsync. fio uses
//! `ioengine=io_uring, direct=1` with the same sizes and depths on a file of the same size in
//! the same directory. Each figure is the median of three runs, ours and fio's alternating.
//!
//! Run: `cargo bench -p mooncake-kv-benches --bench nvme_vs_fio`. Environment:
//! `NVME_BENCH_DIR` (default `target/nvme-bench`), `NVME_BENCH_SECONDS` per run (default 3),
//! `NVME_BENCH_FILE_MIB` (default 2048). Needs `fio` on the PATH (Debian package `fio`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mooncake_kv_engine::AlignedBuf;
use mooncake_kv_tiers::{Extent, IoBackendKind, NvmeConfig, NvmeTier, Tier};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Bytes per second of our tier: random transfers of `block` bytes with `depth` in flight, for
/// `seconds`. Each call hands the tier a batch of `8 * depth` transfers, which it keeps
/// `depth` deep (a new one is submitted as each completes), as fio does.
fn ours(path: &Path, file_bytes: u64, block: usize, depth: u32, write: bool, seconds: f64) -> f64 {
    let tier = NvmeTier::open(NvmeConfig {
        capacity_bytes: file_bytes,
        io_depth: depth,
        io_rings: 1,
        io_backend: IoBackendKind::Uring,
        ..NvmeConfig::new(path)
    })
    .expect("open the tier");
    let mut extents: Vec<Extent> = (0..file_bytes / block as u64)
        .map(|_| tier.allocate(block as u64).expect("allocate"))
        .collect();
    let batch = 8 * depth as usize;
    let mut bufs: Vec<AlignedBuf> = (0..batch).map(|_| AlignedBuf::zeroed(block)).collect();
    for (i, buf) in bufs.iter_mut().enumerate() {
        buf.fill(i as u8 + 1);
    }
    let mut rng = StdRng::seed_from_u64(depth as u64);
    let mut moved = 0u64;
    let started = Instant::now();
    let budget = Duration::from_secs_f64(seconds);
    while started.elapsed() < budget {
        // A batch of distinct random extents.
        let mut picks: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..extents.len()))
            .collect();
        picks.sort_unstable();
        picks.dedup();
        if write {
            let mut chosen: Vec<&mut Extent> = Vec::with_capacity(picks.len());
            let mut rest = &mut extents[..];
            let mut base = 0;
            for &p in &picks {
                let (_, tail) = rest.split_at_mut(p - base);
                let (one, tail) = tail.split_first_mut().expect("in range");
                chosen.push(one);
                rest = tail;
                base = p + 1;
            }
            let mut ops: Vec<_> = chosen.into_iter().zip(bufs.iter()).collect();
            for result in tier.write_extents(&mut ops) {
                result.expect("write");
            }
        } else {
            let mut ops: Vec<_> = picks
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&p, b)| (&extents[p], 0, &mut b[..]))
                .collect();
            for result in tier.read_extents(&mut ops) {
                result.expect("read");
            }
        }
        moved += (picks.len() * block) as u64;
    }
    moved as f64 / started.elapsed().as_secs_f64()
}

/// fio's bandwidth in bytes per second for the same job.
fn fio(path: &Path, file_bytes: u64, block: usize, depth: u32, write: bool, seconds: f64) -> f64 {
    let output = Command::new("fio")
        .args([
            "--name=reference",
            &format!("--filename={}", path.display()),
            &format!("--size={file_bytes}"),
            &format!("--rw={}", if write { "randwrite" } else { "randread" }),
            &format!("--bs={block}"),
            &format!("--iodepth={depth}"),
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--output-format=json",
        ])
        .output()
        .expect("run fio (install the Debian package `fio`)");
    assert!(
        output.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("fio JSON");
    let side = if write { "write" } else { "read" };
    report["jobs"][0][side]["bw_bytes"]
        .as_f64()
        .expect("bw_bytes")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no arguments of its own.
    let dir = std::path::PathBuf::from(env_or("NVME_BENCH_DIR", "target/nvme-bench".to_owned()));
    let seconds: f64 = env_or("NVME_BENCH_SECONDS", 3.0);
    let file_bytes: u64 = env_or::<u64>("NVME_BENCH_FILE_MIB", 2048) << 20;
    std::fs::create_dir_all(&dir).expect("create the bench directory");
    let (ours_path, fio_path) = (dir.join("tier.data"), dir.join("fio.data"));
    // Lay both files out fully written, so reads hit written blocks on both sides.
    let _ = std::fs::remove_file(&ours_path);
    let _ = std::fs::remove_file(&fio_path);
    {
        let tier = NvmeTier::open(NvmeConfig {
            capacity_bytes: file_bytes,
            ..NvmeConfig::new(&ours_path)
        })
        .expect("open");
        let mut buf = AlignedBuf::zeroed(2 << 20);
        buf.fill(7);
        let mut extents: Vec<Extent> = (0..file_bytes >> 21)
            .map(|_| tier.allocate(2 << 20).expect("allocate"))
            .collect();
        for chunk in extents.chunks_mut(16) {
            let mut ops: Vec<_> = chunk.iter_mut().map(|e| (e, &buf)).collect();
            tier.write_extents(&mut ops)
                .into_iter()
                .for_each(|r| r.expect("lay out"));
        }
    }
    let status = Command::new("fio")
        .args([
            "--name=layout",
            &format!("--filename={}", fio_path.display()),
            &format!("--size={file_bytes}"),
            "--rw=write",
            "--bs=2m",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=16",
        ])
        .output()
        .expect("run fio (install the Debian package `fio`)");
    assert!(status.status.success(), "fio layout failed");

    println!(
        "{:<6} {:>8} {:>6} {:>14} {:>14} {:>7}",
        "op", "size", "depth", "ours MiB/s", "fio MiB/s", "ratio"
    );
    for write in [false, true] {
        for block in [512usize << 10, 2 << 20] {
            for depth in [1u32, 16] {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for _ in 0..3 {
                    a.push(ours(&ours_path, file_bytes, block, depth, write, seconds));
                    b.push(fio(&fio_path, file_bytes, block, depth, write, seconds));
                }
                let (a, b) = (median(a), median(b));
                println!(
                    "{:<6} {:>6}KiB {:>6} {:>14.0} {:>14.0} {:>7.2}",
                    if write { "write" } else { "read" },
                    block >> 10,
                    depth,
                    a / f64::from(1 << 20),
                    b / f64::from(1 << 20),
                    a / b
                );
            }
        }
    }
    let _ = std::fs::remove_file(&ours_path);
    let _ = std::fs::remove_file(&fio_path);
}
