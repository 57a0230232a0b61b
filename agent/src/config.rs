//! The agent's settings: command-line flags, an optional YAML file, their validation.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::Deserialize;

/// The shortest and longest report intervals the agent accepts.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// The smallest and largest per-connection hold buffers the agent accepts.
pub const MIN_HOLD_BUFFER: usize = 1 << 10;
pub const MAX_HOLD_BUFFER: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{field} = {value}, must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        value: String,
        min: String,
        max: String,
    },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("{field} = {value:?}: {message}")]
    Invalid {
        field: &'static str,
        value: String,
        message: String,
    },
}

/// Command-line flags. Every flag can also come from the environment (SURGE_AGENT_*).
#[derive(Debug, Parser)]
#[command(
    name = "surge-agent",
    version,
    about = "Surge's node agent: measures per-service traffic with eBPF and streams it to the scaler"
)]
pub struct Args {
    /// YAML file with any of: scaler, node, report_interval. Flags override it.
    #[arg(long, env = "SURGE_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The scaler's gRPC address [default: http://127.0.0.1:50051].
    #[arg(long, env = "SURGE_SCALER")]
    pub scaler: Option<String>,
    /// This node's name [default: NODE_NAME, else the host name].
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// How often counters are read and sent, 100ms to 60s [default: 1s].
    #[arg(long, env = "SURGE_REPORT_INTERVAL", value_parser = parse_duration)]
    pub report_interval: Option<Duration>,
    /// How long a connection to a service with no ready replica is held, 1s to 10m; then HTTP
    /// clients get 503 with Retry-After and others are closed.
    #[arg(long, env = "SURGE_HOLD_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub hold_timeout: Duration,
    /// How long a stopping agent (SIGTERM) goes on while connections are held or relayed, 0s to
    /// 10m: held clients get their answer rather than a reset when the agent is restarted.
    #[arg(long, env = "SURGE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Bytes buffered per held connection, 1KiB to 64MiB; when full, the holder stops reading
    /// and the client waits (its bytes stay in the kernel, none is dropped).
    #[arg(long, env = "SURGE_HOLD_BUFFER", default_value = "64KiB", value_parser = crate::bytesize::parse)]
    pub hold_buffer: usize,
    /// This node's address, which other network namespaces (pods) reach: each holder listens
    /// there too, and their connects to a service at zero are sent there. Without it, only
    /// this namespace's connects are held [default: none; in Kubernetes, status.hostIP].
    #[arg(long, env = "SURGE_NODE_IP")]
    pub node_ip: Option<String>,
    /// The cgroup v2 directory the programs attach to [default: the cgroup2 mount in /proc/mounts].
    #[arg(long, env = "SURGE_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// The kernel's BTF.
    #[arg(long, env = "SURGE_BTF", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// Where tracefs is mounted if it is not mounted yet.
    #[arg(long, env = "SURGE_TRACEFS", default_value = "/sys/kernel/tracing")]
    pub tracefs: PathBuf,
    /// Learn this node's pods, their endpoints and cgroups from the Kubernetes API: true, false,
    /// or auto (on in a pod, where KUBERNETES_SERVICE_HOST is set) [default: auto].
    #[arg(long, env = "SURGE_KUBERNETES")]
    pub kubernetes: Option<String>,
    /// The kubeconfig file for the API [default: the pod's service account, KUBECONFIG, or
    /// ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The directory that holds the kubelet's pod cgroups (kubepods.slice with the systemd
    /// driver, kubepods with cgroupfs) [default: the cgroup v2 root].
    #[arg(long, env = "SURGE_KUBE_CGROUP_ROOT")]
    pub kube_cgroup_root: Option<PathBuf>,
    /// The mount table to read (for tests).
    #[arg(long, default_value = "/proc/mounts", hide = true)]
    pub mounts_file: PathBuf,
    /// The bpffs directory where the load balancer's maps and connect hooks stay pinned, so an
    /// agent restart never interrupts warm traffic; one directory per agent on a machine.
    #[arg(long, env = "SURGE_BPF_PIN_DIR", default_value = crate::pins::DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// Detach the pinned connect hooks, remove everything pinned under --bpf-pin-dir, and exit
    /// (uninstall; the agent itself never removes them, so a restart changes nothing for clients).
    #[arg(long)]
    pub cleanup: bool,
}

/// The optional YAML file; unknown keys are errors so a typo never passes silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    scaler: Option<String>,
    node: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    report_interval: Option<Duration>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s).map_err(|e| {
                serde::de::Error::custom(format!("report_interval = {s:?}: {e} (examples: 500ms, 1s, 2m)"))
            })
        })
        .transpose()
    }
}

