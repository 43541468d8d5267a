//! AWS resources on moto that tests need: the state table, a bucket, a secret.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};

/// Creates a state table like the SAM template's: `pk` and `sk` strings, on-demand billing.
pub async fn create_state_table(client: &aws_sdk_dynamodb::Client, name: &str) {
    let attribute = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("attribute definition")
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .expect("key schema element")
    };
    client
        .create_table()
        .table_name(name)
        .attribute_definitions(attribute("pk"))
        .attribute_definitions(attribute("sk"))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating table {name}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&e)
            )
        });
}

/// Creates a bucket (in us-east-1, so without a location constraint).
pub async fn create_bucket(client: &aws_sdk_s3::Client, name: &str) {
    client
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating bucket {name}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
}

/// Stores `value` as the secret `name`, creating it or replacing its value.
pub async fn put_secret(client: &aws_sdk_secretsmanager::Client, name: &str, value: &str) {
    let created = client
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await;
    match created {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_exists_exception()) =>
        {
            client
                .put_secret_value()
                .secret_id(name)
                .secret_string(value)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "updating secret {name}: {}",
                        aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                    )
                });
        }
        Err(e) => panic!(
            "creating secret {name}: {}",
            aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
        ),
    }
}

/// Creates a standard SQS queue and returns its URL.
pub async fn create_queue(client: &aws_sdk_sqs::Client, name: &str) -> String {
    client
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating queue {name}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })
        .queue_url
        .unwrap_or_else(|| panic!("queue {name} has no URL"))
}

/// Receives up to `max` (1..=10) messages without waiting (moto answers one request at a
/// time, so a long poll would hold every other client), hidden for `hide_secs`.
pub async fn receive(
    client: &aws_sdk_sqs::Client,
    url: &str,
    max: i32,
    hide_secs: i32,
) -> Vec<aws_sdk_sqs::types::Message> {
    client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max)
        .visibility_timeout(hide_secs)
        .wait_time_seconds(0)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "receiving from {url}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })
        .messages
        .unwrap_or_default()
}

/// Every message of the queue, received until it answers none (hidden for ten minutes).
pub async fn receive_all(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> Vec<aws_sdk_sqs::types::Message> {
    let mut all = Vec::new();
    loop {
        let batch = receive(client, url, 10, 600).await;
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// Deletes a received message.
pub async fn delete(client: &aws_sdk_sqs::Client, url: &str, m: &aws_sdk_sqs::types::Message) {
    client
        .delete_message()
        .queue_url(url)
        .receipt_handle(m.receipt_handle().unwrap_or_default())
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "deleting from {url}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        });
}

/// The SQS event Lambda's event source mapping delivers for `messages`.
pub fn sqs_event(url: &str, messages: &[aws_sdk_sqs::types::Message]) -> serde_json::Value {
    let arn = format!(
        "arn:aws:sqs:us-east-1:123456789012:{}",
        url.rsplit('/').next().unwrap_or_default()
    );
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            serde_json::json!({
                "messageId": m.message_id().unwrap_or_default(),
                "receiptHandle": m.receipt_handle().unwrap_or_default(),
                "body": m.body().unwrap_or_default(),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0"},
                "messageAttributes": {},
                "md5OfBody": m.md5_of_body().unwrap_or_default(),
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": "us-east-1"
            })
        })
        .collect();
    serde_json::json!({ "Records": records })
}

/// An SQS record with `body`, as the event source mapping delivers it.
pub fn sqs_record(message_id: &str, body: &str) -> serde_json::Value {
    serde_json::json!({
        "messageId": message_id,
        "receiptHandle": format!("handle-{message_id}"),
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:fan-out",
        "awsRegion": "us-east-1"
    })
}
