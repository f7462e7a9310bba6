//! The rule an instance record gives for a node's loss, which the master (that re-creates the
//! instance elsewhere) and the node (that pauses it while fenced) both follow.

use yr_common::InvokeOptions;

use crate::v1::InstanceRecord;

/// Whether the instance of `record`, created with `options`, is re-created on another node
/// when node `lost` (where it runs) is lost: it is stateful, has restarts left of its
/// `recover_retry_times`, and its owner outlives the node (it is detached, or another node
/// created it). Whether it is being killed or ended is each caller's own check.
///
/// ```
/// use yr_common::InvokeOptions;
/// use yr_proto::v1::InstanceRecord;
///
/// let record = InstanceRecord { creator_node_id: "n1".into(), ..Default::default() };
/// let options = InvokeOptions { recover_retry_times: 1, ..Default::default() };
/// assert!(yr_proto::record::moves_when_node_lost(&record, &options, "n2"));
/// // Its creator's own node: the owner is lost with it.
/// assert!(!yr_proto::record::moves_when_node_lost(&record, &options, "n1"));
/// ```
pub fn moves_when_node_lost(record: &InstanceRecord, options: &InvokeOptions, lost: &str) -> bool {
    let owner_outlives = record.detached
        || options.is_detached()
        || (!record.creator_node_id.is_empty() && record.creator_node_id != lost);
    !record.stateless && record.restarts < options.recover_retry_times && owner_outlives
}
