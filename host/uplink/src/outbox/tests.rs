use std::time::Duration;

use outpost_store::Store;
use tokio_util::sync::CancellationToken;

use super::*;

fn message(topic: &str, priority: Priority, payload: &str) -> Message {
    Message {
        message_id: crate::contract::message_id(),
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        priority,
        retain: false,
        ttl: None,
    }
}

async fn open(
    dir: &tempfile::TempDir,
    limits: OutboxLimits,
) -> (
    Store,
    Outbox,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
    let shutdown = CancellationToken::new();
    let (outbox, writer) = Outbox::open(store.clone(), limits, shutdown.clone())
        .await
        .unwrap();
    (store, outbox, shutdown, writer)
}

async fn close(store: Store, shutdown: CancellationToken, writer: tokio::task::JoinHandle<()>) {
    shutdown.cancel();
    writer.await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn delivers_in_priority_order_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    outbox
        .enqueue(message("t/1", Priority::Telemetry, "a"))
        .await
        .unwrap();
    outbox
        .enqueue(message("s/1", Priority::State, "b"))
        .await
        .unwrap();
    outbox
        .enqueue(message("t/2", Priority::Telemetry, "c"))
        .await
        .unwrap();
    outbox
        .enqueue(message("c/1", Priority::Control, "d"))
        .await
        .unwrap();
    close(store, shutdown, writer).await;

    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    assert_eq!(outbox.stats().queued, 4);
    assert_eq!(outbox.stats().bytes, 4);
    let all = outbox.fetch(&mut [0; 3], 10).await.unwrap();
    let topics: Vec<&str> = all.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["c/1", "s/1", "t/1", "t/2"]);
    // Cursors skip what was taken; a limit cuts across classes in order.
    let mut cursors = [0i64; 3];
    for m in &all[..2] {
        cursors[m.priority as usize] = m.seq;
    }
    let rest = outbox.fetch(&mut cursors, 1).await.unwrap();
    assert_eq!(rest[0].topic, "t/1");
    // Only acknowledged messages leave.
    outbox
        .ack(vec![all[0].seq, all[2].seq, 999_999])
        .await
        .unwrap();
    assert_eq!(outbox.stats().queued, 2);
    assert_eq!(outbox.stats().delivered, 2);
    close(store, shutdown, writer).await;

    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let left: Vec<String> = outbox
        .fetch(&mut [0; 3], 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(left, ["s/1", "t/2"]);
    assert_eq!(outbox.stats().delivered, 2, "counters persist");
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn a_full_outbox_refuses_telemetry_and_counts_it_but_keeps_room_for_results() {
    let dir = tempfile::tempdir().unwrap();
    let limits = OutboxLimits {
        max_messages: 20,
        max_bytes: 1 << 20,
        default_ttl: Duration::from_secs(60),
    };
    let (store, outbox, shutdown, writer) = open(&dir, limits).await;
    for i in 0..20 {
        outbox
            .enqueue(message("t", Priority::Telemetry, &i.to_string()))
            .await
            .unwrap();
    }
    let err = outbox
        .enqueue(message("t", Priority::Telemetry, "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::Full {
                queued: 20,
                max_messages: 20,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("the outbox is full"), "{err}");
    // A batch is all or nothing.
    let batch = vec![
        message("t", Priority::Telemetry, "y"),
        message("t", Priority::Telemetry, "z"),
    ];
    assert!(outbox.enqueue_all(batch).await.is_err());
    assert_eq!(outbox.stats().refused, 3);
    assert_eq!(
        outbox.stats().queued,
        20,
        "nothing was dropped to make room"
    );
    // Results use the reserve (a tenth: 2 here), then are refused too.
    outbox
        .enqueue(message("r", Priority::State, "1"))
        .await
        .unwrap();
    outbox
        .enqueue(message("r", Priority::Control, "2"))
        .await
        .unwrap();
    assert!(
        outbox
            .enqueue(message("r", Priority::State, "3"))
            .await
            .is_err()
    );
    // An oversized payload is refused by size, not counted as "full".
    let mut big = message("t", Priority::Telemetry, "");
    big.payload = vec![b'x'; crate::contract::MAX_PAYLOAD + 1];
    assert!(matches!(
        outbox.enqueue(big).await,
        Err(OutboxError::TooLarge { .. })
    ));
    close(store, shutdown, writer).await;

    // The refused count was saved.
    let (store, outbox, shutdown, writer) = open(&dir, limits).await;
    assert_eq!(outbox.stats().refused, 4);
    assert_eq!(outbox.stats().queued, 22);
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn expired_messages_are_dropped_counted_and_never_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let mut short = message("short", Priority::Telemetry, "gone");
    short.ttl = Some(Duration::from_millis(1));
    outbox.enqueue(short).await.unwrap();
    outbox
        .enqueue(message("long", Priority::Telemetry, "kept"))
        .await
        .unwrap();
    // The expired one is invisible at once, and the sweep counts it.
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = outbox.fetch(&mut [0; 3], 10).await.unwrap();
        if seen.len() == 1 && outbox.stats().expired == 1 {
            break;
        }
        tokio::time::sleep(SWEEP_EVERY / 5).await;
    }
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].topic, "long");
    assert_eq!(outbox.stats().expired, 1);
    assert_eq!(outbox.stats().queued, 1);
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn a_message_id_is_queued_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let m = message("t", Priority::Telemetry, "same");
    outbox.enqueue(m.clone()).await.unwrap();
    outbox.enqueue(m).await.unwrap();
    assert_eq!(outbox.fetch(&mut [0; 3], 10).await.unwrap().len(), 1);
    assert_eq!(outbox.stats().queued, 1);
    close(store, shutdown, writer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let commits_before = commit_count(&store).await;
    let mut tasks = Vec::new();
    for w in 0..64 {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                outbox
                    .enqueue(message("t", Priority::Telemetry, &format!("{w}-{i}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(outbox.stats().queued, 3200);
    let commits = commit_count(&store).await - commits_before;
    assert!(
        commits < 3200,
        "{commits} commits for 3200 messages: no grouping"
    );
    // Commits in flight together keep their order: the publisher gets every message
    // once, in seq order.
    let mut cursors = [0i64; 3];
    let mut seqs = Vec::new();
    loop {
        let batch = outbox.fetch(&mut cursors, 100).await.unwrap();
        if batch.is_empty() {
            break;
        }
        seqs.extend(batch.iter().map(|m| m.seq));
    }
    assert_eq!(seqs.len(), 3200);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order");
    close(store, shutdown, writer).await;
}

/// SQLite's count of write transactions on this connection is not exposed; the WAL frame
/// count is a proxy: every commit appends at least one frame.
async fn commit_count(store: &Store) -> i64 {
    store
        .call(|conn| {
            Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                row.get::<_, i64>(1)
            })?)
        })
        .await
        .unwrap()
}

fn topics_of(batch: &[Queued]) -> Vec<&str> {
    batch.iter().map(|m| m.topic.as_str()).collect()
}

#[tokio::test]
async fn fresh_commits_come_from_memory_and_a_reconnect_reads_the_unacknowledged_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    for (topic, class) in [
        ("t/1", Priority::Telemetry),
        ("t/2", Priority::Telemetry),
        ("c/1", Priority::Control),
    ] {
        outbox.enqueue(message(topic, class, "x")).await.unwrap();
    }
    let mut cursors = [0i64; 3];
    let first = outbox.fetch(&mut cursors, 10).await.unwrap();
    assert_eq!(topics_of(&first), ["c/1", "t/1", "t/2"]);
    outbox
        .enqueue(message("t/3", Priority::Telemetry, "x"))
        .await
        .unwrap();
    let second = outbox.fetch(&mut cursors, 10).await.unwrap();
    assert_eq!(topics_of(&second), ["t/3"]);
    assert!(outbox.fetch(&mut cursors, 10).await.unwrap().is_empty());

    // Only t/1 was acknowledged; a new connection starts its cursors at zero.
    outbox.ack(vec![first[1].seq]).await.unwrap();
    let mut cursors = [0i64; 3];
    let again = outbox.fetch(&mut cursors, 10).await.unwrap();
    assert_eq!(topics_of(&again), ["c/1", "t/2", "t/3"]);
    outbox
        .enqueue(message("t/4", Priority::Telemetry, "x"))
        .await
        .unwrap();
    let fresh = outbox.fetch(&mut cursors, 10).await.unwrap();
    assert_eq!(topics_of(&fresh), ["t/4"]);
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn an_overflowing_memory_tail_loses_nothing_and_keeps_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let big = "y".repeat(64 * 1024);
    let count = MIRROR_BYTES / big.len() + 40;
    for i in 0..count {
        outbox
            .enqueue(message(&format!("t/{i}"), Priority::Telemetry, &big))
            .await
            .unwrap();
    }
    // The oldest were dropped from memory: the publisher reads them from SQLite and
    // then switches to memory, in order, each exactly once.
    let mut cursors = [0i64; 3];
    let mut seen = Vec::new();
    loop {
        let batch = outbox.fetch(&mut cursors, 64).await.unwrap();
        if batch.is_empty() {
            break;
        }
        seen.extend(batch.into_iter().map(|m| m.topic));
    }
    let expected: Vec<String> = (0..count).map(|i| format!("t/{i}")).collect();
    assert_eq!(seen, expected);
    close(store, shutdown, writer).await;
}

