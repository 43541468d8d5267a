//! The fan-out queue: a range's day events, and the oldest pending days of a scheduled
//! invocation that cannot finish, are sent to it as messages (SendMessageBatch). Its Lambda
//! event source mapping delivers them back as SQS events ([`crate::handler::sqs`]).
//!
//! Messages are only hints to look at a slice: the state store is the truth. A duplicate or
//! late message finds its day committed, leased or parked and does nothing.

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use serde_json::Value;

use crate::error::{Error, ErrorKind, Result, describe_sdk_error};
use crate::retry::{Decision, Next, Policy};

/// SendMessageBatch takes at most ten messages.
const BATCH: usize = 10;

/// The fan-out queue (`FAN_OUT_QUEUE_URL`).
pub struct FanOutQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl FanOutQueue {
    /// The queue at `url`, reached with `client`.
    pub fn new(client: aws_sdk_sqs::Client, url: String) -> Self {
        FanOutQueue { client, url }
    }

    /// The queue's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends every event as one message (SendMessageBatch, ten at a time), retrying the entries
    /// SQS did not take. An error names the queue and what SQS said.
    pub async fn send(&self, events: &[Value]) -> Result<()> {
        for chunk in events.chunks(BATCH) {
            let mut left: Vec<(String, String)> = chunk
                .iter()
                .enumerate()
                .map(|(i, e)| (i.to_string(), e.to_string()))
                .collect();
            // Sends of a batch's failed entries, under the policy, before the fan-out gives up.
            let mut attempts = Policy::SQS_SEND.start(None);
            while !left.is_empty() {
                let attempt = attempts.begin();
                let entries = left
                    .iter()
                    .map(|(id, body)| {
                        SendMessageBatchRequestEntry::builder()
                            .id(id)
                            .message_body(body)
                            .build()
                            .map_err(|e| self.error(e.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                // The entries SQS did not take, with its reasons; a failed call is all of them.
                let (retry, why): (Vec<String>, Vec<String>) = match self
                    .client
                    .send_message_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                {
                    Ok(out) => out
                        .failed
                        .into_iter()
                        .map(|f| {
                            let why = format!("{}: {}", f.code, f.message.unwrap_or_default());
                            (f.id, why)
                        })
                        .unzip(),
                    Err(e) => (
                        left.iter().map(|(id, _)| id.clone()).collect(),
                        vec![describe_sdk_error(&e)],
                    ),
                };
                if retry.is_empty() {
                    break;
                }
                let Next::Wait(wait) = attempts.after(Decision::Retry) else {
                    return Err(self.error(format!(
                        "{} of {} messages not accepted after {attempt} attempts: {}",
                        retry.len(),
                        chunk.len(),
                        why.join("; ")
                    )));
                };
                left.retain(|(id, _)| retry.contains(id));
                tokio::time::sleep(wait).await;
            }
        }
        tracing::info!(queue = %self.url, messages = events.len(), "day events sent to the fan-out queue");
        Ok(())
    }

    fn error(&self, why: impl std::fmt::Display) -> Error {
        Error::new(
            ErrorKind::Transient,
            format!(
                "cannot send the day events to the fan-out queue {}: {why} (the days are queued \
                 in the state store; scheduled invocations still replicate them)",
                self.url
            ),
        )
    }
}
