//! What a careful operator expects of a node's directory, signals and sizes: a relative data
//! directory still offers shared memory to clients started elsewhere, the directory and data
//! file are owner-only, SIGHUP flushes like SIGTERM, a failed creation can be retried, a
//! DRAM tier larger than the machine is refused at start, and a damaged metadata log is
//! refused (not silently rolled back) and salvaged from the data file, and a removal by
//! `kvctl del` survives a crash; a block damaged in the node's memory is reported corrupt and
//! dropped.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use mooncake_kv_replication::{Client, ClientConfig, ClientError, TransportChoice};
use mooncake_kv_test_support::Kvd;

const KVD: &str = env!("CARGO_BIN_EXE_mooncake-kvd");
const PORTS: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--data-listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "off",
];

fn start_in(dir: &std::path::Path, args: &[&str]) -> Kvd {
    Kvd::start_in(KVD, dir, PORTS.iter().chain(args))
}

fn client(kvd: &Kvd, transport: TransportChoice) -> Client {
    let config = ClientConfig {
        transport,
        ..ClientConfig::default()
    };
    Client::connect(kvd.control, config).expect("connect")
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Started with `--data-dir data` in one directory, the node is read over shared memory by a
/// client whose working directory is another (this test's); its files are owner-only.
#[test]
fn a_relative_data_dir_serves_shared_memory_elsewhere_and_is_owner_only() {
    let work = tempfile::tempdir().unwrap();
    assert_ne!(std::env::current_dir().unwrap(), work.path());
    let kvd = start_in(work.path(), &["--data-dir", "data", "--nvme-mib", "16"]);
    client(&kvd, TransportChoice::Tcp)
        .put(b"k", b"over shm")
        .unwrap();
    let reader = client(&kvd, TransportChoice::Shm);
    assert_eq!(reader.transport_name(), "shm");
    assert_eq!(reader.get(b"k").unwrap().as_deref(), Some(&b"over shm"[..]));
    let auto = client(&kvd, TransportChoice::Auto);
    assert_eq!(
        auto.transport_name(),
        "shm",
        "the default read fell back to tcp"
    );

    let data = work.path().join("data");
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(mode(&data.join("blocks.data")), 0o600, "the data file");
    assert!(kvd.terminate().success());
}

/// An existing directory and data file open to others (as older builds left them) are made
/// owner-only at start.
#[test]
fn an_open_data_dir_is_closed_to_others_at_start() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let dir_arg = dir.to_str().unwrap();
    let kvd = start_in(work.path(), &["--data-dir", dir_arg, "--nvme-mib", "16"]);
    assert!(kvd.terminate().success());
    let open = |path: &std::path::Path, m| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap()
    };
    open(&dir, 0o755);
    open(&dir.join("blocks.data"), 0o644);
    let kvd = start_in(work.path(), &["--data-dir", dir_arg, "--nvme-mib", "16"]);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("blocks.data")), 0o600);
    assert!(kvd.terminate().success());
}

/// SIGHUP stops the node as SIGTERM does: exit 0 and every block flushed, so a restart on
/// the same directory serves them.
#[test]
fn sighup_flushes_and_exits_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let args = ["--data-dir", dir.to_str().unwrap(), "--nvme-mib", "16"];
    let kvd = start_in(work.path(), &args);
    let writer = client(&kvd, TransportChoice::Tcp);
    let values: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
    for (i, value) in values.iter().enumerate() {
        writer.put(format!("hup-{i}").as_bytes(), value).unwrap();
    }
    drop(writer);
    let status = kvd.signal(rustix::process::Signal::HUP);
    assert!(status.success(), "SIGHUP: {status}");

    let kvd = start_in(work.path(), &args);
    let reader = client(&kvd, TransportChoice::Tcp);
    for (i, value) in values.iter().enumerate() {
        let got = reader.get(format!("hup-{i}").as_bytes()).unwrap();
        assert_eq!(
            got.as_ref(),
            Some(value),
            "block {i} after SIGHUP and a restart"
        );
    }
    assert!(kvd.terminate().success());
}

