//! The control plane's threads: a bounded pool of workers serving the connections that have
//! requests, and one poller (epoll) holding the quiet ones. A worker serves a connection as
//! long as requests keep coming (it waits [`LINGER`] for the next one), then parks it with
//! the poller and takes other work; the poller hands it back to a worker when bytes (or its
//! end) arrive. So a busy connection is served exactly as by a thread of its own, and an idle
//! one costs a socket and a few dozen bytes, not a thread: the node's threads grow with the
//! connections that are active at once, not with those that are open.
//!
//! Why epoll and not io_uring here: the request code stays blocking (a put's value is read
//! straight into its reserved DRAM, an inline read is one vectored send from pinned blocks),
//! and all the poller needs is "tell me when this socket is readable" for thousands of
//! sockets, which is what epoll does with one system call per change. The data path's
//! io_uring is for files.

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::event::epoll;

use super::Shared;

/// How long a worker waits for a connection's next request before parking it.
const LINGER: Duration = Duration::from_millis(50);
/// Most workers waiting on their connection's next request at once; beyond, a worker parks
/// its connection as soon as no request is there, so that connections that go quiet (or a
/// flood of new ones) do not hold threads.
const MAX_LINGERING: usize = 64;
/// How long a worker with nothing to do waits before it ends.
const IDLE_WORKER: Duration = Duration::from_secs(2);
/// How often the poller looks at the node's state (stopping, parked connections' age).
const TICK: Duration = Duration::from_millis(100);

/// A connection between requests.
pub(super) struct Job {
    pub(super) stream: TcpStream,
    pub(super) id: u64,
    pub(super) authenticated: bool,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    waiting: usize,
    /// Workers alive.
    workers: usize,
}

#[derive(Default)]
struct ParkedSet {
    jobs: HashMap<u64, (Job, Instant)>,
    /// The poller has stopped: nothing more is parked.
    closed: bool,
}

/// The workers and the poller's set.
pub(super) struct Workers {
    state: Mutex<PoolState>,
    /// Signalled when a job arrives, and when the last worker ends.
    ready: Condvar,
    max: usize,
    epoll: OwnedFd,
    parked: Mutex<ParkedSet>,
    /// Workers waiting on their connection's next request now.
    lingering: AtomicUsize,
}

/// A worker's turn at waiting on its connection; see [`Workers::linger`].
pub(super) struct Lingering<'a>(&'a AtomicUsize);

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// A pool of at most `max` workers (at least one).
    pub(super) fn new(max: usize) -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(PoolState::default()),
            ready: Condvar::new(),
            max: max.max(1),
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            parked: Mutex::new(ParkedSet::default()),
            lingering: AtomicUsize::new(0),
        })
    }

    /// How long a worker may wait for its connection's next request: [`LINGER`], held
    /// while the returned guard lives, unless [`MAX_LINGERING`] workers wait already (then
    /// not at all).
    pub(super) fn linger(&self) -> (Duration, Option<Lingering<'_>>) {
        if self.lingering.fetch_add(1, Ordering::Relaxed) < MAX_LINGERING {
            (LINGER, Some(Lingering(&self.lingering)))
        } else {
            self.lingering.fetch_sub(1, Ordering::Relaxed);
            (Duration::ZERO, None)
        }
    }

    /// Connections parked now.
    pub(super) fn parked(&self) -> usize {
        self.parked.lock().jobs.len()
    }

    /// Threads serving or waiting to serve now.
    pub(super) fn threads(&self) -> usize {
        self.state.lock().workers
    }

    /// Waits for every worker to end (they end once the node is stopping and no job is
    /// left), until `deadline`.
    pub(super) fn wait_ended(&self, deadline: Instant) -> bool {
        let mut state = self.state.lock();
        self.ready.notify_all();
        while state.workers > 0 {
            if self.ready.wait_until(&mut state, deadline).timed_out() {
                return false;
            }
        }
        true
    }
}

