//! The master's view of every node's resources: capacity (what the node manages) and allocatable
//! (what is free now).
//!
//! Nodes report changes, not snapshots: a registration sets both figures, and each heartbeat may
//! carry a [`ResourceDelta`] that is added to allocatable. When the master places a request on a
//! node it subtracts the request at once as a *tentative reservation*, so that concurrent
//! schedules do not pile onto the same node. The node re-checks the request locally and reports
//! what it really took in its next delta, so the next non-empty delta from a node replaces all of
//! its reservations ("trust the node"). A reservation the node never answers (it refused the
//! request and nothing changed) expires after a time-to-live.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use yr_proto::v1::{ResourceDelta, Resources};

/// Custom resource amounts closer than this are treated as equal.
const EPSILON: f64 = 1e-9;

/// An amount of resources: CPU in millicores, memory in MB and named custom resources.
///
/// Amounts are signed because a view may briefly go below zero: a tentative reservation can race
/// with a delta the node sent before it saw the request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceSet {
    /// CPU in millicores (1000 = one core).
    pub cpu_millicores: i64,
    /// Memory in MB.
    pub memory_mb: i64,
    /// Custom resources by name, for example `"gpu" → 1.0`.
    pub custom: BTreeMap<String, f64>,
}

impl ResourceSet {
    /// The amounts in a wire `Resources`.
    pub fn from_proto(resources: &Resources) -> ResourceSet {
        ResourceSet {
            cpu_millicores: i64::try_from(resources.cpu_millicores).unwrap_or(i64::MAX),
            memory_mb: i64::try_from(resources.memory_mb).unwrap_or(i64::MAX),
            custom: resources
                .custom
                .iter()
                .map(|(name, amount)| (name.clone(), *amount))
                .collect(),
        }
    }

    /// The wire form; negative amounts are shown as zero.
    pub fn to_proto(&self) -> Resources {
        Resources {
            cpu_millicores: u64::try_from(self.cpu_millicores.max(0)).unwrap_or(0),
            memory_mb: u64::try_from(self.memory_mb.max(0)).unwrap_or(0),
            custom: self
                .custom
                .iter()
                .map(|(name, amount)| (name.clone(), amount.max(0.0)))
                .collect(),
        }
    }

    /// Adds a node's reported change.
    pub fn apply_delta(&mut self, delta: &ResourceDelta) {
        self.cpu_millicores = self.cpu_millicores.saturating_add(delta.cpu_millicores);
        self.memory_mb = self.memory_mb.saturating_add(delta.memory_mb);
        for (name, amount) in &delta.custom {
            *self.custom.entry(name.clone()).or_insert(0.0) += amount;
        }
    }

    /// Adds `other` to these amounts.
    pub fn add(&mut self, other: &ResourceSet) {
        self.cpu_millicores = self.cpu_millicores.saturating_add(other.cpu_millicores);
        self.memory_mb = self.memory_mb.saturating_add(other.memory_mb);
        for (name, amount) in &other.custom {
            *self.custom.entry(name.clone()).or_insert(0.0) += amount;
        }
    }

    /// Takes `other` from these amounts.
    pub fn subtract(&mut self, other: &ResourceSet) {
        self.cpu_millicores = self.cpu_millicores.saturating_sub(other.cpu_millicores);
        self.memory_mb = self.memory_mb.saturating_sub(other.memory_mb);
        for (name, amount) in &other.custom {
            *self.custom.entry(name.clone()).or_insert(0.0) -= amount;
        }
    }

    /// The amount of a custom resource (zero when absent).
    pub fn custom_amount(&self, name: &str) -> f64 {
        self.custom.get(name).copied().unwrap_or(0.0)
    }

    /// Whether a request of these amounts fits into `available`.
    pub fn fits_in(&self, available: &ResourceSet) -> bool {
        self.shortfalls(available).is_empty()
    }

    /// What `available` lacks for a request of these amounts, one entry per resource, for
    /// example `"cpu 500m free, 1000m needed"`. Empty when the request fits.
    pub fn shortfalls(&self, available: &ResourceSet) -> Vec<String> {
        let mut lacking = Vec::new();
        if self.cpu_millicores > available.cpu_millicores {
            lacking.push(format!(
                "cpu {}m of {}m",
                available.cpu_millicores.max(0),
                self.cpu_millicores
            ));
        }
        if self.memory_mb > available.memory_mb {
            lacking.push(format!(
                "memory {}MB of {}MB",
                available.memory_mb.max(0),
                self.memory_mb
            ));
        }
        for (name, amount) in &self.custom {
            let have = available.custom_amount(name);
            if *amount > EPSILON && *amount > have + EPSILON {
                lacking.push(format!("{name} {} of {amount}", have.max(0.0)));
            }
        }
        lacking
    }

