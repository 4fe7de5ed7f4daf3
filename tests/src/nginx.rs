//! A real nginx inside a host namespace, configured from a private temp dir.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::netns::Host;
use crate::process::ChildGuard;
use crate::wait::{abort_wait, wait_until};

/// Where nginx is looked for (override with `FULCRUM_NGINX`).
pub const NGINX_BIN: &str = "/usr/sbin/nginx";

/// How long [`Host::start_nginx`] waits for nginx to listen.
pub const NGINX_START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running nginx (master + 1 worker, `daemon off`) in a host's namespace, listening on
/// `0.0.0.0:<port>` (so it also answers on a VIP added to `lo`). Everything it writes (pid file, logs,
/// temp paths) is inside its own temp dir. Stopped (SIGTERM, then SIGKILL) on drop.
///
/// Locations:
/// - `GET /` → `200 host=<host name>\n` (text/plain)
/// - `GET /health` → `200 ok\n`
/// - `GET /whoami` → `200 host=<name> client=<ip>:<port> server=<ip>:<port>\n`
/// - `GET /big` → the file written by [`Nginx::set_big_file`] (404 until then)
/// - `GET /<path>` → files added with [`Nginx::add_file`] / [`Nginx::add_random_file`]
///
/// Every response carries `X-Backend: <host name>`.
pub struct Nginx {
    // Field order matters: the process is stopped before its directory is removed.
    process: ChildGuard,
    dir: TempDir,
    host: Host,
    port: u16,
}

impl std::fmt::Debug for Nginx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nginx")
            .field("host", &self.host.name())
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

fn config(dir: &Path, host: &str, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
user root root;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{
    worker_connections 1024;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 15;
    server {{
        listen 0.0.0.0:{port};
        server_name _;
        root {d}/www;
        add_header X-Backend {host} always;
        location = / {{
            default_type text/plain;
            return 200 "host={host}\n";
        }}
        location = /health {{
            default_type text/plain;
            return 200 "ok\n";
        }}
        location = /whoami {{
            default_type text/plain;
            return 200 "host={host} client=$remote_addr:$remote_port server=$server_addr:$server_port\n";
        }}
        location = /big {{
            try_files /big.bin =404;
        }}
        location / {{
            try_files $uri =404;
        }}
    }}
}}
"#
    )
}

impl Nginx {
    pub(crate) fn start(host: &Host, port: u16) -> Result<Nginx> {
        let bin = std::env::var("FULCRUM_NGINX").unwrap_or_else(|_| NGINX_BIN.to_string());
        if !Path::new(&bin).exists() {
            bail!(
                "nginx not found at {bin} (install it: `apt-get install nginx-light` or nginx, or set FULCRUM_NGINX)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("fulcrum-nginx-{}-", host.name()))
            .tempdir()
            .context("creating nginx's temp dir")?;
        let www = dir.path().join("www");
        std::fs::create_dir(&www).with_context(|| format!("creating {}", www.display()))?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config(dir.path(), host.name(), port))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut cmd = host.command(&bin);
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf).arg("-e").arg(dir.path().join("error.log"));
        let process = ChildGuard::spawn(&format!("nginx@{}:{port}", host.name()), cmd)?;
        let mut nginx = Nginx { process, dir, host: host.clone(), port };
        let what = format!("nginx on {}:{port} to listen", host.name());
        let ready = wait_until(&what, NGINX_START_TIMEOUT, Duration::from_millis(20), || {
            if let Some(status) = nginx.process.try_wait()? {
                return Err(abort_wait(anyhow!("nginx exited with {status}")));
            }
            host.tcp_listening(port)
        });
        if let Err(e) = ready {
            bail!("{e:#}\n--- error.log ---\n{}\n{}", nginx.error_log(), nginx.process.output_tails());
        }
        Ok(nginx)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The name of the host it runs on (what `GET /` answers).
    pub fn host_name(&self) -> &str {
        self.host.name()
    }

    /// nginx's private directory (config, logs, temp paths, `www/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The document root (`<dir>/www`).
    pub fn docroot(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// Writes `contents` to `<docroot>/<name>` (served at `/<name>`); returns the file's path.
    pub fn add_file(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        let path = self.doc_path(name)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes `size` pseudo-random bytes to `<docroot>/<name>` (served at `/<name>`); returns the path.
    pub fn add_random_file(&self, name: &str, size: u64) -> Result<PathBuf> {
        let path = self.doc_path(name)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        crate::write_random_file(&path, size, name.len() as u64 ^ size)?;
        Ok(path)
    }

    /// Writes `size` pseudo-random bytes served at `/big`; returns the file's path (checksum it with
    /// [`crate::sha256_file`]).
    pub fn set_big_file(&self, size: u64) -> Result<PathBuf> {
        self.add_random_file("big.bin", size)
    }

    fn doc_path(&self, name: &str) -> Result<PathBuf> {
        let rel = Path::new(name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            bail!("file name {name:?} must be a relative path without '..'");
        }
        Ok(self.docroot().join(rel))
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// nginx's access log so far (combined format: the client address is the first field).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The nginx master process.
    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.process
    }

    /// Stops nginx now (SIGTERM, SIGKILL after 5 s) and waits until nothing listens on its port.
    pub fn stop(mut self) -> Result<()> {
        self.process.terminate(Duration::from_secs(5))?;
        let what = format!("nginx on {}:{} to stop listening", self.host.name(), self.port);
        wait_until(&what, Duration::from_secs(10), Duration::from_millis(20), || {
            Ok(!self.host.tcp_listening(self.port)?)
        })
    }
}
