//! The instance state machine: openYuanrong's 14 states and the transitions between them. An
//! illegal transition is error 3010. EXITED is reached by deleting the record.

use yr_common::{Error, ErrorCode};
use yr_proto::v1::InstanceState as S;

/// Whether `from → to` is a legal transition.
pub fn allowed(from: S, to: S) -> bool {
    use S::*;
    match from {
        New => matches!(to, Scheduling),
        Scheduling => matches!(
            to,
            Scheduling | Creating | Failed | Fatal | Exiting | ScheduleFailed
        ),
        Creating => matches!(to, Running | Failed | Exiting | Fatal),
        Running => matches!(
            to,
            Failed | Exiting | Fatal | Evicting | SubHealth | Suspend | Paused
        ),
        SubHealth => matches!(to, Failed | Exiting | Fatal | Evicting | Running),
        Failed => matches!(to, Scheduling | Exiting | Fatal),
        Fatal => matches!(to, Exiting),
        Exiting => matches!(to, Fatal | Exited),
        Evicting => matches!(to, Evicted | Fatal),
        ScheduleFailed => matches!(to, Scheduling | Exiting),
        Evicted => matches!(to, Exiting | Fatal),
        Suspend => matches!(to, Creating | Scheduling | Running | Fatal | Exiting),
        Paused => matches!(to, Running | Exiting | Fatal),
        Exited => false,
    }
}

/// Check a transition of `instance_id`: 3010 if it is illegal.
pub fn check(instance_id: &str, from: S, to: S) -> Result<(), Error> {
    if allowed(from, to) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::StateMachineError,
            format!(
                "instance {instance_id} cannot go from {} to {}; this is a bug in yr, please report it",
                from.as_str_name(),
                to.as_str_name()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [S; 14] = [
        S::New,
        S::Scheduling,
        S::Creating,
        S::Running,
        S::Failed,
        S::Exiting,
        S::Fatal,
        S::ScheduleFailed,
        S::Exited,
        S::Evicting,
        S::Evicted,
        S::SubHealth,
        S::Suspend,
        S::Paused,
    ];

    #[test]
    fn the_main_create_path_is_legal() {
        for (from, to) in [
            (S::New, S::Scheduling),
            (S::Scheduling, S::Creating),
            (S::Creating, S::Running),
            (S::Running, S::Exiting),
            (S::Exiting, S::Exited),
        ] {
            assert!(allowed(from, to), "{from:?} -> {to:?}");
        }
    }

    #[test]
    fn recovery_goes_through_failed_back_to_scheduling() {
        assert!(allowed(S::Running, S::Failed));
        assert!(allowed(S::Failed, S::Scheduling));
        assert!(!allowed(S::Fatal, S::Scheduling));
    }

    #[test]
    fn illegal_transitions_are_3010() {
        let error = check("i-1", S::New, S::Running).unwrap_err();
        assert_eq!(error.code(), ErrorCode::StateMachineError);
        assert!(error.message().contains("i-1"));
        assert!(error.message().contains("NEW") && error.message().contains("RUNNING"));
    }

    #[test]
    fn exited_is_terminal_and_every_state_has_a_way_out_but_exited() {
        for from in ALL {
            let outs = ALL.iter().filter(|to| allowed(from, **to)).count();
            if from == S::Exited {
                assert_eq!(outs, 0);
            } else {
                assert!(outs > 0, "{from:?} has no transition");
            }
        }
    }
}
