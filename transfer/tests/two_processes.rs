//! One-sided reads between two real processes, over tcp and shared memory. The owner is this
//! test binary started again as a child (`peer_process`, which does nothing unless
//! `MOONCAKE_TRANSFER_PEER` is set); it registers regions of known contents and obeys commands
//! on stdin. The reader checks random reads byte for byte; that a wrong key, an out-of-bounds
//! read and an unknown region are refused with typed errors while the owner stays up; and that
//! unregistering a region while reads are in flight makes each read either return the right
//! bytes or fail with `UnknownRegion`, never anything else, many times over.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mooncake_kv_transfer::{
    Error, MemfdRegion, ReadOp, RegionHandle, Registry, RemoteSlice, ShmServer, ShmTransport,
    TcpServer, TcpTransport, Transport,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The byte at `i` of a region filled with `seed`.
fn pattern(seed: u64, i: u64) -> u8 {
    ((i.wrapping_mul(31) ^ (i >> 9)).wrapping_add(seed.wrapping_mul(0x9e37)) & 0xff) as u8
}

fn check(seed: u64, offset: u64, bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(seed, offset + i as u64))
}

/// The owner, when run as the peer. Prints `TCP addr`, `SHM path`, then `REGION seed id len
/// key` per region; commands: `unregister ID`, `register SEED LEN`, `quit`; answers `OK` (or a
/// new `REGION` line).
#[test]
fn peer_process() {
    let Ok(socket) = std::env::var("MOONCAKE_TRANSFER_PEER") else {
        return;
    };
    let registry = Arc::new(Registry::new().expect("registry"));
    let tcp = TcpServer::bind("127.0.0.1:0", Arc::clone(&registry)).expect("tcp");
    let shm = ShmServer::bind(&socket, Arc::clone(&registry)).expect("shm");
    let mut out = std::io::stdout().lock();
    writeln!(out, "TCP {}", tcp.local_addr()).unwrap();
    writeln!(out, "SHM {}", shm.path().display()).unwrap();
    let register = |seed: u64, len: u64| -> RegionHandle {
        let region = MemfdRegion::new(len as usize).expect("region");
        let bytes: Vec<u8> = (0..len).map(|i| pattern(seed, i)).collect();
        region.write(0, &bytes);
        registry.register(Arc::new(region)).expect("register")
    };
    for seed in 0..4u64 {
        let h = register(seed, (1 + seed) << 20);
        writeln!(
            out,
            "REGION {seed} {} {} {}",
            h.region_id, h.len, h.remote_key
        )
        .unwrap();
    }
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["unregister", id] => {
                registry.unregister(id.parse().expect("id"));
                writeln!(out, "OK").unwrap();
            }
            ["register", seed, len] => {
                let seed = seed.parse().expect("seed");
                let h = register(seed, len.parse().expect("len"));
                writeln!(
                    out,
                    "REGION {seed} {} {} {}",
                    h.region_id, h.len, h.remote_key
                )
                .unwrap();
            }
            ["quit"] => break,
            _ => writeln!(out, "ERR {line}").unwrap(),
        }
        out.flush().unwrap();
    }
}

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    tcp: String,
    shm: String,
    regions: Vec<(u64, RegionHandle)>,
    _dir: tempfile::TempDir,
}

fn parse_region(line: &str) -> (u64, RegionHandle) {
    let w: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().expect("number"))
        .collect();
    (
        w[0],
        RegionHandle {
            region_id: w[1],
            len: w[2],
            remote_key: w[3],
        },
    )
}

