//! Health and metrics over HTTP: `GET /healthz` and `GET /metrics` (Prometheus text
//! exposition, built with `prometheus-client` through `yr_transport::metrics`), served on its
//! own listener by `yr_transport::http`.
//!
//! Metrics: nodes by state, schedule requests and failures by code, registrations, nodes lost,
//! instances by state, instances failed because their node was lost, and the alive nodes' total
//! capacity and allocatable; and whether this master leads (`yr_master_leader`, 1 or 0). A
//! standby reports only that.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use yr_common::ErrorCode;
use yr_transport::metrics::Metrics;

use crate::cluster::Cluster;
use crate::instance_manager::ALL_STATES;
use crate::leadership::Leadership;
use crate::registry::NodeState;

/// The Prometheus text exposition of the master's metrics: the cluster's while it leads, and
/// whether it leads.
pub fn render(cluster: Option<&Cluster>) -> String {
    let mut metrics = Metrics::default();
    metrics.gauge(
        "yr_master_leader",
        "Whether this master leads (1) or stands by (0).",
        i64::from(cluster.is_some()),
    );
    if let Some(cluster) = cluster {
        cluster_metrics(&mut metrics, cluster);
    }
    metrics.encode()
}

fn cluster_metrics(metrics: &mut Metrics, cluster: &Cluster) {
    let counters = cluster.counters();
    let node_counts = cluster.node_counts();
    let node_states: Vec<String> = NodeState::ALL.iter().map(ToString::to_string).collect();
    metrics.gauges(
        "yr_master_nodes",
        "Nodes known to the master, by state.",
        "state",
        node_states
            .iter()
            .map(String::as_str)
            .zip(node_counts.iter().map(|&count| count as i64)),
    );
    for (name, help, counter) in [
        (
            "yr_master_node_registrations",
            "Node registrations accepted.",
            &counters.registrations,
        ),
        (
            "yr_master_nodes_lost",
            "Nodes declared lost after missing their heartbeats.",
            &counters.nodes_lost,
        ),
        (
            "yr_master_instances_rescheduled",
            "Instances of lost nodes re-created on other nodes (recover_retry_times).",
            &counters.instances_rescheduled,
        ),
        (
            "yr_master_lost_incarnations_refused",
            "Registrations refused because the master had declared that incarnation lost.",
            &counters.lost_incarnations_refused,
        ),
        (
            "yr_master_incarnations_replaced",
            "Registrations of a new incarnation of a node whose previous one was still held \
             alive (the node restarted within its timeout): the previous one was settled as lost.",
            &counters.incarnations_replaced,
        ),
        (
            "yr_master_schedule_requests",
            "Schedule requests answered.",
            &counters.schedule_requests,
        ),
    ] {
        metrics.counter(name, help, counter.load(Ordering::Relaxed));
    }
    let failures = [
        (ErrorCode::ResourceNotEnough, &counters.schedule_not_enough),
        (
            ErrorCode::ResourceConfigError,
            &counters.schedule_config_error,
        ),
    ]
    .map(|(code, counter)| (code.number().to_string(), counter.load(Ordering::Relaxed)));
    metrics.counters(
        "yr_master_schedule_failures",
        "Schedule requests that found no node, by error code.",
        "code",
        failures.iter().map(|(code, count)| (code.as_str(), *count)),
    );
    let instance_counts = cluster.instances().count_by_state();
    metrics.gauges(
        "yr_master_instances",
        "Instances in the cluster-wide view, by state.",
        "state",
        ALL_STATES
            .iter()
            .map(|state| state.as_str_name())
            .zip(instance_counts.iter().map(|&count| count as i64)),
    );
    metrics.counter(
        "yr_master_instances_failed_node_lost",
        "Instances the master marked FATAL because their node was lost.",
        cluster.instances().marked_fatal_total(),
    );
    let (capacity, allocatable) = cluster.alive_totals();
    for (name, help, value) in [
        (
            "yr_cluster_cpu_capacity_millicores",
            "CPU capacity of the alive nodes, in millicores.",
            capacity.cpu_millicores,
        ),
        (
            "yr_cluster_cpu_allocatable_millicores",
            "CPU free on the alive nodes, in millicores.",
            allocatable.cpu_millicores,
        ),
        (
            "yr_cluster_memory_capacity_mb",
            "Memory capacity of the alive nodes, in MB.",
            capacity.memory_mb,
        ),
        (
            "yr_cluster_memory_allocatable_mb",
            "Memory free on the alive nodes, in MB.",
            allocatable.memory_mb,
        ),
    ] {
        metrics.gauge(name, help, value);
    }
}

/// Serves `/healthz` and `/metrics` on `listener` until `stop` turns true. `/metrics` needs the
/// cluster token unless `public`.
pub async fn serve(
    listener: TcpListener,
    leadership: Arc<Leadership>,
    mut stop: watch::Receiver<bool>,
    public: bool,
) {
    let render: yr_transport::http::Render =
        Arc::new(move || render(leadership.leader().ok().as_deref()));
    yr_transport::http::serve_metrics(listener, public, render, async move {
        crate::stopped(&mut stop).await
    })
    .await;
}
