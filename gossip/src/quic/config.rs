//! The endpoint's TLS and transport settings: mutual TLS on the fleet CAs, the ALPN ids of
//! the versions it speaks, and windows and datagrams sized for bulk tunnels.

use super::trust::{Trust, Verifier};
use super::*;

/// rustls needs its provider chosen when more than one could be built; ring it is.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().expect("idle timeout is in range"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(CONNECTION_WINDOW.into())
        .mtu_discovery_config(Some({
            let mut discovery = quinn::MtuDiscoveryConfig::default();
            discovery.upper_bound(MAX_DATAGRAM);
            discovery
        }));
    Arc::new(transport)
}

/// Sets both buffers to [`SOCKET_BUFFER`]: past `net.core.[rw]mem_max` when privileged (vmhostd
/// runs as root), else as far as that limit allows.
pub(super) fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let received = setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER)
        .or_else(|_| setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER));
    let sent = setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER)
        .or_else(|_| setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER));
    if let Err(error) = received.and(sent) {
        tracing::warn!(%error, "cannot enlarge the fleet socket's buffers; bulk streams may drop datagrams");
    }
}

/// The fleet's mutual TLS as a server: a certificate from a trusted CA is required of
/// every client. QUIC adds its ALPN on top; the tunnel benchmark uses it over TCP.
pub fn tls_server_config(identity: &Identity) -> Result<rustls::ServerConfig, QuicError> {
    server_tls(
        &Arc::new(Trust::new(identity, Default::default())?),
        identity,
    )
}

/// The fleet's mutual TLS as a client: the server must hold a certificate from a trusted
/// CA, and this host presents its own.
pub fn tls_client_config(identity: &Identity) -> Result<rustls::ClientConfig, QuicError> {
    client_tls(
        &Arc::new(Trust::new(identity, Default::default())?),
        identity,
    )
}

fn server_tls(trust: &Arc<Trust>, identity: &Identity) -> Result<rustls::ServerConfig, QuicError> {
    rustls::ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(Verifier(trust.clone())))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| QuicError::Tls(e.to_string()))
}

fn client_tls(trust: &Arc<Trust>, identity: &Identity) -> Result<rustls::ClientConfig, QuicError> {
    rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier(trust.clone())))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| QuicError::Tls(e.to_string()))
}

fn alpn_ids(versions: &[u32]) -> Vec<Vec<u8>> {
    versions.iter().map(|&v| alpn_id(v)).collect()
}

/// rustls picks the first of the server's ids that the client offers, so `versions` is in
/// order of preference.
pub(super) fn server_config(
    trust: &Arc<Trust>,
    identity: &Identity,
    versions: &[u32],
) -> Result<quinn::ServerConfig, QuicError> {
    let mut config = server_tls(trust, identity)?;
    config.alpn_protocols = alpn_ids(versions);
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport());
    Ok(server)
}

pub(super) fn client_config(
    trust: &Arc<Trust>,
    identity: &Identity,
    versions: &[u32],
) -> Result<quinn::ClientConfig, QuicError> {
    let mut config = client_tls(trust, identity)?;
    config.alpn_protocols = alpn_ids(versions);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport());
    Ok(client)
}
