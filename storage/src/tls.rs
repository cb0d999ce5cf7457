//! TLS and credentials to the backends, shared by the CQL store, Redis presence and the
//! Kafka log's flags: one way to trust a server (a CA file, or the system's roots) and one
//! way to read a secret (inline, or from a file as a mounted secret gives it).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// A TLS client configuration that trusts the certificates in `ca_file` (PEM), or the
/// system's roots when there is none. `backend` names the server in errors.
pub fn client_config(backend: &str, ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("{backend}: CA file {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| format!("{backend}: CA file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{backend}: CA file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "{backend}: CA file {} holds no PEM `CERTIFICATE`",
                    path.display()
                ));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(format!(
                    "{backend}: TLS is on but the system has no CA certificates: give a CA file"
                ));
            }
        }
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{backend}: TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A username and password for a backend; `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"…")
            .finish()
    }
}

/// A secret given inline or as a file (its content, without a trailing newline); `flag`
/// names both ways in errors. `None` when neither is given.
pub fn secret(
    inline: Option<&str>,
    file: Option<&Path>,
    flag: &str,
) -> Result<Option<String>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!("give {flag} or {flag}-file, not both")),
        (Some(secret), None) => Ok(Some(secret.to_owned())),
        (None, Some(path)) => {
            let secret = std::fs::read_to_string(path)
                .map_err(|e| format!("{flag}-file {}: {e}", path.display()))?;
            Ok(Some(secret.trim_end_matches(['\n', '\r']).to_owned()))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_inline_or_from_a_file_without_its_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(
            secret(None, Some(&path), "--redis-password"),
            Ok(Some("s3cret".into()))
        );
        assert_eq!(
            secret(Some("inline"), None, "--redis-password"),
            Ok(Some("inline".into()))
        );
        assert_eq!(secret(None, None, "--redis-password"), Ok(None));
        let both = secret(Some("a"), Some(&path), "--redis-password").expect_err("both");
        assert!(both.contains("--redis-password-file"), "{both}");
        let missing =
            secret(None, Some(&dir.path().join("nope")), "--kafka-password").expect_err("missing");
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").expect("write");
        let error = client_config("redis", Some(&path)).expect_err("empty");
        assert!(
            error.starts_with("redis: ") && error.contains("ca.pem"),
            "{error}"
        );
    }
}
