//! What a call is, type-erased: the entry points the macros generate for functions, instance
//! constructors, methods and shutdown hooks; arguments as values or references; and the
//! process-wide registry of entry points that a runtime uses to find code by name.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use yr_common::{Error, ErrorCode, InvokeOptions, Result};

use crate::error::{EntryKind, RuntimeError};
use crate::object_store::{ObjectHandle, ObjectSlot, Outcome, Payload, StoredValue};

/// An instance's state, type-erased.
pub type InstanceState = dyn Any + Send + Sync;

/// What a call returns: one value, or several with `return_nums`.
#[derive(Debug)]
pub enum Returns {
    /// One value.
    One(StoredValue),
    /// Several values, in order.
    Many(Vec<StoredValue>),
}

impl Returns {
    /// How many values.
    pub fn len(&self) -> usize {
        match self {
            Returns::One(_) => 1,
            Returns::Many(values) => values.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, in order.
    pub fn into_vec(self) -> Vec<StoredValue> {
        match self {
            Returns::One(value) => vec![value],
            Returns::Many(values) => values,
        }
    }
}

/// Runs a stateless function on encoded arguments.
pub type CallFn = fn(&[Arg]) -> Result<Returns>;
/// Runs a constructor on encoded arguments and returns the new instance's state.
pub type ConstructFn = fn(&[Arg]) -> Result<Box<InstanceState>>;
/// Runs a method that takes `&self`.
pub type SharedMethodFn = fn(&InstanceState, &[Arg]) -> Result<Returns>;
/// Runs a method that takes `&mut self`.
pub type ExclusiveMethodFn = fn(&mut InstanceState, &[Arg]) -> Result<Returns>;
/// Runs an instance's shutdown hook with its grace period.
pub type ShutdownFn = fn(&mut InstanceState, Duration);

/// A stateless function's entry point.
#[derive(Clone, Copy, Debug)]
pub struct FunctionEntry {
    /// The function's path, for example `my_crate::say_hello`.
    pub name: &'static str,
    /// The entry point.
    pub call: CallFn,
    /// How many values it returns.
    pub return_nums: usize,
}

/// An instance constructor's entry point.
#[derive(Clone, Copy, Debug)]
pub struct ConstructorEntry {
    /// The constructor's path, for example `my_crate::Counter::new`.
    pub name: &'static str,
    /// The class's path, for example `my_crate::Counter`.
    pub class: &'static str,
    /// The entry point.
    pub call: ConstructFn,
    /// The class's shutdown hook, if it has one.
    pub shutdown: Option<ShutdownFn>,
}

/// How a method borrows its instance.
#[derive(Clone, Copy, Debug)]
pub enum MethodCall {
    /// `&self`: may run concurrently with other `&self` methods.
    Shared(SharedMethodFn),
    /// `&mut self`: runs alone.
    Exclusive(ExclusiveMethodFn),
}

/// An instance method's entry point.
#[derive(Clone, Copy, Debug)]
pub struct MethodEntry {
    /// The method's path, for example `my_crate::Counter::incr`.
    pub name: &'static str,
    /// The class's path.
    pub class: &'static str,
    /// The entry point.
    pub call: MethodCall,
}

inventory::collect!(FunctionEntry);
inventory::collect!(ConstructorEntry);
inventory::collect!(MethodEntry);

/// One argument of a call: an encoded value, or a reference whose value the callee receives.
#[derive(Debug)]
pub enum Arg {
    /// The value, encoded by the caller.
    Value(StoredValue),
    /// A reference; the call waits for it and the callee receives its value.
    Ref(ObjectHandle),
}

impl Arg {
    /// An argument passed by value. A value whose encoding lies in shared memory (above
    /// [`INLINE_LIMIT`](crate::shared_memory::INLINE_LIMIT)) and holds no references becomes
    /// an object of this process, passed by reference: the callee reads it in place on this
    /// node, or its node pulls it, instead of the bytes travelling inside the call. (A value
    /// holding references stays a value, so that the call still waits for them.)
    ///
    /// ```
    /// use yr_runtime::function::Arg;
    /// use yr_runtime::object_store::StoredValue;
    ///
    /// // Outside a cluster there is no shared memory: values stay values.
    /// let arg = Arg::from_value(StoredValue::default());
    /// assert!(matches!(arg, Arg::Value(_)));
    /// ```
    pub fn from_value(value: StoredValue) -> Arg {
        if value.nested.is_empty() && matches!(value.bytes, Payload::Shared(_)) {
            return Arg::Ref(ObjectSlot::ready(value));
        }
        Arg::Value(value)
    }

    /// The objects this argument depends on: the reference itself, or those nested in the value.
    pub fn dependencies(&self) -> &[ObjectHandle] {
        match self {
            Arg::Value(value) => &value.nested,
            Arg::Ref(handle) => std::slice::from_ref(handle),
        }
    }

    /// The argument's encoded bytes. A reference must be finished with a value.
    pub fn bytes(&self) -> Result<ArgBytes<'_>> {
        match self {
            Arg::Value(value) => Ok(ArgBytes::Borrowed(&value.bytes)),
            Arg::Ref(handle) => match handle.outcome() {
                Some(Outcome::Ready(value)) => Ok(ArgBytes::Shared(value)),
                Some(Outcome::Failed(error)) => Err(dependency_failed(handle, &error)),
                None => Err(RuntimeError::Bug(format!(
                    "argument {} was not resolved before the call ran",
                    handle.id()
                ))
                .into()),
            },
        }
    }
}

/// The bytes of an argument: borrowed from the call, or shared with the object store.
pub enum ArgBytes<'a> {
    /// Inline in the call.
    Borrowed(&'a [u8]),
    /// An object's value.
    Shared(Arc<StoredValue>),
}

impl Deref for ArgBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ArgBytes::Borrowed(bytes) => bytes,
            ArgBytes::Shared(value) => &value.bytes,
        }
    }
}

