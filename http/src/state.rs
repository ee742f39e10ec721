//! What every router of a process shares.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use scholia_events::metrics::Metrics;
use scholia_events::relay::RelayStatus;
use scholia_events::tasks::Supervisor;
use scholia_events::{Bus, Store};

use crate::auth::Auth;

/// The state common to every component: stores, bus, auth, metrics, and how the process
/// is doing. Component states hold one and hand it to the extractors (`FromRef`), which
/// clone it on every request: a clone is one reference count, not one per store.
#[derive(Clone)]
pub struct Core(Arc<CoreParts>);

/// What a [`Core`] holds (its fields are reached through the `Core`).
pub struct CoreParts {
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub supervisor: Supervisor,
    pub relay: Arc<RelayStatus>,
    /// The roles this process runs, for `/healthz`.
    pub roles: Vec<String>,
    pub started: Instant,
    /// The OpenAPI document of what this process serves, set once its routers are built.
    pub openapi: OnceLock<String>,
}

impl Core {
    pub fn new(
        store: Store,
        bus: Arc<dyn Bus>,
        supervisor: Supervisor,
        relay: Arc<RelayStatus>,
        roles: Vec<String>,
    ) -> Self {
        Core(Arc::new(CoreParts {
            auth: Auth::new(store.tokens.clone()),
            store,
            bus,
            metrics: Arc::new(Metrics::default()),
            supervisor,
            relay,
            roles,
            started: Instant::now(),
            openapi: OnceLock::new(),
        }))
    }
}

impl Deref for Core {
    type Target = CoreParts;

    fn deref(&self) -> &CoreParts {
        &self.0
    }
}
