//! [`EtcdStore`]: the [`MetaStore`] kept in etcd (v3 API, etcd 3.4 or later), through the
//! `etcd-client` crate. It owns the mapping of yr's store model onto etcd's:
//!
//! - **Keys** live under a prefix ([`EtcdOptions::prefix`], `/yr/default` unless set): the key
//!   `k` is stored as `<prefix>/k`, so the master's instance record `/yr/instance/a` is
//!   `/yr/default//yr/instance/a` in etcd. Callers never see the prefix; two clusters with
//!   different prefixes share one etcd without seeing each other's keys.
//! - **Revisions** are etcd's own: a key's `version` and `mod_revision` are etcd's `version` and
//!   `mod_revision`, a transaction's revision is the header's revision, and watches resume with
//!   etcd's `start_revision`. The revision is etcd-wide, so other users of the same etcd move
//!   it too; it only ever grows.
//! - **Compare-and-swap** is an etcd transaction: [`Compare::Version`] and
//!   [`Compare::ModRevision`] compare etcd's version and mod revision. A branch's put is followed
//!   inside the same transaction by a read of the key, so the written record comes back exactly
//!   as etcd stored it (`txn.rs`).
//! - **Leases** are etcd leases: a TTL is rounded up to whole seconds (etcd may raise it to its
//!   own minimum), a renewal is one keep-alive round trip, and an ended lease's keys are deleted
//!   by etcd in one revision.
//! - **Compaction**: a watch from a revision etcd has compacted fails with
//!   [`MetaError::Compacted`], as on the embedded store.
//!
//! Every call has a timeout and a bounded retry with backoff (`retry.rs`); a failure of etcd is
//! [`MetaError::Etcd`] (3005). Watches reconnect by themselves (`watch.rs`).

mod retry;
mod txn;
mod watch;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KvClient, LeaseClient, PutOptions,
    TlsOptions, WatchClient,
};
use tokio::sync::mpsc;

use crate::error::MetaError;
use crate::store::{Compare, KeyValue, LeaseId, MetaStore, TxnOp, TxnResponse, WatchEvent};
use retry::{with_retry, Budget, Context, Retry};
use txn::{branch_results, check_branch, etcd_compares, etcd_ops};

/// How an [`EtcdStore`] reaches etcd.
///
/// ```
/// let options = yr_meta::EtcdOptions::new(["127.0.0.1:2379"]).with_prefix("/yr/prod");
/// assert_eq!(options.prefix, "/yr/prod");
/// assert_eq!(yr_meta::EtcdOptions::new(["127.0.0.1:2379"]).prefix, "/yr/default");
/// ```
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// etcd's client endpoints, `host:port` or `http://host:port`.
    pub endpoints: Vec<String>,
    /// The prefix every key is stored under.
    pub prefix: String,
    /// The longest one attempt of a call may take.
    pub attempt_timeout: Duration,
    /// The longest the attempts of one call may take together before it fails with 3005.
    pub retry_budget: Duration,
    /// TLS to etcd; `None` speaks plain HTTP/2.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd (its `--cert-file`/`--key-file`, `https://` client URLs): the CA that signed
/// etcd's certificate and, for an etcd that authenticates its clients by certificate
/// (`--client-cert-auth`), this process's certificate and key (PEM files).
///
/// ```
/// let tls = yr_meta::EtcdTls {
///     ca: "/etc/yr/etcd-ca.pem".into(),
///     client: Some(("/etc/yr/etcd-client.pem".into(), "/etc/yr/etcd-client.key".into())),
///     server_name: None,
/// };
/// let options = yr_meta::EtcdOptions::new(["10.0.0.5:2379"]).with_tls(tls);
/// assert!(options.tls.is_some());
/// ```
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA certificate that etcd's certificate must chain to.
    pub ca: PathBuf,
    /// This process's certificate and key, for etcd's `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
    /// The name etcd's certificate must carry; default: each endpoint's host.
    pub server_name: Option<String>,
}

