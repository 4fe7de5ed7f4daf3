//! `fulcrum-director demo`, run as a user runs it (short): it builds its playground, serves the client through
//! the VIP, survives the kill of the active director, and leaves nothing behind — at its end, on Ctrl-C, and
//! (by the next run's sweep) after being killed outright.
//!
//! Needs root (network namespaces); fails loudly without it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use fulcrum_tests::{list_netns, require_root, workspace_bin, ChildGuard};

fn demo(seconds: u64) -> Result<ChildGuard> {
    require_root();
    // The demo finds fulcrum-agent next to itself.
    assert!(workspace_bin("fulcrum-agent").is_file());
    let mut command = Command::new(workspace_bin("fulcrum-director"));
    command.args(["demo", "--seconds", &seconds.to_string()]);
    ChildGuard::spawn("demo", command)
}

/// The demo's namespaces (`fdemo<pid>-*`) that exist now.
fn namespaces_of(pid: u32) -> Result<Vec<String>> {
    let prefix = format!("fdemo{pid}-");
    Ok(list_netns()?.into_iter().filter(|name| name.starts_with(&prefix)).collect())
}

fn assert_gone(pid: u32) -> Result<()> {
    assert_eq!(namespaces_of(pid)?, Vec::<String>::new(), "namespaces left behind by demo process {pid}");
    let work = std::env::temp_dir().join(format!("fulcrum-demo-{pid}"));
    assert!(!Path::new(&work).exists(), "{} left behind", work.display());
    Ok(())
}

#[test]
fn a_short_demo_shows_the_servers_survives_the_failover_and_cleans_up() -> Result<()> {
    let mut demo = demo(12)?;
    let pid = demo.pid();
    let status = demo.wait_exit(Duration::from_secs(120))?;
    let (out, err) = (demo.stdout(), demo.stderr());
    assert!(status.success(), "demo exited with {status}\nstdout:\n{out}\nstderr:\n{err}");

    // The live table: every server, every second, both directors, where the metrics are.
    for server in ["rs1 10.0.0.11", "rs2 10.0.0.12", "rs3 10.0.0.13"] {
        assert!(out.matches(server).count() >= 10, "{server} missing from the table:\n{out}");
    }
    assert!(out.contains("d1 metrics: ip netns exec fdemo") && out.contains("http://10.0.0.2:9469/metrics"), "{out}");
    assert!(out.contains("== d1 is MASTER, d2 BACKUP"), "{out}");
    assert!(out.contains("d1 10.0.0.2: MASTER serving the VIP"), "{out}");
    assert!(out.contains("d2 10.0.0.3: BACKUP"), "{out}");
    // Every server answered the client through the VIP before the failover.
    let before = out.split("kill -9").next().unwrap_or_default();
    let last_table = before.rsplit("-- t=").next().unwrap_or_default();
    for line in last_table.lines().filter(|line| line.contains(" 10.0.0.1")) {
        // … served, health: the last two columns.
        let mut columns = line.split_whitespace().rev();
        let health = columns.next().unwrap_or_default();
        let served: u64 = columns.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(served > 0, "a server answered nothing before the failover: {line}\n{out}");
        assert!(["up", "slow-start"].contains(&health), "a server is not healthy: {line}\n{out}");
    }
    // The failover: the active director is killed, the other one serves, and the outage was measured.
    assert!(out.contains("kill -9 d1"), "{out}");
    assert!(out.contains("== d2 is MASTER"), "{out}");
    assert!(out.contains("d1 10.0.0.2: KILLED | d2 10.0.0.3: MASTER serving the VIP"), "{out}");
    let takeover = out.lines().find(|line| line.starts_with("== takeover:")).unwrap_or_else(|| panic!("{out}"));
    let outage_ms = |line: &str| -> u64 {
        let after = line.split("outage ").nth(1).unwrap_or_else(|| panic!("no outage in {line:?}"));
        after.split(" ms").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line:?}"))
    };
    // Measured, and bounded by what the run could see: half of the 12 s run follows the kill.
    assert!(outage_ms(takeover) < 6000, "{takeover}");
    let done = out.lines().find(|line| line.starts_with("== done:")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(outage_ms(done), outage_ms(takeover), "{done}");
    assert_gone(pid)
}

#[test]
fn ctrl_c_tears_the_playground_down_and_a_killed_run_is_swept_by_the_next() -> Result<()> {
    // A run killed outright cannot clean up: its namespaces stay…
    let mut killed = demo(60)?;
    let killed_pid = killed.pid();
    killed.wait_for_output("-- t=", Duration::from_secs(60))?;
    killed.kill()?;
    assert!(!namespaces_of(killed_pid)?.is_empty(), "SIGKILL left no namespaces: nothing to test");

    // …until the next run removes them; that one is stopped with Ctrl-C while it runs.
    let mut interrupted = demo(60)?;
    let pid = interrupted.pid();
    interrupted.wait_for_output("-- t=", Duration::from_secs(60))?;
    assert!(namespaces_of(killed_pid)?.is_empty(), "the next run did not sweep {killed_pid}'s namespaces");
    assert!(
        interrupted.stderr().contains(&format!("removed namespace fdemo{killed_pid}-"))
            && interrupted.stderr().contains(&format!("fulcrum-demo-{killed_pid}, left by an earlier run")),
        "{}",
        interrupted.output_tails()
    );
    interrupted.signal("INT")?;
    let status = interrupted.wait_exit(Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(130), "{}", interrupted.output_tails());
    assert!(interrupted.stdout().contains("== interrupted: tearing the playground down"));
    assert_gone(pid)?;
    assert_gone(killed_pid)
}
