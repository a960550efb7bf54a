//! Framed messages ([`ControlMessage`]) on one bidirectional QUIC stream: the control stream
//! to the relay, and the message stream inside each end-to-end tunnel.

use crate::wire::{ControlDecoder, ControlMessage, WireError};

/// Bytes waiting for the peer's flow control before further messages are refused: a peer that
/// stops reading cannot make us buffer without bound.
const MAX_BACKLOG: usize = 256 * 1024;

#[derive(Debug)]
pub struct MessageStream {
    id: u64,
    out: Vec<u8>,
    decoder: ControlDecoder,
}

impl MessageStream {
    /// The stream `id`, refusing incoming message bodies over `limit` bytes.
    pub fn new(id: u64, limit: usize) -> Self {
        MessageStream {
            id,
            out: Vec::new(),
            decoder: ControlDecoder::with_limit(limit),
        }
    }

    /// Queues `msg`; it is written by the next [`MessageStream::flush`].
    pub fn queue(&mut self, msg: &ControlMessage) -> Result<(), WireError> {
        if self.out.len() > MAX_BACKLOG {
            return Err(WireError::TooLarge(self.out.len()));
        }
        msg.encode(&mut self.out)
    }

    /// Queues `msg` in front of everything queued so far (a hello that must open the stream).
    pub fn queue_first(&mut self, msg: &ControlMessage) -> Result<(), WireError> {
        let mut first = Vec::new();
        msg.encode(&mut first)?;
        first.append(&mut self.out);
        self.out = first;
        Ok(())
    }

    /// Writes what flow control allows; the rest waits for the next call. Returns the bytes
    /// handed to the connection.
    pub fn flush(&mut self, conn: &mut quiche::Connection) -> usize {
        if self.out.is_empty() || !conn.is_established() {
            return 0;
        }
        match conn.stream_send(self.id, &self.out, false) {
            Ok(n) => {
                self.out.drain(..n);
                n
            }
            Err(quiche::Error::Done) => 0,
            Err(e) => {
                tracing::debug!("stream {}: send failed: {e}", self.id);
                0
            }
        }
    }

    /// Takes in whatever the stream has received.
    pub fn read(&mut self, conn: &mut quiche::Connection) {
        // Called after every packet: most carry nothing for the stream, so skip the buffer.
        if !conn.stream_readable(self.id) {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok((n, _fin)) = conn.stream_recv(self.id, &mut buf) {
            self.decoder.push(&buf[..n]);
        }
    }

    /// The next whole message received. An error means the stream's framing is broken: the
    /// caller closes the connection.
    pub fn next_message(&mut self) -> Option<Result<ControlMessage, WireError>> {
        self.decoder.next_message()
    }
}
