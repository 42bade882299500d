//! The NVMe tier: a preallocated file (or a raw block device) opened with `O_DIRECT`, carved
//! into 4 KiB-aligned extents by the best-fit allocator, read and written through io_uring
//! with many operations in flight, or through positioned reads and writes when io_uring is
//! unavailable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::aligned::{AlignedBuf, IO_ALIGN};
use crate::allocator::Carver;
use crate::uring::{IoOp, Uring};
use crate::{Error, Extent, Result, Tier, TierKind, TierUsage, range_within};

/// Unit of allocation and of every transfer: 4 KiB, a page and the largest common sector.
pub const NVME_UNIT_BYTES: u64 = IO_ALIGN as u64;

static NEXT_NVME_ID: AtomicU64 = AtomicU64::new(1 << 32);

/// How the NVMe tier submits I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackendKind {
    /// io_uring, falling back to positioned reads and writes (with a warning in the log and
    /// [`NvmeTier::fell_back`] set) if io_uring cannot be set up.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Positioned reads and writes (`pread`/`pwrite`), one at a time.
    Psync,
}

/// Configuration of an [`NvmeTier`]. Validated once by [`NvmeTier::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeConfig {
    /// The data file, created and preallocated if missing, or a raw block device. No default.
    pub path: PathBuf,
    /// Bytes of the file to use. Default: 4 GiB. A positive multiple of 4 KiB; for a block
    /// device, at most its size.
    pub capacity_bytes: u64,
    /// Operations in flight per ring. Default: 64. From 1 to 4096.
    pub io_depth: u32,
    /// Rings, so that this many threads can submit at once. Default: 4. From 1 to 64.
    pub io_rings: u32,
    /// I/O backend. Default: [`IoBackendKind::Auto`].
    pub io_backend: IoBackendKind,
}

impl NvmeConfig {
    /// A config for `path` with every other field at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            capacity_bytes: 4 << 30,
            io_depth: 64,
            io_rings: 4,
            io_backend: IoBackendKind::Auto,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::Config { field, reason });
        if self.capacity_bytes == 0 || self.capacity_bytes % NVME_UNIT_BYTES != 0 {
            return bad(
                "capacity_bytes",
                format!(
                    "{} is not a positive multiple of 4 KiB",
                    self.capacity_bytes
                ),
            );
        }
        if !(1..=4096).contains(&self.io_depth) {
            return bad(
                "io_depth",
                format!("{} is not from 1 to 4096", self.io_depth),
            );
        }
        if !(1..=64).contains(&self.io_rings) {
            return bad("io_rings", format!("{} is not from 1 to 64", self.io_rings));
        }
        Ok(())
    }
}

#[derive(Debug)]
enum IoBackend {
    Uring(Uring),
    Psync,
}

/// A file or block device holding extents, accessed with `O_DIRECT`.
#[derive(Debug)]
pub struct NvmeTier {
    file: File,
    path: PathBuf,
    capacity_bytes: u64,
    carver: Carver,
    backend: IoBackend,
    fell_back: bool,
}

fn io_error(action: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { action, source }
}

