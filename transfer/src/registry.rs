//! Registered regions: who may read what.

use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use crate::memory::{ControlTable, MemorySource};
use crate::{Error, MAX_READ_BYTES, Result};

/// Most regions one registry holds at once. A node registers a handful (its DRAM region,
/// staging buffers); the limit bounds the control table shared with local readers.
pub const MAX_REGIONS: usize = 4096;

/// What a peer needs to read a region: its id, length and remote key. The key is random (64
/// bits from the kernel's generator), not derived from anything a peer can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHandle {
    /// Identifies the region; never reused for another registration.
    pub region_id: u64,
    /// Length in bytes.
    pub len: u64,
    /// Must accompany every read.
    pub remote_key: u64,
}

/// A region as the registry holds it; transports keep an `Arc` of it while they read, so the
/// memory outlives every read in flight even if the region is unregistered meanwhile.
pub(crate) struct Registered {
    pub(crate) handle: RegionHandle,
    pub(crate) memory: Arc<dyn MemorySource>,
}

/// Told when a region is unregistered, so that a transport that granted access to it outside
/// the registry (an RDMA registration with the device) withdraws that access before
/// [`Registry::unregister`] returns.
pub(crate) trait Revoke: Send + Sync {
    /// Withdraws every access granted to `region_id`.
    fn revoke(&self, region_id: u64);
}

/// Regions this process has registered. Thread-safe; share it with `Arc`.
pub struct Registry {
    slots: RwLock<Vec<Option<Arc<Registered>>>>,
    revokers: Mutex<Vec<Weak<dyn Revoke>>>,
    /// Epochs of the slots, readable by local peers (the shared-memory transport).
    pub(crate) control: ControlTable,
    next_epoch: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let registered = self.slots.read().iter().flatten().count();
        f.debug_struct("Registry")
            .field("registered", &registered)
            .finish()
    }
}

pub(crate) fn split(region_id: u64) -> (usize, u64) {
    ((region_id & 0xffff_ffff) as usize, region_id >> 32)
}

impl Registry {
    /// An empty registry.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if its control table cannot be created.
    pub fn new() -> Result<Self> {
        Ok(Self {
            slots: RwLock::new(vec![None; MAX_REGIONS]),
            revokers: Mutex::new(Vec::new()),
            control: ControlTable::new(MAX_REGIONS)?,
            next_epoch: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Registers memory for one-sided reads and returns its handle.
    ///
    /// # Errors
    ///
    /// [`Error::TooManyRegions`]; [`Error::Io`] if no random key can be drawn.
    pub fn register(&self, memory: Arc<dyn MemorySource>) -> Result<RegionHandle> {
        let mut key = [0u8; 8];
        rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty()).map_err(|e| {
            Error::Io {
                action: "draw a remote key",
                source: e.into(),
            }
        })?;
        let mut slots = self.slots.write();
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(Error::TooManyRegions { max: MAX_REGIONS })?;
        // Epochs never repeat, so a region id is never reused: a stale id is refused, not
        // mistaken for whatever took its slot.
        let epoch = self
            .next_epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            & 0xffff_ffff;
        let handle = RegionHandle {
            region_id: epoch << 32 | slot as u64,
            len: memory.len() as u64,
            remote_key: u64::from_le_bytes(key),
        };
        slots[slot] = Some(Arc::new(Registered { handle, memory }));
        self.control.store(slot, epoch);
        Ok(handle)
    }

    /// Unregisters a region; returns whether it was registered. Later reads fail with
    /// [`Error::UnknownRegion`]; reads in flight finish with the memory they started on, which
    /// stays alive until they do.
    pub fn unregister(&self, region_id: u64) -> bool {
        let (slot, epoch) = split(region_id);
        let mut slots = self.slots.write();
        let Some(entry) = slots.get_mut(slot) else {
            return false;
        };
        if entry
            .as_ref()
            .is_none_or(|r| r.handle.region_id != region_id)
        {
            return false;
        }
        *entry = None;
        debug_assert_eq!(self.control.load(slot), epoch);
        self.control.store(slot, 0);
        drop(slots);
        // After the slot is cleared: a transport that grants access checks the registry after
        // recording its grant, so every grant is either seen here or refused there.
        let mut revokers = self.revokers.lock();
        revokers.retain(|r| {
            r.upgrade().is_some_and(|r| {
                r.revoke(region_id);
                true
            })
        });
        true
    }

    /// Asks to be told of every later unregistration (see [`Revoke`]). Held weakly: a
    /// revoker that is dropped is forgotten.
    #[cfg_attr(
        all(not(feature = "rdma"), not(test)),
        expect(
            dead_code,
            reason = "only the RDMA transport grants access outside the registry"
        )
    )]
    pub(crate) fn add_revoker(&self, revoker: Weak<dyn Revoke>) {
        self.revokers.lock().push(revoker);
    }