impl EtcdTls {
    /// The TLS settings of the etcd client, with the files read; [`MetaError::InvalidArgument`]
    /// names a file that cannot be read.
    fn load(&self) -> Result<TlsOptions, MetaError> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|error| {
                MetaError::InvalidArgument(format!(
                    "cannot read the etcd {what} {}: {error}; check --etcd-ca, --etcd-cert and \
                     --etcd-key",
                    path.display()
                ))
            })
        };
        let mut tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca, "CA certificate")?));
        if let Some((certificate, key)) = &self.client {
            tls = tls.identity(Identity::from_pem(
                read(certificate, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

impl EtcdOptions {
    /// The prefix unless one is given: one cluster per etcd needs no other.
    pub const DEFAULT_PREFIX: &'static str = "/yr/default";

    /// Options for `endpoints` with the default prefix, a 3 s attempt timeout and a 4 s retry
    /// budget (below the 5 s that a node waits for the master's meta service).
    pub fn new<S: AsRef<str>>(endpoints: impl IntoIterator<Item = S>) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.as_ref().trim().to_string())
                .filter(|e| !e.is_empty())
                .collect(),
            prefix: Self::DEFAULT_PREFIX.to_string(),
            attempt_timeout: Duration::from_secs(3),
            retry_budget: Duration::from_secs(4),
            tls: None,
        }
    }

    /// The same options over TLS.
    pub fn with_tls(mut self, tls: EtcdTls) -> EtcdOptions {
        self.tls = Some(tls);
        self
    }

    /// The same options with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> EtcdOptions {
        self.prefix = prefix.into();
        self
    }
}

