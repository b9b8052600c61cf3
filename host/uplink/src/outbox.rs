//! The durable outbox: every message for the cloud is committed to SQLite before anyone
//! is told "accepted", and deleted only after the broker's QoS 1 acknowledgement.
//!
//! * **Group commit.** Writers hand their messages to one writer task, which commits
//!   everything that queued up while the previous commit ran in a single transaction, so
//!   the fsync per commit does not cap throughput.
//! * **Bounded.** By message count and payload bytes. Telemetry is refused at the limit
//!   with [`OutboxError::Full`] and counted; control and state messages (registrations,
//!   claims, results) may use a reserve of a tenth beyond it, so a telemetry flood never
//!   crowds out a deployment result.
//! * **Time to live.** Each message expires (default 7200 s, as Azure IoT Edge); expired
//!   messages are deleted and counted, never sent.
//! * **Priorities.** [`Priority::Control`] before [`Priority::State`] before
//!   [`Priority::Telemetry`]; in order of writing within a class.
//! * **Lanes.** A device with a cloud identity of its own (see [`Outbox::open_with_lanes`])
//!   has its telemetry and state in a lane of its own, which only its connection reads
//!   ([`Outbox::fetch_lane`]); everything else is the gateway's lane ([`Outbox::fetch`]).
//!   A lane that cannot deliver holds back nothing of the others'.
//! * **Groups.** The telemetry of one group commit is stored as rows of up to
//!   [`MAX_GROUP`] messages (per lane and time to live), not a row per message: each
//!   message keeps its own id, is published on its own and acknowledged on its own, but
//!   SQLite inserts and deletes one row and its index entries per group. A group row is
//!   deleted once all its messages are acknowledged; after a reconnect or a restart, its
//!   messages not yet acknowledged go again (those acknowledged in this process do not).
//!   Message ids are deduplicated per row: a telemetry id is minted fresh per record by
//!   the gateway ([`crate::contract::message_id`]), so only the other classes' ids, which
//!   callers may repeat, need it, and those are never grouped.
//! * **Paced while connected.** While a publisher drains the gateway's lane
//!   ([`Outbox::pacing`]), new telemetry waits (at most [`PACE_WAIT`]) while more than
//!   the pacing bound of committed messages are not yet published: ingest that outruns
//!   the broker would otherwise only grow a queue, and every record's latency with it.
//!   With the uplink down nothing waits: the outbox is for outages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use outpost_store::rusqlite::params;
use outpost_store::{Store, StoreError};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::now_millis;

/// How much of the limits control and state messages may use beyond them.
const RESERVE_DIVISOR: u64 = 10;
/// The most messages one commit takes.
const BATCH: usize = 4096;
/// How often expired messages are swept (also while the uplink is down).
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Payload bytes the in-memory tail of fresh commits may hold (see [`Mirror`]).
const MIRROR_BYTES: usize = 16 * 1024 * 1024;
/// Bits of a message's key that number it within its row (the rest is the row's seq).
const GROUP_BITS: u32 = 7;
/// The most messages one row holds (the schema checks it too).
pub const MAX_GROUP: usize = 1 << GROUP_BITS;
/// The most payload bytes one group row holds (a group closes at this size).
const MAX_GROUP_BYTES: usize = 1024 * 1024;

/// The longest a telemetry write waits for the publisher to catch up (then it is queued
/// anyway; see [`Outbox::pacing`]).
pub const PACE_WAIT: Duration = Duration::from_secs(1);

/// The key of message `index` of row `row`: keys sort as the messages were written.
fn key(row: i64, index: usize) -> i64 {
    (row << GROUP_BITS) | index as i64
}

/// The row of a key, and the message's place in it.
fn split(key: i64) -> (i64, usize) {
    (key >> GROUP_BITS, (key & (MAX_GROUP as i64 - 1)) as usize)
}

/// A key past every message of row `row`.
fn row_end(row: i64) -> i64 {
    key(row, MAX_GROUP - 1)
}

/// Delivery class; lower goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Registrations, claims, command results.
    Control = 0,
    /// Lobby events, reported state, deployment results.
    State = 1,
    /// Device telemetry.
    Telemetry = 2,
}

impl Priority {
    /// All classes, in delivery order.
    pub const ALL: [Priority; 3] = [Priority::Control, Priority::State, Priority::Telemetry];

    /// The class's name in stats and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::State => "state",
            Self::Telemetry => "telemetry",
        }
    }
}

/// The outbox's bounds.
#[derive(Clone, Copy, Debug)]
pub struct OutboxLimits {
    /// Messages held at most (telemetry; control and state get a tenth more).
    pub max_messages: u64,
    /// Payload bytes held at most (likewise).
    pub max_bytes: u64,
    /// Time to live of a message that names none.
    pub default_ttl: Duration,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            max_messages: 1_000_000,
            max_bytes: 512 * 1024 * 1024,
            default_ttl: Duration::from_secs(7200),
        }
    }
}

/// A message to queue.
#[derive(Clone, Debug)]
pub struct Message {
    /// Unique id (also inside the payload) so the cloud can de-duplicate.
    pub message_id: String,
    /// The MQTT topic.
    pub topic: String,
    /// The payload (JSON per the contract).
    pub payload: Vec<u8>,
    /// Its class.
    pub priority: Priority,
    /// Publish retained.
    pub retain: bool,
    /// Time to live; `None` takes the default.
    pub ttl: Option<Duration>,
}

/// A queued message, as the publisher takes it.
#[derive(Clone, Debug)]
pub struct Queued {
    /// Its key in the outbox: its row and its place in the row's group, in the order of
    /// writing (the acknowledgement names it).
    pub seq: i64,
    /// The message's unique id (a dialect may carry it beside the payload).
    pub message_id: String,
    /// The MQTT topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// Publish retained.
    pub retain: bool,
    /// Its class.
    pub priority: Priority,
    /// When it expires (unix milliseconds): MQTT 5 tells the broker.
    pub expires_at: i64,
}

