//! yr-agent: the function agent and runtime manager of a node. It starts runtime processes (the
//! driver's own binary re-executed in runtime mode), keeps their output in log files, reaps them
//! and reports how each one ended: exit code, signal, or the kernel's OOM killer. It does not
//! decide what runs where (the proxy does) and does not talk to runtimes (they connect to the
//! proxy's bus).
//!
//! Its failures are [`AgentError`]s; [`AgentError::code`] is where each gets its seed code
//! (3009 for the agent's own steps, 3012 for starting a runtime process).

mod exit;
mod manager;

pub use exit::ExitCause;
pub use manager::{
    tail, AgentError, RuntimeEvent, RuntimeManager, RuntimeManagerOptions, RuntimeSpec,
};
