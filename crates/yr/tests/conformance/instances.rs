//! Stateful instances: methods and state, call order, concurrency, constructor failures (2002),
//! named instances (`get_instance`, `list_named_instances`, 1003, 1004), `kill_instance`
//! (4004, 1003), terminate and the shutdown hook (1007), handles passed to other calls.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use yr::{ErrorCode, InstanceHandle, InvokeOptions, NamedInstance};

use crate::support::{
    self, assert_error, call_err, get, get_err, slow, unwrap_err, Marker, TIMEOUT,
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

    pub fn value(&self) -> i64 {
        self.value
    }

    pub fn fail(&self, text: String) -> Result<i64, String> {
        Err(text)
    }

    pub fn explode(&mut self) -> i64 {
        panic!("counter exploded")
    }
}

#[yr::instance]
struct Journal {
    entries: Vec<u32>,
}

#[yr::instance]
impl Journal {
    fn new() -> Self {
        Journal {
            entries: Vec::new(),
        }
    }

    fn append(&mut self, entry: u32) {
        self.entries.push(entry);
    }

    fn append_pair(&mut self, writer: u32, sequence: u32) {
        self.entries.push(writer * 1_000 + sequence);
    }

    fn entries(&self) -> Vec<u32> {
        self.entries.clone()
    }
}

/// Calls that wait for each other: `meet` returns whether `parties` calls were inside it at
/// once.
#[yr::instance]
struct Meeting {
    arrived: Mutex<usize>,
    changed: Condvar,
}

#[yr::instance]
impl Meeting {
    fn new() -> Self {
        Meeting {
            arrived: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    fn meet(&self, parties: usize, timeout_ms: u64) -> bool {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.changed.notify_all();
        let (arrived, _) = self
            .changed
            .wait_timeout_while(arrived, Duration::from_millis(timeout_ms), |n| *n < parties)
            .unwrap();
        *arrived >= parties
    }

    fn nap(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    fn ping(&self) -> bool {
        true
    }
}

#[yr::instance]
struct Fragile {
    note: String,
}

#[yr::instance]
impl Fragile {
    fn refuse(reason: String) -> Result<Self, String> {
        Err(reason)
    }

    fn explode(reason: String) -> Self {
        panic!("constructor exploded: {reason}")
    }

    fn ping(&self) -> String {
        self.note.clone()
    }
}

/// Its shutdown hook sleeps `hook_ms`, then writes the grace period it got to `marker`.
#[yr::instance]
struct Graceful {
    marker: String,
    hook_ms: u64,
}

#[yr::instance]
impl Graceful {
    fn new(marker: String, hook_ms: u64) -> Self {
        Graceful { marker, hook_ms }
    }

    fn ping(&self) -> bool {
        true
    }

    fn nap(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    #[yr::shutdown]
    fn on_shutdown(&mut self, grace_period: Duration) {
        std::thread::sleep(Duration::from_millis(self.hook_ms));
        support::record(&self.marker, &format!("grace={}", grace_period.as_secs()));
    }
}

/// Adds `n` to `counter` from inside a call.
#[yr::invoke]
fn add_through(counter: InstanceHandle<Counter>, n: i64) -> Result<i64, yr::Error> {
    let value = counter.method(Counter::add).invoke((n,))?;
    yr::get(&value, crate::support::TIMEOUT)
}

fn named(name: &str, namespace: Option<&str>) -> InvokeOptions {
    InvokeOptions {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        ..Default::default()
    }
}

fn with_concurrency(concurrency: u32) -> InvokeOptions {
    InvokeOptions {
        concurrency,
        ..Default::default()
    }
}

fn with_grace_seconds(seconds: u64) -> InvokeOptions {
    let mut options = InvokeOptions::default();
    options
        .custom_extensions
        .insert("GRACEFUL_SHUTDOWN_TIME".to_string(), seconds.to_string());
    options
}

/// Wait until the instance serves calls, so that timings do not include its creation.
fn ready(meeting: &InstanceHandle<Meeting>) {
    assert!(get(&meeting.method(Meeting::ping).invoke(()).unwrap()));
}

#[test]
fn instance_methods_read_and_change_its_state() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((10,)).unwrap();
    assert!(!counter.id().is_empty());
    let first = counter.method(Counter::add).invoke((5,)).unwrap();
    let second = counter.method(Counter::add).invoke((-2,)).unwrap();
    let value = counter.method(Counter::value).invoke(()).unwrap();
    assert_eq!((get(&first), get(&second), get(&value)), (15, 13, 13));

    let other = yr::instance(Counter::new).invoke((0,)).unwrap();
    assert_ne!(other.id(), counter.id());
    assert_eq!(get(&other.method(Counter::value).invoke(()).unwrap()), 0);
}

#[test]
fn instance_calls_run_in_submission_order() {
    let _session = support::session();
    let journal = yr::instance(Journal::new).invoke(()).unwrap();
    for entry in 0..200u32 {
        journal.method(Journal::append).invoke((entry,)).unwrap();
    }
    let entries = journal.method(Journal::entries).invoke(()).unwrap();
    assert_eq!(get(&entries), (0..200).collect::<Vec<u32>>());
}

#[test]
fn concurrency_above_one_runs_shared_calls_at_the_same_time() {
    let _session = support::session();
    let meeting = yr::instance(Meeting::new)
        .options(with_concurrency(2))
        .invoke(())
        .unwrap();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            meeting
                .method(Meeting::meet)
                .invoke((2usize, 5_000u64))
                .unwrap()
        })
        .collect();
    assert_eq!(
        yr::get_all(&calls, TIMEOUT).unwrap(),
        vec![true, true],
        "with concurrency 2, two calls should be inside the instance at once"
    );
}

#[test]
fn concurrency_one_serializes_calls() {
    let _session = support::session();
    let meeting = yr::instance(Meeting::new)
        .options(with_concurrency(1))
        .invoke(())
        .unwrap();
    ready(&meeting);
    let started = Instant::now();
    let naps: Vec<_> = (0..2)
        .map(|_| meeting.method(Meeting::nap).invoke((300u64,)).unwrap())
        .collect();
    assert_eq!(yr::get_all(&naps, TIMEOUT).unwrap(), vec![300, 300]);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(600),
        "two 300 ms calls with concurrency 1 overlapped: {elapsed:?}"
    );
}