/// What the outbox holds and has done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    /// Messages waiting.
    pub queued: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Messages refused because the outbox was full (since the database was created).
    pub refused: u64,
    /// Messages dropped because their time to live ran out.
    pub expired: u64,
    /// Messages acknowledged by the broker.
    pub delivered: u64,
    /// The message limit.
    pub max_messages: u64,
    /// The byte limit.
    pub max_bytes: u64,
    /// Telemetry writes waiting now for the publisher to catch up (paced: see
    /// [`Outbox::pacing`]); each waits at most a second.
    pub paced: u64,
    /// Database commits that wrote or acknowledged messages, since start: each takes all
    /// the writes and acknowledgements queued by then (a group commit), so against
    /// the messages written it shows how well writes share commits.
    pub commits: u64,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outbox is at its limit; nothing was queued.
    #[error(
        "the outbox is full ({queued} messages, {bytes} bytes queued; limits {max_messages} \
         messages, {max_bytes} bytes): the message was refused and counted. It drains when \
         the uplink delivers; raise the [outbox] limits (max_messages, max_size_mib) if this is \
         normal for the site"
    )]
    Full {
        /// Messages queued.
        queued: u64,
        /// Bytes queued.
        bytes: u64,
        /// The message limit.
        max_messages: u64,
        /// The byte limit.
        max_bytes: u64,
    },
    /// One payload is larger than the contract allows.
    #[error("a {size}-byte payload is larger than the {max} bytes the cloud contract allows")]
    TooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The database failed; nothing was queued.
    #[error("the outbox could not write to the state database: {0}")]
    Store(#[from] StoreError),
    /// The outbox was shut down.
    #[error("the outbox is shut down")]
    Closed,
}

struct Write {
    messages: Vec<Message>,
    bytes: u64,
    done: oneshot::Sender<Result<(), OutboxError>>,
}

