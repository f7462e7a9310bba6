//! A minimal Redis client: RESP2 over a blocking TCP connection, with a small pool of idle
//! connections. It speaks only what the second-level store needs (SET, GET, PTTL, DEL, EXISTS,
//! PING, sent as arrays of bulk strings) and turns every failure into 3007
//! (`ERR_REDIS_OPERATION_ERROR`) with the server's address and the command in the message.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use yr_common::{Error, Result};

use crate::error::DataSystemError;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read or write on a connection may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;
/// The largest bulk string accepted from the server (Redis's own limit is 512 MB).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// One reply of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Status(String),
    /// `-ERR ...`: the server refused the command.
    Error(String),
    /// `:1`.
    Integer(i64),
    /// `$3\r\nabc`, or `$-1` (`None`) for a missing value.
    Bulk(Option<Bytes>),
    /// `*2 ...`, or `*-1` (`None`).
    Array(Option<Vec<Reply>>),
}

/// A Redis server at `host:port`.
pub struct RedisClient {
    address: String,
    idle: Mutex<Vec<Connection>>,
}

struct Connection {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Connection {
    fn open(address: &str) -> std::io::Result<Connection> {
        let mut last = None;
        for socket in address.to_socket_addrs()? {
            match TcpStream::connect_timeout(&socket, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Ok(Connection {
                        reader: BufReader::new(stream.try_clone()?),
                        writer: BufWriter::new(stream),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the address resolves to nothing",
            )
        }))
    }

    fn exchange(&mut self, commands: &[&[&[u8]]]) -> std::io::Result<Vec<Reply>> {
        for command in commands {
            write_command(&mut self.writer, command)?;
        }
        self.writer.flush()?;
        commands
            .iter()
            .map(|_| read_reply(&mut self.reader))
            .collect()
    }
}

/// Write one command as a RESP array of bulk strings.
pub fn write_command(out: &mut impl Write, args: &[&[u8]]) -> std::io::Result<()> {
    write!(out, "*{}\r\n", args.len())?;
    for arg in args {
        write!(out, "${}\r\n", arg.len())?;
        out.write_all(arg)?;
        out.write_all(b"\r\n")?;
    }
    Ok(())
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

fn read_line(input: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    input.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(invalid("a reply line does not end with CRLF".into()));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| invalid("a reply line is not UTF-8".into()))
}

fn parse_length(text: &str) -> std::io::Result<i64> {
    text.parse()
        .map_err(|_| invalid(format!("{text:?} is not a length")))
}

/// Read one reply.
pub fn read_reply(input: &mut impl BufRead) -> std::io::Result<Reply> {
    let line = read_line(input)?;
    let Some(kind) = line.chars().next() else {
        return Err(invalid("an empty reply line".into()));
    };
    let rest = &line[1..];
    match kind {
        '+' => Ok(Reply::Status(rest.to_string())),
        '-' => Ok(Reply::Error(rest.to_string())),
        ':' => Ok(Reply::Integer(parse_length(rest)?)),
        '$' => {
            let length = parse_length(rest)?;
            if length < 0 {
                return Ok(Reply::Bulk(None));
            }
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            if length > MAX_BULK {
                return Err(invalid(format!("a bulk string of {length} bytes")));
            }
            let mut data = vec![0; length + 2];
            input.read_exact(&mut data)?;
            if !data.ends_with(b"\r\n") {
                return Err(invalid("a bulk string does not end with CRLF".into()));
            }
            data.truncate(length);
            Ok(Reply::Bulk(Some(Bytes::from(data))))
        }
        '*' => {
            let count = parse_length(rest)?;
            if count < 0 {
                return Ok(Reply::Array(None));
            }
            let items = (0..count)
                .map(|_| read_reply(input))
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok(Reply::Array(Some(items)))
        }
        other => Err(invalid(format!("unknown reply type {other:?}"))),
    }
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

    /// Send `commands` in one round trip and return their replies, in order. An error reply
    /// is returned as [`Reply::Error`]; a connection failure is 3007. A pooled connection that
    /// turns out to be broken is replaced once.
    pub fn pipeline(&self, commands: &[&[&[u8]]]) -> Result<Vec<Reply>> {
        let what = commands
            .iter()
            .map(|c| {
                c.first()
                    .map(|name| String::from_utf8_lossy(name).into_owned())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("+");
        let pooled = self.idle.lock().pop();
        let reused = pooled.is_some();
        let mut connection = match pooled {
            Some(connection) => connection,
            None => Connection::open(&self.address).map_err(|e| self.failed("connect", e))?,
        };
        let replies = match connection.exchange(commands) {
            Ok(replies) => replies,
            Err(_) if reused => {
                // The server may have closed an idle connection: try once on a new one.
                connection =
                    Connection::open(&self.address).map_err(|e| self.failed("connect", e))?;
                connection
                    .exchange(commands)
                    .map_err(|e| self.failed(&what, e))?
            }
            Err(e) => return Err(self.failed(&what, e)),
        };
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(connection);
        }
        Ok(replies)
    }

    /// Send one command; an error reply is 3007 naming the command.
    pub fn command(&self, args: &[&[u8]]) -> Result<Reply> {
        let reply = self
            .pipeline(&[args])?
            .pop()
            .ok_or_else(|| self.failed("a command", "no reply"))?;
        match reply {
            Reply::Error(message) => Err(self.failed(
                &String::from_utf8_lossy(args.first().copied().unwrap_or_default()),
                message,
            )),
            reply => Ok(reply),
        }
    }

    /// `PING`.
    pub fn ping(&self) -> Result<()> {
        match self.command(&[b"PING"])? {
            Reply::Status(_) => Ok(()),
            other => Err(self.failed("PING", format!("unexpected reply {other:?}"))),
        }
    }

    /// `SET key value [PX ttl_ms]`.
    pub fn set(&self, key: &[u8], value: &[u8], ttl_ms: Option<u64>) -> Result<()> {
        let ttl = ttl_ms.map(|ms| ms.max(1).to_string());
        let reply = match &ttl {
            Some(ms) => self.command(&[b"SET", key, value, b"PX", ms.as_bytes()])?,
            None => self.command(&[b"SET", key, value])?,
        };
        match reply {
            Reply::Status(_) => Ok(()),
            other => Err(self.failed("SET", format!("unexpected reply {other:?}"))),
        }
    }

    /// `GET key`: the value, or `None` if the key does not exist.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        match self.command(&[b"GET", key])? {
            Reply::Bulk(value) => Ok(value),
            other => Err(self.failed("GET", format!("unexpected reply {other:?}"))),
        }
    }

