//! Stateless functions: the typed handles that `#[yr::invoke]` generates, and
//! `yr::function(f).options(opts).invoke(args)`.

use std::marker::PhantomData;
use std::sync::Arc;

use yr_common::{InvokeOptions, Result};
use yr_runtime::function::{FunctionEntry, Returns, TaskSpec};
use yr_runtime::object_store::ObjectHandle;

use crate::args::IntoArgs;
use crate::ObjectRef;

/// A function registered with `#[yr::invoke]`, taking the parameter tuple `Args` and returning
/// `R`. Pass it to [`yr::function`](crate::function).
pub struct Function<Args, R> {
    entry: FunctionEntry,
    _types: PhantomData<fn(Args) -> R>,
}

/// A function registered with `#[yr::invoke(return_nums = N)]`: it returns the tuple `R`, and a
/// call gives one `ObjectRef` per element.
pub struct MultiFunction<Args, R> {
    entry: FunctionEntry,
    _types: PhantomData<fn(Args) -> R>,
}

macro_rules! copy_impls {
    ($name:ident) => {
        impl<Args, R> Clone for $name<Args, R> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<Args, R> Copy for $name<Args, R> {}
        impl<Args, R> $name<Args, R> {
            #[doc(hidden)]
            pub const fn __new(entry: FunctionEntry) -> Self {
                $name {
                    entry,
                    _types: PhantomData,
                }
            }

            /// The function's registered name (its Rust path).
            pub fn name(&self) -> &'static str {
                self.entry.name
            }
        }
    };
}

copy_impls!(Function);
copy_impls!(MultiFunction);

/// A registered function: what a call takes and what it gives back.
pub trait Invocable: Copy {
    /// The parameter tuple.
    type Args;
    /// What `invoke` returns: one `ObjectRef`, or a tuple of them.
    type Output;
    #[doc(hidden)]
    fn entry(&self) -> FunctionEntry;
    #[doc(hidden)]
    fn wrap(handles: Vec<ObjectHandle>) -> Self::Output;
}

impl<Args, R> Invocable for Function<Args, R> {
    type Args = Args;
    type Output = ObjectRef<R>;

    fn entry(&self) -> FunctionEntry {
        self.entry
    }

    fn wrap(handles: Vec<ObjectHandle>) -> ObjectRef<R> {
        let handle = handles
            .into_iter()
            .next()
            .expect("a single-return function has one result handle");
        ObjectRef::from_handle(handle)
    }
}

impl<Args, R: MultiReturn> Invocable for MultiFunction<Args, R> {
    type Args = Args;
    type Output = R::Refs;

    fn entry(&self) -> FunctionEntry {
        self.entry
    }

    fn wrap(handles: Vec<ObjectHandle>) -> R::Refs {
        R::refs(handles)
    }
}

/// A tuple returned by a function with `return_nums` = its length.
pub trait MultiReturn {
    /// The number of values.
    const COUNT: usize;
    /// One `ObjectRef` per value.
    type Refs;
    #[doc(hidden)]
    fn encode(self) -> Result<Returns>;
    #[doc(hidden)]
    fn refs(handles: Vec<ObjectHandle>) -> Self::Refs;
}

macro_rules! multi_return {
    ($count:expr; $($t:ident $index:tt),*) => {
        impl<$($t: serde::Serialize),*> MultiReturn for ($($t,)*) {
            const COUNT: usize = $count;
            type Refs = ($(ObjectRef<$t>,)*);

            fn encode(self) -> Result<Returns> {
                Ok(Returns::Many(vec![$(yr_runtime::codec::encode(&self.$index)?),*]))
            }

            // With no return values the tuple of refs is `()`.
            #[allow(unused_variables, unused_mut, clippy::unused_unit)]
            fn refs(handles: Vec<ObjectHandle>) -> Self::Refs {
                let mut handles = handles.into_iter();
                ($(ObjectRef::<$t>::from_handle(
                    handles.next().expect("one result handle per return value"),
                ),)*)
            }
        }
    };
}

multi_return!(0;);
multi_return!(1; A 0);
multi_return!(2; A 0, B 1);
multi_return!(3; A 0, B 1, C 2);
multi_return!(4; A 0, B 1, C 2, D 3);
multi_return!(5; A 0, B 1, C 2, D 3, E 4);
multi_return!(6; A 0, B 1, C 2, D 3, E 4, F 5);
multi_return!(7; A 0, B 1, C 2, D 3, E 4, F 5, G 6);
multi_return!(8; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

pub(crate) fn default_options() -> Arc<InvokeOptions> {
    InvokeOptions::shared_default().clone()
}

/// Validate `options` once, for every later call that uses them.
pub(crate) fn checked_options(options: InvokeOptions) -> Result<Arc<InvokeOptions>> {
    options.validate()?;
    Ok(Arc::new(options))
}

/// A call of a stateless function being prepared: `yr::function(f).options(opts).invoke(args)`.
///
/// ```
/// #[yr::invoke]
/// fn add(a: i32, b: i32) -> i32 {
///     a + b
/// }
///
/// # yr::init(yr::Config::local()).unwrap();
/// let sum = yr::function(add).invoke((1, 2)).unwrap();
/// assert_eq!(yr::get(&sum, std::time::Duration::from_secs(5)).unwrap(), 3);
/// # yr::finalize().unwrap();
/// ```
#[must_use = "a call does nothing until invoke"]
pub struct FunctionCall<F> {
    function: F,
    options: Result<Arc<InvokeOptions>>,
}

/// Prepare a call of `function`, a function registered with `#[yr::invoke]`.
pub fn function<F: Invocable>(function: F) -> FunctionCall<F> {
    FunctionCall {
        function,
        options: Ok(default_options()),
    }
}

impl<F: Invocable> FunctionCall<F> {
    /// Use `options` for this call. Invalid options fail the `invoke` (1006 for resources out of
    /// range, 1001 otherwise).
    pub fn options(mut self, options: InvokeOptions) -> Self {
        self.options = checked_options(options);
        self
    }

    /// Submit the call. Returns at once with the reference(s) to the result.
    pub fn invoke(&self, args: impl IntoArgs<F::Args>) -> Result<F::Output> {
        let runtime = yr_runtime::current()?;
        let options = self.options.clone()?;
        let task = TaskSpec {
            function: self.function.entry(),
            args: args.into_args()?,
            options,
        };
        Ok(F::wrap(runtime.invoke_function(task)?))
    }
}
