//! Usage errors the client core detects before a call leaves the process, seen through the
//! runtime's API in local mode (a cluster driver takes the same path before it sends): an entry
//! point registered twice in the binary is 4007 for a create and 4008 for a function or method
//! call. One test: yr's lifecycle is process-wide.

use std::sync::Arc;

use yr_common::{Config, ErrorCode, InvokeOptions};
use yr_runtime::function::{
    Arg, ConstructorEntry, CreateSpec, FunctionEntry, InstanceState, MethodCall, MethodEntry,
    MethodSpec, Returns, TaskSpec,
};

fn nothing(_: &[Arg]) -> yr_common::Result<Returns> {
    Ok(Returns::Many(Vec::new()))
}

fn construct(_: &[Arg]) -> yr_common::Result<Box<InstanceState>> {
    Ok(Box::new(()))
}

fn method(_: &InstanceState, _: &[Arg]) -> yr_common::Result<Returns> {
    Ok(Returns::Many(Vec::new()))
}

// What two linked versions of one crate do: register the same paths twice.
const FUNCTION: FunctionEntry = FunctionEntry {
    name: "usage_errors::twice",
    call: nothing,
    return_nums: 1,
};
const CONSTRUCTOR: ConstructorEntry = ConstructorEntry {
    name: "usage_errors::Twice::new",
    class: "usage_errors::Twice",
    call: construct,
    shutdown: None,
};
const METHOD: MethodEntry = MethodEntry {
    name: "usage_errors::Twice::get",
    class: "usage_errors::Twice",
    call: MethodCall::Shared(method),
};
yr_runtime::inventory::submit! { FUNCTION }
yr_runtime::inventory::submit! { FUNCTION }
yr_runtime::inventory::submit! { CONSTRUCTOR }
yr_runtime::inventory::submit! { CONSTRUCTOR }
yr_runtime::inventory::submit! { METHOD }
yr_runtime::inventory::submit! { METHOD }

#[test]
fn entry_points_registered_twice_are_refused_with_create_and_invoke_usage_errors() {
    yr_runtime::init(Config::local()).unwrap();
    let runtime = yr_runtime::current().unwrap();
    let options = Arc::new(InvokeOptions::default());

    let error = runtime
        .invoke_function(TaskSpec {
            function: FUNCTION,
            args: Vec::new(),
            options: options.clone(),
        })
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::IncorrectInvokeUsage, "{error}");
    assert!(error.message().contains(FUNCTION.name), "{error}");

    let error = runtime
        .create_instance(CreateSpec {
            constructor: CONSTRUCTOR,
            args: Vec::new(),
            options,
            class_name: None,
        })
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::IncorrectCreateUsage, "{error}");
    assert!(error.message().contains(CONSTRUCTOR.name), "{error}");

    let error = runtime
        .invoke_method(
            "any-instance",
            MethodSpec {
                method: METHOD,
                args: Vec::new(),
                options: Default::default(),
            },
            1,
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::IncorrectInvokeUsage, "{error}");
    assert!(error.message().contains(METHOD.name), "{error}");

    drop(runtime);
    yr_runtime::finalize().unwrap();
}
