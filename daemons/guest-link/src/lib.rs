//! vmhostd's end of one VM's guest channel: it listens where the vsock backend delivers the
//! guest's connections, negotiates the protocol, keeps the latest metrics and health, and
//! forwards upscale requests.
//!
//! The guest is untrusted. Frames are length-limited, malformed messages get an error reply
//! and count against a bound, traffic past a token bucket is dropped, and past any bound
//! the connection is closed. Nothing the guest sends can panic or block vmhostd.
//!
//! The token bucket and the limiter every guest-triggered log line goes through
//! (`guest_log`) belong to the VM's [`GuestLink`], not to one connection: a guest that
//! redials finds them as it left them, and they refill with time only. The crate's
//! `clippy.toml` forbids the `tracing` macros outside that limiter.

#![warn(missing_docs)]

mod bucket;
pub mod compute;
mod guest_log;

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
    self as protocol, CpuUsage, FrameDecoder, FrameError, GuestMessage, HostMessage, Metrics, Size,
};

use bucket::TokenBucket;
use guest_log::GuestLog;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A guest silent for this long is unhealthy.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);
/// Messages per second a guest may send on average, and in a burst.
const RATE_PER_SEC: f64 = 20.0;
const BURST: f64 = 60.0;
/// Connections a guest may open at once, then one a second: a guest that redials in a loop
/// cannot make the host handshake, log and replace its connection as fast as it dials.
const REDIAL_BURST: f64 = 8.0;
const REDIALS_PER_SEC: f64 = 1.0;
const REDIAL_REFUSAL: &str = "redialing too fast";
/// Past these, the connection is closed. A redial gets a fresh count but not a fresh
/// bucket, so closing costs a flooding guest its backlog and gains it nothing.
const MAX_PROTOCOL_ERRORS: u64 = 10;
const MAX_DROPPED: u64 = 500;

/// An upscale request as received, for the host to act on.
#[derive(Debug, Clone, Copy)]
pub struct UpscaleRequest {
    /// The guest's request id, repeated in the [`GuestLink::notify_upscale`] that answers it.
    pub id: u64,
    /// When vmhostd received it.
    pub received: Instant,
    /// How long before sending the guest detected the pressure (as the guest says; capped).
    pub pressure_age: Duration,
}

/// Called (on the link's task; it must not block) for each upscale request the guest sends.
pub type UpscaleHandler = Arc<dyn Fn(UpscaleRequest) + Send + Sync>;

/// Why [`GuestLink::ask_downscale`] did not get a yes.
#[derive(Debug, thiserror::Error)]
pub enum DownscaleError {
    /// The monitor said no, for this reason (as the guest says; truncated).
    #[error("guest monitor refused: {0}")]
    Refused(String),
    /// No monitor is connected, or it went away before answering.
    #[error("guest monitor is not connected")]
    NotConnected,
    /// The monitor did not answer in time.
    #[error("guest monitor did not answer within {0:?}")]
    NoAnswer(Duration),
}

#[derive(Default)]
struct Status {
    connected: bool,
    protocol_version: Option<u16>,
    last_seen: Option<Instant>,
    /// The latest metrics, with the fast CPU signal if the guest sends it (protocol 2).
    metrics: Option<(Metrics, Option<CpuUsage>, Instant)>,
    upscale_requests: u64,
    protocol_errors: u64,
}

struct Shared {
    /// Every log line the guest can trigger goes through this.
    log: GuestLog,
    /// What bounds the guest's traffic: one per VM link, shared by its successive
    /// connections.
    bucket: Mutex<TokenBucket>,
    status: Mutex<Status>,
    outbox: Mutex<Option<mpsc::Sender<HostMessage>>>,
    downscales: Mutex<HashMap<u64, oneshot::Sender<(bool, String)>>>,
    next_id: AtomicU64,
    on_upscale: UpscaleHandler,
}

