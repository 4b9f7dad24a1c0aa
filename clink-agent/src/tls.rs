//! Fabric certificates (`clink fabric create`, `clink peer-cert create`) and the rustls
//! configurations every peer connection uses: TLS 1.3 only, mutual authentication against
//! the fabric CA, the remote peer's identity being the DNS name in its certificate.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    client::{danger::ServerCertVerifier as _, WebPkiServerVerifier},
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
    CertificateError, ClientConfig, RootCertStore, ServerConfig,
};

pub mod reload;

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
    #[error("{0}: missing (the directory must hold cert.pem, key.pem and ca.pem, as `clink peer-cert create` writes them)")]
    Missing(PathBuf),
    #[error("{path}: unreadable: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; remove it first to make a new one")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

impl TlsError {
    /// The file at fault, if one is.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Io { path, .. }
            | TlsError::Invalid { path, .. }
            | TlsError::Unreadable { path, .. }
            | TlsError::Missing(path)
            | TlsError::Exists(path) => Some(path),
            TlsError::Rcgen(_) | TlsError::Rustls(_) => None,
        }
    }
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
    let now = time::OffsetDateTime::now_utc();
    // Tolerate clock skew between the machines of a fabric.
    let valid = (
        now - time::Duration::hours(1),
        now + time::Duration::days(365 * 2),
    );
    issue_peer_cert(name, fabric, path, valid)
}

/// [`create_peer_cert`] valid from `valid.0` to `valid.1`.
fn issue_peer_cert(
    name: &str,
    fabric: &str,
    path: &Path,
    valid: (time::OffsetDateTime, time::OffsetDateTime),
) -> Result<PathBuf, TlsError> {
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
    (params.not_before, params.not_after) = valid;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    write_file(&dir.join(KEY), key.serialize_pem().as_bytes(), true)?;
    write_file(&dir.join(CERT), cert.pem().as_bytes(), false)?;
    write_file(&dir.join(CA_CERT), ca_pem.as_bytes(), false)?;
    Ok(dir)
}

/// An agent's TLS identity: its certificate and key, the fabric CA, and the two rustls
/// configurations built from them. A reload builds a new one and swaps it into
/// [`Credentials`].
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    /// What the certificate says (serial, expiry), for logs, status and the expiry metric.
    pub cert: CertInfo,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("cert", &self.cert)
            .finish()
    }
}

/// The crypto library under rustls: aws-lc-rs with the `aws-lc` feature (the default), else
/// ring (docs/performance.md, "Crypto provider", has both measured).
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as crypto_library;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as crypto_library;

/// Makes the crypto library rustls's process-wide default, for the TLS the agent does not
/// configure itself: the Kubernetes client's, which asks rustls for the default. rustls
/// cannot choose one by itself while both ring (which the Kubernetes client enables) and
/// aws-lc-rs are built in, and panics instead. Call it before making a Kubernetes client; a
/// second call keeps the first provider.
pub fn install_process_provider() {
    // An error only says that a provider is installed already.
    let _ = crypto_library::default_provider().install_default();
}

/// The crypto library's TLS 1.3 suites, AES-128-GCM first: all three are strong, and AES-128
/// (10 AES rounds, SHA-256 key schedule) costs the tunnel less per byte and per handshake
/// than AES-256-GCM-SHA384, which rustls would otherwise pick first.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use crypto_library::cipher_suite as suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..crypto_library::default_provider()
    })
}

/// The three files of a peer certificate directory (`cert.pem`, `key.pem`, `ca.pem`), read
/// at one moment. A reload compares them with the last ones it read: in Kubernetes the files
/// are symbolic links through `..data`, which the kubelet swaps whole, so only their content
/// tells that they changed.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerFiles {
    dir: PathBuf,
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for PeerFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerFiles").field("dir", &self.dir).finish()
    }
}

