//! The Redis second-level store against a real Redis server: each test starts its own
//! `redis-server` on a free port (no persistence) and stops it when done. `redis-server` must be
//! on PATH (`apt-get install -y redis-server`); set `YR_SKIP_REDIS_TESTS=1` to skip these tests
//! on a machine without it.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use yr_common::ErrorCode;
use yr_datasystem::l2::{RedisStore, REDIS_KEY_PREFIX};
use yr_datasystem::redis::RedisClient;
use yr_datasystem::{DataWorker, DataWorkerOptions};
use yr_datasystem_core::kv::{KvStore, SetParam, WriteMode};
use yr_datasystem_core::l2::L2Store;

/// A `redis-server` child process, killed on drop.
struct RedisServer {
    child: Child,
    address: String,
}

impl RedisServer {
    /// Start one, or `None` (with a note) when `YR_SKIP_REDIS_TESTS` is set.
    fn start() -> Option<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// [`RedisServer::start`] with more `redis-server` arguments; it answers once it is up,
    /// even with an error reply (for example NOAUTH).
    fn start_with(extra: &[&str]) -> Option<RedisServer> {
        if std::env::var_os("YR_SKIP_REDIS_TESTS").is_some() {
            eprintln!("YR_SKIP_REDIS_TESTS is set: skipping a test against a real Redis");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}); install it (apt-get install -y \
                     redis-server) or set YR_SKIP_REDIS_TESTS=1"
                )
            });
        let server = RedisServer {
            child,
            address: format!("127.0.0.1:{port}"),
        };
        let client = RedisClient::new(server.address.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let answers = || match client.ping() {
            Ok(()) => true,
            // Up, and refusing the unauthenticated PING.
            Err(error) => error.message().contains("NOAUTH"),
        };
        while !answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on {}",
                server.address
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_mode(mode: WriteMode) -> SetParam {
    SetParam {
        write_mode: mode,
        ..SetParam::default()
    }
}

#[test]
fn the_client_speaks_set_get_del_exists_with_binary_values() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let client = RedisClient::new(redis.address.clone());
    let value: Vec<u8> = (0..=255u8).chain(b"\r\n$-1\r\n".iter().copied()).collect();
    client.set(b"bin\r\nkey", &value, None).unwrap();
    assert_eq!(client.get(b"bin\r\nkey").unwrap().unwrap(), value);
    assert!(client.exists(b"bin\r\nkey").unwrap());
    assert_eq!(client.get_with_ttl(b"bin\r\nkey").unwrap().unwrap().1, None);
    assert!(client.del(b"bin\r\nkey").unwrap());
    assert!(!client.del(b"bin\r\nkey").unwrap());
    assert_eq!(client.get(b"bin\r\nkey").unwrap(), None);
    assert!(!client.exists(b"bin\r\nkey").unwrap());
    // A large value in one command.
    let big = vec![7u8; 20 * 1024 * 1024];
    client.set(b"big", &big, None).unwrap();
    assert_eq!(client.get(b"big").unwrap().unwrap().len(), big.len());
}

#[test]
fn the_store_keeps_values_under_the_prefix_with_their_ttl() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::connect(&redis.address).unwrap();
    let later = SystemTime::now() + Duration::from_secs(100);
    store.put("k", b"v", Some(later)).unwrap();
    let client = RedisClient::new(redis.address.clone());
    let key = format!("{REDIS_KEY_PREFIX}k");
    let (value, ttl) = client.get_with_ttl(key.as_bytes()).unwrap().unwrap();
    assert_eq!(value, &b"v"[..]);
    let ttl = ttl.unwrap();
    assert!((95_000..=100_000).contains(&ttl), "{ttl}");
    let record = store.get("k").unwrap().unwrap();
    let drift = record
        .expires_at
        .unwrap()
        .duration_since(later)
        .unwrap_or_else(|e| e.duration());
    assert!(drift < Duration::from_secs(2), "{drift:?}");
    assert!(store.exists("k").unwrap());
    store.delete("k").unwrap();
    assert!(!store.exists("k").unwrap());
    assert_eq!(store.get("k").unwrap(), None);
}

#[test]
fn write_through_and_write_back_reach_redis_and_outlive_the_store() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    {
        let store = KvStore::with_l2(Arc::new(RedisStore::connect(&redis.address).unwrap()));
        store
            .set(
                "wt",
                Bytes::from_static(b"through"),
                &write_mode(WriteMode::WriteThroughL2Cache),
            )
            .unwrap();
        store
            .set(
                "wb",
                Bytes::from_static(b"back"),
                &write_mode(WriteMode::WriteBackL2Cache),
            )
            .unwrap();
        store
            .set(
                "mem",
                Bytes::from_static(b"memory"),
                &write_mode(WriteMode::NoneL2Cache),
            )
            .unwrap();
        assert!(store.flush(Duration::from_secs(10)));
    }
    let client = RedisClient::new(redis.address.clone());
    assert_eq!(
        client.get(b"yr:kv:wb").unwrap().unwrap(),
        &b"back"[..],
        "the write-back landed"
    );
    assert_eq!(client.get(b"yr:kv:mem").unwrap(), None);
    let store = KvStore::with_l2(Arc::new(RedisStore::connect(&redis.address).unwrap()));
    assert_eq!(
        store.get(&["wt", "wb"], Duration::ZERO).unwrap(),
        vec![Bytes::from_static(b"through"), Bytes::from_static(b"back")]
    );
    store.del(&["wt"]).unwrap();
    assert_eq!(client.get(b"yr:kv:wt").unwrap(), None);
}

#[test]
fn a_data_worker_on_redis_that_goes_away_fails_with_3007() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let worker = DataWorker::open(&DataWorkerOptions {
        data_dir: std::env::temp_dir().join("yr-unused-data-dir"),
        l2_redis: Some(redis.address.clone()),
        shared_memory_bytes: 1 << 20,
        pool_id: "test".into(),
        ..Default::default()
    })
    .unwrap();
    let address = redis.address.clone();
    drop(redis);
    let error = worker
        .kv()
        .set(
            "k",
            Bytes::from_static(b"v"),
            &write_mode(WriteMode::WriteThroughL2Cache),
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::RedisOperationError);
    assert!(error.message().contains(&address), "{}", error.message());
    // And a worker cannot start on a Redis that does not answer.
    let error = DataWorker::open(&DataWorkerOptions {
        data_dir: std::env::temp_dir(),
        l2_redis: Some(address),
        shared_memory_bytes: 1 << 20,
        pool_id: "test".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(error.code(), ErrorCode::RedisOperationError);
}

#[test]
fn an_error_reply_is_3007_with_the_servers_message_and_the_command() {
    let Some(redis) = RedisServer::start_with(&["--requirepass", "not-given"]) else {
        return;
    };
    let error = RedisClient::new(redis.address.clone())
        .get(b"k")
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::RedisOperationError);
    assert!(error.message().contains("NOAUTH"), "{}", error.message());
    assert!(error.message().contains("GET"), "{}", error.message());
    assert!(
        error.message().contains(&redis.address),
        "{}",
        error.message()
    );
}
