//! The connections a server has open: bounded in number, and closed when the server drops.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::{Error, Result};

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

/// Reads one fixed-size frame into `frame`. `Ok(false)` when the peer closed the connection
/// before the frame began (a clean end); a close in the middle of a frame is an error.
pub(crate) fn read_frame_or_end(
    reader: &mut impl std::io::Read,
    frame: &mut [u8],
    action: &'static str,
) -> Result<bool> {
    match reader.read_exact(frame) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(Error::Io { action, source }),
    }
}

/// A TCP listener with a thread that accepts connections and serves each on a thread of its
/// own. Dropping it stops accepting, shuts every open connection down and joins the acceptor.
pub(crate) struct Acceptor {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<OpenConnections>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Accepts on `listener`; `serve` runs once per connection (`what` names the threads and
    /// the log lines).
    pub(crate) fn spawn<F>(listener: TcpListener, what: &'static str, serve: F) -> Result<Self>
    where
        F: Fn(TcpStream) -> Result<()> + Send + Sync + 'static,
    {
        let local_addr = listener
            .local_addr()
            .map_err(Error::io("read the bound address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(OpenConnections::default());
        let thread = {
            let (stop, connections) = (Arc::clone(&stop), Arc::clone(&connections));
            let serve = Arc::new(serve);
            std::thread::Builder::new()
                .name(format!("mooncake-{what}-accept"))
                .spawn(move || accept_loop(&listener, what, &stop, &connections, &serve))
                .map_err(Error::io("start an acceptor thread"))?
        };
        Ok(Self {
            local_addr,
            stop,
            connections,
            thread: Some(thread),
        })
    }

    /// Where the listener listens.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the acceptor with a connection of our own, then close every connection.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        self.connections.shutdown_all();
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
    }
}

fn accept_loop<F>(
    listener: &TcpListener,
    what: &'static str,
    stop: &AtomicBool,
    connections: &Arc<OpenConnections>,
    serve: &Arc<F>,
) where
    F: Fn(TcpStream) -> Result<()> + Send + Sync + 'static,
{
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let Some(id) = stream
            .try_clone()
            .ok()
            .and_then(|clone| connections.admit(OwnedFd::from(clone)))
        else {
            tracing::warn!(what, "too many connections; refusing one");
            continue;
        };
        let (serve, connections) = (Arc::clone(serve), Arc::clone(connections));
        let spawned = std::thread::Builder::new()
            .name(format!("mooncake-{what}-serve"))
            .spawn(move || {
                if let Err(error) = serve(stream) {
                    tracing::debug!(what, %error, "connection closed");
                }
                connections.close(id);
            });
        if let Err(error) = spawned {
            tracing::warn!(what, %error, "cannot start a thread for a connection; dropping it");
        }
    }
}
