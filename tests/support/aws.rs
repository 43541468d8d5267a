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
