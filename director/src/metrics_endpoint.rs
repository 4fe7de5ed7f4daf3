//! The Prometheus endpoint. Values that are derived at read time (report ages; later, per-worker data-path
//! counters) are gathered on each scrape, just before rendering, rather than by a periodic task.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// Called before every render.
pub type Collector = Arc<dyn Fn() + Send + Sync>;

/// Installs the global recorder and returns its handle. Call once per process.
pub fn install_recorder() -> Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    Ok(handle)
}

/// Serves `GET /metrics` on `listen` until the task is dropped.
pub async fn serve(listen: SocketAddr, handle: PrometheusHandle, collect: Collector) -> Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding the metrics endpoint {listen}"))?;
    info!(%listen, "metrics endpoint at http://{listen}/metrics");
    loop {
        let (mut stream, peer) = listener.accept().await.context("metrics endpoint accept")?;
        let handle = handle.clone();
        let collect = collect.clone();
        tokio::spawn(async move {
            // One small request per connection; anything longer than a request head is not a scrape.
            let mut request = [0u8; 2048];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut request)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&request[..n]);
            let response = if head.starts_with("GET /metrics ") || head.starts_with("GET / ") {
                collect();
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, error = %e, "metrics scrape");
            }
        });
    }
}