impl Peer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "peer_process", "--nocapture", "--test-threads=1"])
            .env("MOONCAKE_TRANSFER_PEER", dir.path().join("peer.sock"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the peer");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (mut tcp, mut shm, mut regions) = (String::new(), String::new(), Vec::new());
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).expect("read the peer") > 0,
                "the peer exited early"
            );
            // The test harness may print "test peer_process ... " before the first line.
            let line = line.trim();
            let line = line.find("TCP ").map_or(line, |at| &line[at..]);
            if let Some(addr) = line.strip_prefix("TCP ") {
                tcp = addr.to_owned();
            } else if let Some(path) = line.strip_prefix("SHM ") {
                shm = path.to_owned();
            } else if line.starts_with("REGION ") {
                regions.push(parse_region(line));
            } else if line == "READY" {
                break;
            }
        }
        Self {
            child,
            stdin,
            stdout,
            tcp,
            shm,
            regions,
            _dir: dir,
        }
    }

    fn command(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to the peer");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the peer");
        line.trim().to_owned()
    }

    fn transports(&self) -> Vec<(&'static str, Arc<dyn Transport>)> {
        vec![
            (
                "tcp",
                Arc::new(TcpTransport::new(&self.tcp, 4, Duration::from_secs(10)).expect("tcp")),
            ),
            (
                "shm",
                Arc::new(ShmTransport::connect(&self.shm).expect("shm")),
            ),
        ]
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn slice(h: &RegionHandle, offset: u64) -> RemoteSlice {
    RemoteSlice {
        region_id: h.region_id,
        offset,
        remote_key: h.remote_key,
    }
}

#[test]
fn random_reads_are_exact_and_bad_reads_are_refused() {
    let peer = Peer::start();
    let mut rng = StdRng::seed_from_u64(5);
    for (name, transport) in peer.transports() {
        // Random single reads.
        for _ in 0..300 {
            let (seed, h) = peer.regions[rng.random_range(0..peer.regions.len())];
            let len = rng.random_range(0..=(h.len.min(600_000)));
            let offset = rng.random_range(0..=h.len - len);
            let mut buf = vec![0u8; len as usize];
            transport
                .read(slice(&h, offset), &mut buf)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                check(seed, offset, &buf),
                "{name}: wrong bytes at {offset}+{len}"
            );
        }
        // A batch spanning regions, pipelined (and spread over connections on tcp).
        let specs: Vec<(u64, RegionHandle, u64, usize)> = (0..100)
            .map(|_| {
                let (seed, h) = peer.regions[rng.random_range(0..peer.regions.len())];
                let len = rng.random_range(1..100_000usize);
                (seed, h, rng.random_range(0..h.len - len as u64), len)
            })
            .collect();
        let mut bufs: Vec<Vec<u8>> = specs.iter().map(|s| vec![0; s.3]).collect();
        let mut ops: Vec<ReadOp<'_>> = specs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(s, b)| ReadOp {
                src: slice(&s.1, s.2),
                dst: b,
            })
            .collect();
        for result in transport.read_batch(&mut ops) {
            result.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for (s, b) in specs.iter().zip(&bufs) {
            assert!(check(s.0, s.2, b), "{name}: wrong bytes in a batch");
        }
        // The same batch with checksums: the bytes and the CRC of what landed in each buffer.
        for b in &mut bufs {
            b.fill(0);
        }
        let mut ops: Vec<ReadOp<'_>> = specs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(s, b)| ReadOp {
                src: slice(&s.1, s.2),
                dst: b,
            })
            .collect();
        let crcs: Vec<u32> = transport
            .read_batch_crc32(&mut ops)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        for ((s, b), crc) in specs.iter().zip(&bufs).zip(crcs) {
            assert!(
                check(s.0, s.2, b),
                "{name}: wrong bytes in a checksummed batch"
            );
            assert_eq!(
                crc,
                crc32fast::hash(b),
                "{name}: checksum of the bytes read"
            );
        }
        // Refusals, each typed; the owner stays up for the next good read.
        let h = peer.regions[0].1;
        let mut buf = [0u8; 16];
        let wrong_key = RemoteSlice {
            remote_key: h.remote_key ^ 1,
            ..slice(&h, 0)
        };
        assert!(
            matches!(
                transport.read(wrong_key, &mut buf),
                Err(Error::BadRemoteKey { .. })
            ),
            "{name}"
        );
        assert!(
            matches!(
                transport.read(slice(&h, h.len - 8), &mut buf),
                Err(Error::OutOfBounds { .. })
            ),
            "{name}"
        );
        assert!(
            matches!(
                transport.read(slice(&h, u64::MAX - 4), &mut buf),
                Err(Error::OutOfBounds { .. })
            ),
            "{name}"
        );
        let unknown = RemoteSlice {
            region_id: h.region_id + (1 << 40),
            ..slice(&h, 0)
        };
        assert!(
            matches!(
                transport.read(unknown, &mut buf),
                Err(Error::UnknownRegion { .. })
            ),
            "{name}"
        );
        transport
            .read(slice(&h, 100), &mut buf)
            .unwrap_or_else(|e| panic!("{name} after refusals: {e}"));
        assert!(check(peer.regions[0].0, 100, &buf));
    }
    // Garbage on the tcp data plane closes that connection only.
    let mut raw = std::net::TcpStream::connect(&peer.tcp).expect("connect");
    raw.write_all(&[0xab; 48]).expect("write garbage");
    let transport = TcpTransport::new(&peer.tcp, 1, Duration::from_secs(5)).expect("tcp");
    let (seed, h) = peer.regions[1];
    let mut buf = [0u8; 64];
    transport
        .read(slice(&h, 7), &mut buf)
        .expect("the owner is still up");
    assert!(check(seed, 7, &buf));
}

