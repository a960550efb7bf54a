//! Signed connector records: where a connector is homed, in words only its own key can say.
//!
//! With several relays sharing a registry (etcd), the registry says which relay a connector is
//! homed on. A registry entry could be wrong, stale or replayed (a relay that lost track, an
//! operator's mistake, an attacker who can write to the store): so the connector signs its
//! record itself, and agents and relays verify it (seed 001's BEP 44 idea). The record carries
//! the connector's certificate, so a verifier needs only the organisation CA: the CA vouches
//! for the name and the key, the key for the rest. The sequence number is a microsecond
//! timestamp and only grows ([`next_sequence`]); a holder keeps the newest record per name
//! ([`RecordBook`]) and refuses an older or equal one, and the expiry inside the signed bytes
//! bounds how long a replay of the newest record could mislead anyone who never saw a newer.
//!
//! Wire format, version 1 (integers big-endian, times Unix seconds):
//!
//! ```text
//! "SLCR" | version u8 | sequence u64 (µs) | expires at i64
//!        | name length u8, name | home relay length u8, home relay
//!        | certificate length u16, certificate DER
//!        | Ed25519 signature [64] by the certificate's key over every byte before it
//! ```

use std::collections::HashMap;

use crate::identity::{validate_name, PeerId, Role};
use crate::reader::{Reader, Truncated};
use crate::tls::{Credentials, PeerCheck, RenewalError};

const MAGIC: &[u8; 4] = b"SLCR";
pub const VERSION: u8 = 1;
const SIGNATURE_LEN: usize = 64;
/// Largest encoded record: a certificate with many groups fits, a registry value stays small.
pub const MAX_ENCODED: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a Sluice connector record (bad magic)")]
    Magic,
    #[error("connector record version {0} is not supported (this build reads version {VERSION})")]
    Version(u8),
    #[error("connector record truncated")]
    Truncated,
    #[error("connector record has {0} trailing bytes")]
    Trailing(usize),
    #[error("connector record too large ({0} bytes; at most {MAX_ENCODED})")]
    TooLarge(usize),
    #[error("connector record has an invalid {0}")]
    BadField(&'static str),
    #[error("connector record's certificate refused: {0}")]
    Certificate(RenewalError),
    #[error("connector record is signed by a {0}, not a connector")]
    NotAConnector(Role),
    #[error("connector record for {record:?} carries the certificate of {cert:?}")]
    OtherName { record: String, cert: String },
    #[error("connector record signature does not verify against its certificate's key")]
    BadSignature,
    #[error("connector record expired at {0} (Unix seconds)")]
    Expired(i64),
    #[error("connector record #{got} is not newer than #{have}, which is already known (a replay or a stale copy)")]
    NotNewer { got: u64, have: u64 },
    #[error("cannot sign a connector record: {0}")]
    Sign(String),
}

impl From<Truncated> for RecordError {
    fn from(_: Truncated) -> Self {
        RecordError::Truncated
    }
}

/// What a connector says in its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDraft {
    pub name: String,
    /// The relay it is homed on (the relay's certificate name).
    pub home_relay: String,
    /// A microsecond timestamp: see [`next_sequence`].
    pub sequence: u64,
    /// Unix seconds after which nobody takes the record.
    pub expires_at: i64,
}

/// A record as it was signed; `raw` is exactly what was signed and travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorRecord {
    pub name: String,
    pub home_relay: String,
    pub sequence: u64,
    pub expires_at: i64,
    /// The key of the certificate inside (checked only by [`ConnectorRecord::verify`]).
    pub peer_id: PeerId,
    cert_der: Vec<u8>,
    raw: Vec<u8>,
}

/// The sequence number for a record signed at `unix_micros`, after one numbered `last`: the
/// clock, or one more than the last when the clock stepped back.
pub fn next_sequence(unix_micros: i64, last: Option<u64>) -> u64 {
    let now = unix_micros.max(0) as u64;
    match last {
        Some(l) if l >= now => l.saturating_add(1),
        _ => now,
    }
}

fn encode_body(d: &RecordDraft, cert_der: &[u8]) -> Result<Vec<u8>, RecordError> {
    validate_name(&d.name).map_err(|_| RecordError::BadField("name"))?;
    validate_name(&d.home_relay).map_err(|_| RecordError::BadField("home relay"))?;
    let cert_len = u16::try_from(cert_der.len()).map_err(|_| RecordError::TooLarge(usize::MAX))?;
    let mut out = Vec::with_capacity(
        4 + 1 + 16 + 2 + d.name.len() + d.home_relay.len() + 2 + cert_der.len() + SIGNATURE_LEN,
    );
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&d.sequence.to_be_bytes());
    out.extend_from_slice(&d.expires_at.to_be_bytes());
    // validate_name bounds names well under 256 bytes.
    out.push(d.name.len() as u8);
    out.extend_from_slice(d.name.as_bytes());
    out.push(d.home_relay.len() as u8);
    out.extend_from_slice(d.home_relay.as_bytes());
    out.extend_from_slice(&cert_len.to_be_bytes());
    out.extend_from_slice(cert_der);
    if out.len() + SIGNATURE_LEN > MAX_ENCODED {
        return Err(RecordError::TooLarge(out.len() + SIGNATURE_LEN));
    }
    Ok(out)
}

