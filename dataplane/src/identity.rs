//! Node identity: the organisation CA, node certificates and peer ids.
//!
//! A node certificate is an Ed25519 X.509 certificate signed by the organisation CA. The subject
//! CN is the node's name; its role and groups are Subject Alternative Name URIs
//! (`urn:sluice:role:agent`, `urn:sluice:group:eng`), readable with any X.509 tool. The peer id is
//! the SHA-256 of the certificate's SubjectPublicKeyInfo, so it names a key, not a certificate:
//! re-issuing a certificate for the same key keeps the id.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ED25519,
};
pub use time::{Duration as TimeDuration, OffsetDateTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

const ROLE_PREFIX: &str = "urn:sluice:role:";
const GROUP_PREFIX: &str = "urn:sluice:group:";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ @ -")]
    InvalidName(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("not a valid certificate: {0}")]
    Parse(String),
    #[error(
        "certificate has no sluice role (expected a SAN URI {ROLE_PREFIX}agent|connector|relay)"
    )]
    NoRole,
    #[error("certificate has an unknown role {0:?}")]
    UnknownRole(String),
    #[error("certificate has no subject common name")]
    NoName,
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// What a node is allowed to be in the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Connector,
    Relay,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
            Role::Relay => "relay",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "connector" => Some(Role::Connector),
            "relay" => Some(Role::Relay),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SHA-256 of a node's public key (SubjectPublicKeyInfo DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    pub const LEN: usize = 32;

    pub fn from_spki(spki_der: &[u8]) -> PeerId {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        PeerId(id)
    }

    pub fn from_slice(b: &[u8]) -> Option<PeerId> {
        <[u8; 32]>::try_from(b).ok().map(PeerId)
    }

    /// The first 8 bytes in hex: enough to tell peers apart in logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

/// What an authenticated certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub peer_id: PeerId,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} (peer {})",
            self.role,
            self.name,
            self.peer_id.short()
        )
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_string()))
    }
}

/// From five minutes ago (so a peer whose clock is slightly behind accepts a fresh certificate)
/// until `valid` from now.
fn validity_from_now(valid: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let secs = valid.as_secs().min(100 * 365 * 86_400) as i64;
    (
        now - time::Duration::minutes(5),
        now + time::Duration::seconds(secs),
    )
}

/// ring (behind rcgen) writes Ed25519 keys as PKCS#8 v2 (seed and public key); BoringSSL
/// reads only v1 (RFC 8410). Both read v1, so keys are stored as v1.
/// v2 after the outer SEQUENCE header: version 1, algorithm Ed25519, the 32-byte seed.
const ED25519_PKCS8_V2_BODY: [u8; 14] = [
    0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

fn key_pem(key: &KeyPair) -> Result<String, IdentityError> {
    let der = key.serialize_der();
    // A key read back from a file (`renew`) is v1 already: rcgen serializes it as it was read.
    let v1_seed = der
        .strip_prefix(&ED25519_PKCS8_V1_PREFIX[..])
        .filter(|seed| seed.len() == 32);
    let seed = v1_seed
        .or_else(|| {
            der.get(2..)
                .filter(|_| der[0] == 0x30)
                .and_then(|body| body.strip_prefix(&ED25519_PKCS8_V2_BODY[..]))
                .and_then(|rest| rest.get(..32))
        })
        .ok_or_else(|| IdentityError::Parse("unexpected Ed25519 key encoding".into()))?;
    let mut v1 = ED25519_PKCS8_V1_PREFIX.to_vec();
    v1.extend_from_slice(seed);
    Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", v1)))
}

/// Creates an organisation CA: a self-signed Ed25519 certificate allowed to sign node certificates.
pub fn create_ca(org: &str, valid: Duration) -> Result<PemPair, IdentityError> {
    validate_name(org)?;
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{org} sluice CA"));
    dn.push(DnType::OrganizationName, org);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = validity_from_now(valid);
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key_pem(&key)?,
    })
}

/// Issues a node certificate signed by the CA, valid from now for `valid`.
pub fn issue(
    ca: &PemPair,
    role: Role,
    name: &str,
    groups: &[String],
    valid: Duration,
) -> Result<PemPair, IdentityError> {
    let (not_before, not_after) = validity_from_now(valid);
    issue_between(ca, role, name, groups, not_before, not_after)
}

/// Issues a node certificate valid between two instants (tests use it for expired ones).
pub fn issue_between(
    ca: &PemPair,
    role: Role,
    name: &str,
    groups: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<PemPair, IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    sign_node(ca, key, role, name, groups, not_before, not_after)
}

