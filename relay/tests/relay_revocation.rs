//! The relay core and revocation (issue 17), with real control clients in memory: a new list
//! closes the connections it revokes (CLOSE_REVOKED, counted as `Refusal::Revoked`) and is
//! handed to connectors (at once, and to those that connect later); a revoked client is
//! refused at the handshake with TLS alert 44; a renewed certificate keeps a connection past
//! the old one's expiry, and a renewal that does not fit is refused.

mod common;
use common::{load, params, pump, RELAY};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice_dataplane::control::{ControlClient, ControlEvent};
use sluice_dataplane::identity::{self, PeerId, PemPair, Role};
use sluice_dataplane::revocation::{CaKey, Draft, Offered, RevocationList};
use sluice_dataplane::session::QuicSession;
use sluice_dataplane::tls::{self, Credentials};
use sluice_dataplane::tunnel::{CLOSE_CERT_EXPIRED, CLOSE_REVOKED};
use sluice_relay::server::{Refusal, Relay};

struct Net {
    relay: Relay,
    /// The relay's credentials: their revocation handle is the one its TLS config checks.
    relay_creds: Credentials,
    ca: PemPair,
    dir: std::path::PathBuf,
    clients: Vec<(SocketAddr, ControlClient)>,
    next_port: u16,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Net {
    fn new(tag: &str) -> Net {
        let dir =
            std::env::temp_dir().join(format!("sluice-relay-rev-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = identity::create_ca("acme", Duration::from_secs(3600)).unwrap();
        let pair =
            identity::issue(&ca, Role::Relay, "relay-1", &[], Duration::from_secs(3600)).unwrap();
        let relay_creds = load(&dir, &ca, "relay-1", &pair);
        let cfg = tls::quic_config(
            &relay_creds,
            &[Role::Agent, Role::Connector],
            &params(10_000),
        )
        .unwrap();
        let mut relay = Relay::new(cfg, RELAY.parse().unwrap());
        relay.set_peer_check(relay_creds.peer_check().unwrap());
        relay.apply_revocations(&relay_creds.revocations);
        Net {
            relay,
            relay_creds,
            ca,
            dir,
            clients: Vec::new(),
            next_port: 5000,
        }
    }

    fn issue(&self, role: Role, name: &str, valid: Duration) -> PemPair {
        identity::issue(&self.ca, role, name, &[], valid).unwrap()
    }

    /// Connects a client with `pair`; returns its index.
    fn connect(&mut self, name: &str, pair: &PemPair) -> usize {
        let creds = load(&self.dir, &self.ca, name, pair);
        let mut cfg = tls::quic_config(&creds, &[Role::Relay], &params(10_000)).unwrap();
        self.next_port += 1;
        let addr: SocketAddr = format!("198.51.100.{}:{}", self.clients.len() + 1, self.next_port)
            .parse()
            .unwrap();
        let c = ControlClient::connect(
            &mut cfg,
            addr,
            RELAY.parse().unwrap(),
            self.next_port as u64,
        )
        .unwrap();
        self.clients.push((addr, c));
        self.pump();
        self.clients.len() - 1
    }

    /// Moves packets until nobody has anything to send.
    fn pump(&mut self) {
        pump(&mut self.relay, &mut self.clients, 2000);
    }

    /// Runs timers and moves packets for `d` of real time (certificate expiry is wall time).
    fn run_for(&mut self, d: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            std::thread::sleep(Duration::from_millis(20));
            self.relay.on_timeout();
            for (_, c) in &mut self.clients {
                if c.timeout().is_some_and(|t| t.is_zero()) {
                    c.on_timeout();
                }
            }
            self.pump();
        }
    }

    /// Runs timers and moves packets until `done` holds (true) or `limit` passed (false).
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Net) -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if done(self) {
                return true;
            }
            self.run_for(Duration::from_millis(20));
        }
        done(self)
    }

    fn revoked_count(&self) -> u64 {
        self.relay.stats().refused(Refusal::Revoked)
    }

    fn events(&mut self, i: usize) -> Vec<ControlEvent> {
        std::iter::from_fn(|| self.clients[i].1.poll_event()).collect()
    }

    /// Whether client `i` still gets answers from the relay.
    fn answers(&mut self, i: usize) -> bool {
        if !self.clients[i].1.is_connected() {
            return false;
        }
        self.clients[i].1.lookup("conn-1").unwrap();
        self.pump();
        self.events(i)
            .iter()
            .any(|e| matches!(e, ControlEvent::LookupReply { .. }))
    }

    /// Signs a list and puts it in force in the relay's handle, as the host does.
    fn revoke(&mut self, seq: u64, peers: &[PeerId], names: &[&str]) -> (RevocationList, usize) {
        let d = Draft {
            sequence: seq,
            issued_at: identity::unix_now(),
            expires_at: identity::unix_now() + 3600,
            peers: peers.iter().copied().collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
        };
        let list = RevocationList::sign(&d, &self.ca.cert_pem, &self.ca.key_pem).unwrap();
        let key = CaKey::from_cert_pem(&self.ca.cert_pem).unwrap();
        let offered = self
            .relay_creds
            .revocations
            .load(list.encoded(), &key, "test", identity::unix_now())
            .unwrap();
        assert!(matches!(offered, Offered::Installed { .. }), "{offered:?}");
        let handle = self.relay_creds.revocations.clone();
        let closed = self.relay.apply_revocations(&handle);
        self.pump();
        (list, closed)
    }
}

