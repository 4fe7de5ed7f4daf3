//! Connection schedulers: which real server gets a new connection.
//!
//! The algorithms are LVS's (`net/netfilter/ipvs/ip_vs_*.c` in Linux), ported decision for decision, plus
//! power-of-two-choices ([`SchedulerKind::P2c`]). Each module's documentation quotes the kernel formula it follows
//! and names every place where Fulcrum deliberately differs.
//!
//! # Threading and allocation
//!
//! Every data-plane worker owns its own [`SchedulerState`] per service, built by the control plane from a
//! published configuration snapshot ([`SchedulerState::new`], [`SchedulerState::rebuild`]: these may allocate).
//! A worker calls [`SchedulerState::pick`] once per *new* connection. `pick` never allocates, locks, blocks or
//! reads a clock: time comes in as [`PickInput::now`]. Connection counts are global across workers (the caller
//! sums per-worker atomic slots) and come in as plain numbers in [`ServerView`].
//!
//! # Weights
//!
//! [`ServerView::weight`] is the server's *effective* weight, `0..=65535` as configured (LVS's range; larger
//! values are handled without overflow). Weight 0 means quiesced: no algorithm ever returns a weight-0 server for
//! a new connection, whatever the tables built earlier say. `pick` returns `None` exactly when no server has
//! weight > 0 (including an empty server list). [`PersistenceTable`] is the one place that keeps sending a client
//! to a quiesced server, as LVS does, unless the server is [`ServerView::failed`].
//!
//! Where the kernel can return "no destination" while some server is available (`sh`, `dh` and `mh` without
//! their fallback flag), Fulcrum always falls back to another available server instead.
//!
//! # Server list
//!
//! `pick` must be given the same server list (same length, same order) as the last `new`/`rebuild`; weights and
//! connection counts may have changed since. Weights are re-read on every pick; tables built from older weights
//! (`wrr`'s step, `sh`/`dh`/`mh` tables, `p2c`'s candidate list) still never yield a weight-0 server, but only a
//! rebuild makes them follow the new weights. A list of a different length is tolerated without panicking
//! (indices past its end are skipped), but scheduling quality is then unspecified.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use thiserror::Error;

mod aging_map;
mod bucket_hash;
mod hashing;
mod least_conn;
mod locality;
mod maglev;
mod p2c;
mod persistence;
mod round_robin;

pub use least_conn::conn_overhead;
pub use persistence::PersistenceTable;

/// Most real servers a service may have: indices are stored as `u16`, with `u16::MAX` reserved as "empty".
pub const MAX_SERVERS: usize = u16::MAX as usize;
/// Smallest Maglev lookup table accepted, and the default (a prime).
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 65_537;
/// Largest Maglev lookup table accepted (2^24 entries: 32 MiB per worker per service).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 1 << 24;
/// `lblc`/`lblcr` default expiry, the kernel's `DEFAULT_EXPIRATION` (24 hours, `lblc_expiration` sysctl).
pub const DEFAULT_LBLC_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// `lblc`/`lblcr` default map capacity, the kernel's `max_size` (`IP_VS_LBLC_TAB_SIZE * 16`).
pub const DEFAULT_LBLC_CAPACITY: usize = 16 * 1024;
/// Largest `lblc`/`lblcr` map capacity accepted.
pub const MAX_LBLC_CAPACITY: usize = 1 << 24;

