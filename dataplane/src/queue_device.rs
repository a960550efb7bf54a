//! A smoltcp device backed by two packet queues: packets from the tunnel (or the TUN device) go
//! in `rx`, packets smoltcp emits come out of `tx`. The owner moves them to and from the wire.

use std::collections::VecDeque;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Spent packet buffers kept for reuse: enough for a burst, not a flood's worth.
const MAX_SPARE: usize = 256;

pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
    /// Buffers of packets already taken out of `tx`, reused for the next ones: no allocation
    /// per emitted packet once traffic flows.
    spare: Vec<Vec<u8>>,
    mtu: usize,
}

impl QueueDevice {
    pub fn new(mtu: usize) -> Self {
        QueueDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            spare: Vec::new(),
            mtu,
        }
    }

    /// Takes back the buffer of a packet from `tx` once it was used.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(buf);
        }
    }
}

pub struct RxToken(Vec<u8>);

pub struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((
            RxToken(p),
            TxToken {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut p = self.spare.pop().unwrap_or_default();
        p.clear();
        p.resize(len, 0);
        let r = f(&mut p);
        self.tx.push_back(p);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Device, TxToken as _};

    #[test]
    fn emitted_packets_reuse_recycled_buffers() {
        let mut d = QueueDevice::new(1500);
        let now = Instant::from_millis(0);
        let tok = d.transmit(now).expect("always ready");
        tok.consume(100, |b| b.fill(7));
        let p = d.tx.pop_front().expect("queued");
        assert_eq!(p, vec![7u8; 100]);
        let ptr = p.as_ptr();
        d.recycle(p);
        let tok = d.transmit(now).expect("always ready");
        tok.consume(60, |b| b.fill(9));
        let q = d.tx.pop_front().expect("queued");
        assert_eq!(
            q,
            vec![9u8; 60],
            "a reused buffer holds only the new packet"
        );
        assert_eq!(q.as_ptr(), ptr, "the spare buffer was reused");
    }
}
