//! Flow identities shared by the packet path, the connection table and the schedulers.
//!
//! IPv4 first. The types are per address family (rather than one `IpAddr`-based key) so that the connection
//! table keeps its entries small; IPv6 gets a `FlowV6` twin when neighbour discovery lands.

use std::net::Ipv4Addr;

/// Transport protocols the director balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Proto {
    Tcp = 6,
    Udp = 17,
}

impl Proto {
    pub fn from_ip_protocol(value: u8) -> Option<Proto> {
        match value {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// A directed IPv4 transport flow (a 5-tuple).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowV4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: Proto,
}

impl FlowV4 {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowV4 {
        FlowV4 { src: self.dst, dst: self.src, src_port: self.dst_port, dst_port: self.src_port, proto: self.proto }
    }
}

/// A real server's stable id: allocated by the control plane when the server first appears and never reused,
/// so a connection entry keeps pointing at its server across configuration changes (and after the server is
/// removed without `--purge`, as LVS keeps such connections until they end).
pub type ServerIndex = u32;
/// Index of a virtual service in the published service table.
pub type ServiceIndex = u16;
