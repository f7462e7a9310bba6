//! Streams: producers and consumers (`create_stream_producer`, `create_stream_consumer`),
//! `send`/`receive`/`ack`/`close`, FIFO per producer, every subscription getting every
//! element, shared (round-robin) subscriptions, back-pressure on a full stream (4202), a fast
//! producer and a slow consumer losing nothing, `retain_for_num_consumers`, `auto_clean_up`,
//! `delete_stream` (4299 while in use), the global counts, bad names and configurations
//! (1001), closed handles (4298), user code on either side, and calls outside a session
//! (4001, 9000). Stream names are unique per test: a cluster keeps its streams across
//! sessions.

use std::time::{Duration, Instant};

use yr::{ErrorCode, ProducerConfig, SubscriptionConfig, SubscriptionType};

use crate::support::{self, assert_error, unwrap_err, TIMEOUT};

fn name(label: &str) -> String {
    support::unique(&format!("stream-{label}"))
}

fn sub(name: &str) -> SubscriptionConfig {
    SubscriptionConfig::new(name, SubscriptionType::Stream)
}

fn shared(name: &str) -> SubscriptionConfig {
    SubscriptionConfig::new(name, SubscriptionType::RoundRobin)
}

/// A small stream: 4 KiB pages, 16 KiB in all.
fn small() -> ProducerConfig {
    ProducerConfig {
        page_size: 4096,
        max_stream_size: 16 * 1024,
        ..ProducerConfig::default()
    }
}

fn values(elements: &[yr::Element]) -> Vec<Vec<u8>> {
    elements.iter().map(|e| e.value.clone()).collect()
}

/// Receive exactly `n` elements (within [`TIMEOUT`]).
fn receive_n(consumer: &yr::Consumer, n: usize) -> Vec<yr::Element> {
    let mut out = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while out.len() < n && Instant::now() < deadline {
        out.extend(consumer.receive(TIMEOUT, n - out.len()).unwrap());
    }
    assert_eq!(out.len(), n, "received {} of {n} elements", out.len());
    out
}

#[yr::invoke]
fn consume(stream: String, subscription: String, count: usize) -> Vec<Vec<u8>> {
    let consumer =
        yr::create_stream_consumer(&stream, sub(&subscription)).expect("create a consumer");
    // Tell the driver the subscription exists.
    yr::kv_write(&format!("{stream}-ready"), b"1", yr::SetParam::default()).expect("kv");
    let elements = receive_n(&consumer, count);
    consumer
        .ack(elements.last().map_or(0, |e| e.id))
        .expect("ack");
    consumer.close().expect("close");
    values(&elements)
}

#[yr::invoke]
fn produce(stream: String, count: u32) -> bool {
    let producer =
        yr::create_stream_producer(&stream, ProducerConfig::default()).expect("create a producer");
    for i in 0..count {
        producer
            .send(&i.to_le_bytes(), Duration::from_secs(10))
            .expect("send");
    }
    producer.close().is_ok()
}

#[test]
fn elements_arrive_in_order_and_every_subscription_gets_every_one() {
    let _session = support::session();
    let s = name("order");
    let a = yr::create_stream_consumer(&s, sub("a")).unwrap();
    let b = yr::create_stream_consumer(&s, sub("b")).unwrap();
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    let sent: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_le_bytes().to_vec()).collect();
    for element in &sent {
        producer.send(element, TIMEOUT).unwrap();
    }
    for consumer in [&a, &b] {
        let got = receive_n(consumer, 100);
        assert_eq!(values(&got), sent);
        // Ids count up from 1.
        assert_eq!(got[0].id, 1);
        assert_eq!(got[99].id, 100);
        consumer.ack(100).unwrap();
    }
    // Nothing more.
    assert!(a.receive(Duration::from_millis(50), 1).unwrap().is_empty());
    producer.close().unwrap();
}

#[test]
fn a_receive_waits_for_elements_and_a_timeout_returns_what_is_ready() {
    let _session = support::session();
    let s = name("wait");
    let consumer = yr::create_stream_consumer(&s, sub("a")).unwrap();
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    let started = Instant::now();
    assert!(consumer
        .receive(Duration::from_millis(100), 1)
        .unwrap()
        .is_empty());
    assert!(started.elapsed() >= Duration::from_millis(100));
    producer.send(b"one", TIMEOUT).unwrap();
    // Expecting two, only one comes: the timeout returns it.
    let got = consumer.receive(Duration::from_millis(300), 2).unwrap();
    assert_eq!(values(&got), vec![b"one".to_vec()]);
    // expect_num 0 returns as soon as anything is there: the element is sent once the receive
    // waits (on a cluster: once the node parks it).
    let receiver = support::spawn_until_parked(support::Parked::StreamReceive, move || {
        consumer.receive(TIMEOUT, 0)
    });
    producer.send(b"two", TIMEOUT).unwrap();
    let got = receiver.join().unwrap().unwrap();
    assert_eq!(values(&got), vec![b"two".to_vec()]);
    producer.close().unwrap();
}

