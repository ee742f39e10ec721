//! The OpenAPI document of what a process serves: the endpoints of its roles, generated
//! from the handlers' own types, the endpoints every process serves, the security schemes,
//! and the problem responses every operation can give.

use utoipa::openapi::{InfoBuilder, LicenseBuilder, OpenApi};

use scholia_analytics::AnalyticsState;
use scholia_annotation_cache::AnnotationCache;
use scholia_ingest::IngestState;

use crate::config::ServeConfig;

pub(crate) fn document(config: &ServeConfig) -> String {
    let roles: Vec<&str> = config.roles.iter().map(String::as_str).collect();
    build(&roles)
        .to_json()
        .expect("the OpenAPI document serializes")
}

/// The document of a process that runs `roles`.
fn build(roles: &[&str]) -> OpenApi {
    let mut doc = scholia_http::openapi::common();
    if roles.contains(&"ingest") {
        doc.merge(IngestState::openapi());
    }
    if roles.contains(&"cache") {
        doc.merge(AnnotationCache::openapi());
        doc.merge(AnalyticsState::openapi());
    }
    if roles.contains(&"visualizer") {
        doc.merge(scholia_visualizer::page::openapi());
    }
    doc.info = InfoBuilder::new()
        .title("Scholia")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(format!(
            "Records in, annotations out: ingest timestamped records, register analyses over them, and read their annotations per partition, with the truth about each. This process runs the roles {}; it serves their endpoints and those every process serves. Errors are `application/problem+json`.",
            roles.join(", ")
        )))
        .license(Some(LicenseBuilder::new().name("Apache-2.0").build()))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    for (name, scheme) in scholia_http::openapi::security_schemes() {
        components.add_security_scheme(name, scheme);
    }
    scholia_http::openapi::add_problems(&mut doc);
    doc
}

#[cfg(test)]
mod tests {
    use super::build;

    #[test]
    fn a_process_documents_the_endpoints_of_its_roles_only() {
        let all = serde_json::to_value(build(&["ingest", "cache", "visualizer"])).unwrap();
        for path in [
            "/v1/events",
            "/v1/annotations/{analysis}",
            "/v1/ws",
            "/healthz",
        ] {
            assert!(all["paths"][path].is_object(), "{path} is missing");
        }
        let ingest = serde_json::to_value(build(&["ingest"])).unwrap();
        assert!(ingest["paths"]["/v1/events"].is_object());
        assert!(ingest["paths"]["/v1/annotations/{analysis}"].is_null());
        assert!(ingest["paths"]["/v1/ws"].is_null());
        let worker = serde_json::to_value(build(&["worker"])).unwrap();
        let paths: Vec<&String> = worker["paths"].as_object().unwrap().keys().collect();
        assert_eq!(paths, ["/healthz", "/metrics", "/openapi.json", "/readyz"]);
    }

    #[test]
    fn every_reference_names_a_component() {
        let doc = serde_json::to_value(build(&["ingest", "cache", "visualizer"])).unwrap();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for reference in refs {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{reference} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{reference} names nothing");
        }
    }

    fn collect_refs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                        _ => collect_refs(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }
}
