//! Fencing: this node's incarnation, and what the node does when the cluster declares that
//! incarnation, one of its instances, or a node it forwarded instances to, lost
//! (docs/design/014-fenced-instance-records.md).
//!
//! The node picks an incarnation when it starts and registers with it; the master keeps the
//! live incarnation of each node at `/yr/incarnation/<node_id>` and deletes it when it declares
//! the node lost. Every record write of the node compares it (the record writer), so a node the
//! master declared lost writes nothing more. When the node learns that (its registration is
//! refused as `incarnation_lost`), [`Fencing::declared_lost`] fails every local instance (1007)
//! and moves to a new incarnation, which registers afresh. The records of the old incarnation
//! are the master's: they stay FATAL.
//!
//! [`Fencing::forwarded_lost`] is the other side: a node that forwarded an instance to another
//! node learns from the meta store when the master declares that node lost, and fails the
//! instance to its callers at once, even while the lost node's connections stay open.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::watch;
use yr_common::{Error, ErrorCode};
use yr_meta::MetaStore;

use crate::node_losses::{LossVerdict, NodeLosses};

/// The meta store key of `node_id`'s live incarnation (written by the master at registration,
/// deleted when it declares the node lost). The master's `yr_master::registry::incarnation_key`
/// names the same key.
pub fn incarnation_key(node_id: &str) -> String {
    format!("/yr/incarnation/{node_id}")
}

/// How an incarnation is stored at [`incarnation_key`]: decimal text.
pub fn incarnation_value(incarnation: u64) -> Bytes {
    Bytes::from(incarnation.to_string())
}

/// This node's incarnations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incarnations {
    /// The incarnation the node is now; new instances' records carry it.
    pub current: u64,
    /// The incarnation the master last accepted a registration of (0: none yet).
    pub registered: u64,
}

/// Fails every local instance with the error (1007).
pub type NodeFenced = Box<dyn Fn(&Error) + Send + Sync>;

/// Fails one instance (by id) with the error (1007).
pub type InstanceFenced = Box<dyn Fn(&str, Error) + Send + Sync>;

/// What the node does when it is fenced. Set once, by the code that owns the instances.
pub struct FenceHandlers {
    /// The master declared this node's incarnation lost: fail every local instance with this
    /// error (1007), without restarts, and kill their runtimes.
    pub node: NodeFenced,
    /// An instance's record is not this node's to write any more: fail the instance with the
    /// error (1007) and kill its runtime.
    pub instance: InstanceFenced,
}

/// This node's incarnation and its fencing events.
pub struct Fencing {
    node_id: String,
    incarnations: watch::Sender<Incarnations>,
    handlers: OnceLock<FenceHandlers>,
    instances_fenced: AtomicU64,
    times_declared_lost: AtomicU64,
    node_losses: Arc<NodeLosses>,
}

impl Fencing {
    /// Fencing for node `node_id`, whose records live in `meta`, starting as a fresh incarnation
    /// taken from the clock.
    pub fn new(node_id: String, meta: Arc<dyn MetaStore>) -> Arc<Fencing> {
        Self::with_incarnation(node_id, meta, fresh_incarnation(0))
    }

    /// [`Fencing::new`] starting as `incarnation` (for tests).
    pub fn with_incarnation(
        node_id: String,
        meta: Arc<dyn MetaStore>,
        incarnation: u64,
    ) -> Arc<Fencing> {
        let (incarnations, _) = watch::channel(Incarnations {
            current: incarnation,
            registered: 0,
        });
        Arc::new(Fencing {
            node_id,
            incarnations,
            handlers: OnceLock::new(),
            instances_fenced: AtomicU64::new(0),
            times_declared_lost: AtomicU64::new(0),
            node_losses: Arc::new(NodeLosses::new(meta)),
        })
    }

    /// The node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The incarnation the node is now.
    pub fn incarnation(&self) -> u64 {
        self.incarnations.borrow().current
    }

    /// The current and the registered incarnation.
    pub fn incarnations(&self) -> Incarnations {
        *self.incarnations.borrow()
    }

