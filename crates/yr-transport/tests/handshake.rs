//! The hello on real sockets: a listener from `incoming_tcp`/`incoming_unix` hands out only
//! connections that presented the process's token, and refuses the rest with no side effect.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use yr_common::auth::{ClusterToken, HELLO_REFUSED};
use yr_transport::{Address, Credentials};

fn credentials(token: &ClusterToken) -> Credentials {
    Credentials::with_token(token.clone())
}

/// One test at a time installs this process's credentials.
static INSTALLED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn only_the_right_token_gets_a_connection_through() {
    let _installed = INSTALLED.lock().await;
    let token = ClusterToken::generate().expect("token");
    yr_transport::install(credentials(&token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = Address::Tcp(listener.local_addr().expect("address").to_string());
    let mut incoming = yr_transport::incoming_tcp(listener);

    // A wrong token: refused, nothing reaches the server.
    let refused = AtomicBool::new(false);
    let wrong = credentials(&ClusterToken::generate().expect("token"));
    let result = yr_transport::open(&address, &wrong, &refused).await;
    assert!(result.is_err());
    assert!(refused.load(std::sync::atomic::Ordering::Relaxed));

    // No hello at all, just bytes: refused with one byte, then closed.
    let Address::Tcp(host_port) = &address else {
        unreachable!()
    };
    let mut raw = tokio::net::TcpStream::connect(host_port.as_str())
        .await
        .expect("connect");
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer).await.expect("the refusal");
    assert_eq!(answer, [HELLO_REFUSED]);
    // Then the server closes (a reset, since it left the rest of the bytes unread).
    let mut rest = Vec::new();
    let closed = raw.read_to_end(&mut rest).await;
    assert!(closed.is_err() || rest.is_empty(), "{closed:?} {rest:?}");

    // The right token: the server hands the connection over and bytes flow both ways.
    let refused = AtomicBool::new(false);
    let mut client = yr_transport::open(&address, &credentials(&token), &refused)
        .await
        .expect("accepted");
    let mut served = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("a connection")
        .expect("stream open")
        .expect("accepted");
    client.write_all(b"ping").await.expect("write");
    let mut got = [0u8; 4];
    served.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"ping");
    // Only that one was handed over.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), incoming.next())
            .await
            .is_err(),
        "the refused connections never reached the server"
    );
}

#[tokio::test]
async fn a_unix_peer_presents_the_token_and_its_pid_becomes_the_connect_info() {
    use tonic::transport::server::Connected;
    let _installed = INSTALLED.lock().await;
    let token = ClusterToken::generate().expect("token");
    yr_transport::install(credentials(&token));
    let path = std::env::temp_dir().join(format!("yr-transport-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let mut incoming = yr_transport::incoming_unix(listener);
    let refused = AtomicBool::new(false);
    let _client = yr_transport::open(&Address::Unix(path.clone()), &credentials(&token), &refused)
        .await
        .expect("accepted");
    let served = incoming
        .next()
        .await
        .expect("a connection")
        .expect("accepted");
    assert_eq!(served.connect_info().pid, std::process::id());
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_says_hello_is_dropped_after_the_handshake_timeout() {
    let _installed = INSTALLED.lock().await;
    let token = ClusterToken::generate().expect("token");
    yr_transport::install(credentials(&token));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let host_port = listener.local_addr().expect("address").to_string();
    let _incoming = yr_transport::incoming_tcp(listener);
    let mut silent = tokio::net::TcpStream::connect(host_port.as_str())
        .await
        .expect("connect");
    // The clock is the test's: the server's 10 s pass as soon as everything waits.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        yr_transport::HANDSHAKE_TIMEOUT * 2,
        silent.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the server closed the silent connection");
    assert!(answer.is_empty(), "it got no answer: {answer:?}");
}

/// A TLS server that got a plain hello answers with an alert and resets the connection. A
/// write that fails on the reset before the answer is read must not hide the answer: the
/// caller learns that the peer serves TLS, not only that a pipe broke.
#[tokio::test]
async fn a_write_that_fails_before_the_answer_still_reports_why() {
    let token = ClusterToken::generate().expect("token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = Address::Tcp(listener.local_addr().expect("address").to_string());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut peer, _) = listener.accept().await.expect("accept");
        let mut hello = [0u8; 8];
        peer.read_exact(&mut hello).await.expect("the hello");
        // A TLS alert record's first byte, then an abortive close.
        peer.write_all(&[0x15, 0x03, 0x03]).await.expect("alert");
        // A zero linger resets at once and never blocks the drop.
        #[allow(deprecated)]
        peer.set_linger(Some(Duration::ZERO)).expect("linger");
        drop(peer);
        let _ = closed_tx.send(());
    });
    let mut client = yr_transport::open_pipelined(&address, &credentials(&token))
        .await
        .expect("connected");
    closed_rx.await.expect("the peer closed");
    // The reset has arrived: the socket's writes fail, and this one is held back.
    client
        .write_all(&[0u8; 64 * 1024])
        .await
        .expect("a write before the answer is held back");
    client.flush().await.expect("so is its flush");
    let mut byte = [0u8; 1];
    let error = client.read(&mut byte).await.expect_err("the answer is TLS");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
    assert!(error.to_string().contains("serves TLS"), "{error}");
}
