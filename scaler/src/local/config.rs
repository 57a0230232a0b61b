//! The `local:` block of a service run by the local actuator, and its validation. Every error
//! names the field, the value and what is allowed.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// How a replica is judged ready to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// A TCP connect to the replica's address succeeds.
    Tcp,
    /// `GET <path>` answers with a 2xx or 3xx status.
    Http(String),
}

/// A service whose replicas are processes on this machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalSpec {
    /// The program and its arguments; `{port}`, `{addr}`, `{ip}` and `{replica}` are replaced
    /// by the replica's own values.
    pub command: Vec<String>,
    /// Where clients connect; the kernel rewrites each connect to a ready replica.
    pub service_address: SocketAddr,
    pub readiness: Readiness,
    /// How long a replica leaving rotation may finish its connections before SIGTERM.
    pub drain_timeout: Duration,
    /// How long after SIGTERM before SIGKILL.
    pub grace_period: Duration,
    /// How long a starting replica may take to pass its probe before it is restarted.
    pub ready_timeout: Duration,
    /// Each replica in its own network namespace, with an address from this subnet (a /30 block
    /// each, listening on the service address's port); none: loopback ports of the host.
    pub netns_subnet: Option<super::netns::Subnet>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLocal {
    #[serde(default)]
    command: Vec<String>,
    service_address: Option<String>,
    readiness: Option<FileReadiness>,
    drain_timeout: Option<String>,
    grace_period: Option<String>,
    ready_timeout: Option<String>,
    netns_subnet: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReadiness {
    http: Option<String>,
    tcp: Option<bool>,
}

const PLACEHOLDERS: [&str; 2] = ["{port}", "{addr}"];

/// Validates the `local:` block of the service at `field` (e.g. `services[0]`).
pub fn parse(field: &str, f: &FileLocal) -> Result<LocalSpec, ConfigError> {
    let invalid = |what: &str, value: String, message: &str| ConfigError::Invalid {
        field: format!("{field}.local.{what}"),
        value,
        message: message.into(),
    };
    if f.command.is_empty() || f.command[0].is_empty() {
        return Err(invalid(
            "command",
            f.command.join(" "),
            "must be a program and its arguments, e.g. [\"./server\", \"--listen\", \"{addr}\"]",
        ));
    }
    if !f
        .command
        .iter()
        .any(|a| PLACEHOLDERS.iter().any(|p| a.contains(p)))
    {
        return Err(invalid(
            "command",
            f.command.join(" "),
            "must pass the replica its address: an argument containing {port} or {addr}",
        ));
    }
    let text = f.service_address.clone().unwrap_or_default();
    let service_address: SocketAddr = text
        .parse()
        .ok()
        .filter(|a: &SocketAddr| a.port() != 0 && !a.ip().is_unspecified())
        .ok_or_else(|| {
            invalid(
                "service_address",
                text.clone(),
                "must be IP:PORT or [IPv6]:PORT with a specific address and a port from 1 to 65535",
            )
        })?;
    let readiness = match &f.readiness {
        None => Readiness::Tcp,
        Some(FileReadiness {
            http: Some(path),
            tcp: None | Some(false),
        }) => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "readiness.http",
                    path.clone(),
                    "must be a request path starting with '/', without spaces",
                ));
            }
            Readiness::Http(path.clone())
        }
        Some(FileReadiness {
            http: None,
            tcp: Some(true),
        }) => Readiness::Tcp,
        Some(r) => {
            return Err(invalid(
                "readiness",
                format!("http: {:?}, tcp: {:?}", r.http, r.tcp),
                "must be exactly one of {http: \"/path\"} or {tcp: true}",
            ))
        }
    };
    let duration = |what: &str, v: &Option<String>, default: Duration, max: Duration| {
        let d = match v {
            None => return Ok(default),
            Some(t) => humantime::parse_duration(t)
                .map_err(|_| invalid(what, t.clone(), "must be a duration such as 500ms, 10s or 1m"))?,
        };
        if d > max {
            return Err(invalid(
                what,
                v.clone().unwrap_or_default(),
                &format!("must be at most {}", humantime::format_duration(max)),
            ));
        }
        Ok(d)
    };
    let netns_subnet = match &f.netns_subnet {
        None => None,
        Some(t) => Some(super::netns::Subnet::parse(t).ok_or_else(|| {
            invalid(
                "netns_subnet",
                t.clone(),
                "must be an IPv4 subnet A.B.C.D/N with N from 16 to 28 and no host bits set",
            )
        })?),
    };
    Ok(LocalSpec {
        netns_subnet,
        command: f.command.clone(),
        service_address,
        readiness,
        drain_timeout: duration(
            "drain_timeout",
            &f.drain_timeout,
            Duration::from_secs(10),
            Duration::from_secs(600),
        )?,
        grace_period: duration(
            "grace_period",
            &f.grace_period,
            Duration::from_secs(5),
            Duration::from_secs(300),
        )?,
        ready_timeout: duration(
            "ready_timeout",
            &f.ready_timeout,
            Duration::from_secs(30),
            Duration::from_secs(3600),
        )?
        .max(Duration::from_millis(100)),
    })
}

