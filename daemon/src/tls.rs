//! TLS client configurations (rustls with the ring provider): one that verifies certificates
//! against Mozilla's roots, the system's and mihomo's `tls.custom-certifactes`, and one for
//! `skip-cert-verify: true` that does not.

use std::sync::{Arc, OnceLock};

use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trusted roots: Mozilla's, the system's (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured) and
/// mihomo's `tls.custom-certifactes`.
static VERIFYING: std::sync::RwLock<Option<Arc<ClientConfig>>> = std::sync::RwLock::new(None);

/// Why a custom certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tls.custom-certifactes[{0}]: no PEM certificate in it (nor a file holding one)")]
    NoCertificate(usize),
    #[error("tls.custom-certifactes[{0}]: {1}")]
    Rejected(usize, rustls::Error),
}

fn build(custom: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    for cert in custom {
        roots.add(cert.clone())?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|e| unreachable!("ring supports the default versions: {e}"));
    Ok(Arc::new(config))
}

/// Reads `certificates` (PEM text, or the path of a PEM file, as mihomo's
/// `tls.custom-certifactes` gives them), refusing any that is not a usable root.
pub fn parse(certificates: &[String]) -> Result<Vec<CertificateDer<'static>>, Error> {
    use rustls::pki_types::pem::PemObject;
    let mut custom = Vec::new();
    for (i, c) in certificates.iter().enumerate() {
        let text = if c.contains("-----BEGIN") {
            c.clone()
        } else {
            std::fs::read_to_string(c).map_err(|_| Error::NoCertificate(i))?
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(Error::NoCertificate(i));
        }
        for cert in certs {
            rustls::RootCertStore::empty()
                .add(cert.clone())
                .map_err(|e| Error::Rejected(i, e))?;
            custom.push(cert);
        }
    }
    Ok(custom)
}

/// Trusts `certificates` ([`parse`]) on top of the public and system roots, from now on.
pub fn trust(certificates: &[String]) -> Result<(), Error> {
    let custom = parse(certificates)?;
    let config = build(&custom).map_err(|e| Error::Rejected(0, e))?;
    *VERIFYING.write().unwrap_or_else(|p| p.into_inner()) = Some(config);
    Ok(())
}

/// The verifying configuration (public and system roots until [`trust`] adds more).
pub fn verifying() -> Arc<ClientConfig> {
    if let Some(c) = VERIFYING.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return c.clone();
    }
    let mut slot = VERIFYING.write().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(|| {
        build(&[]).unwrap_or_else(|e| unreachable!("no custom roots to refuse: {e}"))
    })
    .clone()
}

/// The configuration for `skip-cert-verify: true`: any certificate is accepted (signatures
/// are still checked, so the handshake itself is sound).
pub fn unverified() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
                        .with_no_client_auth()
                })
                .unwrap_or_else(|e| unreachable!("ring supports the default versions: {e}"));
            Arc::new(config)
        })
        .clone()
}

/// The TLS connector for `skip_verify`.
pub fn connector(skip_verify: bool) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(if skip_verify {
        unverified()
    } else {
        verifying()
    })
}

/// The server name to send: a name, or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, std::io::Error> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
