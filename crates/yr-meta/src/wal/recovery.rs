//! Opening a store's directory: load the newest snapshot, replay the logs after it, cut off a
//! torn final record, and report anything else that fails its checksum as corrupt.

use super::*;

fn corrupt(path: &Path, offset: usize, what: impl std::fmt::Display) -> MetaError {
    MetaError::Corrupt(format!(
        "{} at byte offset {offset}: {what}; restore the directory from a backup or remove the damaged file",
        path.display()
    ))
}

fn load_snapshot(path: &Path) -> Result<Snapshot, MetaError> {
    let data = read_file(path)?;
    if data.len() < SNAPSHOT_MAGIC.len() || &data[..SNAPSHOT_MAGIC.len()] != SNAPSHOT_MAGIC {
        return Err(corrupt(path, 0, "not a meta store snapshot"));
    }
    let offset = SNAPSHOT_MAGIC.len();
    match parse_record(&data, offset) {
        Parsed::Record { payload, .. } => Snapshot::decode(payload)
            .map_err(|e| corrupt(path, offset, format!("undecodable snapshot: {e}"))),
        Parsed::End => Err(corrupt(path, offset, "empty snapshot")),
        Parsed::Torn(what) | Parsed::Corrupt(what) => Err(corrupt(path, offset, what)),
    }
}

/// Opens `dir` (creating it if needed), locks it, and hands its snapshot and log records to
/// `apply` in order. Returns the open log and the sequence number of the last record.
pub(crate) fn recover(
    dir: &Path,
    apply: &mut dyn FnMut(Replay) -> Result<(), MetaError>,
) -> Result<(Log, u64), MetaError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| MetaError::io(format!("create {}", dir.display()), e))?;
    let lock = lock_dir(dir)?;
    let listing = list(dir)?;
    for tmp in &listing.temps {
        remove(tmp);
    }
    let snapshot_lsn = listing.snapshots.last().copied().unwrap_or(0);
    if let Some(&lsn) = listing.snapshots.last() {
        let snapshot = load_snapshot(&dir.join(snapshot_name(lsn)))?;
        apply(Replay::Snapshot { lsn, snapshot })?;
    }
    for old in listing.logs.iter().filter(|&&l| l < snapshot_lsn) {
        remove(&dir.join(log_name(*old)));
    }
    let logs: Vec<u64> = listing
        .logs
        .iter()
        .copied()
        .filter(|&l| l >= snapshot_lsn)
        .collect();

    let mut lsn = snapshot_lsn;
    // The file to keep appending to: (start lsn, valid length, records).
    let mut current: Option<(u64, u64, u64)> = None;
    for (index, &start) in logs.iter().enumerate() {
        let path = dir.join(log_name(start));
        if start != lsn {
            return Err(MetaError::Corrupt(format!(
                "{} should start after record {lsn}; a log file is missing",
                path.display()
            )));
        }
        let data = read_file(&path)?;
        let is_last = index + 1 == logs.len();
        if data.len() < LOG_MAGIC.len() {
            if data[..] != LOG_MAGIC[..data.len()] {
                return Err(corrupt(&path, 0, "not a meta store log"));
            }
            // Created, but the crash came before its header was written.
            tracing::warn!(path = %path.display(), "meta store log has no header; rewriting it");
            let file = create_log(&path)?;
            file.sync_all()
                .map_err(|e| MetaError::io(format!("sync {}", path.display()), e))?;
            current = Some((start, LOG_MAGIC.len() as u64, 0));
            discard_later(dir, &logs[index + 1..]);
            break;
        }
        if &data[..LOG_MAGIC.len()] != LOG_MAGIC {
            return Err(corrupt(&path, 0, "not a meta store log"));
        }
        let mut offset = LOG_MAGIC.len();
        let mut records = 0u64;
        let mut torn = false;
        loop {
            match parse_record(&data, offset) {
                Parsed::Record { payload, next } => {
                    let record = WalRecord::decode(payload)
                        .map_err(|e| corrupt(&path, offset, format!("undecodable record: {e}")))?;
                    apply(Replay::Record(record)).map_err(|e| match e {
                        MetaError::Corrupt(what) => corrupt(&path, offset, what),
                        other => other,
                    })?;
                    records += 1;
                    lsn += 1;
                    offset = next;
                }
                Parsed::End => break,
                Parsed::Torn(what) => {
                    tracing::warn!(
                        path = %path.display(),
                        offset,
                        what,
                        "meta store log ends in a torn write (a crash during a write); cutting it off"
                    );
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| {
                            f.set_len(offset as u64)?;
                            f.sync_all()
                        })
                        .map_err(|e| MetaError::io(format!("truncate {}", path.display()), e));
                    file?;
                    torn = true;
                    break;
                }
                Parsed::Corrupt(what) => return Err(corrupt(&path, offset, what)),
            }
        }
        current = Some((start, offset as u64, records));
        if torn || is_last {
            // Nothing after a torn write was acknowledged: each log is synced before any
            // record of the next one counts as durable.
            discard_later(dir, &logs[index + 1..]);
            break;
        }
    }

    let (start, bytes, records, file) = match current {
        Some((start, bytes, records)) => {
            let path = dir.join(log_name(start));
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| MetaError::io(format!("open {}", path.display()), e))?;
            file.seek(SeekFrom::Start(bytes))
                .map_err(|e| MetaError::io(format!("seek {}", path.display()), e))?;
            (start, bytes, records, file)
        }
        None => {
            let path = dir.join(log_name(lsn));
            let file = create_log(&path)?;
            file.sync_all()
                .map_err(|e| MetaError::io(format!("sync {}", path.display()), e))?;
            sync_dir(dir).map_err(|e| MetaError::io(format!("sync {}", dir.display()), e))?;
            (lsn, LOG_MAGIC.len() as u64, 0, file)
        }
    };
    let log = Log {
        dir: dir.to_path_buf(),
        file: Arc::new(file),
        start_lsn: start,
        bytes,
        records,
        retired: Vec::new(),
        dir_dirty: false,
        _lock: lock,
    };
    Ok((log, lsn))
}

fn discard_later(dir: &Path, later: &[u64]) {
    for &start in later {
        let path = dir.join(log_name(start));
        tracing::warn!(
            path = %path.display(),
            "meta store log follows a torn write and holds no acknowledged record; removing it"
        );
        remove(&path);
    }
}
