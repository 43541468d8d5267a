//! The SAM template (`infra/template.yaml`) against the code: the function's environment against
//! the settings the program reads, the schedules against the invocation events, and the IAM
//! policies against the AWS calls the program makes — nothing more, nothing less.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use mixpanel_replicator::config::{RunMode, Settings, VARIABLES};
use mixpanel_replicator::handler::{Invocation, parse_event};
use mixpanel_replicator::sink::catalog;
use mixpanel_replicator::tables::Table;
use serde_json::{Value, json};
use support::template::template;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every AWS call the program makes, as (SDK fluent method, IAM action, where it is called).
/// `the_code_makes_exactly_the_listed_aws_calls` keeps this list in step with `src/`, and
/// `the_function_role_allows_exactly_the_calls_the_code_makes` keeps the role in step with it.
const CODE_CALLS: &[(&str, &str, &str)] = &[
    // src/sink/s3.rs
    (
        "put_object",
        "s3:PutObject",
        "S3Sink::put (manifests, _latest.json, _schema.json) and parts smaller than one multipart part",
    ),
    (
        "create_multipart_upload",
        "s3:PutObject",
        "S3 part writer: a part's first 5 MiB",
    ),
    (
        "upload_part",
        "s3:PutObject",
        "S3 part writer: every further 5 MiB",
    ),
    (
        "complete_multipart_upload",
        "s3:PutObject",
        "S3 part writer: closing a part",
    ),
    (
        "abort_multipart_upload",
        "s3:AbortMultipartUpload",
        "S3 part writer: a failed or abandoned part",
    ),
    (
        "get_object",
        "s3:GetObject",
        "S3Sink::get (manifests, schema, tests reading parts)",
    ),
    (
        "list_objects_v2",
        "s3:ListBucket",
        "S3Sink::list (a partition's objects before a commit cleans it)",
    ),
    (
        "delete_objects",
        "s3:DeleteObject",
        "S3Sink::delete (parts of other attempts after a commit)",
    ),
    // src/state/dynamo.rs
    (
        "get_item",
        "dynamodb:GetItem",
        "DynamoStore: bookmark and schema reads",
    ),
    (
        "put_item",
        "dynamodb:PutItem",
        "DynamoStore: conditional schema and slice writes",
    ),
    (
        "update_item",
        "dynamodb:UpdateItem",
        "DynamoStore: slice queue, leases (conditional), bookmark",
    ),
    (
        "query",
        "dynamodb:Query",
        "DynamoStore: the slices of a table (the queue)",
    ),
    // src/secrets.rs
    (
        "get_secret_value",
        "secretsmanager:GetSecretValue",
        "CredentialsProvider::get (cached five minutes)",
    ),
    // src/fan_out.rs
    (
        "send_message_batch",
        "sqs:SendMessage",
        "FanOutQueue::send (a range's day events, ten per call)",
    ),
    // src/sink/catalog.rs
    (
        "get_table",
        "glue:GetTable",
        "GlueCatalog::publish (a table's columns, once per process and table, and after a change)",
    ),
    (
        "update_table",
        "glue:UpdateTable",
        "GlueCatalog::publish (a table missing discovered columns)",
    ),
];

/// Methods called on SDK clients that are not AWS operations.
const NOT_OPERATIONS: &[&str] = &["clone", "as_ref", "config"];

/// Other operations of the SDKs the program uses, found however the client is named.
const OTHER_OPERATIONS: &[&str] = &[
    // S3
    "head_object",
    "copy_object",
    "delete_object",
    "list_objects",
    "list_multipart_uploads",
    "list_parts",
    "upload_part_copy",
    "head_bucket",
    "get_bucket_location",
    "list_buckets",
    "create_bucket",
    "put_object_tagging",
    "get_object_attributes",
    "restore_object",
    "select_object_content",
    // DynamoDB
    "batch_get_item",
    "batch_write_item",
    "transact_get_items",
    "transact_write_items",
    "scan",
    "describe_table",
    "create_table",
    // (`update_table` is Glue's, in CODE_CALLS: the program calls DynamoDB's never.)
    "update_time_to_live",
    "execute_statement",
    "batch_execute_statement",
    "execute_transaction",
    // Secrets Manager
    "describe_secret",
    "put_secret_value",
    "create_secret",
    "list_secrets",
    "batch_get_secret_value",
    "update_secret",
    "rotate_secret",
    // SQS (the event source mapping receives and deletes, not the program)
    "send_message",
    "receive_message",
    "delete_message",
    "delete_message_batch",
    "change_message_visibility",
    "get_queue_attributes",
    "get_queue_url",
    "create_queue",
    "purge_queue",
    // others the program does not use today
    "put_metric_data",
    "invoke",
    "decrypt",
    "generate_data_key",
];

/// What AWS services do with the function's role on its behalf (not calls of the program).
const PLATFORM_ACTIONS: &[(&str, &str)] = &[
    (
        "logs:CreateLogStream",
        "Lambda writes the function's stderr/stdout to its log group",
    ),
    (
        "logs:PutLogEvents",
        "Lambda writes the function's stderr/stdout to its log group",
    ),
    (
        "sqs:SendMessage",
        "the on-failure destination of asynchronous invocations (the DLQ)",
    ),
    (
        "sqs:ReceiveMessage",
        "the fan-out queue's event source mapping polls with the function's role",
    ),
    (
        "sqs:DeleteMessage",
        "the event source mapping deletes the records the function finished",
    ),
    (
        "sqs:GetQueueAttributes",
        "the event source mapping reads the queue's attributes",
    ),
    (
        "kms:Decrypt",
        "only with a customer managed key on the secret, or on the output bucket (conditional \
         statements): Secrets Manager and S3 decrypt with the caller's permissions",
    ),
    (
        "kms:GenerateDataKey",
        "only with a customer managed key on the output bucket (conditional statement): S3 \
         asks KMS for each new object's data key with the caller's permissions",
    ),
];

/// `Resource: "*"` is allowed only where AWS cannot name a resource. Nothing here needs it.
const STAR_RESOURCE_ALLOWED_FOR: &[&str] = &[];

/// The resource types of the template that take a CloudFormation `Tags` list: each resource of
/// these carries the project's and the stack's tags.
const TAGGED_TYPES: &[&str] = &[
    "AWS::S3::Bucket",
    "AWS::DynamoDB::Table",
    "AWS::SQS::Queue",
    "AWS::Logs::LogGroup",
    "AWS::IAM::Role",
    "AWS::CloudWatch::Alarm",
    "AWS::CloudWatch::Dashboard",
    "AWS::Athena::WorkGroup",
];

/// The resource types of the template that take no tags at all.
const UNTAGGABLE_TYPES: &[&str] = &[
    "AWS::S3::BucketPolicy",
    "AWS::Scheduler::Schedule",
    "AWS::Glue::Database",
    "AWS::Glue::Table",
];

/// Variables the function may set beyond the program's settings (read by the runtime or libraries).
const STANDARD_VARIABLES: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

/// Settings that name credentials directly: on Lambda the secret comes from MIXPANEL_SECRET_ID.
const CREDENTIAL_VARIABLES: &[&str] = &[
    "MIXPANEL_API_SECRET",
    "MIXPANEL_SERVICE_ACCOUNT_USERNAME",
    "MIXPANEL_SERVICE_ACCOUNT_SECRET",
    "MIXPANEL_PROJECT_ID",
];

/// Settings required on Lambda (src/config.rs, `RunMode::Lambda`).
const REQUIRED_ON_LAMBDA: &[&str] = &[
    "MIXPANEL_SECRET_ID",
    "MIXPANEL_START_DATE",
    "OUTPUT_BUCKET",
    "STATE_TABLE",
];

// --- reading the template --------------------------------------------------------------------

fn resources(t: &Value) -> &serde_json::Map<String, Value> {
    t["Resources"].as_object().expect("Resources")
}

fn resources_of_type<'a>(t: &'a Value, kind: &str) -> Vec<(&'a String, &'a Value)> {
    resources(t)
        .iter()
        .filter(|(_, r)| r["Type"] == kind)
        .collect()
}

fn function(t: &Value) -> &Value {
    let functions = resources_of_type(t, "AWS::Serverless::Function");
    assert_eq!(functions.len(), 1, "one function");
    functions[0].1
}

fn environment(t: &Value) -> &serde_json::Map<String, Value> {
    function(t)["Properties"]["Environment"]["Variables"]
        .as_object()
        .expect("the function's Environment.Variables")
}

