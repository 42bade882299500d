//! The NVMe tier on a raw block device instead of a file: a loop device backed by a temporary
//! file stands in for an NVMe namespace (same `O_DIRECT` block-device path in the kernel).
//! Extents written through io_uring read back intact, the device's size bounds the capacity,
//! and nothing is created or preallocated on the device. Needs root and `losetup` (util-linux);
//! where either is missing the test says so and passes without checking anything.

use std::path::PathBuf;
use std::process::Command;

use mooncake_kv_tiers::{AlignedBuf, Error, IoBackendKind, NvmeConfig, NvmeTier, Tier};

/// A loop device, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(backing: &std::path::Path) -> Option<Self> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        Some(Self(PathBuf::from(path)))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn extents_on_a_raw_block_device_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("device.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(32 << 20))
        .expect("backing file");
    let Some(device) = LoopDevice::attach(&backing) else {
        println!("skipped: no loop device could be attached (needs root and losetup)");
        return;
    };
    let too_big = NvmeConfig {
        capacity_bytes: 64 << 20,
        ..NvmeConfig::new(&device.0)
    };
    assert!(matches!(
        NvmeTier::open(too_big),
        Err(Error::Config {
            field: "capacity_bytes",
            ..
        })
    ));

    let tier = NvmeTier::open(NvmeConfig {
        capacity_bytes: 32 << 20,
        io_backend: IoBackendKind::Uring,
        ..NvmeConfig::new(&device.0)
    })
    .expect("open the device");
    let mut extents: Vec<_> = (0..16)
        .map(|_| tier.allocate(1 << 20).expect("allocate"))
        .collect();
    let bufs: Vec<AlignedBuf> = (0..16u8)
        .map(|i| {
            let mut b = AlignedBuf::zeroed(1 << 20);
            b.fill(i + 1);
            b
        })
        .collect();
    let mut writes: Vec<_> = extents.iter_mut().zip(bufs.iter()).collect();
    assert!(tier.write_extents(&mut writes).iter().all(Result::is_ok));
    tier.sync().expect("sync");
    let mut back: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::zeroed(1 << 20)).collect();
    let mut reads: Vec<_> = extents
        .iter()
        .zip(back.iter_mut())
        .map(|(e, b)| (e, 0, &mut b[..]))
        .collect();
    assert!(tier.read_extents(&mut reads).iter().all(Result::is_ok));
    for (i, b) in back.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8 + 1), "extent {i}");
    }
    assert_eq!(tier.capacity_bytes(), 32 << 20);
    drop(tier);
    // The bytes went to the device: they are in the backing file.
    let image = std::fs::read(&backing).expect("read backing");
    let first = extents[0].offset_bytes() as usize;
    assert!(image[first..first + (1 << 20)].iter().all(|&x| x == 1));
}
