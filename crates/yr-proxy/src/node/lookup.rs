//! Finding instances by name or id for drivers and runtimes: here first, then in the meta
//! store for instances other nodes run. A lookup by name waits (up to its timeout) for the
//! name to appear: woken at once when it is created here, and checking other nodes' records
//! with backoff. A lookup by id (a handle passed to another process) also waits, up to
//! [`STARTING_WAIT`] whatever its timeout, while another node's record says the instance is
//! still starting: the handle's receiver may run before the instance does.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;
use yr_common::Error;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

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

impl Node {
    /// Find an instance by name (waiting up to the timeout) or id; subscribe the asker.
    pub async fn lookup(
        self: &Arc<Self>,
        client_id: u64,
        request: pb::GetNamedRequest,
    ) -> Result<pb::GetNamedResponse, Error> {
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
                        })
                    }
                    S::New | S::Scheduling | S::Creating => Elsewhere::Starting,
                    _ => Elsewhere::Absent,
                }
            })
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
