//! vmhostd's end of one VM's guest channel: it listens where the vsock backend delivers the
//! guest's connections, negotiates the protocol, keeps the latest metrics and health, and
//! forwards upscale requests.
//!
//! The guest is untrusted. Frames are length-limited, malformed messages get an error reply
//! and count against a bound, traffic past a token bucket is dropped, and past any bound
//! the connection is closed. Nothing the guest sends can panic or block vmhostd, and every
//! log line it can trigger is rate-limited.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use vmhost_api::GuestInfo;
use vmhost_guest_protocol::{
    self as protocol, FrameDecoder, FrameError, GuestMessage, HostMessage, Metrics, Size,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A guest silent for this long is unhealthy.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);
/// Messages per second a guest may send on average, and in a burst.
const RATE_PER_SEC: f64 = 20.0;
const BURST: f64 = 60.0;
/// Past these, the connection is closed.
const MAX_PROTOCOL_ERRORS: u64 = 10;
const MAX_DROPPED: u64 = 500;
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// An upscale request as received, for the host to act on.
#[derive(Debug, Clone, Copy)]
pub struct UpscaleRequest {
    pub id: u64,
    pub received: Instant,
    /// How long before sending the guest detected the pressure (as the guest says; capped).
    pub pressure_age: Duration,
}

pub type UpscaleHandler = Arc<dyn Fn(UpscaleRequest) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum DownscaleError {
    #[error("guest monitor refused: {0}")]
    Refused(String),
    #[error("guest monitor is not connected")]
    NotConnected,
    #[error("guest monitor did not answer within {0:?}")]
    NoAnswer(Duration),
}

#[derive(Default)]
struct Status {
    connected: bool,
    protocol_version: Option<u16>,
    last_seen: Option<Instant>,
    metrics: Option<(Metrics, Instant)>,
    upscale_requests: u64,
    protocol_errors: u64,
}

struct Shared {
    vm: String,
    status: Mutex<Status>,
    outbox: Mutex<Option<mpsc::Sender<HostMessage>>>,
    downscales: Mutex<HashMap<u64, oneshot::Sender<(bool, String)>>>,
    next_id: AtomicU64,
    on_upscale: UpscaleHandler,
}

