//! Migration tunnel throughput between two host namespaces on one segment: bulk bytes through
//! unix socket → QUIC stream (mutual TLS) → unix socket, as vmhostd carries QEMU's stream,
//! against one raw TCP connection, and against the same unix → tunnel → unix path over TLS
//! on TCP (same certificates, mutual), alternating. Each end is its own process in its own
//! namespace, as on two hosts. The receiving end answers each transfer with the byte count it
//! got, so a round is timed until every byte has arrived.

use crate::{append, today};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use vmhost_gossip::quic::{
    answer, splice, tls_client_config, tls_server_config, FleetEndpoint, FleetResponse,
};
use vmhost_pki::{one_machine_fleet, Identity};
use vmhost_tests::netns::{Lab, FLEET_PORT};

const ROUNDS: u32 = 3;
/// Plain Ethernet, and the jumbo frames a migration network would run.
const MTUS: [u32; 2] = [1500, 9000];
const CHUNK: usize = 1 << 20;

/// The parent: for each MTU, builds the lab, runs the sink and the source in their
/// namespaces, records.
pub fn throughput(mib: usize) {
    for mtu in MTUS {
        throughput_at(mib, mtu);
    }
}

fn throughput_at(mib: usize, mtu: u32) {
    let lab = Lab::new(2);
    lab.set_mtu(mtu);
    let dir = tempfile::tempdir().unwrap();
    one_machine_fleet(dir.path(), &["host-a", "host-b"], lab.addr(1)).unwrap();
    let me = std::env::current_exe().unwrap();
    let in_host = |i: usize| {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &lab.ns(i)]).arg(&me);
        command
    };
    let mut sink = in_host(1)
        .arg("tunnel-sink")
        .arg(dir.path().join("host-b"))
        .arg(lab.addr(1).to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sink.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready", "the sink did not come up");
    let source = in_host(0)
        .arg("tunnel-source")
        .arg(dir.path().join("host-a"))
        .arg(lab.addr(0).to_string())
        .arg(lab.addr(1).to_string())
        .arg(mib.to_string())
        .output()
        .unwrap();
    let _ = sink.kill();
    let _ = sink.wait();
    assert!(
        source.status.success(),
        "the source failed: {}",
        String::from_utf8_lossy(&source.stderr)
    );
    let seconds: Vec<f64> = String::from_utf8_lossy(&source.stdout)
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let rate = |secs: f64| (mib as f64) * f64::from(ROUNDS) / secs;
    let (ours, tcp, tls) = (rate(seconds[0]), rate(seconds[1]), rate(seconds[2]));
    let setting = format!(
        "{mib} MiB x {ROUNDS} between two host namespaces, veth through a bridge, MTU {mtu}"
    );
    append(&format!(
        "- {} migration tunnel throughput ({setting}; unix → QUIC with mutual TLS → unix, against one TCP connection): ours {ours:.0} MiB/s, raw TCP {tcp:.0} MiB/s, ratio {:.2} (ours/raw, higher is better)\n",
        today(),
        ours / tcp
    ));
    append(&format!(
        "- {} migration tunnel throughput against a TLS-over-TCP tunnel ({setting}; unix → QUIC with mutual TLS → unix, against unix → TLS 1.3 on one TCP connection, same certificates, mutual → unix): ours {ours:.0} MiB/s, TLS over TCP {tls:.0} MiB/s, ratio {:.2} (ours/TLS, higher is better)\n",
        today(),
        ours / tls
    ));
}

/// The TLS-over-TCP tunnel's port, beside the fleet port.
const TLS_PORT: u16 = FLEET_PORT + 1;

fn tls_acceptor(identity: &Identity) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(Arc::new(tls_server_config(identity).unwrap()))
}

fn tls_connector(identity: &Identity) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(identity).unwrap()))
}

/// A local stream for "QEMU", carried both ways over `tunnel` by a task, as vmhostd would.
fn through<T>(tunnel: T) -> UnixStream
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tunnel_side, qemu_side) = UnixStream::pair().unwrap();
    tokio::spawn(async move {
        let mut tunnel = tunnel;
        let _ = tokio::io::copy_bidirectional(&mut tunnel_side, &mut tunnel).await;
    });
    qemu_side
}

/// Reads everything, then answers with the count, as the proof that it all arrived.
async fn drain_and_count<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let count = tokio::io::copy(&mut stream, &mut tokio::io::sink())
        .await
        .unwrap();
    stream.write_all(&count.to_be_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
}

/// The receiving host: a fleet endpoint taking tunnels, and a TCP listener on the same port.
pub async fn sink(identity: &Path, addr: IpAddr) {
    let identity = Identity::load(identity).unwrap();
    let endpoint = FleetEndpoint::bind(SocketAddr::new(addr, FLEET_PORT), &identity).unwrap();
    endpoint.set_tunnel_handler(Arc::new(|_, send, recv| {
        let (tunnel_side, qemu_side) = UnixStream::pair().unwrap();
        tokio::spawn(splice(tunnel_side, send, recv));
        tokio::spawn(drain_and_count(qemu_side));
    }));
    endpoint.serve(Arc::new(|_| answer(FleetResponse::Pong)));
    let tls = TcpListener::bind(SocketAddr::new(addr, TLS_PORT))
        .await
        .unwrap();
    let acceptor = tls_acceptor(&identity);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tls.accept().await.unwrap();
            let stream = acceptor.accept(stream).await.unwrap();
            tokio::spawn(drain_and_count(through(stream)));
        }
    });
    let listener = TcpListener::bind(SocketAddr::new(addr, FLEET_PORT))
        .await
        .unwrap();
    println!("ready");
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::spawn(drain_and_count(stream));
    }
}

/// Writes `mib` MiB and waits for the receiver's count.
async fn send_and_confirm<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, mib: usize) {
    let chunk = vec![0x5au8; CHUNK];
    for _ in 0..mib {
        stream.write_all(&chunk).await.unwrap();
    }
    stream.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), (mib * CHUNK) as u64);
}

/// The sending host: alternates a tunnel round and a TCP round; prints both total times.
pub async fn source(identity: &Path, addr: IpAddr, peer: IpAddr, mib: usize) {
    let identity = Identity::load(identity).unwrap();
    let endpoint = FleetEndpoint::bind(SocketAddr::new(addr, 0), &identity).unwrap();
    let connector = tls_connector(&identity);
    let tls_peer = SocketAddr::new(peer, TLS_PORT);
    let peer = SocketAddr::new(peer, FLEET_PORT);
    let (mut ours, mut tcp, mut tls) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        let started = Instant::now();
        let (send, recv) = endpoint
            .open_tunnel(peer, "host-b", u64::from(round))
            .await
            .unwrap();
        let (tunnel_side, qemu_side) = UnixStream::pair().unwrap();
        tokio::spawn(splice(tunnel_side, send, recv));
        send_and_confirm(qemu_side, mib).await;
        ours += started.elapsed();

        let started = Instant::now();
        send_and_confirm(TcpStream::connect(peer).await.unwrap(), mib).await;
        tcp += started.elapsed();

        let started = Instant::now();
        let stream = TcpStream::connect(tls_peer).await.unwrap();
        let name = "host-b".try_into().unwrap();
        let stream = connector.connect(name, stream).await.unwrap();
        send_and_confirm(through(stream), mib).await;
        tls += started.elapsed();
    }
    let [ours, tcp, tls] = [ours, tcp, tls].map(|d| d.as_secs_f64());
    println!("{ours} {tcp} {tls}");
}
