//! What a Service's endpoints objects say about its replicas: how many are ready, every endpoint
//! (ready or not, for the agents to measure), and the ready ones by port name (for holding).
//! Pure: the objects in, a [`Seen`] out, whether they came from a read or from the watch cache.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};

/// What a Service's endpoints objects say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub ready: u32,
    pub endpoints: Vec<SocketAddr>,
    /// Ready endpoints by port name ("" for an unnamed port), as a Service port finds its
    /// target port.
    pub ready_by_port: BTreeMap<String, BTreeSet<SocketAddr>>,
}

/// A Service's discovery.k8s.io/v1 EndpointSlices; `None` when it has none.
pub fn from_slices<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Option<Seen> {
    let mut any = false;
    let mut ready = BTreeSet::new();
    let mut all = BTreeSet::new();
    let mut ready_by_port: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for slice in slices {
        any = true;
        let ports: Vec<i32> = slice.ports.iter().flatten().filter_map(|p| p.port).collect();
        for e in &slice.endpoints {
            all.extend(pairs(e.addresses.iter().map(String::as_str), &ports));
            // An endpoint without a ready condition is ready (the API's rule).
            if e.conditions.as_ref().and_then(|c| c.ready) != Some(false) {
                ready.insert(e.addresses.first().cloned().unwrap_or_default());
                for p in slice.ports.iter().flatten() {
                    let Some(port) = p.port else { continue };
                    ready_by_port
                        .entry(p.name.clone().unwrap_or_default())
                        .or_default()
                        .extend(pairs(e.addresses.iter().take(1).map(String::as_str), &[port]));
                }
            }
        }
    }
    any.then(|| Seen {
        ready: ready.len() as u32,
        endpoints: all.into_iter().collect(),
        ready_by_port,
    })
}

/// A Service's core/v1 Endpoints object.
pub fn from_endpoints(ep: &Endpoints) -> Seen {
    let mut ready = 0;
    let mut all = BTreeSet::new();
    let mut ready_by_port: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for subset in ep.subsets.iter().flatten() {
        let ports: Vec<i32> = subset.ports.iter().flatten().map(|p| p.port).collect();
        let addresses = subset.addresses.iter().flatten();
        ready += addresses.clone().count() as u32;
        for p in subset.ports.iter().flatten() {
            ready_by_port
                .entry(p.name.clone().unwrap_or_default())
                .or_default()
                .extend(pairs(addresses.clone().map(|a| a.ip.as_str()), &[p.port]));
        }
        let not_ready = subset.not_ready_addresses.iter().flatten();
        all.extend(pairs(addresses.chain(not_ready).map(|a| a.ip.as_str()), &ports));
    }
    Seen {
        ready,
        endpoints: all.into_iter().collect(),
        ready_by_port,
    }
}

/// Every address × port pair that parses, sorted and without duplicates.
fn pairs<'a>(addresses: impl Iterator<Item = &'a str>, ports: &[i32]) -> BTreeSet<SocketAddr> {
    let ips: Vec<IpAddr> = addresses.filter_map(|a| a.parse().ok()).collect();
    ips.iter()
        .flat_map(|ip| {
            ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .map(move |p| SocketAddr::new(*ip, p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|s| s.parse().expect("literal")).collect()
    }

    #[test]
    fn endpoints_are_every_address_and_port() {
        let got = pairs(
            ["10.0.0.2", "fd00::1", "not-an-ip"].into_iter(),
            &[8080, 70000, 9090],
        );
        assert_eq!(
            got,
            addrs(&[
                "10.0.0.2:8080",
                "10.0.0.2:9090",
                "[fd00::1]:8080",
                "[fd00::1]:9090"
            ])
        );
    }

    #[test]
    fn slices_count_ready_endpoints_and_pair_them_with_named_ports() {
        let slice = |name: &str, endpoints: serde_json::Value| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}],
                "endpoints": endpoints,
            }))
            .expect("slice")
        };
        let a = slice(
            "web-a",
            serde_json::json!([
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false}},
            ]),
        );
        let b = slice("web-b", serde_json::json!([{"addresses": ["10.1.0.3"]}]));
        let seen = from_slices([&a, &b]).expect("two slices");
        assert_eq!(seen.ready, 2, "no ready condition counts as ready");
        assert_eq!(seen.endpoints.len(), 6, "3 addresses × 2 ports, ready or not");
        assert_eq!(
            seen.ready_by_port["http"],
            addrs(&["10.1.0.1:8080", "10.1.0.3:8080"])
        );
        assert_eq!(
            seen.ready_by_port["metrics"],
            addrs(&["10.1.0.1:9100", "10.1.0.3:9100"])
        );
        assert_eq!(from_slices([]), None, "no slice is no endpoints object");
    }

    #[test]
    fn endpoints_objects_count_addresses_and_leave_not_ready_ones_out_of_ready() {
        let ep: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "subsets": [{
                "addresses": [{"ip": "10.1.0.1"}, {"ip": "10.1.0.3"}],
                "notReadyAddresses": [{"ip": "10.1.0.2"}],
                "ports": [{"port": 8080}],
            }],
        }))
        .expect("endpoints");
        let seen = from_endpoints(&ep);
        assert_eq!(seen.ready, 2);
        assert_eq!(
            seen.endpoints.iter().copied().collect::<BTreeSet<_>>(),
            addrs(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"])
        );
        assert_eq!(seen.ready_by_port[""], addrs(&["10.1.0.1:8080", "10.1.0.3:8080"]));
    }
}
