//! # yr
//!
//! Run ordinary Rust functions and structs across a cluster as if on one machine.
//!
//! - `#[yr::invoke]` registers a stateless function; [`function`] calls it and returns an
//!   [`ObjectRef`] at once. `#[yr::invoke(return_nums = N)]` gives N refs. Inside its body the
//!   function's name is its handle, so a function can invoke itself.
//! - `#[yr::instance]` on a struct and its `impl` block declares a stateful instance class;
//!   [`instance`] creates one remotely and returns an [`InstanceHandle`] whose methods you call.
//!   `#[yr::method(return_nums = N)]` on a method gives N refs per call ([`MultiMethod`]); a
//!   method call takes options too ([`MethodInvocation::options`]: `timeout_s`).
//! - Functions, constructors and methods may be `async fn`: they run on yr's async runtime,
//!   where tokio's timers and `spawn` work and an [`ObjectRef`] can be awaited; an instance's
//!   async methods interleave up to its `concurrency`.
//! - [`put`], [`get`], [`get_all`], [`wait`], [`cancel`] and [`cancel_all`] (several refs, and
//!   with `recursive` the calls they submitted) work with objects.
//! - [`kv_write`], [`kv_read`], [`kv_get_with_param`], [`kv_del`] and [`kv_exist`] use the
//!   data system's key-value store.
//! - [`create_stream_producer`], [`create_stream_consumer`], [`delete_stream`],
//!   [`query_global_producers_num`] and [`query_global_consumers_num`] use its streams.
//! - [`python_function`] and [`python_instance_class`] call Python code in the same cluster.
//!
//! ```
//! #[yr::invoke]
//! fn say_hello(name: String) -> String {
//!     format!("hello, {name}")
//! }
//!
//! yr::init(yr::Config::local()).unwrap();
//! let greeting = yr::function(say_hello).invoke(("yuanrong",)).unwrap();
//! assert_eq!(yr::get(&greeting, yr::FOREVER).unwrap(), "hello, yuanrong");
//! yr::finalize().unwrap();
//! ```
//!
//! A function that invokes itself, and an async one:
//!
//! ```
//! #[yr::invoke]
//! fn fib(n: u64) -> Result<u64, yr::Error> {
//!     if n < 2 {
//!         return Ok(n);
//!     }
//!     let a = yr::function(fib).invoke((n - 1,))?;
//!     let b = yr::function(fib).invoke((n - 2,))?;
//!     Ok(yr::get(&a, yr::FOREVER)? + yr::get(&b, yr::FOREVER)?)
//! }
//!
//! #[yr::invoke]
//! async fn fib_later(n: u64) -> Result<u64, yr::Error> {
//!     tokio::time::sleep(std::time::Duration::from_millis(1)).await;
//!     yr::function(fib).invoke((n,))?.await
//! }
//!
//! yr::init(yr::Config::local()).unwrap();
//! let ten = yr::function(fib_later).invoke((10,)).unwrap();
//! assert_eq!(yr::get(&ten, yr::FOREVER).unwrap(), 55);
//! yr::finalize().unwrap();
//! ```
//!
//! Every failure is a [`Error`] with a code from yr's table (`yr errors` prints it).

