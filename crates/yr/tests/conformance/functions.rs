//! Stateless functions: values, arguments, user errors and panics (2002), `return_nums`,
//! `retry_times`, object references as arguments (top-level, nested, in structs), failed
//! dependencies (4306), chains of calls and awaiting results.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use yr::{ErrorCode, InvokeOptions, ObjectRef};

use crate::support::{
    self, add, assert_error, fail_with, get, get_err, slow, unwrap_err, Marker, TIMEOUT,
};

#[yr::invoke]
fn describe(name: String, count: u32, scale: f64, tags: Vec<String>, flag: Option<bool>) -> String {
    format!("{name} x{count} @{scale} [{}] {flag:?}", tags.join(","))
}

#[yr::invoke]
fn greet(name: String) -> String {
    format!("hello, {name}")
}

#[yr::invoke]
fn double(x: i64) -> i64 {
    x * 2
}

#[yr::invoke]
fn no_arguments() -> String {
    "nothing needed".to_string()
}

#[yr::invoke]
fn explode(tag: String) -> u32 {
    panic!("kaboom {tag} on line {}", line!())
}

#[yr::invoke(return_nums = 2)]
fn split_first_word(text: String) -> (String, usize) {
    let first = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (first, text.split_whitespace().count())
}

#[yr::invoke(return_nums = 2)]
fn split_or_refuse(text: String) -> Result<(String, usize), String> {
    if text.is_empty() {
        return Err("nothing to split".to_string());
    }
    Ok((text.clone(), text.len()))
}

#[yr::invoke(return_nums = 0)]
fn note(marker: String, text: String) {
    support::record(&marker, &text);
}

#[yr::invoke]
fn touch(marker: String) {
    support::hit(&marker);
}

/// Fails its first `failures` attempts (counted in `marker`), then returns the attempt number.
#[yr::invoke]
fn flaky(marker: String, failures: usize) -> Result<usize, String> {
    let attempt = support::hit(&marker);
    if attempt <= failures {
        Err(format!("attempt {attempt} fails on purpose"))
    } else {
        Ok(attempt)
    }
}

/// Whether every ref had arrived when the call started, and the sum of their values.
#[yr::invoke]
fn sum_refs(refs: Vec<ObjectRef<i64>>) -> Result<(bool, i64), yr::Error> {
    let all_ready = refs.iter().all(ObjectRef::is_ready);
    let mut sum = 0;
    for object in &refs {
        sum += yr::get(object, crate::support::TIMEOUT)?;
    }
    Ok((all_ready, sum))
}

#[derive(Serialize, Deserialize)]
struct Job {
    label: String,
    input: ObjectRef<i64>,
}

#[yr::invoke]
fn run_job(job: Job) -> Result<String, yr::Error> {
    let ready = job.input.is_ready();
    let value = yr::get(&job.input, crate::support::TIMEOUT)?;
    Ok(format!("{}={value} ready={ready}", job.label))
}

/// Calls `double` and waits for it, from inside a call.
#[yr::invoke]
fn double_remotely(x: i64) -> Result<i64, yr::Error> {
    let doubled = yr::function(double).invoke((x,))?;
    yr::get(&doubled, crate::support::TIMEOUT)
}

/// A whole CPU per level, so that a 2-core node holds only two levels at once unless blocked
/// levels lend their CPU back.
fn one_cpu() -> yr::InvokeOptions {
    yr::InvokeOptions {
        cpu: 1000,
        ..Default::default()
    }
}

/// Counts down from `depth` by invoking itself: inside its body, `countdown` is its handle.
#[yr::invoke]
fn countdown(depth: u32) -> Result<u32, yr::Error> {
    if depth == 0 {
        return Ok(0);
    }
    let deeper = yr::function(countdown)
        .options(one_cpu())
        .invoke((depth - 1,))?;
    Ok(yr::get(&deeper, Duration::from_secs(60))? + 1)
}

/// Fibonacci by self-invocation, both halves submitted before either is awaited.
#[yr::invoke]
fn fib(n: u64) -> Result<u64, yr::Error> {
    if n < 2 {
        return Ok(n);
    }
    let a = yr::function(fib).invoke((n - 1,))?;
    let b = yr::function(fib).invoke((n - 2,))?;
    Ok(yr::get(&a, Duration::from_secs(60))? + yr::get(&b, Duration::from_secs(60))?)
}

/// Stores `value` and returns the reference.
#[yr::invoke]
fn put_inside(value: i64) -> Result<ObjectRef<i64>, yr::Error> {
    yr::put(value)
}