/// The error a call gets when its instance has exited (1007).
pub fn instance_exited(instance_id: &str) -> Error {
    Error::new(
        ErrorCode::InstanceExited,
        format!(
            "instance {instance_id} has exited (terminated or killed); create a new instance to call it"
        ),
    )
}

/// The error a call gets when an object it depends on failed (4306).
pub fn dependency_failed(handle: &ObjectHandle, error: &Error) -> Error {
    // Finalization is not a failure of the dependency: the call fails the same way.
    if error.code() == ErrorCode::Finalized {
        return error.clone();
    }
    // The failure's own encoding (a remote exception) goes along, so an SDK can re-raise it.
    Error::new(
        ErrorCode::DependencyFailed,
        format!(
            "dependency request failed, request id: {}, internal code: {}, internal msg: {}",
            handle.id(),
            error.code().number(),
            error.message()
        ),
    )
    .with_payload(error.payload().to_vec())
}

/// A stateless call, ready to submit.
pub struct TaskSpec {
    /// What to run.
    pub function: FunctionEntry,
    /// The arguments.
    pub args: Vec<Arg>,
    /// The options; validated.
    pub options: Arc<InvokeOptions>,
}

/// An instance creation, ready to submit.
pub struct CreateSpec {
    /// The constructor.
    pub constructor: ConstructorEntry,
    /// The arguments.
    pub args: Vec<Arg>,
    /// The options; validated.
    pub options: Arc<InvokeOptions>,
    /// The class as its users name it, when one constructor entry serves many classes (every
    /// Python class, `module.QualName`): what `yr status` shows, and what a named create
    /// compares with the class of the instance that holds the name. `None`: the
    /// constructor's class.
    pub class_name: Option<String>,
}

impl CreateSpec {
    /// The class as its users name it: [`CreateSpec::class_name`], else the constructor's.
    pub fn class(&self) -> &str {
        self.class_name.as_deref().unwrap_or(self.constructor.class)
    }
}

/// A method call, ready to submit.
pub struct MethodSpec {
    /// The method.
    pub method: MethodEntry,
    /// The arguments.
    pub args: Vec<Arg>,
    /// This call's options; validated. A method call honours `timeout_s` alone
    /// ([`InvokeOptions::check_for_method`]); the default for none.
    pub options: Arc<InvokeOptions>,
}

