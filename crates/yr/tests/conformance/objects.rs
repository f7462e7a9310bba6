//! Objects: `put`, `get` (4005 on timeout, 4003 on a value that does not deserialize),
//! `get_all`, `get_all_partial`, `wait` (1001 on bad arguments), `cancel` (1017), and object
//! references stored inside values.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize};
use yr::{ErrorCode, ObjectRef};

use crate::instances::Counter;
use crate::support::{self, add, assert_error, fail_with, get, get_err, slow, unwrap_err, TIMEOUT};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    lines: Vec<(String, u32)>,
    notes: Option<String>,
    totals: BTreeMap<String, f64>,
    shipped: bool,
}

fn order() -> Order {
    Order {
        id: 7,
        customer: "yuanrong".to_string(),
        lines: vec![("tea".to_string(), 2), ("cup".to_string(), 1)],
        notes: None,
        totals: BTreeMap::from([("net".to_string(), 12.5), ("tax".to_string(), 1.25)]),
        shipped: false,
    }
}

/// An even number: serializes any value, but refuses to deserialize an odd one.
#[derive(Debug, PartialEq, Serialize)]
struct Even(u32);

impl<'de> Deserialize<'de> for Even {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u32::deserialize(deserializer)?;
        if value % 2 == 1 {
            return Err(serde::de::Error::custom(format!("{value} is odd")));
        }
        Ok(Even(value))
    }
}

#[yr::invoke]
fn halve(value: Even) -> u32 {
    value.0 / 2
}

#[yr::invoke]
fn order_total(order: Order) -> f64 {
    order.totals.values().sum()
}

#[test]
fn put_and_get_round_trip_a_struct() {
    let _session = support::session();
    let stored = yr::put(order()).unwrap();
    assert!(stored.is_ready());
    assert_eq!(get(&stored), order());
    // Twice, and through a call.
    assert_eq!(stored.get(TIMEOUT).unwrap(), order());
    let total = yr::function(order_total).invoke((&stored,)).unwrap();
    assert_eq!(get(&total), 13.75);
}

#[test]
fn put_gives_every_object_its_own_id() {
    let _session = support::session();
    let a = yr::put(1).unwrap();
    let b = yr::put(1).unwrap();
    assert_ne!(a.id(), b.id());
    assert_ne!(a, b);
    let copy = a.clone();
    assert_eq!(copy, a);
    assert_eq!(copy.id(), a.id());
    assert_eq!(get(&copy), 1);
}

#[test]
fn get_times_out_with_get_operation_failed_naming_the_object() {
    let _session = support::session();
    let late = yr::function(slow).invoke((1, 1_500)).unwrap();
    let started = Instant::now();
    let error = unwrap_err(yr::get(&late, Duration::from_millis(200)));
    let elapsed = started.elapsed();
    let late_id = late.id().to_string();
    assert_error(&error, ErrorCode::GetOperationFailed, &[&late_id]);
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(5),
        "a 200 ms get timeout returned after {elapsed:?}"
    );
    // The object still arrives later.
    assert_eq!(get(&late), 1);
}

#[test]
fn get_with_zero_timeout_returns_a_ready_value() {
    let _session = support::session();
    let stored = yr::put("now".to_string()).unwrap();
    assert_eq!(yr::get(&stored, Duration::ZERO).unwrap(), "now");
    let finished = yr::function(add).invoke((1, 1)).unwrap();
    get(&finished);
    assert_eq!(yr::get(&finished, Duration::ZERO).unwrap(), 2);
}

#[test]
fn get_all_returns_values_in_ref_order() {
    let _session = support::session();
    // The later refs finish first.
    let refs: Vec<ObjectRef<i64>> = (0..5)
        .map(|i| yr::function(slow).invoke((i, 50 * (5 - i) as u64)).unwrap())
        .chain([yr::put(5).unwrap()])
        .collect();
    assert_eq!(yr::get_all(&refs, TIMEOUT).unwrap(), vec![0, 1, 2, 3, 4, 5]);
    assert!(yr::get_all::<i64>(&[], TIMEOUT).unwrap().is_empty());
}

#[test]
fn get_all_fails_with_the_error_of_a_failed_call() {
    let _session = support::session();
    let refs = vec![
        yr::put(1).unwrap(),
        yr::function(fail_with).invoke(("one of many",)).unwrap(),
        yr::function(add).invoke((1, 2)).unwrap(),
    ];
    let error = unwrap_err(yr::get_all(&refs, TIMEOUT));
    assert_error(&error, ErrorCode::UserFunctionException, &["one of many"]);
}

#[test]
fn get_all_timeout_names_only_the_missing_objects() {
    let _session = support::session();
    let present = yr::put(1).unwrap();
    let late = yr::function(slow).invoke((2, 1_500)).unwrap();
    let error = unwrap_err(yr::get_all(
        &[present.clone(), late.clone()],
        Duration::from_millis(200),
    ));
    let late_id = late.id().to_string();
    assert_error(&error, ErrorCode::GetOperationFailed, &[&late_id]);
    assert!(
        !error.message().contains(&present.id().to_string()),
        "the message should not list objects that arrived: {}",
        error.message()
    );
}

