//! The guard that finishes a flow exactly once: explicitly after its sockets closed, or when
//! dropped (an early return or a panic), spawning the wait for the final totals.

use std::sync::Arc;

use super::Flow;
use crate::registry::Registry;

/// Finishes its flow when dropped (spawning the wait for the final totals).
#[derive(Debug)]
pub struct Finisher {
    flow: Option<Arc<Flow>>,
    registry: Arc<Registry>,
}

impl Finisher {
    pub fn new(flow: Arc<Flow>, registry: Arc<Registry>) -> Finisher {
        Finisher {
            flow: Some(flow),
            registry,
        }
    }

    /// Finishes now (the sockets must be closed already).
    pub async fn finish(mut self) {
        if let Some(flow) = self.flow.take() {
            self.registry.finish(flow).await;
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if let Some(flow) = self.flow.take() {
            let registry = self.registry.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { registry.finish(flow).await });
            }
        }
    }
}
