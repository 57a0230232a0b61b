use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{extract::RawQuery, http::HeaderMap, routing::get, Router};
use surge_policy::{config::Defaults, env::MetricProvider, parse_policy, Metric, Policy, Sample};

use super::{prometheus::*, MetricSources};

fn vector(values: &[&str]) -> String {
    let series: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!(r#"{{"metric":{{"i":"{i}"}},"value":[1700000000.5,"{v}"]}}"#))
        .collect();
    format!(
        r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
        series.join(",")
    )
}

fn parse(body: &str, ignore_null: bool) -> Result<f64, String> {
    parse_response("q", 200, body.as_bytes(), ignore_null).map_err(|e| e.to_string())
}

#[test]
fn one_series_or_a_scalar_is_the_value() {
    assert_eq!(parse(&vector(&["42.5"]), true), Ok(42.5));
    let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"7"]}}"#;
    assert_eq!(parse(scalar, false), Ok(7.0));
}

#[test]
fn no_data_and_nan_follow_ignore_null_values() {
    assert_eq!(parse(&vector(&[]), true), Ok(0.0));
    assert_eq!(
        parse(&vector(&[]), false),
        Err("query \"q\" returned no data (ignoreNullValues is false)".into())
    );
    assert_eq!(parse(&vector(&["NaN"]), true), Ok(0.0));
    assert_eq!(parse(&vector(&["+Inf"]), true), Ok(0.0));
    assert_eq!(
        parse(&vector(&["NaN"]), false),
        Err("query \"q\" returned NaN (ignoreNullValues is false)".into())
    );
}

#[test]
fn several_series_are_an_error_naming_how_many() {
    assert_eq!(
        parse(&vector(&["1", "2", "3"]), true),
        Err("query \"q\" returned 3 series; it must return one (aggregate it, e.g. sum(...))".into())
    );
}

#[test]
fn api_errors_keep_prometheus_words() {
    let body = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error: unclosed left parenthesis"}"#;
    assert_eq!(
        parse_response("sum(x", 400, body.as_bytes(), true).map_err(|e| e.to_string()),
        Err("query \"sum(x\" failed: HTTP 400: bad_data: invalid parameter \"query\": 1:5: parse error: unclosed left parenthesis".into())
    );
    assert_eq!(
        parse_response("up", 503, b"Service Unavailable\n", true).map_err(|e| e.to_string()),
        Err("query \"up\" failed: HTTP 503: Service Unavailable".into())
    );
    let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
    assert_eq!(
        parse(matrix, true),
        Err("query \"q\" returned a range vector; it must return an instant vector or a scalar".into())
    );
    assert!(parse("<html>", true)
        .unwrap_err()
        .starts_with("query \"q\": the answer is not Prometheus API JSON: "));
}

fn settings(endpoint: Option<&str>) -> Settings {
    Settings {
        enabled: true,
        endpoint: endpoint.map(str::to_string),
        timeout: Duration::from_secs(3),
        ..Settings::default()
    }
}

fn policy(trigger_metadata: &str) -> Policy {
    let yaml = format!(
        "spec:\n  pollingInterval: 1\n  triggers:\n    - type: prometheus\n      name: queue\n      metadata:\n        query: sum(queue)\n        threshold: \"10\"\n{trigger_metadata}"
    );
    parse_policy(&yaml, &Defaults::default(), "p").expect("valid policy")
}

fn query(meta: &str, s: &Settings) -> Result<Query, String> {
    let p = policy(meta);
    Query::from_trigger(&p.triggers[0], s, p.polling_interval).map_err(|e| e.to_string())
}

