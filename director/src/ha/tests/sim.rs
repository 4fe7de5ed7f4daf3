//! Two [`Ha`] machines over simulated links with a virtual clock that jumps to the earliest timeout.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::ha::{Action, Ha, HaConfig, State, Transmit};

pub const KEY: &[u8] = b"fulcrum-ha-test-key-0123456789ab";

/// SplitMix64: deterministic randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One direction of one path.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub latency: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub up: bool,
}

impl Default for Link {
    fn default() -> Self {
        Link { latency: Duration::from_micros(200), jitter: Duration::ZERO, loss: 0.0, up: true }
    }
}

pub struct Node {
    pub ha: Ha,
    pub alive: bool,
    pub tb_reachable: bool,
    /// Heartbeats from this node still to drop on every path (exact loss bursts).
    pub burst: u32,
    dropping: bool,
    /// Every transmit it made, with its time.
    pub sent: Vec<(Duration, Transmit)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Datagram { to: usize, path: usize, bytes: Vec<u8> },
    Tiebreaker { to: usize, boot: u64 },
}

pub struct Pair {
    pub base: Instant,
    pub now: Instant,
    pub nodes: [Node; 2],
    /// `links[from][path]`.
    pub links: [Vec<Link>; 2],
    pub tb_latency: Duration,
    /// Every action, in emission order: (time since start, node, action).
    pub log: Vec<(Duration, usize, Action)>,
    pub rng: Rng,
    queue: BinaryHeap<Reverse<(Instant, u64, Ev)>>,
    order: u64,
}

pub fn config(node_id: u32, priority: u8) -> HaConfig {
    HaConfig { node_id, priority, key: KEY.to_vec(), ..HaConfig::default() }
}

