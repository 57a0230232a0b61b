//! The scaler's settings: flags, an optional YAML file with the services, their validation.
//! Every error names the field, the value and what is allowed.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;
use serde::Deserialize;

use crate::catalog::{Mode, Requests, ServiceSpec};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("{field} = {value:?}: {message}")]
    Invalid {
        field: String,
        value: String,
        message: String,
    },
}

#[derive(Debug, Parser)]
#[command(name = "surge-scaler", version, about = "Surge's central scaler")]
pub struct Args {
    /// YAML file with `services:` (and optionally grpc_listen, http_listen).
    #[arg(long, env = "SURGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Watch an existing server without scaling it: NAME=ENDPOINT[,ENDPOINT...], where an
    /// endpoint is IP:PORT, [IPv6]:PORT, or :PORT for any local address. Repeatable.
    #[arg(long = "observe", value_name = "NAME=ENDPOINTS")]
    pub observe: Vec<String>,
    /// Where agents connect (gRPC) [default: 0.0.0.0:50051].
    #[arg(long, env = "SURGE_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP: the web page at /, /healthz, /metrics, /api/v1/services [default: 0.0.0.0:8080].
    #[arg(long, env = "SURGE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// The policy directory: one YAML file per policy, reloaded on change.
    #[arg(long, env = "SURGE_POLICY_DIR", default_value = "/etc/surge/policies")]
    pub policy_dir: PathBuf,
    /// How often policies are evaluated, 100ms to 60s.
    #[arg(long, env = "SURGE_TICK", default_value = "1s", value_parser = parse_duration)]
    pub tick: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 1s, 2m)"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    grpc_listen: Option<String>,
    http_listen: Option<String>,
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    cgroups: Vec<String>,
    /// A policy of the policy directory, by name.
    policy: Option<String>,
    /// observe (default) | simulated.
    actuator: Option<String>,
    /// Start-up delay of a simulated replica (default 2s).
    startup: Option<String>,
    /// Replicas at start (simulated; default 1).
    replicas: Option<u32>,
    /// CPU cores one replica asks for (for Utilization triggers).
    cpu_request: Option<f64>,
    /// Memory bytes one replica asks for (for Utilization triggers).
    memory_request: Option<u64>,
    /// The local actuator's settings (`actuator: local`).
    local: Option<crate::local::config::FileLocal>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub services: Vec<ServiceSpec>,
    /// One YAML file per policy; reloaded on change.
    pub policy_dir: PathBuf,
    /// How often policies are evaluated.
    pub tick: Duration,
    /// Services run by the local actuator, by name.
    pub local: BTreeMap<String, crate::local::LocalSpec>,
}