#[test]
fn round_robin_consumers_of_a_shared_subscription_split_the_elements() {
    let _session = support::session();
    let s = name("shared");
    let a = yr::create_stream_consumer(&s, shared("workers")).unwrap();
    let b = yr::create_stream_consumer(&s, shared("workers")).unwrap();
    let audit = yr::create_stream_consumer(&s, sub("audit")).unwrap();
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    for i in 0..10u8 {
        producer.send(&[i], TIMEOUT).unwrap();
    }
    let from_a = values(&receive_n(&a, 5));
    let from_b = values(&receive_n(&b, 5));
    assert_eq!(from_a, vec![vec![0], vec![2], vec![4], vec![6], vec![8]]);
    assert_eq!(from_b, vec![vec![1], vec![3], vec![5], vec![7], vec![9]]);
    // Another subscription still gets everything.
    assert_eq!(receive_n(&audit, 10).len(), 10);
    assert_eq!(yr::query_global_consumers_num(&s).unwrap(), 3);
}

#[test]
fn a_full_stream_blocks_send_until_acks_make_room_else_4202() {
    let _session = support::session();
    let s = name("full");
    let consumer = yr::create_stream_consumer(&s, sub("slow")).unwrap();
    let config = ProducerConfig {
        delay_flush_time: Duration::ZERO,
        ..small()
    };
    let producer = yr::create_stream_producer(&s, config).unwrap();
    let page = vec![7u8; 4096];
    for _ in 0..4 {
        producer.send(&page, TIMEOUT).unwrap();
    }
    // 16 KiB not acked: the next send waits, then fails.
    let started = Instant::now();
    let error = unwrap_err(producer.send(&page, Duration::from_millis(300)));
    assert_error(&error, ErrorCode::SharedMemoryLimited, &[&s, "full", "ack"]);
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The failed element was not sent.
    let got = receive_n(&consumer, 4);
    assert!(consumer
        .receive(Duration::from_millis(100), 1)
        .unwrap()
        .is_empty());
    // A blocked send goes through once the consumer acks: the ack comes once the send waits
    // for room (on a cluster: once the node parks it).
    let sender = support::spawn_until_parked(support::Parked::StreamSend, move || {
        let sent = producer.send(b"after", TIMEOUT);
        (sent, producer)
    });
    consumer.ack(got[3].id).unwrap();
    let (sent, _producer) = sender.join().unwrap();
    sent.unwrap();
    assert_eq!(values(&receive_n(&consumer, 1)), vec![b"after".to_vec()]);
}

#[test]
fn a_fast_producer_and_a_slow_consumer_lose_nothing_and_keep_order() {
    let _session = support::session();
    let s = name("backpressure");
    let consumer = yr::create_stream_consumer(&s, sub("slow")).unwrap();
    let producer = yr::create_stream_producer(&s, small()).unwrap();
    const COUNT: u32 = 2000;
    let sender = std::thread::spawn(move || {
        for i in 0..COUNT {
            // 100 bytes each: the 16 KiB stream fills many times over.
            let mut element = vec![0u8; 100];
            element[..4].copy_from_slice(&i.to_le_bytes());
            producer.send(&element, TIMEOUT).unwrap();
        }
        producer.close().unwrap();
    });
    let mut next = 0u32;
    while next < COUNT {
        let got = consumer.receive(TIMEOUT, 50).unwrap();
        assert!(!got.is_empty(), "nothing arrived after element {next}");
        for element in &got {
            let i = u32::from_le_bytes(element.value[..4].try_into().unwrap());
            assert_eq!(i, next, "out of order");
            next += 1;
        }
        // Slow: ack a batch only after a pause.
        std::thread::sleep(Duration::from_millis(1));
        consumer.ack(got.last().unwrap().id).unwrap();
    }
    sender.join().unwrap();
    assert!(consumer
        .receive(Duration::from_millis(50), 1)
        .unwrap()
        .is_empty());
}

#[test]
fn retained_elements_reach_a_late_subscription_and_others_are_dropped() {
    let _session = support::session();
    let (kept, dropped) = (name("retain"), name("no-retain"));
    let retain = ProducerConfig {
        retain_for_num_consumers: 1,
        ..ProducerConfig::default()
    };
    let keeper = yr::create_stream_producer(&kept, retain).unwrap();
    let dropper = yr::create_stream_producer(&dropped, ProducerConfig::default()).unwrap();
    keeper.send(b"early", TIMEOUT).unwrap();
    dropper.send(b"early", TIMEOUT).unwrap();
    keeper.close().unwrap();
    dropper.close().unwrap();
    let late = yr::create_stream_consumer(&kept, sub("late")).unwrap();
    assert_eq!(values(&receive_n(&late, 1)), vec![b"early".to_vec()]);
    let late = yr::create_stream_consumer(&dropped, sub("late")).unwrap();
    assert!(late
        .receive(Duration::from_millis(200), 1)
        .unwrap()
        .is_empty());
}

