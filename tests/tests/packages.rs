//! The Debian packages: `scripts/package.sh` builds fulcrum-director and fulcrum-agent once (release), they
//! install into the real system with dpkg (re-installing is fine: the test is idempotent), and the installed
//! binaries answer `--version`, pass `check-config` on the shipped default configuration (pointed at a fresh
//! PKI) and the installed units pass `systemd-analyze verify`.
//!
//! Needs root (dpkg).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use fulcrum_tests::{require_root, Pki};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed with {}:\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest `NAME_*.deb` in `dir`.
fn deb(dir: &Path, name: &str) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let path = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}_{version}")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("no {name}_{version}*.deb in {}", dir.display()))?;
    Ok(path)
}

#[test]
fn packages_build_install_and_run() -> Result<()> {
    require_root();
    let built = run(repo().join("scripts/package.sh").to_str().context("path")?, &[])?;
    let dir = repo().join("target/debian");
    let director = deb(&dir, "fulcrum-director")?;
    let agent = deb(&dir, "fulcrum-agent")?;
    assert!(built.contains("fulcrum-director_") && built.contains("fulcrum-agent_"), "{built}");

    let contents = run("dpkg-deb", &["--contents", director.to_str().context("path")?])?;
    for file in [
        "./usr/bin/fulcrum-director",
        "./usr/bin/fulcrumctl",
        "./etc/fulcrum/director.toml",
        "systemd/system/fulcrum-director.service",
    ] {
        assert!(contents.contains(file), "fulcrum-director.deb lacks {file}:\n{contents}");
    }
    let contents = run("dpkg-deb", &["--contents", agent.to_str().context("path")?])?;
    for file in ["./usr/bin/fulcrum-agent", "./etc/fulcrum/agent.toml", "systemd/system/fulcrum-agent.service"] {
        assert!(contents.contains(file), "fulcrum-agent.deb lacks {file}:\n{contents}");
    }

    // Install (or re-install) both; keep an existing conffile rather than ask.
    run(
        "dpkg",
        &[
            "--force-confdef",
            "--force-confold",
            "-i",
            director.to_str().context("path")?,
            agent.to_str().context("path")?,
        ],
    )?;
    let status =
        run("dpkg-query", &["-W", "-f=${Package} ${Version} ${Status}\n", "fulcrum-director", "fulcrum-agent"])?;
    assert_eq!(status.lines().filter(|l| l.ends_with("install ok installed")).count(), 2, "{status}");

    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(run("/usr/bin/fulcrum-director", &["--version"])?.trim(), format!("fulcrum-director {version}"));
    assert_eq!(run("/usr/bin/fulcrum-agent", &["--version"])?.trim(), format!("fulcrum-agent {version}"));
    assert_eq!(run("/usr/bin/fulcrumctl", &["--version"])?.trim(), format!("fulcrumctl {version}"));
    assert!(run("/usr/bin/fulcrum-director", &["--help"])?.contains("check-config"));

    // The shipped default files are valid once their certificates exist: point them at a fresh PKI.
    let pki = Pki::new(&[("d1", "10.0.0.2".parse()?)], &["web1"])?;
    let work = tempfile::tempdir()?;
    let pki_dir = pki.dir().to_str().context("path")?;
    for (file, check) in [
        ("director.toml", vec!["/usr/bin/fulcrum-director", "check-config", "--config"]),
        ("agent.toml", vec!["/usr/bin/fulcrum-agent", "check-config", "--config"]),
    ] {
        let installed = std::fs::read_to_string(Path::new("/etc/fulcrum").join(file))?;
        assert!(installed.lines().filter(|l| l.starts_with('#')).count() >= 5, "/etc/fulcrum/{file} is not commented");
        let copy = work.path().join(file);
        std::fs::write(&copy, installed.replace("/etc/fulcrum/pki", pki_dir))?;
        let (program, args) = check.split_first().context("command")?;
        let mut args = args.to_vec();
        args.push(copy.to_str().context("path")?);
        run(program, &args)?;
    }

    // The installed units, with the installed binaries in place.
    for unit in ["fulcrum-director.service", "fulcrum-agent.service"] {
        let path = ["/lib/systemd/system", "/usr/lib/systemd/system"]
            .iter()
            .map(|d| Path::new(d).join(unit))
            .find(|p| p.is_file())
            .with_context(|| format!("{unit} not installed"))?;
        let out = Command::new("systemd-analyze").args(["verify"]).arg(&path).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {}: {stderr}",
            path.display()
        );
    }
    Ok(())
}
