//! What a handler's imports reach during a rollout: the firmware cache (`artifacts`),
//! the device mailbox (`device-channel`) and the store (`state`).
//!
//! Devices pull: a device long-polls `GET /api/v1/devices/{id}/next` and gets the next
//! command a handler sent it (asvin's "next rollout"), then answers it with
//! `POST …/commands/{n}/reply`. A handler's `request` waits for that answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outpost_cache::links::LinkSigner;
use outpost_cache::{BlobBody, FirmwareCache, Sha256};
use outpost_runtime::{
    ArtifactSource, BoxFuture, ChannelError, DeviceChannel, ReadError, StateError, StateStore,
};
use outpost_store::{StateWrite, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

/// Bytes of keys and values each handler may keep.
pub(crate) const STATE_QUOTA: u64 = 64 * 1024;
/// A device that has not polled for this long is treated as disconnected.
const PRESENCE: Duration = Duration::from_secs(60);
/// Download URLs stay valid this long.
const URL_LIFETIME: Duration = Duration::from_secs(3600);

/// A command waiting for its device: what `GET /api/v1/devices/{id}/next` returns, as
/// docs/rollouts.md specifies it (`{id, command, payload?, payloadBase64}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    /// Its number, for the reply.
    pub id: u64,
    /// The handler's command name (`ota-begin`, …).
    pub command: String,
    /// The payload as text when it is UTF-8 (as the handlers we know send JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload in base64, always. (Until this release the gateway sent it as
    /// `payload_base64`, against its own docs: that name is still read, and still sent
    /// beside it, for this one release.)
    #[serde(alias = "payload_base64")]
    pub payload_base64: String,
}

/// [`Pending`] on the wire for this release: the documented form plus the deprecated
/// `payload_base64` copy for devices written against the old field name.
#[derive(Serialize)]
struct PendingWire<'a> {
    #[serde(flatten)]
    pending: &'a Pending,
    #[serde(rename = "payload_base64")]
    legacy_payload_base64: &'a str,
}

impl Pending {
    /// The JSON body sent to the device.
    pub fn to_wire(&self) -> serde_json::Value {
        serde_json::to_value(PendingWire {
            pending: self,
            legacy_payload_base64: &self.payload_base64,
        })
        .expect("serialisable")
    }
}

#[derive(Default)]
struct Slot {
    queue: VecDeque<Pending>,
    replies: HashMap<u64, oneshot::Sender<Result<Vec<u8>, ChannelError>>>,
    notify: Arc<Notify>,
    last_poll: Option<Instant>,
    polling: usize,
}

/// Commands from handlers to devices, and the devices' replies.
pub struct Mailbox {
    slots: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
    firmware_url: String,
    links: LinkSigner,
}

