//! The state store on DynamoDB (Lambda): one item per slice, bookmark and schema.
//!
//! Every state change is one conditional write, so concurrent invocations can race freely: the
//! condition decides who wins, and a failed condition is the `false`/`None` answer, not an error.
//!
//! Items (partition key `pk`, sort key `sk`, both strings):
//! - slice: `pk = "slice#{table}"`, `sk = {slice id}`; `status`, `lease_owner`,
//!   `lease_expires_ms`, `committed_at_ms`, `attempts`, `progress`, `result`, and after a failed
//!   attempt `failures`, `retry_at_ms`, `last_error` (JSON: kind, message, time);
//! - bookmark: `pk = "bookmark"`, `sk = {table}`; `day` (`YYYY-MM-DD`);
//! - schema: `pk = "schema"`, `sk = {table}`; `columns` (a map of strings, or a JSON string),
//!   `version` (a counter that makes read-modify-write merges safe).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::AttributeValue;
use jiff::civil::Date;

use super::{
    Failure, Lease, Ledger, Schema, SliceError, SliceId, SliceRecord, SliceStatus, StateStore,
};
use crate::error::{Error, Result, describe_sdk_error as describe};
use crate::retry::Policy;
use crate::tables::Table;

const BOOKMARK_PK: &str = "bookmark";
const SCHEMA_PK: &str = "schema";
/// Partition key of small versioned documents (the request ledger).
const DOCUMENT_PK: &str = "document";

/// Attribute names behind `#` placeholders (`status`, `day`, `columns` are reserved words).
const STATUS: (&str, &str) = ("#status", "status");
const DAY: (&str, &str) = ("#day", "day");

/// The DynamoDB state store.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table_name: String,
}

