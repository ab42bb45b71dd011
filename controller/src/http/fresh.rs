//! A value shared by every caller for a short while, rebuilt by one.
//!
//! The fleet's heavy reads (`/api/v1/nodes`, the fleet page's node list,
//! the `/metrics` scrape) read every node row: with 1,000 nodes that is
//! milliseconds of CPU, and the figures only change with heartbeats. A
//! [`Fresh`] keeps the last value for [`Fresh::fresh`]; when it is older,
//! exactly one caller rebuilds it while the others are served the previous
//! value (up to [`Fresh::stale`] old) instead of all rebuilding at once —
//! the stampede that made every second's first requests the slowest.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// See the module doc.
#[derive(Debug)]
pub struct Fresh<T> {
    value: Mutex<Option<(Instant, T)>>,
    rebuilding: tokio::sync::Mutex<()>,
    fresh: Duration,
    stale: Duration,
}

impl<T: Clone> Fresh<T> {
    /// Values younger than `fresh` are served as they are; while one
    /// caller rebuilds, others get a value up to `stale` old (older ones
    /// wait for the rebuild).
    pub fn new(fresh: Duration, stale: Duration) -> Self {
        Self {
            value: Mutex::new(None),
            rebuilding: tokio::sync::Mutex::new(()),
            fresh,
            stale: stale.max(fresh),
        }
    }

    /// How long a value is served without a rebuild.
    pub fn fresh(&self) -> Duration {
        self.fresh
    }

    /// How old a value a caller may get while another rebuilds it.
    pub fn stale(&self) -> Duration {
        self.stale
    }

    fn within(&self, limit: Duration) -> Option<T> {
        self.value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(made, _)| made.elapsed() < limit)
            .map(|(_, value)| value.clone())
    }

    /// The shared value, rebuilt with `make` when it is older than
    /// `fresh` (by this caller only if no other is rebuilding it). An error
    /// of `make` goes to the caller that ran it and keeps nothing.
    pub async fn get<E, F>(&self, make: impl FnOnce() -> F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        if let Some(value) = self.within(self.fresh) {
            return Ok(value);
        }
        let guard = match self.rebuilding.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Another caller rebuilds: the previous value will do.
                if let Some(value) = self.within(self.stale) {
                    return Ok(value);
                }
                self.rebuilding.lock().await
            }
        };
        // Rebuilt while this caller waited?
        if let Some(value) = self.within(self.fresh) {
            return Ok(value);
        }
        let value = make().await?;
        *self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), value.clone()));
        drop(guard);
        Ok(value)
    }

    /// Drops the value: the next caller rebuilds it (after a change this
    /// server made, such as a node retired from the web page).
    pub fn forget(&self) {
        *self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn one_caller_rebuilds_while_the_others_get_the_previous_value() {
        let fresh = Arc::new(Fresh::new(
            Duration::from_millis(50),
            Duration::from_secs(5),
        ));
        let builds = Arc::new(AtomicUsize::new(0));
        let make = |builds: Arc<AtomicUsize>| async move {
            let n = builds.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<usize, ()>(n)
        };
        assert_eq!(fresh.get(|| make(builds.clone())).await, Ok(1));
        // Served as it is while fresh.
        assert_eq!(fresh.get(|| make(builds.clone())).await, Ok(1));
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Stale: 20 callers at once, one rebuild; the rest get value 1 at
        // once or value 2 when it lands, never a rebuild of their own.
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (fresh, builds) = (fresh.clone(), builds.clone());
                tokio::spawn(async move { fresh.get(|| make(builds)).await })
            })
            .collect();
        let mut got = Vec::new();
        for c in callers {
            got.push(c.await.unwrap().unwrap());
        }
        assert_eq!(builds.load(Ordering::SeqCst), 2, "{got:?}");
        assert!(got.iter().all(|v| *v == 1 || *v == 2), "{got:?}");
        assert!(
            got.contains(&1),
            "nobody was served the previous value: {got:?}"
        );
        // Forgotten: the next caller rebuilds.
        fresh.forget();
        assert_eq!(fresh.get(|| make(builds.clone())).await, Ok(3));
    }

    #[tokio::test]
    async fn a_failed_rebuild_keeps_nothing_and_the_next_caller_tries_again() {
        let fresh: Fresh<u32> = Fresh::new(Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(
            fresh.get(|| async { Err::<u32, &str>("store down") }).await,
            Err("store down")
        );
        assert_eq!(fresh.get(|| async { Ok::<u32, &str>(7) }).await, Ok(7));
    }

    #[tokio::test]
    async fn with_no_previous_value_callers_wait_for_the_one_rebuild() {
        let fresh = Arc::new(Fresh::new(Duration::from_secs(60), Duration::from_secs(60)));
        let builds = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let (fresh, builds) = (fresh.clone(), builds.clone());
                tokio::spawn(async move {
                    fresh
                        .get(|| async move {
                            builds.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<u8, ()>(9)
                        })
                        .await
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap(), Ok(9));
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
    }
}
