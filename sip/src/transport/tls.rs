//! rustls configurations for SIP over TLS (RFC 3261 §26.2, RFC 5630 §3.1).
//!
//! Every configuration uses the ring provider (never the process default: two
//! providers compiled in make `builder()` panic), TLS 1.2 and 1.3 only, and
//! AEAD cipher suites only: the TLS 1.2 suites are filtered to ECDHE with
//! AES-GCM or ChaCha20-Poly1305; every TLS 1.3 suite is AEAD. Certificates and
//! keys come as PEM and are read with `rustls-pki-types`.
//!
//! | helper | use |
//! |---|---|
//! | [`server_config`] | listener certificate; with a client CA, clients must present a certificate it signed (mutual TLS) |
//! | [`client_config`] | outgoing connections verified against the given roots, optionally presenting a client certificate |
//! | [`danger_accept_any_server_cert`] | local testing only: any server certificate is accepted |
//!
//! No ALPN is set: SIP over TLS does not negotiate it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CipherSuite, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite, SupportedProtocolVersion,
};

use super::TransportError;

/// The protocol versions offered and accepted: TLS 1.3 and TLS 1.2.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The TLS 1.2 suites kept: ECDHE key exchange with an AEAD cipher.
const TLS12_AEAD_SUITES: &[CipherSuite] = &[
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The ring provider restricted to AEAD cipher suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| match s {
        SupportedCipherSuite::Tls13(_) => true,
        SupportedCipherSuite::Tls12(_) => TLS12_AEAD_SUITES.contains(&s.suite()),
    });
    Arc::new(p)
}

/// Reads every certificate in a PEM buffer (at least one).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate);
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM buffer.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TransportError> {
    Ok(PrivateKeyDer::from_pem_slice(pem)?)
}

/// A root store holding every certificate in a PEM buffer.
pub fn root_store(pem: &[u8]) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A server configuration presenting `cert_chain_pem` (leaf first) with
/// `key_pem`. With `client_ca_pem`, every client must present a certificate
/// chaining to one of those CAs (mutual TLS); without it, none is asked for.
pub fn server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = provider();
    let chain = certs_from_pem(cert_chain_pem)?;
    let key = key_from_pem(key_pem)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(PROTOCOL_VERSIONS)?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(root_store(ca)?, provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// A client configuration trusting the CAs in `roots_pem`, presenting
/// `client_cert` (`(chain_pem, key_pem)`) when a server asks for one.
pub fn client_config(
    roots_pem: &[u8],
    client_cert: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TransportError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_root_certificates(root_store(roots_pem)?);
    finish_client(builder, client_cert)
}

/// **Local testing only.** A client configuration that accepts any server
/// certificate, whoever issued it and whatever name it carries: it gives no
/// protection against an active attacker. Handshake signatures are still
/// verified, so the peer must hold the key of the certificate it presents.
pub fn danger_accept_any_server_cert(
    client_cert: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TransportError> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyServerCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    finish_client(builder, client_cert)
}

fn finish_client(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    client_cert: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, TransportError> {
    let config = match client_cert {
        Some((chain, key)) => {
            builder.with_client_auth_cert(certs_from_pem(chain)?, key_from_pem(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts every server certificate but checks handshake signatures with the
/// provider's algorithms (see [`danger_accept_any_server_cert`]).
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_keeps_only_aead_suites() {
        let p = provider();
        assert!(!p.cipher_suites.is_empty());
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
                "{name}"
            );
        }
        assert!(
            p.cipher_suites
                .iter()
                .any(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
        );
    }

    #[test]
    fn pem_errors_are_typed() {
        assert!(matches!(
            certs_from_pem(b"not pem"),
            Err(TransportError::NoCertificate)
        ));
        assert!(key_from_pem(b"not pem").is_err());
        assert!(client_config(b"", None).is_err());
    }
}
