//! The states of partitions, builds and invalidations, as types. Each is written as a
//! lowercase word in SQL and JSON (`ready`, `queued`, …), and only here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An enum whose variants are written as fixed lowercase words.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        // The derive cannot read `$word` from the macro; every word is its variant's name in
        // lowercase, which `openapi.rs` checks.
        #[schema(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $word)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($word => Ok($name::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of {}",
                        [$($word),+].join(", ")
                    )),
                }
            }
        }
    };
}

word_enum!(
    /// What a reader learns about one partition of an analysis.
    PartitionStatus {
        /// Built, by the current version, from every record its build read; nothing newer
        /// is known to be missing.
        Ready = "ready",
        /// Built, but its input moved or its analysis changed since; a rebuild is due.
        Stale = "stale",
        /// Never built, and not queued.
        Missing = "missing",
        Queued = "queued",
        Running = "running",
        /// Its builds failed for good (`error` says why) until something requests it again.
        Failed = "failed",
    }
);

word_enum!(
    /// A partition's row in the build queue.
    BuildState {
        /// Needs a rebuild, which waits until someone asks (a lazy invalidation).
        Stale = "stale",
        Queued = "queued",
        Running = "running",
        Failed = "failed",
    }
);

word_enum!(
    /// The state of an invalidation, derived from its partitions.
    InvalidationState {
        Pending = "pending",
        Running = "running",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

word_enum!(
    /// The state of one partition of an invalidation.
    ItemState {
        Pending = "pending",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

word_enum!(
    /// How an invalidation rebuilds: at once, or when someone next reads the partition.
    Rebuild {
        Eager = "eager",
        Lazy = "lazy",
    }
);

/// Someone is waiting for the partition (a reader, a live chart, new data in it).
pub const PRIORITY_LIVE: i32 = 0;
/// A bulk rebuild (an invalidation, a schedule).
pub const PRIORITY_BULK: i32 = 10;

/// What a build request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A build that starts after this request: an admin asked (an invalidation, a
    /// schedule), so even a build under way when it came is done again.
    Rebuild,
    /// A build that reads the inputs as they are now, because they moved. A build under
    /// way covers it: its commit compares what it read with the inputs then, and goes
    /// round again only if they moved after it read them.
    InputsMoved,
    /// Any build will do, pending or running: a reader wants the partition there. Asking
    /// again while one is pending costs nothing, so readers may ask as often as they look.
    Present,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_written_as_words_and_read_back() {
        for state in BuildState::ALL {
            assert_eq!(state.as_str().parse::<BuildState>().unwrap(), *state);
        }
        assert_eq!(
            serde_json::to_string(&PartitionStatus::Ready).unwrap(),
            "\"ready\""
        );
        assert!("nope".parse::<ItemState>().unwrap_err().contains("pending"));
    }
}
