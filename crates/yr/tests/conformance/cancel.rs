//! `cancel_all`: several refs at once, and `recursive`, which also cancels the stateless calls a
//! cancelled call submitted (its children, 1017). On a cluster a running child is stopped: its
//! runtime process ends. Without `recursive` the children run on.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use yr::ErrorCode;

use crate::support::{self, add, assert_error, get, get_err, slow, Backend, Marker, TIMEOUT};

/// Appends `line` to the marker at `path`, if the marker still exists (the test removes it when
/// it is done, which tells a call that ticks to stop). Returns whether it was written.
fn note(path: &str, line: &str) -> bool {
    match OpenOptions::new().append(true).open(path) {
        Ok(mut file) => writeln!(file, "{line}").is_ok(),
        Err(_) => false,
    }
}

/// Notes its pid, then a tick every 10 ms until its marker is removed (at most a minute).
#[yr::invoke]
fn tick_until_gone(marker: String) -> u64 {
    note(&marker, &format!("pid {}", std::process::id()));
    let mut ticks = 0;
    while ticks < 6_000 && note(&marker, "tick") {
        std::thread::sleep(Duration::from_millis(10));
        ticks += 1;
    }
    ticks
}

/// Submits [`tick_until_gone`] and waits for it; notes how the child ended ("child: ok", or
/// "child: <code>").
#[yr::invoke]
fn wait_for_child(own: String, child_marker: String) -> Result<u64, yr::Error> {
    let child = yr::function(tick_until_gone).invoke((child_marker,))?;
    let outcome = yr::get(&child, Duration::from_secs(120));
    let line = match &outcome {
        Ok(_) => "child: ok".to_string(),
        Err(error) => format!("child: {}", error.code().number()),
    };
    note(&own, &line);
    outcome
}

/// Submits [`wait_for_child`] (which submits [`tick_until_gone`]) and waits for it.
#[yr::invoke]
fn wait_for_grandchild(middle: String, grandchild: String) -> Result<u64, yr::Error> {
    let child = yr::function(wait_for_child).invoke((middle, grandchild))?;
    yr::get(&child, Duration::from_secs(120))
}

/// Waits until `marker` has the line `line`, at most [`TIMEOUT`].
#[track_caller]
fn wait_for_line(marker: &Marker, line: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !marker.lines().iter().any(|l| l == line) {
        assert!(
            Instant::now() < deadline,
            "no line {line:?} within {TIMEOUT:?}: {:?}",
            marker.lines()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pid the child noted.
fn child_pid(marker: &Marker) -> u32 {
    marker
        .lines()
        .iter()
        .find_map(|line| line.strip_prefix("pid ")?.parse().ok())
        .expect("the child noted its pid")
}

/// Waits until the process the child at `marker` ran in has ended, at most [`TIMEOUT`].
#[track_caller]
fn wait_until_its_process_ended(marker: &Marker) {
    let proc_dir = format!("/proc/{}", child_pid(marker));
    let deadline = Instant::now() + TIMEOUT;
    while Path::new(&proc_dir).exists() {
        assert!(
            Instant::now() < deadline,
            "the cancelled call's runtime ({proc_dir}) still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cancel_all_cancels_every_ref_it_is_given() {
    let _session = support::session();
    let blocker = yr::function(slow).invoke((1, 500)).unwrap();
    let first = yr::function(add).invoke((&blocker, 1)).unwrap();
    let second = yr::function(add).invoke((&blocker, 2)).unwrap();
    let finished = yr::put(7_i64).unwrap();
    yr::cancel_all(
        &[first.clone(), second.clone(), finished.clone()],
        false,
        false,
    )
    .unwrap();
    assert_error(&get_err(&first), ErrorCode::ScheduleCanceled, &["cancel"]);
    assert_error(&get_err(&second), ErrorCode::ScheduleCanceled, &["cancel"]);
    assert_eq!(get(&finished), 7);
    assert_eq!(get(&blocker), 1);
    yr::cancel_all::<i64>(&[], true, true).unwrap();
}

/// Starts [`wait_for_child`], waits until its child ticks, and cancels the parent with
/// `force` and `recursive` as given: its ref fails with 1017. Returns the parent's marker and
/// the child's.
fn cancel_a_waiting_parent(recursive: bool) -> (Marker, Marker) {
    let own = Marker::new("parent");
    let child = Marker::new("child");
    let parent = yr::function(wait_for_child)
        .invoke((own.path(), child.path()))
        .unwrap();
    assert!(child.wait_for(2, TIMEOUT), "the child started ticking");
    yr::cancel_all(std::slice::from_ref(&parent), true, recursive).unwrap();
    assert_error(&get_err(&parent), ErrorCode::ScheduleCanceled, &[]);
    (own, child)
}

#[test]
fn recursive_cancel_of_a_parent_cancels_its_running_child_and_frees_the_childs_runtime() {
    let _session = support::session();
    let (own, child) = cancel_a_waiting_parent(true);
    // The parent, left running, sees its child's ref fail with the cancel's code.
    let code = ErrorCode::ScheduleCanceled.number();
    wait_for_line(&own, &format!("child: {code}"));
    if support::backend() == Backend::Cluster {
        // The child ran alone in its runtime: that process ends, and its CPU with it.
        wait_until_its_process_ended(&child);
    }
}

#[test]
fn recursive_cancel_reaches_the_calls_of_the_calls_a_parent_submitted() {
    let _session = support::session();
    let middle = Marker::new("middle");
    let grandchild = Marker::new("grandchild");
    let parent = yr::function(wait_for_grandchild)
        .invoke((middle.path(), grandchild.path()))
        .unwrap();
    assert!(
        grandchild.wait_for(2, TIMEOUT),
        "the grandchild started ticking"
    );
    yr::cancel_all(std::slice::from_ref(&parent), true, true).unwrap();
    assert_error(&get_err(&parent), ErrorCode::ScheduleCanceled, &[]);
    match support::backend() {
        // The middle call, abandoned but running, sees the grandchild fail with 1017.
        Backend::Local => {
            let code = ErrorCode::ScheduleCanceled.number();
            wait_for_line(&middle, &format!("child: {code}"));
        }
        // The middle call's runtime ends, and the grandchild's with it.
        Backend::Cluster => wait_until_its_process_ended(&grandchild),
    }
}

#[test]
fn cancel_without_recursive_leaves_the_child_running() {
    let _session = support::session();
    let (own, child) = cancel_a_waiting_parent(false);
    let ticked = child.count();
    assert!(
        child.wait_for(ticked + 5, TIMEOUT),
        "the child keeps ticking after its parent was cancelled"
    );
    assert!(
        !own.lines().iter().any(|l| l.starts_with("child:")),
        "the child has not ended: {:?}",
        own.lines()
    );
    // Removing its marker ends the child normally; its parent, abandoned but running, sees it.
    drop(child);
    wait_for_line(&own, "child: ok");
}
