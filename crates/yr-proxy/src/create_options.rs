//! What a create's `InvokeOptions` ask of this node, beyond resources: the checks of the
//! options for their use, the environment of the instance's runtime (`env_vars`), the node
//! labels it needs (`schedule_affinities`, on this node and in the master's placement), and
//! the eviction of an instance idle for its `idle_timeout_s`. The node's create path calls
//! these; the rules themselves live with the options (`yr_common::options`).

use std::collections::HashMap;

use yr_agent::RuntimeSpec;
use yr_common::{AffinityKind, AffinityType, Error, ErrorCode, InvokeOptions, LabelOp, ModuleCode};
use yr_proto::v1 as pb;

/// Check a create's options: valid, supported by yr, and meaningful for a stateless or a
/// stateful instance (1001 otherwise, naming the field).
pub fn validate(request: &pb::CreateRequest, options: &InvokeOptions) -> Result<(), Error> {
    options.validate_for(request.stateless)
}

/// The environment variables the instance's runtime starts with (`env_vars`); empty when a
/// warm runtime will do.
pub fn runtime_env(options: &InvokeOptions) -> Vec<(String, String)> {
    options
        .env_vars
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// `spec` with `env` added before yr's own variables (which `validate` keeps out of
/// `env_vars` anyway).
pub fn with_env(mut spec: RuntimeSpec, env: &[(String, String)]) -> RuntimeSpec {
    if !env.is_empty() {
        let mut all = env.to_vec();
        all.append(&mut spec.env);
        spec.env = all;
    }
    spec
}

/// The instance's required affinities on node labels, for the master.
pub fn required_affinities(options: &InvokeOptions) -> Vec<pb::NodeAffinity> {
    options
        .schedule_affinities
        .iter()
        .filter(|affinity| affinity.affinity_kind == AffinityKind::Resource)
        .map(|affinity| pb::NodeAffinity {
            anti: matches!(
                affinity.affinity_type,
                AffinityType::RequiredAnti | AffinityType::PreferredAnti
            ),
            conditions: affinity
                .label_operators
                .iter()
                .map(|condition| pb::LabelCondition {
                    op: match condition.op {
                        LabelOp::In => pb::label_condition::Op::In,
                        LabelOp::NotIn => pb::label_condition::Op::NotIn,
                        LabelOp::Exists => pb::label_condition::Op::Exists,
                        LabelOp::NotExists => pb::label_condition::Op::NotExists,
                    } as i32,
                    key: condition.key.clone(),
                    values: condition.values.clone(),
                })
                .collect(),
        })
        .collect()
}

/// Whether a node with `labels` admits every required affinity of `options`.
pub fn admits(labels: &HashMap<String, String>, options: &InvokeOptions) -> bool {
    yr_common::options::unmet_affinity(&options.schedule_affinities, labels).is_none()
}

/// The nodes the master should not pick: this one when it admits the instance (it lacks
/// only room), none when it does not (so that the master's answer says why).
pub fn exclude_here(admits_here: bool, node_id: &str) -> Vec<String> {
    if admits_here {
        vec![node_id.to_string()]
    } else {
        Vec::new()
    }
}

/// Why a runtime asked to end its instance (an `ExitRequest`): evicted for idleness (1013).
pub fn eviction_reason(exit: &pb::ExitRequest) -> Error {
    let message = exit
        .reason
        .as_ref()
        .map(|reason| reason.message.clone())
        .unwrap_or_else(|| "the instance was evicted by its runtime".to_string());
    Error::with_module(ErrorCode::InstanceEvicted, ModuleCode::Core, message)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use yr_common::{Affinity, AffinityScope, LabelOperator};

    use super::*;

    fn zone_affinity(affinity_type: AffinityType, zone: &str) -> Affinity {
        Affinity {
            affinity_kind: AffinityKind::Resource,
            affinity_type,
            label_operators: vec![LabelOperator {
                op: LabelOp::In,
                key: "zone".into(),
                values: vec![zone.into()],
            }],
            affinity_scope: AffinityScope::Node,
        }
    }

    #[test]
    fn env_vars_come_before_yr_s_own_variables() {
        let options = InvokeOptions {
            env_vars: [("A".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let spec = RuntimeSpec {
            binary_path: PathBuf::from("/bin/true"),
            args: Vec::new(),
            job_id: "job".into(),
            env: vec![("YR_BINARY_HASH".into(), "h".into())],
        };
        let spec = with_env(spec, &runtime_env(&options));
        assert_eq!(
            spec.env,
            vec![
                ("A".to_string(), "1".to_string()),
                ("YR_BINARY_HASH".to_string(), "h".to_string())
            ]
        );
        assert!(runtime_env(&InvokeOptions::default()).is_empty());
    }

    #[test]
    fn required_affinities_travel_to_the_master_and_decide_here() {
        let options = InvokeOptions {
            schedule_affinities: vec![
                zone_affinity(AffinityType::Required, "east"),
                zone_affinity(AffinityType::RequiredAnti, "west"),
            ],
            ..Default::default()
        };
        let wire = required_affinities(&options);
        assert_eq!(wire.len(), 2);
        assert!(!wire[0].anti && wire[1].anti);
        assert_eq!(wire[0].conditions[0].values, vec!["east".to_string()]);
        let east = HashMap::from([("zone".to_string(), "east".to_string())]);
        let west = HashMap::from([("zone".to_string(), "west".to_string())]);
        assert!(admits(&east, &options));
        assert!(!admits(&west, &options));
        assert!(admits(&west, &InvokeOptions::default()));
        assert_eq!(exclude_here(true, "n1"), vec!["n1".to_string()]);
        assert!(exclude_here(false, "n1").is_empty());
    }

    #[test]
    fn an_exit_request_is_an_eviction() {
        let error = eviction_reason(&pb::ExitRequest {
            reason: Some(pb::ErrorInfo {
                code: 1013,
                module: 20,
                message: "idle for 1 s".into(),
                ..Default::default()
            }),
        });
        assert_eq!(error.code(), ErrorCode::InstanceEvicted);
        assert_eq!(error.message(), "idle for 1 s");
    }
}
