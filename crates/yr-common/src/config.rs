//! [`Config`]: how `yr::init` sets up a process: local or cluster mode, where the cluster is,
//! the job and namespace, logging and a few runtime knobs. Built-in defaults are overlaid with
//! `YR_*` environment variables; [`Config::validate`] checks the result.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, ErrorCode, Result};

/// Environment variable for [`Config::local_mode`]: `true`/`false`/`1`/`0`, any case.
pub const ENV_LOCAL_MODE: &str = "YR_LOCAL_MODE";
/// Environment variable for [`Config::server_address`].
pub const ENV_SERVER_ADDRESS: &str = "YR_SERVER_ADDRESS";
/// Environment variable for [`Config::ds_address`].
pub const ENV_DS_ADDRESS: &str = "YR_DS_ADDRESS";
/// Environment variable for [`Config::job_id`].
pub const ENV_JOB_ID: &str = "YR_JOB_ID";
/// Environment variable for [`Config::namespace`].
pub const ENV_NAMESPACE: &str = "YR_NAMESPACE";
/// Environment variable for [`Config::log_level`].
pub const ENV_LOG_LEVEL: &str = "YR_LOG_LEVEL";
/// Environment variable for [`Config::log_dir`].
pub const ENV_LOG_DIR: &str = "YR_LOG_DIR";
/// Environment variable for [`Config::local_thread_pool_size`].
pub const ENV_LOCAL_THREADS: &str = "YR_LOCAL_THREADS";
/// Environment variable for [`Config::recycle_time`], in whole seconds.
pub const ENV_RECYCLE_TIME: &str = "YR_RECYCLE_TIME";
/// Environment variable for [`Config::working_dir`].
pub const ENV_WORKING_DIR: &str = "YR_WORKING_DIR";

/// The accepted values of [`Config::log_level`] (compared case-insensitively).
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
/// Default [`Config::log_level`].
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default [`Config::recycle_time`].
pub const DEFAULT_RECYCLE_TIME: Duration = Duration::from_secs(2);
/// Largest [`Config::recycle_time`].
pub const MAX_RECYCLE_TIME: Duration = Duration::from_secs(300);
/// Default [`Config::rpc_timeout`].
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(1800);
/// Longest [`Config::job_id`].
pub const MAX_JOB_ID_LEN: usize = 64;

/// The PEM files of [`Config::tls`]: this process's certificate and key, and the CA that signed
/// the cluster's certificates.
///
/// ```
/// use yr_common::config::TlsFiles;
///
/// let mut cfg = yr_common::Config::builtin();
/// cfg.tls = Some(TlsFiles::new("driver.pem", "driver.key", "ca.pem"));
/// cfg.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain.
    pub certificate: PathBuf,
    /// The certificate's private key.
    pub private_key: PathBuf,
    /// The CA the cluster's certificates are signed by.
    pub ca: PathBuf,
    /// The name the servers' certificates are checked against. `None` (default) = the host of
    /// the address connected to.
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// The three files, checking server certificates against the host connected to.
    pub fn new(
        certificate: impl Into<PathBuf>,
        private_key: impl Into<PathBuf>,
        ca: impl Into<PathBuf>,
    ) -> TlsFiles {
        TlsFiles {
            certificate: certificate.into(),
            private_key: private_key.into(),
            ca: ca.into(),
            server_name: None,
        }
    }
}

/// The resources of the cluster [`Config::deployment`] starts (openYuanrong's
/// `DeploymentConfig`). Each `None` takes `yr start`'s default.
///
/// ```
/// use yr_common::config::Deployment;
///
/// let mut cfg = yr_common::Config::builtin();
/// cfg.deployment = Some(Deployment { cpu_millicores: Some(4000), ..Deployment::default() });
/// cfg.validate().unwrap();
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deployment {
    /// The node's CPU, in millicores (`yr start --cpu`).
    pub cpu_millicores: Option<u64>,
    /// The node's memory, in MB (`yr start --memory`).
    pub memory_mb: Option<u64>,
    /// The node's shared memory for objects, in MB (`yr start --shared-memory-mb`).
    pub shared_memory_mb: Option<u64>,
    /// Where idle objects spill (`yr start --spill-dir`).
    pub spill_dir: Option<PathBuf>,
    /// The most the node spills, in MB (`yr start --spill-limit-mb`).
    pub spill_limit_mb: Option<u64>,
}