impl Settings {
    pub fn resolve(args: &Args, file_text: Option<&str>) -> Result<Self, ConfigError> {
        let path = args
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let file = match file_text {
            Some(text) => serde_yaml::from_str::<FileConfig>(text).map_err(|e| ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            })?,
            None => FileConfig::default(),
        };
        let in_file = |e: ConfigError| match e {
            ConfigError::Invalid { .. } if file_text.is_some() => ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            },
            e => e,
        };
        let listen =
            |field: &str, flag: Option<SocketAddr>, text: Option<String>, default: u16| match (flag, text) {
                (Some(a), _) => Ok(a),
                (None, Some(t)) => t.parse().map_err(|_| {
                    in_file(ConfigError::Invalid {
                        field: field.into(),
                        value: t,
                        message: "must be IP:PORT".into(),
                    })
                }),
                (None, None) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), default)),
            };
        let grpc_listen = listen("grpc_listen", args.grpc_listen, file.grpc_listen, 50051)?;
        let http_listen = listen("http_listen", args.http_listen, file.http_listen, 8080)?;

        let mut services = Vec::new();
        let mut local = BTreeMap::new();
        for (i, s) in file.services.iter().enumerate() {
            let field = format!("services[{i}]");
            let spec = service(&field, s).map_err(in_file)?;
            match (&s.local, spec.mode) {
                (Some(l), Mode::Local) => {
                    local.insert(
                        spec.name.clone(),
                        crate::local::config::parse(&field, l).map_err(in_file)?,
                    );
                }
                (None, Mode::Local) => {
                    return Err(in_file(ConfigError::Invalid {
                        field: format!("{field}.local"),
                        value: String::new(),
                        message: "must be given when actuator is local (command, service_address, readiness)"
                            .into(),
                    }))
                }
                (Some(_), _) => {
                    return Err(in_file(ConfigError::Invalid {
                        field: format!("{field}.local"),
                        value: s.actuator.clone().unwrap_or_else(|| "observe".into()),
                        message: "is only allowed with actuator: local".into(),
                    }))
                }
                (None, _) => {}
            }
            services.push(spec);
        }
        for flag in &args.observe {
            let (name, eps) = flag.split_once('=').ok_or_else(|| ConfigError::Invalid {
                field: "--observe".into(),
                value: flag.clone(),
                message: "must be NAME=ENDPOINT[,ENDPOINT...] (e.g. web=127.0.0.1:8080)".into(),
            })?;
            let declared = FileService {
                name: name.to_string(),
                endpoints: eps.split(',').map(str::to_string).collect(),
                ..FileService::default()
            };
            services.push(service("--observe", &declared)?);
        }
        let mut seen = HashSet::new();
        for s in &services {
            if !seen.insert(s.name.clone()) {
                return Err(ConfigError::Invalid {
                    field: "name".into(),
                    value: s.name.clone(),
                    message: "declared twice; service names must be unique".into(),
                });
            }
        }
        let policy_dir = args.policy_dir.clone();
        let tick = args.tick;
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&tick) {
            return Err(ConfigError::Invalid {
                field: "--tick".into(),
                value: humantime::format_duration(tick).to_string(),
                message: "must be between 100ms and 60s".into(),
            });
        }
        Ok(Self {
            grpc_listen,
            http_listen,
            services,
            policy_dir,
            tick,
            local,
        })
    }
}

/// Service names follow Kubernetes object names (DNS-1123 labels), so they can be used as such.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn service(field: &str, declared: &FileService) -> Result<ServiceSpec, ConfigError> {
    let (name, endpoints, cgroups) = (declared.name.as_str(), &declared.endpoints, &declared.cgroups);
    if !valid_name(name) {
        return Err(ConfigError::Invalid {
            field: format!("{field}.name"),
            value: name.into(),
            message:
                "must be 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
                    .into(),
        });
    }
    // A local service's replicas are its endpoints: they come and go with the replicas.
    if endpoints.is_empty() && declared.actuator.as_deref() != Some("local") {
        return Err(ConfigError::Invalid {
            field: format!("{field}.endpoints"),
            value: String::new(),
            message: "must list at least one endpoint".into(),
        });
    }
    let mut parsed = Vec::new();
    for (j, e) in endpoints.iter().enumerate() {
        parsed.push(parse_endpoint(e).ok_or_else(|| ConfigError::Invalid {
            field: format!("{field}.endpoints[{j}]"),
            value: e.clone(),
            message: "must be IP:PORT, [IPv6]:PORT, or :PORT for any local address, with a port from 1 to 65535".into(),
        })?);
    }
    for (j, c) in cgroups.iter().enumerate() {
        if c.is_empty() || c.split('/').any(|part| part == "..") {
            return Err(ConfigError::Invalid {
                field: format!("{field}.cgroups[{j}]"),
                value: c.clone(),
                message:
                    "must be a cgroup v2 directory, absolute or relative to the cgroup root, without '..'"
                        .into(),
            });
        }
    }
    let invalid = |what: &str, value: String, message: &str| ConfigError::Invalid {
        field: format!("{field}.{what}"),
        value,
        message: message.into(),
    };
    let mode = match declared.actuator.as_deref() {
        None | Some("observe") => Mode::Observe,
        Some("simulated") => Mode::Simulated,
        Some("local") => Mode::Local,
        Some(other) => {
            return Err(invalid(
                "actuator",
                other.into(),
                "must be one of observe, simulated, local",
            ))
        }
    };
    let startup = match &declared.startup {
        None => Duration::from_secs(2),
        Some(t) => humantime::parse_duration(t)
            .map_err(|_| invalid("startup", t.clone(), "must be a duration such as 500ms or 2s"))?,
    };
    if let Some(c) = declared.cpu_request {
        if !(c > 0.0 && c.is_finite()) {
            return Err(invalid(
                "cpu_request",
                c.to_string(),
                "must be a number of cores greater than 0",
            ));
        }
    }
    if declared.memory_request == Some(0) {
        return Err(invalid(
            "memory_request",
            "0".into(),
            "must be a number of bytes greater than 0",
        ));
    }
    if let Some(p) = &declared.policy {
        if p.is_empty() {
            return Err(invalid(
                "policy",
                p.clone(),
                "must name a policy of the policy directory",
            ));
        }
    }
    Ok(ServiceSpec {
        name: name.into(),
        endpoints: parsed,
        cgroups: cgroups.to_vec(),
        mode,
        policy: declared.policy.clone(),
        startup,
        initial_replicas: declared.replicas.unwrap_or(1),
        requests: Requests {
            cpu_cores: declared.cpu_request,
            memory_bytes: declared.memory_request,
        },
    })
}

