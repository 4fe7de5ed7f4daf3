//! The agent's configuration: a TOML file (`/etc/fulcrum/agent.toml`) in which every key can be overridden by a
//! command-line flag. Unknown keys and bad values are refused with the file, line and key named; a bad flag is
//! refused with the flag named.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fulcrum_protocol::config_file::{unreadable, ConfigError, ConfigText, KeyStep};
use fulcrum_protocol::{is_dns_name, ProbeKind, MAX_REPORT_INTERVAL_MS, MIN_REPORT_INTERVAL_MS};
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/fulcrum/agent.toml";
pub const DEFAULT_INTERVAL_MS: u32 = fulcrum_protocol::DEFAULT_REPORT_INTERVAL_MS;
/// Default probes per report interval. A single probe is a poor sample of a service whose response time is
/// bimodal: a server held by its CPU quota answers in tens of microseconds or, when its cgroup is throttled,
/// after up to a CFS period (measured in `bench/feedback`: 20 µs and 15 ms in consecutive reports of the same
/// server), and one probe per report made the director's weights chase that. Four probes, smoothed at the
/// default 0.3 each, put three quarters of the reported figure on the last interval.
pub const PROBES_PER_INTERVAL: u32 = 4;
/// Most probes per report interval.
pub const MAX_PROBES_PER_INTERVAL: u32 = 20;

