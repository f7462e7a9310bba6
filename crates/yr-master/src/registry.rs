//! The node registry: which nodes belong to the cluster, where to reach them, their labels, and
//! whether they are alive.
//!
//! A node is *alive* after it registers and as long as it heartbeats within `node_timeout`. A
//! node that misses that deadline is *lost*: it leaves placement and the instance manager fails
//! its instances. A master that restarts recovers the registry from the meta store
//! (`/yr/node/{node_id}`) with every node *recovering*: such a node is told to register again on
//! its first heartbeat (the master's copy of its resources is stale) and is lost when it has not
//! done so within `node_timeout` (plus the nodes' longest reconnect delay) of the restart.
//!
//! Each registration carries the node's *incarnation* (`NodeInfo.incarnation`). The master
//! keeps the live incarnation of each node at [`incarnation_key`]; every record write of the
//! node compares it, so once a node is lost (the key is deleted with the lost record) none of
//! that incarnation's writes land. An incarnation declared lost cannot register again: the node
//! must fail its instances and come back under a new one.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use yr_proto::v1::NodeInfo;

/// The meta store prefix of node records (prost `NodeInfo`).
pub const NODE_PREFIX: &str = "/yr/node/";

/// The meta store key of a node's record.
pub fn node_key(node_id: &str) -> String {
    format!("{NODE_PREFIX}{node_id}")
}

/// The meta store prefix of the live incarnation of each node (decimal text).
pub const INCARNATION_PREFIX: &str = "/yr/incarnation/";

/// The meta store key of a node's live incarnation: present while the node is registered and
/// not lost; every instance-record write of the node compares it.
pub fn incarnation_key(node_id: &str) -> String {
    format!("{INCARNATION_PREFIX}{node_id}")
}

/// A node's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    /// Registered and heartbeating; placement may use it.
    Alive,
    /// Recovered from the meta store after a master restart; waiting for it to register again.
    Recovering,
    /// Missed its heartbeats; its instances were failed.
    Lost,
}

impl NodeState {
    /// Every state, for metrics.
    pub const ALL: [NodeState; 3] = [NodeState::Alive, NodeState::Recovering, NodeState::Lost];

    /// The name shown in `NodeInfo.state`, `yr status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Recovering => "recovering",
            NodeState::Lost => "lost",
        }
    }

    /// The state with this name.
    pub fn parse(name: &str) -> Option<NodeState> {
        NodeState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node in the registry.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    /// What the node registered (its `allocatable` is the figure at registration; the live
    /// figure is in the resource view).
    pub info: NodeInfo,
    /// Liveness.
    pub state: NodeState,
    /// When the node last registered or heartbeat (for a recovered node: when it was recovered,
    /// plus the grace it has to register again).
    pub last_seen: Instant,
}

/// What a heartbeat means for its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// The node is alive; apply its delta.
    Accepted,
    /// The master does not know the node, or knows it only from before a restart or a loss:
    /// tell it to register again and ignore the delta.
    Reregister,
}

