//! Health and metrics over HTTP: `GET /healthz` and `GET /metrics` (Prometheus text
//! exposition), served on its own listener by `yr_transport::http`.
//!
//! Metrics: nodes by state, schedule requests and failures by code, registrations, nodes lost,
//! instances by state, instances failed because their node was lost, and the alive nodes' total
//! capacity and allocatable.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use yr_common::ErrorCode;

use crate::cluster::Cluster;
use crate::instance_manager::ALL_STATES;
use crate::registry::NodeState;

/// The Prometheus text exposition of the master's metrics.
pub fn render(cluster: &Cluster) -> String {
    let mut out = String::new();
    let counters = cluster.counters();

    gauge_header(
        &mut out,
        "yr_master_nodes",
        "Nodes known to the master, by state.",
    );
    let node_counts = cluster.node_counts();
    for (state, count) in NodeState::ALL.iter().zip(node_counts) {
        let _ = writeln!(out, "yr_master_nodes{{state=\"{state}\"}} {count}");
    }

    counter_header(
        &mut out,
        "yr_master_node_registrations_total",
        "Node registrations accepted.",
    );
    let _ = writeln!(
        out,
        "yr_master_node_registrations_total {}",
        counters.registrations.load(Ordering::Relaxed)
    );
    counter_header(
        &mut out,
        "yr_master_nodes_lost_total",
        "Nodes declared lost after missing their heartbeats.",
    );
    let _ = writeln!(
        out,
        "yr_master_nodes_lost_total {}",
        counters.nodes_lost.load(Ordering::Relaxed)
    );

    counter_header(
        &mut out,
        "yr_master_lost_incarnations_refused_total",
        "Registrations refused because the master had declared that incarnation lost.",
    );
    let _ = writeln!(
        out,
        "yr_master_lost_incarnations_refused_total {}",
        counters.lost_incarnations_refused.load(Ordering::Relaxed)
    );

    counter_header(
        &mut out,
        "yr_master_schedule_requests_total",
        "Schedule requests answered.",
    );
    let _ = writeln!(
        out,
        "yr_master_schedule_requests_total {}",
        counters.schedule_requests.load(Ordering::Relaxed)
    );
    counter_header(
        &mut out,
        "yr_master_schedule_failures_total",
        "Schedule requests that found no node, by error code.",
    );
    for (code, counter) in [
        (ErrorCode::ResourceNotEnough, &counters.schedule_not_enough),
        (
            ErrorCode::ResourceConfigError,
            &counters.schedule_config_error,
        ),
    ] {
        let _ = writeln!(
            out,
            "yr_master_schedule_failures_total{{code=\"{}\"}} {}",
            code.number(),
            counter.load(Ordering::Relaxed)
        );
    }

    gauge_header(
        &mut out,
        "yr_master_instances",
        "Instances in the cluster-wide view, by state.",
    );
    let instance_counts = cluster.instances().count_by_state();
    for (state, count) in ALL_STATES.iter().zip(instance_counts) {
        let _ = writeln!(
            out,
            "yr_master_instances{{state=\"{}\"}} {count}",
            state.as_str_name()
        );
    }
    counter_header(
        &mut out,
        "yr_master_instances_failed_node_lost_total",
        "Instances the master marked FATAL because their node was lost.",
    );
    let _ = writeln!(
        out,
        "yr_master_instances_failed_node_lost_total {}",
        cluster.instances().marked_fatal_total()
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
        gauge_header(&mut out, name, help);
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

fn gauge_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

fn counter_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
}

/// Serves `/healthz` and `/metrics` on `listener` until `stop` turns true. `/metrics` needs the
/// cluster token unless `public`.
pub async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    mut stop: watch::Receiver<bool>,
    public: bool,
) {
    let render: yr_transport::http::Render = Arc::new(move || render(&cluster));
    yr_transport::http::serve_metrics(listener, public, render, async move {
        crate::stopped(&mut stop).await
    })
    .await;
}
