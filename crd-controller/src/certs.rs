//! The controller-owned CA and the webhook's serving certificate (rcgen), without I/O.
//!
//! The CA is a self-signed key pair stored in a Secret; its subject is fixed, so the issuer
//! of a serving certificate can be rebuilt from the stored key alone. A serving certificate
//! names the Service (`NAME.NAMESPACE.svc` and its short forms) and is checked against the CA
//! with the same verifier a TLS client uses before it is used.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Subject common name of the CA.
pub const CA_NAME: &str = "stackroute-webhook-ca";
/// CA lifetime.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Serving certificate lifetime; renewed once two thirds have passed.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Allowance for clock skew between the controller and the API server.
const BACKDATE: Duration = Duration::from_secs(3600);

/// A CA certificate and its key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    /// `ca.crt`: what `caBundle` holds.
    pub cert_pem: String,
    /// `ca.key`.
    pub key_pem: String,
}

/// A leaf certificate (PEM: serving or client) and its key (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    /// `tls.crt`.
    pub cert_pem: String,
    /// `tls.key`.
    pub key_pem: String,
}

fn ca_params(now: SystemTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "stackroute");
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    params
}

/// A new self-signed CA valid from `now` (minus an hour) for ten years.
pub fn new_ca(now: SystemTime) -> anyhow::Result<Ca> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = ca_params(now)
        .self_signed(&key)
        .context("self-signing the CA")?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The DNS names the API server may use for Service `service` in `namespace`.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_string(),
    ]
}

/// A serving certificate for `names`, signed by `ca`, valid from `now` for `validity`.
pub fn issue_serving(
    ca: &Ca,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> anyhow::Result<Serving> {
    let mut params =
        CertificateParams::new(names.to_vec()).context("the serving certificate's names")?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().map_or("stackroute-webhook", String::as_str),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign_leaf(ca, params, now, validity)
}

/// How long a client certificate issued by `stackroute-controller credentials` lasts.
pub const CLIENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A client certificate naming `caller` (URI SAN, as [`crate::auth`] reads it), signed by
/// `ca`, valid from `now` for [`CLIENT_VALIDITY`].
pub fn issue_client(
    ca: &Ca,
    caller: &stackroute_proto::identity::Caller,
    now: SystemTime,
) -> anyhow::Result<Serving> {
    let mut params = CertificateParams::default();
    let uri = caller.uri();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        uri.clone().try_into().context("the caller's URI")?,
    )];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "stackroute");
    dn.push(DnType::CommonName, uri);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign_leaf(ca, params, now, CLIENT_VALIDITY)
}

/// Signs a leaf with a new key: valid from `now` (minus the skew allowance) for `validity`.
fn sign_leaf(
    ca: &Ca,
    mut params: CertificateParams,
    now: SystemTime,
    validity: Duration,
) -> anyhow::Result<Serving> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("parsing the CA key")?;
    let issuer = Issuer::new(ca_params(now), ca_key);
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + validity).into();
    let key = KeyPair::generate().context("generating the key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    Ok(Serving {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Checks that `leaf_pem` chains to `ca_pem` and is valid for `name` at `now`, as a TLS
/// client (the API server) would.
pub fn verify(ca_pem: &str, leaf_pem: &str, name: &str, now: SystemTime) -> anyhow::Result<()> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("parsing the CA PEM")?)
            .context("adding the CA")?;
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
            .context("building the verifier")?;
    let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).context("parsing the leaf")?;
    let name = ServerName::try_from(name.to_string()).context("the server name")?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], now)
        .context("verifying the serving certificate against the CA")?;
    Ok(())
}

/// True when `ca` can issue a certificate that verifies against its own certificate (the
/// key belongs to the certificate and the certificate is a usable CA now).
pub fn ca_usable(ca: &Ca, now: SystemTime) -> bool {
    let name = "check.stackroute.invalid".to_string();
    issue_serving(
        ca,
        std::slice::from_ref(&name),
        now,
        Duration::from_secs(600),
    )
    .and_then(|leaf| verify(&ca.cert_pem, &leaf.cert_pem, &name, now))
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_certificate_chains_to_the_ca() {
        let now = SystemTime::now();
        let ca = new_ca(now).unwrap();
        assert!(ca_usable(&ca, now));
        let names = service_names("stackroute-webhook", "stackroute-system");
        assert_eq!(names[0], "stackroute-webhook.stackroute-system.svc");
        let serving = issue_serving(&ca, &names, now, SERVING_VALIDITY).unwrap();
        for name in &names {
            verify(&ca.cert_pem, &serving.cert_pem, name, now).unwrap();
        }
        assert!(verify(&ca.cert_pem, &serving.cert_pem, "other.svc", now).is_err());
        // Expired after its validity.
        let later = now + SERVING_VALIDITY + Duration::from_secs(7200);
        assert!(verify(&ca.cert_pem, &serving.cert_pem, &names[0], later).is_err());
        // The key pair loads as a serving certificate.
        crate::tls::parse(
            serving.cert_pem.as_bytes(),
            serving.key_pem.as_bytes(),
            &crate::tls::provider(),
        )
        .unwrap();
    }

    #[test]
    fn a_foreign_ca_or_mismatched_key_is_unusable() {
        let now = SystemTime::now();
        let a = new_ca(now).unwrap();
        let b = new_ca(now).unwrap();
        let mixed = Ca {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        };
        assert!(!ca_usable(&mixed, now));
        let garbage = Ca {
            cert_pem: "nonsense".into(),
            key_pem: a.key_pem.clone(),
        };
        assert!(!ca_usable(&garbage, now));
        let serving = issue_serving(&b, &["x.y.svc".into()], now, SERVING_VALIDITY).unwrap();
        assert!(verify(&a.cert_pem, &serving.cert_pem, "x.y.svc", now).is_err());
    }
}
