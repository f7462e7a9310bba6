//! Pulls over plain TCP: ranges, refusals, limits and timeouts, the request format.

use super::*;

#[test]
fn ranges_of_an_object_arrive_intact_and_the_serving_reference_is_released() {
    let serving = serving(64 << 20);
    let size = (9 << 20) + 12345;
    let whole = object(&serving, size);
    let pulling = SharedMemoryStore::new(64 << 20, "pulling").expect("store");
    let (local, _) = pulling.create(size, 8).expect("create");
    // Three ranges, as a parallel pull asks for them, one of them odd-sized.
    let third = size / 3;
    for (from, length) in [
        (0, third),
        (third, third + 1),
        (2 * third + 1, size - 2 * third - 1),
    ] {
        let request = RangeRequest {
            from,
            length,
            ..whole
        };
        read_range(
            &serving.address,
            &serving.token,
            None,
            &request,
            &pulling,
            local,
        )
        .expect("range");
    }
    assert!(
        read(&pulling, local, size) == pattern(size),
        "the copy differs"
    );
    // The serving node's own reference is gone once the ranges are sent.
    std::thread::sleep(Duration::from_millis(100));
    serving.store.release(&[whole.allocation], 7);
    assert_eq!(serving.store.stats().objects, 0);
}

#[test]
fn a_missing_or_wrong_token_is_refused_before_any_byte_of_an_object() {
    let serving = serving(1 << 20);
    let request = object(&serving, 1000);
    let pulling = SharedMemoryStore::new(1 << 20, "pulling").expect("store");
    let (local, _) = pulling.create(1000, 8).expect("create");
    let stranger = ClusterToken::generate().expect("token");
    match read_range(&serving.address, &stranger, None, &request, &pulling, local) {
        Err(RangeError::Refused(error)) => {
            assert_eq!(error.code(), ErrorCode::AuthorizeFailed, "{error}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // On the wire: a wrong token, no hello at all, and a request sent in place of the hello
    // each get one refusal byte and a close, and nothing of the object.
    let mut wrong = stranger.hello();
    wrong.extend_from_slice(&request.encode());
    for opening in [
        wrong,
        request.encode().to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut stream = connected(&serving.address, &opening);
        assert_eq!(rest(&mut stream), vec![HELLO_REFUSED]);
    }
    assert_eq!(read(&pulling, local, 1000), vec![0u8; 1000]);
    // Nothing was retained for the refused peers.
    serving.store.release(&[request.allocation], 7);
    assert_eq!(serving.store.stats().objects, 0);
}

#[test]
fn a_wrong_capability_a_wrong_size_and_a_freed_object_get_one_answer_without_a_size() {
    let serving = serving(1 << 20);
    let request = object(&serving, 100);
    let pulling = SharedMemoryStore::new(1 << 20, "pulling").expect("store");
    let (local, _) = pulling.create(4096, 8).expect("create");
    let mut capability = request.capability;
    capability[3] ^= 1;
    let wrong_capability = RangeRequest {
        capability,
        ..request
    };
    let wrong_size = RangeRequest {
        size: 4096,
        length: 4096,
        ..request
    };
    let freed = RangeRequest {
        allocation: request.allocation + 1,
        ..request
    };
    let answers: Vec<Error> = [wrong_capability, wrong_size, freed]
        .iter()
        .map(|asked| {
            remote_error(read_range(
                &serving.address,
                &serving.token,
                None,
                asked,
                &pulling,
                local,
            ))
        })
        .collect();
    for answer in &answers {
        assert_eq!(answer.code(), ErrorCode::GetOperationFailed, "{answer}");
        assert_eq!(answer.message(), answers[0].message());
        assert!(!answer.message().contains("100"), "{answer}");
    }
    assert_eq!(read(&pulling, local, 4096), vec![0u8; 4096]);
    // The right capability and size read it.
    let right = RangeRequest { ..request };
    read_range(
        &serving.address,
        &serving.token,
        None,
        &right,
        &pulling,
        local,
    )
    .expect("read");
    assert_eq!(read(&pulling, local, 100)[..], pattern(100)[..]);
}

#[test]
fn idle_connections_that_send_nothing_do_not_delay_a_pull() {
    let serving = serving(64 << 20);
    let request = object(&serving, 16 << 20);
    let pulling = SharedMemoryStore::new(64 << 20, "pulling").expect("store");
    let alone = pull_time(&serving, &request, &pulling, None);
    // More idle peers than the old fixed set of sender threads.
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(&serving.address).expect("connect"))
        .collect();
    let beside_idle = pull_time(&serving, &request, &pulling, None);
    drop(idle);
    // Generous for a busy machine: twice the time alone, plus scheduling noise.
    let bound = alone * 2 + Duration::from_millis(250);
    assert!(
        beside_idle <= bound,
        "a pull took {beside_idle:?} beside idle connections, {alone:?} alone"
    );
}

#[test]
fn a_connection_that_sends_no_request_in_time_is_closed() {
    let serving = serving_with(1 << 20, |port| {
        port.idle_timeout = Duration::from_millis(300)
    });
    let started = Instant::now();
    let mut silent = TcpStream::connect(&serving.address).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    assert!(rest(&mut silent).is_empty());
    // A hello alone, with no request after it, is closed too.
    let mut halfway = connected(&serving.address, &serving.token.hello());
    assert_eq!(rest(&mut halfway), vec![HELLO_ACCEPTED]);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_flood_beyond_the_connection_limit_is_refused_not_queued() {
    let serving = serving_with(1 << 20, |port| {
        port.max_connections = 4;
        port.idle_timeout = Duration::from_secs(60);
    });
    let request = object(&serving, 1000);
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&serving.address).expect("connect"))
        .collect();
    let started = Instant::now();
    let mut over = connected(&serving.address, &serving.token.hello());
    assert!(
        rest(&mut over).is_empty(),
        "a connection over the limit got an answer"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal waited for the idle timeout"
    );
    // Once the flood is gone, pulls are served again.
    drop(held);
    let pulling = SharedMemoryStore::new(1 << 20, "pulling").expect("store");
    let (local, _) = pulling.create(1000, 8).expect("create");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read_range(
            &serving.address,
            &serving.token,
            None,
            &request,
            &pulling,
            local,
        ) {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(?error, "the limit is not free yet");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("no pull was served after the flood: {error:?}"),
        }
    }
    assert_eq!(read(&pulling, local, 1000), pattern(1000));
}

