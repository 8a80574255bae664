//! Whom the endpoint admits: a peer with a certificate from one of the CAs it trusts
//! (several while the fleet rolls to a new CA), unless the deny list names it.
//! [`FleetEndpoint::set_trust`] replaces the trust while the endpoint runs: new handshakes
//! follow it, and open connections it no longer admits are closed.

use super::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::{BTreeSet, HashSet};
use std::sync::RwLock;

/// The TLS alert that refuses a denied host's certificate.
pub(super) const ACCESS_DENIED: u8 = 49;

/// The fleet CAs and the denied hosts a peer's certificate is checked against.
#[derive(Debug)]
pub(super) struct Trust {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<rustls::client::WebPkiServerVerifier>,
    denied: BTreeSet<String>,
    /// Hosts already logged as refused, so one that keeps dialling is logged once.
    logged: Mutex<HashSet<String>>,
}

impl Trust {
    pub(super) fn new(identity: &Identity, denied: BTreeSet<String>) -> Result<Trust, QuicError> {
        install_crypto_provider();
        let tls = |e: &dyn std::fmt::Display| QuicError::Tls(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for ca in identity.trusted_cas() {
            roots.add(ca.clone()).map_err(|e| tls(&e))?;
        }
        let roots = Arc::new(roots);
        let client = rustls::server::WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| tls(&e))?;
        let server = rustls::client::WebPkiServerVerifier::builder(roots)
            .build()
            .map_err(|e| tls(&e))?;
        // Peers holding the same CAs would refuse it too.
        client
            .verify_client_cert(&identity.cert, &[], UnixTime::now())
            .map_err(|e| {
                tls(&format!(
                    "no trusted CA issued this host's certificate: {e}"
                ))
            })?;
        Ok(Trust {
            client,
            server,
            denied,
            logged: Default::default(),
        })
    }

