//! Calling Python from Rust (docs/design/018-cross-language-calls.md): a Python function by
//! module and name ([`python_function`]), and instances of a Python class
//! ([`python_instance_class`]). They run in Python runtimes of the same cluster, which a node
//! starts from a Python interpreter with the `yr` package: `$YR_PYTHON`, else `python3` on
//! `PATH`, or the one a handle names ([`PythonFunction::interpreter`]).
//!
//! Arguments and results are MessagePack, the encoding every yr value has: pass any
//! `Serialize` values and read results as any `DeserializeOwned` type. Plain values cross as
//! Python's: integers as `int`, floats as `float`, strings as `str`, bytes
//! (`serde_bytes::ByteBuf`) as `bytes`, sequences and tuples as `list`, maps and structs as
//! `dict`, `None`/`()` as `None`. A name Python does not have is 1015, naming it.
//!
//! The runtime imports the module with the driver's working directory and `$PYTHONPATH` on
//! `sys.path`, and the directories a handle adds ([`PythonFunction::python_path`]).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use yr_common::{Error, InvokeOptions, Result};
use yr_runtime::codec;
use yr_runtime::cross_language::{self, python, Executable};
use yr_runtime::error::RuntimeError;
use yr_runtime::function::{Arg, CreateSpec, MethodSpec, TaskSpec};
use yr_runtime::object_store::ObjectHandle;

use crate::function::{checked_options, default_options};
use crate::ObjectRef;

/// Arguments of a call to Python: a tuple of `Serialize` values, each one positional argument
/// (`()` for none, `(a,)` for one). A struct arrives as a `dict` of its fields; an
/// [`ObjectRef`] inside a value arrives as a `yr.ObjectRef`, which the callee reads with
/// `yr.get`.
///
/// ```no_run
/// # fn main() -> yr::Result<()> {
/// #[derive(serde::Serialize)]
/// struct Order {
///     id: u64,
///     items: Vec<String>,
/// }
///
/// yr::init(yr::Config::default())?;
/// let order = Order { id: 7, items: vec!["tea".into()] };
/// // In Python, module `shop`: def total(order, discount): ... order["items"] ...
/// let total = yr::python_function("shop", "total").invoke::<f64>((order, 0.1))?;
/// # let _ = total;
/// # Ok(())
/// # }
/// ```
pub trait PythonArgs {
    /// Encode the arguments (MessagePack).
    fn into_values(self) -> Result<Vec<Arg>>;
}

macro_rules! python_args {
    ($($arg:ident $index:tt),*) => {
        impl<$($arg: Serialize),*> PythonArgs for ($($arg,)*) {
            #[allow(unused_variables)]
            fn into_values(self) -> Result<Vec<Arg>> {
                Ok(vec![$(Arg::from_value(codec::encode(&self.$index)?)),*])
            }
        }
    };
}

python_args!();
python_args!(A0 0);
python_args!(A0 0, A1 1);
python_args!(A0 0, A1 1, A2 2);
python_args!(A0 0, A1 1, A2 2, A3 3);
python_args!(A0 0, A1 1, A2 2, A3 3, A4 4);
python_args!(A0 0, A1 1, A2 2, A3 3, A4 4, A5 5);
python_args!(A0 0, A1 1, A2 2, A3 3, A4 4, A5 5, A6 6);
python_args!(A0 0, A1 1, A2 2, A3 3, A4 4, A5 5, A6 6, A7 7);
python_args!(A0 0, A1 1, A2 2, A3 3, A4 4, A5 5, A6 6, A7 7, A8 8);
python_args!(A0 0, A1 1, A2 2, A3 3, A4 4, A5 5, A6 6, A7 7, A8 8, A9 9);

/// Where Python code runs: the interpreter and the directories its runtime imports from.
#[derive(Clone, Debug, Default)]
struct PythonPlace {
    interpreter: Option<PathBuf>,
    python_path: Vec<PathBuf>,
}

impl PythonPlace {
    fn executable(&self) -> Result<Executable> {
        match &self.interpreter {
            Some(path) => Ok(Executable::python(path)),
            None => Executable::default_python(),
        }
    }