/// What a scheduler sees of one real server at pick time. `Copy` and plain: the caller keeps one preallocated
/// slice per service and refreshes the counters before each pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerView {
    /// Stable identity of the real server, unique within the service: use [`server_key`] (address and port).
    /// Maglev derives each server's permutation from it, and `lblc`/`lblcr` follow servers across rebuilds by it,
    /// so it must not change when other servers are added or removed.
    pub key: u64,
    /// Effective weight; 0 = quiesced: never picked for new connections.
    pub weight: u32,
    /// Active connections (TCP established), summed over all workers.
    pub active: u32,
    /// Inactive connections (TCP in other states, UDP), summed over all workers.
    pub inactive: u32,
    /// Response-time term T of the dynamic-feedback (`df`) scheduler, in the units of [`conn_overhead`] (one
    /// active connection = 256). Filled by the dynamic-feedback blender; with zeros df equals wlc over
    /// active+inactive. Other algorithms ignore it.
    pub response_time_norm: u32,
    /// Load (CPU) term L of the dynamic-feedback (`df`) scheduler, same units as `response_time_norm`. Filled by
    /// the dynamic-feedback blender; with zeros df equals wlc over active+inactive. Other algorithms ignore it.
    pub cpu_norm: u32,
    /// The server failed its health checks (down, held down after flapping, or removed): persistence templates
    /// do not send clients to it, unlike a server quiesced by its configured weight, whose persistent clients
    /// finish their sessions. The schedulers themselves go by `weight` alone.
    pub failed: bool,
}

impl ServerView {
    /// A server with no connections, no feedback, not failed.
    pub const fn new(key: u64, weight: u32) -> ServerView {
        ServerView { key, weight, active: 0, inactive: 0, response_time_norm: 0, cpu_norm: 0, failed: false }
    }

    /// Whether the server may receive new connections (weight > 0).
    pub const fn is_available(&self) -> bool {
        self.weight > 0
    }
}

/// The [`ServerView::key`] of the real server at `addr:port`: `addr << 16 | port`, unique per address and port.
pub const fn server_key(addr: Ipv4Addr, port: u16) -> u64 {
    ((u32::from_be_bytes(addr.octets()) as u64) << 16) | port as u64
}

/// Everything a scheduler may look at to place one new connection.
#[derive(Debug, Clone, Copy)]
pub struct PickInput<'a> {
    /// The service's real servers, in the order the scheduler was built with.
    pub servers: &'a [ServerView],
    /// Client (source) address: `sh`, `mh` and persistence hash it.
    pub client: Ipv4Addr,
    /// Client (source) port: `sh` and `mh` hash it when [`SchedulerOptions::hash_client_port`] is set.
    pub client_port: u16,
    /// The destination address the client asked for (the VIP, or the original destination in a transparent
    /// cache cluster): `dh`, `lblc` and `lblcr` key on it.
    pub dest: Ipv4Addr,
    /// The time of the pick: `lblc`/`lblcr` age their maps with it.
    pub now: Instant,
}

/// The scheduling algorithms are the configuration's own list (LVS's `ipvsadm -s` names plus
/// power-of-two-choices): one enum for the file, the command line and the schedulers.
pub use crate::config::Scheduler as SchedulerKind;

/// Per-service scheduler settings. All fields are validated by [`SchedulerOptions::validate`] (which
/// [`SchedulerState::new`] calls) whatever the algorithm, so a bad value is refused even before it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Maglev lookup table size: a prime in `MIN_MAGLEV_TABLE_SIZE..=MAX_MAGLEV_TABLE_SIZE` (default 65537).
    /// Larger tables balance weights more finely and cost 2 bytes per entry per worker.
    pub maglev_table_size: u32,
    /// `lblc`/`lblcr`: a destination's entry is forgotten when unused this long; an `lblcr` server set larger
    /// than one drops its most loaded member when unchanged this long (default 24 h, as the kernel).
    pub lblc_expiry: Duration,
    /// `lblc`/`lblcr`: most destinations remembered, `1..=MAX_LBLC_CAPACITY`, rounded up to a multiple of 8
    /// and a power of two (default 16384, the kernel's `max_size`).
    pub lblc_capacity: usize,
    /// Seed of the `p2c` candidate draws. Give each worker a different seed (e.g. mix in the worker id) so that
    /// workers do not draw in lockstep.
    pub p2c_seed: u64,
    /// Seed of the `lblc`/`lblcr` map's bucket hash; set it from a random source at startup so that clients
    /// cannot aim collisions at one bucket. It affects only which entries evict each other, never a pick.
    pub table_seed: u64,
    /// `sh` and `mh` hash the client port as well as the address (the kernel's `sh-port`/`mh-port` flags):
    /// spreads one client's connections, at the cost of client affinity.
    pub hash_client_port: bool,
}

