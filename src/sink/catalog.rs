//! The Glue Data Catalog tables over the output (`GLUE_DATABASE`): each table's columns, with
//! their Athena types, kept equal to what its rows hold.
//!
//! The stack creates the seven tables with their fixed columns ([`fixed_columns`]); after a
//! commit, [`GlueCatalog::publish`] adds every column the table's schema has discovered
//! since. It reads the table once per process and table (and again after [`RECHECK`]), so a
//! stack update that put the template's columns back is mended by the next commit, and writes
//! only when a column is missing or its type changed. Columns a person added are kept.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_glue::types::{Column, StorageDescriptor, TableInput};

use crate::error::{Error, ErrorKind, Result, describe_sdk_error};
use crate::retry::Policy;
use crate::state::{Schema, folded};
use crate::tables::Table;

/// How long a table found current is taken to stay so before it is read again.
pub const RECHECK: Duration = Duration::from_secs(900);

/// The columns every row of a table has, first in its Glue table, with their Athena types:
/// what the stack's template declares for the table.
pub fn fixed_columns(table: Table) -> &'static [(&'static str, &'static str)] {
    table.spec().glue_columns
}

/// The Athena type of a column of these JSON types (`_schema.json`'s `integer|string`): one
/// scalar type as itself, anything else (objects, arrays, a column of several types) as
/// `string`, which Athena's OpenX JSON SerDe fills with the value's JSON text.
pub fn athena_type(json_types: &str) -> &'static str {
    match json_types {
        "integer" => "bigint",
        "number" => "double",
        "boolean" => "boolean",
        _ => "string",
    }
}

/// Whether Athena can hold a column of this name: it refuses dots in column names.
pub fn athena_can_name(column: &str) -> bool {
    !column.contains('.') && !column.is_empty() && column.chars().count() <= 255
}

/// A table's Glue columns for its discovered `schema`: the fixed columns, then every other
/// column in name order. Left out: a column Athena cannot name, a partition key (the rows of
/// `funnels` and `revenue` hold `date`, which Athena takes from the partition), and a second
/// column whose name folds to one already listed (a schema stored before names were unique).
pub fn athena_columns(table: Table, schema: &Schema) -> Vec<(String, String)> {
    let mut taken: HashSet<String> = HashSet::new();
    if table.is_date_sliced() {
        taken.insert(table.partition_key().to_string());
    }
    let mut columns = Vec::with_capacity(schema.columns.len() + 4);
    for (name, ty) in fixed_columns(table) {
        taken.insert(folded(name));
        columns.push((name.to_string(), ty.to_string()));
    }
    for (name, ty) in &schema.columns {
        if athena_can_name(name) && taken.insert(folded(name)) {
            columns.push((name.clone(), athena_type(ty).to_string()));
        }
    }
    columns
}

/// `wanted` (the table's columns, typed as its rows are) followed by the columns of `existing`
/// that `wanted` does not name: ones a person added are kept.
pub fn merged_columns(
    wanted: &[(String, String)],
    existing: &[(String, String)],
) -> Vec<(String, String)> {
    let names: HashSet<String> = wanted.iter().map(|(n, _)| folded(n)).collect();
    let mut columns = wanted.to_vec();
    columns.extend(
        existing
            .iter()
            .filter(|(n, _)| !names.contains(&folded(n)))
            .cloned(),
    );
    columns
}

/// A Glue table's columns: (name, Athena type), in order.
pub type GlueColumns = Vec<(String, String)>;

/// The Glue database whose tables [`publish`](GlueCatalog::publish) keeps current.
pub struct GlueCatalog {
    client: aws_sdk_glue::Client,
    database: String,
    /// The columns each table was last found or made to hold, and when.
    current: Mutex<HashMap<Table, (GlueColumns, Instant)>>,
}

impl GlueCatalog {
    /// The catalog of `database`.
    pub fn new(client: aws_sdk_glue::Client, database: String) -> Self {
        GlueCatalog {
            client,
            database,
            current: Mutex::default(),
        }
    }

