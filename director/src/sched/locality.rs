//! Locality-based least connection: `lblc` (`ip_vs_lblc.c`) and `lblcr` (`ip_vs_lblcr.c`), for cache clusters:
//! connections to the same destination address go to the same server (or server set) while it is not
//! overloaded.
//!
//! `lblc`, from the kernel's pseudo code:
//!
//! > ```text
//! > if cachenode[dest_ip] is null then
//! >         n, cachenode[dest_ip] <- {weighted least-conn node};
//! > else
//! >         n <- cachenode[dest_ip];
//! >         if (n is dead) OR
//! >            (n.conns>n.weight AND
//! >             there is a node m with m.conns<m.weight/2) then
//! >           n, cachenode[dest_ip] <- {weighted least-conn node};
//! > return n;
//! > ```
//!
//! `lblcr`:
//!
//! > ```text
//! > if serverSet[dest_ip] is null then
//! >         n, serverSet[dest_ip] <- {weighted least-conn node};
//! > else
//! >         n <- {least-conn (alive) node in serverSet[dest_ip]};
//! >         if (n is null) OR
//! >            (n.conns>n.weight AND
//! >             there is a node m with m.conns<m.weight/2) then
//! >             n <- {weighted least-conn node};
//! >             add n to serverSet[dest_ip];
//! >         if |serverSet[dest_ip]| > 1 AND
//! >             now - serverSet[dest_ip].lastMod > T then
//! >             m <- {most conn node in serverSet[dest_ip]};
//! >             remove m from serverSet[dest_ip];
//! > if serverSet[dest_ip] changed then
//! >         serverSet[dest_ip].lastMod <- now;
//! > return n;
//! > ```
//!
//! "Dead" is weight 0 here; "conns" is `activeconns`; "weighted least-conn" is `wlc`'s
//! `(activeconns*256 + inactconns) / weight`.
//!
//! # Differences from the kernel
//!
//! - The map is bounded and preallocated ([`super::aging_map`]): `lblc_capacity` destinations, least recently
//!   used evicted first within a hash set. The kernel's hash chains grow without bound between garbage
//!   collections.
//! - Entries unused for `lblc_expiry` are forgotten as soon as they are looked at (the kernel collects them by a
//!   timer every 30 minutes; no timers here).
//! - An `lblcr` server set holds at most [`SET_CAPACITY`] servers; adding to a full set first drops its most
//!   loaded member (the kernel's sets are unbounded).
//! - Entries follow their servers across rebuilds by [`ServerView::key`]; entries (and set members) of servers
//!   removed from the service are dropped (the kernel keeps them pointing at the removed destination, which is
//!   then never available).

use std::collections::HashMap;
#[cfg(test)]
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::aging_map::AgingMap;
use super::least_conn::{conn_overhead, heavier, lblc_overloaded, wlc};
use super::{PickInput, SchedulerOptions, ServerView};

/// Most servers in one `lblcr` destination set.
pub(super) const SET_CAPACITY: usize = 8;

/// Old server index -> new server index, by key; removed servers map to `None`.
struct Remap {
    new_index: Vec<Option<u16>>,
}

impl Remap {
    fn new(old_keys: &[u64], servers: &[ServerView]) -> Remap {
        let mut by_key = HashMap::with_capacity(servers.len());
        for (i, s) in servers.iter().enumerate().rev() {
            // Reversed so that the first of duplicate keys wins.
            by_key.insert(s.key, i as u16);
        }
        Remap { new_index: old_keys.iter().map(|k| by_key.get(k).copied()).collect() }
    }

    fn get(&self, old: u16) -> Option<u16> {
        self.new_index.get(usize::from(old)).copied().flatten()
    }
}

fn keys(servers: &[ServerView]) -> Vec<u64> {
    servers.iter().map(|s| s.key).collect()
}

/// `lblc`: destination address -> server.
#[derive(Debug, Clone)]
pub(super) struct Lblc {
    map: AgingMap<u16>,
    expiry: Duration,
    keys: Vec<u64>,
}