/// A creation that fails (here a data file larger than any file system allows) leaves no
/// data file behind, so the next start, with a size that fits, succeeds.
#[test]
fn a_failed_creation_can_be_retried() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let dir_arg = dir.to_str().unwrap();
    let failed = Command::new(KVD)
        .args(PORTS)
        .args(["--data-dir", dir_arg, "--nvme-mib", "1099511627776"])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(2), "{failed:?}");
    assert!(
        !dir.join("blocks.data").exists(),
        "the failed creation left its data file"
    );
    let kvd = start_in(work.path(), &["--data-dir", dir_arg, "--nvme-mib", "16"]);
    client(&kvd, TransportChoice::Tcp).put(b"k", b"v").unwrap();
    assert!(kvd.terminate().success());
}

/// A DRAM tier larger than the machine's memory is refused at start with the figures, not
/// accepted and left for the kernel to kill the node once it fills.
#[test]
fn dram_beyond_physical_memory_is_refused() {
    let out = Command::new(KVD)
        .args(PORTS)
        .args(["--memory-only", "--dram-mib", "1099511627776"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("physical memory"), "{stderr}");
}

/// Four flipped bytes in the middle of the metadata log, after a clean stop: the node must
/// refuse to start and name the salvage, not start without the blocks the damaged records
/// described (RocksDB's default recovery stops replaying at the damage, silently); verify
/// fails too; `kvctl salvage` then brings back all 40 blocks, byte-exact, each at the
/// generation of its last put.
#[test]
fn a_damaged_metadata_log_is_refused_and_salvage_brings_every_block_back() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let args = ["--data-dir", dir.to_str().unwrap(), "--nvme-mib", "64"];
    let kvd = start_in(work.path(), &args);
    let writer = client(&kvd, TransportChoice::Tcp);
    let value = |i: u32, round: u32| -> Vec<u8> {
        (0..4096 + i)
            .map(|j| (i * 7 + j + round * 13) as u8)
            .collect()
    };
    let mut generations = Vec::new();
    for round in 0..2 {
        // The second round overwrites every block: salvage must keep the newer generation.
        generations.clear();
        for i in 0..40u32 {
            let key = format!("durable-{i}");
            let answers = writer
                .put_batch(&[(key.as_bytes(), &value(i, round)[..])], true)
                .unwrap();
            generations.push(*answers[0].as_ref().expect("a durable put"));
        }
    }
    drop(writer);
    assert!(kvd.terminate().success());

    let log = std::fs::read_dir(dir.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a metadata log");
    let mut bytes = std::fs::read(&log).unwrap();
    assert!(
        bytes.len() > 2000,
        "the log holds the block map ({} bytes)",
        bytes.len()
    );
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 4] {
        *b ^= 0x5A;
    }
    std::fs::write(&log, &bytes).unwrap();

    let out = run_to_exit(Command::new(KVD).args(PORTS).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "started on a damaged log: {stderr}"
    );
    assert!(stderr.contains("kvctl salvage"), "{stderr}");
    let verify = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !verify.status.success(),
        "verify passed a damaged directory"
    );

    let salvage = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["salvage", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&salvage.stdout);
    assert!(
        salvage.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&salvage.stderr)
    );
    assert!(said.contains("block map rebuilt: 40 blocks"), "{said}");

    let listed = mooncake_kv_engine::offline::DataDir::open(&dir).unwrap();
    for (i, generation) in generations.iter().enumerate() {
        let entry = listed.entry(format!("durable-{i}").as_bytes()).unwrap();
        assert_eq!(entry.map(|e| e.generation), Some(*generation), "block {i}");
    }
    drop(listed);
    let kvd = start_in(work.path(), &args);
    let reader = client(&kvd, TransportChoice::Tcp);
    for i in 0..40u32 {
        let got = reader.get(format!("durable-{i}").as_bytes()).unwrap();
        assert_eq!(got, Some(value(i, 1)), "block {i} after salvage");
    }
    assert!(kvd.terminate().success());
}

