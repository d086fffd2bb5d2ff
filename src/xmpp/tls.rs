//! TLS for the client: which certificates we trust, and how a rejected one
//! is explained.
//!
//! Trust is the account's `ca_file` (if any) plus the system roots. Reading
//! and parsing the system store costs milliseconds, which matters on a
//! per-call login, so it is done at most once per process, only when
//! needed, and from the distribution's bundle file alone when there is one: with a `ca_file`, the server is first checked against that CA
//! alone, and the system roots are consulted only if it was not the issuer.
//! Without a `ca_file` the store is loaded in the background while the TCP
//! connection and the first stream round trips are under way.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use tokio_rustls::rustls::{
    self, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::WebPkiServerVerifier,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

use super::error::XmppError;

/// One ring provider for the process: building it allocates its tables.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The system roots as a verifier, loaded on first use. An error is kept
/// as text so every later handshake reports the same cause.
fn system_verifier() -> Result<Arc<WebPkiServerVerifier>, String> {
    static SYSTEM: OnceLock<Result<Arc<WebPkiServerVerifier>, String>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let (certs, error) = system_certificates();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                let why = error.map(|e| format!(": {e}")).unwrap_or_default();
                return Err(format!("no system CA certificates found{why}"));
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("system CA certificates: {e}"))
        })
        .clone()
}

/// The distribution's CA bundle files, in the order OpenSSL's probing
/// would find them.
const BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine, BSDs
];

/// The system's CA certificates.
///
/// rustls-native-certs reads the bundle file *and* every file in
/// /etc/ssl/certs: 16 ms here, against 1.4 ms for the bundle alone, which
/// the distribution generates from the same set (`update-ca-certificates`).
/// So read just the bundle when there is one, and leave everything else,
/// including an explicit `SSL_CERT_FILE`/`SSL_CERT_DIR`, to the crate.
fn system_certificates() -> (Vec<CertificateDer<'static>>, Option<String>) {
    let overridden =
        std::env::var_os("SSL_CERT_FILE").is_some() || std::env::var_os("SSL_CERT_DIR").is_some();
    if !overridden {
        for bundle in BUNDLES {
            let Ok(iter) = CertificateDer::pem_file_iter(bundle) else {
                continue;
            };
            let certs: Vec<_> = iter.filter_map(Result::ok).collect();
            if !certs.is_empty() {
                return (certs, None);
            }
        }
    }
    let loaded = rustls_native_certs::load_native_certs();
    (loaded.certs, loaded.errors.first().map(|e| e.to_string()))
}

/// Start loading the system roots on a blocking thread, so a handshake
/// that needs them later finds them ready (or waits only for the rest).
pub(crate) fn preload_system_roots() {
    tokio::task::spawn_blocking(|| {
        let _ = system_verifier();
    });
}

/// Read the PEM certificates of a `ca_file`.
fn load_ca_file(path: &Path) -> Result<RootCertStore, XmppError> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| XmppError::CaFile(format!("{shown}: {}", pem_reason(&e))))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| XmppError::CaFile(format!("{shown}: {}", pem_reason(&e))))?;
    if certs.is_empty() {
        return Err(XmppError::CaFile(format!(
            "{shown}: no CERTIFICATE block found"
        )));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| XmppError::CaFile(format!("{shown}: {e}")))?;
    }
    Ok(roots)
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => super::error::io_reason(io),
        other => format!("{other:?}"),
    }
}

/// A client config for this account: `ca_file` first, system roots after.
///
/// Built once per login; cheap apart from reading `ca_file`.
pub(crate) fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, XmppError> {
    let extra = match ca_file {
        Some(path) => {
            let roots = load_ca_file(path)?;
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| XmppError::CaFile(format!("{}: {e}", path.display())))?,
            )
        }
        None => None,
    };
    let provider = provider();
    let verifier = Arc::new(LayeredVerifier {
        extra,
        algorithms: provider.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| XmppError::Tls(e.to_string()))?
        .dangerous() // a custom verifier, but one that verifies: see below
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies against `ca_file` first, then the system roots.
///
/// Either root set is the full WebPKI verification (chain, validity,
/// name); the layering only decides which anchors to try. A path ends at
/// exactly one anchor, so "valid under ca_file or under the system roots"
/// is the same as "valid under their union".
#[derive(Debug)]
struct LayeredVerifier {
    extra: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LayeredVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(extra) = &self.extra {
            match extra.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                // Not issued by our CA: maybe by a public one.
                Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {}
                other => return other,
            }
        }
        match system_verifier() {
            Ok(system) => system.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            // With a ca_file the useful answer is still "unknown issuer".
            Err(_) if self.extra.is_some() => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            Err(why) => Err(rustls::Error::General(why)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Explain a failed handshake. tokio-rustls wraps rustls errors in
/// `io::Error`; anything else is a transport problem.
pub(crate) fn describe_handshake_error(e: &std::io::Error, domain: &str) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return super::error::io_reason(e);
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => describe_certificate_error(cert, domain),
        rustls::Error::AlertReceived(alert) => format!("server sent alert {alert:?}"),
        rustls::Error::General(s) => s.clone(),
        other => other.to_string(),
    }
}

fn describe_certificate_error(e: &CertificateError, domain: &str) -> String {
    match e {
        CertificateError::UnknownIssuer => "certificate not trusted (unknown issuer)".to_owned(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("certificate not valid for {domain} ({e})")
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("certificate expired ({e})")
        }
        CertificateError::BadSignature => "bad certificate signature".to_owned(),
        other => format!("certificate rejected ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ca_file_is_named() {
        let err = client_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ca_file: /nonexistent/ca.pem: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("popivr-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = client_config(Some(&path)).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.to_string().ends_with("no CERTIFICATE block found"),
            "{err}"
        );
    }

    #[test]
    fn unknown_issuer_reads_plainly() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(
            describe_handshake_error(&io, "example.org"),
            "certificate not trusted (unknown issuer)"
        );
    }
}
