//! The object sink contract: the same cases run against S3 (on moto) and a local folder.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use mixpanel_replicator::error::ErrorKind;
use mixpanel_replicator::sink::local::LocalSink;
use mixpanel_replicator::sink::s3::S3Sink;
use mixpanel_replicator::sink::{ObjectInfo, ObjectSink};
use support::aws::create_bucket;
use support::moto::Moto;

const BUCKET: &str = "replica";
const PART: usize = 5 * 1024 * 1024;
const JSONL: &str = "application/x-ndjson";

/// A sink under test and what keeps it alive.
struct Backend {
    sink: Arc<dyn ObjectSink>,
    s3: Option<aws_sdk_s3::Client>,
    dir: Option<tempfile::TempDir>,
    _moto: Option<Moto>,
}

impl Backend {
    async fn s3() -> Backend {
        let moto = Moto::start();
        let client = aws_sdk_s3::Client::new(&moto.sdk_config().await);
        create_bucket(&client, BUCKET).await;
        Backend {
            sink: Arc::new(S3Sink::new(client.clone(), BUCKET).with_part_size(PART)),
            s3: Some(client),
            dir: None,
            _moto: Some(moto),
        }
    }

    fn local() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        Backend {
            sink: Arc::new(LocalSink::new(dir.path().join("out"))),
            s3: None,
            dir: Some(dir),
            _moto: None,
        }
    }

    /// Asserts that S3 stored `key` from `parts` multipart parts (0: a single PutObject).
    async fn assert_parts(&self, key: &str, parts: usize) {
        let Some(s3) = &self.s3 else { return };
        let head = s3
            .head_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .expect("HeadObject");
        let etag = head
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string();
        let stored_parts = etag
            .split_once('-')
            .map_or(0, |(_, n)| n.parse().unwrap_or(0));
        assert_eq!(stored_parts, parts, "ETag {etag}");
    }

    /// Asserts that no unfinished upload remains: no multipart upload in S3, no temporary file
    /// in the folder.
    async fn assert_no_unfinished_upload(&self) {
        if let Some(s3) = &self.s3 {
            let uploads = s3
                .list_multipart_uploads()
                .bucket(BUCKET)
                .send()
                .await
                .expect("ListMultipartUploads");
            assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
        }
        if let Some(dir) = &self.dir {
            let hidden = every_file(dir.path())
                .into_iter()
                .filter(|name| name.contains(".tmp-"))
                .collect::<Vec<_>>();
            assert!(hidden.is_empty(), "temporary files left: {hidden:?}");
        }
    }
}

/// Runs every listed case against both sinks, each case on a fresh bucket or folder.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(&super::Backend::s3().await).await;
                }
            )*
        }
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(&super::Backend::local()).await;
                }
            )*
        }
    };
}

conformance!(
    a_multipart_upload_stores_exactly_the_bytes_written,
    a_small_upload_is_stored_whole,
    an_empty_upload_is_an_empty_object,
    an_upload_is_invisible_until_finished,
    an_aborted_upload_leaves_nothing,
    put_replaces_and_get_reads,
    list_returns_the_keys_under_a_prefix_in_key_order,
    delete_removes_keys_in_batches_and_ignores_missing_ones,
);

/// `len` reproducible pseudo-random bytes (so a misplaced part cannot go unnoticed).
fn data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

