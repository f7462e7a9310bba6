//! Lifecycle: `init`, `finalize`, `is_initialized`; 4001 before `init` and on a second `init`;
//! 9000 for pending and new calls after `finalize`; 4006 for `finalize` inside user code.

use std::time::{Duration, Instant};

use yr::{ErrorCode, InvokeOptions};

use crate::instances::Counter;
use crate::support::{self, add, assert_error, slow, unwrap_err, Backend};

/// What `yr::finalize` answers where user code runs: its error's code number and message
/// (0 and nothing if it finalized).
fn finalize_here() -> (u32, String) {
    match yr::finalize() {
        Ok(()) => (0, String::new()),
        Err(error) => (error.code().number(), error.message().to_string()),
    }
}

#[yr::invoke]
fn finalize_in_a_function() -> (u32, String) {
    finalize_here()
}

/// `finalize` from a thread the function started: not user code itself, but in a cluster it
/// runs in the runtime's process.
#[yr::invoke]
fn finalize_in_a_thread_of_a_function() -> (u32, String) {
    std::thread::spawn(finalize_here).join().unwrap()
}

#[yr::instance]
struct Finalizer;

#[yr::instance]
impl Finalizer {
    fn new() -> Self {
        Finalizer
    }

    fn finalize(&self) -> (u32, String) {
        finalize_here()
    }
}

#[test]
fn calls_before_init_fail_with_incorrect_init_usage_telling_to_call_init() {
    support::in_fresh_process(
        "lifecycle::calls_before_init_fail_with_incorrect_init_usage_telling_to_call_init",
        || {
            assert!(!yr::is_initialized());
            let errors = [
                ("put", unwrap_err(yr::put(1))),
                ("invoke", unwrap_err(yr::function(add).invoke((1, 2)))),
                (
                    "instance",
                    unwrap_err(yr::instance(Counter::new).invoke((0,))),
                ),
                (
                    "get_all",
                    unwrap_err(yr::get_all::<i64>(&[], Duration::from_secs(1))),
                ),
                (
                    "wait",
                    unwrap_err(yr::wait::<i64>(&[], 1, Duration::from_secs(1))),
                ),
                (
                    "get_instance",
                    unwrap_err(yr::get_instance::<Counter>(
                        "x",
                        "",
                        Duration::from_millis(10),
                    )),
                ),
                (
                    "list_named_instances",
                    unwrap_err(yr::list_named_instances()),
                ),
                ("kill_instance", unwrap_err(yr::kill_instance("x"))),
            ];
            for (call, error) in &errors {
                assert_eq!(
                    error.code(),
                    ErrorCode::IncorrectInitUsage,
                    "{call} before init: {error}"
                );
                assert!(
                    error.message().contains("init"),
                    "{call} before init should tell to call init: {error}"
                );
            }
            // finalize before init is allowed and does nothing.
            yr::finalize().unwrap();
            assert!(!yr::is_initialized());
        },
    );
}

#[test]
fn second_init_fails_with_incorrect_init_usage() {
    let _session = support::session();
    let error = unwrap_err(yr::init(support::config()));
    assert_error(&error, ErrorCode::IncorrectInitUsage, &["finalize"]);
    // The first session is untouched.
    assert!(yr::is_initialized());
    assert_eq!(support::get(&yr::put(7).unwrap()), 7);
}

#[test]
fn is_initialized_follows_init_and_finalize() {
    let _exclusive = support::exclusive();
    assert!(!yr::is_initialized());
    yr::init(support::config()).unwrap();
    assert!(yr::is_initialized());
    yr::finalize().unwrap();
    assert!(!yr::is_initialized());
    // A second finalize does nothing.
    yr::finalize().unwrap();
    assert!(!yr::is_initialized());
}

#[test]
fn init_returns_the_configured_job_id_or_generates_one() {
    let _exclusive = support::exclusive();
    let mut config = support::config();
    config.job_id = Some(support::unique("job").replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let expected = config.job_id.clone().unwrap();
    assert_eq!(yr::init(config).unwrap().job_id, expected);
    yr::finalize().unwrap();

    let mut config = support::config();
    config.job_id = None;
    let generated = yr::init(config).unwrap().job_id;
    assert!(!generated.is_empty());
    assert_ne!(generated, expected);
}

#[test]
fn init_with_an_invalid_config_fails_with_param_invalid_and_leaves_yr_uninitialized() {
    let _exclusive = support::exclusive();
    let mut config = support::config();
    config.log_level = "loud".to_string();
    let error = unwrap_err(yr::init(config));
    assert_error(&error, ErrorCode::ParamInvalid, &["log_level", "loud"]);
    assert!(!yr::is_initialized());
    // A valid configuration still works afterwards.
    yr::init(support::config()).unwrap();
    assert!(yr::is_initialized());
}

#[test]
fn finalize_fails_pending_method_calls_with_finalized() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    let counter = yr::instance(Counter::new).invoke((0,)).unwrap();
    let running = counter.method(Counter::add).invoke((1,)).unwrap();
    assert_eq!(support::get(&running), 1);
    let blocker = yr::function(slow).invoke((1, 3_000)).unwrap();
    // Queued behind a call that waits for a slow dependency.
    let waiting = counter.method(Counter::add).invoke((&blocker,)).unwrap();
    let queued = counter.method(Counter::add).invoke((1,)).unwrap();
    yr::finalize().unwrap();
    for pending in [&waiting, &queued] {
        let error = unwrap_err(support::block_on(async { pending.await }));
        assert_error(&error, ErrorCode::Finalized, &[]);
    }
}

