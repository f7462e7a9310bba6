//! Helper of `spill`'s `a_node_restarted_on_its_spill_directory_serves_what_it_had_spilled`: a
//! driver of the node at `YR_TESTS_BUS` (64 MiB of shared memory) that puts six objects of
//! 16 MiB, prints `OBJECT <id> <checksum>` for each and `DONE`, and waits to be killed.

use std::time::Duration;

const MIB: usize = 1 << 20;

fn main() {
    let address = std::env::var("YR_TESTS_BUS").expect("the node's bus address");
    yr::init(yr_tests::driver_config(&address)).unwrap();
    let kept: Vec<yr::ObjectRef<serde_bytes::ByteBuf>> = (0..6)
        .map(|seed| yr::put(yr_tests::pattern(seed, 16 * MIB)).unwrap())
        .collect();
    for (seed, object) in kept.iter().enumerate() {
        println!(
            "OBJECT {} {}",
            object.id(),
            yr_tests::weighted_sum(&yr_tests::pattern(seed, 16 * MIB))
        );
    }
    println!("DONE");
    std::thread::sleep(Duration::from_secs(600));
}