async fn a_multipart_upload_stores_exactly_the_bytes_written(b: &Backend) {
    let body = data(12 * 1024 * 1024 + 12_345);
    let key = "mixpanel/export/date=2026-11-01/part-a1-00000.jsonl.gz";
    let mut upload = b.sink.start_upload(key, "application/gzip").await.unwrap();
    let sizes = [1, 777, 65_536, 3 * 1024 * 1024 + 1, 10, 2 * 1024 * 1024 - 3];
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at == body.len() {
            break;
        }
        let end = (at + size).min(body.len());
        upload
            .write(Bytes::copy_from_slice(&body[at..end]))
            .await
            .unwrap();
        at = end;
    }
    assert_eq!(upload.finish().await.unwrap(), body.len() as u64);
    b.assert_parts(key, 3).await;

    let stored = b.sink.get(key).await.unwrap().expect("the object");
    assert!(
        stored.len() == body.len() && stored[..] == body[..],
        "bytes differ"
    );
    let listed = b.sink.list("mixpanel/").await.unwrap();
    assert_eq!(
        listed,
        vec![ObjectInfo {
            key: key.into(),
            size: body.len() as u64
        }]
    );
    b.assert_no_unfinished_upload().await;
}

async fn a_small_upload_is_stored_whole(b: &Backend) {
    let key = "t/date=2026-11-01/part-1.jsonl";
    let mut upload = b.sink.start_upload(key, JSONL).await.unwrap();
    upload
        .write(Bytes::from_static(b"{\"a\":1}\n"))
        .await
        .unwrap();
    upload.write(Bytes::new()).await.unwrap();
    upload
        .write(Bytes::from_static(b"{\"a\":2}\n"))
        .await
        .unwrap();
    assert_eq!(upload.finish().await.unwrap(), 16);
    b.assert_parts(key, 0).await;
    assert_eq!(
        b.sink.get(key).await.unwrap().as_deref(),
        Some(&b"{\"a\":1}\n{\"a\":2}\n"[..])
    );
    b.assert_no_unfinished_upload().await;
}

async fn an_empty_upload_is_an_empty_object(b: &Backend) {
    let upload = b.sink.start_upload("t/empty.jsonl", JSONL).await.unwrap();
    assert_eq!(upload.finish().await.unwrap(), 0);
    assert_eq!(
        b.sink.get("t/empty.jsonl").await.unwrap().as_deref(),
        Some(&b""[..])
    );
}

async fn an_upload_is_invisible_until_finished(b: &Backend) {
    let key = "t/date=2026-11-01/part-1.jsonl";
    let mut upload = b.sink.start_upload(key, JSONL).await.unwrap();
    upload.write(Bytes::from_static(b"{}\n")).await.unwrap();
    assert_eq!(b.sink.list("").await.unwrap(), vec![]);
    assert_eq!(b.sink.list("t/").await.unwrap(), vec![]);
    assert_eq!(b.sink.get(key).await.unwrap(), None);
    upload.finish().await.unwrap();
    assert_eq!(b.sink.list("").await.unwrap().len(), 1);
}

async fn an_aborted_upload_leaves_nothing(b: &Backend) {
    // Big enough that S3 has a multipart upload with a part in it...
    let mut big = b.sink.start_upload("t/big.jsonl", JSONL).await.unwrap();
    big.write(Bytes::from(data(PART + 1000))).await.unwrap();
    // ...and small enough that nothing was sent yet.
    let mut small = b.sink.start_upload("t/small.jsonl", JSONL).await.unwrap();
    small.write(Bytes::from_static(b"{}\n")).await.unwrap();

    big.abort().await.unwrap();
    small.abort().await.unwrap();
    assert_eq!(b.sink.get("t/big.jsonl").await.unwrap(), None);
    assert_eq!(b.sink.get("t/small.jsonl").await.unwrap(), None);
    assert_eq!(b.sink.list("").await.unwrap(), vec![]);
    b.assert_no_unfinished_upload().await;
}

async fn put_replaces_and_get_reads(b: &Backend) {
    let key = "mixpanel/export/_latest.json";
    assert_eq!(b.sink.get(key).await.unwrap(), None);
    b.sink
        .put(key, Bytes::from_static(b"{\"v\":1}"), "application/json")
        .await
        .unwrap();
    b.sink
        .put(key, Bytes::from_static(b"{\"v\":2}"), "application/json")
        .await
        .unwrap();
    assert_eq!(
        b.sink.get(key).await.unwrap().as_deref(),
        Some(&b"{\"v\":2}"[..])
    );
    assert_eq!(b.sink.list("").await.unwrap().len(), 1);
    b.assert_no_unfinished_upload().await;
}

