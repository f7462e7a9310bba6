//! Unit tests of the KV store, with an in-memory second-level store that can fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use yr_common::{Error, ErrorCode, Result};

use super::map::entry_size;
use super::*;
use crate::l2::L2Record;

fn param(mode: WriteMode) -> SetParam {
    SetParam {
        write_mode: mode,
        ..SetParam::default()
    }
}

fn nx() -> SetParam {
    SetParam {
        existence: Existence::NX,
        ..SetParam::default()
    }
}

fn ttl(seconds: u64) -> SetParam {
    SetParam {
        ttl_second: seconds,
        ..SetParam::default()
    }
}

fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

const SHORT: Duration = Duration::from_millis(50);

/// An in-memory second-level store that can be told to fail, and counts its writes.
#[derive(Default)]
struct FakeL2 {
    values: Mutex<HashMap<String, L2Record>>,
    failing: std::sync::atomic::AtomicBool,
    puts: AtomicU64,
    delay: Mutex<Duration>,
}

impl FakeL2 {
    fn check(&self) -> Result<()> {
        std::thread::sleep(*self.delay.lock());
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorCode::OperateDiskFailed,
                "fake disk failure",
            ));
        }
        Ok(())
    }

    fn has(&self, key: &str) -> bool {
        self.values.lock().contains_key(key)
    }
}

impl L2Store for FakeL2 {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn put(&self, key: &str, value: &[u8], expires_at: Option<SystemTime>) -> Result<()> {
        self.check()?;
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.values.lock().insert(
            key.to_string(),
            L2Record {
                value: Bytes::copy_from_slice(value),
                expires_at,
            },
        );
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Option<L2Record>> {
        self.check()?;
        Ok(self
            .values
            .lock()
            .get(key)
            .filter(|r| r.expires_at.is_none_or(|t| t > SystemTime::now()))
            .cloned())
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.check()?;
        self.values.lock().remove(key);
        Ok(())
    }
    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }
}

fn with_fake() -> (KvStore, Arc<FakeL2>) {
    let fake = Arc::new(FakeL2::default());
    (KvStore::with_l2(fake.clone()), fake)
}

mod expiry;
mod quota;
mod reads_writes;
mod second_level;
