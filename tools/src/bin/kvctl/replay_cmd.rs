//! `kvctl replay`: a request trace replayed against simulated caches, the engine or real nodes.

use super::*;
use mooncake_kv_tools::replay::{self, EngineReplay, Trace};

pub(super) fn run(cli: &Cli, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let trace = Trace::load(&args.trace, args.tokens_per_block)?;
    let unique = trace.unique_blocks();
    let ceiling = trace.ceiling();
    let quiet = cli.json || !std::io::stderr().is_terminal();
    if !cli.json {
        out!(
            "trace {}: {} requests, {} block references, {unique} distinct blocks; an \
             unbounded cache hits {:.1}% of blocks, {:.1}% of tokens",
            args.trace.display(),
            trace.requests.len(),
            trace.block_refs(),
            100.0 * ceiling.block_ratio(),
            100.0 * ceiling.token_ratio()
        );
        out!(
            "engine: {} B payloads, DRAM{}; hits read back and checked",
            args.block_bytes,
            if args.nvme_percent > 0.0 {
                format!(" + NVMe for {}% of distinct blocks", args.nvme_percent)
            } else {
                " only".to_owned()
            }
        );
        out!(
            "\n{:>14}  {:<30} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7}",
            "capacity",
            "policy",
            "blocks",
            "tokens",
            "dram hit",
            "nvme hit",
            "simulated",
            "secs"
        );
    }
    // Without hints, then with each share of the ended conversations told.
    let mut hint_runs: Vec<(Option<f64>, Vec<bool>)> = vec![(None, Vec::new())];
    hint_runs.extend(
        args.end_hints
            .iter()
            .map(|&p| (Some(p), trace.ended_chains(p / 100.0))),
    );
    let mut rows = Vec::new();
    let mut wrong = 0;
    for &percent in &args.capacity_percent {
        anyhow::ensure!(
            percent > 0.0 && percent <= 100.0,
            "capacity {percent}% is not in (0, 100]"
        );
        let capacity = ((unique as f64 * percent / 100.0) as usize).max(1);
        let label = format!("{percent}% ({capacity})");
        for (name, hits) in [
            ("belady (MIN)", replay::belady(&trace, capacity)),
            (
                "lru+reuse oracle",
                replay::lru_with_reuse_oracle(&trace, capacity),
            ),
            ("most used (A0)", replay::most_used(&trace, capacity)),
            (
                "lru (offline)",
                replay::simulate(
                    &trace,
                    mooncake_kv_engine::EvictionPolicyKind::Lru,
                    capacity,
                ),
            ),
        ] {
            print_row(cli, &label, name, &hits, None, None);
            rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": name, "offline": hits}));
        }
        for (end_hints, ended) in &hint_runs {
            for &policy in &args.policy {
                let name = match end_hints {
                    Some(p) => format!("{policy} +end {p}%"),
                    None => policy.name().to_owned(),
                };
                let simulated = replay::simulate_with_hints(&trace, policy, capacity, ended);
                if args.simulate_only {
                    print_row(cli, &label, &name, &simulated, None, None);
                    rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": policy.name(), "end_hints_percent": end_hints, "simulated": simulated}));
                } else {
                    let run = EngineRun {
                        policy,
                        ended,
                        end_hints: *end_hints,
                        capacity,
                        percent,
                        label: &label,
                        name: &name,
                        simulated: &simulated,
                    };
                    let (row, wrong_blocks) =
                        replay_on_engine(cli, args, &trace, unique, quiet, &run)?;
                    wrong += wrong_blocks;
                    rows.push(row);
                }
                for &shape in &args.cluster {
                    let simulated =
                        replay::simulate_cluster(&trace, policy, capacity, shape, ended);
                    let name = format!("{name} on {shape}");
                    if args.simulate_only {
                        print_row(cli, &label, &name, &simulated, None, None);
                        rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": policy.name(), "end_hints_percent": end_hints, "cluster": shape, "simulated": simulated}));
                        continue;
                    }
                    let setup = EngineReplay {
                        policy,
                        ended: ended.clone(),
                        dram_blocks: capacity,
                        block_bytes: args.block_bytes as usize,
                        nvme: None,
                    };
                    let bar = progress_bar(trace.requests.len() as u64, quiet);
                    let result = replay::replay_cluster(&trace, &setup, shape, |n| {
                        bar.set_position(n as u64)
                    });
                    bar.finish_and_clear();
                    let result = result?;
                    wrong += result.wrong_blocks;
                    print_row(
                        cli,
                        &label,
                        &name,
                        &result.hits,
                        Some(&result),
                        Some(&simulated),
                    );
                    rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": policy.name(), "end_hints_percent": end_hints, "cluster": shape, "engine": result, "simulated": simulated}));
                }
            }
        }
    }
    if cli.json {
        out!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "trace": args.trace,
                "requests": trace.requests.len(),
                "block_refs": trace.block_refs(),
                "distinct_blocks": unique,
                "ceiling": ceiling,
                "block_bytes": args.block_bytes,
                "nvme_percent": args.nvme_percent,
                "rows": rows,
            }))?
        );
    } else if wrong > 0 {
        out!("\n{wrong} hit blocks came back with the wrong bytes");
    }
    Ok(if wrong > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One policy at one capacity and end-hint share, in a real engine.
struct EngineRun<'a> {
    policy: mooncake_kv_engine::EvictionPolicyKind,
    ended: &'a [bool],
    end_hints: Option<f64>,
    capacity: usize,
    percent: f64,
    label: &'a str,
    name: &'a str,
    simulated: &'a replay::Hits,
}

