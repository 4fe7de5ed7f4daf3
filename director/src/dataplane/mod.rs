//! The data plane: AF_PACKET I/O shell, worker steering, and (in the packet engine) forwarding decisions.

pub mod afpacket;
pub mod counters;
pub mod netif;
pub mod steer;
pub mod table;
pub mod worker;
