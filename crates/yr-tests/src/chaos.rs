//! The chaos soak's shared vocabulary (docs/design/027-chaos-soak.md): the kinds of workload
//! operation and of fault, the line a driver reports each operation's outcome on, and the one
//! table of what may fail with which codes after which fault ([`ACCEPTED`]).
//!
//! The drivers (`src/bin/chaos_driver.rs`) run the workload and report every operation as a
//! [`OpReport`] line on their standard output; the test (`tests/chaos.rs`) injects the faults,
//! records when each one began and ended, and judges every failed operation against the table:
//! an error code is accepted only when a fault that the table names for it overlaps the
//! operation. A wrong value or a hang is never accepted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The prefix of every line a driver reports on.
pub const REPORT_PREFIX: &str = "yr-chaos: ";

/// The environment of a driver: its seed.
pub const SEED_VAR: &str = "YR_CHAOS_SEED";
/// The environment of a driver: its index (which also picks its host).
pub const DRIVER_VAR: &str = "YR_CHAOS_DRIVER";
/// The environment of a driver: the directory where instances mark their processes.
pub const DIR_VAR: &str = "YR_CHAOS_DIR";
/// The environment of a driver: how many hosts run nodes (labels `host=h0` …).
pub const HOSTS_VAR: &str = "YR_CHAOS_HOSTS";

/// How long one operation may take before it counts as a hang (generous: a node timeout, a
/// failover, a reschedule and a runtime start on a loaded machine fit many times over).
pub const OP_DEADLINE: Duration = Duration::from_secs(120);

/// A large object: above the 100 KiB at which values go by location.
pub const LARGE: usize = 150 * 1024;

/// Milliseconds since the epoch: the drivers and the test share the machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A kind of workload operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// A small stateless task and its result.
    Task,
    /// A task that returns a large value, or takes a large object by reference.
    LargeTask,
    /// `put` of a small object and its `get`.
    Put,
    /// `put` of a large object and its `get`.
    LargePut,
    /// The create of a stateful instance (with or without restarts) and its first call.
    Create,
    /// A call of a stateful instance.
    Call,
    /// A KV write and the read of a key this driver wrote.
    Kv,
    /// A stream: a consumer and a producer, elements sent and received in order.
    Stream,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 8] = [
        OpKind::Task,
        OpKind::LargeTask,
        OpKind::Put,
        OpKind::LargePut,
        OpKind::Create,
        OpKind::Call,
        OpKind::Kv,
        OpKind::Stream,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Task => "task",
            OpKind::LargeTask => "large-task",
            OpKind::Put => "put",
            OpKind::LargePut => "large-put",
            OpKind::Create => "create",
            OpKind::Call => "call",
            OpKind::Kv => "kv",
            OpKind::Stream => "stream",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// A kind of fault the soak injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of one runtime process.
    RuntimeKill,
    /// SIGKILL of a node process (its runtimes die with it), started again shortly after.
    NodeKill,
    /// SIGKILL of the leading master, started again as a standby.
    MasterKill,
    /// A host's link cut for a few seconds, then restored.
    Cut,
}

impl FaultKind {
    /// Its name in the summary.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RuntimeKill => "runtime-kill",
            FaultKind::NodeKill => "node-kill",
            FaultKind::MasterKill => "master-kill",
            FaultKind::Cut => "cut",
        }
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The right value.
    Ok,
    /// An error with this code, within the deadline.
    Code(u32),
    /// A value other than the one the operation must give (never accepted).
    Wrong(String),
    /// No answer within [`OP_DEADLINE`] (never accepted).
    Hang(String),
}

/// One operation as a driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpReport {
    /// The driver's index.
    pub driver: usize,
    /// Its sequence number in the driver.
    pub seq: u64,
    /// What it was.
    pub kind: OpKind,
    /// Since when its result depended on the cluster (ms since the epoch): its start; for a
    /// read of a KV key, when the key was written; for a call of an instance, when a call of
    /// it last succeeded.
    pub since_ms: u64,
    /// When it ended (ms since the epoch).
    pub end_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// What it did, for messages.
    pub detail: String,
}

