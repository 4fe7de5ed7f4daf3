//! A fixed-capacity map from IPv4 addresses to small values, with entries aged by caller-supplied time.
//!
//! Set-associative: a key hashes to one set of `WAYS` slots. Lookups and inserts touch only that set (no
//! probing chains, no tombstones, no allocation after construction). An insert into a full set reuses an expired
//! slot if there is one, otherwise evicts the set's least recently used entry. So the map never grows, and under
//! pressure it forgets the stalest entries near the new one, in the spirit of the kernel's `lblc` garbage
//! collector (which, when over `max_size`, drops entries unused for 6 minutes).

use std::time::{Duration, Instant};

use super::hashing::mix64;

/// Slots per set.
pub(super) const WAYS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct Slot<V> {
    key: u32,
    /// Last use; `None` for a free slot.
    last: Option<Instant>,
    value: V,
}

#[derive(Debug, Clone)]
pub(super) struct AgingMap<V> {
    slots: Vec<Slot<V>>,
    set_mask: usize,
    seed: u64,
    len: usize,
}

/// Whether an entry last used at `last` has expired at `now` (`ttl` elapsed; a `now` earlier than `last` counts
/// as no time elapsed).
#[inline]
fn expired(last: Instant, now: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(last) >= ttl
}

impl<V: Copy + Default> AgingMap<V> {
    /// Room for at least `capacity` entries (rounded up to a power-of-two number of sets of `WAYS`).
    pub(super) fn new(capacity: usize, seed: u64) -> AgingMap<V> {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        AgingMap { slots: vec![Slot::default(); sets * WAYS], set_mask: sets - 1, seed, len: 0 }
    }

    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Occupied slots, including expired entries not yet reclaimed.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn set_of(&self, key: u32) -> std::ops::Range<usize> {
        let set = (mix64(u64::from(key) ^ self.seed) >> 32) as usize & self.set_mask;
        set * WAYS..(set + 1) * WAYS
    }

    /// The live entry for `key`, its last use set to `now` when `touch`. An expired entry is freed and `None`
    /// returned.
    #[inline]
    pub(super) fn get_mut(&mut self, key: u32, now: Instant, ttl: Duration, touch: bool) -> Option<&mut V> {
        let range = self.set_of(key);
        let index = range.clone().find(|&i| self.slots[i].key == key && self.slots[i].last.is_some())?;
        let slot = &mut self.slots[index];
        if expired(slot.last?, now, ttl) {
            slot.last = None;
            self.len -= 1;
            return None;
        }
        if touch {
            slot.last = Some(now);
        }
        Some(&mut slot.value)
    }

    /// Sets `key` to `value`, last used `now`: replaces the key's entry if present, else takes a free or expired
    /// slot of its set, else evicts the set's least recently used entry.
    #[inline]
    pub(super) fn insert(&mut self, key: u32, value: V, now: Instant, ttl: Duration) {
        let range = self.set_of(key);
        let mut target = None;
        let mut free = None;
        let mut lru: Option<(usize, Instant)> = None;
        for i in range {
            let slot = &self.slots[i];
            match slot.last {
                Some(_) if slot.key == key => {
                    target = Some(i);
                    break;
                }
                None => {
                    free = free.or(Some(i));
                }
                Some(last) if expired(last, now, ttl) => {
                    free = free.or(Some(i));
                }
                Some(last) => {
                    if lru.is_none_or(|(_, oldest)| last < oldest) {
                        lru = Some((i, last));
                    }
                }
            }
        }
        let i = match (target, free, lru) {
            (Some(i), _, _) | (None, Some(i), _) => i,
            (None, None, Some((i, _))) => i,
            (None, None, None) => unreachable!("a set has WAYS > 0 slots"),
        };
        if self.slots[i].last.is_none() {
            self.len += 1;
        }
        self.slots[i] = Slot { key, last: Some(now), value };
    }

    /// Keeps the entries for which `keep` returns true (it may change their values). O(capacity).
    pub(super) fn retain(&mut self, mut keep: impl FnMut(u32, &mut V) -> bool) {
        for slot in &mut self.slots {
            if slot.last.is_some() && !keep(slot.key, &mut slot.value) {
                slot.last = None;
                self.len -= 1;
            }
        }
    }

    /// Frees every entry expired at `now`; returns how many. O(capacity).
    pub(super) fn purge_expired(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.len;
        for slot in &mut self.slots {
            if slot.last.is_some_and(|last| expired(last, now, ttl)) {
                slot.last = None;
                self.len -= 1;
            }
        }
        before - self.len
    }

