//! The S3 sink (Lambda): objects in one bucket, parts streamed by multipart upload.
//!
//! An upload buffers at most about one part: the multipart upload is created only when the first
//! part is full, each full part is sent as it fills, and an object smaller than one part is a
//! single PutObject. A failed upload is aborted, so no orphaned multipart upload is left behind.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};

use super::{ObjectInfo, ObjectSink, Upload};
use crate::error::{Error, Result, describe_sdk_error as describe};

/// Default multipart part size.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// S3's smallest part (every part but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// S3's largest part number.
const MAX_PARTS: i32 = 10_000;
/// S3's most keys per DeleteObjects request.
const DELETE_BATCH: usize = 1000;
/// How many failed keys a delete error names.
const ERRORS_SHOWN: usize = 5;

/// The S3 sink.
#[derive(Clone, Debug)]
pub struct S3Sink {
    client: Client,
    bucket: String,
    part_size: usize,
}

impl S3Sink {
    /// A sink writing to `bucket` with 8 MiB parts.
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        S3Sink {
            client,
            bucket: bucket.into(),
            part_size: DEFAULT_PART_SIZE,
        }
    }

    /// Sets the multipart part size (raised to S3's minimum of 5 MiB).
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(MIN_PART_SIZE);
        self
    }

    fn fail<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        failure(op, &self.bucket, key, err)
    }
}

/// An SDK failure as a storage error naming the operation and the object.
fn failure<E>(op: &str, bucket: &str, key: &str, err: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let err_text = describe(&err);
    let cause = crate::error::sdk_cause(&err);
    Error::storage(format!("{op} s3://{bucket}/{key}: {err_text}"))
        .with_source(err)
        .with_cause_if(cause)
}

#[async_trait]
impl ObjectSink for S3Sink {
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.fail("writing", key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.fail("reading", key, e)),
        };
        let body = out.body.collect().await.map_err(|e| {
            Error::storage(format!(
                "reading s3://{}/{key}: the body broke off: {e}",
                self.bucket
            ))
        })?;
        Ok(Some(body.into_bytes()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|e| self.fail("listing", &format!("{prefix}*"), e))?
        {
            objects.extend(page.contents().iter().filter_map(|o| {
                Some(ObjectInfo {
                    key: o.key()?.to_owned(),
                    size: o.size().unwrap_or(0).try_into().unwrap_or(0),
                })
            }));
        }
        // S3 lists in key order already; sorting keeps the contract whatever the endpoint.
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn delete(&self, keys: &[String]) -> Result<()> {
        for batch in keys.chunks(DELETE_BATCH) {
            let objects = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::storage(format!("deleting from s3://{}: {e}", self.bucket)))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| Error::storage(format!("deleting from s3://{}: {e}", self.bucket)))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| {
                    self.fail(
                        &format!("deleting {} objects, the first", batch.len()),
                        &batch[0],
                        e,
                    )
                })?;
            let errors = out.errors();
            if !errors.is_empty() {
                let shown: Vec<String> = errors
                    .iter()
                    .take(ERRORS_SHOWN)
                    .map(|e| {
                        format!(
                            "{}: {} {}",
                            e.key().unwrap_or("?"),
                            e.code().unwrap_or("error"),
                            e.message().unwrap_or("")
                        )
                    })
                    .collect();
                let more = errors.len().saturating_sub(ERRORS_SHOWN);
                return Err(Error::storage(format!(
                    "deleting from s3://{}: {} of {} objects failed: {}{}",
                    self.bucket,
                    errors.len(),
                    batch.len(),
                    shown.join("; "),
                    if more > 0 {
                        format!("; and {more} more")
                    } else {
                        String::new()
                    }
                )));
            }
        }
        Ok(())
    }

    async fn start_upload(&self, key: &str, content_type: &str) -> Result<Box<dyn Upload>> {
        Ok(Box::new(S3Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            content_type: content_type.to_owned(),
            part_size: self.part_size,
            buffer: BytesMut::new(),
            multipart: None,
            size: 0,
            failed: false,
        }))
    }

    fn location(&self) -> String {
        format!("s3://{}", self.bucket)
    }
}

/// A multipart upload in progress.
#[derive(Debug)]
struct Multipart {
    upload_id: String,
    parts: Vec<CompletedPart>,
}

