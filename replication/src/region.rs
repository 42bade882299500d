//! The engine's DRAM tier as registered memory for the transfer crate.
#![expect(
    unsafe_code,
    reason = "implements the transfer crate's unsafe MemorySource contract for the DRAM tier"
)]

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use mooncake_kv_engine::DramTier;
use mooncake_kv_engine::Engine;
use mooncake_kv_transfer::MemorySource;

/// The DRAM region of an engine. Holds the tier by `Arc`, so the mapping outlives every read
/// the transfer crate has in flight, even after the engine itself is closed.
pub(crate) struct DramRegion(Arc<DramTier>);

impl DramRegion {
    pub(crate) fn of(engine: &Engine) -> Self {
        Self(engine.dram_shared())
    }
}

// SAFETY: `DramTier` maps its region once at open and unmaps it only on drop; this value holds
// an `Arc` of the tier, so `base_addr()..base_addr() + region_len_bytes()` stays mapped at the
// same address while it lives. The memfd is the region's backing file, mapped from offset 0.
unsafe impl MemorySource for DramRegion {
    fn as_ptr(&self) -> *const u8 {
        self.0.base_addr() as *const u8
    }

    fn len(&self) -> usize {
        usize::try_from(self.0.region_len_bytes()).unwrap_or(0)
    }

    fn memfd(&self) -> Option<(BorrowedFd<'_>, u64)> {
        Some((self.0.memfd(), 0))
    }
}
