//! The data plane: AF_PACKET workers forwarding client packets to real servers.
//!
//! - [`afpacket`]: the ring and batched transmit (the only socket code).
//! - [`steer`]: which worker gets a packet (by client address, so each worker owns its connections).
//! - [`engine`]: the pure per-packet decisions; [`worker`]: the loop around it.
//! - [`table`]: the published service table; [`counters`]: per-worker counters read at scrape time.
//! - [`netif`]: interface facts and the checks that keep the kernel out of the way.

pub mod afpacket;
pub mod counters;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod netif;
pub mod steer;
pub mod table;
pub mod worker;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;

use crate::config::DataplaneConfig;
use afpacket::{PacketRing, RingConfig, SteeringHandle};
use counters::WorkerCounters;
use engine::{Engine, EngineConfig};
use steer::Steering;
use table::ServiceTable;

use crate::sync::{SyncShared, WorkerPort};

/// The running workers.
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counters: Vec<Arc<WorkerCounters>>,
    /// Whether this director serves its VIPs: answers ARP and forwards (false on a standby).
    pub serving: Arc<AtomicBool>,
    /// Generation the engines watch: [`Dataplane::announce`] bumps it to re-send gratuitous ARPs.
    announce: Arc<AtomicU64>,
    steering: SteeringHandle,
    workers: u32,
    /// What the steering program was built for.
    steered: Mutex<(Vec<Ipv4Addr>, Steering)>,
    /// Connection sync, told the steering so that received connections reach their worker.
    sync: Option<Arc<SyncShared>>,
}

impl Dataplane {
    /// Opens one ring per worker on the interface, joined in one fanout group, and starts the workers.
    pub fn start(config: &DataplaneConfig, table: Arc<ArcSwap<ServiceTable>>, serving: bool) -> Result<Dataplane> {
        Self::start_with_sync(config, table, serving, None)
    }

    /// [`start`](Self::start), with each worker connected to connection sync: one [`WorkerPort`] per worker
    /// (from [`crate::sync::hub`]) and the refresh period.
    pub fn start_with_sync(
        config: &DataplaneConfig,
        table: Arc<ArcSwap<ServiceTable>>,
        serving: bool,
        sync: Option<(Vec<WorkerPort>, Duration)>,
    ) -> Result<Dataplane> {
        let sync_shared = sync.as_ref().and_then(|(ports, _)| ports.first()).map(|port| Arc::clone(&port.shared));
        let (mut sync_ports, refresh) = match sync {
            Some((ports, refresh)) => (ports.into_iter(), refresh),
            None => (Vec::new().into_iter(), Duration::ZERO),
        };
        let interface = &config.interface;
        let vips = table.load().vips.clone();
        netif::check_kernel_hands_off(interface, &vips)?;
        let our_mac = netif::mac_address(interface)?;
        let our_ip = netif::interface_ipv4(interface)?;
        let steered_by = table.load().steering();
        let program = steer::fanout_program(&vips, config.workers, steered_by);
        if let Some(shared) = &sync_shared {
            shared.steered_by_client.store(steered_by == Steering::Client, Ordering::Relaxed);
        }
        // One group per process: the pid keeps two directors on one host (tests) apart.
        let group = (std::process::id() & 0xffff) as u16;
        let ring_config = RingConfig { frame_count: config.ring_frames, ..RingConfig::default() };
        let stop = Arc::new(AtomicBool::new(false));
        let serving = Arc::new(AtomicBool::new(serving));
        let announce = Arc::new(AtomicU64::new(0));
        let now = Instant::now();
        let mut threads = Vec::new();
        let mut all_counters = Vec::new();
        let mut steering = None;
        let busy_poll = Duration::from_micros(config.busy_poll_us.into());
        for worker in 0..config.workers as usize {
            let mut ring = PacketRing::open(interface, ring_config, Some((group, &program)))
                .with_context(|| format!("opening the AF_PACKET ring on {interface}"))?;
            if steering.is_none() {
                steering = Some(ring.steering_handle().context("duplicating the ring socket")?);
            }
            let counters = Arc::new(WorkerCounters::default());
            let engine_config = EngineConfig {
                worker,
                our_mac,
                our_ip,
                connection_capacity: config.connection_capacity as usize,
                timeouts: config.timeouts.clone(),
                garp_count: config.garp_count,
                garp_interval: Duration::from_millis(config.garp_interval_ms.into()),
                tunnel_mtu: config.tunnel_mtu as u16,
                arp_duty: worker == 0,
            };
            let mut engine =
                Engine::new(engine_config, Arc::clone(&table), Arc::clone(&counters), Arc::clone(&serving), now)?;
            if let Some(port) = sync_ports.next() {
                engine.attach_sync(port, refresh, now);
            }
            engine.watch_announcements(Arc::clone(&announce));
            let (stop, thread_counters) = (Arc::clone(&stop), Arc::clone(&counters));
            let thread = std::thread::Builder::new()
                .name(format!("fulcrum-worker-{worker}"))
                .spawn(move || worker::run(&mut ring, &mut engine, &thread_counters.looped, &stop, busy_poll))
                .context("starting a worker thread")?;
            threads.push(thread);
            all_counters.push(counters);
        }
        tracing::info!(%interface, workers = config.workers, mac = ?our_mac, ip = %our_ip, "data plane forwarding");
        Ok(Dataplane {
            stop,
            threads,
            counters: all_counters,
            serving,
            announce,
            steering: steering.context("no worker")?,
            workers: config.workers,
            steered: Mutex::new((vips, steered_by)),
            sync: sync_shared,
        })
    }

    /// Follows a new service table: the steering program must know every VIP (NAT replies are steered by
    /// destination, everything to a VIP by source), and steers by client alone while a service is persistent.
    pub fn follow(&self, table: &ServiceTable) {
        let mut steered = self.steered.lock().unwrap_or_else(PoisonError::into_inner);
        let steering = table.steering();
        if steered.0 == table.vips && steered.1 == steering {
            return;
        }
        if steered.1 != steering {
            // Established connections whose key now hashes elsewhere meet a worker without their entry.
            tracing::warn!(?steering, "persistence changed: steering connections anew; established ones may stall");
        }
        match self.steering.set_program(&steer::fanout_program(&table.vips, self.workers, steering)) {
            Ok(()) => {
                if let Some(shared) = &self.sync {
                    shared.steered_by_client.store(steering == Steering::Client, Ordering::Relaxed);
                }
                *steered = (table.vips.clone(), steering)
            }
            Err(e) => tracing::error!(error = %e, "updating the steering program; new VIPs may be mis-steered"),
        }
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// Re-sends the gratuitous-ARP burst for every VIP (when serving): a MASTER re-announcing itself.
    pub fn announce(&self) {
        self.announce.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops and joins the workers.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
