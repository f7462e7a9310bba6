//! The Redis client of the second-level store, over the `redis` crate (sync connections with
//! connect and I/O timeouts, and a small pool of idle connections). It runs what the store
//! needs (SET with PX, GET with PTTL in one pipeline, DEL, EXISTS, PING) and turns every
//! failure, a refused connection or an error reply, into 3007 (`ERR_REDIS_OPERATION_ERROR`)
//! with the server's address, the command and the server's message.

use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::ConnectionLike;
use yr_common::{Error, Result};

use crate::error::DataSystemError;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read or write on a connection may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;

/// A Redis server at `host:port`.
pub struct RedisClient {
    address: String,
    idle: Mutex<Vec<redis::Connection>>,
}

impl RedisClient {
    /// A client of the server at `address` (`host:port`). Connects on first use.
    pub fn new(address: impl Into<String>) -> RedisClient {
        RedisClient {
            address: address.into(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The server's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn failed(&self, what: &str, detail: impl std::fmt::Display) -> Error {
        DataSystemError::Redis {
            address: self.address.clone(),
            what: what.to_string(),
            detail: detail.to_string(),
        }
        .into()
    }

    fn connect(&self) -> std::result::Result<redis::Connection, redis::RedisError> {
        let client = redis::Client::open(format!("redis://{}/", self.address))?;
        let connection = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(connection)
    }

    /// Run `query` on a connection of the pool (or a new one). A pooled connection that turns
    /// out to be broken is replaced once; any failure is 3007 naming `what`.
    fn with_connection<T>(
        &self,
        what: &str,
        query: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let pooled = self.idle.lock().pop();
        let reused = pooled.is_some();
        let mut connection = match pooled {
            Some(connection) => connection,
            None => self.connect().map_err(|e| self.failed("connect", e))?,
        };
        let result = match query(&mut connection) {
            // The server may have closed an idle connection: try once on a new one.
            Err(error) if reused && (error.is_io_error() || error.is_connection_dropped()) => {
                connection = self.connect().map_err(|e| self.failed("connect", e))?;
                query(&mut connection)
            }
            result => result,
        };
        let value = result.map_err(|e| self.failed(what, e))?;
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE && connection.is_open() {
            idle.push(connection);
        }
        Ok(value)
    }

    /// `PING`.
    pub fn ping(&self) -> Result<()> {
        self.with_connection("PING", |c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    /// `SET key value [PX ttl_ms]`.
    pub fn set(&self, key: &[u8], value: &[u8], ttl_ms: Option<u64>) -> Result<()> {
        self.with_connection("SET", |c| {
            let mut command = redis::cmd("SET");
            command.arg(key).arg(value);
            if let Some(ms) = ttl_ms {
                command.arg("PX").arg(ms.max(1));
            }
            command.query::<()>(c)
        })
    }

    /// `GET key`: the value, or `None` if the key does not exist.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.with_connection("GET", |c| {
            redis::cmd("GET").arg(key).query::<Option<Vec<u8>>>(c)
        })
        .map(|value| value.map(Bytes::from))
    }

    /// `GET key` and `PTTL key` in one round trip: the value and its remaining time to live
    /// in milliseconds (`None`: no expiry).
    pub fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Bytes, Option<u64>)>> {
        let (value, ttl) = self.with_connection("GET", |c| {
            redis::pipe()
                .cmd("GET")
                .arg(key)
                .cmd("PTTL")
                .arg(key)
                .query::<(Option<Vec<u8>>, i64)>(c)
        })?;
        Ok(value.map(|value| {
            (
                Bytes::from(value),
                u64::try_from(ttl).ok().filter(|ms| *ms > 0),
            )
        }))
    }

    /// `DEL key`: whether it existed.
    pub fn del(&self, key: &[u8]) -> Result<bool> {
        self.with_connection("DEL", |c| redis::cmd("DEL").arg(key).query::<i64>(c))
            .map(|n| n > 0)
    }

    /// `EXISTS key`.
    pub fn exists(&self, key: &[u8]) -> Result<bool> {
        self.with_connection("EXISTS", |c| redis::cmd("EXISTS").arg(key).query::<i64>(c))
            .map(|n| n > 0)
    }
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("address", &self.address)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use yr_common::ErrorCode;

    use super::*;

    #[test]
    fn an_unreachable_server_is_3007_naming_it() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = RedisClient::new(format!("127.0.0.1:{port}"));
        let error = client.ping().unwrap_err();
        assert_eq!(error.code(), ErrorCode::RedisOperationError);
        assert!(error.message().contains(&format!("127.0.0.1:{port}")));
    }
}
