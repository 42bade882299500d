//! The DRAM tier: one memfd-backed region carved by the best-fit extent allocator.

use crate::allocator::Carver;
use crate::mmap::Region;
use crate::{
    Error, Extent, HugePageMode, HugePages, Result, Tier, TierKind, TierUsage, range_within,
};
use std::os::fd::BorrowedFd;

/// Configuration of a [`DramTier`]. Validated once by [`DramTier::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DramConfig {
    /// Size of the region. Default: 1 GiB. Must be a positive multiple of
    /// `allocation_unit_bytes`.
    pub capacity_bytes: u64,
    /// Granularity of allocation. Default: 512 bytes, which keeps the waste per block under
    /// 0.5 KiB and keeps extents aligned for direct I/O on 512-byte-sector devices. A power of
    /// two from 64 bytes to 2 MiB.
    pub allocation_unit_bytes: u64,
    /// Huge pages. Default: [`HugePages::Auto`].
    pub huge_pages: HugePages,
    /// Fault in all of the region at open (`MAP_POPULATE`), so that first writes do not take
    /// page faults. Default: false (opening is then instant and memory is used as it fills).
    pub populate: bool,
}

impl Default for DramConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 1 << 30,
            allocation_unit_bytes: 512,
            huge_pages: HugePages::Auto,
            populate: false,
        }
    }
}

impl DramConfig {
    fn validate(&self) -> Result<()> {
        let unit = self.allocation_unit_bytes;
        if !unit.is_power_of_two() || !(64..=(2 << 20)).contains(&unit) {
            return Err(Error::Config {
                field: "allocation_unit_bytes",
                reason: format!("{unit} is not a power of two from 64 bytes to 2 MiB"),
            });
        }
        if self.capacity_bytes == 0 || self.capacity_bytes % unit != 0 {
            return Err(Error::Config {
                field: "capacity_bytes",
                reason: format!(
                    "{} is not a positive multiple of the allocation unit ({unit} bytes)",
                    self.capacity_bytes
                ),
            });
        }
        Ok(())
    }
}

/// Host memory: one region, shared-mappable through its memfd.
#[derive(Debug)]
pub struct DramTier {
    region: Region,
    carver: Carver,
}

impl DramTier {
    /// Creates and maps the region.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid config; [`Error::Io`] if the memfd cannot be created or
    /// mapped (for instance, more than the system's memory with `populate`).
    pub fn open(config: DramConfig) -> Result<Self> {
        config.validate()?;
        let region = Region::create(
            "mooncake-dram",
            config.capacity_bytes,
            config.huge_pages,
            config.populate,
        )?;
        tracing::info!(
            capacity_bytes = config.capacity_bytes,
            huge_pages = ?region.huge_page_mode(),
            "DRAM tier mapped"
        );
        Ok(Self {
            carver: Carver::new(
                region.id(),
                config.capacity_bytes,
                config.allocation_unit_bytes,
            ),
            region,
        })
    }

    /// The address where the region is mapped in this process, for registration with a
    /// transfer engine. Valid as long as the tier lives.
    pub fn base_addr(&self) -> usize {
        self.region.base_addr()
    }

    /// Length of the region in bytes.
    pub fn region_len_bytes(&self) -> u64 {
        self.region.len_bytes()
    }

    /// The memfd behind the region, so another local process can map it (read-only).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.region.memfd()
    }

    /// What kind of pages the region got.
    pub fn huge_page_mode(&self) -> HugePageMode {
        self.region.huge_page_mode()
    }

    /// The bytes of an extent, in place: no copy.
    ///
    /// # Panics
    ///
    /// If the extent came from another tier.
    pub fn bytes<'a>(&'a self, extent: &'a Extent) -> &'a [u8] {
        self.region.bytes(extent)
    }

    /// The bytes of an extent, in place and writable: encode straight into the tier.
    ///
    /// # Panics
    ///
    /// If the extent came from another tier.
    pub fn bytes_mut<'a>(&'a self, extent: &'a mut Extent) -> &'a mut [u8] {
        self.region.bytes_mut(extent)
    }
}

/// Bytes zeroed at the start of every freed extent: a block header's length.
const FREED_ZEROED_BYTES: usize = 64;

impl Tier for DramTier {
    fn kind(&self) -> TierKind {
        TierKind::Dram
    }

    fn capacity_bytes(&self) -> u64 {
        self.region.len_bytes()
    }

    fn used_bytes(&self) -> u64 {
        self.carver.used_bytes()
    }

    fn allocation_unit_bytes(&self) -> u64 {
        self.carver.unit_bytes()
    }

    fn usage(&self) -> TierUsage {
        self.carver.usage()
    }

    fn allocate(&self, len_bytes: u64) -> Result<Extent> {
        self.carver.allocate(len_bytes)
    }

