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

#[tokio::test]
async fn writes_ready_while_the_writer_wakes_share_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    assert_eq!(outbox.stats().commits, 0);
    // One write wakes the writer; 31 more become ready to run just after it (as requests
    // whose bodies arrived together would). The writer lets them run before it commits:
    // one commit, one sync, for all 32.
    let go = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    for i in 1..32 {
        let (outbox, go) = (outbox.clone(), Arc::clone(&go));
        tasks.push(tokio::spawn(async move {
            go.notified().await;
            outbox
                .enqueue(message("t", Priority::Telemetry, &i.to_string()))
                .await
                .unwrap();
        }));
    }
    let first = outbox.clone();
    tasks.push(tokio::spawn(async move {
        let write = first.enqueue(message("t", Priority::Telemetry, "0"));
        tokio::pin!(write);
        // Handed to the writer (now woken), then the others are let go.
        std::future::poll_fn(|cx| {
            assert!(write.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        go.notify_waiters();
        write.await.unwrap();
    }));
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(outbox.stats().queued, 32);
    assert_eq!(
        outbox.stats().commits,
        1,
        "the writes that became ready took commits of their own"
    );
    // A write alone is committed at once (nothing else is ready): a commit of its own.
    outbox
        .enqueue(message("t", Priority::Telemetry, "alone"))
        .await
        .unwrap();
    assert_eq!(outbox.stats().commits, 2);
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

async fn rows_in(store: &Store) -> i64 {
    store
        .call(|conn| Ok(conn.query_row("SELECT count(*) FROM outbox", [], |row| row.get(0))?))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_commits_telemetry_is_one_row_whose_messages_are_delivered_and_acknowledged_each() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let batch: Vec<Message> = (0..5)
        .map(|i| message(&format!("t/{i}"), Priority::Telemetry, &format!("p{i}")))
        .collect();
    let ids: Vec<String> = batch.iter().map(|m| m.message_id.clone()).collect();
    outbox.enqueue_all(batch).await.unwrap();
    outbox
        .enqueue(message("s/1", Priority::State, "state"))
        .await
        .unwrap();
    assert_eq!(
        rows_in(&store).await,
        2,
        "one row for the group, one for the state"
    );
    assert_eq!(outbox.stats().queued, 6);
    assert_eq!(outbox.stats().bytes, 15);

    // Each message on its own, with its own id and payload, in order.
    let mut cursors = [0i64; 3];
    let first = outbox.fetch(&mut cursors, 3).await.unwrap();
    assert_eq!(topics_of(&first), ["s/1", "t/0", "t/1"]);
    let rest = outbox.fetch(&mut cursors, 10).await.unwrap();
    assert_eq!(topics_of(&rest), ["t/2", "t/3", "t/4"]);
    let telemetry: Vec<&Queued> = first[1..].iter().chain(&rest).collect();
    assert_eq!(
        telemetry
            .iter()
            .map(|m| m.message_id.as_str())
            .collect::<Vec<_>>(),
        ids
    );
    assert_eq!(&telemetry[4].payload[..], b"p4");

    // Acknowledging some leaves the row; a reconnect serves only the others again.
    outbox
        .ack(vec![telemetry[0].seq, telemetry[3].seq])
        .await
        .unwrap();
    assert_eq!(rows_in(&store).await, 2);
    assert_eq!(
        outbox.stats().queued,
        6,
        "a group leaves when all of it is acknowledged"
    );
    let again = outbox.fetch(&mut [0; 3], 10).await.unwrap();
    assert_eq!(topics_of(&again), ["s/1", "t/1", "t/2", "t/4"]);
    // A key acknowledged twice, or of a message that is not there, changes nothing.
    outbox
        .ack(vec![telemetry[0].seq, key(9_999, 3)])
        .await
        .unwrap();
    assert_eq!(rows_in(&store).await, 2);

    let last: Vec<i64> = [1, 2, 4].iter().map(|i| telemetry[*i].seq).collect();
    outbox.ack(last).await.unwrap();
    assert_eq!(rows_in(&store).await, 1, "the whole group is acknowledged");
    assert_eq!(outbox.stats().queued, 1);
    assert_eq!(outbox.stats().bytes, 5);
    assert_eq!(outbox.stats().delivered, 5);
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn a_group_survives_a_restart_whole_and_expires_as_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let batch: Vec<Message> = (0..3)
        .map(|i| message(&format!("t/{i}"), Priority::Telemetry, "xx"))
        .collect();
    outbox.enqueue_all(batch).await.unwrap();
    // One of the group was acknowledged before the restart.
    let served = outbox.fetch(&mut [0; 3], 1).await.unwrap();
    outbox.ack(vec![served[0].seq]).await.unwrap();
    close(store, shutdown, writer).await;

    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    assert_eq!(outbox.stats().queued, 3);
    assert_eq!(outbox.stats().bytes, 6);
    // Every message of the group (what was acknowledged before the restart goes again:
    // at least once, the same id).
    let all = outbox.fetch(&mut [0; 3], 10).await.unwrap();
    assert_eq!(topics_of(&all), ["t/0", "t/1", "t/2"]);
    assert_eq!(all[0].message_id, served[0].message_id);
    let listed = waiting(&store).await.unwrap();
    assert_eq!(rows_in(&store).await, 1);
    assert_eq!(listed.len(), 3, "every message is listed, not every row");
    assert_eq!(listed[2].topic, "t/2");

    let short: Vec<Message> = (0..4)
        .map(|i| Message {
            ttl: Some(Duration::from_millis(1)),
            ..message(&format!("e/{i}"), Priority::Telemetry, "yyy")
        })
        .collect();
    outbox.enqueue_all(short).await.unwrap();
    assert_eq!(outbox.stats().queued, 7);
    // The sweep drops the expired group and counts its messages.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while outbox.stats().expired < 4 {
        assert!(std::time::Instant::now() < deadline, "never swept");
        tokio::time::sleep(SWEEP_EVERY / 5).await;
    }
    assert_eq!(outbox.stats().expired, 4);
    assert_eq!(outbox.stats().queued, 3);
    assert_eq!(outbox.stats().bytes, 6);
    close(store, shutdown, writer).await;
}

#[test]
fn groups_are_per_lane_and_time_to_live_and_bounded() {
    let lanes = vec![None, Some("esp-1".to_owned()), None, None, None];
    let mut messages: Vec<Message> = (0..5)
        .map(|i| message(&format!("t/{i}"), Priority::Telemetry, "x"))
        .collect();
    messages[2].priority = Priority::State;
    messages[3].ttl = Some(Duration::from_secs(5));
    assert_eq!(
        group(&messages, &lanes),
        [vec![0, 4], vec![1], vec![2], vec![3]]
    );
    let many: Vec<Message> = (0..MAX_GROUP + 3)
        .map(|i| message(&format!("t/{i}"), Priority::Telemetry, "x"))
        .collect();
    let units = group(&many, &[]);
    assert_eq!(units.len(), 2);
    assert_eq!(units[0].len(), MAX_GROUP);
    let big = "z".repeat(MAX_GROUP_BYTES / 2 + 1);
    let large: Vec<Message> = (0..3)
        .map(|i| message(&format!("t/{i}"), Priority::Telemetry, &big))
        .collect();
    assert_eq!(
        group(&large, &[]).len(),
        3,
        "a group closes at its byte bound"
    );
}

#[test]
fn a_group_row_round_trips_and_a_damaged_one_is_named() {
    let messages: Vec<Message> = (0..3)
        .map(|i| {
            message(
                &format!("topic/{i}"),
                Priority::Telemetry,
                &"p".repeat(i * 100),
            )
        })
        .collect();
    let refs: Vec<&Message> = messages.iter().collect();
    let blob = encode_group(&refs);
    let decoded = decode_group(&Bytes::from(blob.clone()), 3).unwrap();
    for (message, (id, topic, payload)) in messages.iter().zip(&decoded) {
        assert_eq!(id, &message.message_id);
        assert_eq!(topic, &message.topic);
        assert_eq!(&payload[..], &message.payload[..]);
    }
    let cut = decode_group(&Bytes::from(blob[..blob.len() - 1].to_vec()), 3).unwrap_err();
    assert!(cut.contains("ends at byte"), "{cut}");
    let extra = decode_group(&Bytes::from(blob.clone()), 2).unwrap_err();
    assert!(extra.contains("follow its 2 messages"), "{extra}");
    let mut bad = blob;
    bad[2] = 0xff;
    assert!(decode_group(&Bytes::from(bad), 3).is_err());
    // Through the store: a damaged row is a decode error naming it.
    let row = Row {
        seq: 42,
        topic: "t".into(),
        payload: vec![0, 9, b'x'],
        retain: false,
        message_id: "m".into(),
        expires_at: 0,
        batch: 2,
    };
    let err = row.messages().unwrap_err().to_string();
    assert!(
        err.contains("outbox group") && err.contains("row 42"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_is_paced_to_a_draining_publisher_and_never_waits_longer_than_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let telemetry = |n: usize| -> Vec<Message> {
        (0..n)
            .map(|i| message(&format!("t/{i}"), Priority::Telemetry, "x"))
            .collect()
    };
    // Not pacing (no publisher): nothing waits, however much is queued.
    outbox.enqueue_all(telemetry(10)).await.unwrap();
    let mut cursors = [0i64; 3];
    assert_eq!(outbox.fetch(&mut cursors, 100).await.unwrap().len(), 10);

    let pacing = outbox.pacing(4);
    // A new connection is behind until it has read what SQLite holds: not paced yet.
    outbox.enqueue_all(telemetry(4)).await.unwrap();
    let mut cursors = [0i64; 3];
    // (The first ten are not acknowledged: a new connection sends them again.)
    assert_eq!(outbox.fetch(&mut cursors, 100).await.unwrap().len(), 14);
    outbox.enqueue_all(telemetry(4)).await.unwrap();
    // Four committed and not published: the next write waits, at most PACE_WAIT.
    let started = std::time::Instant::now();
    outbox.enqueue_all(telemetry(1)).await.unwrap();
    assert!(started.elapsed() >= PACE_WAIT, "{:?}", started.elapsed());

    // A waiting writer goes on as soon as the publisher takes messages.
    let waiting = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            let started = std::time::Instant::now();
            outbox.enqueue_all(telemetry(1)).await.unwrap();
            started.elapsed()
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while outbox.stats().paced == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never waited"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(outbox.fetch(&mut cursors, 100).await.unwrap().len(), 5);
    let waited = waiting.await.unwrap();
    assert_eq!(
        outbox.stats().paced,
        0,
        "a writer that went on is not counted"
    );
    assert!(
        waited < PACE_WAIT,
        "waited {waited:?} after the publisher took the backlog"
    );

    // Results and state are never paced; neither is anything once pacing ends.
    outbox.enqueue_all(telemetry(8)).await.unwrap();
    let started = std::time::Instant::now();
    outbox
        .enqueue(message("r/1", Priority::Control, "result"))
        .await
        .unwrap();
    drop(pacing);
    outbox.enqueue_all(telemetry(1)).await.unwrap();
    assert!(started.elapsed() < PACE_WAIT, "{:?}", started.elapsed());
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn a_group_whose_first_id_is_queued_already_keeps_its_other_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let repeated = message("t/0", Priority::Telemetry, "a");
    outbox.enqueue(repeated.clone()).await.unwrap();
    let mut batch = vec![repeated];
    batch.extend((1..4).map(|i| message(&format!("t/{i}"), Priority::Telemetry, "b")));
    outbox.enqueue_all(batch).await.unwrap();
    assert_eq!(
        outbox.stats().queued,
        4,
        "the repeated id once, the other three kept"
    );
    let all = outbox.fetch(&mut [0; 3], 10).await.unwrap();
    assert_eq!(topics_of(&all), ["t/0", "t/1", "t/2", "t/3"]);
    close(store, shutdown, writer).await;
}

#[tokio::test]
async fn a_partly_delivered_group_that_expires_counts_what_was_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox, shutdown, writer) = open(&dir, OutboxLimits::default()).await;
    let batch: Vec<Message> = (0..5)
        .map(|i| Message {
            ttl: Some(Duration::from_millis(300)),
            ..message(&format!("t/{i}"), Priority::Telemetry, "x")
        })
        .collect();
    outbox.enqueue_all(batch).await.unwrap();
    let served = outbox.fetch(&mut [0; 3], 10).await.unwrap();
    outbox
        .ack(vec![served[0].seq, served[1].seq])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while outbox.stats().queued > 0 {
        assert!(std::time::Instant::now() < deadline, "never swept");
        tokio::time::sleep(SWEEP_EVERY / 5).await;
    }
    assert_eq!(outbox.stats().delivered, 2);
    assert_eq!(outbox.stats().expired, 3);
    close(store, shutdown, writer).await;
}
