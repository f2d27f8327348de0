//! When a shard's entries may expire: times in microseconds since the
//! store's epoch, and each shard's expiry slots.

use std::{cmp::Reverse, collections::BinaryHeap, time::Duration};

/// Microseconds since the store's epoch: 8 bytes an entry instead of an
/// `Instant`'s 16.
pub(super) type Micros = u64;

/// A shard's expiry slots: (when, the hash of the ids it is for), and the
/// soonest of them beside the shard's lock, so that a claim with nothing
/// due reads no more than that.
pub(super) struct Expiries {
    slots: BinaryHeap<Reverse<(Micros, u64)>>,
    soonest: Micros,
}

impl Expiries {
    pub(super) fn new() -> Self {
        Self { slots: BinaryHeap::new(), soonest: Micros::MAX }
    }

    pub(super) fn push(&mut self, at: Micros, hash: u64) {
        self.soonest = self.soonest.min(at);
        self.slots.push(Reverse((at, hash)));
    }

    /// The hash of the soonest slot, taken out, if it is due by `now`.
    pub(super) fn pop_due(&mut self, now: Micros) -> Option<u64> {
        if self.soonest > now {
            return None;
        }
        let Reverse((_, hash)) = self.slots.pop()?;
        self.soonest = self.slots.peek().map_or(Micros::MAX, |Reverse((at, _))| *at);
        Some(hash)
    }
}

/// `at` plus `duration`, in whole microseconds, saturating.
pub(super) fn after(at: Micros, duration: Duration) -> Micros {
    at.saturating_add(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_due_soonest_first_and_only_once_due() {
        let mut expiries = Expiries::new();
        for (at, hash) in [(30, 3), (10, 1), (20, 2)] {
            expiries.push(at, hash);
        }
        assert_eq!(expiries.pop_due(5), None);
        assert_eq!(expiries.pop_due(15), Some(1));
        // The soonest is now 20: nothing more is due at 15.
        assert_eq!(expiries.pop_due(15), None);
        assert_eq!([expiries.pop_due(100), expiries.pop_due(100), expiries.pop_due(100)], [Some(2), Some(3), None]);
    }
}
