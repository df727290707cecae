//! The local append-only journal: one JSON revocation entry per line, fsynced on
//! every append, replayed and compacted on start, and compacted again while
//! running once it holds at least [`COMPACT_MIN_LINES`] lines and twice as
//! many as there are entries in force (so at least half of it is dead), so
//! that expired entries do not pile up between restarts and a journal of live
//! entries is never rewritten for nothing.
//!
//! A torn last line (a crash in the middle of a write) is skipped with a warning;
//! every complete line that parses is kept until it expires.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use super::backend::{Backend, Compacted, Loaded};
use super::{RevocationError, lock};

/// The journal's file name inside `[revocation] data_dir`.
pub const JOURNAL_FILE: &str = "revocations.log";

/// A journal is compacted while running once it holds at least this many
/// lines and twice as many as there are entries in force: at least half of
/// what is read is dropped, so each line is rewritten a bounded number of
/// times.
pub const COMPACT_MIN_LINES: usize = 10_000;

/// An open journal, positioned for appends.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Lines in the file.
    lines: usize,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, replays it, drops expired
    /// and unreadable lines, and rewrites it compacted before appending to it.
    pub fn open(dir: &Path, now: i64) -> Result<(Journal, Loaded), RevocationError> {
        let io = |source| RevocationError::Journal {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(JOURNAL_FILE);
        let io = |source| RevocationError::Journal {
            path: path.clone(),
            source,
        };
        let replay = match File::open(&path) {
            Ok(file) => Loaded::from_lines(BufReader::new(file), now).map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Loaded::default(),
            Err(e) => return Err(io(e)),
        };

        // Compact: write the surviving lines to a temporary file, fsync it, and
        // rename it over the journal, so a crash leaves either file whole.
        let tmp = dir.join(format!("{JOURNAL_FILE}.tmp"));
        let mut out = File::create(&tmp).map_err(io)?;
        out.write_all(lines_text(replay.entries.iter().map(|(l, _)| l.as_str())).as_bytes())
            .map_err(io)?;
        install(out, &tmp, &path).map_err(io)?;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let lines = replay.entries.len();
        Ok((Journal { path, file, lines }, replay))
    }

    /// Appends `lines` (serialized entries) and waits until they are on disk.
    pub fn append<'a>(
        &mut self,
        lines: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), RevocationError> {
        let text = lines_text(lines);
        if text.is_empty() {
            return Ok(());
        }
        let io = |source| RevocationError::Journal {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(text.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.lines += text.bytes().filter(|b| *b == b'\n').count();
        Ok(())
    }

    fn compaction_due(&self, min_lines: usize, in_force: usize) -> bool {
        self.lines >= min_lines && self.lines >= in_force.saturating_mul(2)
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `lines`, each followed by a newline: the journal's format.
fn lines_text<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Makes `out` (written at `tmp`) the journal at `path`: fsynced, renamed
/// over it, and the rename made durable, so a crash leaves one whole file
/// or the other.
fn install(out: File, tmp: &Path, path: &Path) -> std::io::Result<()> {
    out.sync_all()?;
    drop(out);
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        // Not every platform allows fsync on a folder.
        let _ = d.sync_all();
    }
    Ok(())
}

/// The append-only journal in a folder (`[revocation] data_dir`): one line
/// per entry, fsynced on every append, compacted when loaded and while
/// running.
#[derive(Debug)]
pub struct JournalBackend {
    dir: PathBuf,
    journal: Mutex<Option<Journal>>,
    /// [`COMPACT_MIN_LINES`], lower in tests.
    compact_min_lines: usize,
}

impl JournalBackend {
    /// The journal in `dir` (created on load if missing).
    pub fn new(dir: impl Into<PathBuf>) -> JournalBackend {
        JournalBackend {
            dir: dir.into(),
            journal: Mutex::new(None),
            compact_min_lines: COMPACT_MIN_LINES,
        }
    }

    #[cfg(test)]
    fn with_compact_min_lines(mut self, lines: usize) -> JournalBackend {
        self.compact_min_lines = lines;
        self
    }

    /// Compacts while appends go on: the part of the file written so far is
    /// filtered into a temporary file without holding the journal; then,
    /// holding it (appends wait), what was appended meanwhile is copied over
    /// verbatim, the temporary file is fsynced and renamed over the journal,
    /// and appends continue on it. A crash leaves one whole file or the other.
    fn compact_running(
        &self,
        now: i64,
        in_force: usize,
    ) -> Result<Option<Compacted>, RevocationError> {
        let (path, written) = {
            let journal = lock(&self.journal);
            let Some(journal) = journal.as_ref() else {
                return Ok(None);
            };
            if !journal.compaction_due(self.compact_min_lines, in_force) {
                return Ok(None);
            }
            let io = |source| RevocationError::Journal {
                path: journal.path.clone(),
                source,
            };
            // Appends write whole lines under the lock: this is a line boundary.
            (
                journal.path.clone(),
                journal.file.metadata().map_err(io)?.len(),
            )
        };
        let io = |source| RevocationError::Journal {
            path: path.clone(),
            source,
        };
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.compact"));
        let result = (|| {
            let head = File::open(&path).map_err(io)?.take(written);
            let loaded = Loaded::from_lines(BufReader::new(head), now).map_err(io)?;
            let mut out = File::create(&tmp).map_err(io)?;
            out.write_all(lines_text(loaded.entries.iter().map(|(l, _)| l.as_str())).as_bytes())
                .map_err(io)?;
            let kept = loaded.entries.len();

            let mut journal = lock(&self.journal);
            let Some(journal) = journal.as_mut() else {
                return Ok(None);
            };
            let mut tail = Vec::new();
            let mut file = File::open(&path).map_err(io)?;
            file.seek(SeekFrom::Start(written)).map_err(io)?;
            file.read_to_end(&mut tail).map_err(io)?;
            out.write_all(&tail).map_err(io)?;
            install(out, &tmp, &path).map_err(io)?;
            journal.file = OpenOptions::new().append(true).open(&path).map_err(io)?;
            let tail_lines = tail.iter().filter(|b| **b == b'\n').count();
            // Every line is counted: what the head lost is the difference.
            let before = journal.lines;
            journal.lines = kept + tail_lines;
            Ok(Some(Compacted {
                kept: journal.lines,
                dropped: before.saturating_sub(journal.lines),
            }))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// The folder the journal is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Backend for JournalBackend {
    fn load(&self, now: i64) -> Result<Loaded, RevocationError> {
        let (journal, loaded) = Journal::open(&self.dir, now)?;
        *lock(&self.journal) = Some(journal);
        Ok(loaded)
    }

    fn append(&self, lines: &[String]) -> Result<(), RevocationError> {
        // A poisoned lock still holds an open file positioned for appends:
        // taking it back is safe, refusing would lose the entries.
        match lock(&self.journal).as_mut() {
            Some(journal) => journal.append(lines.iter().map(String::as_str)),
            None => Err(RevocationError::Task(
                "the revocation journal was appended to before it was loaded".into(),
            )),
        }
    }

    fn describe(&self) -> String {
        format!("journal {}", self.dir.join(JOURNAL_FILE).display())
    }

    fn compact(&self, now: i64, in_force: usize) -> Result<Option<Compacted>, RevocationError> {
        self.compact_running(now, in_force)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revocation::{Revocation, Target};

    fn entry(kid: &str, expires_at: i64) -> (String, Revocation) {
        let r = Revocation {
            target: Target::Key {
                kid: kid.into(),
                issued_before: None,
            },
            created_at: 1,
            expires_at,
            reason: String::new(),
        };
        (r.to_line(), r)
    }

    #[test]
    fn replays_compacts_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, replay) = Journal::open(dir.path(), 100).unwrap();
        assert!(replay.entries.is_empty());
        let (live, _) = entry("live", 200);
        let (old, _) = entry("old", 150);
        journal.append([live.as_str(), old.as_str()]).unwrap();
        drop(journal);
        // A torn write at the end.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"target\":{\"kind\":\"ke").unwrap();
        drop(f);

        let (_journal, replay) = Journal::open(dir.path(), 160).unwrap();
        assert_eq!(replay.entries.len(), 1);
        assert_eq!(replay.entries[0].0, live);
        assert_eq!(replay.expired, 1);
        assert_eq!(replay.unreadable, 1);
        let text = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(text, format!("{live}\n"));
    }

    /// Found by `fuzz_journal_replay`: a write torn inside a multi-byte
    /// character (a reason in any language) left bytes that are not UTF-8,
    /// and the whole journal failed to open, so the server did not start.
    #[test]
    fn a_line_torn_inside_a_character_costs_that_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 100).unwrap();
        let (live, _) = entry("live", 200);
        journal.append([live.as_str()]).unwrap();
        drop(journal);
        let torn = "{\"target\":{\"kind\":\"token\",\"jti\":\"x\"},\"reason\":\"clé".as_bytes();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(&torn[..torn.len() - 1]).unwrap();
        drop(f);

        let (_journal, replay) = Journal::open(dir.path(), 160).unwrap();
        assert_eq!(replay.entries.len(), 1);
        assert_eq!(replay.entries[0].0, live);
        assert_eq!(replay.unreadable, 1);
    }

    #[test]
    fn compacts_while_running_and_keeps_what_is_appended_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            std::sync::Arc::new(JournalBackend::new(dir.path()).with_compact_min_lines(50));
        backend.load(100).unwrap();
        assert_eq!(backend.compact(100, 0).unwrap(), None, "nothing to do yet");
        let expiring: Vec<String> = (0..60).map(|i| entry(&format!("old{i}"), 150).0).collect();
        let lasting: Vec<String> = (0..5).map(|i| entry(&format!("new{i}"), 500).0).collect();
        backend.append(&expiring).unwrap();
        backend.append(&lasting).unwrap();
        assert_eq!(
            backend.compact(100, 65).unwrap(),
            None,
            "every line in force: nothing to drop, not rewritten"
        );

        // Appends go on from another thread while it compacts.
        let writer = {
            let backend = backend.clone();
            std::thread::spawn(move || {
                let mut written = Vec::new();
                for i in 0..200 {
                    let line = entry(&format!("during{i}"), 500).0;
                    backend.append(std::slice::from_ref(&line)).unwrap();
                    written.push(line);
                }
                written
            })
        };
        let compacted = backend
            .compact(200, 5)
            .unwrap()
            .expect("due: 65 lines, 0 kept");
        let during = writer.join().unwrap();
        assert!(compacted.kept >= 5, "{compacted:?}");

        let text = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        for line in lasting.iter().chain(&during) {
            assert!(text.lines().any(|l| l == line), "lost {line}");
        }
        assert!(!text.contains("old"), "expired entries dropped");
        // Appends continue on the compacted file, and a reload sees it all.
        let after = entry("after", 500).0;
        backend.append(std::slice::from_ref(&after)).unwrap();
        let reloaded = JournalBackend::new(dir.path()).load(200).unwrap();
        assert_eq!(reloaded.entries.len(), 5 + 200 + 1);
        assert!(!dir.path().join(format!("{JOURNAL_FILE}.compact")).exists());
    }

    #[test]
    fn the_journal_refuses_appends_before_it_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let backend = JournalBackend::new(dir.path());
        assert!(backend.append(&[entry("k", 200).0]).is_err());
        backend.load(100).unwrap();
        backend.append(&[entry("k", 200).0]).unwrap();
        let again = JournalBackend::new(dir.path());
        assert_eq!(again.load(100).unwrap().entries.len(), 1);
        assert!(backend.describe().ends_with("revocations.log"));
    }
}