#[test]
fn auto_clean_up_removes_the_stream_when_its_last_user_closes() {
    let _session = support::session();
    let s = name("auto");
    let config = ProducerConfig {
        retain_for_num_consumers: 1,
        auto_clean_up: true,
        ..ProducerConfig::default()
    };
    let producer = yr::create_stream_producer(&s, config).unwrap();
    producer.send(b"gone", TIMEOUT).unwrap();
    producer.close().unwrap();
    // The stream and its retained element went with the producer.
    let consumer = yr::create_stream_consumer(&s, sub("late")).unwrap();
    assert!(consumer
        .receive(Duration::from_millis(200), 1)
        .unwrap()
        .is_empty());
}

#[test]
fn delete_is_refused_with_4299_while_producers_or_consumers_remain() {
    let _session = support::session();
    let s = name("delete");
    assert_eq!(yr::query_global_producers_num(&s).unwrap(), 0);
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    let consumer = yr::create_stream_consumer(&s, sub("a")).unwrap();
    let second = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    assert_eq!(yr::query_global_producers_num(&s).unwrap(), 2);
    assert_eq!(yr::query_global_consumers_num(&s).unwrap(), 1);
    let error = unwrap_err(yr::delete_stream(&s));
    assert_error(
        &error,
        ErrorCode::DatasystemFailed,
        &[&s, "2 producer", "1 consumer"],
    );
    producer.close().unwrap();
    second.close().unwrap();
    let error = unwrap_err(yr::delete_stream(&s));
    assert_error(&error, ErrorCode::DatasystemFailed, &["1 consumer"]);
    consumer.close().unwrap();
    assert_eq!(yr::query_global_consumers_num(&s).unwrap(), 0);
    yr::delete_stream(&s).unwrap();
    // Deleting a stream that does not exist succeeds.
    yr::delete_stream(&s).unwrap();
}

#[test]
fn bad_names_configurations_and_arguments_are_1001() {
    let _session = support::session();
    let s = name("bad");
    let bad_configs = [
        (
            ProducerConfig {
                page_size: 0,
                ..ProducerConfig::default()
            },
            "page_size",
        ),
        (
            ProducerConfig {
                page_size: 5000,
                ..ProducerConfig::default()
            },
            "page_size",
        ),
        (
            ProducerConfig {
                page_size: 8192,
                max_stream_size: 4096,
                ..ProducerConfig::default()
            },
            "max_stream_size",
        ),
        (
            ProducerConfig {
                retain_for_num_consumers: 17,
                ..ProducerConfig::default()
            },
            "retain_for_num_consumers",
        ),
    ];
    for (config, field) in bad_configs {
        let error = unwrap_err(yr::create_stream_producer(&s, config));
        assert_error(&error, ErrorCode::ParamInvalid, &[field]);
    }
    for bad in ["", "has space", &"x".repeat(256)] {
        let error = unwrap_err(yr::create_stream_producer(bad, ProducerConfig::default()));
        assert_error(&error, ErrorCode::ParamInvalid, &["stream name"]);
        let error = unwrap_err(yr::create_stream_consumer(bad, sub("a")));
        assert_error(&error, ErrorCode::ParamInvalid, &["stream name"]);
        assert_error(
            &unwrap_err(yr::delete_stream(bad)),
            ErrorCode::ParamInvalid,
            &[],
        );
        assert_error(
            &unwrap_err(yr::query_global_producers_num(bad)),
            ErrorCode::ParamInvalid,
            &[],
        );
    }
    let error = unwrap_err(yr::create_stream_consumer(&s, sub("")));
    assert_error(&error, ErrorCode::ParamInvalid, &["subscription name"]);
    // A Stream subscription has one consumer; a name keeps its type.
    let _first = yr::create_stream_consumer(&s, sub("one")).unwrap();
    let error = unwrap_err(yr::create_stream_consumer(&s, sub("one")));
    assert_error(&error, ErrorCode::ParamInvalid, &["one", "RoundRobin"]);
    let error = unwrap_err(yr::create_stream_consumer(&s, shared("one")));
    assert_error(&error, ErrorCode::ParamInvalid, &["one", "type"]);
    // An element larger than the stream, and an ack of an id never received.
    let producer = yr::create_stream_producer(&s, small()).unwrap();
    let error = unwrap_err(producer.send(&vec![0u8; 16 * 1024 + 1], TIMEOUT));
    assert_error(&error, ErrorCode::ParamInvalid, &["max_stream_size"]);
    let error = unwrap_err(_first.ack(5));
    assert_error(&error, ErrorCode::ParamInvalid, &["5"]);
}

