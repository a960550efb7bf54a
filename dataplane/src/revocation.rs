//! Revocation lists: the certificates the CA took back before they expire.
//!
//! A list names revoked peer ids (a key, so every certificate for it) and revoked names (every
//! certificate whose subject is that name, of any role, until the name is taken off the list).
//! The CA's key signs it. Its sequence number only grows: a node never replaces the list it
//! holds with an older one or another one of the same number, so a replayed or stale list
//! cannot bring anyone back. Its expiry says when the CA meant to publish the next one; a node
//! whose list has expired keeps enforcing it and warns, since forgetting revocations because a
//! list aged would let back in exactly the people it names.
//!
//! Wire format, version 1: the body of the PEM file and of the relay's control message alike.
//!
//! ```text
//! "SLRL" | version u8 | CA key id [32] | sequence u64 | issued at i64 | expires at i64
//!        | peer count u16 | peer ids [32]... | name count u16 | (length u8, name)...
//!        | Ed25519 signature [64] by the CA key over every byte before it
//! ```
//!
//! The CA key id is the SHA-256 of the CA certificate's SubjectPublicKeyInfo (the CA's peer
//! id), so a list from another organisation is told apart before its signature is checked.
//! Integers are big-endian; times are Unix seconds.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use x509_parser::prelude::FromDer;

use crate::identity::{validate_name, Identity, PeerId};
use crate::reader::{Reader, Truncated};

const MAGIC: &[u8; 4] = b"SLRL";
pub const VERSION: u8 = 1;
const SIGNATURE_LEN: usize = 64;
/// The PEM label of a revocation list file.
pub const PEM_LABEL: &str = "SLUICE REVOCATION LIST";
/// Largest encoded list: it must fit one control message (64 KiB) with room to spare. About
/// 1,800 peer ids, or fewer with names.
pub const MAX_ENCODED: usize = 60_000;
const HEADER_LEN: usize = 4 + 1 + 32 + 8 + 8 + 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("not a Sluice revocation list (bad magic)")]
    Magic,
    #[error("revocation list version {0} is not supported (this build reads version {VERSION})")]
    Version(u8),
    #[error("revocation list truncated")]
    Truncated,
    #[error("revocation list has {0} trailing bytes")]
    Trailing(usize),
    #[error("revocation list too large ({0} bytes; at most {MAX_ENCODED})")]
    TooLarge(usize),
    #[error("revocation list has an invalid name entry")]
    BadName,
    #[error("revocation list lists the same entry twice")]
    Duplicate,
    #[error("revocation list was signed by another CA (key {theirs}), not ours (key {ours})")]
    OtherCa { theirs: String, ours: String },
    #[error("revocation list signature does not verify against the CA key")]
    BadSignature,
    #[error("not a PEM revocation list: {0}")]
    Pem(String),
    #[error("CA certificate or key unusable for revocation lists: {0}")]
    CaKey(String),
}

/// A CA's public key, as revocation lists are checked against it.
#[derive(Clone, PartialEq, Eq)]
pub struct CaKey {
    /// SHA-256 of the CA certificate's SubjectPublicKeyInfo.
    pub id: [u8; 32],
    public: Vec<u8>,
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaKey({})", hex::encode(&self.id[..8]))
    }
}

impl CaKey {
    /// The key of a CA certificate (DER).
    pub fn from_cert_der(der: &[u8]) -> Result<CaKey, RevocationError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| RevocationError::CaKey(e.to_string()))?;
        let spki = &cert.tbs_certificate.subject_pki;
        Ok(CaKey {
            id: PeerId::from_spki(spki.raw).0,
            public: spki.subject_public_key.data.to_vec(),
        })
    }

    /// The key of a CA certificate (PEM).
    pub fn from_cert_pem(pem_text: &str) -> Result<CaKey, RevocationError> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
            .map_err(|e| RevocationError::CaKey(e.to_string()))?;
        Self::from_cert_der(&p.contents)
    }

    fn short(&self) -> String {
        hex::encode(&self.id[..8])
    }
}

