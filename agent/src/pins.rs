//! What survives the agent in bpffs, so a restart changes nothing for warm clients: the connect-time
//! load balancer's maps and its connect4/connect6 links, under one directory per agent.
//!
//! ```text
//! <pin dir>/lb-v<LB_LAYOUT_VERSION>/SERVICE_ADDRS, BACKENDS   maps: reused by the next agent
//! <pin dir>/links/connect4-<generation>, connect6-<generation>   one pair per agent start
//! ```
//!
//! A starting agent takes the directory's lock (flock; the kernel drops it when the holder dies,
//! even by SIGKILL), reuses the maps if their layout is its own, attaches and pins its own hooks,
//! and removes the previous generations' hooks once it has applied its first watch set (see
//! backends.rs). Maps it cannot reuse are unpinned and replaced by fresh ones; the old hooks keep
//! them alive, and keep routing with them, until that handover. Only `--cleanup` removes the
//! pins for good.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use aya::maps::{MapInfo, MapType};
use surge_common::{Balanced, EndpointKey, LB_LAYOUT_VERSION, MAX_BACKENDS, MAX_BALANCED, MAX_SERVICES};

use crate::config::ConfigError;

/// Where the agent pins by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/surge";
/// The pinned maps: the load balancer's state.
pub const LB_MAPS: [&str; 2] = ["SERVICE_ADDRS", "BACKENDS"];
/// The pinned links: the connect hooks.
pub const HOOKS: [&str; 2] = ["connect4", "connect6"];
const LINKS_DIR: &str = "links";
const LB_DIR_PREFIX: &str = "lb-v";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path} is not on a bpf filesystem: mount one with `mount -t bpf bpffs /sys/fs/bpf`, or pass --bpf-pin-dir with a directory on a bpffs mount")]
    NotBpffs { path: PathBuf },
    #[error("another surge-agent is running with --bpf-pin-dir {path}: stop it first (every agent on a machine needs its own directory)")]
    Busy { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `--bpf-pin-dir` flag, checked before anything is touched: an absolute path below `/`,
/// without `.` or `..`. Whether it is on bpffs is checked when it is opened.
pub fn validate_pin_dir(path: &Path) -> Result<PathBuf, ConfigError> {
    let invalid = |message: &str| ConfigError::Invalid {
        field: "bpf-pin-dir",
        value: path.display().to_string(),
        message: message.into(),
    };
    if !path.is_absolute() {
        return Err(invalid("must be an absolute path"));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid("must not contain `.` or `..` components"))
            }
        }
    }
    if out == Path::new("/") {
        return Err(invalid(
            "must be a directory below / (on a bpf filesystem), not / itself",
        ));
    }
    Ok(out)
}

/// What a pinned map must look like for this agent to reuse it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} map, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The layout this agent's kernel programs use for a pinned map.
pub fn expected_layout(name: &str) -> Option<Layout> {
    let size = |n: usize| n as u32;
    match name {
        "SERVICE_ADDRS" => Some(Layout {
            map_type: MapType::Hash,
            key_size: size(std::mem::size_of::<EndpointKey>()),
            value_size: size(std::mem::size_of::<Balanced>()),
            max_entries: MAX_BALANCED,
        }),
        "BACKENDS" => Some(Layout {
            map_type: MapType::Array,
            key_size: 4,
            value_size: size(std::mem::size_of::<EndpointKey>()),
            max_entries: MAX_SERVICES * MAX_BACKENDS,
        }),
        _ => None,
    }
}

/// What the pin directory held for the load balancer's maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapsFound {
    /// Maps of this layout: the agent reuses them, state intact.
    Reused,
    /// No usable maps (first start, another layout version, a mismatch): new ones are made.
    Fresh,
}

/// The agent's pin directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    _lock: File,
}