    /// The database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Makes the Glue table of `table` hold every column of `schema` (the table's stored
    /// schema). Returns whether the table was changed.
    pub async fn publish(&self, table: Table, schema: &Schema) -> Result<bool> {
        let wanted = athena_columns(table, schema);
        if self.is_current(table, &wanted) {
            return Ok(false);
        }
        // Glue's UpdateTable replaces the whole definition: it is written back as read, with
        // the columns changed, at the version read (a concurrent writer makes it read again).
        let wanted = &wanted;
        let updated = Policy::GLUE_UPDATE
            .run_cas(|_| async move {
                let got = self
                    .client
                    .get_table()
                    .database_name(&self.database)
                    .name(table.as_str())
                    .send()
                    .await
                    .map_err(|e| Some(self.fail(table, "reading", e)))?;
                let Some(found) = got.table() else {
                    return Err(Some(self.missing(table)));
                };
                let descriptor = found.storage_descriptor();
                let existing: Vec<(String, String)> = descriptor
                    .map(|d| d.columns())
                    .unwrap_or_default()
                    .iter()
                    .map(|c| {
                        (
                            c.name().to_string(),
                            c.r#type().unwrap_or("string").to_string(),
                        )
                    })
                    .collect();
                let columns = merged_columns(wanted, &existing);
                if columns == existing {
                    self.remember(table, wanted.clone());
                    return Ok(false);
                }
                let input = table_input(found, descriptor, &columns).map_err(Some)?;
                let mut update = self
                    .client
                    .update_table()
                    .database_name(&self.database)
                    .table_input(input);
                if let Some(version) = found.version_id() {
                    update = update.version_id(version);
                }
                match update.send().await {
                    Ok(_) => {
                        tracing::info!(
                            table = table.as_str(),
                            database = %self.database,
                            columns = columns.len(),
                            added = columns.len().saturating_sub(existing.len()),
                            "Glue table updated with the discovered columns"
                        );
                        self.remember(table, wanted.clone());
                        Ok(true)
                    }
                    // Someone else changed the table since it was read: read it again.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_concurrent_modification_exception()) =>
                    {
                        Err(None)
                    }
                    Err(e) => Err(Some(self.fail(table, "updating", e))),
                }
            })
            .await;
        updated.map_err(|failed| {
            failed.unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Storage,
                    format!(
                        "Glue table {}.{table}: changed by someone else at every try; the next commit tries again",
                        self.database
                    ),
                )
            })
        })
    }

    fn is_current(&self, table: Table, wanted: &[(String, String)]) -> bool {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current
            .get(&table)
            .is_some_and(|(columns, at)| columns == wanted && at.elapsed() < RECHECK)
    }

    fn remember(&self, table: Table, wanted: Vec<(String, String)>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.insert(table, (wanted, Instant::now()));
    }

    fn missing(&self, table: Table) -> Error {
        Error::new(
            ErrorKind::Storage,
            format!(
                "Glue table {}.{table} not found: GLUE_DATABASE names the database whose tables the stack created",
                self.database
            ),
        )
    }

    fn fail<E>(
        &self,
        table: Table,
        op: &str,
        err: aws_sdk_glue::error::SdkError<E, aws_sdk_glue::config::http::HttpResponse>,
    ) -> Error
    where
        E: aws_sdk_glue::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        if crate::error::sdk_cause(&err) == Some(crate::error::Cause::NotFound) {
            return Error::new(
                ErrorKind::Storage,
                format!(
                    "Glue table {}.{table} not found ({}): GLUE_DATABASE names the database whose tables the stack created",
                    self.database,
                    describe_sdk_error(&err)
                ),
            );
        }
        Error::new(
            ErrorKind::Storage,
            format!(
                "{op} Glue table {}.{table}: {}",
                self.database,
                describe_sdk_error(&err)
            ),
        )
    }
}

