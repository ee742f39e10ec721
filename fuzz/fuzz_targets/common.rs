//! What the JSON targets share: comparing data with its JSON text read back.

use serde_json::{Map, Value};

/// Whether `reread` (data written as JSON and read back) is `data`, exactly: with
/// serde_json's `float_roundtrip` every float reads back as the one written.
pub fn reread_matches(data: &Map<String, Value>, reread: &Map<String, Value>) -> bool {
    data == reread
}
