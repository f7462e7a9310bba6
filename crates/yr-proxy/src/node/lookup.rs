//! Finding instances by name or id for drivers and runtimes: here first, then in the meta
//! store for instances other nodes run. A lookup by name waits (up to its timeout) for the
//! name to appear: woken at once when it is created here, and checking other nodes' records
//! with backoff. A lookup by id (a handle passed to another process) also waits, up to
//! [`STARTING_WAIT`] whatever its timeout, while another node's record says the instance is
//! still starting: the handle's receiver may run before the instance does.
//!
//! A caller that found an instance another node runs is not told of its later states by this
//! node. When its connection to the runtime breaks, it asks again with `moved_from`: this node
//! follows the instance's record (a read, then a watch from that revision) until the instance
//! runs at another address, restarted or re-created on another node after a node loss, or
//! ends (docs/design/023-node-loss-recovery.md).

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;
use yr_common::Error;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use yr_common::backoff::Backoff;
use yr_meta::WatchEvent;
use yr_proto::error_from_proto;

use super::Node;
use crate::error::ProxyError;
use crate::instance_table::Subscriber;
use crate::record_writer::{instance_key, named_key};

/// The first and the longest wait between looks in the meta store.
const REMOTE_LOOK_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(20), Duration::from_secs(1));

/// How long a lookup by id waits for an instance that another node is still starting (an id
/// comes from a create, so the instance runs or fails soon); below the 60 s a client gives a
/// request.
const STARTING_WAIT: Duration = Duration::from_secs(30);

/// What the meta store says of an instance that this node does not hold.
enum Elsewhere {
    /// Running on another node.
    Running(pb::GetNamedResponse),
    /// Not running yet: new, scheduling or creating.
    Starting,
    /// No record, or one in another state.
    Absent,
}

/// Sleep `delay`, unless `deadline` comes first: false then.
async fn pause_before(deadline: Instant, delay: Duration) -> bool {
    tokio::time::timeout_at(deadline, tokio::time::sleep(delay))
        .await
        .is_ok()
}

impl Node {
    /// Find an instance by name (waiting up to the timeout) or id; subscribe the asker.
    pub async fn lookup(
        self: &Arc<Self>,
        client_id: u64,
        request: pb::GetNamedRequest,
    ) -> Result<pb::GetNamedResponse, Error> {
        if !request.moved_from.is_empty() {
            return self.await_moved(client_id, &request).await;
        }
        let started = Instant::now();
        let mut deadline = started + Duration::from_millis(request.timeout_ms.min(86_400_000));
        let mut backoff = REMOTE_LOOK_BACKOFF.0;
        let mut waiting = None;
        loop {
            // Registered before looking, so that a name added meanwhile wakes this lookup.
            let added = self.instances.named_added();
            tokio::pin!(added);
            added.as_mut().enable();
            if let Some(found) = self.lookup_here(client_id, &request) {
                return Ok(found);
            }
            match self.lookup_elsewhere(&request).await {
                Elsewhere::Running(found) => return Ok(found),
                Elsewhere::Starting if !request.instance_id.is_empty() => {
                    deadline = deadline.max(started + STARTING_WAIT);
                }
                Elsewhere::Starting | Elsewhere::Absent => {}
            }
            if Instant::now() >= deadline {
                let what = if request.instance_id.is_empty() {
                    format!(
                        "named {:?} in namespace {:?}",
                        request.name, request.namespace
                    )
                } else {
                    request.instance_id.clone()
                };
                return Err(ProxyError::NoLiveInstance(what).into());
            }
            waiting.get_or_insert_with(|| self.lookups_waiting.enter());
            let next_look = (Instant::now() + backoff).min(deadline);
            tokio::select! {
                () = added => {}
                () = tokio::time::sleep_until(next_look) => {
                    backoff = (backoff * 2).min(REMOTE_LOOK_BACKOFF.1);
                }
            }
        }
    }

    fn lookup_here(
        &self,
        client_id: u64,
        request: &pb::GetNamedRequest,
    ) -> Option<pb::GetNamedResponse> {
        let id = if request.instance_id.is_empty() {
            self.instances.named(&request.namespace, &request.name)?
        } else {
            request.instance_id.clone()
        };
        self.instances
            .with_mut(&id, |instance| {
                if instance.killing {
                    return None;
                }
                instance.subscribers.push(Subscriber::Client(client_id));
                let record = instance.record();
                Some(pb::GetNamedResponse {
                    instance_id: record.instance_id.clone(),
                    class_name: record.class_name.clone(),
                    runtime_address: record.runtime_address.clone(),
                    state: record.state,
                    notifies: true,
                })
            })
            .flatten()
    }

    /// An instance that another node owns, as the meta store records it.
    async fn lookup_elsewhere(&self, request: &pb::GetNamedRequest) -> Elsewhere {
        self.record_elsewhere(request)
            .await
            .map_or(Elsewhere::Absent, |record| {
                let state = S::try_from(record.state).unwrap_or(S::Fatal);
                match state {
                    S::Running if record.node_id != self.settings.node_id => {
                        Elsewhere::Running(pb::GetNamedResponse {
                            instance_id: record.instance_id,
                            class_name: record.class_name,
                            runtime_address: record.runtime_address,
                            state: record.state,
                            notifies: false,
                        })
                    }
                    S::New | S::Scheduling | S::Creating => Elsewhere::Starting,
                    _ => Elsewhere::Absent,
                }
            })
    }

