//! `relay`: the relay core (relay/src/server.rs) fed UDP datagrams, as its socket would be.
//!
//! Raw datagrams reach only what comes before decryption (headers, version negotiation,
//! retry tokens). To reach the rest (the control stream's messages, forwarding, registration)
//! the harness also runs two real clients, an agent and a connector with certificates of the
//! relay's CA, whose handshakes it completes in memory, and lets the input choose the bytes they
//! write into their control streams and DATAGRAMs.
//!
//! Operations ([`crate::Ops`]), by tag: bit 0 picks the client (agent or connector), and
//! `(tag >> 1) % 7`:
//! - 0: a raw datagram from a stranger (203.0.113.9:9000);
//! - 1: a raw datagram from the client's address (spoofed);
//! - 2: the client writes the body into its control stream;
//! - 3: the client sends the body as a DATAGRAM;
//! - 4: the relay's and the clients' timers run;
//! - 5: the client closes its connection (the next use connects anew);
//! - 6: the client sends the body in a relay forward DATAGRAM to the other client (whose peer
//!   id is random per process, so the input could not name it).
//!
//! Checked: a DATAGRAM the relay delivers to a client is a relay forward whose peer id is the
//! other client's (the relay rewrites the source and never lets one peer speak for another).

use std::net::SocketAddr;

use sluice_dataplane::control::CONTROL_STREAM;
use sluice_dataplane::identity::{PeerId, Role};
use sluice_dataplane::tls::{self, Credentials, QuicParams};
use sluice_dataplane::wire::{
    put_relay_forward_header, DGRAM_RELAY_FORWARD, RELAY_FORWARD_OVERHEAD,
};
use sluice_relay::server::Relay;

use crate::{fixtures, Ops};

const RELAY: &str = "192.0.2.1:4433";

struct Client {
    addr: SocketAddr,
    peer_id: PeerId,
    conn: Option<quiche::Connection>,
    /// Connections made so far: each gets a fresh connection id.
    serial: u8,
}

impl Client {
    fn new(addr: &str, creds: &Credentials) -> Client {
        Client {
            addr: addr.parse().expect("client address"),
            peer_id: creds.identity.peer_id,
            conn: None,
            serial: 0,
        }
    }
}

struct World {
    relay: Relay,
    relay_addr: SocketAddr,
    clients: [Client; 2],
    configs: [quiche::Config; 2],
    buf: Vec<u8>,
}

pub fn relay(data: &[u8]) {
    let f = fixtures::get();
    let relay_cfg = tls::quic_config(
        &f.relay,
        &[Role::Agent, Role::Connector],
        &QuicParams::control(),
    )
    .expect("relay config");
    let client_cfg = |c: &Credentials| {
        tls::quic_config(c, &[Role::Relay], &QuicParams::control()).expect("client config")
    };
    let relay_addr: SocketAddr = RELAY.parse().expect("relay address");
    let mut w = World {
        relay: Relay::new(relay_cfg, relay_addr),
        relay_addr,
        clients: [
            Client::new("192.0.2.10:40000", &f.agent),
            Client::new("192.0.2.20:40001", &f.connector),
        ],
        configs: [client_cfg(&f.agent), client_cfg(&f.connector)],
        buf: vec![0u8; 65_536],
    };
    for (tag, body) in Ops(data) {
        let k = usize::from(tag & 1);
        match (tag >> 1) % 7 {
            0 => w.raw(body, "203.0.113.9:9000".parse().expect("stranger")),
            1 => w.raw(body, w.clients[k].addr),
            2 => {
                if let Some(c) = w.connected(k) {
                    let _ = c.stream_send(CONTROL_STREAM, body, false);
                }
            }
            3 => {
                if let Some(c) = w.connected(k) {
                    let _ = c.dgram_send(body);
                }
            }
            4 => {
                w.relay.on_timeout();
                for c in &mut w.clients {
                    if let Some(conn) = &mut c.conn {
                        conn.on_timeout();
                    }
                }
            }
            5 => {
                if let Some(c) = &mut w.clients[k].conn {
                    let _ = c.close(true, 0, b"fuzz");
                }
            }
            6 => {
                let mut d = vec![0u8; RELAY_FORWARD_OVERHEAD + body.len()];
                put_relay_forward_header(&mut d, &w.clients[1 - k].peer_id);
                d[RELAY_FORWARD_OVERHEAD..].copy_from_slice(body);
                if let Some(c) = w.connected(k) {
                    let _ = c.dgram_send(&d);
                }
            }
            _ => unreachable!(),
        }
        w.pump();
    }
    let _ = w.relay.timeout();
    let _ = w.relay.peers();
    let _ = w.relay.stats();
    w.relay.goodbye();
    w.pump();
}

impl World {
    fn raw(&mut self, body: &[u8], from: SocketAddr) {
        let b = &mut self.buf[..body.len()];
        b.copy_from_slice(body);
        self.relay.recv(b, from);
    }

    /// Client `k`'s connection, connecting it first (handshake, retry included) if it has
    /// none or the last one closed. None if the handshake does not complete.
    fn connected(&mut self, k: usize) -> Option<&mut quiche::Connection> {
        if (self.clients[k].conn.as_ref()).is_none_or(|c| c.is_closed() || c.is_draining()) {
            let c = &mut self.clients[k];
            c.serial = c.serial.wrapping_add(1);
            // Distinct per client and connection, and the same in every run.
            let scid = [k as u8 + 1, c.serial, 0x5c, 0x1c, 0xe0, 0, 0, 0];
            let scid = quiche::ConnectionId::from_ref(&scid);
            let conn = quiche::connect(None, &scid, c.addr, self.relay_addr, &mut self.configs[k])
                .expect("client connection");
            c.conn = Some(conn);
            self.pump();
        }
        self.clients[k]
            .conn
            .as_mut()
            .filter(|c| c.is_established() && !c.is_closed())
    }

    /// Moves packets between the clients and the relay until nobody has more to send.
    fn pump(&mut self) {
        for _ in 0..64 {
            let mut moved = false;
            for c in &mut self.clients {
                let Some(conn) = &mut c.conn else { continue };
                while let Ok((n, info)) = conn.send(&mut self.buf) {
                    assert_eq!(info.to, self.relay_addr);
                    self.relay.recv(&mut self.buf[..n], c.addr);
                    moved = true;
                }
            }
            while let Some((n, to)) = self.relay.send(&mut self.buf) {
                moved = true;
                let Some(i) = self.clients.iter().position(|c| c.addr == to) else {
                    continue;
                };
                let other = self.clients[1 - i].peer_id;
                let c = &mut self.clients[i];
                let Some(conn) = &mut c.conn else { continue };
                let info = quiche::RecvInfo {
                    from: self.relay_addr,
                    to: c.addr,
                };
                let _ = conn.recv(&mut self.buf[..n], info);
                let mut d = [0u8; 2048];
                while let Ok(n) = conn.dgram_recv(&mut d) {
                    assert!(
                        n >= 33 && d[0] == DGRAM_RELAY_FORWARD,
                        "not a relay forward"
                    );
                    assert_eq!(&d[1..33], &other.0[..], "forwarded with a forged source");
                }
                while conn.stream_recv(CONTROL_STREAM, &mut d).is_ok() {}
            }
            if !moved {
                return;
            }
        }
    }
}