#[test]
fn get_all_partial_gives_none_for_failed_and_missing_objects() {
    let _session = support::session();
    // The sum is submitted before the slow call, so it never waits behind it, even when the
    // node has room for one instance only.
    let sum = yr::function(add).invoke((2, 2)).unwrap();
    let refs = vec![
        yr::put(1).unwrap(),
        yr::function(fail_with).invoke(("partial",)).unwrap(),
        yr::function(slow).invoke((3, 3_000)).unwrap(),
        sum,
    ];
    // Let the failure and the sum finish first.
    get_err(&refs[1]);
    get(&refs[3]);
    let started = Instant::now();
    let values = yr::get_all_partial(&refs, Duration::from_millis(300)).unwrap();
    assert_eq!(values, vec![Some(1), None, None, Some(4)]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn value_that_fails_to_deserialize_fails_get_with_deserialization_failed() {
    let _session = support::session();
    let odd = yr::put(Even(3)).unwrap();
    assert_error(
        &unwrap_err(yr::get(&odd, TIMEOUT)),
        ErrorCode::DeserializationFailed,
        &["3 is odd"],
    );
    let even = yr::put(Even(4)).unwrap();
    assert_eq!(yr::get(&even, TIMEOUT).unwrap(), Even(4));
}

#[test]
fn argument_that_fails_to_deserialize_fails_the_call_with_deserialization_failed() {
    let _session = support::session();
    let half = yr::function(halve).invoke((Even(5),)).unwrap();
    assert_error(
        &get_err(&half),
        ErrorCode::DeserializationFailed,
        &["5 is odd"],
    );
    let half = yr::function(halve).invoke((Even(6),)).unwrap();
    assert_eq!(get(&half), 3);
}

#[test]
fn wait_returns_ready_and_unready_refs_counting_failures_as_ready() {
    let _session = support::session();
    let stored = yr::put(1).unwrap();
    let failed = yr::function(fail_with).invoke(("ready anyway",)).unwrap();
    let late = yr::function(slow).invoke((3, 1_500)).unwrap();
    let refs = vec![stored.clone(), late.clone(), failed.clone()];
    let (ready, unready) = yr::wait(&refs, 2, TIMEOUT).unwrap();
    assert_eq!(ready.len(), 2, "{ready:?}");
    assert!(
        ready.contains(&stored) && ready.contains(&failed),
        "{ready:?}"
    );
    assert_eq!(unready, vec![late]);
}

#[test]
fn wait_returns_what_is_ready_when_the_timeout_passes() {
    let _session = support::session();
    let stored = yr::put(1).unwrap();
    let late = yr::function(slow).invoke((2, 1_500)).unwrap();
    let started = Instant::now();
    let (ready, unready) = yr::wait(
        &[stored.clone(), late.clone()],
        2,
        Duration::from_millis(200),
    )
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!((ready, unready), (vec![stored], vec![late]));
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(5),
        "a 200 ms wait returned after {elapsed:?}"
    );
}

#[test]
fn wait_for_more_refs_than_given_fails_with_param_invalid() {
    let _session = support::session();
    let refs = vec![yr::put(1).unwrap(), yr::put(2).unwrap()];
    let error = unwrap_err(yr::wait(&refs, 3, TIMEOUT));
    assert_error(&error, ErrorCode::ParamInvalid, &["3"]);
    let error = unwrap_err(yr::wait(&refs, 0, TIMEOUT));
    assert_error(&error, ErrorCode::ParamInvalid, &[]);
}

#[test]
fn wait_with_duplicate_refs_fails_with_param_invalid() {
    let _session = support::session();
    let stored = yr::put(1).unwrap();
    let refs = vec![stored.clone(), yr::put(2).unwrap(), stored.clone()];
    let error = unwrap_err(yr::wait(&refs, 1, TIMEOUT));
    assert_error(&error, ErrorCode::ParamInvalid, &[&stored.id().to_string()]);
}

#[test]
fn cancel_of_a_call_waiting_for_its_dependency_fails_get_with_schedule_canceled() {
    let _session = support::session();
    let blocker = yr::function(slow).invoke((1, 500)).unwrap();
    let victim = yr::function(add).invoke((&blocker, 1)).unwrap();
    yr::cancel(&victim, false).unwrap();
    let error = get_err(&victim);
    assert_error(&error, ErrorCode::ScheduleCanceled, &["cancel"]);
    // The dependency itself is unaffected, and cancelling is not undone when it arrives.
    assert_eq!(get(&blocker), 1);
    assert_error(&get_err(&victim), ErrorCode::ScheduleCanceled, &[]);
}

#[test]
fn cancel_of_a_call_queued_behind_a_busy_pool_fails_get_with_schedule_canceled() {
    // On the local backend one pool thread makes the second call queue; on others the test
    // only checks that cancel answers consistently.
    let _session = support::session_with(support::one_pool_thread);
    let blocker = yr::function(slow).invoke((1, 500)).unwrap();
    let victim = yr::function(add).invoke((1, 2)).unwrap();
    yr::cancel(&victim, false).unwrap();
    match yr::get(&victim, TIMEOUT) {
        Err(error) => assert_error(&error, ErrorCode::ScheduleCanceled, &["cancel"]),
        Ok(value) => assert!(
            support::backend() != support::Backend::Local,
            "the queued call ran despite cancel and gave {value}"
        ),
    }
    assert_eq!(get(&blocker), 1);
}

#[test]
fn force_cancel_of_a_running_call_fails_its_get_at_once() {
    let _session = support::session();
    let running = yr::function(slow).invoke((1, 3_000)).unwrap();
    let started = Instant::now();
    yr::cancel(&running, true).unwrap();
    let error = get_err(&running);
    assert_error(&error, ErrorCode::ScheduleCanceled, &[]);
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "a force-cancelled call should not be waited for"
    );
}

