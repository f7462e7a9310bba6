//! The instance table: every instance this node runs or forwarded, its names, and the only
//! owner of each instance's state machine.
//!
//! A state changes only through [`InstanceTable::transition`], which checks openYuanrong's
//! table (an illegal transition is 3010: logged, counted and returned, never dropped) and hands
//! the record to the record writer. Children and the attached instances of a job are indexed,
//! so killing them does not walk every instance.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::Status;
use yr_common::{Error, InvokeOptions};
use yr_proto::error_to_proto;
use yr_proto::v1 as pb;
use yr_proto::v1::InstanceState as S;

use crate::error::ProxyError;
use crate::record_writer::RecordWriter;
use crate::resources::Amount;
use crate::state_machine;

/// Who hears about an instance's state.
#[derive(Clone)]
pub enum Subscriber {
    /// A bus client.
    Client(u64),
    /// A proxy on another node, through a Node.Create stream.
    Remote(mpsc::UnboundedSender<Result<pb::InstanceNotify, Status>>),
}

/// An instance on this node (or forwarded from it).
pub struct Instance {
    /// Its record; the state inside changes only through [`InstanceTable::transition`].
    record: pb::InstanceRecord,
    /// Its options, decoded.
    pub options: InvokeOptions,
    /// The runtime serving it.
    pub runtime_id: Option<String>,
    /// Who hears about its state.
    pub subscribers: Vec<Subscriber>,
    /// What it holds of this node's resources.
    pub allocated: Option<Amount>,
    /// CPU it lent back while blocked in `get`/`wait`.
    pub lent_cpu: u64,
    /// Woken when it has exited.
    pub exit_waiters: Vec<oneshot::Sender<()>>,
    /// Set once a kill started.
    pub killing: bool,
    /// Notified when a kill cancels its scheduling.
    pub cancel: Arc<Notify>,
    /// Set when another node runs the instance: that node's address.
    pub forwarded_to: Option<String>,
    /// The node that asked for this instance, if another node did.
    pub creator_address: String,
}

impl Instance {
    /// A NEW instance.
    pub fn new(
        record: pb::InstanceRecord,
        options: InvokeOptions,
        subscriber: Subscriber,
        creator_address: String,
    ) -> Instance {
        Instance {
            record,
            options,
            runtime_id: None,
            subscribers: vec![subscriber],
            allocated: None,
            lent_cpu: 0,
            exit_waiters: Vec::new(),
            killing: false,
            cancel: Arc::new(Notify::new()),
            forwarded_to: None,
            creator_address,
        }
    }

    /// Its record.
    pub fn record(&self) -> &pb::InstanceRecord {
        &self.record
    }

    /// Its state.
    pub fn state(&self) -> S {
        S::try_from(self.record.state).unwrap_or(S::New)
    }

    /// Where its runtime listens, and the runtime's pid (recorded with the next transition).
    pub fn set_runtime(&mut self, address: String, pid: u32) {
        self.record.runtime_address = address;
        if pid != 0 {
            self.record.runtime_pid = pid;
        }
    }

    /// Count a restart (`recover_retry_times`).
    pub fn count_restart(&mut self) {
        self.record.restarts += 1;
    }

    /// It was handed to node `node_id` at `address`; that node owns its record from now on.
    pub fn forward_to(&mut self, node_id: &str, address: &str) {
        self.forwarded_to = Some(address.to_string());
        self.record.node_id = node_id.to_string();
    }

    /// Mirror what the node running a forwarded instance reported. The record is that node's
    /// to write; this copy only answers lookups here.
    pub fn mirror(&mut self, notify: &pb::InstanceNotify) {
        if self.forwarded_to.is_some() {
            self.record.state = notify.state;
            self.record.runtime_address = notify.runtime_address.clone();
        }
    }
}

/// What [`InstanceTable::admit`] did with a create.
// One value per create, moved once: boxing the record would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Admitted {
    /// A new instance.
    New,
    /// The name is taken by a live instance; the subscriber was added to it.
    Existing {
        /// Its id.
        instance_id: String,
        /// Its class.
        class_name: String,
        /// Its record now.
        record: pb::InstanceRecord,
    },
}

#[derive(Default)]
struct Tables {
    instances: HashMap<String, Instance>,
    named: HashMap<(String, String), String>,
    /// Attached (not detached) instances by parent instance.
    children: HashMap<String, HashSet<String>>,
    /// Attached instances by job.
    jobs: HashMap<String, HashSet<String>>,
}

fn index_remove(index: &mut HashMap<String, HashSet<String>>, key: &str, id: &str) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

/// The instance table.
pub struct InstanceTable {
    tables: Mutex<Tables>,
    records: Arc<RecordWriter>,
    /// Notified when a named instance is added.
    named_added: Notify,
    illegal_transitions: AtomicU64,
}

impl InstanceTable {
    /// An empty table persisting through `records`.
    pub fn new(records: Arc<RecordWriter>) -> InstanceTable {
        InstanceTable {
            tables: Mutex::new(Tables::default()),
            records,
            named_added: Notify::new(),
            illegal_transitions: AtomicU64::new(0),
        }
    }

