//! Node liveness: a pass that marks nodes not seen for the node timeout as lost, removes them
//! from the resource view, persists them as lost (fencing their incarnation) and settles their
//! instances (re-created elsewhere with `recover_retry_times` left, FATAL otherwise: design
//! 023); and the task that runs those passes until the master stops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;
use yr_common::{Error, ErrorCode};
use yr_meta::{Compare, MetaError, MetaStore, TxnOp};
use yr_proto::v1::{CreateRequest, InstanceState};

use super::Cluster;
use crate::instance_manager::Rescheduled;
use crate::registry::{incarnation_key, node_key, NodeState};

/// How long the master follows a rescheduled create for a refusal before it leaves the
/// instance to the node that took it over.
const RESCHEDULE_FOLLOW: Duration = Duration::from_secs(60);

impl Cluster {
    /// One liveness pass: nodes not seen for `node_timeout` become lost, leave the resource
    /// view, are persisted as lost, and their instances are failed. Returns the lost node ids.
    pub async fn check_liveness(&self) -> Vec<String> {
        let lost = {
            let mut nodes = self.nodes.lock();
            let now = self.clock.now();
            nodes.view.expire_reservations(now, self.node_timeout);
            let lost = nodes.registry.expire(now, self.node_timeout);
            for node_id in &lost {
                nodes.view.remove_node(node_id);
            }
            lost
        };
        for node_id in &lost {
            self.counters.nodes_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                node_id,
                timeout = ?self.node_timeout,
                "node lost: no heartbeat within the node timeout"
            );
            if let Err(err) = self.persist_lost(node_id).await {
                tracing::warn!(node_id, error = %err, "cannot persist that the node was lost");
            }
            self.fail_instances(node_id).await;
        }
        lost
    }

    /// Fails the instances of every node the registry holds as lost (after a restart, a master
    /// may have died half-way through).
    pub async fn fail_instances_of_lost_nodes(&self) {
        let lost = self.nodes.lock().registry.ids_in(NodeState::Lost);
        for node_id in lost {
            self.fail_instances(&node_id).await;
        }
    }

    /// Settles the instances of lost node `node_id`: those with restarts left are re-created
    /// on alive nodes (see [`InstanceManager::recover_instances_of_lost_node`]), the others
    /// are written FATAL.
    ///
    /// [`InstanceManager::recover_instances_of_lost_node`]: crate::instance_manager::InstanceManager::recover_instances_of_lost_node
    pub(super) async fn fail_instances(&self, node_id: &str) {
        // A node that came back as a new incarnation meanwhile keeps that incarnation's records.
        let live = || self.nodes.lock().registry.live_incarnation(node_id);
        let place = |_: &yr_proto::v1::InstanceRecord, options: &yr_common::InvokeOptions| {
            self.place_instance(options)
                .map_err(|error| error.to_string())
        };
        match self
            .instances
            .recover_instances_of_lost_node(node_id, &live, &place)
            .await
        {
            Ok(recovered) => {
                for rescheduled in recovered.rescheduled {
                    self.counters
                        .instances_rescheduled
                        .fetch_add(1, Ordering::Relaxed);
                    self.send_reschedule(rescheduled);
                }
            }
            Err(err) => {
                let error = Error::from(err);
                tracing::error!(node_id, %error, "cannot settle the instances of a lost node; will retry after a restart");
            }
        }
    }

    /// Sends the create of every instance the master wrote SCHEDULING on a node that has not
    /// taken it over yet (a master that took over, or restarted, finishes its predecessor's
    /// reschedules; a node that has the instance already answers 1004, which changes nothing).
    pub async fn resend_reschedules(&self) {
        for (instance_id, node_id) in self.instances.pending_reschedules() {
            let address = self.alive_address(&node_id);
            let record = match self.instances.record(&instance_id).await {
                Ok(Some(record)) => record,
                _ => continue,
            };
            match address {
                Some(address) => self.send_reschedule(Rescheduled {
                    record,
                    node_id,
                    address,
                }),
                None => {
                    // The chosen node is gone too: its liveness pass settles the record.
                    tracing::debug!(instance_id, node_id, "reschedule target not alive");
                }
            }
        }
    }

    /// The Node service address of `node_id` if it is alive.
    fn alive_address(&self, node_id: &str) -> Option<String> {
        let nodes = self.nodes.lock();
        nodes
            .registry
            .get(node_id)
            .filter(|entry| entry.state == NodeState::Alive)
            .map(|entry| entry.info.address.clone())
    }

    /// Sends the create of a rescheduled instance to its node, with the same instance id, in a
    /// task: the node takes the record over. A node that cannot be reached, or refuses the
    /// create, leaves the record to the master, which writes it FATAL with the reason.
    fn send_reschedule(&self, rescheduled: Rescheduled) {
        let Rescheduled {
            record,
            node_id,
            address,
        } = rescheduled;
        let creator_address = self
            .alive_address(&record.creator_node_id)
            .unwrap_or_default();
        let creator_node_id = if creator_address.is_empty() {
            String::new()
        } else {
            record.creator_node_id.clone()
        };
        let instance_id = record.instance_id.clone();
        let request = CreateRequest {
            function: record.function,
            stateless: record.stateless,
            args: record.args,
            options: record.options,
            job_id: record.job_id,
            class_name: record.class_name,
            parent_instance_id: record.parent_instance_id,
            binary_path: record.binary_path,
            binary_hash: record.binary_hash,
            runtime_args: record.runtime_args,
            designated_instance_id: instance_id.clone(),
            creator_node_id,
            creator_node_address: creator_address,
            rescheduled: true,
            restarts: record.restarts,
        };
        let instances = self.instances.clone();
        tokio::spawn(async move {
            let refused = match send_create(&address, request).await {
                Ok(()) => return,
                Err(refused) => refused,
            };
            tracing::warn!(instance_id, node_id, error = %refused, "the rescheduled create was refused");
            if refused.code() == ErrorCode::InstanceDuplicated {
                return;
            }
            if let Err(error) = instances
                .fail_reschedule(&instance_id, &node_id, &refused.to_string())
                .await
            {
                tracing::error!(instance_id, node_id, %error, "cannot write FATAL after a refused reschedule");
            }
        });
    }
    /// Writes the node's record as lost and deletes its live incarnation, so that none of that
    /// incarnation's record writes lands from now on (fencing); unless a registration got there
    /// first.
    async fn persist_lost(&self, node_id: &str) -> Result<(), MetaError> {
        let key = node_key(node_id);
        let Some(current) = self.store.get(&key).await? else {
            return Ok(());
        };
        let info = {
            let nodes = self.nodes.lock();
            match nodes.registry.get(node_id) {
                Some(entry) if entry.state == NodeState::Lost => entry.info.clone(),
                _ => return Ok(()),
            }
        };
        let value = Bytes::from(info.encode_to_vec());
        let response = self
            .store
            .txn(
                vec![Compare::Version {
                    key: key.clone(),
                    version: current.version,
                }],
                vec![
                    TxnOp::Put {
                        key,
                        value,
                        lease: None,
                    },
                    TxnOp::Delete {
                        key: incarnation_key(node_id),
                    },
                ],
                Vec::new(),
            )
            .await?;
        if !response.succeeded {
            tracing::debug!(node_id, "node re-registered while it was being marked lost");
        }
        Ok(())
    }

    /// Runs liveness passes until `stop` turns true.
    pub async fn watch_liveness(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // A pass every tenth of the timeout: a node is declared lost at most that much after
        // its timeout.
        let period =
            (self.node_timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                _ = ticker.tick() => {}
            }
            tokio::select! {
                _ = crate::stopped(&mut stop) => return,
                _ = self.check_liveness() => {}
            }
        }
    }
}