/// The definition of `found` with `columns` instead of its own.
fn table_input(
    found: &aws_sdk_glue::types::Table,
    descriptor: Option<&StorageDescriptor>,
    columns: &[(String, String)],
) -> Result<TableInput> {
    let columns = columns
        .iter()
        .map(|(name, ty)| {
            Column::builder()
                .name(name)
                .r#type(ty)
                .build()
                .map_err(Error::storage)
        })
        .collect::<Result<Vec<_>>>()?;
    let d = descriptor
        .cloned()
        .unwrap_or_else(|| StorageDescriptor::builder().build());
    let descriptor = StorageDescriptor::builder()
        .set_columns(Some(columns))
        .set_location(d.location)
        .set_additional_locations(d.additional_locations)
        .set_input_format(d.input_format)
        .set_output_format(d.output_format)
        .compressed(d.compressed)
        .number_of_buckets(d.number_of_buckets)
        .set_serde_info(d.serde_info)
        .set_bucket_columns(d.bucket_columns)
        .set_sort_columns(d.sort_columns)
        .set_parameters(d.parameters)
        .set_skewed_info(d.skewed_info)
        .stored_as_sub_directories(d.stored_as_sub_directories)
        .set_schema_reference(d.schema_reference)
        .build();
    TableInput::builder()
        .name(found.name())
        .set_description(found.description().map(str::to_string))
        .set_owner(found.owner().map(str::to_string))
        .set_retention(Some(found.retention()))
        .storage_descriptor(descriptor)
        .set_partition_keys(found.partition_keys.clone())
        .set_view_original_text(found.view_original_text().map(str::to_string))
        .set_view_expanded_text(found.view_expanded_text().map(str::to_string))
        .set_table_type(found.table_type().map(str::to_string))
        .set_parameters(found.parameters().cloned())
        .set_target_table(found.target_table().cloned())
        .build()
        .map_err(Error::storage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::json::fixed_schema;

    fn pairs(columns: &[(&str, &str)]) -> Vec<(String, String)> {
        columns
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn a_table_lists_its_fixed_columns_then_every_discovered_one_with_athena_types() {
        let schema = fixed_schema(&[
            ("event", "string"),
            ("distinct_id", "integer|string"),
            ("time", "timestamp"),
            ("mp_reserved_insert_id", "string"),
            ("mp_processing_time_ms", "integer"),
            ("price", "number"),
            ("paid", "boolean"),
            ("items", "array"),
            ("address", "object"),
            ("plan", "integer|string"),
            ("nothing_yet", "null"),
            ("a.b", "string"),
            ("Plan", "string"),
        ]);
        assert_eq!(
            athena_columns(Table::Export, &schema),
            pairs(&[
                ("event", "string"),
                ("distinct_id", "string"),
                ("time", "string"),
                // A schema stored before names were unique: the first of `Plan` and `plan`.
                ("Plan", "string"),
                ("address", "string"),
                ("items", "string"),
                ("mp_processing_time_ms", "bigint"),
                ("mp_reserved_insert_id", "string"),
                ("nothing_yet", "string"),
                ("paid", "boolean"),
                ("price", "double"),
            ])
        );
    }

    #[test]
    fn a_dated_table_leaves_its_partition_key_to_the_partition() {
        let schema = fixed_schema(&[
            ("date", "string"),
            ("amount", "number"),
            ("count", "integer"),
            ("paid_count", "integer"),
        ]);
        assert_eq!(
            athena_columns(Table::Revenue, &schema),
            pairs(&[
                ("amount", "double"),
                ("count", "bigint"),
                ("paid_count", "bigint")
            ])
        );
        // Annotations are a snapshot: their `date` is a column like any other.
        let annotations = fixed_schema(&[("id", "integer"), ("date", "string")]);
        assert_eq!(
            athena_columns(Table::Annotations, &annotations),
            pairs(&[("id", "bigint"), ("date", "string")])
        );
    }

    #[test]
    fn columns_a_person_added_are_kept_and_changed_types_follow_the_rows() {
        let wanted = pairs(&[("event", "string"), ("plan", "string")]);
        let existing = pairs(&[
            ("event", "string"),
            ("plan", "bigint"),
            ("my_extra", "string"),
        ]);
        assert_eq!(
            merged_columns(&wanted, &existing),
            pairs(&[
                ("event", "string"),
                ("plan", "string"),
                ("my_extra", "string")
            ])
        );
        assert_eq!(merged_columns(&wanted, &wanted), wanted);
    }
}