#[test]
fn constructor_error_surfaces_on_first_method_get() {
    let _session = support::session();
    let fragile = yr::instance(Fragile::refuse)
        .invoke(("no config file",))
        .unwrap();
    let first = fragile.method(Fragile::ping).invoke(()).unwrap();
    assert_error(
        &get_err(&first),
        ErrorCode::UserFunctionException,
        &["no config file"],
    );
    // Every later call reports it too.
    let error = call_err(fragile.method(Fragile::ping).invoke(()));
    assert_error(
        &error,
        ErrorCode::UserFunctionException,
        &["no config file"],
    );
}

#[test]
fn constructor_panic_surfaces_on_first_method_get() {
    let _session = support::session();
    let fragile = yr::instance(Fragile::explode)
        .invoke(("bad input",))
        .unwrap();
    let first = fragile.method(Fragile::ping).invoke(()).unwrap();
    let location = format!("{}:", file!());
    assert_error(
        &get_err(&first),
        ErrorCode::UserFunctionException,
        &["constructor exploded: bad input", &location],
    );
}

#[test]
fn constructor_arguments_may_be_object_refs() {
    let _session = support::session();
    let start = yr::function(slow).invoke((40, 100)).unwrap();
    let counter = yr::instance(Counter::new).invoke((&start,)).unwrap();
    let value = counter.method(Counter::add).invoke((2,)).unwrap();
    assert_eq!(get(&value), 42);
}

#[test]
fn constructor_with_a_failed_ref_argument_surfaces_dependency_failed() {
    let _session = support::session();
    let failed = yr::function(support::fail_with)
        .invoke(("no start value",))
        .unwrap();
    let counter = yr::instance(Counter::new).invoke((&failed,)).unwrap();
    let error = call_err(counter.method(Counter::value).invoke(()));
    let failed_id = failed.id().to_string();
    assert_error(
        &error,
        ErrorCode::DependencyFailed,
        &[&failed_id, "no start value"],
    );
}

