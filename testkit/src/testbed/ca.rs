//! A certificate authority made at run time, for a throw-away server.

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority made at run time. Its key lives only in memory;
/// server certificates it signs are written next to the server's config.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of Debug output.
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Write the CA certificate to `path`.
    pub fn write_pem(&self, path: &Path) {
        fs::write(path, &self.pem).expect("write CA PEM");
    }

    /// Write `server.pem` and `server.key` for `names` into `dir`.
    pub fn write_server_cert(&self, names: &[String], dir: &Path) {
        self.try_write_server_cert(names, dir)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`write_server_cert`](Self::write_server_cert) that reports
    /// failures instead of panicking.
    pub fn try_write_server_cert(&self, names: &[String], dir: &Path) -> Result<(), super::Error> {
        let err = |what: &str, e: &dyn std::fmt::Display| super::Error::new(format!("{what}: {e}"));
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|e| err("server certificate", &e))?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("x"),
        );
        params.use_authority_key_identifier_extension = true;
        // rcgen's default validity ends in 4096; ejabberd's certificate
        // store crashes on that date (an expiry timer out of range), so
        // make it an ordinary one: last year to two years ahead.
        let year = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| 1970 + (d.as_secs() / 31_556_952) as i32)
            .unwrap_or(2026);
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(|e| err("server key", &e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err("server certificate", &e))?;
        fs::write(dir.join("server.pem"), cert.pem()).map_err(|e| err("write server.pem", &e))?;
        super::write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())
            .map_err(|e| err("write server.key", &e))?;
        Ok(())
    }
}