impl Default for SchedulerOptions {
    fn default() -> SchedulerOptions {
        SchedulerOptions {
            maglev_table_size: MIN_MAGLEV_TABLE_SIZE,
            lblc_expiry: DEFAULT_LBLC_EXPIRY,
            lblc_capacity: DEFAULT_LBLC_CAPACITY,
            p2c_seed: 0x5EED_F00D_CAFE_0001,
            table_seed: 0x7AB1_E5EE_D000_0001,
            hash_client_port: false,
        }
    }
}

impl SchedulerOptions {
    /// Checks every field (see the field documentation for the ranges).
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let size = self.maglev_table_size;
        if size < MIN_MAGLEV_TABLE_SIZE {
            return Err(SchedulerError::MaglevTableTooSmall(size));
        }
        if size > MAX_MAGLEV_TABLE_SIZE {
            return Err(SchedulerError::MaglevTableTooLarge(size));
        }
        if !is_prime(size) {
            return Err(SchedulerError::MaglevTableNotPrime(size));
        }
        if self.lblc_capacity == 0 || self.lblc_capacity > MAX_LBLC_CAPACITY {
            return Err(SchedulerError::LblcCapacity(self.lblc_capacity));
        }
        Ok(())
    }
}

/// Deterministic trial division; `n` is at most 2^24, so at most ~2048 odd divisors.
fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// Why a scheduler could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchedulerError {
    #[error("maglev table size {0} is too small: it must be a prime of at least {MIN_MAGLEV_TABLE_SIZE}")]
    MaglevTableTooSmall(u32),
    #[error("maglev table size {0} is too large: it must be a prime of at most {MAX_MAGLEV_TABLE_SIZE}")]
    MaglevTableTooLarge(u32),
    #[error("maglev table size {0} is not prime")]
    MaglevTableNotPrime(u32),
    #[error("lblc capacity {0} is out of range 1..={MAX_LBLC_CAPACITY}")]
    LblcCapacity(usize),
    #[error("{0} real servers: a service may have at most {MAX_SERVERS}")]
    TooManyServers(usize),
}

/// One service's scheduler, owned by one worker: an enum over the per-algorithm state (no dynamic dispatch).
#[derive(Debug, Clone)]
pub struct SchedulerState {
    kind: SchedulerKind,
    options: SchedulerOptions,
    algo: Algo,
}

#[derive(Debug, Clone)]
enum Algo {
    Rr(round_robin::RoundRobin),
    Wrr(round_robin::WeightedRoundRobin),
    Lc,
    Wlc,
    Sed,
    Nq,
    Df,
    Sh(bucket_hash::BucketTable),
    Dh(bucket_hash::BucketTable),
    Mh(maglev::Maglev),
    Lblc(locality::Lblc),
    Lblcr(locality::Lblcr),
    P2c(p2c::P2c),
}