impl Lblc {
    pub(super) fn new(servers: &[ServerView], options: &SchedulerOptions) -> Lblc {
        Lblc {
            map: AgingMap::new(options.lblc_capacity, options.table_seed),
            expiry: options.lblc_expiry,
            keys: keys(servers),
        }
    }

    pub(super) fn rebuild(&mut self, servers: &[ServerView]) {
        let remap = Remap::new(&self.keys, servers);
        self.map.retain(|_, server| match remap.get(*server) {
            Some(new) => {
                *server = new;
                true
            }
            None => false,
        });
        self.keys = keys(servers);
    }

    /// `ip_vs_lblc_schedule`.
    #[inline]
    pub(super) fn pick(&mut self, input: &PickInput<'_>) -> Option<usize> {
        let servers = input.servers;
        let key = u32::from(input.dest);
        // First look in our cache.
        if let Some(&mut cached) = self.map.get_mut(key, input.now, self.expiry, true) {
            let i = usize::from(cached);
            if let Some(dest) = servers.get(i) {
                if dest.weight > 0 && !lblc_overloaded(dest, servers) {
                    return Some(i);
                }
            }
        }
        // No cache entry or it is invalid, time to schedule.
        let dest = wlc(servers)?;
        self.map.insert(key, dest as u16, input.now, self.expiry);
        Some(dest)
    }

    #[cfg(test)]
    fn cached(&mut self, dest: Ipv4Addr, now: Instant) -> Option<u16> {
        self.map.get_mut(u32::from(dest), now, self.expiry, false).copied()
    }
}

/// An `lblcr` destination set (`struct ip_vs_dest_set`). Members are kept in insertion order and walked newest
/// first, as the kernel's `list_add_rcu` puts new members at the head.
#[derive(Debug, Clone, Copy, Default)]
struct DestSet {
    members: [u16; SET_CAPACITY],
    len: u8,
    /// Last modification; `None` only for the default value of free map slots.
    lastmod: Option<Instant>,
}

impl DestSet {
    fn single(dest: u16, now: Instant) -> DestSet {
        let mut set = DestSet { members: [0; SET_CAPACITY], len: 1, lastmod: Some(now) };
        set.members[0] = dest;
        set
    }

    fn newest_first(&self) -> impl Iterator<Item = u16> + '_ {
        self.members[..usize::from(self.len)].iter().rev().copied()
    }

    /// `ip_vs_dest_set_min`: the weighted least-connection member with weight > 0.
    fn min(&self, servers: &[ServerView]) -> Option<usize> {
        let mut least: Option<(usize, u64, u32)> = None;
        for i in self.newest_first().map(usize::from) {
            let Some(dest) = servers.get(i) else { continue };
            if dest.weight == 0 {
                continue;
            }
            let doh = conn_overhead(dest);
            match least {
                Some((_, loh, lw)) if !heavier(loh, lw, doh, dest.weight) => {}
                _ => least = Some((i, doh, dest.weight)),
            }
        }
        least.map(|(i, _, _)| i)
    }

    /// `ip_vs_dest_set_max`: the weighted most-connection member with weight > 0 (`moh*dw < doh*mw`).
    fn max(&self, servers: &[ServerView]) -> Option<u16> {
        let mut most: Option<(u16, u64, u32)> = None;
        for i in self.newest_first() {
            let Some(dest) = servers.get(usize::from(i)) else { continue };
            if dest.weight == 0 {
                continue;
            }
            let doh = conn_overhead(dest);
            match most {
                Some((_, moh, mw)) if !heavier(doh, dest.weight, moh, mw) => {}
                _ => most = Some((i, doh, dest.weight)),
            }
        }
        most.map(|(i, _, _)| i)
    }

    /// `ip_vs_dest_set_insert(set, dest, check = true)`; a full set first drops its most loaded member.
    fn insert(&mut self, dest: u16, now: Instant, servers: &[ServerView]) {
        if self.newest_first().any(|m| m == dest) {
            return;
        }
        if usize::from(self.len) == SET_CAPACITY {
            let victim = self.max(servers).unwrap_or(self.members[0]);
            self.erase(victim, now);
        }
        self.members[usize::from(self.len)] = dest;
        self.len += 1;
        self.lastmod = Some(now);
    }

    /// `ip_vs_dest_set_erase`.
    fn erase(&mut self, dest: u16, now: Instant) {
        let len = usize::from(self.len);
        if let Some(pos) = self.members[..len].iter().position(|&m| m == dest) {
            self.members.copy_within(pos + 1..len, pos);
            self.len -= 1;
            self.lastmod = Some(now);
        }
    }
}

