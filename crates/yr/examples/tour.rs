//! The README's tour, kept compiling and running: `cargo run --example tour`.

use std::time::Duration;

#[yr::invoke]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[yr::instance]
struct Counter {
    total: i64,
}

#[yr::instance]
impl Counter {
    fn new(start: i64) -> Self {
        Counter { total: start }
    }

    fn incr(&mut self, by: i64) -> i64 {
        self.total += by;
        self.total
    }

    #[yr::shutdown]
    fn save(&mut self, _grace: Duration) {
        println!("final total: {}", self.total);
    }
}

fn main() -> yr::Result<()> {
    yr::init(yr::Config::local())?;

    // Stateless calls return refs at once; refs can be passed to other calls.
    let three = yr::function(add).invoke((1, 2))?;
    let six = yr::function(add).invoke((&three, 3))?;
    assert_eq!(yr::get(&six, Duration::from_secs(5))?, 6);

    // Options: resources, retries, names, concurrency, …
    let options = yr::InvokeOptions {
        retry_times: 2,
        ..Default::default()
    };
    let r = yr::function(add).options(options).invoke((40, 2))?;
    assert_eq!(r.get(Duration::from_secs(5))?, 42);

    // Stateful instances: calls run in submission order.
    let counter = yr::instance(Counter::new).invoke((10,))?;
    let refs: Vec<_> = (0..3)
        .map(|_| counter.method(Counter::incr).invoke((1,)))
        .collect::<yr::Result<_>>()?;
    assert_eq!(
        yr::get_all(&refs, Duration::from_secs(5))?,
        vec![11, 12, 13]
    );
    counter.terminate_sync()?; // runs the #[yr::shutdown] hook

    // Objects, wait and errors.
    let value = yr::put(vec![1, 2, 3])?;
    let (ready, _unready) = yr::wait(std::slice::from_ref(&value), 1, Duration::from_secs(1))?;
    assert_eq!(ready.len(), 1);
    let err = counter.method(Counter::incr).invoke((1,)).unwrap_err();
    assert_eq!(err.code(), yr::ErrorCode::InstanceExited); // ErrCode: 1007, ModuleCode: 10, …

    yr::finalize()
}
