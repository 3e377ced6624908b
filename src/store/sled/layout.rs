//! The store directory's layout: which sled directory (generation) is active, the `CURRENT`
//! file that names it, the directory lock, and the removal of what a crash left behind.
//!
//! # Layout
//! ```text
//! <store>/coney.lock     the directory lock (flock), held while a store is open
//! <store>/CURRENT        names the active generation ("gen-3 <crc32>"); absent: generation 0
//! <store>/gen-3/         generation 3: a sled directory (db, conf, blobs/, snap.*, coney.commit)
//! <store>/db, conf, ...  generation 0: sled's files directly in the store directory
//! ```
//! Every store starts in generation 0, which is also the layout of stores written before
//! compaction existed. A compaction copies the live records into generation `N + 1` and makes
//! it active by writing `CURRENT` (a temporary file, synced, renamed over `CURRENT`, then the
//! directory synced: the rename is the commit point), then removes the old generation.
//!
//! # Invariants
//! - A generation named by `CURRENT` (or generation 0 when there is no `CURRENT`) is complete:
//!   `CURRENT` is written only after the generation it names was synced whole (files, their
//!   directory, its commit file), so a crash at any step leaves the old or the new generation
//!   active, each complete.
//! - Whatever `CURRENT` does not name is a leftover, removed on open once the active
//!   generation opened: a generation being written or being removed, `CURRENT.tmp`, and, when a
//!   generation above 0 is active, generation 0's sled files. Nothing else in the directory is
//!   touched (not `CURRENT`, not the lock, not files the store does not know).
//! - Everything here runs under the directory lock, so no other store reads or removes a
//!   generation meanwhile (sled's own lock is per generation, which would not cover the switch).
//! - Damage is [`StoreError::CorruptStore`]: a `CURRENT` that fails its checksum or names a
//!   missing generation, or generations with neither `CURRENT` nor generation 0's log (a lost
//!   `CURRENT`).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::super::StoreError;
use super::super::commit_file;
use super::{corrupt_store, entries, sync_file};

/// The file naming the active generation.
pub(super) const CURRENT: &str = "CURRENT";
/// Where `CURRENT` is written before the rename that commits it.
const CURRENT_TMP: &str = "CURRENT.tmp";
/// The directory lock's file.
pub(super) const LOCK: &str = "coney.lock";
/// How a generation directory's name starts (then its number, in decimal).
const GENERATION_PREFIX: &str = "gen-";

/// A generation: 0 is the store directory itself, `N > 0` its subdirectory `gen-N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct GenerationId(pub(super) u64);

impl GenerationId {
    /// The sled directory of this generation in store directory `root`.
    pub(super) fn dir(self, root: &Path) -> PathBuf {
        match self.0 {
            0 => root.to_path_buf(),
            n => root.join(format!("{GENERATION_PREFIX}{n}")),
        }
    }

    /// The generation a directory entry's name denotes (`gen-N`, `N > 0`, no leading zeros).
    fn parse(name: &str) -> Option<GenerationId> {
        let digits = name.strip_prefix(GENERATION_PREFIX)?;
        let n: u64 = digits.parse().ok()?;
        (n > 0 && n.to_string() == digits).then_some(GenerationId(n))
    }
}