impl PeerFiles {
    /// Reads `<dir>/{cert.pem,key.pem,ca.pem}`, following symbolic links.
    pub fn read(dir: &Path) -> Result<PeerFiles, TlsError> {
        let read = |file: &str| {
            let path = dir.join(file);
            fs::read(&path).map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => TlsError::Missing(path),
                _ => TlsError::Unreadable { path, source },
            })
        };
        Ok(PeerFiles {
            dir: dir.to_owned(),
            cert: read(CERT)?,
            key: read(KEY)?,
            ca: read(CA_CERT)?,
        })
    }

    /// The identity these files make for peer `name`, checked: a certificate and a key in
    /// PEM, the key the certificate's, the certificate for `name`, signed by a CA of
    /// `ca.pem` and valid now. Every error names the file at fault.
    pub fn identity(&self, name: &str) -> Result<Identity, TlsError> {
        self.identity_with(name, provider())
    }

    fn identity_with(
        &self,
        name: &str,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Identity, TlsError> {
        let [cert_path, key_path, ca_path] = [CERT, KEY, CA_CERT].map(|f| self.dir.join(f));
        let invalid = |path: &Path, message: String| TlsError::Invalid {
            path: path.to_owned(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                invalid(
                    &cert_path,
                    format!("not a PEM certificate: {}", pem_error(&e)),
                )
            })?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(&cert_path, "holds no PEM certificate".into()));
        };
        let cert = CertInfo::from_der(leaf)
            .map_err(|e| invalid(&cert_path, format!("unreadable certificate: {e}")))?;
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
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                invalid(&key_path, "holds no PEM private key".into())
            }
            e => invalid(
                &key_path,
                format!("not a PEM private key: {}", pem_error(&e)),
            ),
        })?;
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| invalid(&key_path, format!("unusable private key: {e}")))?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|_| {
                invalid(
                    &key_path,
                    format!(
                        "is not the key of the certificate in {}",
                        cert_path.display()
                    ),
                )
            })?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca) {
            let ca = ca.map_err(|e| {
                invalid(
                    &ca_path,
                    format!("not a PEM certificate: {}", pem_error(&e)),
                )
            })?;
            roots
                .add(ca)
                .map_err(|e| invalid(&ca_path, format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid(&ca_path, "holds no PEM certificate".into()));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if cert.not_after <= now {
            return Err(invalid(
                &cert_path,
                format!("certificate expired on {}", cert.not_after_text()),
            ));
        }
        let roots = Arc::new(roots);
        let rustls_err = |e: rustls::Error| TlsError::Rustls(e.to_string());

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
        // Our own certificate must pass what every peer will check of it.
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| invalid(&cert_path, format!("peer name {name:?}: {e}")))?;
        server_verifier
            .verify_server_cert(leaf, &chain[1..], &server_name, &[], UnixTime::now())
            .map_err(|e| {
                let ca = ca_path.display();
                let message = match e {
                    rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer | CertificateError::BadSignature,
                    ) => format!("certificate is not signed by the fabric CA in {ca}"),
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                    ) => "certificate is not valid yet (is this host's clock right?)".to_owned(),
                    e => format!("certificate does not verify against the fabric CA in {ca}: {e}"),
                };
                invalid(&cert_path, message)
            })?;

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
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_err)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(&key_path, format!("does not match the certificate: {e}")))?;

        Ok(Identity {
            name: name.to_owned(),
            cert,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// A PEM error in words (pki-types prints the markers as byte lists).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    match e {
        Error::MissingSectionEnd { end_marker } => {
            format!(
                "no \"-----END {}-----\" line (cut short?)",
                text(end_marker)
            )
        }
        Error::IllegalSectionStart { line } => format!("malformed line {:?}", text(line)),
        e => e.to_string(),
    }
}

impl Identity {
    /// Loads `<dir>/{cert.pem,key.pem,ca.pem}`; the certificate's DNS name must be `name`
    /// (see [`PeerFiles::identity`] for what else is checked).
    pub fn load(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        PeerFiles::read(dir)?.identity(name)
    }