/// `IP:PORT`, `[IPv6]:PORT`, or `:PORT` (any local address); port 0 is not an endpoint.
pub fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    let addr = match s.strip_prefix(':') {
        Some(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port.parse().ok()?),
        None => s.parse().ok()?,
    };
    (addr.port() != 0).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["surge-scaler"];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn observe_flag_declares_a_service() {
        let s = Settings::resolve(&args(&["--observe", "web=127.0.0.1:8081,:9000"]), None).expect("valid");
        assert_eq!(s.services[0].name, "web");
        assert_eq!(
            s.services[0].endpoints,
            vec![
                "127.0.0.1:8081".parse().expect("literal"),
                "0.0.0.0:9000".parse().expect("literal")
            ]
        );
        assert_eq!(s.http_listen.port(), 8080);
        assert_eq!(s.grpc_listen.port(), 50051);
    }

    #[test]
    fn file_services_and_errors_name_the_field() {
        let text = "services:\n  - name: web\n    endpoints: [\"127.0.0.1:80\"]\n  - name: api\n    endpoints: [\"localhost:80\"]\n";
        let err = Settings::resolve(&args(&["--config", "s.yaml"]), Some(text)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file s.yaml: services[1].endpoints[0] = \"localhost:80\": must be IP:PORT, [IPv6]:PORT, or :PORT for any local address, with a port from 1 to 65535"
        );
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let err = Settings::resolve(&args(&["--config", "s.yaml"]), Some("servics: []\n")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config file s.yaml: unknown field `servics`"),
            "{err}"
        );
    }

    #[test]
    fn bad_observe_flags_are_named() {
        let err = Settings::resolve(&args(&["--observe", "web"]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--observe = \"web\": must be NAME=ENDPOINT[,ENDPOINT...] (e.g. web=127.0.0.1:8080)"
        );
        let err = Settings::resolve(&args(&["--observe", "Web=:80"]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--observe.name = \"Web\": must be 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        );
        let err = Settings::resolve(&args(&["--observe", "a=:80", "--observe", "a=:81"]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "name = \"a\": declared twice; service names must be unique"
        );
        let err = Settings::resolve(&args(&["--observe", "a=:0"]), None).unwrap_err();
        assert!(
            err.to_string().starts_with("--observe.endpoints[0] = \":0\""),
            "{err}"
        );
    }
}