#[test]
fn closed_producers_and_consumers_fail_with_4298() {
    let _session = support::session();
    let s = name("closed");
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    let consumer = yr::create_stream_consumer(&s, sub("a")).unwrap();
    producer.send(b"last", TIMEOUT).unwrap();
    // Close flushes what the producer still buffers.
    producer.close().unwrap();
    assert_eq!(values(&receive_n(&consumer, 1)), vec![b"last".to_vec()]);
    consumer.close().unwrap();
    let errors = [
        unwrap_err(producer.send(b"x", TIMEOUT)),
        unwrap_err(producer.close()),
        unwrap_err(consumer.receive(TIMEOUT, 1)),
        unwrap_err(consumer.ack(1)),
        unwrap_err(consumer.close()),
    ];
    for error in errors {
        assert_error(&error, ErrorCode::ClientAlreadyClosed, &[&s, "closed"]);
    }
    assert_eq!(yr::query_global_producers_num(&s).unwrap(), 0);
    assert_eq!(yr::query_global_consumers_num(&s).unwrap(), 0);
}

#[test]
fn user_code_and_the_driver_share_streams() {
    let _session = support::session();
    // The driver produces; a function consumes.
    let s = name("to-function");
    let received = yr::function(consume)
        .invoke((s.clone(), "remote".to_string(), 3usize))
        .unwrap();
    yr::kv_read(&[&format!("{s}-ready")], TIMEOUT).unwrap();
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    for element in [b"a", b"b", b"c"] {
        producer.send(element, TIMEOUT).unwrap();
    }
    assert_eq!(
        support::get(&received),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    producer.close().unwrap();
    // A function produces; the driver consumes.
    let s = name("from-function");
    let consumer = yr::create_stream_consumer(&s, sub("driver")).unwrap();
    let produced = yr::function(produce).invoke((s.clone(), 50u32)).unwrap();
    assert!(support::get(&produced));
    let got = receive_n(&consumer, 50);
    let numbers: Vec<u32> = got
        .iter()
        .map(|e| u32::from_le_bytes(e.value[..4].try_into().unwrap()))
        .collect();
    assert_eq!(numbers, (0..50).collect::<Vec<_>>());
}

#[test]
fn stream_calls_after_finalize_fail_with_9000() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    let s = name("finalized");
    let producer = yr::create_stream_producer(&s, ProducerConfig::default()).unwrap();
    let consumer = yr::create_stream_consumer(&s, sub("a")).unwrap();
    yr::finalize().unwrap();
    let errors = [
        unwrap_err(yr::create_stream_producer(&s, ProducerConfig::default())),
        unwrap_err(yr::create_stream_consumer(&s, sub("b"))),
        unwrap_err(yr::delete_stream(&s)),
        unwrap_err(yr::query_global_producers_num(&s)),
        unwrap_err(yr::query_global_consumers_num(&s)),
        unwrap_err(producer.send(b"x", TIMEOUT)),
        unwrap_err(consumer.receive(TIMEOUT, 1)),
        unwrap_err(consumer.ack(1)),
    ];
    for error in errors {
        assert_error(&error, ErrorCode::Finalized, &["init"]);
    }
}

#[test]
fn a_receive_waiting_when_finalize_runs_fails_with_9000() {
    let _exclusive = support::exclusive();
    yr::init(support::config()).unwrap();
    let consumer = yr::create_stream_consumer(&name("waiting"), sub("a")).unwrap();
    // Finalize runs once the receive is issued and waits for its answer.
    let reader = support::spawn_until_blocked(move || consumer.receive(yr::FOREVER, 1));
    let finalized_at = Instant::now();
    yr::finalize().unwrap();
    let error = unwrap_err(reader.join().unwrap());
    assert_error(&error, ErrorCode::Finalized, &["finalize"]);
    assert!(finalized_at.elapsed() < TIMEOUT);
}

#[test]
fn stream_calls_before_init_fail_with_4001() {
    support::in_fresh_process("streams::stream_calls_before_init_fail_with_4001", || {
        let errors = [
            unwrap_err(yr::create_stream_producer("s", ProducerConfig::default())),
            unwrap_err(yr::create_stream_consumer("s", sub("a"))),
            unwrap_err(yr::delete_stream("s")),
            unwrap_err(yr::query_global_producers_num("s")),
            unwrap_err(yr::query_global_consumers_num("s")),
        ];
        for error in errors {
            assert_error(&error, ErrorCode::IncorrectInitUsage, &["init"]);
        }
    });
}
