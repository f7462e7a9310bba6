//! The runtime pool's bookkeeping, with a spawner that starts no processes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// Hands out ids; starts nothing.
#[derive(Default)]
struct Counter {
    next: AtomicU32,
    signals: Mutex<Vec<(String, i32)>>,
}

impl Spawner for Counter {
    fn spawn(&self, _spec: &RuntimeSpec) -> Result<(String, u32), AgentError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        Ok((format!("rt{n}"), 1000 + n))
    }
    fn signal(&self, runtime_id: &str, signal: i32) -> bool {
        self.signals.lock().push((runtime_id.to_string(), signal));
        true
    }
    fn pid(&self, _runtime_id: &str) -> Option<u32> {
        None
    }
}

fn spec() -> RuntimeSpec {
    RuntimeSpec {
        binary_path: PathBuf::from("/bin/true"),
        args: Vec::new(),
        job_id: "job".into(),
        env: Vec::new(),
    }
}

fn pool(warm: usize) -> (RuntimePool, Arc<Counter>) {
    let spawner = Arc::new(Counter::default());
    (RuntimePool::new(spawner.clone(), warm), spawner)
}

#[test]
fn fill_keeps_the_warm_pool_full_and_take_prefers_connected_runtimes() {
    let (pool, spawner) = pool(2);
    pool.fill("h", &spec()).unwrap();
    pool.fill("h", &spec()).unwrap();
    assert_eq!(spawner.next.load(Ordering::Relaxed), 2);
    assert_eq!(pool.idle("h"), 2);
    assert!(pool.registered("rt2", 7, "unix:/w2"));
    let taken = pool.take("h", &spec(), "i1").unwrap();
    assert_eq!(taken.runtime_id, "rt2");
    assert!(taken.registration.is_none(), "it is connected already");
    assert_eq!(pool.idle("h"), 1);
    assert_eq!(pool.instance_of("rt2").as_deref(), Some("i1"));
}

#[tokio::test]
async fn a_taken_runtime_that_is_starting_resolves_when_it_connects() {
    let (pool, _) = pool(0);
    let taken = pool.take("h", &spec(), "i1").unwrap();
    let registration = taken.registration.expect("not connected yet");
    assert_eq!(
        pool.idle("h"),
        0,
        "a runtime started for an instance is not idle"
    );
    pool.registered(&taken.runtime_id, 3, "unix:/w");
    assert_eq!(registration.await.unwrap(), Ok(()));
    let (client, address, _init) = pool.expect_init(&taken.runtime_id).unwrap();
    assert_eq!((client, address.as_str()), (3, "unix:/w"));
}

#[tokio::test]
async fn a_runtime_that_ends_before_connecting_reports_its_stderr() {
    let (pool, _) = pool(0);
    let taken = pool.take("h", &spec(), "i1").unwrap();
    let ended = pool.ended(&taken.runtime_id, "boom").unwrap();
    assert_eq!(
        ended,
        Ended {
            instance_id: Some("i1".into()),
            hung: false,
            registered: false
        }
    );
    assert_eq!(
        taken.registration.unwrap().await.unwrap(),
        Err("boom".to_string())
    );
    assert!(pool.ended(&taken.runtime_id, "").is_none());
}

#[test]
fn take_new_starts_a_runtime_for_the_instance_alone_and_leaves_the_warm_pool_alone() {
    let (pool, spawner) = pool(1);
    pool.fill("h", &spec()).unwrap();
    pool.registered("rt1", 1, "unix:/w1");
    let taken = pool.take_new("h", &spec(), "with-env").unwrap();
    assert_eq!(taken.runtime_id, "rt2", "a new runtime, not the warm one");
    assert_eq!(spawner.next.load(Ordering::Relaxed), 2);
    assert_eq!(pool.instance_of("rt2").as_deref(), Some("with-env"));
    // Connected, it is still its instance's, never idle for others.
    pool.registered("rt2", 2, "unix:/w2");
    assert_eq!(pool.idle("h"), 1);
    assert_eq!(pool.take("h", &spec(), "other").unwrap().runtime_id, "rt1");
}

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn silent_runtimes_are_marked_hung_once_and_leave_the_warm_pool() {
    let (pool, _) = pool(1);
    pool.fill("h", &spec()).unwrap();
    pool.registered("rt1", 9, "unix:/w");
    let start = Instant::now();
    let round = pool.heartbeat_round(start, TIMEOUT, 100);
    assert_eq!(round.beat, vec![9]);
    assert!(round.hung.is_empty());
    let round = pool.heartbeat_round(start + TIMEOUT, TIMEOUT, 100);
    assert_eq!(
        round,
        HeartbeatRound::default(),
        "silent, not yet for too long"
    );
    let round = pool.heartbeat_round(start + TIMEOUT * 2, TIMEOUT, 100);
    assert_eq!(round.hung, vec!["rt1".to_string()]);
    assert_eq!(pool.idle("h"), 0);
    let round = pool.heartbeat_round(start + TIMEOUT * 3, TIMEOUT, 100);
    assert!(round.hung.is_empty(), "a hung runtime is reported once");
}

