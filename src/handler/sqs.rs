//! SQS events of the fan-out queue: each record's body is an invocation event, run here
//! record by record and answered with the records not finished (`batchItemFailures`), so SQS
//! delivers those again and, after the queue's `maxReceiveCount`, moves them to its
//! dead-letter queue. A day event from the queue is a hint to look at that day
//! ([`crate::run::queued_day`]): the state store is the truth.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, ErrorKind, Result};
use crate::handler::{self, Invocation, Response, Status};
use crate::run;

/// A record is not started with less time than this left: it would only be abandoned.
const MIN_RECORD_TIME: Duration = Duration::from_secs(15);

/// Whether an event is an SQS event (`{"Records": [...]}`) rather than an invocation event.
pub fn is_sqs_event(v: &Value) -> bool {
    v.get("Records").is_some()
}

/// One record of an SQS event: the fields read here (SQS sends more: receipt handle,
/// attributes, ...).
#[derive(Deserialize)]
struct RawRecord {
    #[serde(rename = "messageId")]
    message_id: Option<Value>,
    body: Option<Value>,
    #[serde(rename = "eventSource")]
    event_source: Option<Value>,
}

/// A message delivered by the fan-out queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqsRecord {
    /// SQS's message id: what a batch item failure names.
    pub message_id: String,
    /// The message body: an invocation event, as JSON text.
    pub body: String,
}

/// Reads the records of an SQS event. The envelope must be an SQS event whose records each have
/// a `messageId` and a `body`; whether a body is a valid event is each record's own matter.
pub fn parse_sqs_event(v: &Value) -> Result<Vec<SqsRecord>> {
    let records = v
        .get("Records")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::event("`Records` of an SQS event must be a list"))?;
    if let Some(other) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "Records"))
    {
        return Err(Error::event(format!(
            "unknown field `{other}` beside the `Records` of an SQS event"
        )));
    }
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let raw: RawRecord = serde_json::from_value(r.clone())
            .map_err(|e| Error::event(format!("SQS record {i}: {e}")))?;
        match raw.event_source {
            None => {}
            Some(Value::String(s)) if s == "aws:sqs" => {}
            Some(other) => {
                return Err(Error::event(format!(
                    "SQS record {i}: `eventSource` is {other}, not \"aws:sqs\""
                )));
            }
        }
        let message_id = match raw.message_id {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(Error::event(format!(
                    "SQS record {i} has no `messageId` string"
                )));
            }
        };
        let body = match raw.body {
            Some(Value::String(s)) => s,
            _ => {
                return Err(Error::event(format!(
                    "SQS record {i} ({message_id}) has no `body` string"
                )));
            }
        };
        out.push(SqsRecord { message_id, body });
    }
    Ok(out)
}

/// The answer to an SQS event: the records not finished, which SQS delivers again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResponse {
    /// The records not finished.
    pub batch_item_failures: Vec<BatchItemFailure>,
}

/// A record not finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemFailure {
    /// The record's `messageId`.
    pub item_identifier: String,
}

/// Handles an SQS event: each record's body as an invocation event, one after the other while
/// the deadline allows. Each record is reported like an invocation (summary line, and EMF
/// metrics when `emf`).
pub async fn handle_batch(
    app: &App,
    event: &Value,
    deadline: Instant,
    emf: bool,
) -> Result<BatchResponse> {
    let records = parse_sqs_event(event)?;
    let mut answer = BatchResponse::default();
    for record in records {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < MIN_RECORD_TIME {
            tracing::info!(message_id = %record.message_id, "record not started before the deadline; SQS delivers it again");
            answer.batch_item_failures.push(BatchItemFailure {
                item_identifier: record.message_id,
            });
            continue;
        }
        let parsed = parse_body(&record);
        let table = parsed
            .as_ref()
            .ok()
            .and_then(Invocation::table)
            .map_or("invalid", crate::tables::Table::as_str);
        let work = async {
            let inv = parsed?;
            run_record(app, inv, &record, deadline).await
        };
        let result = handler::reported(app, table, emf, work, |(r, _)| r).await;
        match &result {
            Err(e) if e.kind() == ErrorKind::InvalidEvent => tracing::error!(
                message_id = %record.message_id, kind = %e.kind(), error = %e,
                "the SQS record is not a valid event; it is left to SQS, which moves it to the dead-letter queue after its receives"
            ),
            Err(e) => tracing::error!(
                message_id = %record.message_id, kind = %e.kind(), error = %e,
                "the SQS record failed; SQS delivers it again"
            ),
            Ok(_) => {}
        }
        let finished = matches!(result, Ok((_, true)));
        if !finished {
            answer.batch_item_failures.push(BatchItemFailure {
                item_identifier: record.message_id,
            });
        }
    }
    Ok(answer)
}

