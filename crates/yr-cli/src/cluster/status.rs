//! `yr status`: ask the leading master for the cluster's status and show it as tables or JSON.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use yr_common::auth::ClusterToken;
use yr_proto::v1 as pb;

use super::read_session;

/// Flags of `yr status`.
#[derive(Debug, ClapArgs)]
pub struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// The master to ask (default: the latest session's); several, comma-separated, for a
    /// cluster with standby masters: a standby's answer is followed to the leader.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub master_address: Option<String>,
}

/// `yr status`.
pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let (address, session_dir) = match &args.master_address {
        Some(address) => (address.clone(), None),
        None => {
            let (_, session) = read_session(None)?;
            if session.master_address.is_empty() {
                bail!("this machine runs a node only; pass --master-address");
            }
            (session.master_address, Some(session.session_dir))
        }
    };
    let token = ClusterToken::resolve(None, session_dir.as_deref())?.context(
        "no cluster token to show the status with: set YR_TOKEN to the token in the cluster's \
         session directory (the `token` file)",
    )?;
    let mut credentials = (*yr_transport::current()).clone();
    credentials.token = Some(token);
    yr_transport::install(credentials);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addresses: Vec<String> = address
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    let status = runtime.block_on(leader_status(&addresses))?;
    // Written through a handle whose errors end the command: a reader that went away
    // (`yr status | head`) ends it quietly (see main).
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&status_json(&status))?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if !status.meta_store.is_empty() {
        writeln!(out, "Meta store: {}", status.meta_store)?;
    }
    if !status.leader.is_empty() {
        writeln!(out, "Masters")?;
        writeln!(out, "  {:<22} leader", status.leader)?;
        for master in status.masters.iter().filter(|m| **m != status.leader) {
            writeln!(out, "  {master:<22} standby")?;
        }
    }
    writeln!(out, "Nodes")?;
    writeln!(
        out,
        "  {:<20} {:<22} {:<10} {:>18} {:>18}",
        "ID", "ADDRESS", "STATE", "CAPACITY cpu/mem", "ALLOCATABLE cpu/mem"
    )?;
    for node in &status.nodes {
        let cap = node.capacity.clone().unwrap_or_default();
        let free = node.allocatable.clone().unwrap_or_default();
        writeln!(
            out,
            "  {:<20} {:<22} {:<10} {:>18} {:>18}",
            node.node_id,
            node.address,
            node.state,
            format!("{}m/{}MB", cap.cpu_millicores, cap.memory_mb),
            format!("{}m/{}MB", free.cpu_millicores, free.memory_mb)
        )?;
    }
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    for instance in &status.instances {
        let state = pb::InstanceState::try_from(instance.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNKNOWN");
        *by_state.entry(state.to_string()).or_default() += 1;
    }
    writeln!(out, "Instances by state")?;
    if by_state.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for (state, count) in by_state {
        writeln!(out, "  {state:<16} {count}")?;
    }
    let mut by_class = std::collections::BTreeMap::<&str, usize>::new();
    for instance in &status.instances {
        if !instance.class_name.is_empty() {
            *by_class.entry(instance.class_name.as_str()).or_default() += 1;
        }
    }
    if !by_class.is_empty() {
        writeln!(out, "Instances by class")?;
        for (class, count) in by_class {
            writeln!(out, "  {class:<40} {count}")?;
        }
    }
    writeln!(out, "Registered functions")?;
    if status.functions.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for function in &status.functions {
        writeln!(out, "  {function}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The status from the leading master: asks `addresses` in turn, following a standby's answer
/// to the leader it names (and waiting a moment while an election is under way).
async fn leader_status(addresses: &[String]) -> anyhow::Result<pb::ClusterStatusResponse> {
    const ELECTION_WAIT: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + ELECTION_WAIT;
    let mut queue: std::collections::VecDeque<String> = addresses.iter().cloned().collect();
    let mut last_error = anyhow::anyhow!("no master address to ask");
    let mut followed = 0;
    while let Some(address) = queue.pop_front() {
        let answer = async {
            let channel =
                yr_transport::connect(&address, yr_common::ErrorCode::InnerCommunication).await?;
            Ok::<_, yr_common::Error>(
                pb::master_client::MasterClient::new(channel)
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await,
            )
        }
        .await;
        let status = match answer {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            Ok(Err(status)) => status,
            Err(error) => {
                last_error = anyhow::anyhow!("{error}");
                continue;
            }
        };
        if yr_transport::refused(&address) {
            bail!("{}", yr_transport::token_refused(&address));
        }
        let code = yr_transport::status_to_code(&status, yr_common::ErrorCode::InnerCommunication);
        last_error = anyhow::anyhow!(
            "{}",
            yr_common::Error::new(
                code,
                format!(
                    "the master at {address} failed the status call: {}",
                    status.message()
                )
            )
        );
        match yr_transport::leader_redirect(&status) {
            Some(Some(leader)) if followed < 4 => {
                followed += 1;
                queue.push_front(leader);
            }
            Some(_) if Instant::now() < deadline => {
                // No master leads yet: ask this one again shortly.
                tokio::time::sleep(Duration::from_millis(250)).await;
                queue.push_back(address);
            }
            _ => {}
        }
    }
    Err(last_error)
}

fn status_json(status: &pb::ClusterStatusResponse) -> serde_json::Value {
    let resources = |r: &Option<pb::Resources>| {
        let r = r.clone().unwrap_or_default();
        serde_json::json!({"cpu_millicores": r.cpu_millicores, "memory_mb": r.memory_mb, "custom": r.custom})
    };
    serde_json::json!({
        "nodes": status.nodes.iter().map(|n| serde_json::json!({
            "id": n.node_id, "address": n.address, "state": n.state,
            "incarnation": n.incarnation,
            "capacity": resources(&n.capacity), "allocatable": resources(&n.allocatable),
            "labels": n.labels,
        })).collect::<Vec<_>>(),
        "instances": status.instances.iter().map(|i| serde_json::json!({
            "id": i.instance_id, "function": i.function, "class": i.class_name,
            "node": i.node_id, "job": i.job_id,
            "state": pb::InstanceState::try_from(i.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        })).collect::<Vec<_>>(),
        "functions": status.functions,
        "meta_store": status.meta_store,
        "leader": status.leader,
        "standbys": status.masters.iter().filter(|m| **m != status.leader).collect::<Vec<_>>(),
    })
}
