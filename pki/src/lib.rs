//! The fleet's certificates, made with rcgen: one fleet CA, and per host a certificate for
//! its name and address, signed by the CA, used both to serve and to dial (mutual TLS).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::Path;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const HOST_CERT: &str = "host.pem";
pub const HOST_KEY: &str = "host.key";
/// More CAs a host trusts besides `ca.pem`, one file each (`ca-<anything>.pem`): during a CA
/// roll a host trusts the old CA and the new one at once.
pub const EXTRA_CA_PREFIX: &str = "ca-";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0} already exists; refusing to overwrite a fleet key")]
    Exists(String),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("cannot read {path}: {message}")]
    Pem { path: String, message: String },
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        action: "write",
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.display().to_string()),
            _ => io(e),
        })?;
    file.write_all(contents.as_bytes()).map_err(io)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.display().to_string(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        action: "create",
        path: dir.display().to_string(),
        source,
    })
}

/// Creates the fleet CA in `dir` (its key readable by root only).
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
    create_dir(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "vmhost fleet CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    write(&dir.join(CA_CERT), &cert.pem(), 0o644)
}

/// Issues a host certificate for `host` at `addr`, signed by the CA in `ca_dir`, into
/// `out_dir` (with a copy of the CA certificate, which is all a host needs to verify peers).
pub fn issue_cert(ca_dir: &Path, host: &str, addr: IpAddr, out_dir: &Path) -> Result<(), PkiError> {
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join(CA_KEY))?)?;
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut params = CertificateParams::new(vec![host.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, host);
    params.subject_alt_names.push(SanType::IpAddress(addr));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out_dir)?;
    write(&out_dir.join(HOST_KEY), &key.serialize_pem(), 0o600)?;
    write(&out_dir.join(HOST_CERT), &cert.pem(), 0o644)?;
    write(&out_dir.join(CA_CERT), &ca_pem, 0o644)
}

/// A CA in `dir/ca` and, for each of `hosts`, credentials it issued in `dir/<host>`, all at
/// `addr`: a fleet on one machine, for tests and benchmarks.
pub fn one_machine_fleet(
    dir: &Path,
    hosts: &[&str],
    addr: IpAddr,
) -> Result<Vec<Identity>, PkiError> {
    init_ca(&dir.join("ca"))?;
    hosts
        .iter()
        .map(|host| {
            issue_cert(&dir.join("ca"), host, addr, &dir.join(host))?;
            Identity::load(&dir.join(host))
        })
        .collect()
}

/// A host's credentials, loaded from an `issue_cert` directory.
#[derive(Debug)]
pub struct Identity {
    pub ca: CertificateDer<'static>,
    /// The CAs of the `ca-*.pem` files, by file name.
    pub extra_cas: Vec<CertificateDer<'static>>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Identity, PkiError> {
        let pem_error = |path: &Path, message: String| PkiError::Pem {
            path: path.display().to_string(),
            message,
        };
        let ca = |path: &Path| {
            let cert =
                CertificateDer::from_pem_file(path).map_err(|e| pem_error(path, e.to_string()))?;
            match is_ca(&cert) {
                true => Ok(cert),
                false => Err(pem_error(path, "not a CA certificate".into())),
            }
        };
        let mut extra_paths = extra_ca_files(dir)?;
        extra_paths.sort();
        Ok(Identity {
            ca: ca(&dir.join(CA_CERT))?,
            extra_cas: extra_paths
                .iter()
                .map(|p| ca(p))
                .collect::<Result<_, _>>()?,
            cert: CertificateDer::from_pem_file(dir.join(HOST_CERT))
                .map_err(|e| pem_error(&dir.join(HOST_CERT), e.to_string()))?,
            key: PrivateKeyDer::from_pem_file(dir.join(HOST_KEY))
                .map_err(|e| pem_error(&dir.join(HOST_KEY), e.to_string()))?,
        })
    }

    /// Every CA whose certificates this host accepts from peers.
    pub fn trusted_cas(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        std::iter::once(&self.ca).chain(&self.extra_cas)
    }
}

fn extra_ca_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, PkiError> {
    let io = |source| PkiError::Io {
        action: "list",
        path: dir.display().to_string(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(EXTRA_CA_PREFIX) && name.ends_with(".pem") {
            paths.push(path);
        }
    }
    Ok(paths)
}

fn is_ca(cert: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(cert).is_ok_and(|(_, cert)| cert.is_ca())
}

/// The host a certificate names: its first DNS subject alternative name, else its common
/// name. `None` if it does not parse or names no host.
pub fn host_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let dns = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
        });
    dns.or_else(|| {
        let common_name = cert.subject().iter_common_name().next()?;
        common_name.as_str().ok().map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_certificate_names_its_host() {
        let dir = tempfile::tempdir().unwrap();
        let ids = one_machine_fleet(dir.path(), &["host-a"], IpAddr::from([127, 0, 0, 1])).unwrap();
        assert_eq!(host_name(&ids[0].cert).as_deref(), Some("host-a"));
        assert_eq!(host_name(&ids[0].ca), Some("vmhost fleet CA".to_string()));
        assert_eq!(host_name(&CertificateDer::from_slice(&[1, 2, 3])), None);
    }

    #[test]
    fn extra_cas_are_trusted_and_must_be_cas() {
        let dir = tempfile::tempdir().unwrap();
        let addr = IpAddr::from([127, 0, 0, 1]);
        let ids = one_machine_fleet(dir.path(), &["host-a"], addr).unwrap();
        assert!(ids[0].extra_cas.is_empty());
        init_ca(&dir.path().join("next")).unwrap();
        let credentials = dir.path().join("host-a");
        let next = dir.path().join("next").join(CA_CERT);
        std::fs::copy(&next, credentials.join("ca-next.pem")).unwrap();
        let id = Identity::load(&credentials).unwrap();
        let next = CertificateDer::from_pem_file(next).unwrap();
        assert_eq!(id.trusted_cas().collect::<Vec<_>>(), [&id.ca, &next]);

        std::fs::write(credentials.join("ca-broken.pem"), "no certificate").unwrap();
        let error = Identity::load(&credentials).unwrap_err().to_string();
        assert!(error.contains("ca-broken.pem"), "{error}");
        std::fs::copy(
            credentials.join(HOST_CERT),
            credentials.join("ca-broken.pem"),
        )
        .unwrap();
        let error = Identity::load(&credentials).unwrap_err().to_string();
        assert!(
            error.contains("ca-broken.pem: not a CA certificate"),
            "{error}"
        );
    }
}
