//! Bounded packet queues between the host's threads and the engine's (iOS kills a Network
//! Extension above about 50 MiB, so nothing here grows without bound).

use std::collections::VecDeque;

/// Bytes of packets waiting for the host's `take_packet`; past this they are dropped.
pub(crate) const OUT_BYTES_MAX: usize = 4 << 20;
pub(crate) const OUT_PACKETS_MAX: usize = 8192;
/// Bytes of injected packets waiting for the engine's thread.
pub(crate) const IN_BYTES_MAX: usize = 4 << 20;
/// Spare buffers kept for reuse, so a steady flow allocates nothing per packet.
const SPARE_MAX: usize = 256;

/// Packets for the host, each in its own buffer, with buffers recycled.
#[derive(Default)]
pub struct PacketQueue {
    items: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    bytes: usize,
    pub dropped: u64,
}

impl PacketQueue {
    /// Queues a copy of `pkt`; false (and counted) when the queue is full.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        if self.items.len() >= OUT_PACKETS_MAX || self.bytes + pkt.len() > OUT_BYTES_MAX {
            self.dropped += 1;
            return false;
        }
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(pkt);
        self.bytes += pkt.len();
        self.items.push_back(b);
        true
    }

    pub fn front(&self) -> Option<&[u8]> {
        self.items.front().map(Vec::as_slice)
    }

    pub fn pop(&mut self) {
        if let Some(b) = self.items.pop_front() {
            self.bytes -= b.len();
            // A jumbo buffer is not worth keeping.
            if self.spare.len() < SPARE_MAX && b.capacity() <= 65_536 {
                self.spare.push(b);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
}

/// A batch of injected packets in one buffer (one allocation per batch, not per packet).
#[derive(Debug, Default)]
pub struct Batch {
    pub data: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Batch {
    pub fn push(&mut self, pkt: &[u8]) {
        self.data.extend_from_slice(pkt);
        self.ends.push(self.data.len());
    }

    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(s, e)| &self.data[s..e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queues_drop_and_count() {
        let mut q = PacketQueue::default();
        let big = vec![0u8; 60_000];
        let mut n = 0;
        while q.push(&big) {
            n += 1;
        }
        assert_eq!(n, OUT_BYTES_MAX / 60_000);
        assert_eq!(q.dropped, 1);
        q.pop();
        assert!(q.push(&big), "room again");
        while q.len() > 0 {
            q.pop();
        }
        assert_eq!(q.bytes, 0);
        for _ in 0..OUT_PACKETS_MAX {
            assert!(q.push(&[1]));
        }
        assert!(!q.push(&[1]));
    }

    #[test]
    fn batches_keep_packet_boundaries() {
        let mut b = Batch::default();
        b.push(&[1, 2]);
        b.push(&[]);
        b.push(&[3]);
        let v: Vec<&[u8]> = b.packets().collect();
        assert_eq!(v, vec![&[1u8, 2][..], &[][..], &[3][..]]);
    }
}
