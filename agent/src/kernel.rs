//! The kernel side, seen from userspace: loads the embedded eBPF object, attaches the programs to
//! the cgroup v2 root, and reads and writes the maps. Every call is a short syscall; callers on
//! the async runtime go through `spawn_blocking`.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, RawTracePoint, SkLookup, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use surge_common::{EndpointKey, ServiceCounters};

/// The object built from `agent-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/surge.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read the kernel BTF at {path}: {source}")]
    Btf { path: String, source: aya::BtfError },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot open the cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error(transparent)]
    Pin(#[from] crate::pins::PinError),
    #[error(
        "eBPF program {name}: its link cannot be pinned (the kernel needs bpf_link, 5.7 or later): {source}"
    )]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("cannot pin a connect hook at {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

/// The watch set's first generation, and the one after wrapping: never `NO_WATCH_GENERATION`,
/// which no cached service carries.
const FIRST_WATCH_GENERATION: u32 = 1;
const _: () = assert!(FIRST_WATCH_GENERATION != surge_common::NO_WATCH_GENERATION);

/// The loaded and attached programs and the maps the agent uses. Dropping it detaches all.
pub struct KernelProbe {
    // Keeps the programs and their links alive.
    _ebpf: Ebpf,
    /// The ingress program's tail call: the kernel empties a program array once no process
    /// holds it open.
    _handshake_program: Option<ProgramArray<MapData>>,
    watched: HashMap<MapData, EndpointKey, u32>,
    /// Bumped after every change of `watched`: connections' cached services of an older
    /// generation are looked up again.
    watch_generation: Array<MapData, u32>,
    generation: u32,
    /// The watched-port bitmap the programs check first, and how many endpoints use each port.
    ports: Array<MapData, u64>,
    port_users: std::collections::HashMap<u16, u32>,
    cgroups: HashMap<MapData, u64, u32>,
    counters: PerCpuArray<MapData, ServiceCounters>,
    /// The connect-time load balancer (connect4/connect6) and its maps.
    pub balancer: crate::backends::Balancer,
    /// The load balancer's pins, locked while this agent runs.
    _pins: crate::pins::PinDir,
    /// The holders' socket map of the sk_lookup program, until the holders take it.
    pub steering: Option<crate::steer::Steering>,
}

const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("surge_skb_ingress", CgroupSkbAttachType::Ingress),
    ("surge_skb_egress", CgroupSkbAttachType::Egress),
];

