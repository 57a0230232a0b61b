//! Prometheus as a metric source: one PromQL instant query (`GET /api/v1/query`) per external
//! trigger, read the way KEDA's `prometheus` scaler reads it, over HTTP or HTTPS with custom CA
//! certificates, a client certificate, a bearer token or basic auth.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use surge_policy::{
    config::Trigger,
    env::{EnvSource, MetricProvider, PROMETHEUS_ENDPOINT},
};

/// PEM file(s) of CA certificates trusted for `https://` servers, besides the system's store.
/// Several files may be given, separated by commas; a file may hold several certificates.
pub const PROMETHEUS_CA_FILE: &str = "PROMETHEUS_CA_FILE";
/// PEM client certificate for servers that ask for one (KEDA `authModes: tls`, `cert`).
pub const PROMETHEUS_CERT_FILE: &str = "PROMETHEUS_CERT_FILE";
/// PEM private key of [`PROMETHEUS_CERT_FILE`] (KEDA `key`).
pub const PROMETHEUS_KEY_FILE: &str = "PROMETHEUS_KEY_FILE";
/// A bearer token sent as `Authorization: Bearer …` (KEDA `authModes: bearer`, `bearerToken`).
pub const PROMETHEUS_BEARER_TOKEN: &str = "PROMETHEUS_BEARER_TOKEN";
/// A file holding the bearer token, re-read for every query (rotated service-account tokens).
pub const PROMETHEUS_BEARER_TOKEN_FILE: &str = "PROMETHEUS_BEARER_TOKEN_FILE";
/// Basic auth user (KEDA `authModes: basic`, `username`).
pub const PROMETHEUS_USERNAME: &str = "PROMETHEUS_USERNAME";
/// Basic auth password (KEDA `password`).
pub const PROMETHEUS_PASSWORD: &str = "PROMETHEUS_PASSWORD";
/// KEDA's global HTTP timeout in milliseconds (3000); a trigger's `timeout` overrides it.
pub const KEDA_HTTP_DEFAULT_TIMEOUT: &str = "KEDA_HTTP_DEFAULT_TIMEOUT";

/// The most of a response body read; a one-series answer is a few hundred bytes.
const MAX_BODY: usize = 4 << 20;

/// A setting from the environment that cannot be used; the scaler does not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{name} = {value}: {message}")]
pub struct SettingsError {
    pub name: &'static str,
    pub value: String,
    pub message: String,
}

/// Why a query gave no number. Shown on the service, prefixed with the trigger.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrometheusError {
    #[error("METRIC_PROVIDER=agent: Prometheus queries are turned off")]
    Disabled,
    #[error("no Prometheus server: set metadata.serverAddress on the trigger or PROMETHEUS_ENDPOINT")]
    NoServer,
    #[error("metadata.{key} = {value:?}: must be {allowed}")]
    Metadata {
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("authModes {mode}: {message}")]
    Auth { mode: String, message: String },
    #[error("cannot reach {server}: {cause}")]
    Unreachable { server: String, cause: String },
    #[error("query {query:?} failed: HTTP {status}: {error_type}: {error}")]
    Api {
        query: String,
        status: u16,
        error_type: String,
        error: String,
    },
    #[error("query {query:?} failed: HTTP {status}: {body}")]
    Http {
        query: String,
        status: u16,
        body: String,
    },
    #[error("query {query:?}: the answer is not Prometheus API JSON: {message}")]
    Malformed { query: String, message: String },
    #[error("query {query:?} returned {count} series; it must return one (aggregate it, e.g. sum(...))")]
    ManySeries { query: String, count: usize },
    #[error("query {query:?} returned no data (ignoreNullValues is false)")]
    Empty { query: String },
    #[error("query {query:?} returned {value} (ignoreNullValues is false)")]
    NotFinite { query: String, value: String },
    #[error("query {query:?} returned a {result_type}; it must return an instant vector or a scalar")]
    WrongType { query: String, result_type: String },
}

