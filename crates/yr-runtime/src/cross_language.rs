//! Calls across languages (docs/design/018): code that lives in another executable than this
//! process's, a program built with the `yr` crate or Python code that a Python interpreter
//! runs. The caller has no entry point of its own for such code: [`function_entry`],
//! [`constructor_entry`] and [`method_entry`] make entries that only carry the name the callee's
//! runtime looks up, and [`Executable`] says which file the node starts the runtime from.
//! Values cross as MessagePack, the core's own encoding, so plain values (numbers, strings,
//! bytes, lists, maps) read the same in both languages.
//!
//! Only a cluster runs another executable: in local mode these calls are 4006.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use parking_lot::Mutex;
use yr_common::{Error, Result};

use crate::error::RuntimeError;
use crate::function::{
    Arg, ConstructorEntry, FunctionEntry, InstanceState, MethodCall, MethodEntry, Returns,
};

/// The names Python runtimes register (crate `yr-python`), which callers in other languages
/// name. Which Python function, class or method a call means travels in its first argument.
pub mod python {
    /// Every Python stateless function.
    pub const FUNCTION: &str = "yr.python.function";
    /// The class of every Python instance.
    pub const CLASS: &str = "yr.python.Instance";
    /// The constructor of every Python class.
    pub const CONSTRUCTOR: &str = "yr.python.Instance.__init__";
    /// Every Python method that takes the instance alone.
    pub const METHOD: &str = "yr.python.Instance.__call__";
    /// Every Python `async def` method.
    pub const ASYNC_METHOD: &str = "yr.python.Instance.__acall__";
}

/// The language of an executable's runtimes; the node chooses how to start them by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Language {
    /// A program built with the `yr` crate.
    Rust,
    /// A Python interpreter with the `yr` package installed.
    Python,
}

/// An executable whose runtimes run code this process calls. The node runs it only if the
/// caller's user (or root) controls the file and every directory above it (docs/design/018).
///
/// ```
/// use yr_runtime::cross_language::{Executable, Language};
///
/// let rust = Executable::rust("/opt/app/bin/worker");
/// assert_eq!(rust.language(), Language::Rust);
/// assert_eq!(rust.path(), std::path::Path::new("/opt/app/bin/worker"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Executable {
    language: Language,
    path: PathBuf,
}

impl Executable {
    /// A program built with the `yr` crate at `path` (a relative path is taken from this
    /// process's working directory).
    pub fn rust(path: impl AsRef<Path>) -> Executable {
        Executable::new(Language::Rust, path.as_ref())
    }

    /// A Python interpreter at `path` with the `yr` package installed (a virtual
    /// environment's `python` keeps its environment: the path is not resolved).
    pub fn python(path: impl AsRef<Path>) -> Executable {
        Executable::new(Language::Python, path.as_ref())
    }

    /// The Python interpreter of `$YR_PYTHON`, else `python3` on `PATH` (1001 if there is
    /// none).
    pub fn default_python() -> Result<Executable> {
        if let Some(path) = std::env::var_os("YR_PYTHON").filter(|p| !p.is_empty()) {
            return Ok(Executable::python(PathBuf::from(path)));
        }
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("python3"))
                .find(|candidate| candidate.is_file())
        });
        found.map(Executable::python).ok_or_else(|| {
            RuntimeError::NoPythonInterpreter {
                detail: "YR_PYTHON is not set and no python3 is on PATH".to_string(),
            }
            .into()
        })
    }

    fn new(language: Language, path: &Path) -> Executable {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Executable { language, path }
    }

    /// Its language.
    pub fn language(&self) -> Language {
        self.language
    }

    /// Its absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The entry of function `name` in another executable, returning `return_nums` values: the
/// name its runtime looks up. This process cannot run it.
///
/// ```
/// let entry = yr_runtime::cross_language::function_entry("worker::add", 1);
/// assert_eq!(entry.name, "worker::add");
/// ```
pub fn function_entry(name: &str, return_nums: usize) -> FunctionEntry {
    FunctionEntry {
        name: intern(name),
        call: elsewhere_call,
        return_nums,
    }
}

/// The entry of constructor `name` of `class` in another executable.
pub fn constructor_entry(name: &str, class: &str) -> ConstructorEntry {
    ConstructorEntry {
        name: intern(name),
        class: intern(class),
        call: elsewhere_construct,
        shutdown: None,
    }
}

/// The entry of method `name` of `class` in another executable.
pub fn method_entry(name: &str, class: &str) -> MethodEntry {
    MethodEntry {
        name: intern(name),
        class: intern(class),
        call: MethodCall::Exclusive(elsewhere_method),
    }
}

/// The names entries carry live as long as the process (entries hold `&'static str`): each
/// distinct name is kept once.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(|| Mutex::new(HashSet::new())).lock();
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(leaked);
    leaked
}

fn ran_here(kind: &str) -> Error {
    RuntimeError::Bug(format!(
        "a {kind} of another executable was run in this process"
    ))
    .into()
}

fn elsewhere_call(_: &[Arg]) -> Result<Returns> {
    Err(ran_here("function"))
}

fn elsewhere_construct(_: &[Arg]) -> Result<Box<InstanceState>> {
    Err(ran_here("constructor"))
}

fn elsewhere_method(_: &mut InstanceState, _: &[Arg]) -> Result<Returns> {
    Err(ran_here("method"))
}

/// The error of a call across languages where only this process's code runs (local mode).
pub(crate) fn needs_cluster(executable: &Executable, what: &str) -> Error {
    RuntimeError::CrossLanguageInLocalMode {
        what: what.to_string(),
        executable: executable.path().display().to_string(),
    }
    .into()
}

impl From<Language> for yr_proto::v1::Language {
    fn from(language: Language) -> Self {
        match language {
            Language::Rust => yr_proto::v1::Language::Rust,
            Language::Python => yr_proto::v1::Language::Python,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yr_common::ErrorCode;

    #[test]
    fn an_entry_of_another_executable_names_its_code_and_never_runs_here() {
        let entry = function_entry("worker::add", 2);
        assert_eq!((entry.name, entry.return_nums), ("worker::add", 2));
        let again = function_entry("worker::add", 1);
        assert!(std::ptr::eq(entry.name, again.name), "names are kept once");
        let error = (entry.call)(&[]).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InnerSystemError);
        let constructor = constructor_entry("worker::Counter::new", "worker::Counter");
        assert_eq!(constructor.class, "worker::Counter");
        assert!((constructor.call)(&[]).is_err());
    }

    #[test]
    fn a_relative_executable_is_taken_from_the_working_directory() {
        let executable = Executable::rust("bin/worker");
        assert!(executable.path().is_absolute());
        assert!(executable.path().ends_with("bin/worker"));
        let python = Executable::python("/venv/bin/python");
        assert_eq!(python.path(), Path::new("/venv/bin/python"));
        assert_eq!(python.language(), Language::Python);
    }
}