impl PinDir {
    /// Creates the directory on bpffs if needed and takes its lock. A previous agent that still
    /// holds it (a rolling update that starts the new agent first) is waited for.
    pub fn open(path: &Path) -> Result<Self, PinError> {
        ensure_on_bpffs(path)?;
        std::fs::create_dir_all(path).map_err(io(path))?;
        let lock = File::open(path).map_err(io(path))?;
        // Before the async runtime starts: nothing else waits on this thread.
        let mut tries: u64 = 0;
        while !try_lock(&lock).map_err(io(path))? {
            if tries.is_multiple_of(300) {
                tracing::warn!(path = %path.display(), "another surge-agent holds the pin directory; waiting for it to exit");
            }
            std::thread::sleep(Duration::from_millis(100));
            tries += 1;
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This agent's map directory: its layout version is part of the name.
    pub fn maps_dir(&self) -> PathBuf {
        self.path.join(format!("{LB_DIR_PREFIX}{LB_LAYOUT_VERSION}"))
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Keeps the pinned maps this agent can reuse and unpins every other one (other layout
    /// versions, a layout that does not match, a partial set), with a log line saying why. An
    /// unpinned map lives on while the previous agent's hooks use it.
    pub fn prepare_maps(&self) -> Result<MapsFound, PinError> {
        let own = self.maps_dir();
        for dir in self.lb_dirs()? {
            if dir != own {
                tracing::warn!(
                    old = %dir.display(), new = %own.display(),
                    "the pinned load-balancer maps have another layout version: this agent starts with new maps; the previous agent's hooks keep routing with the old ones until this agent has its watch set"
                );
                remove_known(&dir, &LB_MAPS)?;
            }
        }
        let mut usable = 0;
        let mut problems = Vec::new();
        for name in LB_MAPS {
            let path = self.map_path(name);
            if !path.exists() {
                continue;
            }
            let want = expected_layout(name).ok_or_else(|| PinError::Io {
                path: path.clone(),
                source: std::io::Error::other("unknown map"),
            })?;
            match pinned_layout(&path) {
                Ok(found) if found == want => usable += 1,
                Ok(found) => problems.push(format!("{name}: pinned {found}; needed {want}")),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        if usable == LB_MAPS.len() {
            return Ok(MapsFound::Reused);
        }
        if usable > 0 || !problems.is_empty() {
            tracing::warn!(
                dir = %own.display(), problems = %problems.join("; "), found = usable,
                "the pinned load-balancer maps cannot be reused: this agent starts with new maps; the previous agent's hooks keep routing with the old ones until this agent has its watch set"
            );
        }
        remove_known(&own, &LB_MAPS)?;
        std::fs::create_dir_all(&own).map_err(io(&own))?;
        Ok(MapsFound::Fresh)
    }

    /// The link pins present now (previous agents' hooks), with their generation.
    pub fn link_pins(&self) -> Result<Vec<(PathBuf, u64)>, PinError> {
        let dir = self.path.join(LINKS_DIR);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            match parse_link_name(&name) {
                Some((_, generation)) => out.push((e.path(), generation)),
                None => tracing::warn!(path = %e.path().display(), "not a surge link pin; left alone"),
            }
        }
        out.sort_by_key(|(_, g)| *g);
        Ok(out)
    }

    /// Where this agent pins `hook`: a generation after every pin present.
    pub fn link_path(&self, hook: &str, generation: u64) -> PathBuf {
        self.path.join(LINKS_DIR).join(format!("{hook}-{generation}"))
    }

    /// The `lb-v*` directories present.
    fn lb_dirs(&self) -> Result<Vec<PathBuf>, PinError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.path).map_err(io(&self.path))? {
            let e = e.map_err(io(&self.path))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name
                .strip_prefix(LB_DIR_PREFIX)
                .is_some_and(|v| v.parse::<u32>().is_ok())
            {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Removes a link pin and detaches the link before returning: the pin's own reference is
/// released by deferred kernel work, so the link is opened first, and closing that last
/// descriptor detaches it at once. A pin that is not a link is just removed.
pub fn unpin_link(path: &Path) -> std::io::Result<()> {
    match aya::programs::links::PinnedLink::from_pin(path) {
        Ok(link) => {
            drop(link.unpin()?);
            Ok(())
        }
        Err(_) => std::fs::remove_file(path),
    }
}

/// `connect4-7` → ("connect4", 7).
pub fn parse_link_name(name: &str) -> Option<(&str, u64)> {
    let (hook, generation) = name.rsplit_once('-')?;
    HOOKS
        .contains(&hook)
        .then_some(())
        .and_then(|_| generation.parse().ok())
        .map(|g| (hook, g))
}

/// The generation after the ones present.
pub fn next_generation(present: &[(PathBuf, u64)]) -> u64 {
    present.iter().map(|(_, g)| *g).max().map_or(1, |g| g + 1)
}

/// What `--cleanup` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches the pinned hooks and removes the pinned maps under `path`, then the directories if
/// nothing else is in them. Refuses while an agent runs with the directory. Only what the agent
/// pins is removed: anything else found there is left alone and named.
pub fn cleanup(path: &Path) -> Result<Removed, PinError> {
    let mut removed = Removed::default();
    if !path.exists() {
        return Ok(removed);
    }
    if !is_bpffs(path) {
        return Err(PinError::NotBpffs {
            path: path.to_path_buf(),
        });
    }
    let lock = File::open(path).map_err(io(path))?;
    if !try_lock(&lock).map_err(io(path))? {
        return Err(PinError::Busy {
            path: path.to_path_buf(),
        });
    }
    let pins = PinDir {
        path: path.to_path_buf(),
        _lock: lock,
    };
    // Hooks first: once they are gone nothing uses the maps.
    for (link, _) in pins.link_pins()? {
        unpin_link(&link).map_err(io(&link))?;
        removed.links += 1;
    }
    remove_empty_dir(&path.join(LINKS_DIR))?;
    for dir in pins.lb_dirs()? {
        removed.maps += remove_known(&dir, &LB_MAPS)?;
        remove_empty_dir(&dir)?;
    }
    remove_empty_dir(path)?;
    Ok(removed)
}

/// Removes the pins `names` in `dir` (if there); returns how many there were.
fn remove_known(dir: &Path, names: &[&str]) -> Result<usize, PinError> {
    let mut n = 0;
    for name in names {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    remove_empty_dir(dir)?;
    Ok(n)
}

/// Removes `dir` if it exists and is empty; names what is left otherwise.
fn remove_empty_dir(dir: &Path) -> Result<(), PinError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            let left: Vec<String> = std::fs::read_dir(dir)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            tracing::warn!(dir = %dir.display(), left = ?left, "not removed: it holds pins that are not surge's");
            Ok(())
        }
        Err(e) => Err(io(dir)(e)),
    }
}

/// Takes an exclusive flock without waiting; false if someone else holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn pinned_layout(path: &Path) -> Result<Layout, aya::maps::MapError> {
    let info = MapInfo::from_pin(path)?;
    Ok(Layout {
        map_type: info.map_type()?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    })
}

/// The directory, or the nearest ancestor that exists, is on bpffs: nothing is created elsewhere.
fn ensure_on_bpffs(path: &Path) -> Result<(), PinError> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        Ok(())
    } else {
        Err(PinError::NotBpffs {
            path: path.to_path_buf(),
        })
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills a struct we own from a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_carry_the_hook_and_generation() {
        assert_eq!(parse_link_name("connect4-7"), Some(("connect4", 7)));
        assert_eq!(parse_link_name("connect6-12"), Some(("connect6", 12)));
        assert_eq!(parse_link_name("connect4"), None);
        assert_eq!(parse_link_name("other-1"), None);
        assert_eq!(parse_link_name("connect4-x"), None);
        let present = vec![(PathBuf::from("a"), 3), (PathBuf::from("b"), 9)];
        assert_eq!(next_generation(&present), 10);
        assert_eq!(next_generation(&[]), 1);
    }

    #[test]
    fn the_expected_layouts_match_the_shared_types() {
        let addrs = expected_layout("SERVICE_ADDRS").expect("known");
        assert_eq!((addrs.key_size, addrs.value_size), (20, 16));
        let backends = expected_layout("BACKENDS").expect("known");
        assert_eq!((backends.key_size, backends.value_size), (4, 20));
        assert_eq!(expected_layout("COUNTERS"), None);
        assert_eq!(
            backends.to_string(),
            format!(
                "Array map, key 4 B, value 20 B, {} entries",
                MAX_SERVICES * MAX_BACKENDS
            )
        );
    }

    #[test]
    fn a_path_off_bpffs_is_refused_and_nothing_is_created() {
        let dir = std::env::temp_dir().join(format!("surge-pins-test-{}", std::process::id()));
        let err = PinDir::open(&dir.join("x")).unwrap_err();
        assert!(matches!(err, PinError::NotBpffs { .. }), "{err}");
        assert!(!dir.exists());
        assert_eq!(cleanup(&dir).expect("nothing to do"), Removed::default());
    }
}