/// The file as written: every key optional, so that flags can supply or override any of them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    name: Option<String>,
    real_server: Option<IpAddr>,
    ports: Option<Vec<u16>>,
    interval_ms: Option<u32>,
    #[serde(default, rename = "director")]
    directors: Option<Vec<DirectorFile>>,
    #[serde(default)]
    tls: TlsFile,
    #[serde(default)]
    cpu: CpuFile,
    #[serde(default)]
    probe: ProbeFile,
    #[serde(default)]
    metrics: MetricsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectorFile {
    name: String,
    address: SocketAddr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuFile {
    source: Option<CpuSourceKind>,
    cgroup: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeFile {
    kind: Option<ProbeKindName>,
    target: Option<SocketAddr>,
    host: Option<String>,
    path: Option<String>,
    expect_status: Option<String>,
    timeout_ms: Option<u32>,
    smoothing: Option<f64>,
    per_interval: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CpuSourceKind {
    /// Host-wide CPU from /proc/stat.
    Proc,
    /// The CPU of one cgroup (v1 or v2, detected), relative to its quota.
    Cgroup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKindName {
    Tcp,
    Http,
}

/// Command-line overrides, one per key of the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Configuration file [default: /etc/fulcrum/agent.toml, if it exists].
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// `name`: the agent's identity, a DNS name in its certificate.
    #[arg(long, global = true)]
    pub name: Option<String>,
    /// `real_server`: the real server address this agent stands for, as the directors know it.
    #[arg(long, global = true)]
    pub real_server: Option<IpAddr>,
    /// `ports`: a service port on the real server (repeatable; replaces the file's list).
    #[arg(long = "port", global = true)]
    pub ports: Vec<u16>,
    /// `interval_ms`: report interval in milliseconds.
    #[arg(long, global = true)]
    pub interval_ms: Option<u32>,
    /// `[[director]]`: a director as NAME@ADDRESS:PORT (repeatable; replaces the file's list).
    #[arg(long = "director", global = true, value_parser = parse_director)]
    pub directors: Vec<DirectorTarget>,
    /// `tls.ca`: the cluster CA certificate.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// `tls.cert`: this agent's certificate.
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// `tls.key`: this agent's private key.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// `cpu.source`: where CPU utilisation comes from.
    #[arg(long, global = true, value_enum)]
    pub cpu_source: Option<CpuSourceKind>,
    /// `cpu.cgroup`: the cgroup (a path under the cgroup mount, or an absolute directory).
    #[arg(long, global = true)]
    pub cgroup: Option<String>,
    /// `probe.kind`: how the service's response time is measured.
    #[arg(long, global = true, value_enum)]
    pub probe_kind: Option<ProbeKindName>,
    /// `probe.target`: the address probed [default: 127.0.0.1:<first port>].
    #[arg(long, global = true)]
    pub probe_target: Option<SocketAddr>,
    /// `probe.host`: the HTTP Host header.
    #[arg(long, global = true)]
    pub probe_host: Option<String>,
    /// `probe.path`: the HTTP path requested.
    #[arg(long, global = true)]
    pub probe_path: Option<String>,
    /// `probe.expect_status`: accepted HTTP statuses, e.g. 200-399.
    #[arg(long, global = true)]
    pub probe_expect_status: Option<String>,
    /// `probe.timeout_ms`: probe timeout in milliseconds.
    #[arg(long, global = true)]
    pub probe_timeout_ms: Option<u32>,
    /// `probe.smoothing`: EWMA weight of the newest sample, in (0, 1].
    #[arg(long, global = true)]
    pub probe_smoothing: Option<f64>,
    /// `probe.per_interval`: probes per report interval, 1..=20.
    #[arg(long, global = true)]
    pub probe_per_interval: Option<u32>,
    /// `metrics.listen`: address of the agent's Prometheus endpoint.
    #[arg(long, global = true)]
    pub metrics_listen: Option<SocketAddr>,
}

/// One director the agent reports to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorTarget {
    /// The DNS name in the director's certificate.
    pub name: String,
    pub address: SocketAddr,
}

fn parse_director(text: &str) -> Result<DirectorTarget, String> {
    let (name, address) = text.split_once('@').ok_or_else(|| format!("{text:?} is not NAME@ADDRESS:PORT"))?;
    let address = address.parse().map_err(|e| format!("{address:?} is not ADDRESS:PORT: {e}"))?;
    if name.is_empty() {
        return Err(format!("{text:?} has an empty director name"));
    }
    Ok(DirectorTarget { name: name.to_string(), address })
}

/// The resolved, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub name: String,
    pub real_server: IpAddr,
    pub ports: Vec<u16>,
    pub interval: Duration,
    pub directors: Vec<DirectorTarget>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cpu: CpuSetting,
    pub probe: ProbeSetting,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuSetting {
    Proc,
    Cgroup(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSetting {
    pub kind: ProbeKind,
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    pub expect_status: RangeInclusive<u16>,
    pub timeout: Duration,
    pub smoothing: f64,
    /// Probes per report interval: the smoothed response time a report carries then averages several probes,
    /// not one (see `PROBES_PER_INTERVAL`).
    pub per_interval: u32,
}

/// Where a value came from, so that an error can point at it.
enum Origin<'a> {
    File(&'a ConfigText<'a>, &'a [KeyStep<'a>]),
    Flag(&'static str),
    Missing(&'static str, &'static str),
}

impl Origin<'_> {
    fn error(&self, file: &Path, message: impl Into<String>) -> ConfigError {
        let message = message.into();
        match self {
            Origin::File(text, path) => text.error_at(path, message),
            Origin::Flag(flag) => {
                ConfigError { file: PathBuf::from("command line"), line: 0, column: 0, key: flag.to_string(), message }
            }
            Origin::Missing(key, flag) => ConfigError {
                file: file.to_path_buf(),
                line: 0,
                column: 0,
                key: key.to_string(),
                message: format!("{message}: set `{key}` in the file or pass {flag}"),
            },
        }
    }
}

/// Picks the flag's value over the file's, remembering where it came from.
fn pick<'a, T>(
    flag: Option<T>,
    flag_name: &'static str,
    file: Option<T>,
    text: &'a ConfigText<'a>,
    key: &'a [KeyStep<'a>],
) -> (Option<T>, Origin<'a>) {
    match (flag, file) {
        (Some(value), _) => (Some(value), Origin::Flag(flag_name)),
        (None, Some(value)) => (Some(value), Origin::File(text, key)),
        (None, None) => (None, Origin::File(text, key)),
    }
}