struct Registry {
    functions: HashMap<&'static str, &'static FunctionEntry>,
    constructors: HashMap<&'static str, &'static ConstructorEntry>,
    methods: HashMap<&'static str, &'static MethodEntry>,
    /// Names registered more than once: a call by such a name is ambiguous.
    twice: HashSet<(EntryKind, &'static str)>,
}

/// The entries by name; a name seen again goes into `twice`.
fn index<E: 'static>(
    entries: impl IntoIterator<Item = &'static E>,
    name: impl Fn(&E) -> &'static str,
    kind: EntryKind,
    twice: &mut HashSet<(EntryKind, &'static str)>,
) -> HashMap<&'static str, &'static E> {
    let mut by_name = HashMap::new();
    for entry in entries {
        if by_name.insert(name(entry), entry).is_some() {
            twice.insert((kind, name(entry)));
        }
    }
    by_name
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut twice = HashSet::new();
        Registry {
            functions: index(
                inventory::iter::<FunctionEntry>,
                |e| e.name,
                EntryKind::Function,
                &mut twice,
            ),
            constructors: index(
                inventory::iter::<ConstructorEntry>,
                |e| e.name,
                EntryKind::Constructor,
                &mut twice,
            ),
            methods: index(
                inventory::iter::<MethodEntry>,
                |e| e.name,
                EntryKind::Method,
                &mut twice,
            ),
            twice,
        }
    })
}

/// 4007 (a constructor) or 4008 (a function or method) if `name` is registered more than once
/// in this binary, so that a runtime could not tell which one a call means.
pub fn check_unique(kind: EntryKind, name: &'static str) -> Result<()> {
    let twice = &registry().twice;
    if twice.is_empty() || !twice.contains(&(kind, name)) {
        return Ok(());
    }
    Err(RuntimeError::RegisteredTwice {
        kind,
        name: name.to_string(),
    }
    .into())
}

/// 1015: a call names an entry point this executable does not register (a wrong name, or a
/// call across languages to a program without it).
fn not_registered(kind: EntryKind, name: &str) -> Error {
    let executable = std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "of this process".to_string());
    RuntimeError::NotRegistered {
        kind,
        name: name.to_string(),
        executable,
    }
    .into()
}

/// The registered function with this name: 1015 if there is none, 4008 if there are several.
pub fn find_function(name: &str) -> Result<&'static FunctionEntry> {
    let entry = registry()
        .functions
        .get(name)
        .copied()
        .ok_or_else(|| not_registered(EntryKind::Function, name))?;
    check_unique(EntryKind::Function, entry.name)?;
    Ok(entry)
}

/// The registered constructor with this name: 1015 if there is none, 4007 if there are several.
pub fn find_constructor(name: &str) -> Result<&'static ConstructorEntry> {
    let entry = registry()
        .constructors
        .get(name)
        .copied()
        .ok_or_else(|| not_registered(EntryKind::Constructor, name))?;
    check_unique(EntryKind::Constructor, entry.name)?;
    Ok(entry)
}

/// The registered method with this name: 1015 if there is none, 4008 if there are several.
pub fn find_method(name: &str) -> Result<&'static MethodEntry> {
    let entry = registry()
        .methods
        .get(name)
        .copied()
        .ok_or_else(|| not_registered(EntryKind::Method, name))?;
    check_unique(EntryKind::Method, entry.name)?;
    Ok(entry)
}

