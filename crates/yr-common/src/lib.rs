//! yr-common: what every yr component shares. It owns the error-code contract (generated from
//! `docs/error-codes.md`), ids, [`InvokeOptions`] with their validation, and [`Config`]. It owns
//! no behaviour: no I/O, no threads, no network.

pub mod error;

pub use error::{CodeInfo, Error, ErrorCode, Lang, ModuleCode, Result, RetryPolicy};