    /// Whether every amount is zero.
    pub fn is_zero(&self) -> bool {
        self.cpu_millicores == 0
            && self.memory_mb == 0
            && self.custom.values().all(|amount| amount.abs() <= EPSILON)
    }
}

impl fmt::Display for ResourceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{cpu: {}m, memory: {}MB",
            self.cpu_millicores, self.memory_mb
        )?;
        for (name, amount) in &self.custom {
            write!(f, ", {name}: {amount}")?;
        }
        write!(f, "}}")
    }
}

/// Whether a wire delta changes nothing (an empty heartbeat).
pub fn delta_is_empty(delta: Option<&ResourceDelta>) -> bool {
    match delta {
        None => true,
        Some(delta) => {
            delta.cpu_millicores == 0
                && delta.memory_mb == 0
                && delta.custom.values().all(|amount| amount.abs() <= EPSILON)
        }
    }
}

/// A request the master placed on a node and subtracted from its allocatable.
#[derive(Clone, Debug)]
struct Reservation {
    amount: ResourceSet,
    at: Instant,
}

/// One node's resources as the master sees them.
#[derive(Clone, Debug)]
pub struct NodeResources {
    capacity: ResourceSet,
    /// Allocatable as the node reported it (registration plus deltas).
    reported: ResourceSet,
    reservations: Vec<Reservation>,
    /// `reported` minus every reservation.
    allocatable: ResourceSet,
}

impl NodeResources {
    /// A node that manages `capacity` and has `allocatable` free.
    pub fn new(capacity: ResourceSet, allocatable: ResourceSet) -> NodeResources {
        NodeResources {
            capacity,
            reported: allocatable.clone(),
            reservations: Vec::new(),
            allocatable,
        }
    }

    /// What the node manages in total.
    pub fn capacity(&self) -> &ResourceSet {
        &self.capacity
    }

    /// What is free now: the node's report minus the master's tentative reservations.
    pub fn allocatable(&self) -> &ResourceSet {
        &self.allocatable
    }

    /// How many tentative reservations are outstanding.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Applies a delta the node reported. The node's figures now include whatever it did with
    /// the requests the master sent it, so every tentative reservation is dropped.
    pub fn apply_delta(&mut self, delta: &ResourceDelta) {
        self.reported.apply_delta(delta);
        self.reservations.clear();
        self.allocatable = self.reported.clone();
    }

    /// Subtracts a request placed on this node until the node reports again.
    pub fn reserve(&mut self, amount: &ResourceSet, now: Instant) {
        self.allocatable.subtract(amount);
        self.reservations.push(Reservation {
            amount: amount.clone(),
            at: now,
        });
    }

    /// Gives back reservations older than `ttl`.
    pub fn expire_reservations(&mut self, now: Instant, ttl: Duration) {
        let before = self.reservations.len();
        self.reservations
            .retain(|reservation| now.saturating_duration_since(reservation.at) < ttl);
        if self.reservations.len() != before {
            self.allocatable = self.reported.clone();
            for reservation in &self.reservations {
                self.allocatable.subtract(&reservation.amount);
            }
        }
    }
}

/// Every live node's resources, by node id.
#[derive(Debug, Default)]
pub struct ResourceView {
    nodes: BTreeMap<String, NodeResources>,
}

impl ResourceView {
    /// An empty view.
    pub fn new() -> ResourceView {
        ResourceView::default()
    }

    /// Sets a node's figures from a registration, replacing whatever the view had.
    pub fn set_node(&mut self, node_id: &str, capacity: ResourceSet, allocatable: ResourceSet) {
        self.nodes.insert(
            node_id.to_string(),
            NodeResources::new(capacity, allocatable),
        );
    }

    /// Forgets a node (it was lost).
    pub fn remove_node(&mut self, node_id: &str) -> Option<NodeResources> {
        self.nodes.remove(node_id)
    }

    /// A node's figures.
    pub fn node(&self, node_id: &str) -> Option<&NodeResources> {
        self.nodes.get(node_id)
    }

