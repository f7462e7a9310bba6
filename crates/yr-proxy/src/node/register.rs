//! Registration of drivers and runtimes on the bus. Nothing a client claims about itself is
//! taken on trust: its pid comes from the connection, a runtime must be one this node started
//! (the same process), and a driver's binary must be the executable the driver runs, hashed
//! here (off the async threads).

use std::path::PathBuf;
use std::sync::Arc;

use yr_agent::RuntimeSpec;
use yr_common::binary_hash;
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;

use super::Node;
use crate::client_bus::Identity;
use crate::error::ProxyError;

impl Node {
    /// A client registered (1014 or 1001 if it is not what it says, and nothing is
    /// registered).
    pub async fn register(
        self: &Arc<Self>,
        client_id: u64,
        register: pb::RegisterClient,
    ) -> Result<pb::RegisterReply, Error> {
        let kind = pb::ClientKind::try_from(register.kind).map_err(|_| {
            Error::new(
                ErrorCode::ParamInvalid,
                format!("unknown client kind {} in a registration", register.kind),
            )
        })?;
        let pid = self.bus.pid(client_id);
        match kind {
            pb::ClientKind::Runtime => self.check_runtime(&register.runtime_id, pid)?,
            pb::ClientKind::Driver if pid != 0 => {
                let register = register.clone();
                tokio::task::spawn_blocking(move || check_driver_binary(&register, pid))
                    .await
                    .map_err(|e| {
                        Error::new(
                            ErrorCode::InnerSystemError,
                            format!("checking a driver's binary failed: {e}"),
                        )
                    })??
            }
            pb::ClientKind::Driver => self.check_remote_driver(&register)?,
        }
        self.bus.identify(
            client_id,
            Identity {
                kind,
                job_id: register.job_id.clone(),
                runtime_id: register.runtime_id.clone(),
                // The Unix socket: the address's first part (`;tcp=…` and `;calls=…` follow
                // for callers on other hosts).
                socket: register
                    .listen_address
                    .split(';')
                    .next()
                    .and_then(|base| base.strip_prefix("unix:"))
                    .map(PathBuf::from),
            },
        );
        match kind {
            pb::ClientKind::Runtime => {
                self.runtimes
                    .registered(&register.runtime_id, client_id, &register.listen_address);
                // A runtime runs a binary this node started, perhaps for another node's driver:
                // the instances its user code creates here name functions of that binary.
                self.code.add_functions(&register.functions);
            }
            // A remote driver uses a binary a local driver registered; it changes nothing.
            pb::ClientKind::Driver if pid == 0 => self.code.add_functions(&register.functions),
            pb::ClientKind::Driver => {
                let spec = RuntimeSpec {
                    binary_path: PathBuf::from(&register.binary_path),
                    args: register.runtime_args.clone(),
                    job_id: register.job_id.clone(),
                    env: vec![("YR_BINARY_HASH".into(), register.binary_hash.clone())],
                };
                self.code.add_driver_binary(&register.binary_hash, spec);
                self.code.add_functions(&register.functions);
                self.records.write_functions(register.functions.clone());
                self.fill_warm_pool(&register.binary_hash);
            }
        }
        Ok(pb::RegisterReply {
            node_id: self.settings.node_id.clone(),
            session_dir: self.settings.session_dir.display().to_string(),
        })
    }

    /// A driver on another machine (over TCP) registers: its binary must be one a driver on
    /// this machine registered, since the node cannot verify a remote process's executable.
    fn check_remote_driver(&self, register: &pb::RegisterClient) -> Result<(), Error> {
        if self.code.has_binary(&register.binary_hash) {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::AuthorizeFailed,
            format!(
                "a driver connected over TCP registered binary {:?} ({:?}), which no driver on \
                 node {} registered; the node runs only executables that a driver on its own \
                 machine runs",
                register.binary_path, register.binary_hash, self.settings.node_id
            ),
        ))
    }

    /// A runtime registers: it must be a runtime this node started, in the same process.
    fn check_runtime(&self, runtime_id: &str, pid: u32) -> Result<(), Error> {
        match self.runtimes.pid(runtime_id) {
            Some(started) if started == pid && pid != 0 => Ok(()),
            _ => Err(Error::new(
                ErrorCode::AuthorizeFailed,
                format!(
                    "process {pid} registered as runtime {runtime_id:?}, which node {} did not \
                     start in that process; only runtimes the node starts register as runtimes",
                    self.settings.node_id
                ),
            )),
        }
    }

    /// Whether a create from a bus client names a binary registered on this node by a driver
    /// (or fetched for an instance placed here). A client cannot make the node run anything
    /// else.
    pub(super) fn check_create_binary(&self, request: &pb::CreateRequest) -> Result<(), Error> {
        if self.code.has_binary(&request.binary_hash) {
            return Ok(());
        }
        Err(ProxyError::BinaryNotRegistered {
            hash: request.binary_hash.clone(),
            node: self.settings.node_id.clone(),
        }
        .into())
    }
}

/// A driver on this machine registers its binary: it must be the executable that the driver
/// process (`pid`, from the connection) runs, and its content key is computed here. So the node
/// runs only code a driver of the cluster runs itself, never a path a client merely names.
/// Blocking file work.
fn check_driver_binary(register: &pb::RegisterClient, pid: u32) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let path = std::path::Path::new(&register.binary_path);
    let refused = |why: String| {
        Error::new(
            ErrorCode::AuthorizeFailed,
            format!(
                "driver binary {:?} refused: {why}; a driver registers the executable it runs",
                register.binary_path
            ),
        )
    };
    let named = std::fs::metadata(path).map_err(|e| refused(format!("cannot read it: {e}")))?;
    if !named.is_file() {
        return Err(refused("it is not a file".into()));
    }
    let running = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map_err(|e| refused(format!("cannot read process {pid}'s executable: {e}")))?;
    if (running.dev(), running.ino()) != (named.dev(), named.ino()) {
        return Err(refused(format!(
            "process {pid} does not run that executable"
        )));
    }
    let hash = binary_hash(path);
    if hash.is_empty() || hash != register.binary_hash {
        return Err(refused(format!(
            "its content key is {hash:?}, not the {:?} the driver sent (was it rebuilt?)",
            register.binary_hash
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_registers_only_the_executable_it_runs() {
        let me = std::env::current_exe().expect("this test's executable");
        let mut register = pb::RegisterClient {
            binary_path: me.display().to_string(),
            binary_hash: binary_hash(&me),
            ..Default::default()
        };
        let pid = std::process::id();
        assert!(check_driver_binary(&register, pid).is_ok());
        register.binary_path = "/bin/sh".into();
        register.binary_hash = binary_hash(std::path::Path::new("/bin/sh"));
        let error = check_driver_binary(&register, pid).expect_err("not this process's binary");
        assert_eq!(error.code(), ErrorCode::AuthorizeFailed);
        register.binary_path = me.display().to_string();
        register.binary_hash = "0123456789abcdef0123456789abcdef-1".into();
        assert!(
            check_driver_binary(&register, pid).is_err(),
            "a wrong content key"
        );
    }
}
