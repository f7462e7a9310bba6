//! When a failed stateless call runs again (runtime-api notes §3.5): codes with
//! `RetryPolicy::Always` are retried without using the call's `retry_times`; codes with
//! `RetryPolicy::WithRetryBudget` while `retry_times` lasts.

use yr_common::{Error, InvokeOptions, RetryPolicy};

/// How many times a call retried on codes that are always retried, when `max_retry_time` is
/// unbounded (-1). A bound keeps a permanently broken call from spinning forever.
pub const DEFAULT_MAX_ALWAYS_RETRIES: u32 = 64;

/// A call's retry budget.
#[derive(Clone, Copy, Debug)]
pub struct RetryBudget {
    budget_left: u32,
    always_left: u32,
}

impl RetryBudget {
    /// The budget that `options` give a call.
    pub fn new(options: &InvokeOptions) -> RetryBudget {
        RetryBudget {
            budget_left: options.retry_times,
            always_left: u32::try_from(options.max_retry_time)
                .unwrap_or(DEFAULT_MAX_ALWAYS_RETRIES),
        }
    }

    /// Whether a call that failed with `error` runs again; spends from the budget if so.
    pub fn should_retry(&mut self, error: &Error) -> bool {
        match error.code().retry_policy() {
            RetryPolicy::Always if self.always_left > 0 => {
                self.always_left -= 1;
                true
            }
            RetryPolicy::WithRetryBudget if self.budget_left > 0 => {
                self.budget_left -= 1;
                true
            }
            _ => false,
        }
    }
}
