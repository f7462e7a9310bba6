//! The binaries instances run: executables that clients register for calls across languages
//! (docs/design/018), and an instance's binary made available on this node before its runtime
//! starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use yr_agent::RuntimeSpec;
use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;

use super::create::gone;
use super::Node;
use crate::error::ProxyError;

impl Node {
    /// A registered driver or runtime asks to run runtimes from another executable: a program
    /// built with the `yr` crate, or a Python interpreter. A client on this machine names a
    /// file that its user (or root) controls, which is hashed here (off the async threads); a
    /// client over TCP only a path a client on this machine registered. The node chooses the
    /// runtime's arguments by language. A binary the node knows keeps how it starts.
    pub async fn register_executable(
        self: &Arc<Self>,
        client_id: u64,
        request: pb::RegisterExecutable,
    ) -> Result<pb::ExecutableRegistered, Error> {
        let Some(identity) = self.bus.identity(client_id) else {
            return Err(ProxyError::NotRegisteredYet { path: request.path }.into());
        };
        let language =
            pb::Language::try_from(request.language).map_err(|_| ProxyError::UnknownLanguage {
                path: request.path.clone(),
                language: request.language,
            })?;
        let path = PathBuf::from(&request.path);
        let Some(uid) = self.bus.uid(client_id) else {
            return self.remote_executable(&path);
        };
        let checked = path.clone();
        let hash = tokio::task::spawn_blocking(move || yr_agent::check_executable(&checked, uid))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorCode::InnerSystemError,
                    format!("checking executable {:?} failed: {e}", request.path),
                )
            })??;
        let spec = self.code.add_executable(
            &hash,
            RuntimeSpec {
                binary_path: path,
                args: yr_agent::runtime_args(language),
                job_id: identity.job_id,
                env: vec![("YR_BINARY_HASH".into(), hash.clone())],
            },
        );
        tracing::info!(executable = %request.path, %hash, ?language, "registered an executable");
        Ok(pb::ExecutableRegistered {
            binary_hash: hash,
            runtime_args: spec.args,
        })
    }

    /// A client over TCP names an executable: the node cannot tell its user, so only a path a
    /// client on this machine registered (as a driver or an executable) is accepted.
    fn remote_executable(&self, path: &Path) -> Result<pb::ExecutableRegistered, Error> {
        match self.code.binary_at(path) {
            Some((hash, spec)) => Ok(pb::ExecutableRegistered {
                binary_hash: hash,
                runtime_args: spec.args,
            }),
            None => Err(ProxyError::RemoteExecutable {
                path: path.display().to_string(),
                node: self.settings.node_id.clone(),
            }
            .into()),
        }
    }

    /// Make sure this node can start the instance's binary: known already, the same file on
    /// this machine (hashed off the async threads), or fetched by content key from the node
    /// that created it (2001 if not).
    pub(super) async fn ensure_binary(self: &Arc<Self>, instance_id: &str) -> Result<(), Error> {
        let (hash, path, args, job_id, creator) = self
            .instances
            .with(instance_id, |instance| {
                let record = instance.record();
                (
                    record.binary_hash.clone(),
                    PathBuf::from(&record.binary_path),
                    record.runtime_args.clone(),
                    record.job_id.clone(),
                    instance.creator_address.clone(),
                )
            })
            .ok_or_else(|| gone(instance_id))?;
        if self.code.has_binary(&hash) {
            return Ok(());
        }
        let spec = |binary_path: PathBuf| RuntimeSpec {
            binary_path,
            args: args.clone(),
            job_id: job_id.clone(),
            env: vec![("YR_BINARY_HASH".into(), hash.clone())],
        };
        if !self.settings.fetch_binaries {
            let local = path.clone();
            let same = tokio::task::spawn_blocking(move || {
                if local.is_file() {
                    yr_common::binary_hash(&local)
                } else {
                    String::new()
                }
            })
            .await
            .unwrap_or_default();
            if same == hash {
                self.code.add_binary(&hash, spec(path));
                return Ok(());
            }
        }
        let dir = self.settings.session_dir.join("binaries");
        let fetched = yr_agent::fetch_binary(&dir, &hash, &creator)
            .await
            .map_err(|reason| ProxyError::CodeDownload {
                instance: instance_id.to_string(),
                hash: hash.clone(),
                node: self.settings.node_id.clone(),
                creator: creator.clone(),
                reason,
            })?;
        self.code.add_binary(&hash, spec(fetched));
        Ok(())
    }
}
