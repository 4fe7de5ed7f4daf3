//! Running external commands (`ip`, `ss`, `curl`, ...) with errors that say what was run.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Renders a command as a shell-like line for error messages (`ip netns exec ns curl -sS ...`).
pub fn command_line(cmd: &Command) -> String {
    let mut parts = vec![quote(cmd.get_program())];
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '@' | '%' | '+')
        });
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` to completion (stdin is `/dev/null`) and returns its output whatever the exit status.
/// Fails only when the program cannot be started.
pub fn run_unchecked(cmd: &mut Command) -> Result<Output> {
    let line = command_line(cmd);
    cmd.stdin(Stdio::null()).output().with_context(|| format!("could not start `{line}`"))
}

/// Runs `cmd` to completion (stdin is `/dev/null`) and returns its stdout. A non-zero exit status is an
/// error carrying the command line, the status, stderr and stdout.
pub fn run_command(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = run_unchecked(cmd)?;
    check_output(&line, out)
}

/// Turns a finished command's output into its stdout, or an error naming `line` when it failed.
pub fn check_output(line: &str, out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{line}` failed with {}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            out.status,
            stderr.trim_end(),
            stdout.trim_end()
        );
    }
    Ok(stdout)
}

/// `run_command` for a program and its arguments.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(&mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_what_needs_quoting() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", "ns1", "sh", "-c", "echo 'hi there'"]);
        assert_eq!(command_line(&cmd), r"ip netns exec ns1 sh -c 'echo '\''hi there'\'''");
    }

    #[test]
    fn failing_command_error_names_command_status_and_stderr() {
        let err = run("sh", &["-c", "echo out; echo oops >&2; exit 3"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("`sh -c 'echo out; echo oops >&2; exit 3'`"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
        assert!(msg.contains("out"), "{msg}");
    }

    #[test]
    fn missing_program_error_names_it() {
        let err = run("/nonexistent/fulcrum-nope", &["x"]).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/fulcrum-nope x"), "{err:#}");
    }
}
