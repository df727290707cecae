//! The local append-only journal: one JSON revocation entry per line, fsynced on
//! every append, replayed and compacted on start.
//!
//! A torn last line (a crash in the middle of a write) is skipped with a warning;
//! every complete line that parses is kept until it expires.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use super::backend::{Backend, Loaded};
use super::{RevocationError, lock};

/// The journal's file name inside `[revocation] data_dir`.
pub const JOURNAL_FILE: &str = "revocations.log";

/// An open journal, positioned for appends.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
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
        {
            let mut out = File::create(&tmp).map_err(io)?;
            let mut text = String::new();
            for (line, _) in &replay.entries {
                text.push_str(line);
                text.push('\n');
            }
            out.write_all(text.as_bytes()).map_err(io)?;
            out.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = File::open(dir) {
            // Makes the rename durable; not every platform allows fsync on a folder.
            let _ = d.sync_all();
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        Ok((Journal { path, file }, replay))
    }

    /// Appends `lines` (serialized entries) and waits until they are on disk.
    pub fn append<'a>(
        &mut self,
        lines: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), RevocationError> {
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        let io = |source| RevocationError::Journal {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(text.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The append-only journal in a folder (`[revocation] data_dir`): one line
/// per entry, fsynced on every append, compacted when loaded.
#[derive(Debug)]
pub struct JournalBackend {
    dir: PathBuf,
    journal: Mutex<Option<Journal>>,
}

impl JournalBackend {
    /// The journal in `dir` (created on load if missing).
    pub fn new(dir: impl Into<PathBuf>) -> JournalBackend {
        JournalBackend {
            dir: dir.into(),
            journal: Mutex::new(None),
        }
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
