//! CPU time per service from the sched_switch tracepoint: the time since this CPU's last switch
//! belongs to the task switching out, which is the current task; it is charged to the service of
//! that task's cgroup (v2), if the agent attributed one.

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns};

use crate::{
    counters,
    maps::{counters_of, CGROUPS, LAST_SWITCH},
};

#[inline(always)]
pub fn on_switch() -> Result<(), i64> {
    // SAFETY: helpers with no arguments.
    let (now, cgroup) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id()) };
    let slot = LAST_SWITCH.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: this CPU's copy; sched_switch never nests on one CPU.
    let last = unsafe { core::mem::replace(&mut *slot, now) };
    if last == 0 {
        return Ok(());
    }
    // SAFETY: the value is copied out at once.
    let Some(service_id) = (unsafe { CGROUPS.get(&cgroup).copied() }) else {
        return Ok(());
    };
    let c = counters_of(service_id).ok_or(-1i64)?;
    counters::add_u64(&mut c.cpu_ns, now.saturating_sub(last));
    Ok(())
}
