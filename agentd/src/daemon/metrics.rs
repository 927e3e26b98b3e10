//! Prometheus metrics (`agentd daemon --metrics`): text exposition at /metrics.
//! (To be written.)

use std::sync::Arc;

use super::Shared;
use crate::event::Event;

/// The daemon's metrics: counters fed by every recorded event, gauges read at scrape time.
#[derive(Debug, Default)]
pub(super) struct Metrics {}

impl Metrics {
    /// Counts one recorded event.
    pub fn event(&self, _ev: &Event) {}
}

/// The /metrics endpoint.
pub(super) fn router(_shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
}
