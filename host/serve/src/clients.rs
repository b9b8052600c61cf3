//! The per-client connection cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpStream;

/// The answer a connection over its client's cap gets before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
retry-after: 5\r\n\
connection: close\r\n\
content-length: 44\r\n\
\r\n\
too many connections from your address now\r\n";

/// How often, at most, a listener logs the refusals it made.
const WARN_EVERY_SECS: u64 = 10;

/// Connections held per source address.
#[derive(Debug)]
pub(crate) struct Clients {
    name: &'static str,
    cap: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// One held connection; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Clients {
    pub(crate) fn new(name: &'static str, cap: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            cap,
            held: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds its cap.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        // An IPv4 client on a dual-stack socket is one client, however it is written.
        let ip = ip.to_canonical();
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let count = held.entry(ip).or_insert(0);
            if *count < self.cap {
                *count += 1;
                return Some(ClientSlot {
                    clients: Arc::clone(self),
                    ip,
                });
            }
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed().as_secs() >= WARN_EVERY_SECS) {
            *last = Some(Instant::now());
            tracing::warn!(
                listener = self.name,
                client = %ip,
                cap = self.cap,
                refused_in_all = refused,
                "a client holds its cap of connections; refusing more from it"
            );
        }
        None
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self.clients.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Answers 503 without reading anything and closes: the socket is new, so the short
/// answer fits its send buffer and the write does not block.
pub(crate) fn refuse(stream: TcpStream) {
    let _ = stream.try_write(REFUSAL);
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_http_answer() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
    }

    #[test]
    fn a_client_holds_at_most_its_cap_and_gets_slots_back() {
        let clients = Clients::new("test", 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = clients.admit(a).unwrap();
        let _second = clients.admit(mapped).unwrap();
        assert!(
            clients.admit(a).is_none(),
            "the mapped form is the same client"
        );
        assert!(clients.admit(b).is_some(), "another client is not affected");
        drop(first);
        assert!(
            clients.admit(a).is_some(),
            "a closed connection frees its slot"
        );
        assert_eq!(clients.refused.load(Ordering::Relaxed), 1);
    }
}
