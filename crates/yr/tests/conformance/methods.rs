//! Method calls beyond the plain one: `#[yr::method(return_nums = N)]` (N refs per call, 0 to
//! 3 here), and per-call options (`timeout_s` gives 4005, every other field 1001).

use std::time::{Duration, Instant};

use yr::{ErrorCode, InvokeOptions};

use crate::support::{self, assert_error, get, get_err, unwrap_err};

#[yr::instance]
struct Ledger {
    entries: Vec<i64>,
}

#[yr::instance]
impl Ledger {
    fn new(entries: Vec<i64>) -> Self {
        Ledger { entries }
    }

    /// The smallest and largest entry, and how many there are.
    #[yr::method(return_nums = 3)]
    fn summary(&self) -> (i64, i64, usize) {
        let min = self.entries.iter().copied().min().unwrap_or(0);
        let max = self.entries.iter().copied().max().unwrap_or(0);
        (min, max, self.entries.len())
    }

    /// Adds `entry`; returns the new count and the new total.
    #[yr::method(return_nums = 2)]
    fn record(&mut self, entry: i64) -> Result<(usize, i64), String> {
        if entry < 0 {
            return Err(format!("negative entry {entry}"));
        }
        self.entries.push(entry);
        Ok((self.entries.len(), self.entries.iter().sum()))
    }

    /// Nothing comes back: no refs.
    #[yr::method(return_nums = 0)]
    fn clear(&mut self) {
        self.entries.clear();
    }

    fn count(&self) -> usize {
        self.entries.len()
    }

    fn linger(&self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
}

#[test]
fn a_method_with_return_nums_gives_one_ref_per_tuple_element() {
    let _session = support::session();
    let ledger = yr::instance(Ledger::new).invoke((vec![4, 1, 7],)).unwrap();
    let (min, max, count) = ledger.method(Ledger::summary).invoke(()).unwrap();
    assert_eq!((get(&min), get(&max), get(&count)), (1, 7, 3));
    let (count, total) = ledger.method(Ledger::record).invoke((8,)).unwrap();
    assert_eq!((get(&count), get(&total)), (4, 20));
    assert_eq!(
        Ledger::summary.name(),
        "conformance::methods::Ledger::summary"
    );
}

#[test]
fn a_failed_method_with_return_nums_fails_every_ref_with_its_error() {
    let _session = support::session();
    let ledger = yr::instance(Ledger::new).invoke((vec![],)).unwrap();
    let (count, total) = ledger.method(Ledger::record).invoke((-3,)).unwrap();
    assert_error(
        &get_err(&count),
        ErrorCode::UserFunctionException,
        &["negative entry -3"],
    );
    assert_error(
        &get_err(&total),
        ErrorCode::UserFunctionException,
        &["negative entry -3"],
    );
}

#[test]
fn a_method_with_return_nums_zero_gives_no_ref_and_still_runs_in_order() {
    let _session = support::session();
    let ledger = yr::instance(Ledger::new).invoke((vec![1, 2],)).unwrap();
    let () = ledger.method(Ledger::clear).invoke(()).unwrap();
    // Calls run in submission order: the clear has run before the count.
    let count = ledger.method(Ledger::count).invoke(()).unwrap();
    assert_eq!(get(&count), 0);
}

#[test]
fn a_method_call_past_its_timeout_fails_with_get_operation_failed() {
    let _session = support::session();
    let ledger = yr::instance(Ledger::new).invoke((vec![],)).unwrap();
    // The instance is up before the timed call, so its timeout is the call's alone.
    assert_eq!(get(&ledger.method(Ledger::count).invoke(()).unwrap()), 0);
    let timed = InvokeOptions {
        timeout_s: 1,
        ..Default::default()
    };
    // A call that finishes in time keeps its value.
    let quick = ledger
        .method(Ledger::linger)
        .options(timed.clone())
        .invoke((1,))
        .unwrap();
    assert_eq!(yr::get(&quick, Duration::from_secs(30)).unwrap(), 1);
    let started = Instant::now();
    let late = ledger
        .method(Ledger::linger)
        .options(timed)
        .invoke((5_000,))
        .unwrap();
    let error = unwrap_err(yr::get(&late, Duration::from_secs(30)));
    assert_error(
        &error,
        ErrorCode::GetOperationFailed,
        &["Ledger::linger", "timeout_s of 1 s"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout, not the call, ended the wait ({:?})",
        started.elapsed()
    );
}

#[test]
fn method_options_that_belong_to_the_instance_are_param_invalid() {
    let _session = support::session();
    let ledger = yr::instance(Ledger::new).invoke((vec![],)).unwrap();
    let cases = [
        (
            InvokeOptions {
                cpu: 1000,
                ..Default::default()
            },
            "cpu",
        ),
        (
            InvokeOptions {
                concurrency: 4,
                ..Default::default()
            },
            "concurrency",
        ),
        (
            InvokeOptions {
                retry_times: 2,
                ..Default::default()
            },
            "retry_times",
        ),
        (
            InvokeOptions {
                recover_retry_times: 1,
                ..Default::default()
            },
            "recover_retry_times",
        ),
    ];
    for (options, field) in cases {
        let error = unwrap_err(ledger.method(Ledger::count).options(options).invoke(()));
        assert_error(
            &error,
            ErrorCode::ParamInvalid,
            &[field, "does not apply to a method call"],
        );
    }
    // Invalid values are refused as for any call.
    let error = unwrap_err(
        ledger
            .method(Ledger::count)
            .options(InvokeOptions {
                timeout_s: -5,
                ..Default::default()
            })
            .invoke(()),
    );
    assert_error(&error, ErrorCode::ParamInvalid, &["timeout_s"]);
    // The instance is unharmed.
    assert_eq!(get(&ledger.method(Ledger::count).invoke(()).unwrap()), 0);
}