    /// [`Identity::load`] with the cipher suites of `provider` (tests pin one suite).
    #[cfg(test)]
    pub(crate) fn load_with(
        dir: &Path,
        name: &str,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Identity, TlsError> {
        PeerFiles::read(dir)?.identity_with(name, provider)
    }

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
            cert: self.cert.clone(),
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }
}

/// What an operator compares of a certificate: its DNS name, serial and expiry.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// The first DNS name (a peer certificate has one: the peer's name).
    pub dns_name: String,
    /// Upper-case hex without separators, as `openssl x509 -noout -serial` prints it.
    pub serial: String,
    /// notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// How long before its certificate expires the agent starts warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

impl CertInfo {
    pub fn from_der(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let raw = parsed.tbs_certificate.raw_serial();
        let digits = raw.iter().skip_while(|b| **b == 0).collect::<Vec<_>>();
        let serial = if digits.is_empty() {
            "00".to_owned()
        } else {
            digits.iter().map(|b| format!("{b:02X}")).collect()
        };
        Ok(CertInfo {
            dns_name: dns_names(der).into_iter().next().unwrap_or_default(),
            serial,
            not_after: parsed.validity().not_after.timestamp(),
        })
    }

    /// The first certificate of a PEM file's content.
    pub fn from_pem(pem: &[u8]) -> Result<CertInfo, String> {
        let der = CertificateDer::from_pem_slice(pem).map_err(|e| e.to_string())?;
        Self::from_der(&der)
    }

    /// Seconds from `now` (Unix seconds) until notAfter; negative once expired.
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.not_after - now
    }

    /// notAfter as RFC 3339 (UTC).
    pub fn not_after_text(&self) -> String {
        time::OffsetDateTime::from_unix_timestamp(self.not_after)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.not_after.to_string())
    }

    /// Where the certificate stands at `now` (Unix seconds).
    pub fn expiry(&self, now: i64) -> Expiry {
        let left = self.seconds_left(now);
        if left <= 0 {
            Expiry::Expired
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            Expiry::Soon
        } else {
            Expiry::Valid
        }
    }

    /// The warning to log at `now`, if the certificate expires within [`EXPIRY_WARNING`] or
    /// has expired.
    pub fn expiry_warning(&self, now: i64) -> Option<String> {
        let left = self.seconds_left(now);
        match self.expiry(now) {
            Expiry::Valid => None,
            Expiry::Soon => Some(format!(
                "the peer certificate (serial {}) expires in {} days, on {}: issue a new one \
                 (`clink peer-cert create`) and replace the files; the agent reloads them",
                self.serial,
                left / 86_400,
                self.not_after_text()
            )),
            Expiry::Expired => Some(format!(
                "the peer certificate (serial {}) expired on {}: peers refuse this agent until \
                 its files hold a valid one (`clink peer-cert create`)",
                self.serial,
                self.not_after_text()
            )),
        }
    }
}

impl std::fmt::Display for CertInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} serial {} valid until {}",
            self.dns_name,
            self.serial,
            self.not_after_text()
        )
    }
}

/// Where a certificate stands against its expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Valid,
    /// Within [`EXPIRY_WARNING`] of notAfter.
    Soon,
    Expired,
}

/// The identity new connections use, swapped whole by a reload ([`reload`]). Connections
/// take the configuration they need once, at their start, with one `Arc` clone; a connection
/// keeps the configuration it started with, so a reload never touches an open one.
pub struct Credentials {
    current: RwLock<Current>,
    /// The kTLS data path runs: every identity stored is made [`Identity::for_ktls`].
    ktls: bool,
}

struct Current {
    identity: Identity,
    /// Counts the identities stored: the connection pool drops connections of older ones.
    generation: u64,
}

