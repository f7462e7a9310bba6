//! yr-runtime: the client core shared by drivers, runtimes and every SDK (openYuanrong calls it
//! libruntime). It owns the process's runtime lifecycle, the in-process object store and object
//! handles, the counting of references lent to other processes ([`borrows`]), encoding,
//! dependency resolution, retries, the registry of user code, and the
//! [`Backend`](backend::Backend) seam with its local-mode implementation, and the client side of
//! KV ([`kv`]). It does not own the typed user API (crate `yr`) or any server-side component.
//!
//! Its own failures, and the misuses of its API it detects (finalize inside a runtime, a kill
//! of an unknown id, an entry point registered twice), are [`error::RuntimeError`]s;
//! [`error::RuntimeError::code`] is where each gets its seed code. A failed gRPC call's code
//! comes from `yr_transport::status_to_code`.

pub mod backend;
pub mod blocking;
pub mod borrows;
pub mod cluster;
pub mod codec;
pub mod deadline;
pub mod dependencies;
pub mod error;
pub mod function;
pub(crate) mod handshake;
pub mod kv;
mod local;
pub mod object_store;
pub mod retry;
pub mod runtime;
pub mod shape;
pub mod shared_memory;
pub(crate) mod spin;
pub mod stream;
pub mod user_code;

pub use inventory;
pub use runtime::{current, finalize, init, is_initialized, ClientInfo, Runtime};