/// A [`MetaStore`] in etcd. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # async fn example() -> Result<(), yr_meta::MetaError> {
/// use yr_meta::{EtcdOptions, EtcdStore, MetaStore};
/// let store = EtcdStore::connect(EtcdOptions::new(["127.0.0.1:2379"])).await?;
/// let kv = store.put("/yr/cluster/id", "c1".into(), None).await?;
/// // etcd holds it as /yr/default//yr/cluster/id; the store shows the caller's key.
/// assert_eq!(kv.key, "/yr/cluster/id");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    /// The stored form of the empty key: the prefix and a `/`.
    prefix: Arc<str>,
    endpoints: Arc<str>,
    budget: Budget,
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers. Fails with [`MetaError::InvalidArgument`]
    /// for no endpoint or a malformed one, and with [`MetaError::Etcd`] if etcd does not answer
    /// within the retry budget.
    pub async fn connect(options: EtcdOptions) -> Result<EtcdStore, MetaError> {
        if options.endpoints.is_empty() {
            return Err(MetaError::InvalidArgument(
                "no etcd endpoint given: pass --etcd host:port[,host:port...]".to_string(),
            ));
        }
        let prefix = normalize_prefix(&options.prefix)?;
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let endpoints: Vec<String> = options
            .endpoints
            .iter()
            .map(|e| {
                if e.starts_with("http://") || e.starts_with("https://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect();
        if options.tls.is_some() && endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(MetaError::InvalidArgument(format!(
                "TLS to etcd needs https:// endpoints, not {}; drop the http:// scheme",
                options.endpoints.join(",")
            )));
        }
        let described = options.endpoints.join(",");
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.attempt_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls.load()?);
        }
        let client = Client::connect(&endpoints, Some(connect))
            .await
            .map_err(|err| {
                retry::classify(
                    err,
                    Context {
                        what: "connect",
                        endpoints: &described,
                        lease: None,
                    },
                )
                .error
            })?;
        let max = yr_transport::max_message_bytes();
        let store = EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            watch: client.watch_client().max_decoding_message_size(max),
            lease: client.lease_client(),
            prefix: prefix.into(),
            endpoints: described.into(),
            budget: Budget {
                attempt: options.attempt_timeout,
                total: options.retry_budget,
            },
        };
        let revision = store.current_revision().await.map_err(|err| match err {
            MetaError::Etcd(message) => MetaError::Etcd(format!(
                "{message}; check that etcd runs at {} (Debian: apt-get install etcd-server)",
                store.endpoints
            )),
            other => other,
        })?;
        tracing::info!(
            endpoints = %store.endpoints,
            prefix = %store.prefix,
            revision,
            "connected to etcd"
        );
        Ok(store)
    }

    /// The endpoints this store talks to, comma-separated as given.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The prefix its keys are stored under (as normalized: no trailing `/`).
    pub fn prefix(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    /// The etcd key that holds `key`.
    ///
    /// ```no_run
    /// # async fn example(store: yr_meta::EtcdStore) {
    /// assert_eq!(store.etcd_key("/yr/instance/a"), "/yr/default//yr/instance/a");
    /// # }
    /// ```
    pub fn etcd_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn context<'a>(&'a self, what: &'a str, lease: Option<LeaseId>) -> Context<'a> {
        Context {
            what,
            endpoints: &self.endpoints,
            lease,
        }
    }

    fn key_from_etcd(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&*self.prefix).map(str::to_string)
    }

    fn kv_from_etcd(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        let key = self.key_from_etcd(kv.key())?;
        Some(KeyValue {
            key,
            value: Bytes::copy_from_slice(kv.value()),
            version: u64::try_from(kv.version()).unwrap_or(0),
            mod_revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }

    /// Finds which of `leases` etcd no longer knows, after etcd refused a transaction for a
    /// missing lease.
    async fn missing_lease(&self, leases: &BTreeSet<LeaseId>) -> Option<LeaseId> {
        if leases.len() == 1 {
            return leases.iter().next().copied();
        }
        for &lease in leases {
            let mut client = self.lease.clone();
            if let Ok(response) = client.time_to_live(lease, None).await {
                if response.ttl() < 0 {
                    return Some(lease);
                }
            }
        }
        leases.iter().next().copied()
    }
}

/// `/yr/default/` from `/yr/default` or `/yr/default/`: the stored prefix ends with one `/`.
fn normalize_prefix(prefix: &str) -> Result<String, MetaError> {
    let trimmed = prefix.trim().trim_end_matches('/');
    if !trimmed.is_empty() && !trimmed.starts_with('/') {
        return Err(MetaError::InvalidArgument(format!(
            "the etcd prefix {prefix:?} must start with '/' (for example /yr/default)"
        )));
    }
    Ok(format!("{trimmed}/"))
}

fn check_key(key: &str) -> Result<(), MetaError> {
    if key.is_empty() {
        return Err(MetaError::InvalidArgument("the key is empty".to_string()));
    }
    Ok(())
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header
        .map(|h| u64::try_from(h.revision()).unwrap_or(0))
        .unwrap_or(0)
}

#[async_trait]
impl MetaStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, MetaError> {
        check_key(key)?;
        let etcd_key = self.etcd_key(key);
        let response = with_retry(
            self.budget,
            Retry::Idempotent,
            self.context("get", None),
            || {
                let mut kv = self.kv.clone();
                let key = etcd_key.clone();
                async move { kv.get(key, None).await }
            },
        )
        .await?;
        Ok(response.kvs().first().and_then(|kv| self.kv_from_etcd(kv)))
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, MetaError> {
        let etcd_prefix = self.etcd_key(prefix);
        let response = with_retry(
            self.budget,
            Retry::Idempotent,
            self.context("range", None),
            || {
                let mut kv = self.kv.clone();
                let key = etcd_prefix.clone();
                async move { kv.get(key, Some(GetOptions::new().with_prefix())).await }
            },
        )
        .await?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| self.kv_from_etcd(kv))
            .collect())
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue, MetaError> {
        check_key(key)?;
        let etcd_key = self.etcd_key(key);
        let response = with_retry(
            self.budget,
            Retry::Write,
            self.context("put", lease),
            || {
                let mut kv = self.kv.clone();
                let key = etcd_key.clone();
                let value = value.to_vec();
                let mut options = PutOptions::new().with_prev_key();
                if let Some(lease) = lease {
                    options = options.with_lease(lease);
                }
                async move { kv.put(key, value, Some(options)).await }
            },
        )
        .await?;
        // etcd answers a put with its revision and the previous record: the new record is
        // one version past it (or version 1), at the put's revision.
        let version = response.prev_key().map_or(1, |prev| {
            u64::try_from(prev.version()).unwrap_or(0).saturating_add(1)
        });
        Ok(KeyValue {
            key: key.to_string(),
            value,
            version,
            mod_revision: revision_of(response.header()),
            lease,
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        check_key(key)?;
        let etcd_key = self.etcd_key(key);
        let response = with_retry(
            self.budget,
            Retry::Write,
            self.context("delete", None),
            || {
                let mut kv = self.kv.clone();
                let key = etcd_key.clone();
                async move { kv.delete(key, None).await }
            },
        )
        .await?;
        Ok(response.deleted() > 0)
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<TxnResponse, MetaError> {
        let mut leases = BTreeSet::new();
        check_branch(&success, &mut leases)?;
        check_branch(&failure, &mut leases)?;
        let etcd_compares = etcd_compares(self, &compares)?;
        let success_ops = etcd_ops(self, &success);
        let failure_ops = etcd_ops(self, &failure);
        let result = with_retry(self.budget, Retry::Write, self.context("txn", None), || {
            let mut kv = self.kv.clone();
            let txn = etcd_client::Txn::new()
                .when(etcd_compares.clone())
                .and_then(success_ops.clone())
                .or_else(failure_ops.clone());
            async move { kv.txn(txn).await }
        })
        .await;
        let response = match result {
            Ok(response) => response,
            Err(MetaError::Etcd(message))
                if message.contains("lease not found") && !leases.is_empty() =>
            {
                let lease = self.missing_lease(&leases).await;
                return Err(lease.map_or(MetaError::Etcd(message), MetaError::LeaseNotFound));
            }
            Err(err) => return Err(err),
        };
        let succeeded = response.succeeded();
        let ops = if succeeded { &success } else { &failure };
        let results = branch_results(self, ops, response.op_responses())?;
        Ok(TxnResponse {
            succeeded,
            revision: revision_of(response.header()),
            results,
        })
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, MetaError> {
        watch::start(self.clone(), prefix, after_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        if ttl.is_zero() {
            return Err(MetaError::InvalidArgument(
                "a lease TTL must be positive".to_string(),
            ));
        }
        // etcd's TTLs are whole seconds: round up, so a lease never ends before its TTL.
        let seconds = i64::try_from(ttl.as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(i64::from(ttl.subsec_nanos() > 0))
            .max(1);
        let response = with_retry(
            self.budget,
            Retry::Idempotent,
            self.context("lease grant", None),
            || {
                let mut lease = self.lease.clone();
                async move { lease.grant(seconds, None).await }
            },
        )
        .await?;
        if !response.error().is_empty() {
            return Err(MetaError::Etcd(format!(
                "lease grant at etcd {}: {}",
                self.endpoints,
                response.error()
            )));
        }
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        with_retry(
            self.budget,
            Retry::Idempotent,
            self.context("lease keep-alive", Some(lease)),
            || {
                let mut client = self.lease.clone();
                // One round trip on a keep-alive stream: etcd-client waits for the renewal's
                // answer and fails with "lease not found" for a lease etcd no longer knows.
                async move { client.keep_alive(lease).await.map(drop) }
            },
        )
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        with_retry(
            self.budget,
            Retry::Write,
            self.context("lease revoke", Some(lease)),
            || {
                let mut client = self.lease.clone();
                async move { client.revoke(lease).await }
            },
        )
        .await?;
        Ok(())
    }

    async fn current_revision(&self) -> Result<u64, MetaError> {
        let etcd_key = self.prefix.to_string();
        let response = with_retry(
            self.budget,
            Retry::Idempotent,
            self.context("current revision", None),
            || {
                let mut kv = self.kv.clone();
                let key = etcd_key.clone();
                async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
            },
        )
        .await?;
        Ok(revision_of(response.header()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_with_one_slash_and_starts_with_one() {
        assert_eq!(normalize_prefix("/yr/default").unwrap(), "/yr/default/");
        assert_eq!(normalize_prefix("/yr/c1//").unwrap(), "/yr/c1/");
        assert_eq!(normalize_prefix("").unwrap(), "/");
        assert!(matches!(
            normalize_prefix("yr"),
            Err(MetaError::InvalidArgument(_))
        ));
    }
}