impl SchedulerState {
    /// Validates `options` and builds the algorithm's state for `servers` (Maglev's lookup table, the
    /// `sh`/`dh` buckets, the preallocated `lblc`/`lblcr` map, ...). Control plane only: allocates.
    pub fn new(
        kind: SchedulerKind,
        servers: &[ServerView],
        options: &SchedulerOptions,
    ) -> Result<SchedulerState, SchedulerError> {
        options.validate()?;
        check_server_count(servers)?;
        let algo = match kind {
            SchedulerKind::Rr => Algo::Rr(round_robin::RoundRobin::new()),
            SchedulerKind::Wrr => Algo::Wrr(round_robin::WeightedRoundRobin::new(servers)),
            SchedulerKind::Lc => Algo::Lc,
            SchedulerKind::Wlc => Algo::Wlc,
            SchedulerKind::Sed => Algo::Sed,
            SchedulerKind::Nq => Algo::Nq,
            SchedulerKind::Df => Algo::Df,
            SchedulerKind::Sh => Algo::Sh(bucket_hash::BucketTable::build(servers)),
            SchedulerKind::Dh => Algo::Dh(bucket_hash::BucketTable::build(servers)),
            SchedulerKind::Mh => Algo::Mh(maglev::Maglev::build(servers, options.maglev_table_size)),
            SchedulerKind::Lblc => Algo::Lblc(locality::Lblc::new(servers, options)),
            SchedulerKind::Lblcr => Algo::Lblcr(locality::Lblcr::new(servers, options)),
            SchedulerKind::P2c => Algo::P2c(p2c::P2c::new(servers, options.p2c_seed)),
        };
        Ok(SchedulerState { kind, options: options.clone(), algo })
    }

    /// The server list or some weights changed: rebuild tables (control plane; may allocate). Keeps what the
    /// kernel keeps on `add_dest`/`del_dest`/`upd_dest`: `rr`'s position (if still in range), `wrr`'s current
    /// weight (adjusted as `ip_vs_wrr_dest_changed`), `lblc`/`lblcr` entries (followed by [`ServerView::key`];
    /// entries of removed servers are dropped) and `p2c`'s random state.
    pub fn rebuild(&mut self, servers: &[ServerView]) -> Result<(), SchedulerError> {
        check_server_count(servers)?;
        match &mut self.algo {
            Algo::Rr(rr) => rr.rebuild(servers),
            Algo::Wrr(wrr) => wrr.rebuild(servers),
            Algo::Lc | Algo::Wlc | Algo::Sed | Algo::Nq | Algo::Df => {}
            Algo::Sh(table) | Algo::Dh(table) => *table = bucket_hash::BucketTable::build(servers),
            Algo::Mh(mh) => *mh = maglev::Maglev::build(servers, self.options.maglev_table_size),
            Algo::Lblc(lblc) => lblc.rebuild(servers),
            Algo::Lblcr(lblcr) => lblcr.rebuild(servers),
            Algo::P2c(p2c) => p2c.rebuild(servers),
        }
        Ok(())
    }

    /// Picks the real server (an index into `input.servers`) for one new connection; `None` when no server has
    /// weight > 0. Data plane: no allocation, no locking, no clock.
    #[inline]
    pub fn pick(&mut self, input: &PickInput<'_>) -> Option<usize> {
        let servers = input.servers;
        let choice = match &mut self.algo {
            Algo::Rr(rr) => rr.pick(servers),
            Algo::Wrr(wrr) => wrr.pick(servers),
            Algo::Lc => least_conn::lc(servers),
            Algo::Wlc => least_conn::wlc(servers),
            Algo::Sed => least_conn::sed(servers),
            Algo::Nq => least_conn::nq(servers),
            Algo::Df => least_conn::df(servers),
            Algo::Sh(table) => {
                let port = if self.options.hash_client_port { input.client_port } else { 0 };
                table.pick(bucket_hash::hash_key(input.client, port), servers)
            }
            Algo::Dh(table) => table.pick(bucket_hash::hash_key(input.dest, 0), servers),
            Algo::Mh(mh) => {
                let port = if self.options.hash_client_port { input.client_port } else { 0 };
                mh.pick(input.client, port, servers)
            }
            Algo::Lblc(lblc) => lblc.pick(input),
            Algo::Lblcr(lblcr) => lblcr.pick(input),
            Algo::P2c(p2c) => p2c.pick(servers),
        };
        debug_assert!(choice.is_none_or(|i| servers[i].weight > 0), "{} picked a quiesced server", self.kind);
        choice
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    pub fn options(&self) -> &SchedulerOptions {
        &self.options
    }
}

fn check_server_count(servers: &[ServerView]) -> Result<(), SchedulerError> {
    if servers.len() > MAX_SERVERS {
        return Err(SchedulerError::TooManyServers(servers.len()));
    }
    Ok(())
}

/// The first server with weight > 0 at or after `start` (cyclically): the last-resort fallback of the hashing
/// schedulers, O(n).
fn first_available_from(servers: &[ServerView], start: usize) -> Option<usize> {
    let n = servers.len();
    (0..n).map(|k| (start + k) % n).find(|&i| servers[i].weight > 0)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Servers 10.0.0.1:80, 10.0.0.2:80, ... with the given weights.
    pub(crate) fn servers(weights: &[u32]) -> Vec<ServerView> {
        weights.iter().enumerate().map(|(i, &w)| ServerView::new(key(i), w)).collect()
    }

    /// The key of the `i`th server of [`servers`].
    pub(crate) fn key(i: usize) -> u64 {
        server_key(Ipv4Addr::from(0x0A00_0001 + i as u32), 80)
    }

    pub(crate) fn t0() -> Instant {
        // Tests never read the clock for decisions; this is only an origin to add durations to.
        Instant::now()
    }

    pub(crate) fn input(servers: &[ServerView], client: Ipv4Addr, now: Instant) -> PickInput<'_> {
        PickInput { servers, client, client_port: 40_000, dest: Ipv4Addr::new(192, 0, 2, 1), now }
    }