#[test]
fn acknowledged_seqs_are_deleted_in_runs() {
    assert_eq!(
        runs(vec![7, 3, 4, 5, 9, 8, 12, 4]),
        [(3, 5), (7, 9), (12, 12)]
    );
    assert!(runs(Vec::new()).is_empty());
}

#[tokio::test]
async fn a_failed_commit_reports_its_real_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    // A temporary trigger on the store's own connection makes every insert fail the
    // way a constraint or a full disk would: with SQLite's own message.
    store
        .call(|conn| {
            conn.execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.outbox \
                 BEGIN SELECT RAISE(ABORT, 'database or disk is full (injected)'); END;",
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let err = outbox
        .enqueue(message("t", Priority::Telemetry, "{}"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("database or disk is full (injected)"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        matches!(&err, OutboxError::Store(StoreError::Shared(cause)) if matches!(**cause, StoreError::Sqlite(_))),
        "{err:?}"
    );
    // Nothing was queued, and the outbox works again once the cause is gone.
    assert_eq!(outbox.stats().queued, 0);
    store
        .call(|conn| Ok(conn.execute_batch("DROP TRIGGER temp.refuse")?))
        .await
        .unwrap();
    outbox
        .enqueue(message("t", Priority::Telemetry, "{}"))
        .await
        .unwrap();
    assert_eq!(outbox.stats().queued, 1);
    close(store, shutdown, writer).await;
}

/// A device with a lane of its own: its telemetry, lobby events and reported state are
/// read by its connection only, the rest by the gateway's; reopened without the lane,
/// what waited in it goes through the gateway instead of nowhere.
#[tokio::test]
async fn a_devices_lane_is_read_by_its_connection_only_and_returns_to_the_gateway() {
    use crate::contract::topics;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("outpost.db")).await.unwrap();
    let shutdown = CancellationToken::new();
    let lanes = std::collections::BTreeSet::from(["esp-1".to_owned()]);
    let (outbox, writer) = Outbox::open_with_lanes(
        store.clone(),
        OutboxLimits::default(),
        lanes,
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert!(outbox.has_lane("esp-1") && !outbox.has_lane("esp-2"));
    let mut commits = outbox.lane_commits();
    commits.borrow_and_update();
    outbox
        .enqueue_all(vec![
            message(
                &topics::telemetry("gw", "esp-1"),
                Priority::Telemetry,
                "own-t",
            ),
            message(&topics::lobby("gw", "esp-1"), Priority::State, "own-l"),
            message(
                &topics::telemetry("gw", "esp-2"),
                Priority::Telemetry,
                "gw-t",
            ),
            message(
                &topics::claim_report("gw", "esp-1"),
                Priority::Control,
                "gw-c",
            ),
        ])
        .await
        .unwrap();
    assert!(
        commits.has_changed().unwrap(),
        "the lane's connection is woken"
    );
    let payloads = |batch: Vec<Queued>| -> Vec<String> {
        batch
            .iter()
            .map(|q| String::from_utf8(q.payload.to_vec()).unwrap())
            .collect()
    };
    assert_eq!(
        payloads(outbox.fetch(&mut [0; 3], 10).await.unwrap()),
        ["gw-c", "gw-t"]
    );
    let mut cursors = [0; 3];
    let own = outbox.fetch_lane("esp-1", &mut cursors, 10).await.unwrap();
    let seqs: Vec<i64> = own.iter().map(|q| q.seq).collect();
    assert_eq!(payloads(own), ["own-l", "own-t"]);
    assert!(
        outbox
            .fetch_lane("esp-1", &mut cursors, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        outbox
            .fetch_lane("esp-2", &mut [0; 3], 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Acknowledged in its lane: gone; the other waits there until its connection or a
    // reopen without the lane.
    outbox.ack(vec![seqs[0]]).await.unwrap();
    close(store, shutdown, writer).await;

    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    assert!(!outbox.has_lane("esp-1"));
    assert_eq!(
        payloads(outbox.fetch(&mut [0; 3], 10).await.unwrap()),
        ["gw-c", "own-t", "gw-t"]
    );
    close(store, shutdown, writer).await;
}