#[test]
fn the_server_is_the_trigger_s_or_prometheus_endpoint() {
    let q = query("", &settings(Some("http://prom:9090/"))).expect("valid");
    assert_eq!(q.server, "http://prom:9090");
    assert_eq!(q.query, "sum(queue)");
    assert_eq!(q.interval, Duration::from_secs(1));
    assert!(q.ignore_null && !q.unsafe_ssl);
    let q = query(
        "        serverAddress: https://other:443\n",
        &settings(Some("http://prom:9090")),
    )
    .expect("valid");
    assert_eq!(q.server, "https://other:443");
    assert_eq!(
        query("", &settings(None)),
        Err("no Prometheus server: set metadata.serverAddress on the trigger or PROMETHEUS_ENDPOINT".into())
    );
    assert_eq!(
        query("        serverAddress: prom:9090\n", &settings(None)),
        Err("metadata.serverAddress = \"prom:9090\": must be an http:// or https:// URL".into())
    );
    let off = Settings {
        enabled: false,
        ..settings(Some("http://prom:9090"))
    };
    assert_eq!(
        query("", &off),
        Err("METRIC_PROVIDER=agent: Prometheus queries are turned off".into())
    );
}

#[test]
fn keda_metadata_options() {
    let s = settings(Some("http://prom:9090"));
    let q = query(
        "        ignoreNullValues: \"false\"\n        unsafeSsl: \"true\"\n        timeout: \"250\"\n        namespace: shop\n        queryParameters: a=1, b=2\n        customHeaders: X-Scope-OrgID=team\n",
        &s,
    )
    .expect("valid");
    assert!(!q.ignore_null && q.unsafe_ssl);
    assert_eq!(q.timeout, Duration::from_millis(250));
    let kv = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        q.params,
        vec![kv("namespace", "shop"), kv("a", "1"), kv("b", "2")]
    );
    assert_eq!(q.headers, vec![kv("X-Scope-OrgID", "team")]);
    assert_eq!(
        query("        ignoreNullValues: maybe\n", &s),
        Err("metadata.ignoreNullValues = \"maybe\": must be true or false".into())
    );
    assert_eq!(
        query("        customHeaders: nope\n", &s),
        Err("metadata.customHeaders = \"nope\": must be a list of key=value separated by commas".into())
    );
    assert_eq!(
        query("        authModes: bearer\n", &s),
        Err("authModes bearer: set PROMETHEUS_BEARER_TOKEN or PROMETHEUS_BEARER_TOKEN_FILE".into())
    );
    assert_eq!(
        query("        authModes: oauth\n", &s),
        Err("metadata.authModes = \"oauth\": must be a list of bearer, basic, tls".into())
    );
    let with_token = Settings {
        bearer_token: Some("t0k".into()),
        ..s.clone()
    };
    assert_eq!(
        query("", &with_token).map(|q| q.auth),
        Ok(Auth::Bearer(BearerSource::Token("t0k".into())))
    );
}

#[test]
fn environment_settings() {
    let env = [
        ("PROMETHEUS_ENDPOINT", "http://prom:9090"),
        ("PROMETHEUS_CA_FILE", "/a.pem, /b.pem"),
        ("PROMETHEUS_BEARER_TOKEN_FILE", "/var/run/token"),
        ("KEDA_HTTP_DEFAULT_TIMEOUT", "1500"),
    ];
    let s = Settings::from_env(&env[..], MetricProvider::Prometheus, None).expect("valid");
    assert!(s.enabled);
    assert_eq!(s.endpoint.as_deref(), Some("http://prom:9090"));
    assert_eq!(
        s.ca_files,
        vec![std::path::PathBuf::from("/a.pem"), "/b.pem".into()]
    );
    assert_eq!(s.timeout, Duration::from_millis(1500));
    let err = |env: &[(&str, &str)]| {
        Settings::from_env(env, MetricProvider::Prometheus, None)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&[("PROMETHEUS_CERT_FILE", "/c.pem")]),
        "PROMETHEUS_CERT_FILE = /c.pem: a client certificate needs both PROMETHEUS_CERT_FILE and PROMETHEUS_KEY_FILE"
    );
    assert_eq!(
        err(&[("KEDA_HTTP_DEFAULT_TIMEOUT", "3s")]),
        "KEDA_HTTP_DEFAULT_TIMEOUT = 3s: must be a whole number of milliseconds greater than 0"
    );
    let missing = Settings {
        ca_files: vec!["/nonexistent/ca.pem".into()],
        ..Settings::default()
    };
    assert!(Clients::build(&missing)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
        .starts_with("PROMETHEUS_CA_FILE = /nonexistent/ca.pem: cannot read it: "));
}

