//! OpenAPI schemas of the vocabulary types that serialize as text rather than as their
//! fields (partition keys, runs, lookbacks); the rest derive theirs.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::analysis::Lookback;
use crate::partition::{PartitionKey, PartitionRun};

const KEY_PATTERN: &str = r"^\d{4}-\d{2}-\d{2}(T\d{2})?$";

fn text(description: &str, pattern: Option<&str>, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(pattern)
        .examples([example])
        .into()
}

impl PartialSchema for PartitionKey {
    fn schema() -> RefOr<Schema> {
        text(
            "A UTC day (2024-05-05) or hour (2024-05-05T13).",
            Some(KEY_PATTERN),
            "2024-05-05",
        )
    }
}

impl ToSchema for PartitionKey {}

impl PartialSchema for PartitionRun {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .description(Some(
                "Consecutive partitions: one key, or the first and last (inclusive).",
            ))
            .item(PartitionKey::schema())
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property("first", PartitionKey::schema())
                    .property("last", PartitionKey::schema())
                    .required("first")
                    .required("last"),
            )
            .into()
    }
}

impl ToSchema for PartitionRun {}

impl PartialSchema for Lookback {
    fn schema() -> RefOr<Schema> {
        text(
            "An ISO 8601 duration: weeks, days, hours, minutes, seconds.",
            Some(r"^P(\d+W)?(\d+D)?(T(\d+H)?(\d+M)?(\d+S)?)?$"),
            "PT2H",
        )
    }
}

impl ToSchema for Lookback {}