impl KernelProbe {
    /// Loads the object with the kernel's BTF and attaches every program: cgroup_skb and
    /// sock_ops to `cgroup_root` (beside any other programs already there), the sched_switch
    /// tracepoint, and the load balancer's connect hooks, whose maps and links stay pinned in
    /// `pins` (taking over from a previous agent's, see pins.rs).
    pub fn load(
        btf_path: &Path,
        cgroup_root: &Path,
        pins: crate::pins::PinDir,
        node_ip: Option<std::net::IpAddr>,
    ) -> Result<Self, KernelError> {
        let btf = Btf::parse_file(btf_path, Default::default()).map_err(|source| KernelError::Btf {
            path: btf_path.display().to_string(),
            source,
        })?;
        let maps = pins.prepare_maps()?;
        let map_paths = crate::pins::LB_MAPS.map(|name| (name, pins.map_path(name)));
        let mut loader = EbpfLoader::new();
        loader.btf(Some(&btf));
        for (name, path) in &map_paths {
            // Reused when pinned there (prepare_maps kept only maps of this layout), else
            // created and pinned.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        // Connections cache their endpoint's service while the watch set keeps its generation.
        let mut watch_generation: Array<MapData, u32> = take_map(&mut ebpf, "WATCH_GENERATION")?;
        watch_generation
            .set(0, FIRST_WATCH_GENERATION, 0)
            .map_err(|source| KernelError::Map {
                name: "WATCH_GENERATION",
                source,
            })?;
        let cgroup = File::open(cgroup_root).map_err(|source| KernelError::Cgroup {
            path: cgroup_root.display().to_string(),
            source,
        })?;
        // Before the ingress program runs: it tail-calls this one for segments filtered on a
        // listening socket (a connection's first payload with the last packet of its handshake).
        let handshake_program = match load_handshake_program(&mut ebpf) {
            Ok(array) => Some(array),
            Err(e) => {
                tracing::warn!(error = %e, "requests that arrive with the last packet of their connection's handshake (servers with TCP_DEFER_ACCEPT, TCP Fast Open, SYN cookies) are not counted");
                None
            }
        };
        // aya attaches to cgroups with a bpf_link (kernel ≥ 5.7), which the kernel requires to
        // have no flags and which always coexists with other programs on the cgroup: `Single`
        // is "no flags" there, not exclusivity.
        for (name, attach_type) in SKB_PROGRAMS {
            let skb: &mut CgroupSkb = loaded(&mut ebpf, name)?;
            skb.attach(&cgroup, attach_type, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
        }
        let name = "surge_sock_ops";
        let sock_ops: &mut SockOps = loaded(&mut ebpf, name)?;
        sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| KernelError::Program { name, source })?;
        if let Err(e) = crate::steer::tell_netns(&mut ebpf) {
            tracing::warn!(error = %e, "the connect hooks cannot tell the agent's network namespace from others: sockets of other namespaces may be sent to this one's loopback");
        }
        if let Err(e) = crate::steer::tell_node_addr(&mut ebpf, node_ip) {
            tracing::warn!(error = %e, "the connect hooks cannot send other namespaces' connects to the node address: pods' connections to a service at zero are not held");
        }
        let steering = match crate::steer::attach(&mut ebpf) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "sk_lookup not attached: connections from outside this host to a service at zero are not held");
                None
            }
        };
        let balancer = crate::backends::Balancer::attach(&mut ebpf, &cgroup, &pins, &maps)?;
        let name = "surge_sched_switch";
        let switch: &mut RawTracePoint = loaded(&mut ebpf, name)?;
        switch
            .attach("sched_switch")
            .map_err(|source| KernelError::Program { name, source })?;

        let watched = take_map(&mut ebpf, "WATCHED")?;
        let ports = take_map(&mut ebpf, "WATCHED_PORTS")?;
        let cgroups = take_map(&mut ebpf, "CGROUPS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        Ok(Self {
            _ebpf: ebpf,
            _handshake_program: handshake_program,
            watch_generation,
            generation: FIRST_WATCH_GENERATION,
            watched,
            ports,
            port_users: std::collections::HashMap::new(),
            cgroups,
            counters,
            balancer,
            _pins: pins,
            steering,
        })
    }

    /// Attributes a cgroup (by id) to a service.
    pub fn watch_cgroup(&mut self, cgroup_id: u64, service_id: u32) -> Result<(), KernelError> {
        self.cgroups
            .insert(cgroup_id, service_id, 0)
            .map_err(|source| KernelError::Map {
                name: "CGROUPS",
                source,
            })
    }

    /// Stops attributing a cgroup.
    pub fn unwatch_cgroup(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        match self.cgroups.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(KernelError::Map {
                name: "CGROUPS",
                source,
            }),
        }
    }

    /// Points an endpoint at a service id.
    pub fn watch(&mut self, key: EndpointKey, service_id: u32) -> Result<(), KernelError> {
        let existed = self.watched.get(&key, 0).is_ok();
        self.watched
            .insert(key, service_id, 0)
            .map_err(|source| KernelError::Map {
                name: "WATCHED",
                source,
            })?;
        // Bumped as soon as WATCHED changed, whatever fails after.
        self.next_generation()?;
        if !existed {
            *self.port_users.entry(key.port).or_insert(0) += 1;
            self.set_port_bit(key.port, true)?;
        }
        Ok(())
    }

    /// Tells the kernel programs that the watch set changed.
    fn next_generation(&mut self) -> Result<(), KernelError> {
        self.generation = self.generation.checked_add(1).unwrap_or(FIRST_WATCH_GENERATION);
        self.watch_generation
            .set(0, self.generation, 0)
            .map_err(|source| KernelError::Map {
                name: "WATCH_GENERATION",
                source,
            })
    }

    /// Stops watching an endpoint.
    pub fn unwatch(&mut self, key: &EndpointKey) -> Result<(), KernelError> {
        match self.watched.remove(key) {
            Ok(()) => {
                self.next_generation()?;
                let users = self.port_users.entry(key.port).or_insert(1);
                *users = users.saturating_sub(1);
                if *users == 0 {
                    self.port_users.remove(&key.port);
                    self.set_port_bit(key.port, false)?;
                }
                Ok(())
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(KernelError::Map {
                name: "WATCHED",
                source,
            }),
        }
    }

    /// Sets or clears a port's bit in the watched-port bitmap.
    fn set_port_bit(&mut self, port: u16, on: bool) -> Result<(), KernelError> {
        let map_err = |source| KernelError::Map {
            name: "WATCHED_PORTS",
            source,
        };
        let (word, bit) = (u32::from(port >> 6), 1u64 << (port & 63));
        let old = self.ports.get(&word, 0).map_err(map_err)?;
        let new = if on { old | bit } else { old & !bit };
        self.ports.set(word, new, 0).map_err(map_err)
    }

    /// Zeroes a service's counters on every CPU (before its id is given to a new service).
    pub fn reset(&mut self, service_id: u32) -> Result<(), KernelError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| KernelError::Map {
            name: "COUNTERS",
            source: aya::maps::MapError::IoError(e),
        })?;
        let zeros =
            PerCpuValues::try_from(vec![ServiceCounters::default(); cpus]).map_err(|e| KernelError::Map {
                name: "COUNTERS",
                source: aya::maps::MapError::IoError(e),
            })?;
        self.counters
            .set(service_id, zeros, 0)
            .map_err(|source| KernelError::Map {
                name: "COUNTERS",
                source,
            })
    }

    /// A service's counters summed over all CPUs.
    pub fn read(&self, service_id: u32) -> Result<ServiceCounters, KernelError> {
        let per_cpu = self
            .counters
            .get(&service_id, 0)
            .map_err(|source| KernelError::Map {
                name: "COUNTERS",
                source,
            })?;
        Ok(sum(per_cpu.iter()))
    }
}

