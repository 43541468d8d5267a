//! Object storage for parts, manifests and pointers: S3 (Lambda) or a local folder.
//!
//! Both keep the same key layout; the core only sees [`ObjectSink`].

pub mod catalog;
pub mod local;
pub mod manifest;
pub mod part;
pub mod s3;
pub mod streaming;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

/// An object as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key (prefix included).
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
}

/// Where output objects go.
#[async_trait]
pub trait ObjectSink: Send + Sync {
    /// Writes a small object whole (manifests, pointers, schemas), replacing any previous one.
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<()>;

    /// Reads a small object, `None` if it does not exist.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Deletes objects; keys that do not exist are not an error.
    async fn delete(&self, keys: &[String]) -> Result<()>;

    /// Starts a streamed upload of one object; it becomes visible only on [`Upload::finish`].
    async fn start_upload(&self, key: &str, content_type: &str) -> Result<Box<dyn Upload>>;

    /// Removes what killed writers left in the folder `prefix` names (objects half written
    /// and never finished), once nothing can still be writing it. S3 needs nothing: its
    /// lifecycle rule aborts abandoned multipart uploads.
    async fn sweep(&self, _prefix: &str) -> Result<()> {
        Ok(())
    }

    /// Where the objects go, for people (`s3://bucket` or a folder).
    fn location(&self) -> String;

    /// The full address of an object (`s3://bucket/key`, or a path under the folder).
    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.location())
    }
}

/// One object being written as a stream of chunks.
#[async_trait]
pub trait Upload: Send {
    /// Appends bytes to the object (S3 buffers them into multipart parts of at least 5 MiB).
    async fn write(&mut self, chunk: Bytes) -> Result<()>;

    /// Completes the object and returns its stored size in bytes.
    async fn finish(self: Box<Self>) -> Result<u64>;

    /// Discards everything written; nothing of the object remains.
    async fn abort(self: Box<Self>) -> Result<()>;
}