    /// `sys.path` entries and the working directory for the runtime (`yr._dispatch` takes
    /// them before it imports the module): the handle's directories, `$PYTHONPATH`, and the
    /// driver's working directory, which the runtime also moves to.
    fn sys_path(&self) -> (Vec<String>, String) {
        let cwd = std::env::current_dir()
            .map(|dir| dir.display().to_string())
            .unwrap_or_default();
        let mut path: Vec<String> = self
            .python_path
            .iter()
            .map(|dir| {
                std::path::absolute(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .display()
                    .to_string()
            })
            .collect();
        if let Some(python_path) = std::env::var_os("PYTHONPATH") {
            path.extend(std::env::split_paths(&python_path).map(|p| p.display().to_string()));
        }
        path.push(cwd.clone());
        (path, cwd)
    }
}

/// The first argument of a call to Python code: which function or class (`module`, `name`),
/// where to import it from, and how the values are laid out. `yr._dispatch` reads it.
#[derive(Serialize)]
struct Descriptor<'a> {
    module: &'a str,
    name: &'a str,
    sys_path: (Vec<String>, String),
    kwargs: [&'a str; 0],
    return_nums: usize,
}

/// The first argument of a method call on a Python instance.
#[derive(Serialize)]
struct MethodDescriptor<'a> {
    method: &'a str,
    kwargs: [&'a str; 0],
    return_nums: usize,
}

fn with_descriptor(descriptor: &impl Serialize, args: impl PythonArgs) -> Result<Vec<Arg>> {
    let mut all = vec![Arg::Value(codec::encode(descriptor)?)];
    all.extend(args.into_values()?);
    Ok(all)
}

fn one_result<R>(handles: Vec<ObjectHandle>, what: &str) -> Result<ObjectRef<R>> {
    let handle = handles
        .into_iter()
        .next()
        .ok_or_else(|| Error::from(RuntimeError::Bug(format!("{what} gave no result"))))?;
    Ok(ObjectRef::from_handle(handle))
}

/// Where a handle's Python code runs and with which options: the same builder methods on
/// [`PythonFunction`] and [`PythonInstanceClass`].
macro_rules! python_code_builder {
    ($handle:ident) => {
        impl $handle {
            /// Use `options` (resources, retries, `name`/`namespace`, `concurrency`, … as for
            /// Rust code). Invalid options fail the `invoke`.
            pub fn options(mut self, options: InvokeOptions) -> Self {
                self.options = checked_options(options);
                self
            }

            /// Run the code in the Python interpreter at `path` (with the `yr` package
            /// installed) instead of `$YR_PYTHON` or `python3` on `PATH`.
            pub fn interpreter(mut self, path: impl Into<PathBuf>) -> Self {
                self.place.interpreter = Some(path.into());
                self
            }

            /// Let the runtime import from directory `dir` too (added to its `sys.path`).
            pub fn python_path(mut self, dir: impl Into<PathBuf>) -> Self {
                self.place.python_path.push(dir.into());
                self
            }

            /// The descriptor of the code for the callee: its module and name, where to
            /// import it from.
            fn descriptor(&self) -> Descriptor<'_> {
                Descriptor {
                    module: &self.module,
                    name: &self.name,
                    sys_path: self.place.sys_path(),
                    kwargs: [],
                    return_nums: 1,
                }
            }
        }
    };
}

/// A Python function, called by module and name. Made by [`python_function`].
#[must_use = "a call does nothing until invoke"]
#[derive(Clone, Debug)]
pub struct PythonFunction {
    module: String,
    name: String,
    place: PythonPlace,
    options: Result<Arc<InvokeOptions>>,
}

/// The Python function `name` of module `module`, to call from Rust.
///
/// ```no_run
/// # fn main() -> yr::Result<()> {
/// yr::init(yr::Config::default())?;
/// // In Python, module `geometry`: def area(w, h): return w * h
/// let area = yr::python_function("geometry", "area").invoke::<f64>((3.0, 4.5))?;
/// assert_eq!(yr::get(&area, yr::FOREVER)?, 13.5);
/// # Ok(())
/// # }
/// ```
pub fn python_function(module: &str, name: &str) -> PythonFunction {
    PythonFunction {
        module: module.to_string(),
        name: name.to_string(),
        place: PythonPlace::default(),
        options: Ok(default_options()),
    }
}

python_code_builder!(PythonFunction);

impl PythonFunction {
    /// Call the function with positional `args`; returns the reference to its result at once.
    /// A name the module does not have (or a module that cannot be found) is 1015; an exception
    /// in the function is 2002 with its traceback.
    pub fn invoke<R>(&self, args: impl PythonArgs) -> Result<ObjectRef<R>> {
        let runtime = yr_runtime::current()?;
        let executable = self.place.executable()?;
        let task = TaskSpec {
            function: cross_language::function_entry(python::FUNCTION, 1),
            args: with_descriptor(&self.descriptor(), args)?,
            options: self.options.clone()?,
        };
        let handles = runtime.invoke_function_in(&executable, task)?;
        one_result(handles, "a Python function call")
    }
}

/// A Python class whose instances run in Python runtimes. Made by [`python_instance_class`].
#[must_use = "an instance is not created until invoke"]
#[derive(Clone, Debug)]
pub struct PythonInstanceClass {
    module: String,
    /// The class.
    name: String,
    place: PythonPlace,
    options: Result<Arc<InvokeOptions>>,
}