/// The invocation event of a record's body.
fn parse_body(record: &SqsRecord) -> Result<Invocation> {
    let value: Value = serde_json::from_str(&record.body).map_err(|e| {
        Error::event(format!(
            "the body of SQS message {} is not JSON: {e}",
            record.message_id
        ))
    })?;
    if is_sqs_event(&value) {
        return Err(Error::event(format!(
            "the body of SQS message {} is an SQS event, not an invocation event",
            record.message_id
        )));
    }
    match handler::parse_event(&value) {
        Ok(Invocation::Check) => Err(Error::event(format!(
            "SQS message {}: {{\"check\": true}} is answered by the function itself, not through the fan-out queue",
            record.message_id
        ))),
        Ok(inv) => Ok(inv),
        Err(e) => Err(Error::event(format!(
            "SQS message {}: {}",
            record.message_id,
            e.message().trim_start_matches("invalid event: ")
        ))),
    }
}

/// Runs one record: a day event as a hint to look at that day, any other event as if invoked.
/// Returns the answer and whether the record is finished (SQS may forget it).
async fn run_record(
    app: &App,
    inv: Invocation,
    record: &SqsRecord,
    deadline: Instant,
) -> Result<(Response, bool)> {
    match inv {
        Invocation::Day(table, day) => run::queued_day(app, table, day, deadline).await,
        _ => {
            let event: Value = serde_json::from_str(&record.body)
                .map_err(|e| Error::event(format!("SQS message {}: {e}", record.message_id)))?;
            let resp = handler::handle(app, event, deadline).await?;
            let finished = resp.status != Status::Partial;
            Ok((resp, finished))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::Table;
    use serde_json::json;

    #[test]
    fn an_sqs_event_has_its_records_read_and_its_envelope_checked() {
        let ev = json!({"Records": [
            {"messageId": "m1", "receiptHandle": "r", "body": "{\"table\":\"export\",\"date\":\"2026-11-01\"}",
             "attributes": {"ApproximateReceiveCount": "1"}, "eventSource": "aws:sqs",
             "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"},
            {"messageId": "m2", "body": "not json"}
        ]});
        assert!(is_sqs_event(&ev));
        let records = parse_sqs_event(&ev).unwrap();
        assert_eq!(
            records,
            vec![
                SqsRecord {
                    message_id: "m1".into(),
                    body: "{\"table\":\"export\",\"date\":\"2026-11-01\"}".into()
                },
                SqsRecord {
                    message_id: "m2".into(),
                    body: "not json".into()
                },
            ]
        );
        assert_eq!(
            parse_body(&records[0]).unwrap(),
            Invocation::Day(Table::Export, "2026-11-01".parse().unwrap())
        );
        let e = parse_body(&records[1]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidEvent);
        assert!(e.to_string().contains("SQS message m2 is not JSON"), "{e}");

        for (bad, says) in [
            (json!({"Records": {}}), "must be a list"),
            (
                json!({"Records": [{"messageId": "m", "body": "{}", "eventSource": "aws:sns"}]}),
                "not \"aws:sqs\"",
            ),
            (json!({"Records": [{"body": "{}"}]}), "no `messageId`"),
            (json!({"Records": [{"messageId": "m"}]}), "no `body`"),
            (
                json!({"Records": [], "table": "export"}),
                "unknown field `table`",
            ),
        ] {
            let e = parse_sqs_event(&bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidEvent);
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_batch_answer_is_shaped_as_lambda_reads_it() {
        let a = BatchResponse {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: "m1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"batchItemFailures": [{"itemIdentifier": "m1"}]})
        );
    }
}
