//! Spilling shared-memory objects to the node's disk, on a real cluster: live objects worth
//! three times the shared memory stay readable (spilled and restored intact), memory and disk go
//! back to their baseline when the objects are dropped, an unwritable spill directory is 4203, a
//! full spill limit 4204 (and the node keeps serving after both), a node restarted on the
//! same spill directory serves the objects it had spilled, by their ids, and memory full of
//! another process's objects makes that process spill its idle ones when the node asks (4202
//! only when they are all being read). Disk failures in the middle of a spill or a restore are
//! reached through the node's fail points (`datasystem::spill_write`,
//! `datasystem::spill_restore`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde_bytes::ByteBuf;
use yr::{ErrorCode, ObjectRef};
use yr_proto::ds as pb;
use yr_tests::{
    exclusive, pattern, wait_until, weighted_sum as sum, NodeSpec, TempDir, TestCluster, TIMEOUT,
};

const MIB: usize = 1 << 20;

/// The sum of the bytes, computed in a runtime.
#[yr::invoke]
fn checksum(bytes: ByteBuf) -> u64 {
    sum(&bytes)
}

#[yr::instance]
pub struct Keeper {
    objects: Vec<ObjectRef<ByteBuf>>,
    reading: Vec<yr::Buffer>,
}

#[yr::instance]
impl Keeper {
    pub fn new() -> Self {
        Keeper {
            objects: Vec::new(),
            reading: Vec::new(),
        }
    }

    /// Put and keep objects `seeds` of `len` bytes each; how many it keeps.
    pub fn fill(&mut self, seeds: Vec<u64>, len: u64) -> usize {
        for seed in seeds {
            let object = yr::put(pattern(seed as usize, len as usize)).expect("put");
            self.objects.push(object);
        }
        self.objects.len()
    }

    /// The checksum of each kept object, read back (restored first if it was spilled).
    pub fn checksums(&self) -> Vec<u64> {
        self.objects
            .iter()
            .map(|object| sum(&yr::get(object, TIMEOUT).expect("get a kept object")))
            .collect()
    }

    /// Read every kept object in place and keep reading until `stop_reading`.
    pub fn keep_reading(&mut self) -> usize {
        self.reading = self
            .objects
            .iter()
            .map(|object| yr::get_buffer(object, TIMEOUT).expect("read a kept object"))
            .collect();
        self.reading.len()
    }

    pub fn stop_reading(&mut self) -> usize {
        std::mem::take(&mut self.reading).len()
    }
}

fn node(shared_memory_mb: u64, spill_dir: &Path, spill_limit_mb: Option<u64>) -> TestCluster {
    TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(shared_memory_mb),
        spill_dir: Some(spill_dir.to_path_buf()),
        spill_limit_mb,
        ..NodeSpec::default()
    })
}

/// A node like [`node`] whose process has the fail points `fail_points` (`FAILPOINTS`).
fn node_with_fail_points(
    shared_memory_mb: u64,
    spill_dir: &Path,
    fail_points: &str,
) -> TestCluster {
    TestCluster::with_node(NodeSpec {
        shared_memory_mb: Some(shared_memory_mb),
        spill_dir: Some(spill_dir.to_path_buf()),
        env: vec![("FAILPOINTS".to_string(), fail_points.to_string())],
        ..NodeSpec::default()
    })
}

