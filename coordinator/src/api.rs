//! The REST/JSON API (axum). The OpenAPI document is served at `GET /api/v1/openapi.json`
//! and kept in `docs/openapi.json` (a test checks they are the same).
//!
//! Every `/api/v1` call needs `Authorization: Bearer TOKEN` (see [`crate::auth`]); errors are
//! JSON `{"error": {"code", "message"}}` ([`view::ErrorBody`]) with the HTTP status that fits.
//! `GET /metrics` (Prometheus) and `GET /healthz` need no token.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleetwave_chunker::SignedManifest;
use serde::Deserialize;

use crate::auth::{Action, AuthError, Principal, authorize};
use crate::daemon::{Shared, now};
use crate::deploy::DeploymentSpec;
use crate::fleet::FleetError;
use crate::rollout::{ManifestId, Operator};
use crate::view;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl std::fmt::Display) -> Self {
        Self { status, code, message: message.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = view::ErrorBody {
            error: view::ErrorDetail { code: self.code.into(), message: self.message },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        use FleetError::*;
        let (status, code) = match &e {
            NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Invalid(_) | Spec(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            NotPromoted { .. } => (StatusCode::FORBIDDEN, "not_promoted"),
            InProgress { .. } => (StatusCode::CONFLICT, "deployment_in_progress"),
            NotApplicable(_) => (StatusCode::CONFLICT, "not_applicable"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Replay { .. } => (StatusCode::CONFLICT, "conflict"),
            Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, e)
    }
}

fn poisoned() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "coordinator state lock poisoned")
}

type ApiResult<T> = Result<T, ApiError>;

/// The router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{service}/versions", get(versions).post(register))
        .route("/api/v1/services/{service}/versions/{version}/promote", post(promote_version))
        .route("/api/v1/deployments", get(deployments).post(create_deployment))
        .route("/api/v1/deployments/{id}", get(deployment))
        .route("/api/v1/deployments/{id}/{command}", post(operate))
        .route("/api/v1/hosts", get(hosts))
        .route("/api/v1/audit", get(audit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// Checks the caller's token and role; refusals are logged and audited (never the token).
fn authenticate(shared: &Shared, headers: &HeaderMap, action: Action<'_>) -> ApiResult<Principal> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let result = match token {
        None => Err(AuthError::Missing),
        Some(t) => match shared.principal(t) {
            None => Err(AuthError::Unknown),
            Some(p) => authorize(&p, &action).map(|()| p),
        },
    };
    result.map_err(|e| {
        tracing::warn!(refused = %e, ?action, "API call refused");
        let service = match action {
            Action::Register { service }
            | Action::PromoteVersion { service, .. }
            | Action::Deploy { service }
            | Action::PromoteWave { service }
            | Action::Rollback { service } => Some(service),
            Action::Read | Action::Admin => None,
        };
        if !matches!(action, Action::Read) {
            if let Ok(mut fleet) = shared.fleet.lock() {
                let actor = match &e {
                    AuthError::Forbidden { name, .. } => name.clone(),
                    _ => "anonymous".into(),
                };
                let _ = fleet.audit(now(), &actor, "auth.refused", service, None, e.to_string());
            }
        }
        let (status, code) = if e.status() == 401 {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        } else {
            (StatusCode::FORBIDDEN, "forbidden")
        };
        ApiError::new(status, code, e)
    })
}

async fn metrics(State(shared): State<Arc<Shared>>) -> ApiResult<Response> {
    let text = {
        let fleet = shared.fleet.lock().map_err(|_| poisoned())?;
        shared.metrics.encode(&fleet)
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

async fn services(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<view::ServiceView>>> {
    authenticate(&shared, &headers, Action::Read)?;
    let fleet = shared.fleet.lock().map_err(|_| poisoned())?;
    Ok(Json(fleet.services_view()?))
}

fn version_view(r: crate::store::VersionRecord) -> view::VersionView {
    view::VersionView {
        service: r.service,
        version: r.version,
        manifest: r.manifest.to_string(),
        size: r.size,
        registered_by: r.registered_by,
        registered_ms: r.registered_ms,
        environments: r
            .promotions
            .into_iter()
            .map(|p| view::PromotionView {
                environment: p.environment,
                by: p.by,
                at_ms: p.at_ms,
                comment: p.comment,
            })
            .collect(),
    }
}

async fn versions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> ApiResult<Json<Vec<view::VersionView>>> {
    authenticate(&shared, &headers, Action::Read)?;
    let list = shared.store.versions(Some(&service)).map_err(FleetError::from)?;
    Ok(Json(list.into_iter().map(version_view).collect()))
}

async fn register(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Json(body): Json<view::RegisterRequest>,
) -> ApiResult<(StatusCode, Json<view::VersionView>)> {
    let principal = authenticate(&shared, &headers, Action::Register { service: &service })?;
    let bytes = hex::decode(body.signed_manifest_hex.trim()).map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "signed_manifest_hex is not hex")
    })?;
    let signed = SignedManifest::decode(&bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("signed manifest: {e}"))
    })?;
    signed
        .verify(&shared.trusted)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "untrusted_manifest", e))?;
    let m = signed.manifest();
    if m.service != service {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the manifest is of service {:?}, not {service:?}", m.service),
        ));
    }
    let record = {
        let mut fleet = shared.fleet.lock().map_err(|_| poisoned())?;
        fleet.register_version(
            now(),
            &principal.name,
            &service,
            &m.version,
            ManifestId(*signed.id().as_bytes()),
            m.size,
        )?
    };
    shared.store.commit().await;
    Ok((StatusCode::CREATED, Json(version_view(record))))
}