/// Guest-triggered log lines pass through this: at most one per interval per link.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, vm: &str, message: &str) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < LOG_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(vm, suppressed = self.suppressed, "guest link: {message}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// A token bucket over wall time.
struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(now: Instant) -> Self {
        TokenBucket {
            tokens: BURST,
            updated: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + (now - self.updated).as_secs_f64() * RATE_PER_SEC).min(BURST);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct GuestLink {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GuestLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GuestLink {
    /// Listens on `socket` (replacing a stale file) for the guest's connections.
    pub fn listen(
        vm: &str,
        socket: &Path,
        on_upscale: UpscaleHandler,
    ) -> std::io::Result<GuestLink> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let shared = Arc::new(Shared {
            vm: vm.to_string(),
            status: Mutex::new(Status::default()),
            outbox: Mutex::new(None),
            downscales: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            on_upscale,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(GuestLink { shared, task })
    }

    pub fn info(&self) -> GuestInfo {
        let status = self.shared.status.lock().unwrap();
        let now = Instant::now();
        let metrics = status.metrics.map(|(m, _)| m);
        GuestInfo {
            connected: status.connected,
            healthy: status.connected
                && status
                    .last_seen
                    .is_some_and(|seen| now - seen < SILENCE_LIMIT),
            protocol_version: status.protocol_version,
            online_cpus: metrics.map(|m| m.online_cpus),
            mem_total_bytes: metrics.map(|m| m.mem_total_bytes),
            metrics,
            metrics_age_ms: status.metrics.map(|(_, at)| (now - at).as_millis() as u64),
            upscale_requests: status.upscale_requests,
            protocol_errors: status.protocol_errors,
        }
    }

    /// The latest metrics and how old they are.
    pub fn latest_metrics(&self) -> Option<(Metrics, Duration)> {
        let status = self.shared.status.lock().unwrap();
        status.metrics.map(|(m, at)| (m, at.elapsed()))
    }

    fn send(&self, message: HostMessage) -> bool {
        let outbox = self.shared.outbox.lock().unwrap().clone();
        outbox.is_some_and(|tx| tx.try_send(message).is_ok())
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Tells the guest what it now has.
    pub fn notify_upscale(&self, request_id: u64, granted: Size) {
        self.send(HostMessage::UpscaleNotification {
            id: request_id,
            granted,
        });
    }

    /// Asks the guest's monitor whether it may shrink to `target`.
    pub async fn ask_downscale(
        &self,
        target: Size,
        timeout: Duration,
    ) -> Result<(), DownscaleError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.shared.downscales.lock().unwrap().insert(id, tx);
        if !self.send(HostMessage::DownscaleRequest { id, target }) {
            self.shared.downscales.lock().unwrap().remove(&id);
            return Err(DownscaleError::NotConnected);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.shared.downscales.lock().unwrap().remove(&id);
        match answer {
            Ok(Ok((true, _))) => Ok(()),
            Ok(Ok((false, reason))) => Err(DownscaleError::Refused(reason)),
            Ok(Err(_)) => Err(DownscaleError::NotConnected),
            Err(_) => Err(DownscaleError::NoAnswer(timeout)),
        }
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(vm = %shared.vm, %error, "guest link: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // A new connection means the guest redialed (or moved): the old one is dead.
        if let Some(old) = current.take() {
            old.abort();
        }
        let shared = shared.clone();
        current = Some(tokio::spawn(async move {
            let mut log = RateLimitedLog::new();
            if let Err(reason) = serve_connection(stream, &shared, &mut log).await {
                log.warn(&shared.vm, &format!("connection closed: {reason}"));
            }
            let mut status = shared.status.lock().unwrap();
            status.connected = false;
            *shared.outbox.lock().unwrap() = None;
            shared.downscales.lock().unwrap().clear();
        }));
    }
}

enum ReadError {
    Closed,
    Frame(FrameError),
}

async fn next_message(
    reader: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
) -> Result<GuestMessage, ReadError> {
    loop {
        if let Some(body) = decoder.next_frame().map_err(ReadError::Frame)? {
            return protocol::decode(&body).map_err(ReadError::Frame);
        }
        let mut buf = [0u8; 4096];
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => decoder.push(&buf[..n]),
        }
    }
}

async fn serve_connection(
    stream: UnixStream,
    shared: &Shared,
    log: &mut RateLimitedLog,
) -> Result<(), String> {
    let (mut reader, mut writer) = stream.into_split();
    let mut decoder = FrameDecoder::new();
    let write =
        |message: HostMessage| protocol::encode(&message).expect("host messages fit a frame");

    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, next_message(&mut reader, &mut decoder))
        .await
        .map_err(|_| "no hello from the guest".to_string())?;
    let version = match hello {
        Ok(GuestMessage::Hello {
            min_version,
            max_version,
        }) => match protocol::negotiate(&protocol::VERSIONS, &(min_version..=max_version)) {
            Some(version) => version,
            None => {
                let refusal = HostMessage::VersionRefused {
                    min_version: *protocol::VERSIONS.start(),
                    max_version: *protocol::VERSIONS.end(),
                };
                let _ = writer.write_all(&write(refusal)).await;
                return Err(format!(
                    "guest speaks versions {min_version}..={max_version} only"
                ));
            }
        },
        _ => {
            let reply = HostMessage::InvalidMessage {
                reason: "expected Hello".into(),
            };
            let _ = writer.write_all(&write(reply)).await;
            return Err("first message was not a valid Hello".into());
        }
    };
    writer
        .write_all(&write(HostMessage::Welcome { version }))
        .await
        .map_err(|e| e.to_string())?;

    let (tx, mut rx) = mpsc::channel::<HostMessage>(64);
    let writer_task = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if writer.write_all(&write(message)).await.is_err() {
                break;
            }
        }
    });
    *shared.outbox.lock().unwrap() = Some(tx.clone());
    {
        let mut status = shared.status.lock().unwrap();
        status.connected = true;
        status.protocol_version = Some(version);
        status.last_seen = Some(Instant::now());
    }
    tracing::info!(vm = %shared.vm, version, "guest monitor connected");

    let result = message_loop(&mut reader, &mut decoder, &tx, shared, log).await;
    // Let the last replies (an error saying why we close, typically) reach the guest.
    *shared.outbox.lock().unwrap() = None;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    result
}

