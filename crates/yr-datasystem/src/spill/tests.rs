//! The spill store on real temporary directories: reads back, limits and unwritable
//! directories, an unwritable log, a reopened store, and a departed process.

use super::*;

fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "yr-spill-{label}-{}-{}",
        std::process::id(),
        yr_common::ids::random_hex(6)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn source(bytes: &[u8]) -> File {
    let path = temp_dir("source").join("data");
    std::fs::write(&path, bytes).unwrap();
    File::open(path).unwrap()
}

#[test]
fn a_spilled_object_reads_back_and_its_file_goes_when_removed() {
    let dir = temp_dir("roundtrip");
    let store = SpillStore::open(dir.clone(), Some(1 << 20));
    let id = ObjectId::generate();
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    store.write(id, &source(&data), 0, 5000, 7).unwrap();
    assert_eq!(store.stats().bytes, 5000);
    assert_eq!(std::fs::read(store.object_path(id)).unwrap(), data);
    let target_path = temp_dir("target").join("data");
    std::fs::write(&target_path, [0u8; 6000]).unwrap();
    let target = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target_path)
        .unwrap();
    store.read_into(id, &target, 0).unwrap();
    let mut back = vec![0u8; 5000];
    target.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    assert!(
        !store.remove_held(id, 8),
        "another process cannot remove it"
    );
    assert!(store.remove_held(id, 7));
    assert!(!store.object_path(id).exists());
    assert_eq!(
        store.stats(),
        SpillStats {
            bytes: 0,
            objects: 0,
            limit: 1 << 20
        }
    );
}

#[test]
fn a_full_limit_is_4204_and_an_unwritable_directory_4203() {
    let dir = temp_dir("limit");
    let store = SpillStore::open(dir.join("spill"), Some(4096));
    let error = store
        .write(ObjectId::generate(), &source(&[1u8; 8192]), 0, 8192, 1)
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace);
    assert!(error.message().contains("4096"), "{error}");
    assert_eq!(store.stats().bytes, 0);
    // A directory below a regular file cannot be created, even by root.
    std::fs::write(dir.join("file"), b"x").unwrap();
    let store = SpillStore::open(dir.join("file").join("spill"), Some(1 << 20));
    let error = store
        .write(ObjectId::generate(), &source(&[1u8; 10]), 0, 10, 1)
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::OperateDiskFailed);
    assert!(error.message().contains("--spill-dir"), "{error}");
    assert_eq!(store.stats().bytes, 0);
}

#[test]
fn a_log_that_cannot_be_written_is_4201_and_leaves_no_object_behind() {
    let dir = temp_dir("log");
    // A directory where the metadata log goes: the log cannot be opened, even by root.
    std::fs::create_dir_all(dir.join(LOG_NAME)).unwrap();
    let store = SpillStore::open(dir.clone(), Some(1 << 20));
    let id = ObjectId::generate();
    let error = store
        .write(id, &source(&[1u8; 100]), 0, 100, 1)
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::RocksdbFailed, "{error}");
    assert!(error.message().contains(LOG_NAME), "{error}");
    assert!(
        !store.object_path(id).exists(),
        "the object's file was left behind"
    );
    assert_eq!(store.stats().bytes, 0);
}

#[test]
fn a_reopened_store_finds_its_objects_and_drops_unfinished_ones() {
    let dir = temp_dir("reopen");
    let kept = ObjectId::generate();
    let removed = ObjectId::generate();
    {
        let store = SpillStore::open(dir.clone(), Some(1 << 20));
        store.write(kept, &source(&[3u8; 100]), 0, 100, 1).unwrap();
        store
            .write(removed, &source(&[4u8; 100]), 0, 100, 1)
            .unwrap();
        store.remove(removed);
    }
    // A file whose spill did not finish, and a torn record at the end of the log.
    std::fs::write(dir.join(format!("{}.obj", ObjectId::generate())), b"half").unwrap();
    let mut log = OpenOptions::new()
        .append(true)
        .open(dir.join(LOG_NAME))
        .unwrap();
    log.write_all(&[1, 2, 3]).unwrap();
    let store = SpillStore::open(dir.clone(), Some(1 << 20));
    assert_eq!(
        store.get(kept),
        Some(SpilledObject {
            size: 100,
            holder: None
        })
    );
    assert_eq!(store.get(removed), None);
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".obj"))
        })
        .count();
    assert_eq!(files, 1);
    // Any process may claim an object recovered from disk.
    assert!(store.remove_held(kept, 99));
    let store = SpillStore::open(dir, Some(1 << 20));
    assert_eq!(store.stats().objects, 0);
}

#[test]
fn a_departed_process_loses_its_spilled_objects() {
    let store = SpillStore::open(temp_dir("departed"), Some(1 << 20));
    let (mine, theirs) = (ObjectId::generate(), ObjectId::generate());
    store.write(mine, &source(&[1u8; 10]), 0, 10, 1).unwrap();
    store.write(theirs, &source(&[1u8; 10]), 0, 10, 2).unwrap();
    assert_eq!(store.release_process(1), 1);
    assert_eq!(store.get(mine), None);
    assert!(store.get(theirs).is_some());
}
