//! OpenAPI schemas of the vocabulary types that serialize as text rather than as their
//! fields (partition keys, runs, lookbacks), and of inputs, whose flattened enum serde
//! reads more loosely than a derived schema says; the rest derive theirs.

use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::analysis::{Input, Lookback};
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

impl PartialSchema for Input {
    /// `kind` or `analysis` names the source. serde takes the first of them the object
    /// holds and ignores the other, so an input with both is not refused: hence `anyOf`.
    fn schema() -> RefOr<Schema> {
        let names = |field: &str, what: &str| {
            ObjectBuilder::new()
                .property(
                    field,
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some(what)),
                )
                .required(field)
        };
        AnyOfBuilder::new()
            .description(Some(
                "One input of an analysis: a kind's records (`{\"kind\": \"generation\", \"lookback\": \"PT2H\"}`, the lookback reaching before the partition) or another analysis' annotations (`{\"analysis\": \"daily_avg\"}`).",
            ))
            .item(
                names("kind", "A kind, whose records are read.")
                    .property("lookback", Ref::from_schema_name(Lookback::name())),
            )
            .item(
                names("analysis", "An analysis, whose annotations are read.")
                    .property("lookback", Ref::from_schema_name(Lookback::name())),
            )
            .into()
    }
}

impl ToSchema for Input {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Lookback::name().into_owned(), Lookback::schema()));
    }
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;

    use crate::status::{BuildState, InvalidationState, ItemState, PartitionStatus, Rebuild};

    fn words<T: PartialSchema>() -> Vec<String> {
        let schema = serde_json::to_value(T::schema()).unwrap();
        serde_json::from_value(schema["enum"].clone()).unwrap()
    }

    fn all<T: std::fmt::Display>(all: &[T]) -> Vec<String> {
        all.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn status_schemas_list_the_words_written_in_json() {
        assert_eq!(words::<PartitionStatus>(), all(PartitionStatus::ALL));
        assert_eq!(words::<BuildState>(), all(BuildState::ALL));
        assert_eq!(words::<InvalidationState>(), all(InvalidationState::ALL));
        assert_eq!(words::<ItemState>(), all(ItemState::ALL));
        assert_eq!(words::<Rebuild>(), all(Rebuild::ALL));
    }
}