/// Credentials and trust from the environment, shared by every query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// False with `METRIC_PROVIDER=agent`.
    pub enabled: bool,
    /// `PROMETHEUS_ENDPOINT`: the server of triggers without `serverAddress`.
    pub endpoint: Option<String>,
    pub ca_files: Vec<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub bearer_token: Option<String>,
    pub bearer_token_file: Option<PathBuf>,
    pub basic: Option<(String, String)>,
    /// Per-query timeout unless the trigger sets `timeout`.
    pub timeout: Duration,
}

impl Settings {
    pub fn from_env(
        env: &(impl EnvSource + ?Sized),
        provider: MetricProvider,
        endpoint: Option<String>,
    ) -> Result<Self, SettingsError> {
        let get = |name: &str| {
            env.get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let path = |name: &str| get(name).map(PathBuf::from);
        let timeout = match get(KEDA_HTTP_DEFAULT_TIMEOUT) {
            None => Duration::from_secs(3),
            Some(t) => match t.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(SettingsError {
                        name: KEDA_HTTP_DEFAULT_TIMEOUT,
                        value: t,
                        message: "must be a whole number of milliseconds greater than 0".into(),
                    })
                }
            },
        };
        let (cert_file, key_file) = (path(PROMETHEUS_CERT_FILE), path(PROMETHEUS_KEY_FILE));
        if cert_file.is_some() != key_file.is_some() {
            let (name, value) = match &cert_file {
                Some(c) => (PROMETHEUS_CERT_FILE, c.display().to_string()),
                None => (PROMETHEUS_KEY_FILE, get(PROMETHEUS_KEY_FILE).unwrap_or_default()),
            };
            return Err(SettingsError {
                name,
                value,
                message: "a client certificate needs both PROMETHEUS_CERT_FILE and PROMETHEUS_KEY_FILE"
                    .into(),
            });
        }
        let basic = match (get(PROMETHEUS_USERNAME), env.get(PROMETHEUS_PASSWORD)) {
            (Some(u), p) => Some((u, p.unwrap_or_default())),
            (None, Some(_)) => {
                return Err(SettingsError {
                    name: PROMETHEUS_PASSWORD,
                    value: "(set)".into(),
                    message: "needs PROMETHEUS_USERNAME".into(),
                })
            }
            (None, None) => None,
        };
        Ok(Settings {
            enabled: provider == MetricProvider::Prometheus,
            endpoint: endpoint.or_else(|| get(PROMETHEUS_ENDPOINT)),
            ca_files: get(PROMETHEUS_CA_FILE)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
            cert_file,
            key_file,
            bearer_token: get(PROMETHEUS_BEARER_TOKEN),
            bearer_token_file: path(PROMETHEUS_BEARER_TOKEN_FILE),
            basic,
            timeout,
        })
    }
}

/// The HTTP clients: one that checks certificates (system store plus the custom CAs), one for
/// triggers with `unsafeSsl: "true"`.
#[derive(Clone)]
pub struct Clients {
    verified: reqwest::Client,
    unverified: reqwest::Client,
}

