//! The binaries this process's creates name: its own (the driver's executable, or the one its
//! node started it from), or an executable registered with the node for calls across languages
//! (design 018). A registration is one request per executable and connection: the node checks
//! and hashes the file and answers its content key and the arguments it starts runtimes with.

use std::sync::Arc;

use yr_common::Error;
use yr_proto::v1 as pb;

use super::{bus, Inner};
use crate::cross_language::Executable;
use crate::error::RuntimeError;

/// A binary as a create names it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Binary {
    /// Its path on the node's machine.
    pub path: String,
    /// Its content key.
    pub hash: String,
    /// The arguments its runtimes start with.
    pub args: Vec<String>,
}

impl Inner {
    /// The binary of `executable`: registered with the node on first use (1001 or 1014 if the
    /// node refuses it).
    pub(super) fn binary_of(&self, executable: &Executable) -> Result<Arc<Binary>, Error> {
        if let Some(known) = self.executables.lock().get(executable) {
            return Ok(known.clone());
        }
        let path = executable.path().display().to_string();
        let reply = self.bus.request_blocking(
            pb::bus_request::Body::RegisterExecutable(pb::RegisterExecutable {
                path: path.clone(),
                language: pb::Language::from(executable.language()) as i32,
            }),
            bus::REQUEST_TIMEOUT,
        )?;
        let pb::bus_response::Body::Executable(registered) = reply else {
            return Err(RuntimeError::UnexpectedAnswer {
                request: "an executable's registration",
                answer: format!("{reply:?}"),
            }
            .into());
        };
        let binary = Arc::new(Binary {
            path,
            hash: registered.binary_hash,
            args: registered.runtime_args,
        });
        self.executables
            .lock()
            .insert(executable.clone(), binary.clone());
        Ok(binary)
    }
}
