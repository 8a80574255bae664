//! The fleet's QUIC endpoint (quinn), one per host, with mutual TLS: both sides present a
//! certificate from a fleet CA the other trusts, and anything else, or a host the other
//! denies, is refused in the handshake (`trust`). On it sits
//! a typed request/response layer, one bidirectional stream per request, each message a
//! big-endian u32 length and a postcard body. Gossip travels one way, one unidirectional
//! stream per message, into an inbox that `membership` reads. Other features open their own
//! streams.
//!
//! Hosts of different releases meet during a rolling upgrade, so the protocol is versioned:
//! each version is an ALPN id (`vmhost/<n>`), every endpoint accepts and offers the current
//! and the previous version, and TLS settles on the highest both speak. Requests and
//! responses know the version that introduced them and are never sent to a peer that
//! negotiated an older one.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use vmhost_capacity::lease::{LeaseRequest, LeaseResponse};
use vmhost_pki::Identity;

mod config;
mod frames;
mod messages;
mod trust;

use config::{client_config, enlarge_socket_buffers, server_config};
pub use config::{install_crypto_provider, tls_client_config, tls_server_config};
pub use frames::{body_length, splice};
use frames::{read_frame, write_frame};
pub use messages::{alpn_id, version_of_alpn, FleetRequest, FleetResponse, Peer};
use trust::{Gate, Trust, ACCESS_DENIED};

/// The fleet protocol version this build speaks best.
pub const FLEET_PROTOCOL_VERSION: u32 = 2;
/// The version before, still spoken so a fleet can upgrade one host at a time.
pub const PREVIOUS_FLEET_PROTOCOL_VERSION: u32 = 1;
/// What [`FleetEndpoint::bind`] offers and accepts, preferred first.
pub const SUPPORTED_FLEET_PROTOCOL_VERSIONS: [u32; 2] =
    [FLEET_PROTOCOL_VERSION, PREVIOUS_FLEET_PROTOCOL_VERSION];
const ALPN_PREFIX: &str = "vmhost/";
/// The TLS alert a server sends when the client offers no protocol it speaks.
const NO_APPLICATION_PROTOCOL: u8 = 120;
/// The largest request or response body.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that does not finish the handshake in this time is treated as unreachable.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Gossip messages waiting for chitchat; more are dropped (gossip tolerates loss).
const GOSSIP_INBOX: usize = 1024;
/// A silent peer is declared gone after this long; keep-alives keep healthy links busy.
/// It bounds how long a cut link stalls a tunnel before its ends see an error.
const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Flow-control windows sized for a migration stream on a fast LAN (quinn's defaults are
/// tuned for the internet, and cap one stream well below a 10 Gb/s link).
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// The largest UDP payload path MTU discovery may reach. quinn hands the kernel up to 10
/// datagrams in one GSO send, which must fit one 64 KiB UDP message, so ten of these do; a
/// larger bound makes every full batch fail with EMSGSIZE. On jumbo frames or loopback these
/// datagrams carry a stream at a fraction of the per-packet cost of quinn's 1452 bytes.
const MAX_DATAGRAM: u16 = 6_550;
/// Socket buffers that absorb a migration stream's bursts: with the kernel's ~200 KiB
/// default the receiving socket overflows at LAN rates, and each drop halves the sending rate.
const SOCKET_BUFFER: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach {peer}: {message}")]
    Connect { peer: String, message: String },
    /// The peer refused the handshake: it speaks none of the versions offered.
    #[error("{peer} speaks none of the fleet protocol versions {offered:?} this host offers; is one of them too old?")]
    NoCommonVersion { peer: String, offered: Vec<u32> },
    #[error("request to {peer} failed: {message}")]
    Request { peer: String, message: String },
}

pub type Reply = Pin<Box<dyn Future<Output = FleetResponse> + Send>>;
pub type Handler = Arc<dyn Fn(FleetRequest) -> Reply + Send + Sync>;
/// A handler that is told who asks and which protocol version they speak.
pub type PeerHandler = Arc<dyn Fn(Peer, FleetRequest) -> Reply + Send + Sync>;
/// Takes over a stream a peer opened with [`FleetRequest::Tunnel`].
pub type TunnelHandler = Arc<dyn Fn(u64, quinn::SendStream, quinn::RecvStream) + Send + Sync>;
type TunnelSlot = Arc<Mutex<Option<TunnelHandler>>>;

