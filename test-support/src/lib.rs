//! Helpers the integration tests of several crates share, so that none is copied between
//! crates or compiled in by path: a `mooncake-kvd` process ([`Kvd`]), a free loopback port, a
//! bounded wait, one counter of a node's metrics, and a reader that tallies what a cluster
//! returns while a test stops or kills nodes.
//!
//! For tests only: every helper panics (with what it was waiting for) instead of returning
//! an error, as a failed test should.

mod kvd;
mod reads;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub use kvd::Kvd;
pub use reads::ReadTally;

/// The value of the counter `name` (with its labels, as in
/// `mooncake_requests_total{kind="lookup"}`) in the metrics `text` (the exposition format a
/// node's `/metrics` serves).
///
/// # Panics
///
/// If `text` has no such counter.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}

/// A loopback address with a port that was free a moment ago.
///
/// # Panics
///
/// If no port can be bound.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Polls `done` every 50 ms until it holds.
///
/// # Panics
///
/// After `limit`, naming `what` was awaited.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Raises this process's open-file soft limit to at least `wanted` (as far as the hard limit
/// allows), for tests that hold thousands of sockets. Returns the limit now in force.
pub fn raise_open_file_limit(wanted: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let soft = current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return soft;
    }
    let target = wanted.min(maximum.unwrap_or(u64::MAX));
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum,
        },
    ) {
        Ok(()) => target,
        Err(_) => soft,
    }
}