/// The names of every registered function, constructor and method.
pub fn registered_names() -> Vec<&'static str> {
    let registry = registry();
    let mut names: Vec<&'static str> = registry
        .functions
        .keys()
        .chain(registry.constructors.keys())
        .chain(registry.methods.keys())
        .copied()
        .collect();
    names.sort_unstable();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nothing(_: &[Arg]) -> Result<Returns> {
        Ok(Returns::Many(Vec::new()))
    }

    fn construct(_: &[Arg]) -> Result<Box<InstanceState>> {
        Ok(Box::new(()))
    }

    fn method(_: &InstanceState, _: &[Arg]) -> Result<Returns> {
        Ok(Returns::Many(Vec::new()))
    }

    // Two versions of one crate linked into a binary register the same paths twice.
    const TWICE_FUNCTION: FunctionEntry = FunctionEntry {
        name: "yr_runtime::function::tests::twice",
        call: nothing,
        return_nums: 1,
    };
    const TWICE_CONSTRUCTOR: ConstructorEntry = ConstructorEntry {
        name: "yr_runtime::function::tests::Twice::new",
        class: "yr_runtime::function::tests::Twice",
        call: construct,
        shutdown: None,
    };
    const TWICE_METHOD: MethodEntry = MethodEntry {
        name: "yr_runtime::function::tests::Twice::get",
        class: "yr_runtime::function::tests::Twice",
        call: MethodCall::Shared(method),
    };
    const ONCE_FUNCTION: FunctionEntry = FunctionEntry {
        name: "yr_runtime::function::tests::once",
        call: nothing,
        return_nums: 1,
    };
    inventory::submit! { TWICE_FUNCTION }
    inventory::submit! { TWICE_FUNCTION }
    inventory::submit! { TWICE_CONSTRUCTOR }
    inventory::submit! { TWICE_CONSTRUCTOR }
    inventory::submit! { TWICE_METHOD }
    inventory::submit! { TWICE_METHOD }
    inventory::submit! { ONCE_FUNCTION }

    #[test]
    fn a_function_or_method_registered_twice_is_an_invoke_usage_error() {
        let error = find_function(TWICE_FUNCTION.name).unwrap_err();
        assert_eq!(error.code(), ErrorCode::IncorrectInvokeUsage, "{error}");
        assert!(error.message().contains(TWICE_FUNCTION.name), "{error}");
        let error = check_unique(EntryKind::Function, TWICE_FUNCTION.name).unwrap_err();
        assert_eq!(error.code(), ErrorCode::IncorrectInvokeUsage);
        let error = find_method(TWICE_METHOD.name).unwrap_err();
        assert_eq!(error.code(), ErrorCode::IncorrectInvokeUsage, "{error}");
        assert!(error.message().contains("method"), "{error}");
    }

    #[test]
    fn a_constructor_registered_twice_is_a_create_usage_error() {
        let error = find_constructor(TWICE_CONSTRUCTOR.name).unwrap_err();
        assert_eq!(error.code(), ErrorCode::IncorrectCreateUsage, "{error}");
        assert!(error.message().contains(TWICE_CONSTRUCTOR.name), "{error}");
    }

    #[test]
    fn a_failed_dependency_keeps_the_failures_own_encoding() {
        let handle = ObjectSlot::pending();
        let failure = Error::new(ErrorCode::UserFunctionException, "ValueError: bad")
            .with_payload(b"pickled exception".to_vec());
        let error = dependency_failed(&handle, &failure);
        assert_eq!(error.code(), ErrorCode::DependencyFailed);
        assert!(error.message().contains("ValueError: bad"), "{error}");
        assert_eq!(error.payload(), b"pickled exception");
    }

    #[test]
    fn a_function_registered_once_is_found_and_an_unknown_one_is_1015_naming_it() {
        assert_eq!(
            find_function(ONCE_FUNCTION.name).unwrap().name,
            ONCE_FUNCTION.name
        );
        check_unique(EntryKind::Function, ONCE_FUNCTION.name).unwrap();
        let error = find_function("yr_runtime::function::tests::nobody").unwrap_err();
        assert_eq!(error.code(), ErrorCode::FunctionMetaNotFound);
        assert!(
            error
                .message()
                .contains("yr_runtime::function::tests::nobody"),
            "{error}"
        );
        let error = find_method("nobody::Class::method").unwrap_err();
        assert_eq!(error.code(), ErrorCode::FunctionMetaNotFound);
        assert!(error.message().contains("method `nobody::Class::method`"));
    }
}
