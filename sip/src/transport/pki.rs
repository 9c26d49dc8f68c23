//! A certificate authority generated on first start (the cluster CA of a
//! local region, or a test CA): a CA and leaf certificates, written as PEM
//! files with private keys readable by the owner only.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA that can issue leaf certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate in PEM.
    pub cert_pem: String,
    /// The CA's private key in PEM (PKCS#8).
    key_pem: String,
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

impl Ca {
    fn params(name: &str) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(params)
    }

    /// Generates a new CA named `name`.
    pub fn new(name: &str) -> Result<Ca, PkiError> {
        let params = Ca::params(name)?;
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        let key_pem = key.serialize_pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// The CA `name` written by [`Ca::write`] in `dir` (`ca.pem`, `ca.key`):
    /// it issues certificates its earlier ones chain with (same subject, same
    /// key, so the same authority key identifier).
    pub fn load(dir: &Path, name: &str) -> Result<Ca, PkiError> {
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
        };
        let (cert_pem, key_pem) = (read("ca.pem")?, read("ca.key")?);
        let key = KeyPair::from_pem(&key_pem)?;
        Ok(Ca {
            issuer: Issuer::new(Ca::params(name)?, key),
            cert_pem,
            key_pem,
        })
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (owner-only), for [`Ca::load`].
    pub fn write(&self, dir: &Path) -> Result<PathBuf, PkiError> {
        write(&dir.join("ca.key"), self.key_pem.as_bytes(), true)?;
        self.write_ca(dir)
    }

    /// Issues a certificate for `names` (DNS names or IP literals), usable
    /// as a TLS server and client certificate.
    pub fn issue(&self, names: &[&str]) -> Result<Leaf, PkiError> {
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
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf, PkiError> {
        let p = dir.join("ca.pem");
        write(&p, self.cert_pem.as_bytes(), false)?;
        Ok(p)
    }
}

impl Leaf {
    /// Writes `dir/NAME.pem` and `dir/NAME.key`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<LeafFiles, PkiError> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        write(&cert, self.cert_pem.as_bytes(), false)?;
        write(&key, self.key_pem.as_bytes(), true)?;
        Ok(LeafFiles { cert, key })
    }
}

/// Why generating or writing certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or the key.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

fn write(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    opts.open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(io)
}

/// The certificate and key of `name` under `dir`, generated (with a new CA
/// whose certificate is written as `dir/ca.pem`) when they do not exist yet,
/// reused as they are otherwise. `names` are the DNS names and IP literals
/// the certificate is issued for.
pub fn load_or_create(dir: &Path, name: &str, names: &[&str]) -> Result<LeafFiles, PkiError> {
    let files = LeafFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    if files.cert.is_file() && files.key.is_file() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = Ca::new(&format!("sipzone CA ({name})"))?;
    ca.write_ca(dir)?;
    ca.issue(names)?.write(dir, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_that_chain_to_its_certificate() {
        let dir = std::env::temp_dir().join(format!("sipzone-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new("cluster").unwrap();
        ca.write(&dir).unwrap();
        let again = Ca::load(&dir, "cluster").unwrap();
        assert_eq!(again.cert_pem, ca.cert_pem);
        let leaf = again.issue(&["localhost"]).unwrap();
        // A server with the new leaf is trusted by a client trusting the CA.
        let server = crate::transport::tls::server_config(
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            Some(ca.cert_pem.as_bytes()),
        );
        assert!(server.is_ok());
        let roots = crate::transport::tls::root_store(ca.cert_pem.as_bytes()).unwrap();
        let chain = crate::transport::tls::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            crate::transport::tls::provider(),
        )
        .build()
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let now = rustls_pki_types::UnixTime::now();
        assert!(
            verifier
                .verify_server_cert(&chain[0], &[], &name, &[], now)
                .is_ok()
        );
        let mode = std::fs::metadata(dir.join("ca.key")).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("sipzone-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create(&dir, "node", &["127.0.0.1", "localhost"]).unwrap();
        let first = std::fs::read(&a.cert).unwrap();
        let b = load_or_create(&dir, "node", &["127.0.0.1"]).unwrap();
        assert_eq!(std::fs::read(&b.cert).unwrap(), first);
        let mode = std::fs::metadata(&b.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let ca = std::fs::read(dir.join("ca.pem")).unwrap();
        assert!(crate::transport::tls::client_config(&ca, None).is_ok());
        assert!(
            crate::transport::tls::server_config(&first, &std::fs::read(&b.key).unwrap(), None)
                .is_ok()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
