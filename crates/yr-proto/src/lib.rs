//! yr-proto: the one wire contract between yr's processes. `yr.v1` holds the bus (driver and
//! runtime ↔ node), the worker (caller ↔ runtime, direct routing) and the master services, and
//! the one `ErrorInfo` every package uses; `yr.meta.v1` the meta store service; `yr.ds.v1` the
//! data worker (KV, streams, and the shared-memory object store). It owns the generated code,
//! the one conversion between `yr_common::Error` and `ErrorInfo` ([`error`]), and the one rule
//! an instance record gives for its node's loss ([`record`]); nothing else.

pub mod error;
pub mod record;

pub use error::{error_from_proto, error_to_proto};

/// The generated modules, nested as their packages are, so that one package's messages can
/// name another's (`yr.ds.v1` uses `yr.v1.ErrorInfo`).
mod generated {
    pub mod yr {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("yr.v1");
        }

        pub mod meta {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("yr.meta.v1");
            }
        }

        pub mod ds {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("yr.ds.v1");
            }
        }
    }
}

/// Drivers, runtimes, nodes and the master; and `ErrorInfo`, for every package.
pub use generated::yr::v1;

/// The meta store service.
pub use generated::yr::meta::v1 as meta;

/// The data worker's services (KV, streams, the shared-memory object store) for the drivers
/// and runtimes of a node.
pub use generated::yr::ds::v1 as ds;
