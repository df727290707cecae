//! Waiting for watched files to stop changing before reading them.
//!
//! The watches poll cheap stamps (names, sizes, modification times). A writer
//! that truncates and then writes (`std::fs::write`, `echo … >`, many editors'
//! save) passes through an empty or half-written file, and a poll that lands
//! in that moment would load it: an empty policy file is a valid policy set
//! that denies everything it used to allow. So a change is read only once two
//! stamps taken a short period apart agree.

use std::time::Duration;

/// The quiet period a changed file must keep before it is read (shorter when
/// the watch itself polls faster).
pub(crate) const SETTLE: Duration = Duration::from_millis(100);

/// How many quiet periods to wait at most for a file that keeps changing;
/// after that the latest version is read anyway (a writer that never stops
/// must not stall reloads forever).
const MAX_PERIODS: usize = 50;

/// Observes `stamp` every `period` until two consecutive observations agree,
/// and returns that stamp (or the latest after [`MAX_PERIODS`]).
pub(crate) async fn settled<T: PartialEq>(period: Duration, mut stamp: impl FnMut() -> T) -> T {
    let mut last = stamp();
    for _ in 0..MAX_PERIODS {
        tokio::time::sleep(period).await;
        let now = stamp();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_until_two_observations_agree() {
        // Truncated, half written, then complete and unchanged.
        let mut seen = vec![0, 10, 25, 25, 99].into_iter();
        let mut calls = 0;
        let stamp = settled(Duration::from_millis(1), || {
            calls += 1;
            seen.next()
        })
        .await;
        assert_eq!(stamp, Some(25));
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn a_file_that_never_settles_is_read_after_the_bound() {
        let mut counter = 0;
        let stamp = settled(Duration::from_millis(1), || {
            counter += 1;
            counter
        })
        .await;
        assert_eq!(stamp, MAX_PERIODS + 1);
    }
}
