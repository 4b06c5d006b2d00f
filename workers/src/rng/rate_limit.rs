//! The entropy rate limit: at most `bytes` every `period_ms` milliseconds.
//!
//! The budget refills whole: the first byte served opens a period, and once the period's
//! bytes are spent nothing more is served until it ends. Requests wait in the ring
//! meanwhile (they are not taken off it), and a timerfd watched by the vring thread wakes
//! the device when the period is over - no thread ever sleeps on the queue.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use bulkhead_protocol::RateLimit;
use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

use crate::fd::set_nonblocking;

/// Longest period accepted; keeps every deadline computation far from overflowing.
pub const MAX_PERIOD_MS: u64 = u32::MAX as u64;

#[derive(Debug, Error)]
pub enum RateLimitError {
    #[error("rate limit of 0 bytes per period would starve the guest; omit the limit instead")]
    ZeroBytes,
    #[error("rate limit period must be 1 to {MAX_PERIOD_MS} ms, not {0}")]
    Period(u64),
    #[error("cannot create the rate limit timer: {0}")]
    Timer(io::Error),
}

/// The bookkeeping, apart from any clock or timer.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    per_period: u64,
    period: Duration,
    left: u64,
    /// End of the current period; `None` until a byte is spent after a refill.
    period_end: Option<Instant>,
}

impl ByteBudget {
    pub fn new(limit: RateLimit) -> Result<Self, RateLimitError> {
        if limit.bytes == 0 {
            return Err(RateLimitError::ZeroBytes);
        }
        if !(1..=MAX_PERIOD_MS).contains(&limit.period_ms) {
            return Err(RateLimitError::Period(limit.period_ms));
        }
        Ok(ByteBudget {
            per_period: limit.bytes,
            period: Duration::from_millis(limit.period_ms),
            left: limit.bytes,
            period_end: None,
        })
    }

    /// Bytes that may be served at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.left
    }

    /// Records `bytes` served at `now`.
    pub fn spend(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        if bytes > 0 && self.period_end.is_none() {
            self.period_end = Some(now + self.period);
        }
        self.left = self.left.saturating_sub(bytes);
    }

    /// When the budget comes back, if it is spent.
    pub fn refill_at(&self) -> Option<Instant> {
        if self.left == 0 {
            self.period_end
        } else {
            None
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.period_end.is_some_and(|end| now >= end) {
            self.left = self.per_period;
            self.period_end = None;
        }
    }
}

/// A [`ByteBudget`] on the monotonic clock, with the timer that announces refills.
#[derive(Debug)]
pub struct RateLimiter {
    budget: ByteBudget,
    timer: TimerFd,
    timer_armed: bool,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Result<Self, RateLimitError> {
        let budget = ByteBudget::new(limit)?;
        let timer = TimerFd::new().map_err(|e| RateLimitError::Timer(e.into()))?;
        set_nonblocking(&timer).map_err(RateLimitError::Timer)?;
        Ok(RateLimiter {
            budget,
            timer,
            timer_armed: false,
        })
    }

    /// The timerfd to watch; readable when a spent budget has refilled.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    pub fn available(&mut self) -> u64 {
        self.budget.available(Instant::now())
    }

    pub fn spend(&mut self, bytes: u64) {
        self.budget.spend(bytes, Instant::now());
    }

    /// Arms the timer for the next refill if the budget is spent and no timer is pending.
    pub fn wake_on_refill(&mut self) -> io::Result<()> {
        if self.timer_armed {
            return Ok(());
        }
        if let Some(at) = self.budget.refill_at() {
            // A zero duration would disarm the timer instead of firing it at once.
            let delay = at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            self.timer.reset(delay, None).map_err(io::Error::from)?;
            self.timer_armed = true;
        }
        Ok(())
    }

    /// Acknowledges the timer after it fired.
    pub fn on_timer(&mut self) -> io::Result<()> {
        self.timer_armed = false;
        match self.timer.wait() {
            Ok(_) => Ok(()),
            // A stale wake-up: nothing had expired.
            Err(e) if e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(bytes: u64, period_ms: u64) -> RateLimit {
        RateLimit { bytes, period_ms }
    }

    #[test]
    fn serves_at_most_the_budget_per_period() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut budget = ByteBudget::new(limit(4096, 1000)).unwrap();
        assert_eq!(budget.available(t0), 4096);
        budget.spend(3000, t0);
        assert_eq!(budget.available(t0 + ms(10)), 1096);
        budget.spend(1096, t0 + ms(10));
        assert_eq!(budget.available(t0 + ms(999)), 0);
        assert_eq!(budget.refill_at(), Some(t0 + ms(1000)));
        // The period opened with the first byte, at t0.
        assert_eq!(budget.available(t0 + ms(1000)), 4096);
        assert_eq!(budget.refill_at(), None);
        // The next period opens with the next byte served, not on a fixed grid.
        budget.spend(4096, t0 + ms(5000));
        assert_eq!(budget.available(t0 + ms(5999)), 0);
        assert_eq!(budget.available(t0 + ms(6000)), 4096);
    }

    #[test]
    fn refuses_degenerate_limits() {
        assert!(matches!(
            ByteBudget::new(limit(0, 10)),
            Err(RateLimitError::ZeroBytes)
        ));
        assert!(matches!(
            ByteBudget::new(limit(1, 0)),
            Err(RateLimitError::Period(0))
        ));
        assert!(matches!(
            ByteBudget::new(limit(1, u64::MAX)),
            Err(RateLimitError::Period(_))
        ));
    }

    #[test]
    fn timer_fires_when_the_budget_refills() {
        let mut limiter = RateLimiter::new(limit(10, 20)).unwrap();
        limiter.spend(10);
        assert_eq!(limiter.available(), 0);
        limiter.wake_on_refill().unwrap();
        let mut poll = libc::pollfd {
            fd: limiter.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, borrowed for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 2000) };
        assert_eq!(ready, 1, "the refill timer never fired");
        limiter.on_timer().unwrap();
        assert_eq!(limiter.available(), 10);
        // A second acknowledgement finds nothing to read and must not block.
        limiter.on_timer().unwrap();
    }
}