impl Clients {
    /// Reads the CA and client certificate files. Blocking file I/O: call off the runtime.
    pub fn build(s: &Settings) -> Result<Self, SettingsError> {
        let mut cas = Vec::new();
        for f in &s.ca_files {
            let bad = |message: String| SettingsError {
                name: PROMETHEUS_CA_FILE,
                value: f.display().to_string(),
                message,
            };
            let pem = std::fs::read(f).map_err(|e| bad(format!("cannot read it: {e}")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".into()));
            }
            cas.extend(certs);
        }
        let identity = match (&s.cert_file, &s.key_file) {
            (Some(c), Some(k)) => {
                let read = |name: &'static str, p: &PathBuf| {
                    std::fs::read(p).map_err(|e| SettingsError {
                        name,
                        value: p.display().to_string(),
                        message: format!("cannot read it: {e}"),
                    })
                };
                let mut pem = read(PROMETHEUS_CERT_FILE, c)?;
                pem.push(b'\n');
                pem.extend(read(PROMETHEUS_KEY_FILE, k)?);
                Some(reqwest::Identity::from_pem(&pem).map_err(|e| SettingsError {
                    name: PROMETHEUS_CERT_FILE,
                    value: c.display().to_string(),
                    message: format!("not a PEM certificate and key: {e}"),
                })?)
            }
            _ => None,
        };
        let client = |unsafe_ssl: bool| {
            let mut b = reqwest::Client::builder()
                .use_rustls_tls()
                .danger_accept_invalid_certs(unsafe_ssl)
                .user_agent(concat!("surge-scaler/", env!("CARGO_PKG_VERSION")));
            for c in &cas {
                b = b.add_root_certificate(c.clone());
            }
            if let Some(id) = &identity {
                b = b.identity(id.clone());
            }
            b.build().map_err(|e| SettingsError {
                name: PROMETHEUS_CA_FILE,
                value: s
                    .ca_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                message: format!("cannot set up TLS: {}", cause(&e)),
            })
        };
        Ok(Clients {
            verified: client(false)?,
            unverified: client(true)?,
        })
    }
}

/// How a query authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Auth {
    None,
    /// The token, or the file to read it from at each query.
    Bearer(BearerSource),
    Basic(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BearerSource {
    Token(String),
    File(PathBuf),
}

/// One poll, fully resolved from a trigger: what a poller runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Query {
    /// Base URL, without a trailing `/`.
    pub server: String,
    pub query: String,
    /// `namespace` and `queryParameters`.
    pub params: Vec<(String, String)>,
    /// `customHeaders`.
    pub headers: Vec<(String, String)>,
    /// KEDA `ignoreNullValues` (true): no data, NaN and ±Inf read as 0.
    pub ignore_null: bool,
    /// KEDA `unsafeSsl` (false): do not check the server's certificate.
    pub unsafe_ssl: bool,
    pub timeout: Duration,
    pub auth: Auth,
    /// The policy's `pollingInterval`.
    pub interval: Duration,
}

fn flag(
    meta: &std::collections::BTreeMap<String, String>,
    key: &'static str,
    default: bool,
) -> Result<bool, PrometheusError> {
    match meta.get(key).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v == "true" => Ok(true),
        Some(v) if v == "false" => Ok(false),
        Some(_) => Err(PrometheusError::Metadata {
            key,
            value: meta.get(key).cloned().unwrap_or_default(),
            allowed: "true or false".into(),
        }),
    }
}

/// `k1=v1,k2=v2` (KEDA's map syntax for `customHeaders` and `queryParameters`).
fn pairs(
    meta: &std::collections::BTreeMap<String, String>,
    key: &'static str,
) -> Result<Vec<(String, String)>, PrometheusError> {
    let Some(text) = meta.get(key) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_string(), v.trim().to_string())),
            _ => {
                return Err(PrometheusError::Metadata {
                    key,
                    value: text.clone(),
                    allowed: "a list of key=value separated by commas".into(),
                })
            }
        }
    }
    Ok(out)
}