mod args;
mod buffer;
mod cross_language;
mod function;
mod instance;
mod kv;
mod object_ref;
mod stream;
mod wire_ext;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use args::{FromArgs, IntoArg, IntoArgs};
pub use buffer::{get_buffer, Buffer};
pub use cross_language::{
    python_function, python_instance_class, PythonArgs, PythonFunction, PythonInstance,
    PythonInstanceClass, PythonMethod,
};
pub use function::{function, Function, FunctionCall, Invocable, MultiFunction, MultiReturn};
pub use instance::{
    get_instance, instance, Constructor, Instance, InstanceCreator, InstanceHandle,
    InvocableMethod, Method, MethodInvocation, MultiMethod,
};
pub use kv::{
    kv_del, kv_exist, kv_get, kv_get_with_param, kv_read, kv_set, kv_write, CacheType, Existence,
    SetParam, WriteMode,
};
pub use object_ref::{ObjectFuture, ObjectRef};
pub use stream::{
    create_stream_consumer, create_stream_producer, delete_stream, query_global_consumers_num,
    query_global_producers_num, Consumer, Element, Producer, ProducerConfig, SubscriptionConfig,
    SubscriptionType,
};
pub use yr_common::config::{Deployment, TlsFiles};
/// The types of [`InvokeOptions`]' fields.
pub use yr_common::{
    Affinity, AffinityKind, AffinityScope, AffinityType, Device, FunctionGroupOptions, LabelOp,
    LabelOperator, PortForwarding, PortProtocol, ResourceGroupOptions, SchedulingAffinityType,
};
pub use yr_common::{Config, Error, ErrorCode, InvokeOptions, Lang, ModuleCode, Result};
pub use yr_macros::{instance, invoke, method, shutdown};
pub use yr_runtime::backend::NamedInstance;
pub use yr_runtime::ClientInfo;

/// Wait without a time limit.
pub const FOREVER: Duration = Duration::MAX;

/// Initialize yr in this process. Call once, before anything else; a second call fails with
/// 4001. `Config::default()` reads `YR_LOCAL_MODE`, `YR_SERVER_ADDRESS`, … from the
/// environment.
///
/// ```
/// let info = yr::init(yr::Config::local()).unwrap();
/// assert!(!info.job_id.is_empty());
/// assert!(yr::is_initialized());
/// let again = yr::init(yr::Config::local()).unwrap_err();
/// assert_eq!(again.code(), yr::ErrorCode::IncorrectInitUsage);
/// yr::finalize().unwrap();
/// ```
pub fn init(config: Config) -> Result<ClientInfo> {
    yr_runtime::init(config)
}

/// Release this job's instances and objects. Pending calls and any later call fail with 9000,
/// until `init` is called again. Does nothing if yr is not initialized. Only the driver
/// finalizes: called inside a function or method, or in a runtime process, it fails with 4006
/// (`IncorrectFunctionUsage`) and changes nothing.
///
/// ```
/// yr::init(yr::Config::local()).unwrap();
/// yr::finalize().unwrap();
/// assert_eq!(yr::put(1).unwrap_err().code(), yr::ErrorCode::Finalized);
/// ```
pub fn finalize() -> Result<()> {
    yr_runtime::finalize()
}

/// Whether yr is initialized (and not finalized).
///
/// ```
/// assert!(!yr::is_initialized());
/// ```
pub fn is_initialized() -> bool {
    yr_runtime::is_initialized()
}

/// Store `value` as an object and return a reference to it.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let r = yr::put(vec![1, 2, 3]).unwrap();
/// assert_eq!(yr::get(&r, yr::FOREVER).unwrap(), vec![1, 2, 3]);
/// # yr::finalize().unwrap();
/// ```
pub fn put<T: Serialize>(value: T) -> Result<ObjectRef<T>> {
    let runtime = yr_runtime::current()?;
    let encoded = yr_runtime::codec::encode(&value)?;
    Ok(ObjectRef::from_handle(runtime.put(encoded)))
}

/// The value of `object`, waiting up to `timeout`. If the call producing it failed, its error;
/// if it does not arrive in time, 4005 naming the object.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let r = yr::put("text".to_string()).unwrap();
/// let value: String = yr::get(&r, std::time::Duration::from_secs(1)).unwrap();
/// # yr::finalize().unwrap();
/// ```
pub fn get<T: DeserializeOwned>(object: &ObjectRef<T>, timeout: Duration) -> Result<T> {
    object_ref::decode_outcome(outcome_of(object, timeout)?)
}

/// How `object` ended, waiting up to `timeout`; 4005 if it did not arrive.
pub(crate) fn outcome_of<T>(
    object: &ObjectRef<T>,
    timeout: Duration,
) -> Result<yr_runtime::object_store::Outcome> {
    let runtime = yr_runtime::current()?;
    runtime
        .get(std::slice::from_ref(object.handle()), timeout, false)?
        .pop()
        .flatten()
        .ok_or_else(|| {
            Error::new(
                ErrorCode::GetOperationFailed,
                format!("object {} did not arrive", object.id()),
            )
        })
}

