//! vmhostd's client of the guest's computectl: HTTP over a host-initiated vsock connection.
//! With the hybrid vhost-user backend the host dials the backend's unix socket and says
//! `CONNECT <port>`; the backend answers `OK <host port>` and joins the stream to the guest.
//!
//! Everything the guest sends back is bounded: the handshake line, the reply's size and
//! the time it takes. Nothing here logs; callers decide what a failure means.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmhost_compute_api::{ComputeStatus, ErrorReply, COMPUTE_PORT};

/// The largest reply body read from the guest.
const MAX_REPLY_BYTES: usize = 1 << 20;
/// The backend's `OK <port>` line is short; a longer one is not the backend speaking.
const MAX_HANDSHAKE_BYTES: usize = 64;

/// Why a call to the guest's computectl failed.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// Nothing answers on the compute port: the guest is booting, or has no computectl.
    #[error("computectl in the guest is not reachable: {0}")]
    Unreachable(String),
    /// The guest took longer than the call's deadline.
    #[error("computectl in the guest did not answer within {0:?}")]
    Timeout(Duration),
    /// computectl answered with an error status; `message` is its explanation.
    #[error("computectl refused ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// What computectl said, as it said it.
        message: String,
    },
    /// The reply was not what computectl sends.
    #[error("computectl sent a reply that is not valid: {0}")]
    BadReply(String),
}

/// The guest's computectl API, reached through the VM's vsock backend socket.
#[derive(Debug, Clone)]
pub struct ComputeClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ComputeClient {
    /// A client of the guest behind the backend socket `socket`; each call ends within
    /// `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> ComputeClient {
        ComputeClient {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// `GET /status`.
    pub async fn status(&self) -> Result<ComputeStatus, ComputeError> {
        self.call(Method::GET, "/status", None).await
    }

    /// `POST /configure` with `spec`; returns the status after it was applied.
    pub async fn configure(&self, spec: &serde_json::Value) -> Result<ComputeStatus, ComputeError> {
        let body = serde_json::to_vec(spec).map_err(|e| ComputeError::BadReply(e.to_string()))?;
        self.call(Method::POST, "/configure", Some(body)).await
    }

    /// `POST /terminate`: a fast shutdown of Postgres; returns the final status.
    pub async fn terminate(&self) -> Result<ComputeStatus, ComputeError> {
        self.call(Method::POST, "/terminate", None).await
    }

    /// Every route answers with the compute's status once it is done.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<ComputeStatus, ComputeError> {
        let reply = tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| ComputeError::Timeout(self.timeout))??;
        serde_json::from_slice(&reply).map_err(|e| ComputeError::BadReply(e.to_string()))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ComputeError> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ComputeError::Unreachable(e.to_string()))?;
        let connection = tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "computectl")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ComputeError::BadReply(e.to_string()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ComputeError::Unreachable(e.to_string()))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| ComputeError::BadReply(e.to_string()))?
                .to_bytes();
            if status == StatusCode::OK {
                Ok(bytes)
            } else {
                Err(ComputeError::Refused {
                    status: status.as_u16(),
                    message: refusal_message(&bytes),
                })
            }
        }
        .await;
        connection.abort();
        result
    }

    /// Dials the backend and asks for the compute port.
    async fn connect(&self) -> Result<UnixStream, ComputeError> {
        let unreachable = |e: std::io::Error| ComputeError::Unreachable(e.to_string());
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(unreachable)?;
        stream
            .write_all(format!("CONNECT {COMPUTE_PORT}\n").as_bytes())
            .await
            .map_err(unreachable)?;
        let mut line = Vec::new();
        loop {
            let byte = stream.read_u8().await.map_err(|_| {
                ComputeError::Unreachable(format!(
                    "nothing listens on the guest's port {COMPUTE_PORT}"
                ))
            })?;
            if byte == b'\n' {
                break;
            }
            line.push(byte);
            if line.len() > MAX_HANDSHAKE_BYTES {
                return Err(ComputeError::BadReply("an overlong vsock handshake".into()));
            }
        }
        if line.starts_with(b"OK ") {
            Ok(stream)
        } else {
            Err(ComputeError::BadReply(format!(
                "vsock handshake answered {:?}",
                String::from_utf8_lossy(&line)
            )))
        }
    }
}

/// computectl explains a refusal as `{"error": "...", "errors": [...]}`; anything else is
/// shown as the text it is, cut short.
fn refusal_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorReply>(body) {
        Ok(refusal) if refusal.errors.is_empty() => refusal.error,
        Ok(refusal) => format!("{}:\n  {}", refusal.error, refusal.errors.join("\n  ")),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stand-in for the vsock backend and computectl at once: answers the handshake with
    /// `handshake`, then one HTTP reply.
    async fn backend(handshake: &'static str, reply: &'static str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 4096];
            let n = stream.read(&mut buffer).await.unwrap();
            assert_eq!(&buffer[..n], format!("CONNECT {COMPUTE_PORT}\n").as_bytes());
            stream.write_all(handshake.as_bytes()).await.unwrap();
            let _ = stream.read(&mut buffer).await;
            let _ = stream.write_all(reply.as_bytes()).await;
        });
        (dir, socket)
    }

    fn http(status: &str, body: &str) -> &'static str {
        format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
            body.len()
        )
        .leak()
    }

    #[tokio::test]
    async fn reads_the_status_through_the_handshake() {
        let body = r#"{"state":"running","error":null,"start_time_ms":1,"last_active_ms":null,"build_tag":"t"}"#;
        let (_dir, socket) = backend("OK 5000\n", http("200 OK", body)).await;
        let status = ComputeClient::new(&socket, Duration::from_secs(5))
            .status()
            .await
            .unwrap();
        assert_eq!(status.state, vmhost_compute_api::ComputeState::Running);
    }

    #[tokio::test]
    async fn a_refusal_lists_every_error() {
        let body = r#"{"error":"invalid spec","errors":["role a: no password hash","database d: owner b is not a role of the spec"]}"#;
        let (_dir, socket) = backend("OK 5000\n", http("400 Bad Request", body)).await;
        let error = ComputeClient::new(&socket, Duration::from_secs(5))
            .configure(&serde_json::json!({}))
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("no password hash") && text.contains("owner b"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_silent_or_strange_guest_is_an_error_not_a_hang() {
        let (_dir, socket) = backend("OK 5000\n", "").await;
        let client = ComputeClient::new(&socket, Duration::from_millis(500));
        assert!(client.status().await.is_err());
        let (_dir, socket) = backend(Box::leak("x".repeat(200).into_boxed_str()), "").await;
        let error = ComputeClient::new(&socket, Duration::from_secs(5))
            .status()
            .await
            .unwrap_err();
        assert!(matches!(error, ComputeError::BadReply(_)), "{error}");
        let missing = tempfile::tempdir().unwrap();
        let error = ComputeClient::new(&missing.path().join("none"), Duration::from_secs(5))
            .status()
            .await
            .unwrap_err();
        assert!(matches!(error, ComputeError::Unreachable(_)), "{error}");
    }
}
