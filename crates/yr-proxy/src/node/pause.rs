//! The self-fence's side on the node: while the node's lease with the master has run out
//! ([`crate::self_fence`]), the runtimes of the instances the master may re-create elsewhere
//! are paused (SIGSTOP), so that such an instance never serves in two places; when a newer
//! lease comes (the master accepted this node again as the same incarnation), they continue
//! (SIGCONT) with their state intact.
//!
//! An instance the master may re-create is what [`yr_proto::record::moves_when_node_lost`]
//! admits, the rule the master follows: stateful, with restarts left of its
//! `recover_retry_times`, whose owner outlives this node (it is detached, or another node
//! created it); and not being killed. Others are left
//! running: the master marks them FATAL and never runs them elsewhere, and stateless work is
//! not moved. A runtime taken for such an instance while the node is fenced is paused at once
//! (before its constructor runs). If the master declared the node lost, the paused runtimes
//! are killed with SIGKILL (which ends a stopped process) by the usual path
//! ([`Node::fence_local_instances`]); a kill of a paused instance sends SIGKILL at once, since
//! its shutdown hook cannot run while it is paused.
//!
//! The runtime pool owns which runtimes are paused (paused ones get no heartbeats and are not
//! hung); [`SelfFenced`] owns whether the node is fenced, and every pause and resume happens
//! under its lock, so a runtime taken while a fence ends is never left paused.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use yr_proto::v1::InstanceState as S;

use super::Node;
use crate::instance_table::Instance;
use crate::self_fence::Lease;

/// Whether the node is fenced, and how often it was.
#[derive(Default)]
pub(super) struct SelfFenced {
    fenced: Mutex<bool>,
    fences: AtomicU64,
    paused: AtomicU64,
}

impl Node {
    /// The node's lease with the master ran out: pause the runtimes of the instances the
    /// master may re-create elsewhere.
    pub fn self_fence(&self, expired: Lease) {
        let mut fenced = self.self_fence.fenced.lock();
        if *fenced {
            return;
        }
        *fenced = true;
        self.self_fence.fences.fetch_add(1, Ordering::Relaxed);
        let mut paused = Vec::new();
        for instance_id in self.instances.local_ids() {
            let runtime = self
                .instances
                .with(&instance_id, |instance| {
                    may_move(instance, &self.settings.node_id).then(|| instance.runtime_id.clone())
                })
                .flatten()
                .flatten();
            if let Some(runtime_id) = runtime {
                if self.runtimes.pause(&runtime_id) {
                    paused.push(instance_id);
                }
            }
        }
        self.self_fence
            .paused
            .fetch_add(paused.len() as u64, Ordering::Relaxed);
        tracing::warn!(
            since_last_accepted = ?expired.sent.elapsed(),
            node_timeout = ?expired.node_timeout,
            instances = ?paused,
            "no master accepted this node's beats for its lease: fenced, pausing the instances \
             the master may re-create elsewhere until a master accepts it again"
        );
    }

    /// A master accepted this node again as the same incarnation: resume what was paused.
    pub fn self_unfence(&self, lease: Lease) {
        let mut fenced = self.self_fence.fenced.lock();
        if !*fenced {
            return;
        }
        *fenced = false;
        let resumed = self.runtimes.resume_all();
        tracing::info!(
            runtimes = resumed.len(),
            lease_sent = ?lease.sent.elapsed(),
            "a master accepted this node again: unfenced, the paused runtimes continue"
        );
    }

    /// Runtime `runtime_id` was just taken for `instance_id`: pause it if the node is fenced
    /// and the master may re-create the instance elsewhere.
    pub(super) fn pause_if_fenced(&self, instance_id: &str, runtime_id: &str) {
        let fenced = self.self_fence.fenced.lock();
        if !*fenced {
            return;
        }
        let movable = self
            .instances
            .with(instance_id, |instance| {
                may_move(instance, &self.settings.node_id)
            })
            .unwrap_or(false);
        if movable && self.runtimes.pause(runtime_id) {
            self.self_fence.paused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(instance = %instance_id, runtime = %runtime_id,
                "fenced: pausing a runtime taken for an instance the master may re-create elsewhere");
        }
    }

    /// Whether the node is fenced now, for metrics.
    pub fn self_fenced(&self) -> bool {
        *self.self_fence.fenced.lock()
    }

    /// How often the node fenced itself, for metrics.
    pub fn self_fences(&self) -> u64 {
        self.self_fence.fences.load(Ordering::Relaxed)
    }

    /// Runtimes paused by self-fences, for metrics.
    pub fn runtimes_paused(&self) -> u64 {
        self.self_fence.paused.load(Ordering::Relaxed)
    }
}

/// Whether the master may re-create `instance` elsewhere if it declares node `node_id` (where
/// it runs) lost, by the master's rule ([`yr_proto::record::moves_when_node_lost`]), and
/// it runs here and is not being killed or ended.
fn may_move(instance: &Instance, node_id: &str) -> bool {
    instance.forwarded_to.is_none()
        && !instance.killing
        && !matches!(
            instance.state(),
            S::Exiting | S::Evicting | S::Fatal | S::Exited | S::Evicted | S::ScheduleFailed
        )
        && yr_proto::record::moves_when_node_lost(instance.record(), &instance.options, node_id)
}

#[cfg(test)]
mod tests {
    use yr_common::InvokeOptions;
    use yr_proto::v1 as pb;

    use super::*;
    use crate::instance_table::Subscriber;

    /// A stateful RUNNING instance on node `here`, created from `creator`, with
    /// `recover_retry_times` restarts of which `restarts` are spent.
    fn instance(creator: &str, recover_retry_times: u32, restarts: u32) -> Instance {
        Instance::new(
            pb::InstanceRecord {
                instance_id: "i".into(),
                creator_node_id: creator.into(),
                restarts,
                state: S::Running as i32,
                ..Default::default()
            },
            InvokeOptions {
                recover_retry_times,
                ..Default::default()
            },
            Subscriber::Client(1),
            String::new(),
        )
    }

    #[test]
    fn only_what_the_master_would_re_create_elsewhere_is_paused() {
        // Created from another node, a restart left: the master re-creates it.
        assert!(may_move(&instance("there", 1, 0), "here"));
        // No restart left, or none asked for: the master marks it FATAL, it keeps running.
        assert!(!may_move(&instance("there", 1, 1), "here"));
        assert!(!may_move(&instance("there", 0, 0), "here"));
        // Created here and not detached: its owner goes with the node, it is not re-created.
        assert!(!may_move(&instance("here", 1, 0), "here"));
        let mut detached = instance("here", 1, 0);
        detached
            .options
            .custom_extensions
            .insert("lifecycle".into(), "detached".into());
        assert!(may_move(&detached, "here"));
        // Being killed, forwarded to another node, or stateless: left alone.
        let mut killing = instance("there", 1, 0);
        killing.killing = true;
        assert!(!may_move(&killing, "here"));
        let mut forwarded = instance("there", 1, 0);
        forwarded.forward_to("other", "10.0.0.2:1");
        assert!(!may_move(&forwarded, "here"));
        let stateless = Instance::new(
            pb::InstanceRecord {
                creator_node_id: "there".into(),
                stateless: true,
                state: S::Running as i32,
                ..Default::default()
            },
            InvokeOptions {
                recover_retry_times: 1,
                ..Default::default()
            },
            Subscriber::Client(1),
            String::new(),
        );
        assert!(!may_move(&stateless, "here"));
    }
}
