//! TLS for the client port (`wss://`) and, optionally, the admin port: rustls with the
//! certificate chain and private key read from PEM files, and read again on SIGHUP or
//! when either file changes, without dropping a connection. A reload that fails (a file
//! half written, a key that does not match) keeps the certificate in use and says so in
//! the log and in `gateway_tls_reloads_total{result="failed"}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_rustls::rustls::crypto::{aws_lc_rs, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The certificate in use, swapped whole on a reload; handshakes read it.
#[derive(Debug)]
struct Current {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    key_in_use: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = match self.key_in_use.read() {
            Ok(key) => key,
            Err(poisoned) => poisoned.into_inner(),
        };
        Some(key.clone())
    }
}

impl Current {
    fn reload(&self) -> Result<(), String> {
        let loaded = load(&self.cert, &self.key, &self.provider)?;
        let mut key = match self.key_in_use.write() {
            Ok(key) => key,
            Err(poisoned) => poisoned.into_inner(),
        };
        *key = Arc::new(loaded);
        Ok(())
    }
}

/// TLS on a port: the acceptor its connections go through.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.current.cert)
            .field("key", &self.current.key)
            .finish()
    }
}

impl Tls {
    /// Reads the certificate chain and key; an error names the file and what is wrong.
    pub fn new(cert: &Path, key: &Path) -> Result<Tls, String> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let loaded = load(cert, key, &provider)?;
        let current = Arc::new(Current {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider: provider.clone(),
            key_in_use: RwLock::new(Arc::new(loaded)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // The WebSocket upgrade is an HTTP/1.1 request.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again on SIGHUP, and when either file's modification time changes
    /// (checked every `poll`; zero: only on SIGHUP), until `stop`.
    pub fn reload_on_change(&self, poll: Duration, stop: CancellationToken) -> std::io::Result<()> {
        let current = self.current.clone();
        let files = vec![current.cert.clone(), current.key.clone()];
        storage::watch::on_change(files, poll, stop, move |why| match current.reload() {
            Ok(()) => {
                metrics::counter!("gateway_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(cert = %current.cert.display(), why, "TLS certificate reloaded");
            }
            Err(e) => {
                metrics::counter!("gateway_tls_reloads_total", "result" => "failed").increment(1);
                tracing::error!(error = %e, why, "TLS certificate not reloaded: the one in use stays");
            }
        })
    }
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|e| format!("TLS file {}: {e}", path.display()));
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {}: no PEM `CERTIFICATE` in it",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        format!(
            "TLS key {} does not suit certificate {}: {e}",
            key.display(),
            cert.display()
        )
    })
}
