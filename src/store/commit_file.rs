//! The commit file: the last commit counter a flush of [`SledStore`](super::SledStore) made
//! durable, kept outside sled so that a log which lost writes can be told from one that never
//! had them (see "Lost writes" on `SledStore`).
//!
//! # Layout
//! `coney.commit` in the store's directory, [`FILE_LEN`] bytes: two slots, at offset 0 and at
//! [`SLOT_STRIDE`] (a page apart, so that no one sector or page write touches both). A slot is
//! the magic `coneycmt` (8 bytes), the counter (u64 little-endian) and a CRC-32 of those 16
//! bytes (u32 little-endian). Counter `n` goes to slot `n % 2` in one `pwrite`: a write torn by
//! a crash damages that slot only, and the other still holds `n - 1`. The file's counter is the
//! larger of the valid slots.
//!
//! # Invariants
//! - The file never leads the tree: counter `n` is written only after the flush that put `n`
//!   in the tree has reached stable storage. It may lag (a write not yet synced is lost in a
//!   power cut), which only makes the check weaker, never wrong.
//! - It exists whole or not at all: created as `coney.commit.tmp`, synced, renamed, and the
//!   directory synced, before any counter is written to the tree.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::StoreError;

/// The file's name in the store's directory.
pub(super) const NAME: &str = "coney.commit";
/// The name it is written under before the rename that creates it.
pub(super) const TMP_NAME: &str = "coney.commit.tmp";
/// What a slot starts with.
const MAGIC: [u8; 8] = *b"coneycmt";
/// Bytes of one slot: magic, counter, CRC.
const SLOT_LEN: usize = 8 + 8 + 4;
/// Offset of the second slot.
const SLOT_STRIDE: u64 = 4096;
/// Length of the whole file.
const FILE_LEN: u64 = SLOT_STRIDE + SLOT_LEN as u64;

/// The open commit file of a store.
#[derive(Debug)]
pub(super) struct CommitFile {
    file: File,
}

impl CommitFile {
    /// The counter recorded in `dir`'s commit file; `None` when there is no such file.
    /// A file of the wrong length or with no valid slot is [`StoreError::CorruptStore`].
    pub(super) fn read(dir: &Path) -> Result<Option<u64>, StoreError> {
        let path = dir.join(NAME);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Storage(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let corrupt = |reason: String| StoreError::CorruptStore {
            path: path.clone(),
            reason,
        };
        if u64::try_from(bytes.len()).ok() != Some(FILE_LEN) {
            return Err(corrupt(format!(
                "the commit file is {} bytes, not {FILE_LEN}",
                bytes.len()
            )));
        }
        let stride = usize::try_from(SLOT_STRIDE).expect("a page fits in usize");
        [&bytes[..SLOT_LEN], &bytes[stride..stride + SLOT_LEN]]
            .into_iter()
            .filter_map(decode_slot)
            .max()
            .map(Some)
            .ok_or_else(|| corrupt("neither slot of the commit file is valid".to_string()))
    }

    /// Creates `dir`'s commit file holding `counter` (through a synced temporary file, a
    /// rename and a sync of the directory) and opens it.
    pub(super) fn create(dir: &Path, counter: u64) -> io::Result<CommitFile> {
        let tmp = dir.join(TMP_NAME);
        {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            let mut bytes = vec![0u8; usize::try_from(FILE_LEN).expect("small")];
            bytes[..SLOT_LEN].copy_from_slice(&encode_slot(counter));
            file.write_all_at(&bytes, 0)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(NAME))?;
        File::open(dir)?.sync_all()?;
        Self::open(dir)
    }

    /// Opens `dir`'s existing commit file for writing.
    pub(super) fn open(dir: &Path) -> io::Result<CommitFile> {
        let file = OpenOptions::new().write(true).open(dir.join(NAME))?;
        Ok(CommitFile { file })
    }

    /// Writes `counter` into its slot, without syncing.
    pub(super) fn write(&self, counter: u64) -> io::Result<()> {
        self.file
            .write_all_at(&encode_slot(counter), (counter % 2) * SLOT_STRIDE)
    }

    /// `fdatasync` of the file.
    pub(super) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file's path in `dir`.
    pub(super) fn path(dir: &Path) -> PathBuf {
        dir.join(NAME)
    }
}

fn encode_slot(counter: u64) -> [u8; SLOT_LEN] {
    let mut slot = [0u8; SLOT_LEN];
    slot[..8].copy_from_slice(&MAGIC);
    slot[8..16].copy_from_slice(&counter.to_le_bytes());
    let crc = crc32fast::hash(&slot[..16]);
    slot[16..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// The counter of a valid slot.
fn decode_slot(slot: &[u8]) -> Option<u64> {
    let crc = u32::from_le_bytes(slot[16..SLOT_LEN].try_into().expect("4 bytes"));
    if slot[..8] != MAGIC || crc32fast::hash(&slot[..16]) != crc {
        return None;
    }
    Some(u64::from_le_bytes(slot[8..16].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("coney-commit-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_larger_valid_slot_wins_and_a_torn_slot_falls_back() {
        let dir = temp_dir("slots");
        assert_eq!(CommitFile::read(&dir), Ok(None));
        let file = CommitFile::create(&dir, 0).unwrap();
        assert_eq!(CommitFile::read(&dir), Ok(Some(0)));
        file.write(1).unwrap();
        file.write(2).unwrap();
        assert_eq!(CommitFile::read(&dir), Ok(Some(2)));
        file.write(3).unwrap();
        assert_eq!(CommitFile::read(&dir), Ok(Some(3)));
        // A torn write of 3 (slot 1) leaves 2.
        file.file
            .write_all_at(&[0xff; 4], SLOT_STRIDE + 10)
            .unwrap();
        assert_eq!(CommitFile::read(&dir), Ok(Some(2)));
        // Both slots damaged: corrupt, naming the file.
        file.file.write_all_at(&[0xff; 4], 10).unwrap();
        let err = CommitFile::read(&dir).unwrap_err();
        assert!(
            matches!(&err, StoreError::CorruptStore { path, .. } if path.ends_with(NAME)),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_of_the_wrong_length_is_corrupt() {
        let dir = temp_dir("length");
        CommitFile::create(&dir, 7).unwrap();
        let file = OpenOptions::new().write(true).open(dir.join(NAME)).unwrap();
        file.set_len(100).unwrap();
        assert!(matches!(
            CommitFile::read(&dir),
            Err(StoreError::CorruptStore { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
