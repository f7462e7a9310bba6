//! Room in the node's shared memory for a process that has nothing of its own left to spill.
//!
//! Only an owner can spill its objects (it reads them in place; see design 006), so the data
//! worker cannot move another process's object itself. Instead it asks: the processes that alone
//! hold allocations (the only ones whose objects could be spilled), most such bytes first, are
//! asked one after another to spill idle objects until the asking process's bytes are freed. The
//! asking goes through a [`SpillAsker`], which the node installs: it reaches each process over
//! its Bus session. The data worker owns the order and the time limit of the asks; the asker only
//! delivers them.
//!
//! No lock is held while asking: the candidates are read under the allocator's lock and the
//! lock is released before the first ask. Each ask is bounded ([`ASK_TIMEOUT`]), so an asked
//! process that is itself waiting (on a create, or on a reclaim asking the first process back)
//! costs the asker at most that long, and a process that does not answer counts as having freed
//! nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use yr_common::{Error, Result};

use crate::shared_memory::SharedMemoryStore;

/// How long one process may take to answer an ask before it counts as having freed nothing.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to one ask: the bytes the process spilled.
pub type SpillAnswerFuture = Pin<Box<dyn Future<Output = Result<u64>> + Send>>;

/// How the data worker reaches the node's processes. Installed by the node.
pub trait SpillAsker: Send + Sync {
    /// Ask process `pid` to spill idle objects worth at least `bytes` to the node's disk.
    /// Resolves to the bytes it spilled: 0 if it had nothing idle or is not connected; the
    /// disk's error (4203, 4204, 4201) if its spill failed. The data worker bounds the wait.
    fn ask(&self, pid: u32, bytes: u64) -> SpillAnswerFuture;
}

/// Reclaims room for one process from the others; shared by the node's ObjectStore servers.
pub struct Reclaimer {
    store: Arc<SharedMemoryStore>,
    asker: OnceLock<Arc<dyn SpillAsker>>,
    ask_timeout: Duration,
}

impl std::fmt::Debug for Reclaimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reclaimer")
            .field("asker_installed", &self.asker.get().is_some())
            .field("ask_timeout", &self.ask_timeout)
            .finish()
    }
}

impl Reclaimer {
    /// A reclaimer over `store` that waits at most `ask_timeout` for each asked process.
    pub fn new(store: Arc<SharedMemoryStore>, ask_timeout: Duration) -> Reclaimer {
        Reclaimer {
            store,
            asker: OnceLock::new(),
            ask_timeout,
        }
    }

    /// Reach the node's processes through `asker`. Set once; a second call is ignored. Until
    /// then nothing is reclaimed.
    pub fn install(&self, asker: Arc<dyn SpillAsker>) {
        if self.asker.set(asker).is_err() {
            tracing::debug!("a spill asker was installed already; keeping the first");
        }
    }