    /// Changes of [`Fencing::incarnations`] (the current value counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Incarnations> {
        self.incarnations.subscribe()
    }

    /// Set what the node does when it is fenced. Set once; later calls are ignored.
    pub fn set_handlers(&self, handlers: FenceHandlers) {
        let _ = self.handlers.set(handlers);
    }

    /// Follow the meta store's node records, for [`Fencing::forwarded_lost`]. Spawns a task.
    pub fn follow_node_losses(&self) {
        tokio::spawn(self.node_losses.clone().follow());
    }

    /// The master accepted a registration of `incarnation`.
    pub fn registered(&self, incarnation: u64) {
        self.incarnations.send_if_modified(|incarnations| {
            let news =
                incarnations.current == incarnation && incarnations.registered != incarnation;
            if news {
                incarnations.registered = incarnation;
            }
            news
        });
    }

    /// The master refused a registration of `incarnation`: it declared that incarnation lost.
    /// Fails every local instance (1007) and moves to a new incarnation, which it returns. A
    /// second report of an incarnation already left changes nothing.
    pub fn declared_lost(&self, incarnation: u64) -> u64 {
        let current = self.incarnation();
        if current != incarnation {
            return current;
        }
        self.times_declared_lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            node = %self.node_id,
            incarnation,
            "the master declared this node lost; failing its instances and registering as a new incarnation"
        );
        let error = Error::new(
            ErrorCode::InstanceExited,
            format!(
                "node {} was declared lost by the master (it missed its heartbeats for the \
                 master's node timeout, for example in a network partition or while its process \
                 was stopped); its instances were failed and their records stay FATAL; create \
                 the instance again",
                self.node_id
            ),
        );
        // First the instances, then the new incarnation: an instance created meanwhile is of
        // the old incarnation, and its record writer fences it.
        if let Some(handlers) = self.handlers.get() {
            (handlers.node)(&error);
        }
        let mut next = current;
        self.incarnations.send_modify(|incarnations| {
            next = fresh_incarnation(incarnations.current);
            incarnations.current = next;
        });
        tracing::info!(node = %self.node_id, incarnation = next, "this node is a new incarnation");
        next
    }

    /// The record writer stopped writing `instance_id`'s record, which someone else owns now:
    /// the node fails the instance with `error`.
    pub fn instance_fenced(&self, instance_id: &str, error: Error) {
        self.instances_fenced.fetch_add(1, Ordering::Relaxed);
        if let Some(handlers) = self.handlers.get() {
            (handlers.instance)(instance_id, error);
        }
    }

    /// Resolves once the master declares node `node_id` lost (as the incarnation that holds
    /// `instance_id`, which this node forwarded there when its record counted `restarts`):
    /// with the error (1007) to give its callers, or [`LossVerdict::Rescheduled`] when the
    /// master re-creates it. Pending until then; drop it when the instance ends otherwise.
    pub fn forwarded_lost(
        &self,
        node_id: &str,
        instance_id: &str,
        restarts: u32,
    ) -> impl Future<Output = LossVerdict> + Send + 'static {
        self.node_losses
            .forwarded_lost(node_id, instance_id, restarts)
    }

    /// Instances whose records this node stopped writing because someone else owns them now.
    pub fn instances_fenced(&self) -> u64 {
        self.instances_fenced.load(Ordering::Relaxed)
    }

    /// How often the master declared this node lost and it came back as a new incarnation.
    pub fn times_declared_lost(&self) -> u64 {
        self.times_declared_lost.load(Ordering::Relaxed)
    }
}

/// A new incarnation after `previous`: the clock in microseconds since the epoch, or one more
/// than `previous` if the clock did not move past it. Only equality matters to fencing; the
/// clock makes incarnations of a restarted node differ from its earlier ones.
fn fresh_incarnation(previous: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0);
    now.max(previous + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    fn fencing(incarnation: u64) -> Arc<Fencing> {
        Fencing::with_incarnation(
            "n".into(),
            Arc::new(yr_meta::EmbeddedStore::in_memory()),
            incarnation,
        )
    }

    #[tokio::test]
    async fn a_lost_incarnation_fails_its_instances_then_moves_on_once() {
        let fencing = fencing(5);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        fencing.set_handlers(FenceHandlers {
            node: Box::new(move |error| {
                record
                    .lock()
                    .push((error.code(), error.message().to_string()));
            }),
            instance: Box::new(|_, _| {}),
        });
        fencing.registered(5);
        assert_eq!(
            fencing.incarnations(),
            Incarnations {
                current: 5,
                registered: 5
            }
        );
        let mut changes = fencing.subscribe();
        let next = fencing.declared_lost(5);
        assert!(next > 5);
        assert!(changes.has_changed().unwrap());
        assert_eq!(changes.borrow_and_update().current, next);
        let seen = seen.lock().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, ErrorCode::InstanceExited);
        assert!(
            seen[0].1.contains("node n was declared lost"),
            "{}",
            seen[0].1
        );
        // The old incarnation's refusal reported again changes nothing.
        assert_eq!(fencing.declared_lost(5), next);
        assert_eq!(fencing.times_declared_lost(), 1);
        // A registration of an incarnation the node left is ignored.
        fencing.registered(5);
        assert_eq!(fencing.incarnations().registered, 5);
        fencing.registered(next);
        assert_eq!(fencing.incarnations().registered, next);
    }
}
