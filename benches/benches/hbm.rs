//! The HBM tier against a plain device copy of the same bytes, at 512 KiB and 2 MiB: a put
//! (encode on the host, checksum, copy to the device) next to a host-to-device copy, and a
//! get into a host buffer (device-to-host copy, verification) next to a device-to-host copy.
//! Also a get straight into device memory (`get_into_device`, device to device) next to a
//! device-to-device copy.
//!
//! On a GPU: `cargo bench -p mooncake-kv-benches --features cuda --bench hbm` (see
//! `scripts/gpu-check`). Without the `cuda` feature or a GPU it runs on the host test device
//! (host memory posing as a GPU), and says so: those figures measure the tier's bookkeeping,
//! not a GPU.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mooncake_kv_engine::{
    DeviceMemory, Engine, EngineConfig, HbmSettings, HostTestDevice, ToDevice, ToHost,
};

const SIZES: [usize; 2] = [512 << 10, 2 << 20];
/// Keys per size: the working set cycles through them (64 MiB at 2 MiB).
const KEYS: usize = 32;

fn device() -> Arc<dyn DeviceMemory> {
    #[cfg(feature = "cuda")]
    match mooncake_kv_tiers::CudaDevice::open(0) {
        Ok(device) => return Arc::new(device),
        Err(error) => eprintln!("no GPU ({error}): measuring the host test device instead"),
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("built without the cuda feature: measuring the host test device, not a GPU");
    Arc::new(HostTestDevice::new(1 << 30))
}

#[expect(
    unsafe_code,
    reason = "device copies by address, the reference the tier is held to"
)]
fn hbm(c: &mut Criterion) {
    let device = device();
    let engine = Engine::open_with_device(
        EngineConfig {
            dram_capacity_bytes: 256 << 20,
            hbm: Some(HbmSettings {
                capacity_bytes: 512 << 20,
                ..HbmSettings::default()
            }),
            ..EngineConfig::default()
        },
        Arc::clone(&device),
    )
    .expect("open engine");
    let scratch = device
        .allocate(2 * (2 << 20) as u64)
        .expect("device scratch");
    for size in SIZES {
        let value: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
        let keys: Vec<Vec<u8>> = (0..KEYS)
            .map(|i| format!("hbm-{size}-{i}").into_bytes())
            .collect();
        for key in &keys {
            engine.put(key, &value).expect("put");
        }
        let mut host = vec![0u8; size];
        let mut group = c.benchmark_group(format!("hbm/{}KiB", size >> 10));
        group.throughput(Throughput::Bytes(size as u64));
        let mut next = 0;
        group.bench_function("put", |b| {
            b.iter(|| {
                engine
                    .put(&keys[next % KEYS], black_box(&value))
                    .expect("put");
                next += 1;
            })
        });
        group.bench_function("reference_copy_to_device", |b| {
            b.iter(|| {
                // SAFETY: `scratch` is this bench's device allocation, used by nothing else.
                unsafe {
                    device
                        .copy_to_device(&[ToDevice {
                            target: scratch.ptr,
                            source: black_box(&value),
                        }])
                        .expect("copy")
                }
            })
        });
        group.bench_function("get_into_host", |b| {
            b.iter(|| {
                let len = engine.get_into(&keys[next % KEYS], &mut host).expect("get");
                assert_eq!(len, Some(size));
                next += 1;
            })
        });
        group.bench_function("reference_copy_to_host", |b| {
            b.iter(|| {
                // SAFETY: as above.
                unsafe {
                    device
                        .copy_to_host(&mut [ToHost {
                            source: scratch.ptr,
                            target: &mut host,
                        }])
                        .expect("copy")
                }
            })
        });
        let target = scratch
            .sub(size as u64, size as u64)
            .expect("inside scratch");
        group.bench_function("get_into_device", |b| {
            b.iter(|| {
                // SAFETY: `target` is the second half of the bench's scratch allocation.
                let len =
                    unsafe { engine.get_into_device(&keys[next % KEYS], target) }.expect("get");
                assert_eq!(len, Some(size));
                next += 1;
            })
        });
        group.bench_function("reference_copy_within_device", |b| {
            b.iter(|| {
                // SAFETY: the two halves of the scratch allocation do not overlap.
                unsafe {
                    device
                        .copy_within(target.ptr, scratch.ptr, size as u64)
                        .expect("copy")
                }
            })
        });
        group.finish();
        assert_eq!(
            engine.get(&keys[0]).expect("get").as_deref(),
            Some(&value[..])
        );
    }
    // SAFETY: no copy uses the scratch memory anymore.
    unsafe { device.free(scratch) };
}

criterion_group!(benches, hbm);
criterion_main!(benches);
