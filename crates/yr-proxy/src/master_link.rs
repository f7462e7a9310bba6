//! The node's link to the master: registration, a heartbeat stream carrying changes to this
//! node's allocatable resources, and global placement for requests this node cannot hold.
//!
//! The node registers as its current incarnation ([`Fencing`]). A master that declared that
//! incarnation lost (the node was silent past its node timeout, then came back: its heartbeat
//! is answered with `reregister`) refuses the registration; the node then fails its local
//! instances, becomes a new incarnation and registers again at once.
//!
//! The node may know several masters (a cluster on etcd with standbys). It talks to one at a
//! time. A master that cannot be reached sends the link to the next address, with backoff. A
//! standby answers "not the leader; the leader is at X" ([`yr_transport::leader_redirect`]):
//! the link goes to X at once, or, while no master leads (an election), asks again every
//! [`ELECTION_RETRY`] without growing its backoff. At the new leader it registers as the same
//! incarnation, which the leader accepts unless it declared that incarnation lost.
//!
//! Beats are numbered; the leader acknowledges each one it accepted and tells the node its node
//! timeout at registration. The link keeps when each recent beat was sent ([`BeatLog`]) and
//! renews the node's [`Leases`] with the send instant of each acknowledged beat (and of each
//! accepted registration): the node fences itself when the lease runs out
//! ([`crate::self_fence`]).

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
use crate::self_fence::{BeatLog, Lease, Leases};

/// How often the node beats when nothing changes, at most: a sixth of the master's node
/// timeout when that is shorter, so that the lease ([`crate::self_fence`]) spans several beats
/// and one late acknowledgement does not fence the node.
const BEAT: Duration = Duration::from_millis(500);

/// The shortest beat period, whatever the node timeout.
const MIN_BEAT: Duration = Duration::from_millis(50);

/// The beat period for a master whose node timeout is `node_timeout` (`None`: unknown).
fn beat_period(node_timeout: Option<Duration>) -> Duration {
    match node_timeout {
        Some(timeout) => (timeout / 6).clamp(MIN_BEAT, BEAT),
        None => BEAT,
    }
}

/// How often the link pings the master's connection, and how long it waits for the answer.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the link waits for a master to say whether it leads.
const LEADER_QUESTION_TIMEOUT: Duration = Duration::from_secs(1);

/// How soon the link asks again when a standby said that no master leads yet.
pub const ELECTION_RETRY: Duration = Duration::from_millis(200);

/// Where the link's reconnects stand.
struct LinkState {
    backoff: Backoff,
    /// Whether the link was up at its last change of state.
    up: bool,
}

/// How many times one session registers again at once after its incarnation was refused as
/// lost (once is enough: the new incarnation was never declared lost).
const LOST_REGISTRATIONS: usize = 3;

/// What the link learned from a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Followed {
    /// A standby named the leader: the link now points there.
    Leader,
    /// A standby said that no master leads yet.
    Election,
    /// The master could not be reached or failed: the link now points at the next address.
    Next,
}

/// The link to the master.
pub struct MasterLink {
    addresses: Vec<String>,
    /// The master calls go to: one of `addresses`, or a leader a standby named.
    current: Mutex<String>,
    node: pb::NodeInfo,
    fencing: Arc<Fencing>,
    updates: Mutex<Option<mpsc::UnboundedSender<pb::NodeUpdate>>>,
    /// When the recent beats were sent (shared with each session's beating task).
    beats: Arc<Mutex<BeatLog>>,
    /// The node's lease, renewed by what the leader accepts.
    leases: Leases,
}

impl MasterLink {
    /// A link for `node` to the masters at `addresses` (one, or a cluster's masters on etcd),
    /// registering as `fencing`'s incarnation.
    pub fn new(addresses: Vec<String>, node: pb::NodeInfo, fencing: Arc<Fencing>) -> MasterLink {
        let first = addresses.first().cloned().unwrap_or_default();
        MasterLink {
            addresses,
            current: Mutex::new(first),
            node,
            fencing,
            updates: Mutex::new(None),
            beats: Arc::new(Mutex::new(BeatLog::new())),
            leases: Leases::new(),
        }
    }

    /// The node's lease and its renewals, for [`crate::self_fence::guard`].
    pub fn leases(&self) -> tokio::sync::watch::Receiver<Option<Lease>> {
        self.leases.subscribe()
    }

    /// The master the link talks to now.
    pub fn current(&self) -> String {
        self.current.lock().clone()
    }

