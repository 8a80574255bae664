//! A TCP client that keeps one connection to a guest busy, to check that the connection
//! survives what the host does to the guest, and for how long it stalled.

use crate::wait_until;
use std::io::BufRead;
use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A TCP client in its own network namespace that sends a numbered line every 100 ms and
/// checks each echo, on one connection, until told to stop; it records the longest wait
/// between two echoes.
pub struct EchoClient {
    echoed: Arc<AtomicU64>,
    largest_gap_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl EchoClient {
    pub fn start(namespace: String, server: std::net::SocketAddr) -> EchoClient {
        let echoed = Arc::new(AtomicU64::new(0));
        let largest_gap_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, gap, stopped) = (echoed.clone(), largest_gap_ms.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Sockets belong to the namespace of the thread that creates them.
            let netns = std::fs::File::open(format!("/run/netns/{namespace}")).unwrap();
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            let stream = loop {
                match std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
                    Ok(stream) => break stream,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(500))
                    }
                    Err(e) => return Err(format!("cannot connect to {server}: {e}")),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut n = 0u64;
            let mut last_echo = None;
            while !stopped.load(Ordering::Relaxed) {
                n += 1;
                let line = format!("line {n}\n");
                std::io::Write::write_all(&mut writer, line.as_bytes())
                    .map_err(|e| format!("send of line {n}: {e}"))?;
                let mut echo = String::new();
                reader
                    .read_line(&mut echo)
                    .map_err(|e| format!("echo of line {n}: {e}"))?;
                if echo != line {
                    return Err(format!("sent {line:?}, got back {echo:?}"));
                }
                count.store(n, Ordering::Relaxed);
                let now = std::time::Instant::now();
                if let Some(last) = last_echo.replace(now) {
                    gap.fetch_max((now - last).as_millis() as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        EchoClient {
            echoed,
            largest_gap_ms,
            stop,
            thread,
        }
    }

    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    pub fn wait_echoed(&self, count: u64) {
        wait_until(
            Duration::from_secs(180),
            "echoes over the connection",
            || self.echoed() >= count || self.thread.is_finished(),
        );
        assert!(
            self.echoed() >= count,
            "the connection stopped after {} echoes",
            self.echoed()
        );
    }

    /// Stops; returns the longest wait between two echoes.
    pub fn stop(self) -> Result<Duration, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()?;
        Ok(Duration::from_millis(
            self.largest_gap_ms.load(Ordering::Relaxed),
        ))
    }
}
