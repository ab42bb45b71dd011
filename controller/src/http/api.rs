//! The JSON API under `/api/v1/`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{AppError, HttpState, Principal};
use crate::auth::apitoken::Caller;
use crate::fleet;

/// The API's routes.
pub fn routes() -> Router<HttpState> {
    Router::new().route("/api/v1/nodes", get(nodes))
}

/// A JSON body already serialized (the CLI's `--json` text).
fn json_text(text: String) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

/// `GET /api/v1/nodes`: the fleet, as `slipway nodes --json` prints it.
async fn nodes(State(state): State<HttpState>, who: Principal) -> Result<Response, AppError> {
    who.require(&state, "list nodes", Caller::can_read).await?;
    let mut views = fleet::nodes(state.store(), crate::now_unix()).await?;
    fleet::apply_sessions(&mut views, |id| state.sessions().contains(id));
    let wire: Vec<slipway_proto::v1::NodeView> = views.iter().map(Into::into).collect();
    let text =
        slipway_proto::view::nodes_json(&wire).map_err(|e| AppError::Internal(e.to_string()))?;
    Ok(json_text(text))
}