    fn free(&self, mut extent: Extent) {
        // Another process may hold the descriptor of a block that lay here and read the region
        // one-sidedly, checking the block's header after its copy instead of a payload
        // checksum (docs/format.md, "Reading a block in place"). Zeroing where that
        // header lies before the space can be handed out again means any byte a new owner
        // writes here comes after the header stopped matching: the carver's lock orders this
        // store before the next allocation of these bytes.
        let len = usize::try_from(extent.len_bytes())
            .map_or(FREED_ZEROED_BYTES, |len| len.min(FREED_ZEROED_BYTES));
        self.region.bytes_mut(&mut extent)[..len].fill(0);
        self.carver.free(extent);
    }

    fn write_at(&self, extent: &mut Extent, offset_bytes: u64, source: &[u8]) -> Result<()> {
        let range = range_within(extent, offset_bytes, source.len())?;
        self.region.bytes_mut(extent)[range].copy_from_slice(source);
        Ok(())
    }

    fn read_at(&self, extent: &Extent, offset_bytes: u64, target: &mut [u8]) -> Result<()> {
        let range = range_within(extent, offset_bytes, target.len())?;
        target.copy_from_slice(&self.region.bytes(extent)[range]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DramTier {
        DramTier::open(DramConfig {
            capacity_bytes: 1 << 20,
            ..DramConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn rejects_bad_config() {
        for config in [
            DramConfig {
                capacity_bytes: 0,
                ..DramConfig::default()
            },
            DramConfig {
                capacity_bytes: 1000,
                ..DramConfig::default()
            },
            DramConfig {
                allocation_unit_bytes: 100,
                ..DramConfig::default()
            },
            DramConfig {
                allocation_unit_bytes: 32,
                ..DramConfig::default()
            },
        ] {
            assert!(matches!(DramTier::open(config), Err(Error::Config { .. })));
        }
    }

    #[test]
    fn extents_are_disjoint_and_hold_their_bytes() {
        let tier = small();
        let mut a = tier.allocate(1000).unwrap();
        let mut b = tier.allocate(1000).unwrap();
        assert_eq!(a.len_bytes(), 1024, "rounded up to the 512-byte unit");
        tier.bytes_mut(&mut a).fill(0xaa);
        tier.bytes_mut(&mut b).fill(0xbb);
        assert!(tier.bytes(&a).iter().all(|&x| x == 0xaa));
        assert!(tier.bytes(&b).iter().all(|&x| x == 0xbb));
        assert_eq!(tier.used_bytes(), 2048);
        tier.free(a);
        tier.free(b);
        assert_eq!(tier.used_bytes(), 0);
    }

    #[test]
    fn a_freed_extent_has_its_header_place_zeroed_before_reuse() {
        let tier = small();
        let mut e = tier.allocate(4096).unwrap();
        tier.write_at(&mut e, 0, &[0xab; 4096]).unwrap();
        let offset = e.offset_bytes();
        tier.free(e);
        // The whole tier is free again: this extent starts where the freed one did.
        let again = tier.allocate(4096).unwrap();
        assert_eq!(again.offset_bytes(), offset);
        let bytes = tier.bytes(&again);
        assert!(bytes[..FREED_ZEROED_BYTES].iter().all(|&b| b == 0));
        // Only the header's place: the rest is left as it was.
        assert!(bytes[FREED_ZEROED_BYTES..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn out_of_bounds_access_is_an_error() {
        let tier = small();
        let mut e = tier.allocate(512).unwrap();
        assert!(matches!(
            tier.write_at(&mut e, 500, &[0; 13]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            tier.read_at(&e, u64::MAX, &mut [0; 1]),
            Err(Error::OutOfBounds { .. })
        ));
        tier.free(e);
    }

    #[test]
    fn full_tier_reports_out_of_space() {
        let tier = small();
        let whole = tier.allocate(1 << 20).unwrap();
        match tier.allocate(1) {
            Err(Error::OutOfSpace { free_bytes: 0, .. }) => {}
            other => panic!("expected OutOfSpace, got {other:?}"),
        }
        tier.free(whole);
    }

    #[test]
    #[should_panic(expected = "another")]
    fn extent_of_another_tier_is_refused() {
        let (one, two) = (small(), small());
        let e = one.allocate(512).unwrap();
        two.free(e);
    }

    #[test]
    fn region_is_shareable_and_reports_its_pages() {
        let tier = small();
        assert_ne!(tier.base_addr(), 0);
        assert_eq!(tier.region_len_bytes(), 1 << 20);
        // The memfd is the region: its size is the region's.
        let len = rustix::fs::fstat(tier.memfd()).unwrap().st_size;
        assert_eq!(len, 1 << 20);
        let off = DramTier::open(DramConfig {
            capacity_bytes: 1 << 20,
            huge_pages: HugePages::Off,
            ..DramConfig::default()
        })
        .unwrap();
        assert_eq!(off.huge_page_mode(), HugePageMode::None);
    }
}