/// Replays the trace into an engine set up as `run` says, prints its row and returns it
/// for the JSON output, with the number of hit blocks that came back wrong.
fn replay_on_engine(
    cli: &Cli,
    args: &ReplayArgs,
    trace: &Trace,
    unique: usize,
    quiet: bool,
    run: &EngineRun<'_>,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let EngineRun {
        policy,
        capacity,
        percent,
        ..
    } = *run;
    let nvme_dir = (args.nvme_percent > 0.0).then(|| {
        args.nvme_dir.join(format!(
            "kvctl-replay-{}-{policy}-{percent}",
            std::process::id()
        ))
    });
    let setup = EngineReplay {
        policy,
        ended: run.ended.to_vec(),
        dram_blocks: capacity,
        block_bytes: args.block_bytes as usize,
        nvme: nvme_dir.clone().map(|dir| {
            (
                dir,
                ((unique as f64 * args.nvme_percent / 100.0) as usize).max(1),
            )
        }),
    };
    let bar = progress_bar(trace.requests.len() as u64, quiet);
    let result = replay::replay_engine(trace, &setup, |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    if let Some(dir) = &nvme_dir {
        // Best effort: the directory is ours and only holds replay blocks.
        let _ = std::fs::remove_dir_all(dir);
    }
    let result = result?;
    print_row(
        cli,
        run.label,
        run.name,
        &result.hits,
        Some(&result),
        Some(run.simulated),
    );
    let row = json!({
        "capacity_percent": percent,
        "capacity_blocks": capacity,
        "policy": policy.name(),
        "end_hints_percent": run.end_hints,
        "engine": result,
        "simulated": run.simulated,
    });
    Ok((row, result.wrong_blocks))
}

fn progress_bar(len: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

fn print_row(
    cli: &Cli,
    capacity: &str,
    policy: &str,
    hits: &replay::Hits,
    engine: Option<&replay::EngineHits>,
    simulated: Option<&replay::Hits>,
) {
    if cli.json {
        return;
    }
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let share = |n: u64| {
        pct(if hits.blocks == 0 {
            0.0
        } else {
            n as f64 / hits.blocks as f64
        })
    };
    out!(
        "{capacity:>14}  {policy:<30} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7}",
        pct(hits.block_ratio()),
        pct(hits.token_ratio()),
        engine.map_or("-".into(), |e| share(e.dram_hit_blocks)),
        engine.map_or("-".into(), |e| share(e.nvme_hit_blocks)),
        simulated.map_or("-".into(), |s| pct(s.block_ratio())),
        engine.map_or("-".into(), |e| format!("{:.1}", e.seconds)),
    );
}
