//! The Fulcrum agent: samples a real server's load and its service's response time and reports them to every
//! director over QUIC with mutual TLS.

pub mod config;
pub mod daemon;
pub mod sample;
pub mod sd_notify;
pub mod transport;
