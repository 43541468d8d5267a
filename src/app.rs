//! Everything an invocation needs, built once per process (warm Lambda invocations reuse it).

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::config::Settings;
use crate::error::Result;
use crate::fan_out::FanOutQueue;
use crate::mixpanel::MixpanelClient;
use crate::ratelimit::{Limits, RequestBudget};
use crate::secrets::CredentialsProvider;
use crate::sink::ObjectSink;
use crate::sink::catalog::GlueCatalog;
use crate::sink::local::LocalSink;
use crate::sink::s3::S3Sink;
use crate::state::StateStore;
use crate::state::dynamo::DynamoStore;
use crate::state::local::LocalStore;

/// Settings, clients, state store and sink.
#[derive(Clone)]
pub struct App {
    /// The settings.
    pub settings: Arc<Settings>,
    /// Mixpanel's client.
    pub mixpanel: MixpanelClient,
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// The output sink.
    pub sink: Arc<dyn ObjectSink>,
    /// Key prefix of every output object.
    pub prefix: String,
    /// The fan-out queue day events are sent to (`FAN_OUT_QUEUE_URL`), when set.
    pub fan_out: Option<Arc<FanOutQueue>>,
    /// The Glue tables kept current with the discovered columns (`GLUE_DATABASE`), when set.
    pub catalog: Option<Arc<GlueCatalog>>,
    /// The wall clock of leases, the request budget, backoffs and schedules.
    pub clock: Arc<dyn Clock>,
    /// Export days read by this process and not yet committed (for `sync`'s window planning).
    pub read_sizes: Arc<crate::slice::ReadSizes>,
}

impl App {
    /// Builds the app from settings: S3/DynamoDB where named, else the local folder and file.
    /// `sdk` is loaded only when an AWS service is used.
    pub async fn build(settings: Settings, sdk: Option<aws_config::SdkConfig>) -> Result<App> {
        App::build_with_clock(settings, sdk, crate::clock::system()).await
    }

    /// The same app on the wall clock `clock` (its request budget too): a test's
    /// [`crate::clock::ShiftedClock`], say, to make a lease run out at once.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> App {
        let budget = request_budget(&self.settings, self.store.clone(), clock.clone());
        self.mixpanel = self.mixpanel.with_budget(Arc::new(budget));
        self.clock = clock;
        self
    }

    /// [`App::build`] with the wall clock `clock` (a test's [`crate::clock::TokioClock`]).
    pub async fn build_with_clock(
        settings: Settings,
        sdk: Option<aws_config::SdkConfig>,
        clock: Arc<dyn Clock>,
    ) -> Result<App> {
        let needs_aws = settings.output_bucket.is_some() && settings.output_dir.is_none()
            || settings.state_table.is_some() && settings.state_file.is_none()
            || settings.fan_out_queue_url.is_some()
            || settings.glue_database.is_some()
            || matches!(
                settings.credentials,
                crate::secrets::CredentialsSource::SecretsManager { .. }
            );
        let sdk = match (sdk, needs_aws) {
            (Some(s), _) => Some(s),
            (None, true) => {
                Some(aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await)
            }
            (None, false) => None,
        };
        let secrets_client = sdk.as_ref().map(aws_sdk_secretsmanager::Client::new);
        let credentials = Arc::new(CredentialsProvider::new(
            settings.credentials.clone(),
            secrets_client,
        ));
        let mixpanel = MixpanelClient::new(&settings.api_url, &settings.data_url, credentials)?;

        let local_root = settings
            .output_dir
            .clone()
            .unwrap_or_else(|| "mixpanel-data".into());
        let (sink, prefix): (Arc<dyn ObjectSink>, String) =
            match (&settings.output_dir, &settings.output_bucket, &sdk) {
                (None, Some(bucket), Some(sdk)) => (
                    Arc::new(S3Sink::new(aws_sdk_s3::Client::new(sdk), bucket.clone())),
                    settings.output_prefix.clone(),
                ),
                // Locally the folder stands for the bucket and prefix.
                _ => (
                    Arc::new(LocalSink::new(local_root.clone())),
                    settings.local_prefix.clone(),
                ),
            };
        let store: Arc<dyn StateStore> = match (&settings.state_file, &settings.state_table, &sdk) {
            (None, Some(table), Some(sdk)) => Arc::new(DynamoStore::new(
                aws_sdk_dynamodb::Client::new(sdk),
                table.clone(),
            )),
            (file, _, _) => Arc::new(LocalStore::open(
                file.clone()
                    .unwrap_or_else(|| local_root.join(".state.json")),
            )?),
        };
        let budget = request_budget(&settings, store.clone(), clock.clone());
        let mixpanel = mixpanel.with_budget(Arc::new(budget));
        let fan_out = match (&settings.fan_out_queue_url, &sdk) {
            (Some(url), Some(sdk)) => Some(Arc::new(FanOutQueue::new(
                aws_sdk_sqs::Client::new(sdk),
                url.clone(),
            ))),
            _ => None,
        };
        let catalog = match (&settings.glue_database, &sdk) {
            (Some(database), Some(sdk)) => Some(Arc::new(GlueCatalog::new(
                aws_sdk_glue::Client::new(sdk),
                database.clone(),
            ))),
            _ => None,
        };
        Ok(App {
            settings: Arc::new(settings),
            mixpanel,
            store,
            sink,
            prefix,
            fan_out,
            catalog,
            clock,
            read_sizes: Arc::default(),
        })
    }
}

/// The request budget of `settings`, kept in `store`, its grants stamped by `clock`.
fn request_budget(
    settings: &Settings,
    store: Arc<dyn StateStore>,
    clock: Arc<dyn Clock>,
) -> RequestBudget {
    RequestBudget::new(
        store,
        clock,
        Limits {
            per_window: settings.export_requests_per_window,
            window: settings.rate_window,
            per_second: Some(settings.export_requests_per_second),
            concurrent: settings.export_concurrency,
            // An export body may stream for the whole invocation.
            max_hold: Duration::from_secs(900),
        },
        Limits {
            per_window: settings.query_requests_per_window,
            window: settings.rate_window,
            per_second: None,
            concurrent: settings.query_concurrency,
            max_hold: Duration::from_secs(120),
        },
    )
}