#[test]
fn function_returns_its_value() {
    let _session = support::session();
    let sum = yr::function(add).invoke((40, 2)).unwrap();
    assert_eq!(get(&sum), 42);
    let constant = yr::function(no_arguments).invoke(()).unwrap();
    assert_eq!(get(&constant), "nothing needed");
}

#[test]
fn function_takes_several_arguments_of_different_types() {
    let _session = support::session();
    let tags = vec!["a".to_string(), "b".to_string()];
    let text = yr::function(describe)
        .invoke(("widget".to_string(), 3u32, 1.5f64, tags, Some(true)))
        .unwrap();
    assert_eq!(get(&text), "widget x3 @1.5 [a,b] Some(true)");
}

#[test]
fn str_can_be_passed_for_a_string_parameter() {
    let _session = support::session();
    let greeting = yr::function(greet).invoke(("yuanrong",)).unwrap();
    assert_eq!(get(&greeting), "hello, yuanrong");
    let owned = yr::function(greet).invoke(("owned".to_string(),)).unwrap();
    assert_eq!(get(&owned), "hello, owned");
}

#[test]
fn function_returning_err_fails_with_user_function_exception_and_the_error_text() {
    let _session = support::session();
    let failed = yr::function(fail_with).invoke(("disk on fire",)).unwrap();
    let error = get_err(&failed);
    assert_error(&error, ErrorCode::UserFunctionException, &["disk on fire"]);
}

#[test]
fn panic_fails_with_user_function_exception_naming_message_and_location() {
    let _session = support::session();
    let failed = yr::function(explode).invoke(("now",)).unwrap();
    let error = get_err(&failed);
    assert_error(&error, ErrorCode::UserFunctionException, &["kaboom now"]);
    // The panic message carries the line of the panic; the location must name the same place.
    let message = error.message();
    let line: String = message
        .split("on line ")
        .nth(1)
        .expect("the panic message")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let location = format!("{}:{line}:", file!());
    assert!(
        message.contains(&location),
        "a panic should name where it happened ({location}): {message:?}"
    );
}

#[test]
fn errors_display_code_module_and_message() {
    let _session = support::session();
    let error = get_err(&yr::function(fail_with).invoke(("shown",)).unwrap());
    assert_eq!(
        error.to_string(),
        format!(
            "ErrCode: {}, ModuleCode: {}, ErrMsg: {}",
            error.code().number(),
            error.module_code().number(),
            error.message()
        )
    );
}

#[test]
fn return_nums_two_gives_a_tuple_of_refs() {
    let _session = support::session();
    let (first, count): (ObjectRef<String>, ObjectRef<usize>) = yr::function(split_first_word)
        .invoke(("open yuan rong",))
        .unwrap();
    assert_ne!(first.id(), count.id());
    assert_eq!(get(&first), "open");
    assert_eq!(get(&count), 3);
}

#[test]
fn return_nums_two_failure_fails_every_ref() {
    let _session = support::session();
    let (text, length) = yr::function(split_or_refuse).invoke(("",)).unwrap();
    for error in [get_err(&text), get_err(&length)] {
        assert_error(
            &error,
            ErrorCode::UserFunctionException,
            &["nothing to split"],
        );
    }
    let (text, length) = yr::function(split_or_refuse).invoke(("abc",)).unwrap();
    assert_eq!((get(&text), get(&length)), ("abc".to_string(), 3));
}

#[test]
fn return_nums_zero_gives_unit_and_still_runs_the_call() {
    let _session = support::session();
    let marker = Marker::new("note");
    let () = yr::function(note)
        .invoke((marker.path(), "ran".to_string()))
        .unwrap();
    assert!(
        marker.wait_for(1, TIMEOUT),
        "a call without return values should still run"
    );
    assert_eq!(marker.lines(), vec!["ran".to_string()]);
}

#[test]
fn unit_returning_function_gives_a_unit_value() {
    let _session = support::session();
    let marker = Marker::new("touch");
    let done: ObjectRef<()> = yr::function(touch).invoke((marker.path(),)).unwrap();
    get(&done);
    assert_eq!(marker.count(), 1);
}

#[test]
fn retry_times_reruns_a_failing_call_until_it_succeeds() {
    let _session = support::session();
    let attempts = Marker::new("retry-enough");
    let options = InvokeOptions {
        retry_times: 2,
        ..Default::default()
    };
    let result = yr::function(flaky)
        .options(options)
        .invoke((attempts.path(), 2usize))
        .unwrap();
    assert_eq!(get(&result), 3);
    assert_eq!(attempts.count(), 3);
}