#[test]
fn a_constructor_ref_argument_that_failed_already_fails_the_first_call_not_the_invoke() {
    let _session = support::session();
    let failed = yr::function(support::fail_with)
        .invoke(("failed before the create",))
        .unwrap();
    // The failure is in before the create is invoked.
    assert!(yr::get(&failed, support::TIMEOUT).is_err());
    let counter = yr::instance(Counter::new).invoke((&failed,)).unwrap();
    let error = call_err(counter.method(Counter::value).invoke(()));
    let failed_id = failed.id().to_string();
    assert_error(
        &error,
        ErrorCode::DependencyFailed,
        &[&failed_id, "failed before the create"],
    );
}

#[test]
fn method_arguments_may_be_object_refs_and_failed_ones_give_dependency_failed() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((1,)).unwrap();
    let amount = yr::function(slow).invoke((9, 50)).unwrap();
    let sum = counter.method(Counter::add).invoke((amount,)).unwrap();
    assert_eq!(get(&sum), 10);

    let failed = yr::function(support::fail_with)
        .invoke(("no amount",))
        .unwrap();
    let error = call_err(counter.method(Counter::add).invoke((&failed,)));
    let failed_id = failed.id().to_string();
    let original_code = format!("code: {}", ErrorCode::UserFunctionException.number());
    assert_error(
        &error,
        ErrorCode::DependencyFailed,
        &[&failed_id, &original_code],
    );
    // The instance keeps its state and serves later calls.
    assert_eq!(get(&counter.method(Counter::value).invoke(()).unwrap()), 10);
}

#[test]
fn method_error_or_panic_fails_the_call_and_the_instance_lives_on() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((3,)).unwrap();
    let failed = counter
        .method(Counter::fail)
        .invoke(("not today",))
        .unwrap();
    assert_error(
        &get_err(&failed),
        ErrorCode::UserFunctionException,
        &["not today"],
    );
    let exploded = counter.method(Counter::explode).invoke(()).unwrap();
    let location = format!("{}:", file!());
    assert_error(
        &get_err(&exploded),
        ErrorCode::UserFunctionException,
        &["counter exploded", &location],
    );
    assert_eq!(get(&counter.method(Counter::add).invoke((1,)).unwrap()), 4);
}

#[test]
fn creating_an_existing_name_returns_the_same_instance() {
    let _session = support::session();
    let name = support::unique("shared-counter");
    let first = yr::instance(Counter::new)
        .options(named(&name, Some("conformance")))
        .invoke((5,))
        .unwrap();
    assert_eq!(first.id(), format!("conformance-{name}"));
    assert_eq!(get(&first.method(Counter::add).invoke((1,)).unwrap()), 6);

    let second = yr::instance(Counter::new)
        .options(named(&name, Some("conformance")))
        .invoke((100,))
        .unwrap();
    assert_eq!(second.id(), first.id());
    // The state is shared: the second constructor did not run.
    assert_eq!(get(&second.method(Counter::add).invoke((1,)).unwrap()), 7);

    // The same name in another namespace is another instance.
    let elsewhere = yr::instance(Counter::new)
        .options(named(&name, Some("elsewhere")))
        .invoke((100,))
        .unwrap();
    assert_ne!(elsewhere.id(), first.id());
    assert_eq!(
        get(&elsewhere.method(Counter::value).invoke(()).unwrap()),
        100
    );
}

#[test]
fn get_instance_finds_a_named_instance() {
    let _session = support::session();
    let name = support::unique("findable");
    let created = yr::instance(Counter::new)
        .options(named(&name, Some("conformance")))
        .invoke((1,))
        .unwrap();
    let found = yr::get_instance::<Counter>(&name, "conformance", Duration::from_secs(5)).unwrap();
    assert_eq!(found.id(), created.id());
    assert_eq!(get(&found.method(Counter::add).invoke((1,)).unwrap()), 2);

    // Without a namespace.
    let plain = support::unique("plain");
    let created = yr::instance(Counter::new)
        .options(named(&plain, None))
        .invoke((1,))
        .unwrap();
    assert_eq!(created.id(), plain);
    let found = yr::get_instance::<Counter>(&plain, "", Duration::from_secs(5)).unwrap();
    assert_eq!(found.id(), plain);
}