async fn promote_version(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((service, version)): Path<(String, String)>,
    Json(body): Json<view::PromoteRequest>,
) -> ApiResult<Json<view::VersionView>> {
    let action = Action::PromoteVersion { service: &service, environment: &body.environment };
    let principal = authenticate(&shared, &headers, action)?;
    let record = {
        let mut fleet = shared.fleet.lock().map_err(|_| poisoned())?;
        fleet.promote_version(
            now(),
            &principal.name,
            &service,
            &version,
            &body.environment,
            &body.comment,
        )?
    };
    shared.store.commit().await;
    Ok(Json(version_view(record)))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    service: Option<String>,
}

async fn deployments(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<view::DeploymentView>>> {
    authenticate(&shared, &headers, Action::Read)?;
    let fleet = shared.fleet.lock().map_err(|_| poisoned())?;
    Ok(Json(fleet.deployments(q.service.as_deref(), now())))
}

async fn create_deployment(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<DeploymentSpec>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<view::DeploymentView>)> {
    let Json(spec) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let principal = authenticate(&shared, &headers, Action::Deploy { service: &spec.service })?;
    let view = {
        let mut fleet = shared.fleet.lock().map_err(|_| poisoned())?;
        let id = fleet.create_deployment(now(), &principal.name, spec)?;
        fleet.deployment_view(id, now())
    };
    shared.store.commit().await;
    let view = view.ok_or_else(|| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "deployment vanished")
    })?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn deployment(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Json<view::DeploymentView>> {
    authenticate(&shared, &headers, Action::Read)?;
    let fleet = shared.fleet.lock().map_err(|_| poisoned())?;
    fleet.deployment_view(id, now()).map(Json).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("deployment {id} not found"))
    })
}

async fn operate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((id, command)): Path<(u64, String)>,
    body: Option<Json<view::OperateRequest>>,
) -> ApiResult<Json<view::DeploymentView>> {
    let command = match command.as_str() {
        "pause" => Operator::Pause,
        "resume" => Operator::Resume,
        "promote" => Operator::Promote,
        "rollback" => Operator::Rollback,
        "abort" => Operator::Abort,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no command {other:?}: pause, resume, promote, rollback or abort"),
            ));
        }
    };
    let service = {
        let fleet = shared.fleet.lock().map_err(|_| poisoned())?;
        fleet.deployment_service(id).map(str::to_owned)
    }
    .ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("deployment {id} not found"))
    })?;
    let action = match command {
        Operator::Pause | Operator::Resume => Action::Deploy { service: &service },
        Operator::Promote => Action::PromoteWave { service: &service },
        Operator::Rollback | Operator::Abort => Action::Rollback { service: &service },
    };
    let principal = authenticate(&shared, &headers, action)?;
    let comment = body.map(|Json(b)| b.comment).unwrap_or_default();
    let view = {
        let mut fleet = shared.fleet.lock().map_err(|_| poisoned())?;
        fleet.operate(now(), &principal.name, id, command, &comment)?;
        fleet.deployment_view(id, now())
    };
    shared.store.commit().await;
    view.map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "deployment vanished"))
}

async fn hosts(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<view::HostView>>> {
    authenticate(&shared, &headers, Action::Read)?;
    let fleet = shared.fleet.lock().map_err(|_| poisoned())?;
    Ok(Json(fleet.hosts_view()))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    service: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    limit: Option<usize>,
}

async fn audit(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<view::AuditView>>> {
    authenticate(&shared, &headers, Action::Read)?;
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let entries = shared
        .store
        .audit_range(
            q.since_ms.unwrap_or(0),
            q.until_ms.unwrap_or(u64::MAX),
            q.service.as_deref(),
            limit,
        )
        .map_err(FleetError::from)?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e| view::AuditView {
                at_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                service: e.service,
                deployment: e.deployment,
                detail: e.detail,
            })
            .collect(),
    ))
}