    pub(crate) fn state(kind: SchedulerKind, servers: &[ServerView]) -> SchedulerState {
        SchedulerState::new(kind, servers, &SchedulerOptions::default()).unwrap()
    }

    /// A deterministic stream of client addresses.
    pub(crate) fn clients(n: usize, seed: u64) -> Vec<Ipv4Addr> {
        let mut rng = hashing::XorShift64Star::new(seed);
        (0..n).map(|_| Ipv4Addr::from(rng.next_u64() as u32)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn options_validate_the_maglev_table_size() {
        let with = |size| SchedulerOptions { maglev_table_size: size, ..SchedulerOptions::default() };
        assert_eq!(SchedulerOptions::default().validate(), Ok(()));
        assert_eq!(with(65_537).validate(), Ok(()));
        assert_eq!(with(131_071).validate(), Ok(()));
        assert_eq!(with(655_373).validate(), Ok(()));
        assert_eq!(with(65_536).validate(), Err(SchedulerError::MaglevTableTooSmall(65_536)));
        assert_eq!(with(65_521).validate(), Err(SchedulerError::MaglevTableTooSmall(65_521)), "prime but small");
        assert_eq!(with(0).validate(), Err(SchedulerError::MaglevTableTooSmall(0)));
        assert_eq!(with(65_539).validate(), Ok(()));
        assert_eq!(with(65_541).validate(), Err(SchedulerError::MaglevTableNotPrime(65_541)));
        assert_eq!(with(131_073).validate(), Err(SchedulerError::MaglevTableNotPrime(131_073)));
        assert_eq!(with(16_777_259).validate(), Err(SchedulerError::MaglevTableTooLarge(16_777_259)));
        let err = SchedulerState::new(SchedulerKind::Mh, &servers(&[1]), &with(100_000)).unwrap_err();
        assert!(err.to_string().contains("not prime"), "{err}");
        // Refused whatever the algorithm.
        assert!(SchedulerState::new(SchedulerKind::Rr, &servers(&[1]), &with(100_000)).is_err());
    }

    #[test]
    fn options_validate_the_lblc_capacity() {
        let with = |cap| SchedulerOptions { lblc_capacity: cap, ..SchedulerOptions::default() };
        assert_eq!(with(0).validate(), Err(SchedulerError::LblcCapacity(0)));
        assert_eq!(with(1).validate(), Ok(()));
        assert_eq!(with(MAX_LBLC_CAPACITY + 1).validate(), Err(SchedulerError::LblcCapacity(MAX_LBLC_CAPACITY + 1)));
    }

    #[test]
    fn primality() {
        let primes: Vec<u32> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]);
        assert!(is_prime(65_537) && is_prime(65_521) && is_prime(131_071) && is_prime(16_777_213));
        assert!(!is_prime(65_535) && !is_prime(4_294_967_295 >> 8) && !is_prime(257 * 263));
    }