    /// Add `instance` unless its name is taken by a live instance (then its subscriber joins
    /// that one) or its id is (1004). `admission` runs last, under the table's lock, and may
    /// refuse it (the create rate limit).
    pub fn admit(
        &self,
        instance: Instance,
        admission: impl FnOnce() -> Result<(), Error>,
    ) -> Result<Admitted, Error> {
        let mut tables = self.tables.lock();
        let id = instance.record.instance_id.clone();
        let name = (!instance.record.name.is_empty()).then(|| {
            (
                instance.record.namespace.clone(),
                instance.record.name.clone(),
            )
        });
        if let Some(key) = &name {
            if let Some(existing) = tables.named.get(key).cloned() {
                if let Some(live) = tables.instances.get_mut(&existing) {
                    live.subscribers.extend(instance.subscribers);
                    return Ok(Admitted::Existing {
                        instance_id: existing,
                        class_name: live.record.class_name.clone(),
                        record: live.record.clone(),
                    });
                }
            }
        }
        if tables.instances.contains_key(&id) {
            return Err(ProxyError::DuplicateId(id).into());
        }
        admission()?;
        if let Some(key) = name {
            self.records.write_name(&key.0, &key.1, &id);
            tables.named.insert(key, id.clone());
            self.named_added.notify_waiters();
        }
        if !instance.record.detached {
            let record = &instance.record;
            if !record.parent_instance_id.is_empty() {
                let parent = record.parent_instance_id.clone();
                tables
                    .children
                    .entry(parent)
                    .or_default()
                    .insert(id.clone());
            }
            let job = record.job_id.clone();
            tables.jobs.entry(job).or_default().insert(id.clone());
        }
        tables.instances.insert(id, instance);
        Ok(Admitted::New)
    }

    /// Run `f` on instance `id`.
    pub fn with<R>(&self, id: &str, f: impl FnOnce(&Instance) -> R) -> Option<R> {
        self.tables.lock().instances.get(id).map(f)
    }

    /// Run `f` on instance `id`, which it may change (but not its state).
    pub fn with_mut<R>(&self, id: &str, f: impl FnOnce(&mut Instance) -> R) -> Option<R> {
        self.tables.lock().instances.get_mut(id).map(f)
    }

    /// Move `id` to `to` (with `error` as the record's error), and persist the record unless
    /// another node owns it. 1003 if the instance is not here; 3010 if the transition is
    /// illegal (logged and counted).
    pub fn transition(&self, id: &str, to: S, error: Option<&Error>) -> Result<(), Error> {
        let record = {
            let mut tables = self.tables.lock();
            let Some(instance) = tables.instances.get_mut(id) else {
                return Err(ProxyError::NotHere(id.to_string()).into());
            };
            if let Err(error) = state_machine::check(id, instance.state(), to) {
                drop(tables);
                self.illegal_transitions.fetch_add(1, Ordering::Relaxed);
                tracing::error!(instance = id, %error, "illegal instance state transition");
                return Err(error);
            }
            instance.record.state = to as i32;
            instance.record.error = error.map(error_to_proto);
            instance
                .forwarded_to
                .is_none()
                .then(|| instance.record.clone())
        };
        if let Some(record) = record {
            self.records.write(record);
        }
        Ok(())
    }

    /// Remove instance `id` (it exited, or the node running it is done with it), with its
    /// name and index entries. Its record is the caller's to delete.
    pub fn remove(&self, id: &str) -> Option<Instance> {
        let mut tables = self.tables.lock();
        let instance = tables.instances.remove(id)?;
        let record = &instance.record;
        if !record.name.is_empty() {
            let key = (record.namespace.clone(), record.name.clone());
            if tables.named.get(&key).map(String::as_str) == Some(id) {
                tables.named.remove(&key);
                self.records.delete_name(&key.0, &key.1);
            }
        }
        if !record.detached {
            index_remove(&mut tables.children, &record.parent_instance_id, id);
            index_remove(&mut tables.jobs, &record.job_id, id);
        }
        Some(instance)
    }

    /// Who hears about instance `id`.
    pub fn subscribers(&self, id: &str) -> Vec<Subscriber> {
        self.with(id, |i| i.subscribers.clone()).unwrap_or_default()
    }

