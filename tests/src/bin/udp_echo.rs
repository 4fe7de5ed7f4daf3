//! `udp_echo ADDR:PORT`: answers every UDP datagram with the same bytes, from the address it was sent to
//! (bind the VIP itself on a DR real server, so replies come from the VIP). Test helper for the failover
//! tests' probe.

use std::net::UdpSocket;

fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: udp_echo ADDR:PORT");
        return std::process::ExitCode::from(2);
    };
    let socket = match UdpSocket::bind(&addr) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("udp_echo: binding {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("listening on {addr}");
    let mut buffer = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buffer) {
            Ok((n, from)) => {
                if let Err(e) = socket.send_to(&buffer[..n], from) {
                    eprintln!("udp_echo: answering {from}: {e}");
                }
            }
            Err(e) => eprintln!("udp_echo: receiving: {e}"),
        }
    }
}
