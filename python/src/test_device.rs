//! `_HostTestDevice` (feature `host-test-device`, for the package's own tests; no released
//! wheel has it): the engine's host memory posing as a GPU, so that an embedded store's HBM
//! tier and `get_into_device` run from Python where there is no GPU. Its "device addresses"
//! are host addresses of its own allocations, and every copy is bounds-checked against them:
//! an address outside is an error, where a GPU would fault.

#![expect(unsafe_code, reason = "copies out of the test device's memory")]

use std::sync::Arc;

use mooncake_kv_engine::{DeviceMemory, Engine, EngineConfig, HbmSettings, HostTestDevice, ToHost};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::backend::Backend;
use crate::errors::StoreError;
use crate::store::{EmbeddedStore, Store};

/// A tier's error, as the store's exceptions say it.
fn tier_error(error: mooncake_kv_engine::TierError) -> StoreError {
    StoreError::from(mooncake_kv_engine::Error::from(error))
}

/// Host memory posing as a GPU, for tests only: `_HostTestDevice(capacity_bytes)`.
#[pyclass(frozen, name = "_HostTestDevice", module = "mooncake_kv._native")]
pub(crate) struct PyHostTestDevice {
    device: Arc<HostTestDevice>,
}

#[pymethods]
impl PyHostTestDevice {
    #[new]
    fn new(capacity_bytes: u64) -> Self {
        Self {
            device: Arc::new(HostTestDevice::new(capacity_bytes)),
        }
    }

    /// `size` bytes of "device memory" (zeroed); their address. Freed with the device.
    fn allocate(&self, size: u64) -> PyResult<u64> {
        let range = self.device.allocate(size).map_err(tier_error)?;
        Ok(range.ptr)
    }

    /// The `size` bytes at `ptr`, which must lie in one allocation (else an error).
    fn read<'py>(&self, py: Python<'py>, ptr: u64, size: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut bytes = vec![0u8; size];
        let mut copies = [ToHost {
            source: ptr,
            target: &mut bytes,
        }];
        // SAFETY: the test device checks the source range against its own allocations and
        // refuses one outside them; the target is this function's own buffer. Nothing else
        // writes the test device's memory during the call but reads of the store, which the
        // caller (a test) does not run at the same time.
        unsafe { self.device.copy_to_host(&mut copies) }.map_err(tier_error)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// An embedded store of `dram_bytes` whose HBM tier (`hbm_bytes`) lives on this device.
    fn embedded_store(
        &self,
        py: Python<'_>,
        dram_bytes: u64,
        hbm_bytes: u64,
    ) -> PyResult<Py<EmbeddedStore>> {
        let config = EngineConfig {
            dram_capacity_bytes: dram_bytes,
            hbm: Some(HbmSettings {
                capacity_bytes: hbm_bytes,
                ..Default::default()
            }),
            ..Default::default()
        };
        let device: Arc<dyn DeviceMemory> = self.device.clone();
        let engine = py
            .detach(|| Engine::open_with_device(config, device))
            .map_err(StoreError::from)?;
        let store = Store::new(
            Backend::Embedded(engine),
            "in process, host test device".into(),
        );
        Py::new(
            py,
            PyClassInitializer::from(store).add_subclass(EmbeddedStore),
        )
    }
}
