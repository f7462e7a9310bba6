//! Helper of `shared_memory`'s `a_driver_killed_with_its_objects_gives_their_memory_back`: a
//! driver of the node at `YR_TESTS_BUS` that puts two large objects, prints `PUT 2`, and waits
//! to be killed.

use std::time::Duration;

fn main() {
    let address = std::env::var("YR_TESTS_BUS").expect("the node's bus address");
    yr::init(yr_tests::driver_config(&address)).unwrap();
    let kept: Vec<yr::ObjectRef<serde_bytes::ByteBuf>> = (0..2)
        .map(|seed| yr::put(yr_tests::pattern(seed, 1 << 20)).unwrap())
        .collect();
    println!("PUT {}", kept.len());
    std::thread::sleep(Duration::from_secs(600));
}