    /// `GET key` and `PTTL key` in one round trip: the value and its remaining time to live
    /// in milliseconds (`None`: no expiry).
    pub fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Bytes, Option<u64>)>> {
        let replies = self.pipeline(&[&[b"GET", key], &[b"PTTL", key]])?;
        let mut replies = replies.into_iter();
        match (replies.next(), replies.next()) {
            (Some(Reply::Bulk(None)), _) => Ok(None),
            (Some(Reply::Bulk(Some(value))), Some(Reply::Integer(ttl))) => {
                Ok(Some((value, u64::try_from(ttl).ok().filter(|ms| *ms > 0))))
            }
            (Some(Reply::Error(message)), _) | (_, Some(Reply::Error(message))) => {
                Err(self.failed("GET", message))
            }
            other => Err(self.failed("GET", format!("unexpected replies {other:?}"))),
        }
    }

    /// `DEL key`: whether it existed.
    pub fn del(&self, key: &[u8]) -> Result<bool> {
        match self.command(&[b"DEL", key])? {
            Reply::Integer(n) => Ok(n > 0),
            other => Err(self.failed("DEL", format!("unexpected reply {other:?}"))),
        }
    }

    /// `EXISTS key`.
    pub fn exists(&self, key: &[u8]) -> Result<bool> {
        match self.command(&[b"EXISTS", key])? {
            Reply::Integer(n) => Ok(n > 0),
            other => Err(self.failed("EXISTS", format!("unexpected reply {other:?}"))),
        }
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
    use super::*;
    use std::net::TcpListener;
    use yr_common::ErrorCode;

    fn parse(text: &[u8]) -> std::io::Result<Reply> {
        read_reply(&mut std::io::Cursor::new(text.to_vec()))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        write_command(&mut out, &[b"SET", b"k", b"a\r\nb"]).unwrap();
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n");
    }

    #[test]
    fn every_reply_type_parses() {
        assert_eq!(parse(b"+OK\r\n").unwrap(), Reply::Status("OK".into()));
        assert_eq!(
            parse(b"-ERR wrong\r\n").unwrap(),
            Reply::Error("ERR wrong".into())
        );
        assert_eq!(parse(b":42\r\n").unwrap(), Reply::Integer(42));
        assert_eq!(parse(b":-2\r\n").unwrap(), Reply::Integer(-2));
        assert_eq!(
            parse(b"$5\r\nhe\r\no\r\n").unwrap(),
            Reply::Bulk(Some(Bytes::from_static(b"he\r\no")))
        );
        assert_eq!(
            parse(b"$0\r\n\r\n").unwrap(),
            Reply::Bulk(Some(Bytes::new()))
        );
        assert_eq!(parse(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(
            parse(b"*2\r\n:1\r\n$1\r\nx\r\n").unwrap(),
            Reply::Array(Some(vec![
                Reply::Integer(1),
                Reply::Bulk(Some(Bytes::from_static(b"x")))
            ]))
        );
        assert_eq!(parse(b"*-1\r\n").unwrap(), Reply::Array(None));
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(parse(b"").is_err());
        assert!(parse(b"?what\r\n").is_err());
        assert!(parse(b"$3\r\nab").is_err());
        assert!(parse(b"$2\r\nabcd").is_err());
        assert!(parse(b":x\r\n").is_err());
        assert!(parse(b"+OK\n").is_err());
    }

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

    #[test]
    fn an_error_reply_is_3007_with_the_servers_message() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let _ = read_reply(&mut reader).unwrap();
            (&stream)
                .write_all(b"-NOAUTH Authentication required.\r\n")
                .unwrap();
        });
        let error = RedisClient::new(address).get(b"k").unwrap_err();
        server.join().unwrap();
        assert_eq!(error.code(), ErrorCode::RedisOperationError);
        assert!(error.message().contains("NOAUTH"), "{}", error.message());
        assert!(error.message().contains("GET"), "{}", error.message());
    }
}