    /// Applies a node's delta; false when the view does not know the node.
    pub fn apply_delta(&mut self, node_id: &str, delta: &ResourceDelta) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(node) => {
                node.apply_delta(delta);
                true
            }
            None => false,
        }
    }

    /// Tentatively takes `amount` from a node; false when the view does not know the node.
    pub fn reserve(&mut self, node_id: &str, amount: &ResourceSet, now: Instant) -> bool {
        match self.nodes.get_mut(node_id) {
            Some(node) => {
                node.reserve(amount, now);
                true
            }
            None => false,
        }
    }

    /// Gives back every reservation older than `ttl`.
    pub fn expire_reservations(&mut self, now: Instant, ttl: Duration) {
        for node in self.nodes.values_mut() {
            node.expire_reservations(now, ttl);
        }
    }

    /// Every node, in node id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &NodeResources)> {
        self.nodes.iter().map(|(id, node)| (id.as_str(), node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cpu: i64, memory: i64) -> ResourceSet {
        ResourceSet {
            cpu_millicores: cpu,
            memory_mb: memory,
            custom: BTreeMap::new(),
        }
    }

    fn delta(cpu: i64, memory: i64) -> ResourceDelta {
        ResourceDelta {
            cpu_millicores: cpu,
            memory_mb: memory,
            custom: Default::default(),
        }
    }

    #[test]
    fn deltas_add_to_allocatable_and_keep_capacity() {
        let mut view = ResourceView::new();
        view.set_node("a", set(4000, 8000), set(4000, 8000));
        assert!(view.apply_delta("a", &delta(-1000, -512)));
        assert!(view.apply_delta("a", &delta(250, 12)));
        let node = view.node("a").unwrap();
        assert_eq!(node.allocatable(), &set(3250, 7500));
        assert_eq!(node.capacity(), &set(4000, 8000));
        assert!(!view.apply_delta("unknown", &delta(1, 1)));
    }

    #[test]
    fn reservation_is_replaced_by_the_next_delta() {
        let mut view = ResourceView::new();
        view.set_node("a", set(4000, 8000), set(4000, 8000));
        let now = Instant::now();
        view.reserve("a", &set(1000, 1000), now);
        view.reserve("a", &set(1000, 1000), now);
        assert_eq!(view.node("a").unwrap().allocatable(), &set(2000, 6000));
        // The node took one of the two requests and reports it.
        view.apply_delta("a", &delta(-1000, -1000));
        let node = view.node("a").unwrap();
        assert_eq!(node.allocatable(), &set(3000, 7000));
        assert_eq!(node.reservation_count(), 0);
    }

    #[test]
    fn reservations_expire_after_their_ttl() {
        let mut view = ResourceView::new();
        view.set_node("a", set(4000, 8000), set(4000, 8000));
        let start = Instant::now();
        view.reserve("a", &set(1000, 0), start);
        view.reserve("a", &set(500, 0), start + Duration::from_secs(2));
        view.expire_reservations(start + Duration::from_secs(3), Duration::from_secs(2));
        assert_eq!(view.node("a").unwrap().allocatable(), &set(3500, 8000));
        view.expire_reservations(start + Duration::from_secs(10), Duration::from_secs(2));
        assert_eq!(view.node("a").unwrap().allocatable(), &set(4000, 8000));
    }

    #[test]
    fn custom_resources_fit_and_report_shortfalls() {
        let mut request = set(100, 100);
        request.custom.insert("gpu".into(), 2.0);
        let mut available = set(1000, 1000);
        assert_eq!(
            request.shortfalls(&available),
            vec!["gpu 0 of 2".to_string()]
        );
        available.custom.insert("gpu".into(), 2.0);
        assert!(request.fits_in(&available));
        let mut wire_delta = delta(0, 0);
        wire_delta.custom.insert("gpu".into(), -1.0);
        available.apply_delta(&wire_delta);
        assert!(!request.fits_in(&available));
    }

    #[test]
    fn negative_amounts_show_as_zero_on_the_wire() {
        let wire = set(-5, 10).to_proto();
        assert_eq!(wire.cpu_millicores, 0);
        assert_eq!(wire.memory_mb, 10);
        assert!(delta_is_empty(None));
        assert!(delta_is_empty(Some(&delta(0, 0))));
        assert!(!delta_is_empty(Some(&delta(0, -1))));
    }
}
