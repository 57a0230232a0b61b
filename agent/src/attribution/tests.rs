use surge_proto::v1::{Endpoint, WatchedService};

use super::*;

fn set(services: &[(&str, &[(&str, u32)])]) -> WatchSet {
    WatchSet {
        generation: 1,
        services: services
            .iter()
            .map(|(name, eps)| WatchedService {
                name: name.to_string(),
                endpoints: eps
                    .iter()
                    .map(|(ip, port)| Endpoint {
                        ip: ip.to_string(),
                        port: *port,
                    })
                    .collect(),
                cgroups: vec![],
                ..Default::default()
            })
            .collect(),
    }
}

#[test]
fn first_set_creates_services_and_endpoints() {
    let a = Attribution::default();
    let plan = a
        .plan(&set(&[
            ("web", &[("127.0.0.1", 8080)]),
            ("api", &[("0.0.0.0", 9000)]),
        ]))
        .expect("valid");
    assert_eq!(
        plan.new_services,
        vec![("api".to_string(), 0), ("web".to_string(), 1)]
    );
    assert_eq!(
        plan.upsert_endpoints,
        vec![
            (EndpointKey::any(9000), 0),
            (EndpointKey::v4([127, 0, 0, 1], 8080), 1)
        ]
    );
    assert!(plan.remove_endpoints.is_empty() && plan.removed_services.is_empty());
}

#[test]
fn same_set_again_changes_nothing_and_keeps_ids() {
    let mut a = Attribution::default();
    let s = set(&[("web", &[("127.0.0.1", 8080)])]);
    let plan = a.plan(&s).expect("valid");
    a.apply(&plan);
    assert_eq!(a.plan(&s).expect("valid"), Plan::default());
}

#[test]
fn removed_service_frees_its_id_and_endpoints() {
    let mut a = Attribution::default();
    let p = a
        .plan(&set(&[("a", &[("::1", 1)]), ("b", &[("127.0.0.1", 2)])]))
        .expect("valid");
    a.apply(&p);
    let p = a.plan(&set(&[("b", &[("127.0.0.1", 2)])])).expect("valid");
    assert_eq!(p.removed_services, vec![("a".to_string(), 0)]);
    assert_eq!(
        p.remove_endpoints,
        vec![EndpointKey::new(std::net::Ipv6Addr::LOCALHOST.octets(), 1)]
    );
    a.apply(&p);
    let p = a
        .plan(&set(&[("b", &[("127.0.0.1", 2)]), ("c", &[("127.0.0.1", 3)])]))
        .expect("valid");
    assert_eq!(
        p.new_services,
        vec![("c".to_string(), 0)],
        "the freed id is reused"
    );
}

#[test]
fn ipv4_mapped_ipv6_is_the_ipv4_key() {
    assert_eq!(
        endpoint_key("s", "::ffff:10.1.2.3", 80),
        Ok(EndpointKey::v4([10, 1, 2, 3], 80))
    );
    assert_eq!(endpoint_key("s", "::", 80), Ok(EndpointKey::any(80)));
}

#[test]
fn bad_input_is_named_and_changes_nothing() {
    let a = Attribution::default();
    assert_eq!(
        a.plan(&set(&[("web", &[("localhost", 80)])]))
            .unwrap_err()
            .to_string(),
        "service \"web\": endpoint ip = \"localhost\", must be an IPv4 or IPv6 address"
    );
    assert_eq!(
        a.plan(&set(&[("web", &[("127.0.0.1", 70000)])]))
            .unwrap_err()
            .to_string(),
        "service \"web\": endpoint port = 70000, must be between 1 and 65535"
    );
    assert_eq!(
        a.plan(&set(&[("a", &[("127.0.0.1", 80)]), ("b", &[("127.0.0.1", 80)])]))
            .unwrap_err()
            .to_string(),
        "endpoint 127.0.0.1:80 is claimed by both \"a\" and \"b\""
    );
}