/// Hands `job` to a waiting worker, or to a new one while there are fewer than the most;
/// else it waits in the queue for the first worker free.
pub(super) fn dispatch(shared: &Arc<Shared>, job: Job) {
    let workers = &shared.workers;
    let spawn = {
        let mut state = workers.state.lock();
        state.jobs.push_back(job);
        if state.jobs.len() <= state.waiting {
            workers.ready.notify_one();
            false
        } else if state.workers < workers.max {
            state.workers += 1;
            true
        } else {
            false
        }
    };
    if spawn {
        let worker = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("mooncake-node-serve".into())
            .spawn(move || work(&worker));
        if let Err(error) = spawned {
            // The queued job waits for a worker that exists (if none does, for the next
            // dispatch that can start one).
            tracing::warn!(%error, "cannot start a worker thread");
            let mut state = workers.state.lock();
            state.workers -= 1;
            if state.workers == 0 {
                workers.ready.notify_all();
            }
        }
    }
}

fn work(shared: &Arc<Shared>) {
    let workers = &shared.workers;
    let mut state = workers.state.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            super::control::run(shared, job);
            state = workers.state.lock();
            continue;
        }
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        state.waiting += 1;
        let timed_out = workers.ready.wait_for(&mut state, IDLE_WORKER).timed_out();
        state.waiting -= 1;
        if timed_out && state.jobs.is_empty() {
            break;
        }
    }
    state.workers -= 1;
    if state.workers == 0 {
        workers.ready.notify_all();
    }
}

/// Gives `job` to the poller until its socket is readable (or closed). `Err` with the job
/// when the poller has stopped or cannot watch it: the caller closes it.
pub(super) fn park(shared: &Shared, job: Job) -> Result<(), Job> {
    let workers = &shared.workers;
    let mut parked = workers.parked.lock();
    if parked.closed {
        return Err(job);
    }
    // One event, then the socket is out of the set until parked again.
    let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP | epoll::EventFlags::ONESHOT;
    if epoll::add(
        &workers.epoll,
        &job.stream,
        epoll::EventData::new_u64(job.id),
        flags,
    )
    .is_err()
    {
        return Err(job);
    }
    parked.jobs.insert(job.id, (job, Instant::now()));
    Ok(())
}

/// The poller: hands each parked connection that becomes readable to a worker, closes those
/// parked longer than the idle timeout, and at shutdown closes every one still parked.
pub(super) fn poll_parked(shared: &Arc<Shared>) {
    let workers = &shared.workers;
    let mut events = Vec::with_capacity(1024);
    let tick = rustix::event::Timespec::try_from(TICK).unwrap_or(rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    });
    let mut last_sweep = Instant::now();
    while !shared.stopping.load(Ordering::Acquire) {
        events.clear();
        match epoll::wait(
            &workers.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&tick),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(error) => {
                tracing::error!(%error, "the control plane's poller failed; closing parked connections");
                break;
            }
        }
        for event in events.drain(..) {
            let id = event.data.u64();
            let Some((job, _)) = workers.parked.lock().jobs.remove(&id) else {
                continue;
            };
            let _ = epoll::delete(&workers.epoll, &job.stream);
            dispatch(shared, job);
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_secs(1) {
            last_sweep = now;
            let idle = shared.idle_timeout;
            let expired: Vec<Job> = {
                let mut parked = workers.parked.lock();
                let ids: Vec<u64> = parked
                    .jobs
                    .iter()
                    .filter(|(_, (_, since))| now.duration_since(*since) >= idle)
                    .map(|(&id, _)| id)
                    .collect();
                ids.iter()
                    .filter_map(|id| parked.jobs.remove(id).map(|(job, _)| job))
                    .collect()
            };
            for job in expired {
                let _ = epoll::delete(&workers.epoll, &job.stream);
                shared.forget(job.id);
            }
        }
    }
    let left: Vec<Job> = {
        let mut parked = workers.parked.lock();
        parked.closed = true;
        parked.jobs.drain().map(|(_, (job, _))| job).collect()
    };
    for job in left {
        shared.forget(job.id);
    }
}
