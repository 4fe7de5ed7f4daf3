//! `tcp_echo ADDR:PORT`: echoes every TCP connection's bytes back to it, one thread per connection. Test
//! helper for the connection-sync failover test (long-lived connections through the VIP).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn echo(mut stream: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: tcp_echo ADDR:PORT");
        return std::process::ExitCode::from(2);
    };
    let listener = match TcpListener::bind(&addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("tcp_echo: binding {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("listening on {addr}");
    for stream in listener.incoming().flatten() {
        let _ = stream.set_nodelay(true);
        std::thread::spawn(move || echo(stream));
    }
    std::process::ExitCode::SUCCESS
}