    /// A caller's connection to the runtime of `request.instance_id` at `request.moved_from`
    /// broke: follow the instance's record until it runs at another address (answered like a
    /// lookup, subscribing the caller if it now runs here), or ends (its error), or
    /// `request.timeout_ms` passes.
    async fn await_moved(
        self: &Arc<Self>,
        client_id: u64,
        request: &pb::GetNamedRequest,
    ) -> Result<pb::GetNamedResponse, Error> {
        let id = &request.instance_id;
        if id.is_empty() {
            return Err(ProxyError::EmptyId.into());
        }
        let waited = Duration::from_millis(request.timeout_ms.min(86_400_000));
        let deadline = Instant::now() + waited;
        let key = instance_key(id);
        let mut backoff = Backoff::reconnect();
        let timed_out = || -> Error {
            ProxyError::NotRunningAgain {
                instance: id.clone(),
                waited,
            }
            .into()
        };
        loop {
            // Read the record, then watch from that revision, so no change is missed.
            let looked = async {
                let revision = self.meta.current_revision().await?;
                let record = self.meta.get(&key).await?;
                Ok::<_, Error>((revision, record))
            };
            let (revision, record) = match tokio::time::timeout_at(deadline, looked).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(read)) => read,
                Ok(Err(error)) => {
                    tracing::debug!(instance = %id, %error, "cannot read the record of an instance whose caller lost it");
                    if !pause_before(deadline, backoff.next_delay()).await {
                        return Err(timed_out());
                    }
                    continue;
                }
            };
            let record = record.and_then(|kv| pb::InstanceRecord::decode(kv.value).ok());
            if let Some(answer) = self.moved_answer(client_id, request, record) {
                return answer;
            }
            let mut events = match self.meta.watch_prefix(&key, revision).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::debug!(instance = %id, %error, "cannot watch the record of an instance whose caller lost it");
                    if !pause_before(deadline, backoff.next_delay()).await {
                        return Err(timed_out());
                    }
                    continue;
                }
            };
            backoff.reset();
            loop {
                let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => return Err(timed_out()),
                    Ok(None) => break,
                    Ok(Some(event)) => event,
                };
                let record = match event {
                    WatchEvent::Put(kv) if kv.key == key => {
                        pb::InstanceRecord::decode(kv.value).ok()
                    }
                    WatchEvent::Delete { key: deleted, .. } if deleted == key => None,
                    _ => continue,
                };
                if let Some(answer) = self.moved_answer(client_id, request, record) {
                    return answer;
                }
            }
        }
    }

    /// What one version of the record (`None`: deleted) of an instance whose caller lost it at
    /// `request.moved_from` answers: running at another address, or ended; `None` while it is
    /// still at the old address (its node not yet declared lost) or starting again.
    fn moved_answer(
        &self,
        client_id: u64,
        request: &pb::GetNamedRequest,
        record: Option<pb::InstanceRecord>,
    ) -> Option<Result<pb::GetNamedResponse, Error>> {
        let id = &request.instance_id;
        let Some(record) = record else {
            return Some(Err(super::stop::exited_error(id)));
        };
        match S::try_from(record.state).unwrap_or(S::Fatal) {
            S::Running
                if !record.runtime_address.is_empty()
                    && record.runtime_address != request.moved_from =>
            {
                // Now on this node: subscribe the caller, so it hears of later moves.
                if record.node_id == self.settings.node_id {
                    if let Some(found) = self.lookup_here(client_id, request) {
                        return Some(Ok(found));
                    }
                }
                Some(Ok(pb::GetNamedResponse {
                    instance_id: record.instance_id,
                    class_name: record.class_name,
                    runtime_address: record.runtime_address,
                    state: record.state,
                    notifies: false,
                }))
            }
            S::Fatal | S::ScheduleFailed | S::Exited | S::Evicted => Some(Err(record
                .error
                .as_ref()
                .map(error_from_proto)
                .unwrap_or_else(|| super::stop::exited_error(id)))),
            _ => None,
        }
    }

    /// The meta store's record of the instance that `request` names.
    async fn record_elsewhere(&self, request: &pb::GetNamedRequest) -> Option<pb::InstanceRecord> {
        let id = if request.instance_id.is_empty() {
            let kv = self
                .meta
                .get(&named_key(&request.namespace, &request.name))
                .await
                .ok()??;
            String::from_utf8(kv.value.to_vec()).ok()?
        } else {
            request.instance_id.clone()
        };
        let kv = self.meta.get(&instance_key(&id)).await.ok()??;
        pb::InstanceRecord::decode(kv.value).ok()
    }

    /// Every named instance on this node.
    pub fn list_named(&self) -> pb::ListNamedResponse {
        let mut instances: Vec<pb::NamedInstance> = self
            .instances
            .all_named()
            .into_iter()
            .map(|(namespace, name, instance_id)| pb::NamedInstance {
                name,
                namespace,
                instance_id,
            })
            .collect();
        instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        pb::ListNamedResponse { instances }
    }
}
