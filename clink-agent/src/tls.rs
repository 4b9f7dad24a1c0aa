//! Fabric certificates (`clink fabric create`, `clink peer-cert create`) and the rustls
//! configurations every peer connection uses: TLS 1.3 only, mutual authentication against
//! the fabric CA, the remote peer's identity being the DNS name in its certificate.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    client::WebPkiServerVerifier,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0} already exists; remove it first to make a new one")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `data` to `path` atomically, readable by the owner only when `secret`.
fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn validity(params: &mut CertificateParams, years: i64) {
    let now = time::OffsetDateTime::now_utc();
    // Tolerate clock skew between the machines of a fabric.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365 * years);
}

fn make_dir(dir: &Path, files: &[&str]) -> Result<(), TlsError> {
    for f in files {
        let p = dir.join(f);
        if p.exists() {
            return Err(TlsError::Exists(p));
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Creates the fabric certificate authority in `<path>/<name>/` (ca.pem, ca.key).
pub fn create_fabric(name: &str, path: &Path) -> Result<PathBuf, TlsError> {
    let dir = path.join(name);
    make_dir(&dir, &[CA_CERT, CA_KEY])?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "ClusterLink fabric");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, 10);
    let cert = params.self_signed(&key)?;
    write_file(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), true)?;
    write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), false)?;
    Ok(dir)
}

/// Creates peer `name`'s certificate, signed by fabric `fabric`, in `<path>/<name>/`
/// (cert.pem, key.pem and a copy of the fabric's ca.pem). The certificate's DNS name is the
/// peer name; it serves as both TLS server and client.
pub fn create_peer_cert(name: &str, fabric: &str, path: &Path) -> Result<PathBuf, TlsError> {
    let fabric_dir = path.join(fabric);
    let ca_pem_path = fabric_dir.join(CA_CERT);
    let ca_key_path = fabric_dir.join(CA_KEY);
    let ca_pem = fs::read_to_string(&ca_pem_path).map_err(io_err(&ca_pem_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Invalid {
        path: ca_key_path.clone(),
        message: e.to_string(),
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|e| TlsError::Invalid {
            path: ca_pem_path.clone(),
            message: e.to_string(),
        })?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let dir = path.join(name);
    make_dir(&dir, &[CERT, KEY])?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 2);
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    write_file(&dir.join(KEY), key.serialize_pem().as_bytes(), true)?;
    write_file(&dir.join(CERT), cert.pem().as_bytes(), false)?;
    write_file(&dir.join(CA_CERT), ca_pem.as_bytes(), false)?;
    Ok(dir)
}

/// An agent's TLS identity: its certificate and key, the fabric CA, and the two rustls
/// configurations built from them once at start-up.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish()
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first: all three are strong, and AES-128 (10 AES
/// rounds, SHA-256 key schedule) costs the tunnel less per byte and per handshake than
/// AES-256-GCM-SHA384, which rustls would otherwise pick first.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

impl Identity {
    /// Loads `<dir>/{cert.pem,key.pem,ca.pem}`; the certificate's DNS name must be `name`.
    pub fn load(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        Self::load_with(dir, name, provider())
    }

    /// [`Identity::load`] with the cipher suites of `provider` (tests pin one suite).
    pub(crate) fn load_with(
        dir: &Path,
        name: &str,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Identity, TlsError> {
        let read = |file: &str| {
            let p = dir.join(file);
            fs::read(&p).map_err(io_err(&p)).map(|data| (p, data))
        };
        let (cert_path, cert_pem) = read(CERT)?;
        let (key_path, key_pem) = read(KEY)?;
        let (ca_path, ca_pem) = read(CA_CERT)?;
        let invalid = |path: &Path, message: String| TlsError::Invalid {
            path: path.to_owned(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(&cert_path, format!("not a PEM certificate: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(&cert_path, "holds no certificate".into()));
        };
        let names = dns_names(leaf);
        if !names.iter().any(|n| n == name) {
            return Err(invalid(
                &cert_path,
                format!(
                    "certificate is for {names:?}, not for peer {name:?} (the --name must be the \
                     certificate's DNS name)"
                ),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&ca_pem) {
            let ca = ca.map_err(|e| invalid(&ca_path, format!("not a PEM certificate: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| invalid(&ca_path, format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid(&ca_path, "holds no certificate".into()));
        }
        let roots = Arc::new(roots);
        let rustls_err = |e: rustls::Error| TlsError::Rustls(e.to_string());

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_err)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid(&key_path, format!("does not match the certificate: {e}")))?;

        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_err)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(&key_path, format!("does not match the certificate: {e}")))?;

        Ok(Identity {
            name: name.to_owned(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

impl Identity {
    /// The configurations for the kTLS data path: rustls may hand its traffic secrets to
    /// the kernel, and the gateway sends no TLS 1.3 session tickets, so no handshake record
    /// follows the hand-off (`kernel::ktls`). Importers then do full handshakes (no
    /// resumption); the connection pool keeps them off the connection's critical path.
    pub fn for_ktls(&self) -> Identity {
        let mut server = (*self.server).clone();
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        let mut client = (*self.client).clone();
        client.enable_secret_extraction = true;
        Identity {
            name: self.name.clone(),
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }
}

/// The DNS subject alternative names of a DER certificate.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|gn| match gn {
            x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fabric_and_peer_certificates() {
        let dir = tempfile::tempdir().unwrap();
        create_fabric("f1", dir.path()).unwrap();
        create_peer_cert("peer-a", "f1", dir.path()).unwrap();
        let id = Identity::load(&dir.path().join("peer-a"), "peer-a").unwrap();
        assert_eq!(id.name, "peer-a");
        let mode = fs::metadata(dir.path().join("peer-a/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = fs::read(dir.path().join("peer-a/cert.pem")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(dns_names(&der), ["peer-a"]);

        let err = Identity::load(&dir.path().join("peer-a"), "peer-b").unwrap_err();
        assert!(err.to_string().contains("not for peer \"peer-b\""), "{err}");
        let err = create_fabric("f1", dir.path()).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        let err = create_peer_cert("peer-b", "nope", dir.path()).unwrap_err();
        assert!(err.to_string().contains("nope/ca.pem"), "{err}");
        let err = Identity::load(&dir.path().join("missing"), "x").unwrap_err();
        assert!(err.to_string().contains("missing/cert.pem"), "{err}");
    }
}
