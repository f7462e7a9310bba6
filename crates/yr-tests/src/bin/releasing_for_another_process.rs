//! Helper of `security_data`'s `a_pid_in_a_request_does_not_release_another_processs_objects`:
//! asks the object store at `YR_TESTS_BUS` (with the token in `YR_TOKEN`) to release
//! allocations 1..=64 naming process `YR_TESTS_VICTIM` as their holder, then prints `DONE`.

use yr_proto::ds as pb;

fn main() {
    let bus = std::env::var("YR_TESTS_BUS").expect("bus");
    let victim: u32 = std::env::var("YR_TESTS_VICTIM")
        .expect("victim")
        .parse()
        .expect("a pid");
    let token = yr_common::auth::ClusterToken::resolve(None, None)
        .expect("a valid token")
        .expect("YR_TOKEN");
    yr_transport::install(yr_transport::Credentials::with_token(token));
    yr_tests::block_on(async {
        let channel = yr_transport::connect(&bus, yr::ErrorCode::ConnectionFailed)
            .await
            .expect("the node's socket");
        let mut store = pb::object_store_client::ObjectStoreClient::new(channel);
        for _ in 0..4 {
            store
                .release(pb::ReleaseObjectsRequest {
                    allocations: (1..=64).collect(),
                    pid: victim,
                })
                .await
                .expect("release");
        }
    });
    println!("DONE");
}