impl DynamoStore {
    /// A store on the DynamoDB table `table_name` (keys `pk` and `sk`, both strings).
    pub fn new(client: Client, table_name: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table_name: table_name.into(),
        }
    }

    /// An SDK failure as a state error naming the operation and the DynamoDB table.
    fn fail<E>(&self, op: &str, err: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        Error::state(format!(
            "{op} (DynamoDB table {}): {}",
            self.table_name,
            describe(&err)
        ))
    }

    /// A malformed item as a state error naming it.
    fn malformed(&self, pk: &str, sk: &str, reason: impl std::fmt::Display) -> Error {
        Error::state(format!(
            "item pk={pk:?} sk={sk:?} in DynamoDB table {} is malformed: {reason}",
            self.table_name
        ))
    }

    /// An UpdateItem on one slice item.
    fn update_slice(&self, table: Table, slice: SliceId) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table_name)
            .key("pk", s(slice_pk(table)))
            .key("sk", s(slice.to_string()))
            .expression_attribute_names(STATUS.0, STATUS.1)
    }

    /// Sends a conditional update: `true` if it was applied, `false` if the condition failed.
    async fn conditional(&self, op: &str, request: UpdateItemFluentBuilder) -> Result<bool> {
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.fail(op, e)),
        }
    }

    /// An update of a slice item allowed only while `lease` is held (and, with `now_ms`, not
    /// expired at that time).
    fn update_leased(&self, lease: &Lease, now_ms: Option<u64>) -> UpdateItemFluentBuilder {
        let request = self
            .update_slice(lease.table, lease.slice)
            .expression_attribute_values(":owner", s(&lease.owner))
            .expression_attribute_values(":leased", s(SliceStatus::Leased.as_str()));
        match now_ms {
            None => request.condition_expression("lease_owner = :owner AND #status = :leased"),
            Some(now) => request
                .condition_expression(
                    "lease_owner = :owner AND #status = :leased AND lease_expires_ms >= :now",
                )
                .expression_attribute_values(":now", n(now)),
        }
    }

    /// Reads one item with a strongly consistent read.
    async fn get(
        &self,
        op: &str,
        pk: &str,
        sk: &str,
    ) -> Result<Option<HashMap<String, AttributeValue>>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table_name)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.fail(op, e))?;
        Ok(out.item)
    }

    /// The stored schema of `table` with its version (`None` for an item written without one).
    async fn read_schema(&self, table: Table) -> Result<Option<(Schema, Option<u64>)>> {
        let op = format!("reading the schema of {table}");
        let Some(item) = self.get(&op, SCHEMA_PK, table.as_str()).await? else {
            return Ok(None);
        };
        let bad = |reason: String| self.malformed(SCHEMA_PK, table.as_str(), reason);
        let columns = match item.get("columns") {
            Some(AttributeValue::M(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    AttributeValue::S(t) => Ok((k.clone(), t.clone())),
                    _ => Err(bad(format!("column {k:?} is not a string"))),
                })
                .collect::<Result<BTreeMap<_, _>>>()?,
            Some(AttributeValue::S(json)) => serde_json::from_str(json)
                .map_err(|e| bad(format!("columns is not a JSON object of strings: {e}")))?,
            None => BTreeMap::new(),
            Some(_) => return Err(bad("columns is neither a map nor a JSON string".into())),
        };
        let version = number(&item, "version").map_err(bad)?;
        let renamed = match item.get("renamed") {
            Some(AttributeValue::M(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    AttributeValue::S(key) => Ok((k.clone(), key.clone())),
                    _ => Err(bad(format!("renamed column {k:?} is not a string"))),
                })
                .collect::<Result<BTreeMap<_, _>>>()?,
            None => BTreeMap::new(),
            Some(_) => return Err(bad("renamed is not a map".into())),
        };
        Ok(Some((Schema { columns, renamed }, version)))
    }

    /// Writes `schema` as the whole schema item if the item is still as it was read
    /// (`expected`: `None` = absent, `Some(version)` = present with that version).
    /// Returns whether it was written.
    async fn write_schema(
        &self,
        table: Table,
        schema: &Schema,
        expected: Option<Option<u64>>,
    ) -> Result<bool> {
        let columns: HashMap<String, AttributeValue> = schema
            .columns
            .iter()
            .map(|(k, v)| (k.clone(), s(v)))
            .collect();
        let next = match expected {
            Some(Some(v)) => v + 1,
            _ => 1,
        };
        let mut request = self
            .client
            .put_item()
            .table_name(&self.table_name)
            .item("pk", s(SCHEMA_PK))
            .item("sk", s(table.as_str()))
            .item("columns", AttributeValue::M(columns))
            .item("version", n(next));
        if !schema.renamed.is_empty() {
            let renamed: HashMap<String, AttributeValue> = schema
                .renamed
                .iter()
                .map(|(k, v)| (k.clone(), s(v)))
                .collect();
            request = request.item("renamed", AttributeValue::M(renamed));
        }
        request = match expected {
            None => request.condition_expression("attribute_not_exists(pk)"),
            Some(None) => request
                .condition_expression("attribute_exists(pk) AND attribute_not_exists(#version)")
                .expression_attribute_names("#version", "version"),
            Some(Some(v)) => request
                .condition_expression("#version = :version")
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":version", n(v)),
        };
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.fail(&format!("writing the schema of {table}"), e)),
        }
    }

    /// Whether the slice is leased by `owner` until `until_ms` (read back after a claim whose
    /// answer may have been lost; attempt ids are unique, so only that claim could set this).
    async fn claimed_by(
        &self,
        table: Table,
        slice: SliceId,
        owner: &str,
        until_ms: u64,
    ) -> Result<bool> {
        let op = format!("reading slice {slice} of {table} back");
        let Some(item) = self.get(&op, &slice_pk(table), &slice.to_string()).await? else {
            return Ok(false);
        };
        let record = self.parse_slice(table, &item)?;
        Ok(record.status == SliceStatus::Leased
            && record.lease_owner.as_deref() == Some(owner)
            && record.lease_expires_ms == Some(until_ms))
    }

    /// Parses a slice item of `table`.
    fn parse_slice(
        &self,
        table: Table,
        item: &HashMap<String, AttributeValue>,
    ) -> Result<SliceRecord> {
        let pk = slice_pk(table);
        let sk = string(item, "sk").unwrap_or_default();
        let bad = |reason: String| self.malformed(&pk, sk, reason);
        let slice = sk.parse::<SliceId>().map_err(bad)?;
        let status = string(item, "status")
            .ok_or_else(|| bad("no status".into()))?
            .parse::<SliceStatus>()
            .map_err(bad)?;
        Ok(SliceRecord {
            table,
            slice,
            status,
            lease_owner: string(item, "lease_owner").map(str::to_owned),
            lease_expires_ms: number(item, "lease_expires_ms").map_err(bad)?,
            committed_at_ms: number(item, "committed_at_ms").map_err(bad)?,
            attempts: number(item, "attempts").map_err(bad)?.unwrap_or(0),
            progress: string(item, "progress").map(str::to_owned),
            result: string(item, "result").map(str::to_owned),
            failures: number(item, "failures").map_err(bad)?.unwrap_or(0),
            retry_at_ms: number(item, "retry_at_ms").map_err(bad)?,
            error: match string(item, "last_error") {
                None => None,
                Some(text) => Some(
                    SliceError::parse(text)
                        .ok_or_else(|| bad(format!("last_error is not a failure: {text:?}")))?,
                ),
            },
        })
    }
}