/// Every node the master knows, by node id.
#[derive(Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<String, NodeEntry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Records a registration; the node is alive from now. Returns the state it had before.
    pub fn register(&mut self, mut info: NodeInfo, now: Instant) -> Option<NodeState> {
        info.state = NodeState::Alive.as_str().to_string();
        let previous = self.nodes.get(&info.node_id).map(|entry| entry.state);
        self.nodes.insert(
            info.node_id.clone(),
            NodeEntry {
                info,
                state: NodeState::Alive,
                last_seen: now,
            },
        );
        previous
    }

    /// Adds a node recovered from the meta store: a node persisted as lost stays lost, any
    /// other is recovering, with its deadline counted from `now`.
    pub fn recover(&mut self, mut info: NodeInfo, now: Instant) -> NodeState {
        let state = match NodeState::parse(&info.state) {
            Some(NodeState::Lost) => NodeState::Lost,
            _ => NodeState::Recovering,
        };
        info.state = state.as_str().to_string();
        self.nodes.insert(
            info.node_id.clone(),
            NodeEntry {
                info,
                state,
                last_seen: now,
            },
        );
        state
    }

    /// Records a heartbeat from `node_id`.
    pub fn heartbeat(&mut self, node_id: &str, now: Instant) -> HeartbeatOutcome {
        match self.nodes.get_mut(node_id) {
            Some(entry) if entry.state == NodeState::Alive => {
                entry.last_seen = now;
                HeartbeatOutcome::Accepted
            }
            _ => HeartbeatOutcome::Reregister,
        }
    }

    /// Marks lost every alive or recovering node not seen for `timeout`, and returns their ids.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let mut lost = Vec::new();
        for (node_id, entry) in &mut self.nodes {
            if entry.state != NodeState::Lost
                && now.saturating_duration_since(entry.last_seen) >= timeout
            {
                entry.state = NodeState::Lost;
                entry.info.state = NodeState::Lost.as_str().to_string();
                lost.push(node_id.clone());
            }
        }
        lost
    }

    /// Whether `incarnation` of `node_id` was declared lost (0, an unfenced node, never is).
    pub fn is_lost_incarnation(&self, node_id: &str, incarnation: u64) -> bool {
        incarnation != 0
            && self.nodes.get(node_id).is_some_and(|entry| {
                entry.state == NodeState::Lost && entry.info.incarnation == incarnation
            })
    }

    /// The incarnation of `node_id` that may write records now: its registered one, unless the
    /// node is lost.
    pub fn live_incarnation(&self, node_id: &str) -> Option<u64> {
        self.nodes
            .get(node_id)
            .filter(|entry| entry.state != NodeState::Lost)
            .map(|entry| entry.info.incarnation)
    }

    /// A node's entry.
    pub fn get(&self, node_id: &str) -> Option<&NodeEntry> {
        self.nodes.get(node_id)
    }

    /// Every node, in node id order.
    pub fn iter(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes.values()
    }

    /// How many nodes are in `state`.
    pub fn count(&self, state: NodeState) -> usize {
        self.nodes
            .values()
            .filter(|entry| entry.state == state)
            .count()
    }

    /// The ids of the nodes in `state`.
    pub fn ids_in(&self, state: NodeState) -> Vec<String> {
        self.nodes
            .values()
            .filter(|entry| entry.state == state)
            .map(|entry| entry.info.node_id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> NodeInfo {
        NodeInfo {
            node_id: id.to_string(),
            address: format!("{id}:1"),
            ..Default::default()
        }
    }

    #[test]
    fn registered_node_stays_alive_while_it_heartbeats() {
        let mut registry = Registry::new();
        let start = Instant::now();
        assert_eq!(registry.register(info("a"), start), None);
        let timeout = Duration::from_secs(5);
        assert_eq!(
            registry.heartbeat("a", start + Duration::from_secs(4)),
            HeartbeatOutcome::Accepted
        );
        assert!(registry
            .expire(start + Duration::from_secs(8), timeout)
            .is_empty());
        assert_eq!(
            registry.expire(start + Duration::from_secs(9), timeout),
            vec!["a".to_string()]
        );
        assert_eq!(registry.get("a").unwrap().state, NodeState::Lost);
        assert_eq!(registry.get("a").unwrap().info.state, "lost");
        // Lost once is reported once.
        assert!(registry
            .expire(start + Duration::from_secs(20), timeout)
            .is_empty());
    }

    #[test]
    fn unknown_lost_and_recovering_nodes_are_told_to_reregister() {
        let mut registry = Registry::new();
        let now = Instant::now();
        assert_eq!(registry.heartbeat("x", now), HeartbeatOutcome::Reregister);
        registry.recover(info("r"), now);
        assert_eq!(registry.heartbeat("r", now), HeartbeatOutcome::Reregister);
        registry.register(info("l"), now);
        registry.expire(now + Duration::from_secs(1), Duration::from_millis(10));
        assert_eq!(registry.heartbeat("l", now), HeartbeatOutcome::Reregister);
        assert_eq!(
            registry.register(info("l"), now),
            Some(NodeState::Lost),
            "a lost node comes back by registering"
        );
        assert_eq!(registry.heartbeat("l", now), HeartbeatOutcome::Accepted);
    }

    #[test]
    fn recovered_nodes_keep_lost_and_otherwise_recover() {
        let mut registry = Registry::new();
        let now = Instant::now();
        let mut lost = info("lost");
        lost.state = "lost".into();
        let mut alive = info("alive");
        alive.state = "alive".into();
        assert_eq!(registry.recover(lost, now), NodeState::Lost);
        assert_eq!(registry.recover(alive, now), NodeState::Recovering);
        assert_eq!(registry.count(NodeState::Recovering), 1);
        assert_eq!(
            registry.expire(now + Duration::from_secs(6), Duration::from_secs(5)),
            vec!["alive".to_string()]
        );
        assert_eq!(registry.ids_in(NodeState::Lost).len(), 2);
    }

    #[test]
    fn a_lost_incarnation_is_known_as_lost_and_a_new_one_is_live() {
        let mut registry = Registry::new();
        let now = Instant::now();
        let mut first = info("a");
        first.incarnation = 7;
        registry.register(first, now);
        assert_eq!(registry.live_incarnation("a"), Some(7));
        assert!(!registry.is_lost_incarnation("a", 7));
        registry.expire(now + Duration::from_secs(1), Duration::from_millis(10));
        assert!(registry.is_lost_incarnation("a", 7));
        assert!(!registry.is_lost_incarnation("a", 8));
        assert!(!registry.is_lost_incarnation("a", 0), "0 is never fenced");
        assert_eq!(registry.live_incarnation("a"), None);
        let mut second = info("a");
        second.incarnation = 8;
        registry.register(second, now);
        assert_eq!(registry.live_incarnation("a"), Some(8));
        assert!(
            !registry.is_lost_incarnation("a", 7),
            "the node is alive again"
        );
    }

    #[test]
    fn state_names_round_trip() {
        for state in NodeState::ALL {
            assert_eq!(NodeState::parse(state.as_str()), Some(state));
        }
        assert_eq!(NodeState::parse("bogus"), None);
    }
}
