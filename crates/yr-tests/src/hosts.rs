//! Hosts for multi-machine tests: each "machine" is a Linux network namespace with an address of
//! its own on a private bridge (10.77.0.0/24), made and removed by `scripts/netns` through the
//! `yr-netns` crate, whose [`Hosts`] guard this module re-exports. [`HostCluster`] runs
//! `yr start` in them the way an operator would on real machines ([`Hosts::start_cluster`]),
//! and lets this process read the master's meta store from host 0.
//!
//! Each host has its own `TMPDIR` and `YR_SESSION_ROOT` (under `/tmp/yr-netns/h<i>`), so a
//! driver run in host `i` finds host `i`'s node by itself. With [`Isolation::PrivateFileSystems`]
//! every other host's directory is hidden from a host's processes.
//!
//! A test cuts a host off the others with [`Hosts::cut`] and restores it with
//! [`Hosts::restore`], or two hosts off each other only with [`Hosts::cut_between`]; [`Hosts::in_host`] runs code of the test process itself inside a host's
//! network namespace.
//!
//! Namespaces need root and `ip`. Without them [`Hosts::up`] says why ([`Unavailable`]), and a
//! test reports itself skipped, loudly, with [`skip_or_fail`]; `YR_TESTS_REQUIRE_NETNS=1`
//! (CI, as root) turns that skip into a failure.

pub use yr_netns::{netns_script, set_name, Error as Unavailable, Hosts, Isolation, MASTER_PORT};

use crate::yr_binary;

/// Set to 1 where multi-machine tests must run (CI runs as root): a missing `ip netns` fails.
pub const REQUIRE_VAR: &str = "YR_TESTS_REQUIRE_NETNS";

/// Say loudly that `test` was skipped because `why`, and return; or panic when
/// [`REQUIRE_VAR`] says the hosts must be available, or when the machine could make hosts but
/// a step failed. The notice goes straight to the process's standard error, past libtest's
/// capture, so it shows even when the test "passes".
pub fn skip_or_fail(test: &str, why: &Unavailable) {
    use std::io::Write;
    if !why.is_unavailable() {
        panic!("{test}: the hosts could not be made: {why}");
    }
    if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") {
        panic!("{test} cannot run: {why} ({REQUIRE_VAR}=1)");
    }
    let rule = "=".repeat(72);
    let _ = write!(
        std::io::stderr().lock(),
        "\n{rule}\nSKIPPED {test}: {why}.\nIt needs root and `ip netns`: run it as root (CI \
         does), or set {REQUIRE_VAR}=1 to make this a failure.\n{rule}\n\n"
    );
}

/// A cluster started with `yr start` across [`Hosts`]: the master and a node on host 0, a node
/// on each other host. Each node has the label `host=h<i>`. Stopped with the hosts.
pub struct HostCluster {
    cluster: yr_netns::Cluster,
}

impl HostCluster {
    /// Start it and wait until the master lists every host's node as alive. `extra(i)` gives
    /// host `i`'s node more `yr start` flags.
    pub fn start(hosts: &Hosts, extra: impl Fn(usize) -> Vec<String>) -> HostCluster {
        let cluster = hosts
            .start_cluster(&yr_binary(), extra)
            .unwrap_or_else(|e| panic!("{e}"));
        // This process reads the master's meta store from host 0 with it.
        if let Ok(parsed) = yr_common::auth::ClusterToken::parse(&cluster.token) {
            yr_transport::install(yr_transport::Credentials::with_token(parsed));
        }
        HostCluster { cluster }
    }

    /// The cluster token, as the other hosts were given it.
    pub fn token(&self) -> &str {
        &self.cluster.token
    }

    /// The master's address (`host:port` on host 0).
    pub fn master_address(&self) -> &str {
        &self.cluster.master_address
    }

    /// The record of `instance_id` in the master's meta store, read from host 0.
    pub fn stored_instance(
        &self,
        hosts: &Hosts,
        instance_id: &str,
    ) -> Result<Option<yr_proto::v1::InstanceRecord>, String> {
        hosts.in_host(0, || {
            crate::stored_record(&self.cluster.master_address, instance_id)
        })
    }

    /// Follow the record of `instance_id` in the master's meta store from now on, from host 0
    /// (see [`crate::watch_record`]).
    pub fn watch_instance(&self, hosts: &Hosts, instance_id: &str) -> crate::RecordHistory {
        hosts.in_host(0, || {
            crate::watch_record(&self.cluster.master_address, instance_id)
        })
    }

    /// `yr status --json` run on host `index` against the master, with the token in
    /// `YR_TOKEN`.
    pub fn status(&self, hosts: &Hosts, index: usize) -> Result<serde_json::Value, String> {
        hosts.status(&self.cluster, index)
    }
}
