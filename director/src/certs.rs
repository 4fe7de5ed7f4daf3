//! `fulcrum-director certs`: a cluster CA and the certificates it issues, with rcgen, so that no openssl step
//! is needed.
//!
//! Each certificate carries its holder's name as a DNS subject-alternative name. The director checks an
//! agent's declared name against its certificate; agents check a director's certificate against the
//! director name in their config.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// A director: serves agents (and later its peer director), so both server and client authentication.
    Director,
    /// An agent: client authentication only.
    Agent,
}

/// Paths of an issued certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates `ca.pem` and `ca.key` in `dir`. Refuses to overwrite an existing CA unless `force`: replacing it
/// invalidates every certificate in the cluster.
pub fn create_ca(dir: &Path, common_name: &str, days: u32, force: bool) -> Result<Issued> {
    let issued = Issued { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) };
    if !force && (issued.cert.exists() || issued.key.exists()) {
        bail!(
            "{} already holds a CA; pass --force to replace it (every issued certificate becomes invalid)",
            dir.display()
        );
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, days);
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = params.self_signed(&key).context("self-signing the CA certificate")?;
    write_pair(&issued, &cert.pem(), &key.serialize_pem())?;
    Ok(issued)
}

/// Issues `<name>.pem` and `<name>.key` in `dir`, signed by the CA found there.
pub fn issue(dir: &Path, role: Role, holder: &str, ips: &[IpAddr], days: u32, force: bool) -> Result<Issued> {
    validate_name(holder)?;
    let issued = Issued { cert: dir.join(format!("{holder}.pem")), key: dir.join(format!("{holder}.key")) };
    if !force && (issued.cert.exists() || issued.key.exists()) {
        bail!("{} already exists; pass --force to replace it", issued.cert.display());
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_pem = fs::read_to_string(&ca_cert_path).with_context(|| {
        format!("reading the CA certificate {} (create it with `certs ca`)", ca_cert_path.display())
    })?;
    let ca_key_pem =
        fs::read_to_string(&ca_key_path).with_context(|| format!("reading the CA key {}", ca_key_path.display()))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).with_context(|| format!("parsing the CA key {}", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("parsing the CA certificate {}", ca_cert_path.display()))?;

    let mut params = CertificateParams::new(vec![holder.to_string()]).context("building certificate parameters")?;
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name = name(holder);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Director => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Agent => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    let key = KeyPair::generate().context("generating the key")?;
    let cert = params.signed_by(&key, &issuer).context("signing the certificate")?;
    write_pair(&issued, &cert.pem(), &key.serialize_pem())?;
    Ok(issued)
}

/// Names go into DNS SANs and are matched against an agent's Hello, so they must be DNS names.
fn validate_name(holder: &str) -> Result<()> {
    if !fulcrum_protocol::is_dns_name(holder) {
        bail!(
            "name {holder:?} is not a valid DNS name (letters, digits, '-' and '.', at most {} bytes)",
            fulcrum_protocol::MAX_NAME_LEN
        );
    }
    Ok(())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Fulcrum cluster");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // A day of slack for clocks that are a little behind.
    params.not_before = now - std::time::Duration::from_secs(86_400);
    params.not_after = now + std::time::Duration::from_secs(86_400 * u64::from(days));
}

fn write_pair(issued: &Issued, cert_pem: &str, key_pem: &str) -> Result<()> {
    if let Some(parent) = issued.cert.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    write_file(&issued.key, key_pem, 0o600)?;
    write_file(&issued.cert, cert_pem, 0o644)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    fn der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[test]
    fn issued_certificates_chain_to_the_ca_and_carry_the_name() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "test CA", 30, false).unwrap();
        let agent = issue(dir.path(), Role::Agent, "web1", &[], 30, false).unwrap();
        let director = issue(dir.path(), Role::Director, "d1", &["10.0.0.2".parse().unwrap()], 30, false).unwrap();
        assert_eq!(fs::metadata(&agent.key).unwrap().permissions().mode() & 0o777, 0o600);

        let ca = der(&dir.path().join(CA_CERT_FILE));
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
        let now = UnixTime::now();
        let algs = webpki::ALL_VERIFICATION_ALGS;

        let agent_der = der(&agent.cert);
        let cert = webpki::EndEntityCert::try_from(&agent_der).unwrap();
        let anchors = [anchor];
        cert.verify_for_usage(algs, &anchors, &[], now, webpki::KeyUsage::client_auth(), None, None).unwrap();
        cert.verify_is_valid_for_subject_name(&ServerName::try_from("web1").unwrap()).unwrap();
        assert!(cert.verify_is_valid_for_subject_name(&ServerName::try_from("web2").unwrap()).is_err());
        let agent_as_server =
            cert.verify_for_usage(algs, &anchors, &[], now, webpki::KeyUsage::server_auth(), None, None);
        assert!(agent_as_server.is_err(), "an agent certificate must not serve");

        let director_der = der(&director.cert);
        let cert = webpki::EndEntityCert::try_from(&director_der).unwrap();
        cert.verify_for_usage(algs, &anchors, &[], now, webpki::KeyUsage::server_auth(), None, None).unwrap();
        cert.verify_is_valid_for_subject_name(&ServerName::try_from("d1").unwrap()).unwrap();
        cert.verify_is_valid_for_subject_name(&ServerName::try_from("10.0.0.2").unwrap()).unwrap();
    }

    #[test]
    fn nothing_is_overwritten_without_force_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "test CA", 30, false).unwrap();
        let err = create_ca(dir.path(), "test CA", 30, false).unwrap_err();
        assert!(err.to_string().contains("already holds a CA"), "{err}");
        issue(dir.path(), Role::Agent, "web1", &[], 30, false).unwrap();
        assert!(issue(dir.path(), Role::Agent, "web1", &[], 30, false).is_err());
        issue(dir.path(), Role::Agent, "web1", &[], 30, true).unwrap();
        for bad in ["", "../etc/passwd", "web_1", "-web", "a..b"] {
            let err = issue(dir.path(), Role::Agent, bad, &[], 30, false).unwrap_err();
            assert!(err.to_string().contains("not a valid DNS name"), "{bad}: {err}");
        }
    }

    #[test]
    fn issuing_without_a_ca_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), Role::Agent, "web1", &[], 30, false).unwrap_err();
        assert!(format!("{err:#}").contains("create it with `certs ca`"), "{err:#}");
    }
}