/// What the writer task commits: new messages, and deletions of acknowledged ones. Both
/// kinds that queued up while the previous commit ran share one transaction (one fsync).
enum Work {
    Write(Write),
    Ack {
        /// Rows of one message (deleted only if they are that: `batch = 1`).
        singles: Vec<i64>,
        /// Group rows whose every message is acknowledged.
        groups: Vec<i64>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// A group row being delivered: how many messages it holds and which are acknowledged.
struct Partial {
    size: usize,
    acked: u128,
}

#[derive(Default)]
struct Usage {
    messages: u64,
    bytes: u64,
}

/// The freshest committed messages of the gateway's lane, kept in memory so the
/// publisher need not read back what was just written: per class, **every** committed
/// row of that lane with `seq > floor` is here, in order. Serving a message pops it and raises the floor to it; when the bytes
/// exceed [`MIRROR_BYTES`] the oldest are dropped the same way. A publisher whose cursor
/// is below the floor (after a reconnect, a restart, or an overflow) reads SQLite
/// instead until it catches up. SQLite stays the only record: nothing is deleted or
/// acknowledged here.
#[derive(Default)]
struct Mirror {
    classes: [VecDeque<Live>; 3],
    floor: [i64; 3],
    bytes: usize,
    /// The publisher reads the class from SQLite (below the floor: after a reconnect, a
    /// restart, an overflow): a backlog it catches up on, which pacing does not wait for.
    behind: [bool; 3],
}

struct Live {
    queued: Queued,
    expires_at: i64,
    /// Messages in its row.
    group: usize,
}

impl Mirror {
    fn push(&mut self, live: Live) {
        let class = live.queued.priority as usize;
        self.bytes += live.queued.payload.len();
        self.classes[class].push_back(live);
        while self.bytes > MIRROR_BYTES {
            // Drop the oldest of the largest class; its floor rises past it.
            let Some(fullest) = (0..3).max_by_key(|c| self.classes[*c].len()) else {
                break;
            };
            let Some(dropped) = self.classes[fullest].pop_front() else {
                break;
            };
            self.take(fullest, &dropped);
        }
    }

    /// Notes whether a publisher at `cursor` is behind the tail in class `c`; true when
    /// it just fell behind (paced writers need not wait for it any more).
    fn set_behind(&mut self, c: usize, cursor: i64) -> bool {
        let behind = cursor < self.floor[c];
        let fell = behind && !self.behind[c];
        self.behind[c] = behind;
        fell
    }

    /// Messages held (committed, not yet served).
    fn len(&self) -> usize {
        self.classes.iter().map(VecDeque::len).sum()
    }

    fn take(&mut self, class: usize, live: &Live) {
        // `seq` is the message's key; the floor is in keys too.
        self.bytes -= live.queued.payload.len();
        self.floor[class] = self.floor[class].max(live.queued.seq);
    }
}

struct Inner {
    store: Store,
    limits: OutboxLimits,
    /// The devices with a lane of their own.
    lanes: std::collections::BTreeSet<String>,
    /// Counts commits that wrote to a device's lane (their connections wait on it).
    lane_commits: watch::Sender<u64>,
    usage: Mutex<Usage>,
    mirror: Mutex<Mirror>,
    /// Group rows served and not yet wholly acknowledged.
    partial: Mutex<std::collections::HashMap<i64, Partial>>,
    /// The pacing bound in unpublished messages (0: not pacing).
    pace: std::sync::atomic::AtomicUsize,
    /// Signalled when the publisher takes messages, or pacing ends.
    served: Notify,
    /// Writers waiting for the publisher now.
    paced: std::sync::atomic::AtomicUsize,
    writes: mpsc::Sender<Work>,
    ready: Notify,
    refused_unsaved: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    delivered: AtomicU64,
    /// Group commits that wrote or acknowledged messages, since start.
    commits: AtomicU64,
}

/// The outbox handle; clones share one writer.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Outbox {
    /// Opens the outbox on `store` and starts its writer, which runs until `shutdown`
    /// (then commits what it was handed and ends). Await the returned handle before
    /// closing the store.
    pub async fn open(
        store: Store,
        limits: OutboxLimits,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        Self::open_with_lanes(store, limits, std::collections::BTreeSet::new(), shutdown).await
    }

    /// As [`open`](Self::open), with a lane for each of `lanes` (device ids): their
    /// telemetry, lobby events and reported state ([`contract::lane_device`]) are
    /// fetched with [`fetch_lane`](Self::fetch_lane) only. Rows of a lane no longer
    /// configured go back to the gateway's lane, so nothing waits for a connection
    /// that will never come.
    ///
    /// [`contract::lane_device`]: crate::contract::lane_device
    pub async fn open_with_lanes(
        store: Store,
        limits: OutboxLimits,
        lanes: std::collections::BTreeSet<String>,
        shutdown: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let kept: Vec<String> = lanes.iter().cloned().collect();
        let (messages, bytes, high, refused, expired, delivered) = store
            .call(move |conn| {
                let returned = {
                    let mut lanes = conn.prepare("SELECT DISTINCT lane FROM outbox WHERE lane != ''")?;
                    let found = lanes
                        .query_map([], |row| row.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut returned = 0;
                    for lane in found.iter().filter(|lane| !kept.contains(lane)) {
                        returned += conn.execute("UPDATE outbox SET lane = '' WHERE lane = ?1", [lane])?;
                    }
                    returned
                };
                if returned > 0 {
                    tracing::info!(messages = returned, "messages of devices without an identity of their own any more go through the gateway");
                }
                let (messages, bytes, high): (i64, i64, i64) = conn.query_row(
                    "SELECT coalesce(sum(batch), 0), \
                     coalesce(sum(coalesce(payload_bytes, length(payload))), 0), \
                     coalesce(max(seq), 0) FROM outbox",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )?;
                let counter = |name: &str| -> Result<i64, StoreError> {
                    Ok(conn.query_row(
                        "SELECT value FROM outbox_counters WHERE name = ?1",
                        [name],
                        |row| row.get(0),
                    )?)
                };
                Ok((
                    messages,
                    bytes,
                    high,
                    counter("refused")?,
                    counter("expired")?,
                    counter("delivered")?,
                ))
            })
            .await?;
        let (writes, inbox) = mpsc::channel(BATCH * 4);
        let inner = Arc::new(Inner {
            store,
            limits,
            lanes,
            lane_commits: watch::Sender::new(0),
            usage: Mutex::new(Usage {
                messages: to_u64(messages),
                bytes: to_u64(bytes),
            }),
            // What is queued already is in SQLite only.
            mirror: Mutex::new(Mirror {
                floor: [row_end(high); 3],
                ..Mirror::default()
            }),
            partial: Mutex::new(std::collections::HashMap::new()),
            pace: std::sync::atomic::AtomicUsize::new(0),
            served: Notify::new(),
            paced: std::sync::atomic::AtomicUsize::new(0),
            writes,
            ready: Notify::new(),
            refused_unsaved: AtomicU64::new(0),
            refused: AtomicU64::new(to_u64(refused)),
            expired: AtomicU64::new(to_u64(expired)),
            delivered: AtomicU64::new(to_u64(delivered)),
            commits: AtomicU64::new(0),
        });
        let writer = tokio::spawn(writer(Arc::clone(&inner), inbox, shutdown));
        Ok((Self { inner }, writer))
    }

    /// Queues one message durably: returns once it is committed.
    pub async fn enqueue(&self, message: Message) -> Result<(), OutboxError> {
        self.enqueue_all(vec![message]).await
    }

    /// Queues several messages durably, all or none.
    pub async fn enqueue_all(&self, messages: Vec<Message>) -> Result<(), OutboxError> {
        if messages.is_empty() {
            return Ok(());
        }
        for message in &messages {
            if message.payload.len() > crate::contract::MAX_PAYLOAD {
                return Err(OutboxError::TooLarge {
                    size: message.payload.len(),
                    max: crate::contract::MAX_PAYLOAD,
                });
            }
        }
        let count = messages.len() as u64;
        let bytes: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
        let reserve_allowed = messages.iter().all(|m| m.priority != Priority::Telemetry);
        // Before anything is reserved: a writer dropped while it waits holds nothing.
        // Telemetry of a device with a lane of its own is not the gateway publisher's.
        if !reserve_allowed && messages.iter().any(|m| !self.laned(m)) {
            self.pace().await;
        }
        if let Err(full) = self.reserve(count, bytes, reserve_allowed) {
            for message in &messages {
                metrics::counter!(crate::metrics::OUTBOX_REFUSED, "priority" => message.priority.name())
                    .increment(1);
            }
            return Err(full);
        }
        let (done, answer) = oneshot::channel();
        let sent = self
            .inner
            .writes
            .send(Work::Write(Write {
                messages,
                bytes,
                done,
            }))
            .await;
        if sent.is_err() {
            self.release(count, bytes);
            return Err(OutboxError::Closed);
        }
        answer.await.map_err(|_| OutboxError::Closed)?
    }

    /// Paces a telemetry write while a publisher drains the gateway's lane: it waits,
    /// at most [`PACE_WAIT`], while the committed messages not yet published reach the
    /// bound. Holding the guard keeps pacing on; dropping it (the connection ended)
    /// releases every waiting writer.
    pub fn pacing(&self, backlog: usize) -> Pacing {
        // A new connection starts below the floor (its cursors at zero): behind until it
        // has read what SQLite holds.
        self.inner.mirror.lock().expect("outbox mirror lock").behind = [true; 3];
        self.inner.pace.store(backlog.max(1), Ordering::Relaxed);
        Pacing {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Whether `message` goes in a device's lane of its own.
    fn laned(&self, message: &Message) -> bool {
        !self.inner.lanes.is_empty()
            && crate::contract::lane_device(&message.topic)
                .is_some_and(|device| self.inner.lanes.contains(device))
    }

    async fn pace(&self) {
        /// Counts a waiting writer while it waits (also when its future is dropped).
        struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let backlogged = || {
            let bound = self.inner.pace.load(Ordering::Relaxed);
            bound != 0 && {
                let mirror = self.inner.mirror.lock().expect("outbox mirror lock");
                !mirror.behind[Priority::Telemetry as usize] && mirror.len() >= bound
            }
        };
        // Most writes find no backlog: they go on without registering for a wake-up.
        if !backlogged() {
            return;
        }
        let deadline = tokio::time::Instant::now() + PACE_WAIT;
        let mut counted = None;
        loop {
            let served = self.inner.served.notified();
            tokio::pin!(served);
            served.as_mut().enable();
            // Looked at again once registered, so a wake-up in between is not missed.
            if !backlogged() {
                break;
            }
            if counted.is_none() {
                self.inner.paced.fetch_add(1, Ordering::Relaxed);
                counted = Some(Counted(&self.inner.paced));
            }
            if tokio::time::timeout_at(deadline, served).await.is_err() {
                break;
            }
        }
    }

    fn reserve(&self, count: u64, bytes: u64, reserve_allowed: bool) -> Result<(), OutboxError> {
        let limits = &self.inner.limits;
        let (max_messages, max_bytes) = if reserve_allowed {
            (
                limits.max_messages + limits.max_messages / RESERVE_DIVISOR,
                limits.max_bytes + limits.max_bytes / RESERVE_DIVISOR,
            )
        } else {
            (limits.max_messages, limits.max_bytes)
        };
        let mut usage = self.inner.usage.lock().expect("outbox usage lock");
        if usage.messages + count > max_messages || usage.bytes + bytes > max_bytes {
            let full = OutboxError::Full {
                queued: usage.messages,
                bytes: usage.bytes,
                max_messages: limits.max_messages,
                max_bytes: limits.max_bytes,
            };
            drop(usage);
            self.inner.refused.fetch_add(count, Ordering::Relaxed);
            self.inner
                .refused_unsaved
                .fetch_add(count, Ordering::Relaxed);
            return Err(full);
        }
        usage.messages += count;
        usage.bytes += bytes;
        Ok(())
    }

    fn release(&self, count: u64, bytes: u64) {
        self.inner.release(count, bytes);
    }

    /// Waits until something new was committed since the last call (or returns at once
    /// if that happened already).
    pub async fn committed(&self) {
        self.inner.ready.notified().await;
    }

    /// Up to `limit` unexpired messages of the gateway's lane in delivery order, after
    /// `cursors[class]` in each class, and advances the cursors past what it returns (and past what it found
    /// nothing beyond). The publisher keeps the cursors; all zero after a reconnect
    /// starts over from the oldest unacknowledged message.
    pub async fn fetch(
        &self,
        cursors: &mut [i64; 3],
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        self.fetch_from("", cursors, limit).await
    }

    /// As [`fetch`](Self::fetch), for the lane of the device `lane` (read from SQLite:
    /// a device's own connection carries a device's traffic, not a flood).
    pub async fn fetch_lane(
        &self,
        lane: &str,
        cursors: &mut [i64; 3],
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        if lane.is_empty() {
            return Ok(Vec::new());
        }
        self.fetch_from(lane, cursors, limit).await
    }

    /// Up to `limit` messages of `lane` ('': the gateway's, served from the mirror when
    /// it can) in delivery order.
    async fn fetch_from(
        &self,
        lane: &str,
        cursors: &mut [i64; 3],
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let mut out = Vec::new();
        for class in Priority::ALL {
            let c = class as usize;
            let want = limit - out.len();
            if want == 0 {
                break;
            }
            if lane.is_empty() && self.take_mirrored(c, &mut cursors[c], want, &mut out) {
                continue;
            }
            let (rows, high) = self.read_class(lane, class, cursors[c], want).await?;
            cursors[c] = cursors[c].max(high);
            out.extend(rows);
            if lane.is_empty() {
                // Caught up with the memory tail, or still behind it.
                let mut mirror = self.inner.mirror.lock().expect("outbox mirror lock");
                if mirror.set_behind(c, cursors[c]) {
                    self.inner.served.notify_waiters();
                }
            }
        }
        Ok(out)
    }

    /// A watch that changes when a commit wrote to some device's lane (the device
    /// connections wait on it, then fetch their own).
    pub fn lane_commits(&self) -> watch::Receiver<u64> {
        self.inner.lane_commits.subscribe()
    }

    /// Whether `device` has a lane of its own.
    pub fn has_lane(&self, device: &str) -> bool {
        self.inner.lanes.contains(device)
    }

    /// Up to `want` unexpired messages of `lane` and `class` after the key `after`, and
    /// the key up to which the class is seen.
    async fn read_class(
        &self,
        lane: &str,
        class: Priority,
        after: i64,
        want: usize,
    ) -> Result<(Vec<Queued>, i64), StoreError> {
        let lane = lane.to_owned();
        let inner = Arc::clone(&self.inner);
        self.inner
            .store
            .call(move |conn| {
                let now = now_millis();
                // The row holding `after` may have messages beyond it. Rows are stepped
                // one at a time and decoded until `want` messages are found.
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, topic, payload, retain, message_id, expires_at, batch FROM outbox \
                     WHERE lane = ?4 AND priority = ?1 AND seq >= ?2 AND expires_at > ?3 \
                     ORDER BY seq",
                )?;
                let (row, index) = split(after);
                let first = if index == MAX_GROUP - 1 { row + 1 } else { row };
                let mut rows = stmt.query(params![class as i64, first, now, lane])?;
                let mut out = Vec::new();
                let mut seen = after;
                let mut full = false;
                'rows: while let Some(row) = rows.next()? {
                    let row = Row::read(row)?;
                    let (seq, retain, expires_at) = (row.seq, row.retain, row.expires_at);
                    let messages = match row.messages() {
                        Ok(messages) => messages,
                        Err(err) => {
                            // Sent again and again it would block the class: it is left
                            // to expire (and be counted) instead.
                            tracing::error!(error = %err, "an outbox row cannot be read; it is skipped");
                            metrics::counter!(crate::metrics::OUTBOX_UNREADABLE).increment(1);
                            seen = seen.max(row_end(seq));
                            continue;
                        }
                    };
                    let size = messages.len();
                    for (index, (message_id, topic, payload)) in messages.into_iter().enumerate() {
                        let k = key(seq, index);
                        if k <= after {
                            continue;
                        }
                        if out.len() == want {
                            full = true;
                            break 'rows;
                        }
                        seen = k;
                        if size > 1 && !inner.serving(seq, size, index) {
                            // Acknowledged already (before a reconnect): not again.
                            continue;
                        }
                        out.push(Queued {
                            seq: k,
                            message_id,
                            topic,
                            payload,
                            retain,
                            priority: class,
                            expires_at,
                        });
                    }
                    seen = seen.max(row_end(seq));
                }
                drop(rows);
                if !full {
                    // Nothing more in this class: everything up to the newest row is seen
                    // (a later insert takes a larger seq).
                    let newest: i64 =
                        conn.query_row("SELECT coalesce(max(seq), 0) FROM outbox", [], |row| {
                            row.get(0)
                        })?;
                    seen = seen.max(row_end(newest));
                }
                Ok((out, seen))
            })
            .await
    }

    /// Serves class `c` from the mirror when it holds everything after `cursor`.
    fn take_mirrored(
        &self,
        c: usize,
        cursor: &mut i64,
        want: usize,
        out: &mut Vec<Queued>,
    ) -> bool {
        let now = now_millis();
        let mut mirror = self.inner.mirror.lock().expect("outbox mirror lock");
        if mirror.set_behind(c, *cursor) {
            self.inner.served.notify_waiters();
        }
        if mirror.behind[c] {
            return false;
        }
        let mut taken = 0;
        if !mirror.classes[c].is_empty() {
            // Writers paced on the backlog look again.
            self.inner.served.notify_waiters();
        }
        while taken < want {
            let Some(live) = mirror.classes[c].pop_front() else {
                break;
            };
            mirror.take(c, &live);
            if live.queued.seq <= *cursor {
                continue;
            }
            *cursor = live.queued.seq;
            if live.expires_at > now {
                if live.group > 1 {
                    let (row, index) = split(live.queued.seq);
                    self.inner.serving(row, live.group, index);
                }
                out.push(live.queued);
                taken += 1;
            }
        }
        true
    }

    /// Deletes acknowledged messages (unknown or already expired keys are ignored; a
    /// group row goes once all its messages are acknowledged); returns once the deletion
    /// is committed. Deletions ride along with the next group commit of new messages: a
    /// deletion lost to a crash only means a redelivery, which the message id lets the
    /// cloud recognise.
    pub async fn ack(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (mut singles, mut groups) = (Vec::new(), Vec::new());
        {
            let mut partial = self.inner.partial.lock().expect("outbox groups lock");
            for seq in seqs {
                let (row, index) = split(seq);
                match partial.get_mut(&row) {
                    Some(group) => {
                        group.acked |= 1u128 << index;
                        if group.acked.count_ones() as usize >= group.size {
                            partial.remove(&row);
                            groups.push(row);
                        }
                    }
                    // Every group row is registered when it is served, so this is a row
                    // of one message (or one gone already); the deletion checks which.
                    None if index == 0 => singles.push(row),
                    None => {}
                }
            }
        }
        if singles.is_empty() && groups.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        self.inner
            .writes
            .send(Work::Ack {
                singles,
                groups,
                done,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The current figures.
    pub fn stats(&self) -> OutboxStats {
        let usage = self.inner.usage.lock().expect("outbox usage lock");
        OutboxStats {
            queued: usage.messages,
            bytes: usage.bytes,
            refused: self.inner.refused.load(Ordering::Relaxed),
            expired: self.inner.expired.load(Ordering::Relaxed),
            delivered: self.inner.delivered.load(Ordering::Relaxed),
            max_messages: self.inner.limits.max_messages,
            max_bytes: self.inner.limits.max_bytes,
            paced: self.inner.paced.load(Ordering::Relaxed) as u64,
            commits: self.inner.commits.load(Ordering::Relaxed),
        }
    }

    /// Messages and payload bytes queued per priority, read from the database (for
    /// `/metrics`; [`stats`](Self::stats) has the totals without a query).
    pub async fn depth(&self) -> Result<Vec<(Priority, u64, u64)>, StoreError> {
        let counted: Vec<(i64, i64, i64)> = self
            .inner
            .store
            .call(|conn| {
                let mut query = conn.prepare_cached(
                    "SELECT priority, sum(batch), \
                     coalesce(sum(coalesce(payload_bytes, length(payload))), 0) FROM outbox \
                     GROUP BY priority",
                )?;
                let rows = query
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(Priority::ALL
            .into_iter()
            .map(|priority| {
                let (_, messages, bytes) = counted
                    .iter()
                    .find(|(p, _, _)| *p == priority as i64)
                    .copied()
                    .unwrap_or_default();
                (priority, to_u64(messages), to_u64(bytes))
            })
            .collect())
    }

    /// The store the outbox writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

/// Keeps [`Outbox::pacing`] on while held.
pub struct Pacing {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacing").finish_non_exhaustive()
    }
}

impl Drop for Pacing {
    fn drop(&mut self) {
        self.inner.pace.store(0, Ordering::Relaxed);
        self.inner.served.notify_waiters();
    }
}

/// A message waiting in the outbox, as [`waiting`] lists it.
#[derive(Clone, Debug)]
pub struct Waiting {
    /// Its id.
    pub message_id: String,
    /// Its topic.
    pub topic: String,
    /// Its lane ('' is the gateway's).
    pub lane: String,
    /// Its payload.
    pub payload: Bytes,
}

/// Every message waiting in the outbox of `store`, in the order of writing within each
/// row's class (reads the whole table: for inspection and tests, not the hot path).
pub async fn waiting(store: &Store) -> Result<Vec<Waiting>, StoreError> {
    let rows = store
        .call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, topic, payload, retain, message_id, expires_at, batch, lane \
                 FROM outbox ORDER BY seq",
            )?;
            let rows = stmt
                .query_map([], |row| Ok((Row::read(row)?, row.get::<_, String>(7)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await?;
    let mut out = Vec::new();
    for (row, lane) in rows {
        for (message_id, topic, payload) in row.messages()? {
            out.push(Waiting {
                message_id,
                topic,
                lane: lane.clone(),
                payload,
            });
        }
    }
    Ok(out)
}

/// A row as read back.
struct Row {
    seq: i64,
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    message_id: String,
    expires_at: i64,
    batch: usize,
}

impl Row {
    /// A row selected as `seq, topic, payload, retain, message_id, expires_at, batch`
    /// (further columns are the caller's).
    fn read(row: &outpost_store::rusqlite::Row<'_>) -> outpost_store::rusqlite::Result<Self> {
        Ok(Self {
            seq: row.get(0)?,
            topic: row.get(1)?,
            payload: row.get(2)?,
            retain: row.get::<_, i64>(3)? != 0,
            message_id: row.get(4)?,
            expires_at: row.get(5)?,
            batch: usize::try_from(row.get::<_, i64>(6)?).unwrap_or(1),
        })
    }

    /// Its messages: id, topic, payload.
    fn messages(self) -> Result<Vec<(String, String, Bytes)>, StoreError> {
        if self.batch <= 1 {
            return Ok(vec![(
                self.message_id,
                self.topic,
                Bytes::from(self.payload),
            )]);
        }
        decode_group(&Bytes::from(self.payload), self.batch).map_err(|detail| StoreError::Decode {
            what: "outbox group",
            detail: format!("row {}: {detail}", self.seq),
        })
    }
}

/// A group's messages, each as id length (u16), id, topic length (u16), topic, payload
/// length (u32), payload; big-endian.
fn encode_group(messages: &[&Message]) -> Vec<u8> {
    let size: usize = messages
        .iter()
        .map(|m| 8 + m.message_id.len() + m.topic.len() + m.payload.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    for message in messages {
        // Ids and topics are short (contract ids, MQTT topics below 64 KiB); payloads are
        // bounded by the contract's MAX_PAYLOAD.
        let id = message.message_id.as_bytes();
        let topic = message.topic.as_bytes();
        out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&id[..id.len().min(usize::from(u16::MAX))]);
        out.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&topic[..topic.len().min(usize::from(u16::MAX))]);
        out.extend_from_slice(
            &u32::try_from(message.payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&message.payload);
    }
    out
}

/// The `count` messages of a group row; the payloads share the row's buffer.
fn decode_group(blob: &Bytes, count: usize) -> Result<Vec<(String, String, Bytes)>, String> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>, String> {
        let end = at
            .checked_add(n)
            .filter(|end| *end <= blob.len())
            .ok_or_else(|| format!("ends at byte {} of {}", blob.len(), *at + n))?;
        let range = *at..end;
        *at = end;
        Ok(range)
    };
    let text = |range: std::ops::Range<usize>, what: &str| {
        String::from_utf8(blob[range].to_vec()).map_err(|_| format!("a {what} is not UTF-8"))
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let n = u16::from_be_bytes(blob[take(&mut at, 2)?].try_into().expect("2 bytes"));
        let id = text(take(&mut at, usize::from(n))?, "message id")?;
        let n = u16::from_be_bytes(blob[take(&mut at, 2)?].try_into().expect("2 bytes"));
        let topic = text(take(&mut at, usize::from(n))?, "topic")?;
        let n = u32::from_be_bytes(blob[take(&mut at, 4)?].try_into().expect("4 bytes"));
        let payload = blob.slice(take(&mut at, n as usize)?);
        out.push((id, topic, payload));
    }
    if at != blob.len() {
        return Err(format!(
            "{} bytes follow its {count} messages",
            blob.len() - at
        ));
    }
    Ok(out)
}

impl Inner {
    /// Registers message `index` of group row `row` (of `size`) as served; false when it
    /// was acknowledged already.
    fn serving(&self, row: i64, size: usize, index: usize) -> bool {
        let mut partial = self.partial.lock().expect("outbox groups lock");
        let group = partial.entry(row).or_insert(Partial { size, acked: 0 });
        group.acked & (1u128 << index) == 0
    }

    fn release(&self, count: u64, bytes: u64) {
        let mut usage = self.usage.lock().expect("outbox usage lock");
        usage.messages = usage.messages.saturating_sub(count);
        usage.bytes = usage.bytes.saturating_sub(bytes);
    }
}

async fn writer(inner: Arc<Inner>, mut inbox: mpsc::Receiver<Work>, shutdown: CancellationToken) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            received = inbox.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
                gather(&mut inbox, &mut batch).await;
                commit(&inner, std::mem::take(&mut batch)).await;
            }
            _ = sweep.tick() => housekeeping(&inner).await,
            () = shutdown.cancelled() => {
                // Commit what was already handed over, then stop taking more.
                inbox.close();
                while inbox.recv_many(&mut batch, BATCH).await > 0 {
                    commit(&inner, std::mem::take(&mut batch)).await;
                }
                housekeeping(&inner).await;
                break;
            }
        }
    }
}

/// Rounds of [`gather`] at most before a commit.
const GATHER_ROUNDS: usize = 4;

/// Before a commit, lets the tasks that are ready to run (requests being answered on this
/// worker) hand over their writes too, while each round still brings more: one commit
/// and one sync for many more of them. No timer: when nothing else is ready the commit
/// goes at once.
async fn gather(inbox: &mut mpsc::Receiver<Work>, batch: &mut Vec<Work>) {
    for _ in 0..GATHER_ROUNDS {
        if batch.len() >= BATCH {
            return;
        }
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < BATCH {
            match inbox.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        if batch.len() == before {
            return;
        }
    }
}

async fn commit(inner: &Arc<Inner>, work: Vec<Work>) {
    let refused = inner.refused_unsaved.swap(0, Ordering::Relaxed);
    let mut dones = Vec::with_capacity(work.len());
    let (mut singles, mut groups) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let mut acks = Vec::new();
    for item in work {
        match item {
            Work::Write(write) => {
                dones.push((write.done, write.messages.len() as u64, write.bytes));
                rows.extend(write.messages);
            }
            Work::Ack {
                singles: one,
                groups: whole,
                done,
            } => {
                singles.extend(one);
                groups.extend(whole);
                acks.push(done);
            }
        }
    }
    let default_ttl = inner.limits.default_ttl;
    // Each row's lane: looked up only where devices have lanes (ingest is the hot path).
    let lanes: Vec<Option<String>> = if inner.lanes.is_empty() {
        Vec::new()
    } else {
        rows.iter()
            .map(|message| {
                crate::contract::lane_device(&message.topic)
                    .filter(|device| inner.lanes.contains(*device))
                    .map(str::to_owned)
            })
            .collect()
    };
    let laned = lanes.iter().any(Option::is_some);
    let units = group(&rows, &lanes);
    let result = inner
        .store
        .call(move |conn| {
            let now = now_millis();
            let tx = conn.transaction()?;
            let mut duplicates = (0u64, 0u64);
            let mut live = Vec::with_capacity(rows.len());
            let mut deleted = (0u64, 0u64);
            if !singles.is_empty() || !groups.is_empty() {
                // A row of one message only if it is that (an unregistered key of a
                // group row must not delete the group); whole groups as they are.
                for (seqs, only_single) in [(singles, true), (groups, false)] {
                    let mut stmt = tx.prepare_cached(if only_single {
                        "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 AND batch = 1 \
                         RETURNING batch, coalesce(payload_bytes, length(payload))"
                    } else {
                        "DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2 \
                         RETURNING batch, coalesce(payload_bytes, length(payload))"
                    })?;
                    for (first, last) in runs(seqs) {
                        let (count, bytes) = count_deleted(stmt.query([first, last])?)?;
                        deleted.0 += count;
                        deleted.1 += bytes;
                    }
                }
                bump(&tx, "delivered", deleted.0)?;
            }
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO outbox (message_id, topic, payload, qos, priority, created_at, \
                     expires_at, retain, lane, batch, payload_bytes) \
                     VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                     ON CONFLICT (message_id) DO NOTHING",
                )?;
                let mut rows: Vec<Option<Message>> = rows.into_iter().map(Some).collect();
                let mut units: VecDeque<Vec<usize>> = units.into();
                while let Some(unit) = units.pop_front() {
                    let first = unit[0];
                    let lane = lanes.get(first).and_then(Option::as_deref);
                    let message = rows[first].as_ref().expect("each message in one unit");
                    let ttl = message.ttl.unwrap_or(default_ttl);
                    let expires =
                        now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
                    let (priority, retain) = (message.priority, message.retain);
                    let inserted = if unit.len() > 1 {
                        let members: Vec<&Message> = unit
                            .iter()
                            .map(|at| rows[*at].as_ref().expect("each message in one unit"))
                            .collect();
                        let bytes: usize = members.iter().map(|m| m.payload.len()).sum();
                        stmt.execute(params![
                            message.message_id,
                            message.topic,
                            encode_group(&members),
                            priority as i64,
                            now,
                            expires,
                            i64::from(retain),
                            lane.unwrap_or(""),
                            unit.len() as i64,
                            bytes as i64,
                        ])?
                    } else {
                        stmt.execute(params![
                            message.message_id,
                            message.topic,
                            message.payload,
                            priority as i64,
                            now,
                            expires,
                            i64::from(retain),
                            lane.unwrap_or(""),
                            1i64,
                            None::<i64>,
                        ])?
                    };
                    if inserted == 0 {
                        if unit.len() > 1 {
                            // A group's first id is queued already: its messages go one
                            // by one, so that each id is checked on its own.
                            for at in unit.into_iter().rev() {
                                units.push_front(vec![at]);
                            }
                            continue;
                        }
                        // Its message id is queued already: the earlier copy stands.
                        let message = rows[first].take().expect("each message in one unit");
                        duplicates.0 += 1;
                        duplicates.1 += message.payload.len() as u64;
                        continue;
                    }
                    if lane.is_some() {
                        // Read from SQLite by its connection; the mirror is the gateway's.
                        continue;
                    }
                    let row = tx.last_insert_rowid();
                    let size = unit.len();
                    for (index, at) in unit.into_iter().enumerate() {
                        let message = rows[at].take().expect("each message in one unit");
                        live.push(Live {
                            queued: Queued {
                                seq: key(row, index),
                                message_id: message.message_id,
                                topic: message.topic,
                                payload: Bytes::from(message.payload),
                                retain,
                                priority,
                                expires_at: expires,
                            },
                            expires_at: expires,
                            group: size,
                        });
                    }
                }
                bump(&tx, "refused", refused)?;
            }
            tx.commit()?;
            Ok((duplicates, live, deleted))
        })
        .await;
    match result {
        Ok(((duplicate_count, duplicate_bytes), live, (deleted, deleted_bytes))) => {
            if duplicate_count > 0 {
                // A message id already queued: the earlier copy stands; give back the room.
                inner.release(duplicate_count, duplicate_bytes);
            }
            inner.release(deleted, deleted_bytes);
            inner.delivered.fetch_add(deleted, Ordering::Relaxed);
            inner.commits.fetch_add(1, Ordering::Relaxed);
            for done in acks {
                let _ = done.send(Ok(()));
            }
            {
                let mut mirror = inner.mirror.lock().expect("outbox mirror lock");
                for message in live {
                    mirror.push(message);
                }
            }
            for (done, _, _) in dones {
                let _ = done.send(Ok(()));
            }
            inner.ready.notify_one();
            if laned {
                inner.lane_commits.send_modify(|commits| *commits += 1);
            }
        }
        Err(err) => {
            inner.refused_unsaved.fetch_add(refused, Ordering::Relaxed);
            tracing::error!(error = %err, "the outbox could not commit");
            // Every caller of this group commit gets the real cause.
            let cause = Arc::new(err);
            for (done, count, bytes) in dones {
                inner.release(count, bytes);
                let _ = done.send(Err(OutboxError::Store(StoreError::Shared(Arc::clone(
                    &cause,
                )))));
            }
            for done in acks {
                let _ = done.send(Err(StoreError::Shared(Arc::clone(&cause))));
            }
        }
    }
}

/// Deletes expired messages and saves the refused count.
async fn housekeeping(inner: &Arc<Inner>) {
    let refused = inner.refused_unsaved.swap(0, Ordering::Relaxed);
    let held = Arc::clone(inner);
    let result = inner
        .store
        .call(move |conn| {
            let tx = conn.transaction()?;
            let mut by_priority = [0u64; Priority::ALL.len()];
            // Messages and bytes gone, and of those the ones acknowledged already (of
            // a group row partly delivered): delivered, not expired.
            let (mut count, mut bytes, mut acked) = (0u64, 0u64, 0u64);
            {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM outbox WHERE expires_at <= ?1 \
                     RETURNING priority, batch, coalesce(payload_bytes, length(payload)), seq",
                )?;
                let mut rows = delete.query([now_millis()])?;
                while let Some(row) = rows.next()? {
                    let (priority, batch, length): (i64, i64, i64) =
                        (row.get(0)?, row.get(1)?, row.get(2)?);
                    let delivered = if batch > 1 {
                        let seq: i64 = row.get(3)?;
                        held.partial
                            .lock()
                            .expect("outbox groups lock")
                            .remove(&seq)
                            .map_or(0, |group| u64::from(group.acked.count_ones()))
                    } else {
                        0
                    };
                    let batch = to_u64(batch);
                    if let Some(slot) = usize::try_from(priority)
                        .ok()
                        .and_then(|p| by_priority.get_mut(p))
                    {
                        *slot += batch - delivered;
                    }
                    count += batch;
                    acked += delivered;
                    bytes += to_u64(length);
                }
            }
            bump(&tx, "expired", count - acked)?;
            bump(&tx, "delivered", acked)?;
            bump(&tx, "refused", refused)?;
            tx.commit()?;
            Ok((count, bytes, acked, by_priority))
        })
        .await;
    match result {
        Ok((count, bytes, acked, by_priority)) => {
            for (priority, expired) in Priority::ALL.into_iter().zip(by_priority) {
                if expired > 0 {
                    metrics::counter!(crate::metrics::OUTBOX_EXPIRED, "priority" => priority.name())
                        .increment(expired);
                }
            }
            if count > 0 {
                inner.release(count, bytes);
                inner.delivered.fetch_add(acked, Ordering::Relaxed);
                let count = count - acked;
                inner.expired.fetch_add(count, Ordering::Relaxed);
                if count > 0 {
                    tracing::warn!(
                        count,
                        "outbox messages expired undelivered (time to live ran out)"
                    );
                }
            }
        }
        Err(err) => {
            inner.refused_unsaved.fetch_add(refused, Ordering::Relaxed);
            tracing::warn!(error = %err, "outbox housekeeping failed");
        }
    }
}

fn bump(conn: &outpost_store::rusqlite::Connection, name: &str, by: u64) -> Result<(), StoreError> {
    if by > 0 {
        conn.prepare_cached("UPDATE outbox_counters SET value = value + ?2 WHERE name = ?1")?
            .execute(params![name, i64::try_from(by).unwrap_or(i64::MAX)])?;
    }
    Ok(())
}

/// Messages and payload bytes a `DELETE … RETURNING batch, <payload bytes>` removed.
fn count_deleted(mut rows: outpost_store::rusqlite::Rows<'_>) -> Result<(u64, u64), StoreError> {
    let (mut count, mut bytes) = (0, 0);
    while let Some(row) = rows.next()? {
        count += to_u64(row.get::<_, i64>(0)?);
        bytes += to_u64(row.get::<_, i64>(1)?);
    }
    Ok((count, bytes))
}

/// What telemetry groups by: its lane (`None`: the gateway's) and time to live.
type GroupKey<'a> = (Option<&'a str>, Option<Duration>);

/// The rows one commit writes, as indexes into `messages` in the order of writing: each
/// telemetry message joins the open group of its lane and time to live (up to
/// [`MAX_GROUP`] messages and [`MAX_GROUP_BYTES`]); every other message is a row of its
/// own. Within a class, lane and time to live the order of writing is kept.
fn group(messages: &[Message], lanes: &[Option<String>]) -> Vec<Vec<usize>> {
    let mut units: Vec<Vec<usize>> = Vec::with_capacity(messages.len().min(64));
    // (lane, ttl) -> (its open unit, payload bytes in it).
    let mut open: std::collections::HashMap<GroupKey<'_>, (usize, usize)> =
        std::collections::HashMap::new();
    for (at, message) in messages.iter().enumerate() {
        if message.priority != Priority::Telemetry || message.retain {
            units.push(vec![at]);
            continue;
        }
        let lane = lanes.get(at).and_then(Option::as_deref);
        let slot = open.entry((lane, message.ttl)).or_insert((usize::MAX, 0));
        let fits = slot.0 != usize::MAX
            && units[slot.0].len() < MAX_GROUP
            && slot.1 + message.payload.len() <= MAX_GROUP_BYTES;
        if fits {
            units[slot.0].push(at);
            slot.1 += message.payload.len();
        } else {
            *slot = (units.len(), message.payload.len());
            units.push(vec![at]);
        }
    }
    units
}

/// `seqs` as sorted runs of consecutive numbers, `(first, last)` inclusive.
fn runs(mut seqs: Vec<i64>) -> Vec<(i64, i64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for seq in seqs {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => out.push((seq, seq)),
        }
    }
    out
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[cfg(test)]
mod tests;
