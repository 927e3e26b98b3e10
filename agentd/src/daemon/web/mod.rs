//! The live web view (`agentd daemon --ui`). (To be written.)

use std::sync::Arc;

use super::Shared;

/// What the web view keeps: the access tokens `agentd ui-url` hands out.
#[derive(Debug, Default)]
pub(super) struct Ui {}

/// The web view's pages and API.
pub(super) fn router(_shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
}
