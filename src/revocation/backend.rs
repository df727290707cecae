//! Where revocations outlive the process: the [`Backend`] trait and its two
//! implementations, the journal file ([`super::journal::JournalBackend`],
//! what `portcullis serve` uses) and memory ([`MemoryBackend`], for tests and
//! embedders that need no durability).
//!
//! A backend is the store's durability, not its lookup structure: the store
//! keeps every entry in force in memory and checks requests against that; it
//! writes each change through the backend (and waits for it) before it
//! acknowledges a revocation, and reads the backend once, when it opens.
//! Sharing between instances (Redis) is a layer on top of any backend: in
//! shared mode the store writes to both, and entries from Redis are written
//! to the backend too.

use std::fmt;
use std::io::BufRead;
use std::sync::{Arc, Mutex};

use super::{Revocation, RevocationError, lock};

/// What a backend held when the store opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Unexpired entries, each with the exact line it was stored as, once.
    pub entries: Vec<(String, Revocation)>,
    /// Expired entries dropped.
    pub expired: usize,
    /// Lines that did not parse (skipped).
    pub unreadable: usize,
}

impl Loaded {
    /// Reads entry lines (one JSON [`Revocation`] per line): drops expired
    /// and unreadable ones (including lines that are not UTF-8, as a write
    /// torn inside a character leaves) and repeats, keeps the first
    /// occurrence of the others in order.
    pub fn from_lines(reader: impl BufRead, now: i64) -> std::io::Result<Loaded> {
        let mut out = Loaded::default();
        let mut seen = std::collections::HashSet::new();
        for line in reader.split(b'\n') {
            let line = line?;
            let Ok(line) = std::str::from_utf8(&line) else {
                out.unreadable += 1;
                continue;
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match serde_json::from_str::<Revocation>(line) {
                Ok(entry) if entry.expires_at <= now => out.expired += 1,
                Ok(entry) => {
                    if seen.insert(line.to_owned()) {
                        out.entries.push((line.to_owned(), entry));
                    }
                }
                Err(_) => out.unreadable += 1,
            }
        }
        Ok(out)
    }
}

/// Durable storage for a [`super::RevocationStore`]'s entries.
///
/// Both methods block (file I/O): the store calls them on a blocking thread.
/// Entries are stored as their lines ([`Revocation::to_line`]), which are
/// also their identity: the same line twice is one entry.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Reads what is stored, dropping entries expired at `now` (and may
    /// compact what it keeps). Called once, when the store opens, before any
    /// [`Backend::append`].
    fn load(&self, now: i64) -> Result<Loaded, RevocationError>;

    /// Stores `lines`; returns once they would survive a crash of the
    /// process (for the journal: once they are fsynced). An error means they
    /// may not be stored.
    fn append(&self, lines: &[String]) -> Result<(), RevocationError>;

    /// Where the entries are, for logs (never a secret).
    fn describe(&self) -> String;

    /// Drops entries expired at `now` (and repeats) from storage while the
    /// store runs, when enough has accumulated to be worth it: `in_force` is
    /// how many entries the store holds, so a storage with about as many
    /// lines has nothing to drop. `Ok(None)` when it did nothing. Never loses
    /// an entry stored before or during the call. The store calls it from
    /// its sweeper, on a blocking thread.
    fn compact(&self, now: i64, in_force: usize) -> Result<Option<Compacted>, RevocationError> {
        let _ = (now, in_force);
        Ok(None)
    }
}

/// What a [`Backend::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Entries kept.
    pub kept: usize,
    /// Expired, repeated or unreadable lines dropped.
    pub dropped: usize,
}

/// Entries kept in memory, for as long as this value (or a clone: clones
/// share the entries) lives. A store opened again on the same `MemoryBackend`
/// finds what the previous one stored, which is how tests restart a store
/// without a disk. Nothing survives the process.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    lines: Arc<Mutex<Vec<String>>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// The stored lines, in the order they were stored.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }
}

impl Backend for MemoryBackend {
    fn load(&self, now: i64) -> Result<Loaded, RevocationError> {
        let mut lines = lock(&self.lines);
        let text = lines.join("\n");
        let loaded = Loaded::from_lines(text.as_bytes(), now).map_err(|e| {
            RevocationError::Task(format!("reading the in-memory revocations: {e}"))
        })?;
        // Compacted as the journal is: what was dropped is gone.
        *lines = loaded
            .entries
            .iter()
            .map(|(line, _)| line.clone())
            .collect();
        Ok(loaded)
    }

    fn append(&self, lines: &[String]) -> Result<(), RevocationError> {
        lock(&self.lines).extend(lines.iter().cloned());
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }

    fn compact(&self, now: i64, in_force: usize) -> Result<Option<Compacted>, RevocationError> {
        let mut lines = lock(&self.lines);
        let before = lines.len();
        if before == 0 || before < in_force.saturating_mul(2) {
            return Ok(None);
        }
        let text = lines.join("\n");
        let loaded = Loaded::from_lines(text.as_bytes(), now).map_err(|e| {
            RevocationError::Task(format!("reading the in-memory revocations: {e}"))
        })?;
        if loaded.entries.len() == before {
            return Ok(None);
        }
        *lines = loaded.entries.into_iter().map(|(line, _)| line).collect();
        Ok(Some(Compacted {
            kept: lines.len(),
            dropped: before - lines.len(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::Target;

    fn line(kid: &str, expires_at: i64) -> String {
        Revocation {
            target: Target::Key {
                kid: kid.into(),
                issued_before: None,
            },
            created_at: 1,
            expires_at,
            reason: String::new(),
        }
        .to_line()
    }

    #[test]
    fn memory_loads_what_it_stored_without_expired_repeated_or_unreadable_lines() {
        let backend = MemoryBackend::new();
        assert!(backend.load(100).unwrap().entries.is_empty());
        let live = line("live", 200);
        backend
            .append(&[
                live.clone(),
                line("old", 150),
                live.clone(),
                "{\"target\":".into(),
            ])
            .unwrap();
        let clone = backend.clone();
        let loaded = clone.load(160).unwrap();
        assert_eq!(loaded.entries.len(), 1);
        assert_eq!(loaded.entries[0].0, live);
        assert_eq!((loaded.expired, loaded.unreadable), (1, 1));
        assert_eq!(backend.lines(), vec![live], "compacted on load");
    }

    #[test]
    fn memory_compacts_while_running() {
        let backend = MemoryBackend::new();
        backend.load(100).unwrap();
        backend
            .append(&[line("a", 200), line("b", 150), line("a", 200)])
            .unwrap();
        assert_eq!(
            backend.compact(160, 1).unwrap(),
            Some(Compacted {
                kept: 1,
                dropped: 2
            })
        );
        assert_eq!(backend.lines(), vec![line("a", 200)]);
        assert_eq!(
            backend.compact(160, 1).unwrap(),
            None,
            "nothing left to drop"
        );
    }
}
