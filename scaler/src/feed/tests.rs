use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn tick(seq: u64, at: u64) -> Tick {
    Tick { seq, at: ms(at) }
}

#[test]
fn the_first_take_is_the_current_tick() {
    let feed = Feed::default();
    let early = feed.subscribe(Duration::ZERO);
    assert_eq!(
        early.take(ms(0)),
        Some(Taken {
            tick: tick(0, 0),
            missed: 0
        })
    );
    feed.publish(ms(100));
    let late = feed.subscribe(Duration::ZERO);
    assert_eq!(
        late.take(ms(150)),
        Some(Taken {
            tick: tick(1, 100),
            missed: 0
        })
    );
    assert_eq!(late.take(ms(150)), None);
}

#[test]
fn a_stalled_subscriber_keeps_only_the_newest_and_counts_the_rest() {
    let feed = Feed::default();
    let fast = feed.subscribe(Duration::ZERO);
    let stalled = feed.subscribe(Duration::ZERO);
    fast.take(ms(0));
    stalled.take(ms(0));
    for i in 1..=10 {
        feed.publish(ms(100 * i));
        // The fast one takes every tick and misses none.
        assert_eq!(
            fast.take(ms(100 * i)),
            Some(Taken {
                tick: tick(i, 100 * i),
                missed: 0
            })
        );
    }
    // The stalled one gets the newest, and the 9 it never saw.
    assert_eq!(
        stalled.take(ms(1000)),
        Some(Taken {
            tick: tick(10, 1000),
            missed: 9
        })
    );
    assert_eq!(stalled.take(ms(1000)), None);
    feed.publish(ms(1100));
    assert_eq!(
        stalled.take(ms(1100)),
        Some(Taken {
            tick: tick(11, 1100),
            missed: 0
        })
    );
}

#[test]
fn ticks_inside_the_minimum_interval_are_coalesced_not_missed() {
    let feed = Feed::default();
    let sub = feed.subscribe(ms(1000));
    sub.take(ms(0));
    assert_eq!(sub.due(), ms(1000));
    for i in 1..=9 {
        feed.publish(ms(100 * i));
    }
    // Taken on time at 1000: the newest, nothing missed.
    feed.publish(ms(1000));
    assert_eq!(
        sub.take(ms(1000)),
        Some(Taken {
            tick: tick(10, 1000),
            missed: 0
        })
    );
    // Now due at 2000; the subscriber is late: ticks due but replaced are missed.
    for i in 11..=25 {
        feed.publish(ms(100 * i));
    }
    // 1100..1900 were coalesced; 2000..2400 were due, and all but the newest were replaced.
    assert_eq!(
        sub.take(ms(2500)),
        Some(Taken {
            tick: tick(25, 2500),
            missed: 5
        })
    );
}

#[test]
fn publishing_never_waits_and_forgets_dropped_subscribers() {
    let feed = Feed::default();
    let subs: Vec<_> = (0..100).map(|_| feed.subscribe(Duration::ZERO)).collect();
    assert_eq!(feed.subscribers(), 100);
    // Nobody reads: ten thousand publishes return at once and keep one tick per subscriber.
    for i in 0..10_000 {
        feed.publish(ms(i));
    }
    assert_eq!(
        subs[7].take(ms(10_000)).map(|t| (t.tick.seq, t.missed)),
        Some((10_000, 10_000))
    );
    drop(subs);
    feed.publish(ms(10_001));
    assert_eq!(feed.subscribers(), 0);
}

#[tokio::test]
async fn changed_wakes_on_a_publish() {
    let feed = Arc::new(Feed::default());
    let sub = feed.subscribe(Duration::ZERO);
    sub.take(ms(0));
    let f = Arc::clone(&feed);
    let publisher = tokio::spawn(async move {
        tokio::task::yield_now().await;
        f.publish(ms(5));
    });
    tokio::time::timeout(Duration::from_secs(5), sub.changed())
        .await
        .expect("woken");
    publisher.await.expect("publisher");
    assert_eq!(sub.take(ms(5)).map(|t| t.tick.seq), Some(1));
}
