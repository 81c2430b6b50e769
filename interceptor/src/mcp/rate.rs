//! A request rate per agent cgroup (`proxy.max_requests_per_second_per_cgroup`, with a burst of
//! `proxy.request_burst_per_cgroup`): a token bucket per cgroup, taken from by every HTTP
//! request an agent sends (each JSON-RPC request, a stream opened, a session ended) before its
//! body is read. The bounds on what agents hold at once (`proxy.max_requests_in_flight*`,
//! `…_buffered_bytes*`) keep a runaway agent from exhausting the daemon; this keeps it from
//! flooding the MCP servers (and the audit log) with requests answered quickly: a loop calling
//! a tool, a retry storm.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::bpf::lock;

/// Cgroups tracked before those whose bucket has refilled are forgotten (they would start
/// full anyway), looked for at most every [`PRUNE_EVERY`] (with more cgroups sending, every
/// new one would walk them all); beyond [`MOST_TRACKED`], all are forgotten.
const PRUNE_AT: usize = 4096;
const PRUNE_EVERY: Duration = Duration::from_secs(1);
const MOST_TRACKED: usize = 65_536;

/// Buckets by cgroup id.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_cgroup: HashMap<u64, Bucket>,
    pruned: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// `per_second` requests a second, `burst` at once (both at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes one request of the cgroup `cgroup` at `now`; when none is left, how long until
    /// one is.
    pub fn take(&self, cgroup: u64, now: Instant) -> Result<(), Duration> {
        let mut buckets = lock(&self.buckets);
        let Buckets { by_cgroup, pruned } = &mut *buckets;
        if by_cgroup.len() >= PRUNE_AT
            && !by_cgroup.contains_key(&cgroup)
            && pruned.is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY)
        {
            let (per_second, burst) = (self.per_second, self.burst);
            by_cgroup.retain(|_, b| b.refilled(now, per_second) < burst);
            *pruned = Some(now);
        }
        if by_cgroup.len() >= MOST_TRACKED && !by_cgroup.contains_key(&cgroup) {
            by_cgroup.clear();
        }
        let bucket = by_cgroup.entry(cgroup).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        // Read before the lock: another thread's later reading may have been stored.
        let now = now.max(bucket.at);
        bucket.tokens = bucket.refilled(now, self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    /// Cgroups tracked now.
    pub fn tracked(&self) -> usize {
        lock(&self.buckets).by_cgroup.len()
    }
}

impl Bucket {
    /// Its tokens at `now` (not capped).
    fn refilled(&self, now: Instant, per_second: f64) -> f64 {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_gets_its_burst_then_its_rate() {
        let limit = RateLimit::new(10, 3);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(limit.take(1, t).is_ok());
        }
        // Spent: the next one comes in a tenth of a second.
        let wait = limit.take(1, t).expect_err("over the burst");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // Another cgroup has its own.
        assert!(limit.take(2, t).is_ok());
        // A tenth of a second later, one more; never more than the burst after a long pause.
        assert!(limit.take(1, t + Duration::from_millis(100)).is_ok());
        assert!(limit.take(1, t + Duration::from_millis(100)).is_err());
        let later = t + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limit.take(1, later).is_ok());
        }
        assert!(limit.take(1, later).is_err());
        // Refused requests do not count against the cgroup: at the rate, one each tenth.
        for k in 1..=20u64 {
            assert!(
                limit
                    .take(1, later + Duration::from_millis(100 * k))
                    .is_ok(),
                "{k}"
            );
        }
    }

    #[test]
    fn refilled_cgroups_are_forgotten_when_many_are_tracked() {
        let limit = RateLimit::new(1, 1);
        let t = Instant::now();
        for cgroup in 0..PRUNE_AT as u64 {
            assert!(limit.take(cgroup, t).is_ok());
        }
        assert_eq!(limit.tracked(), PRUNE_AT);
        // Still empty a moment later: nothing is forgotten, none gets a request.
        assert!(
            limit
                .take(PRUNE_AT as u64, t + Duration::from_millis(10))
                .is_ok()
        );
        assert_eq!(limit.tracked(), PRUNE_AT + 1);
        assert!(limit.take(0, t + Duration::from_millis(10)).is_err());
        // Refilled, but looked for less than a second ago: kept for now.
        assert!(
            limit
                .take(u64::MAX - 1, t + Duration::from_millis(500))
                .is_ok()
        );
        assert_eq!(limit.tracked(), PRUNE_AT + 2);
        // Refilled: forgotten (and as full as they would be).
        let later = t + Duration::from_secs(2);
        assert!(limit.take(u64::MAX, later).is_ok());
        assert_eq!(limit.tracked(), 1);
        assert!(limit.take(0, later).is_ok());
    }
}
