//! Serving certificates (the webhook's, the gRPC service's), read from `tls.crt`/`tls.key` in a
//! directory and reloaded when the files change (polled; each new TLS handshake uses the
//! certificate in force), and the writing of such directories.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificate file name in the directory.
pub const CERT_FILE: &str = "tls.crt";
/// The key file name in the directory.
pub const KEY_FILE: &str = "tls.key";
/// The CA file name: in the gRPC service's directory, the CA of client certificates.
pub const CA_FILE: &str = "ca.crt";

/// The crypto provider used for serving and for issuing checks.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate directory and the key pair last loaded from it.
#[derive(Debug)]
pub struct CertFiles {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// The file contents behind `current` (or last rejected), to notice changes.
    seen: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

impl CertFiles {
    /// Watches `dir`; nothing is loaded yet (see [`CertFiles::reload`]).
    pub fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            dir: dir.to_path_buf(),
            provider: provider(),
            current: RwLock::new(None),
            seen: Mutex::new(None),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True once a certificate has been loaded.
    pub fn loaded(&self) -> bool {
        self.current.read().expect("cert lock").is_some()
    }

    /// Reads both files; when they differ from the last read, parses them and, if they hold a
    /// matching certificate chain and key, puts them in force. `Ok(true)`: a new certificate is
    /// in force; `Ok(false)`: unchanged. On error the previous certificate stays in force.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let cert_path = self.dir.join(CERT_FILE);
        let key_path = self.dir.join(KEY_FILE);
        let cert = std::fs::read(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key =
            std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        {
            let mut seen = self.seen.lock().expect("seen lock");
            if seen.as_ref() == Some(&(cert.clone(), key.clone())) {
                return Ok(false);
            }
            *seen = Some((cert.clone(), key.clone()));
        }
        let certified = parse(&cert, &key, &self.provider)?;
        *self.current.write().expect("cert lock") = Some(Arc::new(certified));
        Ok(true)
    }

    /// Polls the files every `interval` until the process ends, logging each change.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut last_error = String::new();
        loop {
            match self.reload() {
                Ok(true) => {
                    tracing::info!(dir = %self.dir.display(), "serving certificate loaded");
                    last_error.clear();
                }
                Ok(false) => {}
                Err(error) => {
                    let text = format!("{error:#}");
                    if text != last_error {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            error = %text,
                            "serving certificate not (re)loaded; the previous one stays in force"
                        );
                        last_error = text;
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// A rustls server configuration resolving to the certificate in force (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl CertFiles {
    /// A rustls server configuration for gRPC (HTTP/2) resolving to the certificate in force,
    /// verifying client certificates against `client_ca_pem` when a client presents one. A
    /// client without a certificate is let through the handshake so that it can present a
    /// bearer token instead, or be told in one line what it lacks ([`crate::auth`]).
    pub fn grpc_server_config(
        self: &Arc<Self>,
        client_ca_pem: &[u8],
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(client_ca_pem) {
            roots
                .add(cert.context("parsing the client CA PEM")?)
                .context("adding the client CA")?;
        }
        anyhow::ensure!(!roots.is_empty(), "no certificate in the client CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn write_atomically(dir: &Path, file: &str, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = dir.join(format!(".{file}.tmp"));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    out.write_all(contents.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&tmp, dir.join(file))
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

/// Writes a leaf certificate and its key into `dir` (key first, each by rename; the reloader
/// accepts only a matching pair, so a half-written update is never served), and the CA that
/// issued it when given.
pub fn write_pair(
    dir: &Path,
    leaf: &crate::certs::Serving,
    ca_pem: Option<&str>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(ca_pem) = ca_pem {
        write_atomically(dir, CA_FILE, ca_pem, 0o644)?;
    }
    write_atomically(dir, KEY_FILE, &leaf.key_pem, 0o600)?;
    write_atomically(dir, CERT_FILE, &leaf.cert_pem, 0o644)?;
    Ok(())
}

/// Writes a CA (certificate and key) into `dir`.
pub fn write_ca(dir: &Path, ca: &crate::certs::Ca) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomically(dir, "ca.key", &ca.key_pem, 0o600)?;
    write_atomically(dir, CA_FILE, &ca.cert_pem, 0o644)?;
    Ok(())
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("cert lock").clone()
    }
}

/// A PEM certificate chain (leaf first) and PEM private key as a checked key pair.
pub fn parse(cert: &[u8], key: &[u8], provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the certificate PEM")?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {CERT_FILE}");
    let key = PrivateKeyDer::from_pem_slice(key).context("parsing the private key PEM")?;
    CertifiedKey::from_der(chain, key, provider)
        .context("the certificate and the key do not form a usable pair")
}