/// Renews a node certificate: the same key (so the same peer id), name and role, the given
/// groups (the old ones when None), valid from now for `valid`. A running node re-authenticates
/// its connections with it in place (see `tunnel`), which a new key could not do.
pub fn renew(
    ca: &PemPair,
    node: &PemPair,
    groups: Option<&[String]>,
    valid: Duration,
) -> Result<PemPair, IdentityError> {
    let old = identity_from_pem(&node.cert_pem)?;
    let key = KeyPair::from_pem(&node.key_pem)?;
    if PeerId::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&key)) != old.peer_id {
        return Err(IdentityError::Parse(
            "the key does not belong to the certificate".into(),
        ));
    }
    let groups = groups.map_or(old.groups.clone(), <[String]>::to_vec);
    let (not_before, not_after) = validity_from_now(valid);
    let mut pair = sign_node(ca, key, old.role, &old.name, &groups, not_before, not_after)?;
    // The key file stays as it was (its encoding included).
    pair.key_pem = node.key_pem.clone();
    Ok(pair)
}

fn sign_node(
    ca: &PemPair,
    key: KeyPair,
    role: Role,
    name: &str,
    groups: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<PemPair, IdentityError> {
    validate_name(name)?;
    for g in groups {
        validate_name(g)?;
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let mut sans = vec![SanType::URI(format!("{ROLE_PREFIX}{role}").try_into()?)];
    for g in groups {
        sans.push(SanType::URI(format!("{GROUP_PREFIX}{g}").try_into()?));
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key_pem(&key)?,
    })
}

/// The subject's common name: a node's (or the CA's) name.
fn common_name(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<String, IdentityError> {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or(IdentityError::NoName)
}

/// Reads role, name, groups and peer id from a DER certificate. It does not verify the
/// signature: call it on certificates the TLS stack has already verified against the CA.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let name = common_name(&cert)?;
    let mut role = None;
    let mut groups = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for gn in &san.general_names {
                if let GeneralName::URI(uri) = gn {
                    if let Some(r) = uri.strip_prefix(ROLE_PREFIX) {
                        role = Some(
                            Role::parse(r).ok_or_else(|| IdentityError::UnknownRole(r.into()))?,
                        );
                    } else if let Some(g) = uri.strip_prefix(GROUP_PREFIX) {
                        groups.push(g.to_string());
                    }
                }
            }
        }
    }
    Ok(Identity {
        name,
        role: role.ok_or(IdentityError::NoRole)?,
        groups,
        peer_id: PeerId::from_spki(cert.tbs_certificate.subject_pki.raw),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A DER certificate's validity: not before, not after (Unix seconds). Not verified.
pub fn validity_of_der(der: &[u8]) -> Result<(i64, i64), IdentityError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Reads the first certificate of a PEM file and returns its identity.
pub fn identity_from_pem(pem: &str) -> Result<Identity, IdentityError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    identity_from_der(&p.contents)
}

/// Why a validity like `--valid 30d` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidityError {
    #[error(
        "{0:?}: expected a number and a unit: s, min, h, d, w, mo (30 days) or y (like 12h or 30d)"
    )]
    Syntax(String),
    // `m` read as minutes once, which looks like months: a certificate meant for six months
    // expired in six minutes. Neither reading is safe to guess.
    #[error("{0:?} is ambiguous: use {1}min for minutes or {1}mo for months")]
    AmbiguousM(String, u64),
    #[error("{0:?}: a validity must be more than zero")]
    Zero(String),
}

/// Parses a duration such as `90s`, `45min`, `12h`, `30d`, `2w`, `6mo` (30 days each) or `1y`
/// (365 days). A bare `m` is refused as ambiguous.
pub fn parse_validity(s: &str) -> Result<Duration, ValidityError> {
    let t = s.trim();
    let syntax = || ValidityError::Syntax(s.to_string());
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(syntax)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| syntax())?;
    let secs: u64 = match unit {
        "s" => 1,
        "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "mo" => 30 * 86_400,
        "y" => 365 * 86_400,
        "m" => return Err(ValidityError::AmbiguousM(s.to_string(), n)),
        _ => return Err(syntax()),
    };
    if n == 0 {
        return Err(ValidityError::Zero(s.to_string()));
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// What `sluice ca show` prints about a certificate, CA or node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject common name.
    pub name: String,
    /// The subject organisation (set on CA certificates).
    pub organisation: Option<String>,
    /// None for a CA certificate, which has no sluice role.
    pub role: Option<Role>,
    pub groups: Vec<String>,
    pub peer_id: PeerId,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the first certificate of a PEM file, a node's or a CA's, without verifying it.
pub fn summarize_pem(pem: &str) -> Result<CertSummary, IdentityError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&p.contents)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let organisation = cert
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_string);
    let (not_before, not_after) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    if cert.is_ca() {
        let name = common_name(&cert)?;
        return Ok(CertSummary {
            name,
            organisation,
            role: None,
            groups: Vec::new(),
            peer_id: PeerId::from_spki(cert.tbs_certificate.subject_pki.raw),
            not_before,
            not_after,
        });
    }
    let id = identity_from_der(&p.contents)?;
    Ok(CertSummary {
        name: id.name,
        organisation,
        role: Some(id.role),
        groups: id.groups,
        peer_id: id.peer_id,
        not_before,
        not_after,
    })
}