#[test]
fn retry_times_smaller_than_the_failures_fails_with_the_last_attempts_error() {
    let _session = support::session();
    let attempts = Marker::new("retry-short");
    let options = InvokeOptions {
        retry_times: 1,
        ..Default::default()
    };
    let result = yr::function(flaky)
        .options(options)
        .invoke((attempts.path(), 2usize))
        .unwrap();
    let error = get_err(&result);
    assert_error(
        &error,
        ErrorCode::UserFunctionException,
        &["attempt 2 fails on purpose"],
    );
    assert_eq!(attempts.count(), 2);
}

#[test]
fn without_retry_times_a_failing_call_runs_once() {
    let _session = support::session();
    let attempts = Marker::new("retry-none");
    let result = yr::function(flaky)
        .invoke((attempts.path(), 1usize))
        .unwrap();
    assert_error(
        &get_err(&result),
        ErrorCode::UserFunctionException,
        &["attempt 1 fails on purpose"],
    );
    assert_eq!(attempts.count(), 1);
}

#[test]
fn object_ref_argument_passes_its_value_once_it_arrives() {
    let _session = support::session();
    let slow_value = yr::function(slow).invoke((21, 100)).unwrap();
    let doubled = yr::function(double).invoke((&slow_value,)).unwrap();
    assert_eq!(get(&doubled), 42);
    // By value too, and from put.
    let stored = yr::put(5).unwrap();
    let sum = yr::function(add).invoke((stored, slow_value)).unwrap();
    assert_eq!(get(&sum), 26);
}

#[test]
fn object_refs_nested_in_a_vec_are_resolved_before_the_callee_runs() {
    let _session = support::session();
    let refs: Vec<ObjectRef<i64>> = (1..=4)
        .map(|i| yr::function(slow).invoke((i, 30 * i as u64)).unwrap())
        .chain([yr::put(100).unwrap()])
        .collect();
    let result = yr::function(sum_refs).invoke((refs,)).unwrap();
    assert_eq!(get(&result), (true, 110));
}

#[test]
fn object_ref_in_a_struct_field_is_resolved_before_the_callee_runs() {
    let _session = support::session();
    let input = yr::function(slow).invoke((7, 100)).unwrap();
    let job = Job {
        label: "seven".to_string(),
        input,
    };
    let result = yr::function(run_job).invoke((job,)).unwrap();
    assert_eq!(get(&result), "seven=7 ready=true");
}

#[test]
fn callee_can_get_nested_refs_on_a_one_thread_pool_without_deadlock() {
    let _session = support::session_with(support::one_pool_thread);
    let refs: Vec<ObjectRef<i64>> = (0..3)
        .map(|i| yr::function(double).invoke((i,)).unwrap())
        .collect();
    let result = yr::function(sum_refs).invoke((refs,)).unwrap();
    assert_eq!(get(&result), (true, 6));
}

#[test]
fn function_can_call_and_get_another_function_on_a_one_thread_pool() {
    let _session = support::session_with(support::one_pool_thread);
    let result = yr::function(double_remotely).invoke((21,)).unwrap();
    assert_eq!(get(&result), 42);
    let many: Vec<_> = (0..4)
        .map(|i| yr::function(double_remotely).invoke((i,)).unwrap())
        .collect();
    assert_eq!(yr::get_all(&many, TIMEOUT).unwrap(), vec![0, 2, 4, 6]);
}

#[test]
fn failed_dependency_fails_the_call_with_dependency_failed_naming_request_and_code() {
    let _session = support::session();
    let failed = yr::function(fail_with).invoke(("disk on fire",)).unwrap();
    let dependent = yr::function(double).invoke((&failed,)).unwrap();
    let error = get_err(&dependent);
    let failed_id = failed.id().to_string();
    let original_code = format!("code: {}", ErrorCode::UserFunctionException.number());
    assert_error(
        &error,
        ErrorCode::DependencyFailed,
        &[&failed_id, &original_code, "disk on fire"],
    );
}