impl Deployment {
    /// The `yr start` arguments that give a node these resources.
    ///
    /// ```
    /// let d = yr_common::config::Deployment { memory_mb: Some(2048), ..Default::default() };
    /// assert_eq!(d.start_args(), ["--memory", "2048"]);
    /// ```
    pub fn start_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let numbers = [
            ("--cpu", self.cpu_millicores),
            ("--memory", self.memory_mb),
            ("--shared-memory-mb", self.shared_memory_mb),
            ("--spill-limit-mb", self.spill_limit_mb),
        ];
        for (flag, value) in numbers {
            if let Some(value) = value {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        if let Some(dir) = &self.spill_dir {
            args.extend(["--spill-dir".to_string(), dir.display().to_string()]);
        }
        args
    }
}

/// How `yr::init` sets up the process (openYuanrong's `yr.Config`, the fields yr supports).
///
/// [`Config::default`] is the built-in defaults overlaid with the `YR_*` environment variables
/// named on each field (an empty variable counts as unset). A variable with an invalid value
/// does not panic: it is kept aside and [`Config::validate`] reports it with
/// [`ErrorCode::ParamInvalid`]. Because of that private record, build a `Config` from
/// [`Config::default`], [`Config::local`], [`Config::builtin`] or [`Config::from_lookup`] and
/// then set fields; struct-literal syntax is not available outside this crate.
///
/// ```
/// use std::time::Duration;
/// use yr_common::Config;
///
/// // Environment variables come through a lookup function; here a fixed one.
/// let mut cfg = Config::from_lookup(|name| match name {
///     "YR_NAMESPACE" => Some("prod".to_string()),
///     "YR_RECYCLE_TIME" => Some("10".to_string()),
///     _ => None,
/// });
/// assert_eq!(cfg.namespace.as_deref(), Some("prod"));
/// assert_eq!(cfg.recycle_time, Duration::from_secs(10));
/// cfg.local_mode = true;
/// cfg.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Run everything in this process on local thread pools, without a cluster. Default
    /// `false`; env `YR_LOCAL_MODE` (`true`/`false`/`1`/`0`, any case).
    pub local_mode: bool,
    /// Address of the cluster's function proxy (`grpc://…` in-cluster) or frontend
    /// (`http(s)://…`). `None` (default) = discover or start a cluster; env
    /// `YR_SERVER_ADDRESS`. Must not be empty. Ignored in local mode.
    pub server_address: Option<String>,
    /// Address of the data-system worker. `None` (default) = derived from the server address
    /// or discovery; env `YR_DS_ADDRESS`. Must not be empty. Ignored in local mode.
    pub ds_address: Option<String>,
    /// The job id. `None` (default) = generated by init; env `YR_JOB_ID`. 1–64 characters of
    /// `[A-Za-z0-9_-]`.
    pub job_id: Option<String>,
    /// Default namespace of named instances. `None` (default) = none; env `YR_NAMESPACE`.
    /// Must not be empty.
    pub namespace: Option<String>,
    /// Log level: one of `trace`, `debug`, `info`, `warn`, `error`, `off` (any case). Default
    /// `info`; env `YR_LOG_LEVEL`.
    pub log_level: String,
    /// Directory of log files. `None` (default) = the current directory; env `YR_LOG_DIR`.
    pub log_dir: Option<PathBuf>,
    /// Threads of the local-mode pool; 0 (default) = one per available CPU. Env
    /// `YR_LOCAL_THREADS` (a non-negative integer).
    pub local_thread_pool_size: usize,
    /// How long an idle stateless instance is kept before it is recycled. Default 2 s; valid
    /// (0, 300] s; env `YR_RECYCLE_TIME` (whole seconds).
    pub recycle_time: Duration,
    /// Most stateless instances the job may hold: -1 (default) = unlimited, else ≥ 1.
    pub max_task_instance_num: i64,
    /// Timeout of control-plane RPCs. Default 1800 s; must be > 0.
    pub rpc_timeout: Duration,
    /// Directory with the user's code and files, present on every node. `None` (default) =
    /// none; env `YR_WORKING_DIR`.
    pub working_dir: Option<PathBuf>,
    /// The cluster token this process presents on every connection. `None` (default) = the
    /// token file of the session whose node this driver connects to (`<session>/token`, beside
    /// the node's bus socket); env `YR_TOKEN`. Ignored in local mode.
    pub token: Option<crate::auth::ClusterToken>,
    /// Mutual TLS for this process's TCP connections to a cluster started with `--tls-*`.
    /// `None` (default) = the files named by `YR_TLS_CERT`, `YR_TLS_KEY` and `YR_TLS_CA` when all
    /// three are set, else plain TCP. Ignored in local mode.
    pub tls: Option<TlsFiles>,
    /// Start a cluster of this driver's own at `init`, with these resources, and stop it at
    /// `finalize` (openYuanrong's `auto` with its `deployment_config`). `None` (default) = use
    /// `server_address`, the cluster started on this machine, or a temporary one.
    pub deployment: Option<Deployment>,
    /// Environment variables that had invalid values, reported by `validate`.
    env_errors: Vec<String>,
}