/// One object being streamed to S3.
struct S3Upload {
    client: Client,
    bucket: String,
    key: String,
    content_type: String,
    part_size: usize,
    /// Bytes not sent yet (less than one part between calls).
    buffer: BytesMut,
    /// Created when the first part is full.
    multipart: Option<Multipart>,
    /// Bytes written so far.
    size: u64,
    /// A part failed and the upload was aborted: nothing more can be written.
    failed: bool,
}

impl S3Upload {
    fn fail<E>(&self, op: &str, err: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        failure(op, &self.bucket, &self.key, err)
    }

    fn check_usable(&self) -> Result<()> {
        if self.failed {
            return Err(Error::storage(format!(
                "uploading s3://{}/{}: the upload already failed and was aborted",
                self.bucket, self.key
            )));
        }
        Ok(())
    }

    /// Sends one part, creating the multipart upload first if needed; on failure the
    /// multipart upload is aborted before the error is returned.
    async fn send_part(&mut self, body: Bytes) -> Result<()> {
        let sent = self.try_send_part(body).await;
        if sent.is_err() {
            self.failed = true;
            // The part's error matters more than a failed clean-up.
            let _ = self.abort_multipart().await;
        }
        sent
    }

    async fn try_send_part(&mut self, body: Bytes) -> Result<()> {
        let (upload_id, done) = match &self.multipart {
            Some(m) => (m.upload_id.clone(), m.parts.len()),
            None => {
                let created = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .content_type(&self.content_type)
                    .send()
                    .await
                    .map_err(|e| self.fail("starting the multipart upload of", e))?;
                let upload_id = created.upload_id().map(str::to_owned).ok_or_else(|| {
                    Error::storage(format!(
                        "starting the multipart upload of s3://{}/{}: no upload id in the answer",
                        self.bucket, self.key
                    ))
                })?;
                self.multipart = Some(Multipart {
                    upload_id: upload_id.clone(),
                    parts: Vec::new(),
                });
                (upload_id, 0)
            }
        };
        let number = i32::try_from(done + 1).unwrap_or(i32::MAX);
        if number > MAX_PARTS {
            return Err(Error::storage(format!(
                "uploading s3://{}/{}: more than {MAX_PARTS} parts; use a larger part size",
                self.bucket, self.key
            )));
        }
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.fail(&format!("uploading part {number} of"), e))?;
        let part = CompletedPart::builder()
            .set_e_tag(uploaded.e_tag().map(str::to_owned))
            .part_number(number)
            .build();
        if let Some(multipart) = &mut self.multipart {
            multipart.parts.push(part);
        }
        Ok(())
    }

    /// Aborts the multipart upload, if one was created.
    async fn abort_multipart(&mut self) -> Result<()> {
        let Some(multipart) = self.multipart.take() else {
            return Ok(());
        };
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&multipart.upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_upload()) => Ok(()),
            Err(e) => Err(self.fail("aborting the multipart upload of", e)),
        }
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.check_usable()?;
        self.size += chunk.len() as u64;
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= self.part_size {
            let part = self.buffer.split_to(self.part_size).freeze();
            self.send_part(part).await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64> {
        self.check_usable()?;
        let rest = std::mem::take(&mut self.buffer).freeze();
        if self.multipart.is_some() && !rest.is_empty() {
            self.send_part(rest.clone()).await?;
        }
        let Some(multipart) = self.multipart.take() else {
            // Never a full part: one PutObject.
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .content_type(&self.content_type)
                .body(ByteStream::from(rest))
                .send()
                .await
                .map_err(|e| self.fail("writing", e))?;
            return Ok(self.size);
        };
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&multipart.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(multipart.parts.clone()))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = completed {
            let error = self.fail("completing the multipart upload of", e);
            self.multipart = Some(multipart);
            self.failed = true;
            let _ = self.abort_multipart().await;
            return Err(error);
        }
        Ok(self.size)
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.buffer.clear();
        self.abort_multipart().await
    }
}

impl Drop for S3Upload {
    /// An upload dropped without `finish` or `abort` (a panic, a cancelled task) still aborts
    /// its multipart upload, in the background, so no orphaned parts are billed.
    fn drop(&mut self) {
        let Some(multipart) = self.multipart.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let request = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(multipart.upload_id);
        runtime.spawn(async move {
            let _ = request.send().await;
        });
    }
}