/// The Python class `class` of module `module`, to create instances of from Rust.
///
/// ```no_run
/// # fn main() -> yr::Result<()> {
/// yr::init(yr::Config::default())?;
/// // In Python, module `counters`: class Counter with __init__(self, start) and add(self, n).
/// let counter = yr::python_instance_class("counters", "Counter").invoke((10,))?;
/// let total = counter.method("add").invoke::<i64>((5,))?;
/// assert_eq!(yr::get(&total, yr::FOREVER)?, 15);
/// counter.terminate_sync()?;
/// # Ok(())
/// # }
/// ```
pub fn python_instance_class(module: &str, class: &str) -> PythonInstanceClass {
    PythonInstanceClass {
        module: module.to_string(),
        name: class.to_string(),
        place: PythonPlace::default(),
        options: Ok(default_options()),
    }
}

python_code_builder!(PythonInstanceClass);

impl PythonInstanceClass {
    /// Create an instance, passing `args` to the class's `__init__`; returns its handle at
    /// once. A class the module does not have is 1015 and a failing constructor 2002, both
    /// reported by the instance's first method result.
    pub fn invoke(&self, args: impl PythonArgs) -> Result<PythonInstance> {
        let runtime = yr_runtime::current()?;
        let executable = self.place.executable()?;
        let spec = CreateSpec {
            constructor: cross_language::constructor_entry(python::CONSTRUCTOR, python::CLASS),
            args: with_descriptor(&self.descriptor(), args)?,
            options: self.options.clone()?,
            class_name: None,
        };
        let info = runtime.create_instance_in(&executable, spec)?;
        Ok(PythonInstance {
            id: info.instance_id.into(),
        })
    }
}

/// A handle to an instance of a Python class. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PythonInstance {
    id: Arc<str>,
}

impl PythonInstance {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Prepare a call of the instance's method `name`.
    pub fn method(&self, name: &str) -> PythonMethod<'_> {
        PythonMethod {
            instance: self,
            name: name.to_string(),
        }
    }

    /// Ask the instance to stop and return at once (it runs its `__yr_shutdown__` hook).
    pub fn terminate(&self) -> Result<()> {
        yr_runtime::current()?.terminate_instance(&self.id, false)
    }

    /// Stop the instance and wait until it has exited.
    pub fn terminate_sync(&self) -> Result<()> {
        yr_runtime::current()?.terminate_instance(&self.id, true)
    }
}

/// A method call on a Python instance being prepared: `instance.method("add").invoke(args)`.
#[must_use = "a call does nothing until invoke"]
pub struct PythonMethod<'a> {
    instance: &'a PythonInstance,
    name: String,
}

impl PythonMethod<'_> {
    /// Call the method with positional `args`; returns the reference to its result at once.
    /// Calls on one instance run one at a time, in order. A method the instance does not have
    /// is 1015; an exception in it 2002 with its traceback.
    pub fn invoke<R>(&self, args: impl PythonArgs) -> Result<ObjectRef<R>> {
        let runtime = yr_runtime::current()?;
        let descriptor = MethodDescriptor {
            method: &self.name,
            kwargs: [],
            return_nums: 1,
        };
        let call = MethodSpec {
            method: cross_language::method_entry(python::METHOD, python::CLASS),
            args: with_descriptor(&descriptor, args)?,
            options: Default::default(),
        };
        let handles = runtime.invoke_method(&self.instance.id, call, 1)?;
        one_result(handles, "a Python method call")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_imports_from_the_handles_directories_then_the_drivers() {
        let place = PythonPlace {
            interpreter: None,
            python_path: vec![PathBuf::from("/srv/code")],
        };
        let (path, cwd) = place.sys_path();
        assert_eq!(path.first().map(String::as_str), Some("/srv/code"));
        assert_eq!(path.last(), Some(&cwd));
        assert_eq!(cwd, std::env::current_dir().unwrap().display().to_string());
    }

    #[test]
    fn a_descriptor_is_a_map_python_reads_as_a_dict() {
        let descriptor = Descriptor {
            module: "m",
            name: "f",
            sys_path: (vec!["/a".into()], "/a".into()),
            kwargs: [],
            return_nums: 1,
        };
        let value = codec::encode(&descriptor).unwrap();
        // A fixmap of five entries, never a pickle (0x80 0x05).
        assert_eq!(value.bytes[0], 0x85);
    }

    #[test]
    fn calls_to_python_in_local_mode_are_4006() {
        let _ = crate::init(crate::Config::local());
        let error = python_function("m", "f")
            .interpreter("/usr/bin/python3")
            .invoke::<i64>((1,))
            .unwrap_err();
        assert_eq!(
            error.code(),
            crate::ErrorCode::IncorrectFunctionUsage,
            "{error}"
        );
        assert!(error.message().contains("local mode"), "{error}");
        let error = python_instance_class("m", "C")
            .interpreter("/usr/bin/python3")
            .invoke(())
            .unwrap_err();
        assert_eq!(
            error.code(),
            crate::ErrorCode::IncorrectFunctionUsage,
            "{error}"
        );
        crate::finalize().unwrap();
    }
}