/// A reply that is ready at once.
pub fn answer(response: FleetResponse) -> Reply {
    Box::pin(std::future::ready(response))
}

/// A gossip message as received: the sender's address and the bytes.
pub type GossipDatagram = (SocketAddr, Vec<u8>);

type PeerConnection = Arc<tokio::sync::Mutex<Option<(quinn::Connection, Peer)>>>;

/// The peer of an established connection. `fallback_name` is used when the certificate
/// names no host.
fn peer_of(connection: &quinn::Connection, fallback_name: Option<&str>) -> Result<Peer, String> {
    let handshake = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok());
    let protocol = handshake.as_ref().and_then(|h| h.protocol.clone());
    // With ALPN lists on both sides, rustls (QUIC mode) fails a handshake that agrees on none.
    let version = protocol
        .as_deref()
        .and_then(version_of_alpn)
        .ok_or_else(|| format!("no fleet protocol negotiated ({protocol:?})"))?;
    let certificate_name = connection
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().and_then(vmhost_pki::host_name));
    let name = certificate_name
        .or_else(|| fallback_name.map(str::to_string))
        .or_else(|| handshake.and_then(|h| h.server_name))
        .unwrap_or_else(|| connection.remote_address().to_string());
    Ok(Peer {
        name,
        addr: connection.remote_address(),
        version,
    })
}

/// Whether a handshake failed with the TLS `alert`, from either side.
fn tls_alert(error: &quinn::ConnectionError, alert: u8) -> bool {
    let alert = quinn::TransportErrorCode::crypto(alert);
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code == alert,
        quinn::ConnectionError::TransportError(error) => error.code == alert,
        _ => false,
    }
}

pub struct FleetEndpoint {
    endpoint: quinn::Endpoint,
    /// Open connections to peers, reused across requests (a handshake per request would
    /// dominate every round trip). Each peer has its own lock, so dialling a dead peer
    /// delays nobody else.
    connections: Mutex<HashMap<(SocketAddr, String), PeerConnection>>,
    gossip_in: mpsc::Sender<GossipDatagram>,
    gossip_inbox: Mutex<Option<mpsc::Receiver<GossipDatagram>>>,
    tunnels: TunnelSlot,
    versions: Vec<u32>,
    gate: Gate,
}

impl FleetEndpoint {
    /// An endpoint speaking [`SUPPORTED_FLEET_PROTOCOL_VERSIONS`].
    pub fn bind(addr: SocketAddr, identity: &Identity) -> Result<FleetEndpoint, QuicError> {
        Self::bind_with_versions(addr, identity, &SUPPORTED_FLEET_PROTOCOL_VERSIONS)
    }