impl OpReport {
    /// The report line (without a newline).
    pub fn line(&self) -> String {
        let outcome = match &self.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Code(code) => format!("code:{code}"),
            Outcome::Wrong(why) => format!("wrong:{}", why.replace([' ', '\n'], "_")),
            Outcome::Hang(why) => format!("hang:{}", why.replace([' ', '\n'], "_")),
        };
        format!(
            "{REPORT_PREFIX}op {} {} {} {} {} {outcome} {}",
            self.driver,
            self.seq,
            self.kind.name(),
            self.since_ms,
            self.end_ms,
            self.detail.replace('\n', " ")
        )
    }

    /// The report on `line`, if it is one (a driver's output may hold other lines).
    pub fn parse(line: &str) -> Option<OpReport> {
        let (_, rest) = line.split_once(REPORT_PREFIX)?;
        let mut fields = rest.splitn(8, ' ');
        if fields.next()? != "op" {
            return None;
        }
        let driver = fields.next()?.parse().ok()?;
        let seq = fields.next()?.parse().ok()?;
        let kind = OpKind::parse(fields.next()?)?;
        let since_ms = fields.next()?.parse().ok()?;
        let end_ms = fields.next()?.parse().ok()?;
        let outcome = match fields.next()?.split_once(':') {
            None => Outcome::Ok,
            Some(("code", code)) => Outcome::Code(code.parse().ok()?),
            Some(("wrong", why)) => Outcome::Wrong(why.to_string()),
            Some(("hang", why)) => Outcome::Hang(why.to_string()),
            Some(_) => return None,
        };
        let detail = fields.next().unwrap_or_default().to_string();
        Some(OpReport {
            driver,
            seq,
            kind,
            since_ms,
            end_ms,
            outcome,
            detail,
        })
    }
}

/// A fault as the test injected it.
#[derive(Clone, Debug)]
pub struct Fault {
    /// What it was.
    pub kind: FaultKind,
    /// The host it hit (for a master kill, the leader's host).
    pub host: usize,
    /// When it began (ms since the epoch).
    pub start_ms: u64,
    /// When the cluster was whole again (ms since the epoch): the node listed alive again,
    /// a leader elected, the link restored and every node alive.
    pub end_ms: u64,
}

/// Which hosts' faults a rule takes into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A fault on any host.
    AnyHost,
    /// Only a fault on the driver's own host.
    DriverHost,
}

/// One row of the table: after `fault` (on the hosts `scope` names), operations of `ops` may
/// fail with `codes` until `grace` after the cluster was whole again.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The fault.
    pub fault: FaultKind,
    /// Whose faults count.
    pub scope: Scope,
    /// The operations that may fail.
    pub ops: &'static [OpKind],
    /// The codes they may fail with.
    pub codes: &'static [u32],
    /// How long after the fault's end its effects may still show.
    pub grace: Duration,
    /// Why, for the summary and for whoever tightens the rule.
    pub why: &'static str,
}

const EVERY_OP: &[OpKind] = &OpKind::ALL;
const STATEFUL: &[OpKind] = &[OpKind::Create, OpKind::Call];

/// What may fail with which codes after which fault. Everything else that fails is a finding.
/// Lost results are recomputed from their lineage and streams survive their home and their
/// backup, so a node's loss elsewhere fails no put, no stream and no computed result: only what
/// ran or lived on that node.
pub const ACCEPTED: &[Rule] = &[
    Rule {
        fault: FaultKind::RuntimeKill,
        scope: Scope::AnyHost,
        ops: STATEFUL,
        codes: &[1007, 2002],
        grace: Duration::from_secs(10),
        why: "an instance without restarts (recover_retry_times = 0) whose runtime was killed \
              is FATAL: its runtime crashed (2002), or it exited (1007)",
    },
    Rule {
        fault: FaultKind::RuntimeKill,
        scope: Scope::AnyHost,
        ops: &[OpKind::Task, OpKind::LargeTask],
        codes: &[2002],
        grace: Duration::from_secs(10),
        why: "a task whose runtime was killed while it ran fails with 2002: the workload's \
              tasks have no retry_times, and 2002 is retried only within that budget",
    },
    Rule {
        fault: FaultKind::NodeKill,
        scope: Scope::DriverHost,
        ops: EVERY_OP,
        codes: &[3006, 4002, 4205, 9000, 4005, 1007, 3002],
        grace: Duration::from_secs(20),
        why: "the driver's own node died: its bus is gone (3006) until it is back and the \
              driver connects again, and its data worker with it (4205); what the driver owned \
              is gone with it",
    },
    Rule {
        fault: FaultKind::NodeKill,
        scope: Scope::AnyHost,
        ops: STATEFUL,
        codes: &[1007, 3002],
        grace: Duration::from_secs(20),
        why: "an instance without restarts on the lost node is FATAL with 1007",
    },
    Rule {
        fault: FaultKind::NodeKill,
        scope: Scope::AnyHost,
        ops: &[OpKind::Task, OpKind::LargeTask],
        codes: &[3002, 1007],
        grace: Duration::from_secs(20),
        why: "a task placed on the lost node's host, or running there when it died, fails: the \
              workload's tasks have no retry_times (a result lost after it was computed is \
              recomputed from its lineage instead)",
    },
    Rule {
        fault: FaultKind::NodeKill,
        scope: Scope::AnyHost,
        ops: &[OpKind::Kv],
        codes: &[4005, 3002],
        grace: Duration::from_secs(20),
        why: "a KV key owned by the lost node cannot be reached until the master declares it \
              lost (3002), and its memory-only value is gone with it (4005 on the read)",
    },
    Rule {
        fault: FaultKind::Cut,
        scope: Scope::DriverHost,
        ops: EVERY_OP,
        codes: &[3006, 4002, 4205, 9000, 4005, 1007, 3002, 4299, 1002],
        grace: Duration::from_secs(30),
        why: "the driver's host was cut off: its node was declared lost and fenced, so what \
              the driver owned there is gone",
    },
    Rule {
        fault: FaultKind::Cut,
        scope: Scope::AnyHost,
        ops: EVERY_OP,
        codes: &[1007, 4005, 3002, 3005, 4299, 1002],
        grace: Duration::from_secs(30),
        why: "a cut-off node is declared lost: as a node kill, for the cluster's view; a cut-off \
              leader cannot reach etcd, so control operations fail with 3005 until the standby \
              leads",
    },
    Rule {
        fault: FaultKind::MasterKill,
        scope: Scope::AnyHost,
        ops: &[OpKind::Create, OpKind::Kv, OpKind::Stream],
        codes: &[3002, 3005],
        grace: Duration::from_secs(10),
        why: "a control operation (a create the master places, a stream's or a KV key's record) \
              while no master leads fails after a bounded retry",
    },
];