fn peer_of(pair: &PemPair) -> PeerId {
    identity::identity_from_pem(&pair.cert_pem).unwrap().peer_id
}

#[test]
fn a_new_list_closes_revoked_clients_and_reaches_every_connector() {
    let mut net = Net::new("apply");
    let hour = Duration::from_secs(3600);
    let alice = net.issue(Role::Agent, "alice", hour);
    let bob = net.issue(Role::Agent, "bob", hour);
    let conn = net.issue(Role::Connector, "conn-1", hour);
    let conn2 = net.issue(Role::Connector, "conn-2", hour);
    let a = net.connect("alice", &alice);
    let b = net.connect("bob", &bob);
    let c = net.connect("conn-1", &conn);
    for i in [a, b, c] {
        assert!(
            net.clients[i].1.is_connected(),
            "client {i} did not connect"
        );
    }
    // The connector got the relay's list on connect: none yet, so nothing.
    let ev = net.events(c);
    assert!(
        !ev.iter().any(|e| matches!(e, ControlEvent::Revocations(_))),
        "{ev:?}"
    );
    let _ = net.events(a);

    // Alice by name, and a key nobody here holds.
    let stranger = PeerId([7; 32]);
    let (list, closed) = net.revoke(10, &[stranger], &["alice"]);
    assert_eq!(closed, 1, "only alice is revoked");
    assert!(net.clients[a].1.conn().is_closed() || net.clients[a].1.conn().is_draining());
    let err = net.clients[a]
        .1
        .conn()
        .peer_error()
        .cloned()
        .expect("the relay closed alice");
    assert!(err.is_app, "{err:?}");
    assert_eq!(err.error_code, CLOSE_REVOKED);
    assert_eq!(
        String::from_utf8_lossy(&err.reason),
        "certificate revoked (revocation list #10)"
    );
    let ev = net.events(a);
    assert!(
        ev.iter().any(|e| matches!(e, ControlEvent::Closed(why) if why.contains("certificate revoked (revocation list #10)"))),
        "{ev:?}"
    );
    assert_eq!(net.relay.stats().refused(Refusal::Revoked), 1);
    // The connector holds the exact signed bytes; bob is untouched.
    let ev = net.events(c);
    assert!(
        ev.contains(&ControlEvent::Revocations(list.encoded().to_vec())),
        "{ev:?}"
    );
    assert!(net.answers(b), "bob lost his connection");
    assert!(net.answers(c), "the connector lost its connection");

    // A connector that connects later is handed the list at once.
    let c2 = net.connect("conn-2", &conn2);
    let ev = net.events(c2);
    assert!(
        ev.contains(&ControlEvent::Revocations(list.encoded().to_vec())),
        "{ev:?}"
    );

    // Alice again, with the same certificate: refused at the handshake with alert 44.
    let a2 = net.connect("alice", &alice);
    // Counted when the refused connection is reaped, after its closing period.
    assert!(
        net.run_until(Duration::from_secs(5), |n| n.revoked_count() == 2),
        "{:?}",
        net.relay.stats()
    );
    assert!(!net.clients[a2].1.is_connected());
    let err = net.clients[a2]
        .1
        .conn()
        .peer_error()
        .cloned()
        .expect("refused");
    assert!(!err.is_app, "{err:?}");
    assert_eq!(err.error_code, 0x100 + 44, "{err:?}");
    let ev = net.events(a2);
    assert!(
        ev.iter().any(|e| matches!(e, ControlEvent::Closed(why) if why.contains("certificate revoked (TLS alert 44)"))),
        "{ev:?}"
    );
    assert_eq!(net.relay.stats().refused(Refusal::HandshakeFailed), 0);
    // A new certificate for the same name is refused too (names revoke every certificate).
    let alice_new = net.issue(Role::Agent, "alice", hour);
    let a3 = net.connect("alice-new", &alice_new);
    assert!(
        net.run_until(Duration::from_secs(5), |n| n.revoked_count() == 3),
        "{:?}",
        net.relay.stats()
    );
    assert!(!net.clients[a3].1.is_connected());

    // Revoking a connector by key takes it out of the registry at once.
    let (_, closed) = net.revoke(11, &[stranger, peer_of(&conn)], &["alice"]);
    assert_eq!(closed, 1);
    let err = net.clients[c]
        .1
        .conn()
        .peer_error()
        .cloned()
        .expect("closed");
    assert_eq!(err.error_code, CLOSE_REVOKED);
    net.clients[b].1.lookup("conn-1").unwrap();
    net.pump();
    let ev = net.events(b);
    assert!(
        ev.contains(&ControlEvent::LookupReply {
            name: "conn-1".into(),
            peer: None
        }),
        "{ev:?}"
    );
    // conn-2 got list #11 too, and nothing else was closed.
    let ev = net.events(c2);
    assert!(
        ev.iter().any(|e| matches!(e, ControlEvent::Revocations(b) if RevocationList::parse_unverified(b).unwrap().sequence == 11)),
        "{ev:?}"
    );
    assert!(net.answers(b));
    assert!(net.answers(c2));
    assert_eq!(net.relay.stats().refused(Refusal::Revoked), 4);
    // Applying the same list again closes nothing more.
    let handle = net.relay_creds.revocations.clone();
    assert_eq!(net.relay.apply_revocations(&handle), 0);
}