/// `MIXPANEL_START_DATE` → `MixpanelStartDate`: the parameter of a setting.
fn camel(var: &str) -> String {
    var.split('_')
        .map(|w| {
            let w = w.to_ascii_lowercase();
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn as_strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().flat_map(as_strings).collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

/// A parameter's default as the string CloudFormation passes on.
fn default_of(param: &Value) -> Option<String> {
    match &param["Default"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Seconds between two ticks of a `rate(N unit)` schedule expression.
fn rate_seconds(expr: &str) -> u64 {
    let inner = expr
        .strip_prefix("rate(")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a rate expression: {expr:?}"));
    let (n, unit) = inner
        .split_once(' ')
        .unwrap_or_else(|| panic!("rate(N unit): {expr:?}"));
    let n: u64 = n.parse().unwrap_or_else(|e| panic!("{expr:?}: {e}"));
    let unit_seconds = match unit.trim_end_matches('s') {
        "minute" => 60,
        "hour" => 3600,
        "day" => 86400,
        other => panic!("{expr:?}: unit {other:?}"),
    };
    n * unit_seconds
}

/// Each table's schedule and the seconds between its ticks at the parameter's default.
fn schedules(t: &Value) -> BTreeMap<Table, (&String, &Value, u64)> {
    let params = t["Parameters"].as_object().unwrap();
    resources_of_type(t, "AWS::Scheduler::Schedule")
        .into_iter()
        .map(|(name, schedule)| {
            let input = schedule["Properties"]["Target"]["Input"].as_str().unwrap();
            let table = match parse_event(&serde_json::from_str(input).unwrap()) {
                Ok(Invocation::Scheduled(table)) => table,
                other => panic!("{name}: {other:?}"),
            };
            let rate = schedule["Properties"]["ScheduleExpression"]["Ref"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: the rate is a parameter"));
            let interval = rate_seconds(&default_of(&params[rate]).unwrap());
            (table, (name, schedule, interval))
        })
        .collect()
}

/// The settings the function gets with every parameter at its default.
fn default_settings(t: &Value) -> Settings {
    let env = default_environment(t);
    Settings::from_lookup(RunMode::Lambda, |k| env.get(k).cloned()).unwrap()
}

/// Every statement of every inline policy of a role.
fn statements(role: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for p in role["Properties"]["Policies"]
        .as_array()
        .expect("inline Policies")
    {
        let name = p["PolicyName"].as_str().unwrap().to_string();
        for s in p["PolicyDocument"]["Statement"].as_array().unwrap() {
            // A conditional statement: {"Fn::If": [cond, statement, AWS::NoValue]}.
            let s = match s.get("Fn::If") {
                Some(branches) => branches[1].clone(),
                None => s.clone(),
            };
            out.push((name.clone(), s));
        }
    }
    out
}

// --- the tests -------------------------------------------------------------------------------

#[test]
fn the_function_sets_only_known_settings_every_setting_and_every_required_one() {
    let t = template();
    let env = environment(&t);
    let params = t["Parameters"].as_object().unwrap();

    for name in env.keys() {
        assert!(
            VARIABLES.contains(&name.as_str()) || STANDARD_VARIABLES.contains(&name.as_str()),
            "the template sets {name}, which the program does not read (src/config.rs VARIABLES)"
        );
        assert!(
            !CREDENTIAL_VARIABLES.contains(&name.as_str()),
            "the template sets {name}: on Lambda credentials come only from MIXPANEL_SECRET_ID"
        );
    }
    for var in REQUIRED_ON_LAMBDA {
        assert!(
            env.contains_key(*var),
            "{var} is required on Lambda but not set"
        );
    }
    for var in VARIABLES {
        if !CREDENTIAL_VARIABLES.contains(var) {
            assert!(
                env.contains_key(*var),
                "the setting {var} has no parameter in the template"
            );
        }
    }

    // Each setting comes from the parameter named like it, except the two resources.
    for (var, value) in env {
        match var.as_str() {
            "OUTPUT_BUCKET" => assert_eq!(
                value,
                &json!({"Fn::If": ["CreateBucket", {"Ref": "Bucket"}, {"Ref": "OutputBucket"}]}),
                "OUTPUT_BUCKET: the bucket parameter, or the bucket the stack creates"
            ),
            "STATE_TABLE" => {
                assert_eq!(value, &json!({"Ref": "StateTable"}));
                assert_eq!(resources(&t)["StateTable"]["Type"], "AWS::DynamoDB::Table");
            }
            "FAN_OUT_QUEUE_URL" => {
                assert_eq!(value, &json!({"Ref": "FanOutQueue"}), "the queue's URL");
                assert_eq!(resources(&t)["FanOutQueue"]["Type"], "AWS::SQS::Queue");
            }
            "GLUE_DATABASE" => {
                assert_eq!(
                    value,
                    &json!({"Fn::If": ["CreateGlueTables", {"Ref": "GlueDatabase"}, {"Ref": "AWS::NoValue"}]}),
                    "the database the stack creates, when it creates one"
                );
                let description = params["GlueDatabaseName"]["Description"].as_str().unwrap();
                assert!(description.starts_with("GLUE_DATABASE."), "{description}");
            }
            _ => {
                let param = camel(var);
                assert_eq!(
                    value,
                    &json!({"Ref": param}),
                    "{var} comes from the parameter {param}"
                );
                assert!(params.contains_key(&param), "no parameter {param}");
                let description = params[&param]["Description"].as_str().unwrap_or("");
                assert!(
                    description.starts_with(&format!("{var}.")),
                    "the description of {param} starts with the variable it sets: {description:?}"
                );
            }
        }
    }
}

/// The variables the function gets with every parameter at its default.
fn default_environment(t: &Value) -> BTreeMap<String, String> {
    let params = t["Parameters"].as_object().unwrap();
    environment(t)
        .iter()
        .map(|(var, value)| {
            let v = match var.as_str() {
                "OUTPUT_BUCKET" => "my-bucket".to_string(),
                "STATE_TABLE" => "my-stack-StateTable-ABC".to_string(),
                "FAN_OUT_QUEUE_URL" => {
                    "https://sqs.us-east-1.amazonaws.com/123456789012/my-stack-FanOutQueue-ABC"
                        .to_string()
                }
                "GLUE_DATABASE" => default_of(&params["GlueDatabaseName"]).unwrap(),
                _ => {
                    let param = value["Ref"].as_str().unwrap();
                    default_of(&params[param]).unwrap_or_else(|| match param {
                        "MixpanelSecretId" => {
                            "arn:aws:secretsmanager:us-east-1:123456789012:secret:mp-AbCdEf".into()
                        }
                        "MixpanelStartDate" => "2026-01-01".into(),
                        other => panic!("the parameter {other} has no default"),
                    })
                }
            };
            (var.clone(), v)
        })
        .collect()
}

#[test]
fn the_parameter_defaults_are_the_programs_defaults_and_every_allowed_value_is_valid() {
    let t = template();
    let env = default_environment(&t);
    let deployed = Settings::from_lookup(RunMode::Lambda, |k| env.get(k).cloned())
        .unwrap_or_else(|e| panic!("the template's defaults are not valid settings: {e}"));
    // The program with only the required variables (the same values), i.e. its own defaults.
    let required: BTreeMap<&str, String> = REQUIRED_ON_LAMBDA
        .iter()
        .map(|v| (*v, env[*v].clone()))
        .collect();
    let mut code = Settings::from_lookup(RunMode::Lambda, |k| required.get(k).cloned()).unwrap();
    assert_eq!(code.output_prefix, deployed.output_prefix, "OUTPUT_PREFIX");
    // Set or not, the prefix is the same on S3; only the local-folder variant records whether.
    code.local_prefix = deployed.local_prefix.clone();
    // The fan-out queue is a resource of the stack; the program's default is none (local runs).
    assert_eq!(code.fan_out_queue_url, None);
    code.fan_out_queue_url = deployed.fan_out_queue_url.clone();
    // So is the Glue database: none by default in the program, the stack's in the template.
    assert_eq!(code.glue_database, None);
    code.glue_database = deployed.glue_database.clone();
    assert_eq!(
        format!("{deployed:#?}"),
        format!("{code:#?}"),
        "the settings the template's defaults give (left) vs the program's defaults (right)"
    );

    // Every value a parameter allows is a valid setting.
    let params = t["Parameters"].as_object().unwrap();
    for (var, value) in environment(&t) {
        let Some(param) = value["Ref"].as_str() else {
            continue;
        };
        let Some(allowed) = params
            .get(param)
            .and_then(|p| p["AllowedValues"].as_array())
        else {
            continue;
        };
        for a in allowed {
            let a = match a {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let mut e = env.clone();
            e.insert(var.clone(), a.clone());
            if let Err(err) = Settings::from_lookup(RunMode::Lambda, |k| e.get(k).cloned()) {
                panic!("{param} allows {a:?}, which the program refuses: {err}");
            }
        }
    }
}

#[test]
fn one_schedule_per_table_invokes_the_function_with_its_scheduled_event() {
    let t = template();
    let params = t["Parameters"].as_object().unwrap();
    let mut seen = BTreeSet::new();
    for (name, schedule) in resources_of_type(&t, "AWS::Scheduler::Schedule") {
        let p = &schedule["Properties"];
        let input = p["Target"]["Input"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: Input"));
        let event: Value = serde_json::from_str(input).unwrap_or_else(|e| panic!("{name}: {e}"));
        let table = match parse_event(&event) {
            Ok(Invocation::Scheduled(table)) => table,
            other => panic!("{name}: {input} is not a scheduled event: {other:?}"),
        };
        assert!(seen.insert(table), "two schedules for {table}");
        assert_eq!(
            p["Target"]["Arn"],
            json!({"Ref": "ReplicatorFunction.Alias"}),
            "{name} invokes the alias, not $LATEST"
        );
        assert_eq!(
            p["Target"]["RoleArn"],
            json!({"Fn::GetAtt": ["SchedulerRole", "Arn"]})
        );

        // Its own rate and state parameters, named after the table.
        let stem = camel(table.as_str());
        assert_eq!(name, &format!("{stem}Schedule"));
        assert_eq!(
            p["ScheduleExpression"],
            json!({"Ref": format!("{stem}ScheduleRate")})
        );
        assert_eq!(p["State"], json!({"Ref": format!("{stem}ScheduleState")}));
        let rate = default_of(&params[&format!("{stem}ScheduleRate")]).unwrap();
        assert!(
            rate.starts_with("rate(") && rate.ends_with(')'),
            "{stem}ScheduleRate {rate:?}"
        );
        let state = &params[&format!("{stem}ScheduleState")];
        assert_eq!(state["AllowedValues"], json!(["ENABLED", "DISABLED"]));
        // Every table is replicated: a fresh stack replicates all of them.
        assert_eq!(
            state["Default"], "ENABLED",
            "{name}: every schedule runs by default"
        );
        for text in [
            &state["Description"],
            &params[&format!("{stem}ScheduleRate")]["Description"],
            &p["Description"]["Fn::Sub"],
        ] {
            let text = text
                .as_str()
                .unwrap_or_else(|| panic!("{name}: a description"));
            assert!(
                text.contains(table.as_str()) && !text.contains("not replicated"),
                "{name}: {text:?}"
            );
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        Table::ALL.to_vec(),
        "exactly one schedule per table"
    );
}

#[test]
fn a_tick_the_scheduler_cannot_deliver_is_retried_briefly_then_kept_and_alarmed() {
    let t = template();
    let res = resources(&t);
    for (table, (name, schedule, interval)) in schedules(&t) {
        let target = &schedule["Properties"]["Target"];
        // Retried a few times, for less than the interval: the next tick supersedes a stale one.
        let retry = &target["RetryPolicy"];
        let attempts = retry["MaximumRetryAttempts"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: MaximumRetryAttempts"));
        assert!((1..=5).contains(&attempts), "{name}: {attempts} retries");
        let age = retry["MaximumEventAgeInSeconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: MaximumEventAgeInSeconds"));
        assert!(
            (60..interval).contains(&age),
            "{name} ({table}): retried for {age} s, ticks every {interval} s"
        );
        // Then kept in the schedule dead-letter queue.
        assert_eq!(
            target["DeadLetterConfig"],
            json!({"Arn": {"Fn::GetAtt": ["ScheduleDeadLetterQueue", "Arn"]}}),
            "{name}"
        );
    }
    let queue = &res["ScheduleDeadLetterQueue"];
    assert_eq!(queue["Type"], "AWS::SQS::Queue");
    assert_eq!(queue["Properties"]["SqsManagedSseEnabled"], true);
    assert_eq!(queue["Properties"]["MessageRetentionPeriod"], 1209600);
    // Server-side encryption with SQS's own key: the scheduler's role needs no KMS permission.
    assert!(queue["Properties"].get("KmsMasterKeyId").is_none());

    // Someone hears of it.
    let alarm = &res["ScheduleDeadLetterQueueAlarm"]["Properties"];
    assert_eq!(alarm["Namespace"], "AWS/SQS");
    assert_eq!(alarm["MetricName"], "ApproximateNumberOfMessagesVisible");
    assert_eq!(
        alarm["Dimensions"],
        json!([{"Name": "QueueName", "Value": {"Fn::GetAtt": ["ScheduleDeadLetterQueue", "QueueName"]}}])
    );
    assert_eq!(
        (
            alarm["Threshold"].as_u64(),
            alarm["ComparisonOperator"].as_str()
        ),
        (Some(1), Some("GreaterThanOrEqualToThreshold")),
        "one message is enough"
    );
    for actions in ["AlarmActions", "OKActions"] {
        assert_eq!(
            alarm[actions],
            json!({"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}),
            "{actions}"
        );
    }
}

#[test]
fn the_default_rates_refresh_every_table_within_mixpanels_budgets() {
    let t = template();
    let settings = default_settings(&t);
    let refresh = settings.refresh.as_secs();
    let window = settings.rate_window.as_secs() as f64;
    let schedules = schedules(&t);
    // A table is read again at the first tick at least the refresh interval after its last
    // commit: within the refresh interval plus one tick, when every tick comes within it.
    let cycle = |table: Table| refresh + schedules[&table].2;
    for (name, _, interval) in schedules.values() {
        assert!(
            *interval <= refresh,
            "{name}: ticks every {interval} s, less often than the refresh interval ({refresh} s)"
        );
    }

    // Export API: export alone. Caught up, about one request per cycle.
    let export_demand = window / cycle(Table::Export) as f64;
    assert!(
        export_demand <= f64::from(settings.export_requests_per_window) / 10.0,
        "a caught-up export costs {export_demand:.1} of {} requests per window",
        settings.export_requests_per_window
    );
    assert!(
        schedules[&Table::Export].2 <= 300,
        "new export days start within minutes"
    );

    // Query API, shared by the other six (annotations through the same ledger): the project of
    // the template's comment (10 funnels, 20,000 profiles, 20 cohorts under 1000 members) fits.
    let per_read = [
        (Table::Revenue, 1),
        (Table::Funnels, 1 + 10),
        (Table::Engage, 20),
        (Table::Cohorts, 1),
        (Table::CohortMembers, 1 + 20),
        (Table::Annotations, 1),
    ];
    assert_eq!(per_read.len() + 1, Table::ALL.len());
    let per_cycle: u64 = per_read.iter().map(|(_, q)| q).sum();
    assert_eq!(
        per_cycle, 55,
        "the template's comment says 55 queries per re-read"
    );
    let query_demand: f64 = per_read
        .iter()
        .map(|(table, queries)| *queries as f64 * window / cycle(*table) as f64)
        .sum();
    assert!(
        query_demand <= f64::from(settings.query_requests_per_window),
        "the example project needs {query_demand:.1} queries per window of {}",
        settings.query_requests_per_window
    );
    assert_eq!(
        query_demand.round(),
        37.0,
        "the template's comment says about 37 an hour"
    );
}

#[test]
fn a_stale_table_and_a_silent_function_are_alarmed_but_a_healthy_replica_is_not() {
    let t = template();
    let res = resources(&t);
    let params = t["Parameters"].as_object().unwrap();
    let refresh = default_settings(&t).refresh.as_secs();
    let longest = schedules(&t).values().map(|(_, _, i)| *i).max().unwrap();

    // Freshness: the stalest table's FreshnessLagSeconds above the parameter.
    let param = &params["FreshnessLagAlarmSeconds"];
    assert_eq!(param["Type"], "Number");
    let threshold: u64 = default_of(param).unwrap().parse().unwrap();
    assert_eq!(threshold, 10800, "3 hours by default");
    // A healthy table is at most the refresh interval plus one tick old: never alarmed. A few
    // ticks that did no work are allowed; a stale table is heard of within hours, not days.
    assert!(
        threshold >= refresh + 3 * longest,
        "threshold {threshold} s vs refresh {refresh} s + 3 ticks of {longest} s"
    );
    assert!(threshold <= 4 * 3600, "threshold {threshold} s");
    let alarm = &res["FreshnessAlarm"]["Properties"];
    assert_eq!(
        alarm["Metrics"][0]["Expression"].as_str().unwrap(),
        format!(
            "SELECT MAX(FreshnessLagSeconds) FROM SCHEMA({}, \"Table\")",
            mixpanel_replicator::metrics::NAMESPACE
        )
    );
    assert_eq!(alarm["Metrics"][0]["ReturnData"], true);
    assert_eq!(
        alarm["Threshold"],
        json!({"Ref": "FreshnessLagAlarmSeconds"})
    );
    assert_eq!(alarm["ComparisonOperator"], "GreaterThanThreshold");
    // Every table has a data point in each period (one per tick): a stale table does not flap.
    let period = alarm["Metrics"][0]["Period"].as_u64().unwrap();
    assert!(
        period >= 2 * longest,
        "period {period} s, ticks every {longest} s"
    );

    // Heartbeat: no invocation at all over twice the longest interval, missing data included.
    let heartbeat = &res["HeartbeatAlarm"]["Properties"];
    assert_eq!(heartbeat["Namespace"], "AWS/Lambda");
    assert_eq!(heartbeat["MetricName"], "Invocations");
    assert_eq!(
        heartbeat["Dimensions"],
        json!([{"Name": "FunctionName", "Value": {"Ref": "ReplicatorFunction"}}])
    );
    assert_eq!(heartbeat["Statistic"], "Sum");
    let period = heartbeat["Period"].as_u64().unwrap();
    assert!(
        period >= 2 * longest && period.is_multiple_of(60),
        "period {period} s, ticks every {longest} s"
    );
    assert_eq!(
        (
            heartbeat["Threshold"].as_u64(),
            heartbeat["ComparisonOperator"].as_str()
        ),
        (Some(1), Some("LessThanThreshold")),
        "fewer than one invocation"
    );
    assert_eq!(
        heartbeat["TreatMissingData"], "breaching",
        "Lambda sends no Invocations data point when nothing ran"
    );
    for name in ["FreshnessAlarm", "HeartbeatAlarm"] {
        assert_eq!(
            res[name]["Properties"]["OKActions"],
            json!({"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}),
            "{name} says when it clears"
        );
    }
}

#[test]
fn the_dashboard_shows_each_tables_metrics_and_the_functions_errors_in_the_stacks_region() {
    let t = template();
    let dashboards = resources_of_type(&t, "AWS::CloudWatch::Dashboard");
    assert_eq!(dashboards.len(), 1, "one dashboard");
    let body = dashboards[0].1["Properties"]["DashboardBody"]["Fn::Sub"]
        .as_str()
        .expect("DashboardBody: !Sub with the region and the function");
    // What CloudFormation substitutes: the stack's region and function, `${!` for a literal.
    assert!(body.contains("${AWS::Region}") && body.contains("${ReplicatorFunction}"));
    let body = body
        .replace("${AWS::Region}", "eu-west-1")
        .replace("${ReplicatorFunction}", "my-stack")
        .replace("${!", "${");
    let body: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("DashboardBody is not JSON: {e}"));
    let widgets = body["widgets"].as_array().expect("widgets");
    for w in widgets {
        assert_eq!(
            w["properties"]["region"], "eu-west-1",
            "{}",
            w["properties"]["title"]
        );
    }
    let metrics: Vec<&Value> = widgets
        .iter()
        .flat_map(|w| w["properties"]["metrics"].as_array().unwrap())
        .collect();

    // Each EMF metric, one line per table: every metric of the namespace with the dimension.
    for (metric, stat) in [
        ("Records", "Sum"),
        ("FreshnessLagSeconds", "Maximum"),
        ("ParkedSlices", "Maximum"),
        ("RateLimited", "Sum"),
    ] {
        let search = format!(
            "SEARCH('{{{},Table}} MetricName=\"{metric}\"', '{stat}', 300)",
            mixpanel_replicator::metrics::NAMESPACE
        );
        assert!(
            metrics
                .iter()
                .any(|m| m[0]["expression"] == search.as_str()),
            "no widget shows {search}"
        );
    }
    // The names are the function's EMF metric names.
    for metric in [
        "Records",
        "ParkedSlices",
        "RateLimited",
        "FreshnessLagSeconds",
    ] {
        assert!(
            include_str!("../src/metrics.rs").contains(&format!("{{\"Name\": \"{metric}\"")),
            "the function emits no EMF metric {metric}"
        );
    }
    // The function's errors and throttles, by its name.
    for metric in ["Errors", "Throttles"] {
        assert!(
            metrics
                .iter()
                .any(|m| m == &&json!(["AWS/Lambda", metric, "FunctionName", "my-stack"])),
            "no widget shows the function's {metric}"
        );
    }
}

/// The values samconfig.toml's `parameter_overrides` (every section) give `param`.
fn samconfig_overrides(param: &str) -> Vec<String> {
    let path = Path::new(ROOT).join("samconfig.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let prefix = format!("\"{param}=");
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            rest.split_once('"')
                .expect("a quoted override")
                .0
                .to_string()
        })
        .collect()
}

#[test]
fn the_first_deploy_needs_no_concurrency_quota_and_refuses_the_placeholder_secret() {
    let t = template();
    let params = t["Parameters"].as_object().unwrap();

    // No reservation by default: Lambda keeps 100 of the account's concurrency unreserved, so a
    // new account (a quota of 10) cannot reserve any and the deploy would roll back.
    assert_eq!(
        default_of(&params["ReservedConcurrency"]).as_deref(),
        Some("-1")
    );
    assert_eq!(
        t["Conditions"]["HasReservedConcurrency"],
        json!({"Fn::Not": [{"Fn::Equals": [{"Ref": "ReservedConcurrency"}, "-1"]}]})
    );
    assert_eq!(
        function(&t)["Properties"]["ReservedConcurrentExecutions"],
        json!({"Fn::If": ["HasReservedConcurrency", {"Ref": "ReservedConcurrency"}, {"Ref": "AWS::NoValue"}]}),
        "-1 sets no ReservedConcurrentExecutions"
    );

    // samconfig.toml's secret is a placeholder the template refuses: a forgotten edit fails.
    let secret = &params["MixpanelSecretId"];
    assert!(
        default_of(secret).is_none(),
        "MixpanelSecretId has no default"
    );
    let pattern = regex_lite::Regex::new(secret["AllowedPattern"].as_str().unwrap()).unwrap();
    let real = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mixpanel/credentials-AbC12f";
    assert!(pattern.is_match(real), "a real secret ARN is allowed");
    let placeholders = samconfig_overrides("MixpanelSecretId");
    assert_eq!(
        placeholders.len(),
        2,
        "deploy and local_invoke: {placeholders:?}"
    );
    for p in &placeholders {
        assert!(
            !pattern.is_match(p),
            "samconfig.toml's MixpanelSecretId {p:?} passes the template's AllowedPattern: a \
             forgotten edit would deploy"
        );
    }
}

#[test]
fn every_resource_that_takes_tags_carries_the_project_and_the_stack() {
    let t = template();
    let project = json!({"Key": "Project", "Value": "mixpanel-replicator"});
    let stack = json!({"Key": "Stack", "Value": {"Ref": "AWS::StackName"}});
    for (name, r) in resources(&t) {
        let kind = r["Type"].as_str().unwrap();
        if kind == "AWS::Serverless::Function" {
            continue;
        }
        if TAGGED_TYPES.contains(&kind) {
            let tags = r["Properties"]["Tags"]
                .as_array()
                .unwrap_or_else(|| panic!("{name} ({kind}) has no Tags"));
            for tag in [&project, &stack] {
                assert!(tags.contains(tag), "{name}: {tag} in {tags:?}");
            }
        } else {
            assert!(
                UNTAGGABLE_TYPES.contains(&kind),
                "{name}: {kind} is in neither TAGGED_TYPES nor UNTAGGABLE_TYPES: tag it if it \
                 takes tags"
            );
            assert!(r["Properties"].get("Tags").is_none(), "{name}");
        }
    }
    // The function (SAM's map of tags), through Globals or its own properties, passed on to
    // the resources SAM generates for it.
    let p = &function(&t)["Properties"];
    let globals = &t["Globals"]["Function"];
    let tags = p.get("Tags").unwrap_or(&globals["Tags"]);
    assert_eq!(tags["Project"], "mixpanel-replicator");
    assert_eq!(tags["Stack"], json!({"Ref": "AWS::StackName"}));
    assert_eq!(
        p.get("PropagateTags").unwrap_or(&globals["PropagateTags"]),
        true
    );
}

/// Every SDK operation called in `src/`: `client.<op>()` in the files that use an AWS SDK.
fn sdk_calls_in_src() -> BTreeMap<String, Vec<String>> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&Path::new(ROOT).join("src"), &mut files);
    let mut calls: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        if !text.contains("aws_sdk_") {
            continue;
        }
        let rel = f.strip_prefix(ROOT).unwrap().display().to_string();
        let bytes = text.as_bytes();
        let mut from = 0;
        while let Some(i) = text[from..].find("client") {
            let at = from + i;
            from = at + "client".len();
            let before_ok =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            let rest = text[from..].trim_start();
            if !before_ok || !rest.starts_with('.') {
                continue;
            }
            let rest = rest[1..].trim_start();
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if ident.is_empty() || !rest[ident.len()..].starts_with("()") {
                continue;
            }
            if !NOT_OPERATIONS.contains(&ident.as_str()) {
                calls.entry(ident).or_default().push(rel.clone());
            }
        }
        // Any listed operation, whatever the receiver is called.
        let operations = CODE_CALLS
            .iter()
            .map(|(op, _, _)| *op)
            .chain(OTHER_OPERATIONS.iter().copied());
        for op in operations {
            if text.contains(&format!(".{op}()"))
                && !calls.get(op).is_some_and(|f| f.contains(&rel))
            {
                calls.entry(op.to_string()).or_default().push(rel.clone());
            }
        }
    }
    calls
}

#[test]
fn the_code_makes_exactly_the_listed_aws_calls() {
    let found = sdk_calls_in_src();
    let listed: BTreeSet<&str> = CODE_CALLS.iter().map(|(op, _, _)| *op).collect();
    for (op, files) in &found {
        assert!(
            listed.contains(op.as_str()),
            "{files:?} call the AWS operation {op}, which tests/template.rs CODE_CALLS does not \
             list: add it there and its IAM action to the function role in infra/template.yaml"
        );
    }
    for op in &listed {
        assert!(
            found.contains_key(*op),
            "CODE_CALLS lists {op}, which src/ no longer calls: remove it (and its IAM action)"
        );
    }
}

#[test]
fn the_function_role_allows_exactly_the_calls_the_code_makes() {
    let t = template();
    let res = resources(&t);
    let f = function(&t);
    assert_eq!(
        f["Properties"]["Role"],
        json!({"Fn::GetAtt": ["FunctionRole", "Arn"]}),
        "the function uses the template's role (a SAM-made role brings AWSLambdaBasicExecutionRole, which allows logs on *)"
    );
    assert!(f["Properties"].get("Policies").is_none());

    let by_policy = |name: &str| -> BTreeMap<String, Vec<Value>> {
        let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (policy, s) in statements(&res["FunctionRole"]) {
            if policy == name {
                assert_eq!(s["Effect"], "Allow");
                for a in as_strings(&s["Action"]) {
                    m.entry(a).or_default().push(s["Resource"].clone());
                }
            }
        }
        m
    };
    let replicator = by_policy("replicator");
    let expected: BTreeSet<&str> = CODE_CALLS.iter().map(|(_, action, _)| *action).collect();
    assert_eq!(
        replicator
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        expected,
        "the policy `replicator` allows exactly the actions of the calls the code makes"
    );
    let platform = by_policy("platform");
    assert_eq!(
        platform.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        PLATFORM_ACTIONS
            .iter()
            .map(|(a, _)| *a)
            .collect::<BTreeSet<_>>(),
        "the policy `platform` allows exactly what Lambda needs on the function's behalf"
    );
    let policies: Vec<&str> = res["FunctionRole"]["Properties"]["Policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["PolicyName"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["replicator", "platform"]);

    // Exact resources.
    let bucket = json!({"Fn::If": ["CreateBucket", {"Ref": "Bucket"}, {"Ref": "OutputBucket"}]});
    let objects = json!({"Fn::Sub": ["arn:${AWS::Partition}:s3:::${BucketName}/${OutputPrefix}/*", {"BucketName": bucket}]});
    for a in [
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    ] {
        assert_eq!(
            replicator[a],
            std::slice::from_ref(&objects),
            "{a}: only the objects under the prefix"
        );
    }
    let bucket_arn =
        json!({"Fn::Sub": ["arn:${AWS::Partition}:s3:::${BucketName}", {"BucketName": bucket}]});
    assert_eq!(replicator["s3:ListBucket"], [bucket_arn]);
    let list = statements(&res["FunctionRole"])
        .into_iter()
        .find(|(_, s)| s["Action"] == "s3:ListBucket")
        .unwrap()
        .1;
    assert_eq!(
        list["Condition"],
        json!({"StringLike": {"s3:prefix": {"Fn::Sub": "${OutputPrefix}/*"}}}),
        "listing only under the prefix"
    );
    for a in [
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:Query",
    ] {
        assert_eq!(
            replicator[a],
            [json!({"Fn::GetAtt": ["StateTable", "Arn"]})],
            "{a}"
        );
    }
    assert_eq!(
        replicator["secretsmanager:GetSecretValue"],
        [json!({"Ref": "MixpanelSecretId"})]
    );
    // The catalog: the seven tables of the stack's database (Glue authorizes a table's
    // operations on the catalog, the database and the table).
    let glue_arn = |rest: &str| json!({"Fn::Sub": format!("arn:${{AWS::Partition}}:glue:${{AWS::Region}}:${{AWS::AccountId}}:{rest}")});
    let mut catalog = vec![glue_arn("catalog"), glue_arn("database/${GlueDatabase}")];
    for table in Table::ALL {
        catalog.push(glue_arn(&format!("table/${{GlueDatabase}}/{table}")));
    }
    for a in ["glue:GetTable", "glue:UpdateTable"] {
        assert_eq!(replicator[a], [Value::Array(catalog.clone())], "{a}");
    }
    let glue_statement =
        res["FunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| {
                s.get("Fn::If")
                    .is_some_and(|b| b[1]["Sid"] == "CatalogColumns")
            })
            .expect("the catalog statement");
    assert_eq!(
        glue_statement["Fn::If"][0], "CreateGlueTables",
        "granted only when the stack creates the tables"
    );
    for a in ["logs:CreateLogStream", "logs:PutLogEvents"] {
        assert_eq!(
            platform[a],
            [json!({"Fn::GetAtt": ["LogGroup", "Arn"]})],
            "{a}"
        );
    }
    assert_eq!(
        platform["sqs:SendMessage"],
        [json!({"Fn::GetAtt": ["DeadLetterQueue", "Arn"]})]
    );
    assert_eq!(
        replicator["sqs:SendMessage"],
        [json!({"Fn::GetAtt": ["FanOutQueue", "Arn"]})],
        "the function sends day events only to the fan-out queue"
    );
    for a in [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
    ] {
        assert_eq!(
            platform[a],
            [json!({"Fn::GetAtt": ["FanOutQueue", "Arn"]})],
            "{a}: the event source mapping polls only the fan-out queue"
        );
    }
    assert_eq!(
        platform["kms:Decrypt"],
        [
            json!({"Ref": "MixpanelSecretKmsKeyArn"}),
            json!({"Ref": "BucketKmsKeyArn"}),
            json!({"Ref": "OutputBucketKmsKeyArn"})
        ]
    );
    assert_eq!(
        platform["kms:GenerateDataKey"],
        [
            json!({"Ref": "BucketKmsKeyArn"}),
            json!({"Ref": "OutputBucketKmsKeyArn"})
        ]
    );
    assert_eq!(
        f["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"],
        json!({"Type": "SQS", "Destination": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}})
    );

    // The scheduler may only invoke this function, and put the ticks it could not deliver in
    // their dead-letter queue.
    let mut sched: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (_, s) in statements(&res["SchedulerRole"]) {
        assert_eq!(s["Effect"], "Allow");
        for a in as_strings(&s["Action"]) {
            sched.entry(a).or_default().push(s["Resource"].clone());
        }
    }
    assert_eq!(
        sched,
        BTreeMap::from([
            (
                "lambda:InvokeFunction".to_string(),
                vec![json!({"Ref": "ReplicatorFunction.Alias"})]
            ),
            (
                "sqs:SendMessage".to_string(),
                vec![json!({"Fn::GetAtt": ["ScheduleDeadLetterQueue", "Arn"]})]
            ),
        ]),
        "the scheduler's role allows exactly these actions on exactly these resources"
    );
}

#[test]
fn no_role_allows_a_wildcard_action_or_resource() {
    let t = template();
    let roles = resources_of_type(&t, "AWS::IAM::Role");
    assert_eq!(
        roles.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["FunctionRole", "SchedulerRole"]
    );
    for kind in ["AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"] {
        assert!(
            resources_of_type(&t, kind).is_empty(),
            "no {kind}: policies are inline in their role"
        );
    }
    for (name, role) in roles {
        assert!(
            role["Properties"].get("ManagedPolicyArns").is_none(),
            "{name}: no managed policies (AWS's grant more than the function needs)"
        );
        for (policy, s) in statements(role) {
            assert_eq!(s["Effect"], "Allow", "{name}/{policy}");
            assert!(s.get("NotAction").is_none() && s.get("NotResource").is_none());
            for a in as_strings(&s["Action"]) {
                assert!(!a.contains('*'), "{name}/{policy}: wildcard action {a}");
            }
            let star = match &s["Resource"] {
                Value::String(r) => r.contains('*') && !r.starts_with("arn:"),
                Value::Array(rs) => rs.iter().any(|r| r == "*"),
                _ => false,
            };
            let actions = as_strings(&s["Action"]);
            assert!(
                !star
                    || actions
                        .iter()
                        .all(|a| STAR_RESOURCE_ALLOWED_FOR.contains(&a.as_str())),
                "{name}/{policy}: Resource \"*\" for {actions:?}"
            );
        }
    }
    // The bucket policy only refuses (requests without TLS).
    for (name, policy) in resources_of_type(&t, "AWS::S3::BucketPolicy") {
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
            .as_array()
            .unwrap()
        {
            assert_eq!(
                s["Effect"], "Deny",
                "{name}: bucket policy statements only deny"
            );
            assert_eq!(
                s["Condition"],
                json!({"Bool": {"aws:SecureTransport": "false"}})
            );
        }
    }
}

#[test]
fn the_function_storage_and_alarms_are_as_documented() {
    let t = template();
    let res = resources(&t);
    let params = t["Parameters"].as_object().unwrap();
    let f = function(&t);
    let p = &f["Properties"];

    // Built by cargo-lambda from the workspace, as the binary of this package.
    assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda");
    assert_eq!(
        f["Metadata"]["BuildProperties"]["Binary"],
        "mixpanel-replicator"
    );
    assert!(env!("CARGO_BIN_EXE_mixpanel-replicator").ends_with("mixpanel-replicator"));
    let code = Path::new(ROOT)
        .join("infra")
        .join(p["CodeUri"].as_str().unwrap());
    assert!(
        code.join("Cargo.toml").exists(),
        "CodeUri points at the Cargo project"
    );
    // ... without the default features (the demo's simulator): `BuildProperties` pass cargo no
    // flags, so the package's cargo-lambda metadata says it.
    assert_eq!(
        f["Metadata"]["BuildProperties"].as_object().unwrap().len(),
        1,
        "{}",
        f["Metadata"]
    );
    let manifest = std::fs::read_to_string(code.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\n[package.metadata.lambda.build]\nno_default_features = true\n"),
        "Cargo.toml: cargo lambda build without the default features"
    );
    assert_eq!(
        (p["Runtime"].as_str(), p["Handler"].as_str()),
        (Some("provided.al2023"), Some("bootstrap"))
    );
    assert_eq!(p["Architectures"], json!(["arm64"]));
    for (prop, param, default) in [
        ("MemorySize", "FunctionMemorySize", "1769"),
        ("Timeout", "FunctionTimeout", "900"),
    ] {
        assert_eq!(p[prop], json!({"Ref": param}));
        assert_eq!(
            default_of(&params[param]).as_deref(),
            Some(default),
            "{param}"
        );
    }
    assert_eq!(
        p["EphemeralStorage"]["Size"],
        json!({"Ref": "FunctionEphemeralStorage"})
    );
    assert_eq!(
        default_of(&params["FunctionEphemeralStorage"]).as_deref(),
        Some("10240")
    );
    assert_eq!(p["LoggingConfig"]["LogGroup"], json!({"Ref": "LogGroup"}));
    assert_eq!(
        res["LogGroup"]["Properties"]["RetentionInDays"],
        json!({"Ref": "LogRetentionInDays"})
    );

    // The state table as the DynamoDB store expects it.
    let table = &res["StateTable"]["Properties"];
    assert_eq!(
        table["KeySchema"],
        json!([{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}])
    );
    assert_eq!(
        table["AttributeDefinitions"],
        json!([{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}])
    );
    assert_eq!(table["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(
        table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(table["SSESpecification"]["SSEEnabled"], true);
    // The replica's memory: never deleted by a slip, kept when the stack goes.
    assert_eq!(table["DeletionProtectionEnabled"], true);
    assert_eq!(res["StateTable"]["DeletionPolicy"], "Retain");

    // The bucket: private, encrypted, abandoned multipart uploads cleaned up.
    let bucket = &res["Bucket"];
    assert_eq!(bucket["Condition"], "CreateBucket");
    let b = &bucket["Properties"];
    for k in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(b["PublicAccessBlockConfiguration"][k], true, "{k}");
    }
    assert!(b["BucketEncryption"]["ServerSideEncryptionConfiguration"].is_array());
    assert!(
        b["LifecycleConfiguration"]["Rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |r| r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
                    && r["Status"] == "Enabled"
            )
    );

    // Alarms: errors, throttles, and the program's RateLimited metric under its namespace.
    let alarms = resources_of_type(&t, "AWS::CloudWatch::Alarm");
    let lambda_metrics: BTreeSet<&str> = alarms
        .iter()
        .filter(|(_, a)| a["Properties"]["Namespace"] == "AWS/Lambda")
        .map(|(_, a)| a["Properties"]["MetricName"].as_str().unwrap())
        .collect();
    assert_eq!(
        lambda_metrics,
        BTreeSet::from(["Errors", "Throttles", "Invocations"])
    );
    let rate_limited = &res["RateLimitedAlarm"]["Properties"]["Metrics"][0]["Expression"];
    assert_eq!(
        rate_limited.as_str().unwrap(),
        format!(
            "SELECT SUM(RateLimited) FROM SCHEMA({}, \"Table\")",
            mixpanel_replicator::metrics::NAMESPACE
        )
    );
    // Parked slices: the alarm reads the metric the function emits on every invocation.
    let parked = &res["ParkedSlicesAlarm"]["Properties"];
    assert_eq!(
        parked["Metrics"][0]["Expression"].as_str().unwrap(),
        format!(
            "SELECT MAX(ParkedSlices) FROM SCHEMA({}, \"Table\")",
            mixpanel_replicator::metrics::NAMESPACE
        )
    );
    assert_eq!(parked["Threshold"], json!(1));
    assert!(
        include_str!("../src/metrics.rs").contains("\"ParkedSlices\": parked"),
        "the function emits the ParkedSlices metric the alarm reads"
    );
    for (name, a) in &alarms {
        assert_eq!(
            a["Properties"]["AlarmActions"],
            json!({"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}),
            "{name} notifies the optional SNS topic"
        );
    }

    // Athena: one table per replicated table, read through the commit's symlink manifests.
    for table in Table::ALL {
        let name = table.as_str();
        let stem = camel(name);
        let resource = &res[&format!("{stem}GlueTable")];
        assert_eq!(resource["Type"], "AWS::Glue::Table", "{name}");
        assert_eq!(resource["Condition"], "CreateGlueTables", "{name}");
        assert_eq!(
            resource["Properties"]["DatabaseName"],
            json!({"Ref": "GlueDatabase"})
        );
        let glue = &resource["Properties"]["TableInput"];
        assert_eq!(glue["Name"], name);
        let sd = &glue["StorageDescriptor"];
        assert_eq!(
            sd["SerdeInfo"]["SerializationLibrary"],
            "org.openx.data.jsonserde.JsonSerDe"
        );
        assert_eq!(sd["SerdeInfo"]["Parameters"]["case.insensitive"], "true");
        assert_eq!(
            sd["InputFormat"],
            "org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat"
        );
        // The columns every row has, as the function writes them first (it adds the rest).
        let columns: Vec<(String, String)> = sd["Columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["Name"].as_str().unwrap().to_string(),
                    c["Type"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let fixed: Vec<(String, String)> = catalog::fixed_columns(table)
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(columns, fixed, "{name}: src/sink/catalog.rs fixed_columns");
        if table.is_date_sliced() {
            assert_eq!(glue["PartitionKeys"][0]["Name"], "date", "{name}");
            assert_eq!(glue["Parameters"]["projection.date.type"], "date");
            assert_eq!(
                glue["Parameters"]["projection.date.range"],
                json!({"Fn::Sub": "${MixpanelStartDate},NOW+1DAYS"})
            );
            assert_eq!(
                sd["Location"]["Fn::Sub"][0],
                format!("s3://${{BucketName}}/${{OutputPrefix}}/{name}/_symlink/")
            );
            assert_eq!(
                glue["Parameters"]["storage.location.template"]["Fn::Sub"][0],
                format!("s3://${{BucketName}}/${{OutputPrefix}}/{name}/_symlink/date=${{!date}}/")
            );
        } else {
            assert!(glue.get("PartitionKeys").is_none(), "{name}");
            assert_eq!(
                sd["Location"]["Fn::Sub"][0],
                format!("s3://${{BucketName}}/${{OutputPrefix}}/{name}/_symlink/latest/"),
                "{name}: the newest snapshot's manifest"
            );
        }
    }
    assert_eq!(
        resources_of_type(&t, "AWS::Glue::Table").len(),
        Table::ALL.len()
    );
    let workgroup = &res["AthenaWorkGroup"];
    assert_eq!(workgroup["Type"], "AWS::Athena::WorkGroup");
    assert_eq!(workgroup["Condition"], "CreateGlueTables");
    let config = &workgroup["Properties"]["WorkGroupConfiguration"];
    assert_eq!(config["EnforceWorkGroupConfiguration"], true);
    assert_eq!(
        config["ResultConfiguration"]["OutputLocation"]["Fn::Sub"][0],
        "s3://${BucketName}/athena-results/",
        "results beside the output, outside the prefix the function writes"
    );
}

#[test]
fn the_fan_out_queue_feeds_the_function_one_day_event_at_a_time_with_bounded_concurrency() {
    let t = template();
    let res = resources(&t);
    let params = t["Parameters"].as_object().unwrap();

    // Never delivered again while an invocation may still run it: six times the longest
    // timeout the FunctionTimeout parameter allows, as AWS recommends for an SQS event source.
    let queue = &res["FanOutQueue"]["Properties"];
    let max_timeout = params["FunctionTimeout"]["MaxValue"].as_u64().unwrap();
    assert!(
        queue["VisibilityTimeout"].as_u64().unwrap() >= 6 * max_timeout,
        "VisibilityTimeout {} vs 6 x {max_timeout}",
        queue["VisibilityTimeout"]
    );
    // A message that keeps failing (or is not a valid event) ends in the dead-letter queue.
    assert_eq!(
        queue["RedrivePolicy"],
        json!({"deadLetterTargetArn": {"Fn::GetAtt": ["FanOutDeadLetterQueue", "Arn"]}, "maxReceiveCount": 5})
    );
    let dlq = &res["FanOutDeadLetterQueue"];
    assert_eq!(dlq["Type"], "AWS::SQS::Queue");
    assert!(
        dlq["Properties"]["MessageRetentionPeriod"]
            .as_u64()
            .unwrap()
            > queue["MessageRetentionPeriod"].as_u64().unwrap(),
        "a moved message keeps its first enqueue time: the DLQ keeps messages longer"
    );
    for q in [queue, &dlq["Properties"]] {
        assert_eq!(q["SqsManagedSseEnabled"], true);
    }

    // The event source mapping: batches of one, partial answers, concurrency a parameter.
    let events = function(&t)["Properties"]["Events"].as_object().unwrap();
    let sqs: Vec<&Value> = events.values().filter(|e| e["Type"] == "SQS").collect();
    assert_eq!(sqs.len(), 1, "one SQS event source");
    assert_eq!(
        sqs[0]["Properties"],
        json!({
            "Queue": {"Fn::GetAtt": ["FanOutQueue", "Arn"]},
            "BatchSize": 1,
            "FunctionResponseTypes": ["ReportBatchItemFailures"],
            "ScalingConfig": {"MaximumConcurrency": {"Ref": "FanOutConcurrency"}}
        })
    );
    let concurrency = &params["FanOutConcurrency"];
    assert_eq!(concurrency["Type"], "Number");
    assert_eq!(default_of(concurrency).as_deref(), Some("3"));
    assert_eq!(
        (
            concurrency["MinValue"].as_u64(),
            concurrency["MaxValue"].as_u64()
        ),
        (Some(2), Some(1000)),
        "the range AWS allows for MaximumConcurrency"
    );
    assert_eq!(
        environment(&t)["FAN_OUT_QUEUE_URL"],
        json!({"Ref": "FanOutQueue"})
    );

    // Someone hears of a message in the dead-letter queue.
    let alarm = &res["FanOutDeadLetterQueueAlarm"]["Properties"];
    assert_eq!(alarm["Namespace"], "AWS/SQS");
    assert_eq!(alarm["MetricName"], "ApproximateNumberOfMessagesVisible");
    assert_eq!(
        alarm["Dimensions"],
        json!([{"Name": "QueueName", "Value": {"Fn::GetAtt": ["FanOutDeadLetterQueue", "QueueName"]}}])
    );
    assert_eq!(
        (
            alarm["Threshold"].as_u64(),
            alarm["ComparisonOperator"].as_str()
        ),
        (Some(1), Some("GreaterThanOrEqualToThreshold")),
        "more than zero messages"
    );
}

// --- the template as deployed with given parameter values ------------------------------------

/// The parameter values of a deploy: every default, the two required parameters, then
/// `overrides`.
fn parameter_values(t: &Value, overrides: &[(&str, &str)]) -> BTreeMap<String, String> {
    let params = t["Parameters"].as_object().unwrap();
    let mut values: BTreeMap<String, String> = params
        .iter()
        .filter_map(|(name, p)| default_of(p).map(|d| (name.clone(), d)))
        .collect();
    values.insert(
        "MixpanelSecretId".into(),
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:mp-AbCdEf".into(),
    );
    values.insert("MixpanelStartDate".into(), "2026-01-01".into());
    for (name, value) in overrides {
        let pattern = params
            .get(*name)
            .unwrap_or_else(|| panic!("no parameter {name}"))["AllowedPattern"]
            .as_str()
            .unwrap_or(".*");
        assert!(
            regex_lite::Regex::new(pattern).unwrap().is_match(value),
            "{name}={value:?} does not match its AllowedPattern"
        );
        values.insert(name.to_string(), value.to_string());
    }
    values
}

/// A parameter reference or a literal, as the string CloudFormation compares.
fn scalar(values: &BTreeMap<String, String>, v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => {
            let name = other["Ref"]
                .as_str()
                .unwrap_or_else(|| panic!("not a literal or a parameter: {other}"));
            values
                .get(name)
                .unwrap_or_else(|| panic!("no value for the parameter {name}"))
                .clone()
        }
    }
}

/// A condition function (`Fn::Equals`, `Fn::Not`, `Fn::And`, `Fn::Or`, `Condition`) with
/// `values`, as CloudFormation evaluates it (in Conditions and in Rules).
fn holds(t: &Value, values: &BTreeMap<String, String>, c: &Value) -> bool {
    let (f, args) = c
        .as_object()
        .and_then(|o| o.iter().next())
        .unwrap_or_else(|| panic!("not a condition function: {c}"));
    match f.as_str() {
        "Condition" => {
            let name = args.as_str().unwrap();
            let def = &t["Conditions"][name];
            assert!(!def.is_null(), "no condition {name}");
            holds(t, values, def)
        }
        "Fn::Equals" => scalar(values, &args[0]) == scalar(values, &args[1]),
        "Fn::Not" => !holds(t, values, &args[0]),
        "Fn::And" => args.as_array().unwrap().iter().all(|a| holds(t, values, a)),
        "Fn::Or" => args.as_array().unwrap().iter().any(|a| holds(t, values, a)),
        other => panic!("condition function {other} is not evaluated here"),
    }
}

/// `v` as deployed with `values`: each `Fn::If` replaced by its branch, `AWS::NoValue` left
/// out (`None` when `v` itself is left out).
fn deployed(t: &Value, values: &BTreeMap<String, String>, v: &Value) -> Option<Value> {
    match v {
        Value::Object(o) if o.len() == 1 && o.contains_key("Fn::If") => {
            let branches = o["Fn::If"].as_array().unwrap();
            let taken = if holds(t, values, &json!({"Condition": branches[0]})) {
                &branches[1]
            } else {
                &branches[2]
            };
            deployed(t, values, taken)
        }
        Value::Object(o) if o.len() == 1 && o.get("Ref") == Some(&json!("AWS::NoValue")) => None,
        Value::Object(o) => Some(Value::Object(
            o.iter()
                .filter_map(|(k, v)| deployed(t, values, v).map(|v| (k.clone(), v)))
                .collect(),
        )),
        Value::Array(a) => Some(Value::Array(
            a.iter().filter_map(|v| deployed(t, values, v)).collect(),
        )),
        other => Some(other.clone()),
    }
}

/// The resources a deploy with `values` creates, as deployed.
fn deployed_resources(t: &Value, values: &BTreeMap<String, String>) -> BTreeMap<String, Value> {
    resources(t)
        .iter()
        .filter(|(_, r)| {
            r.get("Condition")
                .is_none_or(|c| holds(t, values, &json!({"Condition": c})))
        })
        .filter_map(|(name, r)| deployed(t, values, r).map(|r| (name.clone(), r)))
        .collect()
}

/// Whether a deploy with `values` passes the template's Rules (CloudFormation refuses it
/// before creating anything otherwise).
fn rules_pass(t: &Value, values: &BTreeMap<String, String>) -> bool {
    t["Rules"].as_object().unwrap().values().all(|rule| {
        rule.get("RuleCondition")
            .is_none_or(|c| !holds(t, values, c))
            || rule["Assertions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| holds(t, values, &a["Assert"]))
    })
}

/// Every path in `v` at which `needle` occurs.
fn paths_of(v: &Value, needle: &Value, at: String, out: &mut Vec<String>) {
    if v == needle {
        out.push(at.clone());
    }
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                paths_of(v, needle, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                paths_of(v, needle, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_invocation_goes_through_the_alias_and_every_change_of_the_function_publishes_a_version() {
    let t = template();
    let res = resources(&t);
    let p = &function(&t)["Properties"];

    // SAM publishes a version and points the alias `live` at it whenever the function changes.
    // With AllProperties, a change of any property does; with the language extensions first,
    // CloudFormation resolves the parameters before SAM hashes the properties, so a change of a
    // parameter's value alone does too (otherwise SAM sees the same `!Ref` and only $LATEST,
    // which nothing invokes, gets the new settings).
    assert_eq!(p["AutoPublishAlias"], "live");
    assert_eq!(p["AutoPublishAliasAllProperties"], true);
    assert_eq!(
        t["Transform"],
        json!(["AWS::LanguageExtensions", "AWS::Serverless-2016-10-31"])
    );
    // The reservation is not part of a version, and Lambda publishes no version of an
    // unchanged function: the description names it, so a change of it alone changes the
    // function's configuration and the new version is published.
    let description = p["Description"]["Fn::Sub"].as_str().unwrap();
    assert!(
        description.contains("${ReservedConcurrency}"),
        "{description}"
    );

    // SAM attaches the function's event sources and its EventInvokeConfig (asynchronous
    // retries, the dead-letter queue) to the alias: the fan-out queue is an event of the
    // function, and the template makes no mapping, permission or invoke config of its own.
    let events = p["Events"].as_object().unwrap();
    assert!(events.values().any(|e| e["Type"] == "SQS"));
    assert!(p["EventInvokeConfig"].is_object());
    for kind in [
        "AWS::Lambda::EventSourceMapping",
        "AWS::Lambda::Permission",
        "AWS::Lambda::EventInvokeConfig",
        "AWS::Lambda::Version",
        "AWS::Lambda::Alias",
        "AWS::Lambda::Function",
    ] {
        assert!(
            resources_of_type(&t, kind).is_empty(),
            "a {kind} of the template's own would bypass SAM's alias"
        );
    }

    // Every schedule invokes the alias, and the scheduler's role may invoke exactly it: not
    // $LATEST (the function's ARN), not a version.
    let alias = json!({"Ref": "ReplicatorFunction.Alias"});
    for (table, (name, schedule, _)) in schedules(&t) {
        assert_eq!(
            schedule["Properties"]["Target"]["Arn"], alias,
            "{name} ({table})"
        );
    }
    let invoke: Vec<Value> = statements(&res["SchedulerRole"])
        .into_iter()
        .filter(|(_, s)| {
            as_strings(&s["Action"])
                .iter()
                .any(|a| a.starts_with("lambda:"))
        })
        .map(|(_, s)| {
            assert_eq!(s["Action"], "lambda:InvokeFunction");
            assert!(s.get("Condition").is_none());
            s["Resource"].clone()
        })
        .collect();
    assert_eq!(invoke, std::slice::from_ref(&alias));

    // Nothing else names the function's unqualified ARN (which invokes $LATEST): only the
    // output that says what it is.
    let mut uses = Vec::new();
    paths_of(
        &t,
        &json!({"Fn::GetAtt": ["ReplicatorFunction", "Arn"]}),
        String::new(),
        &mut uses,
    );
    assert_eq!(uses, ["/Outputs/FunctionArn/Value"]);
    assert_eq!(t["Outputs"]["FunctionAliasArn"]["Value"], alias);

    // Nor does the code invoke any function: it fans out through the queue (SendMessageBatch),
    // which the alias's event source mapping reads.
    assert!(!sdk_calls_in_src().contains_key("invoke"));
    assert!(
        !include_str!("../Cargo.toml").contains("aws-sdk-lambda"),
        "the program has no Lambda client"
    );
}

#[test]
fn kms_permissions_exist_only_for_a_customer_managed_key_of_the_output_or_the_secret() {
    let t = template();
    let key = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let other = "arn:aws:kms:eu-west-1:123456789012:key/0000abcd-12ab-34cd-56ef-1234567890ab";
    // Every statement of the function's role that allows a KMS action, as deployed.
    let kms = |values: &BTreeMap<String, String>| -> Vec<Value> {
        let role = &deployed_resources(&t, values)["FunctionRole"];
        role["Properties"]["Policies"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap().clone())
            .filter(|s| {
                as_strings(&s["Action"])
                    .iter()
                    .any(|a| a.starts_with("kms:"))
            })
            .collect()
    };
    let via = |service: &str| json!({"StringEquals": {"kms:ViaService": {"Fn::Sub": format!("{service}.${{AWS::Region}}.amazonaws.com")}}});
    let bucket_encryption = |values: &BTreeMap<String, String>| {
        deployed_resources(&t, values)
            .get("Bucket")
            .map(|b| b["Properties"]["BucketEncryption"].clone())
    };
    let sse_s3 = json!({"ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]});

    // Every key parameter empty (the defaults): no KMS permission at all, an SSE-S3 bucket.
    let values = parameter_values(&t, &[]);
    assert!(rules_pass(&t, &values));
    assert_eq!(kms(&values), Vec::<Value>::new());
    assert_eq!(bucket_encryption(&values), Some(sse_s3.clone()));
    // A user's bucket without a customer managed key: none either, and no bucket created.
    let values = parameter_values(&t, &[("OutputBucket", "my-bucket")]);
    assert!(rules_pass(&t, &values));
    assert_eq!(kms(&values), Vec::<Value>::new());
    assert_eq!(bucket_encryption(&values), None);

    // The created bucket with a customer managed key: SSE-KMS with a bucket key, and the
    // function may use that key, through S3 in its region only.
    let values = parameter_values(&t, &[("BucketKmsKeyArn", key)]);
    assert!(rules_pass(&t, &values));
    assert_eq!(
        bucket_encryption(&values),
        Some(json!({"ServerSideEncryptionConfiguration": [{
            "ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": {"Ref": "BucketKmsKeyArn"}},
            "BucketKeyEnabled": true
        }]}))
    );
    assert_eq!(
        kms(&values),
        [json!({
            "Sid": "CreatedBucketKmsKey",
            "Effect": "Allow",
            "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
            "Resource": {"Ref": "BucketKmsKeyArn"},
            "Condition": via("s3")
        })]
    );

    // A user's bucket encrypted with a customer managed key: the same permissions on that key.
    let values = parameter_values(
        &t,
        &[
            ("OutputBucket", "my-bucket"),
            ("OutputBucketKmsKeyArn", key),
        ],
    );
    assert!(rules_pass(&t, &values));
    assert_eq!(bucket_encryption(&values), None);
    assert_eq!(
        kms(&values),
        [json!({
            "Sid": "OutputBucketKmsKey",
            "Effect": "Allow",
            "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
            "Resource": {"Ref": "OutputBucketKmsKeyArn"},
            "Condition": via("s3")
        })]
    );

    // The secret's customer managed key: decrypt only, through Secrets Manager; beside the
    // output's key when both are set.
    let secret = json!({
        "Sid": "DecryptSecretWithCustomerKey",
        "Effect": "Allow",
        "Action": "kms:Decrypt",
        "Resource": {"Ref": "MixpanelSecretKmsKeyArn"},
        "Condition": via("secretsmanager")
    });
    let values = parameter_values(&t, &[("MixpanelSecretKmsKeyArn", other)]);
    assert_eq!(kms(&values), std::slice::from_ref(&secret));
    let values = parameter_values(
        &t,
        &[("MixpanelSecretKmsKeyArn", other), ("BucketKmsKeyArn", key)],
    );
    let statements = kms(&values);
    assert_eq!(statements.len(), 2);
    assert_eq!(statements[0], secret);
    assert_eq!(statements[1]["Resource"], json!({"Ref": "BucketKmsKeyArn"}));

    // A key parameter of the other case is refused before anything is created, not ignored.
    for overrides in [
        &[("OutputBucket", "my-bucket"), ("BucketKmsKeyArn", key)][..],
        &[("OutputBucketKmsKeyArn", key)][..],
    ] {
        assert!(
            !rules_pass(&t, &parameter_values(&t, overrides)),
            "{overrides:?} passes the template's Rules"
        );
    }
    // Keys are named by their ARN: an alias would not match a key policy's resource.
    for param in ["BucketKmsKeyArn", "OutputBucketKmsKeyArn"] {
        let pattern =
            regex_lite::Regex::new(t["Parameters"][param]["AllowedPattern"].as_str().unwrap())
                .unwrap();
        assert!(pattern.is_match(key) && pattern.is_match(""), "{param}");
        assert!(
            !pattern.is_match("arn:aws:kms:eu-west-1:123456789012:alias/replica"),
            "{param}"
        );
    }
}
