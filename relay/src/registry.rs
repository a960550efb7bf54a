//! The relays' shared registry, as one relay holds it: a cache of the keys under the
//! registry's prefix in etcd, filled by one read and kept by the watch that follows it.
//!
//! Sans-IO: the host reads and watches etcd and feeds what it gets here; the packet path asks
//! this cache and never waits on etcd, so forwarding goes on from the cache while etcd is
//! unreachable. Layout under the prefix (`/sluice/` by default):
//!
//! - `relays/NAME`: a relay's own record ([`RelayRecord`], JSON with a version field), under
//!   that relay's lease, so it goes when the relay dies;
//! - `connectors/NAME`: the connector's signed record (`SLCR`, see
//!   `sluice_dataplane::connector_record`), put by the relay it is connected to, under that
//!   relay's lease.
//!
//! A connector record is taken only when it verifies (our CA, a connector's certificate for
//! that name, its own signature, not expired) and is newer than any seen for the name; one
//! that was deleted (its relay's lease ran out) leaves its sequence number behind until it
//! expires, so a replay of it is refused even then. Events below the revision already applied
//! are skipped (a watch restarted from an older revision repeats them); several at one
//! revision (a lease that ran out deletes all its keys at once) all apply.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use sluice_dataplane::connector_record::{ConnectorRecord, RecordBook, RecordError, Taken};
use sluice_dataplane::identity::{validate_name, PeerId};
use sluice_dataplane::tls::PeerCheck;

pub const RELAYS: &str = "relays/";
pub const CONNECTORS: &str = "connectors/";
/// The version of [`RelayRecord`] this build writes and reads.
pub const RELAY_RECORD_VERSION: u8 = 1;
/// Largest value the registry takes (a relay record is a few hundred bytes).
pub const MAX_VALUE: usize = 8192;

/// What a relay says of itself in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRecord {
    pub version: u8,
    /// Its certificate's name.
    pub name: String,
    pub region: String,
    /// Where other relays open their relay-to-relay links.
    pub mesh_addr: SocketAddr,
    /// Where agents and connectors connect.
    pub client_addr: SocketAddr,
    /// SHA-256 of its certificate's public key (its peer id), hex: what another relay expects
    /// to see at `mesh_addr`.
    pub peer_id: String,
}

impl RelayRecord {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and addresses always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<RelayRecord, RegistryError> {
        if b.len() > MAX_VALUE {
            return Err(RegistryError::TooLarge(b.len()));
        }
        let r: RelayRecord =
            serde_json::from_slice(b).map_err(|e| RegistryError::BadRelayRecord(e.to_string()))?;
        if r.version != RELAY_RECORD_VERSION {
            return Err(RegistryError::BadRelayRecord(format!(
                "version {} (this build reads {RELAY_RECORD_VERSION})",
                r.version
            )));
        }
        validate_name(&r.name).map_err(|e| RegistryError::BadRelayRecord(e.to_string()))?;
        if r.peer_id.len() != 64 || !r.peer_id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(RegistryError::BadRelayRecord(
                "peer_id is not 64 hex digits".into(),
            ));
        }
        Ok(r)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry key {0:?} is not one of ours")]
    UnknownKey(String),
    #[error("registry value of {0} bytes (at most {MAX_VALUE})")]
    TooLarge(usize),
    #[error("bad relay record: {0}")]
    BadRelayRecord(String),
    #[error("relay record under {key:?} names {name:?}")]
    KeyMismatch { key: String, name: String },
    #[error("connector record refused: {0}")]
    Connector(RecordError),
}

/// One key's change, as a watch reports it (or the first read, as puts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        mod_revision: i64,
    },
    Delete {
        key: Vec<u8>,
        mod_revision: i64,
    },
}

/// What changed in the cache, for the relay to act on (open or close relay links, tell
/// agents where a connector went) and to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    RelayUp(RelayRecord),
    RelayGone(String),
    ConnectorHomed { name: String, relay: String },
    ConnectorGone(String),
}