#[test]
fn get_instance_waits_for_a_name_created_within_the_timeout() {
    let _session = support::session();
    let name = support::unique("late");
    // The name is created once the lookup waits for it (on a cluster: once the node parks it).
    let finder = {
        let name = name.clone();
        support::spawn_until_parked(support::Parked::NamedLookup, move || {
            yr::get_instance::<Counter>(&name, "", Duration::from_secs(5))
        })
    };
    let created = yr::instance(Counter::new)
        .options(named(&name, None))
        .invoke((8,))
        .unwrap();
    let found = finder.join().unwrap().unwrap();
    assert_eq!(found.id(), created.id());
    assert_eq!(get(&found.method(Counter::value).invoke(()).unwrap()), 8);
}

#[test]
fn get_instance_of_an_unknown_name_fails_with_instance_not_found() {
    let _session = support::session();
    let started = Instant::now();
    let error = unwrap_err(yr::get_instance::<Counter>(
        "nobody-has-this-name",
        "conformance",
        Duration::from_millis(200),
    ));
    assert_error(
        &error,
        ErrorCode::InstanceNotFound,
        &["nobody-has-this-name"],
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // A name in another namespace does not count.
    let name = support::unique("namespaced");
    yr::instance(Counter::new)
        .options(named(&name, Some("one")))
        .invoke((0,))
        .unwrap();
    let error = unwrap_err(yr::get_instance::<Counter>(
        &name,
        "two",
        Duration::from_millis(100),
    ));
    assert_error(&error, ErrorCode::InstanceNotFound, &[&name]);
}

#[test]
fn get_instance_with_an_empty_name_fails_with_param_invalid() {
    let _session = support::session();
    let error = unwrap_err(yr::get_instance::<Counter>(
        "",
        "",
        Duration::from_millis(100),
    ));
    assert_error(&error, ErrorCode::ParamInvalid, &["name"]);
}

#[test]
fn get_instance_of_another_class_fails_with_param_invalid() {
    let _session = support::session();
    let name = support::unique("journal");
    yr::instance(Journal::new)
        .options(named(&name, None))
        .invoke(())
        .unwrap();
    let error = unwrap_err(yr::get_instance::<Counter>(
        &name,
        "",
        Duration::from_secs(1),
    ));
    assert_error(&error, ErrorCode::ParamInvalid, &["Journal", "Counter"]);
}

#[test]
fn creating_a_taken_name_with_another_class_fails_with_instance_duplicated() {
    let _session = support::session();
    let name = support::unique("taken");
    yr::instance(Journal::new)
        .options(named(&name, None))
        .invoke(())
        .unwrap();
    let error = unwrap_err(
        yr::instance(Counter::new)
            .options(named(&name, None))
            .invoke((0,)),
    );
    assert_error(&error, ErrorCode::InstanceDuplicated, &[&name]);
}

#[test]
fn list_named_instances_lists_names_and_namespaces() {
    let _session = support::session();
    let alpha = support::unique("alpha");
    let beta = support::unique("beta");
    yr::instance(Counter::new)
        .options(named(&alpha, Some("team")))
        .invoke((0,))
        .unwrap();
    let beta_handle = yr::instance(Journal::new)
        .options(named(&beta, None))
        .invoke(())
        .unwrap();
    let anonymous = yr::instance(Counter::new).invoke((0,)).unwrap();

    let listed = yr::list_named_instances().unwrap();
    assert!(
        listed.contains(&NamedInstance {
            name: alpha.clone(),
            namespace: "team".to_string(),
            instance_id: format!("team-{alpha}"),
        }),
        "{listed:?}"
    );
    assert!(
        listed.contains(&NamedInstance {
            name: beta.clone(),
            namespace: String::new(),
            instance_id: beta.clone(),
        }),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .all(|named| named.instance_id != anonymous.id()),
        "an anonymous instance is not named: {listed:?}"
    );

    beta_handle.terminate_sync().unwrap();
    let listed = yr::list_named_instances().unwrap();
    assert!(
        listed.iter().all(|named| named.name != beta),
        "a terminated instance is no longer listed: {listed:?}"
    );
}

#[test]
fn kill_instance_with_an_empty_id_fails_with_instance_id_empty() {
    let _session = support::session();
    let error = unwrap_err(yr::kill_instance(""));
    assert_error(&error, ErrorCode::InstanceIdEmpty, &["empty"]);
}

#[test]
fn kill_instance_of_an_unknown_id_fails_with_incorrect_kill_usage() {
    let _session = support::session();
    let error = unwrap_err(yr::kill_instance("nope"));
    assert_error(&error, ErrorCode::IncorrectKillUsage, &["nope", "kill"]);
}

#[test]
fn kill_instance_stops_the_instance_and_frees_its_name() {
    let _session = support::session();
    let name = support::unique("killable");
    let counter = yr::instance(Counter::new)
        .options(named(&name, None))
        .invoke((1,))
        .unwrap();
    assert_eq!(get(&counter.method(Counter::value).invoke(()).unwrap()), 1);
    yr::kill_instance(counter.id()).unwrap();

    let error = call_err(counter.method(Counter::value).invoke(()));
    assert_error(&error, ErrorCode::InstanceExited, &[counter.id()]);
    let error = unwrap_err(yr::get_instance::<Counter>(
        &name,
        "",
        Duration::from_millis(100),
    ));
    assert_error(&error, ErrorCode::InstanceNotFound, &[&name]);

    // The name can be used again, for a new instance with fresh state.
    let again = yr::instance(Counter::new)
        .options(named(&name, None))
        .invoke((50,))
        .unwrap();
    assert_eq!(get(&again.method(Counter::value).invoke(()).unwrap()), 50);
}

#[test]
fn calls_after_terminate_fail_with_instance_exited() {
    let _session = support::session();
    let synced = yr::instance(Counter::new).invoke((0,)).unwrap();
    assert_eq!(get(&synced.method(Counter::add).invoke((1,)).unwrap()), 1);
    synced.terminate_sync().unwrap();
    let error = call_err(synced.method(Counter::add).invoke((1,)));
    assert_error(&error, ErrorCode::InstanceExited, &[synced.id()]);

    let asynced = yr::instance(Counter::new).invoke((0,)).unwrap();
    assert_eq!(get(&asynced.method(Counter::add).invoke((1,)).unwrap()), 1);
    asynced.terminate().unwrap();
    let error = call_err(asynced.method(Counter::add).invoke((1,)));
    assert_error(&error, ErrorCode::InstanceExited, &[asynced.id()]);
}

#[test]
fn calls_queued_at_terminate_fail_with_instance_exited() {
    let _session = support::session();
    let marker = Marker::new("queued");
    let graceful = yr::instance(Graceful::new)
        .invoke((marker.path(), 0u64))
        .unwrap();
    assert!(get(&graceful.method(Graceful::ping).invoke(()).unwrap()));
    let busy = graceful.method(Graceful::nap).invoke((300u64,)).unwrap();
    let queued: Vec<_> = (0..3)
        .map(|_| graceful.method(Graceful::ping).invoke(()).unwrap())
        .collect();
    graceful.terminate().unwrap();
    for call in &queued {
        assert_error(&get_err(call), ErrorCode::InstanceExited, &[graceful.id()]);
    }
    // The call that was running may finish or fail, but it does end.
    assert!(yr::wait(std::slice::from_ref(&busy), 1, TIMEOUT)
        .unwrap()
        .1
        .is_empty());
}

#[test]
fn terminate_sync_runs_the_shutdown_hook_with_the_grace_period_and_waits_for_it() {
    let _session = support::session();
    let marker = Marker::new("hook");
    let graceful = yr::instance(Graceful::new)
        .options(with_grace_seconds(3))
        .invoke((marker.path(), 200u64))
        .unwrap();
    assert!(get(&graceful.method(Graceful::ping).invoke(()).unwrap()));
    assert_eq!(marker.count(), 0);
    graceful.terminate_sync().unwrap();
    assert_eq!(
        marker.lines(),
        vec!["grace=3".to_string()],
        "terminate_sync should return after the hook ran, with the grace period"
    );
}

#[test]
fn terminate_sync_returns_after_the_grace_period_when_the_hook_overruns() {
    let _session = support::session();
    let marker = Marker::new("slow-hook");
    let graceful = yr::instance(Graceful::new)
        .options(with_grace_seconds(1))
        .invoke((marker.path(), 5_000u64))
        .unwrap();
    assert!(get(&graceful.method(Graceful::ping).invoke(()).unwrap()));
    let started = Instant::now();
    graceful.terminate_sync().unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(4),
        "terminate_sync should not wait past the 1 s grace period for a 5 s hook: {elapsed:?}"
    );
    assert_eq!(marker.count(), 0, "the hook cannot have finished yet");
    let error = call_err(graceful.method(Graceful::ping).invoke(()));
    assert_error(&error, ErrorCode::InstanceExited, &[]);
}