impl Pair {
    pub fn new(a: HaConfig, b: HaConfig, seed: u64) -> Pair {
        let base = Instant::now();
        let mut rng = Rng(seed);
        let paths = [a.paths, b.paths];
        let node = |cfg: HaConfig, rng: &mut Rng| Node {
            ha: Ha::new(cfg, rng.next_u64() | 1, base).expect("valid config"),
            alive: true,
            tb_reachable: true,
            burst: 0,
            dropping: false,
            sent: Vec::new(),
        };
        let nodes = [node(a, &mut rng), node(b, &mut rng)];
        Pair {
            base,
            now: base,
            nodes,
            links: [vec![Link::default(); paths[0]], vec![Link::default(); paths[1]]],
            tb_latency: Duration::from_millis(1),
            log: Vec::new(),
            rng,
            queue: BinaryHeap::new(),
            order: 0,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    pub fn state(&self, i: usize) -> State {
        self.nodes[i].ha.state()
    }

    pub fn states(&self) -> [State; 2] {
        [self.state(0), self.state(1)]
    }

    /// Both directions of every path.
    pub fn set_links(&mut self, f: impl Fn(&mut Link)) {
        for l in self.links.iter_mut().flatten() {
            f(l);
        }
    }

    pub fn set_path(&mut self, path: usize, up: bool) {
        for dir in &mut self.links {
            dir[path].up = up;
        }
    }

    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
    }

    /// Start node `i` again with a new boot id.
    pub fn restart(&mut self, i: usize, cfg: HaConfig) {
        let boot = self.rng.next_u64() | 1;
        self.nodes[i].ha = Ha::new(cfg, boot, self.now).expect("valid config");
        self.nodes[i].alive = true;
        self.drain(i);
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.order += 1;
        self.queue.push(Reverse((at, self.order, ev)));
    }

    /// Collect node `i`'s outputs.
    pub fn drain(&mut self, i: usize) {
        let now = self.now;
        while let Some(tx) = self.nodes[i].ha.poll_transmit(now) {
            self.nodes[i].sent.push((now - self.base, tx.clone()));
            if tx.path == 0 {
                let n = &mut self.nodes[i];
                n.dropping = n.burst > 0;
                n.burst = n.burst.saturating_sub(1);
            }
            let Some(link) = self.links[i].get(tx.path).copied() else { continue };
            let lost = !link.up || self.nodes[i].dropping || (link.loss > 0.0 && self.rng.unit() < link.loss);
            if !lost {
                let jitter = link.jitter.mul_f64(self.rng.unit());
                self.push(now + link.latency + jitter, Ev::Datagram { to: 1 - i, path: tx.path, bytes: tx.bytes });
            }
        }
        while let Some(a) = self.nodes[i].ha.poll_action() {
            if a == Action::CheckTiebreaker {
                let boot = self.nodes[i].ha.boot_id();
                self.push(now + self.tb_latency, Ev::Tiebreaker { to: i, boot });
            }
            self.log.push((now - self.base, i, a));
        }
    }

    fn next_event(&self) -> Option<Instant> {
        let mut t = self.queue.peek().map(|Reverse((t, _, _))| *t);
        for n in self.nodes.iter().filter(|n| n.alive) {
            if let Some(x) = n.ha.poll_timeout() {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        }
        t
    }

    /// Run until `elapsed() == until` (time since the start).
    pub fn run_until(&mut self, until: Duration) {
        let end = self.base + until;
        let mut spins = 0;
        while let Some(t) = self.next_event().filter(|&t| t <= end) {
            spins = if t <= self.now { spins + 1 } else { 0 };
            assert!(spins < 10_000, "stuck at {:?}: a timeout that does not advance", self.elapsed());
            self.now = self.now.max(t);
            let now = self.now;
            while let Some(Reverse((t, _, _))) = self.queue.peek() {
                if *t > now {
                    break;
                }
                let Some(Reverse((_, _, ev))) = self.queue.pop() else { break };
                match ev {
                    Ev::Datagram { to, path, bytes } => {
                        if self.nodes[to].alive {
                            self.nodes[to].ha.handle_datagram(now, path, &bytes);
                            self.drain(to);
                        }
                    }
                    Ev::Tiebreaker { to, boot } => {
                        let n = &mut self.nodes[to];
                        if n.alive && n.ha.boot_id() == boot {
                            let reachable = n.tb_reachable;
                            n.ha.tiebreaker_result(now, reachable);
                            self.drain(to);
                        }
                    }
                }
            }
            for i in 0..2 {
                if self.nodes[i].alive && self.nodes[i].ha.poll_timeout().is_some_and(|t| t <= now) {
                    self.nodes[i].ha.handle_timeout(now);
                    self.drain(i);
                }
            }
        }
        self.now = self.now.max(end);
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.elapsed() + d;
        self.run_until(until);
    }

    /// Actions of node `i` at or after `since`.
    pub fn actions_since(&self, i: usize, since: Duration) -> Vec<(Duration, Action)> {
        self.log.iter().filter(|(t, n, _)| *n == i && *t >= since).map(|(t, _, a)| (*t, a.clone())).collect()
    }

    /// State changes (Become*/EnterFault) of either node at or after `since`.
    pub fn transitions_since(&self, since: Duration) -> Vec<(Duration, usize, Action)> {
        self.log
            .iter()
            .filter(|(t, _, a)| {
                *t >= since
                    && matches!(
                        a,
                        Action::BecomeMaster { .. } | Action::BecomeBackup { .. } | Action::EnterFault { .. }
                    )
            })
            .cloned()
            .collect()
    }

    /// Whether at least one node serves at every moment from `since` on (checked after every action).
    pub fn always_served_since(&self, since: Duration) -> bool {
        let mut serving = [false; 2];
        let mut ok = true;
        for (t, n, a) in &self.log {
            match a {
                Action::BecomeMaster { .. } => serving[*n] = true,
                Action::BecomeBackup { .. } | Action::EnterFault { .. } => serving[*n] = false,
                _ => {}
            }
            if *t >= since && !serving[0] && !serving[1] {
                ok = false;
            }
        }
        ok
    }
}
