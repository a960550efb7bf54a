//! When a tunnel may send after receiving: ACK-only packets are held back briefly.
//!
//! quiche puts an ACK into the next packet it writes after an ack-eliciting packet arrived, and
//! writes one whenever asked. Asked after every received packet, it answers each with an
//! ACK-only packet: one more UDP send and, on the peer, one more wake-up and receive, for
//! nothing. In a tunnel most packets are answered soon (a ping's reply, a request's response,
//! TCP's own ACKs, the next ping of a series), and that packet carries the ACK for free. So
//! after receiving, with nothing of ours queued, a tunnel waits until something of ours is
//! queued, a second packet arrived ([`ACK_EVERY`], as RFC 9000 §13.2.2 recommends), or
//! [`ACK_HOLD`] passed. [`ACK_HOLD`] stays below the max_ack_delay we advertise
//! ([`MAX_ACK_DELAY_MS`], RFC 9000 §13.2.1: the peer's loss timer allows for it), and the peer
//! subtracts the delay we report from its RTT samples.
//!
//! Every QUIC connection of ours holds ACKs this way: end-to-end tunnels, control connections
//! and the relay's side of them (where a forwarded packet's ACK waits for the next one).

use std::time::{Duration, Instant};

/// Longest an ACK waits for a packet of ours to ride on. Exchanges closer than this (a ping
/// every 20 ms, a chatty protocol's requests) then ACK with their next packet instead of a
/// packet, a send and two wake-ups of their own; bulk traffic is ACKed every [`ACK_EVERY`]
/// packets regardless. Just below [`MAX_ACK_DELAY_MS`]: tokio's timer fires up to 1 ms late.
/// (A late ACK at worst draws a PTO probe from the peer, which is answered at once.) Not chosen
/// by a benchmark: the ping RTT measured here moved with this value in both directions,
/// depending on how its timer fell between the pings (see bench/README.md).
pub const ACK_HOLD: Duration = Duration::from_millis(24);
/// The max_ack_delay transport parameter we advertise (RFC 9000 §18.2), in milliseconds.
pub const MAX_ACK_DELAY_MS: u64 = 25;
// An ACK held longer than advertised would look lost to the peer.
const _: () = assert!(ACK_HOLD.as_millis() < MAX_ACK_DELAY_MS as u128);
/// Packets received (that may carry data) after which the ACK goes at once.
pub const ACK_EVERY: u32 = 2;
/// Received QUIC packets shorter than this carry no IP packet (a DATAGRAM frame with the
/// smallest IPv4 header needs 61 bytes with our 20-byte connection ids): they are ACKs or
/// PINGs. They never start a hold, so a PING is answered at once and an ACK arms no timer.
pub const MIN_DATA_PACKET: usize = 61;

/// The sans-IO state: fed receives, sends and time.
#[derive(Debug, Default, Clone)]
pub struct AckHold {
    /// Packets received since our last send.
    owed: u32,
    /// When the oldest of them must be acknowledged.
    due: Option<Instant>,
    /// Something of ours is queued in the connection (a timer fired, a PING, a close, a
    /// message, a path probe): send at the next chance.
    urgent: bool,
}

impl AckHold {
    /// A QUIC packet of `len` bytes was received and accepted.
    pub fn on_recv(&mut self, len: usize, now: Instant) {
        if len < MIN_DATA_PACKET {
            return;
        }
        self.owed = self.owed.saturating_add(1);
        self.due.get_or_insert(now + ACK_HOLD);
    }

    /// Something besides DATAGRAMs was queued, or a timer fired (quiche's own, or the held
    /// ACK's): the next send goes out.
    pub fn urgent(&mut self) {
        self.urgent = true;
    }

    /// Whether to ask quiche for packets now. `datagrams_queued`: DATAGRAMs wait in the
    /// connection (they carry the ACK; and while congestion holds them, ACKs from the peer
    /// must release them at once).
    pub fn may_send(&self, now: Instant, datagrams_queued: bool) -> bool {
        datagrams_queued
            || self.urgent
            || self.owed == 0
            || self.owed >= ACK_EVERY
            || self.due.is_some_and(|d| now >= d)
    }

    /// A packet went out: it carried the ACK for everything received so far.
    pub fn on_sent(&mut self) {
        self.owed = 0;
        self.due = None;
    }

