//! Faults of the cluster's own processes: the master killed and restarted on its data directory
//! (state recovered, instances keep serving meanwhile), and a node stopped gracefully (shutdown
//! hooks run, callers get clear codes) or killed (the master marks it lost and its instances
//! FATAL).

use std::time::{Duration, Instant};

use yr::{ErrorCode, InvokeOptions};
use yr_proto::v1::InstanceState;
use yr_tests::{
    alive, assert_error, call_err, exclusive, record, unique, unwrap_err, wait_until, Marker,
    TestCluster, TIMEOUT,
};

#[yr::instance]
pub struct Counter {
    value: i64,
}

#[yr::instance]
impl Counter {
    pub fn new(start: i64) -> Self {
        Counter { value: start }
    }

    pub fn add(&mut self, n: i64) -> i64 {
        self.value += n;
        self.value
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// Writes `napping` to `marker`, then sleeps `ms`.
    pub fn nap(&self, marker: String, ms: u64) -> u64 {
        record(&marker, "napping");
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

/// Writes `hook` to its marker when it is shut down.
#[yr::instance]
pub struct Graceful {
    marker: String,
}

#[yr::instance]
impl Graceful {
    pub fn new(marker: String) -> Self {
        Graceful { marker }
    }

    pub fn ping(&self) -> bool {
        true
    }

    #[yr::shutdown]
    fn on_shutdown(&mut self, _grace_period: Duration) {
        record(&self.marker, "hook");
    }
}

fn grace_seconds(seconds: u64) -> InvokeOptions {
    let mut options = InvokeOptions::default();
    options
        .custom_extensions
        .insert("GRACEFUL_SHUTDOWN_TIME".to_string(), seconds.to_string());
    options
}

/// The codes a caller may see when its node stops gracefully: the node stopped the instance
/// (1007), or the bus to the node closed (3006).
const NODE_STOPPED: [ErrorCode; 2] = [ErrorCode::InstanceExited, ErrorCode::BusDisconnection];

/// The codes a caller may see when its node dies: the bus to the node broke (3006), or the
/// connection to the runtime broke and nobody said why (3001).
const NODE_DIED: [ErrorCode; 2] = [
    ErrorCode::BusDisconnection,
    ErrorCode::RequestBetweenRuntimeBus,
];

#[test]
fn master_killed_and_restarted_recovers_state_and_instances_keep_serving() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let name = unique("keeper");
    let options = InvokeOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    let counter = yr::instance(Counter::new)
        .options(options)
        .invoke((0,))
        .unwrap();
    let add = |n: i64| yr::get(&counter.method(Counter::add).invoke((n,)).unwrap(), TIMEOUT);
    assert_eq!(add(1).unwrap(), 1);
    let id = counter.id().to_string();
    cluster.wait_for_status(TIMEOUT, "the master records the instance", |status| {
        status.instances.iter().any(|i| i.instance_id == id)
    });

    cluster.kill_master();
    assert!(cluster.status().is_err(), "the master is down");
    // Calls go straight to the runtime: they do not need the master.
    assert_eq!(add(1).unwrap(), 2);
    assert_eq!(add(1).unwrap(), 3);
    // The node still finds the instance by name.
    let found = yr::get_instance::<Counter>(&name, "", Duration::from_secs(5)).unwrap();
    assert_eq!(found.id(), id);

    cluster.restart_master();
    let node_id = cluster.node_id(0).to_string();
    let status = cluster.wait_for_status(
        TIMEOUT,
        "the restarted master lists the node alive and the instance",
        |status| {
            status
                .nodes
                .iter()
                .any(|n| n.node_id == node_id && n.state == "alive")
                && status.instances.iter().any(|i| i.instance_id == id)
        },
    );
    let summary = status
        .instances
        .iter()
        .find(|i| i.instance_id == id)
        .unwrap();
    assert_eq!(summary.node_id, node_id);
    assert!(summary.function.ends_with("Counter::new"), "{summary:?}");
    assert!(
        status.functions.iter().any(|f| f.ends_with("Counter::add")),
        "registered functions survive the restart: {:?}",
        status.functions
    );

    // The running instance still serves, and new creates work.
    assert_eq!(add(1).unwrap(), 4);
    let fresh = yr::instance(Counter::new).invoke((10,)).unwrap();
    assert_eq!(
        yr::get(&fresh.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        11
    );
    let fresh_id = fresh.id().to_string();
    cluster.wait_for_status(TIMEOUT, "the new instance is recorded", |status| {
        status.instances.iter().any(|i| i.instance_id == fresh_id)
    });
    yr::finalize().unwrap();
}

#[test]
fn instance_created_while_the_master_is_down_is_recorded_after_it_returns() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let before = yr::instance(Counter::new).invoke((0,)).unwrap();
    assert_eq!(
        yr::get(&before.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        1
    );

    cluster.kill_master();
    // The node places locally: creates and calls work without the master.
    let during = yr::instance(Counter::new).invoke((5,)).unwrap();
    assert_eq!(
        yr::get(&during.method(Counter::add).invoke((1,)).unwrap(), TIMEOUT).unwrap(),
        6
    );
    // A master outage of some seconds (a restart by a supervisor, a slow disk): it lasts until
    // the node has failed to write the new instance's record 9 times, which it logs each time.
    // Its retries wait 50 ms doubling to 2 s, so the last waits are at that cap, and the 8 waits
    // before the 9th failure add up to at least 7.15 s: the master link's reconnects (100 ms
    // doubling to 5 s, at most 6.3 s before the cap) are at their cap too.
    let during_id = during.id().to_string();
    let log_path = cluster.dir().join("node0.log");
    let failed_writes = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                line.contains("could not persist an instance record") && line.contains(&during_id)
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(60), || failed_writes() >= 9),
        "the node did not retry the record of {during_id} while the master was down:\n{}",
        cluster.node_log_tail(0, 30)
    );
    cluster.restart_master();

    let ids = [before.id().to_string(), during.id().to_string()];
    let recorded = wait_until(TIMEOUT, || {
        cluster.status().is_ok_and(|status| {
            ids.iter()
                .all(|id| status.instances.iter().any(|i| &i.instance_id == id))
        })
    });
    assert!(
        recorded,
        "the restarted master does not know the instance created while it was down: status \
         {:?}, stored record {:?}",
        cluster.status().map(|s| s.instances),
        cluster.stored_instance(&ids[1])
    );
    yr::finalize().unwrap();
}

#[test]
fn stopped_node_reports_its_instances() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    let marker = Marker::new("node-stop");
    let graceful = yr::instance(Graceful::new)
        .options(grace_seconds(5))
        .invoke((marker.path(),))
        .unwrap();
    assert!(yr::get(
        &graceful.method(Graceful::ping).invoke(()).unwrap(),
        TIMEOUT
    )
    .unwrap());
    let busy = yr::instance(Counter::new)
        .options(grace_seconds(1))
        .invoke((0,))
        .unwrap();
    let busy_pid = yr::get(&busy.method(Counter::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    let napping = Marker::new("busy");
    let pending = busy
        .method(Counter::nap)
        .invoke((napping.path(), 60_000))
        .unwrap();
    assert!(napping.wait_for("napping", 1, TIMEOUT), "the call started");

    let stopping = Instant::now();
    assert!(
        cluster.stop_node(0, Duration::from_secs(30)),
        "the node exits on SIGTERM; its log ends with:\n{}",
        cluster.node_log_tail(0, 20)
    );
    assert!(
        marker.wait_for("hook", 1, Duration::from_secs(5)),
        "the shutdown hook ran: {:?}",
        marker.lines()
    );
    assert!(
        !alive(busy_pid),
        "the busy runtime was stopped with its node"
    );

    // The pending call fails with a clear code, it does not hang.
    let error = unwrap_err(yr::get(&pending, TIMEOUT));
    assert_error(&error, &NODE_STOPPED, &[]);
    assert!(stopping.elapsed() < Duration::from_secs(30));

    // New calls and creates fail at once.
    let started = Instant::now();
    let later = call_err(graceful.method(Graceful::ping).invoke(()), TIMEOUT);
    assert_error(&later, &NODE_STOPPED, &[]);
    let create = unwrap_err(yr::instance(Counter::new).invoke((0,)));
    assert_error(&create, &[ErrorCode::BusDisconnection], &[]);
    assert!(started.elapsed() < Duration::from_secs(10));
    yr::finalize().unwrap();
}

#[test]
fn killed_node_is_marked_lost_and_its_instances_fatal() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::builder().node_timeout(2.0).start();
    yr::init(cluster.config()).unwrap();
    let counter = yr::instance(Counter::new).invoke((0,)).unwrap();
    let pid = yr::get(&counter.method(Counter::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    let id = counter.id().to_string();
    cluster.wait_for_status(TIMEOUT, "the master records the instance", |status| {
        status.instances.iter().any(|i| i.instance_id == id)
    });
    let napping = Marker::new("killed-node");
    let pending = counter
        .method(Counter::nap)
        .invoke((napping.path(), 60_000))
        .unwrap();
    assert!(napping.wait_for("napping", 1, TIMEOUT), "the call started");

    cluster.kill_node(0);
    let killed_at = Instant::now();
    let error = unwrap_err(yr::get(&pending, TIMEOUT));
    assert_error(&error, &NODE_DIED, &[]);
    assert!(killed_at.elapsed() < Duration::from_secs(15));
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pid)),
        "the runtime dies with its node"
    );

    let node_id = cluster.node_id(0).to_string();
    cluster.wait_for_status(
        TIMEOUT,
        "the master marks the node lost and its instance FATAL",
        |status| {
            status
                .nodes
                .iter()
                .any(|n| n.node_id == node_id && n.state == "lost")
                && status
                    .instances
                    .iter()
                    .any(|i| i.instance_id == id && i.state == InstanceState::Fatal as i32)
        },
    );
    let stored = cluster.stored_instance(&id).unwrap().expect("the record");
    let stored_error = stored.error.clone().unwrap_or_default();
    assert!(
        stored_error.message.contains(&node_id),
        "the FATAL record says which node was lost: {stored_error:?}"
    );

    let create = unwrap_err(yr::instance(Counter::new).invoke((0,)));
    assert_error(&create, &[ErrorCode::BusDisconnection], &[]);
    yr::finalize().unwrap();
}