/// The wall clock in unix seconds, as certificates count time (0 if the clock is before 1970).
/// A certificate's groups as the logs and `sluice ca` write them: `eng,ops`, or `none`.
pub fn groups_text(groups: &[String]) -> String {
    if groups.is_empty() {
        "none".into()
    } else {
        groups.join(",")
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_identity() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let node = issue(
            &ca,
            Role::Agent,
            "alice",
            &["eng".into(), "ops".into()],
            Duration::from_secs(600),
        )
        .unwrap();
        let id = identity_from_pem(&node.cert_pem).unwrap();
        assert_eq!(id.name, "alice");
        assert_eq!(id.role, Role::Agent);
        assert_eq!(id.groups, vec!["eng".to_string(), "ops".to_string()]);
        let ca_id = identity_from_pem(&ca.cert_pem);
        assert!(matches!(ca_id, Err(IdentityError::NoRole)));
        // Two issues make two keys, so two peer ids.
        let other = issue(&ca, Role::Agent, "alice", &[], Duration::from_secs(600)).unwrap();
        assert_ne!(
            identity_from_pem(&other.cert_pem).unwrap().peer_id,
            id.peer_id
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("conn-1.eu_west@x").is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(65), "a/b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validity_parses() {
        let ok = [
            ("90s", 90),
            ("45min", 45 * 60),
            ("12h", 43_200),
            ("30d", 30 * 86_400),
            ("2w", 14 * 86_400),
            ("6mo", 180 * 86_400),
            ("1y", 365 * 86_400),
            (" 3d ", 3 * 86_400),
        ];
        for (s, secs) in ok {
            assert_eq!(parse_validity(s), Ok(Duration::from_secs(secs)), "{s:?}");
        }
        for bad in ["", "h", "12", "-1h", "1.5h", "3x", "6mins", "6M", "d30"] {
            assert_eq!(
                parse_validity(bad),
                Err(ValidityError::Syntax(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(parse_validity("0h"), Err(ValidityError::Zero("0h".into())));
    }

    #[test]
    fn a_bare_m_is_refused_as_ambiguous() {
        let e = parse_validity("6m").unwrap_err();
        assert_eq!(e, ValidityError::AmbiguousM("6m".into(), 6));
        assert_eq!(
            e.to_string(),
            "\"6m\" is ambiguous: use 6min for minutes or 6mo for months"
        );
    }

    #[test]
    fn summaries_cover_ca_and_node_certificates() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let s = summarize_pem(&ca.cert_pem).unwrap();
        assert_eq!(s.role, None);
        assert_eq!(s.organisation.as_deref(), Some("acme"));
        assert_eq!(s.name, "acme sluice CA");
        let node = issue(
            &ca,
            Role::Agent,
            "alice",
            &["eng".into()],
            Duration::from_secs(600),
        )
        .unwrap();
        let n = summarize_pem(&node.cert_pem).unwrap();
        let id = identity_from_pem(&node.cert_pem).unwrap();
        assert_eq!(
            (
                n.role,
                n.name.as_str(),
                n.groups.clone(),
                n.peer_id,
                n.not_after
            ),
            (
                Some(Role::Agent),
                "alice",
                vec!["eng".to_string()],
                id.peer_id,
                id.not_after
            )
        );
        assert!(n.not_before < n.not_after);
        assert!(summarize_pem("not a certificate").is_err());
    }

    #[test]
    fn renewal_keeps_the_key_and_the_peer_id() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let node = issue(
            &ca,
            Role::Agent,
            "alice",
            &["eng".into()],
            Duration::from_secs(60),
        )
        .unwrap();
        let old = identity_from_pem(&node.cert_pem).unwrap();
        // The key as stored on disk (PKCS#8 v1), which a renewal reads back.
        let renewed = renew(&ca, &node, None, Duration::from_secs(7200)).unwrap();
        assert_eq!(renewed.key_pem, node.key_pem);
        let new = identity_from_pem(&renewed.cert_pem).unwrap();
        assert_eq!(
            (&new.name, new.role, &new.groups, new.peer_id),
            (&old.name, old.role, &old.groups, old.peer_id)
        );
        assert!(new.not_after >= old.not_after + 7000);
        // A renewal of the renewal, with new groups.
        let again = renew(
            &ca,
            &renewed,
            Some(&["ops".into()]),
            Duration::from_secs(60),
        )
        .unwrap();
        let again = identity_from_pem(&again.cert_pem).unwrap();
        assert_eq!(
            (again.groups, again.peer_id),
            (vec!["ops".to_string()], old.peer_id)
        );
        // Another node's key is refused.
        let bob = issue(&ca, Role::Agent, "bob", &[], Duration::from_secs(60)).unwrap();
        let mixed = PemPair {
            cert_pem: node.cert_pem.clone(),
            key_pem: bob.key_pem,
        };
        assert!(renew(&ca, &mixed, None, Duration::from_secs(60)).is_err());
    }
}
