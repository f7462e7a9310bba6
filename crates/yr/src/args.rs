//! Arguments: what a caller may pass for a parameter of type `T` (a `T`, or an `ObjectRef<T>`
//! whose value the callee receives), and how the callee decodes them.

use serde::de::DeserializeOwned;
use serde::Serialize;
use yr_common::{Error, ErrorCode, Result};
use yr_runtime::codec;
use yr_runtime::function::Arg;

use crate::ObjectRef;

/// Something that can be passed for a parameter of type `T`.
///
/// Implemented for `T` and `&T` (encoded without a clone), for `ObjectRef<T>` and
/// `&ObjectRef<T>` (the callee receives the value once it exists), and for `&str` where `T` is
/// `String`.
pub trait IntoArg<T> {
    /// Encode the argument.
    fn into_arg(self) -> Result<Arg>;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::from_value(codec::encode(&self)?))
    }
}

/// A borrowed value is encoded where it is, without a clone: pass `&big` to send a large value
/// without copying it first.
///
/// ```no_run
/// # fn main() -> yr::Result<()> {
/// #[yr::invoke]
/// fn length(bytes: Vec<u8>) -> usize {
///     bytes.len()
/// }
///
/// yr::init(yr::Config::default())?;
/// let big = vec![1u8; 16 << 20];
/// let n = yr::function(length).invoke((&big,))?;
/// assert_eq!(yr::get(&n, std::time::Duration::from_secs(30))?, big.len());
/// # Ok(())
/// # }
/// ```
impl<T: Serialize> IntoArg<T> for &T {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::from_value(codec::encode(self)?))
    }
}

impl<T> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::Ref(self.into_handle()))
    }
}

impl<T> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::Ref(self.handle().clone()))
    }
}

impl IntoArg<String> for &str {
    fn into_arg(self) -> Result<Arg> {
        Ok(Arg::from_value(codec::encode(self)?))
    }
}

/// A tuple of arguments for a function whose parameters are the tuple `Args`.
pub trait IntoArgs<Args> {
    /// Encode the arguments.
    fn into_args(self) -> Result<Vec<Arg>>;
}

/// The callee side: decode a parameter tuple from encoded arguments.
pub trait FromArgs: Sized {
    /// Decode the parameters. A count mismatch is 1001, a type mismatch 4003.
    fn from_args(args: &[Arg]) -> Result<Self>;
}

fn count_mismatch(expected: usize, got: usize) -> Error {
    Error::new(
        ErrorCode::ParamInvalid,
        format!("the function takes {expected} arguments but the call passed {got}"),
    )
}

macro_rules! tuple_args {
    ($count:expr; $($param:ident $arg:ident $index:tt),*) => {
        impl<$($param, $arg: IntoArg<$param>),*> IntoArgs<($($param,)*)> for ($($arg,)*) {
            #[allow(unused_variables)]
            fn into_args(self) -> Result<Vec<Arg>> {
                Ok(vec![$(self.$index.into_arg()?),*])
            }
        }

        impl<$($param: DeserializeOwned),*> FromArgs for ($($param,)*) {
            #[allow(unused_variables)]
            fn from_args(args: &[Arg]) -> Result<Self> {
                if args.len() != $count {
                    return Err(count_mismatch($count, args.len()));
                }
                Ok(($(codec::decode::<$param>(&args[$index].bytes()?)?,)*))
            }
        }
    };
}

tuple_args!(0;);
tuple_args!(1; T0 A0 0);
tuple_args!(2; T0 A0 0, T1 A1 1);
tuple_args!(3; T0 A0 0, T1 A1 1, T2 A2 2);
tuple_args!(4; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3);
tuple_args!(5; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3, T4 A4 4);
tuple_args!(6; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3, T4 A4 4, T5 A5 5);
tuple_args!(7; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3, T4 A4 4, T5 A5 5, T6 A6 6);
tuple_args!(8; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3, T4 A4 4, T5 A5 5, T6 A6 6, T7 A7 7);
tuple_args!(9; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3, T4 A4 4, T5 A5 5, T6 A6 6, T7 A7 7, T8 A8 8);
tuple_args!(10; T0 A0 0, T1 A1 1, T2 A2 2, T3 A3 3, T4 A4 4, T5 A5 5, T6 A6 6, T7 A7 7, T8 A8 8, T9 A9 9);
