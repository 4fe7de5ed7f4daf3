//! A cluster CA and certificates for the tests, made by the real `fulcrum-director certs`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::workspace_bin;

/// A CA plus one certificate and key per director and agent, in a temp directory removed on drop.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// `directors` are (name, address to put in the certificate); `agents` are agent names.
    pub fn new(directors: &[(&str, Ipv4Addr)], agents: &[&str]) -> Result<Pki> {
        let dir = tempfile::Builder::new().prefix("fulcrum-pki-").tempdir().context("creating a PKI dir")?;
        let path = dir.path().to_str().context("non-UTF-8 temp path")?.to_string();
        certs(&["ca", "--dir", &path])?;
        for (name, ip) in directors {
            certs(&["issue", "--dir", &path, "--role", "director", "--name", name, "--ip", &ip.to_string()])?;
        }
        for name in agents {
            certs(&["issue", "--dir", &path, "--role", "agent", "--name", name])?;
        }
        Ok(Pki { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ca.pem`, `NAME.pem`, `NAME.key`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

fn certs(args: &[&str]) -> Result<()> {
    let out = Command::new(workspace_bin("fulcrum-director")).arg("certs").args(args).output()?;
    if !out.status.success() {
        bail!("fulcrum-director certs {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