fn spill_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".obj"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn live_objects_worth_three_times_the_shared_memory_spill_and_restore_intact() {
    let _lock = exclusive();
    let spill = TempDir::new("spill");
    let cluster = node(64, spill.path(), None);
    yr::init(cluster.config()).unwrap();
    let objects: Vec<ObjectRef<ByteBuf>> = (0..12)
        .map(|seed| yr::put(pattern(seed, 16 * MIB)).unwrap())
        .collect();
    let expected: Vec<u64> = (0..12).map(|seed| sum(&pattern(seed, 16 * MIB))).collect();
    // At most three fit in memory at once (each takes a page more than 16 MiB).
    assert!(cluster.wait_metric(0, "yr_shared_memory_used_bytes") <= (64 * MIB) as f64);
    let spilled = cluster.wait_metric(0, "yr_shared_memory_spilled_objects");
    assert!(spilled >= 9.0, "{spilled} objects spilled");
    assert!(cluster.wait_metric(0, "yr_shared_memory_spilled_bytes") >= (9 * 16 * MIB) as f64);
    assert_eq!(spill_files(spill.path()), spilled as usize);
    // Every object reads back intact, twice over, in and out of order: each read restores its
    // object and spills the least recently used others.
    for round in 0..2 {
        for index in 0..12 {
            let index = if round == 0 { index } else { 11 - index };
            let value = yr::get(&objects[index], TIMEOUT).unwrap();
            assert_eq!(
                sum(&value),
                expected[index],
                "object {index}, round {round}"
            );
        }
    }
    // In place, through a Buffer.
    let buffer = yr::get_buffer(&objects[0], TIMEOUT).unwrap();
    let bytes: &serde_bytes::Bytes = buffer.decode().unwrap();
    assert_eq!(sum(bytes), expected[0]);
    drop(buffer);
    // As an argument: a runtime of the node asks the owner, which restores it first.
    let result = yr::function(checksum).invoke((&objects[5],)).unwrap();
    assert_eq!(yr::get(&result, TIMEOUT).unwrap(), expected[5]);
    // Dropping the objects frees memory and disk.
    drop(objects);
    let baseline = wait_until(Duration::from_secs(30), || {
        cluster.wait_metric(0, "yr_shared_memory_objects") == 0.0
            && cluster.wait_metric(0, "yr_shared_memory_used_bytes") == 0.0
            && cluster.wait_metric(0, "yr_shared_memory_spilled_objects") == 0.0
            && cluster.wait_metric(0, "yr_shared_memory_spilled_bytes") == 0.0
            && spill_files(spill.path()) == 0
    });
    assert!(
        baseline,
        "objects are still held after every reference was dropped"
    );
    yr::finalize().unwrap();
}

#[test]
fn an_unwritable_spill_directory_is_4203_and_the_node_keeps_serving() {
    let _lock = exclusive();
    let dir = TempDir::new("nospill");
    // A directory below a regular file cannot be created, whoever asks.
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let spill_dir = dir.path().join("file").join("spill");
    let cluster = node(8, &spill_dir, Some(1024));
    yr::init(cluster.config()).unwrap();
    let kept: Vec<ObjectRef<ByteBuf>> = (0..2)
        .map(|seed| yr::put(pattern(seed, 3 * MIB)).unwrap())
        .collect();
    let error = yr::put(pattern(2, 3 * MIB)).unwrap_err();
    assert_eq!(error.code(), ErrorCode::OperateDiskFailed, "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&spill_dir.display().to_string()),
        "{message}"
    );
    assert!(message.contains("--spill-dir"), "{message}");
    // Nothing was lost, and room made by hand is used.
    assert_eq!(
        sum(&yr::get(&kept[0], TIMEOUT).unwrap()),
        sum(&pattern(0, 3 * MIB))
    );
    drop(kept);
    let object = yr::put(pattern(3, 3 * MIB)).unwrap();
    assert_eq!(
        sum(&yr::get(&object, TIMEOUT).unwrap()),
        sum(&pattern(3, 3 * MIB))
    );
    yr::finalize().unwrap();
}