/// The values of `objects`, in order, waiting up to `timeout` in all. The first failed call's
/// error, or 4005 naming every object that did not arrive in time.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let refs = vec![yr::put(1).unwrap(), yr::put(2).unwrap()];
/// assert_eq!(yr::get_all(&refs, yr::FOREVER).unwrap(), vec![1, 2]);
/// # yr::finalize().unwrap();
/// ```
pub fn get_all<T: DeserializeOwned>(objects: &[ObjectRef<T>], timeout: Duration) -> Result<Vec<T>> {
    let runtime = yr_runtime::current()?;
    let handles: Vec<_> = objects.iter().map(|r| r.handle().clone()).collect();
    runtime
        .get(&handles, timeout, false)?
        .into_iter()
        .zip(objects)
        .map(|(outcome, object)| match outcome {
            Some(outcome) => object_ref::decode_outcome(outcome),
            None => Err(Error::new(
                ErrorCode::GetOperationFailed,
                format!("object {} did not arrive", object.id()),
            )),
        })
        .collect()
}

/// Like [`get_all`] with openYuanrong's `allow_partial`: objects that failed or did not arrive
/// within `timeout` are `None` instead of failing the whole call.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let refs = vec![yr::put(1).unwrap()];
/// assert_eq!(yr::get_all_partial(&refs, yr::FOREVER).unwrap(), vec![Some(1)]);
/// # yr::finalize().unwrap();
/// ```
pub fn get_all_partial<T: DeserializeOwned>(
    objects: &[ObjectRef<T>],
    timeout: Duration,
) -> Result<Vec<Option<T>>> {
    let runtime = yr_runtime::current()?;
    let handles: Vec<_> = objects.iter().map(|r| r.handle().clone()).collect();
    Ok(runtime
        .get(&handles, timeout, true)?
        .into_iter()
        .map(|outcome| outcome.and_then(|o| object_ref::decode_outcome(o).ok()))
        .collect())
}

/// Wait until `wait_num` of `objects` are finished or `timeout` passes. Returns
/// `(ready, unready)`. An object whose call failed counts as ready.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let refs = vec![yr::put(1).unwrap(), yr::put(2).unwrap()];
/// let (ready, unready) = yr::wait(&refs, 2, yr::FOREVER).unwrap();
/// assert_eq!((ready.len(), unready.len()), (2, 0));
/// # yr::finalize().unwrap();
/// ```
#[allow(clippy::type_complexity)] // (ready, unready), as in openYuanrong
pub fn wait<T>(
    objects: &[ObjectRef<T>],
    wait_num: usize,
    timeout: Duration,
) -> Result<(Vec<ObjectRef<T>>, Vec<ObjectRef<T>>)> {
    let runtime = yr_runtime::current()?;
    let handles: Vec<_> = objects.iter().map(|r| r.handle().clone()).collect();
    let (ready, unready) = runtime.wait(&handles, wait_num, timeout)?;
    Ok((
        ready.into_iter().map(|i| objects[i].clone()).collect(),
        unready.into_iter().map(|i| objects[i].clone()).collect(),
    ))
}

/// Cancel the stateless call that produces `object`. A queued call is dropped; with `force`, a
/// running one is abandoned. A later `get` fails with 1017. References to method results and to
/// finished objects are left alone.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// let r = yr::put(1).unwrap();
/// yr::cancel(&r, true).unwrap();
/// assert_eq!(yr::get(&r, yr::FOREVER).unwrap(), 1);
/// # yr::finalize().unwrap();
/// ```
pub fn cancel<T>(object: &ObjectRef<T>, force: bool) -> Result<()> {
    yr_runtime::current()?.cancel(object.handle(), force)
}