    /// An endpoint that offers and accepts only `versions`, preferred first: tests use it to
    /// stand in for hosts of other releases.
    pub fn bind_with_versions(
        addr: SocketAddr,
        identity: &Identity,
        versions: &[u32],
    ) -> Result<FleetEndpoint, QuicError> {
        if versions.is_empty() {
            return Err(QuicError::Tls("no fleet protocol version to offer".into()));
        }
        install_crypto_provider();
        let bind = |source| QuicError::Bind { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
        enlarge_socket_buffers(&socket);
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(MAX_DATAGRAM)
            .expect("MAX_DATAGRAM is within QUIC's bounds");
        let trust = Arc::new(Trust::new(identity, Default::default())?);
        let client = client_config(&trust, identity, versions)?;
        let endpoint = quinn::Endpoint::new(
            config,
            Some(server_config(&trust, identity, versions)?),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind)?;
        let (gossip_in, gossip_inbox) = mpsc::channel(GOSSIP_INBOX);
        Ok(FleetEndpoint {
            endpoint,
            connections: Default::default(),
            gossip_in,
            gossip_inbox: Mutex::new(Some(gossip_inbox)),
            tunnels: Default::default(),
            versions: versions.to_vec(),
            gate: Gate::new(trust, client, identity),
        })
    }

    /// The protocol versions this endpoint offers and accepts, preferred first.
    pub fn versions(&self) -> &[u32] {
        &self.versions
    }

    /// Who takes the tunnels peers open; without one they are refused.
    pub fn set_tunnel_handler(&self, handler: TunnelHandler) {
        *self.tunnels.lock().expect("tunnels lock") = Some(handler);
    }

    /// Opens a byte tunnel to the peer's tunnel `id`, on the connection requests use.
    pub async fn open_tunnel(
        &self,
        addr: SocketAddr,
        name: &str,
        id: u64,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), QuicError> {
        let (connection, _) = self.connection(addr, name).await?;
        let error = |message: String| QuicError::Request {
            peer: name.to_string(),
            message,
        };
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| error(e.to_string()))?;
        let body = postcard::to_stdvec(&FleetRequest::Tunnel { id }).expect("requests encode");
        write_frame(&mut send, &body).await.map_err(error)?;
        Ok((send, recv))
    }