#[test]
fn a_full_spill_limit_is_4204_and_the_node_keeps_serving() {
    let _lock = exclusive();
    let spill = TempDir::new("smallspill");
    let cluster = node(8, spill.path(), Some(4));
    yr::init(cluster.config()).unwrap();
    // Two fit in memory, the third spills one, the fourth finds the 4 MB limit full.
    let kept: Vec<ObjectRef<ByteBuf>> = (0..3)
        .map(|seed| yr::put(pattern(seed, 3 * MIB)).unwrap())
        .collect();
    assert_eq!(
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects"),
        1.0
    );
    let error = yr::put(pattern(3, 3 * MIB)).unwrap_err();
    assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace, "{error}");
    let message = error.to_string();
    assert!(message.contains("--spill-limit-mb"), "{message}");
    assert!(message.contains(&(4 * MIB).to_string()), "{message}");
    assert!(message.contains(&spill.display()), "{message}");
    // The two in memory read as before; the spilled one cannot come back while memory is full
    // and the disk cannot take another (4204 again), and comes back once there is room.
    for seed in [1, 2] {
        let value = yr::get(&kept[seed], TIMEOUT).unwrap();
        assert_eq!(sum(&value), sum(&pattern(seed, 3 * MIB)));
    }
    let error = yr::get(&kept[0], TIMEOUT).unwrap_err();
    assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace, "{error}");
    let mut kept = kept;
    drop(kept.remove(1));
    // Releases are asynchronous: wait until the node freed it.
    assert!(wait_until(TIMEOUT, || cluster
        .wait_metric(0, "yr_shared_memory_objects")
        == 1.0));
    let value = yr::get(&kept[0], TIMEOUT).unwrap();
    assert_eq!(sum(&value), sum(&pattern(0, 3 * MIB)));
    drop(kept);
    assert!(wait_until(TIMEOUT, || spill_files(spill.path()) == 0));
    let object = yr::put(pattern(4, 3 * MIB)).unwrap();
    assert_eq!(
        sum(&yr::get(&object, TIMEOUT).unwrap()),
        sum(&pattern(4, 3 * MIB))
    );
    yr::finalize().unwrap();
}

