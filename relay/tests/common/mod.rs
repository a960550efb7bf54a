//! What the relay core's tests share: control-connection parameters, credentials written to
//! files and loaded as a node loads them, and an in-memory network between real control
//! clients and the relay core.

use std::net::SocketAddr;
use std::path::Path;

use sluice_dataplane::control::ControlClient;
use sluice_dataplane::identity::PemPair;
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_relay::server::Relay;

pub const RELAY: &str = "192.0.2.1:4433";

/// Control-connection parameters with the given idle timeout.
pub fn params(idle_timeout_ms: u64) -> QuicParams {
    QuicParams {
        alpn: tls::ALPN_CONTROL,
        max_udp_payload: 1452,
        idle_timeout_ms,
        dgram_queue: 256,
        streams: true,
    }
}

/// Writes `pair` and the CA to files in `dir` (Credentials read files) and loads them.
pub fn load(dir: &Path, ca: &PemPair, name: &str, pair: &PemPair) -> Credentials {
    let (c, k, a) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
        dir.join("ca.pem"),
    );
    std::fs::write(&c, &pair.cert_pem).unwrap();
    std::fs::write(&k, &pair.key_pem).unwrap();
    std::fs::write(&a, &ca.cert_pem).unwrap();
    Credentials::load(
        c.to_str().unwrap(),
        k.to_str().unwrap(),
        a.to_str().unwrap(),
    )
    .unwrap()
}

/// Moves packets between `clients` and `relay` until nobody has anything to send (at most
/// `rounds` rounds).
pub fn pump(relay: &mut Relay, clients: &mut [(SocketAddr, ControlClient)], rounds: usize) {
    let relay_addr: SocketAddr = RELAY.parse().unwrap();
    let mut buf = vec![0u8; 2048];
    for _ in 0..rounds {
        let mut moved = false;
        for (addr, c) in clients.iter_mut() {
            while let Some((n, to)) = c.send(&mut buf) {
                assert_eq!(to, relay_addr);
                relay.recv(&mut buf[..n], *addr);
                moved = true;
            }
        }
        while let Some((n, to)) = relay.send(&mut buf) {
            if let Some((_, c)) = clients.iter_mut().find(|(a, _)| *a == to) {
                c.recv(&mut buf[..n], relay_addr);
            }
            moved = true;
        }
        if !moved {
            return;
        }
    }
}
