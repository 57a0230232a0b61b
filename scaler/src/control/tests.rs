use std::path::PathBuf;

use surge_proto::v1::{Report, ServiceCounters};

use super::*;
use crate::{
    catalog::{Catalog, Requests},
    test_support::Manual,
};

const HPA: &str = "policy:\n  name: web-hpa\n  algorithm: hpa\n  maxReplicaCount: 10\n  triggers:\n    - metric: rps\n      target: 10\n";

fn spec(name: &str, mode: Mode, policy: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        endpoints: vec!["127.0.0.1:8080".parse().expect("literal")],
        cgroups: vec![],
        mode,
        policy: Some(policy.into()),
        startup: Duration::from_secs(2),
        initial_replicas: 1,
        requests: Requests::default(),
    }
}

fn policy_dir(test: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("surge-control-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    for (f, text) in files {
        std::fs::write(d.join(f), text).expect("write");
    }
    d
}

struct Rig {
    clock: Arc<Manual>,
    shared: Arc<Shared>,
    controller: Controller,
}

impl Rig {
    async fn new(test: &str, specs: Vec<ServiceSpec>, files: &[(&str, &str)]) -> Self {
        let clock = Arc::new(Manual::at(Duration::from_secs(100)));
        let shared = Arc::new(Shared::new(
            Catalog::new(specs),
            clock.clone(),
            Duration::from_secs(10),
        ));
        let mut controller = Controller::new(
            Arc::clone(&shared),
            PolicyDir::new(policy_dir(test, files)),
            Defaults::default(),
        );
        controller.reload_policies().await;
        Self {
            clock,
            shared,
            controller,
        }
    }

    /// An agent report of `requests` (cumulative) for `service` at `at` seconds.
    fn report(&self, service: &str, at: u64, requests: u64) {
        self.clock.set(Duration::from_secs(at));
        let r = Report {
            seq: at,
            monotonic_ns: at * 1_000_000_000,
            services: vec![ServiceCounters {
                service: service.into(),
                requests,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut ingest = self.shared.ingest();
        ingest.connected("n1", 1, Duration::from_secs(at));
        ingest.record("n1", 1, &r, Duration::from_secs(at));
    }

    fn status(&self, service: &str) -> ControlStatus {
        self.shared.control.get(service).expect("a status")
    }
}

#[tokio::test]
async fn load_scales_a_simulated_service_up_and_replicas_become_ready() {
    let mut rig = Rig::new(
        "up",
        vec![spec("web", Mode::Simulated, "web-hpa")],
        &[("web.yaml", HPA)],
    )
    .await;
    rig.report("web", 100, 0);
    rig.report("web", 101, 50);
    rig.controller.tick().await;
    let s = rig.status("web");
    assert_eq!(s.error, None);
    assert_eq!(s.actuator, Some("simulated"));
    let d = &s.decisions[0];
    // 50 rps at a target of 10 per replica: 5 replicas (HPA allows +4 pods per 15 s from 1).
    assert_eq!((d.recommended, d.desired), (5, 5), "{d:?}");
    assert_eq!(
        s.replicas,
        Some(ReplicaCounts {
            desired: 5,
            current: 1,
            ready: 1
        })
    );

    // Two seconds later the new replicas are ready.
    rig.report("web", 103, 150);
    rig.controller.tick().await;
    let s = rig.status("web");
    assert_eq!(s.replicas.map(|r| (r.current, r.ready)), Some((5, 5)));
}

#[tokio::test]
async fn an_observed_service_gets_a_dry_run() {
    let mut rig = Rig::new(
        "dry",
        vec![spec("web", Mode::Observe, "web-hpa")],
        &[("web.yaml", HPA)],
    )
    .await;
    rig.report("web", 100, 0);
    rig.report("web", 101, 30);
    rig.controller.tick().await;
    let s = rig.status("web");
    assert_eq!(s.actuator, Some("dry-run"));
    assert_eq!(s.decisions[0].desired, 3);
}

#[tokio::test]
async fn a_missing_policy_is_an_error_on_the_service() {
    let mut rig = Rig::new(
        "missing",
        vec![spec("web", Mode::Simulated, "nope")],
        &[("web.yaml", HPA)],
    )
    .await;
    rig.controller.tick().await;
    let s = rig.status("web");
    let dir = rig.controller.policies.dir().display().to_string();
    assert_eq!(s.error, Some(format!("no policy named \"nope\" in {dir}")));
    assert!(s.decisions.is_empty());
}

#[tokio::test]
async fn a_service_without_a_policy_is_not_controlled() {
    let mut s = spec("web", Mode::Observe, "x");
    s.policy = None;
    let mut rig = Rig::new("nopolicy", vec![s], &[]).await;
    rig.controller.tick().await;
    assert!(rig.shared.control.get("web").is_none());
}
