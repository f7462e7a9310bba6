//! One fenced write of an instance record: the transaction that holds only if the record is at
//! the version this writer last wrote and the node's live incarnation is the record's, what the
//! write did, fencing an instance whose record is not this node's any more, and resolving a
//! version conflict from the stored record.

use bytes::Bytes;
use prost::Message;
use yr_common::{Error, ErrorCode};
use yr_meta::{Compare, KeyValue, MetaError, MetaStore, TxnOp};
use yr_proto::v1 as pb;

use crate::fencing::{incarnation_key, incarnation_value};

use super::RecordWriter;

/// What one write did.
pub(super) enum Written {
    /// Written; the record's new version (0: deleted).
    Done(u64),
    /// The node's live incarnation in the store is not the record's: not registered (yet, or
    /// again after the master declared it lost).
    NotLive,
    /// The record changed since this writer's last write; it is now `current`.
    Conflict(Option<KeyValue>),
}

/// What to do about a version conflict.
pub(super) enum Resolution {
    /// This node's own earlier write, or the handing node's: write again over `version`.
    Adopt(u64),
    /// Someone else owns the record now (the master, or another incarnation of this node): fail
    /// the instance with this error.
    Fenced(Error),
    /// Another node runs the instance now (this node forwarded it): stop writing, quietly.
    Moved(String),
}

impl RecordWriter {
    /// Write `record` (`None`: delete it) if the stored record is still at `version` and the
    /// node's live incarnation is `incarnation`.
    pub(super) async fn write_once(
        &self,
        key: &str,
        record: Option<&pb::InstanceRecord>,
        version: u64,
        incarnation: u64,
    ) -> Result<Written, MetaError> {
        // Fault tests: the meta store does not answer this write (it is retried with backoff).
        fail::fail_point!("proxy::record_write", |_| Err(MetaError::Unavailable(
            "the meta store did not answer (a fail point)".to_string()
        )));
        let fence_key = incarnation_key(self.fencing.node_id());
        let live = incarnation_value(incarnation);
        let operation = match record {
            Some(record) => TxnOp::Put {
                key: key.to_string(),
                value: Bytes::from(record.encode_to_vec()),
                lease: None,
            },
            None => TxnOp::Delete {
                key: key.to_string(),
            },
        };
        let response = self
            .meta
            .txn(
                vec![
                    Compare::Version {
                        key: key.to_string(),
                        version,
                    },
                    Compare::ValueEquals {
                        key: fence_key.clone(),
                        value: live.clone(),
                    },
                ],
                vec![operation],
                vec![
                    TxnOp::Get {
                        key: key.to_string(),
                    },
                    TxnOp::Get { key: fence_key },
                ],
            )
            .await?;
        let mut results = response.results.into_iter();
        if response.succeeded {
            let written = results.next().flatten();
            return Ok(Written::Done(match record {
                Some(_) => written.map(|kv| kv.version).ok_or_else(|| {
                    MetaError::Unavailable(format!(
                        "the store answered a put of {key:?} without the written record"
                    ))
                })?,
                None => 0,
            }));
        }
        let current = results.next().flatten();
        let fence = results.next().flatten();
        if fence.is_none_or(|kv| kv.value != live) {
            return Ok(Written::NotLive);
        }
        Ok(Written::Conflict(current))
    }

    /// Stop writing `instance_id`'s record; with `error`, tell the node to fail the instance.
    pub(super) fn fence(&self, instance_id: &str, error: Option<Error>) {
        if let Some(writes) = self.pending.lock().get_mut(instance_id) {
            writes.fenced = true;
            writes.latest = None;
            writes.writing = false;
        }
        if let Some(error) = error {
            tracing::warn!(instance = %instance_id, %error, "instance fenced: its record is not this node's to write any more");
            self.fencing.instance_fenced(instance_id, error);
        }
    }
}

/// What to do about a version conflict on `instance_id`'s record, which is now `current`, for
/// incarnation `incarnation` of node `node_id` (handed the instance by `creator`, if any). The
/// master's records are never written over, except the SCHEDULING it wrote to re-create the
/// instance of a lost node on this node (`rescheduled_to`).
pub(super) fn resolve(
    current: Option<&KeyValue>,
    instance_id: &str,
    node_id: &str,
    incarnation: u64,
    creator: &str,
) -> Resolution {
    let Some(current) = current else {
        // Deleted meanwhile (nobody else deletes records): write it again.
        return Resolution::Adopt(0);
    };
    let Ok(stored) = pb::InstanceRecord::decode(current.value.clone()) else {
        return Resolution::Adopt(current.version);
    };
    if stored.written_by_master {
        if stored.rescheduled_to == node_id && stored.state == pb::InstanceState::Scheduling as i32
        {
            // The master re-creates the instance of a lost node here: this node takes the
            // record over (docs/design/023-node-loss-recovery.md).
            return Resolution::Adopt(current.version);
        }
        let reason = stored
            .error
            .map(|error| error.message)
            .unwrap_or_else(|| "the master marked it FATAL".to_string());
        return Resolution::Fenced(Error::new(
            ErrorCode::InstanceExited,
            format!("instance {instance_id} was fenced: {reason}"),
        ));
    }
    if stored.node_id == node_id {
        if stored.node_incarnation == incarnation {
            // This writer's own write, whose acknowledgement was lost.
            return Resolution::Adopt(current.version);
        }
        return Resolution::Fenced(Error::new(
            ErrorCode::InstanceExited,
            format!(
                "instance {instance_id} was fenced: its record was written by incarnation {} of node {node_id}, and this node is incarnation {incarnation}; create the instance again",
                stored.node_incarnation
            ),
        ));
    }
    if !creator.is_empty() && stored.node_id == creator {
        // The node that forwarded the instance here wrote it first.
        return Resolution::Adopt(current.version);
    }
    Resolution::Moved(stored.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(record: &pb::InstanceRecord) -> KeyValue {
        KeyValue {
            key: "/yr/instance/x".into(),
            value: Bytes::from(record.encode_to_vec()),
            version: 4,
            mod_revision: 10,
            lease: None,
        }
    }

    #[test]
    fn only_the_chosen_node_takes_over_the_masters_reschedule() {
        let mut record = pb::InstanceRecord {
            instance_id: "x".into(),
            node_id: "c".into(),
            written_by_master: true,
            rescheduled_to: "c".into(),
            ..Default::default()
        };
        record.set_state(pb::InstanceState::Scheduling);
        let kv = stored(&record);
        assert!(matches!(
            resolve(Some(&kv), "x", "c", 9, ""),
            Resolution::Adopt(4)
        ));
        assert!(matches!(
            resolve(Some(&kv), "x", "b", 9, ""),
            Resolution::Fenced(_)
        ));
        // The master's FATAL is never taken over, not even by the node it once chose.
        record.set_state(pb::InstanceState::Fatal);
        assert!(matches!(
            resolve(Some(&stored(&record)), "x", "c", 9, ""),
            Resolution::Fenced(_)
        ));
    }
}