#[test]
fn failed_nested_dependency_fails_the_call_with_dependency_failed() {
    let _session = support::session();
    let failed = yr::function(fail_with).invoke(("nested failure",)).unwrap();
    let refs = vec![yr::put(1).unwrap(), failed.clone()];
    let dependent = yr::function(sum_refs).invoke((refs,)).unwrap();
    let failed_id = failed.id().to_string();
    assert_error(
        &get_err(&dependent),
        ErrorCode::DependencyFailed,
        &[&failed_id, "nested failure"],
    );
    let job = Job {
        label: "broken".to_string(),
        input: failed.clone(),
    };
    let dependent = yr::function(run_job).invoke((job,)).unwrap();
    assert_error(
        &get_err(&dependent),
        ErrorCode::DependencyFailed,
        &[&failed_id],
    );
}

#[test]
fn chain_of_calls_passes_refs_along() {
    let _session = support::session();
    let mut value = yr::put(1i64).unwrap();
    for _ in 0..10 {
        value = yr::function(double).invoke((value,)).unwrap();
    }
    assert_eq!(get(&value), 1024);
    // A chain whose first link fails: every later link reports the failed dependency.
    let mut value = yr::function(fail_with).invoke(("first link",)).unwrap();
    for _ in 0..3 {
        value = yr::function(double).invoke((value,)).unwrap();
    }
    assert_error(&get_err(&value), ErrorCode::DependencyFailed, &[]);
}

#[test]
fn function_may_return_object_refs_it_created() {
    let _session = support::session();
    let outer = yr::function(put_inside).invoke((99,)).unwrap();
    let inner = get(&outer);
    assert_eq!(get(&inner), 99);
}

#[test]
fn object_ref_can_be_awaited() {
    let _session = support::session();
    let stored = yr::put("ready".to_string()).unwrap();
    assert_eq!(
        support::block_on(async { (&stored).await }).unwrap(),
        "ready"
    );

    let started = Instant::now();
    let pending = yr::function(slow).invoke((5, 100)).unwrap();
    let other = yr::function(add).invoke((1, 1)).unwrap();
    let sum = support::block_on(async move {
        let a = pending.await?;
        let b = other.await?;
        Ok::<_, yr::Error>(a + b)
    });
    assert_eq!(sum.unwrap(), 7);
    assert!(
        started.elapsed() < TIMEOUT / 2,
        "awaiting should be woken when the value arrives"
    );
}

#[test]
fn awaiting_a_failed_call_gives_its_error() {
    let _session = support::session();
    let failed = yr::function(fail_with)
        .invoke(("awaited failure",))
        .unwrap();
    let error = unwrap_err(support::block_on(async move { failed.await }));
    assert_error(
        &error,
        ErrorCode::UserFunctionException,
        &["awaited failure"],
    );
}

#[test]
fn invoke_returns_before_the_call_finishes() {
    let _session = support::session();
    let started = Instant::now();
    let pending = yr::function(slow).invoke((1, 1_000)).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "invoke should not wait for the call"
    );
    assert!(!pending.is_ready());
    assert_eq!(get(&pending), 1);
    assert!(pending.is_ready());
}

#[test]
fn user_errors_are_not_confused_with_results_of_other_calls() {
    let _session = support::session();
    let refs: Vec<ObjectRef<i64>> = (0..20)
        .map(|i| {
            let submitted = if i % 3 == 0 {
                yr::function(fail_with).invoke((format!("failure {i}"),))
            } else {
                yr::function(add).invoke((i, 0))
            };
            submitted.unwrap()
        })
        .collect();
    for (i, object) in refs.iter().enumerate() {
        if i % 3 == 0 {
            let error = unwrap_err(yr::get(object, TIMEOUT));
            assert_error(
                &error,
                ErrorCode::UserFunctionException,
                &[&format!("failure {i}")],
            );
        } else {
            assert_eq!(get(object), i as i64);
        }
    }
}

#[test]
fn fibonacci_by_self_invocation_is_right() {
    // Local mode only: fib(10) is 177 calls, a runtime each at its widest on a cluster.
    if support::backend() != support::Backend::Local {
        return;
    }
    let _session = support::session_with(support::one_pool_thread);
    let ten = yr::function(fib).invoke((10,)).unwrap();
    assert_eq!(yr::get(&ten, Duration::from_secs(60)).unwrap(), 55);
}

#[test]
fn a_function_invoking_itself_twelve_deep_finishes_because_blocked_tasks_lend_their_cpu() {
    let _session = support::session();
    let top = yr::function(countdown)
        .options(one_cpu())
        .invoke((12,))
        .unwrap();
    assert_eq!(yr::get(&top, Duration::from_secs(120)).unwrap(), 12);
}
