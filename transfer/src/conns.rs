//! The connections a server has open: bounded in number, closed when quiet for long, and
//! closed when the server drops, their threads joined.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
#[cfg(feature = "rdma")]
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::AtomicBool,
};

use parking_lot::Mutex;

#[cfg(feature = "rdma")]
use crate::{Error, Result};

/// Most connections one server serves at once. Beyond it, the tcp servers close the
/// connection that has been quiet longest to make room (its reader reconnects when it next
/// reads); the shared-memory server closes the new one.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// How long a tcp server keeps a connection that sends nothing.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// When a connection last received a request, on the coarse clock.
#[derive(Debug, Default)]
pub(crate) struct Activity(AtomicU64);

impl Activity {
    fn now() -> Self {
        Self(AtomicU64::new(crate::coarse_clock_ns()))
    }

    /// Notes a request.
    pub(crate) fn touch(&self) {
        self.0.store(crate::coarse_clock_ns(), Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Open {
    socket: OwnedFd,
    activity: Arc<Activity>,
}

/// A duplicate of each open connection's socket, by id, and the threads serving them.
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    inner: Mutex<(u64, HashMap<u64, Open>)>,
    /// One per connection served on a thread of its own; ended ones are let go at each spawn.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What to do with a new connection when the server is at its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtLimit {
    /// Close it.
    Refuse,
    /// Close the connection that has been quiet longest instead.
    CloseQuietest,
}

impl OpenConnections {
    /// Records a connection, with what it last did; `None` when the server is at its limit
    /// and refuses new ones.
    pub(crate) fn admit(&self, socket: OwnedFd, at_limit: AtLimit) -> Option<(u64, Arc<Activity>)> {
        let mut inner = self.inner.lock();
        if inner.1.len() >= MAX_CONNECTIONS {
            if at_limit == AtLimit::Refuse {
                return None;
            }
            let quietest = inner
                .1
                .iter()
                .min_by_key(|(_, open)| open.activity.0.load(Ordering::Relaxed))
                .map(|(&id, _)| id);
            if let Some(open) = quietest.and_then(|id| inner.1.remove(&id)) {
                // Its thread sees the end of the stream and finishes.
                let _ = rustix::net::shutdown(&open.socket, rustix::net::Shutdown::Both);
            }
        }
        inner.0 += 1;
        let id = inner.0;
        let activity = Arc::new(Activity::now());
        inner.1.insert(
            id,
            Open {
                socket,
                activity: Arc::clone(&activity),
            },
        );
        Some((id, activity))
    }

    /// Forgets a connection whose thread has finished.
    pub(crate) fn close(&self, id: u64) {
        self.inner.lock().1.remove(&id);
    }

    /// Shuts every open connection down, waking the threads blocked reading or writing them.
    pub(crate) fn shutdown_all(&self) {
        for (_, open) in self.inner.lock().1.drain() {
            let _ = rustix::net::shutdown(&open.socket, rustix::net::Shutdown::Both);
        }
    }

    /// Serves the admitted connection `id` on a thread of its own named `name`, which
    /// forgets the connection when `serve` returns. If no thread can be started the
    /// connection is forgotten at once (its place is not lost) and the error returned.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        id: u64,
        name: String,
        serve: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let connections = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            serve();
            connections.close(id);
        });
        match spawned {
            Ok(handle) => {
                let mut threads = self.threads.lock();
                threads.retain(|thread| !thread.is_finished());
                threads.push(handle);
                Ok(())
            }
            Err(error) => {
                self.close(id);
                Err(error)
            }
        }
    }

    /// Shuts every open connection down and waits for the threads serving them to end.
    /// Called once nothing admits connections any more (the acceptor joined), so that no
    /// connection is admitted after the shutdown and waits for input forever.
    pub(crate) fn close_all_and_join(&self) {
        self.shutdown_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[cfg(feature = "rdma")]
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

#[cfg(feature = "rdma")]
/// A TCP listener with a thread that accepts connections and serves each on a thread of its
/// own (the RDMA transport's grant requests, few and short-lived): a connection quiet for [`IDLE_TIMEOUT`] ends (its reads time out), and at
/// [`MAX_CONNECTIONS`] the quietest makes room for a new one, so quiet connections never lock
/// readers out. Dropping it stops accepting, shuts every open connection down and joins the
/// acceptor and every connection's thread.
pub(crate) struct Acceptor {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<OpenConnections>,
    thread: Option<JoinHandle<()>>,
}

#[cfg(feature = "rdma")]
impl Acceptor {
    /// Accepts on `listener`; `serve` runs once per connection, and touches its [`Activity`]
    /// at each request (`what` names the threads and the log lines).
    pub(crate) fn spawn<F>(listener: TcpListener, what: &'static str, serve: F) -> Result<Self>
    where
        F: Fn(TcpStream, &Activity) -> Result<()> + Send + Sync + 'static,
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

#[cfg(feature = "rdma")]
impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the acceptor with a connection of our own; once it has ended, close every
        // connection and wait for their threads.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
        self.connections.close_all_and_join();
    }
}

#[cfg(feature = "rdma")]
fn accept_loop<F>(
    listener: &TcpListener,
    what: &'static str,
    stop: &AtomicBool,
    connections: &Arc<OpenConnections>,
    serve: &Arc<F>,
) where
    F: Fn(TcpStream, &Activity) -> Result<()> + Send + Sync + 'static,
{
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors or memory: let some connections end first.
                tracing::debug!(what, %error, "cannot accept a connection");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
        let Some((id, activity)) = stream
            .try_clone()
            .ok()
            .and_then(|clone| connections.admit(OwnedFd::from(clone), AtLimit::CloseQuietest))
        else {
            continue;
        };
        let serve = Arc::clone(serve);
        let spawned = connections.spawn(id, format!("mooncake-{what}-serve"), move || {
            if let Err(error) = serve(stream, &activity) {
                tracing::debug!(what, %error, "connection closed");
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(what, %error, "cannot start a thread for a connection; dropping it");
        }
    }
}
