//! yr-runtime: the client core shared by drivers, runtimes and every SDK (openYuanrong calls it
//! libruntime). It owns the process's runtime lifecycle, the in-process object store and object
//! handles, the counting of references lent to other processes ([`borrows`]), encoding,
//! dependency resolution, retries, the children of running calls that a recursive cancel
//! reaches ([`children`]), the async runtime that drives `async fn` user code
//! ([`async_calls`]), the registry of user code, and the
//! [`Backend`](backend::Backend) seam with its local-mode implementation, the client side of
//! KV ([`kv`]), and calls to code in other executables and languages ([`cross_language`]). It
//! does not own the typed user API (crate `yr`) or any server-side component.
//!
//! Its own failures, and the misuses of its API it detects (finalize inside a runtime, a kill
//! of an unknown id, an entry point registered twice), are [`error::RuntimeError`]s;
//! [`error::RuntimeError::code`] is where each gets its seed code. A failed gRPC call's code
//! comes from `yr_transport::status_to_code`.

pub mod async_calls;
pub mod backend;
pub mod blocking;
pub mod borrows;
pub mod children;
pub mod cluster;
pub mod codec;
pub mod cross_language;
pub mod deadline;
pub mod dependencies;
pub mod error;
pub mod function;
pub(crate) mod handshake;
pub mod kv;
mod local;
pub mod object_store;
pub mod remote_value;
pub mod retry;
pub mod runtime;
pub mod shape;
pub mod shared_memory;
pub(crate) mod spin;
pub mod stream;
pub mod user_code;

pub use inventory;
pub use runtime::{current, finalize, init, is_initialized, ClientInfo, Runtime};
