//! `kvctl` against a running node: stat, get, put, del, exists, cluster, bench.

use super::*;
use mooncake_kv_tools::bench::{self, BenchOptions};

pub(super) fn stat(cli: &Cli) -> anyhow::Result<ExitCode> {
    let client = connect(cli)?;
    let stats = client.stats()?;
    let serving = client.health()?;
    if cli.json {
        let per_tier: Vec<_> = stats
            .tiers
            .iter()
            .map(|t| {
                json!({
                    "tier": t.tier,
                    "blocks": t.blocks,
                    "used_bytes": t.used_bytes,
                    "capacity_bytes": t.capacity_bytes,
                    "hits": t.hits,
                    "evictions": t.evictions,
                })
            })
            .collect();
        out!(
            "{}",
            json!({
                "addr": cli.addr,
                "serving": serving,
                "node_id": hex(&client.hello().node_id),
                "transport": client.transport_name(),
                "shm_unavailable": client.shm_unavailable(),
                "tiers": per_tier,
                "requests": stats.requests,
                "errors": stats.errors,
                "leases": stats.leases,
                "connections": stats.connections,
                "unauthenticated": stats.admission.unauthenticated,
                "refused_connections": stats.admission.refused,
                "hello_timeouts": stats.admission.hello_timeouts,
            })
        );
    } else {
        out!("{:<16} {}", "node", cli.addr);
        out!("{:<16} {}", "serving", serving);
        out!("{:<16} {}", "node id", hex(&client.hello().node_id));
        match client.shm_unavailable() {
            Some(why) => out!(
                "{:<16} {} (shared memory unavailable: {why})",
                "reads via",
                client.transport_name()
            ),
            _ => out!("{:<16} {}", "reads via", client.transport_name()),
        }
        for t in &stats.tiers {
            out!(
                "{:<16} {} blocks, {} of {}, {} hits, {} evictions",
                t.tier,
                t.blocks,
                bytes(t.used_bytes),
                bytes(t.capacity_bytes),
                t.hits,
                t.evictions,
            );
        }
        let kinds = mooncake_kv_replication::proto::REQUEST_KINDS;
        let requests: Vec<String> = kinds
            .iter()
            .zip(&stats.requests)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        out!("{:<16} {}", "requests", requests.join(" "));
        out!("{:<16} {}", "errors", stats.errors);
        out!("{:<16} {}", "leases", stats.leases);
        let a = &stats.admission;
        out!(
            "{:<16} {} authenticated, {} not yet; {} closed as a budget was full, {} closed for not \
             authenticating in time",
            "connections",
            stats.connections,
            a.unauthenticated,
            a.refused,
            a.hello_timeouts
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The control addresses registered under `prefix` in etcd now.
pub(super) fn registered_members(
    endpoints: &[String],
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    use mooncake_kv_replication::membership::{EtcdConfig, EtcdMembership, Membership};
    let membership = EtcdMembership::start(EtcdConfig {
        endpoints: endpoints.to_vec(),
        prefix: prefix.to_owned(),
        ..EtcdConfig::default()
    })
    .context("cannot start an etcd client")?;
    anyhow::ensure!(
        membership.wait_synced(Duration::from_secs(5)),
        "cannot read the members from etcd at {}",
        endpoints.join(",")
    );
    Ok(membership
        .view()
        .iter()
        .map(|p| p.addr.to_string())
        .collect())
}

pub(super) fn cluster(cli: &Cli, peers: &[String]) -> anyhow::Result<ExitCode> {
    let config = ClientConfig {
        token: token(cli)?,
        transport: TransportChoice::Tcp,
        connections: 1,
        timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let mut rows = Vec::new();
    let (mut live, mut under) = (0usize, 0u64);
    for peer in peers {
        let row = match Client::connect(peer.as_str(), config.clone())
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok((hex(&c.hello().node_id), c.stats()?)))
        {
            Ok((id, stats)) => {
                live += 1;
                let repair = stats.repair.unwrap_or_default();
                under += repair.under_replicated;
                json!({
                    "addr": peer,
                    "state": "live",
                    "node_id": id,
                    "tiers": stats.tiers.iter().map(|t| json!({
                        "tier": t.tier,
                        "blocks": t.blocks,
                        "used_bytes": t.used_bytes,
                    })).collect::<Vec<_>>(),
                    "repair": stats.repair.map(|r| json!({
                        "passes": r.passes,
                        "blocks_copied": r.blocks_copied,
                        "failures": r.failures,
                        "under_replicated": r.under_replicated,
                    })),
                })
            }
            Err(error) => {
                json!({ "addr": peer, "state": "unreachable", "error": error.to_string() })
            }
        };
        rows.push(row);
    }
    if cli.json {
        out!(
            "{}",
            json!({ "members": rows, "live": live, "total": peers.len(), "under_replicated": under })
        );
    } else {
        out!(
            "{:<22} {:<12} {:<34} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
            "MEMBER",
            "STATE",
            "NODE ID",
            "HBM",
            "DRAM",
            "NVME",
            "PASSES",
            "COPIED",
            "UNDER"
        );
        for r in &rows {
            let n = |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |x| x.to_string());
            // Blocks on the tier named `name`, "-" where the member has none.
            let blocks = |name: &str| {
                let tiers = r["tiers"].as_array().map_or(&[][..], Vec::as_slice);
                tiers
                    .iter()
                    .find(|t| t["tier"] == name)
                    .map_or("-".to_owned(), |t| n(&t["blocks"]))
            };
            out!(
                "{:<22} {:<12} {:<34} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
                r["addr"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["node_id"].as_str().unwrap_or("-"),
                blocks("hbm"),
                blocks("dram"),
                blocks("nvme"),
                n(&r["repair"]["passes"]),
                n(&r["repair"]["blocks_copied"]),
                n(&r["repair"]["under_replicated"]),
            );
            if let Some(error) = r["error"].as_str() {
                out!("  {error}");
            }
        }
        out!(
            "{live} of {} members live; {under} blocks under-replicated",
            peers.len()
        );
    }
    Ok(if live == peers.len() && under == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(super) fn get(cli: &Cli, key: &str, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let key_bytes = parse_key(key).map_err(anyhow::Error::msg)?;
    let client = connect(cli)?;
    let Some(value) = client.get(&key_bytes)? else {
        eprintln!("kvctl: no block under {key}");
        return Ok(ExitCode::from(1));
    };
    match output {
        Some(path) => std::fs::write(path, &value)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            if let Err(error) = out.write_all(&value).and_then(|()| out.flush()) {
                crate::stdout_failed(&error);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn put(cli: &Cli, key: &str, file: &Path, durable: bool) -> anyhow::Result<ExitCode> {
    let key_bytes = parse_key(key).map_err(anyhow::Error::msg)?;
    let limit = mooncake_kv_engine::MAX_VALUE_BYTES as u64;
    let mut value = Vec::new();
    // Read at most one byte past the limit, so that an oversize input is refused here
    // without reading all of it.
    if file == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_end(&mut value)?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot open {}", file.display()))?
            .take(limit + 1)
            .read_to_end(&mut value)?;
    }
    if value.len() as u64 > limit {
        anyhow::bail!("the value is larger than the limit of {limit} bytes");
    }
    let client = connect(cli)?;
    let mut outcomes = client.put_batch(&[(&key_bytes, &value)], durable)?;
    let generation = outcomes
        .pop()
        .context("the node answered no outcome")?
        .map_err(|reply| anyhow::anyhow!("refused ({:?}): {}", reply.code, reply.message))?;
    if cli.json {
        out!(
            "{}",
            json!({ "key": key, "bytes": value.len(), "generation": generation })
        );
    } else {
        out!(
            "stored {key}: {} bytes, generation {generation}",
            value.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_flags(cli: &Cli, keys: &[String], flags: &[bool], yes: &str, no: &str) {
    if cli.json {
        let rows: Vec<_> = keys
            .iter()
            .zip(flags)
            .map(|(k, f)| json!({ "key": k, yes: f }))
            .collect();
        out!("{}", json!({ "keys": rows }));
    } else {
        for (k, f) in keys.iter().zip(flags) {
            out!("{k} {}", if *f { yes } else { no });
        }
    }
}

pub(super) fn bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let duration = Duration::try_from_secs_f64(args.duration)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--duration must be a positive number of seconds")?;
    let warm_up = Duration::try_from_secs_f64(args.warm_up)
        .context("--warm-up must be a number of seconds, 0 or more")?;
    let options = BenchOptions {
        value_bytes: usize::try_from(args.value_size)?,
        batch: usize::try_from(args.batch)?,
        concurrency: usize::try_from(args.concurrency)?,
        read_percent: args.read_percent,
        keys: args.keys,
        duration,
        count: args.count,
        prefill: !args.no_prefill,
        key_prefix: args.key_prefix.clone(),
        seed: args.seed,
        order: args.order,
        warm_up,
    };
    if let Some(redis) = &args.redis {
        anyhow::ensure!(
            options.read_percent == 100 && options.batch == 1 && options.count.is_none(),
            "--redis drives gets only, one key each, for a duration: give --read-percent 100 \
             and neither --batch nor --count"
        );
        let addr = std::net::ToSocketAddrs::to_socket_addrs(redis.as_str())
            .with_context(|| format!("--redis {redis}: not a HOST:PORT"))?
            .next()
            .with_context(|| format!("--redis {redis}: no address"))?;
        let connections = usize::try_from(args.connections.unwrap_or(1))?;
        let report = mooncake_kv_tools::loadgen::run_redis(addr, &options, connections)
            .with_context(|| format!("cannot drive Redis at {redis}"))?;
        print_redis_report(cli, redis, &options, connections, &report);
        return Ok(if report.wrong_values > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    let client = connect(cli)?;
    let show = !cli.json && std::io::stderr().is_terminal();
    if options.prefill {
        let bar = bar(show, options.keys, "prefill");
        bench::prefill(&client, &options, &|n| bar.inc(n))?;
        bar.finish_and_clear();
    }
    let bar = match options.count {
        Some(count) => bar(show, count, "bench"),
        None => bar(
            show,
            ((options.warm_up + options.duration).as_secs_f64() * 10.0) as u64,
            "bench",
        ),
    };
    let report = if let Some(connections) = args.connections {
        anyhow::ensure!(
            options.read_percent == 100 && options.batch == 1 && options.count.is_none(),
            "--connections drives gets only, one key each, for a duration: give \
             --read-percent 100 and neither --batch nor --count"
        );
        let addr = client.control_addr();
        let token = token(cli)?.unwrap_or_default();
        bar.finish_and_clear();
        mooncake_kv_tools::loadgen::run(addr, &token, &options, usize::try_from(connections)?)
            .context("cannot drive the connections")?
    } else if options.count.is_some() {
        bench::run(&client, &options, &|n| bar.inc(n))
    } else {
        let ticker = {
            let bar = bar.clone();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s = std::sync::Arc::clone(&stop);
            let h = std::thread::spawn(move || {
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    bar.inc(1);
                }
            });
            (stop, h)
        };
        let report = bench::run(&client, &options, &|_| {});
        ticker.0.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = ticker.1.join();
        report
    };
    bar.finish_and_clear();
    let memcpy = args
        .memcpy_reference
        .then(|| bench::memcpy_reference(options.value_bytes, 1.0, false));
    let memcpy_random = args
        .memcpy_reference
        .then(|| bench::memcpy_reference(options.value_bytes, 1.0, true));
    let raw_tcp = if args.tcp_reference {
        bench::raw_tcp_reference(options.value_bytes, 2.0)
    } else {
        None
    };
    // One reader thread's bytes per second of time spent in reads, next to one memcpy
    // thread's.
    let per_thread = report.read_mib_per_busy_second;
    let transport = if args.connections.is_some() {
        "tcp (inline, event loop)"
    } else {
        client.transport_name()
    };
    let q = |x: &bench::Quantiles| json!({ "p50_us": x.p50_us, "p99_us": x.p99_us, "p999_us": x.p999_us });
    if cli.json {
        out!(
            "{}",
            json!({
                "addr": cli.addr,
                "transport": transport,
                "shm_unavailable": client.shm_unavailable(),
                "value_bytes": options.value_bytes,
                "batch": options.batch,
                "concurrency": options.concurrency,
                "connections": args.connections,
                "read_percent": options.read_percent,
                "seconds": report.elapsed.as_secs_f64(),
                "reads": report.reads,
                "misses": report.misses,
                "writes": report.writes,
                "ops_per_second": report.ops_per_second(),
                "mib_per_second": report.mib_per_second(),
                "read_latency": q(&report.read_latency),
                // --connections only: to the first bytes of each answer, as redis-benchmark
                // times a request.
                "read_first_byte": args.connections.map(|_| q(&report.read_first_byte)),
                "write_latency": q(&report.write_latency),
                "wrong_values": report.wrong_values,
                "errors": report.errors,
                "first_error": report.first_error,
                "verification_retries": report.verification_retries,
                "cached_reads": report.cached_reads,
                "warm_up_ops": report.warm_up_ops,
                "memcpy_mib_per_second": memcpy,
                "read_mib_per_busy_second": per_thread,
                "ratio_to_memcpy_per_thread": memcpy.map(|m| per_thread / m),
                "memcpy_random_mib_per_second": memcpy_random,
                "ratio_to_random_memcpy_per_thread": memcpy_random.map(|m| per_thread / m),
                "raw_tcp_mib_per_second": raw_tcp,
                "ratio_to_raw_tcp": raw_tcp.map(|r| per_thread / r),
            })
        );
    } else {
        out!(
            "{} ops in {:.2} s over {}: {:.0} ops/s, {:.1} MiB/s",
            report.reads + report.writes,
            report.elapsed.as_secs_f64(),
            transport,
            report.ops_per_second(),
            report.mib_per_second()
        );
        for (what, n, l) in [
            ("reads", report.reads, &report.read_latency),
            ("writes", report.writes, &report.write_latency),
        ] {
            if n > 0 {
                out!(
                    "{what:<7} {n:>10}  p50 {:>9.1} us  p99 {:>9.1} us  p999 {:>9.1} us",
                    l.p50_us,
                    l.p99_us,
                    l.p999_us
                );
            }
        }
        if args.connections.is_some() {
            print_first_byte(&report.read_first_byte);
        }
        out!(
            "misses {}, errors {}, wrong values {}, verification retries {}, reads without a \
             lookup (cached descriptor) {}",
            report.misses,
            report.errors,
            report.wrong_values,
            report.verification_retries,
            report.cached_reads
        );
        if let Some(error) = &report.first_error {
            out!("first error: {error}");
        }
        if let Some(r) = raw_tcp {
            out!(
                "raw TCP loopback of the same size, one stream: {r:.1} MiB/s; reads, per \
                 second spent in them: {per_thread:.1} MiB/s ({:.2}x)",
                per_thread / r
            );
        }
        if let (Some(m), Some(r)) = (memcpy, memcpy_random) {
            out!(
                "memcpy of the same size, one thread: {m:.1} MiB/s in order, {r:.1} MiB/s \
                 in a random order; reads, per second spent in them: {per_thread:.1} MiB/s \
                 ({:.2}x, {:.2}x)",
                per_thread / m,
                per_thread / r
            );
        }
    }
    Ok(if report.wrong_values > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kvctl bench --redis`'s report: the figures of the node's, for the same loop over Redis.
fn print_redis_report(
    cli: &Cli,
    redis: &str,
    options: &BenchOptions,
    connections: usize,
    report: &bench::BenchReport,
) {
    let (l, f) = (&report.read_latency, &report.read_first_byte);
    if cli.json {
        out!(
            "{}",
            json!({
                "addr": redis,
                "transport": "redis (RESP GET, event loop)",
                "value_bytes": options.value_bytes,
                "concurrency": options.concurrency,
                "connections": connections,
                "seconds": report.elapsed.as_secs_f64(),
                "reads": report.reads,
                "misses": report.misses,
                "ops_per_second": report.ops_per_second(),
                "mib_per_second": report.mib_per_second(),
                "read_latency": json!({ "p50_us": l.p50_us, "p99_us": l.p99_us, "p999_us": l.p999_us }),
                "read_first_byte": json!({ "p50_us": f.p50_us, "p99_us": f.p99_us, "p999_us": f.p999_us }),
                "wrong_values": report.wrong_values,
                "errors": report.errors,
                "first_error": report.first_error,
                "warm_up_ops": report.warm_up_ops,
            })
        );
    } else {
        out!(
            "{} gets in {:.2} s from Redis at {redis} over {connections} connections: {:.0} \
             ops/s, {:.1} MiB/s",
            report.reads,
            report.elapsed.as_secs_f64(),
            report.ops_per_second(),
            report.mib_per_second()
        );
        out!(
            "reads   {:>10}  p50 {:>9.1} us  p99 {:>9.1} us  p999 {:>9.1} us",
            report.reads,
            l.p50_us,
            l.p99_us,
            l.p999_us
        );
        print_first_byte(f);
        out!(
            "misses {}, errors {}, wrong values {}",
            report.misses,
            report.errors,
            report.wrong_values
        );
        if let Some(error) = &report.first_error {
            out!("first error: {error}");
        }
    }
}

/// The load generator's time to the first bytes of each answer, under the reads' line.
fn print_first_byte(f: &bench::Quantiles) {
    out!(
        "  to first byte  p50 {:>9.1} us  p99 {:>9.1} us  p999 {:>9.1} us (as redis-benchmark \
         times a request)",
        f.p50_us,
        f.p99_us,
        f.p999_us
    );
}

fn bar(show: bool, len: u64, what: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}") {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}
