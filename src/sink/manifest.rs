//! The format of `_manifest.json`: the parts a committed partition or snapshot holds. The
//! commit writes it ([`crate::run::commit`]); readers and the next runs read it.

use serde::{Deserialize, Serialize};

/// A committed part as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name within the partition.
    pub name: String,
    /// Records in the part.
    pub records: u64,
    /// Stored (compressed) size.
    pub bytes: u64,
}

/// `_manifest.json` of a committed partition or snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Table name.
    pub table: String,
    /// Partition, e.g. `date=2026-11-01`.
    pub partition: String,
    /// The attempt that wrote the parts.
    pub attempt: String,
    /// When it was committed (RFC 3339 UTC).
    pub committed_at: String,
    /// Records in all parts.
    pub records: u64,
    /// The parts.
    pub files: Vec<FileEntry>,
    /// Export days: the source lines that could not be used, kept raw under `_rejected/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<u64>,
    /// Export days: the parts holding those lines, in `{prefix}/export/_rejected/date=…/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_files: Option<Vec<FileEntry>>,
}