async fn list_returns_the_keys_under_a_prefix_in_key_order(b: &Backend) {
    let keys = [
        "p/export/date=2026-11-02/part-b-00000.jsonl.gz",
        "p/export/date=2026-11-01/part-a-00001.jsonl.gz",
        "p/export/date=2026-11-01/_manifest.json",
        "p/export/date=2026-11-01/part-a-00000.jsonl.gz",
        "p/export_old/x.json",
        "p/engage/_latest.json",
        "q.json",
    ];
    for (i, key) in keys.iter().enumerate() {
        b.sink
            .put(key, Bytes::from(vec![b'x'; i + 1]), JSONL)
            .await
            .unwrap();
    }
    let listed = |prefix: &'static str| async move {
        b.sink
            .list(prefix)
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect::<Vec<_>>()
    };
    let key = |s: &str, size: u64| (s.to_string(), size);

    assert_eq!(
        listed("p/export/").await,
        vec![
            key("p/export/date=2026-11-01/_manifest.json", 3),
            key("p/export/date=2026-11-01/part-a-00000.jsonl.gz", 4),
            key("p/export/date=2026-11-01/part-a-00001.jsonl.gz", 2),
            key("p/export/date=2026-11-02/part-b-00000.jsonl.gz", 1),
        ]
    );
    assert_eq!(
        listed("p/export/date=2026-11-01/part-").await,
        vec![
            key("p/export/date=2026-11-01/part-a-00000.jsonl.gz", 4),
            key("p/export/date=2026-11-01/part-a-00001.jsonl.gz", 2),
        ]
    );
    assert_eq!(listed("p/export").await.len(), 5);
    assert_eq!(listed("p/e").await.len(), 6);
    let all: Vec<String> = listed("").await.into_iter().map(|(k, _)| k).collect();
    let mut sorted: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    sorted.sort();
    assert_eq!(all, sorted);
    assert_eq!(listed("p/nothing/").await, vec![]);
    assert_eq!(listed("nothing").await, vec![]);
}

async fn delete_removes_keys_in_batches_and_ignores_missing_ones(b: &Backend) {
    // More than one DeleteObjects batch of 1000.
    let keys: Vec<String> = (0..1003).map(|i| format!("d/k{i:04}")).collect();
    futures_util::stream::iter(keys.clone())
        .map(|k| async move { b.sink.put(&k, Bytes::from_static(b"1"), JSONL).await })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    b.sink
        .put("keep/me", Bytes::from_static(b"1"), JSONL)
        .await
        .unwrap();
    assert_eq!(b.sink.list("d/").await.unwrap().len(), 1003);

    let mut doomed = keys;
    doomed.push("d/missing".into());
    doomed.push("never/there".into());
    b.sink.delete(&doomed).await.unwrap();
    b.sink.delete(&doomed).await.unwrap();
    b.sink.delete(&[]).await.unwrap();
    let left: Vec<String> = b
        .sink
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, vec!["keep/me".to_string()]);
}

// ---- One implementation only ----

#[tokio::test]
async fn s3_location_is_the_bucket_and_local_location_the_folder() {
    let b = Backend::s3().await;
    assert_eq!(b.sink.location(), "s3://replica");
    let dir = tempfile::tempdir().unwrap();
    let sink = LocalSink::new(dir.path());
    assert_eq!(sink.location(), dir.path().display().to_string());
}

