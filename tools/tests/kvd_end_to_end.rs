//! mooncake-kvd as people run it: real processes on 127.0.0.1, the client library and kvctl
//! against them. Byte-exact round trips over tcp and shared memory, a restart that serves
//! every flushed block, a clean SIGTERM, bad input of every kind refused while the node keeps
//! serving, and verified reads that never return wrong bytes while the node reuses slots.

use std::io::{Read, Write};
use std::net::TcpStream;

use std::process::{Command, Stdio};
use std::time::Duration;

use mooncake_kv_replication::proto::ErrorCode;
use mooncake_kv_replication::{Client, ClientConfig, ClientError, TransportChoice};
use mooncake_kv_test_support::Kvd;
use mooncake_kv_transfer::{RemoteSlice, TcpTransport, Transport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Starts a kvd on free ports with `args` and waits for its "serving" line.
fn start_kvd(args: &[&str]) -> Kvd {
    start_kvd_listening("127.0.0.1:0", args)
}

/// [`start_kvd`], with the control plane on `listen`.
fn start_kvd_listening(listen: &str, args: &[&str]) -> Kvd {
    let defaults = [
        "--listen",
        listen,
        "--data-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log",
        "warn",
    ];
    Kvd::start(
        env!("CARGO_BIN_EXE_mooncake-kvd"),
        defaults.iter().chain(args),
    )
}

fn client(kvd: &Kvd, transport: TransportChoice) -> Client {
    Client::connect(
        kvd.control,
        ClientConfig {
            transport,
            ..ClientConfig::default()
        },
    )
    .expect("connect")
}

/// A tcp client that reads one-sidedly from the data plane rather than inline.
fn one_sided_client(kvd: &Kvd) -> Client {
    Client::connect(
        kvd.control,
        ClientConfig {
            transport: TransportChoice::Tcp,
            inline_tcp_reads: false,
            ..ClientConfig::default()
        },
    )
    .expect("connect")
}

/// Reads reuse a block's descriptor with no lookup, for a long time: only verification can
/// tell them the block is gone.
fn caching_reader(kvd: &Kvd, transport: TransportChoice) -> Client {
    Client::connect(
        kvd.control,
        ClientConfig {
            transport,
            inline_tcp_reads: false,
            descriptor_ttl: Duration::from_secs(600),
            ..ClientConfig::default()
        },
    )
    .expect("connect")
}

fn kvctl(kvd: &Kvd, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--addr")
        .arg(kvd.control.to_string())
        .args(args)
        .output()
        .expect("run kvctl")
}

fn value(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

#[test]
fn library_and_kvctl_round_trip_and_a_restart_serves_flushed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let data_dir_arg = data_dir.to_str().unwrap();
    let args = [
        "--data-dir",
        data_dir_arg,
        "--dram-mib",
        "64",
        "--nvme-mib",
        "128",
    ];
    let kvd = start_kvd(&args);
    let mut rng = StdRng::seed_from_u64(5);
    let tcp = client(&kvd, TransportChoice::Tcp);
    let one_sided = one_sided_client(&kvd);
    let shm = client(&kvd, TransportChoice::Shm);
    assert_eq!(tcp.transport_name(), "tcp");
    assert_eq!(shm.transport_name(), "shm");
    let mut stored = Vec::new();
    for i in 0..60 {
        let len = match i % 3 {
            0 => rng.random_range(0..4096),
            1 => rng.random_range(16 << 10..600 << 10),
            _ => rng.random_range(1 << 20..3 << 20),
        };
        let key = format!("chain/{i}").into_bytes();
        let v = value(&mut rng, len);
        let writer = if i % 2 == 0 { &tcp } else { &shm };
        writer.put(&key, &v).unwrap();
        stored.push((key, v));
    }
    for (key, v) in &stored {
        assert_eq!(tcp.get(key).unwrap().as_deref(), Some(&v[..]), "tcp get");
        assert_eq!(
            one_sided.get(key).unwrap().as_deref(),
            Some(&v[..]),
            "one-sided tcp get"
        );
        assert_eq!(shm.get(key).unwrap().as_deref(), Some(&v[..]), "shm get");
        let mut buf = vec![0xaa; v.len() + 10];
        assert_eq!(shm.get_into(key, &mut buf).unwrap(), Some(v.len()));
        assert_eq!(&buf[..v.len()], &v[..]);
        assert!(buf[v.len()..].iter().all(|&b| b == 0xaa));
    }
    let chain: Vec<&[u8]> = stored.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(tcp.prefix_match(&chain).unwrap(), chain.len());
    assert_eq!(
        tcp.exists(&[b"chain/0", b"nope"]).unwrap(),
        vec![true, false]
    );
    for reader in [&tcp, &one_sided, &shm] {
        assert!(matches!(
            reader.get_into(&stored[1].0, &mut [0u8; 3]),
            Err(ClientError::BufferTooSmall { .. })
        ));
    }
    // Batches: one lookup, then all the reads; a miss and a short buffer answered per item.
    // The second round finds the descriptors of the one-sided readers cached.
    for (reader, round) in [&tcp, &one_sided, &shm]
        .into_iter()
        .flat_map(|r| [(r, 0), (r, 1)])
    {
        let cached_before = reader.cached_reads();
        let mut bufs: Vec<Vec<u8>> = stored
            .iter()
            .take(7)
            .map(|(_, v)| vec![0; v.len()])
            .collect();
        bufs.push(vec![0; 10]);
        bufs.push(vec![0; 1]);
        let mut keys: Vec<&[u8]> = stored.iter().take(7).map(|(k, _)| k.as_slice()).collect();
        keys.push(b"no-such-key");
        keys.push(stored[1].0.as_slice());
        let mut items: Vec<(&[u8], &mut [u8])> = keys
            .iter()
            .zip(bufs.iter_mut())
            .map(|(k, b)| (*k, b.as_mut_slice()))
            .collect();
        let lookups = || metric(&kvd, "mooncake_requests_total{kind=\"lookup\"}");
        let lookups_before = lookups();
        let results = reader.get_into_batch(&mut items);
        if std::ptr::eq(reader, &tcp) {
            // Inline over tcp: one lookup whose answer brings every block, a round trip for
            // the batch rather than one per item.
            assert_eq!(
                lookups() - lookups_before,
                1,
                "lookups for one inline batch"
            );
        }
        for (i, (_, v)) in stored.iter().take(7).enumerate() {
            assert_eq!(results[i].as_ref().unwrap(), &Some(v.len()));
            assert_eq!(&bufs[i], v, "batch item {i}");
        }
        assert!(matches!(results[7], Ok(None)));
        assert!(matches!(
            results[8],
            Err(ClientError::BufferTooSmall { .. })
        ));
        let cached = reader.cached_reads() - cached_before;
        // The inline tcp reader has no descriptors to keep.
        if round == 1 && !std::ptr::eq(reader, &tcp) {
            assert!(
                cached >= 7,
                "{cached} of 7 batch items read by cached descriptor"
            );
        }
    }
    // The inline path skipped the block it could not deliver and stays in step.
    assert_eq!(
        tcp.get(&stored[1].0).unwrap().as_deref(),
        Some(&stored[1].1[..])
    );
    assert_eq!(tcp.remove(&[b"chain/59"]).unwrap(), vec![true]);
    assert_eq!(tcp.get(b"chain/59").unwrap(), None);
    stored.pop();

    // kvctl: put a file, get it back into another, byte-exact; stat and exists.
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    let v = value(&mut rng, 300_000);
    std::fs::write(&input, &v).unwrap();
    let put = kvctl(&kvd, &["put", "from-kvctl", input.to_str().unwrap()]);
    assert!(put.status.success(), "{put:?}");
    let get = kvctl(&kvd, &["get", "from-kvctl", "-o", output.to_str().unwrap()]);
    assert!(get.status.success(), "{get:?}");
    assert_eq!(std::fs::read(&output).unwrap(), v);
    assert_eq!(tcp.get(b"from-kvctl").unwrap().as_deref(), Some(&v[..]));
    let missing = kvctl(&kvd, &["get", "no-such-key"]);
    assert_eq!(missing.status.code(), Some(1));
    let stat = kvctl(&kvd, &["--json", "stat"]);
    assert!(stat.status.success());
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(stat["serving"], true);
    // Each tier by its name, fastest first: this node has DRAM and an NVMe file.
    let tiers: Vec<&str> = stat["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap())
        .collect();
    assert_eq!(tiers, ["dram", "nvme"]);
    assert!(stat["tiers"][0]["blocks"].as_u64().unwrap() > 0, "{stat}");
    let exists = kvctl(&kvd, &["exists", "from-kvctl", "nope"]);
    assert_eq!(
        String::from_utf8_lossy(&exists.stdout),
        "from-kvctl present\nnope absent\n"
    );
    stored.push((b"from-kvctl".to_vec(), v));

    // Metrics over HTTP.
    let metrics = http_get(kvd.metrics());
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("mooncake_requests_total{kind=\"put\"}"));

    // SIGTERM: exit 0, everything flushed; a new kvd on the same directory serves it all.
    drop((tcp, one_sided, shm));
    let status = kvd.terminate();
    assert!(status.success(), "kvd exit status {status}");
    let kvd = start_kvd(&args);
    let again = client(&kvd, TransportChoice::Auto);
    for (key, v) in &stored {
        assert_eq!(
            again.get(key).unwrap().as_deref(),
            Some(&v[..]),
            "after restart: {}",
            String::from_utf8_lossy(key)
        );
    }
    assert_eq!(
        again.get(b"chain/59").unwrap(),
        None,
        "a removed block stays removed"
    );
}

#[test]
fn a_large_inline_batch_is_read_over_several_connections_and_answered_in_order() {
    let kvd = start_kvd(&["--memory-only", "--dram-mib", "128"]);
    let mut rng = StdRng::seed_from_u64(9);
    let writer = client(&kvd, TransportChoice::Tcp);
    // 12 values of 1 to 2 MiB, and a miss with a 2 MiB buffer: at least 13 MiB of buffers,
    // room for three lanes of 4 MiB.
    let stored: Vec<(Vec<u8>, Vec<u8>)> = (0..12)
        .map(|i| {
            let len = rng.random_range(1 << 20..2 << 20);
            (format!("lanes/{i}").into_bytes(), value(&mut rng, len))
        })
        .collect();
    for (key, v) in &stored {
        writer.put(key, v).unwrap();
    }
    let lookups = || metric(&kvd, "mooncake_requests_total{kind=\"lookup\"}");
    for (lanes, expected_lookups) in [(3, 3), (1, 1)] {
        let reader = Client::connect(
            kvd.control,
            ClientConfig {
                transport: TransportChoice::Tcp,
                batch_lanes: lanes,
                ..ClientConfig::default()
            },
        )
        .expect("connect");
        // Every value into a buffer of its size, but a miss (with a buffer as large as
        // any) at 4 and a buffer too small at 8: each run answers its own, in order.
        let mut keys: Vec<&[u8]> = stored.iter().map(|(k, _)| k.as_slice()).collect();
        keys.insert(4, b"lanes/none");
        let mut bufs: Vec<Vec<u8>> = stored.iter().map(|(_, v)| vec![0; v.len()]).collect();
        bufs.insert(4, vec![0; 2 << 20]);
        bufs[8] = vec![0; 10];
        let mut items: Vec<(&[u8], &mut [u8])> = keys
            .iter()
            .zip(bufs.iter_mut())
            .map(|(k, b)| (*k, b.as_mut_slice()))
            .collect();
        let before = lookups();
        let results = reader.get_into_batch(&mut items);
        assert_eq!(
            lookups() - before,
            expected_lookups,
            "lookups with {lanes} lanes"
        );
        assert_eq!(results.len(), keys.len());
        for (i, (result, buf)) in results.iter().zip(&bufs).enumerate() {
            let stored_at = if i < 4 { Some(i) } else { i.checked_sub(1) };
            match (i, result) {
                (4, Ok(None)) => {}
                (8, Err(ClientError::BufferTooSmall { needed, .. })) => {
                    assert_eq!(*needed, stored[7].1.len());
                }
                (_, Ok(Some(len))) if i != 4 && i != 8 => {
                    let v = &stored[stored_at.unwrap()].1;
                    assert_eq!(*len, v.len(), "item {i}");
                    assert!(buf == v, "item {i} read back wrong with {lanes} lanes");
                }
                (_, other) => panic!("item {i} with {lanes} lanes: {other:?}"),
            }
        }
    }
}

#[test]
fn a_batch_from_a_node_that_stops_answering_costs_a_few_timeouts_not_one_per_item() {
    let kvd = start_kvd(&["--memory-only", "--dram-mib", "64"]);
    let reader = Client::connect(
        kvd.control,
        ClientConfig {
            transport: TransportChoice::Tcp,
            timeout: Duration::from_millis(500),
            ..ClientConfig::default()
        },
    )
    .expect("connect");
    let keys: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("frozen/{i}").into_bytes())
        .collect();
    for key in &keys {
        reader.put(key, &[7u8; 4096]).unwrap();
    }
    // The node stops (SIGSTOP): the kernel still accepts connections, nothing answers.
    kvd.pause();
    let mut bufs = vec![vec![0u8; 4096]; keys.len()];
    let mut items: Vec<(&[u8], &mut [u8])> = keys
        .iter()
        .zip(bufs.iter_mut())
        .map(|(k, b)| (k.as_slice(), b.as_mut_slice()))
        .collect();
    let started = std::time::Instant::now();
    let results = reader.get_into_batch(&mut items);
    let took = started.elapsed();
    kvd.send(rustix::process::Signal::CONT);
    for (i, result) in results.iter().enumerate() {
        assert!(
            matches!(result, Err(ClientError::Io { .. })),
            "item {i}: {result:?}"
        );
    }
    // The batch, its connection opened again once, and once more as a batch: a few
    // timeouts of 0.5 s. A connection per item would be 20 of them, 10 s.
    assert!(
        took < Duration::from_secs(5),
        "the batch failed after {took:?}"
    );
    // Running again, the node serves the same client.
    let mut buf = [0u8; 4096];
    assert_eq!(reader.get_into(&keys[0], &mut buf).unwrap(), Some(4096));
}