fn name_field(r: &mut Reader<'_>, what: &'static str) -> Result<String, RecordError> {
    let len = usize::from(r.u8()?);
    let s = std::str::from_utf8(r.take(len)?).map_err(|_| RecordError::BadField(what))?;
    validate_name(s).map_err(|_| RecordError::BadField(what))?;
    Ok(s.to_string())
}

impl ConnectorRecord {
    /// Signs `draft` with the connector's own credentials.
    pub fn sign(draft: &RecordDraft, creds: &Credentials) -> Result<ConnectorRecord, RecordError> {
        if creds.identity.role != Role::Connector {
            return Err(RecordError::NotAConnector(creds.identity.role));
        }
        if creds.identity.name != draft.name {
            return Err(RecordError::OtherName {
                record: draft.name.clone(),
                cert: creds.identity.name.clone(),
            });
        }
        let cert_der = creds
            .certificate_der()
            .map_err(|e| RecordError::Sign(e.to_string()))?;
        let mut raw = encode_body(draft, &cert_der)?;
        let sig = creds
            .sign(&raw)
            .map_err(|e| RecordError::Sign(e.to_string()))?;
        if sig.len() != SIGNATURE_LEN {
            return Err(RecordError::Sign(format!(
                "the key made a {}-byte signature; records take Ed25519 keys",
                sig.len()
            )));
        }
        raw.extend_from_slice(&sig);
        Ok(ConnectorRecord {
            name: draft.name.clone(),
            home_relay: draft.home_relay.clone(),
            sequence: draft.sequence,
            expires_at: draft.expires_at,
            peer_id: creds.identity.peer_id,
            cert_der,
            raw,
        })
    }

    /// Reads a record without checking anything but its shape (for display and fuzzing);
    /// everyone who acts on one uses [`ConnectorRecord::verify`].
    pub fn parse_unverified(b: &[u8]) -> Result<ConnectorRecord, RecordError> {
        if b.len() > MAX_ENCODED {
            return Err(RecordError::TooLarge(b.len()));
        }
        let mut r = Reader(b);
        if r.take(4).map_err(|_| RecordError::Magic)? != MAGIC {
            return Err(RecordError::Magic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        let sequence = r.u64()?;
        let expires_at = r.u64()? as i64;
        let name = name_field(&mut r, "name")?;
        let home_relay = name_field(&mut r, "home relay")?;
        let cert_len = usize::from(r.u16()?);
        let cert_der = r.take(cert_len)?.to_vec();
        r.take(SIGNATURE_LEN)?;
        if r.remaining() > 0 {
            return Err(RecordError::Trailing(r.remaining()));
        }
        let peer_id = crate::identity::identity_from_der(&cert_der)
            .map(|id| id.peer_id)
            .map_err(|_| RecordError::BadField("certificate"))?;
        Ok(ConnectorRecord {
            name,
            home_relay,
            sequence,
            expires_at,
            peer_id,
            cert_der,
            raw: b.to_vec(),
        })
    }

    /// Reads a record and checks it: its certificate is a connector's, from our CA, valid and
    /// not revoked at `now_unix`, for the record's name; the certificate's key signed it; it
    /// has not expired.
    pub fn verify(
        b: &[u8],
        check: &PeerCheck,
        now_unix: i64,
    ) -> Result<ConnectorRecord, RecordError> {
        let rec = Self::parse_unverified(b)?;
        let (id, key) = check
            .certificate(&rec.cert_der, now_unix)
            .map_err(RecordError::Certificate)?;
        if id.role != Role::Connector {
            return Err(RecordError::NotAConnector(id.role));
        }
        if id.name != rec.name {
            return Err(RecordError::OtherName {
                record: rec.name,
                cert: id.name,
            });
        }
        let (body, sig) = b.split_at(b.len() - SIGNATURE_LEN);
        let ok = boring::sign::Verifier::new_without_digest(&key)
            .and_then(|mut v| v.verify_oneshot(sig, body))
            .unwrap_or(false);
        if !ok {
            return Err(RecordError::BadSignature);
        }
        if now_unix > rec.expires_at {
            return Err(RecordError::Expired(rec.expires_at));
        }
        Ok(rec)
    }

    /// The bytes that travel and are stored.
    pub fn encoded(&self) -> &[u8] {
        &self.raw
    }

    pub fn draft(&self) -> RecordDraft {
        RecordDraft {
            name: self.name.clone(),
            home_relay: self.home_relay.clone(),
            sequence: self.sequence,
            expires_at: self.expires_at,
        }
    }
}

/// What [`RecordBook::offer`] did with a verified record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The first record for that name.
    New,
    /// It replaced an older one; the home relay moved when `moved`.
    Newer { moved: bool },
}

/// The newest verified record per connector name, as an agent or a relay holds them.
#[derive(Debug, Default)]
pub struct RecordBook {
    records: HashMap<String, ConnectorRecord>,
}

impl RecordBook {
    /// Takes a record [`ConnectorRecord::verify`] accepted, unless one with the same or a
    /// higher sequence number is already held (a replay, or a copy older than what is known).
    pub fn offer(&mut self, rec: ConnectorRecord, now_unix: i64) -> Result<Taken, RecordError> {
        if now_unix > rec.expires_at {
            return Err(RecordError::Expired(rec.expires_at));
        }
        let taken = match self.records.get(&rec.name) {
            Some(have) if have.sequence >= rec.sequence => {
                return Err(RecordError::NotNewer {
                    got: rec.sequence,
                    have: have.sequence,
                })
            }
            Some(have) => Taken::Newer {
                moved: have.home_relay != rec.home_relay,
            },
            None => Taken::New,
        };
        self.records.insert(rec.name.clone(), rec);
        Ok(taken)
    }

