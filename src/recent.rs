//! `Recent`: what was seen within a time window, in bounded memory.
//!
//! The request side's two "seen before?" questions use it: the same click
//! within `CLICK_DEDUP_WINDOW_S` (`ivt::ClickDedup`) and the same
//! `event_id` within `DEDUP_WINDOW_HOURS` (`event_ids::EventIdFilter`).
//!
//! Two generations of a hash table per lock shard: entries move to the older
//! generation as the window passes and are dropped a window later, so every
//! key seen within the window is still there. Memory is capped: at most
//! `max_entries` keys, half of each shard's share per generation. When a
//! shard's current generation is full it becomes the older one early and the
//! older one is dropped (counted in `evictions`): the most recent half of the
//! cap is always remembered. The cap can only make the table forget, never
//! invent a sighting. Tables keep their capacity when they rotate, so once
//! warm, remembering a key does not allocate. A generation holds at most what
//! a hash table of a power-of-two size holds (7/8 of its slots), rounded down
//! from its share of the cap: one more key would double the table, so the
//! cap's last 12% would cost as much memory as the first 88% (for
//! `EVENT_ID_MEMORY_MAX` = 1,000,000: 917,504 ids in 35 MB instead of
//! 1,000,000 in 69 MB). Nothing here does I/O.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Independent locks per table.
pub const SHARDS: usize = 16;

/// Keys seen within a window, each with a small value (the first sighting's).
pub struct Recent<K, V, S> {
    window_ms: i64,
    per_generation: usize,
    shards: Vec<Mutex<Generations<K, V, S>>>,
    /// Generations dropped early because the cap was reached.
    pub evictions: AtomicU64,
}

struct Generations<K, V, S> {
    started_ms: i64,
    current: HashMap<K, (V, i64), S>,
    previous: HashMap<K, (V, i64), S>,
}

impl<K: Hash + Eq + Copy, V: Copy, S: BuildHasher + Clone> Recent<K, V, S> {
    pub fn new(window_ms: i64, max_entries: usize, hasher: S) -> Self {
        Recent {
            window_ms: window_ms.max(1),
            per_generation: fitted(max_entries / SHARDS / 2),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Generations {
                        started_ms: 0,
                        current: HashMap::with_hasher(hasher.clone()),
                        previous: HashMap::with_hasher(hasher.clone()),
                    })
                })
                .collect(),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, shard: usize) -> std::sync::MutexGuard<'_, Generations<K, V, S>> {
        self.shards[shard % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The value stored with `key` if it was seen within the window; else
    /// remembers `key` with `value` at `now_ms` and returns `None`. `shard`
    /// picks the lock (any function of the key).
    pub fn check(&self, shard: usize, key: K, value: V, now_ms: i64) -> Option<V> {
        let mut g = self.shard(shard);
        let age = now_ms - g.started_ms;
        if age >= 2 * self.window_ms {
            g.previous.clear();
            g.current.clear();
            g.started_ms = now_ms;
        } else if age >= self.window_ms {
            g.rotate(now_ms);
        }
        let first = g
            .current
            .get(&key)
            .or_else(|| g.previous.get(&key))
            .copied();
        if let Some((v, at)) = first {
            if now_ms - at < self.window_ms {
                return Some(v);
            }
        }
        if g.current.len() >= self.per_generation {
            // Full: the current generation becomes the older one now, and
            // the older one is dropped early.
            self.evictions.fetch_add(1, Relaxed);
            g.rotate(now_ms);
        }
        g.current.insert(key, (value, now_ms));
        None
    }

    /// Forgets `key` if it is still the sighting remembered at `at_ms` (the
    /// event was refused after all: sent again, it must count).
    pub fn forget(&self, shard: usize, key: K, at_ms: i64) {
        let mut g = self.shard(shard);
        if g.current.get(&key).is_some_and(|&(_, at)| at == at_ms) {
            g.current.remove(&key);
        }
    }

    /// Keys remembered now.
    pub fn tracked(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                let g = s.lock().unwrap_or_else(|p| p.into_inner());
                (g.current.len() + g.previous.len()) as u64
            })
            .sum()
    }
}

/// The most keys, at most `n`, that a hash table of a power-of-two number of
/// slots holds without growing (7/8 of the slots, hashbrown's load factor).
fn fitted(n: usize) -> usize {
    if n < 16 {
        return n.max(1);
    }
    let slots = 1usize << (n / 7 * 8).ilog2();
    slots / 8 * 7
}

impl<K, V, S> Generations<K, V, S> {
    /// The current generation becomes the older one; the older one is
    /// emptied (keeping its memory) and becomes the current one.
    fn rotate(&mut self, now_ms: i64) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        self.started_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type T = Recent<u64, u8, std::collections::hash_map::RandomState>;

    #[test]
    fn a_key_is_seen_within_the_window_only_and_the_first_value_stays() {
        let r = T::new(1000, 1 << 10, Default::default());
        assert_eq!(r.check(0, 7, 1, 10_000), None);
        assert_eq!(r.check(0, 7, 2, 10_500), Some(1));
        assert_eq!(r.check(0, 7, 3, 10_999), Some(1));
        assert_eq!(r.check(0, 7, 4, 11_000), None, "a window later it is new");
        assert_eq!(r.check(0, 7, 5, 11_001), Some(4));
    }

    #[test]
    fn forget_takes_back_only_the_sighting_it_names() {
        let r = T::new(1000, 1 << 10, Default::default());
        assert_eq!(r.check(3, 9, 1, 100), None);
        r.forget(3, 9, 99);
        assert_eq!(r.check(3, 9, 2, 101), Some(1), "another sighting's mark");
        r.forget(3, 9, 100);
        assert_eq!(r.check(3, 9, 3, 102), None, "forgotten");
    }

    #[test]
    fn a_full_generation_fills_its_table_without_doubling_it() {
        assert_eq!(fitted(1_000_000 / SHARDS / 2), 28_672);
        assert_eq!(fitted(28_672), 28_672);
        assert_eq!(fitted(28_671), 14_336);
        assert_eq!(fitted(20), 14);
        assert_eq!(fitted(3), 3);
        assert_eq!(fitted(0), 1);
        let r = T::new(1_000_000, 16 * 2 * 3_000, Default::default());
        // Ten generations' worth through one shard: it ends full.
        for k in 0..17_920u64 {
            r.check(0, k * 16, 0, 5);
        }
        let g = r.shard(0);
        assert_eq!(g.current.len(), 1_792, "7/8 of 2,048 slots");
        assert!(g.current.capacity() <= 1_792, "{}", g.current.capacity());
        assert!(g.previous.capacity() <= 1_792, "{}", g.previous.capacity());
    }

    #[test]
    fn the_table_stays_under_its_cap() {
        let r = T::new(1_000_000, 64, Default::default());
        for k in 0..10_000u64 {
            assert_eq!(r.check((k % 16) as usize, k, 0, 5), None);
        }
        assert!(r.tracked() <= 64, "{} remembered", r.tracked());
        assert!(r.evictions.load(Relaxed) > 0);
        // The most recent keys are still remembered.
        assert_eq!(r.check((9_999 % 16) as usize, 9_999, 1, 6), Some(0));
    }
}
