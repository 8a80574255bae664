//! The local API: a unix socket (mode 0660) speaking one JSON request and one JSON response
//! per line (`vmhost_api`).

use crate::host::Host;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use vmhost_api::{ApiError, Envelope, ErrorKind, Response, API_VERSION, MAX_REQUEST_BYTES};

/// A client that sends nothing for this long is dropped.
const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("another process is already serving {0}")]
    InUse(String),
    #[error("cannot listen on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket. A leftover socket file from a dead daemon is replaced; a live one is not.
pub fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    let bind_error = |source| ApiServerError::Bind {
        path: path.display().to_string(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ApiServerError::InUse(path.display().to_string()));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_error)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_error)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, host: Arc<Host>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let host = host.clone();
                tokio::spawn(async move {
                    if let Err(error) = handle_connection(stream, host).await {
                        tracing::debug!(%error, "API connection ended with an error");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot accept an API connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_connection(stream: UnixStream, host: Arc<Host>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    let response =
        match tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line)).await {
            Err(_) => return Ok(()),
            Ok(Err(error)) => Response::Error(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("unreadable request: {error}"),
            )),
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Response::Error(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            )),
            Ok(Ok(_)) => respond(&line, &host).await,
        };
    let mut out = serde_json::to_vec(&response).expect("a response always serializes");
    out.push(b'\n');
    write.write_all(&out).await
}

async fn respond(line: &str, host: &Arc<Host>) -> Response {
    let envelope: Envelope = match serde_json::from_str(line) {
        Ok(envelope) => envelope,
        Err(error) => {
            return Response::Error(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("malformed request: {error}"),
            ))
        }
    };
    if envelope.version != API_VERSION {
        return Response::Error(ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "API version {} is not supported; this vmhostd speaks version {API_VERSION}",
                envelope.version
            ),
        ));
    }
    tracing::debug!(request = ?envelope.request, "API request");
    // Run the operation in its own task: a client that hangs up must not cancel a resize
    // halfway through.
    let host = host.clone();
    match tokio::spawn(async move { host.handle(envelope.request).await }).await {
        Ok(Ok(reply)) => Response::Ok(reply),
        Ok(Err(error)) => Response::Error(error.into()),
        Err(join_error) => Response::Error(ApiError::new(
            ErrorKind::Internal,
            format!("request handler failed: {join_error}"),
        )),
    }
}
