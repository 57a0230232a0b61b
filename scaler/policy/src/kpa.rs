//! The Knative Pod Autoscaler decider: stable/panic pod counts, rate limits, panic mode, scale-down delay.
//!
//! Follows `knative.dev/serving/pkg/autoscaler/scaling/autoscaler.go` (`Scale`): counts are
//! `ceil(window average / target)`, clipped to `[floor(ready / max-scale-down-rate),
//! ceil(ready × max-scale-up-rate)]` with ready taken as at least 1; panic starts when the panic
//! count reaches `panic-threshold-percentage` of ready, is extended while it stays there, and
//! ends once a whole stable window has passed without it; while panicking the count never goes
//! down.

use crate::config::KpaConfig;
use crate::decision::{Decision, Limit};
use crate::time::Timestamp;
use crate::window::Extremum;

/// Per-service KPA state.
#[derive(Clone, Debug, Default)]
pub struct KpaState {
    panic_time: Option<Timestamp>,
    max_panic_pods: u32,
    delay: Extremum,
}

impl KpaState {
    /// Fresh state.
    pub fn new() -> Self {
        KpaState {
            panic_time: None,
            max_panic_pods: 0,
            delay: Extremum::max(),
        }
    }

    /// Whether panic mode is on.
    pub fn panicking(&self) -> bool {
        self.panic_time.is_some()
    }

    /// The count limits allowed from `ready` pods: (lowest, highest). ±1 is always allowed.
    pub fn rate_bounds(cfg: &KpaConfig, ready: u32) -> (u32, u32) {
        let r = f64::from(ready.max(1));
        let up = (cfg.max_scale_up_rate * r).ceil().min(f64::from(u32::MAX)) as u32;
        let down = (r / cfg.max_scale_down_rate).floor() as u32;
        let r = ready.max(1);
        (down.min(r - 1), up.max(r.saturating_add(1)))
    }

    /// One decision. `stable_pods`/`panic_pods` are the unclipped counts the stable and panic
    /// windows ask for (largest over the triggers). Records its limits on `d`.
    pub fn scale(
        &mut self,
        cfg: &KpaConfig,
        now: Timestamp,
        stable_pods: u32,
        panic_pods: u32,
        ready: u32,
        d: &mut Decision,
    ) -> u32 {
        let (lo, hi) = Self::rate_bounds(cfg, ready);
        let clip = |v: u32| v.clamp(lo, hi);
        let over = f64::from(panic_pods) / f64::from(ready.max(1)) >= cfg.panic_threshold_percentage / 100.0;
        match self.panic_time {
            _ if over => self.panic_time = Some(now),
            Some(t) if t + cfg.stable_window < now => {
                self.panic_time = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }
        let mut want = stable_pods;
        if self.panicking() {
            want = want.max(panic_pods);
        }
        let mut desired = want;
        let limit = if want > hi {
            Limit::MaxScaleUpRate
        } else {
            Limit::MaxScaleDownRate
        };
        desired = d.clip(limit, desired, clip(want));
        if self.panicking() {
            self.max_panic_pods = self.max_panic_pods.max(desired);
            desired = d.clip(Limit::PanicHold, desired, self.max_panic_pods);
        }
        if !cfg.scale_down_delay.is_zero() {
            let delayed = self.delay.observe(now, desired, cfg.scale_down_delay);
            desired = d.clip(Limit::ScaleDownDelay, desired, delayed);
        }
        desired
    }
}

#[cfg(test)]
mod tests;