#[test]
fn a_port_nobody_serves_or_a_stranger_is_a_transport_error() {
    let pulling = SharedMemoryStore::new(1 << 20, "pulling").expect("store");
    let (local, _) = pulling.create(100, 8).expect("create");
    let token = ClusterToken::generate().expect("token");
    let request = RangeRequest {
        capability: [0; CAPABILITY_LEN],
        allocation: 1,
        size: 100,
        from: 0,
        length: 100,
    };
    // A port that was free a moment ago.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .to_string();
    assert!(matches!(
        read_range(&closed, &token, None, &request, &pulling, local),
        Err(RangeError::Transport(_))
    ));
    // A server that is not a data port: it answers with garbage and hangs up.
    let stranger = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = stranger.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = stranger.accept() {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    assert!(matches!(
        read_range(&address, &token, None, &request, &pulling, local),
        Err(RangeError::Refused(_) | RangeError::Transport(_))
    ));
}

#[test]
fn a_request_without_the_magic_is_refused_with_an_error() {
    let serving = serving(1 << 20);
    let mut stream = connected(&serving.address, &serving.token.hello());
    let mut accepted = [0u8; 1];
    stream.read_exact(&mut accepted).expect("hello answer");
    assert_eq!(accepted[0], HELLO_ACCEPTED);
    stream.write_all(&[0u8; REQUEST_LEN]).expect("write");
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).expect("status");
    match read_error(&mut stream, status[0]) {
        RangeError::Remote(error) => assert_eq!(error.code(), ErrorCode::ParamInvalid),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[test]
fn requests_decode_only_from_their_exact_bytes() {
    let request = RangeRequest {
        capability: [9; CAPABILITY_LEN],
        allocation: 3,
        size: 4,
        from: 1,
        length: 2,
    };
    let bytes = request.encode();
    assert_eq!(RangeRequest::decode(&bytes), Ok(request));
    assert_eq!(
        RangeRequest::decode(&bytes[..REQUEST_LEN - 1]),
        Err(RequestError::Length(REQUEST_LEN - 1))
    );
    let mut old = bytes;
    old[..4].copy_from_slice(b"YRD1");
    assert_eq!(RangeRequest::decode(&old), Err(RequestError::Magic));
}

#[test]
fn a_release_request_drops_the_hold_kept_for_another_node_only_with_the_capability() {
    let serving = serving(1 << 20);
    let whole = object(&serving, 4096);
    // Process 7 made it and asks the node to keep it for an owner on another node.
    serving
        .store
        .hold_for_remote(whole.allocation, 7)
        .expect("hold");
    serving.store.release(&[whole.allocation], 7);
    assert_eq!(serving.store.remote_holds(), 1);
    // A release with a wrong capability changes nothing, and is answered like any other.
    let forged = RangeRequest {
        capability: [0u8; CAPABILITY_LEN],
        ..whole
    };
    release_hold(&serving.address, &serving.token, None, &forged).expect("answered");
    assert_eq!(serving.store.remote_holds(), 1);
    assert_eq!(serving.store.stats().objects, 1);
    // With the capability, the hold goes, and with it the object.
    release_hold(&serving.address, &serving.token, None, &whole).expect("released");
    assert_eq!(serving.store.remote_holds(), 0);
    assert_eq!(serving.store.stats().objects, 0);
    // A release without the token is refused.
    let stranger = ClusterToken::generate().expect("token");
    assert!(matches!(
        release_hold(&serving.address, &stranger, None, &whole),
        Err(RangeError::Refused(_))
    ));
}
