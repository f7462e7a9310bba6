//! yr-proto: the one wire contract between yr's processes. `yr.v1` holds the bus (driver and
//! runtime ↔ node), the worker (caller ↔ runtime, direct routing) and the master services;
//! `yr.meta.v1` the meta store service; `yr.ds.v1` the data worker (KV, and the shared-memory object store). Generated code only.

/// Drivers, runtimes, nodes and the master.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("yr.v1");
}

/// The meta store service.
pub mod meta {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("yr.meta.v1");
}

/// The data worker's service (KV) for the drivers and runtimes of a node.
pub mod ds {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("yr.ds.v1");
}
