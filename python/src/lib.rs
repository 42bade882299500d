//! `mooncake_kv._native`: the native half of the `mooncake_kv` Python package.
//!
//! - `store`: the Pythonic API (`Store`; `Client`, `Cluster`, `EmbeddedStore` make one).
//! - `compat`: what Mooncake Store's compatible class (pure Python, in
//!   `mooncake_kv/mooncake.py`) needs natively: the pointer API and numeric codes.
//! - `buffer`: Python buffers and registered ranges, without copies.
//! - `errors`: the exception hierarchy and Mooncake's codes.
//! - `backend`: a node's client, a cluster's, or the engine in process, behind one set of
//!   operations.
//! - `test_device` (feature `host-test-device`, the package's tests only): host memory
//!   posing as a GPU, for the HBM tier and `get_into_device` where there is no GPU.

mod backend;
mod buffer;
mod compat;
mod errors;
mod store;
#[cfg(feature = "host-test-device")]
mod test_device;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::Store>()?;
    m.add_class::<store::NodeClient>()?;
    m.add_class::<store::Cluster>()?;
    m.add_class::<store::EmbeddedStore>()?;
    #[cfg(feature = "host-test-device")]
    m.add_class::<test_device::PyHostTestDevice>()?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(compat::_register, m)?)?;
    m.add_function(wrap_pyfunction!(compat::_unregister, m)?)?;
    m.add_function(wrap_pyfunction!(compat::_put_from, m)?)?;
    m.add_function(wrap_pyfunction!(compat::_get_into, m)?)?;
    m.add_function(wrap_pyfunction!(compat::_put_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(compat::_exists, m)?)?;
    m.add("MAX_KEY_BYTES", mooncake_kv_format::MAX_KEY_BYTES)?;
    m.add("MAX_VALUE_BYTES", mooncake_kv_format::MAX_VALUE_BYTES)?;
    m.add("EMBEDDED", cfg!(feature = "embedded"))?;
    m.add("ETCD", cfg!(feature = "etcd"))?;
    Ok(())
}
