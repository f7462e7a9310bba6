//! The `yr` command. This file owns only the command line: it parses the arguments with clap,
//! dispatches to the module that owns the subcommand, and turns its result into an exit status.

mod cluster;
mod daemon;
mod errors;
mod limits;

use std::io;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// yr: command-line tool for yr, a serverless distributed compute engine.
#[derive(Debug, Parser)]
#[command(name = "yr", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands of `yr`.
#[derive(Debug, Subcommand)]
enum Command {
    /// List yr's error codes, or explain one: what it means, whether it is retried, what to do.
    Errors(errors::Args),
    /// Start a cluster (--master) or a node that joins one (--master-address), in the background.
    Start(cluster::StartArgs),
    /// Stop what `yr start` started on this machine; instances run their shutdown hooks.
    Stop(cluster::StopArgs),
    /// Show the cluster: nodes, instances by state, registered functions.
    Status(cluster::StatusArgs),
    /// Run the master in the foreground (what `yr start --master` runs).
    Master(daemon::MasterArgs),
    /// Run a node in the foreground (what `yr start` runs).
    Node(daemon::NodeArgs),
}

fn main() -> ExitCode {
    // Everything yr writes is its user's alone: session files, logs, the master's meta store,
    // the KV second-level files, and (inherited) the logs of the node's runtimes.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    // Fault tests give a master or node its fail points in `FAILPOINTS`
    // (docs/design/013-fail-points-and-clock.md).
    if let Err(message) = yr_common::fail_points::setup_from_env() {
        eprintln!("yr: {message}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Errors(args) => errors::run(&args),
        Command::Start(args) => cluster::start(&args),
        Command::Stop(args) => cluster::stop(&args),
        Command::Status(args) => cluster::status(&args),
        Command::Master(args) => daemon::run_master(&args).map(|()| ExitCode::SUCCESS),
        Command::Node(args) => daemon::run_node(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        // The reader went away (for example `yr errors | head`); there is no one left to tell.
        Err(err)
            if err
                .downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("yr: {err:#}");
            ExitCode::FAILURE
        }
    }
}
