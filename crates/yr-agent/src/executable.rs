//! Executables a client names for calls across languages (docs/design/018): a program built with
//! the `yr` crate that a Python driver calls, or the Python interpreter that a Rust driver's
//! calls run in. Unlike a driver's own binary, which the node checks against the executable the
//! driver process runs, such a file is only named, so the node checks that no one but the
//! caller's user (or root) could have put code in it ([`check_executable`]), hashes it like a
//! driver's binary, and chooses the runtime's arguments itself by language ([`runtime_args`]):
//! a client names a file, never a command line.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use yr_common::{Error, ErrorCode};
use yr_proto::v1 as pb;

/// Why the node refuses to run runtimes from an executable a client named.
#[derive(Debug, thiserror::Error)]
pub enum ExecutableRefused {
    /// The path is relative: the node and the client have different working directories.
    #[error("executable {path:?} is not an absolute path; name it from the root directory")]
    NotAbsolute {
        /// The path named.
        path: String,
    },
    /// The file cannot be read.
    #[error("executable {path:?} cannot be read: {source}; check that the path is right and exists on the node's machine")]
    Unreadable {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The path names a directory or a special file.
    #[error("executable {path:?} is not a regular file")]
    NotAFile {
        /// The path.
        path: String,
    },
    /// The file has no execute permission for its owner.
    #[error("executable {path:?} is not executable (mode {mode:o}); `chmod u+x` it")]
    NotExecutable {
        /// The path.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file, or a directory above it, belongs to another user.
    #[error("{what} {path:?} belongs to user {owner}, neither the caller's user ({uid}) nor root; the node runs only executables that the caller's user controls")]
    Owner {
        /// "executable" or "directory".
        what: &'static str,
        /// The file or directory.
        path: String,
        /// Its owner.
        owner: u32,
        /// The caller's user.
        uid: u32,
    },
    /// The file, or a directory above it, can be written by other users.
    #[error("{what} {path:?} is writable by {who} (mode {mode:o}); the node runs only executables that no other user can change: `chmod go-w` it")]
    Writable {
        /// "executable" or "directory".
        what: &'static str,
        /// The file or directory.
        path: String,
        /// "its group" or "every user".
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
}

impl ExecutableRefused {
    /// The code the client gets: 1001 for a path that names no executable, 1014 for a file
    /// that others could have changed.
    pub fn code(&self) -> ErrorCode {
        match self {
            ExecutableRefused::NotAbsolute { .. }
            | ExecutableRefused::Unreadable { .. }
            | ExecutableRefused::NotAFile { .. }
            | ExecutableRefused::NotExecutable { .. } => ErrorCode::ParamInvalid,
            ExecutableRefused::Owner { .. } | ExecutableRefused::Writable { .. } => {
                ErrorCode::AuthorizeFailed
            }
        }
    }
}

impl From<ExecutableRefused> for Error {
    fn from(error: ExecutableRefused) -> Error {
        Error::new(error.code(), error.to_string())
    }
}

/// The arguments a runtime of `language` starts with: none for a program built with the `yr`
/// crate (`yr::init` serves when the node starts it), `-m yr._runtime` for a Python
/// interpreter.
pub fn runtime_args(language: pb::Language) -> Vec<String> {
    match language {
        pb::Language::Rust => Vec::new(),
        pb::Language::Python => vec!["-m".to_string(), "yr._runtime".to_string()],
    }
}

/// Check that the node may run runtimes from the executable at `path` for a client of user
/// `uid`, and return its content key. The file, after symbolic links, must be a regular
/// executable file; it and every directory above it (as named, and after links) must belong to
/// `uid` or root and be writable by no one else (a directory with the sticky bit, like `/tmp`,
/// may be: others cannot replace what they do not own there). So whatever the node runs, only
/// the caller's user or root could have written, which is what the caller could run itself.
/// Blocking file work.
pub fn check_executable(path: &Path, uid: u32) -> Result<String, ExecutableRefused> {
    let named = path.display().to_string();
    if !path.is_absolute() {
        return Err(ExecutableRefused::NotAbsolute { path: named });
    }
    let resolved = path
        .canonicalize()
        .map_err(|source| ExecutableRefused::Unreadable {
            path: named.clone(),
            source,
        })?;
    let file = metadata(&resolved)?;
    if !file.is_file() {
        return Err(ExecutableRefused::NotAFile { path: named });
    }
    if file.mode() & 0o100 == 0 {
        return Err(ExecutableRefused::NotExecutable {
            path: named,
            mode: file.mode() & 0o7777,
        });
    }
    controlled("executable", &resolved, &file, uid)?;
    // The directories the path goes through as named (a link lives in one of them) and after
    // links.
    for directory in ancestors(path).chain(ancestors(&resolved)) {
        let meta = metadata(&directory)?;
        controlled("directory", &directory, &meta, uid)?;
    }
    let hash = yr_common::binary_hash(&resolved);
    if hash.is_empty() {
        return Err(ExecutableRefused::Unreadable {
            path: named,
            source: std::io::Error::other("its content could not be read"),
        });
    }
    Ok(hash)
}

fn metadata(path: &Path) -> Result<std::fs::Metadata, ExecutableRefused> {
    std::fs::metadata(path).map_err(|source| ExecutableRefused::Unreadable {
        path: path.display().to_string(),
        source,
    })
}

/// The directories above `path`, nearest first.
fn ancestors(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    path.ancestors().skip(1).map(Path::to_path_buf)
}

/// Whether only `uid` or root could change `path`.
fn controlled(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
    uid: u32,
) -> Result<(), ExecutableRefused> {
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(ExecutableRefused::Owner {
            what,
            path: path.display().to_string(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    let sticky_directory = meta.is_dir() && mode & 0o1000 != 0;
    let who = if mode & 0o002 != 0 {
        "every user"
    } else if mode & 0o020 != 0 {
        "its group"
    } else {
        return Ok(());
    };
    if sticky_directory {
        return Ok(());
    }
    Err(ExecutableRefused::Writable {
        what,
        path: path.display().to_string(),
        who,
        mode,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(label: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "yr-executable-{label}-{}-{}",
                std::process::id(),
                yr_common::ids::random_hex(4)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, mode: u32) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, b"#!/bin/sh\nexit 0\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn me() -> u32 {
        // SAFETY: getuid has no preconditions and touches no memory.
        unsafe { libc::getuid() }
    }

    #[test]
    fn an_executable_only_its_user_controls_is_hashed_like_a_driver_binary() {
        let scratch = Scratch::new("ok");
        let path = scratch.file("runtime", 0o755);
        let hash = check_executable(&path, me()).unwrap();
        assert_eq!(hash, yr_common::binary_hash(&path));
        // A link to it, in a directory the user controls, names the same file.
        let link = scratch.0.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(check_executable(&link, me()).unwrap(), hash);
    }

    #[test]
    fn a_path_that_names_no_executable_is_param_invalid() {
        let scratch = Scratch::new("bad");
        let cases = [
            PathBuf::from("relative/runtime"),
            scratch.0.join("missing"),
            scratch.0.clone(),
            scratch.file("not-executable", 0o644),
        ];
        for path in cases {
            let error = check_executable(&path, me()).unwrap_err();
            assert_eq!(error.code(), ErrorCode::ParamInvalid, "{error}");
            assert!(
                error.to_string().contains(&path.display().to_string()),
                "{error}"
            );
        }
    }

    #[test]
    fn a_file_or_directory_others_can_write_is_refused() {
        let scratch = Scratch::new("writable");
        let group = scratch.file("group-writable", 0o775);
        let error = check_executable(&group, me()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::AuthorizeFailed, "{error}");
        assert!(error.to_string().contains("its group"), "{error}");
        let everyone = scratch.file("world-writable", 0o757);
        let error = check_executable(&everyone, me()).unwrap_err();
        assert!(error.to_string().contains("every user"), "{error}");

        let open = scratch.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let inside = open.join("runtime");
        std::fs::write(&inside, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = check_executable(&inside, me()).unwrap_err();
        assert_eq!(error.code(), ErrorCode::AuthorizeFailed, "{error}");
        assert!(error.to_string().contains("directory"), "{error}");
        // With the sticky bit (like /tmp) others cannot replace the file: accepted.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_executable(&inside, me()).unwrap();
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        let scratch = Scratch::new("owner");
        let path = scratch.file("runtime", 0o755);
        let (file_owner, caller) = if me() == 0 {
            // Root gives the file away and asks as root.
            std::os::unix::fs::chown(&path, Some(54_321), None).unwrap();
            (54_321, 0)
        } else {
            // The file is this user's; another user asks.
            (me(), 54_321)
        };
        let error = check_executable(&path, caller).unwrap_err();
        assert_eq!(error.code(), ErrorCode::AuthorizeFailed, "{error}");
        assert!(
            error.to_string().contains(&format!("user {file_owner}")),
            "{error}"
        );
    }

    #[test]
    fn each_language_starts_with_the_arguments_the_node_chooses() {
        assert!(runtime_args(pb::Language::Rust).is_empty());
        assert_eq!(runtime_args(pb::Language::Python), ["-m", "yr._runtime"]);
    }
}