/// Why a certificate is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Its key (peer id) is on the list.
    Key,
    /// Its subject name is on the list.
    Name,
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Revoked::Key => "its peer id",
            Revoked::Name => "its name",
        })
    }
}

/// What a new list is made of, before the CA signs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Draft {
    pub sequence: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub peers: BTreeSet<PeerId>,
    pub names: BTreeSet<String>,
}

/// A parsed revocation list, with the exact bytes it came from (which a relay hands on).
#[derive(Clone, PartialEq, Eq)]
pub struct RevocationList {
    pub ca_id: [u8; 32],
    pub sequence: u64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub peers: BTreeSet<PeerId>,
    pub names: BTreeSet<String>,
    raw: Vec<u8>,
}

impl fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationList")
            .field("sequence", &self.sequence)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("peers", &self.peers.len())
            .field("names", &self.names)
            .finish()
    }
}

impl From<Truncated> for RevocationError {
    fn from(_: Truncated) -> Self {
        RevocationError::Truncated
    }
}

fn encode_body(ca_id: &[u8; 32], d: &Draft) -> Result<Vec<u8>, RevocationError> {
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + d.peers.len() * 32 + SIGNATURE_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(ca_id);
    out.extend_from_slice(&d.sequence.to_be_bytes());
    out.extend_from_slice(&d.issued_at.to_be_bytes());
    out.extend_from_slice(&d.expires_at.to_be_bytes());
    let count = |n: usize| u16::try_from(n).map_err(|_| RevocationError::TooLarge(usize::MAX));
    out.extend_from_slice(&count(d.peers.len())?.to_be_bytes());
    for p in &d.peers {
        out.extend_from_slice(&p.0);
    }
    out.extend_from_slice(&count(d.names.len())?.to_be_bytes());
    for n in &d.names {
        validate_name(n).map_err(|_| RevocationError::BadName)?;
        out.push(n.len() as u8);
        out.extend_from_slice(n.as_bytes());
    }
    if out.len() + SIGNATURE_LEN > MAX_ENCODED {
        return Err(RevocationError::TooLarge(out.len() + SIGNATURE_LEN));
    }
    Ok(out)
}