impl Default for Config {
    /// The built-in defaults overlaid with the process's `YR_*` environment variables.
    fn default() -> Self {
        Config::from_lookup(|name| {
            std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
        })
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn is_log_level(level: &str) -> bool {
    LOG_LEVELS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(level))
}

fn param_invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::ParamInvalid, message)
}

impl Config {
    /// The built-in defaults with no environment overlay.
    pub fn builtin() -> Config {
        Config {
            local_mode: false,
            server_address: None,
            ds_address: None,
            job_id: None,
            namespace: None,
            log_level: DEFAULT_LOG_LEVEL.to_string(),
            log_dir: None,
            local_thread_pool_size: 0,
            recycle_time: DEFAULT_RECYCLE_TIME,
            max_task_instance_num: -1,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
            working_dir: None,
            token: None,
            tls: None,
            deployment: None,
            env_errors: Vec::new(),
        }
    }

    /// [`Config::default`] with `local_mode` set: everything runs in this process.
    ///
    /// ```
    /// let cfg = yr_common::Config::local();
    /// assert!(cfg.local_mode);
    /// ```
    pub fn local() -> Config {
        Config {
            local_mode: true,
            ..Config::default()
        }
    }

    /// The built-in defaults overlaid with the `YR_*` variables that `lookup` returns
    /// (`lookup(name)` is the variable's value, `None` when unset). Empty or all-blank values
    /// count as unset. Invalid values leave the default in place and are reported by
    /// [`Config::validate`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Config {
        let mut cfg = Config::builtin();
        let get = |name: &str| {
            lookup(name)
                .map(|value| value.trim().to_string())
                .filter(|value| !value.is_empty())
        };