/// `lblcr`: destination address -> server set.
#[derive(Debug, Clone)]
pub(super) struct Lblcr {
    map: AgingMap<DestSet>,
    expiry: Duration,
    keys: Vec<u64>,
}

impl Lblcr {
    pub(super) fn new(servers: &[ServerView], options: &SchedulerOptions) -> Lblcr {
        Lblcr {
            map: AgingMap::new(options.lblc_capacity, options.table_seed),
            expiry: options.lblc_expiry,
            keys: keys(servers),
        }
    }

    pub(super) fn rebuild(&mut self, servers: &[ServerView]) {
        let remap = Remap::new(&self.keys, servers);
        self.map.retain(|_, set| {
            let mut kept = DestSet { len: 0, ..*set };
            for &m in &set.members[..usize::from(set.len)] {
                if let Some(new) = remap.get(m) {
                    kept.members[usize::from(kept.len)] = new;
                    kept.len += 1;
                }
            }
            *set = kept;
            kept.len > 0
        });
        self.keys = keys(servers);
    }

    /// `ip_vs_lblcr_schedule`.
    #[inline]
    pub(super) fn pick(&mut self, input: &PickInput<'_>) -> Option<usize> {
        let servers = input.servers;
        let now = input.now;
        let key = u32::from(input.dest);
        // First look in our cache.
        if let Some(set) = self.map.get_mut(key, now, self.expiry, true) {
            // Get the least loaded destination.
            let dest = set.min(servers);
            // More than one destination + enough time passed by, cleanup.
            let since = set.lastmod.map_or(Duration::ZERO, |lastmod| now.saturating_duration_since(lastmod));
            if set.len > 1 && since > self.expiry {
                if let Some(most) = set.max(servers) {
                    set.erase(most, now);
                }
            }
            // If the destination is not overloaded, use it.
            if let Some(d) = dest {
                if !lblc_overloaded(&servers[d], servers) {
                    return Some(d);
                }
            }
            // The cache entry is invalid, time to schedule.
            let d = wlc(servers)?;
            // Update our cache entry.
            set.insert(d as u16, now, servers);
            return Some(d);
        }
        // No cache entry, time to schedule.
        let d = wlc(servers)?;
        self.map.insert(key, DestSet::single(d as u16, now), now, self.expiry);
        Some(d)
    }

