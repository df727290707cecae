//! The engine the fuzz targets share (tests only; stable toolchain).
//!
//! Each parser of outside input has a fuzz target beside its code (a test
//! named `fuzz_<what>` in a `fuzz` module). A target gives [`run`] valid seed
//! inputs and a check; proptest then feeds the check mostly mutated seeds (bit
//! flips, byte edits, insertions of dictionary words, deletions, truncations,
//! duplications), so that mutations reach past the first syntax check, and
//! some arbitrary bytes. Oracles: the check itself (no panic, and whatever the
//! target asserts about the outcome, e.g. no allow without a valid credential)
//! and a watchdog that aborts the run when one input takes longer than
//! [`HANG_BOUND`] (a hang), printing that input.
//!
//! A failure is shrunk by proptest to a small input, printed escaped with the
//! seed that found it. Each target has a CI-sized number of inputs;
//! `PORTCULLIS_FUZZ_SCALE` multiplies it, `PORTCULLIS_FUZZ_CASES` replaces it
//! for every target, and `PORTCULLIS_FUZZ_SEED` sets the random seed (fixed by default, so that CI is reproducible; `scripts/fuzz`
//! picks a new one per run). Each target reports inputs run and inputs per
//! second on standard error and in `target/fuzz-report.tsv`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

/// Longer than this for one input is a hang: the run aborts.
pub(crate) const HANG_BOUND: Duration = Duration::from_secs(20);

/// The seed when `PORTCULLIS_FUZZ_SEED` is unset.
const DEFAULT_SEED: u64 = 0x5eed_f00d_cafe_0019;

/// One fuzz target: its name, valid inputs to mutate, words worth inserting.
pub(crate) struct Target {
    /// Reported name.
    pub(crate) name: &'static str,
    /// Valid inputs (mutated to make most of the inputs).
    pub(crate) seeds: Vec<Vec<u8>>,
    /// Fragments a mutation may insert (keywords, delimiters, valid pieces).
    pub(crate) dictionary: Vec<Vec<u8>>,
    /// Inputs per run when `PORTCULLIS_FUZZ_CASES` is unset (sized for CI).
    pub(crate) cases: u32,
}

/// One edit of an input.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Interesting(Index, Index),
    InsertWord(Index, Index),
    InsertBytes(Index, Vec<u8>),
    Delete(Index, u8),
    Truncate(Index),
    Duplicate(Index, Index, u8),
}

/// Bytes that make parsers take edge paths.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\x7f",
    b"\r\n",
    b"\"",
    b"\\",
    b"%",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b".",
    b"..",
    b"/",
    b"-1",
    b"0",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551616",
    b"1e999",
    b"null",
    b"\xc3\xa9",
    b"\xed\xa0\x80",
    b"\xf0\x9f\x98\x80",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Mutation::SetByte(at, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, w)| Mutation::Interesting(at, w)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, w)| Mutation::InsertWord(at, w)),
        (any::<Index>(), vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::InsertBytes(at, bytes)),
        (any::<Index>(), 1u8..32).prop_map(|(at, len)| Mutation::Delete(at, len)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<Index>(), 1u8..64)
            .prop_map(|(from, to, len)| Mutation::Duplicate(from, to, len)),
    ]
}

/// A position in `0..=len`.
fn at(index: &Index, len: usize) -> usize {
    index.index(len + 1)
}

fn apply(input: &mut Vec<u8>, mutation: &Mutation, dictionary: &[Vec<u8>]) {
    let len = input.len();
    match mutation {
        Mutation::FlipBit(i, bit) if len > 0 => input[i.index(len)] ^= 1 << bit,
        Mutation::SetByte(i, b) if len > 0 => input[i.index(len)] = *b,
        Mutation::Interesting(i, w) => {
            let word = INTERESTING[w.index(INTERESTING.len())];
            let at = at(i, len);
            input.splice(at..at, word.iter().copied());
        }
        Mutation::InsertWord(i, w) if !dictionary.is_empty() => {
            let word = &dictionary[w.index(dictionary.len())];
            let at = at(i, len);
            input.splice(at..at, word.iter().copied());
        }
        Mutation::InsertBytes(i, bytes) => {
            let at = at(i, len);
            input.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete(i, n) if len > 0 => {
            let from = i.index(len);
            let to = (from + usize::from(*n)).min(len);
            input.drain(from..to);
        }
        Mutation::Truncate(i) => input.truncate(at(i, len)),
        Mutation::Duplicate(from, to, n) if len > 0 => {
            let from = from.index(len);
            let piece = input[from..(from + usize::from(*n)).min(len)].to_vec();
            let to = at(to, len);
            input.splice(to..to, piece);
        }
        _ => {}
    }
}

/// The inputs of a target: mostly mutated seeds, some arbitrary bytes.
fn inputs(seeds: Vec<Vec<u8>>, dictionary: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let seeds = Arc::new(seeds);
    let dictionary = Arc::new(dictionary);
    let count = seeds.len().max(1);
    let mutated = (0..count, vec(mutation(), 1..8)).prop_map(move |(seed, mutations)| {
        let mut input = seeds.get(seed).cloned().unwrap_or_default();
        for mutation in &mutations {
            apply(&mut input, mutation, &dictionary);
        }
        input
    });
    prop_oneof![
        9 => mutated,
        1 => vec(any::<u8>(), 0..512),
    ]
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.replace('_', "").parse().ok(),
    }
}

/// Aborts the process when an input runs past [`HANG_BOUND`].
struct Watchdog {
    /// Milliseconds since `epoch` when the current input started; 0 when idle.
    started_ms: Arc<AtomicU64>,
    current: Arc<Mutex<Vec<u8>>>,
    epoch: Instant,
}

