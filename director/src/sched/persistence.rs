//! Persistence (`ipvsadm -p`): a client keeps going to the server it was first scheduled to while it keeps
//! coming back within the timeout.
//!
//! LVS keeps a "template" connection per client (per service) whose timer restarts at every use; Fulcrum keeps
//! one [`PersistenceTable`] per service: client address (optionally masked, as `ipvsadm -M`) → server index,
//! refreshed on every lookup hit and insert, forgotten `timeout` after its last use.
//!
//! # Quiesced and failed servers
//!
//! An entry whose server has weight 0 keeps sending that client to it, as LVS does (with the default
//! `expire_quiescent_template = 0`): draining a server with weight 0 lets its persistent clients finish their
//! sessions. Removing the server from the service ([`PersistenceTable::remove_server`]) does end them.
//!
//! An entry whose server failed its health checks ([`ServerView::failed`](super::ServerView::failed): down,
//! held down, or removed by `on_failure = "remove"`) is a miss instead: the client is scheduled afresh and its
//! entry names the new server from then on, so it stays there when the failed server recovers. Otherwise a
//! client that keeps retrying would keep refreshing its entry and be sent to the dead server for as long as it
//! retries. This is what LVS does for every weight-0 server with `expire_quiescent_template = 1`; Fulcrum does it
//! only for failed servers, since the health state tells a failure from an operator's drain.
//!
//! # Allocation and capacity
//!
//! The table is preallocated and bounded ([`super::aging_map`]): lookups and inserts never allocate; when a hash
//! set is full, expired entries are reused first, then the least recently used entry is evicted (a client
//! forgotten that way is simply scheduled afresh).
//!
//! # One table per owner
//!
//! The table takes `&mut self` and belongs to one worker, like the schedulers. Stickiness is therefore only as
//! good as the steering of a client's connections to one worker: with RSS hashing the full 5-tuple, a client's
//! connections from different source ports can reach different workers and different tables. Persistent
//! services need client-address-only steering to those workers (or a shared table, not provided here).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::aging_map::AgingMap;
use super::{PickInput, SchedulerState, MAX_SERVERS};

/// Client address → server index, with timeout and bounded capacity.
#[derive(Debug, Clone)]
pub struct PersistenceTable {
    map: AgingMap<u16>,
    timeout: Duration,
    mask: u32,
}

impl PersistenceTable {
    /// Room for at least `capacity` clients (rounded up to a power of two, at least 8); entries expire
    /// `timeout` after their last use; `seed` keys the bucket hash (set it from a random source so that
    /// clients cannot aim collisions at one bucket). Control plane only: allocates.
    pub fn new(capacity: usize, timeout: Duration, seed: u64) -> PersistenceTable {
        PersistenceTable { map: AgingMap::new(capacity, seed), timeout, mask: u32::MAX }
    }

    /// Clients are grouped by their first `prefix_len` address bits (`ipvsadm -M`, the persistence netmask;
    /// default 32: each address on its own). Values above 32 count as 32.
    pub fn with_prefix_len(mut self, prefix_len: u8) -> PersistenceTable {
        self.mask = match prefix_len.min(32) {
            0 => 0,
            len => u32::MAX << (32 - len),
        };
        self
    }

    #[inline]
    fn key(&self, client: Ipv4Addr) -> u32 {
        u32::from(client) & self.mask
    }

    /// The server `client` is persistent to, if its entry has not expired; a hit restarts the timeout. The
    /// server may have been quiesced (weight 0) or have failed since: it is returned all the same, and
    /// [`PersistenceTable::pick`] decides (see the module docs).
    #[inline]
    pub fn lookup(&mut self, client: Ipv4Addr, now: Instant) -> Option<usize> {
        let key = self.key(client);
        self.map.get_mut(key, now, self.timeout, true).map(|&mut server| usize::from(server))
    }

    /// Makes `client` persistent to `server` from `now`. Indices of `MAX_SERVERS` or more (which no service has)
    /// are not stored.
    #[inline]
    pub fn insert(&mut self, client: Ipv4Addr, server: usize, now: Instant) {
        if server < MAX_SERVERS {
            let key = self.key(client);
            self.map.insert(key, server as u16, now, self.timeout);
        }
    }

