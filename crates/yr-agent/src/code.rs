//! Code distribution: the binaries this node may run (by content key): drivers' own, and
//! executables registered for calls across languages; the functions its drivers registered;
//! and fetching a binary from the node that created an instance.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use yr_common::ErrorCode;
use yr_proto::v1 as pb;

use crate::manager::RuntimeSpec;

/// Binaries and functions known to this node.
#[derive(Default)]
pub struct CodeCatalog {
    state: Mutex<Catalog>,
}

#[derive(Default)]
struct Catalog {
    binaries: HashMap<String, RuntimeSpec>,
    functions: HashSet<String>,
    /// Binaries registered as executables for calls across languages and by no driver: the
    /// node does not know their functions, so their runtimes check the names.
    executables_only: HashSet<String>,
}

impl CodeCatalog {
    /// An empty catalog.
    pub fn new() -> CodeCatalog {
        CodeCatalog::default()
    }

    /// Runtimes of binary `hash` start as `spec`.
    pub fn add_binary(&self, hash: &str, spec: RuntimeSpec) {
        self.state.lock().binaries.insert(hash.to_string(), spec);
    }

    /// A driver registered binary `hash`, whose runtimes start as `spec`: its functions are
    /// among those registered with [`CodeCatalog::add_functions`].
    pub fn add_driver_binary(&self, hash: &str, spec: RuntimeSpec) {
        let mut state = self.state.lock();
        state.executables_only.remove(hash);
        state.binaries.insert(hash.to_string(), spec);
    }

    /// An executable `hash` was registered for calls across languages. A binary the node
    /// knows already keeps how its runtimes start (a driver's arguments stay); a new one starts
    /// as `spec`. Returns how its runtimes start.
    pub fn add_executable(&self, hash: &str, spec: RuntimeSpec) -> RuntimeSpec {
        let mut state = self.state.lock();
        if let Some(known) = state.binaries.get(hash) {
            return known.clone();
        }
        state.executables_only.insert(hash.to_string());
        state.binaries.insert(hash.to_string(), spec.clone());
        spec
    }

    /// Whether the node knows which functions binary `hash` has: not for an executable that
    /// only calls across languages registered (its runtimes check the names).
    pub fn knows_functions_of(&self, hash: &str) -> bool {
        !self.state.lock().executables_only.contains(hash)
    }

    /// The content key and start of the binary at `path`, if one was registered from there.
    /// Walks the catalog (a handful of binaries): for registrations, not for creates.
    pub fn binary_at(&self, path: &Path) -> Option<(String, RuntimeSpec)> {
        self.state
            .lock()
            .binaries
            .iter()
            .find(|(_, spec)| spec.binary_path == path)
            .map(|(hash, spec)| (hash.clone(), spec.clone()))
    }

    /// How to start a runtime of binary `hash`, if it is known.
    pub fn binary(&self, hash: &str) -> Option<RuntimeSpec> {
        self.state.lock().binaries.get(hash).cloned()
    }

    /// Whether binary `hash` is known.
    pub fn has_binary(&self, hash: &str) -> bool {
        self.state.lock().binaries.contains_key(hash)
    }

    /// `functions` are registered.
    pub fn add_functions(&self, functions: &[String]) {
        self.state
            .lock()
            .functions
            .extend(functions.iter().cloned());
    }

    /// Whether `function` is registered.
    pub fn has_function(&self, function: &str) -> bool {
        self.state.lock().functions.contains(function)
    }
}

/// Whether `hash` looks like a binary content key (`<32 hex>-<hex length>`), so it is safe as a
/// file name.
pub fn valid_binary_hash(hash: &str) -> bool {
    match hash.split_once('-') {
        Some((digest, length)) => {
            digest.len() == 32
                && !length.is_empty()
                && length.len() <= 16
                && digest
                    .bytes()
                    .chain(length.bytes())
                    .all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Fetch binary `hash` from the node at `creator` into `dir` (once: a binary already there is
/// reused). Returns its path, or why it could not be fetched.
pub async fn fetch_binary(dir: &Path, hash: &str, creator: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;
    if creator.is_empty() {
        return Err("no node to fetch it from".into());
    }
    if !valid_binary_hash(hash) {
        return Err(format!("{hash:?} is not a binary content key"));
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| e.to_string())?;
    let target = dir.join(hash);
    if target.is_file() {
        return Ok(target);
    }
    let channel = yr_transport::connect(creator, ErrorCode::UserCodeLoad)
        .await
        .map_err(|e| e.message().to_string())?;
    let mut client = pb::node_client::NodeClient::new(channel)
        .max_decoding_message_size(yr_transport::max_message_bytes());
    let mut chunks = client
        .fetch_binary(pb::FetchBinaryRequest {
            hash: hash.to_string(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let partial = dir.join(format!("{hash}.part-{}", yr_common::ids::random_hex(6)));
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| e.to_string())?;
    let mut size = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|s| s.message().to_string())?;
        size += chunk.data.len();
        file.write_all(&chunk.data)
            .await
            .map_err(|e| e.to_string())?;
    }
    file.sync_all().await.map_err(|e| e.to_string())?;
    drop(file);
    if size == 0 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err("the creator node sent an empty binary".into());
    }
    tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
        .await
        .map_err(|e| e.to_string())?;
    tokio::fs::rename(&partial, &target)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        hash,
        bytes = size,
        from = creator,
        "fetched a driver binary"
    );
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_content_keys_are_binary_file_names() {
        assert!(valid_binary_hash("0123456789abcdef0123456789abcdef-1f"));
        for bad in [
            "",
            "../../etc/passwd",
            "abc-1",
            "0123456789abcdef0123456789abcdef-",
            "0123456789abcdef0123456789abcdef-1/x",
        ] {
            assert!(!valid_binary_hash(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_catalog_knows_what_was_registered() {
        let catalog = CodeCatalog::new();
        catalog.add_functions(&["f".to_string()]);
        assert!(catalog.has_function("f") && !catalog.has_function("g"));
        assert!(catalog.binary("h").is_none());
        catalog.add_binary("h", spec("/bin/true", &[]));
        assert!(catalog.has_binary("h"));
    }

    fn spec(path: &str, args: &[&str]) -> RuntimeSpec {
        RuntimeSpec {
            binary_path: PathBuf::from(path),
            args: args.iter().map(|a| a.to_string()).collect(),
            job_id: String::new(),
            env: Vec::new(),
        }
    }

    #[test]
    fn an_executable_keeps_how_a_known_binary_starts_and_its_runtimes_check_names() {
        let catalog = CodeCatalog::new();
        catalog.add_driver_binary("driver", spec("/bin/driver", &["--exact", "a_test"]));
        let kept = catalog.add_executable("driver", spec("/bin/driver", &[]));
        assert_eq!(kept.args, ["--exact", "a_test"]);
        assert!(catalog.knows_functions_of("driver"));

        let new = catalog.add_executable("rust", spec("/bin/rust", &[]));
        assert_eq!(new.binary_path, PathBuf::from("/bin/rust"));
        assert!(!catalog.knows_functions_of("rust"));
        assert_eq!(
            catalog
                .binary_at(Path::new("/bin/rust"))
                .map(|(hash, _)| hash),
            Some("rust".to_string())
        );
        // A driver running it later registers its functions.
        catalog.add_driver_binary("rust", spec("/bin/rust", &[]));
        assert!(catalog.knows_functions_of("rust"));
        assert!(catalog.knows_functions_of("never-registered"));
    }
}