    pub(super) fn clear(&mut self) {
        self.slots.iter_mut().for_each(|slot| slot.last = None);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn entries_live_until_their_ttl() {
        let t0 = Instant::now();
        let mut map: AgingMap<u16> = AgingMap::new(64, 1);
        map.insert(7, 3, t0, TTL);
        assert_eq!(map.get_mut(7, t0 + Duration::from_secs(59), TTL, false).copied(), Some(3));
        assert_eq!(map.get_mut(8, t0, TTL, false), None);
        assert_eq!(map.get_mut(7, t0 + TTL, TTL, false), None, "expired at exactly ttl");
        assert_eq!(map.len(), 0, "the expired entry was freed");
        // Touching refreshes.
        map.insert(7, 4, t0, TTL);
        assert!(map.get_mut(7, t0 + Duration::from_secs(50), TTL, true).is_some());
        assert!(map.get_mut(7, t0 + Duration::from_secs(100), TTL, false).is_some());
        assert!(map.get_mut(7, t0 + Duration::from_secs(110), TTL, false).is_none());
        // A time before the last use is no time at all.
        map.insert(9, 1, t0 + TTL, TTL);
        assert!(map.get_mut(9, t0, TTL, false).is_some());
    }

    #[test]
    fn the_map_never_outgrows_its_capacity_and_evicts_the_least_recent() {
        let t0 = Instant::now();
        let mut map: AgingMap<u32> = AgingMap::new(100, 2);
        assert_eq!(map.capacity(), 128);
        for k in 0..10_000u32 {
            map.insert(k, k, t0 + Duration::from_millis(u64::from(k)), Duration::MAX);
            assert!(map.len() <= map.capacity());
        }
        assert_eq!(map.len(), map.capacity());
        let now = t0 + Duration::from_secs(10);
        // The most recent insert of each set survived; the oldest keys are gone.
        assert_eq!(map.get_mut(9_999, now, Duration::MAX, false).copied(), Some(9_999));
        assert_eq!(map.get_mut(0, now, Duration::MAX, false), None);
        let live = (0..10_000u32).filter(|&k| map.get_mut(k, now, Duration::MAX, false).is_some()).count();
        assert_eq!(live, 128);
    }

    #[test]
    fn a_full_set_reuses_expired_slots_before_evicting() {
        let t0 = Instant::now();
        let mut map: AgingMap<u32> = AgingMap::new(8, 3); // one set
        for k in 0..8 {
            map.insert(k, k, t0 + Duration::from_secs(u64::from(k) * 5), TTL);
        }
        assert_eq!(map.len(), 8);
        // At t0+62s only key 0 (used at t0) has expired: it is the one replaced, although every key is older
        // than the new one.
        map.insert(100, 100, t0 + Duration::from_secs(62), TTL);
        let now = t0 + Duration::from_secs(63);
        assert!(map.get_mut(0, now, TTL, false).is_none());
        assert!((1..8).all(|k| map.get_mut(k, now, TTL, false).is_some()));
        // With nothing expired, the least recently used entry (key 1, used at t0+5s) is evicted.
        map.insert(101, 101, now, TTL);
        assert!(map.get_mut(1, now, TTL, false).is_none());
        assert!(map.get_mut(2, now, TTL, false).is_some());
        // Re-inserting an existing key replaces it in place.
        map.insert(1, 42, now, TTL);
        assert_eq!(map.get_mut(1, now, TTL, false).copied(), Some(42));
        assert_eq!(map.len(), 8);
    }

    #[test]
    fn retain_purge_and_clear() {
        let t0 = Instant::now();
        let mut map: AgingMap<u16> = AgingMap::new(64, 4);
        for k in 0..10u32 {
            map.insert(k, k as u16, t0 + Duration::from_secs(u64::from(k)), TTL);
        }
        map.retain(|k, v| {
            *v += 1;
            k % 2 == 0
        });
        assert_eq!(map.len(), 5);
        assert_eq!(map.get_mut(4, t0, TTL, false).copied(), Some(5));
        assert_eq!(map.get_mut(3, t0, TTL, false), None);
        // At t0+63s, keys 0 and 2 (used at t0 and t0+2s) have expired.
        assert_eq!(map.purge_expired(t0 + Duration::from_secs(63), TTL), 2);
        assert_eq!(map.len(), 3);
        map.clear();
        assert_eq!(map.len(), 0);
        assert_eq!(map.get_mut(8, t0, TTL, false), None);
    }
}