    /// Ask the processes other than `asking` that alone hold objects, most such bytes first,
    /// to spill until `bytes_needed` bytes were freed or every one was asked. Returns the bytes
    /// freed (0: nobody could). If nothing was freed and an asked process's disk refused, that
    /// error is returned instead.
    pub async fn reclaim(&self, bytes_needed: u64, asking: u32) -> Result<u64> {
        let Some(asker) = self.asker.get().cloned() else {
            return Ok(0);
        };
        // Read under the allocator's lock, which is released before anyone is asked.
        let candidates = self.store.spill_candidates(asking);
        let mut freed = 0u64;
        let mut refused: Option<Error> = None;
        for (pid, alone) in candidates {
            if freed >= bytes_needed {
                break;
            }
            let wanted = bytes_needed - freed;
            match tokio::time::timeout(self.ask_timeout, asker.ask(pid, wanted)).await {
                Ok(Ok(bytes)) => {
                    tracing::debug!(
                        pid,
                        asking,
                        wanted,
                        alone,
                        bytes,
                        "a process spilled for another"
                    );
                    freed += bytes;
                }
                Ok(Err(error)) => {
                    tracing::warn!(pid, asking, %error, "a process asked to spill could not");
                    refused.get_or_insert(error);
                }
                Err(_) => {
                    tracing::warn!(
                        pid,
                        asking,
                        timeout = ?self.ask_timeout,
                        "a process asked to spill did not answer in time; counting nothing from it"
                    );
                }
            }
        }
        match refused {
            Some(error) if freed == 0 => Err(error),
            _ => Ok(freed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use parking_lot::Mutex;
    use yr_common::ErrorCode;

    use super::*;
    use crate::shared_memory::ALIGNMENT;
    use crate::spill::SpillStore;

    fn spilling_store(capacity: u64) -> Arc<SharedMemoryStore> {
        let dir = std::env::temp_dir().join(format!(
            "yr-reclaim-{}-{}",
            std::process::id(),
            yr_common::ids::random_hex(6)
        ));
        let spill = SpillStore::open(dir, Some(1 << 30));
        Arc::new(SharedMemoryStore::with_spill(capacity, "test", Some(spill)).unwrap())
    }

    /// Answers each pid as told (bytes, an error, or never), and records who was asked.
    #[derive(Default)]
    struct ScriptedAsker {
        answers: HashMap<u32, Option<Result<u64>>>,
        asked: Mutex<Vec<(u32, u64)>>,
    }

    impl SpillAsker for ScriptedAsker {
        fn ask(&self, pid: u32, bytes: u64) -> SpillAnswerFuture {
            self.asked.lock().push((pid, bytes));
            match self.answers.get(&pid).cloned() {
                Some(Some(answer)) => Box::pin(async move { answer }),
                Some(None) => Box::pin(std::future::pending()),
                None => Box::pin(async { Ok(0) }),
            }
        }
    }

    fn reclaimer_with(
        store: &Arc<SharedMemoryStore>,
        asker: ScriptedAsker,
    ) -> (Reclaimer, Arc<ScriptedAsker>) {
        let asker = Arc::new(asker);
        let reclaimer = Reclaimer::new(store.clone(), Duration::from_millis(100));
        reclaimer.install(asker.clone());
        (reclaimer, asker)
    }

    fn block_on<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn candidates_are_other_processes_by_the_bytes_they_alone_hold() {
        let store = spilling_store(64 * ALIGNMENT);
        // Process 1 asks; 2 alone holds 3 pages, 3 alone holds 5, 4 holds one page twice over.
        store.create(ALIGNMENT, 1).unwrap();
        for _ in 0..3 {
            store.create(ALIGNMENT, 2).unwrap();
        }
        store.create(5 * ALIGNMENT, 3).unwrap();
        let (twice, _) = store.create(ALIGNMENT, 4).unwrap();
        store.retain(twice, 4).unwrap();
        // Shared between 2 and 3: neither can give it up.
        let (shared, _) = store.create(8 * ALIGNMENT, 2).unwrap();
        store.retain(shared, 3).unwrap();
        // Kept by the node while it sends it to another node.
        let (sending, _) = store.create(9 * ALIGNMENT, 5).unwrap();
        store
            .retain(sending, crate::data_port::TRANSFER_HOLDER)
            .unwrap();
        store.release(&[sending], 5);
        assert_eq!(
            store.spill_candidates(1),
            vec![(3, 5 * ALIGNMENT), (2, 3 * ALIGNMENT)]
        );
        // The asking process is never its own candidate.
        assert_eq!(
            store.spill_candidates(3),
            vec![(2, 3 * ALIGNMENT), (1, ALIGNMENT)]
        );
    }

    #[test]
    fn without_spilling_there_are_no_candidates() {
        let store = SharedMemoryStore::new(4 * ALIGNMENT, "test").unwrap();
        store.create(ALIGNMENT, 2).unwrap();
        assert!(store.spill_candidates(1).is_empty());
    }

    #[test]
    fn processes_are_asked_most_bytes_first_until_enough_is_freed() {
        let store = spilling_store(64 * ALIGNMENT);
        store.create(2 * ALIGNMENT, 2).unwrap();
        store.create(6 * ALIGNMENT, 3).unwrap();
        store.create(4 * ALIGNMENT, 4).unwrap();
        let (reclaimer, asker) = reclaimer_with(
            &store,
            ScriptedAsker {
                answers: HashMap::from([
                    (3, Some(Ok(2 * ALIGNMENT))),
                    (4, Some(Ok(4 * ALIGNMENT))),
                    (2, Some(Ok(2 * ALIGNMENT))),
                ]),
                ..Default::default()
            },
        );
        let freed = block_on(reclaimer.reclaim(5 * ALIGNMENT, 1)).unwrap();
        assert_eq!(freed, 6 * ALIGNMENT);
        // 3 freed too little, so 4 was asked for the rest; 2 was not needed.
        assert_eq!(
            *asker.asked.lock(),
            vec![(3, 5 * ALIGNMENT), (4, 3 * ALIGNMENT)]
        );
    }

    #[test]
    fn a_silent_process_counts_as_nothing_and_the_next_is_asked() {
        let store = spilling_store(64 * ALIGNMENT);
        store.create(6 * ALIGNMENT, 3).unwrap();
        store.create(2 * ALIGNMENT, 2).unwrap();
        let (reclaimer, asker) = reclaimer_with(
            &store,
            ScriptedAsker {
                answers: HashMap::from([(3, None), (2, Some(Ok(2 * ALIGNMENT)))]),
                ..Default::default()
            },
        );
        assert_eq!(
            block_on(reclaimer.reclaim(ALIGNMENT, 1)).unwrap(),
            2 * ALIGNMENT
        );
        assert_eq!(asker.asked.lock().len(), 2);
    }

    #[test]
    fn a_disk_error_is_returned_only_when_nothing_was_freed() {
        let full = || {
            Err(yr_common::Error::new(
                ErrorCode::InsufficientDiskSpace,
                "the spill limit is full",
            ))
        };
        let store = spilling_store(64 * ALIGNMENT);
        store.create(6 * ALIGNMENT, 3).unwrap();
        store.create(2 * ALIGNMENT, 2).unwrap();
        let (reclaimer, _) = reclaimer_with(
            &store,
            ScriptedAsker {
                answers: HashMap::from([(3, Some(full())), (2, Some(Ok(ALIGNMENT)))]),
                ..Default::default()
            },
        );
        assert_eq!(
            block_on(reclaimer.reclaim(4 * ALIGNMENT, 1)).unwrap(),
            ALIGNMENT
        );
        let (reclaimer, _) = reclaimer_with(
            &store,
            ScriptedAsker {
                answers: HashMap::from([(3, Some(full())), (2, Some(Ok(0)))]),
                ..Default::default()
            },
        );
        let error = block_on(reclaimer.reclaim(4 * ALIGNMENT, 1)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InsufficientDiskSpace);
    }

    #[test]
    fn nothing_is_asked_before_an_asker_is_installed() {
        let store = spilling_store(8 * ALIGNMENT);
        store.create(ALIGNMENT, 2).unwrap();
        let reclaimer = Reclaimer::new(store, ASK_TIMEOUT);
        assert_eq!(block_on(reclaimer.reclaim(ALIGNMENT, 1)).unwrap(), 0);
    }
}