/// Cancel the stateless calls that produce `objects`, as openYuanrong's `cancel(refs,
/// allow_force, allow_recursive)`. Each is cancelled as by [`cancel`] with `force`; with
/// `recursive`, so are the stateless calls it submitted while it ran (its children), and
/// theirs, with the same `force`. On a cluster a running descendant that runs alone in its
/// runtime (a stateless function with `concurrency` 1) is stopped: its runtime process ends,
/// with the instances it created, and its CPU and memory return to the node. In local mode, as
/// for a forced [`cancel`], a running call cannot be stopped: its results fail and its code
/// runs on. Every cancelled call's `get` fails with 1017; the calls a cancelled child's parent
/// submits later are cancelled at once. Method results and finished objects are left alone.
///
/// ```
/// use std::time::Duration;
///
/// #[yr::invoke]
/// fn nap(ms: u64) -> u64 {
///     std::thread::sleep(Duration::from_millis(ms));
///     ms
/// }
///
/// #[yr::invoke]
/// fn supervise(ms: u64) -> Result<u64, yr::Error> {
///     let child = yr::function(nap).invoke((ms,))?;
///     yr::get(&child, yr::FOREVER)
/// }
///
/// # yr::init(yr::Config::local()).unwrap();
/// let parent = yr::function(supervise).invoke((60_000,)).unwrap();
/// yr::cancel_all(&[parent.clone()], true, true).unwrap();
/// let error = yr::get(&parent, yr::FOREVER).unwrap_err();
/// assert_eq!(error.code(), yr::ErrorCode::ScheduleCanceled);
/// # yr::finalize().unwrap();
/// ```
pub fn cancel_all<T>(objects: &[ObjectRef<T>], force: bool, recursive: bool) -> Result<()> {
    let handles: Vec<_> = objects.iter().map(|r| r.handle().clone()).collect();
    yr_runtime::current()?.cancel_all(&handles, force, recursive)
}

/// Every named instance of this job.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// assert!(yr::list_named_instances().unwrap().is_empty());
/// # yr::finalize().unwrap();
/// ```
pub fn list_named_instances() -> Result<Vec<NamedInstance>> {
    yr_runtime::current()?.list_named_instances()
}

/// Kill the instance `instance_id` and wait until it has exited. 4004 for an empty id, 4009
/// (`IncorrectKillUsage`) for an id that names no instance.
///
/// ```
/// # yr::init(yr::Config::local()).unwrap();
/// assert_eq!(yr::kill_instance("").unwrap_err().code(), yr::ErrorCode::InstanceIdEmpty);
/// assert_eq!(yr::kill_instance("nope").unwrap_err().code(), yr::ErrorCode::IncorrectKillUsage);
/// # yr::finalize().unwrap();
/// ```
pub fn kill_instance(instance_id: &str) -> Result<()> {
    yr_runtime::current()?.kill_instance(instance_id)
}

#[doc(hidden)]
pub mod __private {
    //! What the macros' generated code uses. Not a public API.
    pub use yr_runtime::async_calls::block_on;
    pub use yr_runtime::function::{
        Arg, ConstructorEntry, FunctionEntry, InstanceState, MethodCall, MethodEntry, Returns,
    };
    pub use yr_runtime::inventory;
    pub use yr_runtime::user_code::returned_error;

    use yr_common::{Error, ErrorCode, Result};

    /// Encode a single return value.
    pub fn encode_one<T: serde::Serialize>(value: &T) -> Result<Returns> {
        Ok(Returns::One(yr_runtime::codec::encode(value)?))
    }

    /// The error when an instance's state is not of the method's class.
    pub fn wrong_class(method: &str) -> Error {
        Error::new(
            ErrorCode::ParamInvalid,
            format!("method {method} was called on an instance of another class"),
        )
    }

    /// Compile-time check that a class can live in an instance.
    pub const fn assert_instance<T: Send + Sync + 'static>() {}

    /// Turn a user function's `Result` into yr's, as 2002.
    pub fn user_result<T, E: std::fmt::Display>(
        what: &str,
        result: std::result::Result<T, E>,
    ) -> Result<T> {
        result.map_err(|e| returned_error(what, &e))
    }
}