enum Key<'a> {
    Relay(&'a str),
    Connector(&'a str),
}

pub struct Registry {
    prefix: String,
    /// The revision the cache is at: a watch resumes after it.
    revision: i64,
    relays: HashMap<String, RelayRecord>,
    /// Connectors whose key exists now, and the relay their record names.
    homed: HashMap<String, String>,
    /// The newest verified record per connector, kept after its key goes (against replays).
    records: RecordBook,
    /// Connectors whose key exists now, by the peer id of their record's certificate.
    by_peer: HashMap<PeerId, String>,
    check: PeerCheck,
}

impl Registry {
    /// An empty cache for the keys under `prefix` (ending in `/`), checking connector records
    /// with `check` (the relay's CA and revocation list).
    pub fn new(prefix: &str, check: PeerCheck) -> Registry {
        Registry {
            prefix: prefix.to_string(),
            revision: 0,
            relays: HashMap::new(),
            homed: HashMap::new(),
            records: RecordBook::default(),
            by_peer: HashMap::new(),
            check,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The key of a relay's record, and of a connector's.
    pub fn relay_key(&self, name: &str) -> String {
        format!("{}{RELAYS}{name}", self.prefix)
    }

    pub fn connector_key(&self, name: &str) -> String {
        format!("{}{CONNECTORS}{name}", self.prefix)
    }

    /// The first read (or a read again after the watch was lost): every key under the prefix
    /// at `revision`. What the cache held and the read lacks is gone.
    pub fn load(
        &mut self,
        kvs: Vec<(Vec<u8>, Vec<u8>, i64)>,
        revision: i64,
        now_unix: i64,
    ) -> (Vec<Change>, Vec<RegistryError>) {
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        let old_relays = std::mem::take(&mut self.relays);
        let old_homed = std::mem::take(&mut self.homed);
        self.by_peer.clear();
        for (key, value, _) in kvs {
            match self.put(&key, &value, now_unix) {
                Ok(Some(c)) => changes.push(c),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        // A key that is there as it was is no change; one that went is.
        changes.retain(|c| match c {
            Change::RelayUp(r) => old_relays.get(&r.name) != Some(r),
            Change::ConnectorHomed { name, relay } => old_homed.get(name) != Some(relay),
            _ => true,
        });
        for name in old_relays.into_keys() {
            if !self.relays.contains_key(&name) {
                changes.push(Change::RelayGone(name));
            }
        }
        for name in old_homed.into_keys() {
            if !self.homed.contains_key(&name) {
                changes.push(Change::ConnectorGone(name));
            }
        }
        self.revision = revision;
        (changes, errors)
    }

    /// A watch event. Events not after the cache's revision were applied already.
    pub fn apply(&mut self, ev: Event, now_unix: i64) -> Result<Option<Change>, RegistryError> {
        let rev = match &ev {
            Event::Put { mod_revision, .. } | Event::Delete { mod_revision, .. } => *mod_revision,
        };
        // Older than the cache: a watch restarted from an older revision repeats it. The
        // same revision is no repeat: one transaction, or one lease running out, changes
        // several keys at one revision (and applying an event twice changes nothing).
        if rev < self.revision {
            return Ok(None);
        }
        self.revision = rev;
        match ev {
            Event::Put { key, value, .. } => self.put(&key, &value, now_unix),
            Event::Delete { key, .. } => self.delete(&key),
        }
    }

    fn parse_key<'k>(&self, key: &'k [u8]) -> Result<Key<'k>, RegistryError> {
        let unknown = || RegistryError::UnknownKey(String::from_utf8_lossy(key).into_owned());
        let k = std::str::from_utf8(key).map_err(|_| unknown())?;
        let rest = k.strip_prefix(self.prefix.as_str()).ok_or_else(unknown)?;
        let (kind, name) = if let Some(n) = rest.strip_prefix(RELAYS) {
            (Key::Relay(n), n)
        } else if let Some(n) = rest.strip_prefix(CONNECTORS) {
            (Key::Connector(n), n)
        } else {
            return Err(unknown());
        };
        validate_name(name).map_err(|_| unknown())?;
        Ok(kind)
    }

    fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        now_unix: i64,
    ) -> Result<Option<Change>, RegistryError> {
        match self.parse_key(key)? {
            Key::Relay(name) => {
                let r = RelayRecord::decode(value)?;
                if r.name != name {
                    return Err(RegistryError::KeyMismatch {
                        key: name.to_string(),
                        name: r.name,
                    });
                }
                if self.relays.get(name) == Some(&r) {
                    return Ok(None);
                }
                self.relays.insert(name.to_string(), r.clone());
                Ok(Some(Change::RelayUp(r)))
            }
            Key::Connector(name) => {
                if value.len() > MAX_VALUE {
                    return Err(RegistryError::TooLarge(value.len()));
                }
                let rec = ConnectorRecord::verify(value, &self.check, now_unix)
                    .map_err(RegistryError::Connector)?;
                if rec.name != name {
                    return Err(RegistryError::Connector(RecordError::OtherName {
                        record: rec.name,
                        cert: name.to_string(),
                    }));
                }
                let relay = rec.home_relay.clone();
                let peer = rec.peer_id;
                // The same record put again (its relay registered it anew) is no replay.
                let same = self
                    .records
                    .get(name, now_unix)
                    .is_some_and(|r| r.encoded() == rec.encoded());
                if !same {
                    match self.records.offer(rec, now_unix) {
                        Ok(Taken::New | Taken::Newer { .. }) => {}
                        Err(e) => return Err(RegistryError::Connector(e)),
                    }
                }
                self.by_peer.retain(|_, n| n != name);
                self.by_peer.insert(peer, name.to_string());
                if self.homed.get(name) == Some(&relay) {
                    return Ok(None);
                }
                self.homed.insert(name.to_string(), relay.clone());
                Ok(Some(Change::ConnectorHomed {
                    name: name.to_string(),
                    relay,
                }))
            }
        }
    }

    fn delete(&mut self, key: &[u8]) -> Result<Option<Change>, RegistryError> {
        Ok(match self.parse_key(key)? {
            Key::Relay(name) => self.relays.remove(name).map(|r| Change::RelayGone(r.name)),
            Key::Connector(name) => {
                self.by_peer.retain(|_, n| n != name);
                self.homed
                    .remove(name)
                    .map(|_| Change::ConnectorGone(name.to_string()))
            }
        })
    }

    /// The relay a connector is homed on, while its record holds.
    pub fn home_of(&self, connector: &str, now_unix: i64) -> Option<&RelayRecord> {
        self.homed.get(connector)?;
        let rec = self.records.get(connector, now_unix)?;
        self.relays.get(&rec.home_relay)
    }

    /// The relay the connector with this peer id is homed on, while its record holds.
    pub fn home_of_peer(&self, peer: &PeerId, now_unix: i64) -> Option<&RelayRecord> {
        let name = self.by_peer.get(peer)?;
        let rec = self.records.get(name, now_unix)?;
        if rec.peer_id != *peer {
            return None;
        }
        self.home_of(name, now_unix)
    }

    /// A relay's record, by name.
    pub fn relay(&self, name: &str) -> Option<&RelayRecord> {
        self.relays.get(name)
    }

    /// The connector's record in force (what an agent is handed to verify itself).
    pub fn record_of(&self, connector: &str, now_unix: i64) -> Option<&ConnectorRecord> {
        self.homed.get(connector)?;
        self.records.get(connector, now_unix)
    }

    pub fn relays(&self) -> impl Iterator<Item = &RelayRecord> {
        self.relays.values()
    }

    /// Every connector whose key is in the registry now, with the relay its record names.
    pub fn connectors(&self) -> impl Iterator<Item = (&str, &str)> {
        self.homed.iter().map(|(c, r)| (c.as_str(), r.as_str()))
    }

    /// Forgets records past their expiry (their replays are refused as expired from then on).
    pub fn sweep(&mut self, now_unix: i64) {
        self.records.sweep(now_unix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_dataplane::connector_record::RecordDraft;
    use sluice_dataplane::identity::{create_ca, issue, unix_now, Role};
    use sluice_dataplane::tls::Credentials;
    use std::sync::OnceLock;
    use std::time::Duration;

    struct Org {
        db: Credentials,
    }

    fn org() -> &'static Org {
        static ORG: OnceLock<Org> = OnceLock::new();
        ORG.get_or_init(|| {
            let ca = create_ca("example", Duration::from_secs(7200)).unwrap();
            let node = issue(&ca, Role::Connector, "db", &[], Duration::from_secs(3600)).unwrap();
            let db = Credentials::from_pem(
                node.cert_pem.as_bytes(),
                node.key_pem.as_bytes(),
                ca.cert_pem.as_bytes(),
                ["cert", "key", "ca"],
            )
            .unwrap();
            Org { db }
        })
    }

    fn registry() -> Registry {
        Registry::new("/sluice/", org().db.peer_check().unwrap())
    }

    fn relay(name: &str, port: u16) -> RelayRecord {
        RelayRecord {
            version: 1,
            name: name.into(),
            region: "eu".into(),
            mesh_addr: SocketAddr::from(([10, 0, 0, 1], port)),
            client_addr: SocketAddr::from(([192, 0, 2, 1], port)),
            peer_id: "ab".repeat(32),
        }
    }

    fn record(seq: u64, relay: &str) -> Vec<u8> {
        let d = RecordDraft {
            name: "db".into(),
            home_relay: relay.into(),
            sequence: seq,
            expires_at: unix_now() + 600,
        };
        ConnectorRecord::sign(&d, &org().db)
            .unwrap()
            .encoded()
            .to_vec()
    }

    fn put(
        r: &mut Registry,
        key: &str,
        value: Vec<u8>,
        rev: i64,
    ) -> Result<Option<Change>, RegistryError> {
        let key = format!("/sluice/{key}").into_bytes();
        r.apply(
            Event::Put {
                key,
                value,
                mod_revision: rev,
            },
            unix_now(),
        )
    }

    fn delete(r: &mut Registry, key: &str, rev: i64) -> Option<Change> {
        let key = format!("/sluice/{key}").into_bytes();
        r.apply(
            Event::Delete {
                key,
                mod_revision: rev,
            },
            unix_now(),
        )
        .unwrap()
    }

    #[test]
    fn a_connector_is_found_on_its_relay_and_goes_with_its_key() {
        let mut r = registry();
        let now = unix_now();
        assert_eq!(
            put(&mut r, "relays/a", relay("a", 1).encode(), 1),
            Ok(Some(Change::RelayUp(relay("a", 1))))
        );
        assert_eq!(
            put(&mut r, "connectors/db", record(10, "a"), 2),
            Ok(Some(Change::ConnectorHomed {
                name: "db".into(),
                relay: "a".into()
            }))
        );
        assert_eq!(r.home_of("db", now).map(|x| x.name.as_str()), Some("a"));
        // Its relay's lease ran out: both keys go, at one revision.
        assert_eq!(
            delete(&mut r, "connectors/db", 3),
            Some(Change::ConnectorGone("db".into()))
        );
        assert_eq!(
            delete(&mut r, "relays/a", 3),
            Some(Change::RelayGone("a".into()))
        );
        assert!(r.home_of("db", now).is_none());
        assert_eq!(r.revision(), 3);
    }

    #[test]
    fn a_replayed_record_is_refused_even_after_its_key_went() {
        let mut r = registry();
        put(&mut r, "relays/a", relay("a", 1).encode(), 1).unwrap();
        put(&mut r, "relays/b", relay("b", 2).encode(), 2).unwrap();
        let old = record(10, "a");
        put(&mut r, "connectors/db", old.clone(), 3).unwrap();
        assert_eq!(
            put(&mut r, "connectors/db", record(20, "b"), 4),
            Ok(Some(Change::ConnectorHomed {
                name: "db".into(),
                relay: "b".into()
            }))
        );
        assert!(matches!(
            put(&mut r, "connectors/db", old.clone(), 5),
            Err(RegistryError::Connector(RecordError::NotNewer {
                got: 10,
                have: 20
            }))
        ));
        delete(&mut r, "connectors/db", 6);
        assert!(matches!(
            put(&mut r, "connectors/db", old, 7),
            Err(RegistryError::Connector(RecordError::NotNewer { .. }))
        ));
        // The newest one put again (its relay registered anew) is taken.
        let newest = r.records.get("db", unix_now()).unwrap().encoded().to_vec();
        assert_eq!(
            put(&mut r, "connectors/db", newest, 8),
            Ok(Some(Change::ConnectorHomed {
                name: "db".into(),
                relay: "b".into()
            }))
        );
    }

    #[test]
    fn bad_keys_and_values_are_refused_and_old_events_skipped() {
        let mut r = registry();
        assert!(matches!(
            put(&mut r, "other/x", vec![], 1),
            Err(RegistryError::UnknownKey(_))
        ));
        assert!(matches!(
            put(&mut r, "relays/a", b"{}".to_vec(), 2),
            Err(RegistryError::BadRelayRecord(_))
        ));
        assert!(matches!(
            put(&mut r, "relays/b", relay("a", 1).encode(), 3),
            Err(RegistryError::KeyMismatch { .. })
        ));
        assert!(matches!(
            put(&mut r, "connectors/web", record(1, "a"), 4),
            Err(RegistryError::Connector(RecordError::OtherName { .. }))
        ));
        let mut garbled = record(1, "a");
        let n = garbled.len();
        garbled[n - 1] ^= 1;
        assert!(matches!(
            put(&mut r, "connectors/db", garbled, 5),
            Err(RegistryError::Connector(RecordError::BadSignature))
        ));
        // A repeated event (a watch restarted from an older revision).
        put(&mut r, "relays/a", relay("a", 1).encode(), 6).unwrap();
        assert_eq!(delete(&mut r, "relays/a", 5), None);
        assert!(r.relays().any(|x| x.name == "a"));
    }

    #[test]
    fn a_read_again_reports_only_what_changed() {
        let mut r = registry();
        let kv = |k: &str, v: Vec<u8>| (format!("/sluice/{k}").into_bytes(), v, 1);
        let now = unix_now();
        let (c, e) = r.load(
            vec![
                kv("relays/a", relay("a", 1).encode()),
                kv("relays/b", relay("b", 2).encode()),
                kv("connectors/db", record(5, "a")),
            ],
            10,
            now,
        );
        assert!(e.is_empty());
        assert_eq!(c.len(), 3);
        // After a lost watch: b is gone, a is as it was, db moved to... nowhere (its key went).
        let (c, e) = r.load(vec![kv("relays/a", relay("a", 1).encode())], 20, now);
        assert!(e.is_empty());
        assert_eq!(
            c,
            vec![
                Change::RelayGone("b".into()),
                Change::ConnectorGone("db".into())
            ]
        );
        assert_eq!(r.revision(), 20);
    }
}
