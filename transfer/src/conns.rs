//! The connections a server has open: bounded in number, and closed when the server drops.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use parking_lot::Mutex;

/// Most connections one server serves at once; each has a thread. Beyond it, new
/// connections are closed at once (the reader sees a reset and may retry).
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// A duplicate of each open connection's socket, by id.
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    inner: Mutex<(u64, HashMap<u64, OwnedFd>)>,
}

impl OpenConnections {
    /// Records a connection; `None` when the server is at its limit.
    pub(crate) fn admit(&self, socket: OwnedFd) -> Option<u64> {
        let mut inner = self.inner.lock();
        if inner.1.len() >= MAX_CONNECTIONS {
            return None;
        }
        inner.0 += 1;
        let id = inner.0;
        inner.1.insert(id, socket);
        Some(id)
    }

    /// Forgets a connection whose thread has finished.
    pub(crate) fn close(&self, id: u64) {
        self.inner.lock().1.remove(&id);
    }

    /// Shuts every open connection down, waking the threads blocked reading them.
    pub(crate) fn shutdown_all(&self) {
        for (_, socket) in self.inner.lock().1.drain() {
            let _ = rustix::net::shutdown(&socket, rustix::net::Shutdown::Both);
        }
    }
}