/// Sends `request` to the Node service at `address` and follows its notifications until the
/// instance runs, fails, or [`RESCHEDULE_FOLLOW`] passes. The error if the node could not be
/// reached, or refused or failed the create before it ran.
async fn send_create(address: &str, request: CreateRequest) -> Result<(), Error> {
    let channel = yr_transport::connect(address, ErrorCode::InnerCommunication).await?;
    let mut client = yr_proto::v1::node_client::NodeClient::new(channel)
        .max_decoding_message_size(yr_transport::max_message_bytes())
        .max_encoding_message_size(yr_transport::max_message_bytes());
    let mut notifications = client
        .create(request)
        .await
        .map_err(|status| {
            Error::new(
                yr_transport::status_to_code(&status, ErrorCode::InnerCommunication),
                format!(
                    "the node at {address} refused the create: {}",
                    status.message()
                ),
            )
        })?
        .into_inner();
    let follow = async {
        loop {
            match notifications.message().await {
                Ok(Some(notify)) => match InstanceState::try_from(notify.state) {
                    Ok(InstanceState::Running) => return Ok(()),
                    Ok(InstanceState::Fatal | InstanceState::ScheduleFailed) => {
                        return Err(notify
                            .error
                            .as_ref()
                            .map(yr_proto::error_from_proto)
                            .unwrap_or_else(|| {
                                Error::new(ErrorCode::InstanceExited, "the instance failed")
                            }))
                    }
                    _ => {}
                },
                // The node's record settles it from here.
                Ok(None) | Err(_) => return Ok(()),
            }
        }
    };
    tokio::time::timeout(RESCHEDULE_FOLLOW, follow)
        .await
        .unwrap_or(Ok(()))
}
