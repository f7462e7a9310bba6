//! Master failover on etcd: two masters on one etcd and prefix, a node given both addresses,
//! and a driver with a stateful instance. The leader is SIGKILLed: the standby leads within
//! the bound, calls to the instance keep working during and after the takeover, the node
//! registers again with the new leader as the same incarnation, and a new create and
//! `yr status` work. A leader SIGSTOPped past its lease and then resumed writes nothing: the
//! node stays alive in etcd and the resumed master stands by. While no master leads (the
//! leader killed, the standby stopped), the node fences itself: it pauses an instance the
//! master could re-create elsewhere, and resumes it with its state when the standby leads and
//! accepts the node again. Each test starts its own etcd.

#[path = "../../yr-meta/tests/common/etcd.rs"]
mod etcd;

use std::path::Path;
use std::time::{Duration, Instant};

use etcd::Etcd;
use yr_tests::{
    exclusive, node_incarnation, run_yr, signal, stopped, unique, wait_until, Tally, TestCluster,
    TIMEOUT,
};

/// The generous bound of the tests; the goal (5 s) is reported, not asserted.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

fn failover_cluster(etcd: &Etcd, label: &str) -> TestCluster {
    let prefix = format!("/yr/{}", unique(label));
    TestCluster::builder()
        .master_args(["--etcd", &etcd.endpoint(), "--etcd-prefix", &prefix])
        .standby_masters(1)
        .node_timeout(3.0)
        .start()
}

/// The index (0 or 1) of the leading master and the leader's status.
fn leader(cluster: &TestCluster) -> (usize, yr_proto::v1::ClusterStatusResponse) {
    let status = cluster.wait_for_status(TIMEOUT, "a leader and a standby", |status| {
        !status.leader.is_empty() && status.masters.len() == 2
    });
    let index = cluster
        .master_addresses()
        .iter()
        .position(|a| *a == status.leader)
        .expect("the leader is one of the cluster's masters");
    (index, status)
}