impl NvmeTier {
    /// Opens (creating and preallocating if needed) the data file or device. Every extent is
    /// free; a caller that recovers a map marks its extents used with [`NvmeTier::adopt`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid config or a device smaller than `capacity_bytes`;
    /// [`Error::Io`] if the file cannot be opened with `O_DIRECT` or preallocated, or if
    /// io_uring was required and cannot be set up.
    pub fn open(config: NvmeConfig) -> Result<Self> {
        config.validate()?;
        let is_device = std::fs::metadata(&config.path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        if !is_device {
            // Owner only: the blocks are readable by whoever can read the file, token or not.
            options.create(true).mode(0o600);
        }
        let file = options
            .open(&config.path)
            .map_err(io_error("open the NVMe data file"))?;
        if !is_device {
            restrict_to_owner(&file, &config.path)?;
        }
        if is_device {
            let len = device_len(&file).map_err(io_error("size the NVMe device"))?;
            if len < config.capacity_bytes {
                return Err(Error::Config {
                    field: "capacity_bytes",
                    reason: format!(
                        "{} is larger than the device ({len} bytes)",
                        config.capacity_bytes
                    ),
                });
            }
        } else {
            preallocate(&file, &config.path, config.capacity_bytes)?;
        }
        let (backend, fell_back) = match config.io_backend {
            IoBackendKind::Psync => (IoBackend::Psync, false),
            IoBackendKind::Uring => (
                IoBackend::Uring(
                    Uring::new(config.io_rings as usize, config.io_depth)
                        .map_err(io_error("set up io_uring"))?,
                ),
                false,
            ),
            IoBackendKind::Auto => match Uring::new(config.io_rings as usize, config.io_depth) {
                Ok(uring) => (IoBackend::Uring(uring), false),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        "io_uring unavailable; the NVMe tier falls back to pread/pwrite, one I/O at a time"
                    );
                    (IoBackend::Psync, true)
                }
            },
        };
        Ok(Self {
            file,
            path: config.path,
            capacity_bytes: config.capacity_bytes,
            carver: Carver::new(
                NEXT_NVME_ID.fetch_add(1, Ordering::Relaxed),
                config.capacity_bytes,
                NVME_UNIT_BYTES,
            ),
            backend,
            fell_back,
        })
    }

    /// The data file or device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which backend runs the I/O: `"io_uring"` or `"psync"`.
    pub fn io_backend_name(&self) -> &'static str {
        match self.backend {
            IoBackend::Uring(_) => "io_uring",
            IoBackend::Psync => "psync",
        }
    }

    /// Whether io_uring was wanted but could not be set up, so I/O runs through psync.
    pub fn fell_back(&self) -> bool {
        self.fell_back
    }

    /// Marks `[offset_bytes, offset_bytes + len_bytes)` used and returns its extent: how a
    /// recovered block map takes back the extents it points at.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if the range is misaligned, outside the tier, or overlaps an
    /// extent already in use (a corrupt map).
    pub fn adopt(&self, offset_bytes: u64, len_bytes: u64) -> Result<Extent> {
        let refuse = || Error::OutOfBounds {
            offset_bytes,
            len_bytes,
            extent_len_bytes: self.capacity_bytes,
        };
        let aligned = offset_bytes % NVME_UNIT_BYTES == 0 && len_bytes % NVME_UNIT_BYTES == 0;
        let end = offset_bytes.checked_add(len_bytes).ok_or_else(refuse)?;
        if !aligned || len_bytes == 0 || end > self.capacity_bytes {
            return Err(refuse());
        }
        self.carver.take(offset_bytes, len_bytes).ok_or_else(refuse)
    }

    /// Writes each buffer at the start of its extent, many in flight at once. Buffers are
    /// [`AlignedBuf`]s whose length is a multiple of 4 KiB and at most the extent's length.
    pub fn write_extents(&self, writes: &mut [(&mut Extent, &AlignedBuf)]) -> Vec<Result<()>> {
        let mut checked = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len());
        for (extent, buf) in writes.iter() {
            let check = self.check_direct(extent, 0, buf.len());
            if check.is_ok() {
                ops.push(IoOp::Write {
                    offset: extent.offset_bytes,
                    buf: &buf[..],
                });
            }
            checked.push(check);
        }
        self.merge(checked, self.run(&mut ops))
    }

    /// Reads into each buffer from its extent at the given offset, many in flight at once.
    /// Each buffer must start on a 4 KiB boundary and be a multiple of 4 KiB long, and the
    /// offset must be a multiple of 4 KiB: then the bytes go from the device straight into it.
    pub fn read_extents(&self, reads: &mut [(&Extent, u64, &mut [u8])]) -> Vec<Result<()>> {
        let mut checked = Vec::with_capacity(reads.len());
        let mut ops = Vec::with_capacity(reads.len());
        for (extent, offset, buf) in reads.iter_mut() {
            let check = self.check_direct(extent, *offset, buf.len()).and(
                if buf.as_ptr() as usize % IO_ALIGN == 0 {
                    Ok(())
                } else {
                    Err(Error::Misaligned {
                        what: "buffer address",
                    })
                },
            );
            if check.is_ok() {
                ops.push(IoOp::Read {
                    offset: extent.offset_bytes + *offset,
                    buf: &mut buf[..],
                });
            }
            checked.push(check);
        }
        self.merge(checked, self.run(&mut ops))
    }

    /// Makes every completed write durable (`fdatasync`): `O_DIRECT` bypasses the page cache
    /// but not the device's write cache.
    ///
    /// # Errors
    ///
    /// [`Error::Io`]. After a failed sync the state of recent writes is unknown; callers must
    /// stop trusting them (the engine poisons itself).
    pub fn sync(&self) -> Result<()> {
        rustix::fs::fdatasync(&self.file).map_err(|e| Error::Io {
            action: "sync the NVMe data file",
            source: e.into(),
        })
    }

    fn check_direct(&self, extent: &Extent, offset: u64, len: usize) -> Result<()> {
        self.carver.check(extent);
        range_within(extent, offset, len)?;
        if offset % NVME_UNIT_BYTES != 0 {
            return Err(Error::Misaligned { what: "offset" });
        }
        if len as u64 % NVME_UNIT_BYTES != 0 {
            return Err(Error::Misaligned { what: "length" });
        }
        Ok(())
    }

    fn run(&self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>> {
        match &self.backend {
            IoBackend::Uring(uring) => uring.run(self.file.as_fd(), ops),
            IoBackend::Psync => ops
                .iter_mut()
                .map(|op| match op {
                    IoOp::Read { offset, buf } => self.file.read_exact_at(buf, *offset),
                    IoOp::Write { offset, buf } => self.file.write_all_at(buf, *offset),
                })
                .collect(),
        }
    }

    /// Merges argument checks with I/O results: the I/O ran only for the checked ones.
    fn merge(&self, checked: Vec<Result<()>>, io: Vec<io::Result<()>>) -> Vec<Result<()>> {
        let mut io = io.into_iter();
        checked
            .into_iter()
            .map(|check| {
                check?;
                io.next()
                    .expect("one I/O result per checked operation")
                    .map_err(io_error("transfer to or from the NVMe data file"))
            })
            .collect()
    }
}

