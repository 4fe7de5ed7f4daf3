//! The control socket: a Unix stream socket (mode 0600, so root only) speaking one JSON request and one JSON
//! response per line. `fulcrumctl` is its client; scripts may speak it directly.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use std::sync::Arc;

use crate::agents::{AgentRegistry, AgentView};
use crate::control_plane::{ControlPlane, Edit, ServiceView};
use crate::ha::runtime::{HaCommand, HaHandle, HaView};

/// Longest request line accepted.
const MAX_REQUEST_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every agent the director has heard from, with its latest report.
    Agents,
    /// Every service and real server with counters, weights and agent data.
    List,
    /// Change a service or real server.
    Edit { edit: Edit },
    /// Connection sync with the peer director.
    Sync,
    /// The director pair: status, promote, demote or release.
    Ha { ha: HaCommand },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Agents { agents: Vec<AgentView> },
    Services { services: Vec<ServiceView> },
    Done { message: String },
    Sync { status: crate::sync::SyncStatus },
    Ha { ha: Box<HaView> },
    Error { message: String },
}

/// What the control socket serves.
#[derive(Clone)]
pub struct Handles {
    pub agents: AgentRegistry,
    pub control: Arc<ControlPlane>,
    /// Connection sync, when configured.
    pub sync: Option<Arc<crate::sync::SyncShared>>,
    /// The HA task; `None` for a standalone director (no `[ha]`).
    pub ha: Option<HaHandle>,
}

/// Serves the control socket until the task is dropped.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    handles: Handles,
}

impl ControlServer {
    pub fn bind(path: &Path, handles: Handles) -> Result<ControlServer> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // A socket file left by a previous run that died: remove it, but refuse if a director still answers.
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("{} is in use by another running director", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to root", path.display()))?;
        Ok(ControlServer { listener, path: path.to_path_buf(), handles })
    }

    pub async fn run(self) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let handles = self.handles.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, handles).await {
                            debug!(error = %e, "control client");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "control socket accept"),
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(stream: UnixStream, handles: Handles) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST_LEN as u64 + 1)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Ha { ha }) => handle_ha(ha, &handles).await,
            Ok(request) => handle(request, &handles),
            Err(e) => Response::Error { message: format!("bad request: {e}") },
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

fn handle(request: Request, handles: &Handles) -> Response {
    match request {
        Request::Agents => Response::Agents {
            agents: handles.agents.snapshot(Instant::now()).into_iter().map(|(_, view)| view).collect(),
        },
        Request::List => Response::Services { services: handles.control.list(&handles.agents, Instant::now()) },
        Request::Sync => match &handles.sync {
            Some(sync) => Response::Sync { status: sync.status() },
            None => Response::Error { message: "connection sync is not configured ([sync])".into() },
        },
        Request::Edit { edit } => match handles.control.edit(edit) {
            Ok(message) => {
                tracing::info!(%message, "configuration edited through the control socket");
                Response::Done { message }
            }
            Err(e) => Response::Error { message: e.to_string() },
        },
        Request::Ha { ha } => Response::Error { message: format!("{ha:?} is answered asynchronously") },
    }
}

async fn handle_ha(command: HaCommand, handles: &Handles) -> Response {
    let Some(ha) = &handles.ha else {
        return Response::Error {
            message: "this director is standalone: its configuration has no [ha] section".to_string(),
        };
    };
    match ha.command(command).await {
        Ok(view) => Response::Ha { ha: Box::new(view) },
        Err(e) => Response::Error { message: format!("{e:#}") },
    }
}

/// Sends one request and returns the response (the client side, used by `fulcrumctl` and tests).
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the director's control socket {}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await?;
    let mut lines = BufReader::new(read).lines();
    let reply = lines.next_line().await?.context("the director closed the control socket without answering")?;
    serde_json::from_str(&reply).with_context(|| format!("unreadable answer from the director: {reply}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ha_commands_on_a_standalone_director_say_so() {
        let config: crate::config::DirectorConfig =
            toml::from_str("name = \"d1\"\n[agents]\nca = \"/ca.pem\"\ncert = \"/d1.pem\"\nkey = \"/d1.key\"\n")
                .expect("a minimal config");
        let (control, _changes) = ControlPlane::new(config, 1);
        let handles = Handles { agents: AgentRegistry::default(), control: Arc::new(control), sync: None, ha: None };
        let request: Request = serde_json::from_str(r#"{"command":"ha","ha":"status"}"#).expect("the wire form");
        let Request::Ha { ha } = request else { panic!("not an HA request: {request:?}") };
        match handle_ha(ha, &handles).await {
            Response::Error { message } => assert!(message.contains("no [ha] section"), "{message}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
