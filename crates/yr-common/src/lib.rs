//! yr-common: what every yr component shares. It owns the error-code contract (generated from
//! `docs/error-codes.md`), ids, [`InvokeOptions`] with their validation, and [`Config`], and the
//! files processes on one machine agree on (the session file, socket paths, their private
//! directories), the reconnect backoff, the content key of an executable ([`binary_hash`]),
//! the [`Clock`] that timing logic reads, the [`Waiting`] counts of parked calls, and the `FAILPOINTS` set-up of fault tests. It owns
//! no behaviour beyond that: no threads, no network.

pub mod auth;
pub mod backoff;
pub mod binary;
pub use binary::binary_hash;
pub mod clock;
pub use clock::{Clock, ManualClock, SystemClock};
pub mod error;

pub use error::{CodeInfo, Error, ErrorCode, Lang, ModuleCode, Result, RetryPolicy};
pub mod ids;
pub use ids::ObjectId;
pub mod config;
pub mod options;
pub use config::Config;
pub use options::{
    Affinity, AffinityKind, AffinityScope, AffinityType, Device, FunctionGroupOptions,
    InvokeOptions, LabelOp, LabelOperator, PortForwarding, PortProtocol, ResourceGroupOptions,
    SchedulingAffinityType,
};
pub mod fail_points;
pub mod session;
pub mod sockets;
pub mod waiting;
pub use waiting::{Waiting, WaitingGuard};