/// What a request carried: the query string, `Authorization`, `X-Scope-OrgID`.
type Seen = (String, Option<String>, Option<String>);

/// What a fake Prometheus saw and will answer.
#[derive(Default)]
struct Fake {
    answer: Mutex<(u16, String)>,
    seen: Mutex<Vec<Seen>>,
}

async fn fake_prometheus(fake: Arc<Fake>) -> String {
    let app = Router::new().route(
        "/api/v1/query",
        get(move |RawQuery(q): RawQuery, headers: HeaderMap| {
            let fake = Arc::clone(&fake);
            async move {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
                fake.seen.lock().expect("lock").push((
                    q.unwrap_or_default(),
                    h("authorization"),
                    h("x-scope-orgid"),
                ));
                let (status, body) = fake.answer.lock().expect("lock").clone();
                (axum::http::StatusCode::from_u16(status).expect("status"), body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_query_sends_parameters_headers_and_token() {
    let fake = Arc::new(Fake::default());
    *fake.answer.lock().expect("lock") = (200, vector(&["3"]));
    let server = fake_prometheus(Arc::clone(&fake)).await;
    let s = Settings {
        bearer_token: Some("s3cret".into()),
        ..settings(Some(&server))
    };
    let clients = Clients::build(&s).expect("clients");
    let q = query(
        "        namespace: shop\n        customHeaders: X-Scope-OrgID=team\n        authModes: bearer\n",
        &s,
    )
    .expect("valid");
    assert_eq!(q.run(&clients).await, Ok(3.0));
    let seen = fake.seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![(
            "query=sum%28queue%29&namespace=shop".to_string(),
            Some("Bearer s3cret".to_string()),
            Some("team".to_string())
        )]
    );
}

#[tokio::test]
async fn an_unreachable_server_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let s = settings(Some(&format!("http://127.0.0.1:{port}")));
    let clients = Clients::build(&s).expect("clients");
    let q = query("", &s).expect("valid");
    assert_eq!(
        q.run(&clients).await.map_err(|e| e.to_string()),
        Err(format!(
            "cannot reach http://127.0.0.1:{port}: connection refused"
        ))
    );
}

#[tokio::test]
async fn values_every_tick_failures_once_per_poll() {
    let fake = Arc::new(Fake::default());
    *fake.answer.lock().expect("lock") = (200, vector(&["25"]));
    let server = fake_prometheus(Arc::clone(&fake)).await;
    let mut sources = MetricSources::start(settings(Some(&server)))
        .await
        .expect("sources");
    let p = policy("");
    let metric = Metric::External("queue".into());
    let mut now = Duration::ZERO;
    // The first poll runs at once; its value then comes with every tick.
    let mut first = sources.poll("web", &p, now);
    for _ in 0..50 {
        if !first.samples.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        first = sources.poll("web", &p, now);
    }
    assert_eq!(first.samples, vec![(metric.clone(), Sample::Value(25.0))]);
    now += Duration::from_millis(100);
    assert_eq!(
        sources.poll("web", &p, now).samples,
        vec![(metric.clone(), Sample::Value(25.0))]
    );
    // A failing query: one failure per poll, the error shown on every tick until it recovers.
    *fake.answer.lock().expect("lock") = (
        400,
        r#"{"status":"error","errorType":"bad_data","error":"boom"}"#.into(),
    );
    let mut failed = 0;
    let mut errors = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now += Duration::from_millis(50);
        let e = sources.poll("web", &p, now);
        failed += e.samples.iter().filter(|(_, s)| *s == Sample::Failed).count();
        if !e.errors.is_empty() {
            errors = e.errors;
        }
    }
    // About 3 s of 1 s polls: 2 or 3 failed polls, not one per tick.
    assert!((2..=4).contains(&failed), "{failed} failures");
    assert_eq!(
        errors,
        vec![
            "triggers[0] (external:queue): query \"sum(queue)\" failed: HTTP 400: bad_data: boom".to_string()
        ]
    );
}
