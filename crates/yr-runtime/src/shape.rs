//! The shape of a stateless call: the options that decide what instance may run it. Calls of
//! one shape share the stateless instances of a pool (cluster) and the `max_instances` bound
//! (both backends); options that only concern one call (its retries, its timeout) are not part
//! of it.

use yr_common::InvokeOptions;

/// The shape of stateless calls with `options`, as a key.
pub fn shape_key(options: &InvokeOptions) -> String {
    // Destructured exhaustively: a new field must be sorted into "decides the instance" or
    // "concerns one call".
    let InvokeOptions {
        cpu,
        cpu_limit,
        memory,
        mem_limit,
        concurrency,
        custom_resources,
        custom_extensions,
        pod_labels,
        labels,
        affinity,
        schedule_affinities,
        preferred_priority,
        required_priority,
        preferred_anti_other_labels,
        is_data_affinity,
        device,
        max_invoke_latency_ms,
        min_instances,
        max_instances,
        recover_retry_times,
        need_order: _,
        name: _,
        namespace: _,
        resource_group_options,
        function_group_options,
        env_vars,
        retry_times: _,
        trace_id: _,
        alias_params: _,
        runtime_env,
        debug,
        preempted_allowed,
        instance_priority,
        schedule_timeout_ms,
        group_name,
        idle_timeout_s: _,
        is_delete_remote_tensor: _,
        bypass_datasystem: _,
        skip_serialize: _,
        port_forwardings,
        get_if_exists: _,
        priority: _,
        max_retry_time: _,
        timeout_s: _,
        always_local_mode,
    } = options;
    format!(
        "{cpu}|{cpu_limit}|{memory}|{mem_limit}|{concurrency}|{custom_resources:?}|\
         {custom_extensions:?}|{pod_labels:?}|{labels:?}|{affinity:?}|{schedule_affinities:?}|\
         {preferred_priority}|{required_priority}|{preferred_anti_other_labels}|\
         {is_data_affinity}|{device:?}|{max_invoke_latency_ms}|{min_instances}|{max_instances}|\
         {recover_retry_times}|{resource_group_options:?}|{function_group_options:?}|\
         {env_vars:?}|{runtime_env:?}|{debug}|{preempted_allowed}|{instance_priority}|\
         {schedule_timeout_ms}|{group_name:?}|{port_forwardings:?}|{always_local_mode}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_of_one_shape_share_a_key_whatever_their_retries_and_timeouts() {
        let base = InvokeOptions::default();
        let per_call = InvokeOptions {
            retry_times: 3,
            timeout_s: 5,
            max_retry_time: 2,
            ..Default::default()
        };
        assert_eq!(shape_key(&base), shape_key(&per_call));
        for other in [
            InvokeOptions {
                cpu: 1000,
                ..Default::default()
            },
            InvokeOptions {
                max_instances: 1,
                ..Default::default()
            },
            InvokeOptions {
                schedule_timeout_ms: 5,
                ..Default::default()
            },
        ] {
            assert_ne!(shape_key(&base), shape_key(&other));
        }
    }
}