impl Credentials {
    pub fn new(identity: Identity, ktls: bool) -> Credentials {
        let identity = if ktls { identity.for_ktls() } else { identity };
        Credentials {
            current: RwLock::new(Current {
                identity,
                generation: 0,
            }),
            ktls,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The gateway's configuration for a new peer connection.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.read().identity.server.clone()
    }

    /// The configuration for a new connection to a peer, and the generation it belongs to.
    pub fn client(&self) -> (Arc<ClientConfig>, u64) {
        let current = self.read();
        (current.identity.client.clone(), current.generation)
    }

    /// The generation of the identity new connections use.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// The certificate new connections present.
    pub fn cert(&self) -> CertInfo {
        self.read().identity.cert.clone()
    }

    /// Makes `identity` the one new connections use.
    pub fn replace(&self, identity: Identity) {
        let identity = if self.ktls {
            identity.for_ktls()
        } else {
            identity
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.generation += 1;
        current.identity = identity;
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

    /// Fabric `f` in `dir` with peer `peer-a`; `dir/other` holds fabric `g` with a `peer-a`
    /// of its own.
    fn fabric(dir: &Path) {
        create_fabric("f", dir).unwrap();
        create_peer_cert("peer-a", "f", dir).unwrap();
        create_fabric("g", &dir.join("other")).unwrap();
        create_peer_cert("peer-a", "g", &dir.join("other")).unwrap();
    }

    /// Loads `peer-a` from `dir` after `spoil` changed its files; the error's text.
    fn load_error(spoil: impl FnOnce(&Path)) -> (String, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        fabric(root.path());
        let dir = root.path().join("peer-a");
        spoil(&dir);
        let err = Identity::load(&dir, "peer-a").unwrap_err();
        (err.to_string(), dir)
    }

    #[test]
    fn every_load_error_names_the_file_and_the_fault() {
        for file in [CERT, KEY, CA_CERT] {
            let (err, dir) = load_error(|d| fs::remove_file(d.join(file)).unwrap());
            let expected = format!("{}: missing", dir.join(file).display());
            assert!(err.starts_with(&expected), "{err}");
        }
        let (err, dir) = load_error(|d| {
            fs::remove_file(d.join(KEY)).unwrap();
            fs::create_dir(d.join(KEY)).unwrap();
        });
        let expected = format!("{}: unreadable", dir.join(KEY).display());
        assert!(err.starts_with(&expected), "{err}");

        /// What is done to the files, which file the error must name, and the fault.
        type Case<'a> = (&'a str, &'a dyn Fn(&Path), &'a str, &'a str);
        let cases: [Case; 8] = [
            (
                "a half-written certificate",
                &|d| fs::write(d.join(CERT), "-----BEGIN CERTIFICATE-----\nMIIB").unwrap(),
                CERT,
                "not a PEM certificate: no \"-----END CERTIFICATE-----\" line (cut short?)",
            ),
            (
                "an empty key",
                &|d| fs::write(d.join(KEY), "").unwrap(),
                KEY,
                "holds no PEM private key",
            ),
            (
                "a garbage key",
                &|d| {
                    let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
                    fs::write(d.join(KEY), garbage).unwrap()
                },
                KEY,
                "unusable private key",
            ),
            (
                "another certificate's key",
                &|d| {
                    fs::copy(d.join("../other/peer-a").join(KEY), d.join(KEY)).unwrap();
                },
                KEY,
                "is not the key of the certificate in",
            ),
            (
                "another fabric's CA",
                &|d| {
                    fs::copy(d.join("../other/g").join(CA_CERT), d.join(CA_CERT)).unwrap();
                },
                CERT,
                "certificate is not signed by the fabric CA in",
            ),
            (
                "a CA file without a certificate",
                &|d| fs::write(d.join(CA_CERT), "not a certificate\n").unwrap(),
                CA_CERT,
                "holds no PEM certificate",
            ),
            (
                "an expired certificate",
                &|d| reissue(d, -30, -1),
                CERT,
                "certificate expired on",
            ),
            (
                "a certificate not valid yet",
                &|d| reissue(d, 1, 30),
                CERT,
                "certificate is not valid yet",
            ),
        ];
        for (case, spoil, file, fault) in cases {
            let (err, dir) = load_error(spoil);
            let expected = format!("{}: ", dir.join(file).display());
            assert!(err.starts_with(&expected), "{case}: {err}");
            assert!(err.contains(fault), "{case}: {err}");
        }
    }

    /// Replaces `<dir>`'s certificate and key (peer `peer-a` of fabric `f`, `dir/../f`) with
    /// ones valid from `from` to `to` days from now.
    fn reissue(dir: &Path, from: i64, to: i64) {
        let root = dir.parent().unwrap();
        let staging = root.join("staging");
        fs::create_dir_all(&staging).unwrap();
        std::os::unix::fs::symlink(root.join("f"), staging.join("f")).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let valid = (
            now + time::Duration::days(from),
            now + time::Duration::days(to),
        );
        let new = issue_peer_cert("peer-a", "f", &staging, valid).unwrap();
        for file in [CERT, KEY] {
            fs::rename(new.join(file), dir.join(file)).unwrap();
        }
    }

    #[test]
    fn a_certificate_expiring_within_30_days_loads_with_a_warning() {
        let root = tempfile::tempdir().unwrap();
        fabric(root.path());
        let dir = root.path().join("peer-a");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let id = Identity::load(&dir, "peer-a").unwrap();
        assert_eq!(id.cert.expiry(now), Expiry::Valid);
        assert_eq!(id.cert.expiry_warning(now), None);

        reissue(&dir, -1, 10);
        let id = Identity::load(&dir, "peer-a").unwrap();
        assert_eq!(id.cert.dns_name, "peer-a");
        assert_eq!(id.cert.expiry(now), Expiry::Soon);
        let warning = id.cert.expiry_warning(now).unwrap();
        // 10 days less the moments between issuing and now, counted in whole days.
        assert!(
            warning.contains("expires in 9 days") || warning.contains("expires in 10 days"),
            "{warning}"
        );
        assert!(warning.contains(&id.cert.serial), "{warning}");
    }

    #[test]
    fn expiry_warnings() {
        let cert = CertInfo {
            dns_name: "peer-a".into(),
            serial: "0A1B".into(),
            not_after: 1_800_000_000,
        };
        assert_eq!(cert.not_after_text(), "2027-01-15T08:00:00Z");
        let day = 86_400;
        let at = |days_before: i64| cert.not_after - days_before * day;
        assert_eq!(cert.expiry(at(31)), Expiry::Valid);
        assert_eq!(cert.expiry_warning(at(31)), None);
        assert_eq!(cert.expiry(at(29)), Expiry::Soon);
        let soon = cert.expiry_warning(at(29)).unwrap();
        assert!(
            soon.contains("expires in 29 days, on 2027-01-15T08:00:00Z"),
            "{soon}"
        );
        assert_eq!(cert.expiry(cert.not_after), Expiry::Expired);
        assert_eq!(cert.seconds_left(cert.not_after + 5), -5);
        let expired = cert.expiry_warning(cert.not_after + 5).unwrap();
        assert!(
            expired.contains("serial 0A1B) expired on 2027-01-15"),
            "{expired}"
        );
    }

    #[test]
    fn serials_read_as_openssl_prints_them() {
        let dir = tempfile::tempdir().unwrap();
        create_fabric("f", dir.path()).unwrap();
        create_peer_cert("peer-a", "f", dir.path()).unwrap();
        let pem = fs::read(dir.path().join("peer-a").join(CERT)).unwrap();
        let info = CertInfo::from_pem(&pem).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        // openssl prints whole bytes: a serial whose first byte is below 0x10 keeps its 0.
        let mut expected = parsed.serial.to_str_radix(16).to_uppercase();
        if expected.len() % 2 == 1 {
            expected.insert(0, '0');
        }
        assert_eq!(info.serial, expected);
        assert!(!info.serial.starts_with("00") || info.serial == "00");
        assert_eq!(info.dns_name, "peer-a");
    }

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
