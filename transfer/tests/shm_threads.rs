//! A shared-memory server dropped in this process leaves none of its threads behind: each
//! connection is served on a thread of its own that holds the registry (and so the memory of
//! its regions), and dropping the server joins them all, a reader's and a silent peer's alike,
//! as it says. Alone in its own test binary, so that no other test's server runs beside it.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_kv_transfer::{
    MemfdRegion, Registry, RemoteSlice, ShmServer, ShmTransport, Transport,
};

/// The names of this process's threads that belong to a shared-memory server
/// (`mooncake-shm-accept` and `-serve`, as the kernel keeps them: 15 bytes).
fn shm_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("list this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_owned())
        .filter(|comm| comm.starts_with("mooncake-shm"))
        .collect()
}

#[test]
fn a_dropped_shm_server_joins_every_connections_thread() {
    const SILENT_PEERS: usize = 8;
    let dir = tempfile::tempdir().expect("temporary directory");
    let registry = Arc::new(Registry::new().expect("registry"));
    let region = MemfdRegion::new(1 << 20).expect("region");
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    region.write(0, &bytes);
    let handle = registry.register(Arc::new(region)).expect("register");
    for round in 0..10 {
        let path = dir.path().join(format!("round-{round}.sock"));
        let server = ShmServer::bind(&path, Arc::clone(&registry)).expect("bind");
        let reader = ShmTransport::connect(&path).expect("connect a reader");
        let mut read = vec![0u8; 4096];
        reader
            .read(
                RemoteSlice {
                    region_id: handle.region_id,
                    offset: 8192,
                    remote_key: handle.remote_key,
                },
                &mut read,
            )
            .expect("read");
        assert_eq!(read, bytes[8192..8192 + 4096], "round {round}");
        // Peers that connect and never say a word (a reader watching for the owner's end).
        let silent: Vec<UnixStream> = (0..SILENT_PEERS)
            .map(|_| UnixStream::connect(&path).expect("connect a silent peer"))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while shm_threads().len() < 2 + SILENT_PEERS {
            assert!(
                Instant::now() < deadline,
                "round {round}: threads never started: {:?}",
                shm_threads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(server);
        // Each connection's thread holds the registry until it ends: the count says they
        // were all joined, not only told to end.
        assert_eq!(
            Arc::strong_count(&registry),
            1,
            "round {round}: a connection's thread still holds the registry"
        );
        // A joined thread may still be on its way out of the kernel for a moment; none stays.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !shm_threads().is_empty() {
            assert!(
                Instant::now() < deadline,
                "round {round}: threads left running: {:?}",
                shm_threads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop((reader, silent));
    }
}
