//! `async fn` functions, constructors and methods: they run on yr's async runtime (tokio's
//! timers and `spawn` work inside), their errors keep their codes (2002), and an instance's
//! async methods interleave up to its `concurrency`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use yr::{ErrorCode, InvokeOptions, ObjectRef};

use crate::support::{self, assert_error, get, get_err, TIMEOUT};

/// Doubles `n` after a tokio sleep and a spawned task.
#[yr::invoke]
async fn double_later(n: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(5)).await;
    tokio::spawn(async move { n * 2 }).await.unwrap_or(0)
}

/// Awaits the value of another call.
#[yr::invoke]
async fn await_another(n: u64) -> Result<u64, yr::Error> {
    let doubled: ObjectRef<u64> = yr::function(double_later).invoke((n,))?;
    Ok(doubled.await? + 1)
}

/// Fails after an await.
#[yr::invoke]
async fn fail_later(text: String) -> Result<u64, String> {
    tokio::task::yield_now().await;
    Err(text)
}

#[yr::invoke(return_nums = 2)]
async fn split_later(n: u64) -> (u64, u64) {
    tokio::task::yield_now().await;
    (n / 2, n - n / 2)
}

#[test]
fn an_async_function_returns_its_value() {
    let _session = support::session();
    let doubled = yr::function(double_later).invoke((21,)).unwrap();
    assert_eq!(get(&doubled), 42);
    let (a, b) = yr::function(split_later).invoke((7,)).unwrap();
    assert_eq!((get(&a), get(&b)), (3, 4));
}

#[test]
fn an_async_function_can_await_the_result_of_another_call() {
    let _session = support::session_with(support::one_pool_thread);
    let value = yr::function(await_another).invoke((5,)).unwrap();
    assert_eq!(get(&value), 11);
}

#[test]
fn an_async_functions_error_is_a_user_function_exception() {
    let _session = support::session();
    let failed = yr::function(fail_later)
        .invoke(("async trouble".to_string(),))
        .unwrap();
    assert_error(
        &get_err(&failed),
        ErrorCode::UserFunctionException,
        &["async trouble", "fail_later"],
    );
}

/// Async methods that meet: each waits (asynchronously) until `parties` calls are inside.
#[yr::instance]
struct Rendezvous {
    inside: AtomicUsize,
    most: AtomicUsize,
    total: u64,
}

#[yr::instance]
impl Rendezvous {
    async fn new(total: u64) -> Self {
        tokio::task::yield_now().await;
        Rendezvous {
            inside: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            total,
        }
    }

    /// Whether `parties` calls were inside at once within `timeout_ms`.
    async fn meet(&self, parties: usize, timeout_ms: u64) -> bool {
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        while self.most.load(Ordering::SeqCst) < parties && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.inside.fetch_sub(1, Ordering::SeqCst);
        self.most.load(Ordering::SeqCst) >= parties
    }

    async fn add(&mut self, n: u64) -> u64 {
        tokio::task::yield_now().await;
        self.total += n;
        self.total
    }

    #[yr::method(return_nums = 2)]
    async fn halves(&self) -> (u64, u64) {
        (self.total / 2, self.total - self.total / 2)
    }

    async fn refuse(&self, text: String) -> Result<u64, String> {
        Err(text)
    }
}

fn concurrent(n: u32) -> InvokeOptions {
    InvokeOptions {
        concurrency: n,
        ..Default::default()
    }
}

#[test]
fn async_methods_interleave_up_to_the_instances_concurrency() {
    let _session = support::session();
    let parties = 4;
    let meeting = yr::instance(Rendezvous::new)
        .options(concurrent(parties as u32))
        .invoke((0,))
        .unwrap();
    let calls: Vec<ObjectRef<bool>> = (0..parties)
        .map(|_| {
            meeting
                .method(Rendezvous::meet)
                .invoke((parties, TIMEOUT.as_millis() as u64))
                .unwrap()
        })
        .collect();
    for call in &calls {
        assert!(get(call), "{parties} async calls were inside at once");
    }
}

#[test]
fn async_methods_of_an_instance_with_concurrency_one_run_one_at_a_time() {
    let _session = support::session();
    let meeting = yr::instance(Rendezvous::new).invoke((0,)).unwrap();
    let calls: Vec<ObjectRef<bool>> = (0..2)
        .map(|_| meeting.method(Rendezvous::meet).invoke((2, 200)).unwrap())
        .collect();
    for call in &calls {
        assert!(!get(call), "two calls were never inside at once");
    }
}

#[test]
fn async_methods_keep_state_return_several_values_and_fail_with_their_error() {
    let _session = support::session();
    let counter = yr::instance(Rendezvous::new).invoke((10,)).unwrap();
    let first = counter.method(Rendezvous::add).invoke((5,)).unwrap();
    let second = counter.method(Rendezvous::add).invoke((6,)).unwrap();
    assert_eq!((get(&first), get(&second)), (15, 21));
    let (low, high) = counter.method(Rendezvous::halves).invoke(()).unwrap();
    assert_eq!((get(&low), get(&high)), (10, 11));
    let refused = counter
        .method(Rendezvous::refuse)
        .invoke(("not now".to_string(),))
        .unwrap();
    assert_error(
        &get_err(&refused),
        ErrorCode::UserFunctionException,
        &["not now", "Rendezvous::refuse"],
    );
}
