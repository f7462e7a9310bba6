//! `yr-sim` at a small scale against a real master, so the tool cannot rot: 50 simulated nodes
//! register, none is falsely declared lost, placements succeed; and with two masters on etcd,
//! every node registers with the standby after the leader's SIGKILL.
//!
//! Needs the `yr` binary in the same target directory (`cargo build -p yr-cli`) or `$YR_BIN`,
//! and Debian's `etcd-server` (`scripts/test` installs it) or `$YR_ETCD`.

use std::path::PathBuf;
use std::process::Command;

fn yr_binary() -> PathBuf {
    let sim = PathBuf::from(env!("CARGO_BIN_EXE_yr-sim"));
    let path = std::env::var_os("YR_BIN")
        .map(PathBuf::from)
        .or_else(|| sim.parent().map(|dir| dir.join("yr")))
        .unwrap_or_default();
    assert!(
        path.is_file(),
        "the yr binary is not at {}; run `cargo build -p yr-cli` first or set YR_BIN",
        path.display()
    );
    path
}

#[test]
fn fifty_simulated_nodes_register_beat_place_and_follow_a_failover() {
    let json = std::env::temp_dir().join(format!("yr-sim-test-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_yr-sim"))
        .env("YR_BIN", yr_binary())
        .args([
            "--nodes",
            "50",
            "--idle-seconds",
            "2",
            "--place-seconds",
            "2",
        ])
        .args(["--concurrency", "8", "--node-timeout", "3", "--failover"])
        .args(["--register-deadline", "60"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("yr-sim runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "yr-sim failed:\n{stderr}");
    let text = std::fs::read_to_string(&json).expect("yr-sim wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let reports: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let report = &reports[0];
    let number = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    assert_eq!(number("nodes"), 50.0, "{report}");
    assert_eq!(
        number("alive_after_idle"),
        50.0,
        "all registered: {report}\n{stderr}"
    );
    assert_eq!(number("alive_at_end"), 50.0, "{report}\n{stderr}");
    assert_eq!(
        number("nodes_lost"),
        0.0,
        "none falsely lost: {report}\n{stderr}"
    );
    assert_eq!(number("reregister_commands"), 0.0, "{report}\n{stderr}");
    assert!(number("heartbeats_per_second") > 50.0, "{report}");
    assert!(number("placements") > 100.0, "placements succeed: {report}");
    assert_eq!(number("placement_rpc_errors"), 0.0, "{report}\n{stderr}");
    assert_eq!(number("placement_refusals"), 0.0, "{report}\n{stderr}");
    let failover = &report["failover"];
    assert_eq!(
        failover["registered"].as_u64(),
        Some(50),
        "{report}\n{stderr}"
    );
    assert_eq!(
        failover["nodes_lost"].as_f64(),
        Some(0.0),
        "{report}\n{stderr}"
    );
    assert!(
        failover["all_registered_seconds"]
            .as_f64()
            .is_some_and(|s| s < 30.0),
        "{report}\n{stderr}"
    );
}