#[async_trait]
impl StateStore for DynamoStore {
    async fn slices(&self, table: Table) -> Result<Vec<SliceRecord>> {
        let mut items = self
            .client
            .query()
            .table_name(&self.table_name)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(slice_pk(table)))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        let mut slices = Vec::new();
        while let Some(item) = items
            .try_next()
            .await
            .map_err(|e| self.fail(&format!("listing the slices of {table}"), e))?
        {
            slices.push(self.parse_slice(table, &item)?);
        }
        slices.sort_by_key(|r| r.slice);
        Ok(slices)
    }

    async fn enqueue(
        &self,
        table: Table,
        slice: SliceId,
        requeue_committed_before_ms: Option<u64>,
    ) -> Result<bool> {
        // A re-queued slice starts a new round: attempts and progress start over.
        let request = self
            .update_slice(table, slice)
            .update_expression(
                "SET #status = :pending, attempts = :zero REMOVE lease_expires_ms, progress",
            )
            .expression_attribute_values(":pending", s(SliceStatus::Pending.as_str()))
            .expression_attribute_values(":zero", n(0));
        let request = match requeue_committed_before_ms {
            None => request.condition_expression("attribute_not_exists(pk)"),
            Some(before) => request
                .condition_expression(
                    "attribute_not_exists(pk) OR \
                     (#status = :committed AND committed_at_ms < :before)",
                )
                .expression_attribute_values(":committed", s(SliceStatus::Committed.as_str()))
                .expression_attribute_values(":before", n(before)),
        };
        self.conditional(&format!("queueing slice {slice} of {table}"), request)
            .await
    }

    async fn claim(
        &self,
        table: Table,
        slice: SliceId,
        owner: &str,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Option<Lease>> {
        let request = self
            .update_slice(table, slice)
            .update_expression(
                "SET #status = :leased, lease_owner = :owner, lease_expires_ms = :until \
                 ADD attempts :one",
            )
            .condition_expression(
                "#status = :pending OR (#status = :leased AND lease_expires_ms < :now)",
            )
            .expression_attribute_values(":pending", s(SliceStatus::Pending.as_str()))
            .expression_attribute_values(":leased", s(SliceStatus::Leased.as_str()))
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":until", n(lease_until_ms))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":one", n(1));
        let op = format!("claiming slice {slice} of {table}");
        let claimed = match self.conditional(&op, request).await {
            Ok(true) => true,
            // The claim may have been applied with its answer lost (and the SDK's retry then
            // failed its condition, or failed): the item says whether it is ours, and a claim
            // taken for lost would hold the slice until its lease expired.
            outcome => {
                let ours = self.claimed_by(table, slice, owner, lease_until_ms).await;
                match (outcome, ours) {
                    (_, Ok(true)) => true,
                    (Err(e), _) => return Err(e),
                    // Mostly another invocation was first; an unreadable item changes nothing.
                    (Ok(_), _) => false,
                }
            }
        };
        Ok(claimed.then(|| Lease {
            table,
            slice,
            owner: owner.to_owned(),
            expires_ms: lease_until_ms,
        }))
    }

    async fn confirm(&self, lease: &Lease, now_ms: u64, until_ms: u64) -> Result<bool> {
        let request = self
            .update_leased(lease, Some(now_ms))
            .update_expression("SET lease_expires_ms = :until")
            .expression_attribute_values(":until", n(until_ms));
        let op = format!(
            "confirming the lease on slice {} of {}",
            lease.slice, lease.table
        );
        self.conditional(&op, request).await
    }

    async fn save_progress(&self, lease: &Lease, progress: Option<&str>) -> Result<bool> {
        let request = self.update_leased(lease, None);
        let request = match progress {
            Some(p) => request
                .update_expression("SET progress = :progress")
                .expression_attribute_values(":progress", s(p)),
            None => request.update_expression("REMOVE progress"),
        };
        let op = format!(
            "saving progress of slice {} of {}",
            lease.slice, lease.table
        );
        self.conditional(&op, request).await
    }

    async fn complete(&self, lease: &Lease, now_ms: u64, result: Option<&str>) -> Result<bool> {
        let request = self
            .update_leased(lease, Some(now_ms))
            .expression_attribute_values(":committed", s(SliceStatus::Committed.as_str()));
        let request = match result {
            Some(r) => request
                .update_expression(
                    "SET #status = :committed, committed_at_ms = :now, #result = :result, \
                     failures = :zero REMOVE lease_expires_ms, progress, retry_at_ms, last_error",
                )
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_names("#result", "result")
                .expression_attribute_values(":result", s(r)),
            None => request
                .update_expression(
                    "SET #status = :committed, committed_at_ms = :now, failures = :zero \
                     REMOVE lease_expires_ms, progress, #result, retry_at_ms, last_error",
                )
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_names("#result", "result"),
        };
        let op = format!("completing slice {} of {}", lease.slice, lease.table);
        self.conditional(&op, request).await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let request = self
            .update_leased(lease, None)
            .update_expression("SET #status = :pending REMOVE lease_expires_ms")
            .expression_attribute_values(":pending", s(SliceStatus::Pending.as_str()));
        let op = format!("releasing slice {} of {}", lease.slice, lease.table);
        self.conditional(&op, request).await.map(drop)
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<bool> {
        let status = if failure.park {
            SliceStatus::Failed
        } else {
            SliceStatus::Pending
        };
        let request = self
            .update_leased(lease, None)
            .expression_attribute_values(":status", s(status.as_str()))
            .expression_attribute_values(":failures", n(u64::from(failure.failures)))
            .expression_attribute_values(":error", s(failure.error.to_json()));
        let request = match failure.retry_at_ms.filter(|_| !failure.park) {
            Some(at) => request
                .update_expression(
                    "SET #status = :status, failures = :failures, last_error = :error, \
                     retry_at_ms = :retry REMOVE lease_expires_ms",
                )
                .expression_attribute_values(":retry", n(at)),
            None => request.update_expression(
                "SET #status = :status, failures = :failures, last_error = :error \
                 REMOVE lease_expires_ms, retry_at_ms",
            ),
        };
        let op = format!(
            "recording a failed attempt of slice {} of {}",
            lease.slice, lease.table
        );
        self.conditional(&op, request).await
    }

    async fn reset_failures(&self, table: Table, slice: SliceId) -> Result<bool> {
        let request = self
            .update_slice(table, slice)
            .update_expression("SET #status = :pending, failures = :zero REMOVE retry_at_ms")
            .condition_expression(
                "#status = :failed OR (#status = :pending AND \
                 (failures > :zero OR attribute_exists(retry_at_ms)))",
            )
            .expression_attribute_values(":pending", s(SliceStatus::Pending.as_str()))
            .expression_attribute_values(":failed", s(SliceStatus::Failed.as_str()))
            .expression_attribute_values(":zero", n(0));
        self.conditional(&format!("retrying slice {slice} of {table}"), request)
            .await
    }

    async fn bookmark(&self, table: Table) -> Result<Option<Date>> {
        let op = format!("reading the bookmark of {table}");
        let Some(item) = self.get(&op, BOOKMARK_PK, table.as_str()).await? else {
            return Ok(None);
        };
        let day = string(&item, "day")
            .ok_or_else(|| self.malformed(BOOKMARK_PK, table.as_str(), "no day"))?;
        day.parse()
            .map(Some)
            .map_err(|e| self.malformed(BOOKMARK_PK, table.as_str(), format!("day {day:?}: {e}")))
    }

    async fn advance_bookmark(&self, table: Table, day: Date) -> Result<()> {
        // ISO dates compare as strings, so DynamoDB can check "never backwards" itself.
        let request = self
            .client
            .update_item()
            .table_name(&self.table_name)
            .key("pk", s(BOOKMARK_PK))
            .key("sk", s(table.as_str()))
            .update_expression("SET #day = :day")
            .condition_expression("attribute_not_exists(pk) OR #day < :day")
            .expression_attribute_names(DAY.0, DAY.1)
            .expression_attribute_values(":day", s(day.to_string()));
        let op = format!("advancing the bookmark of {table} to {day}");
        self.conditional(&op, request).await.map(drop)
    }

    async fn schema(&self, table: Table) -> Result<Option<Schema>> {
        Ok(self.read_schema(table).await?.map(|(schema, _)| schema))
    }

    async fn init_schema(&self, table: Table, schema: &Schema) -> Result<Schema> {
        if self.write_schema(table, schema, None).await? {
            return Ok(schema.clone());
        }
        match self.read_schema(table).await? {
            Some((stored, _)) => Ok(stored),
            None => Err(Error::state(format!(
                "the schema of {table} in DynamoDB table {} exists and vanished at once",
                self.table_name
            ))),
        }
    }

    async fn merge_schema(&self, table: Table, columns: &Schema) -> Result<Schema> {
        // A lost race is read again and merged at once, under the policy's bound.
        let policy = Policy::SCHEMA_MERGE;
        let merged = policy
            .run_cas(|_| async {
                let current = self.read_schema(table).await.map_err(Some)?;
                let (merged, expected) = match &current {
                    Some((stored, version)) => {
                        (stored.merged(columns, table.fixed_keys()), Some(*version))
                    }
                    None => (columns.clone(), None),
                };
                if let Some((stored, _)) = &current
                    && *stored == merged
                {
                    return Ok(merged);
                }
                if self
                    .write_schema(table, &merged, expected)
                    .await
                    .map_err(Some)?
                {
                    return Ok(merged);
                }
                // Another writer's version came first.
                Err(None)
            })
            .await;
        match merged {
            Ok(merged) => Ok(merged),
            Err(Some(e)) => Err(e),
            Err(None) => Err(Error::state(format!(
                "merging the schema of {table} (DynamoDB table {}): lost {} races to \
                 concurrent writers",
                self.table_name, policy.attempts
            ))),
        }
    }
}

