//! The client bus: the registry of drivers and runtimes connected to the node's Bus service,
//! and delivery of messages to them.
//!
//! It is the only owner of the registry. Lookups by session, by process and by job are indexed,
//! so nothing here walks every client.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::Status;
use yr_common::auth::PeerCredentials;
use yr_proto::v1 as pb;

/// Messages a bus session may have waiting for its client. A client that falls this far behind
/// has its session ended (it sees the stream close, 3006) rather than the node buffering
/// without bound.
pub const BUS_QUEUE: usize = 65_536;

/// The sending side of a bus session, and the signal that ends the session.
pub struct Outbound {
    /// Messages for the client.
    pub sender: mpsc::Sender<Result<pb::BusResponse, Status>>,
    /// Notified when the client fell [`BUS_QUEUE`] messages behind.
    pub overflowed: Arc<tokio::sync::Notify>,
}

impl Outbound {
    /// Queue `response`; false if the session is gone. A full queue ends the session.
    fn push(&self, response: pb::BusResponse) -> bool {
        match self.sender.try_send(Ok(response)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::error!(
                    "a bus client fell {BUS_QUEUE} messages behind; ending its session"
                );
                self.overflowed.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// What a registered client said it is (after the node checked it).
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// Driver or runtime.
    pub kind: pb::ClientKind,
    /// Its job.
    pub job_id: String,
    /// For a runtime, its id.
    pub runtime_id: String,
    /// Where it listens, if on a Unix socket; removed when it leaves.
    pub socket: Option<PathBuf>,
}

/// A driver or runtime connected to the bus.
struct Client {
    /// Set once it registered.
    identity: Option<Identity>,
    sender: Outbound,
    /// The client's process id, from the connection's peer credentials (0 over TCP: a
    /// process on another machine holds nothing in this node's shared memory).
    pid: u32,
    /// The client's user id, from the same credentials (`None` over TCP).
    uid: Option<u32>,
}

/// A bus session that ended, and what it leaves behind.
#[derive(Debug, PartialEq)]
pub struct Departure {
    /// Its process id (0 over TCP).
    pub pid: u32,
    /// Whether it was the process's last session (its objects go now).
    pub last_of_process: bool,
    /// The job it was the last driver of (its attached instances go now).
    pub orphaned_job: Option<String>,
    /// Its socket file, to remove.
    pub socket: Option<PathBuf>,
}

#[derive(Default)]
struct Registry {
    clients: HashMap<u64, Client>,
    /// Sessions of each process.
    by_pid: HashMap<u32, Vec<u64>>,
    /// Registered drivers of each job.
    drivers: HashMap<String, usize>,
    /// Sessions that created stateless instances here: they hear of the scheduler's pressure.
    stateless_owners: HashSet<u64>,
}

/// The registry of bus clients.
#[derive(Default)]
pub struct ClientBus {
    registry: Mutex<Registry>,
    next_id: AtomicU64,
}

impl ClientBus {
    /// An empty bus.
    pub fn new() -> ClientBus {
        ClientBus {
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
        }
    }

    /// A new session from `peer` (its Unix peer credentials; `None` over TCP); returns its id.
    pub fn connect(&self, sender: Outbound, peer: Option<PeerCredentials>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pid = peer.map(|p| p.pid).unwrap_or(0);
        let mut registry = self.registry.lock();
        registry.clients.insert(
            id,
            Client {
                identity: None,
                sender,
                pid,
                uid: peer.map(|p| p.uid),
            },
        );
        if pid != 0 {
            registry.by_pid.entry(pid).or_default().push(id);
        }
        id
    }

    /// The process id of session `client_id` (0 over TCP or if it left).
    pub fn pid(&self, client_id: u64) -> u32 {
        self.registry
            .lock()
            .clients
            .get(&client_id)
            .map(|c| c.pid)
            .unwrap_or(0)
    }

    /// The user id of session `client_id`'s process (`None` over TCP or if it left).
    pub fn uid(&self, client_id: u64) -> Option<u32> {
        self.registry.lock().clients.get(&client_id)?.uid
    }

    /// What session `client_id` registered as (`None` before it registered).
    pub fn identity(&self, client_id: u64) -> Option<Identity> {
        self.registry
            .lock()
            .clients
            .get(&client_id)?
            .identity
            .clone()
    }

    /// The runtime id session `client_id` registered with, if it is a runtime.
    pub fn runtime_id(&self, client_id: u64) -> Option<String> {
        let registry = self.registry.lock();
        let identity = registry.clients.get(&client_id)?.identity.as_ref()?;
        (identity.kind == pb::ClientKind::Runtime).then(|| identity.runtime_id.clone())
    }

    /// Session `client_id` registered as `identity`.
    pub fn identify(&self, client_id: u64, identity: Identity) {
        let mut registry = self.registry.lock();
        let Some(client) = registry.clients.get_mut(&client_id) else {
            return;
        };
        let before = client.identity.replace(identity.clone());
        if let Some(before) = before.filter(|b| b.kind == pb::ClientKind::Driver) {
            forget_driver(&mut registry.drivers, &before.job_id);
        }
        if identity.kind == pb::ClientKind::Driver {
            *registry.drivers.entry(identity.job_id).or_default() += 1;
        }
    }

    /// Send `body` on session `client_id`, answering `message_id` (0: a push). False if the
    /// session is gone or fell too far behind.
    pub fn send(&self, client_id: u64, message_id: u64, body: pb::bus_response::Body) -> bool {
        let registry = self.registry.lock();
        let Some(client) = registry.clients.get(&client_id) else {
            return false;
        };
        client.sender.push(pb::BusResponse {
            message_id,
            body: Some(body),
        })
    }

    /// Push `body` on a session of process `pid`. False if no connected process has that id.
    pub fn push_to_process(&self, pid: u32, body: pb::bus_response::Body) -> bool {
        if pid == 0 {
            return false;
        }
        let registry = self.registry.lock();
        let Some(client) = registry
            .by_pid
            .get(&pid)
            .and_then(|ids| ids.first())
            .and_then(|id| registry.clients.get(id))
        else {
            return false;
        };
        client.sender.push(pb::BusResponse {
            message_id: 0,
            body: Some(body),
        })
    }

    /// Session `client_id` created a stateless instance. True if it had not before.
    pub fn add_stateless_owner(&self, client_id: u64) -> bool {
        let mut registry = self.registry.lock();
        registry.clients.contains_key(&client_id) && registry.stateless_owners.insert(client_id)
    }

    /// Tell every session that created stateless instances here whether creates of other
    /// sessions wait for resources (`waiting_owners`: the sessions whose creates wait).
    pub fn push_pressure(&self, waiting_owners: &[u64]) {
        let registry = self.registry.lock();
        for id in &registry.stateless_owners {
            if let Some(client) = registry.clients.get(id) {
                client.sender.push(pressure_for(*id, waiting_owners));
            }
        }
    }

    /// Tell session `client_id` whether creates of other sessions wait for resources.
    pub fn push_pressure_to(&self, client_id: u64, waiting_owners: &[u64]) {
        let registry = self.registry.lock();
        if let Some(client) = registry.clients.get(&client_id) {
            client.sender.push(pressure_for(client_id, waiting_owners));
        }
    }

    /// Session `client_id` ended.
    pub fn disconnect(&self, client_id: u64) -> Option<Departure> {
        let mut registry = self.registry.lock();
        registry.stateless_owners.remove(&client_id);
        let client = registry.clients.remove(&client_id)?;
        let mut last_of_process = false;
        if client.pid != 0 {
            if let Some(ids) = registry.by_pid.get_mut(&client.pid) {
                ids.retain(|id| *id != client_id);
                if ids.is_empty() {
                    registry.by_pid.remove(&client.pid);
                    last_of_process = true;
                }
            }
        }
        let identity = client.identity.unwrap_or_default();
        // A session that never registered owns no job.
        let driver = identity.kind == pb::ClientKind::Driver && !identity.job_id.is_empty();
        let orphaned_job = (driver && forget_driver(&mut registry.drivers, &identity.job_id))
            .then(|| identity.job_id.clone());
        Some(Departure {
            pid: client.pid,
            last_of_process,
            orphaned_job,
            socket: identity.socket,
        })
    }
}

/// The pressure push for session `id`: creates wait if any of `waiting_owners` is another
/// session's.
fn pressure_for(id: u64, waiting_owners: &[u64]) -> pb::BusResponse {
    pb::BusResponse {
        message_id: 0,
        body: Some(pb::bus_response::Body::Pressure(pb::ResourcePressure {
            creates_waiting: waiting_owners.iter().any(|owner| *owner != id),
        })),
    }
}

/// One driver of `job_id` left; true if it was the last.
fn forget_driver(drivers: &mut HashMap<String, usize>, job_id: &str) -> bool {
    let Some(count) = drivers.get_mut(job_id) else {
        return false;
    };
    *count -= 1;
    if *count == 0 {
        drivers.remove(job_id);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(
        bus: &ClientBus,
        pid: u32,
    ) -> (u64, mpsc::Receiver<Result<pb::BusResponse, Status>>) {
        let (sender, receiver) = mpsc::channel(4);
        let outbound = Outbound {
            sender,
            overflowed: Arc::new(tokio::sync::Notify::new()),
        };
        let peer = (pid != 0).then_some(PeerCredentials {
            pid,
            uid: 0,
            gid: 0,
        });
        (bus.connect(outbound, peer), receiver)
    }

    fn driver(job: &str) -> Identity {
        Identity {
            kind: pb::ClientKind::Driver,
            job_id: job.into(),
            ..Identity::default()
        }
    }

    #[test]
    fn a_process_is_gone_with_its_last_session() {
        let bus = ClientBus::new();
        let (a, _ra) = session(&bus, 42);
        let (b, _rb) = session(&bus, 42);
        assert!(!bus.disconnect(a).unwrap().last_of_process);
        assert!(bus.disconnect(b).unwrap().last_of_process);
        assert!(bus.disconnect(b).is_none());
    }

    #[test]
    fn a_job_is_orphaned_when_its_last_registered_driver_leaves() {
        let bus = ClientBus::new();
        let (a, _ra) = session(&bus, 1);
        let (b, _rb) = session(&bus, 2);
        let (never_registered, _rc) = session(&bus, 3);
        bus.identify(a, driver("job"));
        bus.identify(b, driver("job"));
        assert_eq!(bus.disconnect(a).unwrap().orphaned_job, None);
        assert_eq!(bus.disconnect(never_registered).unwrap().orphaned_job, None);
        assert_eq!(
            bus.disconnect(b).unwrap().orphaned_job.as_deref(),
            Some("job")
        );
    }

    #[test]
    fn pushes_reach_a_process_by_pid_and_a_full_queue_ends_the_session() {
        let bus = ClientBus::new();
        let (_id, mut receiver) = session(&bus, 7);
        let body = || pb::bus_response::Body::Heartbeat(pb::Heartbeat {});
        assert!(bus.push_to_process(7, body()));
        assert!(!bus.push_to_process(8, body()));
        assert!(!bus.push_to_process(0, body()));
        assert!(receiver.try_recv().is_ok());
        for _ in 0..4 {
            assert!(bus.push_to_process(7, body()));
        }
        assert!(!bus.push_to_process(7, body()), "the queue is full");
    }

    #[test]
    fn only_runtimes_have_runtime_ids() {
        let bus = ClientBus::new();
        let (a, _ra) = session(&bus, 1);
        assert_eq!(bus.runtime_id(a), None);
        bus.identify(
            a,
            Identity {
                kind: pb::ClientKind::Runtime,
                runtime_id: "rt1".into(),
                ..Identity::default()
            },
        );
        assert_eq!(bus.runtime_id(a).as_deref(), Some("rt1"));
    }
}
