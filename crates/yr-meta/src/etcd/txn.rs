//! The conversion of yr's transactions to etcd's: the checks of a branch, the compares, the
//! operations of a branch (each put followed by a read of its key) and the branch's results
//! from etcd's responses.

use std::collections::BTreeSet;

use etcd_client::{CompareOp, DeleteOptions, PutOptions, TxnOpResponse};

use super::{check_key, EtcdStore};
use crate::error::MetaError;
use crate::store::{Compare, KeyValue, LeaseId, TxnOp};

fn etcd_i64(value: u64, what: &str) -> Result<i64, MetaError> {
    i64::try_from(value)
        .map_err(|_| MetaError::InvalidArgument(format!("{what} {value} is beyond etcd's range")))
}

/// Checks a branch the way the embedded store does: keys are not empty, and no key is written
/// twice. Returns the leases its puts attach to.
pub(super) fn check_branch(ops: &[TxnOp], leases: &mut BTreeSet<LeaseId>) -> Result<(), MetaError> {
    let mut written = BTreeSet::new();
    for op in ops {
        match op {
            TxnOp::Get { key } => check_key(key)?,
            TxnOp::Put { key, lease, .. } => {
                check_key(key)?;
                leases.extend(lease);
                if !written.insert(key.as_str()) {
                    return Err(MetaError::InvalidArgument(format!(
                        "key {key:?} is written twice in one transaction branch"
                    )));
                }
            }
            TxnOp::Delete { key } => {
                check_key(key)?;
                if !written.insert(key.as_str()) {
                    return Err(MetaError::InvalidArgument(format!(
                        "key {key:?} is written twice in one transaction branch"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The etcd compares of a transaction's `compares`.
pub(super) fn etcd_compares(
    store: &EtcdStore,
    compares: &[Compare],
) -> Result<Vec<etcd_client::Compare>, MetaError> {
    let mut etcd_compares = Vec::with_capacity(compares.len());
    for compare in compares {
        etcd_compares.push(match compare {
            Compare::Version { key, version } => {
                check_key(key)?;
                etcd_client::Compare::version(
                    store.etcd_key(key),
                    CompareOp::Equal,
                    etcd_i64(*version, "version")?,
                )
            }
            Compare::ModRevision { key, mod_revision } => {
                check_key(key)?;
                etcd_client::Compare::mod_revision(
                    store.etcd_key(key),
                    CompareOp::Equal,
                    etcd_i64(*mod_revision, "mod revision")?,
                )
            }
            Compare::ValueEquals { key, value } => {
                check_key(key)?;
                etcd_client::Compare::value(store.etcd_key(key), CompareOp::Equal, value.to_vec())
            }
        });
    }
    Ok(etcd_compares)
}

/// The etcd operations of a branch: each put is followed by a read of its key, so the branch's
/// results carry the records as written.
pub(super) fn etcd_ops(store: &EtcdStore, ops: &[TxnOp]) -> Vec<etcd_client::TxnOp> {
    let mut out = Vec::with_capacity(ops.len() * 2);
    for op in ops {
        match op {
            TxnOp::Put { key, value, lease } => {
                let key = store.etcd_key(key);
                let options = lease.map(|lease| PutOptions::new().with_lease(lease));
                out.push(etcd_client::TxnOp::put(
                    key.clone(),
                    value.to_vec(),
                    options,
                ));
                out.push(etcd_client::TxnOp::get(key, None));
            }
            TxnOp::Delete { key } => out.push(etcd_client::TxnOp::delete(
                store.etcd_key(key),
                Some(DeleteOptions::new().with_prev_key()),
            )),
            TxnOp::Get { key } => out.push(etcd_client::TxnOp::get(store.etcd_key(key), None)),
        }
    }
    out
}

/// The results of a branch from etcd's responses (see [`etcd_ops`]).
pub(super) fn branch_results(
    store: &EtcdStore,
    ops: &[TxnOp],
    responses: Vec<TxnOpResponse>,
) -> Result<Vec<Option<KeyValue>>, MetaError> {
    let mut responses = responses.into_iter();
    let mut results = Vec::with_capacity(ops.len());
    let short = || {
        MetaError::Etcd(format!(
            "etcd {} answered a transaction with fewer results than operations",
            store.endpoints
        ))
    };
    for op in ops {
        let result = match op {
            TxnOp::Put { .. } => {
                responses.next().ok_or_else(short)?;
                match responses.next().ok_or_else(short)? {
                    TxnOpResponse::Get(get) => {
                        get.kvs().first().and_then(|kv| store.kv_from_etcd(kv))
                    }
                    _ => return Err(short()),
                }
            }
            TxnOp::Delete { .. } => match responses.next().ok_or_else(short)? {
                TxnOpResponse::Delete(delete) => delete
                    .prev_kvs()
                    .first()
                    .and_then(|kv| store.kv_from_etcd(kv)),
                _ => return Err(short()),
            },
            TxnOp::Get { .. } => match responses.next().ok_or_else(short)? {
                TxnOpResponse::Get(get) => get.kvs().first().and_then(|kv| store.kv_from_etcd(kv)),
                _ => return Err(short()),
            },
        };
        results.push(result);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_branch_that_writes_a_key_twice_is_refused() {
        let put = |key: &str| TxnOp::Put {
            key: key.into(),
            value: Bytes::new(),
            lease: Some(3),
        };
        let mut leases = BTreeSet::new();
        check_branch(&[put("a"), put("b")], &mut leases).unwrap();
        assert_eq!(leases.into_iter().collect::<Vec<_>>(), [3]);
        let err = check_branch(
            &[put("a"), TxnOp::Delete { key: "a".into() }],
            &mut BTreeSet::new(),
        )
        .unwrap_err();
        assert!(matches!(err, MetaError::InvalidArgument(_)));
    }
}
