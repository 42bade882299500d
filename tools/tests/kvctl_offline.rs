//! kvctl against real data directories, as an operator runs it: `inspect`, `ls`, `header` and
//! `verify`, as tables and as JSON; refusal of a directory a running engine holds; `verify`
//! naming a corrupt block and exiting 1. The exit status and the JSON are what scripts rely on.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use mooncake_kv_engine::offline::DataDir;
use mooncake_kv_engine::{Engine, EngineConfig};

fn kvctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(args)
        .output()
        .expect("run kvctl")
}

fn config(dir: &Path) -> EngineConfig {
    EngineConfig {
        dram_capacity_bytes: 4 << 20,
        data_dir: Some(dir.to_owned()),
        nvme_capacity_bytes: 16 << 20,
        ..EngineConfig::default()
    }
}

fn filled_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(config(dir.path())).expect("open");
    for i in 0..10u8 {
        engine
            .put(
                format!("block-{i}").as_bytes(),
                &vec![i; 5000 + usize::from(i)],
            )
            .expect("put");
    }
    engine.put(&[0, 159, 255], b"binary key").expect("put");
    engine.flush().expect("flush");
    dir
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("valid JSON")
}

#[test]
fn inspect_ls_header_and_verify_describe_the_directory() {
    let dir = filled_dir();
    let path = dir.path().to_str().expect("utf-8 path");

    let inspect = json(&kvctl(&["--json", "inspect", path]));
    assert_eq!(inspect["blocks"], 11);
    assert_eq!(inspect["format_version"], 1);
    assert_eq!(inspect["capacity_bytes"], 16 << 20);
    assert_eq!(inspect["orphans"], 0);
    assert_eq!(inspect["node_id"].as_str().expect("hex").len(), 32);
    let table = kvctl(&["inspect", path]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("blocks           11"));

    let ls = json(&kvctl(&["--json", "ls", path]));
    assert_eq!(ls["total"], 11);
    let keys: Vec<&str> = ls["blocks"]
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["key"].as_str().expect("key"))
        .collect();
    assert!(keys.contains(&"block-3"));
    assert!(
        keys.contains(&"0x009fff"),
        "binary keys print as hex: {keys:?}"
    );

    let header = json(&kvctl(&["--json", "header", path, "block-3"]));
    assert_eq!(header["payload_len"], 5003);
    assert_eq!(header["payload_offset"], 4096);
    let binary = json(&kvctl(&["--json", "header", path, "0x009fff"]));
    assert_eq!(binary["payload_len"], 10);
    let missing = kvctl(&["header", path, "nope"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no block with key nope"));

    let verify = json(&kvctl(&["--json", "verify", path]));
    assert_eq!(verify["blocks"], 11);
    assert_eq!(verify["corrupt"].as_array().expect("array").len(), 0);
}

#[test]
fn a_directory_in_use_is_refused() {
    let dir = filled_dir();
    let _engine = Engine::open(config(dir.path())).expect("open");
    let out = kvctl(&["inspect", dir.path().to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

#[test]
fn verify_names_corrupt_blocks_and_exits_1() {
    let dir = filled_dir();
    let entry = DataDir::open(dir.path())
        .expect("open")
        .entry(b"block-6")
        .expect("map")
        .expect("entry");
    let data = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(dir.path().join("blocks.data"))
        .expect("open");
    let at = entry.extent_offset_bytes + u64::from(entry.payload_offset) + 100;
    let mut byte = [0u8];
    data.read_exact_at(&mut byte, at).expect("read");
    data.write_all_at(&[byte[0] ^ 1], at).expect("write");
    let out = kvctl(&["verify", dir.path().to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CORRUPT block-6: payload checksum mismatch"),
        "{stdout}"
    );
    assert!(stdout.contains("11 blocks verified, 1 corrupt"), "{stdout}");
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let out = kvctl(&["inspect"]);
    assert_eq!(out.status.code(), Some(2));
    let out = kvctl(&["header", "/nonexistent", "0xzz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-hex digit"));
    // Checked before connecting: no node needed, and no panic (exit 101) on absurd numbers.
    for (flag, value) in [
        ("--duration", "1e30"),
        ("--duration", "0"),
        ("--warm-up", "-1"),
        ("--warm-up", "NaN"),
    ] {
        let out = kvctl(&["--addr", "127.0.0.1:1", "bench", &format!("{flag}={value}")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

#[test]
fn a_closed_standard_output_ends_kvctl_quietly() {
    // `kvctl ... | head`: the reader is gone. The default SIGPIPE would end a C tool with
    // status 141 and no message; kvctl did the same work and then panicked.
    let dir = filled_dir();
    let path = dir.path().to_str().expect("utf-8 path");
    for args in [
        &["ls", path][..],
        &["--json", "inspect", path][..],
        &["gen-trace", "--regime", "mix", "--requests", "50"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .args(args)
            .stdout(writer)
            .output()
            .expect("run kvctl");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn an_offline_commands_help_sets_the_node_options_apart() {
    // `gen-trace` and `verify` never reach a node: their own options come first, the global
    // ones for talking to a node under their own heading after them.
    for command in ["gen-trace", "verify"] {
        let output = kvctl(&[command, "--help"]);
        assert!(output.status.success(), "{command} --help: {output:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        let heading = help
            .find("Options for the commands that talk to a node:")
            .unwrap_or_else(|| panic!("{command} --help has no node heading:\n{help}"));
        let addr = help.find("--addr").expect("--addr listed");
        let json = help.find("--json").expect("--json listed");
        assert!(
            addr > heading,
            "{command}: --addr before the heading:\n{help}"
        );
        assert!(
            json < heading,
            "{command}: --json under the node heading:\n{help}"
        );
    }
    // The top-level help still opens with kvctl's own description and its exit statuses.
    let output = kvctl(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.starts_with("Talk to a running mooncake KVCache node"),
        "{help}"
    );
    assert!(help.contains("Exit status: 0 on success"), "{help}");
}
