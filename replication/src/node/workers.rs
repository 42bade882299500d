//! The control plane's threads: event loops (epoll; by default one per two cores) holding the
//! connections between requests, and a bounded pool of workers for what a loop does not
//! serve itself.
//!
//! When a parked connection becomes readable, its loop serves the request in its own thread
//! if it is a quick one (a lookup, with its blocks sent inline; exists; a prefix match;
//! health) that is whole in the socket already: one request per turn, then the connection
//! waits for its next one in the loop again. An answer the socket cannot take whole is sent
//! by the loop as the socket drains (its blocks stay pinned until then). That is the common
//! case, and it costs no thread switch: a loop serves its connections in turn, as Redis's
//! does. A connection that has not authenticated stays with its loop until its Hello is
//! whole in the socket (or it ends), so one that stalls halfway holds no worker. Anything
//! else (Hello, a put and its values, a request still arriving, a request
//! that may wait on a disk) goes to a worker, which serves it with blocking code: a put's value is read straight into its
//! reserved DRAM, an inline read is one vectored send from pinned blocks.
//!
//! While no other connection waits for a worker, a worker serves its connection as long as
//! requests keep coming (it waits [`LINGER`] for the next one, if fewer than
//! [`RUNNING_PER_CORE`] per core wait so already and no more connections than that are
//! parked with the loops: many busy connections are the loops' to serve in turn; the first
//! [`NodeConfig::poll_before_sleep`](crate::NodeConfig::poll_before_sleep) of that wait it
//! polls rather than sleeps, while the requests come back to back), then parks it with its
//! loop again. While others wait, it serves one request per turn: its connection
//! goes to the back of the queue if its next request is there already, or back to its loop
//! if not. At most
//! [`RUNNING_PER_CORE`] workers per core are at work at once, unless they are all stuck on
//! slow clients (see [`unstick`]). So an idle connection costs a socket and a few dozen
//! bytes, not a thread, and none is served again and again while others wait.
//!
//! Why epoll and not io_uring here: the worker's request code stays blocking, and a loop
//! needs "tell me when one of these thousands of sockets is readable" and a send that does
//! not wait, which epoll and `MSG_DONTWAIT` give with one system call each. The data
//! path's io_uring is for files.

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::event::epoll;

use super::Shared;

/// How long a worker waits for a connection's next request before parking it.
const LINGER: Duration = Duration::from_millis(50);
/// Most workers at work at once per core (more only when they are all stuck): more threads
/// than that share the cores in the scheduler's order, not the queue's, and the tail grows.
const RUNNING_PER_CORE: usize = 2;
/// How long a worker with nothing to do waits before it ends.
const IDLE_WORKER: Duration = Duration::from_secs(2);
/// How often the poller looks at the node's state (stopping, parked connections' age).
const TICK: Duration = Duration::from_millis(100);