impl Watchdog {
    fn start(name: &'static str) -> Watchdog {
        let started_ms = Arc::new(AtomicU64::new(0));
        let current = Arc::new(Mutex::new(Vec::new()));
        let epoch = Instant::now();
        let (watched, input) = (started_ms.clone(), current.clone());
        std::thread::spawn(move || {
            // Ends with the process; one per target is cheap.
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let started = watched.load(Ordering::Acquire);
                if started == u64::MAX {
                    return;
                }
                let now = epoch.elapsed().as_millis() as u64;
                if started != 0 && now.saturating_sub(started) > HANG_BOUND.as_millis() as u64 {
                    let input = input.lock().map(|i| i.clone()).unwrap_or_default();
                    eprintln!(
                        "fuzz {name}: HANG: one input ran over {HANG_BOUND:?}: {:?}",
                        String::from_utf8_lossy(&input)
                    );
                    std::process::abort();
                }
            }
        });
        Watchdog {
            started_ms,
            current,
            epoch,
        }
    }

    fn arm(&self, input: &[u8]) {
        if let Ok(mut current) = self.current.lock() {
            current.clear();
            current.extend_from_slice(input);
        }
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        self.started_ms.store(now, Ordering::Release);
    }

    fn disarm(&self) {
        self.started_ms.store(0, Ordering::Release);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.started_ms.store(u64::MAX, Ordering::Release);
    }
}

thread_local! {
    /// Set while a target's inputs run on this thread: their panics are
    /// failures proptest catches and shrinks, not worth printing each time.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent on threads running inputs
/// and defers to the previous hook everywhere else.
fn quiet_panics_while_fuzzing() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `check` over the target's inputs; panics with the smallest failing
/// input (escaped) if one fails.
pub(crate) fn run(target: Target, check: impl FnMut(&[u8])) {
    // proptest calls a `Fn`: the check and the counters live in cells.
    let check = std::cell::RefCell::new(check);
    let scale = env_number("PORTCULLIS_FUZZ_SCALE").unwrap_or(1).max(1);
    let cases = env_number("PORTCULLIS_FUZZ_CASES")
        .unwrap_or(u64::from(target.cases).saturating_mul(scale))
        .min(u64::from(u32::MAX)) as u32;
    let seed = env_number("PORTCULLIS_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    seed_bytes[8..16].copy_from_slice(&(target.name.len() as u64).to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let watchdog = Watchdog::start(target.name);
    quiet_panics_while_fuzzing();
    let ran = std::cell::Cell::new(0u64);
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let started = Instant::now();
    // The seeds themselves first: each must pass as given.
    for seed_input in &target.seeds {
        watchdog.arm(seed_input);
        (check.borrow_mut())(seed_input);
        watchdog.disarm();
    }
    QUIET.with(|quiet| quiet.set(true));
    let result = runner.run(
        &inputs(target.seeds.clone(), target.dictionary.clone()),
        |input| {
            watchdog.arm(&input);
            let one = Instant::now();
            (check.borrow_mut())(&input);
            slowest.set(slowest.get().max(one.elapsed()));
            watchdog.disarm();
            ran.set(ran.get() + 1);
            Ok(())
        },
    );
    QUIET.with(|quiet| quiet.set(false));
    let elapsed = started.elapsed();
    drop(watchdog);
    let (ran, slowest) = (ran.get(), slowest.get());
    let rate = ran as f64 / elapsed.as_secs_f64().max(1e-9);
    let line = format!(
        "{}\t{ran}\t{:.2}\t{rate:.0}\t{:.2}\t{seed:#x}",
        target.name,
        elapsed.as_secs_f64(),
        slowest.as_secs_f64() * 1000.0
    );
    eprintln!(
        "fuzz {}: {ran} inputs in {:.2} s ({rate:.0} inputs/s), slowest {:.2} ms, seed {seed:#x}",
        target.name,
        elapsed.as_secs_f64(),
        slowest.as_secs_f64() * 1000.0
    );
    let report = concat!(env!("CARGO_MANIFEST_DIR"), "/target/fuzz-report.tsv");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
    {
        let _ = writeln!(file, "{line}");
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => panic!(
            "fuzz {}: failed on {:?} (seed {seed:#x}): {reason}",
            target.name,
            String::from_utf8_lossy(&input)
        ),
        Err(TestError::Abort(reason)) => panic!("fuzz {}: aborted: {reason}", target.name),
    }
}

/// A current-thread runtime for targets that call async code per input.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
}

/// Strings as seed or dictionary bytes.
pub(crate) fn bytes<S: AsRef<[u8]>>(items: impl IntoIterator<Item = S>) -> Vec<Vec<u8>> {
    items.into_iter().map(|s| s.as_ref().to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use proptest::strategy::ValueTree;

    use super::*;

    #[test]
    fn mutations_stay_in_bounds_on_empty_and_short_inputs() {
        let mut runner = TestRunner::deterministic();
        let dictionary = bytes(["word"]);
        for _ in 0..2000 {
            let m = mutation().new_tree(&mut runner).unwrap().current();
            for seed in [&b""[..], b"a", b"ab"] {
                let mut input = seed.to_vec();
                apply(&mut input, &m, &dictionary);
            }
        }
    }

    #[test]
    #[should_panic(expected = "failed on")]
    fn a_failing_check_is_reported_with_its_input() {
        run(
            Target {
                name: "self-test",
                seeds: bytes(["abc"]),
                dictionary: bytes(["!"]),
                cases: 5000,
            },
            |input| assert!(!input.contains(&b'!'), "found it"),
        );
    }
}