#[test]
fn unregistering_while_reads_are_in_flight_is_clean() {
    let mut peer = Peer::start();
    let transports = peer.transports();
    let (good, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    for round in 0..40u64 {
        let seed = 100 + round;
        let line = peer.command(&format!("register {seed} {}", 4 << 20));
        let (seed, h) = parse_region(&line);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = transports
            .iter()
            .map(|(name, transport)| {
                let (transport, stop, good, refused) = (
                    Arc::clone(transport),
                    Arc::clone(&stop),
                    Arc::clone(&good),
                    Arc::clone(&refused),
                );
                let name = *name;
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 512 << 10];
                    let mut offset = 0;
                    while !stop.load(Ordering::Acquire) {
                        match transport.read(slice(&h, offset), &mut buf) {
                            Ok(()) => {
                                assert!(
                                    check(seed, offset, &buf),
                                    "{name}: wrong bytes from a live region"
                                );
                                good.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(Error::UnknownRegion { .. }) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Err(other) => panic!("{name}: unexpected error {other}"),
                        }
                        offset = (offset + 4096 * 7) % (h.len - buf.len() as u64);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(peer.command(&format!("unregister {}", h.region_id)), "OK");
        std::thread::sleep(Duration::from_millis(5));
        stop.store(true, Ordering::Release);
        for reader in readers {
            reader.join().expect("a reader failed");
        }
    }
    println!(
        "{} reads served, {} refused after unregistration",
        good.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
    assert!(good.load(Ordering::Relaxed) > 0);
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "no read ever met an unregistered region"
    );
}

/// A reader's mapping keeps a dead owner's memory alive; the transport must notice the owner's
/// socket closing and stop serving reads from it.
#[test]
fn shm_reads_stop_soon_after_the_owner_dies() {
    let mut peer = Peer::start();
    let shm = ShmTransport::connect(&peer.shm).expect("shm");
    let (seed, h) = peer.regions[0];
    let mut buf = vec![0u8; 4096];
    shm.read(slice(&h, 0), &mut buf)
        .expect("read from the live owner");
    assert!(check(seed, 0, &buf));
    peer.child.kill().expect("SIGKILL the owner");
    peer.child.wait().expect("wait for the owner");
    let died = std::time::Instant::now();
    let mut served = 0;
    loop {
        match shm.read(slice(&h, 0), &mut buf) {
            Ok(()) => {
                served += 1;
                assert!(
                    died.elapsed() < Duration::from_secs(2),
                    "{served} reads of a dead owner's memory and counting"
                );
            }
            Err(Error::Io { .. }) => break,
            Err(other) => panic!("unexpected error {other}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("{served} reads served after the owner died, then refused");
}

/// `read_in_place` (the shm transport's own, and the default over tcp): the payload at its
/// offset and the head, the check's answer on the head, and out-of-bounds blocks refused.
#[test]
fn in_place_reads_return_head_and_payload_and_honour_the_check() {
    let peer = Peer::start();
    let mut rng = StdRng::seed_from_u64(9);
    for (name, transport) in peer.transports() {
        for _ in 0..100 {
            let (seed, h) = peer.regions[rng.random_range(0..peer.regions.len())];
            let head_len = rng.random_range(64..300u64);
            let payload_offset = head_len + rng.random_range(0..200u64);
            let payload_len = rng.random_range(0..200_000u64);
            let offset = rng.random_range(0..=h.len - payload_offset - payload_len);
            let mut head = vec![0u8; head_len as usize];
            let mut payload = vec![0u8; payload_len as usize];
            let accept = rng.random_bool(0.8);
            let seen = std::cell::Cell::new(false);
            let verified = transport
                .read_in_place(
                    slice(&h, offset),
                    &mut head,
                    payload_offset,
                    &mut payload,
                    &|bytes| {
                        seen.set(check(seed, offset, bytes));
                        accept
                    },
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(seen.get(), "{name}: the check saw the wrong head");
            assert_eq!(verified, accept, "{name}");
            assert!(check(seed, offset, &head), "{name}: wrong head");
            assert!(
                check(seed, offset + payload_offset, &payload),
                "{name}: wrong payload"
            );
        }
        let (_, h) = peer.regions[0];
        let mut head = [0u8; 64];
        let mut payload = [0u8; 100];
        let past_the_end =
            transport.read_in_place(slice(&h, h.len - 150), &mut head, 64, &mut payload, &|_| {
                true
            });
        assert!(
            matches!(past_the_end, Err(Error::OutOfBounds { .. })),
            "{name}: {past_the_end:?}"
        );
    }
}
