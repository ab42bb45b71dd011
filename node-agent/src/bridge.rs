//! The one seam between blocking code and async clients.
//!
//! Blocking work (a deploy, a prune, a status) runs on blocking threads; a
//! driver in it that needs an async client (bollard, for the Docker Engine
//! API) blocks on a future through the [`Bridge`] it was given. Whoever
//! starts the blocking work says which runtime that is — the code that
//! blocks never guesses it from `Handle::try_current()` (which also succeeds
//! on `spawn_blocking` threads) and never builds a runtime per call.

use std::future::Future;
use std::sync::Arc;

use tokio::runtime::{Handle, Runtime};

/// How blocking code reaches an async runtime. Cheap to clone: a clone
/// reaches the same runtime.
#[derive(Debug, Clone)]
pub enum Bridge {
    /// A running multi-thread runtime (`slipway-agent run`), blocked on from
    /// its `spawn_blocking` threads with `Handle::block_on` while its worker
    /// threads drive IO and timers. (A current-thread runtime's handle works
    /// only while its own thread sits in `Runtime::block_on`, as in
    /// `#[tokio::test]`.)
    Handle(Handle),
    /// A current-thread runtime of its own, for a one-shot command that runs
    /// no runtime: driven by `Runtime::block_on` on the calling thread (a
    /// `Handle::block_on` on a current-thread runtime would not drive IO).
    Owned(Arc<Runtime>),
}

impl Bridge {
    /// The runtime the calling async code runs on.
    ///
    /// # Panics
    /// Outside a runtime: call it from async code, before `spawn_blocking`.
    pub fn current() -> Self {
        Self::Handle(Handle::current())
    }

    /// A current-thread runtime for this process's blocking calls; build it
    /// once per command, not per call.
    pub fn owned() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self::Owned(Arc::new(runtime)))
    }

    /// Runs `future` to completion, blocking this thread.
    ///
    /// # Panics
    /// On a runtime worker thread (from async code): blocking there stalls
    /// the runtime, which tokio refuses. Use `spawn_blocking`.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        match self {
            Self::Handle(handle) => handle.block_on(future),
            Self::Owned(runtime) => runtime.block_on(future),
        }
    }
}

impl From<Handle> for Bridge {
    fn from(handle: Handle) -> Self {
        Self::Handle(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Timers and sockets: what an async client needs driven.
    async fn io_and_timers() -> u16 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (client, server) = tokio::join!(
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
            listener.accept()
        );
        client.unwrap();
        server.unwrap();
        port
    }

    /// `slipway-agent run`: blocking threads of a multi-thread runtime, on
    /// which a runtime handle is entered (so `Handle::try_current()` would
    /// say "inside a runtime" there too).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_on_the_daemon_runtime_from_its_blocking_threads() {
        let bridge = Bridge::current();
        let port = tokio::task::spawn_blocking(move || {
            assert!(Handle::try_current().is_ok());
            bridge.block_on(io_and_timers())
        })
        .await
        .unwrap();
        assert_ne!(port, 0);
    }

    /// The one-shot CLI: no runtime running; the owned one drives IO on the
    /// calling thread, call after call.
    #[test]
    fn an_owned_runtime_drives_io_on_the_calling_thread() {
        let bridge = Bridge::owned().unwrap();
        for _ in 0..2 {
            assert_ne!(bridge.block_on(io_and_timers()), 0);
        }
    }
}
