//! Which service each watched endpoint belongs to: turns the scaler's watch set into service ids
//! and endpoint keys, and says what must change in the kernel maps. Pure: it never touches the
//! kernel, so the kernel reading and the source of services (the scaler today, the pods of the
//! node in Kubernetes) can change alone.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use surge_common::{EndpointKey, MAX_SERVICES};
use surge_proto::v1::WatchSet;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AttributionError {
    #[error("service {service:?}: endpoint ip = {ip:?}, must be an IPv4 or IPv6 address")]
    BadAddress { service: String, ip: String },
    #[error("service {service:?}: endpoint port = {port}, must be between 1 and 65535")]
    BadPort { service: String, port: u32 },
    #[error("endpoint {endpoint} is claimed by both {first:?} and {second:?}")]
    Conflict {
        endpoint: String,
        first: String,
        second: String,
    },
    #[error("{count} services to watch, at most {max} are allowed")]
    TooManyServices { count: usize, max: u32 },
    #[error("a service name must not be empty")]
    EmptyName,
}

/// The kernel-map changes that take the current state to a new watch set.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Services that get a fresh id: their counters must be zeroed before endpoints point at them.
    pub new_services: Vec<(String, u32)>,
    /// Endpoints to insert or repoint.
    pub upsert_endpoints: Vec<(EndpointKey, u32)>,
    /// Endpoints to remove.
    pub remove_endpoints: Vec<EndpointKey>,
    /// Services no longer watched; their ids become free.
    pub removed_services: Vec<(String, u32)>,
}

/// The current assignment of services to ids and endpoints to services.
#[derive(Debug, Default)]
pub struct Attribution {
    ids: BTreeMap<String, u32>,
    endpoints: HashMap<EndpointKey, u32>,
    free_ids: Vec<u32>,
    next_id: u32,
}

impl Attribution {
    /// Services being watched, with their ids, in name order.
    pub fn services(&self) -> impl Iterator<Item = (&str, u32)> {
        self.ids.iter().map(|(n, id)| (n.as_str(), *id))
    }

    /// Works out the changes for `watch` without applying them; an invalid set changes nothing.
    pub fn plan(&self, watch: &WatchSet) -> Result<Plan, AttributionError> {
        if watch.services.len() > MAX_SERVICES as usize {
            return Err(AttributionError::TooManyServices {
                count: watch.services.len(),
                max: MAX_SERVICES,
            });
        }
        let mut wanted: BTreeMap<String, Vec<EndpointKey>> = BTreeMap::new();
        let mut owner: HashMap<EndpointKey, String> = HashMap::new();
        for svc in &watch.services {
            if svc.name.is_empty() {
                return Err(AttributionError::EmptyName);
            }
            let keys = wanted.entry(svc.name.clone()).or_default();
            for ep in &svc.endpoints {
                let key = endpoint_key(&svc.name, &ep.ip, ep.port)?;
                if let Some(first) = owner.insert(key, svc.name.clone()) {
                    if first != svc.name {
                        return Err(AttributionError::Conflict {
                            endpoint: format!("{}:{}", ep.ip, ep.port),
                            first,
                            second: svc.name.clone(),
                        });
                    }
                }
                keys.push(key);
            }
        }

        let mut plan = Plan::default();
        let mut free = self.free_ids.clone();
        let mut next = self.next_id;
        let mut ids: HashMap<&str, u32> = HashMap::new();
        for (name, id) in &self.ids {
            if wanted.contains_key(name) {
                ids.insert(name, *id);
            } else {
                plan.removed_services.push((name.clone(), *id));
                free.push(*id);
            }
        }
        for name in wanted.keys() {
            if !ids.contains_key(name.as_str()) {
                let id = free.pop().unwrap_or_else(|| {
                    next += 1;
                    next - 1
                });
                ids.insert(name, id);
                plan.new_services.push((name.clone(), id));
            }
        }
        for (name, keys) in &wanted {
            let id = ids[name.as_str()];
            for key in keys {
                if self.endpoints.get(key) != Some(&id) {
                    plan.upsert_endpoints.push((*key, id));
                }
            }
        }
        for key in self.endpoints.keys() {
            if !owner.contains_key(key) {
                plan.remove_endpoints.push(*key);
            }
        }
        plan.upsert_endpoints.dedup();
        Ok(plan)
    }

    /// Records a plan as applied (after the kernel maps were changed accordingly).
    pub fn apply(&mut self, plan: &Plan) {
        for (name, id) in &plan.removed_services {
            self.ids.remove(name);
            self.free_ids.push(*id);
        }
        for (name, id) in &plan.new_services {
            self.free_ids.retain(|f| f != id);
            self.next_id = self.next_id.max(id + 1);
            self.ids.insert(name.clone(), *id);
        }
        for key in &plan.remove_endpoints {
            self.endpoints.remove(key);
        }
        for (key, id) in &plan.upsert_endpoints {
            self.endpoints.insert(*key, *id);
        }
    }
}

/// The kernel key for an endpoint given as text; "0.0.0.0" and "::" mean any local address.
pub fn endpoint_key(service: &str, ip: &str, port: u32) -> Result<EndpointKey, AttributionError> {
    let addr: IpAddr = ip.parse().map_err(|_| AttributionError::BadAddress {
        service: service.to_string(),
        ip: ip.to_string(),
    })?;
    if port == 0 || port > u16::MAX as u32 {
        return Err(AttributionError::BadPort {
            service: service.to_string(),
            port,
        });
    }
    let port = port as u16;
    if addr.is_unspecified() {
        return Ok(EndpointKey::any(port));
    }
    Ok(match addr {
        IpAddr::V4(v4) => EndpointKey::v4(v4.octets(), port),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => EndpointKey::v4(v4.octets(), port),
            None => EndpointKey::new(v6.octets(), port),
        },
    })
}

#[cfg(test)]
mod tests;