/// The program `name` of the object, as type `P`, loaded into the kernel.
pub(crate) fn loaded<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, KernelError>
where
    P: ProgramLoad,
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program: &mut P = ebpf
        .program_mut(name)
        .ok_or(KernelError::MissingProgram { name })?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })?;
    let began = std::time::Instant::now();
    program
        .load_program()
        .map_err(|source| KernelError::Program { name, source })?;
    // Most of it is the kernel's verifier: the HTTP programs take most of the agent's start.
    tracing::debug!(
        program = name,
        load_ms = began.elapsed().as_millis() as u64,
        "program loaded"
    );
    Ok(program)
}

/// The `load` every program type has, under one name.
pub(crate) trait ProgramLoad {
    fn load_program(&mut self) -> Result<(), aya::programs::ProgramError>;
}

macro_rules! program_load {
    ($($t:ty),*) => {$(
        impl ProgramLoad for $t {
            fn load_program(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
        }
    )*};
}
program_load!(CgroupSkb, CgroupSockAddr, SockOps, RawTracePoint, SkLookup);

/// Loads `surge_skb_handshake` into the ingress program's tail-call array.
fn load_handshake_program(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>, KernelError> {
    let name = "surge_skb_handshake";
    let program: &mut CgroupSkb = loaded(ebpf, name)?;
    let fd = program
        .fd()
        .map_err(|source| KernelError::Program { name, source })?
        .try_clone()
        .map_err(|source| KernelError::Program {
            name,
            source: source.into(),
        })?;
    let map = "HANDSHAKE_PROGRAM";
    let mut array: ProgramArray<MapData> = take_map(ebpf, map)?;
    array
        .set(0, &fd, 0)
        .map_err(|source| KernelError::Map { name: map, source })?;
    Ok(array)
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::MissingMap { name })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source })
}

/// Adds per-CPU copies. Wrapping: every field is a cumulative counter or a signed sum whose
/// per-CPU parts may be negative.
pub fn sum<'a>(copies: impl Iterator<Item = &'a ServiceCounters>) -> ServiceCounters {
    let mut total = ServiceCounters::default();
    for c in copies {
        total.requests = total.requests.wrapping_add(c.requests);
        total.responses = total.responses.wrapping_add(c.responses);
        total.inflight_sign_sum = total.inflight_sign_sum.wrapping_add(c.inflight_sign_sum);
        total.inflight_time_sum = total.inflight_time_sum.wrapping_add(c.inflight_time_sum);
        total.latency_sum_ns = total.latency_sum_ns.wrapping_add(c.latency_sum_ns);
        for (t, b) in total.latency_buckets.iter_mut().zip(c.latency_buckets.iter()) {
            *t = t.wrapping_add(*b);
        }
        total.rx_bytes = total.rx_bytes.wrapping_add(c.rx_bytes);
        total.tx_bytes = total.tx_bytes.wrapping_add(c.tx_bytes);
        total.cpu_ns = total.cpu_ns.wrapping_add(c.cpu_ns);
        total.connections_opened = total.connections_opened.wrapping_add(c.connections_opened);
        total.connections_closed = total.connections_closed.wrapping_add(c.connections_closed);
        total.tls_connections = total.tls_connections.wrapping_add(c.tls_connections);
        total.probe_requests = total.probe_requests.wrapping_add(c.probe_requests);
    }
    total
}
