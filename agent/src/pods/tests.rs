use serde_json::json;
use surge_proto::v1::WatchedService;

use super::*;

const UID_A: &str = "0b3c5f8e-1d2a-4c6b-9e7f-a1b2c3d4e5f6";
const UID_B: &str = "77777777-1d2a-4c6b-9e7f-a1b2c3d4e5f6";

fn pod(ns: &str, name: &str, uid: &str, node: &str, qos: Option<&str>, phase: &str) -> Pod {
    let mut status = json!({"phase": phase});
    if let Some(q) = qos {
        status["qosClass"] = json!(q);
    }
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": name, "uid": uid},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": status,
    }))
    .expect("pod")
}

/// A slice of `service` in `ns` with `ports` and endpoints (address, pod name, pod uid).
fn slice(
    ns: &str,
    service: &str,
    ports: serde_json::Value,
    eps: &[(&str, &str, Option<&str>)],
) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = eps
        .iter()
        .map(|(addr, pod, uid)| {
            let mut r = json!({"kind": "Pod", "namespace": ns, "name": pod});
            if let Some(u) = uid {
                r["uid"] = json!(u);
            }
            json!({"addresses": [addr], "targetRef": r})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": format!("{service}-x1"),
                     "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
    .expect("slice")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("literal")
}

const ROOT: &str = "/sys/fs/cgroup";

#[test]
fn systemd_names_follow_the_kubelet() {
    assert_eq!(
        pod_cgroup(Driver::Systemd, Qos::Burstable, UID_A),
        PathBuf::from(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b3c5f8e_1d2a_4c6b_9e7f_a1b2c3d4e5f6.slice"
        )
    );
    assert_eq!(
        pod_cgroup(Driver::Systemd, Qos::BestEffort, UID_A),
        PathBuf::from(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b3c5f8e_1d2a_4c6b_9e7f_a1b2c3d4e5f6.slice"
        )
    );
    // Guaranteed pods sit directly under kubepods.
    assert_eq!(
        pod_cgroup(Driver::Systemd, Qos::Guaranteed, UID_A),
        PathBuf::from("kubepods.slice/kubepods-pod0b3c5f8e_1d2a_4c6b_9e7f_a1b2c3d4e5f6.slice")
    );
}

#[test]
fn cgroupfs_names_follow_the_kubelet() {
    assert_eq!(
        pod_cgroup(Driver::Cgroupfs, Qos::Burstable, UID_A),
        PathBuf::from(format!("kubepods/burstable/pod{UID_A}"))
    );
    assert_eq!(
        pod_cgroup(Driver::Cgroupfs, Qos::BestEffort, UID_A),
        PathBuf::from(format!("kubepods/besteffort/pod{UID_A}"))
    );
    assert_eq!(
        pod_cgroup(Driver::Cgroupfs, Qos::Guaranteed, UID_A),
        PathBuf::from(format!("kubepods/pod{UID_A}"))
    );
}

#[test]
fn unknown_driver_or_class_yields_every_candidate() {
    let root = Path::new(ROOT);
    assert_eq!(
        pod_cgroups(root, Some(Driver::Cgroupfs), Some(Qos::Burstable), UID_A),
        vec![root.join(format!("kubepods/burstable/pod{UID_A}"))]
    );
    assert_eq!(pod_cgroups(root, None, Some(Qos::Burstable), UID_A).len(), 2);
    assert_eq!(pod_cgroups(root, Some(Driver::Systemd), None, UID_A).len(), 3);
    assert_eq!(pod_cgroups(root, None, None, UID_A).len(), 6);
}

#[test]
fn the_driver_is_detected_from_the_directories() {
    let dir = std::env::temp_dir().join(format!("surge-pods-driver-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    assert_eq!(Driver::detect(&dir), None);
    std::fs::create_dir(dir.join("kubepods")).expect("mkdir");
    assert_eq!(Driver::detect(&dir), Some(Driver::Cgroupfs));
    std::fs::create_dir(dir.join("kubepods.slice")).expect("mkdir");
    assert_eq!(Driver::detect(&dir), Some(Driver::Systemd));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn services_get_their_local_pods_endpoints_and_cgroups() {
    let pods = [
        pod("shop", "web-1", UID_A, "node-a", Some("Burstable"), "Running"),
        pod("shop", "api-1", UID_B, "node-a", Some("Guaranteed"), "Running"),
    ];
    let slices = [
        slice(
            "shop",
            "web",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"port": 9090}]),
            &[("10.1.0.5", "web-1", Some(UID_A)), ("10.1.9.9", "web-7", None)],
        ),
        slice(
            "shop",
            "api",
            json!([{"port": 7000}]),
            &[("10.1.0.6", "api-1", None)],
        ),
    ];
    let (v, skipped) = view("node-a", &pods, &slices, Path::new(ROOT), Some(Driver::Systemd));
    assert!(skipped.is_empty());
    assert_eq!(v.len(), 2);
    let web = &v["shop/web"];
    assert_eq!(web.pods, BTreeSet::from(["shop/web-1".to_string()]));
    assert_eq!(
        web.endpoints,
        BTreeSet::from([addr("10.1.0.5:8080"), addr("10.1.0.5:9090")])
    );
    assert_eq!(
        web.cgroups,
        BTreeSet::from([Path::new(ROOT).join(pod_cgroup(Driver::Systemd, Qos::Burstable, UID_A))])
    );
    let api = &v["shop/api"];
    assert_eq!(api.endpoints, BTreeSet::from([addr("10.1.0.6:7000")]));
    assert_eq!(
        api.cgroups,
        BTreeSet::from([Path::new(ROOT).join(pod_cgroup(Driver::Systemd, Qos::Guaranteed, UID_B))])
    );
}

#[test]
fn pods_of_other_nodes_and_finished_pods_are_left_out() {
    let pods = [
        pod("shop", "web-1", UID_A, "node-b", Some("Burstable"), "Running"),
        pod("shop", "web-2", UID_B, "node-a", Some("Burstable"), "Succeeded"),
    ];
    let slices = [slice(
        "shop",
        "web",
        json!([{"port": 8080}]),
        &[("10.1.0.5", "web-1", None), ("10.1.0.6", "web-2", None)],
    )];
    let (v, _) = view("node-a", &pods, &slices, Path::new(ROOT), Some(Driver::Systemd));
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn a_stale_reference_to_an_earlier_pod_of_the_same_name_is_ignored() {
    let pods = [pod("shop", "db-0", UID_B, "node-a", Some("Burstable"), "Running")];
    let slices = [slice(
        "shop",
        "db",
        json!([{"port": 5432}]),
        &[("10.1.0.5", "db-0", Some(UID_A))],
    )];
    let (v, _) = view("node-a", &pods, &slices, Path::new(ROOT), Some(Driver::Systemd));
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn udp_and_portless_entries_and_fqdn_addresses_give_no_endpoint() {
    let pods = [pod(
        "shop",
        "dns-1",
        UID_A,
        "node-a",
        Some("BestEffort"),
        "Running",
    )];
    let slices = [slice(
        "shop",
        "dns",
        json!([{"port": 53, "protocol": "UDP"}, {"name": "all"}, {"port": 53, "protocol": "TCP"}]),
        &[("10.1.0.5", "dns-1", None), ("dns.example.com", "dns-1", None)],
    )];
    let (v, _) = view("node-a", &pods, &slices, Path::new(ROOT), Some(Driver::Cgroupfs));
    let dns = &v["shop/dns"];
    assert_eq!(dns.endpoints, BTreeSet::from([addr("10.1.0.5:53")]));
    // The pod is still the service's: its CPU and memory count.
    assert_eq!(dns.cgroups.len(), 1);
}

#[test]
fn a_uid_that_is_not_a_uid_is_skipped_with_a_reason() {
    let pods = [pod("shop", "evil", "../../etc", "node-a", None, "Running")];
    let slices = [slice(
        "shop",
        "web",
        json!([{"port": 80}]),
        &[("10.1.0.5", "evil", None)],
    )];
    let (v, skipped) = view("node-a", &pods, &slices, Path::new(ROOT), None);
    assert!(v.is_empty());
    assert_eq!(
        skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec![
            "pod shop/evil: metadata.uid = \"../../etc\", must be a UID (hex digits and dashes): its cgroup is not looked for"
                .to_string()
        ]
    );
}

#[test]
fn a_pod_in_two_services_is_in_both() {
    let pods = [pod(
        "shop",
        "web-1",
        UID_A,
        "node-a",
        Some("Burstable"),
        "Running",
    )];
    let slices = [
        slice(
            "shop",
            "web",
            json!([{"port": 8080}]),
            &[("10.1.0.5", "web-1", None)],
        ),
        slice(
            "shop",
            "web-admin",
            json!([{"port": 9000}]),
            &[("10.1.0.5", "web-1", None)],
        ),
    ];
    let (v, _) = view("node-a", &pods, &slices, Path::new(ROOT), Some(Driver::Systemd));
    assert_eq!(v["shop/web"].cgroups, v["shop/web-admin"].cgroups);
    assert_eq!(
        v["shop/web-admin"].endpoints,
        BTreeSet::from([addr("10.1.0.5:9000")])
    );
}

fn scaler_set() -> WatchSet {
    WatchSet {
        generation: 7,
        services: vec![
            WatchedService {
                name: "shop/web".into(),
                endpoints: vec![
                    Endpoint {
                        ip: "10.1.0.5".into(),
                        port: 8080,
                    },
                    Endpoint {
                        ip: "10.1.3.3".into(),
                        port: 8080,
                    },
                ],
                ..Default::default()
            },
            WatchedService {
                name: "local".into(),
                endpoints: vec![Endpoint {
                    ip: "127.0.0.1".into(),
                    port: 9000,
                }],
                cgroups: vec!["surge/local/1".into()],
                ..Default::default()
            },
        ],
    }
}

#[test]
fn merging_adds_local_endpoints_and_cgroups_to_the_named_services_only() {
    let mut v = View::new();
    v.insert(
        "shop/web".into(),
        ServicePods {
            pods: BTreeSet::from(["shop/web-1".into()]),
            endpoints: BTreeSet::from([addr("10.1.0.5:8080"), addr("10.1.0.5:9090")]),
            cgroups: BTreeSet::from([PathBuf::from("/cg/kubepods/burstable/podx")]),
        },
    );
    v.insert(
        "shop/unwatched".into(),
        ServicePods {
            pods: BTreeSet::from(["shop/other".into()]),
            endpoints: BTreeSet::from([addr("10.1.0.9:80")]),
            cgroups: BTreeSet::from([PathBuf::from("/cg/kubepods/pody")]),
        },
    );
    let set = scaler_set();
    let merged = merge(&set, &v);
    assert_eq!(merged.generation, 7);
    assert_eq!(
        merged.services.len(),
        2,
        "a service the scaler does not name is not added"
    );
    let web = &merged.services[0];
    let eps: Vec<(String, u32)> = web.endpoints.iter().map(|e| (e.ip.clone(), e.port)).collect();
    assert_eq!(
        eps,
        vec![
            ("10.1.0.5".into(), 8080),
            ("10.1.3.3".into(), 8080),
            ("10.1.0.5".into(), 9090)
        ]
    );
    assert_eq!(web.cgroups, vec!["/cg/kubepods/burstable/podx".to_string()]);
    assert_eq!(merged.services[1], set.services[1]);
    // Merging twice changes nothing more.
    assert_eq!(merge(&merged, &v), merged);
}

#[test]
fn changes_name_the_services_that_differ() {
    let mut before = View::new();
    before.insert("a/x".into(), ServicePods::default());
    before.insert(
        "a/y".into(),
        ServicePods {
            pods: BTreeSet::from(["a/y-1".into()]),
            ..Default::default()
        },
    );
    let mut after = before.clone();
    after.remove("a/y");
    after.insert(
        "a/z".into(),
        ServicePods {
            pods: BTreeSet::from(["a/z-1".into()]),
            ..Default::default()
        },
    );
    let c = changes(&before, &after);
    let names: Vec<&str> = c.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, vec!["a/y", "a/z"]);
    assert!(c[0].1.pods.is_empty());
}

#[test]
fn a_kept_slice_holds_only_this_nodes_share_and_gives_the_same_view() {
    let pods = [
        pod("shop", "web-1", UID_A, "node-a", Some("Burstable"), "Running"),
        pod("shop", "web-2", UID_B, "node-a", Some("Burstable"), "Running"),
    ];
    let mut full = slice(
        "shop",
        "web",
        json!([{"port": 8080}]),
        &[
            ("10.1.0.5", "web-1", Some(UID_A)),
            ("10.1.0.6", "web-2", Some(UID_B)),
            ("10.2.0.5", "web-8", None),
            ("10.2.0.6", "web-9", None),
        ],
    );
    // web-1 and the two pods of node-b carry their node; web-2's endpoint does not.
    full.endpoints[0].node_name = Some("node-a".into());
    full.endpoints[2].node_name = Some("node-b".into());
    full.endpoints[3].node_name = Some("node-b".into());
    full.metadata.annotations = Some([("a".to_string(), "x".repeat(4096))].into_iter().collect());
    let mut kept = full.clone();
    trim_slice("node-a", &mut kept);
    let names: Vec<_> = kept
        .endpoints
        .iter()
        .map(|e| {
            e.target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(names, ["web-1", "web-2"]);
    assert_eq!(kept.metadata.annotations, None);
    let root = Path::new(ROOT);
    assert_eq!(
        view("node-a", &pods, [&kept], root, Some(Driver::Systemd)),
        view("node-a", &pods, [&full], root, Some(Driver::Systemd)),
    );
}
