//! Rust code that Python programs call (docs/design/018-cross-language-calls.md): functions
//! and a class that a Python driver reaches by path, with the program as the executable.
//!
//! ```text
//! cargo build --example cross_language
//! ```
//!
//! ```python
//! import yr
//!
//! exe = "target/debug/examples/cross_language"
//! yr.init()
//! add = yr.rust_function("cross_language::add", executable=exe)
//! print(yr.get(add.invoke(1, 2)))                       # 3
//! Counter = yr.rust_instance_class("cross_language::Counter", executable=exe)
//! counter = Counter.invoke(10)
//! print(yr.get(counter.add.invoke(5)))                 # 15
//! yr.finalize()
//! ```
//!
//! Values cross as MessagePack: Python's `int`, `float`, `bool`, `str`, `None`, `list` and
//! `dict` are Rust's integers, floats, `bool`, `String`, `Option`, `Vec` and maps or structs;
//! `bytes` is `serde_bytes::ByteBuf`. Run on its own, the program calls itself in local mode.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// A struct crosses as a map of its fields: a `dict` in Python.
#[derive(Debug, Deserialize, Serialize)]
struct Point {
    x: f64,
    y: f64,
}

#[yr::invoke]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[yr::invoke]
fn echo_int(value: i64) -> i64 {
    value
}

#[yr::invoke]
fn echo_unsigned(value: u64) -> u64 {
    value
}

#[yr::invoke]
fn echo_float(value: f64) -> f64 {
    value
}

#[yr::invoke]
fn echo_bool(value: bool) -> bool {
    value
}

#[yr::invoke]
fn echo_string(value: String) -> String {
    value
}

#[yr::invoke]
fn echo_bytes(value: ByteBuf) -> ByteBuf {
    value
}

#[yr::invoke]
fn echo_list(value: Vec<i64>) -> Vec<i64> {
    value
}

#[yr::invoke]
fn echo_map(value: BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    value
}

#[yr::invoke]
fn echo_optional(value: Option<i64>) -> Option<i64> {
    value
}

/// The point mirrored on the diagonal.
#[yr::invoke]
fn mirror(point: Point) -> Point {
    Point {
        x: point.y,
        y: point.x,
    }
}

/// The words of `text` and how many there are: two results.
#[yr::invoke(return_nums = 2)]
fn split_words(text: String) -> (Vec<String>, usize) {
    let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    let count = words.len();
    (words, count)
}

/// Fails (2002, with this message) when `b` is 0.
#[yr::invoke]
fn divide(a: i64, b: i64) -> Result<i64, String> {
    if b == 0 {
        return Err(format!("cannot divide {a} by zero"));
    }
    Ok(a / b)
}

#[yr::instance]
struct Counter {
    value: i64,
}

#[yr::instance]
impl Counter {
    fn new(start: i64) -> Self {
        Counter { value: start }
    }

    fn add(&mut self, n: i64) -> i64 {
        self.value += n;
        self.value
    }

    fn get(&self) -> i64 {
        self.value
    }
}

fn main() -> Result<(), yr::Error> {
    // In a runtime a node started, `init` serves the calls and never returns.
    yr::init(yr::Config::local())?;
    let sum = yr::function(add).invoke((1, 2))?;
    let counter = yr::instance(Counter::new).invoke((10,))?;
    let total = counter.method(Counter::add).invoke((5,))?;
    let timeout = Duration::from_secs(30);
    println!(
        "add(1, 2) = {}, Counter(10).add(5) = {}",
        yr::get(&sum, timeout)?,
        yr::get(&total, timeout)?
    );
    counter.terminate_sync()?;
    yr::finalize()
}