impl Mailbox {
    /// A signed download link to `sha256` for `device_id`, valid for `lifetime`, and
    /// when it expires (unix milliseconds): what devices are handed, and what an
    /// operator asks for to fetch a file by hand.
    pub fn link(&self, sha256: &str, device_id: &str, lifetime: Duration) -> (String, i64) {
        let lifetime = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
        let expires = outpost_store::now_millis().saturating_add(lifetime);
        let url = format!(
            "{}/firmware/{sha256}?{}",
            self.firmware_url,
            self.links.query(sha256, device_id, expires)
        );
        (url, expires)
    }
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

impl Mailbox {
    /// A mailbox whose download URLs point at `firmware_url`, signed by `links`.
    pub fn new(firmware_url: String, links: LinkSigner) -> Arc<Self> {
        Arc::new(Self {
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            firmware_url,
            links,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next command for `device`, waiting up to `wait` for one.
    pub async fn next(&self, device: &str, wait: Duration) -> Option<Pending> {
        let deadline = tokio::time::Instant::now() + wait;
        let notify = {
            let mut slots = self.lock();
            let slot = slots.entry(device.to_owned()).or_default();
            slot.polling += 1;
            slot.last_poll = Some(Instant::now());
            Arc::clone(&slot.notify)
        };
        let found = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(pending) = self
                .lock()
                .get_mut(device)
                .and_then(|slot| slot.queue.pop_front())
            {
                break Some(pending);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break None;
            }
        };
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(device) {
            slot.polling -= 1;
            slot.last_poll = Some(Instant::now());
        }
        found
    }

    /// Delivers a device's answer to command `id`; false when nobody waits for it.
    pub fn reply(&self, device: &str, id: u64, answer: Result<Vec<u8>, String>) -> bool {
        let sender = self
            .lock()
            .get_mut(device)
            .and_then(|slot| slot.replies.remove(&id));
        match sender {
            Some(sender) => sender.send(answer.map_err(ChannelError::Rejected)).is_ok(),
            None => false,
        }
    }

    /// Whether `device` polled recently or is polling now.
    pub fn present(&self, device: &str) -> bool {
        self.lock().get(device).is_some_and(|slot| {
            slot.polling > 0 || slot.last_poll.is_some_and(|at| at.elapsed() < PRESENCE)
        })
    }
}

impl DeviceChannel for Mailbox {
    fn request<'a>(
        &'a self,
        device_id: &'a str,
        command: &'a str,
        payload: &'a [u8],
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(async move {
            if !self.present(device_id) {
                return Err(ChannelError::Disconnected);
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            {
                use base64::Engine as _;
                let mut slots = self.lock();
                let slot = slots.entry(device_id.to_owned()).or_default();
                slot.queue.push_back(Pending {
                    id,
                    command: command.to_owned(),
                    payload: std::str::from_utf8(payload).ok().map(str::to_owned),
                    payload_base64: base64::engine::general_purpose::STANDARD.encode(payload),
                });
                slot.replies.insert(id, tx);
                slot.notify.notify_waiters();
            }
            let answer = tokio::time::timeout(timeout, rx).await;
            // Whatever happened, the command is no longer wanted.
            if let Some(slot) = self.lock().get_mut(device_id) {
                slot.queue.retain(|p| p.id != id);
                slot.replies.remove(&id);
            }
            match answer {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(ChannelError::Disconnected),
                Err(_) => Err(ChannelError::Timeout),
            }
        })
    }

    fn download_url(&self, device_id: &str, file_id: &str) -> Result<String, ChannelError> {
        Ok(self.link(file_id, device_id, URL_LIFETIME).0)
    }
}

/// The handler's view of the cache: the files of the update in hand, nothing else.
pub(crate) struct UpdateFiles {
    pub(crate) cache: FirmwareCache,
    pub(crate) files: HashSet<String>,
}

impl ArtifactSource for UpdateFiles {
    fn read(
        &self,
        file_id: &str,
        offset: u64,
        max_len: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, ReadError>> {
        let allowed = self.files.contains(file_id);
        let sha = file_id.parse::<Sha256>();
        let file_id = file_id.to_owned();
        Box::pin(async move {
            let sha = match (allowed, sha) {
                (true, Ok(sha)) => sha,
                _ => {
                    return Err(ReadError::Unavailable(format!(
                        "{file_id} is not in the update"
                    )));
                }
            };
            let blob = self
                .cache
                .ensure(sha)
                .await
                .map_err(|err| ReadError::Unavailable(err.to_string()))?;
            if offset > blob.size() {
                return Err(ReadError::OutOfRange);
            }
            let len = (blob.size() - offset).min(max_len as u64) as usize;
            match blob.body().clone() {
                BlobBody::Memory(bytes) => {
                    Ok(bytes[offset as usize..offset as usize + len].to_vec())
                }
                BlobBody::File(file) => tokio::task::spawn_blocking(move || {
                    let mut out = vec![0u8; len];
                    std::os::unix::fs::FileExt::read_exact_at(file.as_ref(), &mut out, offset)
                        .map(|()| out)
                })
                .await
                .map_err(|err| ReadError::Unavailable(err.to_string()))?
                .map_err(|err| ReadError::Unavailable(err.to_string())),
            }
        })
    }
}

/// Handler state in the gateway's SQLite store, within [`STATE_QUOTA`] per handler.
pub(crate) struct StoreState(pub(crate) Store);

impl StateStore for StoreState {
    fn get<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>> {
        Box::pin(async move {
            self.0
                .handler_state_get(handler, key)
                .await
                .map_err(|err| StateError::Backend(err.to_string()))
        })
    }

    fn set<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            if key.is_empty() || key.len() > outpost_runtime::MAX_KEY_LEN {
                return Err(StateError::InvalidKey);
            }
            match self
                .0
                .handler_state_set(handler, key, value, STATE_QUOTA)
                .await
            {
                Ok(StateWrite::Stored) => Ok(()),
                Ok(StateWrite::QuotaExceeded) => Err(StateError::QuotaExceeded),
                Err(err) => Err(StateError::Backend(err.to_string())),
            }
        })
    }

