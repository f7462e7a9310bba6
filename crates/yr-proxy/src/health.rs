//! The node's Prometheus metrics (built with `prometheus-client` through
//! `yr_transport::metrics`), served with `/healthz` by `yr_transport::http`.

use std::sync::Arc;

use tokio::net::TcpListener;

use yr_datasystem::DataWorker;
use yr_transport::metrics::Metrics;

use crate::fencing::Fencing;
use crate::node::Node;

/// A count as a gauge value.
fn count(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The metrics text of `node`, its fencing and its data worker.
pub fn metrics(node: &Node, fencing: &Fencing, data: &DataWorker) -> String {
    let mut metrics = Metrics::default();
    let resources = node.resources();
    for (name, help, value) in [
        (
            "yr_node_cpu_capacity_millicores",
            "CPU this node offers, in millicores.",
            count(resources.capacity.cpu),
        ),
        (
            "yr_node_cpu_allocatable_millicores",
            "CPU free on this node, in millicores.",
            count(resources.allocatable.cpu),
        ),
        (
            "yr_node_memory_allocatable_mb",
            "Memory free on this node, in MB.",
            count(resources.allocatable.memory),
        ),
        (
            "yr_node_runtimes",
            "Runtime processes running.",
            count(node.runtime_count()),
        ),
        (
            "yr_node_pending_creates",
            "Create requests waiting for resources.",
            count(node.pending_creates()),
        ),
        (
            "yr_node_self_fenced",
            "1 while this node is fenced (no master accepted its beats for its lease) and its \
             movable instances are paused, else 0.",
            i64::from(node.self_fenced()),
        ),
        (
            "yr_node_incarnation",
            "This node's incarnation (it grows each time the master declared it lost).",
            count(fencing.incarnation()),
        ),
    ] {
        metrics.gauge(name, help, value);
    }
    let (receives, sends) = data.streams().waiting();
    metrics.gauges(
        "yr_node_waiting_requests",
        "Calls the node parks until something happens, by kind.",
        "kind",
        [
            ("named_lookup", count(node.waiting_lookups())),
            ("kv_read", count(data.kv().waiting_reads())),
            ("stream_receive", count(receives)),
            ("stream_send", count(sends)),
        ],
    );
    metrics.gauges(
        "yr_node_instances",
        "Instances on this node, by state.",
        "state",
        node.instance_counts()
            .iter()
            .map(|(state, n)| (state.as_str(), count(*n))),
    );
    for (name, help, value) in [
        (
            "yr_node_creates",
            "Create requests this node took in.",
            node.creates(),
        ),
        (
            "yr_node_illegal_transitions",
            "Instance state changes refused as illegal (3010).",
            node.illegal_transitions(),
        ),
        (
            "yr_node_declared_lost",
            "Times the master declared this node lost.",
            fencing.times_declared_lost(),
        ),
        (
            "yr_node_self_fences",
            "Times this node fenced itself because no master accepted its beats for its lease.",
            node.self_fences(),
        ),
        (
            "yr_node_runtimes_paused",
            "Runtimes paused (SIGSTOP) while this node was fenced.",
            node.runtimes_paused(),
        ),
        (
            "yr_node_instances_fenced",
            "Instances failed with 1007 because the master declared their node lost.",
            fencing.instances_fenced(),
        ),
    ] {
        metrics.counter(name, help, value);
    }
    let shared = data.shared_memory();
    let stats = shared.stats();
    for (name, help, value) in [
        (
            "yr_shared_memory_capacity_bytes",
            "Shared memory the node's object store may use.",
            count(stats.capacity),
        ),
        (
            "yr_shared_memory_used_bytes",
            "Shared memory held by objects.",
            count(stats.used),
        ),
        (
            "yr_shared_memory_objects",
            "Objects in shared memory.",
            count(stats.objects),
        ),
        (
            "yr_shared_memory_resident_bytes",
            "Shared memory resident in RAM.",
            count(shared.resident_bytes()),
        ),
        (
            "yr_shared_memory_spilled_bytes",
            "Bytes of objects spilled to disk.",
            count(stats.spilled_bytes),
        ),
        (
            "yr_shared_memory_spilled_objects",
            "Objects spilled to disk.",
            count(stats.spilled_objects),
        ),
        (
            "yr_object_remote_holds",
            "Call results this node holds for owners on other nodes, not pulled yet.",
            count(shared.remote_holds() as u64),
        ),
    ] {
        metrics.gauge(name, help, value);
    }
    let kv = data.kv();
    metrics.gauge(
        "yr_kv_memory_bytes",
        "Bytes of KV keys and values held in memory.",
        count(kv.memory_bytes()),
    );
    metrics.gauge(
        "yr_kv_quota_bytes",
        "The most KV bytes one job may hold in memory (0: no quota).",
        count(kv.quota().unwrap_or(0)),
    );
    if let Some(failover) = data.stream_failover() {
        metrics.gauge(
            "yr_stream_replica_bytes",
            "Bytes of stream elements this node holds as the backup of other nodes' streams.",
            count(failover.replica_bytes()),
        );
        metrics.counter(
            "yr_stream_takeovers",
            "Streams this node took over from a lost home.",
            failover.takeovers(),
        );
    }
    let transfer = data.transfer();
    metrics.counter(
        "yr_object_pulled_bytes",
        "Bytes of objects this node pulled from other nodes.",
        transfer.pulled_bytes(),
    );
    metrics.counter(
        "yr_object_served_bytes",
        "Bytes of objects this node served to other nodes.",
        transfer.served_bytes(),
    );
    metrics.encode()
}

/// Serve `/healthz` and `/metrics` on `listener`. `/metrics` needs the cluster token unless
/// `public`.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    fencing: Arc<Fencing>,
    data: Arc<DataWorker>,
    public: bool,
) {
    let render: yr_transport::http::Render = Arc::new(move || metrics(&node, &fencing, &data));
    yr_transport::http::serve_metrics(listener, public, render, std::future::pending()).await;
}