/// Restore `id` from the node whose bus is at `address` (`unix:/path`: the object store
/// serves only its machine's processes) as this process, and read the value in place.
async fn restore(address: &str, id: u128) -> Result<ByteBuf, String> {
    let channel = yr_transport::connect(address, yr::ErrorCode::ConnectionFailed)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = pb::object_store_client::ObjectStoreClient::new(channel);
    let pool = client
        .pool_info(pb::PoolInfoRequest {})
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let reply = client
        .restore(pb::RestoreObjectRequest {
            object_id: id.to_be_bytes().to_vec().into(),
            pid: std::process::id(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    if let Some(error) = reply.error {
        return Err(format!("{}: {}", error.code, error.message));
    }
    let mut bytes = vec![0u8; reply.size as usize];
    std::fs::File::open(&pool.path)
        .and_then(|region| region.read_exact_at(&mut bytes, reply.offset))
        .map_err(|e| e.to_string())?;
    client
        .release(pb::ReleaseObjectsRequest {
            allocations: vec![reply.allocation],
            pid: std::process::id(),
        })
        .await
        .map_err(|e| e.to_string())?;
    rmp_serde::from_slice(&bytes).map_err(|e| e.to_string())
}

#[test]
fn a_node_restarted_on_its_spill_directory_serves_what_it_had_spilled() {
    let _lock = exclusive();
    let spill = TempDir::new("restart");
    let mut objects: Vec<(u128, u64)> = Vec::new();
    {
        let mut cluster = node(64, spill.path(), None);
        let mut child = yr_tests::helper_process(env!("CARGO_BIN_EXE_driver_spilling_objects"))
            .env("YR_TESTS_BUS", cluster.node_bus_address(0))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let line = line.unwrap();
            if line.contains("DONE") {
                break;
            }
            // libtest may have started the line with the test's name.
            if let Some((_, rest)) = line.split_once("OBJECT ") {
                let mut parts = rest.split_whitespace();
                let id = u128::from_str_radix(parts.next().unwrap(), 16).unwrap();
                let expected: u64 = parts.next().unwrap().parse().unwrap();
                objects.push((id, expected));
            }
        }
        assert_eq!(objects.len(), 6, "the driver did not put its objects");
        assert!(cluster.wait_metric(0, "yr_shared_memory_spilled_objects") >= 3.0);
        // The node dies with the driver's objects on its disk.
        cluster.kill_node(0);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let on_disk: Vec<(u128, u64)> = objects
        .iter()
        .copied()
        .filter(|(id, _)| spill.path().join(format!("{id:032x}.obj")).exists())
        .collect();
    assert!(on_disk.len() >= 3, "{} objects left on disk", on_disk.len());
    let cluster = node(64, spill.path(), None);
    assert_eq!(
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects"),
        on_disk.len() as f64
    );
    let address = cluster.node_bus_address(0);
    for (id, expected) in &on_disk {
        let value = yr_tests::block_on(restore(&address, *id))
            .unwrap_or_else(|e| panic!("object {id:032x}: {e}"));
        assert_eq!(sum(&value), *expected, "object {id:032x}");
    }
    // Restored and released: nothing is left in memory or on disk.
    assert!(wait_until(TIMEOUT, || {
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects") == 0.0
            && cluster.wait_metric(0, "yr_shared_memory_objects") == 0.0
            && spill_files(spill.path()) == 0
    }));
}

/// A keeper that filled most of a 64 MiB node with three idle 16 MiB objects.
fn filled_keeper(cluster: &TestCluster) -> (yr::InstanceHandle<Keeper>, Vec<u64>) {
    let seeds: Vec<u64> = vec![100, 101, 102];
    let keeper = yr::instance(Keeper::new).invoke(()).unwrap();
    let filled = keeper
        .method(Keeper::fill)
        .invoke((seeds.clone(), (16 * MIB) as u64))
        .unwrap();
    assert_eq!(yr::get(&filled, TIMEOUT).unwrap(), 3);
    assert!(cluster.wait_metric(0, "yr_shared_memory_used_bytes") >= (48 * MIB) as f64);
    assert_eq!(
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects"),
        0.0
    );
    let expected = seeds
        .iter()
        .map(|seed| sum(&pattern(*seed as usize, 16 * MIB)))
        .collect();
    (keeper, expected)
}

#[test]
fn another_process_spills_its_idle_objects_when_the_driver_needs_room() {
    let _lock = exclusive();
    let spill = TempDir::new("reclaim");
    let cluster = node(64, spill.path(), None);
    yr::init(cluster.config()).unwrap();
    let (keeper, expected) = filled_keeper(&cluster);
    // The driver owns nothing it could spill: the node asks the keeper to spill for it.
    let first = yr::put(pattern(0, 16 * MIB)).unwrap();
    assert!(cluster.wait_metric(0, "yr_shared_memory_spilled_objects") >= 1.0);
    assert!(spill_files(spill.path()) >= 1);
    let mut objects = vec![first];
    objects.extend((1..3).map(|seed| yr::put(pattern(seed, 16 * MIB)).unwrap()));
    // The keeper reads all of its objects back intact, restoring the spilled ones.
    let checksums = keeper.method(Keeper::checksums).invoke(()).unwrap();
    assert_eq!(yr::get(&checksums, TIMEOUT).unwrap(), expected);
    // And so does the driver.
    for (seed, object) in objects.iter().enumerate() {
        let value = yr::get(object, TIMEOUT).unwrap();
        assert_eq!(sum(&value), sum(&pattern(seed, 16 * MIB)), "object {seed}");
    }
    yr::finalize().unwrap();
}

#[test]
fn objects_another_process_is_reading_are_not_spilled_and_a_create_is_4202() {
    let _lock = exclusive();
    let spill = TempDir::new("noreclaim");
    let cluster = node(64, spill.path(), None);
    yr::init(cluster.config()).unwrap();
    let (keeper, expected) = filled_keeper(&cluster);
    let reading = keeper.method(Keeper::keep_reading).invoke(()).unwrap();
    assert_eq!(yr::get(&reading, TIMEOUT).unwrap(), 3);
    let error = yr::put(pattern(0, 16 * MIB)).unwrap_err();
    assert_eq!(error.code(), ErrorCode::SharedMemoryLimited, "{error}");
    let message = error.to_string();
    assert!(message.contains("full"), "{message}");
    assert!(message.contains("other processes"), "{message}");
    assert_eq!(
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects"),
        0.0
    );
    // Once the keeper stops reading, its objects can go to disk and the put succeeds.
    let stopped = keeper.method(Keeper::stop_reading).invoke(()).unwrap();
    assert_eq!(yr::get(&stopped, TIMEOUT).unwrap(), 3);
    let object = yr::put(pattern(0, 16 * MIB)).unwrap();
    assert_eq!(
        sum(&yr::get(&object, TIMEOUT).unwrap()),
        sum(&pattern(0, 16 * MIB))
    );
    let checksums = keeper.method(Keeper::checksums).invoke(()).unwrap();
    assert_eq!(yr::get(&checksums, TIMEOUT).unwrap(), expected);
    yr::finalize().unwrap();
}

#[test]
fn a_spill_whose_disk_fills_mid_write_is_4204_and_loses_nothing() {
    let _lock = exclusive();
    let spill = TempDir::new("fullwrite");
    let cluster = node_with_fail_points(8, spill.path(), "datasystem::spill_write=return(full)");
    yr::init(cluster.config()).unwrap();
    // Two fit in memory; the third needs one of them spilled, and the disk fills on the write.
    let kept: Vec<ObjectRef<ByteBuf>> = (0..2)
        .map(|seed| yr::put(pattern(seed, 3 * MIB)).unwrap())
        .collect();
    let error = yr::put(pattern(2, 3 * MIB)).unwrap_err();
    assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace, "{error}");
    assert!(error.to_string().contains("disk is full"), "{error}");
    // Nothing half-written stays behind, and both objects read back intact from memory.
    assert_eq!(spill_files(spill.path()), 0);
    assert_eq!(
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects"),
        0.0
    );
    for (seed, object) in kept.iter().enumerate() {
        let value = yr::get(object, TIMEOUT).unwrap();
        assert_eq!(sum(&value), sum(&pattern(seed, 3 * MIB)));
    }
    yr::finalize().unwrap();
}

#[test]
fn a_restore_that_cannot_read_its_file_is_4203_for_that_read_and_the_next_read_restores() {
    let _lock = exclusive();
    let spill = TempDir::new("badread");
    let cluster = node_with_fail_points(8, spill.path(), "datasystem::spill_restore=1*return");
    yr::init(cluster.config()).unwrap();
    // The third object spills the first.
    let kept: Vec<ObjectRef<ByteBuf>> = (0..3)
        .map(|seed| yr::put(pattern(seed, 3 * MIB)).unwrap())
        .collect();
    assert_eq!(
        cluster.wait_metric(0, "yr_shared_memory_spilled_objects"),
        1.0
    );
    let error = yr::get(&kept[0], TIMEOUT).unwrap_err();
    assert_eq!(error.code(), ErrorCode::OperateDiskFailed, "{error}");
    assert!(
        error.to_string().contains("read the spilled object"),
        "{error}"
    );
    // The object stayed on disk: the next read restores it intact.
    let value = yr::get(&kept[0], TIMEOUT).unwrap();
    assert_eq!(sum(&value), sum(&pattern(0, 3 * MIB)));
    for seed in [1, 2] {
        let value = yr::get(&kept[seed], TIMEOUT).unwrap();
        assert_eq!(sum(&value), sum(&pattern(seed, 3 * MIB)));
    }
    yr::finalize().unwrap();
}
