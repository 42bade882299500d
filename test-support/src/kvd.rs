//! A `mooncake-kvd` process for a test: started with its arguments, its addresses read off the
//! line it prints once it serves, killed when dropped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running `mooncake-kvd`. Dropping it kills the process (SIGKILL) and waits for it.
#[derive(Debug)]
pub struct Kvd {
    /// Always `Some` until [`into_child`](Self::into_child) or drop.
    child: Option<Child>,
    /// Its control plane.
    pub control: SocketAddr,
    /// Its tcp data plane.
    pub data: SocketAddr,
    /// Its metrics URL, unless started with `--metrics-listen off`.
    metrics: Option<String>,
}

impl Kvd {
    /// Starts the kvd at `binary` (a test has it as `env!("CARGO_BIN_EXE_mooncake-kvd")`) with
    /// `args`, its listen addresses among them, and waits for its "serving" line.
    ///
    /// # Panics
    ///
    /// If it cannot be started, or exits or prints anything else first.
    pub fn start<I, S>(binary: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::start_in(binary, Path::new("."), args)
    }

    /// [`start`](Self::start), with `dir` as the process's working directory.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_in<I, S>(binary: &str, dir: &Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(binary)
            .current_dir(dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mooncake-kvd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read the serving line");
        assert!(line.contains("serving"), "not the serving line: {line:?}");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let address = |name: &str| -> SocketAddr {
            field(name)
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .parse()
                .unwrap_or_else(|_| panic!("{name} in {line:?} is not an address"))
        };
        Self {
            control: address("control="),
            data: address("data="),
            metrics: field("metrics=").filter(|url| url != "off"),
            child: Some(child),
        }
    }

    /// Its metrics URL.
    ///
    /// # Panics
    ///
    /// If it serves no metrics.
    pub fn metrics(&self) -> &str {
        self.metrics.as_deref().expect("a kvd serving metrics")
    }

    /// The process.
    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("until drop")
    }

    /// The process, now the caller's to stop.
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("until drop")
    }

    /// SIGTERM, then its exit status.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent or the process waited for.
    pub fn terminate(self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM)
    }

    /// `signal`, then its exit status.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent or the process waited for.
    pub fn signal(mut self, signal: rustix::process::Signal) -> ExitStatus {
        self.send(signal);
        self.child.take().expect("until drop").wait().expect("wait")
    }

    /// Sends `signal` to the kvd and returns at once (`STOP` and `CONT` pause and resume it).
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent.
    pub fn send(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(self.child());
        rustix::process::kill_process(pid, signal).expect("send the signal");
    }

    /// Stops the kvd (SIGSTOP) and returns once every one of its threads has stopped.
    ///
    /// `kill` returns before that: one thread takes the signal and stops the others, and on a
    /// busy machine it may not run for milliseconds while an event loop goes on serving.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent, or its threads have not all stopped within 10 s.
    pub fn pause(&self) {
        self.send(rustix::process::Signal::STOP);
        let tasks = format!("/proc/{}/task", self.child().id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !all_stopped(Path::new(&tasks)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the kvd's threads did not all stop within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Kvd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether every thread listed under `tasks` (`/proc/<pid>/task`) is stopped: state `T` in
/// its `stat`, the field after the parenthesised name. A thread that is gone is not running.
fn all_stopped(tasks: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(tasks) else {
        return false;
    };
    entries.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T")
        })
    })
}
