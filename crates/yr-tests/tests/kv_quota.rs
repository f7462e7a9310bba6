//! The KV quota on a real node (security issue #9: any client could fill a node's memory
//! through KV): a job that writes past the node's `--kv-quota-mb` gets 4202 naming the job,
//! its bytes, the write and the quota; the node's resident memory stays near the quota however
//! much more the job tries to write; deleting gives the room back.

use yr::{ErrorCode, SetParam};
use yr_tests::{assert_error, exclusive, unique, unwrap_err, wait_until, NodeSpec, TestCluster};

const QUOTA_MB: u64 = 8;
const MIB: usize = 1 << 20;

/// The resident memory of process `pid`, in bytes (VmRSS in /proc/<pid>/status).
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in the status")
        * 1024
}

#[test]
fn a_job_writing_past_its_kv_quota_gets_4202_and_the_node_keeps_to_the_quota() {
    let _exclusive = exclusive();
    let cluster = TestCluster::with_node(NodeSpec {
        kv_quota_mb: Some(QUOTA_MB),
        ..NodeSpec::default()
    });
    let job_id = yr::init(cluster.config()).unwrap().job_id;
    let node = cluster.node_pid(0).expect("the node's pid");
    assert_eq!(
        cluster.wait_metric(0, "yr_kv_quota_bytes"),
        (QUOTA_MB << 20) as f64
    );
    let prefix = unique("kv-quota");
    let value = vec![7u8; MIB];
    // Warm the node's KV path up (channels, buffers) before measuring.
    yr::kv_write(&format!("{prefix}-warm"), &value, SetParam::default()).unwrap();
    yr::kv_del(&[&format!("{prefix}-warm")]).unwrap();
    let resident_before = resident_bytes(node);

    // 1 MiB values fit seven times in 8 MiB (each key adds its bytes); the eighth is refused.
    let mut written = Vec::new();
    let error = loop {
        let key = format!("{prefix}-{}", written.len());
        match yr::kv_write(&key, &value, SetParam::default()) {
            Ok(()) => written.push(key),
            Err(error) => break error,
        }
        assert!(
            written.len() <= QUOTA_MB as usize,
            "the quota never refused"
        );
    };
    assert_eq!(written.len(), QUOTA_MB as usize - 1);
    let held: usize = written.iter().map(|k| k.len() + MIB).sum();
    let refused = format!("{prefix}-{}", written.len());
    assert_error(
        &error,
        &[ErrorCode::SharedMemoryLimited],
        &[
            &job_id,
            &format!("holds {held} bytes"),
            &format!("{} bytes", refused.len() + MIB),
            &format!("quota of {} bytes", QUOTA_MB << 20),
            "kv_del",
            "--kv-quota-mb",
        ],
    );
    assert_eq!(error.code().number(), 4202);
    assert_eq!(yr::kv_exist(&[&refused]).unwrap(), vec![false]);
    assert_eq!(cluster.wait_metric(0, "yr_kv_memory_bytes"), held as f64);

    // A refused overwrite keeps the old value.
    let bigger = vec![9u8; 2 * MIB];
    let error = unwrap_err(yr::kv_write(&written[0], &bigger, SetParam::default()));
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    assert!(yr::kv_read(&[&written[0]], yr_tests::TIMEOUT).unwrap()[0] == value);

    // Ten times the quota more, all refused: the node's memory does not follow.
    let large = vec![1u8; 2 * MIB];
    for i in 0..40 {
        let error = unwrap_err(yr::kv_write(
            &format!("{prefix}-large-{i}"),
            &large,
            SetParam::default(),
        ));
        assert_eq!(error.code(), ErrorCode::SharedMemoryLimited);
    }
    let grown = resident_bytes(node).saturating_sub(resident_before);
    // The quota, plus room for the allocator's arenas and the transport's buffers (measured:
    // about 5 MB over the quota with 2 MiB messages); without the quota the node would hold
    // another 80 MiB.
    let allowed = (QUOTA_MB << 20) + (16 << 20);
    assert!(
        grown <= allowed,
        "the node's resident memory grew by {grown} bytes, more than the {allowed} allowed for a \
         quota of {QUOTA_MB} MiB"
    );

    // A value over the message size is refused before it is sent (1001).
    let error = unwrap_err(yr::kv_write(
        &format!("{prefix}-huge"),
        &vec![0u8; 64 * MIB + 1],
        SetParam::default(),
    ));
    assert_error(
        &error,
        &[ErrorCode::ParamInvalid],
        &[&(64 * MIB + 1).to_string(), "64 MiB"],
    );

    // Deleting gives the room back: the refused write now succeeds.
    let keys: Vec<&str> = written.iter().map(String::as_str).collect();
    yr::kv_del(&keys).unwrap();
    assert!(wait_until(yr_tests::TIMEOUT, || cluster
        .node_metric(0, "yr_kv_memory_bytes")
        == Some(0.0)));
    yr::kv_write(&refused, &value, SetParam::default()).unwrap();
    assert!(yr::kv_read(&[&refused], yr_tests::TIMEOUT).unwrap()[0] == value);
    yr::kv_del(&[&refused]).unwrap();
    yr::finalize().unwrap();
}
