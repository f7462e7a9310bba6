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
//!
//! The view keeps its nodes in the order placement prefers them: most free CPU first, the
//! lowest node id first on a tie. Every change to a node's allocatable (registration, delta,
//! reservation, expiry, removal) moves the node in that order at once, so placement reads the
//! best nodes first without scoring the fleet. Reservations are also kept oldest first, so
//! expiring them costs the expired ones, not a walk over every node.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
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
    /// It agrees with [`ResourceSet::shortfalls`] being empty, without building the text.
    pub fn fits_in(&self, available: &ResourceSet) -> bool {
        self.cpu_millicores <= available.cpu_millicores
            && self.memory_mb <= available.memory_mb
            && self.custom.iter().all(|(name, amount)| {
                *amount <= EPSILON || *amount <= available.custom_amount(name) + EPSILON
            })
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

/// Every live node's resources, by node id, with the placement order and the reservations by
/// age.
#[derive(Debug, Default)]
pub struct ResourceView {
    nodes: BTreeMap<String, NodeResources>,
    /// Every node in `nodes` as (free CPU, id), most free CPU first, lowest id first on a tie.
    by_free_cpu: BTreeSet<(Reverse<i64>, String)>,
    /// (when, node) of every reservation made, oldest first. An entry whose reservation a delta
    /// already dropped stays until its time-to-live passes and then changes nothing.
    reserved_at: BTreeSet<(Instant, String)>,
}

impl ResourceView {
    /// An empty view.
    pub fn new() -> ResourceView {
        ResourceView::default()
    }

    /// Sets a node's figures from a registration, replacing whatever the view had.
    pub fn set_node(&mut self, node_id: &str, capacity: ResourceSet, allocatable: ResourceSet) {
        self.remove_node(node_id);
        self.by_free_cpu
            .insert((Reverse(allocatable.cpu_millicores), node_id.to_string()));
        self.nodes.insert(
            node_id.to_string(),
            NodeResources::new(capacity, allocatable),
        );
    }

    /// Forgets a node (it was lost).
    pub fn remove_node(&mut self, node_id: &str) -> Option<NodeResources> {
        let node = self.nodes.remove(node_id)?;
        self.by_free_cpu.remove(&(
            Reverse(node.allocatable.cpu_millicores),
            node_id.to_string(),
        ));
        Some(node)
    }

    /// A node's figures.
    pub fn node(&self, node_id: &str) -> Option<&NodeResources> {
        self.nodes.get(node_id)
    }

    /// Changes a node's figures with `change` and moves it in the placement order; false when
    /// the view does not know the node.
    fn update(&mut self, node_id: &str, change: impl FnOnce(&mut NodeResources)) -> bool {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return false;
        };
        let before = node.allocatable.cpu_millicores;
        change(node);
        let after = node.allocatable.cpu_millicores;
        if before != after {
            self.by_free_cpu
                .remove(&(Reverse(before), node_id.to_string()));
            self.by_free_cpu
                .insert((Reverse(after), node_id.to_string()));
        }
        true
    }

    /// Applies a node's delta; false when the view does not know the node.
    pub fn apply_delta(&mut self, node_id: &str, delta: &ResourceDelta) -> bool {
        self.update(node_id, |node| node.apply_delta(delta))
    }

    /// Tentatively takes `amount` from a node; false when the view does not know the node.
    pub fn reserve(&mut self, node_id: &str, amount: &ResourceSet, now: Instant) -> bool {
        let known = self.update(node_id, |node| node.reserve(amount, now));
        if known {
            self.reserved_at.insert((now, node_id.to_string()));
        }
        known
    }

    /// Gives back every reservation older than `ttl`. Costs the reservations that expire.
    pub fn expire_reservations(&mut self, now: Instant, ttl: Duration) {
        while let Some((at, _)) = self.reserved_at.first() {
            if now.saturating_duration_since(*at) < ttl {
                break;
            }
            let Some((_, node_id)) = self.reserved_at.pop_first() else {
                break;
            };
            self.update(&node_id, |node| node.expire_reservations(now, ttl));
        }
    }

    /// Every node, in node id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &NodeResources)> {
        self.nodes.iter().map(|(id, node)| (id.as_str(), node))
    }

    /// Every node in the order placement prefers: most free CPU first, the lowest node id
    /// first on a tie.
    pub fn by_free_cpu(&self) -> impl Iterator<Item = (&str, &NodeResources)> {
        self.by_free_cpu
            .iter()
            .filter_map(|(_, id)| self.nodes.get(id).map(|node| (id.as_str(), node)))
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

    /// The placement order is exactly the nodes sorted by most free CPU, then lowest id.
    fn assert_order_matches(view: &ResourceView) {
        let mut expected: Vec<(i64, String)> = view
            .iter()
            .map(|(id, node)| (node.allocatable().cpu_millicores, id.to_string()))
            .collect();
        expected.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let ordered: Vec<(i64, String)> = view
            .by_free_cpu()
            .map(|(id, node)| (node.allocatable().cpu_millicores, id.to_string()))
            .collect();
        assert_eq!(ordered, expected);
        assert_eq!(view.by_free_cpu.len(), view.nodes.len());
    }

    fn order(view: &ResourceView) -> Vec<&str> {
        view.by_free_cpu().map(|(id, _)| id).collect()
    }

    #[test]
    fn every_resource_change_moves_the_node_in_the_placement_order() {
        let mut view = ResourceView::new();
        let start = Instant::now();
        let ttl = Duration::from_secs(5);
        view.set_node("a", set(4000, 8000), set(4000, 8000));
        view.set_node("b", set(4000, 8000), set(3000, 8000));
        view.set_node("c", set(4000, 8000), set(4000, 8000));
        assert_eq!(order(&view), ["a", "c", "b"], "ties go to the lowest id");
        assert_order_matches(&view);
        // A reservation moves a down.
        view.reserve("a", &set(1500, 0), start);
        assert_eq!(order(&view), ["c", "b", "a"]);
        assert_order_matches(&view);
        // A delta replaces the reservation and moves it again.
        view.apply_delta("a", &delta(-500, 0));
        assert_eq!(order(&view), ["c", "a", "b"]);
        assert_order_matches(&view);
        // An expired reservation gives its CPU back.
        view.reserve("c", &set(3500, 0), start + Duration::from_secs(1));
        assert_eq!(order(&view), ["a", "b", "c"]);
        view.expire_reservations(start + Duration::from_secs(5), ttl);
        assert_eq!(order(&view), ["a", "b", "c"], "not yet expired");
        view.expire_reservations(start + Duration::from_secs(6), ttl);
        assert_eq!(order(&view), ["c", "a", "b"]);
        assert_order_matches(&view);
        // A registration replaces the node's place; removal takes it out.
        view.set_node("b", set(8000, 8000), set(8000, 8000));
        assert_eq!(order(&view), ["b", "c", "a"]);
        assert_order_matches(&view);
        assert!(view.remove_node("c").is_some());
        assert_eq!(order(&view), ["b", "a"]);
        assert_order_matches(&view);
        assert!(!view.reserve("c", &set(1, 1), start));
        assert_order_matches(&view);
    }

    #[test]
    fn expiry_costs_only_the_expired_and_ignores_reservations_a_delta_dropped() {
        let mut view = ResourceView::new();
        let start = Instant::now();
        let ttl = Duration::from_secs(2);
        view.set_node("a", set(4000, 8000), set(4000, 8000));
        view.set_node("b", set(4000, 8000), set(4000, 8000));
        view.reserve("a", &set(1000, 0), start);
        view.reserve("b", &set(1000, 0), start + Duration::from_secs(1));
        // a's node reports; its reservation is gone, its queue entry stays.
        view.apply_delta("a", &delta(-1000, 0));
        view.reserve("a", &set(500, 0), start + Duration::from_secs(1));
        view.expire_reservations(start + Duration::from_secs(2), ttl);
        assert_eq!(
            view.reserved_at.len(),
            2,
            "only the oldest entry is consumed"
        );
        assert_eq!(view.node("a").unwrap().allocatable(), &set(2500, 8000));
        assert_eq!(view.node("b").unwrap().allocatable(), &set(3000, 8000));
        view.expire_reservations(start + Duration::from_secs(3), ttl);
        assert!(view.reserved_at.is_empty());
        assert_eq!(view.node("a").unwrap().allocatable(), &set(3000, 8000));
        assert_eq!(view.node("b").unwrap().allocatable(), &set(4000, 8000));
        assert_order_matches(&view);
        // A removed node's entries are skipped.
        view.reserve("b", &set(1000, 0), start + Duration::from_secs(3));
        view.remove_node("b");
        view.expire_reservations(start + Duration::from_secs(10), ttl);
        assert!(view.reserved_at.is_empty());
        assert_order_matches(&view);
    }

    #[test]
    fn fits_in_agrees_with_shortfalls() {
        let mut request = set(100, 100);
        request.custom.insert("gpu".into(), 1.0);
        request.custom.insert("none".into(), 0.0);
        for (cpu, memory, gpu) in [
            (100, 100, 1.0),
            (99, 100, 1.0),
            (100, 99, 1.0),
            (100, 100, 0.5),
        ] {
            let mut available = set(cpu, memory);
            available.custom.insert("gpu".into(), gpu);
            assert_eq!(
                request.fits_in(&available),
                request.shortfalls(&available).is_empty(),
                "{available}"
            );
        }
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
