use super::*;

fn md(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn known() -> Vec<String> {
    vec!["web".into(), "api".into()]
}

fn err(pairs: &[(&str, &str)]) -> String {
    parse(&md(pairs), &known()).expect_err("rejected").to_string()
}

#[test]
fn defaults_are_rps_and_activation_zero() {
    let t = parse(
        &md(&[("service", "web"), ("scalerAddress", "surge:50051")]),
        &known(),
    )
    .expect("valid");
    assert_eq!(
        t,
        Trigger {
            service: "web".into(),
            metric: Metric::Rps,
            target: None,
            activation_threshold: 0.0
        }
    );
    assert_eq!(t.metric_name(), "surge-web-rps");
}

#[test]
fn every_metric_and_number_is_read() {
    let t = parse(
        &md(&[
            ("service", "api"),
            ("metric", "latency_p99_ms"),
            ("target", "250.5"),
            ("activationThreshold", "3"),
        ]),
        &known(),
    )
    .expect("valid");
    assert_eq!(
        (t.metric, t.target, t.activation_threshold),
        (Metric::LatencyP99Ms, Some(250.5), 3.0)
    );
    assert_eq!(t.metric_name(), "surge-api-latency-p99-ms");
    for m in Metric::ALL {
        let t = parse(&md(&[("service", "web"), ("metric", m.name())]), &known()).expect("valid");
        assert_eq!(t.metric, m);
    }
}

#[test]
fn bad_input_is_named_word_for_word() {
    assert_eq!(
        err(&[]),
        "scalerMetadata.service is missing: it must name a Surge service"
    );
    assert_eq!(
        err(&[("service", "shop")]),
        r#"no service named "shop" (known: web, api)"#
    );
    assert_eq!(
        parse(&md(&[("service", "shop")]), &[])
            .expect_err("rejected")
            .to_string(),
        r#"no service named "shop" (known: none)"#
    );
    assert_eq!(
        err(&[("service", "web"), ("metric", "cpu")]),
        r#"scalerMetadata.metric = "cpu": must be one of rps, concurrency, in_flight, latency_p50_ms, latency_p90_ms, latency_p99_ms"#
    );
    for bad in ["0", "-1", "abc", "NaN", "inf", ""] {
        assert_eq!(
            err(&[("service", "web"), ("target", bad)]),
            format!("scalerMetadata.target = {bad:?}: must be a number greater than 0")
        );
    }
    assert_eq!(
        err(&[("service", "web"), ("activationThreshold", "-0.5")]),
        r#"scalerMetadata.activationThreshold = "-0.5": must be a number of 0 or more"#
    );
}

#[test]
fn an_unknown_service_is_not_found_and_the_rest_invalid_argument() {
    let status = |pairs: &[(&str, &str)]| tonic::Status::from(parse(&md(pairs), &known()).expect_err("bad"));
    assert_eq!(status(&[("service", "shop")]).code(), tonic::Code::NotFound);
    assert_eq!(
        status(&[("service", "web"), ("metric", "x")]).code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(status(&[]).code(), tonic::Code::InvalidArgument);
    assert_eq!(
        MetadataError::MissingTarget.to_string(),
        "scalerMetadata.target is missing: it must be a number greater than 0"
    );
}
