//! yr-meta: yr's meta store, where all durable control state lives (nodes, functions,
//! instances, routes, groups). It owns:
//!
//! - the [`MetaStore`] trait (get, range, put, delete, compare-and-swap transactions, prefix
//!   watches that resume after a revision, leases) and the [`put_if_version`] /
//!   [`create_if_absent`] helpers proxies use to persist instance-state transitions;
//! - [`EmbeddedStore`], the store the master embeds: in memory, or durable in a directory
//!   (write-ahead log with checksums, group-committed `fsync`, snapshots);
//! - [`EtcdStore`], the same store kept in etcd (`yr start --master --etcd host:port,...`):
//!   every key under a prefix, etcd's revisions, compare-and-swap as etcd transactions, etcd
//!   leases (see [`etcd`]);
//! - [`service`], the gRPC service that serves any store (`yr.meta.v1.MetaService`), and
//!   [`RemoteStore`], its client, which other processes use as their `MetaStore`.
//!
//! It does not own what the keys mean: each component owns its own key layout.
//!
//! Its failures are [`MetaError`]s; [`MetaError::code`] (in `error.rs`) gives each its seed code.

pub mod client;
pub mod embedded;
mod error;
pub mod etcd;
pub mod service;
pub mod store;
mod wal;
mod wire;

pub use client::RemoteStore;
pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use error::MetaError;
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use service::{serve, MetaService};
pub use store::{
    create_if_absent, delete_if_version, put_if_mod_revision, put_if_version, Compare, KeyValue,
    LeaseId, MetaStore, TxnOp, TxnResponse, WatchEvent,
};
pub use wal::crc32;