    /// quiche had nothing (more) to send: nothing is owed either (what arrived needed no ACK,
    /// or one already went).
    pub fn on_idle(&mut self) {
        self.urgent = false;
        self.owed = 0;
        self.due = None;
    }

    /// [`AckHold::may_send`] for a quiche connection: its handshake and a close of ours never
    /// wait, and queued DATAGRAMs go at once.
    pub fn may_send_on(&self, conn: &quiche::Connection, now: Instant) -> bool {
        !conn.is_established()
            || conn.local_error().is_some()
            || self.may_send(now, conn.dgram_send_queue_len() > 0)
    }

    /// When the connection's timer must fire: quiche's own timers and the held ACK's deadline,
    /// whichever comes first.
    pub fn timeout_on(&self, conn: &quiche::Connection, now: Instant) -> Option<Duration> {
        let ack = self.deadline().map(|d| d.saturating_duration_since(now));
        match (conn.timeout(), ack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When a held ACK must go: the connection's timer includes it.
    pub fn deadline(&self) -> Option<Instant> {
        if self.owed > 0 && !self.urgent {
            self.due
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: usize = 1200;

    #[test]
    fn nothing_received_sends_at_once() {
        let h = AckHold::default();
        assert!(h.may_send(Instant::now(), false));
        assert_eq!(h.deadline(), None);
    }

    #[test]
    fn one_packet_is_held_until_an_answer_or_the_deadline() {
        let t0 = Instant::now();
        let mut h = AckHold::default();
        h.on_recv(BIG, t0);
        assert!(!h.may_send(t0, false), "an ACK alone waits");
        assert_eq!(h.deadline(), Some(t0 + ACK_HOLD));
        assert!(h.may_send(t0, true), "a datagram of ours carries it");
        assert!(!h.may_send(t0 + ACK_HOLD / 2, false));
        assert!(h.may_send(t0 + ACK_HOLD, false), "due");
        // The timer fired: the tunnel makes the next send urgent.
        h.urgent();
        assert!(h.may_send(t0 + ACK_HOLD, false));
        assert_eq!(h.deadline(), None, "no timer while a send is due anyway");
        h.on_sent();
        h.on_idle();
        assert!(h.may_send(t0 + ACK_HOLD, false));
        assert_eq!(h.deadline(), None);
    }

    #[test]
    fn the_deadline_is_the_oldest_packets() {
        let t0 = Instant::now();
        let mut h = AckHold::default();
        h.on_recv(BIG, t0);
        h.on_sent();
        h.on_recv(BIG, t0 + Duration::from_millis(5));
        assert_eq!(h.deadline(), Some(t0 + Duration::from_millis(5) + ACK_HOLD));
    }

    #[test]
    fn a_second_packet_sends_the_ack() {
        let t0 = Instant::now();
        let mut h = AckHold::default();
        h.on_recv(BIG, t0);
        h.on_recv(BIG, t0);
        assert!(h.may_send(t0, false));
    }

    #[test]
    fn small_packets_start_no_hold() {
        let t0 = Instant::now();
        let mut h = AckHold::default();
        h.on_recv(MIN_DATA_PACKET - 1, t0);
        assert!(h.may_send(t0, false), "a PING is answered at once");
        assert_eq!(h.deadline(), None, "an ACK arms no timer");
    }

    #[test]
    fn urgent_output_goes_until_quiche_is_idle() {
        let t0 = Instant::now();
        let mut h = AckHold::default();
        h.on_recv(BIG, t0);
        h.urgent();
        assert!(h.may_send(t0, false));
        assert_eq!(h.deadline(), None);
        h.on_sent();
        assert!(h.may_send(t0, false));
        h.on_idle();
        h.on_recv(BIG, t0);
        assert!(!h.may_send(t0, false));
    }

    #[test]
    fn an_idle_connection_owes_nothing() {
        // Asked at the deadline, quiche had nothing to send (what arrived needed no ACK): no
        // timer stays armed in the past.
        let t0 = Instant::now();
        let mut h = AckHold::default();
        h.on_recv(BIG, t0);
        h.urgent();
        h.on_idle();
        assert_eq!(h.deadline(), None);
        assert!(h.may_send(t0 + ACK_HOLD, false));
    }
}
