//! The service manager's side channel (`sd_notify(3)`): `READY=1` once serving, `RELOADING=1` … `READY=1`
//! around a SIGHUP reload, `STOPPING=1` on the way out, and `WATCHDOG=1` from the daemon's main loop at half
//! `WATCHDOG_USEC`, so a main loop that is stuck stops feeding the watchdog and systemd kills the daemon.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. A failed send is logged, never fatal: the
//! daemon serves traffic whether or not its manager hears about it.

use std::time::Duration;

pub use ::sd_notify::NotifyState as State;
use tracing::warn;

/// Tells the service manager `state` (a no-op outside systemd).
pub fn notify(state: &[State]) {
    if let Err(e) = ::sd_notify::notify(state) {
        warn!(error = %e, "telling the service manager {state:?}");
    }
}

/// The watchdog's pace: `WATCHDOG=1` every half `WATCHDOG_USEC`, or never when the watchdog is off.
pub struct Watchdog {
    ticker: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be this process when set).
    pub fn from_env() -> Watchdog {
        Watchdog::every(::sd_notify::watchdog_enabled().map(|timeout| timeout / 2))
    }

    fn every(period: Option<Duration>) -> Watchdog {
        let ticker = period.filter(|p| !p.is_zero()).map(|period| {
            let mut ticker = tokio::time::interval(period);
            // After a stall, one ping is enough: systemd only needs to hear from us within the timeout.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        Watchdog { ticker }
    }

    /// Resolves when the next `WATCHDOG=1` is due; never when the watchdog is off. Await it in the main loop's
    /// `select!` and call [`Watchdog::feed`] when it fires.
    pub async fn due(&mut self) {
        match &mut self.ticker {
            Some(ticker) => {
                ticker.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    pub fn feed(&self) {
        notify(&[State::Watchdog]);
    }
}