    fn delete<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            self.0
                .handler_state_delete(handler, key)
                .await
                .map_err(|err| StateError::Backend(err.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device `esp-1` polls; once it is present, a handler sends it `command`. Returns
    /// what the poll got and the handler's request, still waiting for the reply.
    async fn poll_and_request(
        mailbox: &Arc<Mailbox>,
        command: &'static str,
        payload: &'static [u8],
    ) -> (
        Pending,
        tokio::task::JoinHandle<Result<Vec<u8>, ChannelError>>,
    ) {
        let poller = {
            let mailbox = Arc::clone(mailbox);
            tokio::spawn(async move { mailbox.next("esp-1", Duration::from_secs(30)).await })
        };
        while !mailbox.present("esp-1") {
            tokio::task::yield_now().await;
        }
        let request = {
            let mailbox = Arc::clone(mailbox);
            tokio::spawn(async move {
                mailbox
                    .request("esp-1", command, payload, Duration::from_secs(30))
                    .await
            })
        };
        let pending = poller.await.unwrap().expect("the poll gets the command");
        (pending, request)
    }

    #[tokio::test]
    async fn a_command_reaches_a_polling_device_and_its_reply_comes_back() {
        let mailbox = Mailbox::new("http://127.0.0.1:8070".into(), LinkSigner::new([7; 32]));
        // Nobody has polled: the device is not there.
        assert_eq!(
            mailbox
                .request("esp-1", "ota-apply", b"1.1", Duration::from_secs(1))
                .await,
            Err(ChannelError::Disconnected)
        );
        let (pending, request) = poll_and_request(&mailbox, "ota-apply", b"1.1").await;
        assert_eq!(pending.command, "ota-apply");
        assert_eq!(pending.payload.as_deref(), Some("1.1"));
        assert!(
            !mailbox.reply("esp-2", pending.id, Ok(vec![])),
            "another device's id"
        );
        assert!(mailbox.reply("esp-1", pending.id, Ok(b"ok".to_vec())));
        assert_eq!(request.await.unwrap(), Ok(b"ok".to_vec()));
        // A refusal comes back as one; a late reply finds nobody.
        assert!(!mailbox.reply("esp-1", pending.id, Ok(vec![])));
    }

    #[tokio::test]
    async fn a_command_goes_out_in_the_documented_wire_form() {
        let mailbox = Mailbox::new("http://gw".into(), LinkSigner::new([2; 32]));
        let (pending, request) = poll_and_request(&mailbox, "ota-write", &[0, 0xff, 0x10]).await;
        let wire = pending.to_wire();
        // docs/rollouts.md and docs/local-api.md: {id, command, payload?, payloadBase64}.
        assert_eq!(wire["id"], pending.id);
        assert_eq!(wire["command"], "ota-write");
        assert_eq!(wire["payloadBase64"], "AP8Q");
        assert!(wire.get("payload").is_none(), "not UTF-8: no text form");
        // The old name goes out beside it for one release.
        assert_eq!(wire["payload_base64"], "AP8Q");
        // Both names are read back.
        let documented = serde_json::json!({"id": 4, "command": "c", "payloadBase64": "AA=="});
        let old = serde_json::json!({"id": 4, "command": "c", "payload_base64": "AA=="});
        for form in [documented, old] {
            let parsed: Pending = serde_json::from_value(form).unwrap();
            assert_eq!(parsed.payload_base64, "AA==");
        }
        assert!(mailbox.reply("esp-1", pending.id, Ok(vec![])));
        request.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_unanswered_command_times_out_and_is_withdrawn() {
        let mailbox = Mailbox::new("http://gw".into(), LinkSigner::new([1; 32]));
        assert!(
            mailbox
                .next("esp-1", Duration::from_millis(1))
                .await
                .is_none()
        );
        let answer = mailbox
            .request("esp-1", "ota-begin", b"{}", Duration::from_millis(20))
            .await;
        assert_eq!(answer, Err(ChannelError::Timeout));
        assert!(
            mailbox
                .next("esp-1", Duration::from_millis(1))
                .await
                .is_none()
        );
    }

    #[test]
    fn download_urls_are_signed_per_device_and_file() {
        let mailbox = Mailbox::new("http://gw:8070".into(), LinkSigner::new([3; 32]));
        let sha = "a".repeat(64);
        let url = mailbox.download_url("esp-1", &sha).unwrap();
        assert!(url.starts_with(&format!(
            "http://gw:8070/firmware/{sha}?device=esp-1&expires="
        )));
        let other = mailbox.download_url("esp-2", &sha).unwrap();
        let sig = |u: &str| u.rsplit_once("sig=").unwrap().1.to_owned();
        assert_ne!(sig(&url), sig(&other));
        assert_eq!(sig(&url).len(), 64);
    }
}
