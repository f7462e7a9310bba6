//! Whether this master serves the master's role now, and the answer of one that does not.
//!
//! With the embedded store there is one master and it always leads. With etcd, a master leads
//! between winning an election ([`crate::election`]) and losing its term; meanwhile it holds the
//! term's [`Cluster`] (rebuilt from the store when the term began) and a receiver that turns
//! true when the term ends, which ends the term's heartbeat streams. A standby answers every
//! `Master` call with [`NotLeader`]: gRPC `UNAVAILABLE`, code 3002, the message "not the leader;
//! the leader is at X", and X in the [`LEADER_METADATA`] header, so clients can follow.
//!
//! ```
//! use yr_master::leadership::{Leadership, NotLeader, LEADER_METADATA};
//! let standby = Leadership::new("127.0.0.1:2".into(), None);
//! assert!(standby.leader().is_err());
//! let status = NotLeader { leader: Some("127.0.0.1:1".into()) }.to_status();
//! assert_eq!(status.code(), tonic::Code::Unavailable);
//! assert!(status.message().contains("the leader is at 127.0.0.1:1"));
//! assert_eq!(status.metadata().get(LEADER_METADATA).unwrap(), "127.0.0.1:1");
//! assert_eq!(yr_transport::leader_redirect(&status), Some(Some("127.0.0.1:1".into())));
//! ```

use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::election::Election;

/// The gRPC response header in which a standby names the leader (`host:port`; empty while no
/// master leads). Clients read it with [`yr_transport::leader_redirect`].
pub use yr_transport::LEADER_METADATA;

/// A call reached a master that does not lead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct NotLeader {
    /// The leader as the standby last saw it, if any.
    pub leader: Option<String>,
}

impl std::fmt::Display for NotLeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.leader {
            Some(leader) => write!(
                f,
                "not the leader; the leader is at {leader}: send master calls there"
            ),
            None => write!(
                f,
                "not the leader; no master leads right now (an election is under way): retry shortly"
            ),
        }
    }
}

impl NotLeader {
    /// The gRPC status a standby answers with.
    pub fn to_status(&self) -> tonic::Status {
        let message = yr_common::Error::from(self.clone()).to_string();
        let mut status = tonic::Status::unavailable(message);
        let leader = self.leader.as_deref().unwrap_or_default();
        let value = leader
            .parse()
            .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static(""));
        status.metadata_mut().insert(LEADER_METADATA, value);
        status
    }
}

/// The leader's side: the term's cluster state and its end.
#[derive(Clone)]
pub(crate) struct Led {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) term_ended: watch::Receiver<bool>,
}

/// This master's role, shared by its services.
pub struct Leadership {
    address: String,
    election: Option<Arc<Election>>,
    led: RwLock<Option<Led>>,
}

impl Leadership {
    /// The role of the master at `address`; `election` is `None` for a master that always
    /// leads (the embedded store).
    pub fn new(address: String, election: Option<Arc<Election>>) -> Leadership {
        Leadership {
            address,
            election,
            led: RwLock::new(None),
        }
    }

    /// This master's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The cluster state, if this master leads now; else who does.
    pub fn leader(&self) -> Result<Arc<Cluster>, NotLeader> {
        self.led().map(|led| led.cluster)
    }

    pub(crate) fn led(&self) -> Result<Led, NotLeader> {
        match &*self.led.read() {
            Some(led) if !*led.term_ended.borrow() => Ok(led.clone()),
            _ => Err(NotLeader {
                leader: self
                    .election
                    .as_ref()
                    .and_then(|election| election.leader_hint())
                    .filter(|leader| leader != &self.address),
            }),
        }
    }

    /// Whether this master leads now.
    pub fn leads(&self) -> bool {
        self.led().is_ok()
    }

    /// A term began with `cluster`; it ends when `term_ended` turns true.
    pub(crate) fn begin(&self, cluster: Arc<Cluster>, term_ended: watch::Receiver<bool>) {
        *self.led.write() = Some(Led {
            cluster,
            term_ended,
        });
    }

    /// The term ended.
    pub(crate) fn end(&self) {
        *self.led.write() = None;
    }

    /// The masters campaigning on the store now (empty without an election).
    pub async fn masters(&self) -> Vec<String> {
        match &self.election {
            Some(election) => election.members().await,
            None => vec![self.address.clone()],
        }
    }
}