#[test]
fn terminate_returns_at_once_while_the_hook_runs() {
    let _session = support::session();
    let marker = Marker::new("async-hook");
    let graceful = yr::instance(Graceful::new)
        .invoke((marker.path(), 1_500u64))
        .unwrap();
    assert!(get(&graceful.method(Graceful::ping).invoke(()).unwrap()));
    let started = Instant::now();
    graceful.terminate().unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1_000),
        "terminate should not wait for a 1.5 s hook: {elapsed:?}"
    );
    assert!(
        marker.wait_for(1, TIMEOUT),
        "the hook should still run after terminate returned"
    );
    assert_eq!(marker.lines(), vec!["grace=30".to_string()]);
}

#[test]
fn instance_handle_can_be_passed_to_a_function_that_calls_it() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((100,)).unwrap();
    let through = yr::function(add_through)
        .invoke((counter.clone(), 5))
        .unwrap();
    assert_eq!(get(&through), 105);
    // The function changed the same instance the driver holds.
    assert_eq!(
        get(&counter.method(Counter::add).invoke((1,)).unwrap()),
        106
    );
}

#[test]
fn each_callers_calls_run_in_its_submission_order_when_many_threads_call() {
    let _session = support::session();
    let journal = yr::instance(Journal::new).invoke(()).unwrap();
    let writers: Vec<_> = (0..4u32)
        .map(|writer| {
            let journal = journal.clone();
            std::thread::spawn(move || {
                for sequence in 0..50u32 {
                    journal
                        .method(Journal::append_pair)
                        .invoke((writer, sequence))
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let entries = get(&journal.method(Journal::entries).invoke(()).unwrap());
    assert_eq!(entries.len(), 200);
    for writer in 0..4u32 {
        let own: Vec<u32> = entries
            .iter()
            .filter(|entry| **entry / 1_000 == writer)
            .map(|entry| entry % 1_000)
            .collect();
        assert_eq!(own, (0..50).collect::<Vec<u32>>(), "writer {writer}");
    }
}

#[test]
fn exclusive_methods_never_overlap_even_with_concurrency() {
    let _session = support::session();
    let counter = yr::instance(Counter::new)
        .options(with_concurrency(8))
        .invoke((0,))
        .unwrap();
    let sums: Vec<_> = (0..100)
        .map(|_| counter.method(Counter::add).invoke((1,)).unwrap())
        .collect();
    let mut seen = yr::get_all(&sums, TIMEOUT).unwrap();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=100).collect::<Vec<i64>>(),
        "no update may be lost"
    );
}

#[test]
fn terminating_twice_is_harmless() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((0,)).unwrap();
    counter.terminate().unwrap();
    counter.terminate_sync().unwrap();
    counter.terminate_sync().unwrap();
    let error = call_err(counter.method(Counter::value).invoke(()));
    assert_error(&error, ErrorCode::InstanceExited, &[]);
}

#[test]
fn instance_handle_survives_being_stored_as_an_object() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((1,)).unwrap();
    let stored = yr::put(vec![counter.clone()]).unwrap();
    drop(counter);
    let handles = get(&stored);
    assert_eq!(
        get(&handles[0].method(Counter::add).invoke((1,)).unwrap()),
        2
    );
}
