//! A child process guard: kills the process when dropped, keeps its stdout/stderr in log files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::cmd::{command_line, run_unchecked};
use crate::wait::{abort_wait, wait_until};

/// How long `Drop` waits after SIGTERM before it sends SIGKILL.
pub const DROP_GRACE: Duration = Duration::from_secs(5);

const TAIL_BYTES: usize = 4096;

/// Owns a running child process. On drop it sends SIGTERM, waits (polling the exit status) up to
/// [`DROP_GRACE`], then SIGKILLs and reaps it. When dropped during a panic it prints the tail of the
/// process's stdout/stderr to stderr, so a failing test shows what its daemons said.
pub struct ChildGuard {
    name: String,
    command_line: String,
    child: Child,
    status: Option<ExitStatus>,
    logs: Option<TempDir>,
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("command", &self.command_line)
            .field("status", &self.status)
            .finish()
    }
}

impl ChildGuard {
    /// Spawns `cmd` with stdin from `/dev/null` and stdout/stderr into log files of a fresh temp dir
    /// (see [`ChildGuard::stdout`], [`ChildGuard::stderr`]). `name` is used in messages.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<ChildGuard> {
        let line = command_line(&cmd);
        let logs = tempfile::Builder::new()
            .prefix("fulcrum-proc-")
            .tempdir()
            .with_context(|| format!("creating a log dir for `{line}`"))?;
        let out = File::create(logs.path().join("stdout.log")).context("creating stdout.log")?;
        let err = File::create(logs.path().join("stderr.log")).context("creating stderr.log")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().with_context(|| format!("could not start {name}: `{line}`"))?;
        Ok(ChildGuard { name: name.to_string(), command_line: line, child, status: None, logs: Some(logs) })
    }

    /// Guards an already spawned child (its output is wherever the caller sent it).
    pub fn from_child(name: &str, child: Child) -> ChildGuard {
        ChildGuard { name: name.to_string(), command_line: String::new(), child, status: None, logs: None }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line the process was started with (empty for [`ChildGuard::from_child`]).
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Access to the underlying child (e.g. to take piped handles of a [`ChildGuard::from_child`] child).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status =
                self.child.try_wait().with_context(|| format!("waiting for {} ({})", self.name, self.pid()))?;
        }
        Ok(self.status)
    }

    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.try_wait()?.is_none())
    }

    /// Sends a signal by name (`"TERM"`, `"KILL"`, `"HUP"`, `"STOP"`, `"CONT"`, `"INT"`, `"USR1"`, ...).
    /// Fails if the process has already exited.
    pub fn signal(&mut self, signal: &str) -> Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!("cannot send SIG{signal} to {} ({}): it already exited with {status}", self.name, self.pid());
        }
        // The child is not reaped yet, so its pid cannot have been reused.
        let mut cmd = Command::new("kill");
        cmd.args(["-s", signal, &self.pid().to_string()]);
        let line = command_line(&cmd);
        let out = run_unchecked(&mut cmd)?;
        if !out.status.success() {
            // It may have exited between try_wait and kill.
            if self.try_wait()?.is_some() {
                return Ok(());
            }
            bail!("`{line}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Waits (polling) up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} (pid {}) to exit", self.name, self.pid());
        wait_until(&what, timeout, Duration::from_millis(10), || self.try_wait())
    }

    /// SIGTERM, then waits up to `grace` for the exit; SIGKILL if it did not exit by then.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal("TERM")?;
        match self.wait_exit(grace) {
            Ok(s) => Ok(s),
            Err(_) => self.kill(),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.child.kill().with_context(|| format!("SIGKILL {} ({})", self.name, self.pid()))?;
        let s = self.child.wait().with_context(|| format!("reaping {} ({})", self.name, self.pid()))?;
        self.status = Some(s);
        Ok(s)
    }

    pub fn stdout_path(&self) -> Option<PathBuf> {
        self.logs.as_ref().map(|d| d.path().join("stdout.log"))
    }

    pub fn stderr_path(&self) -> Option<PathBuf> {
        self.logs.as_ref().map(|d| d.path().join("stderr.log"))
    }

    /// Everything the process wrote to stdout so far ("" if not captured).
    pub fn stdout(&self) -> String {
        self.stdout_path().map(|p| read_lossy(&p)).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far ("" if not captured).
    pub fn stderr(&self) -> String {
        self.stderr_path().map(|p| read_lossy(&p)).unwrap_or_default()
    }

    /// Waits until the captured stdout or stderr contains `needle`; fails early if the process exits
    /// first, and on timeout, quoting the output tails.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let what = format!("{} (pid {}) to print {needle:?}", self.name, self.pid());
        let res = wait_until(&what, timeout, Duration::from_millis(20), || {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(true);
            }
            if let Some(status) = self.try_wait()? {
                return Err(abort_wait(anyhow!("{} exited with {status}", self.name)));
            }
            Ok(false)
        });
        res.map_err(|e| anyhow!("{e:#}\n{}", self.output_tails()))
    }

    /// The last few KiB of stdout and stderr, formatted for error messages.
    pub fn output_tails(&self) -> String {
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout(), TAIL_BYTES),
            self.name,
            tail(&self.stderr(), TAIL_BYTES)
        )
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() && self.logs.is_some() {
            eprintln!(
                "[fulcrum-tests] {} (pid {}) `{}`\n{}",
                self.name,
                self.pid(),
                self.command_line,
                self.output_tails()
            );
        }
        if let Err(e) = self.terminate(DROP_GRACE) {
            eprintln!("[fulcrum-tests] warning: stopping {} (pid {}): {e:#}", self.name, self.pid());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_reports_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; echo world >&2; exit 7"]);
        let mut p = ChildGuard::spawn("sh", cmd).unwrap();
        let status = p.wait_exit(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(7));
        assert_eq!(p.stdout(), "hello\n");
        assert_eq!(p.stderr(), "world\n");
        assert!(p.signal("TERM").is_err());
    }

    #[test]
    fn drop_terminates_and_reaps() {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let mut p = ChildGuard::spawn("sleep", cmd).unwrap();
        p.wait_for_output("never", Duration::from_millis(30)).unwrap_err();
        let pid = p.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(p);
        // Reaped: the pid is gone (or, very unlikely, reused by an unrelated process).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!stat.starts_with("sleep\0") || !Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn terminate_escalates_to_kill() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]);
        let mut p = ChildGuard::spawn("stubborn", cmd).unwrap();
        p.wait_for_output("ready", Duration::from_secs(10)).unwrap();
        let status = p.terminate(Duration::from_millis(200)).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
    }
}