    /// The record for `name`, unless it has expired by `now_unix`.
    pub fn get(&self, name: &str, now_unix: i64) -> Option<&ConnectorRecord> {
        self.records.get(name).filter(|r| now_unix <= r.expires_at)
    }

    /// Forgets expired records. Their sequence numbers go with them: a replay of one is then
    /// refused for its expiry instead.
    pub fn sweep(&mut self, now_unix: i64) {
        self.records.retain(|_, r| now_unix <= r.expires_at);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{create_ca, issue, unix_now, PemPair};
    use crate::revocation::{Draft, RevocationList};
    use proptest::prelude::*;
    use std::sync::OnceLock;
    use std::time::Duration;

    struct Org {
        ca: PemPair,
        connector: Credentials,
        other_connector: Credentials,
        agent: Credentials,
        /// Another organisation's connector of the same name.
        foreign: Credentials,
    }

    fn creds(ca: &PemPair, role: Role, name: &str) -> Credentials {
        let node = issue(ca, role, name, &[], Duration::from_secs(3600)).unwrap();
        Credentials::from_pem(
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
            ca.cert_pem.as_bytes(),
            ["cert", "key", "ca"],
        )
        .unwrap()
    }

    fn org() -> &'static Org {
        static ORG: OnceLock<Org> = OnceLock::new();
        ORG.get_or_init(|| {
            let ca = create_ca("example", Duration::from_secs(7200)).unwrap();
            let other = create_ca("other", Duration::from_secs(7200)).unwrap();
            Org {
                connector: creds(&ca, Role::Connector, "db-connector"),
                other_connector: creds(&ca, Role::Connector, "web-connector"),
                agent: creds(&ca, Role::Agent, "db-connector"),
                foreign: creds(&other, Role::Connector, "db-connector"),
                ca,
            }
        })
    }

    fn draft(seq: u64, expires_at: i64) -> RecordDraft {
        RecordDraft {
            name: "db-connector".into(),
            home_relay: "relay-eu-1".into(),
            sequence: seq,
            expires_at,
        }
    }

    fn check() -> PeerCheck {
        org().connector.peer_check().unwrap()
    }

    #[test]
    fn a_signed_record_verifies_and_reads_back_what_was_signed() {
        let now = unix_now();
        let rec = ConnectorRecord::sign(&draft(7, now + 300), &org().connector).unwrap();
        let back = ConnectorRecord::verify(rec.encoded(), &check(), now).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.draft(), draft(7, now + 300));
        assert_eq!(back.peer_id, org().connector.identity.peer_id);
    }

