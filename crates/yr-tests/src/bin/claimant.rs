//! Helper of `security`'s `a_bus_session_claiming_another_process_cannot_free_its_objects`:
//! the attacker, a process of the same user with the cluster token (`CLAIMANT_TOKEN`), that
//! registers on the bus at `CLAIMANT_BUS` claiming the pid `CLAIMANT_VICTIM`. Prints
//! `CLAIMANT <the node's answer>`.

use yr_common::auth::ClusterToken;
use yr_proto::v1 as pb;

fn main() {
    let bus = std::env::var("CLAIMANT_BUS").expect("bus address");
    let victim: u32 = std::env::var("CLAIMANT_VICTIM")
        .expect("victim")
        .parse()
        .expect("a pid");
    let token =
        ClusterToken::parse(&std::env::var("CLAIMANT_TOKEN").expect("token")).expect("a token");
    let me = std::env::current_exe().expect("exe");
    let register = pb::RegisterClient {
        kind: pb::ClientKind::Driver as i32,
        job_id: yr_tests::unique("claimant"),
        binary_path: me.display().to_string(),
        binary_hash: yr_common::binary_hash(&me),
        pid: victim,
        ..Default::default()
    };
    let answer = yr_tests::bus_register(&bus, Some(token), register);
    println!("CLAIMANT {answer:?}");
}