impl Query {
    /// The poll a trigger with a `query` asks for, or why it cannot run.
    pub fn from_trigger(t: &Trigger, s: &Settings, interval: Duration) -> Result<Query, PrometheusError> {
        if !s.enabled {
            return Err(PrometheusError::Disabled);
        }
        let meta = &t.metadata;
        let server = t
            .server_address
            .clone()
            .or_else(|| s.endpoint.clone())
            .ok_or(PrometheusError::NoServer)?;
        let server = server.trim().trim_end_matches('/').to_string();
        let valid_url = reqwest::Url::parse(&server)
            .ok()
            .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !valid_url {
            return Err(PrometheusError::Metadata {
                key: "serverAddress",
                value: server,
                allowed: "an http:// or https:// URL".into(),
            });
        }
        let mut params = Vec::new();
        if let Some(ns) = meta.get("namespace").filter(|n| !n.is_empty()) {
            params.push(("namespace".to_string(), ns.clone()));
        }
        params.extend(pairs(meta, "queryParameters")?);
        let headers = pairs(meta, "customHeaders")?;
        for (k, v) in &headers {
            let ok = reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && reqwest::header::HeaderValue::from_str(v).is_ok();
            if !ok {
                return Err(PrometheusError::Metadata {
                    key: "customHeaders",
                    value: meta.get("customHeaders").cloned().unwrap_or_default(),
                    allowed: "valid HTTP header names and values".into(),
                });
            }
        }
        let timeout = match meta.get("timeout") {
            None => s.timeout,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(PrometheusError::Metadata {
                        key: "timeout",
                        value: v.clone(),
                        allowed: "a whole number of milliseconds greater than 0".into(),
                    })
                }
            },
        };
        let bearer = s
            .bearer_token
            .clone()
            .map(BearerSource::Token)
            .or_else(|| s.bearer_token_file.clone().map(BearerSource::File));
        let basic = s.basic.clone();
        let auth = match meta.get("authModes").map(|m| m.trim()).filter(|m| !m.is_empty()) {
            // Without authModes, whatever credentials the environment holds are used.
            None => match (bearer, basic) {
                (Some(b), _) => Auth::Bearer(b),
                (None, Some((u, p))) => Auth::Basic(u, p),
                (None, None) => Auth::None,
            },
            Some(modes) => {
                let mut auth = Auth::None;
                for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    let missing = |what: &str| PrometheusError::Auth {
                        mode: mode.to_string(),
                        message: format!("set {what}"),
                    };
                    match mode {
                        "bearer" => {
                            auth = Auth::Bearer(bearer.clone().ok_or_else(|| {
                                missing("PROMETHEUS_BEARER_TOKEN or PROMETHEUS_BEARER_TOKEN_FILE")
                            })?)
                        }
                        "basic" => {
                            let (u, p) = basic
                                .clone()
                                .ok_or_else(|| missing("PROMETHEUS_USERNAME and PROMETHEUS_PASSWORD"))?;
                            auth = Auth::Basic(u, p);
                        }
                        "tls" => {
                            if s.cert_file.is_none() {
                                return Err(missing("PROMETHEUS_CERT_FILE and PROMETHEUS_KEY_FILE"));
                            }
                        }
                        other => {
                            return Err(PrometheusError::Metadata {
                                key: "authModes",
                                value: other.to_string(),
                                allowed: "a list of bearer, basic, tls".into(),
                            })
                        }
                    }
                }
                auth
            }
        };
        Ok(Query {
            server,
            query: t.query.clone().unwrap_or_default(),
            params,
            headers,
            ignore_null: flag(meta, "ignoreNullValues", true)?,
            unsafe_ssl: flag(meta, "unsafeSsl", false)?,
            timeout,
            auth,
            interval,
        })
    }

    /// Runs the query once.
    pub async fn run(&self, clients: &Clients) -> Result<f64, PrometheusError> {
        let unreachable = |cause: String| PrometheusError::Unreachable {
            server: self.server.clone(),
            cause,
        };
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", self.server)).map_err(|_| {
            PrometheusError::Metadata {
                key: "serverAddress",
                value: self.server.clone(),
                allowed: "an http:// or https:// URL".into(),
            }
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("query", &self.query);
            for (k, v) in &self.params {
                q.append_pair(k, v);
            }
        }
        let client = if self.unsafe_ssl {
            &clients.unverified
        } else {
            &clients.verified
        };
        let mut req = client.get(url).timeout(self.timeout);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req = match &self.auth {
            Auth::None => req,
            Auth::Bearer(BearerSource::Token(t)) => req.bearer_auth(t),
            Auth::Bearer(BearerSource::File(f)) => {
                let t = tokio::fs::read_to_string(f)
                    .await
                    .map_err(|e| PrometheusError::Auth {
                        mode: "bearer".into(),
                        message: format!("cannot read {}: {e}", f.display()),
                    })?;
                req.bearer_auth(t.trim())
            }
            Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
        };
        let timed_out = || {
            unreachable(format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            ))
        };
        let mut resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                timed_out()
            } else {
                unreachable(cause(&e))
            }
        })?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    body.extend_from_slice(&c);
                    if body.len() > MAX_BODY {
                        return Err(PrometheusError::Malformed {
                            query: self.query.clone(),
                            message: format!("the answer is larger than {MAX_BODY} bytes"),
                        });
                    }
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(timed_out()),
                Err(e) => return Err(unreachable(cause(&e))),
            }
        }
        parse_response(&self.query, status, &body, self.ignore_null)
    }
}

