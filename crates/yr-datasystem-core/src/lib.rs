//! yr-datasystem-core: the data system as both of its users share it, without serving it. The
//! node's data worker (`yr-datasystem`) serves it to a cluster; the client core (`yr-runtime`)
//! runs the same stores in-process in local mode and checks its calls the same way in a
//! cluster, so both fail with the same codes. It owns:
//!
//! - [`kv`]: openYuanrong's `kv_*` semantics (write parameters, limits, validation) and the
//!   in-memory KV store with its per-job memory quota and write-back queue, over any
//!   second-level store ([`l2`]: the trait only);
//! - [`stream`]: the stream types (producer and subscription configurations, elements),
//!   validation, and the in-memory stream store;
//! - [`wire`]: their conversions to and from `yr.ds.v1` (errors convert in `yr_proto::error`).
//!
//! It owns no server: no gRPC service, no meta store, no file or network backend (the
//! directory and Redis second-level stores, shared memory, spilling and transfers between
//! nodes are `yr-datasystem`'s), and no client connection (that is `yr-runtime`'s).

pub mod kv;
pub mod l2;
pub mod stream;
pub mod wire;
