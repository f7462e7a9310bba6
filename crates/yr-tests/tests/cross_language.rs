//! A Rust driver calls Python code in the same cluster (docs/design/018): functions by module
//! and name, and instances of a Python class, in Python runtimes the node starts from the
//! interpreter (`$YR_PYTHON`, else this workspace's `.venv/bin/python`, which
//! `scripts/python-env` makes with the `yr` package). Every plain kind of value makes the round
//! trip as MessagePack, and a name Python does not have is 1015.
//!
//! They need that interpreter, so they are ignored by a plain `cargo test`; `scripts/test` runs
//! them after it builds the package:
//! `YR_PYTHON=.venv/bin/python cargo test -p yr-tests --test cross_language -- --ignored`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use yr::ErrorCode;
use yr_tests::{assert_error, call_err, exclusive, TestCluster, TIMEOUT};

const NEEDS_PYTHON: &str = "needs the yr Python package: scripts/python-env, then \
                            YR_PYTHON=.venv/bin/python cargo test -p yr-tests --test \
                            cross_language -- --ignored";

/// The interpreter with the `yr` package.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("YR_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(venv.exists(), "no Python interpreter: {NEEDS_PYTHON}");
    std::path::absolute(venv).expect("an absolute path")
}

/// Where the module the tests call lives.
fn modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

fn function(name: &str) -> yr::PythonFunction {
    yr::python_function("xlang_functions", name)
        .interpreter(python())
        .python_path(modules())
}

fn counter_class() -> yr::PythonInstanceClass {
    yr::python_instance_class("xlang_functions", "Counter")
        .interpreter(python())
        .python_path(modules())
}

/// `value` goes to Python and back unchanged, and Python sees it as a `python_type`.
#[track_caller]
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T, python_type: &str) {
    let echoed = function("echo").invoke::<T>((&value,)).unwrap();
    assert_eq!(yr::get(&echoed, TIMEOUT).unwrap(), value);
    let seen = function("type_of").invoke::<String>((&value,)).unwrap();
    assert_eq!(yr::get(&seen, TIMEOUT).unwrap(), python_type, "{value:?}");
}

/// Run `story` as the driver of a cluster of its own.
fn on_a_cluster(story: impl FnOnce()) {
    let _exclusive = exclusive();
    let cluster = TestCluster::start();
    yr::init(cluster.config()).unwrap();
    story();
    yr::finalize().unwrap();
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Point {
    x: f64,
    y: f64,
    label: Option<String>,
}

#[test]
#[ignore = "needs the yr Python package (YR_PYTHON); scripts/test runs it"]
fn every_plain_value_makes_the_round_trip_through_a_python_function() {
    on_a_cluster(|| {
        round_trip(0_i64, "int");
        round_trip(-5_i64, "int");
        round_trip(i64::MIN, "int");
        round_trip(u64::MAX, "int");
        round_trip(1.5_f64, "float");
        round_trip(-2.25e300_f64, "float");
        round_trip(true, "bool");
        round_trip(String::new(), "str");
        round_trip("héllo, 世界".to_string(), "str");
        round_trip(ByteBuf::from(vec![0_u8, 1, 255]), "bytes");
        round_trip(Vec::<i64>::new(), "list");
        round_trip(vec![1_i64, -2, 3], "list");
        round_trip(("a".to_string(), 2_i64), "list");
        round_trip(BTreeMap::from([("a".to_string(), 1_i64)]), "dict");
        round_trip(None::<i64>, "NoneType");
        round_trip(Some(7_i64), "int");
        round_trip(
            Point {
                x: 1.0,
                y: -2.5,
                label: Some("p".into()),
            },
            "dict",
        );
        round_trip(
            vec![BTreeMap::from([(
                "words".to_string(),
                vec!["x".to_string(), "y".to_string()],
            )])],
            "list",
        );
        let sum = function("add").invoke::<i64>((40, 2)).unwrap();
        assert_eq!(yr::get(&sum, TIMEOUT).unwrap(), 42);
        // A large value crosses through the node's shared memory.
        let big = ByteBuf::from(vec![7_u8; 3 << 20]);
        let echoed = function("echo").invoke::<ByteBuf>((&big,)).unwrap();
        assert_eq!(yr::get(&echoed, TIMEOUT).unwrap(), big);
    });
}

#[test]
#[ignore = "needs the yr Python package (YR_PYTHON); scripts/test runs it"]
fn a_python_instance_keeps_its_state_between_calls_from_rust() {
    on_a_cluster(|| {
        let counter = counter_class().invoke((10,)).unwrap();
        let total = counter.method("add").invoke::<i64>((5,)).unwrap();
        assert_eq!(yr::get(&total, TIMEOUT).unwrap(), 15);
        let total = counter.method("add").invoke::<i64>((-1,)).unwrap();
        assert_eq!(yr::get(&total, TIMEOUT).unwrap(), 14);
        let value = counter.method("get").invoke::<i64>(()).unwrap();
        assert_eq!(yr::get(&value, TIMEOUT).unwrap(), 14);
        counter.terminate_sync().unwrap();
    });
}

#[test]
#[ignore = "needs the yr Python package (YR_PYTHON); scripts/test runs it"]
fn a_name_python_does_not_have_is_1015_naming_it() {
    on_a_cluster(|| {
        let missing = |name: &str| call_err(function(name).invoke::<i64>((1,)), TIMEOUT);
        let function_meta = [ErrorCode::FunctionMetaNotFound];
        assert_error(
            &missing("no_such_function"),
            &function_meta,
            &["xlang_functions.no_such_function"],
        );
        assert_error(
            &missing("NOT_A_FUNCTION"),
            &function_meta,
            &["xlang_functions.NOT_A_FUNCTION", "not a function"],
        );
        let no_module = yr::python_function("no_such_module", "f")
            .interpreter(python())
            .invoke::<i64>(());
        assert_error(
            &call_err(no_module, TIMEOUT),
            &function_meta,
            &["no_such_module"],
        );

        let nobody = yr::python_instance_class("xlang_functions", "Nobody")
            .interpreter(python())
            .python_path(modules())
            .invoke(())
            .unwrap();
        let error = call_err(nobody.method("get").invoke::<i64>(()), TIMEOUT);
        assert_error(&error, &function_meta, &["xlang_functions.Nobody"]);

        let counter = counter_class().invoke((0,)).unwrap();
        let error = call_err(counter.method("reset").invoke::<i64>(()), TIMEOUT);
        assert_error(&error, &function_meta, &["Counter.reset"]);
        counter.terminate().unwrap();
    });
}

#[test]
#[ignore = "needs the yr Python package (YR_PYTHON); scripts/test runs it"]
fn a_python_exception_is_2002_with_its_traceback_and_an_unsendable_result_too() {
    on_a_cluster(|| {
        let error = call_err(function("fail").invoke::<i64>(("no luck",)), TIMEOUT);
        assert_error(
            &error,
            &[ErrorCode::UserFunctionException],
            &["ValueError", "no luck", "Traceback"],
        );
        let error = call_err(function("returns_a_set").invoke::<Vec<i64>>(()), TIMEOUT);
        assert_error(
            &error,
            &[ErrorCode::UserFunctionException],
            &["result 0", "set"],
        );
        // A result of another type than the caller reads is the caller's 4003.
        let text = function("echo").invoke::<i64>(("text",)).unwrap();
        assert_error(
            &yr::get(&text, TIMEOUT).unwrap_err(),
            &[ErrorCode::DeserializationFailed],
            &["i64"],
        );
    });
}
