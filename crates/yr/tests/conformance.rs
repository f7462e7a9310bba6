//! The yr SDK's conformance suite: the behaviour and error codes of the public API, written
//! against `yr` only, so that every backend must pass the same tests.
//!
//! ```text
//! cargo test -p yr --test conformance                                  # local mode
//! YR_CONFORMANCE_BACKEND=cluster cargo test -p yr --test conformance   # a cluster
//! ```
//!
//! yr keeps process-wide state, so every test takes one lock for its whole run
//! ([`support::session`]); the tests therefore run one at a time whatever `--test-threads`
//! says. Anything a test observes from inside user code (a retry counter, a shutdown hook
//! having run) goes through a marker file, not a static, because on a cluster the user code
//! runs in another process.

#[path = "conformance/support.rs"]
mod support;

#[path = "conformance/functions.rs"]
mod functions;
#[path = "conformance/instances.rs"]
mod instances;
#[path = "conformance/kv.rs"]
mod kv;
#[path = "conformance/lifecycle.rs"]
mod lifecycle;
#[path = "conformance/objects.rs"]
mod objects;
#[path = "conformance/option_fields.rs"]
mod option_fields;
#[path = "conformance/options.rs"]
mod options;
#[path = "conformance/streams.rs"]
mod streams;

/// Not a test: the entry point of runtime processes in cluster runs. A node re-executes this
/// test binary as a runtime (`YR_RUNTIME_MODE=1`) with `YR_RUNTIME_ARGS` filtering to this
/// function, and `yr::init` then serves the node instead of returning. In a normal run it does
/// nothing.
#[test]
fn runtime_entry() {
    if std::env::var("YR_RUNTIME_MODE").as_deref() == Ok("1") {
        let _ = yr::init(yr::Config::default());
    }
}
