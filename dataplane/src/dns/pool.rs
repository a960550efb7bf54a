//! Synthetic addresses for resource hostnames (split DNS): the agent answers a query for a
//! resource name with an address from a reserved pool, and packets to that address go to the
//! resource's connector, which resolves the real name in its own network.
//!
//! A name gets one slot, which maps to one IPv4 and one IPv6 address, and keeps it while it is
//! in use. When the pool is full, the least recently used name without live flows gives up its
//! slot; a name with live flows never changes address.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("synthetic pool {0} is too small (it needs at least 2 addresses)")]
    TooSmall(String),
}

/// Offsets into a network: slot `i` is the network address plus `i` (slot 0, the network
/// address itself, is never handed out).
trait Offsets {
    fn size(&self) -> u64;
    fn nth(&self, i: u32) -> IpAddr;
    fn index_of(&self, a: IpAddr) -> Option<u32>;
}

impl Offsets for Ipv4Net {
    fn size(&self) -> u64 {
        (1u64 << (32 - u32::from(self.prefix_len()))) - 1
    }
    fn nth(&self, i: u32) -> IpAddr {
        Ipv4Addr::from(u32::from(self.network()).wrapping_add(i)).into()
    }
    fn index_of(&self, a: IpAddr) -> Option<u32> {
        let IpAddr::V4(a) = a else { return None };
        let off = u32::from(a).checked_sub(u32::from(self.network()))?;
        (off > 0 && u64::from(off) <= self.size()).then_some(off)
    }
}

impl Offsets for Ipv6Net {
    fn size(&self) -> u64 {
        let bits = 128 - u32::from(self.prefix_len());
        if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }
    fn nth(&self, i: u32) -> IpAddr {
        Ipv6Addr::from(u128::from(self.network()).wrapping_add(u128::from(i))).into()
    }
    fn index_of(&self, a: IpAddr) -> Option<u32> {
        let IpAddr::V6(a) = a else { return None };
        let off = u128::from(a).checked_sub(u128::from(self.network()))?;
        (off > 0 && off <= u128::from(self.size().min(u64::from(u32::MAX)))).then_some(off as u32)
    }
}

struct Slot {
    name: std::sync::Arc<str>,
    last_used: u64,
    live_flows: u32,
}

pub struct SyntheticPool {
    v4: Ipv4Net,
    v6: Ipv6Net,
    capacity: u32,
    /// Slot index (1-based, the offset in both pools) of each name.
    by_name: HashMap<String, u32>,
    slots: HashMap<u32, Slot>,
    /// Slots without live flows, by last use: the eviction order.
    idle: BTreeSet<(u64, u32)>,
    next_fresh: u32,
}

/// Default pools: RFC 2544's benchmarking range for IPv4 (rarely routed, unlike CGNAT space)
/// and a ULA prefix for IPv6.
pub const DEFAULT_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
pub const DEFAULT_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd5c, 0x1ce0, 0xd5, 0, 0, 0, 0, 0), 96);

