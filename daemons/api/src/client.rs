//! vmctl's side of the local API: one request per connection, its reply (or a stream of
//! them) back.

use crate::{ApiError, Envelope, Reply, Request, Response, API_VERSION};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to vmhostd at {path}: {source} (is vmhostd running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to vmhostd: {0}")]
    Io(#[from] std::io::Error),
    #[error("vmhostd sent a reply this vmctl cannot read: {0}")]
    BadReply(#[from] serde_json::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Sends a request whose replies stream (`Events` with `follow`), calling `on_reply` for
/// each until the daemon closes the connection or `on_reply` returns false.
pub fn call_stream(
    socket: &Path,
    request: Request,
    mut on_reply: impl FnMut(Reply) -> bool,
) -> Result<(), ClientError> {
    let stream = connect(socket)?;
    send_request(&stream, request)?;
    for line in BufReader::new(&stream).lines() {
        match serde_json::from_str(&line?)? {
            Response::Ok(reply) => {
                if !on_reply(reply) {
                    break;
                }
            }
            Response::Error(error) => return Err(error.into()),
        }
    }
    Ok(())
}

fn connect(socket: &Path) -> Result<std::os::unix::net::UnixStream, ClientError> {
    std::os::unix::net::UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })
}

fn send_request(
    mut stream: &std::os::unix::net::UnixStream,
    request: Request,
) -> Result<(), ClientError> {
    let mut line = serde_json::to_vec(&Envelope {
        version: API_VERSION,
        request,
    })?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// Sends one request and waits for its reply. Operations that boot or resize a guest can
/// take a while under emulation, hence the generous timeout.
pub fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Reply, ClientError> {
    let stream = connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    send_request(&stream, request)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    match serde_json::from_str(&reply)? {
        Response::Ok(reply) => Ok(reply),
        Response::Error(error) => Err(error.into()),
    }
}