/// The command line of one replica: placeholders replaced.
pub fn command_for(spec: &LocalSpec, addr: SocketAddr, replica: &str) -> Vec<String> {
    spec.command
        .iter()
        .map(|a| {
            a.replace("{port}", &addr.port().to_string())
                .replace("{addr}", &addr.to_string())
                .replace("{ip}", &addr.ip().to_string())
                .replace("{replica}", replica)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::config::{Args, Settings};

    fn resolve(local: &str) -> Result<Settings, String> {
        let text = format!("services:\n  - name: web\n    actuator: local\n{local}");
        let args = Args::parse_from(["surge-scaler", "--config", "s.yaml"]);
        Settings::resolve(&args, Some(&text)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_block_is_read_with_defaults() {
        let s = resolve(
            "    local:\n      command: [\"./srv\", \"--listen\", \"{addr}\"]\n      service_address: \"127.0.0.1:8000\"\n      readiness: {http: /healthz}\n      drain_timeout: 3s\n",
        )
        .expect("valid");
        let l = &s.local["web"];
        assert_eq!(l.readiness, super::Readiness::Http("/healthz".into()));
        assert_eq!(l.drain_timeout, std::time::Duration::from_secs(3));
        assert_eq!(l.grace_period, std::time::Duration::from_secs(5));
        assert_eq!(s.services[0].mode, crate::catalog::Mode::Local);
        assert!(s.services[0].endpoints.is_empty());
        assert_eq!(
            super::command_for(l, "127.0.0.1:9001".parse().expect("addr"), "web-0"),
            vec!["./srv", "--listen", "127.0.0.1:9001"]
        );
    }

    #[test]
    fn every_field_is_checked_by_name() {
        let cases = [
            ("", "config file s.yaml: services[0].local = \"\": must be given when actuator is local (command, service_address, readiness)"),
            ("    local:\n      command: [\"./srv\"]\n      service_address: \"127.0.0.1:8000\"\n",
             "config file s.yaml: services[0].local.command = \"./srv\": must pass the replica its address: an argument containing {port} or {addr}"),
            ("    local:\n      command: [\"./srv\", \"{port}\"]\n      service_address: \"0.0.0.0:8000\"\n",
             "config file s.yaml: services[0].local.service_address = \"0.0.0.0:8000\": must be IP:PORT or [IPv6]:PORT with a specific address and a port from 1 to 65535"),
            ("    local:\n      command: [\"./srv\", \"{port}\"]\n      service_address: \"127.0.0.1:8000\"\n      readiness: {http: health}\n",
             "config file s.yaml: services[0].local.readiness.http = \"health\": must be a request path starting with '/', without spaces"),
            ("    local:\n      command: [\"./srv\", \"{port}\"]\n      service_address: \"127.0.0.1:8000\"\n      readiness: {http: /, tcp: true}\n",
             "config file s.yaml: services[0].local.readiness = \"http: Some(\\\"/\\\"), tcp: Some(true)\": must be exactly one of {http: \"/path\"} or {tcp: true}"),
            ("    local:\n      command: [\"./srv\", \"{port}\"]\n      service_address: \"127.0.0.1:8000\"\n      grace_period: 1h\n",
             "config file s.yaml: services[0].local.grace_period = \"1h\": must be at most 5m"),
            ("    local:\n      command: [\"./srv\", \"{port}\"]\n      service_address: \"127.0.0.1:8000\"\n      netns_subnet: 10.1.2.3/24\n",
             "config file s.yaml: services[0].local.netns_subnet = \"10.1.2.3/24\": must be an IPv4 subnet A.B.C.D/N with N from 16 to 28 and no host bits set"),
            ("    local:\n      command: [\"./srv\", \"{port}\"]\n      service_address: \"127.0.0.1:8000\"\n      drain_timeout: soon\n",
             "config file s.yaml: services[0].local.drain_timeout = \"soon\": must be a duration such as 500ms, 10s or 1m"),
        ];
        for (block, want) in cases {
            assert_eq!(resolve(block).map(|_| ()), Err(want.to_string()), "{block}");
        }
        let text = "services:\n  - name: web\n    endpoints: [\":80\"]\n    local:\n      command: [\"x\", \"{port}\"]\n";
        let args = Args::parse_from(["surge-scaler", "--config", "s.yaml"]);
        assert_eq!(
            Settings::resolve(&args, Some(text))
                .map_err(|e| e.to_string())
                .map(|_| ()),
            Err(
                "config file s.yaml: services[0].local = \"observe\": is only allowed with actuator: local"
                    .into()
            )
        );
    }
}
