//! A throw-away certificate authority for tests and local regions: a CA and
//! leaf certificates for `127.0.0.1`/`localhost`, written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA that can issue leaf certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate in PEM.
    pub cert_pem: String,
}

/// A leaf certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate chain (leaf only) in PEM.
    pub cert_pem: String,
    /// The private key in PEM (PKCS#8).
    pub key_pem: String,
}

/// Paths of a leaf written to disk.
#[derive(Debug, Clone)]
pub struct LeafFiles {
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// Key PEM file.
    pub key: PathBuf,
}

impl TestCa {
    /// Generates a new CA named `name`.
    pub fn new(name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        let cert_pem = issuer.pem();
        Ok(TestCa { issuer, cert_pem })
    }

    /// Issues a certificate for `names` (DNS names or IP literals), usable
    /// as a TLS server and client certificate.
    pub fn issue(&self, names: &[&str]) -> Result<Leaf> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf> {
        let p = dir.join("ca.pem");
        std::fs::write(&p, &self.cert_pem).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

impl Leaf {
    /// Writes `dir/NAME.pem` and `dir/NAME.key`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<LeafFiles> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok(LeafFiles { cert, key })
    }
}