    /// Attached instances whose parent is `parent`.
    pub fn children(&self, parent: &str) -> Vec<String> {
        let tables = self.tables.lock();
        tables
            .children
            .get(parent)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Attached instances of job `job_id`.
    pub fn attached_of_job(&self, job_id: &str) -> Vec<String> {
        let tables = self.tables.lock();
        tables
            .jobs
            .get(job_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The id of the instance named `name` in `namespace`, if it is here.
    pub fn named(&self, namespace: &str, name: &str) -> Option<String> {
        let key = (namespace.to_string(), name.to_string());
        self.tables.lock().named.get(&key).cloned()
    }

    /// Resolves the next time a named instance is added. Create it before looking, so that an
    /// addition in between is not missed.
    pub fn named_added(&self) -> tokio::sync::futures::Notified<'_> {
        self.named_added.notified()
    }

    /// Every named instance: (namespace, name, id).
    pub fn all_named(&self) -> Vec<(String, String, String)> {
        let tables = self.tables.lock();
        tables
            .named
            .iter()
            .map(|((namespace, name), id)| (namespace.clone(), name.clone(), id.clone()))
            .collect()
    }

    /// Every instance that runs here (not forwarded to another node).
    pub fn local_ids(&self) -> Vec<String> {
        let tables = self.tables.lock();
        tables
            .instances
            .iter()
            .filter(|(_, instance)| instance.forwarded_to.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Every instance id.
    pub fn ids(&self) -> Vec<String> {
        self.tables.lock().instances.keys().cloned().collect()
    }

    /// Instances by state name, sorted.
    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for instance in self.tables.lock().instances.values() {
            *counts.entry(instance.state().as_str_name()).or_default() += 1;
        }
        let mut counts: Vec<_> = counts
            .into_iter()
            .map(|(state, count)| (state.to_string(), count))
            .collect();
        counts.sort();
        counts
    }

    /// Illegal transitions refused since the node started.
    pub fn illegal_transitions(&self) -> u64 {
        self.illegal_transitions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yr_common::ErrorCode;

    fn table() -> InstanceTable {
        let meta: Arc<dyn yr_meta::MetaStore> = Arc::new(yr_meta::EmbeddedStore::in_memory());
        let fencing = crate::fencing::Fencing::new("node".into(), meta.clone());
        InstanceTable::new(RecordWriter::new(meta, fencing))
    }

    fn instance(id: &str, name: &str, parent: &str, detached: bool) -> Instance {
        Instance::new(
            pb::InstanceRecord {
                instance_id: id.into(),
                name: name.into(),
                namespace: "ns".into(),
                parent_instance_id: parent.into(),
                job_id: "job".into(),
                detached,
                ..Default::default()
            },
            InvokeOptions::default(),
            Subscriber::Client(1),
            String::new(),
        )
    }

    #[tokio::test]
    async fn illegal_transitions_are_3010_and_counted() {
        let table = table();
        table.admit(instance("a", "", "", false), || Ok(())).ok();
        let error = table.transition("a", S::Running, None).unwrap_err();
        assert_eq!(error.code(), ErrorCode::StateMachineError);
        assert_eq!(table.illegal_transitions(), 1);
        assert_eq!(table.with("a", Instance::state), Some(S::New));
        table.transition("a", S::Scheduling, None).unwrap();
        assert_eq!(table.with("a", Instance::state), Some(S::Scheduling));
        let missing = table.transition("b", S::Scheduling, None).unwrap_err();
        assert_eq!(missing.code(), ErrorCode::InstanceNotFound);
    }

    #[tokio::test]
    async fn a_taken_name_subscribes_to_the_live_instance_and_a_taken_id_is_1004() {
        let table = table();
        assert!(matches!(
            table.admit(instance("a", "svc", "", false), || Ok(())),
            Ok(Admitted::New)
        ));
        match table.admit(instance("b", "svc", "", false), || Ok(())) {
            Ok(Admitted::Existing { instance_id, .. }) => assert_eq!(instance_id, "a"),
            _ => panic!("expected the existing instance"),
        }
        assert_eq!(table.subscribers("a").len(), 2);
        let duplicate = table.admit(instance("a", "", "", false), || Ok(()));
        assert_eq!(
            duplicate.err().map(|e| e.code()),
            Some(ErrorCode::InstanceDuplicated)
        );
        let refused = table.admit(instance("c", "", "", false), || {
            Err(Error::new(ErrorCode::CreateRateLimited, "slow down"))
        });
        assert_eq!(
            refused.err().map(|e| e.code()),
            Some(ErrorCode::CreateRateLimited)
        );
        assert!(
            table.with("c", |_| ()).is_none(),
            "a refused create leaves nothing"
        );
    }

    #[tokio::test]
    async fn children_and_jobs_are_indexed_and_detached_instances_are_not() {
        let table = table();
        table.admit(instance("p", "", "", false), || Ok(())).ok();
        table.admit(instance("c1", "", "p", false), || Ok(())).ok();
        table.admit(instance("c2", "", "p", true), || Ok(())).ok();
        assert_eq!(table.children("p"), vec!["c1".to_string()]);
        let mut job = table.attached_of_job("job");
        job.sort();
        assert_eq!(job, vec!["c1".to_string(), "p".to_string()]);
        table.remove("c1");
        assert!(table.children("p").is_empty());
        assert_eq!(table.attached_of_job("job"), vec!["p".to_string()]);
    }

    #[tokio::test]
    async fn removing_an_instance_frees_its_name() {
        let table = table();
        table.admit(instance("a", "svc", "", false), || Ok(())).ok();
        assert_eq!(table.named("ns", "svc").as_deref(), Some("a"));
        table.remove("a");
        assert_eq!(table.named("ns", "svc"), None);
        assert!(matches!(
            table.admit(instance("b", "svc", "", false), || Ok(())),
            Ok(Admitted::New)
        ));
    }
}
