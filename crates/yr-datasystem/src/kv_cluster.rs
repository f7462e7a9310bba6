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
//! records a bounded tombstone, so a push in flight never brings a deleted key back; a push
//! never replaces a value the new owner already holds (a write that reached it first).
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
use futures_util::future::join_all;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use yr_common::backoff::Backoff;
use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::kv::{self, KvStore, MovingEntry};
use yr_datasystem_core::wire::{set_param_from_proto, timeout_to_ms};
use yr_meta::{KeyValue, MetaStore, WatchEvent};
use yr_proto::ds as pb;
use yr_proto::ds::data_worker_client::DataWorkerClient;
use yr_proto::{error_from_proto, error_to_proto};

use crate::kv_ring::{HashRing, Member};
use crate::service::blocking;

/// The meta store prefix of node records (prost `NodeInfo`, written by the master).
const NODE_PREFIX: &str = "/yr/node/";
/// The node records' state of a node the master declared lost.
const LOST: &str = "lost";
/// The most bytes of keys and values one push of moving keys carries.
pub const MOVE_BATCH_BYTES: usize = 8 << 20;
/// Previous rings whose owners a missing key is asked of.
const PREVIOUS_RINGS: usize = 2;
/// How long a forwarded write, delete or existence check waits for the ring to change after
/// its owner could not be reached, before it fails with 3002.
const REROUTE_WAIT: Duration = Duration::from_secs(15);
/// How many times a request is routed again after its owner could not be reached.
const MAX_REROUTES: usize = 4;
/// The most deleted keys remembered while moves may be in flight, and for how long.
const MAX_TOMBSTONES: usize = 65_536;
const TOMBSTONE_LIFE: Duration = Duration::from_secs(120);
/// How long a request that arrives before the node records were read waits for them.
const FIRST_VIEW_WAIT: Duration = Duration::from_secs(5);
/// How long connecting to another node's data worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

fn is_transport(error: &Error) -> bool {
    error.code() == ErrorCode::InnerCommunication
}

fn transport_error(member: &Member, status: &tonic::Status) -> Error {
    Error::new(
        ErrorCode::InnerCommunication,
        format!(
            "cannot reach the data worker of node {} at {}, which owns the KV keys asked for: \
             {}; the keys move to another node once the master declares it lost",
            member.node_id,
            member.address,
            status.message()
        ),
    )
}

/// The error of a call to `member`'s data worker that got no answer within [`REROUTE_WAIT`].
fn no_answer(member: &Member) -> Error {
    transport_error(member, &tonic::Status::deadline_exceeded("no answer"))
}

/// The reply of `call` to `member`'s data worker, awaited for up to [`REROUTE_WAIT`]; no answer
/// or a failed call is a transport error naming the member.
async fn answer_of<T>(
    member: &Member,
    call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    let reply = tokio::time::timeout(REROUTE_WAIT, call)
        .await
        .map_err(|_| no_answer(member))?
        .map_err(|status| transport_error(member, &status))?;
    Ok(reply.into_inner())
}

fn check(error: Option<yr_proto::v1::ErrorInfo>) -> Result<()> {
    match error {
        Some(error) => Err(error_from_proto(&error)),
        None => Ok(()),
    }
}