    #[test]
    fn forged_foreign_expired_and_misnamed_records_are_refused() {
        let now = unix_now();
        let check = check();
        // Another organisation's connector of the same name.
        let foreign = ConnectorRecord::sign(&draft(1, now + 300), &org().foreign).unwrap();
        assert_eq!(
            ConnectorRecord::verify(foreign.encoded(), &check, now),
            Err(RecordError::Certificate(RenewalError::NotSignedByCa))
        );
        // A record naming one connector signed by another: refused when signing, and when a
        // forger puts another connector's certificate in front of its own signature.
        assert!(matches!(
            ConnectorRecord::sign(&draft(1, now + 300), &org().other_connector),
            Err(RecordError::OtherName { .. })
        ));
        let mine = ConnectorRecord::sign(&draft(1, now + 300), &org().connector).unwrap();
        let theirs = ConnectorRecord::sign(
            &RecordDraft {
                name: "web-connector".into(),
                ..draft(1, now + 300)
            },
            &org().other_connector,
        )
        .unwrap();
        let mut forged = mine.encoded()[..mine.encoded().len() - SIGNATURE_LEN].to_vec();
        forged.extend_from_slice(&theirs.encoded()[theirs.encoded().len() - SIGNATURE_LEN..]);
        assert_eq!(
            ConnectorRecord::verify(&forged, &check, now),
            Err(RecordError::BadSignature)
        );
        // An agent's certificate cannot speak for a connector.
        assert_eq!(
            ConnectorRecord::sign(&draft(1, now + 300), &org().agent),
            Err(RecordError::NotAConnector(Role::Agent))
        );
        let expired = ConnectorRecord::sign(&draft(2, now - 1), &org().connector).unwrap();
        assert_eq!(
            ConnectorRecord::verify(expired.encoded(), &check, now),
            Err(RecordError::Expired(now - 1))
        );
    }

    #[test]
    fn a_revoked_connectors_record_is_refused() {
        let now = unix_now();
        // Credentials of their own: their revocation handle is not the other tests'.
        let creds = creds(&org().ca, Role::Connector, "db-connector");
        let rec = ConnectorRecord::sign(&draft(1, now + 300), &creds).unwrap();
        let list = RevocationList::sign(
            &Draft {
                sequence: 1,
                issued_at: now,
                expires_at: now + 3600,
                peers: Default::default(),
                names: ["db-connector".to_string()].into(),
            },
            &org().ca.cert_pem,
            &org().ca.key_pem,
        )
        .unwrap();
        creds.revocations.offer(list);
        let check = creds.peer_check().unwrap();
        assert!(matches!(
            ConnectorRecord::verify(rec.encoded(), &check, now),
            Err(RecordError::Certificate(RenewalError::Revoked(1, _)))
        ));
    }

    #[test]
    fn the_book_keeps_the_newest_record_and_refuses_replays() {
        let now = unix_now();
        let sign = |seq, relay: &str, exp| {
            ConnectorRecord::sign(
                &RecordDraft {
                    home_relay: relay.into(),
                    ..draft(seq, exp)
                },
                &org().connector,
            )
            .unwrap()
        };
        let mut book = RecordBook::default();
        assert_eq!(
            book.offer(sign(10, "relay-a", now + 60), now),
            Ok(Taken::New)
        );
        assert_eq!(
            book.offer(sign(20, "relay-b", now + 60), now),
            Ok(Taken::Newer { moved: true })
        );
        // The old record again (a replay), and one of the same number.
        assert_eq!(
            book.offer(sign(10, "relay-a", now + 60), now),
            Err(RecordError::NotNewer { got: 10, have: 20 })
        );
        assert_eq!(
            book.offer(sign(20, "relay-a", now + 60), now),
            Err(RecordError::NotNewer { got: 20, have: 20 })
        );
        assert_eq!(book.get("db-connector", now).unwrap().home_relay, "relay-b");
        // Past its expiry the record is not used, then forgotten.
        assert!(book.get("db-connector", now + 61).is_none());
        book.sweep(now + 61);
        assert!(book.is_empty());
        assert_eq!(
            book.offer(sign(30, "relay-a", now + 60), now + 61),
            Err(RecordError::Expired(now + 60))
        );
    }

    #[test]
    fn sequence_numbers_only_grow() {
        assert_eq!(next_sequence(1_000, None), 1_000);
        assert_eq!(next_sequence(1_000, Some(999)), 1_000);
        // The clock stepped back.
        assert_eq!(next_sequence(500, Some(1_000)), 1_001);
        assert_eq!(next_sequence(-5, None), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn any_record_round_trips_and_any_changed_byte_is_refused(
            relay in "[a-z][a-z0-9-]{0,30}",
            seq in any::<u64>(),
            ttl in 1i64..1_000_000,
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let now = unix_now();
            let d = RecordDraft { home_relay: relay, ..draft(seq, now + ttl) };
            let rec = ConnectorRecord::sign(&d, &org().connector).unwrap();
            let raw = rec.encoded();
            let back = ConnectorRecord::verify(raw, &check(), now).unwrap();
            prop_assert_eq!(back.draft(), d);
            let mut bad = raw.to_vec();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(ConnectorRecord::verify(&bad, &check(), now).is_err());
            for cut in [0, 4, raw.len() / 2, raw.len() - 1] {
                prop_assert!(ConnectorRecord::parse_unverified(&raw[..cut]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_parser(b in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = ConnectorRecord::parse_unverified(&b);
            let _ = ConnectorRecord::verify(&b, &check(), unix_now());
        }
    }
}
