//! The Fulcrum director: receives agent reports over QUIC and (in later parts) schedules and forwards
//! client packets to real servers.

pub mod agents;
pub mod certs;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod control_plane;
pub mod dataplane;
pub mod demo;
pub mod feedback;
pub mod feedback_runtime;
pub mod flow;
pub mod ha;
pub mod health;
pub mod metrics_endpoint;
pub mod sched;
pub mod sd_notify;
pub mod sync;
pub mod tls;
pub mod wire;