    /// Points the link where a failed call says: the leader a standby named, or the next
    /// address.
    fn follow(&self, failed_at: &str, status: Option<&tonic::Status>) -> Followed {
        let mut current = self.current.lock();
        if *current != failed_at {
            // Another call moved the link already.
            return Followed::Leader;
        }
        match status.and_then(yr_transport::leader_redirect) {
            Some(Some(leader)) if leader != failed_at => {
                tracing::info!(from = failed_at, to = %leader, "following the master's answer to the leader");
                *current = leader;
                Followed::Leader
            }
            Some(_) => Followed::Election,
            None => {
                let position = self.addresses.iter().position(|a| a == failed_at);
                let next = match position {
                    Some(index) => self.addresses[(index + 1) % self.addresses.len()].clone(),
                    // A named leader that went away: start over from the list.
                    None => self.addresses.first().cloned().unwrap_or_default(),
                };
                *current = next;
                Followed::Next
            }
        }
    }

    /// This node's labels, as registered.
    pub fn labels(&self) -> &std::collections::HashMap<String, String> {
        &self.node.labels
    }

    async fn client(
        &self,
        address: &str,
    ) -> Result<MasterClient<tonic::transport::Channel>, Error> {
        // HTTP/2 pings find a master that hangs (paused, or cut off) with its connection open:
        // the heartbeat stream breaks within about three seconds and the link moves on.
        let channel = yr_transport::connect_with(address, ErrorCode::InnerCommunication, |e| {
            e.http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
        })
        .await?;
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
            let address = self.current();
            let result = self.session(&address, &allocatable, &mut state).await;
            *self.updates.lock() = None;
            let followed = match result {
                Ok(()) => self.follow(&address, None),
                Err((error, status)) => {
                    if state.up {
                        tracing::warn!(%error, master = %address,
                            "master link down; retrying with backoff (up to {:?} apart)", Backoff::MAX);
                        state.up = false;
                    }
                    self.follow(&address, status.as_ref())
                }
            };
            let delay = match followed {
                Followed::Leader => Duration::ZERO,
                Followed::Election => {
                    self.ask_whether_any_master_leads().await;
                    ELECTION_RETRY
                }
                Followed::Next => state.backoff.next_delay(),
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// While a master said that no master leads: ask every master this node knows, and if
    /// every one answers that it does not lead, no master leads now, so no master can declare
    /// this node lost soon: the lease is extended, if it still runs
    /// ([`Leases::extend_while_no_master_leads`]). An etcd outage, in which every master steps
    /// down, then pauses nothing. A master that leads, or does not answer within
    /// [`LEADER_QUESTION_TIMEOUT`], extends nothing.
    async fn ask_whether_any_master_leads(&self) {
        let sent = tokio::time::Instant::now();
        let answers =
            futures_util::future::join_all(self.addresses.iter().map(|address| async move {
                let Ok(mut client) = self.client(address).await else {
                    return false;
                };
                let asked = client.cluster_status(pb::ClusterStatusRequest {});
                match tokio::time::timeout(LEADER_QUESTION_TIMEOUT, asked).await {
                    // Refused as "not the leader" (whoever it names as the leader).
                    Ok(Err(status)) => yr_transport::leader_redirect(&status).is_some(),
                    _ => false,
                }
            }))
            .await;
        if !answers.is_empty()
            && answers.iter().all(|not_leading| *not_leading)
            && self
                .leases
                .extend_while_no_master_leads(sent, tokio::time::Instant::now())
        {
            tracing::debug!("every master says it does not lead: the lease is extended");
        }
    }

    /// One registration and heartbeat stream with the master at `address`, until it breaks;
    /// the error, with the master's status when it answered.
    async fn session(
        &self,
        address: &str,
        allocatable: &impl Fn() -> Amount,
        state: &mut LinkState,
    ) -> Result<(), (Error, Option<tonic::Status>)> {
        let mut client = self.client(address).await.map_err(|e| (e, None))?;
        let node_timeout = self.register(&mut client, allocatable).await?;
        state.backoff.reset();
        if !state.up {
            tracing::info!(master = %address, "master link up again");
            state.up = true;
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        *self.updates.lock() = Some(sender.clone());
        let mut commands = client
            .node_heartbeat(UnboundedReceiverStream::new(receiver))
            .await
            .map_err(|s| {
                (
                    Error::new(
                        ErrorCode::InnerCommunication,
                        format!("the master refused heartbeats: {}", s.message()),
                    ),
                    Some(s),
                )
            })?
            .into_inner();
        let node_id = self.node.node_id.clone();
        let log = self.beats.clone();
        let period = beat_period(node_timeout);
        let beats = tokio::spawn(async move {
            loop {
                let beat = log.lock().send(tokio::time::Instant::now());
                if sender
                    .send(pb::NodeUpdate {
                        node_id: node_id.clone(),
                        delta: None,
                        beat,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(period).await;
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
                Some(Ok(command)) if command.beat != 0 => {
                    let sent = self.beats.lock().acked(command.beat);
                    if let (Some(sent), Some(node_timeout)) = (sent, node_timeout) {
                        self.leases.renew(Lease { sent, node_timeout });
                    }
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
        result.map_err(|e| (e, None))
    }

    /// Register as the current incarnation. If the master declared it lost, fail the local
    /// instances, become a new incarnation and register as that. Returns the master's node
    /// timeout (`None` from a master that does not acknowledge beats), and renews the lease
    /// from the registration's send instant.
    async fn register(
        &self,
        client: &mut MasterClient<tonic::transport::Channel>,
        allocatable: &impl Fn() -> Amount,
    ) -> Result<Option<Duration>, (Error, Option<tonic::Status>)> {
        for _ in 0..LOST_REGISTRATIONS {
            let sent = tokio::time::Instant::now();
            let incarnation = self.fencing.incarnation();
            let mut node = self.node.clone();
            node.incarnation = incarnation;
            node.allocatable = Some(allocatable().to_proto());
            let reply = client
                .register_node(pb::RegisterNodeRequest { node: Some(node) })
                .await
                .map_err(|s| {
                    (
                        Error::new(
                            ErrorCode::InnerCommunication,
                            format!("the master refused registration: {}", s.message()),
                        ),
                        Some(s),
                    )
                })?
                .into_inner();
            if !reply.incarnation_lost {
                self.fencing.registered(incarnation);
                let node_timeout = (reply.node_timeout_ms > 0)
                    .then(|| Duration::from_millis(reply.node_timeout_ms));
                match node_timeout {
                    Some(node_timeout) => self.leases.renew(Lease { sent, node_timeout }),
                    None => tracing::warn!(
                        "the master does not acknowledge beats (an older version): this node \
                         does not fence itself while cut off from it"
                    ),
                }
                return Ok(node_timeout);
            }
            // Fails the instances first: the room they free is in the new registration's
            // allocatable figure.
            self.fencing.declared_lost(incarnation);
        }
        Err((
            Error::new(
                ErrorCode::InnerCommunication,
                format!(
                    "the master refused {LOST_REGISTRATIONS} incarnations of node {} as lost in a row",
                    self.node.node_id
                ),
            ),
            None,
        ))
    }

    /// Tell the master that this node's allocatable resources changed by `delta`.
    pub fn resources_changed(&self, delta: pb::ResourceDelta) {
        if let Some(sender) = self.updates.lock().as_ref() {
            let _ = sender.send(pb::NodeUpdate {
                node_id: self.node.node_id.clone(),
                delta: Some(delta),
                beat: 0,
            });
        }
    }

    /// Ask the master where `request` fits, on a node that admits every one of
    /// `required_affinities` (node labels), skipping `exclude`. Returns the node's id and
    /// address, or the master's error (1006 when no node could ever hold it, 1002 when none can
    /// now, 3005 when no master leads: they cannot reach etcd, or an election is under way). A standby's answer is followed to the leader it names, and a master that cannot
    /// be reached is skipped for the next address (placement is a read: sending it again is
    /// safe).
    pub async fn schedule(
        &self,
        request: &Amount,
        exclude: Vec<String>,
        required_affinities: Vec<pb::NodeAffinity>,
    ) -> Result<(String, String), Error> {
        let request = pb::ScheduleRequest {
            request: Some(request.to_proto()),
            exclude_nodes: exclude,
            labels: Vec::new(),
            required_affinities,
        };
        let mut attempts = self.addresses.len() + 1;
        loop {
            attempts -= 1;
            let address = self.current();
            let (error, status) = match self.client(&address).await {
                Ok(mut client) => match client.schedule(request.clone()).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        return match reply.error {
                            Some(error) => Err(error_from_proto(&error)),
                            None => Ok((reply.node_id, reply.node_address)),
                        };
                    }
                    Err(s) => (
                        Error::new(
                            ErrorCode::InnerCommunication,
                            format!("the master at {address} did not schedule: {}", s.message()),
                        ),
                        Some(s),
                    ),
                },
                Err(error) => (error, None),
            };
            match self.follow(&address, status.as_ref()) {
                // Masters on etcd that cannot reach it lose their lease: none leads until it
                // returns (or an election ends). 3005 tells the caller it is the meta store.
                Followed::Election => {
                    return Err(Error::new(
                        ErrorCode::EtcdOperationError,
                        format!(
                            "no master leads, so nothing can be placed: the masters cannot \
                             reach the meta store (etcd), or an election is under way ({})",
                            error.message()
                        ),
                    ))
                }
                _ if attempts == 0 => return Err(error),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_come_at_least_six_times_per_node_timeout() {
        assert_eq!(beat_period(None), BEAT);
        assert_eq!(beat_period(Some(Duration::from_secs(3))), BEAT);
        assert_eq!(
            beat_period(Some(Duration::from_millis(1500))),
            Duration::from_millis(250)
        );
        assert_eq!(beat_period(Some(Duration::from_millis(60))), MIN_BEAT);
    }
}
