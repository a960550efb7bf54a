//! Per-flow decision cache: a hash lookup per packet instead of a policy evaluation. Entries
//! carry the policy generation they were made under, so a reload invalidates them all at once,
//! and the time a deciding rule expires. Keys come from the local machine's own flows, so a
//! fast non-keyed hash (FxHash) is safe here and a third of the cost of SipHash.

use rustc_hash::FxHashMap as HashMap;
use std::hash::Hash;

use crate::matcher::Decision;

pub struct FlowCache<K> {
    map: HashMap<K, (u64, Decision)>,
    capacity: usize,
}

impl<K: Hash + Eq> FlowCache<K> {
    pub fn new(capacity: usize) -> Self {
        FlowCache {
            map: HashMap::with_capacity_and_hasher(capacity.min(4096), Default::default()),
            capacity,
        }
    }

    /// The cached decision for `key`, if made under `generation` and still valid at `now`.
    pub fn get(&self, key: &K, generation: u64, now: i64) -> Option<Decision> {
        match self.map.get(key) {
            Some((g, d)) if *g == generation && d.valid_until.is_none_or(|t| now < t) => Some(*d),
            _ => None,
        }
    }

    pub fn insert(&mut self, key: K, generation: u64, d: Decision) {
        if self.map.len() >= self.capacity {
            // Crude but bounded: flows re-decide on their next packet.
            self.map.clear();
        }
        self.map.insert(key, (generation, d));
    }

    pub fn remove(&mut self, key: &K) {
        self.map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
