//! The thread that owns the SQLite connection.
//!
//! SQLite calls block on disk I/O. Running them on a tokio worker would stall every task
//! on that worker, so the connection lives on one dedicated OS thread and callers send it
//! closures over a channel, awaiting the answer on a oneshot.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::StoreError;

type Task = Box<dyn FnOnce(&mut Connection) + Send>;

enum Job {
    Run(Task),
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// The sending side; cloning it shares the one connection thread.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    jobs: mpsc::Sender<Job>,
}

impl Handle {
    /// Starts the thread, runs `open` on it and waits for the result. On failure the
    /// thread ends and nothing is kept.
    pub(crate) async fn spawn<F>(open: F) -> Result<Self, StoreError>
    where
        F: FnOnce() -> Result<Connection, StoreError> + Send + 'static,
    {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (opened_tx, opened_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("outpost-store".into())
            .spawn(move || {
                let conn = match open() {
                    Ok(conn) => {
                        let _ = opened_tx.send(Ok(()));
                        conn
                    }
                    Err(err) => {
                        let _ = opened_tx.send(Err(err));
                        return;
                    }
                };
                serve(conn, &inbox);
            })
            .map_err(|err| StoreError::Panicked(format!("cannot start the store thread: {err}")))?;
        opened_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(Self { jobs })
    }

    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let task: Task = Box::new(move |conn| {
            let result = catch_unwind(AssertUnwindSafe(|| f(conn)))
                .unwrap_or_else(|panic| Err(StoreError::Panicked(panic_message(&*panic))));
            let _ = reply_tx.send(result);
        });
        self.jobs
            .send(Job::Run(task))
            .map_err(|_| StoreError::Closed)?;
        reply_rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(crate) async fn close(self) -> Result<(), StoreError> {
        let (done_tx, done_rx) = oneshot::channel();
        self.jobs
            .send(Job::Close(done_tx))
            .map_err(|_| StoreError::Closed)?;
        done_rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn serve(mut conn: Connection, inbox: &mpsc::Receiver<Job>) {
    // The loop also ends when every handle is dropped without close(): the connection is
    // then dropped, which closes it just the same but with nobody to tell of an error.
    while let Ok(job) = inbox.recv() {
        match job {
            Job::Run(task) => task(&mut conn),
            Job::Close(done) => {
                let result = conn.close().map_err(|(_, err)| StoreError::Sqlite(err));
                if let Err(err) = &result {
                    tracing::error!(error = %err, "closing the state database failed");
                }
                let _ = done.send(result);
                return;
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
