//! Service-level quorum and sorry server (keepalived's `quorum`, `hysteresis` and `sorry_server`).
//!
//! The quorum is met while at least `min_servers` servers are serving *and* their weights sum to at least
//! `min_weight`. Once lost, it is regained only at `min_servers + hysteresis` servers (and `min_weight +
//! hysteresis_weight`), so that one server flapping at the edge does not flip the whole service. Below quorum,
//! new connections go to the sorry server when one is configured; without one the service keeps using
//! whatever servers remain (and reports itself below quorum).

use std::net::SocketAddr;
use std::time::Instant;

/// Per-service quorum settings. The defaults (1 server, weight 1, no hysteresis, no sorry server) mean
/// "below quorum when no server is serving".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumConfig {
    pub min_servers: u32,
    pub min_weight: u64,
    /// Extra servers needed to regain a lost quorum.
    pub hysteresis: u32,
    /// Extra weight needed to regain a lost quorum.
    pub hysteresis_weight: u64,
    pub sorry_server: Option<SocketAddr>,
}

impl Default for QuorumConfig {
    fn default() -> QuorumConfig {
        QuorumConfig { min_servers: 1, min_weight: 1, hysteresis: 0, hysteresis_weight: 0, sorry_server: None }
    }
}

/// Where the service sends new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The real servers (quorum met).
    RealServers,
    /// Below quorum, no sorry server: the remaining real servers, if any.
    BelowQuorum,
    /// Below quorum: the sorry server.
    SorryServer(SocketAddr),
}

impl Routing {
    /// Without the sorry server's address, as logs and metrics name it (`fulcrum_quorum_transitions_total{to}`).
    pub const fn name(self) -> &'static str {
        match self {
            Routing::RealServers => "real_servers",
            Routing::BelowQuorum => "below_quorum",
            Routing::SorryServer(_) => "sorry_server",
        }
    }
}

/// The serving servers counted at one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    pub servers: u32,
    pub weight: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumTransition {
    pub at: Instant,
    pub from: Routing,
    pub to: Routing,
    /// What was counted when the quorum was lost or regained.
    pub tally: Tally,
}

/// One service's quorum state.
#[derive(Debug, Clone)]
pub struct ServiceQuorum {
    config: QuorumConfig,
    met: bool,
    lost: u64,
    regained: u64,
}

impl ServiceQuorum {
    /// The quorum starts as not met (no server has been proven healthy yet).
    pub fn new(config: QuorumConfig) -> ServiceQuorum {
        ServiceQuorum { config, met: false, lost: 0, regained: 0 }
    }

    /// A quorum whose settings changed: it carries on from the old one's state (`met`), so that a change of
    /// settings alone neither loses nor regains it; the next [`ServiceQuorum::evaluate`] judges the servers
    /// by the new settings, and a change it makes is a transition like any other.
    pub fn continuing(config: QuorumConfig, met: bool) -> ServiceQuorum {
        ServiceQuorum { met, ..ServiceQuorum::new(config) }
    }

    /// Counts the serving servers — one item per server that is serving (`HealthStatus::is_serving`), with its
    /// full (configured) weight — and returns the transition, if the quorum was lost or regained.
    pub fn evaluate(
        &mut self,
        now: Instant,
        serving_weights: impl IntoIterator<Item = u32>,
    ) -> Option<QuorumTransition> {
        let tally = serving_weights
            .into_iter()
            .fold(Tally::default(), |t, w| Tally { servers: t.servers + 1, weight: t.weight + u64::from(w) });
        let c = &self.config;
        let met = if self.met {
            tally.servers >= c.min_servers && tally.weight >= c.min_weight
        } else {
            tally.servers >= c.min_servers.saturating_add(c.hysteresis)
                && tally.weight >= c.min_weight.saturating_add(c.hysteresis_weight)
        };
        if met == self.met {
            return None;
        }
        let from = self.routing();
        self.met = met;
        if met {
            self.regained += 1;
        } else {
            self.lost += 1;
        }
        Some(QuorumTransition { at: now, from, to: self.routing(), tally })
    }

    pub fn is_met(&self) -> bool {
        self.met
    }

    pub fn routing(&self) -> Routing {
        match (self.met, self.config.sorry_server) {
            (true, _) => Routing::RealServers,
            (false, Some(sorry)) => Routing::SorryServer(sorry),
            (false, None) => Routing::BelowQuorum,
        }
    }

    /// Times the quorum was lost, and regained.
    pub fn counts(&self) -> (u64, u64) {
        (self.lost, self.regained)
    }
}