/// Whether `report`, made by a driver on `driver_host`, failed in a way the table accepts
/// given `faults`; `Some(rule)` names the row that accepts it.
pub fn accepted_by(
    report: &OpReport,
    driver_host: usize,
    faults: &[Fault],
) -> Option<&'static Rule> {
    let Outcome::Code(code) = report.outcome else {
        return None;
    };
    ACCEPTED.iter().find(|rule| {
        rule.ops.contains(&report.kind)
            && rule.codes.contains(&code)
            && faults.iter().any(|fault| {
                fault.kind == rule.fault
                    && (rule.scope == Scope::AnyHost || fault.host == driver_host)
                    && fault.start_ms <= report.end_ms
                    && fault.end_ms + rule.grace.as_millis() as u64 >= report.since_ms
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_line_reads_back_as_the_same_report() {
        for outcome in [
            Outcome::Ok,
            Outcome::Code(4005),
            Outcome::Wrong("expected 4 got 5".into()),
            Outcome::Hang("get of a task".into()),
        ] {
            let report = OpReport {
                driver: 1,
                seq: 42,
                kind: OpKind::LargePut,
                since_ms: 1_000,
                end_ms: 2_000,
                outcome,
                detail: "on h2 seed 7".into(),
            };
            let mut expected = report.clone();
            if let Outcome::Wrong(why) | Outcome::Hang(why) = &mut expected.outcome {
                *why = why.replace(' ', "_");
            }
            assert_eq!(OpReport::parse(&report.line()), Some(expected));
        }
        assert_eq!(OpReport::parse("test chaos ... ok"), None);
    }

    #[test]
    fn a_code_is_accepted_only_after_a_fault_that_the_table_names_for_it() {
        let report = OpReport {
            driver: 0,
            seq: 1,
            kind: OpKind::Call,
            since_ms: 100_000,
            end_ms: 101_000,
            outcome: Outcome::Code(1007),
            detail: String::new(),
        };
        let fault = |kind, start_ms, end_ms| Fault {
            kind,
            host: 2,
            start_ms,
            end_ms,
        };
        assert!(
            accepted_by(&report, 0, &[]).is_none(),
            "no fault, no excuse"
        );
        assert!(
            accepted_by(&report, 0, &[fault(FaultKind::RuntimeKill, 99_000, 99_500)]).is_some()
        );
        // A fault long before the operation or after it excuses nothing.
        assert!(accepted_by(&report, 0, &[fault(FaultKind::RuntimeKill, 0, 10)]).is_none());
        assert!(accepted_by(
            &report,
            0,
            &[fault(FaultKind::RuntimeKill, 102_000, 102_100)]
        )
        .is_none());
        // A master kill does not excuse a failed call.
        assert!(accepted_by(&report, 0, &[fault(FaultKind::MasterKill, 99_000, 99_500)]).is_none());
        // 3006 only when the driver's own node died.
        let bus = OpReport {
            outcome: Outcome::Code(3006),
            ..report.clone()
        };
        assert!(accepted_by(&bus, 0, &[fault(FaultKind::NodeKill, 99_000, 99_500)]).is_none());
        assert!(accepted_by(&bus, 2, &[fault(FaultKind::NodeKill, 99_000, 99_500)]).is_some());
        // Never a wrong value.
        let wrong = OpReport {
            outcome: Outcome::Wrong("x".into()),
            ..report
        };
        assert!(accepted_by(&wrong, 2, &[fault(FaultKind::NodeKill, 99_000, 99_500)]).is_none());
    }
}