/// A value that must be present.
fn required<'a, T>(
    (value, origin): (Option<T>, Origin<'a>),
    file: &Path,
    key: &'static str,
    flag: &'static str,
) -> Result<(T, Origin<'a>), ConfigError> {
    match value {
        Some(value) => Ok((value, origin)),
        None => Err(Origin::Missing(key, flag).error(file, "missing")),
    }
}

impl AgentConfig {
    /// Reads the file named by `--config` (or the default file, if it exists), applies the flags and validates.
    pub fn load(overrides: &Overrides) -> Result<AgentConfig, ConfigError> {
        let (path, text) = match &overrides.config {
            Some(path) => (path.clone(), std::fs::read_to_string(path).map_err(|e| unreadable(path, &e))?),
            None => {
                let path = PathBuf::from(DEFAULT_CONFIG_PATH);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (path, text),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (path, String::new()),
                    Err(e) => return Err(unreadable(&path, &e)),
                }
            }
        };
        Self::resolve(&path, &text, overrides)
    }

    /// Parses `text` (the file at `path`), applies the flags and validates.
    pub fn resolve(path: &Path, text: &str, flags: &Overrides) -> Result<AgentConfig, ConfigError> {
        use KeyStep::Key;
        let source = ConfigText::new(path, text);
        let file: AgentFile = source.parse()?;
        let vec_flag = |v: &Vec<u16>| (!v.is_empty()).then(|| v.clone());

        let (name, name_at) =
            required(pick(flags.name.clone(), "--name", file.name, &source, &[Key("name")]), path, "name", "--name")?;
        if !is_dns_name(&name) {
            return Err(
                name_at.error(path, format!("{name:?} is not a DNS name (it must match the agent's certificate)"))
            );
        }
        let (real_server, real_server_at) = required(
            pick(flags.real_server, "--real-server", file.real_server, &source, &[Key("real_server")]),
            path,
            "real_server",
            "--real-server",
        )?;
        if real_server.is_unspecified() || real_server.is_multicast() {
            return Err(real_server_at.error(path, format!("{real_server} cannot be a real server")));
        }
        let (ports, ports_at) = required(
            pick(vec_flag(&flags.ports), "--port", file.ports, &source, &[Key("ports")]),
            path,
            "ports",
            "--port",
        )?;
        if ports.is_empty() || ports.len() > fulcrum_protocol::MAX_PORTS || ports.contains(&0) {
            return Err(
                ports_at.error(path, format!("give 1 to {} ports, none of them 0", fulcrum_protocol::MAX_PORTS))
            );
        }
        let (interval_ms, interval_at) =
            pick(flags.interval_ms, "--interval-ms", file.interval_ms, &source, &[Key("interval_ms")]);
        let interval_ms = interval_ms.unwrap_or(DEFAULT_INTERVAL_MS);
        if !(MIN_REPORT_INTERVAL_MS..=MAX_REPORT_INTERVAL_MS).contains(&interval_ms) {
            return Err(interval_at.error(
                path,
                format!("{interval_ms} ms is outside {MIN_REPORT_INTERVAL_MS}..={MAX_REPORT_INTERVAL_MS}"),
            ));
        }
        let file_directors = file
            .directors
            .map(|list| list.into_iter().map(|d| DirectorTarget { name: d.name, address: d.address }).collect());
        let flag_directors = (!flags.directors.is_empty()).then(|| flags.directors.clone());
        let (directors, directors_at) = required(
            pick(flag_directors, "--director", file_directors, &source, &[Key("director")]),
            path,
            "director",
            "--director",
        )?;
        if directors.is_empty() {
            return Err(directors_at.error(path, "at least one director is needed"));
        }
        for (i, director) in directors.iter().enumerate() {
            if !is_dns_name(&director.name) {
                let message = format!("director name {:?} is not a DNS name", director.name);
                return Err(match directors_at {
                    Origin::Flag(flag) => Origin::Flag(flag).error(path, message),
                    _ => source.error_at(&[Key("director"), KeyStep::Index(i), Key("name")], message),
                });
            }
        }
        if let Some(dup) =
            directors.iter().enumerate().find(|(i, d)| directors[..*i].iter().any(|e| e.address == d.address))
        {
            return Err(directors_at.error(path, format!("director address {} is listed twice", dup.1.address)));
        }

        let mut tls = Vec::with_capacity(3);
        for (flag, file_value, keys, full_key, flag_name) in [
            (&flags.ca, file.tls.ca, [Key("tls"), Key("ca")], "tls.ca", "--ca"),
            (&flags.cert, file.tls.cert, [Key("tls"), Key("cert")], "tls.cert", "--cert"),
            (&flags.key, file.tls.key, [Key("tls"), Key("key")], "tls.key", "--key"),
        ] {
            let (value, at) =
                required(pick(flag.clone(), flag_name, file_value, &source, &keys), path, full_key, flag_name)?;
            if !value.is_file() {
                return Err(at.error(path, format!("{} does not exist or is not a file", value.display())));
            }
            tls.push(value);
        }
        let [ca, cert, key]: [PathBuf; 3] =
            tls.try_into().map_err(|_| Origin::Missing("tls", "--ca").error(path, "missing"))?;

        let (cpu_source, _) =
            pick(flags.cpu_source, "--cpu-source", file.cpu.source, &source, &[Key("cpu"), Key("source")]);
        let (cgroup, cgroup_at) =
            pick(flags.cgroup.clone(), "--cgroup", file.cpu.cgroup, &source, &[Key("cpu"), Key("cgroup")]);
        let cpu = match (cpu_source.unwrap_or(CpuSourceKind::Proc), cgroup) {
            (CpuSourceKind::Proc, None) => CpuSetting::Proc,
            (CpuSourceKind::Proc, Some(_)) => {
                return Err(
                    cgroup_at.error(path, "a cgroup is set but cpu.source is \"proc\"; set cpu.source = \"cgroup\"")
                )
            }
            (CpuSourceKind::Cgroup, Some(cgroup)) if !cgroup.is_empty() => CpuSetting::Cgroup(cgroup),
            (CpuSourceKind::Cgroup, _) => {
                return Err(Origin::Missing("cpu.cgroup", "--cgroup")
                    .error(path, "cpu.source is \"cgroup\" but no cgroup is named"))
            }
        };

        let probe_key = |k: &'static str| -> [KeyStep<'static>; 2] { [Key("probe"), Key(k)] };
        let kind_key = probe_key("kind");
        let (kind, _) = pick(flags.probe_kind, "--probe-kind", file.probe.kind, &source, &kind_key);
        let kind = match kind.unwrap_or(ProbeKindName::Tcp) {
            ProbeKindName::Tcp => ProbeKind::Tcp,
            ProbeKindName::Http => ProbeKind::Http,
        };
        let target_key = probe_key("target");
        let (target, _) = pick(flags.probe_target, "--probe-target", file.probe.target, &source, &target_key);
        let target = target.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], ports[0])));
        let host_key = probe_key("host");
        let (host, host_at) = pick(flags.probe_host.clone(), "--probe-host", file.probe.host, &source, &host_key);
        let host = host.unwrap_or_else(|| "localhost".to_string());
        if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(host_at.error(path, format!("{host:?} is not a valid Host header")));
        }
        let path_key = probe_key("path");
        let (probe_path, path_at) = pick(flags.probe_path.clone(), "--probe-path", file.probe.path, &source, &path_key);
        let probe_path = probe_path.unwrap_or_else(|| "/".to_string());
        if !probe_path.starts_with('/') || probe_path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(path_at.error(path, format!("{probe_path:?} is not an HTTP path (it must start with '/')")));
        }
        let status_key = probe_key("expect_status");
        let (status, status_at) = pick(
            flags.probe_expect_status.clone(),
            "--probe-expect-status",
            file.probe.expect_status,
            &source,
            &status_key,
        );
        let expect_status = match status {
            None => 200..=399,
            Some(text) => parse_status_range(&text).map_err(|e| status_at.error(path, e))?,
        };
        let timeout_key = probe_key("timeout_ms");
        let (timeout_ms, timeout_at) =
            pick(flags.probe_timeout_ms, "--probe-timeout-ms", file.probe.timeout_ms, &source, &timeout_key);
        let timeout_ms = timeout_ms.unwrap_or(1000);
        if !(1..=60_000).contains(&timeout_ms) {
            return Err(timeout_at.error(path, format!("{timeout_ms} ms is outside 1..=60000")));
        }
        let smoothing_key = probe_key("smoothing");
        let (smoothing, smoothing_at) =
            pick(flags.probe_smoothing, "--probe-smoothing", file.probe.smoothing, &source, &smoothing_key);
        let smoothing = smoothing.unwrap_or(0.3);
        if !(smoothing > 0.0 && smoothing <= 1.0) {
            return Err(smoothing_at.error(path, format!("{smoothing} is outside (0, 1]")));
        }
        let per_interval_key = probe_key("per_interval");
        let (per_interval, per_interval_at) =
            pick(flags.probe_per_interval, "--probe-per-interval", file.probe.per_interval, &source, &per_interval_key);
        let per_interval = per_interval.unwrap_or(PROBES_PER_INTERVAL);
        if !(1..=MAX_PROBES_PER_INTERVAL).contains(&per_interval) {
            return Err(per_interval_at.error(path, format!("{per_interval} is outside 1..={MAX_PROBES_PER_INTERVAL}")));
        }
        let metrics_key = [Key("metrics"), Key("listen")];
        let (metrics_listen, _) =
            pick(flags.metrics_listen, "--metrics-listen", file.metrics.listen, &source, &metrics_key);

        Ok(AgentConfig {
            name,
            real_server,
            ports,
            interval: Duration::from_millis(interval_ms.into()),
            directors,
            ca,
            cert,
            key,
            cpu,
            probe: ProbeSetting {
                kind,
                target,
                host,
                path: probe_path,
                expect_status,
                timeout: Duration::from_millis(timeout_ms.into()),
                smoothing,
                per_interval,
            },
            metrics_listen,
        })
    }
}