/// Fuzz target of the journal replay (see [`crate::fuzz`]): a journal file
/// mutated as a crash, a torn write or a bad disk leaves it. Oracle: no
/// panic, the journal always opens (a damaged line costs that line only),
/// and every entry replayed is an intact, unexpired line of the file.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{Target, bytes, run};
    use crate::revocation::{Revocation, Target as Revoked};

    const NOW: i64 = 1_900_000_000;

    fn line(target: Revoked, expires_at: i64, reason: &str) -> String {
        Revocation {
            target,
            created_at: NOW - 60,
            expires_at,
            reason: reason.into(),
        }
        .to_line()
    }

    #[test]
    fn fuzz_journal_replay() {
        let token = |jti: &str| Revoked::Token {
            jti: jti.into(),
            issuer: Some("https://idp.test".into()),
        };
        let subject = Revoked::Subject {
            sub: "alice".into(),
            issued_before: NOW - 10,
        };
        let journal = [
            line(token("t1"), NOW + 600, "leaked"),
            line(
                subject.clone(),
                NOW + 3600,
                "compte compromis (clé volée) ✓",
            ),
            line(token("t2"), NOW - 1, "expired already"),
            line(token("t3"), NOW + 60, ""),
        ]
        .join("\n")
            + "\n";
        let dictionary = bytes([
            "\n",
            "{",
            "}",
            "\"",
            ",",
            ":",
            "\"expires_at\":",
            "\"target\":",
            "\"jti\":",
            "9223372036854775807",
            "-9223372036854775808",
            "1e3",
            "null",
            "é",
            "✓",
        ]);
        let dir = tempfile::tempdir().unwrap();
        run(
            Target {
                name: "journal_replay",
                seeds: bytes([journal.clone(), format!("{journal}{{\"target\":")]),
                dictionary,
                // Each input is written, replayed and compacted with fsyncs.
                cases: 1000,
            },
            |input| {
                std::fs::write(dir.path().join(JOURNAL_FILE), input).unwrap();
                let opened = Journal::open(dir.path(), NOW);
                let (_, loaded) = opened.expect("a damaged journal still opens");
                let text = String::from_utf8_lossy(input);
                for (stored, entry) in &loaded.entries {
                    assert!(entry.expires_at > NOW, "an expired entry replayed");
                    assert!(
                        text.lines().any(|l| l.trim() == stored),
                        "replayed a line the file does not hold intact: {stored}"
                    );
                }
            },
        );
    }
}
