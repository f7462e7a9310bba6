//! The cluster-wide KV store: each key lives on one owner node, chosen by consistent hashing
//! ([`crate::kv_ring`]) over the nodes the meta store lists as not lost (`/yr/node/`
//! records, written by the master). A KV request from a client ([`pb::KvRoute::Client`]) is
//! served by the data worker that receives it when that node owns the key, and otherwise
//! forwarded to the owner's DataWorker service over the cluster's authenticated node-to-node
//! channel ([`yr_transport::connect_lazy_with`]: the cluster token, and mutual TLS when the
//! cluster has it). A batch is split by owner and the parts run at once.
//!
//! **Moves.** When the ring changes, each node pushes the keys it holds but no longer owns to
//! their new owners ([`pb::data_worker_client::DataWorkerClient::kv_adopt`], batches of at
//! most [`MOVE_BATCH_BYTES`]), and forgets a key once its new owner took it. While keys move, an
//! owner that misses a key asks the key's owners under the two previous rings (what they hold
//! now, [`pb::KvRoute::Local`]) before it answers "not found": a read during a move never
//! misses a key that exists. An owner's delete also deletes at those previous owners and
//! records a bounded tombstone, so a push in flight never brings a deleted key back. Each value
//! carries its write's stamp (a hybrid clock), and a push replaces an older value the new owner
//! holds but never a newer one (a write that reached it first); the sender forgets its copy
//! either way.
//!
//! **Losses.** Keys of a lost node are owned by its ring successors at once. Values written
//! through to a shared second-level store (Redis) are read through from it by the new owner;
//! memory-only values are gone, and a read of such a key fails with 4005 whose message says
//! that the key's previous owner was lost.
//!
//! **Waiting reads** wait at the owner; the node that forwarded one re-sends it to the new
//! owner when the ring changes under it, and a forward that fails (the owner died) is re-sent
//! once the ring changes, within the read's timeout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use yr_common::Result;
use yr_datasystem_core::kv::KvStore;
use yr_meta::MetaStore;
use yr_proto::ds as pb;
use yr_proto::error_to_proto;

use crate::kv_ring::{HashRing, Member};

mod membership;
mod moves;
mod reads;
mod routing;
mod writes;

/// The most bytes of keys and values one push of moving keys carries.
pub const MOVE_BATCH_BYTES: usize = 8 << 20;
/// Previous rings whose owners a missing key is asked of.
const PREVIOUS_RINGS: usize = 2;
/// How long a forwarded write, delete or existence check waits for the ring to change after
/// its owner could not be reached, before it fails with 3002.
const REROUTE_WAIT: Duration = Duration::from_secs(15);
/// How many times a request is routed again after its owner could not be reached.
const MAX_REROUTES: usize = 4;

/// What this node knows of the ring.
#[derive(Debug, Default)]
pub struct View {
    /// Counts the ring's changes.
    pub epoch: u64,
    /// The owners now.
    pub ring: HashRing,
    /// The rings before, newest first (at most [`PREVIOUS_RINGS`]).
    pub previous: Vec<HashRing>,
    /// The nodes the master declared lost.
    pub lost: HashSet<String>,
}

/// Where a key's request goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Target {
    Here,
    Node(Member),
}

/// The cluster side of a node's KV store.
pub struct KvCluster {
    kv: KvStore,
    node_id: String,
    meta: Arc<dyn MetaStore>,
    view: watch::Sender<Arc<View>>,
    /// Node records by node id: (address, state).
    records: Mutex<BTreeMap<String, (String, String)>>,
    channels: Mutex<HashMap<String, Channel>>,
    tombstones: Mutex<HashMap<String, Instant>>,
    moves: Notify,
}

impl std::fmt::Debug for KvCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCluster")
            .field("node_id", &self.node_id)
            .field("epoch", &self.view.borrow().epoch)
            .finish()
    }
}

impl KvCluster {
    /// The cluster side of `kv` for node `node_id`, following the node records in `meta`.
    /// Call [`KvCluster::start`] on a tokio runtime to follow them and move keys.
    pub fn new(kv: KvStore, node_id: String, meta: Arc<dyn MetaStore>) -> Arc<KvCluster> {
        Arc::new(KvCluster {
            kv,
            node_id,
            meta,
            view: watch::channel(Arc::new(View::default())).0,
            records: Mutex::new(BTreeMap::new()),
            channels: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(HashMap::new()),
            moves: Notify::new(),
        })
    }

    /// Follow the node records and move keys on `runtime` until the process ends.
    pub fn start(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        runtime.spawn(self.clone().follow());
        runtime.spawn(self.clone().move_keys());
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }
}

/// The reply of a KV get routed between nodes.
pub fn found_response(result: Result<Vec<Option<Bytes>>>, route: pb::KvRoute) -> pb::KvGetResponse {
    match result {
        Ok(values) if route == pb::KvRoute::Client => pb::KvGetResponse {
            values: values.into_iter().map(Option::unwrap_or_default).collect(),
            error: None,
            found: Vec::new(),
        },
        Ok(values) => pb::KvGetResponse {
            found: values.iter().map(Option::is_some).collect(),
            values: values.into_iter().map(Option::unwrap_or_default).collect(),
            error: None,
        },
        Err(error) => pb::KvGetResponse {
            values: Vec::new(),
            error: Some(error_to_proto(&error)),
            found: Vec::new(),
        },
    }
}
