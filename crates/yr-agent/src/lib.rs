//! yr-agent: the function agent and runtime manager of a node. It starts runtime processes (the
//! driver's own binary re-executed in runtime mode), keeps their output in log files, reaps them
//! and reports how each one ended: exit code, signal, or the kernel's OOM killer
//! ([`RuntimeManager`]; they start from a launcher thread whose descriptor table holds none of
//! the node's connections, so a start costs the same however many runtimes live); it keeps the
//! books on every runtime it started and the warm pool of idle ones ([`RuntimePool`]); and it
//! distributes code: the binaries and functions the node may run, fetched from other nodes by
//! content key ([`CodeCatalog`], [`fetch_binary`]), with the check of an executable a client
//! names for calls across languages ([`check_executable`]). It does not decide what runs where
//! (the proxy does) and does not talk to runtimes (they connect to the proxy's bus).
//!
//! Its failures are [`AgentError`]s; [`AgentError::code`] is where each gets its seed code
//! (3009 for the agent's own steps, 3012 for starting a runtime process); an executable it
//! refuses is an [`ExecutableRefused`] (1001 for a path that names none, 1014 for a file other
//! users could change).

mod code;
mod executable;
mod exit;
mod launcher;
mod manager;
mod pool;

pub use code::{fetch_binary, valid_binary_hash, CodeCatalog};
pub use executable::{check_executable, runtime_args, ExecutableRefused};
pub use exit::ExitCause;
pub use manager::{
    tail, AgentError, RuntimeEvent, RuntimeManager, RuntimeManagerOptions, RuntimeSpec,
};
pub use pool::{Ended, HeartbeatRound, Registration, RuntimePool, Spawner, Taken, Unregistered};