    #[cfg(test)]
    fn set(&mut self, dest: Ipv4Addr, now: Instant) -> Option<Vec<u16>> {
        let set = self.map.get_mut(u32::from(dest), now, self.expiry, false)?;
        Some(set.members[..usize::from(set.len)].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    const EXPIRY: Duration = Duration::from_secs(3600);

    fn options(capacity: usize) -> SchedulerOptions {
        SchedulerOptions { lblc_capacity: capacity, lblc_expiry: EXPIRY, ..SchedulerOptions::default() }
    }

    fn to(dest: Ipv4Addr, servers: &[ServerView], now: Instant) -> PickInput<'_> {
        PickInput { servers, client: Ipv4Addr::new(198, 51, 100, 1), client_port: 5000, dest, now }
    }

    const D1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    const D2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

    #[test]
    fn lblc_sticks_to_a_destinations_server() {
        let t = t0();
        let mut list = servers(&[10, 10, 10]);
        let mut lblc = Lblc::new(&list, &options(64));
        // Empty map: wlc, all idle: the first server.
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(0));
        list[0].active = 5;
        // D1 stays on server 0 although it is now the most loaded: not overloaded (5 <= 10).
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(0));
        // A new destination gets the weighted least-connection server.
        assert_eq!(lblc.pick(&to(D2, &list, t)), Some(1));
        assert_eq!(lblc.cached(D2, t), Some(1));
    }

    #[test]
    fn lblc_moves_an_overloaded_or_quiesced_destination() {
        let t = t0();
        let mut list = servers(&[2, 2, 2]);
        let mut lblc = Lblc::new(&list, &options(64));
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(0));
        // active 3 > weight 2, but nobody has active*2 < weight: not overloaded.
        list[0].active = 3;
        list[1].active = 1;
        list[2].active = 1;
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(0));
        // Server 2 becomes idle (0*2 < 2): server 0 is overloaded; D1 moves to the wlc choice.
        list[2].active = 0;
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(2));
        assert_eq!(lblc.cached(D1, t), Some(2));
        // Quiesce server 2: D1 moves again.
        list[2].weight = 0;
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(1));
        list.iter_mut().for_each(|s| s.weight = 0);
        assert_eq!(lblc.pick(&to(D1, &list, t)), None);
    }

    #[test]
    fn lblc_entries_expire() {
        let t = t0();
        let mut list = servers(&[1, 1]);
        let mut lblc = Lblc::new(&list, &options(64));
        assert_eq!(lblc.pick(&to(D1, &list, t)), Some(0));
        list[0].active = 1;
        // Used again before the expiry: refreshed, kept.
        let t1 = t + EXPIRY - Duration::from_secs(1);
        assert_eq!(lblc.pick(&to(D1, &list, t1)), Some(0));
        assert_eq!(lblc.pick(&to(D1, &list, t1 + EXPIRY - Duration::from_secs(1))), Some(0));
        // Unused for the expiry: forgotten, rescheduled by wlc (server 1 is idle).
        let t2 = t1 + EXPIRY - Duration::from_secs(1) + EXPIRY;
        assert_eq!(lblc.cached(D1, t2), None);
        assert_eq!(lblc.pick(&to(D1, &list, t2)), Some(1));
    }

    #[test]
    fn lblc_map_is_bounded() {
        let t = t0();
        let list = servers(&[1, 1, 1]);
        let mut lblc = Lblc::new(&list, &options(100));
        for d in 0..5000u32 {
            lblc.pick(&to(Ipv4Addr::from(d), &list, t + Duration::from_millis(u64::from(d))));
        }
        assert_eq!(lblc.map.capacity(), 128);
        assert!(lblc.map.len() <= 128);
        // The most recent destination is remembered.
        assert!(lblc.cached(Ipv4Addr::from(4999), t + Duration::from_secs(5)).is_some());
    }

    #[test]
    fn lblc_entries_follow_servers_across_rebuilds() {
        let t = t0();
        let list = servers(&[1, 1, 1]);
        let mut lblc = Lblc::new(&list, &options(64));
        let mut loaded = list.clone();
        assert_eq!(lblc.pick(&to(D1, &loaded, t)), Some(0));
        loaded[0].active = 1;
        assert_eq!(lblc.pick(&to(D2, &loaded, t)), Some(1));
        // Server 0 removed: D1 forgotten; server 1 is now index 0 and keeps D2.
        let fewer = vec![list[1], list[2]];
        lblc.rebuild(&fewer);
        assert_eq!(lblc.cached(D1, t), None);
        assert_eq!(lblc.cached(D2, t), Some(0));
    }

    #[test]
    fn lblcr_grows_a_set_under_overload_and_picks_its_least_loaded() {
        let t = t0();
        let mut list = servers(&[2, 2, 2]);
        let mut lblcr = Lblcr::new(&list, &options(64));
        assert_eq!(lblcr.pick(&to(D1, &list, t)), Some(0));
        assert_eq!(lblcr.set(D1, t), Some(vec![0]));
        // Server 0 overloaded (3 > 2) while server 2 is idle (0 < 1): wlc picks server 2 (1 is busier), added.
        list[0].active = 3;
        list[1].active = 1;
        assert_eq!(lblcr.pick(&to(D1, &list, t)), Some(2));
        assert_eq!(lblcr.set(D1, t), Some(vec![0, 2]));
        // Now the set's least loaded member is used, without growing the set.
        list[2].active = 1;
        assert_eq!(lblcr.pick(&to(D1, &list, t)), Some(2));
        assert_eq!(lblcr.set(D1, t), Some(vec![0, 2]));
        // Another destination has its own set.
        assert_eq!(lblcr.pick(&to(D2, &list, t)), Some(1));
        assert_eq!(lblcr.set(D2, t), Some(vec![1]));
    }

    #[test]
    fn lblcr_shrinks_an_unchanged_set_after_the_expiry() {
        let t = t0();
        let mut list = servers(&[2, 2, 2]);
        let mut lblcr = Lblcr::new(&list, &options(64));
        lblcr.pick(&to(D1, &list, t));
        list[0].active = 3;
        lblcr.pick(&to(D1, &list, t));
        assert_eq!(lblcr.set(D1, t), Some(vec![0, 1]));
        list[0].active = 1;
        // Used within the expiry (entry kept alive) but the set unchanged for longer: its most loaded member
        // (0: 256*1+0 vs server 1's 0) is dropped.
        let t1 = t + EXPIRY / 2;
        assert_eq!(lblcr.pick(&to(D1, &list, t1)), Some(1));
        assert_eq!(lblcr.set(D1, t1), Some(vec![0, 1]), "not yet");
        let t2 = t + EXPIRY + Duration::from_secs(1);
        assert_eq!(lblcr.pick(&to(D1, &list, t2)), Some(1));
        assert_eq!(lblcr.set(D1, t2), Some(vec![1]));
        // A single-member set is never shrunk; an unused entry expires entirely.
        let t3 = t2 + EXPIRY;
        assert_eq!(lblcr.set(D1, t3), None);
    }

    #[test]
    fn lblcr_sets_are_bounded() {
        let t = t0();
        let n = SET_CAPACITY + 4;
        let mut list = servers(&vec![1; n]);
        let mut lblcr = Lblcr::new(&list, &options(64));
        // Each round, everything in the set is overloaded and one idle server remains outside: it is added.
        for round in 0..n {
            for (i, s) in list.iter_mut().enumerate() {
                s.active = if i < round { 2 + i as u32 } else { 0 };
            }
            let picked = lblcr.pick(&to(D1, &list, t)).unwrap();
            assert_eq!(picked, round);
            let set = lblcr.set(D1, t).unwrap();
            assert!(set.len() <= SET_CAPACITY);
            assert!(set.contains(&(round as u16)));
        }
        // The most loaded members were the ones dropped: the early, least loaded servers survive.
        let set = lblcr.set(D1, t).unwrap();
        assert_eq!(set.len(), SET_CAPACITY);
        assert!(!set.contains(&(SET_CAPACITY as u16 - 1)), "{set:?}");
    }

    #[test]
    fn lblcr_sets_follow_servers_across_rebuilds() {
        let t = t0();
        let mut list = servers(&[2, 2, 2]);
        let mut lblcr = Lblcr::new(&list, &options(64));
        lblcr.pick(&to(D1, &list, t));
        list[0].active = 3;
        lblcr.pick(&to(D1, &list, t));
        assert_eq!(lblcr.set(D1, t), Some(vec![0, 1]));
        // Server 0 removed, a new one appended: D1's set is {old 1} = {new 0}.
        let mut fewer = vec![list[1], list[2], ServerView::new(key(9), 2)];
        fewer.iter_mut().for_each(|s| s.active = 0);
        lblcr.rebuild(&fewer);
        assert_eq!(lblcr.set(D1, t), Some(vec![0]));
        assert_eq!(lblcr.pick(&to(D1, &fewer, t)), Some(0));
        // All of a set's servers removed: the entry goes.
        lblcr.rebuild(&fewer[1..]);
        assert_eq!(lblcr.set(D1, t), None);
    }
}
