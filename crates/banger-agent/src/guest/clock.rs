//! Setup step 5: the guest's wall clock. A guest without a battery-backed clock (Firecracker)
//! boots in 1970 or wherever its last shutdown left it; the host passes its own time on the
//! command line and the agent moves the guest clock forward to it, never backwards.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

#[derive(Debug, thiserror::Error)]
#[error("cannot set the guest clock to {secs} seconds since the epoch")]
pub struct ClockError {
    secs: u64,
    #[source]
    source: nix::Error,
}

/// What [`sync_forward`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockOutcome {
    /// The clock was behind the host time and was moved forward by this many seconds.
    Advanced(u64),
    /// The clock was already at or past the host time.
    AlreadyCurrent,
}

/// How far the clock must move forward to reach `host_secs`, or `None` if it need not move.
pub fn needed_advance(now: SystemTime, host_secs: u64) -> Option<u64> {
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    host_secs.checked_sub(now_secs).filter(|d| *d > 0)
}

/// Sets `CLOCK_REALTIME` to `host_secs` when the guest clock is behind it.
pub fn sync_forward(host_secs: u64) -> Result<ClockOutcome, ClockError> {
    let Some(advance) = needed_advance(SystemTime::now(), host_secs) else {
        return Ok(ClockOutcome::AlreadyCurrent);
    };
    let secs = i64::try_from(host_secs).unwrap_or(i64::MAX);
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(secs, 0)).map_err(|source| {
        ClockError {
            secs: host_secs,
            source,
        }
    })?;
    Ok(ClockOutcome::Advanced(advance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clock_moves_only_forward() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(needed_advance(at(0), 1_700_000_000), Some(1_700_000_000));
        assert_eq!(needed_advance(at(1_700_000_000), 1_700_000_000), None);
        assert_eq!(needed_advance(at(1_800_000_000), 1_700_000_000), None);
        assert_eq!(needed_advance(at(100), 160), Some(60));
    }

    #[test]
    fn a_host_time_in_the_past_leaves_the_clock_alone() {
        assert_eq!(sync_forward(1).unwrap(), ClockOutcome::AlreadyCurrent);
    }
}
