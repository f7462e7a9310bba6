//! InvokeOptions: resources out of range give 1006 naming the valid range, other invalid
//! fields 1001; valid options are accepted and the call runs. Invalid options submit nothing.

use std::collections::BTreeMap;

use yr::{ErrorCode, InvokeOptions};

use crate::instances::Counter;
use crate::support::{self, add, assert_error, get, unwrap_err, Marker};

#[yr::invoke]
fn touch(marker: String) -> bool {
    support::hit(&marker);
    true
}

/// The error `options` give a stateless call and an instance creation, which must agree.
/// Checks that the rejected call did not run.
fn rejection(options: InvokeOptions) -> yr::Error {
    let marker = Marker::new("rejected");
    let call = unwrap_err(
        yr::function(touch)
            .options(options.clone())
            .invoke((marker.path(),)),
    );
    let create = unwrap_err(yr::instance(Counter::new).options(options).invoke((0,)));
    assert_eq!(call.code(), create.code(), "{call} / {create}");
    assert_eq!(call.message(), create.message());
    // A valid call submitted after the refused ones, which marks the same file: once it has
    // run, a refused call that had been submitted before it would have been submitted too.
    let valid = yr::function(touch).invoke((marker.path(),)).unwrap();
    assert!(get(&valid));
    assert_eq!(
        marker.count(),
        1,
        "a call with invalid options must not run"
    );
    call
}

#[test]
fn cpu_below_range_fails_with_resource_config_error_naming_the_range() {
    let _session = support::session();
    let error = rejection(InvokeOptions {
        cpu: 100,
        ..Default::default()
    });
    assert_error(
        &error,
        ErrorCode::ResourceConfigError,
        &["100", "[300, 16000]"],
    );
}

#[test]
fn cpu_above_range_fails_with_resource_config_error_naming_the_range() {
    let _session = support::session();
    let error = rejection(InvokeOptions {
        cpu: 16_001,
        ..Default::default()
    });
    assert_error(
        &error,
        ErrorCode::ResourceConfigError,
        &["16001", "[300, 16000]"],
    );
}

#[test]
fn memory_out_of_range_fails_with_resource_config_error_naming_the_range() {
    let _session = support::session();
    for memory in [64, 1_048_577] {
        let error = rejection(InvokeOptions {
            memory,
            ..Default::default()
        });
        assert_error(
            &error,
            ErrorCode::ResourceConfigError,
            &[&memory.to_string(), "[128, 1048576]"],
        );
    }
}

#[test]
fn concurrency_out_of_range_fails_with_param_invalid() {
    let _session = support::session();
    for concurrency in [0, 1_001] {
        let error = rejection(InvokeOptions {
            concurrency,
            ..Default::default()
        });
        assert_error(
            &error,
            ErrorCode::ParamInvalid,
            &["concurrency", &concurrency.to_string(), "[1, 1000]"],
        );
    }
}

#[test]
fn other_invalid_fields_fail_with_param_invalid_naming_the_field() {
    let _session = support::session();
    let cases: Vec<(InvokeOptions, &str)> = vec![
        (
            InvokeOptions {
                name: Some(String::new()),
                ..Default::default()
            },
            "name",
        ),
        (
            InvokeOptions {
                namespace: Some("team".to_string()),
                ..Default::default()
            },
            "namespace",
        ),
        (
            InvokeOptions {
                env_vars: BTreeMap::from([("A=B".to_string(), "1".to_string())]),
                ..Default::default()
            },
            "env_vars",
        ),
        (
            InvokeOptions {
                schedule_timeout_ms: 0,
                ..Default::default()
            },
            "schedule_timeout_ms",
        ),
        (
            InvokeOptions {
                labels: vec![":value-without-key".to_string()],
                ..Default::default()
            },
            "labels",
        ),
    ];
    for (options, field) in cases {
        let error = rejection(options);
        assert_error(&error, ErrorCode::ParamInvalid, &[field]);
    }
}

#[test]
fn range_boundaries_are_valid() {
    for (cpu, memory, concurrency) in [(300, 128, 1), (16_000, 1_048_576, 1_000)] {
        let options = InvokeOptions {
            cpu,
            memory,
            concurrency,
            ..Default::default()
        };
        if let Err(error) = options.validate() {
            panic!(
                "cpu {cpu}, memory {memory}, concurrency {concurrency} should be valid: {error}"
            );
        }
    }
}

#[test]
fn default_options_are_openyuanrongs_defaults() {
    let options = InvokeOptions::default();
    assert_eq!((options.cpu, options.memory), (500, 500));
    assert_eq!(options.concurrency, 1);
    assert_eq!(options.retry_times, 0);
    assert_eq!(options.schedule_timeout_ms, 30_000);
    assert!(options.name.is_none() && options.namespace.is_none());
    options.validate().unwrap();
}

#[test]
fn valid_options_are_accepted_and_the_call_runs() {
    let _session = support::session();
    let options = InvokeOptions {
        cpu: 300,
        memory: 128,
        recover_retry_times: 1,
        schedule_timeout_ms: 10_000,
        ..Default::default()
    };
    let sum = yr::function(add)
        .options(InvokeOptions {
            retry_times: 1,
            ..options.clone()
        })
        .invoke((2, 3))
        .unwrap();
    assert_eq!(get(&sum), 5);

    let counter = yr::instance(Counter::new)
        .options(InvokeOptions {
            concurrency: 4,
            name: Some(support::unique("with-options")),
            namespace: Some("conformance".to_string()),
            idle_timeout_s: 60,
            ..options
        })
        .invoke((1,))
        .unwrap();
    assert_eq!(get(&counter.method(Counter::add).invoke((1,)).unwrap()), 2);
}

#[test]
fn options_apply_to_every_call_of_the_prepared_function() {
    let _session = support::session();
    let prepared = yr::function(add).options(InvokeOptions {
        cpu: 1_000,
        ..Default::default()
    });
    let refs: Vec<_> = (0..3).map(|i| prepared.invoke((i, i)).unwrap()).collect();
    assert_eq!(yr::get_all(&refs, support::TIMEOUT).unwrap(), vec![0, 2, 4]);
    let rejected = yr::function(add).options(InvokeOptions {
        cpu: 1,
        ..Default::default()
    });
    for _ in 0..2 {
        assert_error(
            &unwrap_err(rejected.invoke((1, 1))),
            ErrorCode::ResourceConfigError,
            &[],
        );
    }
}
