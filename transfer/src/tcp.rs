//! The tcp transport: one-sided reads emulated over TCP. The owner runs a data-plane listener
//! whose event loops serve each read straight from registered memory (header, then the bytes
//! handed from the region to the kernel: no engine code, no intermediate copy); the reader
//! pipelines requests over several connections and receives each payload straight into its
//! buffer.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::registry::Registry;
use crate::tcp_server::LoopServer;
use crate::wire::{FrameError, RESPONSE_BYTES, ReadRequest, ReadResponse, Status};
use crate::{Error, ReadOp, RemoteSlice, Result, Transport};

/// Requests in flight per connection before the reader waits for a response.
const PIPELINE_DEPTH: usize = 16;

/// The owner's data-plane listener, served by event loops (see `tcp_server`): no thread per
/// connection. Dropping it stops accepting, closes every connection and joins its threads.
pub struct TcpServer {
    server: LoopServer,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer")
            .field("local_addr", &self.local_addr())
            .finish()
    }
}

impl TcpServer {
    /// Listens on `addr` (port 0 picks a free port) and serves reads of `registry`'s regions.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the address cannot be bound or the server's threads cannot start.
    pub fn bind(addr: impl ToSocketAddrs, registry: Arc<Registry>) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(Error::io("bind the tcp data plane"))?;
        Ok(Self {
            server: LoopServer::spawn(listener, registry)?,
        })
    }

    /// Where the server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

/// The reader's side: a pool of connections to one owner.
pub struct TcpTransport {
    addr: SocketAddr,
    connections: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
    next_request: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("addr", &self.addr)
            .field("connections", &self.connections.len())
            .finish()
    }
}

struct Connection {
    stream: TcpStream,
}

impl TcpTransport {
    /// A transport to the owner at `addr` with up to `connections` connections (at least one),
    /// opened as needed; `timeout` bounds every socket operation.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if `addr` does not resolve.
    pub fn new(addr: impl ToSocketAddrs, connections: usize, timeout: Duration) -> Result<Self> {
        let addr = addr
            .to_socket_addrs()
            .map_err(Error::io("resolve the owner's address"))?
            .next()
            .ok_or_else(|| Error::Io {
                action: "resolve the owner's address",
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        Ok(Self {
            addr,
            connections: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            next_request: AtomicU64::new(1),
            timeout,
        })
    }

    fn connect(&self) -> Result<Connection> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)
            .map_err(Error::io("connect to the owner"))?;
        stream
            .set_nodelay(true)
            .map_err(Error::io("set TCP_NODELAY"))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(Error::io("set a read timeout"))?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(Error::io("set a write timeout"))?;
        Ok(Connection { stream })
    }

    /// Runs `ops` on connection `index`, pipelined. A transport error poisons the connection
    /// (it is dropped and reopened next time) and fails the reads not yet answered. A kept
    /// connection that fails before its first answer is opened again once and the reads
    /// retried: the owner closes connections that stay quiet (or makes room with them), and
    /// a read has no effect to repeat.
    fn run_on(&self, index: usize, ops: &mut [ReadOp<'_>]) -> Vec<Result<()>> {
        let mut slot = self.connections[index].lock();
        let mut kept = slot.take();
        loop {
            let reused = kept.is_some();
            let connection = match kept.take() {
                Some(c) => c,
                None => match self.connect() {
                    Ok(c) => c,
                    Err(error) => return fail_all(ops.len(), error, "connect to the owner"),
                },
            };
            let mut results: Vec<Result<()>> = Vec::with_capacity(ops.len());
            match self.pipeline(&connection, ops, &mut results) {
                Ok(()) => *slot = Some(connection),
                Err(Error::Io { .. }) if reused && results.is_empty() => {
                    let _ = connection.stream.shutdown(Shutdown::Both);
                    continue;
                }
                Err(error) => {
                    let _ = connection.stream.shutdown(Shutdown::Both);
                    let rest = fail_all(ops.len() - results.len(), error, "read from the owner");
                    results.extend(rest);
                }
            }
            return results;
        }
    }

    fn pipeline(
        &self,
        connection: &Connection,
        ops: &mut [ReadOp<'_>],
        results: &mut Vec<Result<()>>,
    ) -> Result<()> {
        let mut stream = &connection.stream;
        let first_id = self
            .next_request
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        let mut sent = 0;
        while results.len() < ops.len() {
            // Keep up to PIPELINE_DEPTH requests outstanding; requests are small, so the
            // owner's responses can never block on a request we have not read.
            let mut batch = Vec::new();
            while sent < ops.len() && sent - results.len() < PIPELINE_DEPTH {
                let op = &ops[sent];
                let len = u32::try_from(op.dst.len()).unwrap_or(u32::MAX);
                batch.extend_from_slice(
                    &ReadRequest {
                        request_id: first_id + sent as u64,
                        region_id: op.src.region_id,
                        offset: op.src.offset,
                        remote_key: op.src.remote_key,
                        len,
                    }
                    .encode(),
                );
                sent += 1;
            }
            if !batch.is_empty() {
                stream
                    .write_all(&batch)
                    .map_err(Error::io("send requests"))?;
            }
            let index = results.len();
            let mut header = [0u8; RESPONSE_BYTES];
            stream
                .read_exact(&mut header)
                .map_err(Error::io("read a response"))?;
            let response = ReadResponse::decode(&header)?;
            let expected = first_id + index as u64;
            if response.request_id != expected {
                return Err(FrameError::OutOfOrder {
                    expected,
                    found: response.request_id,
                }
                .into());
            }
            let op = &mut ops[index];
            let (src, len) = (op.src, op.dst.len() as u64);
            results.push(match response.status {
                Status::Ok => {
                    if response.len as usize != op.dst.len() {
                        return Err(FrameError::BadField {
                            field: "len",
                            value: response.len.into(),
                        }
                        .into());
                    }
                    // Straight into the caller's buffer.
                    stream
                        .read_exact(op.dst)
                        .map_err(Error::io("read region bytes"))?;
                    Ok(())
                }
                Status::BadRemoteKey => Err(Error::BadRemoteKey {
                    region_id: src.region_id,
                }),
                Status::OutOfBounds => Err(Error::OutOfBounds {
                    region_id: src.region_id,
                    offset: src.offset,
                    len,
                }),
                Status::UnknownRegion => Err(Error::UnknownRegion {
                    region_id: src.region_id,
                }),
                Status::TooLarge => Err(Error::TooLarge {
                    len,
                    max: crate::MAX_READ_BYTES,
                }),
                other => Err(Error::UnexpectedStatus(other)),
            });
        }
        Ok(())
    }
}

/// `n` failures: `error` for the first, a plain one naming `action` for the others.
fn fail_all(n: usize, error: Error, action: &'static str) -> Vec<Result<()>> {
    let mut error = Some(error);
    (0..n)
        .map(|_| {
            Err(error.take().unwrap_or_else(|| Error::Io {
                action,
                source: std::io::ErrorKind::ConnectionAborted.into(),
            }))
        })
        .collect()
}

impl Transport for TcpTransport {
    fn read(&self, src: RemoteSlice, dst: &mut [u8]) -> Result<()> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let mut ops = [ReadOp { src, dst }];
        self.run_on(index, &mut ops).remove(0)
    }

    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<()>> {
        crate::spread_batch(
            ops,
            self.connections.len(),
            PIPELINE_DEPTH,
            &self.next,
            |i, chunk| self.run_on(i, chunk),
        )
    }
}