impl RevocationList {
    /// Signs `draft` with the CA's certificate and key (PEM): what `sluice ca revoke` writes.
    pub fn sign(
        draft: &Draft,
        ca_cert_pem: &str,
        ca_key_pem: &str,
    ) -> Result<RevocationList, RevocationError> {
        let ca = CaKey::from_cert_pem(ca_cert_pem)?;
        let key_der =
            pem::parse(ca_key_pem).map_err(|e| RevocationError::CaKey(format!("CA key: {e}")))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(key_der.contents())
            .map_err(|e| RevocationError::CaKey(format!("CA key: {e}")))?;
        if pair.public_key().as_ref() != ca.public.as_slice() {
            return Err(RevocationError::CaKey(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let mut raw = encode_body(&ca.id, draft)?;
        let sig = pair.sign(&raw);
        raw.extend_from_slice(sig.as_ref());
        Ok(RevocationList {
            ca_id: ca.id,
            sequence: draft.sequence,
            issued_at: draft.issued_at,
            expires_at: draft.expires_at,
            peers: draft.peers.clone(),
            names: draft.names.clone(),
            raw,
        })
    }

    /// Reads a list without checking its signature (for display and for fuzzing); nodes use
    /// [`RevocationList::verify`].
    pub fn parse_unverified(b: &[u8]) -> Result<RevocationList, RevocationError> {
        if b.len() > MAX_ENCODED {
            return Err(RevocationError::TooLarge(b.len()));
        }
        let mut r = Reader(b);
        if r.take(4).map_err(|_| RevocationError::Magic)? != MAGIC {
            return Err(RevocationError::Magic);
        }
        let version = r.array::<1>()?[0];
        if version != VERSION {
            return Err(RevocationError::Version(version));
        }
        let ca_id = r.array::<32>()?;
        let sequence = r.u64()?;
        let issued_at = r.u64()? as i64;
        let expires_at = r.u64()? as i64;
        let mut peers = BTreeSet::new();
        for _ in 0..r.u16()? {
            if !peers.insert(PeerId(r.array::<32>()?)) {
                return Err(RevocationError::Duplicate);
            }
        }
        let mut names = BTreeSet::new();
        for _ in 0..r.u16()? {
            let len = usize::from(r.array::<1>()?[0]);
            let name = std::str::from_utf8(r.take(len)?).map_err(|_| RevocationError::BadName)?;
            validate_name(name).map_err(|_| RevocationError::BadName)?;
            if !names.insert(name.to_string()) {
                return Err(RevocationError::Duplicate);
            }
        }
        r.take(SIGNATURE_LEN)?;
        if !r.0.is_empty() {
            return Err(RevocationError::Trailing(r.0.len()));
        }
        Ok(RevocationList {
            ca_id,
            sequence,
            issued_at,
            expires_at,
            peers,
            names,
            raw: b.to_vec(),
        })
    }

    /// Reads a list and checks that `ca` signed it.
    pub fn verify(b: &[u8], ca: &CaKey) -> Result<RevocationList, RevocationError> {
        let list = Self::parse_unverified(b)?;
        if list.ca_id != ca.id {
            return Err(RevocationError::OtherCa {
                theirs: hex::encode(&list.ca_id[..8]),
                ours: ca.short(),
            });
        }
        let (body, sig) = b.split_at(b.len() - SIGNATURE_LEN);
        UnparsedPublicKey::new(&signature::ED25519, &ca.public)
            .verify(body, sig)
            .map_err(|_| RevocationError::BadSignature)?;
        Ok(list)
    }

    /// The signed bytes.
    pub fn encoded(&self) -> &[u8] {
        &self.raw
    }

    /// The list as a PEM file, with Unix line endings like the certificates beside it.
    pub fn to_pem(&self) -> String {
        pem::encode_config(
            &pem::Pem::new(PEM_LABEL, self.raw.clone()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// The signed bytes inside a PEM file.
    pub fn bytes_from_pem(text: &str) -> Result<Vec<u8>, RevocationError> {
        let p = pem::parse(text).map_err(|e| RevocationError::Pem(e.to_string()))?;
        if p.tag() != PEM_LABEL {
            return Err(RevocationError::Pem(format!(
                "found a {:?} block, expected {PEM_LABEL:?}",
                p.tag()
            )));
        }
        Ok(p.into_contents())
    }

    /// Whether this list revokes the holder of `id`, and why.
    pub fn revokes(&self, id: &Identity) -> Option<Revoked> {
        if self.peers.contains(&id.peer_id) {
            Some(Revoked::Key)
        } else if self.names.contains(&id.name) {
            Some(Revoked::Name)
        } else {
            None
        }
    }

    /// The draft this list was signed from, for the next one.
    pub fn draft(&self) -> Draft {
        Draft {
            sequence: self.sequence,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            peers: self.peers.clone(),
            names: self.names.clone(),
        }
    }
}

/// What became of a list offered to [`Revocations::offer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It is in force now; the sequence number of the list it replaced, if any.
    Installed { replaced: Option<u64> },
    /// The list in force is this very one.
    Same,
    /// Refused: the list in force has this (higher or equal) sequence number.
    Stale { current: u64 },
}

/// The revocation list a node enforces, shared between its TLS verifier (every handshake) and
/// the core that closes the live connections a new list revokes. Cloning shares it.
#[derive(Clone, Default)]
pub struct Revocations(Arc<RwLock<Option<Arc<RevocationList>>>>);

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.current() {
            Some(l) => write!(f, "Revocations(#{})", l.sequence),
            None => f.write_str("Revocations(none)"),
        }
    }
}

impl Revocations {
    /// The list in force, if any.
    pub fn current(&self) -> Option<Arc<RevocationList>> {
        // A poisoned lock still holds a whole list (it is only ever replaced whole).
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The sequence number of the list in force and why it revokes `id`, if it does.
    pub fn revokes(&self, id: &Identity) -> Option<(u64, Revoked)> {
        let list = self.current()?;
        list.revokes(id).map(|why| (list.sequence, why))
    }

    /// Checks that `ca` signed `bytes` and puts the list in force if it is newer than the one
    /// in force; logs what became of it, naming `source` (a file, "the relay"). `now_unix`
    /// only decides whether to warn that the list has expired.
    pub fn load(
        &self,
        bytes: &[u8],
        ca: &CaKey,
        source: &str,
        now_unix: i64,
    ) -> Result<Offered, RevocationError> {
        let list = match RevocationList::verify(bytes, ca) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("revocation list from {source} refused: {e}");
                return Err(e);
            }
        };
        let (seq, peers, names, expires) = (
            list.sequence,
            list.peers.len(),
            list.names.len(),
            list.expires_at,
        );
        let offered = self.offer(list);
        match offered {
            Offered::Installed { replaced } => {
                let was = replaced.map_or(String::new(), |r| format!(", replacing #{r}"));
                tracing::info!(
                    "revocation list #{seq} from {source} in force: {peers} peer id(s), {names} name(s){was}"
                );
                if expires <= now_unix {
                    tracing::warn!(
                        "revocation list #{seq} from {source} has expired: it stays in force \
                         (revocations are never dropped), but the CA should publish a new one \
                         (`sluice ca revoke --refresh`)"
                    );
                }
            }
            Offered::Same => {}
            Offered::Stale { current } => tracing::warn!(
                "revocation list #{seq} from {source} refused: list #{current} is in force, and \
                 a list never replaces a newer one"
            ),
        }
        Ok(offered)
    }

    /// Puts `list` (already verified) in force if it is newer than the one in force.
    pub fn offer(&self, list: RevocationList) -> Offered {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.as_ref() {
            Some(cur) if cur.raw == list.raw => Offered::Same,
            Some(cur) if cur.sequence >= list.sequence => Offered::Stale {
                current: cur.sequence,
            },
            cur => {
                let replaced = cur.map(|c| c.sequence);
                *g = Some(Arc::new(list));
                Offered::Installed { replaced }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{create_ca, identity_from_pem, issue, Role};
    use proptest::prelude::*;
    use std::time::Duration;

    fn draft(seq: u64, peers: &[PeerId], names: &[&str]) -> Draft {
        Draft {
            sequence: seq,
            issued_at: 1_800_000_000,
            expires_at: 1_800_000_000 + 86_400,
            peers: peers.iter().copied().collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn signed_lists_verify_and_revoke_by_key_or_name() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let alice = issue(&ca, Role::Agent, "alice", &[], Duration::from_secs(60)).unwrap();
        let bob = issue(&ca, Role::Agent, "bob", &[], Duration::from_secs(60)).unwrap();
        let carol = issue(&ca, Role::Agent, "carol", &[], Duration::from_secs(60)).unwrap();
        let (a, b, c) = (
            identity_from_pem(&alice.cert_pem).unwrap(),
            identity_from_pem(&bob.cert_pem).unwrap(),
            identity_from_pem(&carol.cert_pem).unwrap(),
        );
        let list =
            RevocationList::sign(&draft(3, &[a.peer_id], &["bob"]), &ca.cert_pem, &ca.key_pem)
                .unwrap();
        let key = CaKey::from_cert_pem(&ca.cert_pem).unwrap();
        let pem = list.to_pem();
        let back =
            RevocationList::verify(&RevocationList::bytes_from_pem(&pem).unwrap(), &key).unwrap();
        assert_eq!(back, list);
        assert_eq!(back.revokes(&a), Some(Revoked::Key));
        assert_eq!(back.revokes(&b), Some(Revoked::Name));
        assert_eq!(back.revokes(&c), None);
    }

    #[test]
    fn another_ca_or_a_changed_byte_is_refused() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let other = create_ca("evil", Duration::from_secs(3600)).unwrap();
        let key = CaKey::from_cert_pem(&ca.cert_pem).unwrap();
        let theirs =
            RevocationList::sign(&draft(9, &[], &["x"]), &other.cert_pem, &other.key_pem).unwrap();
        assert!(matches!(
            RevocationList::verify(theirs.encoded(), &key),
            Err(RevocationError::OtherCa { .. })
        ));
        // Their key, our id: the signature gives it away.
        let mut forged = theirs.encoded().to_vec();
        forged[5..37].copy_from_slice(&key.id);
        assert_eq!(
            RevocationList::verify(&forged, &key),
            Err(RevocationError::BadSignature)
        );
        let ours = RevocationList::sign(&draft(9, &[], &["x"]), &ca.cert_pem, &ca.key_pem).unwrap();
        let mut changed = ours.encoded().to_vec();
        changed[40] ^= 1; // the sequence number
        assert_eq!(
            RevocationList::verify(&changed, &key),
            Err(RevocationError::BadSignature)
        );
        // A key from another CA cannot sign for this certificate.
        assert!(matches!(
            RevocationList::sign(&draft(1, &[], &[]), &ca.cert_pem, &other.key_pem),
            Err(RevocationError::CaKey(_))
        ));
    }

    #[test]
    fn only_a_newer_list_replaces_the_one_in_force() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let sign = |seq, names: &[&str]| {
            RevocationList::sign(&draft(seq, &[], names), &ca.cert_pem, &ca.key_pem).unwrap()
        };
        let r = Revocations::default();
        assert_eq!(
            r.offer(sign(2, &["a"])),
            Offered::Installed { replaced: None }
        );
        assert_eq!(r.offer(sign(2, &["a"])), Offered::Same);
        assert_eq!(r.offer(sign(1, &[])), Offered::Stale { current: 2 });
        // Same number, other contents: refused too, or two lists could alternate.
        assert_eq!(r.offer(sign(2, &[])), Offered::Stale { current: 2 });
        assert_eq!(
            r.offer(sign(3, &[])),
            Offered::Installed { replaced: Some(2) }
        );
        assert_eq!(r.current().unwrap().sequence, 3);
    }

    #[test]
    fn limits_are_enforced() {
        let ca = create_ca("acme", Duration::from_secs(3600)).unwrap();
        let many: Vec<PeerId> = (0..2000u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                PeerId(id)
            })
            .collect();
        assert!(matches!(
            RevocationList::sign(&draft(1, &many, &[]), &ca.cert_pem, &ca.key_pem),
            Err(RevocationError::TooLarge(_))
        ));
        assert!(
            RevocationList::sign(&draft(1, &many[..1800], &[]), &ca.cert_pem, &ca.key_pem).is_ok()
        );
        assert_eq!(
            RevocationList::sign(&draft(1, &[], &["no/slash"]), &ca.cert_pem, &ca.key_pem),
            Err(RevocationError::BadName)
        );
        assert_eq!(
            RevocationList::bytes_from_pem(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            ),
            Err(RevocationError::Pem(
                "found a \"CERTIFICATE\" block, expected \"SLUICE REVOCATION LIST\"".into()
            ))
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics_and_reencodes(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(l) = RevocationList::parse_unverified(&b) {
                prop_assert_eq!(l.encoded(), &b[..]);
            }
        }

        #[test]
        fn lists_roundtrip(seq in any::<u64>(), n in 0usize..40, names in proptest::collection::btree_set("[a-z]{1,12}", 0..10)) {
            let ca = ca_for_props();
            let peers: Vec<PeerId> = (0..n).map(|i| PeerId([i as u8; 32])).collect();
            let d = Draft { sequence: seq, issued_at: -5, expires_at: i64::MAX, peers: peers.into_iter().collect(), names };
            let l = RevocationList::sign(&d, &ca.cert_pem, &ca.key_pem).unwrap();
            let key = CaKey::from_cert_pem(&ca.cert_pem).unwrap();
            let back = RevocationList::verify(l.encoded(), &key).unwrap();
            prop_assert_eq!(back.draft(), d);
        }
    }

    fn ca_for_props() -> &'static crate::identity::PemPair {
        static CA: std::sync::OnceLock<crate::identity::PemPair> = std::sync::OnceLock::new();
        CA.get_or_init(|| create_ca("props", Duration::from_secs(3600)).unwrap())
    }
}
