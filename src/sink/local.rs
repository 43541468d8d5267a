//! The local folder sink (the local command): a key is a path under the root folder.
//!
//! An object is written to a hidden temporary file beside it (`.{name}.tmp-{random}`), synced and
//! renamed into place, so a partial object is never visible. Hidden names are never listed and
//! are refused as keys: they belong to temporary files (and to the state file, which may share
//! the folder).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{ObjectInfo, ObjectSink, Upload};
use crate::error::{Error, Result};

/// The local folder sink.
#[derive(Clone, Debug)]
pub struct LocalSink {
    root: PathBuf,
}

/// How long a temporary file stays untouched before it counts as abandoned.
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

impl LocalSink {
    /// A sink writing under the folder `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        // Absolute, so that addresses written into files (the symlink manifests) hold from
        // anywhere, not only from the folder the command ran in.
        let root = root.into();
        let root = std::path::absolute(&root).unwrap_or(root);
        LocalSink { root }
    }

    /// The path of `key`; a key that could leave the root or name a hidden file is refused.
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let bad = |why: &str| Error::storage(format!("invalid object key {key:?}: {why}"));
        if key.is_empty() {
            return Err(bad("empty"));
        }
        if key.starts_with('/') {
            return Err(bad("starts with /"));
        }
        let mut path = self.root.clone();
        for part in key.split('/') {
            match part {
                "" => return Err(bad("has an empty component")),
                "." | ".." => return Err(bad("has a . or .. component")),
                p if p.starts_with('.') => {
                    return Err(bad("hidden names are reserved for temporary files"));
                }
                p if p.contains('\\') => return Err(bad("contains a backslash")),
                p => path.push(p),
            }
        }
        Ok(path)
    }

    /// `path` as a key: its components under the root joined by `/`.
    fn key_of(&self, path: &Path) -> Option<String> {
        let relative = path.strip_prefix(&self.root).ok()?;
        let parts = relative
            .components()
            .map(|c| c.as_os_str().to_str())
            .collect::<Option<Vec<_>>>()?;
        Some(parts.join("/"))
    }
}

#[async_trait]
impl ObjectSink for LocalSink {
    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<()> {
        let path = self.path_of(key)?;
        blocking(move || {
            let (tmp, mut file) = create_temp(&path)?;
            let written = file
                .write_all(&body)
                .and_then(|()| file.sync_all())
                .and_then(|()| fs::rename(&tmp, &path));
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(io_error("writing", &path, e));
            }
            sync_parent(&path);
            Ok(())
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(body) => Ok(Some(Bytes::from(body))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", &path, e)),
        }
    }

    async fn sweep(&self, prefix: &str) -> Result<()> {
        let folder = match self.path_of(prefix.trim_end_matches('/')) {
            Ok(folder) => folder,
            Err(_) => return Ok(()),
        };
        blocking(move || {
            let entries = match fs::read_dir(&folder) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error("listing", &folder, e)),
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !(name.starts_with('.') && name.contains(".tmp-")) {
                    continue;
                }
                // A writer touches its temporary file with every chunk: one untouched this
                // long belongs to a process that was killed.
                let abandoned = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= ABANDONED_AFTER);
                if abandoned {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => tracing::info!(file = %entry.path().display(), "removed a temporary file a killed run left"),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_error("removing", &entry.path(), e)),
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Walk only the deepest folder the prefix names; keys are then filtered by the prefix.
        // A folder that is no valid key path cannot hold any valid key.
        let folder = match prefix.rfind('/') {
            Some(end) => match self.path_of(&prefix[..end]) {
                Ok(folder) => folder,
                Err(_) => return Ok(Vec::new()),
            },
            None => self.root.clone(),
        };
        let sink = self.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut objects = Vec::new();
            let mut folders = vec![folder];
            while let Some(folder) = folders.pop() {
                let entries = match fs::read_dir(&folder) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("listing", &folder, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| io_error("listing", &folder, e))?;
                    if entry.file_name().to_string_lossy().starts_with('.') {
                        continue;
                    }
                    let path = entry.path();
                    let kind = entry
                        .file_type()
                        .map_err(|e| io_error("listing", &path, e))?;
                    if kind.is_dir() {
                        folders.push(path);
                    } else if kind.is_file()
                        && let Some(key) = sink.key_of(&path)
                        && key.starts_with(&prefix)
                    {
                        let size = entry
                            .metadata()
                            .map_err(|e| io_error("listing", &path, e))?
                            .len();
                        objects.push(ObjectInfo { key, size });
                    }
                }
            }
            objects.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(objects)
        })
        .await
    }

    async fn delete(&self, keys: &[String]) -> Result<()> {
        let paths = keys
            .iter()
            .map(|k| self.path_of(k))
            .collect::<Result<Vec<_>>>()?;
        blocking(move || {
            for path in paths {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("deleting", &path, e)),
                }
            }
            Ok(())
        })
        .await
    }

    async fn start_upload(&self, key: &str, _content_type: &str) -> Result<Box<dyn Upload>> {
        let path = self.path_of(key)?;
        let (tmp, path, file) = blocking(move || {
            let (tmp, file) = create_temp(&path)?;
            Ok((tmp, path, file))
        })
        .await?;
        Ok(Box::new(LocalUpload {
            file: Some(tokio::fs::File::from_std(file)),
            tmp,
            path,
            size: 0,
        }))
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// One object being written to its temporary file.
struct LocalUpload {
    /// `None` once finished or aborted.
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    size: u64,
}

impl LocalUpload {
    fn file(&mut self) -> Result<&mut tokio::fs::File> {
        self.file.as_mut().ok_or_else(|| {
            Error::storage(format!(
                "writing {}: the upload is already closed",
                self.path.display()
            ))
        })
    }
}

#[async_trait]
impl Upload for LocalUpload {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let path = self.path.clone();
        self.file()?
            .write_all(&chunk)
            .await
            .map_err(|e| io_error("writing", &path, e))?;
        self.size += chunk.len() as u64;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64> {
        let path = self.path.clone();
        let file = self.file()?;
        file.flush()
            .await
            .map_err(|e| io_error("writing", &path, e))?;
        file.sync_all()
            .await
            .map_err(|e| io_error("syncing", &path, e))?;
        self.file = None;
        if let Err(e) = tokio::fs::rename(&self.tmp, &self.path).await {
            let _ = tokio::fs::remove_file(&self.tmp).await;
            return Err(io_error("renaming into place", &self.path, e));
        }
        sync_parent(&self.path);
        Ok(self.size)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.file = None;
        match tokio::fs::remove_file(&self.tmp).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing", &self.tmp, e)),
        }
    }
}

impl Drop for LocalUpload {
    /// An upload dropped without `finish` or `abort` still removes its temporary file.
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Creates the folder of `path` and a new hidden temporary file beside it.
fn create_temp(path: &Path) -> Result<(PathBuf, fs::File)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| io_error("creating the folder", dir, e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io_error("creating", &tmp, e))?;
    Ok((tmp, file))
}

/// Makes a rename in the folder of `path` durable; best effort, the object is already visible.
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent()
        && let Ok(dir) = fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
}

/// Runs file work off the async threads.
async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage(format!("a file task failed: {e}")))?
}

fn io_error(op: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format_args!("{op} {}", path.display()), e)
}