/// vmhostd's end of one VM's guest channel. Dropping it stops listening and closes the
/// guest's connection.
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
        let now = Instant::now();
        let shared = Arc::new(Shared {
            log: GuestLog::new(vm),
            bucket: Mutex::new(TokenBucket::new(BURST, RATE_PER_SEC, now)),
            status: Mutex::new(Status::default()),
            outbox: Mutex::new(None),
            downscales: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            on_upscale,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(GuestLink { shared, task })
    }

    /// The guest's connection, health and latest metrics, for the API.
    pub fn info(&self) -> GuestInfo {
        let status = self.shared.status.lock().unwrap();
        let now = Instant::now();
        let metrics = status.metrics.map(|(m, _, _)| m);
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
            cpu: status.metrics.and_then(|(_, cpu, _)| cpu),
            metrics_age_ms: status
                .metrics
                .map(|(_, _, at)| (now - at).as_millis() as u64),
            upscale_requests: status.upscale_requests,
            protocol_errors: status.protocol_errors,
        }
    }

    /// The latest metrics, their fast CPU signal if the guest sends it, and how old they are.
    pub fn latest_metrics(&self) -> Option<(Metrics, Option<CpuUsage>, Duration)> {
        let status = self.shared.status.lock().unwrap();
        status.metrics.map(|(m, cpu, at)| (m, cpu, at.elapsed()))
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
    let mut redials = TokenBucket::new(REDIAL_BURST, REDIALS_PER_SEC, Instant::now());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                shared.log.warn(format_args!("accept failed: {error}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // The live connection stays; the new one is told why and closed unread.
        if !redials.take(Instant::now()) {
            shared.log.warn(format_args!(
                "the guest redials too fast; connection refused"
            ));
            tokio::spawn(refuse_redial(stream));
            continue;
        }
        // A new connection means the guest redialed (or moved): the old one is dead.
        if let Some(old) = current.take() {
            old.abort();
        }
        let shared = shared.clone();
        current = Some(tokio::spawn(async move {
            if let Err(reason) = serve_connection(stream, &shared).await {
                shared.log.warn(format_args!("connection closed: {reason}"));
            }
            let mut status = shared.status.lock().unwrap();
            status.connected = false;
            *shared.outbox.lock().unwrap() = None;
            shared.downscales.lock().unwrap().clear();
        }));
    }
}

async fn refuse_redial(mut stream: UnixStream) {
    let refusal = HostMessage::InvalidMessage {
        reason: REDIAL_REFUSAL.into(),
    };
    let bytes = protocol::encode(&refusal).expect("host messages fit a frame");
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
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

async fn serve_connection(stream: UnixStream, shared: &Shared) -> Result<(), String> {
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
    shared.log.info(format_args!(
        "guest monitor connected (protocol version {version})"
    ));

    let result = message_loop(&mut reader, &mut decoder, &tx, shared).await;
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
) -> Result<(), String> {
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    let mut health_id = 0u64;
    let mut dropped_here = 0u64;
    let mut errors_here = 0u64;
    loop {
        let message = tokio::select! {
            message = next_message(reader, decoder) => message,
            _ = health.tick() => {
                health_id += 1;
                let _ = tx.try_send(HostMessage::HealthCheck { id: health_id });
                let silent = shared.status.lock().unwrap().last_seen.is_none_or(|seen| seen.elapsed() >= SILENCE_LIMIT);
                if silent {
                    let secs = SILENCE_LIMIT.as_secs();
                    shared.log.warn(format_args!("guest silent for {secs} s; marked unhealthy"));
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
                refuse(shared, tx, &mut errors_here, error.to_string())?;
                continue;
            }
        };
        shared.status.lock().unwrap().last_seen = Some(now);
        if !shared.bucket.lock().unwrap().take(now) {
            // Tell the guest on its first drop on this connection, then every 100th.
            dropped_here += 1;
            let dropped = dropped_here;
            if dropped_here == 1 || dropped_here.is_multiple_of(100) {
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
            shared
                .log
                .warn(format_args!("guest exceeds its message rate; dropping"));
            continue;
        }
        match message {
            GuestMessage::Metrics(metrics) => {
                record_metrics(shared, tx, &mut errors_here, (metrics, None), now)?
            }
            GuestMessage::MetricsV2 { metrics, cpu } => {
                record_metrics(shared, tx, &mut errors_here, (metrics, Some(cpu)), now)?
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
                    None => shared
                        .log
                        .warn(format_args!("downscale answer for unknown request {id}")),
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
                shared
                    .log
                    .warn(format_args!("guest reports an error: {reason}"));
            }
        }
    }
}

/// Keeps metrics that pass their checks as the latest; refuses the others.
fn record_metrics(
    shared: &Shared,
    tx: &mpsc::Sender<HostMessage>,
    errors_here: &mut u64,
    (metrics, cpu): (Metrics, Option<CpuUsage>),
    now: Instant,
) -> Result<(), String> {
    let checked = metrics
        .check()
        .and_then(|()| cpu.map_or(Ok(()), |c| c.check()));
    match checked {
        Ok(()) => {
            shared.status.lock().unwrap().metrics = Some((metrics, cpu, now));
            Ok(())
        }
        Err(reason) => refuse(shared, tx, errors_here, reason),
    }
}

/// Answers a malformed or invalid message with an error, and closes the connection past
/// the bound.
fn refuse(
    shared: &Shared,
    tx: &mpsc::Sender<HostMessage>,
    errors_here: &mut u64,
    reason: String,
) -> Result<(), String> {
    *errors_here += 1;
    shared.status.lock().unwrap().protocol_errors += 1;
    shared.log.warn(format_args!("invalid message: {reason}"));
    let _ = tx.try_send(HostMessage::InvalidMessage { reason });
    if *errors_here > MAX_PROTOCOL_ERRORS {
        return Err(format!("more than {MAX_PROTOCOL_ERRORS} invalid messages"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
