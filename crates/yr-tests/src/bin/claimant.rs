//! Helper of `security`'s `a_bus_session_claiming_another_process_cannot_free_its_objects`:
//! the attacker, a process of the same user with the cluster token (`CLAIMANT_TOKEN`), that
//! registers on the bus at `CLAIMANT_BUS` claiming the pid `CLAIMANT_VICTIM`. Prints
//! `CLAIMANT <the node's answer>`.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use yr_common::auth::ClusterToken;
use yr_proto::v1 as pb;

const TIMEOUT: Duration = Duration::from_secs(30);

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
    let answer = yr_tests::block_on(async move {
        let channel = yr_tests::raw_channel(&bus, Some(token)).await?;
        // One message; the sender stays alive so the session stays open until the answer.
        let (outbound, receiver) = mpsc::channel(1);
        outbound
            .send(pb::BusRequest {
                message_id: 1,
                body: Some(pb::bus_request::Body::Register(register)),
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut inbound = tokio::time::timeout(
            TIMEOUT,
            pb::bus_client::BusClient::new(channel).session(ReceiverStream::new(receiver)),
        )
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|s| s.to_string())?
        .into_inner();
        let answer = tokio::time::timeout(TIMEOUT, inbound.next())
            .await
            .map_err(|_| "no answer".to_string())?
            .ok_or("the stream ended")?
            .map_err(|s| s.to_string())?;
        drop(outbound);
        answer
            .body
            .ok_or_else(|| "an answer without a body".to_string())
    });
    println!("CLAIMANT {answer:?}");
}