/// "200-399" or "200".
fn parse_status_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let parse = |s: &str| {
        u16::from_str(s.trim())
            .ok()
            .filter(|code| (100..=599).contains(code))
            .ok_or_else(|| format!("{text:?} is not a status range like \"200-399\" (statuses are 100..=599)"))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (parse(low)?, parse(high)?),
        None => (parse(text)?, parse(text)?),
    };
    if low > high {
        return Err(format!("{text:?} is an empty range"));
    }
    Ok(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            for f in ["ca.pem", "web1.pem", "web1.key"] {
                std::fs::write(dir.path().join(f), "x").unwrap();
            }
            Files(dir)
        }

        fn text(&self, extra: &str) -> String {
            let d = self.0.path().display();
            format!(
                "name = \"web1\"\nreal_server = \"10.0.0.11\"\nports = [80]\n{extra}\n[[director]]\nname = \"d1\"\naddress = \"10.0.0.2:7946\"\n\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/web1.pem\"\nkey = \"{d}/web1.key\"\n"
            )
        }
    }

    fn resolve(text: &str, flags: &Overrides) -> Result<AgentConfig, ConfigError> {
        AgentConfig::resolve(Path::new("/etc/fulcrum/agent.toml"), text, flags)
    }

    #[test]
    fn a_minimal_file_gets_documented_defaults() {
        let files = Files::new();
        let config = resolve(&files.text(""), &Overrides::default()).unwrap();
        assert_eq!(config.interval, Duration::from_millis(500));
        assert_eq!(config.cpu, CpuSetting::Proc);
        assert_eq!(config.probe.kind, ProbeKind::Tcp);
        assert_eq!(config.probe.target, "127.0.0.1:80".parse().unwrap());
        assert_eq!(config.probe.expect_status, 200..=399);
        assert_eq!(config.probe.per_interval, PROBES_PER_INTERVAL);
        assert_eq!(
            config.directors,
            vec![DirectorTarget { name: "d1".into(), address: "10.0.0.2:7946".parse().unwrap() }]
        );
    }

    #[test]
    fn flags_override_the_file() {
        let files = Files::new();
        let flags = Overrides {
            interval_ms: Some(250),
            ports: vec![8080, 8443],
            directors: vec![parse_director("d2@10.0.0.3:7000").unwrap()],
            probe_kind: Some(ProbeKindName::Http),
            probe_expect_status: Some("200".into()),
            ..Overrides::default()
        };
        let config = resolve(&files.text("interval_ms = 1000"), &flags).unwrap();
        assert_eq!(config.interval, Duration::from_millis(250));
        assert_eq!(config.ports, vec![8080, 8443]);
        assert_eq!(config.directors[0].name, "d2");
        assert_eq!(config.probe.kind, ProbeKind::Http);
        assert_eq!(config.probe.expect_status, 200..=200);
        assert_eq!(config.probe.target.port(), 8080, "the probe follows the first port");
    }

    #[test]
    fn file_errors_name_line_and_key() {
        let files = Files::new();
        let err = resolve(&files.text("intervall_ms = 100"), &Overrides::default()).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (4, "intervall_ms"), "{err}");
        assert!(err.message.contains("unknown field"), "{err}");

        let err = resolve(&files.text("interval_ms = 10"), &Overrides::default()).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (4, "interval_ms"), "{err}");

        let err = resolve(&files.text("[probe]\nexpect_status = \"399-200\""), &Overrides::default()).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (5, "probe.expect_status"), "{err}");

        let err = resolve(&files.text("[probe]\nper_interval = 0"), &Overrides::default()).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (5, "probe.per_interval"), "{err}");
        assert!(err.message.contains("outside 1..=20"), "{err}");
        let config = resolve(&files.text("[probe]\nper_interval = 1"), &Overrides::default()).unwrap();
        assert_eq!(config.probe.per_interval, 1);

        let err = resolve(&files.text("[cpu]\nsource = \"cgroup\""), &Overrides::default()).unwrap_err();
        assert_eq!(err.key, "cpu.cgroup", "{err}");
        assert!(err.message.contains("--cgroup"), "{err}");

        std::fs::remove_file(files.0.path().join("web1.key")).unwrap();
        let err = resolve(&files.text(""), &Overrides::default()).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (12, "tls.key"), "{err}");
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let files = Files::new();
        let flags = Overrides { interval_ms: Some(0), ..Overrides::default() };
        let err = resolve(&files.text(""), &flags).unwrap_err();
        assert_eq!(err.to_string(), "command line: key `--interval-ms`: 0 ms is outside 50..=60000");
        assert!(parse_director("d1").is_err());
        assert!(parse_director("d1@nowhere").is_err());
    }

    #[test]
    fn everything_can_come_from_flags() {
        let files = Files::new();
        let d = files.0.path();
        let flags = Overrides {
            name: Some("web1".into()),
            real_server: Some("10.0.0.11".parse().unwrap()),
            ports: vec![80],
            directors: vec![parse_director("d1@10.0.0.2:7946").unwrap()],
            ca: Some(d.join("ca.pem")),
            cert: Some(d.join("web1.pem")),
            key: Some(d.join("web1.key")),
            ..Overrides::default()
        };
        resolve("", &flags).unwrap();
        let err = resolve("", &Overrides { name: None, ..flags }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/fulcrum/agent.toml: key `name`: missing: set `name` in the file or pass --name"
        );
    }
}
