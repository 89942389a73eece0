//! The benchmarks at small sizes through the release-shaped binary: both
//! yardsticks of `bench export` and `bench delete` (the server's limit in Rust,
//! the Node scripts with their npm packages) and the `insertMany` yardstick of
//! `bench restore` run against real servers and the JSON line carries every
//! ratio. Not timed: the ratios are only checked to exist.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

async fn bench(args: &[&str]) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap().to_string();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_contact-bulk"));
    cmd.arg("bench")
        .args(args)
        .args(["--json", "--data-dir", &dir])
        .env("RUST_LOG", "warn")
        .env_remove("BULK_SUBJECT_PREFIX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("bench {args:?} did not end within 600 s"))
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stdout}\n{stderr}");
    println!("{stdout}");
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"))
}

fn positive(v: &Value, key: &str) {
    assert!(
        v[key].as_f64().is_some_and(|x| x > 0.0),
        "{key} missing or not positive in {v}"
    );
}

#[tokio::test]
async fn bench_export_runs_both_yardsticks_and_prints_the_ratios() {
    let line = bench(&["export", "--rows", "1500,3000"]).await;
    assert_eq!(line["bench"], "export");
    let runs = line["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{line}");
    for (run, rows) in runs.iter().zip([1500, 3000]) {
        assert_eq!(run["rows"], rows, "{run}");
        for key in [
            "exportRowsPerSec",
            "drainRowsPerSec",
            "nodeRowsPerSec",
            "ratioDrain",
            "ratioNode",
            "peakRssMb",
        ] {
            positive(run, key);
        }
    }
}

#[tokio::test]
async fn bench_delete_runs_both_yardsticks_and_prints_the_ratios() {
    let line = bench(&["delete", "--contacts", "150,300", "--repeat", "2"]).await;
    assert_eq!(line["bench"], "delete");
    let runs = line["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{line}");
    for (run, n) in runs.iter().zip([150, 300]) {
        assert_eq!(run["contacts"], n, "{run}");
        for side in ["job", "batched", "node"] {
            assert_eq!(run[side]["contacts"], n, "{run}");
            positive(&run[side], "contactsPerSec");
        }
        // 1 contact, 2 conversations, 6 messages each.
        assert_eq!(run["job"]["documents"], 9 * n, "{run}");
        assert_eq!(run["batched"]["documents"], 9 * n, "{run}");
        for key in ["ratioBatched", "ratioNode", "peakRssMb"] {
            positive(run, key);
        }
        // Two interleaved pairs, each with its ratio and the load it ran under.
        assert_eq!(run["pairRatios"].as_array().map(Vec::len), Some(2), "{run}");
        assert_eq!(
            run["loadAverage"].as_array().map(Vec::len),
            Some(2),
            "{run}"
        );
    }
}

#[tokio::test]
async fn bench_restore_runs_its_yardstick_and_prints_the_ratio() {
    let line = bench(&["restore", "--contacts", "200", "--repeat", "2"]).await;
    assert_eq!(line["bench"], "restore");
    let runs = line["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{line}");
    let run = &runs[0];
    assert_eq!(run["contacts"], 200, "{run}");
    // 1 contact, 2 conversations, 6 messages each: all kept, all put back.
    assert_eq!(run["documents"], 9 * 200, "{run}");
    for key in [
        "deleteSeconds",
        "restoreSeconds",
        "insertManySeconds",
        "ratio",
        "peakRssMb",
    ] {
        positive(run, key);
    }
    assert_eq!(run["runRatios"].as_array().map(Vec::len), Some(2), "{run}");
}