    /// Refuses a denied host's certificate.
    fn admit(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match vmhost_pki::host_name(end_entity) {
            Some(host) if self.denied.contains(&host) => {
                self.log_once(&host, "refused a denied fleet host");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            _ => Ok(()),
        }
    }

    fn log_once(&self, host: &str, message: &str) {
        if self
            .logged
            .lock()
            .expect("logged lock")
            .insert(host.to_string())
        {
            tracing::warn!(%host, "{message}");
        }
    }

    /// Checks an open connection's peer, as its handshake authenticated it, against this
    /// trust; one it no longer admits is closed, and its name returned. `dialled` is the
    /// name this host dialled, or `None` if the peer dialled.
    pub(super) fn recheck(
        &self,
        connection: &quinn::Connection,
        dialled: Option<&str>,
    ) -> Result<(), String> {
        let chain = connection
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .unwrap_or_default();
        let host = chain
            .first()
            .and_then(vmhost_pki::host_name)
            .unwrap_or_else(|| connection.remote_address().to_string());
        let refusal = match self.verify(&chain, dialled) {
            Err(error) => format!("its certificate is no longer trusted ({error})"),
            Ok(()) if self.denied.contains(&host) => "it is denied".to_string(),
            Ok(()) => return Ok(()),
        };
        connection.close(0u32.into(), b"no longer admitted");
        self.log_once(&host, &format!("fleet connection closed: {refusal}"));
        Err(host)
    }

    fn verify(
        &self,
        chain: &[CertificateDer<'static>],
        dialled: Option<&str>,
    ) -> Result<(), rustls::Error> {
        let (end_entity, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let now = UnixTime::now();
        match dialled {
            Some(name) => {
                let name = ServerName::try_from(name.to_string())
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                (self.server)
                    .verify_server_cert(end_entity, intermediates, &name, &[], now)
                    .map(drop)
            }
            None => self
                .client
                .verify_client_cert(end_entity, intermediates, now)
                .map(drop),
        }
    }

    pub(super) fn denies(&self, host: &str) -> bool {
        self.denied.contains(host)
    }
}

/// The rustls face of a [`Trust`], on both ends of a handshake: webpki's CA check, then
/// the deny list.
#[derive(Debug)]
pub(super) struct Verifier(pub(super) Arc<Trust>);

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        self.0.client.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.client.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .0
            .client
            .verify_client_cert(end_entity, intermediates, now)?;
        self.0.admit(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.client.supported_verify_schemes()
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.0.server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.0.admit(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.server.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.server.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.server.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.0.server.root_hint_subjects()
    }
}

/// What new handshakes use.
struct Tls {
    trust: Arc<Trust>,
    client: quinn::ClientConfig,
    /// The certificate this host presents.
    certificate: CertificateDer<'static>,
}

/// The endpoint's current trust, and the connections peers opened, which a new trust
/// checks again. Its tasks share it.
#[derive(Clone)]
pub(super) struct Gate {
    tls: Arc<RwLock<Tls>>,
    accepted: Arc<Mutex<HashMap<usize, quinn::Connection>>>,
}

impl Gate {
    pub(super) fn new(trust: Arc<Trust>, client: quinn::ClientConfig, identity: &Identity) -> Gate {
        let tls = Tls {
            trust,
            client,
            certificate: identity.cert.clone(),
        };
        Gate {
            tls: Arc::new(RwLock::new(tls)),
            accepted: Default::default(),
        }
    }

    pub(super) fn trust(&self) -> Arc<Trust> {
        self.tls.read().expect("tls lock").trust.clone()
    }

    pub(super) fn client_config(&self) -> quinn::ClientConfig {
        self.tls.read().expect("tls lock").client.clone()
    }

    /// Keeps a connection a peer opened, if the trust, which may have changed during its
    /// handshake, still admits it; it is forgotten when the guard drops.
    pub(super) fn accept(&self, connection: &quinn::Connection) -> Option<Accepted> {
        let id = connection.stable_id();
        self.accepted
            .lock()
            .expect("accepted lock")
            .insert(id, connection.clone());
        let accepted = Accepted {
            gate: self.clone(),
            id,
        };
        self.trust()
            .recheck(connection, None)
            .ok()
            .map(|()| accepted)
    }
}

pub(super) struct Accepted {
    gate: Gate,
    id: usize,
}

impl Drop for Accepted {
    fn drop(&mut self) {
        let mut accepted = self.gate.accepted.lock().expect("accepted lock");
        accepted.remove(&self.id);
    }
}

impl FleetEndpoint {
    /// From now on, trusts the CAs of `identity`, presents its certificate, and refuses the
    /// hosts `denied` names, both ways. Open connections to or from a peer this no longer
    /// admits are closed, and their hosts returned. When this host's certificate changed,
    /// the connections it dialled with the old one take no new requests and close with the
    /// last stream they carry, so a peer that later stops trusting the old certificate
    /// drops nothing in use.
    pub async fn set_trust(
        &self,
        identity: &Identity,
        denied: BTreeSet<String>,
    ) -> Result<Vec<String>, QuicError> {
        let trust = Arc::new(Trust::new(identity, denied)?);
        let server = server_config(&trust, identity, &self.versions)?;
        let client = client_config(&trust, identity, &self.versions)?;
        self.endpoint.set_server_config(Some(server));
        let renewed = {
            let mut tls = self.gate.tls.write().expect("tls lock");
            let renewed = tls.certificate != identity.cert;
            *tls = Tls {
                trust: trust.clone(),
                client,
                certificate: identity.cert.clone(),
            };
            renewed
        };
        let mut closed = BTreeSet::new();
        let dialled: Vec<_> = (self.connections.lock().expect("connections lock"))
            .iter()
            .map(|((_, name), slot)| (name.clone(), slot.clone()))
            .collect();
        for (name, slot) in dialled {
            // Waits for a dial under way, which may have used the old trust.
            let mut slot = slot.lock().await;
            let Some((connection, _)) = slot.as_ref() else {
                continue;
            };
            match trust.recheck(connection, Some(&name)) {
                Err(host) => {
                    *slot = None;
                    closed.insert(host);
                }
                Ok(()) if renewed => *slot = None,
                Ok(()) => {}
            }
        }
        let accepted: Vec<_> = (self.gate.accepted.lock().expect("accepted lock"))
            .values()
            .cloned()
            .collect();
        for connection in accepted {
            closed.extend(trust.recheck(&connection, None).err());
        }
        Ok(closed.into_iter().collect())
    }

    /// Whether this endpoint refuses the host `name`.
    pub fn denies(&self, name: &str) -> bool {
        self.gate.trust().denies(name)
    }
}
