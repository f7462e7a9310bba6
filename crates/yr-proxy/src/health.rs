//! The node's Prometheus metrics, served with `/healthz` by `yr_transport::http`.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::net::TcpListener;

use yr_datasystem::DataWorker;

use crate::fencing::Fencing;
use crate::node::Node;

/// The metrics text of `node`, its fencing and its data worker.
pub fn metrics(node: &Node, fencing: &Fencing, data: &DataWorker) -> String {
    let resources = node.resources();
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE yr_node_cpu_capacity_millicores gauge");
    let _ = writeln!(
        out,
        "yr_node_cpu_capacity_millicores {}",
        resources.capacity.cpu
    );
    let _ = writeln!(out, "# TYPE yr_node_cpu_allocatable_millicores gauge");
    let _ = writeln!(
        out,
        "yr_node_cpu_allocatable_millicores {}",
        resources.allocatable.cpu
    );
    let _ = writeln!(out, "# TYPE yr_node_memory_allocatable_mb gauge");
    let _ = writeln!(
        out,
        "yr_node_memory_allocatable_mb {}",
        resources.allocatable.memory
    );
    let _ = writeln!(out, "# TYPE yr_node_runtimes gauge");
    let _ = writeln!(out, "yr_node_runtimes {}", node.runtime_count());
    let _ = writeln!(out, "# TYPE yr_node_creates_total counter");
    let _ = writeln!(out, "yr_node_creates_total {}", node.creates());
    let _ = writeln!(out, "# TYPE yr_node_pending_creates gauge");
    let _ = writeln!(out, "yr_node_pending_creates {}", node.pending_creates());
    let _ = writeln!(out, "# TYPE yr_node_illegal_transitions_total counter");
    let _ = writeln!(
        out,
        "yr_node_illegal_transitions_total {}",
        node.illegal_transitions()
    );
    let _ = writeln!(out, "# TYPE yr_node_incarnation gauge");
    let _ = writeln!(out, "yr_node_incarnation {}", fencing.incarnation());
    for (name, value) in [
        ("yr_node_declared_lost_total", fencing.times_declared_lost()),
        ("yr_node_instances_fenced_total", fencing.instances_fenced()),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    let _ = writeln!(out, "# TYPE yr_node_instances gauge");
    for (state, count) in node.instance_counts() {
        let _ = writeln!(out, "yr_node_instances{{state=\"{state}\"}} {count}");
    }
    let shared = data.shared_memory();
    let stats = shared.stats();
    for (name, value) in [
        ("yr_shared_memory_capacity_bytes", stats.capacity),
        ("yr_shared_memory_used_bytes", stats.used),
        ("yr_shared_memory_objects", stats.objects as u64),
        ("yr_shared_memory_resident_bytes", shared.resident_bytes()),
        ("yr_shared_memory_spilled_bytes", stats.spilled_bytes),
        (
            "yr_shared_memory_spilled_objects",
            stats.spilled_objects as u64,
        ),
    ] {
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    }
    let kv = data.kv();
    for (name, value) in [
        ("yr_kv_memory_bytes", kv.memory_bytes()),
        ("yr_kv_quota_bytes", kv.quota().unwrap_or(0)),
    ] {
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    }
    let transfer = data.transfer();
    for (name, value) in [
        ("yr_object_pulled_bytes_total", transfer.pulled_bytes()),
        ("yr_object_served_bytes_total", transfer.served_bytes()),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    out
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
