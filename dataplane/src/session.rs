//! What every sluice QUIC connection wrapper shares: timers, keepalive, closing, statistics.

use std::time::{Duration, Instant};

use crate::ack_hold::AckHold;

/// A sans-IO wrapper around one quiche connection ([`crate::control::ControlClient`],
/// [`crate::tunnel::Tunnel`]). Implementors provide access to the connection, its ACK holding
/// and their own bookkeeping after I/O; the rest is common.
pub trait QuicSession {
    fn conn(&self) -> &quiche::Connection;
    fn conn_mut(&mut self) -> &mut quiche::Connection;
    /// When the connection may send after receiving ([`crate::ack_hold`]).
    fn acks(&self) -> &AckHold;
    fn acks_mut(&mut self) -> &mut AckHold;
    /// Runs the wrapper's checks after the connection's state may have changed.
    fn after_io(&mut self);

    /// When [`QuicSession::on_timeout`] is due: quiche's timers and the held ACK's deadline,
    /// whichever comes first.
    fn timeout(&self) -> Option<Duration> {
        self.acks().timeout_on(self.conn(), Instant::now())
    }

    fn on_timeout(&mut self) {
        // Whatever fired (quiche's loss or idle timers, or the held ACK), the next send goes.
        self.conn_mut().on_timeout();
        self.acks_mut().urgent();
        self.after_io();
    }

    /// Sends an ack-eliciting packet: keeps NAT mappings and liveness fresh while idle.
    fn keepalive(&mut self) {
        let _ = self.conn_mut().send_ack_eliciting();
        self.acks_mut().urgent();
    }

    /// Closes the connection; the close goes out on the next `send`.
    fn close(&mut self, reason: &str) {
        let _ = self.conn_mut().close(true, 0, reason.as_bytes());
        self.acks_mut().urgent();
    }

    fn stats(&self) -> quiche::Stats {
        self.conn().stats()
    }

    /// Closed or closing: a connection that received or sent CONNECTION_CLOSE is done even
    /// while quiche drains it.
    fn is_closed(&self) -> bool {
        self.conn().is_closed() || self.conn().is_draining()
    }
}
