//! Running user code: a panic inside a function, constructor or method becomes error 2002 with
//! the panic message and where it happened, instead of tearing down the thread. The default panic
//! output is kept for panics outside user code.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use yr_common::{Error, ErrorCode, Result};

thread_local! {
    static IN_USER_CODE: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_USER_CODE.with(Cell::get) {
                let message = if let Some(text) = info.payload().downcast_ref::<&str>() {
                    (*text).to_string()
                } else if let Some(text) = info.payload().downcast_ref::<String>() {
                    text.clone()
                } else {
                    "a panic with a non-string payload".to_string()
                };
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_else(|| "an unknown location".to_string());
                LAST_PANIC.with(|last| {
                    *last.borrow_mut() = Some(format!("panicked at {location}: {message}"))
                });
            } else {
                previous(info);
            }
        }));
    });
}

/// Whether this thread is running user code now (a function, constructor, method or shutdown
/// hook), in local mode or in a runtime.
pub fn in_user_code() -> bool {
    IN_USER_CODE.with(Cell::get)
}

/// Run user code `f`. A panic becomes 2002 naming `what`, the message and the location.
pub fn run<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_hook();
    let outer = IN_USER_CODE.with(|flag| flag.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    IN_USER_CODE.with(|flag| flag.set(outer));
    match result {
        Ok(result) => result,
        Err(_) => {
            let detail = LAST_PANIC
                .with(|last| last.borrow_mut().take())
                .unwrap_or_else(|| "panicked".to_string());
            Err(Error::new(
                ErrorCode::UserFunctionException,
                format!("failed to execute user function {what}: {detail}"),
            ))
        }
    }
}

/// The error for a user function that returned `Err(error)`.
pub fn returned_error(what: &str, error: &dyn std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::UserFunctionException,
        format!("failed to execute user function {what}, err: {error}"),
    )
}
