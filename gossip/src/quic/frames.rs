//! Bytes on a stream: length-prefixed frames for requests, and raw splicing for tunnels.

use super::*;

pub(super) async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), String> {
    send.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(body).await.map_err(|e| e.to_string())
}

/// The body length a frame header announces, refused past [`MAX_MESSAGE_BYTES`] before
/// anything is allocated for it.
pub fn body_length(header: [u8; 4]) -> Result<usize, String> {
    let length = u32::from_be_bytes(header) as usize;
    if length > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message of {length} bytes exceeds {MAX_MESSAGE_BYTES}"
        ));
    }
    Ok(length)
}

pub(super) async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, String> {
    let mut length = [0u8; 4];
    recv.read_exact(&mut length)
        .await
        .map_err(|e| e.to_string())?;
    let mut body = vec![0u8; body_length(length)?];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

/// Bytes per read and write when splicing: tokio's default copy moves 8 KiB at a time, a
/// syscall and a task wake-up per 8 KiB of a migration stream on each end. A read returns
/// what has arrived, so a small message is not held back.
const SPLICE_BUFFER: usize = 256 << 10;

/// Carries bytes both ways between a local stream and a tunnel until either side ends;
/// then both are shut, so each end sees the other go. Returns the bytes sent and received.
pub async fn splice<S>(
    local: S,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> (u64, u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (local_read, mut local_write) = tokio::io::split(local);
    let outbound = async {
        let mut local_read = tokio::io::BufReader::with_capacity(SPLICE_BUFFER, local_read);
        let sent = tokio::io::copy_buf(&mut local_read, &mut send)
            .await
            .unwrap_or(0);
        let _ = send.finish();
        sent
    };
    let inbound = async {
        let mut recv = tokio::io::BufReader::with_capacity(SPLICE_BUFFER, &mut recv);
        let received = tokio::io::copy_buf(&mut recv, &mut local_write)
            .await
            .unwrap_or(0);
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut local_write).await;
        received
    };
    tokio::pin!(outbound, inbound);
    // When one direction fails or ends, the other cannot carry a useful stream any more.
    tokio::select! {
        sent = &mut outbound => {
            let received = tokio::time::timeout(Duration::from_secs(1), &mut inbound).await.unwrap_or(0);
            (sent, received)
        }
        received = &mut inbound => {
            let sent = tokio::time::timeout(Duration::from_secs(1), &mut outbound).await.unwrap_or(0);
            (sent, received)
        }
    }
}
