//! The local API: a unix socket (mode 0660) speaking one JSON request and one JSON response
//! per line (`vmhost_api`).

use crate::fleet::Fleet;
use crate::host::Host;
use crate::router;
use nix::unistd::{Gid, Uid};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use vmhost_api::{
    ApiError, Envelope, ErrorKind, Reply, Request, Response, API_VERSION, MAX_REQUEST_BYTES,
    PEER_ONLY_OPS,
};

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
    #[error("api_group: no group named '{0}' on this host")]
    NoSuchGroup(String),
    #[error("cannot give {path} to group '{group}'")]
    Chown {
        path: String,
        group: String,
        #[source]
        source: nix::Error,
    },
}

/// Who may use the socket: root, the daemon's own user, and the members of `api_group`.
/// The socket's mode says the same; the check on each connection still holds if the mode
/// is changed, or a connected socket is handed to another process.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    group: Option<Gid>,
}

impl Access {
    /// Whether the process that connected (by its kernel-reported credentials) may ask.
    fn allows(&self, uid: u32, gid: u32) -> bool {
        let groups = || {
            let user = nix::unistd::User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()?;
            let name = std::ffi::CString::new(user.name).ok()?;
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid)).ok()
        };
        allowed(uid, gid, self.group, Uid::effective().as_raw(), groups)
    }
}

fn allowed(
    uid: u32,
    gid: u32,
    group: Option<Gid>,
    daemon_uid: u32,
    groups: impl FnOnce() -> Option<Vec<Gid>>,
) -> bool {
    if uid == 0 || uid == daemon_uid {
        return true;
    }
    let Some(group) = group else {
        return false;
    };
    gid == group.as_raw() || groups().is_some_and(|all| all.contains(&group))
}

/// Binds the socket, for root and `group`. A leftover socket file from a dead daemon is
/// replaced; a live one is not.
pub fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, Access), ApiServerError> {
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
    let mut access = Access { group: None };
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| ApiServerError::NoSuchGroup(group.into()))?
            .gid;
        nix::unistd::chown(path, None, Some(gid)).map_err(|source| ApiServerError::Chown {
            path: path.display().to_string(),
            group: group.into(),
            source,
        })?;
        access.group = Some(gid);
    }
    Ok((listener, access))
}