    /// The gossip received from peers; there is one reader.
    pub fn take_gossip_inbox(&self) -> Option<mpsc::Receiver<GossipDatagram>> {
        self.gossip_inbox.lock().expect("inbox lock").take()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// Serves requests with `handler`, and queues gossip, until the endpoint closes.
    pub fn serve(&self, handler: Handler) -> tokio::task::JoinHandle<()> {
        self.serve_peers(Arc::new(move |_, request| handler(request)))
    }

    /// Like [`serve`](Self::serve), telling `handler` who asks and in which version.
    pub fn serve_peers(&self, handler: PeerHandler) -> tokio::task::JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        let gossip_in = self.gossip_in.clone();
        let tunnels = self.tunnels.clone();
        let gate = self.gate.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let handler = handler.clone();
                let gossip_in = gossip_in.clone();
                let tunnels = tunnels.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let from = incoming.remote_address();
                    let connection = match incoming.await {
                        Ok(connection) => connection,
                        Err(error) => {
                            if tls_alert(&error, NO_APPLICATION_PROTOCOL) {
                                tracing::warn!(%from, %error, "fleet peer refused: it speaks no protocol version of ours");
                            } else if tls_alert(&error, ACCESS_DENIED) {
                                // The trust logged the denied host by name.
                                tracing::debug!(%from, %error, "denied fleet peer refused");
                            } else {
                                tracing::warn!(%from, %error, "fleet peer refused in the handshake");
                            }
                            return;
                        }
                    };
                    match peer_of(&connection, None) {
                        Ok(peer) => {
                            let Some(_accepted) = gate.accept(&connection) else {
                                return;
                            };
                            tokio::spawn(receive_gossip(connection.clone(), gossip_in));
                            serve_connection(connection, peer, handler, tunnels).await
                        }
                        Err(error) => {
                            tracing::warn!(%from, %error, "fleet peer refused");
                            connection.close(0u32.into(), b"no protocol version");
                        }
                    }
                });
            }
        })
    }

    /// Sends one gossip message to the host at `addr` (its certificate must name that IP).
    /// Gossip is lossy by design: while a dial to `addr` is under way, the message is dropped
    /// rather than queued behind it.
    pub async fn send_gossip(&self, addr: SocketAddr, body: &[u8]) -> Result<(), QuicError> {
        let name = addr.ip().to_string();
        let error = |message: String| QuicError::Request {
            peer: name.clone(),
            message,
        };
        let peer = self.peer(addr, &name);
        let Ok(mut slot) = peer.try_lock() else {
            return Err(error("a dial is under way".into()));
        };
        let (connection, _) = self.connected(&mut slot, addr, &name).await?;
        drop(slot);
        let sent = async {
            let mut send = connection.open_uni().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, body).await?;
            send.finish().map_err(|e| e.to_string())
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, sent)
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r);
        if result.is_err() {
            self.forget(addr, &name).await;
        }
        result.map_err(error)
    }

    /// One request to the host `name` at `addr`.
    pub async fn call(
        &self,
        addr: SocketAddr,
        name: &str,
        request: &FleetRequest,
    ) -> Result<FleetResponse, QuicError> {
        self.call_with_timeout(addr, name, request, REQUEST_TIMEOUT)
            .await
    }

    /// One request that may take up to `timeout` to answer.
    pub async fn call_with_timeout(
        &self,
        addr: SocketAddr,
        name: &str,
        request: &FleetRequest,
        timeout: Duration,
    ) -> Result<FleetResponse, QuicError> {
        let (_, response) = self.request(addr, name, request, timeout).await?;
        Ok(response)
    }

    /// One request, also returning whom it reached and the version they spoke.
    pub async fn call_peer(
        &self,
        addr: SocketAddr,
        name: &str,
        request: &FleetRequest,
    ) -> Result<(Peer, FleetResponse), QuicError> {
        self.request(addr, name, request, REQUEST_TIMEOUT).await
    }

    /// Dials the host `name` at `addr`, or reuses the open connection, and says who answered
    /// and which protocol version the connection speaks.
    pub async fn connect(&self, addr: SocketAddr, name: &str) -> Result<Peer, QuicError> {
        Ok(self.connection(addr, name).await?.1)
    }

    /// The protocol version of the open connection to `name` at `addr`, without dialling:
    /// `None` if there is none.
    pub async fn peer_version(&self, addr: SocketAddr, name: &str) -> Option<u32> {
        let peer = self
            .connections
            .lock()
            .expect("connections lock")
            .get(&(addr, name.to_string()))
            .cloned()?;
        let slot = peer.lock().await;
        slot.as_ref()
            .filter(|(connection, _)| connection.close_reason().is_none())
            .map(|(_, peer)| peer.version)
    }

    async fn request(
        &self,
        addr: SocketAddr,
        name: &str,
        request: &FleetRequest,
        timeout: Duration,
    ) -> Result<(Peer, FleetResponse), QuicError> {
        let error = |message: String| QuicError::Request {
            peer: name.to_string(),
            message,
        };
        let body = postcard::to_stdvec(request).expect("requests always encode");
        // A peer of an older version could not decode a newer request.
        let admit = |peer: &Peer| match request.since() {
            since if since > peer.version => Err(error(format!(
                "the request needs fleet protocol {since}, the peer speaks {}",
                peer.version
            ))),
            _ => Ok(()),
        };
        let (peer, reply) = self.exchange(addr, name, &body, timeout, admit).await?;
        let response = postcard::from_bytes(&reply)
            .map_err(|e| error(format!("undecodable response: {e}")))?;
        Ok((peer, response))
    }

    /// One request as raw bytes (tests send malformed ones through this).
    pub async fn call_bytes(
        &self,
        addr: SocketAddr,
        name: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, QuicError> {
        let (_, reply) = self
            .exchange(addr, name, body, REQUEST_TIMEOUT, |_| Ok(()))
            .await?;
        Ok(reply)
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        name: &str,
        body: &[u8],
        timeout: Duration,
        admit: impl FnOnce(&Peer) -> Result<(), QuicError>,
    ) -> Result<(Peer, Vec<u8>), QuicError> {
        let request = |message: String| QuicError::Request {
            peer: name.to_string(),
            message,
        };
        let (connection, peer) = self.connection(addr, name).await?;
        admit(&peer)?;
        let exchange = async {
            let (mut send, mut recv) = connection
                .open_bi()
                .await
                .map_err(|e| request(e.to_string()))?;
            write_frame(&mut send, body).await.map_err(request)?;
            send.finish().map_err(|e| request(e.to_string()))?;
            read_frame(&mut recv).await.map_err(request)
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| request("timed out".into()))?;
        if reply.is_err() {
            // The next request dials afresh.
            self.forget(addr, name).await;
        }
        Ok((peer, reply?))
    }

    fn peer(&self, addr: SocketAddr, name: &str) -> PeerConnection {
        self.connections
            .lock()
            .expect("connections lock")
            .entry((addr, name.to_string()))
            .or_default()
            .clone()
    }

    async fn forget(&self, addr: SocketAddr, name: &str) {
        let peer = self.peer(addr, name);
        *peer.lock().await = None;
    }

    async fn connection(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> Result<(quinn::Connection, Peer), QuicError> {
        let peer = self.peer(addr, name);
        let mut slot = peer.lock().await;
        self.connected(&mut slot, addr, name).await
    }

    /// The open connection in `slot`, or a new one.
    async fn connected(
        &self,
        slot: &mut Option<(quinn::Connection, Peer)>,
        addr: SocketAddr,
        name: &str,
    ) -> Result<(quinn::Connection, Peer), QuicError> {
        if let Some(open) = slot.as_ref().filter(|(c, _)| c.close_reason().is_none()) {
            return Ok(open.clone());
        }
        let connect = |message: String| QuicError::Connect {
            peer: name.to_string(),
            message,
        };
        let connecting = self
            .endpoint
            .connect_with(self.gate.client_config(), addr, name)
            .map_err(|e| connect(e.to_string()))?;
        let connection = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| connect("handshake timed out".into()))?
            .map_err(|e| {
                if tls_alert(&e, NO_APPLICATION_PROTOCOL) {
                    QuicError::NoCommonVersion {
                        peer: name.to_string(),
                        offered: self.versions.clone(),
                    }
                } else {
                    connect(e.to_string())
                }
            })?;
        let peer = peer_of(&connection, Some(name)).map_err(|message| {
            connection.close(0u32.into(), b"no protocol version");
            connect(message)
        })?;
        // The trust may have changed during the handshake.
        (self.gate.trust().recheck(&connection, Some(name)))
            .map_err(|host| connect(format!("{host} is no longer admitted")))?;
        *slot = Some((connection.clone(), peer.clone()));
        Ok((connection, peer))
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

async fn serve_connection(
    connection: quinn::Connection,
    peer: Peer,
    handler: PeerHandler,
    tunnels: TunnelSlot,
) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let handler = handler.clone();
        let tunnels = tunnels.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let version = peer.version;
            let response = match read_frame(&mut recv).await {
                Ok(body) => match postcard::from_bytes::<FleetRequest>(&body) {
                    Ok(FleetRequest::Tunnel { id }) => {
                        let taker = tunnels.lock().expect("tunnels lock").clone();
                        match taker {
                            Some(take) => return take(id, send, recv),
                            None => FleetResponse::Error {
                                reason: "this host takes no tunnels".into(),
                            },
                        }
                    }
                    Ok(request) if request.since() > version => FleetResponse::Error {
                        reason: format!(
                            "the request needs fleet protocol {}, this connection speaks {version}",
                            request.since()
                        ),
                    },
                    Ok(request) => handler(peer, request).await,
                    Err(e) => FleetResponse::Error {
                        reason: format!("malformed request: {e}"),
                    },
                },
                Err(reason) => FleetResponse::Error { reason },
            };
            // The peer could not decode an answer newer than its version.
            let response = match response.since() {
                since if since > version => FleetResponse::Error {
                    reason: format!(
                        "the answer needs fleet protocol {since}, the peer speaks {version}"
                    ),
                },
                _ => response,
            };
            let body = postcard::to_stdvec(&response).expect("responses always encode");
            if write_frame(&mut send, &body).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

/// Queues each gossip message a peer sends; the sender's address is the connection's, which
/// the peer's certificate vouches for.
async fn receive_gossip(connection: quinn::Connection, inbox: mpsc::Sender<GossipDatagram>) {
    let from = connection.remote_address();
    while let Ok(mut recv) = connection.accept_uni().await {
        let inbox = inbox.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut recv)).await {
                Ok(Ok(body)) => {
                    let _ = inbox.try_send((from, body));
                }
                Ok(Err(error)) => tracing::debug!(%from, %error, "unreadable gossip"),
                Err(_) => tracing::debug!(%from, "gossip stream stalled"),
            }
        });
    }
}