/// A connection between requests.
pub(super) struct Job {
    pub(super) stream: TcpStream,
    pub(super) id: u64,
    pub(super) authenticated: bool,
    /// An answer its loop began to send and the socket could not take whole: the loop
    /// sends the rest as the socket drains, before reading anything else.
    pub(super) unsent: Option<super::control::Unsent>,
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

/// One event loop: its epoll set and the connections parked with it.
struct Poller {
    epoll: OwnedFd,
    parked: Mutex<ParkedSet>,
}

/// The workers and the event loops' sets.
pub(super) struct Workers {
    state: Mutex<PoolState>,
    /// Signalled when a job arrives, and when the last worker ends.
    ready: Condvar,
    max: usize,
    /// The event loops; connection `id` is parked with `pollers[id % len]`.
    pollers: Vec<Poller>,
    /// Workers waiting on their connection's next request now.
    lingering: AtomicUsize,
    /// Jobs queued for a worker now (`state.jobs.len()`, readable without the lock).
    queued: AtomicUsize,
    /// Most workers at work (not lingering) at once, unless they are stuck: see [`unstick`].
    running: usize,
    /// Jobs taken by a worker so far.
    taken: AtomicU64,
    /// The workers' threads, those that ended pruned as new ones start: a worker counts
    /// itself out (`state.workers`) before its thread lets go of the node's state, so the
    /// node joins them as well before it closes, or the last reference to the engine could
    /// be dropped by a thread that outlives the node (RocksDB closed during the process's
    /// exit aborts it: "pthread lock: Invalid argument").
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A worker's turn at waiting on its connection; see [`Workers::linger`].
pub(super) struct Lingering<'a>(&'a AtomicUsize);

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// A pool of at most `max` workers (at least one), and `loops` event loops (0: one per
    /// two cores, at least one).
    pub(super) fn new(max: usize, loops: usize) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let loops = if loops == 0 {
            (cores / 2).max(1)
        } else {
            loops
        };
        let pollers = (0..loops)
            .map(|_| {
                Ok(Poller {
                    epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
                    parked: Mutex::new(ParkedSet::default()),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            state: Mutex::new(PoolState::default()),
            ready: Condvar::new(),
            max: max.max(1),
            pollers,
            lingering: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            running: cores.saturating_mul(RUNNING_PER_CORE),
            taken: AtomicU64::new(0),
            handles: Mutex::new(Vec::new()),
        })
    }

    /// How many event loops there are.
    pub(super) fn loops(&self) -> usize {
        self.pollers.len()
    }

    fn poller_of(&self, id: u64) -> &Poller {
        // `pollers` is never empty (at least one loop), and the index is below
        // its length.
        &self.pollers[(id % self.pollers.len() as u64) as usize]
    }

    /// Whether connections wait in the queue for a worker now: then a worker serves its own
    /// connection one request per turn (see the module's comment).
    pub(super) fn others_waiting(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// How long a worker may wait for its connection's next request: [`LINGER`], held
    /// while the returned guard lives, unless other connections wait for a worker,
    /// [`RUNNING_PER_CORE`] per core wait already, or more connections than that are parked
    /// with the loops (then not at all). A lingering worker serves its own connection out of
    /// turn: with 256 busy connections, the few that workers held had a p50 of 0.5 ms beside
    /// a p99 of 35 ms for all (a quarter of the gets); with the loops taking every connection
    /// in turn, p50 8 ms, p99 18 ms, and 10% more gets. Lingering is for a lone client,
    /// whose next request it answers without a trip through the loop.
    pub(super) fn linger(&self) -> (Duration, Option<Lingering<'_>>) {
        if self.others_waiting() || self.parked() > self.running {
            return (Duration::ZERO, None);
        }
        if self.lingering.fetch_add(1, Ordering::Relaxed) < self.running {
            (LINGER, Some(Lingering(&self.lingering)))
        } else {
            self.lingering.fetch_sub(1, Ordering::Relaxed);
            (Duration::ZERO, None)
        }
    }

    /// Connections parked now.
    pub(super) fn parked(&self) -> usize {
        self.pollers
            .iter()
            .map(|p| p.parked.lock().jobs.len())
            .sum()
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

    /// Joins the workers' threads once they have ended ([`wait_ended`](Self::wait_ended)
    /// returned `true`), so that none holds the node's state any more; else only those
    /// whose threads are done (a stuck one is left, as the node's log says).
    pub(super) fn join(&self, all_ended: bool) {
        let handles = std::mem::take(&mut *self.handles.lock());
        for handle in handles {
            if all_ended || handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}

/// Hands `job` to a waiting worker, or to a new one while fewer than [`RUNNING_PER_CORE`]
/// per core are at work (and fewer than the most in all); else it waits in the queue for
/// the first worker free. Workers that are all stuck (on clients that send a value slowly,
/// say) are helped by [`unstick`].
pub(super) fn dispatch(shared: &Arc<Shared>, job: Job) {
    let workers = &shared.workers;
    let spawn = {
        let mut state = workers.state.lock();
        state.jobs.push_back(job);
        workers.queued.store(state.jobs.len(), Ordering::Relaxed);
        // Lingering workers are waiting, not working: they do not count against the cores.
        let at_work = state
            .workers
            .saturating_sub(workers.lingering.load(Ordering::Relaxed));
        if state.jobs.len() <= state.waiting {
            workers.ready.notify_one();
            false
        } else if state.workers < workers.max && at_work < workers.running {
            state.workers += 1;
            true
        } else {
            false
        }
    };
    if spawn {
        spawn_worker(shared);
    }
}

/// Called every few milliseconds: when jobs wait and no worker has taken one since the last
/// call (`last` holds what [`Workers::taken`] said then), every worker is stuck in a request
/// and one more is started, up to the most.
pub(super) fn unstick(shared: &Arc<Shared>, last: &mut u64) {
    let workers = &shared.workers;
    let taken = workers.taken.load(Ordering::Relaxed);
    let stuck = taken == *last && workers.others_waiting();
    *last = taken;
    if !stuck {
        return;
    }
    let spawn = {
        let mut state = workers.state.lock();
        let spawn = !state.jobs.is_empty() && state.waiting == 0 && state.workers < workers.max;
        if spawn {
            state.workers += 1;
        }
        spawn
    };
    if spawn {
        tracing::debug!("every worker is busy with one request and jobs wait: one more worker");
        spawn_worker(shared);
    }
}

/// Starts a worker already counted in `state.workers`.
fn spawn_worker(shared: &Arc<Shared>) {
    let workers = &shared.workers;
    let worker = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("mooncake-node-serve".into())
        .spawn(move || work(&worker));
    match spawned {
        Ok(handle) => {
            let mut handles = workers.handles.lock();
            // Threads that ended are let go of here (their handles only), so the list stays
            // as long as the pool.
            handles.retain(|h| !h.is_finished());
            handles.push(handle);
        }
        Err(error) => {
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
            workers.queued.store(state.jobs.len(), Ordering::Relaxed);
            workers.taken.fetch_add(1, Ordering::Relaxed);
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

/// Gives `job` to its event loop until its socket is readable (or closed). `Err` with the
/// job when the loop has stopped or cannot watch it: the caller closes it.
pub(super) fn park(shared: &Shared, job: Job) -> Result<(), Job> {
    let poller = shared.workers.poller_of(job.id);
    let mut parked = poller.parked.lock();
    if parked.closed {
        return Err(job);
    }
    if epoll::add(
        &poller.epoll,
        &job.stream,
        epoll::EventData::new_u64(job.id),
        WATCH,
    )
    .is_err()
    {
        return Err(job);
    }
    parked.jobs.insert(job.id, (job, Instant::now()));
    Ok(())
}

/// One event, then the socket is out of the set until it is armed again.
const WATCH: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::ONESHOT);
/// The same while an answer is partly sent: room in the socket, or its end.
const WATCH_SENDING: epoll::EventFlags = epoll::EventFlags::OUT
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::ONESHOT);

/// How often a loop looks again at connections whose Hello is not whole yet.
const LOOK_AGAIN: Duration = Duration::from_millis(10);

/// What the loop does with `job` after [`serve_ready`](super::control::serve_ready): arm it
/// again for its next request or for room to send, keep it out of the set while its Hello
/// arrives (its id in `incomplete`), hand it to a worker, or close it. `since`: when it was
/// parked, which a Hello still arriving keeps (the idle timeout counts from there).
fn settle(
    shared: &Arc<Shared>,
    poller: &Poller,
    (job, since): (Job, Instant),
    ready: super::control::Ready,
    incomplete: &mut Vec<u64>,
) {
    use super::control::Ready;
    match ready {
        Ready::Served | Ready::Sending => {
            // Armed again under the set's lock, and only this loop waits on its set: the
            // next event finds the connection parked. A partly sent answer waits for room in
            // the socket, anything else for the next request.
            let watch = if matches!(ready, Ready::Sending) {
                WATCH_SENDING
            } else {
                WATCH
            };
            let id = job.id;
            let mut parked = poller.parked.lock();
            let data = epoll::EventData::new_u64(id);
            if epoll::modify(&poller.epoll, &job.stream, data, watch).is_ok() {
                parked.jobs.insert(id, (job, Instant::now()));
            } else {
                drop(parked);
                let _ = epoll::delete(&poller.epoll, &job.stream);
                shared.forget(job.id);
            }
        }
        Ready::Incomplete => {
            // Disarmed (one-shot) and still registered: the Hello deadline shuts the socket
            // down, which the next look finds.
            incomplete.push(job.id);
            poller.parked.lock().jobs.insert(job.id, (job, since));
        }
        Ready::ToWorker => {
            let _ = epoll::delete(&poller.epoll, &job.stream);
            dispatch(shared, job);
        }
        Ready::Close => {
            let _ = epoll::delete(&poller.epoll, &job.stream);
            shared.forget(job.id);
        }
    }
}

/// Event loop `index`: serves the quick requests of its parked connections as they become
/// readable (see the module's comment) and hands the rest to workers, closes those parked
/// longer than the idle timeout, and at shutdown closes every one still parked.
pub(super) fn poll_parked(shared: &Arc<Shared>, index: usize) {
    let Some(poller) = shared.workers.pollers.get(index) else {
        return;
    };
    let mut events = Vec::with_capacity(1024);
    let mut buffers = super::control::LoopBuffers::default();
    let tick = rustix::event::Timespec::try_from(TICK).unwrap_or(rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    });
    let look_again = rustix::event::Timespec::try_from(LOOK_AGAIN).unwrap_or(tick);
    let mut last_sweep = Instant::now();
    let mut incomplete: Vec<u64> = Vec::new();
    let mut last_look = Instant::now();
    while !shared.stopping.load(Ordering::Acquire) {
        events.clear();
        let timeout = if incomplete.is_empty() {
            &tick
        } else {
            &look_again
        };
        match epoll::wait(
            &poller.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(timeout),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(error) => {
                tracing::error!(%error, "a control-plane event loop failed; closing its parked connections");
                break;
            }
        }
        for event in events.drain(..) {
            let id = event.data.u64();
            let Some((mut job, since)) = poller.parked.lock().jobs.remove(&id) else {
                continue;
            };
            let ready = super::control::serve_ready(shared, &mut job, &mut buffers);
            settle(shared, poller, (job, since), ready, &mut incomplete);
        }
        // Hellos still arriving: looked at again every few milliseconds, out of the epoll
        // set meanwhile (armed, a socket with part of a frame would wake the loop at once).
        if !incomplete.is_empty() && last_look.elapsed() >= LOOK_AGAIN {
            last_look = Instant::now();
            for id in std::mem::take(&mut incomplete) {
                let Some((mut job, since)) = poller.parked.lock().jobs.remove(&id) else {
                    continue;
                };
                let ready = super::control::serve_ready(shared, &mut job, &mut buffers);
                settle(shared, poller, (job, since), ready, &mut incomplete);
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_secs(1) {
            last_sweep = now;
            let idle = shared.idle_timeout;
            let expired: Vec<Job> = {
                let mut parked = poller.parked.lock();
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
                let _ = epoll::delete(&poller.epoll, &job.stream);
                shared.forget(job.id);
            }
        }
    }
    let left: Vec<Job> = {
        let mut parked = poller.parked.lock();
        parked.closed = true;
        parked.jobs.drain().map(|(_, (job, _))| job).collect()
    };
    for job in left {
        shared.forget(job.id);
    }
}