impl Tier for NvmeTier {
    fn kind(&self) -> TierKind {
        TierKind::Nvme
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    fn used_bytes(&self) -> u64 {
        self.carver.used_bytes()
    }

    fn allocation_unit_bytes(&self) -> u64 {
        NVME_UNIT_BYTES
    }

    fn usage(&self) -> TierUsage {
        self.carver.usage()
    }

    fn allocate(&self, len_bytes: u64) -> Result<Extent> {
        self.carver.allocate(len_bytes)
    }

    fn free(&self, extent: Extent) {
        self.carver.free(extent);
    }

    fn write_at(&self, extent: &mut Extent, offset_bytes: u64, source: &[u8]) -> Result<()> {
        range_within(extent, offset_bytes, source.len())?;
        if source.is_empty() {
            return Ok(());
        }
        // Read-modify-write of the covering sectors through an aligned buffer.
        let start = offset_bytes / NVME_UNIT_BYTES * NVME_UNIT_BYTES;
        let end = (offset_bytes + source.len() as u64).next_multiple_of(NVME_UNIT_BYTES);
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let head = (offset_bytes - start) as usize;
        if head != 0 || source.len() % IO_ALIGN != 0 {
            self.read_extents(&mut [(&*extent, start, &mut buf[..])])
                .remove(0)?;
        }
        buf[head..head + source.len()].copy_from_slice(source);
        let mut ops = [IoOp::Write {
            offset: extent.offset_bytes + start,
            buf: &buf[..],
        }];
        let result = self.run(&mut ops).remove(0);
        result.map_err(io_error("write to the NVMe data file"))
    }

    fn read_at(&self, extent: &Extent, offset_bytes: u64, target: &mut [u8]) -> Result<()> {
        range_within(extent, offset_bytes, target.len())?;
        if target.is_empty() {
            return Ok(());
        }
        let start = offset_bytes / NVME_UNIT_BYTES * NVME_UNIT_BYTES;
        let end = (offset_bytes + target.len() as u64).next_multiple_of(NVME_UNIT_BYTES);
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        self.read_extents(&mut [(extent, start, &mut buf[..])])
            .remove(0)?;
        let head = (offset_bytes - start) as usize;
        target.copy_from_slice(&buf[head..head + target.len()]);
        Ok(())
    }
}

fn device_len(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::End(0))
}

/// Sizes a regular file to `capacity_bytes` with its blocks allocated, so writes never fail
/// for want of space and never extend the file (which would need a metadata sync each time),
/// then makes the size durable.
/// Makes an existing data file (one created before files were 0600) owner-only, with a
/// warning.
fn restrict_to_owner(file: &File, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(io_error("stat the NVMe data file"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o600))
            .map_err(io_error("restrict the NVMe data file to its owner"))?;
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
            "the data file was open to other users; it is now owner-only (0600)");
    }
    Ok(())
}