fn http_get(url: &str) -> String {
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn bad_input_is_refused_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "open sesame\n").unwrap();
    let kvd = start_kvd(&[
        "--memory-only",
        "--dram-mib",
        "128",
        "--token-file",
        token.to_str().unwrap(),
        "--no-shm",
    ]);
    let good = Client::connect(
        kvd.control,
        ClientConfig {
            token: Some(b"open sesame".to_vec()),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    good.put(b"k", b"value").unwrap();

    // No token, wrong token.
    for token in [None, Some(b"open sesamE".to_vec())] {
        match Client::connect(
            kvd.control,
            ClientConfig {
                token,
                ..ClientConfig::default()
            },
        ) {
            Err(ClientError::Refused(reply)) => assert_eq!(reply.code, ErrorCode::Unauthorized),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    // Garbage, a truncated header, an oversize length: an error frame or a closed connection.
    let mut rng = StdRng::seed_from_u64(9);
    for round in 0..50 {
        let mut s = TcpStream::connect(kvd.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let len = rng.random_range(1..200);
        let junk = value(&mut rng, len);
        let mut frame = junk.clone();
        if round % 2 == 0 {
            // A valid header claiming a body far over the limit.
            frame = b"MKCP".to_vec();
            frame
                .extend_from_slice(&mooncake_kv_replication::proto::PROTOCOL_VERSION.to_le_bytes());
            frame.extend_from_slice(&[0, 0]);
            frame.extend_from_slice(&7u64.to_le_bytes());
            frame.extend_from_slice(&u32::MAX.to_le_bytes());
            frame.extend_from_slice(&[0; 8]);
            let crc = crc32(&frame);
            frame.extend_from_slice(&crc.to_le_bytes());
        }
        let _ = s.write_all(&frame);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(answer.len() < 4096, "a refusal is short");
    }

    // An oversize value: refused with a typed error (by the client, before sending it), the
    // connection stays usable.
    let big = vec![1u8; mooncake_kv_engine::MAX_VALUE_BYTES + 1];
    match good.put(b"big", &big) {
        Err(ClientError::Refused(reply)) => assert_eq!(reply.code, ErrorCode::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match good.put(&vec![b'k'; mooncake_kv_engine::MAX_KEY_BYTES + 1], b"v") {
        Err(ClientError::Refused(reply)) => assert_eq!(reply.code, ErrorCode::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }

    // The data plane: a wrong remote key and an out-of-bounds read are refused.
    let hello = good.hello().clone();
    let data = TcpTransport::new(kvd.data, 1, Duration::from_secs(5)).unwrap();
    let mut buf = [0u8; 16];
    let wrong_key = data.read(
        RemoteSlice {
            region_id: hello.region_id,
            offset: 0,
            remote_key: hello.remote_key ^ 1,
        },
        &mut buf,
    );
    assert!(matches!(
        wrong_key,
        Err(mooncake_kv_transfer::Error::BadRemoteKey { .. })
    ));
    let outside = data.read(
        RemoteSlice {
            region_id: hello.region_id,
            offset: hello.region_len - 8,
            remote_key: hello.remote_key,
        },
        &mut buf,
    );
    assert!(matches!(
        outside,
        Err(mooncake_kv_transfer::Error::OutOfBounds { .. })
    ));

    // After all that, the node still serves.
    assert_eq!(good.get(b"k").unwrap().as_deref(), Some(&b"value"[..]));
    assert!(good.health().unwrap());
    let fresh = Client::connect(
        kvd.control,
        ClientConfig {
            token: Some(b"open sesame".to_vec()),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    assert_eq!(fresh.get(b"k").unwrap().as_deref(), Some(&b"value"[..]));
    assert!(fresh.stats().unwrap().errors >= 1);
    assert!(kvd.terminate().success());
}

/// A foreign client that announces a value over the limit: the node answers TooLarge and
/// closes, without reading (or allocating for) the value.
fn oversize_put_from_a_raw_socket(kvd: &Kvd) {
    use mooncake_kv_replication::proto::{
        Request, Response, decode_response, encode_body, read_frame, write_frame,
    };
    let mut s = TcpStream::connect(kvd.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut body = Vec::new();
    for (id, request) in [
        (
            1,
            Request::Hello {
                token: b"open sesame",
            },
        ),
        (
            2,
            Request::Put {
                items: vec![(b"big".as_slice(), u32::MAX)],
                durable: false,
                chain: None,
            },
        ),
    ] {
        write_frame(&mut s, id, &encode_body(&request)).unwrap();
        read_frame(&mut s, &mut body).unwrap().expect("an answer");
    }
    match decode_response(&body).unwrap() {
        Response::Error(reply) => assert_eq!(reply.code, ErrorCode::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        read_frame(&mut s, &mut body).unwrap().is_none(),
        "then closed"
    );
}

#[test]
fn values_over_the_limit_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "open sesame").unwrap();
    let kvd = start_kvd(&["--memory-only", "--token-file", token.to_str().unwrap()]);
    oversize_put_from_a_raw_socket(&kvd);
    let client = Client::connect(
        kvd.control,
        ClientConfig {
            token: Some(b"open sesame".to_vec()),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    client.put(b"after", b"still serving").unwrap();
    assert_eq!(
        client.get(b"after").unwrap().as_deref(),
        Some(&b"still serving"[..])
    );
    assert!(client.stats().unwrap().errors >= 1);
    assert!(kvd.terminate().success());
}

/// One counter of the node's `/metrics`.
fn metric(kvd: &Kvd, name: &str) -> u64 {
    mooncake_kv_test_support::metric(&http_get(kvd.metrics()), name)
}

fn crc32(bytes: &[u8]) -> u32 {
    // The frame header's CRC covers bytes 0..28; computed here without the crate's helper so
    // the test builds frames the way a foreign client would.
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Two memory-only nodes on system-chosen ports each serve shared memory on a socket of
/// their own (they once shared one name, and the second took over the first's), and a
/// second node started on a node's fixed address fails without breaking its socket.
#[test]
fn each_node_keeps_its_own_shared_memory_socket() {
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let a = start_kvd_listening(&format!("127.0.0.1:{free_port}"), &["--memory-only"]);
    let b = start_kvd(&["--memory-only"]);
    let c = start_kvd(&["--memory-only"]);
    for (kvd, value) in [(&a, b"from a"), (&b, b"from b"), (&c, b"from c")] {
        client(kvd, TransportChoice::Tcp).put(b"k", value).unwrap();
    }
    let read_over_shm = |kvd: &Kvd| {
        let reader = client(kvd, TransportChoice::Shm);
        assert_eq!(reader.transport_name(), "shm");
        reader.get(b"k").unwrap()
    };
    assert_eq!(read_over_shm(&a).as_deref(), Some(&b"from a"[..]));
    assert_eq!(read_over_shm(&b).as_deref(), Some(&b"from b"[..]));
    assert_eq!(read_over_shm(&c).as_deref(), Some(&b"from c"[..]));
    let duplicate = Command::new(env!("CARGO_BIN_EXE_mooncake-kvd"))
        .args(["--memory-only", "--listen", &a.control.to_string()])
        .args([
            "--data-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run a second kvd");
    assert!(
        !duplicate.status.success(),
        "a second node on a taken address started"
    );
    assert_eq!(read_over_shm(&a).as_deref(), Some(&b"from a"[..]));
    // A node killed outright leaves its pid-named socket; the next such node removes it.
    let b_socket = std::env::temp_dir().join(format!("mooncake-kvd-pid{}.sock", b.child().id()));
    assert!(b_socket.exists(), "{}", b_socket.display());
    drop(b);
    assert!(b_socket.exists(), "SIGKILL leaves the socket behind");
    let d = start_kvd(&["--memory-only"]);
    assert!(!b_socket.exists(), "the orphaned socket is still there");
    assert_eq!(read_over_shm(&c).as_deref(), Some(&b"from c"[..]));
    for kvd in [a, c, d] {
        assert!(kvd.terminate().success());
    }
}

/// A reader's cached descriptors never outlive the blocks they describe: once another client
/// has removed or replaced a block and the last lease on it has ended, its space is freed
/// and the reader sees that (over shm by the header the node zeroed, over tcp by the
/// checksum), with no lookup to tell it. The reader's own writes show at once.
#[test]
fn cached_descriptors_do_not_outlive_their_blocks() {
    let kvd = start_kvd(&["--memory-only", "--lease-ms", "100"]);
    let writer = client(&kvd, TransportChoice::Tcp);
    let mut rng = StdRng::seed_from_u64(21);
    for (round, transport) in [TransportChoice::Shm, TransportChoice::Tcp]
        .into_iter()
        .enumerate()
    {
        let reader = caching_reader(&kvd, transport);
        let name = reader.transport_name();
        // The new values are larger than the three old blocks together, so they cannot land
        // in the space the old blocks leave: only the node's zeroing of a freed block's header
        // (or, over tcp, the checksum of that zeroed header) tells the reader.
        let (old, new) = (value(&mut rng, 40_000), value(&mut rng, 200_000));
        let keys = [b"gone".as_slice(), b"replaced", b"own"].map(|k| [name.as_bytes(), k].concat());
        for key in &keys {
            writer.put(key, &old).unwrap();
        }
        for key in &keys {
            // The first read looks up; the second goes by the cached descriptor.
            for _ in 0..2 {
                assert_eq!(
                    reader.get(key).unwrap().as_deref(),
                    Some(&old[..]),
                    "{name}"
                );
            }
        }
        assert_eq!(reader.cached_reads(), 3, "{name}: the cache was not used");

        writer.remove(&[&keys[0]]).unwrap();
        writer.put(&keys[1], &new).unwrap();
        reader.put(&keys[2], &new).unwrap();
        assert_eq!(
            reader.get(&keys[2]).unwrap().as_deref(),
            Some(&new[..]),
            "{name}"
        );
        // That read's lookup reported the cached reads to the node, which no lookup showed.
        assert_eq!(
            metric(&kvd, "mooncake_cached_reads_total"),
            3 * (round as u64 + 1),
            "{name}"
        );
        // The leases this reader took end, and with them the old blocks.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            reader.get(&keys[0]).unwrap(),
            None,
            "{name}: removed block read"
        );
        assert_eq!(
            reader.get(&keys[1]).unwrap().as_deref(),
            Some(&new[..]),
            "{name}: replaced block read"
        );
        assert!(reader.verification_retries() >= 2, "{name}");
    }
    assert!(kvd.terminate().success());
}

/// Reads served from a cached descriptor count as uses for eviction once the reader's next
/// lookup reports them: under LRU, a block read that way all along outlives the blocks put
/// after it, where without the report its one lookup would leave it the coldest.
#[test]
fn reads_by_cached_descriptor_keep_a_block_warm() {
    let kvd = start_kvd(&[
        "--memory-only",
        "--dram-mib",
        "4",
        "--eviction-policy",
        "lru",
        "--lease-ms",
        "50",
    ]);
    let writer = client(&kvd, TransportChoice::Tcp);
    let reader = caching_reader(&kvd, TransportChoice::Shm);
    let mut rng = StdRng::seed_from_u64(5);
    let hot = value(&mut rng, 64 << 10);
    writer.put(b"hot", &hot).unwrap();
    // One lookup, then the lease it took ends: from here on only cached reads touch it.
    assert_eq!(reader.get(b"hot").unwrap().as_deref(), Some(&hot[..]));
    std::thread::sleep(Duration::from_millis(200));
    let filler = value(&mut rng, 64 << 10);
    // About 62 blocks fit in 4 MiB: 200 puts evict most of them.
    for i in 0..200 {
        writer.put(format!("cold-{i}").as_bytes(), &filler).unwrap();
        assert_eq!(
            reader.get(b"hot").unwrap().as_deref(),
            Some(&hot[..]),
            "put {i}: the block read by cached descriptor was evicted"
        );
        // A lookup (of a key that has no block) carries the report of the cached read.
        assert_eq!(reader.get(b"absent").unwrap(), None);
    }
    assert_eq!(reader.cached_reads(), 200);
    assert_eq!(
        writer.exists(&[b"cold-0", b"cold-199"]).unwrap(),
        [false, true]
    );
    assert!(kvd.terminate().success());
}

/// The race test: a writer process keeps overwriting a small key space on a node whose DRAM
/// holds a fraction of it (memory only, so eviction drops blocks and their space is reused at
/// once), while reader processes hammer verified reads: one-sided over tcp and shared memory,
/// and inline over tcp.
/// Every value carries its key and a checkable pattern; not one may come back wrong.
///
/// Run three times: with leases (a block being read stays put), and with none at all, where
/// only the client's verification stands between a reader and a reused slot; the third time
/// with 1 MiB values, which the node places further into their space so that their payloads
/// start on a page (the header a stale reader checks is then not at the space's start).
#[test]
fn verified_reads_never_return_wrong_bytes_while_slots_are_reused() {
    race(&["--lease-ms", "50"], "65536", "600");
    let retries = race(&["--max-leases", "0"], "65536", "600");
    eprintln!("without leases: {retries} reads failed verification and were looked up again");
    let retries = race(&["--max-leases", "0"], "1048576", "40");
    eprintln!("1 MiB values: {retries} reads failed verification and were looked up again");
}

/// Returns the reads that failed verification and were retried.
fn race(extra: &[&str], value_size: &str, keys: &str) -> u64 {
    let mut args = vec!["--memory-only", "--dram-mib", "16"];
    args.extend_from_slice(extra);
    let kvd = start_kvd(&args);
    let seconds = std::env::var("RACE_SECONDS").unwrap_or_else(|_| "4".to_owned());
    let bench = |transport: &str, read_percent: &str, seed: &str| {
        let (transport, one_sided, batch) = match transport {
            "one-sided" => ("tcp", true, "1"),
            "shm-batch" => ("shm", false, "8"),
            other => (other, false, "1"),
        };
        Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .args(one_sided.then_some("--one-sided"))
            .args([
                "--addr",
                &kvd.control.to_string(),
                "--json",
                "--transport",
                transport,
            ])
            .args([
                "bench",
                "--value-size",
                value_size,
                "--keys",
                keys,
                "--concurrency",
                "2",
            ])
            .args([
                "--key-prefix",
                "race/",
                "--duration",
                &seconds,
                "--seed",
                seed,
            ])
            .args(["--read-percent", read_percent, "--batch", batch])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kvctl bench")
    };
    let writer = bench("tcp", "0", "11");
    std::thread::sleep(Duration::from_millis(300));
    let tcp_reader = bench("one-sided", "100", "12");
    let inline_reader = bench("tcp", "100", "14");
    let shm_reader = bench("shm", "100", "13");
    let batch_reader = bench("shm-batch", "100", "15");
    let (mut total_reads, mut retries) = (0, 0);
    for (name, child) in [
        ("writer", writer),
        ("one-sided tcp reader", tcp_reader),
        ("inline tcp reader", inline_reader),
        ("shm reader", shm_reader),
        ("batched shm reader", batch_reader),
    ] {
        let out = child.wait_with_output().expect("bench output");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        eprintln!("{name}: {report}");
        assert_eq!(report["wrong_values"], 0, "{name} read wrong bytes");
        assert!(out.status.success(), "{name}: {:?}", out.status);
        if name != "writer" {
            let reads = report["reads"].as_u64().unwrap();
            let misses = report["misses"].as_u64().unwrap();
            assert!(reads > 100, "{name} barely ran: {report}");
            assert!(reads > misses, "{name} never hit: {report}");
            total_reads += reads - misses;
            retries += report["verification_retries"].as_u64().unwrap();
        }
    }
    assert!(total_reads > 0);
    // The node counts the retries the clients reported with their next lookups (a retry
    // that ended a read as stale is never reported, so the node may count fewer).
    let reported = metric(&kvd, "mooncake_verification_retries_total");
    eprintln!("retries: {retries} seen by the readers, {reported} reported to the node");
    assert!(reported <= retries);
    assert!(
        retries == 0 || reported > 0,
        "retries never reached the node"
    );
    assert!(kvd.terminate().success());
    retries
}