#[test]
fn cancel_of_a_finished_call_leaves_its_value() {
    let _session = support::session();
    let finished = yr::function(add).invoke((1, 2)).unwrap();
    assert_eq!(get(&finished), 3);
    yr::cancel(&finished, true).unwrap();
    assert_eq!(get(&finished), 3);

    let failed = yr::function(fail_with).invoke(("stays failed",)).unwrap();
    get_err(&failed);
    yr::cancel(&failed, true).unwrap();
    assert_error(
        &get_err(&failed),
        ErrorCode::UserFunctionException,
        &["stays failed"],
    );

    let stored = yr::put(4).unwrap();
    yr::cancel(&stored, true).unwrap();
    assert_eq!(get(&stored), 4);
}

#[test]
fn cancel_of_a_method_result_is_ignored() {
    let _session = support::session();
    let counter = yr::instance(Counter::new).invoke((1,)).unwrap();
    let sum = counter.method(Counter::add).invoke((1,)).unwrap();
    yr::cancel(&sum, true).unwrap();
    assert_eq!(get(&sum), 2);
}

#[test]
fn object_refs_inside_a_stored_value_stay_alive() {
    let _session = support::session();
    let inner = yr::put(5).unwrap();
    let pending = yr::function(slow).invoke((6, 100)).unwrap();
    let outer = yr::put(vec![inner, pending]).unwrap();
    // Only the outer reference is left in the driver.
    let refs = get(&outer);
    assert_eq!(yr::get_all(&refs, TIMEOUT).unwrap(), vec![5, 6]);
    let again = get(&outer);
    assert_eq!(again, refs);
}

#[test]
fn is_ready_turns_true_when_the_value_arrives() {
    let _session = support::session();
    let pending = yr::function(slow).invoke((1, 300)).unwrap();
    assert!(!pending.is_ready());
    let (ready, _) = yr::wait(std::slice::from_ref(&pending), 1, TIMEOUT).unwrap();
    assert_eq!(ready, vec![pending.clone()]);
    assert!(pending.is_ready());
}

#[test]
fn put_and_get_round_trip_a_large_value() {
    let _session = support::session();
    let large: Vec<u64> = (0..250_000).collect();
    let stored = yr::put(large.clone()).unwrap();
    assert_eq!(get(&stored), large);
    let text = "yr".repeat(500_000);
    let stored = yr::put(text.clone()).unwrap();
    assert_eq!(get(&stored), text);
}

#[test]
fn call_depending_on_a_cancelled_call_fails_with_dependency_failed() {
    let _session = support::session();
    let blocker = yr::function(slow).invoke((1, 300)).unwrap();
    let cancelled = yr::function(add).invoke((&blocker, 1)).unwrap();
    yr::cancel(&cancelled, false).unwrap();
    let dependent = yr::function(add).invoke((&cancelled, 1)).unwrap();
    let cancelled_id = cancelled.id().to_string();
    let original_code = format!("code: {}", ErrorCode::ScheduleCanceled.number());
    assert_error(
        &get_err(&dependent),
        ErrorCode::DependencyFailed,
        &[&cancelled_id, &original_code],
    );
}

#[test]
fn calls_from_many_threads_all_complete_with_their_own_values() {
    let _session = support::session();
    let callers: Vec<_> = (0..4i64)
        .map(|caller| {
            std::thread::spawn(move || {
                let refs: Vec<ObjectRef<i64>> = (0..100)
                    .map(|i| yr::function(add).invoke((caller * 1_000, i)).unwrap())
                    .collect();
                let values = yr::get_all(&refs, TIMEOUT).unwrap();
                assert_eq!(
                    values,
                    (0..100).map(|i| caller * 1_000 + i).collect::<Vec<i64>>()
                );
            })
        })
        .collect();
    for caller in callers {
        caller.join().unwrap();
    }
}