/// The store directory's lock: an exclusive `flock` on [`LOCK`], held until dropped.
#[derive(Debug)]
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of store directory `root` (which exists), creating its file if needed
    /// (the caller syncs the directory). [`StoreError::Locked`] if another store holds it.
    pub(super) fn acquire(root: &Path) -> Result<DirLock, StoreError> {
        let path = root.join(LOCK);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::Storage(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(format!(
                "{} is open in another process (or another store in this one)",
                root.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Storage(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }
}

/// The active generation of store directory `root`, from `CURRENT`.
pub(super) fn read_current(root: &Path) -> Result<GenerationId, StoreError> {
    let path = root.join(CURRENT);
    let text = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return generation_zero(root),
        Err(e) => {
            return Err(StoreError::Storage(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let id = decode_current(&text)
        .ok_or_else(|| corrupt_store(&path, "CURRENT is damaged (format or checksum)".into()))?;
    let dir = id.dir(root);
    if !dir.is_dir() {
        return Err(corrupt_store(
            &dir,
            format!("CURRENT names generation {}, which is missing", id.0),
        ));
    }
    Ok(id)
}

/// Generation 0, unless the directory holds generations without a `CURRENT` naming one and
/// without generation 0's log: then `CURRENT` was lost.
fn generation_zero(root: &Path) -> Result<GenerationId, StoreError> {
    let names = match entries(root) {
        Ok(names) => names,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(GenerationId(0)),
        Err(e) => {
            return Err(StoreError::Storage(format!(
                "cannot list {}: {e}",
                root.display()
            )));
        }
    };
    if names.contains(&OsString::from("db")) {
        return Ok(GenerationId(0));
    }
    let generations: Vec<String> = names
        .iter()
        .filter_map(|name| name.to_str())
        .filter(|name| GenerationId::parse(name).is_some())
        .map(str::to_owned)
        .collect();
    if generations.is_empty() {
        return Ok(GenerationId(0));
    }
    Err(corrupt_store(
        &root.join(CURRENT),
        format!(
            "CURRENT is missing, but the directory holds {} and no log of its own",
            generations.join(", ")
        ),
    ))
}

/// Makes generation `id` the active one: `CURRENT.tmp` written and synced, renamed over
/// `CURRENT`, the directory synced. Returns whether the rename happened: after an error with
/// `true`, `CURRENT` may name either generation after a crash.
pub(super) fn write_current(root: &Path, id: GenerationId) -> (bool, io::Result<()>) {
    let tmp = root.join(CURRENT_TMP);
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&encode_current(id))?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return (false, Err(e));
    }
    if let Err(e) = std::fs::rename(&tmp, root.join(CURRENT)) {
        let _ = std::fs::remove_file(&tmp);
        return (false, Err(e));
    }
    (true, sync_file(root))
}

/// `CURRENT`'s contents: `gen-N`, a space, the CRC-32 of `gen-N` in hex, a newline.
fn encode_current(id: GenerationId) -> Vec<u8> {
    let name = format!("{GENERATION_PREFIX}{}", id.0);
    format!("{name} {:08x}\n", crc32fast::hash(name.as_bytes())).into_bytes()
}

/// The generation `CURRENT`'s contents name, if they are exactly what [`encode_current`]
/// writes for it.
fn decode_current(bytes: &[u8]) -> Option<GenerationId> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (name, _) = text.split_once(' ')?;
    let id = GenerationId::parse(name)?;
    (encode_current(id) == bytes).then_some(id)
}

/// Removes what is not part of generation `active` (see the module's invariants) from
/// `root`; returns the names removed. Called with the directory lock held, after the active
/// generation opened.
pub(super) fn remove_leftovers(root: &Path, active: GenerationId) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in entries(root)? {
        let Some(text) = name.to_str() else { continue };
        let leftover = text == CURRENT_TMP
            || GenerationId::parse(text).is_some_and(|id| id != active)
            || (active.0 > 0 && is_generation_zero_file(text));
        if leftover {
            remove_entry(&root.join(&name))?;
            removed.push(text.to_owned());
        }
    }
    if !removed.is_empty() {
        sync_file(root)?;
    }
    Ok(removed)
}

/// Removes generation `id` (after a compaction switched away from it): its directory, or for
/// generation 0 sled's files and the commit file in the store directory.
pub(super) fn remove_generation(root: &Path, id: GenerationId) -> io::Result<()> {
    if id.0 > 0 {
        remove_entry(&id.dir(root))?;
    } else {
        for name in entries(root)? {
            if name.to_str().is_some_and(is_generation_zero_file) {
                remove_entry(&root.join(&name))?;
            }
        }
    }
    sync_file(root)
}

/// Whether a name in the store directory is one of generation 0's files: sled's (`db`,
/// `conf`, `blobs`, `snap.*`) or the commit file's.
fn is_generation_zero_file(name: &str) -> bool {
    matches!(name, "db" | "conf" | "blobs")
        || name.starts_with("snap.")
        || name == commit_file::NAME
        || name == commit_file::TMP_NAME
}

/// Removes a file or a directory tree; one already gone is not an error.
fn remove_entry(path: &Path) -> io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The generations present in `root` (directories named `gen-N`), ascending.
pub(super) fn generations(root: &Path) -> io::Result<Vec<GenerationId>> {
    let mut found: Vec<GenerationId> = entries(root)?
        .iter()
        .filter_map(|name| name.to_str().and_then(GenerationId::parse))
        .collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_round_trips_and_rejects_damage() {
        for n in [1u64, 7, 12_345, u64::MAX] {
            let bytes = encode_current(GenerationId(n));
            assert_eq!(decode_current(&bytes), Some(GenerationId(n)));
            for at in 0..bytes.len() {
                for bit in 0..8 {
                    let mut damaged = bytes.clone();
                    damaged[at] ^= 1 << bit;
                    assert_eq!(decode_current(&damaged), None, "bit {bit} of byte {at}");
                }
            }
        }
        assert_eq!(decode_current(b""), None);
        assert_eq!(decode_current(b"gen-0 00000000\n"), None);
    }

    #[test]
    fn generation_names_are_canonical() {
        assert_eq!(GenerationId::parse("gen-3"), Some(GenerationId(3)));
        for name in [
            "gen-0",
            "gen-03",
            "gen-",
            "gen-x",
            "gen-3.tmp",
            "db",
            "CURRENT",
        ] {
            assert_eq!(GenerationId::parse(name), None, "{name}");
        }
    }
}
