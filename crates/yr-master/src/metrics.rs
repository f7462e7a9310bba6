//! Health and metrics over HTTP: `GET /healthz` and `GET /metrics` (Prometheus text
//! exposition), served by a deliberately tiny HTTP/1.1 responder on its own listener, so the
//! master needs no web framework.
//!
//! Metrics: nodes by state, schedule requests and failures by code, registrations, nodes lost,
//! instances by state, instances failed because their node was lost, and the alive nodes' total
//! capacity and allocatable.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use yr_common::ErrorCode;

use crate::cluster::Cluster;
use crate::instance_manager::ALL_STATES;
use crate::registry::NodeState;

/// The largest request head the responder reads.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    loop {
        let accepted = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    if let Err(err) = respond(stream, &cluster, public).await {
                        tracing::debug!(error = %err, "metrics request failed");
                    }
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it; the connection closes afterwards.
async fn respond(mut stream: TcpStream, cluster: &Cluster, public: bool) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    let read_head = async {
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= MAX_REQUEST_BYTES {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read_head).await {
        Ok(result) => result?,
        Err(_) => return Ok(()),
    }
    let request_line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|line| String::from_utf8_lossy(line).trim().to_string())
        .unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
        ("GET" | "HEAD", "/metrics") if !yr_transport::metrics_allowed(&head, public) => (
            "401 Unauthorized",
            "text/plain; charset=utf-8",
            "/metrics needs the cluster token: send Authorization: Bearer <token> (the token \
             file in the session directory), or start the master with --metrics-public\n"
                .to_string(),
        ),
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(cluster),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try /healthz or /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
