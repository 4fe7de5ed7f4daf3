//! A bad director configuration is refused with the file, line and key named: at start (`run` exits 78 and
//! so does `check-config`) and at a SIGHUP reload (logged; the running configuration stays, as `fulcrumctl
//! list` shows). One case per kind of mistake an operator makes: an unknown key, a duplicate VIP, an address
//! the director cannot use, a missing certificate, a weight out of range.
//!
//! Needs root (the running director lives in a network namespace).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fulcrum_tests::{require_root, wait_until, workspace_bin, Pki, Testbed};

const DIRECTOR_IP: &str = "10.0.0.2";
const EXIT_BAD_CONFIG: i32 = 78;

/// The good file: one service with two real servers.
fn good_config(pki: &Pki, socket: &Path) -> String {
    format!(
        "name = \"d1\"\n\n[agents]\nlisten = \"{DIRECTOR_IP}:7946\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[control]\nsocket = \"{socket}\"\n\n[[service]]\nvip = \"10.0.0.100\"\nport = 80\nscheduler = \"wlc\"\n\n[[service.server]]\naddress = \"10.0.0.11\"\nweight = 3\n\n[[service.server]]\naddress = \"10.0.0.12\"\n",
        ca = pki.path("ca.pem").display(),
        cert = pki.path("d1.pem").display(),
        key = pki.path("d1.key").display(),
        socket = socket.display(),
    )
}

/// One mistake: the bad text, the key the error must name and the text of the line it must point at.
struct Case {
    what: &'static str,
    text: String,
    key: &'static str,
    line_text: &'static str,
}

fn cases(good: &str, pki: &Pki) -> Vec<Case> {
    let missing_cert = pki.path("d9.pem");
    vec![
        Case {
            what: "an unknown key",
            text: good.replace("weight = 3", "wieght = 3"),
            key: "service[0].server[0].wieght",
            line_text: "wieght = 3",
        },
        Case {
            what: "a duplicate VIP",
            text: format!("{good}\n[[service]]\nvip = \"10.0.0.100\"  # again\nport = 80\n"),
            key: "service[1].vip",
            line_text: "vip = \"10.0.0.100\"  # again",
        },
        Case {
            what: "an address the director cannot use",
            text: good.replace("vip = \"10.0.0.100\"", "vip = \"127.0.0.1\""),
            key: "service[0].vip",
            line_text: "vip = \"127.0.0.1\"",
        },
        Case {
            what: "a missing certificate",
            text: good.replace(&pki.path("d1.pem").display().to_string(), &missing_cert.display().to_string()),
            key: "agents.cert",
            line_text: "cert = ",
        },
        Case {
            what: "a weight out of range",
            text: good.replace("weight = 3", "weight = 65536"),
            key: "service[0].server[0].weight",
            line_text: "weight = 65536",
        },
    ]
}

impl Case {
    /// `FILE:LINE:` and ``key `KEY` ``, as every config error starts.
    fn expected(&self, file: &Path) -> Result<(String, String)> {
        let line = self
            .text
            .lines()
            .position(|l| l.starts_with(self.line_text))
            .with_context(|| format!("{}: no line starts with {:?}", self.what, self.line_text))?
            + 1;
        Ok((format!("{}:{line}:", file.display()), format!("key `{}`", self.key)))
    }
}

fn list(socket: &Path) -> Result<String> {
    let out =
        Command::new(workspace_bin("fulcrumctl")).arg("--socket").arg(socket).args(["list", "--json"]).output()?;
    if !out.status.success() {
        bail!("fulcrumctl list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn each_bad_file_is_refused_at_start_naming_file_line_and_key() -> Result<()> {
    let pki = Pki::new(&[("d1", DIRECTOR_IP.parse()?)], &[])?;
    let work = tempfile::tempdir()?;
    let good = good_config(&pki, &work.path().join("director.sock"));
    for (i, case) in cases(&good, &pki).iter().enumerate() {
        let file = work.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, &case.text)?;
        let (at, key) = case.expected(&file)?;
        for verb in ["check-config", "run"] {
            let out = Command::new(workspace_bin("fulcrum-director")).args([verb, "--config"]).arg(&file).output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(EXIT_BAD_CONFIG), "{verb} with {}: {stderr}", case.what);
            assert!(
                stderr.contains(&at) && stderr.contains(&key),
                "{verb} with {}: expected {at} {key} in {stderr}",
                case.what
            );
        }
    }
    // And the good file passes.
    let file = work.path().join("good.toml");
    std::fs::write(&file, &good)?;
    let out = Command::new(workspace_bin("fulcrum-director")).args(["check-config", "--config"]).arg(&file).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn each_bad_file_is_refused_at_reload_and_the_running_configuration_stays() -> Result<()> {
    require_root();
    let bed = Testbed::new("badconf")?;
    let host = bed.add_host("dir1", &format!("{DIRECTOR_IP}/24"))?;
    let pki = Pki::new(&[("d1", DIRECTOR_IP.parse()?)], &[])?;
    let work = tempfile::tempdir()?;
    let socket = work.path().join("director.sock");
    let file = work.path().join("director.toml");
    let good = good_config(&pki, &socket);
    std::fs::write(&file, &good)?;

    let mut command = Command::new(workspace_bin("fulcrum-director"));
    command.args(["run", "--config"]).arg(&file);
    let mut director = host.spawn(command)?;
    let running =
        wait_until("the director's control socket", Duration::from_secs(15), Duration::from_millis(50), || {
            if let Some(status) = director.try_wait()? {
                return Err(fulcrum_tests::abort_wait(anyhow::anyhow!("director exited with {status}")));
            }
            Ok(list(&socket).ok())
        })?;
    assert!(running.contains("10.0.0.11") && running.contains("10.0.0.12"), "{running}");

    for case in cases(&good, &pki) {
        std::fs::write(&file, &case.text)?;
        let (at, key) = case.expected(&file)?;
        director.signal("HUP")?;
        let expected = format!("reload refused, the running configuration stays: {at}");
        wait_until(
            &format!("the reload of {} to be refused", case.what),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                if director.try_wait()?.is_some() {
                    return Err(fulcrum_tests::abort_wait(anyhow::anyhow!("director exited on a bad reload")));
                }
                let stderr = director.stderr();
                Ok(stderr.lines().any(|line| line.contains(&expected) && line.contains(&key)))
            },
        )
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", director.output_tails()))?;
        assert_eq!(list(&socket)?, running, "the running configuration changed after refusing {}", case.what);
    }

    // A good file after all that is taken.
    std::fs::write(&file, good.replace("weight = 3", "weight = 5"))?;
    director.signal("HUP")?;
    wait_until(
        "the good reload",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || Ok(list(&socket)? != running),
    )?;
    let status = director.terminate(Duration::from_secs(10))?;
    assert!(status.success(), "director exited with {status}");
    Ok(())
}
