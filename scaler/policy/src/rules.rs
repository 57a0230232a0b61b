//! ecommerce-style step rules (`scaleUpRules`/`scaleDownRules` with `evaluationPeriods`) and `cooldown`.
//!
//! Each evaluation (one per `pollingInterval`) an up rule whose metric is above its threshold,
//! or a down rule whose metric is below it, extends its streak; a rule fires once its streak
//! reaches `evaluationPeriods`. Up rules win over down rules; among firing rules the largest
//! `scaleBy` applies. Cooldowns: no scale-up within `cooldown.scaleUp` of the last scale-up, no
//! scale-down within `cooldown.scaleDown` of the last change in either direction.

use crate::config::{Cooldown, Policy};
use crate::decision::{Decision, Limit};
use crate::metric::Metric;
use crate::time::Timestamp;

/// Rule streaks.
#[derive(Clone, Debug, Default)]
pub struct RulesState {
    up: Vec<u32>,
    down: Vec<u32>,
}

impl RulesState {
    /// State for `p`'s rules.
    pub fn new(p: &Policy) -> Self {
        RulesState {
            up: vec![0; p.scale_up_rules.len()],
            down: vec![0; p.scale_down_rules.len()],
        }
    }

    /// One evaluation: the count the rules ask for from `current`. `value` gives the metric's
    /// value for this evaluation (`None` when unknown, which breaks the streak).
    pub fn evaluate(&mut self, p: &Policy, current: u32, value: impl Fn(&Metric) -> Option<f64>) -> u32 {
        self.up.resize(p.scale_up_rules.len(), 0);
        self.down.resize(p.scale_down_rules.len(), 0);
        let mut up_by = 0;
        for (rule, streak) in p.scale_up_rules.iter().zip(self.up.iter_mut()) {
            *streak = match value(&rule.metric) {
                Some(v) if v > rule.threshold => streak.saturating_add(1),
                _ => 0,
            };
            if *streak >= rule.evaluation_periods {
                up_by = up_by.max(rule.scale_by);
            }
        }
        let mut down_by = 0;
        for (rule, streak) in p.scale_down_rules.iter().zip(self.down.iter_mut()) {
            *streak = match value(&rule.metric) {
                Some(v) if v < rule.threshold => streak.saturating_add(1),
                _ => 0,
            };
            if *streak >= rule.evaluation_periods {
                down_by = down_by.max(rule.scale_by);
            }
        }
        if up_by > 0 {
            current.saturating_add(up_by)
        } else {
            current.saturating_sub(down_by)
        }
    }
}

/// When the count last changed.
#[derive(Clone, Debug, Default)]
pub struct CooldownState {
    last_up: Option<Timestamp>,
    last_change: Option<Timestamp>,
}

impl CooldownState {
    /// Holds `desired` at `current` while the matching cooldown runs.
    pub fn apply(&self, c: &Cooldown, now: Timestamp, current: u32, desired: u32, d: &mut Decision) -> u32 {
        let mut v = desired;
        let running = |since: Option<Timestamp>, len| since.is_some_and(|t: Timestamp| now.since(t) < len);
        if desired > current && running(self.last_up, c.scale_up) {
            v = d.clip(Limit::ScaleUpCooldown, v, current);
        } else if desired < current && running(self.last_change, c.scale_down) {
            v = d.clip(Limit::ScaleDownCooldown, v, current);
        }
        v
    }

    /// Notes a change of the count.
    pub fn record_change(&mut self, now: Timestamp, from: u32, to: u32) {
        if to != from {
            self.last_change = Some(now);
        }
        if to > from {
            self.last_up = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{parse_policy, Defaults};

    const ECOMMERCE: &str = "policy:\n  name: ecommerce\n  scaleUpRules:\n    - {metric: http_requests_per_second, threshold: 1000, scaleBy: 2, evaluationPeriods: 3}\n    - {metric: cpu_usage, threshold: 85, scaleBy: 1, evaluationPeriods: 2}\n  scaleDownRules:\n    - {metric: http_requests_per_second, threshold: 200, scaleBy: 1, evaluationPeriods: 5}\n  cooldown: {scaleUp: 180s, scaleDown: 300s}\n";

    #[test]
    fn evaluation_periods_and_scale_by() {
        let p = parse_policy(ECOMMERCE, &Defaults::default(), "x").expect("valid");
        let mut r = RulesState::new(&p);
        let vals = |rps: f64, cpu: f64| {
            move |m: &Metric| match m {
                Metric::Rps => Some(rps),
                Metric::Cpu => Some(cpu),
                _ => None,
            }
        };
        // rps above 1000 for 3 evaluations → +2; cpu above 85 for 2 → +1.
        assert_eq!(r.evaluate(&p, 3, vals(1500.0, 50.0)), 3);
        assert_eq!(r.evaluate(&p, 3, vals(1500.0, 90.0)), 3);
        assert_eq!(r.evaluate(&p, 3, vals(1500.0, 90.0)), 5);
        // A dip breaks the rps streak; cpu alone gives +1.
        assert_eq!(r.evaluate(&p, 5, vals(900.0, 90.0)), 6);
        // Down: below 200 rps for 5 evaluations → −1.
        let mut r = RulesState::new(&p);
        for _ in 0..4 {
            assert_eq!(r.evaluate(&p, 5, vals(100.0, 10.0)), 5);
        }
        assert_eq!(r.evaluate(&p, 5, vals(100.0, 10.0)), 4);
        // Unknown values break streaks.
        assert_eq!(r.evaluate(&p, 5, |_| None), 5);
    }

    #[test]
    fn cooldowns() {
        let c = Cooldown {
            scale_up: Duration::from_secs(180),
            scale_down: Duration::from_secs(300),
        };
        let mut s = CooldownState::default();
        let t = Timestamp::from_secs;
        assert_eq!(s.apply(&c, t(0), 3, 5, &mut Decision::default()), 5);
        s.record_change(t(0), 3, 5);
        let mut d = Decision::default();
        assert_eq!(s.apply(&c, t(179), 5, 7, &mut d), 5);
        assert_eq!(d.clipped_by, Some(Limit::ScaleUpCooldown));
        assert_eq!(s.apply(&c, t(180), 5, 7, &mut Decision::default()), 7);
        assert_eq!(s.apply(&c, t(299), 5, 4, &mut Decision::default()), 5);
        assert_eq!(s.apply(&c, t(300), 5, 4, &mut Decision::default()), 4);
    }
}
