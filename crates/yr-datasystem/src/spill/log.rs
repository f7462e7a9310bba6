//! The spill log (`objects.log`): its records (spilled, removed) with their checksums, replaying
//! it when the store opens (keeping whole files, removing the rest, rewriting the log with the
//! live records), and appending to it.

use super::*;

pub(super) fn record(op: u8, id: ObjectId, size: u64) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[0] = op;
    out[1..17].copy_from_slice(&id.to_bytes());
    out[17..25].copy_from_slice(&size.to_le_bytes());
    let crc = yr_meta::crc32(&out[..25]);
    out[25..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The records of a log's bytes (after the magic), up to the first torn or damaged one.
pub(super) fn parse(bytes: &[u8]) -> (Vec<(u8, ObjectId, u64)>, usize) {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset + RECORD <= bytes.len() {
        let raw = &bytes[offset..offset + RECORD];
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&raw[25..]);
        if yr_meta::crc32(&raw[..25]) != u32::from_le_bytes(crc) {
            break;
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&raw[1..17]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&raw[17..25]);
        records.push((raw[0], ObjectId::from_bytes(id), u64::from_le_bytes(size)));
        offset += RECORD;
    }
    (records, offset)
}

impl SpillStore {
    /// Replay the log, keep whole objects, drop the rest, and rewrite the log compacted.
    pub(super) fn recover(&self) -> Result<()> {
        let path = self.log_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(metadata_error("read", &path, error)),
        };
        if !bytes.starts_with(MAGIC) {
            return Err(DataSystemError::NotASpillLog { path }.into());
        }
        let (records, parsed) = parse(&bytes[MAGIC.len()..]);
        if parsed + MAGIC.len() < bytes.len() {
            tracing::warn!(
                log = %path.display(),
                offset = parsed + MAGIC.len(),
                "the spill metadata log ends in a torn or damaged record; cut it off"
            );
        }
        let mut objects = HashMap::new();
        for (op, id, size) in records {
            match op {
                OP_SPILLED => {
                    objects.insert(id, size);
                }
                _ => {
                    objects.remove(&id);
                }
            }
        }
        let mut state = self.state.lock();
        for (id, size) in objects {
            let whole = std::fs::metadata(self.object_path(id)).is_ok_and(|m| m.len() == size);
            if whole {
                state
                    .objects
                    .insert(id, SpilledObject { size, holder: None });
                state.bytes += size;
            } else {
                tracing::warn!(object = %id, "a spilled object's file is missing or torn; dropped");
            }
        }
        // Files no record names: objects whose spill did not finish.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let Some(stem) = name.strip_suffix(".obj") else {
                    continue;
                };
                let known = state.objects.keys().any(|id| id.to_string() == stem);
                if !known {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        // The compacted log, written aside and renamed into place.
        let temporary = self.dir.join(format!("{LOG_NAME}.tmp"));
        let write = || -> std::io::Result<File> {
            let mut file = File::create(&temporary)?;
            let mut out = MAGIC.to_vec();
            for (id, object) in &state.objects {
                out.extend_from_slice(&record(OP_SPILLED, *id, object.size));
            }
            file.write_all(&out)?;
            file.sync_data()?;
            std::fs::rename(&temporary, &path)?;
            File::open(&self.dir)?.sync_all()?;
            OpenOptions::new().append(true).open(&path)
        };
        let log = write().map_err(|error| metadata_error("rewrite", &path, error))?;
        state.log = Some(log);
        tracing::info!(
            dir = %self.dir.display(),
            objects = state.objects.len(),
            bytes = state.bytes,
            "spilled objects recovered"
        );
        Ok(())
    }

    /// The open log, created (with the directory) on first use.
    pub(super) fn log<'a>(&self, state: &'a mut State) -> Result<&'a mut File> {
        if state.log.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(|error| {
                spill_disk_error("create the spill directory", &self.dir, error)
            })?;
            let path = self.log_path();
            let mut file = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .map_err(|error| metadata_error("create", &path, error))?;
            let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(false);
            if empty {
                file.write_all(MAGIC)
                    .and_then(|()| file.sync_data())
                    .map_err(|error| metadata_error("start", &path, error))?;
            }
            state.log = Some(file);
        }
        match state.log.as_mut() {
            Some(log) => Ok(log),
            None => Err(DataSystemError::Bug(
                "the spill log vanished while it was open".to_string(),
            )
            .into()),
        }
    }

    pub(super) fn append(
        &self,
        state: &mut State,
        op: u8,
        id: ObjectId,
        size: u64,
        sync: bool,
    ) -> Result<()> {
        let path = self.log_path();
        let log = self.log(state)?;
        log.write_all(&record(op, id, size))
            .and_then(|()| if sync { log.sync_data() } else { Ok(()) })
            .map_err(|error| metadata_error("append to", &path, error))
    }
}
