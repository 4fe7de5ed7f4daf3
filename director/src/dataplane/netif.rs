//! Facts about the data-plane interface and the kernel around it: our MAC and address, the kernel's
//! neighbour table, and the two things that must be true before forwarding starts.
//!
//! The kernel sees every packet AF_PACKET sees. So the director must not own a VIP in the kernel (the kernel
//! would answer for it) and the interface must not forward (the kernel would forward our traffic a second
//! time); [`check_kernel_hands_off`] refuses to start otherwise, naming the fix.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The interface's MAC address, from sysfs.
pub fn mac_address(interface: &str) -> Result<[u8; 6]> {
    let path = Path::new("/sys/class/net").join(interface).join("address");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_mac(text.trim()).with_context(|| format!("{}: {:?} is not a MAC address", path.display(), text.trim()))
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Every IPv4 address on every interface of this network namespace, with the interface name.
pub fn local_ipv4_addresses() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned; each node and its fields are valid until freed.
        let ifa = unsafe { &*cursor };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says how to read it.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                // SAFETY: ifa_name is a NUL-terminated string.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
                out.push((name, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            }
        }
        cursor = ifa.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The interface's first IPv4 address: the source of ARP requests and of tunnel packets.
pub fn interface_ipv4(interface: &str) -> Result<Ipv4Addr> {
    local_ipv4_addresses()?
        .into_iter()
        .find(|(name, _)| name == interface)
        .map(|(_, ip)| ip)
        .with_context(|| format!("interface {interface} has no IPv4 address; the director needs one of its own"))
}

/// Refuses to forward when the kernel would interfere: a VIP assigned to a local interface, or IPv4
/// forwarding on for the data-plane interface.
pub fn check_kernel_hands_off(interface: &str, vips: &[Ipv4Addr]) -> Result<()> {
    for (name, address) in local_ipv4_addresses()? {
        if vips.contains(&address) {
            bail!(
                "VIP {address} is assigned to interface {name} of this host: the kernel would answer for it. Remove it \
                 (`ip addr del {address}/32 dev {name}`); the director answers ARP for its VIPs itself"
            );
        }
    }
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
    let forwarding = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    if forwarding.trim() != "0" {
        bail!(
            "IPv4 forwarding is on for {interface} ({path} = {}): the kernel would forward client packets a second \
             time. Turn it off (`sysctl -w net.ipv4.conf.{interface}.forwarding=0`); the director forwards itself",
            forwarding.trim()
        );
    }
    Ok(())
}

/// Complete entries of /proc/net/arp for `interface`: (address, MAC).
pub fn parse_proc_net_arp(text: &str, interface: &str) -> Vec<(Ipv4Addr, [u8; 6])> {
    const ATF_COM: u32 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [ip, _hw_type, flags, mac, _mask, device] = fields.as_slice() else { return None };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            if *device != interface || flags & ATF_COM == 0 {
                return None;
            }
            Some((ip.parse().ok()?, parse_mac(mac)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("02:00:0a:00:00:0b"), Some([2, 0, 10, 0, 0, 11]));
        assert_eq!(parse_mac("02:00:0a:00:00"), None);
        assert_eq!(parse_mac("02:00:0a:00:00:0b:01"), None);
        assert_eq!(parse_mac("zz:00:0a:00:00:0b"), None);
    }

    #[test]
    fn only_complete_entries_on_the_interface_count() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.0.0.11        0x1         0x2         02:00:0a:00:00:0b     *        eth0\n\
                    10.0.0.12        0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    10.0.0.13        0x1         0x2         02:00:0a:00:00:0d     *        eth1\n\
                    10.0.0.14        0x1         0x6         02:00:0a:00:00:0e     *        eth0\n";
        assert_eq!(
            parse_proc_net_arp(text, "eth0"),
            vec![
                (Ipv4Addr::new(10, 0, 0, 11), [2, 0, 10, 0, 0, 11]),
                (Ipv4Addr::new(10, 0, 0, 14), [2, 0, 10, 0, 0, 14])
            ]
        );
    }

    #[test]
    fn the_loopback_address_is_found() {
        let addresses = local_ipv4_addresses().unwrap();
        assert!(addresses.iter().any(|(name, ip)| name == "lo" && *ip == Ipv4Addr::LOCALHOST), "{addresses:?}");
    }
}
