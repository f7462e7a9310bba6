//! Fuzzing the data port: random, truncated and oversized bytes fed to its request decoder, to
//! the hello parsing, and to a real server on a loopback socket. Nothing may panic, allocate
//! by what a peer claims, or answer anything but a refusal, an error, the exact range asked
//! for (only with the object's capability and size), or a close.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use prost::Message;
use yr_common::auth::{
    self, ClusterToken, HELLO_ACCEPTED, HELLO_HEADER, HELLO_REFUSED, MAX_TOKEN_LEN,
};
use yr_datasystem::capability::CAPABILITY_LEN;
use yr_datasystem::data_port::{
    DataPort, RangeRequest, RequestError, REQUEST_LEN, STATUS_ERROR, STATUS_OK,
};
use yr_datasystem::shared_memory::SharedMemoryStore;

/// The served object's size.
const SIZE: u64 = 4096;

/// One data port serving one object, shared by every case.
struct Server {
    address: String,
    token: ClusterToken,
    store: Arc<SharedMemoryStore>,
    object: RangeRequest,
    _runtime: tokio::runtime::Runtime,
}

static PANICKED: AtomicBool = AtomicBool::new(false);

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // A panic in a server task would be swallowed by tokio: note it.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let store = Arc::new(SharedMemoryStore::new(1 << 20, "fuzz").expect("store"));
        let (allocation, _) = store.create(SIZE, 7).expect("create");
        let bytes: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        store.write_at(allocation, 0, &bytes).expect("write");
        let object = RangeRequest {
            capability: store.capability_of(allocation).expect("capability"),
            allocation,
            size: SIZE,
            from: 0,
            length: SIZE,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let token = ClusterToken::generate().expect("token");
        let mut port = DataPort::new(
            store.clone(),
            Arc::new(AtomicU64::new(0)),
            token.clone(),
            None,
        );
        port.idle_timeout = Duration::from_millis(500);
        port.serve(listener, runtime.handle()).expect("serve");
        Server {
            address,
            token,
            store,
            object,
            _runtime: runtime,
        }
    })
}

/// Send `bytes`, close the sending side, and read everything the server answers.
fn exchange(bytes: &[u8]) -> Vec<u8> {
    let server = server();
    let mut stream = TcpStream::connect(&server.address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The server may close before it read everything (a refused hello): that is fine.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    // A reset after a refusal is a close too; a timeout is not.
    if let Err(error) = read {
        assert_ne!(
            error.kind(),
            std::io::ErrorKind::WouldBlock,
            "the server neither answered nor closed"
        );
    }
    answer
}

/// Whether `answer` (after an accepted hello) is one well-formed error.
fn is_error_answer(answer: &[u8]) -> bool {
    if answer.len() < 5 || answer[0] != STATUS_ERROR {
        return false;
    }
    let length = u32::from_le_bytes([answer[1], answer[2], answer[3], answer[4]]) as usize;
    answer.len() == 5 + length
        && yr_proto::v1::ErrorInfo::decode(&answer[5..]).is_ok_and(|info| !info.message.is_empty())
}

/// A request near the served one: each field right or random.
fn requests() -> impl Strategy<Value = RangeRequest> {
    let object = server().object;
    (
        prop_oneof![Just(object.capability), any::<[u8; CAPABILITY_LEN]>()],
        prop_oneof![Just(object.allocation), any::<u64>()],
        prop_oneof![Just(SIZE), any::<u64>(), 0..2 * SIZE],
        prop_oneof![0..2 * SIZE, any::<u64>()],
        prop_oneof![0..2 * SIZE, any::<u64>()],
    )
        .prop_map(
            |(capability, allocation, size, from, length)| RangeRequest {
                capability,
                allocation,
                size,
                from,
                length,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_to_a_request_only_when_they_are_one(
        bytes in proptest::collection::vec(any::<u8>(), 0..3 * REQUEST_LEN),
    ) {
        match RangeRequest::decode(&bytes) {
            Ok(request) => prop_assert_eq!(request.encode().to_vec(), bytes),
            Err(RequestError::Length(length)) => prop_assert_ne!(length, REQUEST_LEN),
            Err(RequestError::Magic) => prop_assert_ne!(&bytes[..4], b"YRD2"),
        }
    }

    #[test]
    fn a_hello_announces_at_most_the_longest_token(header in any::<[u8; HELLO_HEADER]>()) {
        if let Ok(length) = auth::hello_length(&header) {
            prop_assert!((1..=MAX_TOKEN_LEN).contains(&length));
        }
    }

    #[test]
    fn reading_a_hello_reads_a_bounded_prefix_and_never_accepts_a_stranger(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        real_magic in any::<bool>(),
    ) {
        if real_magic && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&auth::HELLO_MAGIC);
        }
        let token = ClusterToken::generate().expect("token");
        let mut reader = bytes.as_slice();
        prop_assert!(auth::read_hello(&mut reader, &token).is_err());
        prop_assert!(bytes.len() - reader.len() <= HELLO_HEADER + MAX_TOKEN_LEN);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_openings_are_refused_and_closed(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let answer = exchange(&bytes);
        // Random bytes are no hello: one refusal byte (or nothing if the peer said nothing).
        prop_assert!(answer.is_empty() || answer == [HELLO_REFUSED], "{:?}", answer);
    }

    #[test]
    fn requests_after_a_hello_get_the_range_only_when_they_name_the_object(
        request in requests(),
        cut in prop_oneof![Just(REQUEST_LEN), 0..REQUEST_LEN, REQUEST_LEN..4 * REQUEST_LEN],
        trailing in proptest::collection::vec(any::<u8>(), 3 * REQUEST_LEN),
    ) {
        let server = server();
        let mut sent = server.token.hello();
        let mut encoded = request.encode().to_vec();
        encoded.extend_from_slice(&trailing);
        sent.extend_from_slice(&encoded[..cut]);
        let answer = exchange(&sent);
        prop_assert_eq!(answer.first(), Some(&HELLO_ACCEPTED));
        let answer = &answer[1..];
        if cut < REQUEST_LEN {
            // Truncated: closed without an answer.
            prop_assert!(answer.is_empty(), "{:?}", answer);
            return Ok(());
        }
        let object = server.object;
        let readable = request.capability == object.capability
            && request.allocation == object.allocation
            && request.size == SIZE
            && request.from.checked_add(request.length).is_some_and(|end| end <= SIZE);
        if readable {
            prop_assert_eq!(answer.first(), Some(&STATUS_OK));
            prop_assert_eq!(answer.len() as u64, 1 + request.length);
            let expected: Vec<u8> = (request.from..request.from + request.length)
                .map(|i| (i % 251) as u8)
                .collect();
            prop_assert!(answer[1..] == expected[..]);
        } else {
            prop_assert!(is_error_answer(answer), "{:?}", answer);
        }
    }
}

#[test]
fn after_the_fuzzing_the_server_still_serves_and_nothing_panicked_or_was_allocated() {
    let server = server();
    // Exercise the server once in this test too (cases of other tests may run in parallel).
    let mut sent = server.token.hello();
    sent.extend_from_slice(&server.object.encode());
    let answer = exchange(&sent);
    assert_eq!(answer.len() as u64, 2 + SIZE);
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a data-port task panicked"
    );
    // Still the one object: nothing a peer sent allocated anything.
    assert_eq!(server.store.stats().objects, 1);
}
