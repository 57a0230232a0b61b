//! Tells consumers (Subscribe streams, KEDA's StreamIsActive) that ingest merged a report. Each
//! subscriber has a one-place slot that keeps only the newest tick and counts the ones it
//! overwrote, so publishing never waits: a slow subscriber misses ticks, nobody else notices.
//! Time is a parameter (`now` from the injected clock).

use std::{
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::sync::Notify;

/// One merged report: its sequence number and when it was merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Merged reports since the scaler started (the first is 1).
    pub seq: u64,
    pub at: Duration,
}

/// What a subscriber takes: the newest tick and the ticks it missed before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub tick: Tick,
    pub missed: u64,
}

#[derive(Debug, Default)]
struct SlotState {
    pending: Option<Tick>,
    missed: u64,
    /// Ticks merged before this instant are inside the subscriber's minimum interval: replacing
    /// one is coalescing what the subscriber asked not to get, not a miss.
    due: Duration,
}

#[derive(Debug)]
struct Slot {
    state: Mutex<SlotState>,
    min_interval: Duration,
    notify: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one short, non-panicking section: the data stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slot {
    fn offer(&self, tick: Tick) {
        let mut s = lock(&self.state);
        if let Some(prev) = s.pending {
            if prev.at >= s.due {
                s.missed += 1;
            }
        }
        s.pending = Some(tick);
        drop(s);
        self.notify.notify_one();
    }
}

#[derive(Debug, Default)]
struct FeedState {
    seq: u64,
    last_at: Duration,
    slots: Vec<Weak<Slot>>,
}

/// The publisher side, shared by ingest and every consumer.
#[derive(Debug, Default)]
pub struct Feed {
    state: Mutex<FeedState>,
}

impl Feed {
    /// Ingest merged a report at `now`. Never waits: takes two short locks per subscriber.
    pub fn publish(&self, now: Duration) {
        let mut s = lock(&self.state);
        s.seq += 1;
        s.last_at = now;
        let tick = Tick { seq: s.seq, at: now };
        s.slots.retain(|w| match w.upgrade() {
            Some(slot) => {
                slot.offer(tick);
                true
            }
            None => false,
        });
    }

    /// A new subscriber whose first take is the current tick (seq 0 before any report), so a
    /// consumer can send the current figures at once.
    pub fn subscribe(&self, min_interval: Duration) -> Subscription {
        let mut s = lock(&self.state);
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                pending: Some(Tick {
                    seq: s.seq,
                    at: s.last_at,
                }),
                ..Default::default()
            }),
            min_interval,
            notify: Notify::new(),
        });
        s.slots.retain(|w| w.strong_count() > 0);
        s.slots.push(Arc::downgrade(&slot));
        Subscription { slot }
    }

    /// Subscribers alive now.
    pub fn subscribers(&self) -> usize {
        lock(&self.state)
            .slots
            .iter()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// The subscriber side; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    slot: Arc<Slot>,
}

impl Subscription {
    /// The newest tick, if one came since the last take. Ticks merged before `now + min_interval`
    /// will then replace each other without counting as missed.
    pub fn take(&self, now: Duration) -> Option<Taken> {
        let mut s = lock(&self.slot.state);
        let tick = s.pending.take()?;
        let missed = std::mem::take(&mut s.missed);
        s.due = now + self.slot.min_interval;
        Some(Taken { tick, missed })
    }

    /// When the subscriber may take again (its minimum interval after the last take).
    pub fn due(&self) -> Duration {
        lock(&self.slot.state).due
    }

    /// Waits until a tick is pending (it may be before `due()`).
    pub async fn changed(&self) {
        loop {
            let notified = self.slot.notify.notified();
            if lock(&self.slot.state).pending.is_some() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests;
