//! The node's side of reclaiming shared memory: the data worker decides which process to ask to
//! spill (see `yr_datasystem::reclaim`), and this module delivers the ask. It pushes a
//! `SpillAsk` on the process's Bus session (message id 0) and resolves when the process sends
//! back the `SpillAnswer` with the same ask id. The data worker bounds the wait; an ask it gives
//! up on is forgotten here too, and a late answer is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use yr_common::{Error, ErrorCode};
use yr_datasystem::reclaim::{SpillAnswerFuture, SpillAsker};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;

use crate::node::Node;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<pb::SpillAnswer>>>>;

/// Asks the node's processes to spill, over their Bus sessions.
pub struct SpillAsks {
    node: Arc<Node>,
    waiting: Waiting,
    next_ask: AtomicU64,
}

impl SpillAsks {
    /// Asks delivered through `node`'s Bus sessions.
    pub fn new(node: Arc<Node>) -> SpillAsks {
        SpillAsks {
            node,
            waiting: Arc::new(Mutex::new(HashMap::new())),
            next_ask: AtomicU64::new(1),
        }
    }

    /// A process answered an ask. An answer nobody waits for (given up on) is dropped.
    pub fn answer(&self, answer: pb::SpillAnswer) {
        let waiter = self.waiting.lock().remove(&answer.ask_id);
        match waiter {
            Some(waiter) => {
                let _ = waiter.send(answer);
            }
            None => tracing::debug!(
                ask = answer.ask_id,
                bytes_freed = answer.bytes_freed,
                "a spill answer came after its ask was given up"
            ),
        }
    }
}

/// Forgets an ask when its waiter goes, answered or not (the data worker may drop it on its
/// timeout).
struct Forget {
    waiting: Waiting,
    ask_id: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.waiting.lock().remove(&self.ask_id);
    }
}

impl SpillAsker for SpillAsks {
    fn ask(&self, pid: u32, bytes: u64) -> SpillAnswerFuture {
        let ask_id = self.next_ask.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.waiting.lock().insert(ask_id, sender);
        let forget = Forget {
            waiting: self.waiting.clone(),
            ask_id,
        };
        let pushed = self.node.push_to_process(
            pid,
            pb::bus_response::Body::SpillAsk(pb::SpillAsk { ask_id, bytes }),
        );
        Box::pin(async move {
            let _forget = forget;
            if !pushed {
                // It left the node; its references go with it.
                return Ok(0);
            }
            match receiver.await {
                Ok(answer) => match answer.error {
                    Some(error) if answer.bytes_freed == 0 => Err(error_from_proto(&error)),
                    _ => Ok(answer.bytes_freed),
                },
                // The process left before it answered.
                Err(_) => Err(Error::new(
                    ErrorCode::BusDisconnection,
                    format!("the spill ask {ask_id} to process {pid} was dropped unanswered: the process left"),
                )),
            }
        })
    }
}