#[test]
fn finalize_fails_pending_calls_with_finalized() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    let pending = yr::function(slow).invoke((1, 3_000)).unwrap();
    let waited = pending.clone();
    // Finalize runs once the waiter blocks in get.
    let waiter = support::spawn_until_blocked(move || {
        let result = yr::get(&waited, Duration::from_secs(30));
        (result, Instant::now())
    });
    let finalized_at = Instant::now();
    yr::finalize().unwrap();

    let (result, returned_at) = waiter.join().unwrap();
    let error = unwrap_err(result);
    assert_error(&error, ErrorCode::Finalized, &[]);
    assert!(
        returned_at.saturating_duration_since(finalized_at) < Duration::from_secs(2),
        "a get blocked on a pending call should return when finalize runs"
    );

    // The pending object itself ended with 9000, whoever reads it.
    assert!(
        pending.is_ready(),
        "finalize should finish every pending object"
    );
    let error = unwrap_err(support::block_on(async { (&pending).await }));
    assert_error(&error, ErrorCode::Finalized, &["finalize"]);
}

#[test]
fn calls_after_finalize_fail_with_finalized() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    let object = yr::put(5).unwrap();
    let counter = yr::instance(Counter::new).invoke((0,)).unwrap();
    yr::finalize().unwrap();

    let errors = [
        ("put", unwrap_err(yr::put(1))),
        ("get", unwrap_err(yr::get(&object, Duration::from_secs(1)))),
        (
            "get_all",
            unwrap_err(yr::get_all(
                std::slice::from_ref(&object),
                Duration::from_secs(1),
            )),
        ),
        (
            "wait",
            unwrap_err(yr::wait(
                std::slice::from_ref(&object),
                1,
                Duration::from_secs(1),
            )),
        ),
        ("cancel", unwrap_err(yr::cancel(&object, false))),
        ("invoke", unwrap_err(yr::function(add).invoke((1, 2)))),
        (
            "instance",
            unwrap_err(yr::instance(Counter::new).invoke((0,))),
        ),
        (
            "method",
            unwrap_err(counter.method(Counter::add).invoke((1,))),
        ),
        ("terminate", unwrap_err(counter.terminate())),
        (
            "get_instance",
            unwrap_err(yr::get_instance::<Counter>(
                "x",
                "",
                Duration::from_millis(10),
            )),
        ),
        (
            "list_named_instances",
            unwrap_err(yr::list_named_instances()),
        ),
        ("kill_instance", unwrap_err(yr::kill_instance(counter.id()))),
    ];
    for (call, error) in &errors {
        assert_eq!(
            error.code(),
            ErrorCode::Finalized,
            "{call} after finalize: {error}"
        );
        assert!(
            error.message().contains("init"),
            "{call} after finalize should tell to init again: {error}"
        );
    }
}

#[test]
fn init_works_again_after_finalize() {
    let _exclusive = support::exclusive();
    for round in 0..3 {
        yr::init(support::config()).unwrap();
        let sum = yr::function(add).invoke((round, 1)).unwrap();
        assert_eq!(support::get(&sum), round + 1);
        let options = InvokeOptions {
            name: Some("lifecycle-counter".to_string()),
            ..Default::default()
        };
        // A named instance from an earlier round is gone: its state starts afresh.
        let counter = yr::instance(Counter::new)
            .options(options)
            .invoke((round * 10,))
            .unwrap();
        let value = counter.method(Counter::add).invoke((1,)).unwrap();
        assert_eq!(support::get(&value), round * 10 + 1);
        yr::finalize().unwrap();
    }
}

#[test]
fn finalize_inside_a_function_or_method_fails_with_incorrect_function_usage() {
    let _session = support::session();
    let usage = ErrorCode::IncorrectFunctionUsage.number();
    let (code, message) = support::get(&yr::function(finalize_in_a_function).invoke(()).unwrap());
    assert_eq!(code, usage, "{message}");
    assert!(message.contains("only the driver"), "{message}");
    let finalizer = yr::instance(Finalizer::new).invoke(()).unwrap();
    let (code, message) = support::get(&finalizer.method(Finalizer::finalize).invoke(()).unwrap());
    assert_eq!(code, usage, "{message}");
    // Nothing was finalized: the driver's yr still works.
    assert!(yr::is_initialized());
    assert_eq!(support::get(&yr::function(add).invoke((1, 2)).unwrap()), 3);
}

#[test]
fn finalize_anywhere_in_a_runtime_process_fails_with_incorrect_function_usage() {
    if support::backend() != Backend::Cluster {
        // In local mode user code shares the driver's process: a thread of its own may
        // finalize the driver, as any driver thread may.
        return;
    }
    let _session = support::session();
    let (code, message) = support::get(
        &yr::function(finalize_in_a_thread_of_a_function)
            .invoke(())
            .unwrap(),
    );
    assert_eq!(
        code,
        ErrorCode::IncorrectFunctionUsage.number(),
        "{message}"
    );
    assert!(message.contains("runtime process"), "{message}");
}