/// The output of a kvd expected to exit at start; one still running after 20 s (serving)
/// is killed, and its output returned with the kill's status.
fn run_to_exit(command: &mut Command) -> std::process::Output {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = rustix::process::Pid::from_child(&child);
    let (done, waited) = std::sync::mpsc::channel();
    let watchdog = std::thread::spawn(move || {
        if waited
            .recv_timeout(std::time::Duration::from_secs(20))
            .is_err()
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    out
}

/// `kvctl verify` fails where the node refuses to start: a data file grown by 1 MiB, or cut
/// to half with every block in the first half.
#[test]
fn verify_fails_on_a_data_file_the_node_refuses() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let args = ["--data-dir", dir.to_str().unwrap(), "--nvme-mib", "16"];
    let kvd = start_in(work.path(), &args);
    let writer = client(&kvd, TransportChoice::Tcp);
    for i in 0..10u8 {
        let answers = writer
            .put_batch(&[(&[b'k', i][..], &[i; 5000][..])], true)
            .unwrap();
        assert!(answers[0].is_ok());
    }
    drop(writer);
    assert!(kvd.terminate().success());
    let data = dir.join("blocks.data");
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .args(["verify", dir.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(verify().status.success(), "the intact directory");
    let file = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    for len in [(16 << 20) + (1 << 20), 8 << 20] {
        file.set_len(len).unwrap();
        let out = verify();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{len} bytes: {said}");
        assert!(
            said.contains("expects a data file of 16777216 bytes"),
            "{said}"
        );
        let node = run_to_exit(Command::new(KVD).args(PORTS).args(args));
        assert_eq!(
            node.status.code(),
            Some(2),
            "the node started on {len} bytes"
        );
    }
}

/// `kvctl del` answers once the removal is on disk: a node killed right after it does not
/// bring the block back (before, the removal waited for the node's next commit).
#[test]
fn a_removal_by_kvctl_del_survives_a_crash() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let args = ["--data-dir", dir.to_str().unwrap(), "--nvme-mib", "16"];
    let kvd = start_in(work.path(), &args);
    let writer = client(&kvd, TransportChoice::Tcp);
    let keys: Vec<String> = (0..4).map(|i| format!("del-{i}")).collect();
    let items: Vec<(&[u8], &[u8])> = keys
        .iter()
        .map(|k| (k.as_bytes(), b"durable value".as_slice()))
        .collect();
    for outcome in writer.put_batch(&items, true).unwrap() {
        outcome.unwrap();
    }
    drop(writer);
    let out = run_to_exit(Command::new(env!("CARGO_BIN_EXE_kvctl")).args([
        "--addr",
        &kvd.control.to_string(),
        "del",
        "del-0",
        "del-1",
    ]));
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed"),
        "{out:?}"
    );
    let status = kvd.signal(rustix::process::Signal::KILL);
    assert!(!status.success(), "killed: {status}");

    let kvd = start_in(work.path(), &args);
    let reader = client(&kvd, TransportChoice::Tcp);
    for (i, key) in keys.iter().enumerate() {
        let present = reader.get(key.as_bytes()).unwrap().is_some();
        assert_eq!(present, i >= 2, "{key} after a crash");
    }
    drop(reader);
    assert!(kvd.terminate().success());
}

/// Flips one byte of the node's DRAM tier right after the first occurrence of `marker`, as
/// failing memory would, by writing to the process's memory through `/proc/PID/mem` (the
/// test started the node, so it may).
fn flip_in_node_memory(pid: u32, marker: &[u8], past_marker: usize) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let (start, end) = maps
        .lines()
        .find(|l| l.contains("memfd:mooncake-dram"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|range| range.split_once('-'))
        .map(|(a, b)| {
            (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            )
        })
        .expect("the DRAM tier's mapping");
    let mut mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    // The first block sits near the start of the tier.
    let mut window = vec![0u8; (end - start).min(4 << 20) as usize];
    mem.seek(SeekFrom::Start(start)).unwrap();
    mem.read_exact(&mut window).unwrap();
    let at = window
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("the marker in the node's memory") as u64;
    let target = start + at + (marker.len() + past_marker) as u64;
    let mut byte = [0u8; 1];
    mem.seek(SeekFrom::Start(target)).unwrap();
    mem.read_exact(&mut byte).unwrap();
    byte[0] ^= 0x10;
    mem.seek(SeekFrom::Start(target)).unwrap();
    mem.write_all(&byte).unwrap();
}

/// Sends `ReportCorrupt` for `key` on a connection of its own; whether the node dropped it.
fn report_corrupt(kvd: &Kvd, key: &[u8], generation: u64) -> bool {
    use mooncake_kv_replication::proto::{
        Request, Response, decode_response, encode_body, read_frame, write_frame,
    };
    let mut s = std::net::TcpStream::connect(kvd.control).unwrap();
    let mut body = Vec::new();
    for (id, request) in [
        (1, Request::Hello { token: b"" }),
        (2, Request::ReportCorrupt { key, generation }),
    ] {
        write_frame(&mut s, id, &encode_body(&request)).unwrap();
        read_frame(&mut s, &mut body).unwrap().expect("an answer");
    }
    match decode_response(&body).unwrap() {
        Response::Flags(flags) => flags == [true],
        other => panic!("expected Flags, got {other:?}"),
    }
}

/// A block damaged in the node's memory fails a tcp read's check the same way each time:
/// the read says the block is damaged (not "still changing"), the node checks it too and
/// drops it, and the next read is a miss rather than the same failure again.
#[test]
fn a_block_damaged_in_memory_is_reported_corrupt_and_dropped() {
    let work = tempfile::tempdir().unwrap();
    let kvd = start_in(work.path(), &["--memory-only", "--no-shm"]);
    let client = client(&kvd, TransportChoice::Tcp);
    let marker = b"a block that bad memory will damage:";
    let mut value = marker.to_vec();
    value.extend((0..65_536u32).map(|i| (i % 251) as u8));
    client.put(b"damaged", &value).unwrap();
    let intact = client.put(b"intact", &value[marker.len()..]).unwrap();
    assert_eq!(client.get(b"damaged").unwrap().as_deref(), Some(&value[..]));

    flip_in_node_memory(kvd.child().id(), marker, 1000);
    match client.get(b"damaged") {
        // Caught by the client's check twice, or by the node's own (in a build that checks
        // payloads on every DRAM read): either way the block is dropped.
        Err(ClientError::Corrupt { key, dropped, .. }) => {
            assert_eq!(key, "damaged");
            assert!(
                dropped,
                "the node confirmed the damage and dropped the block"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(client.get(b"damaged").unwrap(), None, "dropped");
    assert_eq!(
        client.get(b"intact").unwrap().as_deref(),
        Some(&value[marker.len()..])
    );
    // A client's word alone drops nothing: an intact block reported damaged stays.
    assert!(!report_corrupt(&kvd, b"intact", intact), "not dropped");
    assert!(client.get(b"intact").unwrap().is_some());
    drop(client);
    assert!(kvd.terminate().success());
}

/// A node whose standard output has no reader (`mooncake-kvd ... | head -0`) serves on: its
/// one line is lost, and SIGTERM still stops it cleanly. It used to panic on that line.
#[test]
fn a_closed_standard_output_does_not_stop_the_node() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(KVD)
        .args(PORTS)
        .args(["--memory-only", "--dram-mib", "64"])
        .stdout(writer)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the node ended: {:?}",
        child.try_wait()
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}