#[test]
fn the_standby_takes_over_when_the_leader_is_killed_and_no_instance_is_lost() {
    let _exclusive = exclusive();
    let etcd = Etcd::single("failover");
    let mut cluster = failover_cluster(&etcd, "failover");
    yr::init(cluster.config()).unwrap();

    let tally = yr::instance(Tally::new).invoke((0,)).unwrap();
    let add = |n: i64| yr::get(&tally.method(Tally::add).invoke((n,)).unwrap(), TIMEOUT);
    assert_eq!(add(1).unwrap(), 1);
    let id = tally.id().to_string();
    let node_id = cluster.node_id(0).to_string();
    let (leader_index, before) = leader(&cluster);
    let standby = cluster.master_addresses()[1 - leader_index].clone();
    let incarnation = node_incarnation(&before, &node_id).expect("the node is registered");
    // The standby answers "not the leader", naming the leader.
    let refused = cluster.status_at(&standby).unwrap_err();
    assert!(
        refused.contains("not the leader") && refused.contains(&before.leader),
        "{refused}"
    );

    // SIGKILL the leader, and keep calling the instance until the standby leads.
    let mut expected = 1;
    let killed_at = Instant::now();
    cluster.kill_master_at(leader_index);
    let mut calls_during = 0;
    let mut led_after = None;
    while killed_at.elapsed() < TAKEOVER_BOUND {
        expected += 1;
        assert_eq!(add(1).unwrap(), expected, "a call during the takeover");
        calls_during += 1;
        if cluster.status_at(&standby).is_ok() {
            led_after = Some(killed_at.elapsed());
            break;
        }
    }
    let led_after = led_after.unwrap_or_else(|| {
        panic!("the standby did not lead within {TAKEOVER_BOUND:?} of the leader's SIGKILL")
    });
    // The node registers again with the new leader, as the same incarnation.
    let status = cluster.wait_for_status(
        TAKEOVER_BOUND,
        "the node registered with the new leader as the same incarnation",
        |status| {
            status.leader == standby
                && status.nodes.iter().any(|n| {
                    n.node_id == node_id && n.state == "alive" && n.incarnation == incarnation
                })
                && status.instances.iter().any(|i| i.instance_id == id)
        },
    );
    let node_back_after = killed_at.elapsed();
    eprintln!(
        "takeover: the standby led {led_after:?} after the leader's SIGKILL, the node was \
         registered with it {node_back_after:?} after; {calls_during} calls ran meanwhile"
    );
    let instance = status
        .instances
        .iter()
        .find(|i| i.instance_id == id)
        .expect("the instance survives");
    assert_eq!(
        yr_proto::v1::InstanceState::try_from(instance.state).ok(),
        Some(yr_proto::v1::InstanceState::Running)
    );

    // After: the instance keeps its state, a new create is placed, yr status shows the leader.
    assert_eq!(add(1).unwrap(), expected + 1);
    let fresh = yr::instance(Tally::new).invoke((100,)).unwrap();
    assert_eq!(
        yr::get(&fresh.method(Tally::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        101
    );
    let addresses = cluster.master_addresses().join(",");
    let output = run_yr(
        &["status", "--master-address", &addresses],
        &[(
            yr_common::auth::TOKEN_ENV,
            Path::new(cluster.token().as_str()),
        )],
        TIMEOUT,
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "yr status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("Masters"), "{text}");
    assert!(text.contains(&format!("{standby:<22} leader")), "{text}");
    assert!(text.contains(&node_id), "{text}");
    yr::finalize().unwrap();
}

#[test]
fn a_leader_paused_past_its_lease_writes_nothing_when_it_resumes() {
    let _exclusive = exclusive();
    let etcd = Etcd::single("fencing");
    let cluster = failover_cluster(&etcd, "fencing");
    yr::init(cluster.config()).unwrap();
    let tally = yr::instance(Tally::new).invoke((0,)).unwrap();
    let add = |n: i64| yr::get(&tally.method(Tally::add).invoke((n,)).unwrap(), TIMEOUT);
    assert_eq!(add(1).unwrap(), 1);
    let node_id = cluster.node_id(0).to_string();
    let (leader_index, before) = leader(&cluster);
    let old = before.leader.clone();
    let standby = cluster.master_addresses()[1 - leader_index].clone();
    let incarnation = node_incarnation(&before, &node_id).expect("the node is registered");
    let pid = cluster
        .master_pid_at(leader_index)
        .expect("the leader runs");

    // Pause the leader past its lease: the standby takes over, and the node follows it.
    assert!(signal(pid, libc::SIGSTOP));
    let paused_at = Instant::now();
    let resumed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Asked directly: a paused master accepts connections but never answers.
        let followed = wait_until(TAKEOVER_BOUND, || {
            cluster.status_at(&standby).is_ok_and(|status| {
                status
                    .nodes
                    .iter()
                    .any(|n| n.node_id == node_id && n.state == "alive")
            })
        });
        assert!(
            followed,
            "the standby leads with the node registered within {TAKEOVER_BOUND:?}"
        );
        eprintln!(
            "the standby led with the node registered {:?} after the leader's SIGSTOP",
            paused_at.elapsed()
        );
        // Longer than the node timeout (3 s) since the paused leader last heard the node: when
        // it resumes, its liveness pass holds the node lost and tries to persist that.
        let past = Duration::from_secs(4);
        let waited = wait_until(past + Duration::from_secs(1), || {
            paused_at.elapsed() >= past
        });
        assert!(waited);
    }));
    assert!(signal(pid, libc::SIGCONT));
    if let Err(panic) = resumed {
        std::panic::resume_unwind(panic);
    }

    // The resumed master learns that its term is over and stands by, naming the new leader.
    let old_answers = wait_until(TAKEOVER_BOUND, || {
        cluster
            .status_at(&old)
            .err()
            .is_some_and(|e| e.contains("not the leader") && e.contains(&standby))
    });
    assert!(
        old_answers,
        "the resumed master stands by and names {standby}"
    );
    // Nothing it tried landed: the node stays alive as the same incarnation, the instance runs.
    let stable = Instant::now();
    while stable.elapsed() < Duration::from_secs(3) {
        let status = cluster.status_at(&standby).expect("the new leader answers");
        assert_eq!(status.leader, standby, "the new leader keeps leading");
        let node = status
            .nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .expect("the node is known");
        assert_eq!(node.state, "alive", "the node was not declared lost");
        assert_eq!(node.incarnation, incarnation);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(add(1).unwrap(), 2);
    let log = std::fs::read_to_string(cluster.master_log_at(leader_index)).unwrap_or_default();
    let fenced = log.matches("write fenced").count();
    eprintln!(
        "the resumed master's log: {fenced} fenced writes; stepped down: {}",
        log.contains("leadership lost")
    );
    assert!(
        log.contains("leadership lost"),
        "the resumed master stepped down"
    );
    yr::finalize().unwrap();
}

#[test]
fn a_movable_instance_pauses_while_no_master_leads_and_resumes_with_its_state_when_one_does() {
    let _exclusive = exclusive();
    let etcd = Etcd::single("pause");
    let mut cluster = failover_cluster(&etcd, "pause");
    yr::init(cluster.config()).unwrap();
    let keeper = yr_tests::movable_tally(0);
    let add = |n: i64| yr::get(&keeper.method(Tally::add).invoke((n,)).unwrap(), TIMEOUT);
    assert_eq!(add(1).unwrap(), 1);
    let pid = yr::get(&keeper.method(Tally::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    let node_id = cluster.node_id(0).to_string();
    let (leader_index, before) = leader(&cluster);
    let standby = cluster.master_addresses()[1 - leader_index].clone();
    let incarnation = node_incarnation(&before, &node_id).expect("the node is registered");
    let standby_pid = cluster
        .master_pid_at(1 - leader_index)
        .expect("the standby runs");

    // No master leads: the standby is stopped and the leader killed. No beat is acknowledged,
    // so the node pauses the instance before anyone could declare the node lost.
    assert!(signal(standby_pid, libc::SIGSTOP));
    let killed_at = Instant::now();
    cluster.kill_master_at(leader_index);
    let during = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(
            wait_until(TAKEOVER_BOUND, || stopped(pid)),
            "the node did not pause the instance's runtime (pid {pid}) while no master led"
        );
        eprintln!(
            "self-fence: the runtime was paused {:?} after the leader's SIGKILL",
            killed_at.elapsed()
        );
        // A call made now waits for the pause to end.
        keeper.method(Tally::add).invoke((1,)).unwrap()
    }));
    assert!(signal(standby_pid, libc::SIGCONT));
    let pending = match during {
        Ok(pending) => pending,
        Err(panic) => std::panic::resume_unwind(panic),
    };

    // The standby leads; the node registers as the same incarnation and resumes the instance,
    // which serves the waiting call with its state intact.
    assert_eq!(
        yr::get(&pending, TIMEOUT).unwrap(),
        2,
        "the call made during the pause"
    );
    eprintln!(
        "self-fence: the call made during the pause was served {:?} after the leader's SIGKILL",
        killed_at.elapsed()
    );
    assert!(!stopped(pid), "resumed");
    assert_eq!(add(1).unwrap(), 3);
    assert_eq!(
        yr::get(&keeper.method(Tally::pid).invoke(()).unwrap(), TIMEOUT).unwrap(),
        pid,
        "the same runtime: paused, not restarted"
    );
    assert!(
        cluster
            .node_metric(0, "yr_node_self_fences_total")
            .is_some_and(|n| n >= 1.0),
        "the fence is counted"
    );
    assert!(
        cluster
            .node_metric(0, "yr_node_runtimes_paused_total")
            .is_some_and(|n| n >= 1.0),
        "the paused runtime is counted"
    );
    assert_eq!(cluster.node_metric(0, "yr_node_self_fenced"), Some(0.0));
    let status = cluster.wait_for_status(
        TAKEOVER_BOUND,
        "the node registered with the new leader as the same incarnation",
        |status| {
            status.leader == standby
                && status.nodes.iter().any(|n| {
                    n.node_id == node_id && n.state == "alive" && n.incarnation == incarnation
                })
        },
    );
    assert!(status
        .instances
        .iter()
        .any(|i| i.instance_id == keeper.id()));
    yr::finalize().unwrap();
}