    /// The server at index `server` was removed from the service's list and the servers after it moved down
    /// one place (as `Vec::remove`): its clients are forgotten and later indices renumbered. O(capacity),
    /// control plane.
    pub fn remove_server(&mut self, server: usize) {
        self.remap_servers(|i| match i.cmp(&server) {
            std::cmp::Ordering::Less => Some(i),
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Greater => Some(i - 1),
        });
    }

    /// General renumbering after the server list changed: `map(old)` gives the new index, or `None` to forget
    /// the clients of a removed server. O(capacity), control plane.
    pub fn remap_servers(&mut self, mut map: impl FnMut(usize) -> Option<usize>) {
        self.map.retain(|_, server| match map(usize::from(*server)) {
            Some(new) if new < MAX_SERVERS => {
                *server = new as u16;
                true
            }
            _ => false,
        });
    }

    /// Frees the entries expired at `now` and returns how many (they are otherwise reclaimed lazily).
    /// O(capacity): for idle-time housekeeping, not the packet path.
    pub fn purge_expired(&mut self, now: Instant) -> usize {
        self.map.purge_expired(now, self.timeout)
    }

    /// The persistent pick: the client's server from the table while its entry lives (even if quiesced, as
    /// long as it is still in `input.servers` and not [`failed`](super::ServerView::failed)), otherwise
    /// `scheduler`'s pick, remembered in place of the old entry. No allocation.
    #[inline]
    pub fn pick(&mut self, scheduler: &mut SchedulerState, input: &PickInput<'_>) -> Option<usize> {
        if let Some(server) = self.lookup(input.client, input.now) {
            if input.servers.get(server).is_some_and(|view| !view.failed) {
                return Some(server);
            }
        }
        let server = scheduler.pick(input)?;
        self.insert(input.client, server, input.now);
        Some(server)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Occupied entries, including expired ones not yet reclaimed.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::SchedulerKind;
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(300);
    const C1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const C2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    #[test]
    fn clients_stick_to_their_server() {
        let t = t0();
        let list = servers(&[1, 1, 1]);
        let mut rr = state(SchedulerKind::Rr, &list);
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        assert_eq!(table.pick(&mut rr, &input(&list, C1, t)), Some(0));
        assert_eq!(table.pick(&mut rr, &input(&list, C2, t)), Some(1));
        // rr would move on; persistence keeps each client where it was.
        for k in 1..10 {
            let now = t + Duration::from_secs(k);
            assert_eq!(table.pick(&mut rr, &input(&list, C1, now)), Some(0));
            assert_eq!(table.pick(&mut rr, &input(&list, C2, now)), Some(1));
        }
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn entries_expire_after_the_timeout_since_last_use() {
        let t = t0();
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        table.insert(C1, 2, t);
        assert_eq!(table.lookup(C1, t + TIMEOUT - Duration::from_secs(1)), Some(2));
        // That hit restarted the timeout.
        assert_eq!(table.lookup(C1, t + 2 * TIMEOUT - Duration::from_secs(2)), Some(2));
        // Unused for the whole timeout: gone.
        assert_eq!(table.lookup(C1, t + 3 * TIMEOUT), None);
        // A zero timeout means nothing persists.
        let mut none = PersistenceTable::new(64, Duration::ZERO, 1);
        none.insert(C1, 0, t);
        assert_eq!(none.lookup(C1, t), None);
    }

    #[test]
    fn a_quiesced_server_keeps_its_persistent_clients() {
        let t = t0();
        let mut list = servers(&[1, 1]);
        let mut wlc = state(SchedulerKind::Wlc, &list);
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        assert_eq!(table.pick(&mut wlc, &input(&list, C1, t)), Some(0));
        list[0].weight = 0;
        assert_eq!(table.pick(&mut wlc, &input(&list, C1, t)), Some(0), "LVS keeps the template");
        assert_eq!(table.pick(&mut wlc, &input(&list, C2, t)), Some(1), "new clients avoid it");
        // Removing the server ends the persistence; the other client's index moves down.
        list.remove(0);
        wlc.rebuild(&list).unwrap();
        table.remove_server(0);
        assert_eq!(table.lookup(C1, t), None);
        assert_eq!(table.lookup(C2, t), Some(0));
        assert_eq!(table.pick(&mut wlc, &input(&list, C1, t)), Some(0));
    }

    #[test]
    fn a_failed_server_loses_its_persistent_clients_for_good() {
        let t = t0();
        let mut list = servers(&[1, 1, 1]);
        let mut wlc = state(SchedulerKind::Wlc, &list);
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        assert_eq!(table.pick(&mut wlc, &input(&list, C1, t)), Some(0));
        list[1].active = 5;
        // Drained by its configured weight, not failed: the client finishes its sessions there.
        list[0].weight = 0;
        assert_eq!(table.pick(&mut wlc, &input(&list, C1, t)), Some(0));
        // Failed its health checks: every retry would refresh the entry, so it must stop naming the dead server.
        list[0].failed = true;
        for k in 0..3 {
            let now = t + Duration::from_secs(k);
            assert_eq!(table.pick(&mut wlc, &input(&list, C1, now)), Some(2), "retry {k}");
        }
        assert_eq!(table.lookup(C1, t), Some(2), "the entry names the new server");
        // Recovered: the client stays where it was moved.
        list[0].failed = false;
        list[0].weight = 1;
        assert_eq!(table.pick(&mut wlc, &input(&list, C1, t)), Some(2));
    }

    #[test]
    fn a_client_of_a_failed_server_waits_for_one_to_be_available() {
        let t = t0();
        let mut list = servers(&[1, 1]);
        let mut rr = state(SchedulerKind::Rr, &list);
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        assert_eq!(table.pick(&mut rr, &input(&list, C1, t)), Some(0));
        list[0].weight = 0;
        list[0].failed = true;
        list[1].weight = 0;
        assert_eq!(table.pick(&mut rr, &input(&list, C1, t)), None, "never the failed server");
        list[1].weight = 1;
        assert_eq!(table.pick(&mut rr, &input(&list, C1, t)), Some(1));
        assert_eq!(table.lookup(C1, t), Some(1));
    }

    #[test]
    fn remap_renumbers_and_forgets() {
        let t = t0();
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        for (i, c) in clients(5, 1).into_iter().enumerate() {
            table.insert(c, i, t);
        }
        table.remap_servers(|i| if i % 2 == 0 { Some(i / 2) } else { None });
        let got: Vec<Option<usize>> = clients(5, 1).into_iter().map(|c| table.lookup(c, t)).collect();
        assert_eq!(got, [Some(0), None, Some(1), None, Some(2)]);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn the_table_is_bounded() {
        let t = t0();
        let mut table = PersistenceTable::new(1000, TIMEOUT, 5);
        assert_eq!(table.capacity(), 1024);
        let many = clients(50_000, 2);
        for (i, &c) in many.iter().enumerate() {
            table.insert(c, i % 7, t + Duration::from_millis(i as u64));
        }
        assert!(table.len() <= table.capacity());
        // The most recent clients are still there; the oldest have been evicted.
        let now = t + Duration::from_secs(50);
        assert_eq!(table.lookup(many[49_999], now), Some(49_999 % 7));
        let remembered = many[..1000].iter().filter(|&&c| table.lookup(c, now).is_some()).count();
        assert!(remembered < 10, "{remembered} of the 1000 oldest clients survived");
        // Expired entries are reclaimed in bulk.
        assert_eq!(table.purge_expired(now + TIMEOUT), table.capacity());
        assert!(table.is_empty());
    }

    #[test]
    fn a_prefix_groups_clients() {
        let t = t0();
        let mut table = PersistenceTable::new(64, TIMEOUT, 1).with_prefix_len(24);
        table.insert(Ipv4Addr::new(198, 51, 100, 1), 3, t);
        assert_eq!(table.lookup(Ipv4Addr::new(198, 51, 100, 200), t), Some(3));
        assert_eq!(table.lookup(Ipv4Addr::new(198, 51, 101, 1), t), None);
        let mut all = PersistenceTable::new(64, TIMEOUT, 1).with_prefix_len(0);
        all.insert(C1, 1, t);
        assert_eq!(all.lookup(Ipv4Addr::new(8, 8, 8, 8), t), Some(1));
    }

    #[test]
    fn an_index_past_the_server_list_is_rescheduled() {
        let t = t0();
        let list = servers(&[1, 1]);
        let mut rr = state(SchedulerKind::Rr, &list);
        let mut table = PersistenceTable::new(64, TIMEOUT, 1);
        table.insert(C1, 5, t);
        assert_eq!(table.pick(&mut rr, &input(&list, C1, t)), Some(0));
        assert_eq!(table.lookup(C1, t), Some(0));
        table.insert(C1, MAX_SERVERS, t);
        assert_eq!(table.lookup(C1, t), Some(0), "not stored");
    }
}