fn preallocate(file: &File, path: &Path, capacity_bytes: u64) -> Result<()> {
    let len = file
        .metadata()
        .map_err(io_error("stat the NVMe data file"))?
        .len();
    if len > capacity_bytes {
        return Err(Error::Config {
            field: "capacity_bytes",
            reason: format!(
                "the data file {} holds {len} bytes, more than capacity_bytes ({capacity_bytes}); \
                 shrinking would drop blocks",
                path.display()
            ),
        });
    }
    if len < capacity_bytes {
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, capacity_bytes)
            .map_err(|e| Error::Io {
                action: "preallocate the NVMe data file",
                source: e.into(),
            })?;
        file.sync_all()
            .map_err(io_error("sync the NVMe data file"))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error("sync the data directory"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn tier(dir: &Path, backend: IoBackendKind) -> NvmeTier {
        NvmeTier::open(NvmeConfig {
            capacity_bytes: 64 << 20,
            io_backend: backend,
            ..NvmeConfig::new(dir.join("data"))
        })
        .unwrap()
    }

    #[test]
    fn batched_writes_read_back_on_both_backends() {
        for backend in [IoBackendKind::Uring, IoBackendKind::Psync] {
            let dir = tempfile::tempdir().unwrap();
            let tier = tier(dir.path(), backend);
            let mut rng = StdRng::seed_from_u64(1);
            let mut extents = Vec::new();
            let mut bufs = Vec::new();
            for i in 0..40 {
                let len = rng.random_range(1..64usize) * 4096;
                extents.push(tier.allocate(len as u64).unwrap());
                let mut buf = AlignedBuf::zeroed(len);
                buf.fill(i as u8 + 1);
                bufs.push(buf);
            }
            let mut writes: Vec<_> = extents.iter_mut().zip(bufs.iter()).collect();
            assert!(tier.write_extents(&mut writes).iter().all(Result::is_ok));
            tier.sync().unwrap();
            let mut back: Vec<AlignedBuf> =
                bufs.iter().map(|b| AlignedBuf::zeroed(b.len())).collect();
            let mut reads: Vec<_> = extents
                .iter()
                .zip(back.iter_mut())
                .map(|(e, b)| (e, 0, &mut b[..]))
                .collect();
            assert!(tier.read_extents(&mut reads).iter().all(Result::is_ok));
            for (a, b) in bufs.iter().zip(&back) {
                assert_eq!(&a[..], &b[..], "{backend:?}");
            }
            // Unaligned access through the trait: read-modify-write.
            let mut e = extents.pop().unwrap();
            tier.write_at(&mut e, 100, b"hello").unwrap();
            let mut five = [0u8; 5];
            tier.read_at(&e, 100, &mut five).unwrap();
            assert_eq!(&five, b"hello");
            let mut around = [0u8; 2];
            tier.read_at(&e, 99, &mut around).unwrap();
            assert_eq!(around, [40, b'h'], "bytes around the write kept");
            assert_eq!(
                tier.io_backend_name(),
                if backend == IoBackendKind::Psync {
                    "psync"
                } else {
                    "io_uring"
                }
            );
        }
    }

    #[test]
    fn misaligned_direct_io_is_refused_not_attempted() {
        let dir = tempfile::tempdir().unwrap();
        let tier = tier(dir.path(), IoBackendKind::Auto);
        let mut e = tier.allocate(8192).unwrap();
        let small = AlignedBuf::zeroed(100);
        assert!(matches!(
            tier.write_extents(&mut [(&mut e, &small)])[0],
            Err(Error::Misaligned { what: "length" })
        ));
        let mut big = AlignedBuf::zeroed(8192 + 4096);
        assert!(matches!(
            tier.read_extents(&mut [(&e, 4096, &mut big[..8192])])[0],
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            tier.read_extents(&mut [(&e, 0, &mut big[1..4097])])[0],
            Err(Error::Misaligned {
                what: "buffer address"
            })
        ));
    }

    #[test]
    fn adopt_rebuilds_allocations_and_refuses_overlaps() {
        let dir = tempfile::tempdir().unwrap();
        let tier = tier(dir.path(), IoBackendKind::Auto);
        let a = tier.adopt(8192, 8192).unwrap();
        assert_eq!(tier.used_bytes(), 8192);
        assert!(tier.adopt(12288, 4096).is_err(), "overlap");
        assert!(tier.adopt(100, 4096).is_err(), "misaligned");
        assert!(tier.adopt(64 << 20, 4096).is_err(), "beyond capacity");
        let b = tier.allocate(8192).unwrap();
        assert_eq!(b.offset_bytes(), 0, "the hole before the adopted extent");
        tier.free(a);
        tier.free(b);
        assert_eq!(tier.used_bytes(), 0);
    }

    #[test]
    fn reopening_keeps_the_bytes_and_refuses_to_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let offset = {
            let tier = tier(dir.path(), IoBackendKind::Auto);
            let mut e = tier.allocate(4096).unwrap();
            let mut buf = AlignedBuf::zeroed(4096);
            buf.fill(7);
            tier.write_extents(&mut [(&mut e, &buf)]).remove(0).unwrap();
            tier.sync().unwrap();
            e.offset_bytes()
        };
        let tier = tier(dir.path(), IoBackendKind::Auto);
        let e = tier.adopt(offset, 4096).unwrap();
        let mut back = AlignedBuf::zeroed(4096);
        tier.read_extents(&mut [(&e, 0, &mut back[..])])
            .remove(0)
            .unwrap();
        assert!(back.iter().all(|&b| b == 7));
        let smaller = NvmeConfig {
            capacity_bytes: 4096,
            ..NvmeConfig::new(dir.path().join("data"))
        };
        assert!(matches!(
            NvmeTier::open(smaller),
            Err(Error::Config {
                field: "capacity_bytes",
                ..
            })
        ));
    }
}
