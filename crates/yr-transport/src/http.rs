//! The health and metrics endpoint every long-running yr process serves, over HTTP/1.1 with
//! hyper: `GET /healthz` (open: liveness only) and `GET /metrics` (Prometheus text exposition;
//! needs `Authorization: Bearer <cluster token>` unless the process was started with
//! `--metrics-public`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::credentials::current;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders the process's metrics in Prometheus text format.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether a request may read `/metrics`: always when `public`, else only with
/// `Authorization: Bearer <cluster token>`.
pub fn metrics_allowed<B>(request: &Request<B>, public: bool) -> bool {
    if public {
        return true;
    }
    let credentials = current();
    let Some(token) = credentials.token.as_ref() else {
        return false;
    };
    request
        .headers()
        .get_all(hyper::header::AUTHORIZATION)
        .iter()
        .any(|value| token.accepts_header(value.as_bytes()))
}

fn respond(request: &Request<Incoming>, public: bool, render: &Render) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        );
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" if !metrics_allowed(request, public) => text(
            StatusCode::UNAUTHORIZED,
            "/metrics needs the cluster token: send Authorization: Bearer <token> (the token \
             file in the session directory), or start the process with --metrics-public\n"
                .into(),
        ),
        "/metrics" => text(StatusCode::OK, render()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz or /metrics\n".into(),
        ),
    }
}

/// Serve `/healthz` and `/metrics` on `listener` until `stop` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    public: bool,
    render: Render,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "the metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(&request, public, &render);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "a metrics request failed");
            }
        });
    }
}

/// `GET path` from the health and metrics endpoint at `address` (`host:port`), with this
/// process's cluster token. Returns the status and the body. For tools and tests that read a
/// process's metrics; fails if the endpoint cannot be reached within `timeout`.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// let (status, text) =
///     yr_transport::http::fetch("127.0.0.1:31510", "/metrics", std::time::Duration::from_secs(5))
///         .await?;
/// assert!(status.is_success(), "{text}");
/// # Ok(()) }
/// ```
pub async fn fetch(
    address: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(StatusCode, String)> {
    use http_body_util::BodyExt;
    let io_error = |what: &str, error: &dyn std::fmt::Display| {
        std::io::Error::other(format!("GET {path} from {address}: {what}: {error}"))
    };
    let request = async {
        let stream = tokio::net::TcpStream::connect(address).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io_error("handshake", &e))?;
        tokio::spawn(connection);
        let mut request = Request::get(path).header(hyper::header::HOST, address);
        if let Some(token) = current().token.as_ref() {
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.as_str()),
            );
        }
        let request = request
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| io_error("request", &e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| io_error("send", &e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| io_error("body", &e))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| io_error("no answer", &format!("within {timeout:?}")))?
}
