//! The HTTP API, on vsock (and TCP for local use). Every request is one call on the
//! [`Compute`]; each kind of error maps to a status code in [`status_code`].
//!
//! | route | reply |
//! | --- | --- |
//! | `GET /status` | `ComputeStatus` |
//! | `GET /spec` | the spec in force, or 404 |
//! | `GET /metrics` | Prometheus text |
//! | `POST /configure` | body: a `ComputeSpec`; once applied, `ComputeStatus`; 400 lists every error |
//! | `POST /terminate` | once Postgres has stopped, `ComputeStatus` |
//!
//! Errors are `ErrorReply` JSON. Limits keep a client from pinning a connection or memory:
//! request heads must arrive within [`HEADER_READ_TIMEOUT`] (idle keep-alive connections
//! close after it too), bodies are at most [`MAX_BODY_BYTES`] and must arrive within
//! [`BODY_READ_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once.

use crate::compute::{Compute, ComputeError};
use crate::metrics;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use vmhost_compute_api::ErrorReply;

pub const MAX_BODY_BYTES: usize = 1 << 20;
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 32;
/// Bounds what hyper buffers for a request head.
const MAX_BUF_BYTES: usize = 64 << 10;

type Reply = Response<Full<Bytes>>;

#[derive(Debug, Clone, Copy)]
enum Route {
    Status,
    Spec,
    Metrics,
    Configure,
    Terminate,
}

fn route(path: &str) -> Option<(Route, Method)> {
    Some(match path {
        "/status" => (Route::Status, Method::GET),
        "/spec" => (Route::Spec, Method::GET),
        "/metrics" => (Route::Metrics, Method::GET),
        "/configure" => (Route::Configure, Method::POST),
        "/terminate" => (Route::Terminate, Method::POST),
        _ => return None,
    })
}

fn status_code(error: &ComputeError) -> StatusCode {
    match error {
        ComputeError::Conflict { .. } => StatusCode::CONFLICT,
        ComputeError::InvalidSpec(_) => StatusCode::BAD_REQUEST,
        ComputeError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn handle(compute: Arc<Compute>, request: Request<Incoming>) -> Reply {
    let Some((route, method)) = route(request.uri().path()) else {
        return error(StatusCode::NOT_FOUND, "no such route");
    };
    if request.method() != method {
        let mut reply = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        if let Ok(allow) = HeaderValue::from_str(method.as_str()) {
            reply.headers_mut().insert(ALLOW, allow);
        }
        return reply;
    }
    match route {
        Route::Status => json(StatusCode::OK, &compute.status()),
        Route::Spec => match compute.spec() {
            Some(spec) => json(StatusCode::OK, &spec),
            None => error(StatusCode::NOT_FOUND, "the compute has no spec yet"),
        },
        Route::Metrics => reply(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::render(&compute.status()).into(),
        ),
        Route::Configure => match read_body(request).await {
            Ok(body) => outcome(compute.configure(body).await),
            Err(reply) => reply,
        },
        Route::Terminate => outcome(compute.terminate().await),
    }
}

fn outcome(result: Result<vmhost_compute_api::ComputeStatus, ComputeError>) -> Reply {
    match result {
        Ok(status) => json(StatusCode::OK, &status),
        Err(e) => {
            // Failures were logged with their causes where they happened.
            if let ComputeError::Conflict { .. } = e {
                tracing::info!("request refused: {e}");
            }
            let body = match &e {
                ComputeError::InvalidSpec(errors) => ErrorReply::invalid_spec(errors),
                other => ErrorReply::new(other.to_string()),
            };
            json(status_code(&e), &body)
        }
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Vec<u8>, Reply> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("a body is at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_READ_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes().to_vec()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("cannot read the body: {e}"),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        )),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => reply(status, "application/json", body.into()),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("cannot encode the reply: {e}").into(),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &ErrorReply::new(message))
}

/// Serves one connection until the client closes it or stalls.
pub async fn serve_connection<S>(compute: Arc<Compute>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let compute = compute.clone();
        async move { Ok::<_, Infallible>(handle(compute, request).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("an API connection ended: {e}");
    }
}

/// A listening socket of either kind.
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections for ever; past [`MAX_CONNECTIONS`], new ones are closed at once.
pub async fn serve(compute: Arc<Compute>, listener: impl Listener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept_one().await {
            Ok(stream) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let compute = compute.clone();
                    tokio::spawn(async move {
                        serve_connection(compute, stream).await;
                        drop(slot);
                    });
                }
                Err(_) => tracing::debug!("too many API connections; one was closed"),
            },
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!("cannot accept an API connection: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Binds the vsock port, retrying until the guest's vsock transport is there (its module
/// may load after computectl starts).
pub async fn bind_vsock(port: u32) -> tokio_vsock::VsockListener {
    let address = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let mut told = false;
    loop {
        match tokio_vsock::VsockListener::bind(address) {
            Ok(listener) => {
                tracing::info!(port, "API listening on vsock");
                return listener;
            }
            Err(e) => {
                if !told {
                    tracing::warn!(
                        port,
                        "cannot listen on vsock yet, retrying every second: {e}"
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
