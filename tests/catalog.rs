//! The Glue tables over the output, kept current by the program (`GLUE_DATABASE`). On moto the
//! template's database and seven tables are created as the stack creates them; after a sync
//! each table holds its fixed columns and then every column of its `_schema.json`, typed for
//! Athena, with the template's location, SerDe and partitions untouched. A stack update that
//! puts the template's columns back is mended by the next commit, a column a person added is
//! kept, a commit that discovers nothing new writes nothing, and a catalog that cannot be
//! updated loses no data.

mod support;

use std::collections::{BTreeMap, HashMap};

use aws_sdk_glue::types::{Column, SerDeInfo, StorageDescriptor, TableInput};
use mixpanel_replicator::app::App;
use mixpanel_replicator::cli::sync;
use mixpanel_replicator::handler;
use mixpanel_replicator::tables::Table;
use serde_json::{Value, json};
use support::harness::*;
use support::template::template;

const DATABASE: &str = "mixpanel_replica";

/// A `!Sub` of the template (`{"Fn::Sub": "..."}` or `{"Fn::Sub": ["...", {...}]}`) with the
/// stack's names filled in; Athena's own `${!date}` becomes `${date}` as CloudFormation makes it.
fn resolve(v: &Value, names: &HashMap<&str, String>) -> String {
    let text = match v {
        Value::String(s) => return s.clone(),
        Value::Object(o) => match &o["Fn::Sub"] {
            Value::String(s) => s.clone(),
            Value::Array(a) => a[0].as_str().unwrap().to_string(),
            other => panic!("unexpected Fn::Sub {other}"),
        },
        other => panic!("unexpected value {other}"),
    };
    let mut out = text.replace("${!", "\u{0}");
    for (name, value) in names {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    assert!(!out.contains("${"), "unresolved {out}");
    out.replace('\u{0}', "${")
}

fn columns_of(v: &Value) -> Vec<Column> {
    v.as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    Column::builder()
                        .name(c["Name"].as_str().unwrap())
                        .r#type(c["Type"].as_str().unwrap())
                        .set_comment(c["Comment"].as_str().map(str::to_string))
                        .build()
                        .unwrap()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `TableInput` of each `AWS::Glue::Table` of the template, as the stack creates it.
fn template_tables(bucket: &str, prefix: &str, start: &str) -> BTreeMap<String, TableInput> {
    let t = template();
    let names: HashMap<&str, String> = [
        ("BucketName", bucket.to_string()),
        ("OutputPrefix", prefix.to_string()),
        ("MixpanelStartDate", start.to_string()),
    ]
    .into();
    let mut tables = BTreeMap::new();
    for resource in t["Resources"].as_object().unwrap().values() {
        if resource["Type"] != "AWS::Glue::Table" {
            continue;
        }
        let input = &resource["Properties"]["TableInput"];
        let sd = &input["StorageDescriptor"];
        let params = |v: &Value| -> HashMap<String, String> {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), resolve(v, &names)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let descriptor = StorageDescriptor::builder()
            .location(resolve(&sd["Location"], &names))
            .input_format(sd["InputFormat"].as_str().unwrap())
            .output_format(sd["OutputFormat"].as_str().unwrap())
            .serde_info(
                SerDeInfo::builder()
                    .serialization_library(
                        sd["SerdeInfo"]["SerializationLibrary"].as_str().unwrap(),
                    )
                    .set_parameters(Some(params(&sd["SerdeInfo"]["Parameters"])))
                    .build(),
            )
            .set_columns(Some(columns_of(&sd["Columns"])))
            .build();
        let name = input["Name"].as_str().unwrap().to_string();
        let table = TableInput::builder()
            .name(&name)
            .description(input["Description"].as_str().unwrap())
            .table_type(input["TableType"].as_str().unwrap())
            .set_parameters(Some(params(&input["Parameters"])))
            .set_partition_keys(Some(columns_of(&input["PartitionKeys"])).filter(|k| !k.is_empty()))
            .storage_descriptor(descriptor)
            .build()
            .unwrap();
        tables.insert(name, table);
    }
    tables
}

/// Creates the template's database and tables on moto; returns their definitions.
async fn create_catalog(
    glue: &aws_sdk_glue::Client,
    bucket: &str,
    prefix: &str,
    start: &str,
) -> BTreeMap<String, TableInput> {
    glue.create_database()
        .database_input(
            aws_sdk_glue::types::DatabaseInput::builder()
                .name(DATABASE)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let tables = template_tables(bucket, prefix, start);
    for input in tables.values() {
        glue.create_table()
            .database_name(DATABASE)
            .table_input(input.clone())
            .send()
            .await
            .unwrap();
    }
    tables
}

async fn glue_table(glue: &aws_sdk_glue::Client, name: &str) -> aws_sdk_glue::types::Table {
    glue.get_table()
        .database_name(DATABASE)
        .name(name)
        .send()
        .await
        .unwrap()
        .table
        .unwrap()
}

fn pairs(columns: &[Column]) -> Vec<(String, String)> {
    columns
        .iter()
        .map(|c| (c.name().to_string(), c.r#type().unwrap().to_string()))
        .collect()
}

/// The columns of a Glue table (name, type).
async fn columns_of_table(glue: &aws_sdk_glue::Client, name: &str) -> Vec<(String, String)> {
    pairs(
        glue_table(glue, name)
            .await
            .storage_descriptor()
            .unwrap()
            .columns(),
    )
}

async fn versions(glue: &aws_sdk_glue::Client, name: &str) -> usize {
    glue.get_table_versions()
        .database_name(DATABASE)
        .table_name(name)
        .send()
        .await
        .unwrap()
        .table_versions()
        .len()
}

/// The columns a table's Glue table must hold: the template's, then each column of its
/// `_schema.json` in order, typed for Athena (one JSON scalar type as itself, anything else as
/// string), leaving out a dated table's `date` (the partition) and the template's own.
async fn expected_columns(app: &App, template: &TableInput, table: Table) -> Vec<(String, String)> {
    let body = app
        .sink
        .get(&format!("{}/{table}/_schema.json", app.prefix))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{table}: no _schema.json"));
    let schema: Value = serde_json::from_slice(&body).unwrap();
    let mut columns = pairs(template.storage_descriptor().unwrap().columns());
    for c in schema["columns"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let fixed = columns.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        if fixed || (table.is_date_sliced() && name == "date") {
            continue;
        }
        let ty = match &c["type"] {
            Value::String(t) if t == "integer" => "bigint",
            Value::String(t) if t == "number" => "double",
            Value::String(t) if t == "boolean" => "boolean",
            _ => "string",
        };
        columns.push((name.to_string(), ty.to_string()));
    }
    columns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_is_catalogued_with_every_discovered_column_and_kept_so() {
    let mut cfg = sim_config("UTC", 3, 60);
    cfg.column_collisions = true;
    cfg.profiles = 40;
    let start = cfg.first_day.to_string();
    let project = Project::start(cfg).await;
    let (bucket, state, secret) = ("catalog", "catalog-state", "catalog/creds");
    let aws = support::harness::Aws::start_for(&project, bucket, state, secret).await;
    let glue = aws_sdk_glue::Client::new(&aws.sdk);
    // An app as a new process builds it (a fresh catalog, as after a deploy).
    let new_process = || {
        aws.app(
            &project,
            bucket,
            state,
            secret,
            &[("GLUE_DATABASE", DATABASE)],
        )
    };
    let app = new_process().await;
    let templates = create_catalog(&glue, bucket, &app.prefix, &start).await;
    assert_eq!(templates.len(), Table::ALL.len());

    let report = sync(&app, &Table::ALL).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    for table in Table::ALL {
        let template = &templates[table.as_str()];
        let got = glue_table(&glue, table.as_str()).await;
        let sd = got.storage_descriptor().unwrap();
        let columns = pairs(sd.columns());
        assert_eq!(
            columns,
            expected_columns(&app, template, table).await,
            "{table}"
        );
        // One column per name once case is folded, as Athena needs.
        let mut folded: Vec<String> = columns.iter().map(|(n, _)| n.to_lowercase()).collect();
        folded.sort();
        folded.dedup();
        assert_eq!(folded.len(), columns.len(), "{table}: {columns:?}");
        // Everything else as the stack made it.
        let made = template.storage_descriptor().unwrap();
        assert_eq!(sd.location(), made.location(), "{table}");
        assert_eq!(sd.input_format(), made.input_format(), "{table}");
        assert_eq!(sd.serde_info(), made.serde_info(), "{table}");
        assert_eq!(got.parameters(), template.parameters(), "{table}");
        assert_eq!(
            pairs(got.partition_keys()),
            pairs(template.partition_keys()),
            "{table}"
        );
    }
    // What the rows hold, as Athena reads it.
    let export = columns_of_table(&glue, "export").await;
    for column in [
        ("event__2", "bigint"),
        ("country__2", "string"),
        ("Country", "string"),
        ("mp_reserved_city__2", "string"),
        ("date__2", "string"),
        ("mp_processing_time_ms", "bigint"),
        ("_blank", "bigint"),
    ] {
        assert!(
            export.contains(&(column.0.to_string(), column.1.to_string())),
            "{column:?} in {export:?}"
        );
    }
    let engage = columns_of_table(&glue, "engage").await;
    assert!(
        engage.contains(&("distinct_id__2".to_string(), "string".to_string())),
        "{engage:?}"
    );
    let revenue = glue_table(&glue, "revenue").await;
    assert_eq!(
        pairs(revenue.storage_descriptor().unwrap().columns()),
        [
            ("amount".to_string(), "double".to_string()),
            ("count".to_string(), "bigint".to_string()),
            ("paid_count".to_string(), "bigint".to_string()),
        ]
    );

    // Nothing new: a day committed again reads the table and writes nothing.
    let before = versions(&glue, "export").await;
    assert!(
        before > 1,
        "created, then updated with the discovered columns: {before}"
    );
    let fresh = new_process().await;
    let day = json!({"table": "export", "date": start});
    let deadline = || tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let r = handler::handle(&fresh, day.clone(), deadline())
        .await
        .unwrap();
    assert_eq!(r.status, handler::Status::Done, "{r:?}");
    assert_eq!(versions(&glue, "export").await, before);

    // A stack update puts the template's columns back, and a person adds a column of their
    // own: the next commit (of a new process, as after a deploy) mends the first and keeps the
    // second.
    let mut own = templates["export"].clone();
    let mut sd = own.storage_descriptor.take().unwrap();
    sd.columns.as_mut().unwrap().push(
        Column::builder()
            .name("my_note")
            .r#type("string")
            .build()
            .unwrap(),
    );
    own.storage_descriptor = Some(sd);
    glue.update_table()
        .database_name(DATABASE)
        .table_input(own)
        .send()
        .await
        .unwrap();
    let after_deploy = new_process().await;
    let r = handler::handle(&after_deploy, day, deadline())
        .await
        .unwrap();
    assert_eq!(r.status, handler::Status::Done, "{r:?}");
    let mut wanted = expected_columns(&app, &templates["export"], Table::Export).await;
    wanted.push(("my_note".to_string(), "string".to_string()));
    assert_eq!(columns_of_table(&glue, "export").await, wanted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_that_cannot_be_updated_loses_no_data_and_says_which_table() {
    let cfg = sim_config("UTC", 2, 40);
    let project = Project::start(cfg).await;
    let (bucket, state, secret) = ("nocatalog", "nocatalog-state", "nocatalog/creds");
    let aws = support::harness::Aws::start_for(&project, bucket, state, secret).await;
    // No database of that name: every update fails.
    let app = aws
        .app(
            &project,
            bucket,
            state,
            secret,
            &[("GLUE_DATABASE", "not_there")],
        )
        .await;
    let report = sync(&app, &[Table::Export, Table::Revenue]).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    let sim = project.simulator();
    let (first, today) = (sim.config().first_day, today_in(&sim.config().timezone));
    assert_exact(&app, sim, first, today, None).await;

    let schema = app.store.schema(Table::Export).await.unwrap().unwrap();
    let err = app
        .catalog
        .as_ref()
        .unwrap()
        .publish(Table::Export, &schema)
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("Glue table not_there.export not found (")
            && err
                .message()
                .ends_with("): GLUE_DATABASE names the database whose tables the stack created"),
        "{err}"
    );
}
