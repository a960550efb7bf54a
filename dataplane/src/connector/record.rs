//! The connector's signed record (`crate::connector_record`), for a relay that shares a
//! registry with others: signed when that relay asks for it (an empty
//! [`crate::wire::ControlMessage::ConnectorRecord`], sent only by relays sharing a registry, so
//! a relay on its own never sees a message it does not know), and again well before it
//! expires, so the registry always holds a live record signed by the connector's own key.
//!
//! Sans-IO: the connector tells it where it is connected ([`RecordPublisher::on_connected`]),
//! asks [`RecordPublisher::on_wanted`] and [`RecordPublisher::due`] for the bytes to send on
//! its control connection, and [`RecordPublisher::timeout`] for when to ask again.

use std::time::{Duration, Instant};

use crate::connector_record::{next_sequence, ConnectorRecord, RecordDraft, RecordError};
use crate::tls::Credentials;

/// How long a record is good for: a relay that lost the connector (and an attacker who kept a
/// copy) can use it this long at most.
pub const RECORD_LIFETIME: Duration = Duration::from_secs(600);
/// Signed anew this often, so a registry never holds one close to its expiry.
pub const REPUBLISH_EVERY: Duration = Duration::from_secs(180);

pub struct RecordPublisher {
    creds: Credentials,
    name: String,
    /// The relay it is connected to now (its certificate's name).
    home: Option<String>,
    last_sequence: Option<u64>,
    next_at: Option<Instant>,
}

impl RecordPublisher {
    pub fn new(creds: &Credentials) -> RecordPublisher {
        RecordPublisher {
            creds: creds.clone(),
            name: creds.identity.name.clone(),
            home: None,
            last_sequence: None,
            next_at: None,
        }
    }

    /// New credentials (a renewal): the next record carries the new certificate.
    pub fn set_credentials(&mut self, creds: &Credentials) {
        self.creds = creds.clone();
        self.name = creds.identity.name.clone();
        // Published at the next timer, with the new certificate inside.
        if self.home.is_some() {
            self.next_at = Some(Instant::now());
        }
    }

    /// The control connection to relay `relay` is up.
    pub fn on_connected(&mut self, relay: &str) {
        self.home = Some(relay.to_string());
        self.next_at = None;
    }

    /// The relay asked for our record: the one that homes us there.
    pub fn on_wanted(&mut self, now: Instant, unix_micros: i64) -> Result<Vec<u8>, RecordError> {
        self.sign(now, unix_micros)
    }

    /// The control connection is gone: nothing to publish until the next one.
    pub fn on_disconnected(&mut self) {
        self.home = None;
        self.next_at = None;
    }

    /// A fresh record, when it is time for one.
    pub fn due(&mut self, now: Instant, unix_micros: i64) -> Option<Result<Vec<u8>, RecordError>> {
        match self.next_at {
            Some(t) if now >= t && self.home.is_some() => Some(self.sign(now, unix_micros)),
            _ => None,
        }
    }

    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.next_at.map(|t| t.saturating_duration_since(now))
    }

    fn sign(&mut self, now: Instant, unix_micros: i64) -> Result<Vec<u8>, RecordError> {
        let Some(home) = self.home.clone() else {
            return Err(RecordError::BadField("home relay"));
        };
        // Tried again a little later if it failed (it does not, with a usable key).
        self.next_at = Some(now + REPUBLISH_EVERY);
        let sequence = next_sequence(unix_micros, self.last_sequence);
        let draft = RecordDraft {
            name: self.name.clone(),
            home_relay: home,
            sequence,
            expires_at: unix_micros.div_euclid(1_000_000) + RECORD_LIFETIME.as_secs() as i64,
        };
        let rec = ConnectorRecord::sign(&draft, &self.creds)?;
        self.last_sequence = Some(sequence);
        Ok(rec.encoded().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{create_ca, issue, unix_now, Role};
    use crate::tls::PeerCheck;

    fn creds() -> (Credentials, PeerCheck) {
        let ca = create_ca("example", Duration::from_secs(7200)).unwrap();
        let node = issue(&ca, Role::Connector, "db", &[], Duration::from_secs(3600)).unwrap();
        let c = Credentials::from_pem(
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
            ca.cert_pem.as_bytes(),
            ["cert", "key", "ca"],
        )
        .unwrap();
        let check = c.peer_check().unwrap();
        (c, check)
    }

    #[test]
    fn records_name_the_relay_grow_in_sequence_and_come_again_before_expiry() {
        let (c, check) = creds();
        let mut p = RecordPublisher::new(&c);
        let t0 = Instant::now();
        let unix = unix_now() * 1_000_000;
        assert!(p.due(t0, unix).is_none(), "nothing before a connection");
        assert!(p.on_wanted(t0, unix).is_err(), "nowhere to be homed yet");
        p.on_connected("relay-a");
        assert!(p.due(t0, unix).is_none(), "nothing until the relay asks");
        assert_eq!(p.timeout(t0), None);
        let a = p.on_wanted(t0, unix).unwrap();
        let ra = ConnectorRecord::verify(&a, &check, unix_now()).unwrap();
        assert_eq!(ra.home_relay, "relay-a");
        assert_eq!(ra.name, c.identity.name);
        assert!(ra.expires_at >= unix_now() + 590);
        assert!(p.due(t0 + Duration::from_secs(10), unix).is_none());
        assert_eq!(p.timeout(t0), Some(REPUBLISH_EVERY));
        // The same clock reading again: the sequence still grows.
        let b = p.due(t0 + REPUBLISH_EVERY, unix).unwrap().unwrap();
        let rb = ConnectorRecord::verify(&b, &check, unix_now()).unwrap();
        assert!(rb.sequence > ra.sequence);
        p.on_disconnected();
        assert!(p.due(t0 + 3 * REPUBLISH_EVERY, unix).is_none());
        assert_eq!(p.timeout(t0), None);
        p.on_connected("relay-b");
        let c2 = p.on_wanted(t0, unix).unwrap();
        let rc = ConnectorRecord::verify(&c2, &check, unix_now()).unwrap();
        assert_eq!(rc.home_relay, "relay-b");
        assert!(rc.sequence > rb.sequence);
    }
}