pub async fn serve(
    listener: UnixListener,
    access: Access,
    host: Arc<Host>,
    fleet: Option<Arc<Fleet>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let host = host.clone();
                let fleet = fleet.clone();
                tokio::spawn(async move {
                    let caller = stream.peer_cred();
                    let refused = match &caller {
                        Ok(cred) if access.allows(cred.uid(), cred.gid()) => None,
                        Ok(cred) => Some(format!(
                            "uid {} (pid {:?}) may not use this socket: it is for root and the api_group",
                            cred.uid(),
                            cred.pid()
                        )),
                        Err(error) => Some(format!("cannot tell who connected: {error}")),
                    };
                    if let Some(reason) = refused {
                        tracing::warn!(%reason, "refused an API connection");
                        let (read, mut write) = stream.into_split();
                        // Take the request first (unread), so the client's write does not
                        // fail on a closed socket before it can read why.
                        let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
                        let mut ignored = String::new();
                        let _ = tokio::time::timeout(
                            REQUEST_READ_TIMEOUT,
                            reader.read_line(&mut ignored),
                        )
                        .await;
                        let error = ApiError::new(ErrorKind::Refused, reason);
                        let _ = write_response(&mut write, &Response::Error(error)).await;
                        return;
                    }
                    if let Err(error) = handle_connection(stream, host, fleet).await {
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

async fn handle_connection(
    stream: UnixStream,
    host: Arc<Host>,
    fleet: Option<Arc<Fleet>>,
) -> std::io::Result<()> {
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
            Ok(Ok(_)) => match parse(&line) {
                Ok(Request::Events { name, follow: true }) => {
                    return follow_events(&mut write, &host, name).await
                }
                Ok(Request::Migrate(request)) => {
                    return stream_migration(&mut write, fleet, request).await
                }
                Ok(request) => respond(request, host, fleet).await,
                Err(error) => Response::Error(error),
            },
        };
    write_response(&mut write, &response).await
}

async fn write_response(write: &mut OwnedWriteHalf, response: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).expect("a response always serializes");
    out.push(b'\n');
    write.write_all(&out).await
}

/// Streams the event history, then every new event, until the client goes away.
async fn follow_events(
    write: &mut OwnedWriteHalf,
    host: &Host,
    name: Option<String>,
) -> std::io::Result<()> {
    if let Some(name) = &name {
        if let Err(error) = host.slot(name) {
            return write_response(write, &Response::Error(error.into())).await;
        }
    }
    let (history, mut live) = host.events.snapshot(name.as_deref());
    write_response(write, &Response::Ok(Reply::Events(history))).await?;
    loop {
        match live.recv().await {
            Ok(event) if name.as_ref().is_none_or(|n| *n == event.vm) => {
                write_response(write, &Response::Ok(Reply::Event(event))).await?
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Runs a migration, streaming its progress, then its outcome. A client that goes away
/// does not stop it.
async fn stream_migration(
    write: &mut OwnedWriteHalf,
    fleet: Option<Arc<Fleet>>,
    request: vmhost_api::MigrateVm,
) -> std::io::Result<()> {
    let Some(fleet) = fleet else {
        let error = ApiError::new(
            ErrorKind::InvalidArgument,
            "this host is not part of a fleet ([fleet] is not in its config)",
        );
        return write_response(write, &Response::Error(error)).await;
    };
    let (progress, mut reports) = tokio::sync::mpsc::channel(16);
    let migration = tokio::spawn(async move { fleet.migrate(request, progress).await });
    let mut client_gone = false;
    while let Some(report) = reports.recv().await {
        if !client_gone {
            client_gone = write_response(write, &Response::Ok(Reply::MigrationProgress(report)))
                .await
                .is_err();
        }
    }
    let response = match migration.await {
        Ok(Ok(summary)) => Response::Ok(Reply::Migrated(summary)),
        Ok(Err(error)) => Response::Error(error),
        Err(e) => Response::Error(ApiError::new(
            ErrorKind::Internal,
            format!("migration task failed: {e}"),
        )),
    };
    write_response(write, &response).await
}

fn parse(line: &str) -> Result<Request, ApiError> {
    let op = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v["op"].as_str().map(String::from));
    if op.is_some_and(|op| PEER_ONLY_OPS.contains(&op.as_str())) {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            "this request is sent by one host to another, not by operators",
        ));
    }
    let envelope: Envelope = serde_json::from_str(line).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!("malformed request: {error}"),
        )
    })?;
    if envelope.version != API_VERSION {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "API version {} is not supported; this vmhostd speaks version {API_VERSION}",
                envelope.version
            ),
        ));
    }
    tracing::debug!(request = ?envelope.request, "API request");
    Ok(envelope.request)
}

async fn respond(request: Request, host: Arc<Host>, fleet: Option<Arc<Fleet>>) -> Response {
    // Run the operation in its own task: a client that hangs up must not cancel a resize
    // halfway through.
    match tokio::spawn(async move { router::from_operator(&host, fleet.as_ref(), request).await })
        .await
    {
        Ok(Ok(reply)) => Response::Ok(reply),
        Ok(Err(error)) => Response::Error(error),
        Err(join_error) => Response::Error(ApiError::new(
            ErrorKind::Internal,
            format!("request handler failed: {join_error}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_belongs_to_the_configured_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let daemon = nix::unistd::Group::from_name("daemon").unwrap().unwrap();
        let _listener = bind(&path, Some("daemon")).unwrap();
        let socket = std::fs::metadata(&path).unwrap();
        assert_eq!(socket.gid(), daemon.gid.as_raw());
        assert_eq!(socket.mode() & 0o777, 0o660);
        let error = bind(&dir.path().join("b.sock"), Some("no-such-group")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "api_group: no group named 'no-such-group' on this host"
        );
    }

    #[test]
    fn a_peer_request_on_the_operator_socket_is_refused() {
        let error = parse(r#"{"version":1,"op":"migrate_recover","name":"a"}"#).unwrap_err();
        assert_eq!(error.kind, ErrorKind::InvalidArgument);
        assert!(
            error.message.contains("not by operators"),
            "{}",
            error.message
        );
        assert!(parse(r#"{"version":1,"op":"show","name":"a"}"#).is_ok());
    }
}
