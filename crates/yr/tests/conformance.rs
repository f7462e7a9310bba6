//! The yr SDK's conformance suite: the behaviour and error codes of the public API, written
//! against `yr` only, so that every backend must pass the same tests.
//!
//! ```text
//! cargo test -p yr --test conformance                                  # local mode
//! YR_CONFORMANCE_BACKEND=cluster cargo test -p yr --test conformance   # a cluster
//! ```
//!
//! On a cluster, runtimes re-execute this test binary running only the test that created them,
//! and that test's first act ([`support::exclusive`]) turns the process into the runtime.
//!
//! yr keeps process-wide state, so every test takes one lock for its whole run
//! ([`support::session`]); the tests therefore run one at a time whatever `--test-threads`
//! says. Anything a test observes from inside user code (a retry counter, a shutdown hook
//! having run) goes through a marker file, not a static, because on a cluster the user code
//! runs in another process.

#[path = "conformance/support.rs"]
mod support;

#[path = "conformance/async_calls.rs"]
mod async_calls;
#[path = "conformance/cancel.rs"]
mod cancel;
#[path = "conformance/functions.rs"]
mod functions;
#[path = "conformance/instances.rs"]
mod instances;
#[path = "conformance/kv.rs"]
mod kv;
#[path = "conformance/lifecycle.rs"]
mod lifecycle;
#[path = "conformance/methods.rs"]
mod methods;
#[path = "conformance/objects.rs"]
mod objects;
#[path = "conformance/option_fields.rs"]
mod option_fields;
#[path = "conformance/options.rs"]
mod options;
#[path = "conformance/streams.rs"]
mod streams;
