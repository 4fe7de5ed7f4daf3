//! Polling a real condition with a bounded deadline (never sleep-as-synchronisation).

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// What a polled condition may return: `bool` (ready when `true`) or `Option<T>` (ready with `T` when `Some`).
pub trait PollResult {
    type Output;
    fn into_ready(self) -> Option<Self::Output>;
}

impl PollResult for bool {
    type Output = ();
    fn into_ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> PollResult for Option<T> {
    type Output = T;
    fn into_ready(self) -> Option<T> {
        self
    }
}

/// Marker context: a condition returning an error wrapped by [`abort_wait`] stops [`wait_until`] at once.
#[derive(Debug)]
struct WaitAborted;

impl fmt::Display for WaitAborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("gave up waiting")
    }
}

/// Wraps an error so that returning it from a [`wait_until`] condition ends the wait immediately
/// (e.g. "the server process exited") instead of being retried until the deadline.
pub fn abort_wait(err: anyhow::Error) -> anyhow::Error {
    err.context(WaitAborted)
}

/// Polls `condition` every `poll_interval` until it is ready, or fails once `timeout` has passed.
///
/// The condition returns `Ok(true)`/`Ok(Some(v))` when ready, `Ok(false)`/`Ok(None)` when not yet.
/// An `Err` counts as "not yet" (the last one is quoted in the timeout error) unless it was made with
/// [`abort_wait`], which fails the wait at once. The condition is always checked at least once, and
/// once more at the deadline. The timeout error names `what`.
pub fn wait_until<R, F>(what: &str, timeout: Duration, poll_interval: Duration, mut condition: F) -> Result<R::Output>
where
    R: PollResult,
    F: FnMut() -> Result<R>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut polls = 0u64;
    let mut last_err: Option<anyhow::Error>;
    loop {
        polls += 1;
        let now = Instant::now();
        match condition() {
            Ok(r) => {
                if let Some(v) = r.into_ready() {
                    return Ok(v);
                }
                last_err = None;
            }
            Err(e) if e.downcast_ref::<WaitAborted>().is_some() => {
                return Err(e.context(format!("while waiting for {what} (after {:?})", start.elapsed())));
            }
            Err(e) => last_err = Some(e),
        }
        if now >= deadline {
            let base = format!("timed out after {timeout:?} waiting for {what} ({polls} polls)");
            return Err(match last_err {
                Some(e) => anyhow!("{base}; last attempt failed: {e:#}"),
                None => anyhow!("{base}; the condition was still false"),
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(poll_interval.min(remaining).max(Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_value_when_ready() {
        let mut n = 0;
        let v = wait_until("n to reach 3", Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok((n >= 3).then_some(n * 10))
        })
        .unwrap();
        assert_eq!(v, 30);
    }

    #[test]
    fn timeout_names_what_was_awaited_and_last_error() {
        let err = wait_until("the moon to turn blue", Duration::from_millis(30), Duration::from_millis(5), || {
            Err::<bool, _>(anyhow!("moon is grey"))
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("timed out after 30ms waiting for the moon to turn blue"), "{msg}");
        assert!(msg.contains("moon is grey"), "{msg}");

        let err = wait_until("false to be true", Duration::from_millis(10), Duration::from_millis(2), || Ok(false))
            .unwrap_err();
        assert!(format!("{err:#}").contains("still false"), "{err:#}");
    }

    #[test]
    fn abort_stops_immediately() {
        let start = Instant::now();
        let mut calls = 0;
        let err = wait_until("something", Duration::from_secs(30), Duration::from_millis(1), || {
            calls += 1;
            Err::<bool, _>(abort_wait(anyhow!("process exited")))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(start.elapsed() < Duration::from_secs(5));
        let msg = format!("{err:#}");
        assert!(msg.contains("while waiting for something") && msg.contains("process exited"), "{msg}");
    }
}