        if let Some(value) = get(ENV_LOCAL_MODE) {
            match parse_bool(&value) {
                Some(local) => cfg.local_mode = local,
                None => cfg.env_errors.push(format!(
                    "{ENV_LOCAL_MODE}={value:?} is invalid; accepted values are true, false, 1 \
                     or 0 (any case)"
                )),
            }
        }
        cfg.server_address = get(ENV_SERVER_ADDRESS);
        cfg.ds_address = get(ENV_DS_ADDRESS);
        cfg.job_id = get(ENV_JOB_ID);
        cfg.namespace = get(ENV_NAMESPACE);
        if let Some(value) = get(ENV_LOG_LEVEL) {
            if is_log_level(&value) {
                cfg.log_level = value.to_ascii_lowercase();
            } else {
                cfg.env_errors.push(format!(
                    "{ENV_LOG_LEVEL}={value:?} is invalid; accepted values are {}",
                    LOG_LEVELS.join(", ")
                ));
            }
        }
        cfg.log_dir = get(ENV_LOG_DIR).map(PathBuf::from);
        if let Some(value) = get(ENV_LOCAL_THREADS) {
            match value.parse::<usize>() {
                Ok(threads) => cfg.local_thread_pool_size = threads,
                Err(_) => cfg.env_errors.push(format!(
                    "{ENV_LOCAL_THREADS}={value:?} is invalid; accepted values are integers in \
                     [0, {}] (0 = one thread per CPU)",
                    usize::MAX
                )),
            }
        }
        if let Some(value) = get(ENV_RECYCLE_TIME) {
            match value.parse::<u64>() {
                Ok(secs) if secs > 0 && secs <= MAX_RECYCLE_TIME.as_secs() => {
                    cfg.recycle_time = Duration::from_secs(secs)
                }
                _ => cfg.env_errors.push(format!(
                    "{ENV_RECYCLE_TIME}={value:?} is invalid; accepted values are whole seconds \
                     in (0, {}]",
                    MAX_RECYCLE_TIME.as_secs()
                )),
            }
        }
        cfg.working_dir = get(ENV_WORKING_DIR).map(PathBuf::from);
        if let Some(value) = get(crate::auth::TOKEN_ENV) {
            match crate::auth::ClusterToken::parse(&value) {
                Ok(token) => cfg.token = Some(token),
                Err(error) => cfg
                    .env_errors
                    .push(format!("{}: {error}", crate::auth::TOKEN_ENV)),
            }
        }
        cfg
    }

    /// The environment variables that had invalid values, one message each.
    pub fn env_errors(&self) -> &[String] {
        &self.env_errors
    }

    /// Checks the configuration: invalid environment variables, `log_level`, `recycle_time`,
    /// `job_id`, empty strings, `max_task_instance_num` and `rpc_timeout`. Every failure is
    /// [`ErrorCode::ParamInvalid`] with a message naming the setting (or variable), the bad
    /// value and what is accepted.
    pub fn validate(&self) -> Result<()> {
        if !self.env_errors.is_empty() {
            return Err(param_invalid(format!(
                "invalid environment: {}",
                self.env_errors.join("; ")
            )));
        }
        if !is_log_level(&self.log_level) {
            return Err(param_invalid(format!(
                "log_level {:?} is invalid; accepted values are {}",
                self.log_level,
                LOG_LEVELS.join(", ")
            )));
        }
        if self.recycle_time.is_zero() || self.recycle_time > MAX_RECYCLE_TIME {
            return Err(param_invalid(format!(
                "recycle_time {:?} is invalid. Valid value range is (0, {}] seconds",
                self.recycle_time,
                MAX_RECYCLE_TIME.as_secs()
            )));
        }
        if let Some(job_id) = &self.job_id {
            let valid = !job_id.is_empty()
                && job_id.len() <= MAX_JOB_ID_LEN
                && job_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(param_invalid(format!(
                    "job_id {job_id:?} is invalid. It must be 1-{MAX_JOB_ID_LEN} characters of \
                     A-Z, a-z, 0-9, '_' or '-'"
                )));
            }
        }
        for (field, value) in [
            ("server_address", &self.server_address),
            ("ds_address", &self.ds_address),
            ("namespace", &self.namespace),
        ] {
            if value.as_deref().is_some_and(|text| text.trim().is_empty()) {
                return Err(param_invalid(format!(
                    "{field} is an empty string. Give a non-empty {field} or leave it unset \
                     (None)"
                )));
            }
        }
        if self.max_task_instance_num != -1 && self.max_task_instance_num < 1 {
            return Err(param_invalid(format!(
                "max_task_instance_num {} is invalid. Valid values are -1 (unlimited) or \
                 [1, {}]",
                self.max_task_instance_num,
                i64::MAX
            )));
        }
        if self.rpc_timeout.is_zero() {
            return Err(param_invalid(
                "rpc_timeout 0s is invalid. It must be greater than 0",
            ));
        }
        if let Some(tls) = &self.tls {
            for (field, path) in [
                ("certificate", &tls.certificate),
                ("private_key", &tls.private_key),
                ("ca", &tls.ca),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(param_invalid(format!(
                        "tls.{field} is an empty path. Give the PEM file's path, or leave tls \
                         unset for plain TCP"
                    )));
                }
            }
            if tls
                .server_name
                .as_deref()
                .is_some_and(|name| name.trim().is_empty())
            {
                return Err(param_invalid(
                    "tls.server_name is an empty string. Give the name in the servers' \
                     certificates, or leave it unset (the host connected to)",
                ));
            }
        }
        if let Some(deployment) = &self.deployment {
            if deployment.cpu_millicores == Some(0) || deployment.memory_mb == Some(0) {
                return Err(param_invalid(
                    "deployment cpu and memory must be greater than 0 when given; leave them \
                     unset for yr start's defaults",
                ));
            }
            if self.server_address.is_some() {
                return Err(param_invalid(
                    "deployment starts a cluster of this driver's own, so it cannot be combined \
                     with server_address; set one of them",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_pairs(pairs: &[(&str, &str)]) -> Config {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |name| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        })
    }

    fn expect_err(cfg: &Config, needles: &[&str]) {
        let err = cfg.validate().expect_err("config should be rejected");
        assert_eq!(err.code(), ErrorCode::ParamInvalid);
        for needle in needles {
            assert!(
                err.message().contains(needle),
                "message {:?} should contain {:?}",
                err.message(),
                needle
            );
        }
    }

    #[test]
    fn builtin_defaults() {
        let cfg = Config::from_lookup(|_| None);
        assert_eq!(cfg, Config::builtin());
        assert!(!cfg.local_mode);
        assert_eq!(cfg.server_address, None);
        assert_eq!(cfg.ds_address, None);
        assert_eq!(cfg.job_id, None);
        assert_eq!(cfg.namespace, None);
        assert_eq!(cfg.log_level, "info");
        assert_eq!(cfg.log_dir, None);
        assert_eq!(cfg.local_thread_pool_size, 0);
        assert_eq!(cfg.recycle_time, Duration::from_secs(2));
        assert_eq!(cfg.max_task_instance_num, -1);
        assert_eq!(cfg.rpc_timeout, Duration::from_secs(1800));
        assert_eq!(cfg.working_dir, None);
        assert!(cfg.env_errors().is_empty());
        cfg.validate().unwrap();
    }

    #[test]
    fn local_sets_local_mode() {
        assert!(Config::local().local_mode);
    }

    #[test]
    fn env_overlay() {
        let cfg = from_pairs(&[
            ("YR_LOCAL_MODE", "TRUE"),
            ("YR_SERVER_ADDRESS", "grpc://10.0.0.1:22772"),
            ("YR_DS_ADDRESS", "10.0.0.1:31501"),
            ("YR_JOB_ID", "job-42_a"),
            ("YR_NAMESPACE", "prod"),
            ("YR_LOG_LEVEL", "DEBUG"),
            ("YR_LOG_DIR", "/var/log/yr"),
            ("YR_LOCAL_THREADS", "8"),
            ("YR_RECYCLE_TIME", "300"),
            ("YR_WORKING_DIR", "/srv/app"),
        ]);
        assert!(cfg.local_mode);
        assert_eq!(cfg.server_address.as_deref(), Some("grpc://10.0.0.1:22772"));
        assert_eq!(cfg.ds_address.as_deref(), Some("10.0.0.1:31501"));
        assert_eq!(cfg.job_id.as_deref(), Some("job-42_a"));
        assert_eq!(cfg.namespace.as_deref(), Some("prod"));
        assert_eq!(cfg.log_level, "debug");
        assert_eq!(cfg.log_dir, Some(PathBuf::from("/var/log/yr")));
        assert_eq!(cfg.local_thread_pool_size, 8);
        assert_eq!(cfg.recycle_time, Duration::from_secs(300));
        assert_eq!(cfg.working_dir, Some(PathBuf::from("/srv/app")));
        cfg.validate().unwrap();

        for (value, expected) in [("1", true), ("0", false), ("False", false), ("tRuE", true)] {
            assert_eq!(from_pairs(&[("YR_LOCAL_MODE", value)]).local_mode, expected);
        }
        let blank = from_pairs(&[("YR_SERVER_ADDRESS", "  "), ("YR_LOCAL_MODE", "")]);
        assert_eq!(blank.server_address, None);
        assert!(blank.env_errors().is_empty());
    }

    #[test]
    fn invalid_env_values_are_reported_not_panicked() {
        let cases: [(&str, &str, &str); 7] = [
            ("YR_LOCAL_MODE", "yes", "true, false, 1 or 0"),
            (
                "YR_LOG_LEVEL",
                "verbose",
                "trace, debug, info, warn, error, off",
            ),
            ("YR_LOCAL_THREADS", "-1", "integers in [0, "),
            ("YR_LOCAL_THREADS", "many", "integers in [0, "),
            ("YR_RECYCLE_TIME", "0", "(0, 300]"),
            ("YR_RECYCLE_TIME", "301", "(0, 300]"),
            ("YR_RECYCLE_TIME", "2.5", "whole seconds"),
        ];
        for (name, value, accepted) in cases {
            let cfg = from_pairs(&[(name, value)]);
            assert_eq!(cfg.env_errors().len(), 1, "{name}={value}");
            expect_err(&cfg, &[name, value, accepted]);
        }
        // The default stays in place.
        let cfg = from_pairs(&[("YR_RECYCLE_TIME", "0"), ("YR_LOG_LEVEL", "loud")]);
        assert_eq!(cfg.recycle_time, DEFAULT_RECYCLE_TIME);
        assert_eq!(cfg.log_level, "info");
        expect_err(&cfg, &["YR_RECYCLE_TIME", "YR_LOG_LEVEL"]);
    }

    #[test]
    fn log_level_validation() {
        for level in ["trace", "debug", "info", "warn", "error", "off", "WARN"] {
            let mut cfg = Config::builtin();
            cfg.log_level = level.to_string();
            cfg.validate().unwrap();
        }
        for level in ["", "warning", "verbose"] {
            let mut cfg = Config::builtin();
            cfg.log_level = level.to_string();
            expect_err(&cfg, &["log_level", "trace, debug, info, warn, error, off"]);
        }
    }

    #[test]
    fn recycle_time_range() {
        let mut cfg = Config::builtin();
        cfg.recycle_time = Duration::from_millis(1);
        cfg.validate().unwrap();
        cfg.recycle_time = Duration::from_secs(300);
        cfg.validate().unwrap();
        for bad in [Duration::ZERO, Duration::from_secs(301)] {
            cfg.recycle_time = bad;
            expect_err(&cfg, &["recycle_time", "(0, 300] seconds"]);
        }
    }

    #[test]
    fn job_id_rules() {
        let mut cfg = Config::builtin();
        cfg.job_id = Some("a".repeat(64));
        cfg.validate().unwrap();
        for bad in [
            String::new(),
            "a".repeat(65),
            "job id".into(),
            "job/1".into(),
        ] {
            cfg.job_id = Some(bad);
            expect_err(&cfg, &["job_id", "1-64 characters"]);
        }
    }

    #[test]
    fn other_fields() {
        let mut cfg = Config::builtin();
        cfg.namespace = Some(String::new());
        expect_err(&cfg, &["namespace is an empty string"]);

        let mut cfg = Config::builtin();
        cfg.max_task_instance_num = 0;
        expect_err(&cfg, &["max_task_instance_num 0", "-1 (unlimited) or [1, "]);
        cfg.max_task_instance_num = 10;
        cfg.validate().unwrap();

        let mut cfg = Config::builtin();
        cfg.rpc_timeout = Duration::ZERO;
        expect_err(&cfg, &["rpc_timeout"]);
    }

    #[test]
    fn tls_files_must_name_files() {
        let mut cfg = Config::builtin();
        cfg.tls = Some(TlsFiles::new("", "k.pem", "ca.pem"));
        expect_err(&cfg, &["tls.certificate is an empty path"]);
        cfg.tls = Some(TlsFiles {
            server_name: Some(" ".into()),
            ..TlsFiles::new("c.pem", "k.pem", "ca.pem")
        });
        expect_err(&cfg, &["tls.server_name is an empty string"]);
    }

    #[test]
    fn a_deployment_needs_positive_resources_and_no_server_address() {
        let mut cfg = Config::builtin();
        cfg.deployment = Some(Deployment {
            cpu_millicores: Some(0),
            ..Deployment::default()
        });
        expect_err(&cfg, &["deployment cpu and memory must be greater than 0"]);
        cfg.deployment = Some(Deployment {
            cpu_millicores: Some(2000),
            spill_dir: Some("/tmp/spill".into()),
            ..Deployment::default()
        });
        cfg.validate().unwrap();
        assert_eq!(
            cfg.deployment.as_ref().map(Deployment::start_args),
            Some(
                ["--cpu", "2000", "--spill-dir", "/tmp/spill"]
                    .map(String::from)
                    .to_vec()
            )
        );
        cfg.server_address = Some("127.0.0.1:22770".into());
        expect_err(&cfg, &["cannot be combined with server_address"]);
    }
}
