//! A fake guest on a real unix socket against a real link, in real time (the flood and
//! the redials take milliseconds; the log allowance and the bucket refill are counted in
//! seconds).

use super::*;
use guest_log::{LOG_BURST, LOG_INTERVAL};
use std::path::PathBuf;

struct FakeGuest {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl FakeGuest {
    /// Connects and completes the handshake.
    async fn hello(socket: &Path) -> FakeGuest {
        FakeGuest::try_hello(socket)
            .await
            .expect("the host refused the connection")
    }

    /// Connects and says hello; None if the host refused the connection instead.
    async fn try_hello(socket: &Path) -> Option<FakeGuest> {
        let hello = FakeGuest::try_speaking(socket, protocol::VERSIONS).await;
        hello.map(|(guest, _)| guest)
    }

    /// Connects speaking `versions`: the guest and the version agreed, or None if the host
    /// refused the connection.
    async fn try_speaking(
        socket: &Path,
        versions: std::ops::RangeInclusive<u16>,
    ) -> Option<(FakeGuest, u16)> {
        let stream = UnixStream::connect(socket).await.unwrap();
        let mut guest = FakeGuest {
            stream,
            decoder: FrameDecoder::new(),
        };
        guest
            .send(&GuestMessage::Hello {
                min_version: *versions.start(),
                max_version: *versions.end(),
            })
            .await;
        match guest.receive().await {
            Some(HostMessage::Welcome { version }) => Some((guest, version)),
            Some(HostMessage::InvalidMessage { reason }) if reason == REDIAL_REFUSAL => None,
            other => panic!("neither welcomed nor refused: {other:?}"),
        }
    }

    /// The next message within `ms` milliseconds, if any.
    async fn receive_within(&mut self, ms: u64) -> Option<HostMessage> {
        tokio::time::timeout(Duration::from_millis(ms), self.receive_or_wait())
            .await
            .ok()
            .flatten()
    }