/// The innermost cause of a transport error, in plain words ("connection refused",
/// "invalid peer certificate: UnknownIssuer").
fn cause(e: &reqwest::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(s) = inner.source() {
        inner = s;
    }
    if let Some(io) = inner.downcast_ref::<std::io::Error>() {
        match io.kind() {
            std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
            std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
            _ => {}
        }
    }
    let text = inner.to_string();
    if text.is_empty() {
        e.to_string()
    } else {
        text
    }
}

#[derive(Deserialize)]
struct ApiResponse {
    status: Option<String>,
    data: Option<ApiData>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ApiData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

/// Reads the single number of an instant query's answer, with KEDA's rules: one series or a
/// scalar; no series, NaN or ±Inf read as 0 when `ignore_null`, else an error; several series
/// are an error.
pub fn parse_response(
    query: &str,
    status: u16,
    body: &[u8],
    ignore_null: bool,
) -> Result<f64, PrometheusError> {
    let q = || query.to_string();
    let parsed = serde_json::from_slice::<ApiResponse>(body);
    if !(200..300).contains(&status) || matches!(&parsed, Ok(r) if r.status.as_deref() == Some("error")) {
        return Err(match parsed {
            Ok(ApiResponse {
                error_type: Some(error_type),
                error: Some(error),
                ..
            }) => PrometheusError::Api {
                query: q(),
                status,
                error_type,
                error,
            },
            _ => PrometheusError::Http {
                query: q(),
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(200)])
                    .trim()
                    .to_string(),
            },
        });
    }
    let malformed = |message: String| PrometheusError::Malformed { query: q(), message };
    let data = parsed
        .map_err(|e| malformed(e.to_string()))?
        .data
        .ok_or_else(|| malformed("no `data`".into()))?;
    let sample = match data.result_type.as_str() {
        "scalar" => data.result,
        "vector" => {
            let series = data
                .result
                .as_array()
                .ok_or_else(|| malformed("`result` of a vector is not a list".into()))?;
            match series.as_slice() {
                [] if ignore_null => return Ok(0.0),
                [] => return Err(PrometheusError::Empty { query: q() }),
                [one] => match one.get("value") {
                    Some(v) => v.clone(),
                    None if one.get("histogram").is_some() => {
                        return Err(PrometheusError::WrongType {
                            query: q(),
                            result_type: "native histogram".into(),
                        })
                    }
                    None => return Err(malformed("a series has no `value`".into())),
                },
                many => {
                    return Err(PrometheusError::ManySeries {
                        query: q(),
                        count: many.len(),
                    })
                }
            }
        }
        "matrix" => {
            return Err(PrometheusError::WrongType {
                query: q(),
                result_type: "range vector".into(),
            })
        }
        other => {
            return Err(PrometheusError::WrongType {
                query: q(),
                result_type: other.to_string(),
            })
        }
    };
    // [ <unix time>, "<value>" ]
    let text = sample
        .get(1)
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| malformed(format!("a sample is not [time, \"value\"]: {sample}")))?;
    let v: f64 = text
        .parse()
        .map_err(|_| malformed(format!("{text:?} is not a number")))?;
    if v.is_finite() {
        Ok(v)
    } else if ignore_null {
        Ok(0.0)
    } else {
        Err(PrometheusError::NotFinite {
            query: q(),
            value: text.to_string(),
        })
    }
}