impl SyntheticPool {
    /// Pools from an IPv4 and an IPv6 network; `max` bounds the number of names held.
    pub fn new(v4: (Ipv4Addr, u8), v6: (Ipv6Addr, u8), max: u32) -> Result<Self, PoolError> {
        let n4 = Ipv4Net::new(v4.0, v4.1.min(32)).unwrap_or_default().trunc();
        let n6 = Ipv6Net::new(v6.0, v6.1.min(128))
            .unwrap_or_default()
            .trunc();
        if n4.size() < 2 {
            return Err(PoolError::TooSmall(format!("{}/{}", v4.0, v4.1)));
        }
        if n6.size() < 2 {
            return Err(PoolError::TooSmall(format!("{}/{}", v6.0, v6.1)));
        }
        let capacity = n4
            .size()
            .min(n6.size())
            .min(u64::from(max))
            .min(u64::from(u32::MAX - 1)) as u32;
        Ok(SyntheticPool {
            v4: n4,
            v6: n6,
            capacity,
            by_name: HashMap::new(),
            slots: HashMap::new(),
            idle: BTreeSet::new(),
            next_fresh: 1,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn addrs(&self, slot: u32) -> (Ipv4Addr, Ipv6Addr) {
        let v4 = match self.v4.nth(slot) {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        let v6 = match self.v6.nth(slot) {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
        };
        (v4, v6)
    }

    /// The addresses of `name` (lowercase, without the trailing dot), assigning them if
    /// needed. None when every slot belongs to a name with live flows.
    pub fn assign(&mut self, name: &str, now: u64) -> Option<(Ipv4Addr, Ipv6Addr)> {
        if let Some(&slot) = self.by_name.get(name) {
            self.touch_slot(slot, now);
            return Some(self.addrs(slot));
        }
        let slot = if self.next_fresh <= self.capacity {
            self.next_fresh += 1;
            self.next_fresh - 1
        } else {
            let &(t, victim) = self.idle.iter().next()?;
            self.idle.remove(&(t, victim));
            if let Some(old) = self.slots.remove(&victim) {
                self.by_name.remove(&*old.name);
            }
            victim
        };
        self.by_name.insert(name.to_string(), slot);
        self.slots.insert(
            slot,
            Slot {
                name: name.into(),
                last_used: now,
                live_flows: 0,
            },
        );
        self.idle.insert((now, slot));
        Some(self.addrs(slot))
    }

    fn slot_of(&self, ip: IpAddr) -> Option<u32> {
        let slot = self.v4.index_of(ip).or_else(|| self.v6.index_of(ip))?;
        self.slots.contains_key(&slot).then_some(slot)
    }

    /// Whether `ip` lies in one of the pools (assigned or not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.v4
            .index_of(ip)
            .or_else(|| self.v6.index_of(ip))
            .is_some()
    }

    /// The name a synthetic address stands for.
    pub fn name_of(&self, ip: IpAddr) -> Option<&str> {
        self.slot_of(ip)
            .and_then(|s| self.slots.get(&s))
            .map(|s| &*s.name)
    }

    /// The same, shared: the packet path keeps it without copying the string.
    pub fn shared_name_of(&self, ip: IpAddr) -> Option<std::sync::Arc<str>> {
        self.slot_of(ip)
            .and_then(|s| self.slots.get(&s))
            .map(|s| s.name.clone())
    }

    pub fn v4_net(&self) -> Ipv4Net {
        self.v4
    }

    pub fn v6_net(&self) -> Ipv6Net {
        self.v6
    }

    fn touch_slot(&mut self, slot: u32, now: u64) {
        if let Some(s) = self.slots.get_mut(&slot) {
            if s.live_flows == 0 {
                self.idle.remove(&(s.last_used, slot));
                self.idle.insert((now, slot));
            }
            s.last_used = now;
        }
    }

    /// Traffic to `ip` now: its name becomes the most recently used.
    pub fn touch(&mut self, ip: IpAddr, now: u64) {
        if let Some(slot) = self.slot_of(ip) {
            self.touch_slot(slot, now);
        }
    }

    /// A flow to `ip` opened: its name keeps its addresses until the flow closes.
    pub fn flow_opened(&mut self, ip: IpAddr, now: u64) {
        let Some(slot) = self.slot_of(ip) else { return };
        if let Some(s) = self.slots.get_mut(&slot) {
            if s.live_flows == 0 {
                self.idle.remove(&(s.last_used, slot));
            }
            s.live_flows += 1;
            s.last_used = now;
        }
    }

    pub fn flow_closed(&mut self, ip: IpAddr, now: u64) {
        let Some(slot) = self.slot_of(ip) else { return };
        if let Some(s) = self.slots.get_mut(&slot) {
            s.live_flows = s.live_flows.saturating_sub(1);
            s.last_used = now;
            if s.live_flows == 0 {
                self.idle.insert((now, slot));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(max: u32) -> SyntheticPool {
        SyntheticPool::new(DEFAULT_V4, DEFAULT_V6, max).unwrap()
    }

    #[test]
    fn names_keep_their_addresses_and_map_back() {
        let mut p = pool(10_000);
        let (a4, a6) = p.assign("wiki.corp.internal", 1).unwrap();
        assert_eq!(p.assign("wiki.corp.internal", 2), Some((a4, a6)));
        assert_eq!(a4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(p.name_of(a4.into()), Some("wiki.corp.internal"));
        assert_eq!(p.name_of(a6.into()), Some("wiki.corp.internal"));
        assert!(p.contains(Ipv4Addr::new(198, 19, 255, 255).into()));
        assert!(!p.contains(Ipv4Addr::new(198, 20, 0, 1).into()));
        assert_eq!(p.name_of(Ipv4Addr::new(198, 18, 0, 2).into()), None);
    }

    #[test]
    fn a_thousand_names_never_collide() {
        let mut p = pool(100_000);
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let (a4, a6) = p.assign(&format!("host{i}.corp.internal"), i).unwrap();
            assert!(seen.insert(IpAddr::from(a4)) && seen.insert(IpAddr::from(a6)));
        }
    }

    #[test]
    fn full_pool_recycles_the_least_recently_used_idle_name() {
        let mut p = pool(3);
        let a = p.assign("a", 1).unwrap();
        let b = p.assign("b", 2).unwrap();
        let c = p.assign("c", 3).unwrap();
        p.flow_opened(a.0.into(), 4); // a is in use: it must keep its address
        p.assign("b", 5); // b is now more recent than c
        let d = p.assign("d", 6).unwrap();
        assert_eq!(d, c, "c was the least recently used idle name");
        assert_eq!(p.name_of(c.0.into()), Some("d"));
        assert_eq!(p.assign("a", 7), Some(a));
        assert_eq!(p.assign("b", 8), Some(b));
        // Everything live: no address for a new name.
        p.flow_opened(b.0.into(), 9);
        p.flow_opened(d.0.into(), 9);
        assert_eq!(p.assign("e", 10), None);
        p.flow_closed(d.0.into(), 11);
        assert_eq!(p.assign("e", 12), Some(d));
    }

    #[test]
    fn tiny_pools_are_refused() {
        assert!(SyntheticPool::new((Ipv4Addr::new(10, 0, 0, 0), 32), DEFAULT_V6, 10).is_err());
        assert!(SyntheticPool::new(DEFAULT_V4, (Ipv6Addr::LOCALHOST, 128), 10).is_err());
    }

    proptest! {
        /// Whatever happens, the mapping stays a bijection and live names keep their address.
        #[test]
        fn mapping_stays_consistent(ops in proptest::collection::vec((0u8..3, 0usize..12), 1..200)) {
            let mut p = pool(5);
            let mut live: HashMap<String, (Ipv4Addr, u32)> = HashMap::new();
            for (t, (op, n)) in ops.into_iter().enumerate() {
                let name = format!("n{n}");
                let now = t as u64;
                match op {
                    0 => if let Some((a4, _)) = p.assign(&name, now) {
                        if let Some((held, _)) = live.get(&name) { prop_assert_eq!(*held, a4); }
                    },
                    1 => if let Some((a4, _)) = p.assign(&name, now) {
                        p.flow_opened(a4.into(), now);
                        let e = live.entry(name.clone()).or_insert((a4, 0));
                        prop_assert_eq!(e.0, a4);
                        e.1 += 1;
                    },
                    _ => if let Some(e) = live.get_mut(&name) {
                        p.flow_closed(e.0.into(), now);
                        e.1 -= 1;
                        if e.1 == 0 { live.remove(&name); }
                    },
                }
                for (name, (a4, _)) in &live {
                    prop_assert_eq!(p.name_of((*a4).into()), Some(name.as_str()));
                }
                prop_assert!(p.len() <= 5);
            }
        }
    }
}