async fn message_loop(
    reader: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
    tx: &mpsc::Sender<HostMessage>,
    shared: &Shared,
    log: &mut RateLimitedLog,
) -> Result<(), String> {
    let mut bucket = TokenBucket::new(Instant::now());
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    let mut errors = 0u64;
    let mut dropped = 0u64;
    let mut health_id = 0u64;
    loop {
        let message = tokio::select! {
            message = next_message(reader, decoder) => message,
            _ = health.tick() => {
                health_id += 1;
                let _ = tx.try_send(HostMessage::HealthCheck { id: health_id });
                let silent = shared.status.lock().unwrap().last_seen.is_none_or(|seen| seen.elapsed() >= SILENCE_LIMIT);
                if silent {
                    log.warn(&shared.vm, "guest silent for 20 s; marked unhealthy");
                }
                continue;
            }
        };
        let now = Instant::now();
        let message = match message {
            Ok(message) => message,
            Err(ReadError::Closed) => return Ok(()),
            Err(ReadError::Frame(error @ FrameError::TooLarge(_))) => {
                let _ = tx.try_send(HostMessage::InvalidMessage {
                    reason: error.to_string(),
                });
                shared.status.lock().unwrap().protocol_errors += 1;
                return Err(error.to_string());
            }
            Err(ReadError::Frame(error)) => {
                errors += 1;
                shared.status.lock().unwrap().protocol_errors += 1;
                let _ = tx.try_send(HostMessage::InvalidMessage {
                    reason: error.to_string(),
                });
                if errors > MAX_PROTOCOL_ERRORS {
                    return Err(format!(
                        "more than {MAX_PROTOCOL_ERRORS} malformed messages"
                    ));
                }
                log.warn(&shared.vm, &format!("malformed message: {error}"));
                continue;
            }
        };
        shared.status.lock().unwrap().last_seen = Some(now);
        if !bucket.take(now) {
            dropped += 1;
            if dropped == 1 || dropped.is_multiple_of(100) {
                let _ = tx.try_send(HostMessage::InvalidMessage {
                    reason: "rate limited".into(),
                });
            }
            if dropped > MAX_DROPPED {
                shared.status.lock().unwrap().protocol_errors += 1;
                return Err(format!(
                    "guest flooded the link ({dropped} messages dropped)"
                ));
            }
            log.warn(&shared.vm, "guest exceeds its message rate; dropping");
            continue;
        }
        match message {
            GuestMessage::Metrics(metrics) => {
                shared.status.lock().unwrap().metrics = Some((metrics, now))
            }
            GuestMessage::UpscaleRequest {
                id,
                pressure_age_us,
            } => {
                shared.status.lock().unwrap().upscale_requests += 1;
                (shared.on_upscale)(UpscaleRequest {
                    id,
                    received: now,
                    pressure_age: Duration::from_micros(pressure_age_us.min(10_000_000)),
                });
            }
            GuestMessage::DownscaleResult { id, ok, reason } => {
                let waiter = shared.downscales.lock().unwrap().remove(&id);
                match waiter {
                    Some(waiter) => {
                        let reason: String = reason.chars().take(200).collect();
                        let _ = waiter.send((ok, reason));
                    }
                    None => log.warn(
                        &shared.vm,
                        &format!("downscale answer for unknown request {id}"),
                    ),
                }
            }
            GuestMessage::HealthCheck { id } => {
                let _ = tx.try_send(HostMessage::HealthCheckReply { id });
            }
            GuestMessage::HealthCheckReply { .. } => {}
            GuestMessage::Hello { .. } => {
                let _ = tx.try_send(HostMessage::InvalidMessage {
                    reason: "already connected".into(),
                });
            }
            GuestMessage::InvalidMessage { reason } | GuestMessage::InternalError { reason } => {
                let reason: String = reason.chars().take(200).collect();
                log.warn(&shared.vm, &format!("guest reports an error: {reason}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(start);
        let burst = (0..100).filter(|_| bucket.take(start)).count();
        assert_eq!(burst, BURST as usize);
        assert!(!bucket.take(start));
        assert!(bucket.take(start + Duration::from_millis(60)));
    }
}