#[tokio::test]
async fn a_failed_s3_part_is_a_storage_error_naming_the_object() {
    let b = Backend::s3().await;
    let s3 = b.s3.as_ref().unwrap();
    let key = "t/big.jsonl";
    let mut upload = b.sink.start_upload(key, JSONL).await.unwrap();
    upload.write(Bytes::from(data(PART))).await.unwrap();
    // Someone else aborts the multipart upload under our feet.
    let uploads = s3
        .list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap();
    let id = uploads.uploads()[0].upload_id().unwrap();
    s3.abort_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .upload_id(id)
        .send()
        .await
        .unwrap();

    let error = upload.write(Bytes::from(data(PART))).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Storage);
    assert!(
        error.message().contains("s3://replica/t/big.jsonl"),
        "{error}"
    );
    assert!(
        upload.finish().await.is_err(),
        "a failed upload cannot finish"
    );
    assert_eq!(b.sink.get(key).await.unwrap(), None);
    b.assert_no_unfinished_upload().await;
}

#[tokio::test]
async fn local_temporary_files_are_hidden_beside_the_object() {
    let b = Backend::local();
    let root = b.dir.as_ref().unwrap().path().join("out");
    let mut upload = b
        .sink
        .start_upload("t/date=2026-11-01/p.jsonl", JSONL)
        .await
        .unwrap();
    upload.write(Bytes::from_static(b"{}\n")).await.unwrap();
    let on_disk = every_file(&root);
    assert_eq!(on_disk.len(), 1, "{on_disk:?}");
    assert!(
        on_disk[0].starts_with("t/date=2026-11-01/.p.jsonl.tmp-"),
        "{on_disk:?}"
    );
    assert_eq!(b.sink.list("").await.unwrap(), vec![]);
    // Other hidden files (the state file may share the folder) are not objects either.
    std::fs::write(root.join(".state.json"), "{}").unwrap();
    assert_eq!(b.sink.list("").await.unwrap(), vec![]);

    upload.finish().await.unwrap();
    assert_eq!(
        every_file(&root),
        vec![
            ".state.json".to_string(),
            "t/date=2026-11-01/p.jsonl".to_string()
        ]
    );
}

#[tokio::test]
async fn local_keys_cannot_leave_the_folder() {
    let b = Backend::local();
    for key in [
        "../escape",
        "/etc/passwd",
        "a/../../b",
        "a//b",
        "",
        "a/./b",
        "a/.hidden",
    ] {
        let put = b.sink.put(key, Bytes::from_static(b"x"), JSONL).await;
        assert_eq!(put.unwrap_err().kind(), ErrorKind::Storage, "{key:?}");
        assert!(b.sink.start_upload(key, JSONL).await.is_err(), "{key:?}");
        assert!(b.sink.get(key).await.is_err(), "{key:?}");
    }
    assert_eq!(b.sink.list("../").await.unwrap(), vec![]);
    assert!(every_file(b.dir.as_ref().unwrap().path()).is_empty());
}

/// Every file under `root`, hidden ones included, as `/`-joined relative paths, sorted.
fn every_file(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                let relative = path.strip_prefix(root).unwrap();
                files.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    files.sort();
    files
}

#[tokio::test]
async fn s3_failures_name_the_operation_and_the_object() {
    let moto = Moto::start();
    let client = aws_sdk_s3::Client::new(&moto.sdk_config().await);
    let sink = S3Sink::new(client, "no-such-bucket");

    let error = sink
        .put("a/b.json", Bytes::from_static(b"{}"), JSONL)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Storage);
    assert!(
        error
            .message()
            .contains("writing s3://no-such-bucket/a/b.json"),
        "{error}"
    );
    assert!(error.message().len() < 600, "short enough to read: {error}");
    // A missing bucket is a failure, not a missing object.
    let error = sink.get("a/b.json").await.unwrap_err();
    assert!(
        error.message().contains("s3://no-such-bucket/a/b.json"),
        "{error}"
    );
    let error = sink.list("a/").await.unwrap_err();
    assert!(
        error.message().contains("s3://no-such-bucket/a/"),
        "{error}"
    );
}