#[test]
fn a_runtime_that_answers_gets_its_next_heartbeat_and_is_never_hung() {
    let (pool, _) = pool(1);
    pool.fill("h", &spec()).unwrap();
    pool.registered("rt1", 9, "unix:/w");
    let start = Instant::now();
    for second in 0..100 {
        let round = pool.heartbeat_round(start + TIMEOUT * second, TIMEOUT, 100);
        assert_eq!(round.beat, vec![9]);
        assert!(round.hung.is_empty());
        pool.heartbeat_ack("rt1");
    }
}

#[test]
fn a_node_that_was_stopped_forgives_its_runtimes_silence() {
    let (pool, _) = pool(1);
    pool.fill("h", &spec()).unwrap();
    pool.registered("rt1", 9, "unix:/w");
    let start = Instant::now();
    pool.heartbeat_round(start, TIMEOUT, 100);
    pool.forgive_silence();
    let round = pool.heartbeat_round(start + TIMEOUT * 5, TIMEOUT, 100);
    assert!(
        round.hung.is_empty(),
        "silence while the node was stopped is not a hang"
    );
    assert_eq!(round.beat, vec![9]);
}

#[test]
fn a_round_beats_at_most_its_turns_and_every_runtime_gets_its_turn() {
    let (pool, _) = pool(0);
    for i in 0..10 {
        let taken = pool.take("h", &spec(), &format!("i{i}")).unwrap();
        pool.registered(&taken.runtime_id, i, "unix:/w");
    }
    let start = Instant::now();
    let mut beaten = Vec::new();
    for round in 0..4 {
        let round = pool.heartbeat_round(start + Duration::from_secs(round), TIMEOUT, 3);
        assert!(round.beat.len() <= 3);
        for client in &round.beat {
            pool.heartbeat_ack(&format!("rt{}", client + 1));
        }
        beaten.extend(round.beat);
    }
    beaten.sort_unstable();
    beaten.dedup();
    assert_eq!(
        beaten,
        (0..10).collect::<Vec<u64>>(),
        "4 rounds of 3 reach all 10"
    );
}

#[test]
fn an_ended_runtime_leaves_the_rotation() {
    let (pool, _) = pool(0);
    let taken = pool.take("h", &spec(), "i1").unwrap();
    pool.registered(&taken.runtime_id, 1, "unix:/w");
    pool.ended(&taken.runtime_id, "");
    let round = pool.heartbeat_round(Instant::now(), TIMEOUT, 10);
    assert_eq!(round, HeartbeatRound::default());
    assert!(pool.state.lock().beat_order.is_empty());
}

#[test]
fn a_take_among_many_busy_runtimes_starts_a_new_one_and_leaves_other_binaries_alone() {
    let (pool, _) = pool(0);
    for i in 0..10_000 {
        pool.take("h", &spec(), &format!("i{i}")).unwrap();
    }
    pool.fill("other", &spec()).unwrap();
    assert_eq!(pool.idle("h"), 0);
    let taken = pool.take("h", &spec(), "last").unwrap();
    assert_eq!(taken.runtime_id, "rt10001");
}

#[test]
fn a_paused_runtime_is_stopped_gets_no_heartbeats_is_never_hung_and_resumes_with_a_fresh_timeout() {
    let (pool, spawner) = pool(0);
    pool.fill("h", &spec()).unwrap();
    let taken = pool.take("h", &spec(), "i1").unwrap();
    assert_eq!(taken.runtime_id, "rt1");
    pool.registered("rt1", 9, "unix:/w");
    let start = Instant::now();
    assert_eq!(pool.heartbeat_round(start, TIMEOUT, 100).beat, vec![9]);
    assert!(pool.pause("rt1"));
    assert!(!pool.pause("rt1"), "paused once");
    assert!(!pool.pause("nobody"));
    assert_eq!(pool.paused(), 1);
    assert!(pool.is_paused("rt1"));
    for round in 1..10 {
        let round = pool.heartbeat_round(start + TIMEOUT * round, TIMEOUT, 100);
        assert_eq!(
            round,
            HeartbeatRound::default(),
            "paused: not beaten, not hung"
        );
    }
    assert_eq!(pool.resume_all(), vec!["rt1".to_string()]);
    assert_eq!(pool.paused(), 0);
    assert!(!pool.is_paused("rt1"));
    let signals = spawner.signals.lock().clone();
    assert_eq!(
        signals,
        vec![
            ("rt1".to_string(), libc::SIGSTOP),
            ("rt1".to_string(), libc::SIGCONT)
        ]
    );
    // Its silence while paused was the node's doing: it gets a heartbeat again.
    let round = pool.heartbeat_round(start + TIMEOUT * 11, TIMEOUT, 100);
    assert_eq!(round.beat, vec![9]);
    assert!(round.hung.is_empty());
}