#[async_trait]
impl Ledger for DynamoStore {
    async fn document(&self, name: &str) -> Result<Option<(String, u64)>> {
        let op = format!("reading the document {name}");
        let Some(item) = self.get(&op, DOCUMENT_PK, name).await? else {
            return Ok(None);
        };
        let bad = |reason: String| self.malformed(DOCUMENT_PK, name, reason);
        let body = match item.get("body") {
            Some(AttributeValue::S(b)) => b.clone(),
            _ => return Err(bad("body is not a string".into())),
        };
        let version = number(&item, "version").map_err(bad)?.unwrap_or(0);
        Ok(Some((body, version)))
    }

    async fn put_document(&self, name: &str, body: &str, expected: Option<u64>) -> Result<bool> {
        let next = expected.map_or(1, |v| v + 1);
        let mut request = self
            .client
            .put_item()
            .table_name(&self.table_name)
            .item("pk", s(DOCUMENT_PK))
            .item("sk", s(name))
            .item("body", s(body))
            .item("version", n(next));
        request = match expected {
            None => request.condition_expression("attribute_not_exists(pk)"),
            Some(v) => request
                .condition_expression("#version = :version")
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":version", n(v)),
        };
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.fail(&format!("writing the document {name}"), e)),
        }
    }
}

/// Whether an SDK error is DynamoDB's answer that a condition did not hold.
fn condition_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

fn slice_pk(table: Table) -> String {
    format!("slice#{table}")
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A string attribute, if present.
fn string<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

/// A number attribute, if present; a wrong type or value is an error.
fn number<T: FromStr>(
    item: &HashMap<String, AttributeValue>,
    name: &str,
) -> Result<Option<T>, String> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::N(v)) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("{name} is not a valid number: {v:?}")),
        Some(_) => Err(format!("{name} is not a number")),
    }
}