    #[test]
    fn too_many_servers_are_refused() {
        let many = vec![ServerView::new(0, 1); MAX_SERVERS + 1];
        let err = SchedulerState::new(SchedulerKind::Wlc, &many, &SchedulerOptions::default()).unwrap_err();
        assert_eq!(err, SchedulerError::TooManyServers(MAX_SERVERS + 1));
        let mut state = state(SchedulerKind::Wlc, &servers(&[1]));
        assert_eq!(state.rebuild(&many), Err(SchedulerError::TooManyServers(MAX_SERVERS + 1)));
    }

    #[test]
    fn the_file_the_command_line_and_ipvsadm_spell_kinds_the_same() {
        use clap::ValueEnum;
        for kind in SchedulerKind::ALL {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
            assert_eq!(kind.to_possible_value().unwrap().get_name(), kind.name());
        }
        assert_eq!(SchedulerKind::P2c.to_string(), "p2c");
    }

    #[test]
    fn server_keys_are_address_and_port() {
        assert_eq!(server_key(Ipv4Addr::new(10, 0, 0, 1), 80), 0x0A00_0001_0050);
        assert_ne!(server_key(Ipv4Addr::new(10, 0, 0, 1), 80), server_key(Ipv4Addr::new(10, 0, 0, 1), 81));
    }

    /// The contract every algorithm shares: never a weight-0 server, `None` exactly when all weights are 0.
    #[test]
    fn no_algorithm_picks_a_quiesced_server() {
        let now = t0();
        let weight_sets: [&[u32]; 6] = [&[0, 3, 0, 1], &[5, 0], &[0, 0, 7], &[0, 0, 0], &[], &[1, 1, 1, 0, 2, 0]];
        for kind in SchedulerKind::ALL {
            for weights in weight_sets {
                let mut list = servers(weights);
                for (i, s) in list.iter_mut().enumerate() {
                    s.active = (i as u32 * 7) % 5;
                    s.inactive = (i as u32 * 3) % 4;
                }
                let mut state = state(kind, &list);
                let any = weights.iter().any(|&w| w > 0);
                for (n, client) in clients(300, 9).into_iter().enumerate() {
                    let mut pick = input(&list, client, now);
                    pick.dest = Ipv4Addr::from(n as u32 % 17);
                    let choice = state.pick(&pick);
                    assert_eq!(choice.is_some(), any, "{kind} {weights:?}");
                    if let Some(i) = choice {
                        assert!(list[i].weight > 0, "{kind} {weights:?} picked {i}");
                    }
                }
            }
        }
    }

    /// Weights changed to 0 without a rebuild: tables built earlier must still not yield the quiesced servers.
    #[test]
    fn stale_tables_still_skip_servers_quiesced_since() {
        let now = t0();
        for kind in SchedulerKind::ALL {
            let built = servers(&[1, 2, 3, 4]);
            let mut state = state(kind, &built);
            let mut now_list = built.clone();
            now_list[1].weight = 0;
            now_list[3].weight = 0;
            for client in clients(500, 3) {
                let choice = state.pick(&input(&now_list, client, now)).unwrap_or_else(|| panic!("{kind}: no pick"));
                assert!(choice == 0 || choice == 2, "{kind} picked {choice}");
            }
            let all_zero = servers(&[0, 0, 0, 0]);
            assert_eq!(state.pick(&input(&all_zero, Ipv4Addr::new(1, 2, 3, 4), now)), None, "{kind}");
            // A shorter list than the tables were built for does not panic.
            let short = servers(&[1]);
            assert_eq!(state.pick(&input(&short, Ipv4Addr::new(1, 2, 3, 4), now)), Some(0), "{kind}");
        }
    }
}