#[test]
fn a_renewed_certificate_outlives_the_old_one_and_a_bad_renewal_does_not() {
    let mut net = Net::new("renew");
    // Long enough to connect, short enough to wait out.
    let short = Duration::from_secs(3);
    let alice = net.issue(Role::Agent, "alice", short);
    let bob = net.issue(Role::Agent, "bob", short);
    let carol = net.issue(Role::Agent, "carol", short);
    let a = net.connect("alice", &alice);
    let b = net.connect("bob", &bob);
    let c = net.connect("carol", &carol);
    for i in [a, b, c] {
        assert!(net.clients[i].1.is_connected());
    }
    let (dir, ca) = (net.dir.clone(), net.ca.clone());
    let der = |pair: &PemPair| {
        load(&dir, &ca, "presented", pair)
            .certificate_der()
            .unwrap()
    };
    // Alice renews with her own key: accepted.
    let renewed = identity::renew(&net.ca, &alice, None, Duration::from_secs(3600)).unwrap();
    net.clients[a].1.present_certificate(der(&renewed)).unwrap();
    // Bob presents a certificate for another key (a new key needs a new connection).
    let other_key = net.issue(Role::Agent, "bob", Duration::from_secs(3600));
    net.clients[b]
        .1
        .present_certificate(der(&other_key))
        .unwrap();
    // Carol presents her own key's certificate, signed by another CA.
    let evil = identity::create_ca("evil", Duration::from_secs(3600)).unwrap();
    let forged = identity::renew(&evil, &carol, None, Duration::from_secs(3600)).unwrap();
    net.clients[c].1.present_certificate(der(&forged)).unwrap();
    net.pump();

    net.run_for(short + Duration::from_millis(1500));
    assert!(net.answers(a), "alice's renewed connection was closed");
    for (i, who) in [(b, "bob"), (c, "carol")] {
        let err = net.clients[i].1.conn().peer_error().cloned();
        let err = err.unwrap_or_else(|| panic!("{who}'s refused renewal kept the connection"));
        assert_eq!(err.error_code, CLOSE_CERT_EXPIRED, "{who}: {err:?}");
    }
    // The registry shows alice's new expiry; and revoking her now still closes her.
    let (_, closed) = net.revoke(5, &[], &["alice"]);
    assert_eq!(closed, 1);
    assert_eq!(
        net.clients[a].1.conn().peer_error().map(|e| e.error_code),
        Some(CLOSE_REVOKED)
    );
}