    /// Checks a read against a region: key, bounds, size. What every transport's owner side
    /// does before serving a byte.
    pub(crate) fn check(
        &self,
        region_id: u64,
        remote_key: u64,
        offset: u64,
        len: u64,
    ) -> Result<Arc<Registered>> {
        let region = self.lookup(region_id, remote_key)?;
        if len > MAX_READ_BYTES {
            return Err(Error::TooLarge {
                len,
                max: MAX_READ_BYTES,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > region.handle.len)
        {
            return Err(Error::OutOfBounds {
                region_id,
                offset,
                len,
            });
        }
        Ok(region)
    }

    /// The region, if `remote_key` is its key.
    pub(crate) fn lookup(&self, region_id: u64, remote_key: u64) -> Result<Arc<Registered>> {
        let (slot, _) = split(region_id);
        let region = self
            .slots
            .read()
            .get(slot)
            .and_then(Option::as_ref)
            .filter(|r| r.handle.region_id == region_id)
            .cloned()
            .ok_or(Error::UnknownRegion { region_id })?;
        if region.handle.remote_key != remote_key {
            return Err(Error::BadRemoteKey { region_id });
        }
        Ok(region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemfdRegion;

    #[test]
    fn keys_ids_and_bounds_are_enforced() {
        let registry = Registry::new().unwrap();
        let a = registry
            .register(Arc::new(MemfdRegion::new(4096).unwrap()))
            .unwrap();
        let b = registry
            .register(Arc::new(MemfdRegion::new(4096).unwrap()))
            .unwrap();
        assert_ne!(a.remote_key, b.remote_key);
        assert_ne!(a.region_id, b.region_id);
        assert!(registry.check(a.region_id, a.remote_key, 0, 4096).is_ok());
        assert!(matches!(
            registry.check(a.region_id, b.remote_key, 0, 1),
            Err(Error::BadRemoteKey { .. })
        ));
        assert!(matches!(
            registry.check(a.region_id, a.remote_key, 4000, 97),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            registry.check(a.region_id, a.remote_key, u64::MAX, 2),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(registry.unregister(a.region_id));
        assert!(!registry.unregister(a.region_id));
        assert!(matches!(
            registry.check(a.region_id, a.remote_key, 0, 1),
            Err(Error::UnknownRegion { .. })
        ));
        // The slot is reused under a new id; the old id stays dead.
        let c = registry
            .register(Arc::new(MemfdRegion::new(4096).unwrap()))
            .unwrap();
        assert_eq!(split(c.region_id).0, split(a.region_id).0);
        assert!(matches!(
            registry.check(a.region_id, a.remote_key, 0, 1),
            Err(Error::UnknownRegion { .. })
        ));
        assert!(matches!(
            registry.check(a.region_id, c.remote_key, 0, 1),
            Err(Error::UnknownRegion { .. })
        ));
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<u64>>);

    impl Revoke for Recorder {
        fn revoke(&self, region_id: u64) {
            self.0.lock().push(region_id);
        }
    }

    #[test]
    fn unregistering_tells_every_live_revoker_once() {
        let registry = Registry::new().unwrap();
        let recorder = Arc::new(Recorder::default());
        let as_revoker: Arc<dyn Revoke> = recorder.clone();
        registry.add_revoker(Arc::downgrade(&as_revoker));
        let a = registry
            .register(Arc::new(MemfdRegion::new(4096).unwrap()))
            .unwrap();
        assert!(registry.unregister(a.region_id));
        assert!(
            !registry.unregister(a.region_id),
            "a second unregister is a no-op"
        );
        assert_eq!(*recorder.0.lock(), vec![a.region_id]);
        // A dropped revoker is forgotten, not called.
        drop(as_revoker);
        drop(recorder);
        let b = registry
            .register(Arc::new(MemfdRegion::new(4096).unwrap()))
            .unwrap();
        assert!(registry.unregister(b.region_id));
        assert!(registry.revokers.lock().is_empty());
    }
}