    async fn send(&mut self, message: &GuestMessage) {
        self.send_raw(&protocol::encode(message).unwrap()).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Says it has nothing more to send.
    async fn finish(&mut self) {
        self.stream.shutdown().await.unwrap();
    }

    /// The next message, or None once the host closed the connection. Panics after 5 s.
    async fn receive(&mut self) -> Option<HostMessage> {
        tokio::time::timeout(Duration::from_secs(5), self.receive_or_wait())
            .await
            .expect("the host neither answered nor closed within 5 s")
    }

    async fn receive_or_wait(&mut self) -> Option<HostMessage> {
        loop {
            if let Some(body) = self.decoder.next_frame().unwrap() {
                return Some(protocol::decode(&body).unwrap());
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.decoder.push(&buf[..n]),
            }
        }
    }

    /// Everything the host says until it closes the connection. Panics unless it closes
    /// within 5 s.
    async fn drain(&mut self) -> Vec<HostMessage> {
        let mut said = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(message) = self.receive_or_wait().await {
                said.push(message);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the host did not close within 5 s; it said {said:?}"));
        said
    }
}

fn listen(dir: &tempfile::TempDir) -> (GuestLink, PathBuf) {
    let socket = dir.path().join("guest.sock_1024");
    let link = GuestLink::listen("victim", &socket, Arc::new(|_| {})).unwrap();
    (link, socket)
}

fn is_invalid(message: &HostMessage) -> bool {
    matches!(message, HostMessage::InvalidMessage { .. })
}

fn is_rate_limited(message: &HostMessage) -> bool {
    matches!(message, HostMessage::InvalidMessage { reason } if reason == "rate limited")
}

fn health_checks(ids: std::ops::Range<u64>) -> Vec<u8> {
    ids.flat_map(|id| protocol::encode(&GuestMessage::HealthCheck { id }).unwrap())
        .collect()
}

fn replies(said: &[HostMessage]) -> usize {
    said.iter()
        .filter(|m| matches!(m, HostMessage::HealthCheckReply { .. }))
        .count()
}

/// A body that frames fine but decodes to nothing.
const MALFORMED: [u8; 7] = [0, 0, 0, 3, 0xff, 0xff, 0xff];

#[tokio::test]
async fn a_flooding_guest_that_redials_is_throttled_and_gets_no_more_than_the_log_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let (link, socket) = listen(&dir);
    let started = Instant::now();

    // Each connection served: every malformed message gets an error reply, and past the
    // bound the connection is closed. Past the redial budget a connection is refused
    // before its handshake. Every line shares the VM's one log allowance.
    const REDIALS: usize = 30;
    let mut served = 0;
    for _ in 0..=REDIALS {
        let Some(mut guest) = FakeGuest::try_hello(&socket).await else {
            continue;
        };
        served += 1;
        for _ in 0..20 {
            guest.send_raw(&MALFORMED).await;
        }
        let said = guest.drain().await;
        assert_eq!(
            said.iter().filter(|m| is_invalid(m)).count(),
            MAX_PROTOCOL_ERRORS as usize + 1,
            "{said:?}"
        );
    }
    let budget = REDIAL_BURST + started.elapsed().as_secs_f64() * REDIALS_PER_SEC;
    assert!(served >= REDIAL_BURST as usize, "only {served} served");
    assert!(
        served as f64 <= budget + 1.0,
        "{served} served, budget {budget:.1}"
    );
    // Let the last connection's task log its close.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let log = &link.shared.log;
    let allowance = u64::from(LOG_BURST)
        + (started.elapsed().as_secs_f64() / LOG_INTERVAL.as_secs_f64()) as u64;
    // Each connection tried at least its "connected" or "refused" line.
    let tried = log.emitted_lines() + log.suppressed_lines();
    assert!(tried > REDIALS as u64, "only {tried} lines tried");
    assert!(
        log.emitted_lines() <= allowance,
        "{} lines logged, allowance {allowance}",
        log.emitted_lines()
    );
    assert_eq!(
        link.info().protocol_errors,
        (MAX_PROTOCOL_ERRORS + 1) * served as u64
    );
}

#[tokio::test]
async fn a_redial_flood_does_not_replace_the_live_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_link, socket) = listen(&dir);
    // Spend the redial budget; the last connection is the live one.
    let mut live = FakeGuest::hello(&socket).await;
    for _ in 1..REDIAL_BURST as usize {
        live = FakeGuest::hello(&socket).await;
    }
    let mut refused = 0;
    for _ in 0..20 {
        let stream = UnixStream::connect(&socket).await.unwrap();
        let mut flood = FakeGuest {
            stream,
            decoder: FrameDecoder::new(),
        };
        // Told so before anything is read from it.
        if let Some(HostMessage::InvalidMessage { reason }) = flood.receive_within(500).await {
            assert_eq!(reason, REDIAL_REFUSAL);
            refused += 1;
        }
    }
    assert!(refused >= 19, "only {refused} of 20 refused");
    live.send(&GuestMessage::HealthCheck { id: 7 }).await;
    // The host's own health checks may come first.
    loop {
        match live.receive().await {
            Some(HostMessage::HealthCheckReply { id: 7 }) => break,
            Some(HostMessage::HealthCheck { .. }) => {}
            other => panic!("the live connection was not served: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_redial_does_not_refill_the_token_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let (link, socket) = listen(&dir);

    // Empty the bucket: the burst is answered, the rest dropped.
    let mut guest = FakeGuest::hello(&socket).await;
    guest.send_raw(&health_checks(0..BURST as u64 + 40)).await;
    guest.finish().await;
    let said = guest.drain().await;
    let emptied = Instant::now();
    assert!(said.iter().any(is_rate_limited), "{said:?}");
    assert!(replies(&said) <= BURST as usize + 1, "{said:?}");

    // A fresh connection finds the bucket as the last one left it: it holds only what
    // refilled since, not another burst.
    let mut guest = FakeGuest::hello(&socket).await;
    const SENT: usize = 30;
    guest
        .send_raw(&health_checks(1000..1000 + SENT as u64))
        .await;
    guest.finish().await;
    let said = guest.drain().await;
    let refilled = emptied.elapsed().as_secs_f64() * RATE_PER_SEC;
    assert!(said.iter().any(is_rate_limited), "{said:?}");
    assert!(
        replies(&said) as f64 <= refilled + 1.0,
        "{} of {SENT} answered; only {refilled:.1} tokens refilled",
        replies(&said)
    );
    assert!(link.shared.bucket.lock().unwrap().tokens() < 1.0);
}

#[tokio::test]
async fn non_finite_metrics_are_refused_and_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (link, socket) = listen(&dir);
    let mut guest = FakeGuest::hello(&socket).await;
    let metrics = Metrics {
        load1: f32::NAN,
        load5: f32::INFINITY,
        mem_total_bytes: 1 << 30,
        mem_used_bytes: 1 << 20,
        mem_cached_bytes: 0,
        workload_mem_bytes: 0,
        online_cpus: 1,
    };
    guest
        .send_raw(&protocol::encode(&GuestMessage::Metrics(metrics)).unwrap())
        .await;
    guest.finish().await;
    let said = guest.drain().await;
    assert!(said.iter().any(is_invalid), "{said:?}");
    assert!(link.latest_metrics().is_none());
    let info = serde_json::to_value(link.info()).unwrap();
    assert!(
        info["metrics"].is_null() && info["protocol_errors"] == 1,
        "{info}"
    );
}

#[tokio::test]
async fn the_fast_cpu_signal_comes_from_version_2_guests_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (link, socket) = listen(&dir);
    let metrics = Metrics {
        load1: 0.4,
        load5: 0.2,
        mem_total_bytes: 1 << 30,
        mem_used_bytes: 1 << 20,
        mem_cached_bytes: 0,
        workload_mem_bytes: 0,
        online_cpus: 2,
    };
    let cpu = CpuUsage {
        util: 0.95,
        pressure_some_avg10: 42.5,
    };

    // A version-1 guest: its metrics come without the signal.
    let (mut old, version) = FakeGuest::try_speaking(&socket, 1..=1).await.unwrap();
    assert_eq!(version, 1);
    old.send(&GuestMessage::metrics(version, metrics, Some(cpu)))
        .await;
    old.finish().await;
    assert!(!old.drain().await.iter().any(is_invalid));
    assert_eq!(
        link.latest_metrics().map(|(m, c, _)| (m, c)),
        Some((metrics, None))
    );

    // A version-2 guest sends it; one out of range is refused and the last good one kept.
    let (mut new, version) = FakeGuest::try_speaking(&socket, protocol::VERSIONS)
        .await
        .unwrap();
    assert_eq!(version, 2);
    new.send(&GuestMessage::metrics(version, metrics, Some(cpu)))
        .await;
    let impossible = CpuUsage { util: 1.5, ..cpu };
    new.send(&GuestMessage::metrics(version, metrics, Some(impossible)))
        .await;
    new.finish().await;
    let said = new.drain().await;
    assert_eq!(said.iter().filter(|m| is_invalid(m)).count(), 1, "{said:?}");
    assert_eq!(link.latest_metrics().and_then(|(_, c, _)| c), Some(cpu));
    let info = serde_json::to_value(link.info()).unwrap();
    assert_eq!(info["cpu"]["pressure_some_avg10"], 42.5, "{info}");
}
