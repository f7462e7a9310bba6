//! The node's link to the master: registration, a heartbeat stream carrying changes to this
//! node's allocatable resources, and global placement for requests this node cannot hold.
//!
//! The node registers as its current incarnation ([`Fencing`]). A master that declared that
//! incarnation lost (the node was silent past its node timeout, then came back: its heartbeat
//! is answered with `reregister`) refuses the registration; the node then fails its local
//! instances, becomes a new incarnation and registers again at once.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use yr_common::backoff::Backoff;
use yr_common::{Error, ErrorCode};
use yr_proto::error_from_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::master_client::MasterClient;

use crate::fencing::Fencing;
use crate::resources::Amount;

/// How often the node beats when nothing changes.
const BEAT: Duration = Duration::from_millis(500);

/// Where the link's reconnects stand.
struct LinkState {
    backoff: Backoff,
    /// Whether the link was up at its last change of state.
    up: bool,
}

/// How many times one session registers again at once after its incarnation was refused as
/// lost (once is enough: the new incarnation was never declared lost).
const LOST_REGISTRATIONS: usize = 3;

/// The link to the master.
pub struct MasterLink {
    address: String,
    node: pb::NodeInfo,
    fencing: Arc<Fencing>,
    updates: Mutex<Option<mpsc::UnboundedSender<pb::NodeUpdate>>>,
}

impl MasterLink {
    /// A link for `node` to the master at `address`, registering as `fencing`'s incarnation.
    pub fn new(address: String, node: pb::NodeInfo, fencing: Arc<Fencing>) -> MasterLink {
        MasterLink {
            address,
            node,
            fencing,
            updates: Mutex::new(None),
        }
    }

    /// This node's labels, as registered.
    pub fn labels(&self) -> &std::collections::HashMap<String, String> {
        &self.node.labels
    }

    async fn client(&self) -> Result<MasterClient<tonic::transport::Channel>, Error> {
        let channel = yr_transport::connect(&self.address, ErrorCode::InnerCommunication).await?;
        Ok(MasterClient::new(channel))
    }

    /// Keep registered and beating, reconnecting after master restarts, until the process ends.
    /// `allocatable` gives the node's current free resources for a fresh registration.
    /// Attempts back off exponentially (about 100 ms doubling to 5 s, with jitter), and the link
    /// logs when its state changes (down, up again), not at every attempt.
    pub async fn run(&self, allocatable: impl Fn() -> Amount) {
        let mut state = LinkState {
            backoff: Backoff::reconnect(),
            // As if it were up, so that the first failure is logged.
            up: true,
        };
        loop {
            let result = self.session(&allocatable, &mut state).await;
            *self.updates.lock() = None;
            if let Err(error) = result {
                if state.up {
                    tracing::warn!(%error, master = %self.address,
                        "master link down; retrying with backoff (up to {:?} apart)", Backoff::MAX);
                    state.up = false;
                }
            }
            tokio::time::sleep(state.backoff.next_delay()).await;
        }
    }

    /// One registration and heartbeat stream, until it breaks.
    async fn session(
        &self,
        allocatable: &impl Fn() -> Amount,
        state: &mut LinkState,
    ) -> Result<(), Error> {
        let mut client = self.client().await?;
        self.register(&mut client, allocatable).await?;
        state.backoff.reset();
        if !state.up {
            tracing::info!(master = %self.address, "master link up again");
            state.up = true;
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        *self.updates.lock() = Some(sender.clone());
        let mut commands = client
            .node_heartbeat(UnboundedReceiverStream::new(receiver))
            .await
            .map_err(|s| {
                Error::new(
                    ErrorCode::InnerCommunication,
                    format!("the master refused heartbeats: {}", s.message()),
                )
            })?
            .into_inner();
        let node_id = self.node.node_id.clone();
        let beats = tokio::spawn(async move {
            loop {
                if sender
                    .send(pb::NodeUpdate {
                        node_id: node_id.clone(),
                        delta: None,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(BEAT).await;
            }
        });
        let result = loop {
            match commands.next().await {
                Some(Ok(command)) if command.reregister => {
                    break Err(Error::new(
                        ErrorCode::InnerCommunication,
                        "the master asked this node to register again",
                    ))
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => {
                    break Err(Error::new(
                        ErrorCode::InnerCommunication,
                        status.message().to_string(),
                    ))
                }
                None => {
                    break Err(Error::new(
                        ErrorCode::InnerCommunication,
                        "the master closed the heartbeat stream",
                    ))
                }
            }
        };
        beats.abort();
        result
    }

    /// Register as the current incarnation. If the master declared it lost, fail the local
    /// instances, become a new incarnation and register as that.
    async fn register(
        &self,
        client: &mut MasterClient<tonic::transport::Channel>,
        allocatable: &impl Fn() -> Amount,
    ) -> Result<(), Error> {
        for _ in 0..LOST_REGISTRATIONS {
            let incarnation = self.fencing.incarnation();
            let mut node = self.node.clone();
            node.incarnation = incarnation;
            node.allocatable = Some(allocatable().to_proto());
            let reply = client
                .register_node(pb::RegisterNodeRequest { node: Some(node) })
                .await
                .map_err(|s| {
                    Error::new(
                        ErrorCode::InnerCommunication,
                        format!("the master refused registration: {}", s.message()),
                    )
                })?
                .into_inner();
            if !reply.incarnation_lost {
                self.fencing.registered(incarnation);
                return Ok(());
            }
            // Fails the instances first: the room they free is in the new registration's
            // allocatable figure.
            self.fencing.declared_lost(incarnation);
        }
        Err(Error::new(
            ErrorCode::InnerCommunication,
            format!(
                "the master refused {LOST_REGISTRATIONS} incarnations of node {} as lost in a row",
                self.node.node_id
            ),
        ))
    }

    /// Tell the master that this node's allocatable resources changed by `delta`.
    pub fn resources_changed(&self, delta: pb::ResourceDelta) {
        if let Some(sender) = self.updates.lock().as_ref() {
            let _ = sender.send(pb::NodeUpdate {
                node_id: self.node.node_id.clone(),
                delta: Some(delta),
            });
        }
    }

    /// Ask the master where `request` fits, on a node that admits every one of
    /// `required_affinities` (node labels), skipping `exclude`. Returns the node's id and
    /// address, or the master's error (1006 when no node could ever hold it, 1002 when none can
    /// now).
    pub async fn schedule(
        &self,
        request: &Amount,
        exclude: Vec<String>,
        required_affinities: Vec<pb::NodeAffinity>,
    ) -> Result<(String, String), Error> {
        let mut client = self.client().await?;
        let reply = client
            .schedule(pb::ScheduleRequest {
                request: Some(request.to_proto()),
                exclude_nodes: exclude,
                labels: Vec::new(),
                required_affinities,
            })
            .await
            .map_err(|s| {
                Error::new(
                    ErrorCode::InnerCommunication,
                    format!("the master did not schedule: {}", s.message()),
                )
            })?
            .into_inner();
        match reply.error {
            Some(error) => Err(error_from_proto(&error)),
            None => Ok((reply.node_id, reply.node_address)),
        }
    }
}