/// The settings the agent runs with, after merging and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub scaler: String,
    pub node: String,
    pub report_interval: Duration,
    pub hold_timeout: Duration,
    pub hold_buffer: usize,
    /// How long a stopping agent waits for its held and relayed connections.
    pub drain_timeout: Duration,
    /// Where the load balancer stays pinned (see pins.rs).
    pub pin_dir: PathBuf,
    /// The node address pods reach the holders at, if any.
    pub node_ip: Option<IpAddr>,
}

/// The `--node-ip` flag: one unicast address that is neither unspecified nor loopback.
fn parse_node_ip(text: &str) -> Result<IpAddr, ConfigError> {
    let invalid = |message: &str| ConfigError::Invalid {
        field: "node-ip",
        value: text.into(),
        message: message.into(),
    };
    let ip: IpAddr = text
        .parse()
        .map_err(|_| invalid("must be an IPv4 or IPv6 address, e.g. 10.0.0.5"))?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(invalid(
            "must be an address of this node that pods can reach, not unspecified, loopback or multicast",
        ));
    }
    Ok(ip)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 1s, 2m)"))
}

impl Settings {
    /// Merges the file (if any) under the flags and validates the result.
    pub fn resolve(args: &Args, file_text: Option<&str>, default_node: &str) -> Result<Self, ConfigError> {
        let file = match (file_text, &args.config) {
            (Some(text), path) => {
                serde_yaml::from_str::<FileConfig>(text).map_err(|e| ConfigError::File {
                    path: path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    message: e.to_string(),
                })?
            }
            (None, _) => FileConfig::default(),
        };
        let scaler = args
            .scaler
            .clone()
            .or(file.scaler)
            .unwrap_or_else(|| "http://127.0.0.1:50051".to_string());
        if !(scaler.starts_with("http://") || scaler.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                field: "scaler",
                value: scaler,
                message: "must be a URL starting with http:// or https://".into(),
            });
        }
        let node = args
            .node
            .clone()
            .or(file.node)
            .unwrap_or_else(|| default_node.to_string());
        if node.is_empty() {
            return Err(ConfigError::Invalid {
                field: "node",
                value: node,
                message: "must not be empty".into(),
            });
        }
        let report_interval = args
            .report_interval
            .or(file.report_interval)
            .unwrap_or(Duration::from_secs(1));
        if !(MIN_REPORT_INTERVAL..=MAX_REPORT_INTERVAL).contains(&report_interval) {
            return Err(ConfigError::OutOfRange {
                field: "report-interval",
                value: humantime::format_duration(report_interval).to_string(),
                min: "100ms".into(),
                max: "60s".into(),
            });
        }
        let hold_timeout = args.hold_timeout;
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&hold_timeout) {
            return Err(ConfigError::OutOfRange {
                field: "hold-timeout",
                value: humantime::format_duration(hold_timeout).to_string(),
                min: "1s".into(),
                max: "10m".into(),
            });
        }
        let drain_timeout = args.drain_timeout;
        if drain_timeout > Duration::from_secs(600) {
            return Err(ConfigError::OutOfRange {
                field: "drain-timeout",
                value: humantime::format_duration(drain_timeout).to_string(),
                min: "0s".into(),
                max: "10m".into(),
            });
        }
        let hold_buffer = args.hold_buffer;
        if !(MIN_HOLD_BUFFER..=MAX_HOLD_BUFFER).contains(&hold_buffer) {
            return Err(ConfigError::OutOfRange {
                field: "hold-buffer",
                value: crate::bytesize::format(hold_buffer),
                min: crate::bytesize::format(MIN_HOLD_BUFFER),
                max: crate::bytesize::format(MAX_HOLD_BUFFER),
            });
        }
        let pin_dir = crate::pins::validate_pin_dir(&args.bpf_pin_dir)?;
        let node_ip = args.node_ip.as_deref().map(parse_node_ip).transpose()?;
        Ok(Self {
            scaler,
            node,
            report_interval,
            hold_timeout,
            hold_buffer,
            drain_timeout,
            pin_dir,
            node_ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["surge-agent"];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn defaults_apply_without_file_or_flags() {
        let s = Settings::resolve(&args(&[]), None, "node-a").expect("valid");
        assert_eq!(s.scaler, "http://127.0.0.1:50051");
        assert_eq!(s.node, "node-a");
        assert_eq!(s.report_interval, Duration::from_secs(1));
    }

    #[test]
    fn flags_override_the_file() {
        let file = "scaler: http://10.0.0.1:1\nnode: from-file\nreport_interval: 250ms\n";
        let s = Settings::resolve(&args(&["--node", "from-flag"]), Some(file), "h").expect("valid");
        assert_eq!(s.node, "from-flag");
        assert_eq!(s.scaler, "http://10.0.0.1:1");
        assert_eq!(s.report_interval, Duration::from_millis(250));
    }

    #[test]
    fn node_ip_must_be_a_reachable_address() {
        let s = Settings::resolve(&args(&["--node-ip", "10.1.2.3"]), None, "h").expect("valid");
        assert_eq!(s.node_ip, Some("10.1.2.3".parse().expect("literal")));
        let s = Settings::resolve(&args(&["--node-ip", "fd00::5"]), None, "h").expect("valid");
        assert_eq!(s.node_ip, Some("fd00::5".parse().expect("literal")));
        let err = Settings::resolve(&args(&["--node-ip", "node-1"]), None, "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "node-ip = \"node-1\": must be an IPv4 or IPv6 address, e.g. 10.0.0.5"
        );
        let err = Settings::resolve(&args(&["--node-ip", "127.0.0.1"]), None, "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "node-ip = \"127.0.0.1\": must be an address of this node that pods can reach, not unspecified, loopback or multicast"
        );
        assert_eq!(
            Settings::resolve(&args(&[]), None, "h").expect("valid").node_ip,
            None
        );
    }

    #[test]
    fn interval_out_of_range_names_the_field_and_range() {
        let err = Settings::resolve(&args(&["--report-interval", "50ms"]), None, "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "report-interval = 50ms, must be between 100ms and 60s"
        );
    }

    #[test]
    fn drain_timeout_out_of_range_names_the_field_and_range() {
        let err = Settings::resolve(&args(&["--drain-timeout", "11m"]), None, "h").unwrap_err();
        assert_eq!(err.to_string(), "drain-timeout = 11m, must be between 0s and 10m");
        let s = Settings::resolve(&args(&["--drain-timeout", "0s"]), None, "h").expect("0s: no drain");
        assert_eq!(s.drain_timeout, Duration::ZERO);
        let s = Settings::resolve(&args(&[]), None, "h").expect("valid");
        assert_eq!(s.drain_timeout, Duration::from_secs(10));
    }

    #[test]
    fn unknown_file_key_names_the_key() {
        let err = Settings::resolve(
            &args(&["--config", "a.yaml"]),
            Some("report_intervall: 1s\n"),
            "h",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config file a.yaml: unknown field `report_intervall`"),
            "{text}"
        );
    }

    #[test]
    fn bad_duration_in_file_names_the_field() {
        let err = Settings::resolve(
            &args(&["--config", "a.yaml"]),
            Some("report_interval: soon\n"),
            "h",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config file a.yaml: report_interval = \"soon\": expected number at 0 (examples: 500ms, 1s, 2m)"),
            "{text}"
        );
    }

    #[test]
    fn hold_buffer_defaults_and_is_bounded() {
        let s = Settings::resolve(&args(&[]), None, "h").expect("valid");
        assert_eq!(s.hold_buffer, 64 << 10);
        let s = Settings::resolve(&args(&["--hold-buffer", "4KiB"]), None, "h").expect("valid");
        assert_eq!(s.hold_buffer, 4096);
        let err = Settings::resolve(&args(&["--hold-buffer", "512"]), None, "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "hold-buffer = 512B, must be between 1KiB and 64MiB"
        );
        let err = Settings::resolve(&args(&["--hold-buffer", "1GiB"]), None, "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "hold-buffer = 1GiB, must be between 1KiB and 64MiB"
        );
        let err = Args::try_parse_from(["surge-agent", "--hold-buffer", "big"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"big\": expected a size in bytes such as 65536, 64KiB or 1MiB"),
            "{err}"
        );
    }

    #[test]
    fn the_pin_dir_must_be_an_absolute_directory_below_root() {
        let s = Settings::resolve(&args(&[]), None, "h").expect("valid");
        assert_eq!(s.pin_dir, PathBuf::from("/sys/fs/bpf/surge"));
        for (bad, why) in [
            ("surge", "must be an absolute path"),
            (
                "/",
                "must be a directory below / (on a bpf filesystem), not / itself",
            ),
            ("/sys/fs/bpf/../surge", "must not contain `.` or `..` components"),
        ] {
            let err = Settings::resolve(&args(&["--bpf-pin-dir", bad]), None, "h").unwrap_err();
            assert_eq!(err.to_string(), format!("bpf-pin-dir = {bad:?}: {why}"));
        }
    }

    #[test]
    fn scaler_must_be_a_url() {
        let err = Settings::resolve(&args(&["--scaler", "localhost:50051"]), None, "h").unwrap_err();
        assert_eq!(
            err.to_string(),
            "scaler = \"localhost:50051\": must be a URL starting with http:// or https://"
        );
    }
}