fn route_of(value: i32) -> pb::KvRoute {
    pb::KvRoute::try_from(value).unwrap_or(pb::KvRoute::Client)
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

    /// What this node knows of the ring now.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// The ring's changes from now on (streams follow them too: design 025).
    pub fn watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether the node records name the node at `address` lost.
    pub fn is_lost_address(&self, address: &str) -> bool {
        self.records
            .lock()
            .values()
            .any(|(at, state)| at == address && state == LOST)
    }

    /// Wait (up to [`FIRST_VIEW_WAIT`]) until this node read the node records once: a node
    /// that just started serves requests only once it knows the ring, and so which keys may
    /// still be at their previous owners.
    async fn first_view(&self) {
        if self.view.borrow().epoch == 0 {
            let deadline = tokio::time::Instant::now() + FIRST_VIEW_WAIT;
            if !self.ring_changed(0, Some(deadline)).await {
                tracing::warn!(
                    "no node records read yet; serving KV requests from this node alone"
                );
            }
        }
    }

    // ----- membership ------------------------------------------------------------------------

    async fn follow(self: Arc<Self>) {
        let mut backoff = Backoff::reconnect();
        loop {
            let revision = self.meta.current_revision().await;
            let records = self.meta.range(NODE_PREFIX).await;
            if let (Ok(revision), Ok(records)) = (revision, records) {
                {
                    let mut known = self.records.lock();
                    known.clear();
                    for kv in &records {
                        if let Some((id, record)) = decode(kv) {
                            known.insert(id, record);
                        }
                    }
                }
                self.rebuild();
                if let Ok(mut events) = self.meta.watch_prefix(NODE_PREFIX, revision).await {
                    backoff.reset();
                    while let Some(event) = events.recv().await {
                        match event {
                            WatchEvent::Put(kv) => {
                                if let Some((id, record)) = decode(&kv) {
                                    self.records.lock().insert(id, record);
                                }
                            }
                            WatchEvent::Delete { key, .. } => {
                                if let Some(id) = key.strip_prefix(NODE_PREFIX) {
                                    self.records.lock().remove(id);
                                }
                            }
                        }
                        self.rebuild();
                    }
                }
            }
            tracing::debug!("following node records for the KV ring again");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// A new view from the node records, if the ring changed.
    fn rebuild(&self) {
        let (members, lost): (Vec<Member>, HashSet<String>) = {
            let records = self.records.lock();
            let members = records
                .iter()
                .filter(|(_, (address, state))| state != LOST && !address.is_empty())
                .map(|(id, (address, _))| Member {
                    node_id: id.clone(),
                    address: address.clone(),
                })
                .collect();
            let lost = records
                .iter()
                .filter(|(_, (_, state))| state == LOST)
                .map(|(id, _)| id.clone())
                .collect();
            (members, lost)
        };
        let ring = HashRing::new(members);
        let changed = self.view.send_if_modified(|view| {
            if view.ring == ring && view.lost == lost {
                return false;
            }
            let mut next = View {
                epoch: view.epoch + 1,
                ring: ring.clone(),
                previous: Vec::new(),
                lost: lost.clone(),
            };
            if view.ring != ring {
                // A node that starts asks the owners of the ring without it while its keys
                // come in.
                let before = if view.ring.is_empty() {
                    ring.without(&self.node_id)
                } else {
                    view.ring.clone()
                };
                next.previous.push(before);
                next.previous
                    .extend(view.previous.iter().take(PREVIOUS_RINGS - 1).cloned());
            } else {
                next.previous = view.previous.clone();
            }
            *view = Arc::new(next);
            true
        });
        if changed {
            let view = self.view();
            tracing::info!(
                epoch = view.epoch,
                members = ?view.ring.members().iter().map(|m| &m.node_id).collect::<Vec<_>>(),
                "the KV ring changed"
            );
            self.moves.notify_one();
        }
    }

    // ----- routing ---------------------------------------------------------------------------

    fn target(&self, view: &View, key: &str, route: pb::KvRoute) -> Target {
        match route {
            pb::KvRoute::Final | pb::KvRoute::Local => Target::Here,
            pb::KvRoute::Client | pb::KvRoute::Owner => match view.ring.owner(key) {
                Some(owner) if owner.node_id != self.node_id => Target::Node(owner.clone()),
                _ => Target::Here,
            },
        }
    }

    /// The route of a request forwarded from a request that arrived with `route`.
    fn next_route(route: pb::KvRoute) -> pb::KvRoute {
        match route {
            pb::KvRoute::Client => pb::KvRoute::Owner,
            _ => pb::KvRoute::Final,
        }
    }

    /// The other nodes that may hold `key` while keys move: its owners under the previous
    /// rings, and its owner under this ring when that is not this node (a request served here
    /// because another node's ring still named this one); not lost, still on the ring.
    fn previous_owners(&self, view: &View, key: &str) -> Vec<Member> {
        let mut owners: Vec<Member> = Vec::new();
        for ring in std::iter::once(&view.ring).chain(&view.previous) {
            if let Some(owner) = ring.owner(key) {
                if owner.node_id != self.node_id
                    && !view.lost.contains(&owner.node_id)
                    && view.ring.contains(&owner.node_id)
                    && !owners.contains(owner)
                {
                    owners.push(owner.clone());
                }
            }
        }
        owners
    }

    /// Split `keys` (with their indexes) by target.
    fn groups<'a>(
        &self,
        view: &View,
        keys: impl IntoIterator<Item = (usize, &'a String)>,
        route: pb::KvRoute,
    ) -> HashMap<Target, Vec<(usize, String)>> {
        let mut groups: HashMap<Target, Vec<(usize, String)>> = HashMap::new();
        for (index, key) in keys {
            groups
                .entry(self.target(view, key, route))
                .or_default()
                .push((index, key.clone()));
        }
        groups
    }

    pub(crate) fn client(&self, member: &Member) -> Result<DataWorkerClient<Channel>> {
        let channel = {
            let mut channels = self.channels.lock();
            match channels.get(&member.address) {
                Some(channel) => channel.clone(),
                None => {
                    let channel = yr_transport::connect_lazy_with(
                        &member.address,
                        ErrorCode::InnerCommunication,
                        |endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT),
                    )?;
                    channels.insert(member.address.clone(), channel.clone());
                    channel
                }
            }
        };
        Ok(DataWorkerClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes()))
    }

    /// Wait until the ring changes after `epoch`, at most until `deadline`; whether it did.
    async fn ring_changed(&self, epoch: u64, deadline: Option<tokio::time::Instant>) -> bool {
        let mut changes = self.view.subscribe();
        let wait = async move { changes.wait_for(|view| view.epoch != epoch).await.is_ok() };
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, wait)
                .await
                .unwrap_or(false),
            None => wait.await,
        }
    }

    /// Run `call` on its keys' owners: `here` for keys this node serves, `there` forwarded to
    /// another node with the next route; a forward that cannot reach its owner is routed again
    /// once the ring changes (within [`REROUTE_WAIT`]).
    async fn fan_out<T, H, HF, F, FF>(
        self: &Arc<Self>,
        keys: &[String],
        route: pb::KvRoute,
        here: H,
        there: F,
    ) -> Result<Vec<T>>
    where
        T: Default + Clone,
        H: Fn(Vec<String>) -> HF,
        HF: std::future::Future<Output = Result<Vec<T>>>,
        F: Fn(DataWorkerClient<Channel>, Member, Vec<String>, pb::KvRoute) -> FF,
        FF: std::future::Future<Output = Result<Vec<T>>>,
    {
        let mut out = vec![T::default(); keys.len()];
        let mut pending: Vec<(usize, String)> = keys.iter().cloned().enumerate().collect();
        for attempt in 0..=MAX_REROUTES {
            let view = self.view();
            let groups = self.groups(&view, pending.iter().map(|(i, k)| (*i, k)), route);
            let calls = groups.into_iter().map(|(target, group)| {
                let names: Vec<String> = group.iter().map(|(_, k)| k.clone()).collect();
                let here = &here;
                let there = &there;
                async move {
                    let result = match &target {
                        Target::Here => here(names).await,
                        Target::Node(member) => match self.client(member) {
                            Ok(client) => {
                                there(client, member.clone(), names, Self::next_route(route)).await
                            }
                            Err(error) => Err(error),
                        },
                    };
                    (group, result)
                }
            });
            let mut retry = Vec::new();
            let mut last_error = None;
            for (group, result) in join_all(calls).await {
                match result {
                    Ok(values) => {
                        for ((index, _), value) in group.into_iter().zip(values) {
                            out[index] = value;
                        }
                    }
                    Err(error) if is_transport(&error) && attempt < MAX_REROUTES => {
                        last_error = Some(error);
                        retry.extend(group);
                    }
                    Err(error) => return Err(error),
                }
            }
            if retry.is_empty() {
                return Ok(out);
            }
            let deadline = tokio::time::Instant::now() + REROUTE_WAIT;
            if !self.ring_changed(view.epoch, Some(deadline)).await {
                return Err(last_error.unwrap_or_else(|| {
                    Error::new(ErrorCode::InnerCommunication, "a KV owner is unreachable")
                }));
            }
            pending = retry;
        }
        Ok(out)
    }

    // ----- the calls -------------------------------------------------------------------------

    /// A write, at the key's owner.
    pub async fn set(self: &Arc<Self>, request: pb::KvSetRequest) -> Result<()> {
        self.first_view().await;
        let route = route_of(request.route);
        let param = set_param_from_proto(&request.param.unwrap_or_default())?;
        kv::validate_set(&request.key, request.value.len(), &param)?;
        let request = Arc::new(request);
        self.fan_out(
            std::slice::from_ref(&request.key),
            route,
            |_| {
                let request = request.clone();
                async move {
                    self.set_here(&request, &param).await?;
                    Ok(vec![()])
                }
            },
            |mut client, member, _, next| {
                let mut forwarded = (*request).clone();
                forwarded.route = next as i32;
                async move {
                    let reply = client
                        .kv_set(forwarded)
                        .await
                        .map_err(|status| transport_error(&member, &status))?;
                    check(reply.into_inner().error).map(|()| vec![()])
                }
            },
        )
        .await
        .map(|_| ())
    }

    async fn set_here(
        self: &Arc<Self>,
        request: &pb::KvSetRequest,
        param: &kv::SetParam,
    ) -> Result<()> {
        let view = self.view();
        if param.existence == kv::Existence::NX {
            for owner in self.previous_owners(&view, &request.key) {
                let exists = self.exist_at(&owner, vec![request.key.clone()]).await;
                if exists.is_ok_and(|e| e.first().copied().unwrap_or(false)) {
                    return Err(Error::new(
                        ErrorCode::KeyAlreadyExist,
                        format!(
                            "KV key {:?} already exists and the write was NX (only if absent); \
                             use another key, or write without NX to replace it",
                            request.key
                        ),
                    ));
                }
            }
        }
        self.tombstones.lock().remove(&request.key);
        let (kv, job, key, value, param) = (
            self.kv.clone(),
            request.job_id.clone(),
            request.key.clone(),
            request.value.clone(),
            *param,
        );
        blocking(move || kv.set_for_job(&job, &key, value, &param)).await?;
        self.note_stray(&view, &request.key);
        Ok(())
    }

    /// A key stored here that the ring gives to another node (the rings of two nodes
    /// disagreed for a moment) is pushed to its owner.
    fn note_stray(&self, view: &View, key: &str) {
        if view
            .ring
            .owner(key)
            .is_some_and(|owner| owner.node_id != self.node_id)
        {
            self.moves.notify_one();
        }
    }

    /// The values of `keys`, waiting up to `timeout`, at their owners: for a client, every value
    /// or 4005 naming the missing keys; for another node, what was found.
    pub async fn get(
        self: &Arc<Self>,
        keys: Vec<String>,
        timeout: Duration,
        route: pb::KvRoute,
    ) -> Result<Vec<Option<Bytes>>> {
        kv::validate_keys(&keys)?;
        self.first_view().await;
        if route == pb::KvRoute::Local {
            let kv = self.kv.clone();
            return blocking(move || kv.try_get(&keys)).await;
        }
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let mut values: Vec<Option<Bytes>> = vec![None; keys.len()];
        let mut unreachable: Option<Error> = None;
        let mut late_rounds = 0;
        loop {
            let missing: Vec<(usize, &String)> = keys
                .iter()
                .enumerate()
                .filter(|(i, _)| values[*i].is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            let view = self.view();
            let groups = self.groups(&view, missing, route);
            let rounds = groups.into_iter().map(|(target, group)| {
                let view = view.clone();
                async move {
                    let names: Vec<String> = group.iter().map(|(_, k)| k.clone()).collect();
                    let found = match &target {
                        Target::Here => self.get_here(&view, names, deadline).await,
                        Target::Node(member) => {
                            self.get_at(
                                member,
                                names,
                                deadline,
                                Self::next_route(route),
                                view.epoch,
                            )
                            .await
                        }
                    };
                    (group, found)
                }
            });
            let mut failed = false;
            for (group, found) in join_all(rounds).await {
                match found {
                    Ok(found) => {
                        for ((index, _), value) in group.into_iter().zip(found) {
                            if value.is_some() {
                                values[index] = value;
                            }
                        }
                    }
                    Err(error) if is_transport(&error) => {
                        failed = true;
                        unreachable = Some(error);
                    }
                    Err(error) => return Err(error),
                }
            }
            if values.iter().all(Option::is_some) {
                break;
            }
            // A part that came back early because the ring changed is asked again at its new
            // owner, also past the deadline (a read with no timeout during a move).
            let rerouted = self.view().epoch != view.epoch;
            let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if expired && !(rerouted && late_rounds < MAX_REROUTES) {
                break;
            }
            if expired {
                late_rounds += 1;
                continue;
            }
            if failed {
                // The owner died or is cut off: route again once the ring changes.
                if !self.ring_changed(view.epoch, deadline).await {
                    break;
                }
            }
            // Otherwise a part came back early because a ring changed: route again.
        }
        if route != pb::KvRoute::Client || values.iter().all(Option::is_some) {
            return Ok(values);
        }
        let missing = crate::service::missing_keys(&keys, &values);
        if let Some(error) = unreachable {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Err(error);
            }
        }
        Err(self.missing_error(&missing, timeout))
    }

    /// 4005 naming `missing`, saying which of them belonged to a node that was lost.
    fn missing_error(&self, missing: &[&str], timeout: Duration) -> Error {
        let error = kv::timeout_error(missing, timeout);
        let view = self.view();
        let mut lost: Vec<String> = Vec::new();
        for key in missing {
            for ring in &view.previous {
                if let Some(owner) = ring.owner(key) {
                    if view.lost.contains(&owner.node_id) && !lost.contains(&owner.node_id) {
                        lost.push(owner.node_id.clone());
                    }
                }
            }
        }
        if lost.is_empty() {
            return error;
        }
        Error::new(
            error.code(),
            format!(
                "{}. Some of these keys were owned by node(s) {} that the master declared lost: \
                 their values were in that node's memory only (write them with \
                 WriteThroughL2Cache and a shared Redis second-level store to keep them over a \
                 node's loss)",
                error.message(),
                lost.join(", ")
            ),
        )
    }

    /// Keys this node owns: what is here, else at their previous owners, waiting here (woken
    /// by writes and by keys moved in) until `deadline` or until the ring changes.
    async fn get_here(
        self: &Arc<Self>,
        view: &View,
        keys: Vec<String>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<Option<Bytes>>> {
        let notify = Arc::new(Notify::new());
        let waker = {
            let notify = notify.clone();
            Arc::new(move || notify.notify_one())
        };
        // Watch before the first look, so that a write in between is not missed.
        let _watch = self.kv.watch(&keys, waker);
        let keys = Arc::new(keys);
        let mut asked_previous = false;
        let mut changes = self.view.subscribe();
        loop {
            let mut values = {
                let (kv, keys) = (self.kv.clone(), keys.clone());
                blocking(move || kv.try_get(&keys)).await?
            };
            if !asked_previous && values.iter().any(Option::is_none) {
                asked_previous = true;
                self.fill_from_previous(view, &keys, &mut values).await;
            }
            if values.iter().all(Option::is_some) {
                return Ok(values);
            }
            let wait = async {
                tokio::select! {
                    () = notify.notified() => true,
                    _ = async { changes.wait_for(|v| v.epoch != view.epoch).await.is_ok() } => {
                        // The entry node routes again under the new ring.
                        false
                    }
                }
            };
            let woken = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, wait)
                    .await
                    .unwrap_or(false),
                None => wait.await,
            };
            if !woken {
                let (kv, keys) = (self.kv.clone(), keys.clone());
                let mut last = blocking(move || kv.try_get(&keys)).await?;
                for (value, old) in last.iter_mut().zip(values) {
                    if value.is_none() {
                        *value = old;
                    }
                }
                return Ok(last);
            }
        }
    }

    /// Fill the missing `values` of `keys` from the keys' previous owners (moves in flight).
    async fn fill_from_previous(
        self: &Arc<Self>,
        view: &View,
        keys: &[String],
        values: &mut [Option<Bytes>],
    ) {
        let mut asks: HashMap<Member, Vec<usize>> = HashMap::new();
        for (index, key) in keys.iter().enumerate() {
            if values[index].is_none() {
                for owner in self.previous_owners(view, key) {
                    asks.entry(owner).or_default().push(index);
                }
            }
        }
        for (owner, indexes) in asks {
            let names: Vec<String> = indexes.iter().map(|i| keys[*i].clone()).collect();
            match self
                .get_at(&owner, names, None, pb::KvRoute::Local, view.epoch)
                .await
            {
                Ok(found) => {
                    for (index, value) in indexes.into_iter().zip(found) {
                        if values[index].is_none() {
                            values[index] = value;
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, node = %owner.node_id, "a previous KV owner did not answer")
                }
            }
        }
    }

    /// Ask node `member` for `keys` with `route`, waiting there until `deadline`; a ring change
    /// here (after `epoch`) ends the wait with what was found so far (nothing).
    async fn get_at(
        self: &Arc<Self>,
        member: &Member,
        keys: Vec<String>,
        deadline: Option<tokio::time::Instant>,
        route: pb::KvRoute,
        epoch: u64,
    ) -> Result<Vec<Option<Bytes>>> {
        let count = keys.len();
        let timeout_ms = match deadline {
            Some(deadline) => {
                timeout_to_ms(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
            None if route == pb::KvRoute::Local => 0,
            None => u64::MAX,
        };
        let mut client = self.client(member)?;
        // A waiting read forwarded for a client counts here too, where the client waits on it.
        let _waiting =
            (timeout_ms > 0 && route != pb::KvRoute::Local).then(|| self.kv.forwarded_read());
        let request = pb::KvGetRequest {
            keys,
            timeout_ms,
            route: route as i32,
        };
        let call = client.kv_get(request);
        let reply = if route == pb::KvRoute::Local {
            tokio::time::timeout(REROUTE_WAIT, call)
                .await
                .map_err(|_| no_answer(member))?
        } else {
            tokio::select! {
                reply = call => reply,
                _ = self.ring_changed(epoch, None) => return Ok(vec![None; count]),
            }
        };
        let reply = reply
            .map_err(|status| transport_error(member, &status))?
            .into_inner();
        check(reply.error)?;
        if reply.values.len() != count || reply.found.len() != count {
            return Err(Error::new(
                ErrorCode::InnerCommunication,
                format!(
                    "the data worker of node {} answered {} values for {count} KV keys",
                    member.node_id,
                    reply.values.len()
                ),
            ));
        }
        Ok(reply
            .values
            .into_iter()
            .zip(reply.found)
            .map(|(value, found)| found.then_some(value))
            .collect())
    }

    /// Delete `keys` at their owners (and at their previous owners while keys move).
    pub async fn del(self: &Arc<Self>, keys: Vec<String>, route: pb::KvRoute) -> Result<()> {
        kv::validate_keys(&keys)?;
        self.first_view().await;
        self.fan_out(
            &keys,
            route,
            |keys| async move {
                self.del_here(keys, route).await?;
                Ok(Vec::<()>::new())
            },
            |mut client, member, keys, next| async move {
                let reply = client
                    .kv_del(pb::KvDelRequest {
                        keys,
                        route: next as i32,
                    })
                    .await
                    .map_err(|status| transport_error(&member, &status))?;
                check(reply.into_inner().error).map(|()| Vec::new())
            },
        )
        .await
        .map(|_| ())
    }

    async fn del_here(self: &Arc<Self>, keys: Vec<String>, route: pb::KvRoute) -> Result<()> {
        let view = self.view();
        let mut previous: HashMap<Member, Vec<String>> = HashMap::new();
        if route != pb::KvRoute::Local {
            for key in &keys {
                for owner in self.previous_owners(&view, key) {
                    previous.entry(owner).or_default().push(key.clone());
                }
            }
        }
        if !view.previous.is_empty() {
            self.remember_deleted(&keys);
        }
        let kv = self.kv.clone();
        blocking(move || kv.del(&keys)).await?;
        for (owner, keys) in previous {
            let result = async {
                let mut client = self.client(&owner)?;
                let reply = answer_of(
                    &owner,
                    client.kv_del(pb::KvDelRequest {
                        keys,
                        route: pb::KvRoute::Local as i32,
                    }),
                )
                .await?;
                check(reply.error)
            }
            .await;
            if let Err(error) = result {
                tracing::debug!(%error, node = %owner.node_id, "cannot delete KV keys at their previous owner");
            }
        }
        Ok(())
    }

    fn remember_deleted(&self, keys: &[String]) {
        let now = Instant::now();
        let mut tombstones = self.tombstones.lock();
        if tombstones.len() + keys.len() > MAX_TOMBSTONES {
            tombstones.retain(|_, at| now.duration_since(*at) < TOMBSTONE_LIFE);
            if tombstones.len() + keys.len() > MAX_TOMBSTONES {
                tracing::warn!(
                    "too many KV keys deleted during moves; forgetting the oldest deletes"
                );
                tombstones.clear();
            }
        }
        for key in keys {
            tombstones.insert(key.clone(), now);
        }
    }

    fn deleted_recently(&self, key: &str) -> bool {
        self.tombstones
            .lock()
            .get(key)
            .is_some_and(|at| at.elapsed() < TOMBSTONE_LIFE)
    }

    /// Whether each of `keys` has a value, at its owner (or its previous owners).
    pub async fn exist(
        self: &Arc<Self>,
        keys: Vec<String>,
        route: pb::KvRoute,
    ) -> Result<Vec<bool>> {
        kv::validate_keys(&keys)?;
        self.first_view().await;
        self.fan_out(
            &keys,
            route,
            |keys| async move {
                let local = {
                    let (kv, keys) = (self.kv.clone(), keys.clone());
                    blocking(move || kv.exist(&keys)).await?
                };
                if route == pb::KvRoute::Local || local.iter().all(|e| *e) {
                    return Ok(local);
                }
                let view = self.view();
                let mut out = local;
                let mut asks: HashMap<Member, Vec<usize>> = HashMap::new();
                for (index, key) in keys.iter().enumerate() {
                    if !out[index] {
                        for owner in self.previous_owners(&view, key) {
                            asks.entry(owner).or_default().push(index);
                        }
                    }
                }
                for (owner, indexes) in asks {
                    let names = indexes.iter().map(|i| keys[*i].clone()).collect();
                    if let Ok(found) = self.exist_at(&owner, names).await {
                        for (index, exists) in indexes.into_iter().zip(found) {
                            out[index] |= exists;
                        }
                    }
                }
                Ok(out)
            },
            |mut client, member, keys, next| async move {
                let count = keys.len();
                let reply = client
                    .kv_exist(pb::KvExistRequest {
                        keys,
                        route: next as i32,
                    })
                    .await
                    .map_err(|status| transport_error(&member, &status))?
                    .into_inner();
                check(reply.error)?;
                if reply.exists.len() != count {
                    return Err(Error::new(
                        ErrorCode::InnerCommunication,
                        format!(
                            "the data worker of node {} answered {} flags for {count} KV keys",
                            member.node_id,
                            reply.exists.len()
                        ),
                    ));
                }
                Ok(reply.exists)
            },
        )
        .await
    }

    /// What node `member` holds of `keys` now.
    async fn exist_at(&self, member: &Member, keys: Vec<String>) -> Result<Vec<bool>> {
        let mut client = self.client(member)?;
        let reply = answer_of(
            member,
            client.kv_exist(pb::KvExistRequest {
                keys,
                route: pb::KvRoute::Local as i32,
            }),
        )
        .await?;
        check(reply.error)?;
        Ok(reply.exists)
    }

    // ----- moves -----------------------------------------------------------------------------

    /// Take entries pushed here by their previous owner.
    pub async fn adopt(self: &Arc<Self>, entries: Vec<pb::KvEntry>) -> Result<Vec<bool>> {
        let this = self.clone();
        let taken = blocking(move || {
            Ok(entries
                .into_iter()
                .map(|entry| {
                    let entry = MovingEntry {
                        key: entry.key,
                        value: entry.value,
                        ttl: (entry.ttl_ms > 0).then(|| Duration::from_millis(entry.ttl_ms)),
                        job: entry.job_id,
                        in_l2: entry.in_l2,
                        version: 0,
                    };
                    this.kv
                        .adopt(&entry, |key| this.deleted_recently(key))
                        .unwrap_or_else(|error| {
                            tracing::warn!(%error, key = %entry.key, "cannot take a moved KV key");
                            false
                        })
                })
                .collect::<Vec<bool>>())
        })
        .await?;
        // Keys this node does not own either (rings disagreed for a moment) move on.
        self.moves.notify_one();
        Ok(taken)
    }

    async fn move_keys(self: Arc<Self>) {
        let mut backoff = Backoff::reconnect();
        loop {
            self.moves.notified().await;
            loop {
                match self.move_pass().await {
                    Ok(()) => {
                        backoff.reset();
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot move KV keys to their new owners yet; trying again");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    /// Push every key held here that another node owns to it.
    async fn move_pass(self: &Arc<Self>) -> Result<()> {
        let mut kept: HashSet<String> = HashSet::new();
        let mut moved = 0usize;
        loop {
            let view = self.view();
            if view.ring.is_empty() || !view.ring.contains(&self.node_id) {
                return Ok(());
            }
            let batch = {
                let (kv, view, node_id) = (self.kv.clone(), view.clone(), self.node_id.clone());
                let skip = kept.clone();
                blocking(move || {
                    Ok(kv.moving_entries(
                        |key| {
                            view.ring.owner(key).is_some_and(|o| o.node_id != node_id)
                                && !skip.contains(key)
                        },
                        MOVE_BATCH_BYTES,
                    ))
                })
                .await?
            };
            if batch.is_empty() {
                if moved > 0 {
                    tracing::info!(
                        moved,
                        kept = kept.len(),
                        epoch = view.epoch,
                        "KV keys moved to their new owners"
                    );
                }
                return Ok(());
            }
            let mut by_owner: HashMap<Member, Vec<MovingEntry>> = HashMap::new();
            for entry in batch {
                if let Some(owner) = view.ring.owner(&entry.key) {
                    by_owner.entry(owner.clone()).or_default().push(entry);
                }
            }
            for (owner, entries) in by_owner {
                let mut client = self.client(&owner)?;
                let request = pb::KvAdoptRequest {
                    entries: entries
                        .iter()
                        .map(|e| pb::KvEntry {
                            key: e.key.clone(),
                            value: e.value.clone(),
                            ttl_ms: e.ttl.map_or(0, |t| timeout_to_ms(t).max(1)),
                            job_id: e.job.clone(),
                            in_l2: e.in_l2,
                        })
                        .collect(),
                };
                let reply = client
                    .kv_adopt(request)
                    .await
                    .map_err(|status| transport_error(&owner, &status))?
                    .into_inner();
                check(reply.error)?;
                for (entry, taken) in entries
                    .into_iter()
                    .zip(reply.taken.into_iter().chain(std::iter::repeat(false)))
                {
                    if taken {
                        let kv = self.kv.clone();
                        let (key, version) = (entry.key.clone(), entry.version);
                        blocking(move || kv.forget_moved(&key, version)).await?;
                        moved += 1;
                    } else {
                        kept.insert(entry.key);
                    }
                }
            }
        }
    }
}

fn decode(kv: &KeyValue) -> Option<(String, (String, String))> {
    let info = yr_proto::v1::NodeInfo::decode(kv.value.clone()).ok()?;
    Some((info.node_id, (info.address, info.state)))
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
