//! The agent refuses to run where it cannot work, with one line that names what is missing and
//! how to fix it, and rejects bad settings naming the field. Needs root (to get past the
//! privilege check to the later ones).

use std::{os::unix::fs::PermissionsExt, path::Path};

use surge_tests::harness::{bin, require_root, run_to_end, scratch};

/// Runs the agent with `args` and returns (exit code, stderr without trailing newline).
fn agent(args: &[&str]) -> (i32, String) {
    let (code, _out, err) = run_to_end(&bin("surge-agent"), args);
    (code, err.trim_end().to_string())
}

/// A copy of /proc/mounts without the filesystems of the given types.
fn mounts_without(dir: &Path, types: &[&str]) -> String {
    let text = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !types.iter().any(|t| l.split_whitespace().nth(2) == Some(t)))
        .collect();
    let path = dir.join(format!("mounts-without-{}", types.join("-")));
    std::fs::write(&path, kept.join("\n") + "\n").expect("write mounts");
    path.display().to_string()
}

#[test]
fn without_root_it_says_which_privileges_it_needs() {
    require_root();
    // A copy nobody can run, outside any private directory.
    let dir = scratch("noroot");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let copy = dir.join("surge-agent");
    std::fs::copy(bin("surge-agent"), &copy).expect("copy");
    let copy_arg = copy.display().to_string();
    let (code, _out, err) = run_to_end(
        Path::new("/usr/bin/setpriv"),
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            &copy_arg,
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        "surge-agent: missing privileges: the agent needs root, or the capabilities CAP_BPF, CAP_PERFMON, \
         CAP_NET_ADMIN and CAP_SYS_RESOURCE (run it as root, or grant them in the DaemonSet's securityContext)"
    );
}

#[test]
fn without_btf_it_names_the_file_and_the_kernel_option() {
    require_root();
    let (code, err) = agent(&["--btf", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        "surge-agent: kernel BTF not found at /nonexistent/vmlinux: No such file or directory (os error 2) \
         (the kernel needs CONFIG_DEBUG_INFO_BTF=y; or pass --btf with a BTF file for this kernel)"
    );
}

#[test]
fn without_cgroup_v2_it_says_how_to_mount_one() {
    require_root();
    let dir = scratch("nocgroup2");
    let mounts = mounts_without(&dir, &["cgroup2"]);
    let (code, err) = agent(&["--mounts-file", &mounts]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "surge-agent: no cgroup v2 hierarchy is mounted ({mounts} lists none): mount one with \
             `mount -t cgroup2 none /sys/fs/cgroup`, or pass --cgroup-root"
        )
    );
    let (code, err) = agent(&["--cgroup-root", "/proc"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        "surge-agent: /proc is not a cgroup v2 directory: pass --cgroup-root with the cgroup2 mount point \
         (see `grep cgroup2 /proc/mounts`)"
    );
}

#[test]
fn when_tracefs_cannot_be_mounted_it_says_how_to_mount_it() {
    require_root();
    let dir = scratch("notracefs");
    let mounts = mounts_without(&dir, &["tracefs"]);
    let (code, err) = agent(&["--mounts-file", &mounts, "--tracefs", "/nonexistent/tracing"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        "surge-agent: tracefs is not mounted and mounting it at /nonexistent/tracing failed: No such file or \
         directory (os error 2) (mount it with `mount -t tracefs nodev /sys/kernel/tracing`, or pass --tracefs)"
    );
}

#[test]
fn bad_flags_and_files_name_the_field() {
    let (code, err) = agent(&["--report-interval", "10ms"]);
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            "surge-agent: report-interval = 10ms, must be between 100ms and 60s"
        )
    );

    let (code, err) = agent(&["--report-interval", "soon"]);
    assert_eq!(code, 2, "clap's usage error: {err}");
    assert!(
        err.starts_with("error: invalid value 'soon' for '--report-interval <REPORT_INTERVAL>'"),
        "{err}"
    );

    let dir = scratch("badconfig");
    let file = dir.join("agent.yaml");
    std::fs::write(&file, "scaler: http://127.0.0.1:1\nreport_intervall: 1s\n").expect("write");
    let file_arg = file.display().to_string();
    let (code, err) = agent(&["--config", &file_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "surge-agent: config file {file_arg}: unknown field `report_intervall`, expected one of"
        )),
        "{err}"
    );

    let (code, err) = agent(&["--config", "/nonexistent/agent.yaml"]);
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            "surge-agent: config file /nonexistent/agent.yaml: No such file or directory (os error 2)"
        )
    );
}

#[test]
fn a_pin_dir_that_is_not_usable_is_named_and_nothing_is_created() {
    require_root();
    let (code, err) = agent(&["--bpf-pin-dir", "surge"]);
    assert_eq!(
        (code, err.as_str()),
        (
            1,
            "surge-agent: bpf-pin-dir = \"surge\": must be an absolute path"
        )
    );
    let dir = scratch("pin-dir-off-bpffs");
    let off = dir.join("pins");
    let off_arg = off.display().to_string();
    let (code, err) = agent(&["--bpf-pin-dir", &off_arg]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "surge-agent: {off_arg} is not on a bpf filesystem: mount one with `mount -t bpf bpffs /sys/fs/bpf`, \
             or pass --bpf-pin-dir with a directory on a bpffs mount"
        )
    );
    assert!(!off.exists(), "nothing created off bpffs");
    // The cleanup of a directory that does not exist has nothing to do.
    let (code, err) = agent(&["--cleanup", "--bpf-pin-dir", &off_arg]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_scaler_rejects_bad_services_naming_the_field() {
    let (code, _out, err) = run_to_end(&bin("surge-scaler"), &["--observe", "web=127.0.0.1:99999"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        "surge-scaler: --observe.endpoints[0] = \"127.0.0.1:99999\": must be IP:PORT, [IPv6]:PORT, or :PORT for \
         any local address, with a port from 1 to 65535"
    );
}

#[test]
fn a_bad_kubernetes_setting_or_kubeconfig_is_named() {
    require_root();
    let (code, err) = agent(&["--kubernetes", "yes"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        "surge-agent: SURGE_KUBERNETES = \"yes\": must be true, false or auto"
    );
    let (code, err) = agent(&["--kubernetes", "true", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("surge-agent: kubeconfig /nonexistent/kubeconfig: "),
        "{err}"
    );
}
