//! A blocking client of the coordinator's REST API (`fleetwave_coordinator::api`).
//!
//! Every call sends `Authorization: Bearer TOKEN`; the token is read once, from a file or the
//! environment, and never printed (the client's `Debug` leaves it out). A refusal is the
//! coordinator's `{"error": {"code", "message"}}` body turned into [`ApiError::Refused`], which
//! names the operation, the status and the code: `deploy refused (403 not_promoted): web 2.0 was
//! not promoted to prod (it is in: dev)`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use reqwest::Url;
use serde::Serialize;
use serde::de::DeserializeOwned;

use fleetwave_coordinator::deploy::DeploymentSpec;
use fleetwave_coordinator::view::{
    AuditView, DeploymentView, ErrorBody, HostView, OperateRequest, PromoteRequest,
    RegisterRequest, ServiceView, VersionView,
};
use fleetwave_node::store_api::{TokenError, read_token_file};

/// The coordinator's REST API when neither `--coordinator` nor `FLEETWAVE_COORDINATOR_API` says
/// otherwise (the coordinator's default listen address).
pub(crate) const DEFAULT_API: &str = "http://127.0.0.1:7600";

/// The environment variable that may hold the API token itself (a token file is preferred: an
/// environment is easier to leak than a file of mode 0600).
pub(crate) const TOKEN_ENV: &str = "FLEETWAVE_TOKEN";

/// How long a connection may take to open: a coordinator that does not answer in this is
/// reported as unreachable instead of hanging the command.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a whole call may take. Writes wait for the coordinator's state to be durable, which
/// is quick; this only bounds a coordinator that accepted the connection and then stalled.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest refusal message kept from an answer that is not the API's JSON error body (a proxy's
/// HTML page, say), so that the error stays one line.
const MAX_PLAIN_MESSAGE: usize = 200;

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The coordinator URL is unusable.
    #[error("invalid coordinator URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    /// No token was given.
    #[error("no API token for the coordinator: give --token-file PATH or set {TOKEN_ENV}")]
    NoToken,
    /// The token file is unusable.
    #[error("cannot read the coordinator API token")]
    TokenFile(#[source] TokenError),
    /// The token in the environment is unusable.
    #[error("{TOKEN_ENV} holds no usable token: {reason}")]
    BadToken { reason: &'static str },
    /// The HTTP client could not be built.
    #[error("cannot set up an HTTP client")]
    Http(#[source] reqwest::Error),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// No answer: connection refused, no route, timeout.
    #[error("{op}: cannot reach the coordinator at {base}")]
    Unreachable {
        op: String,
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator refused (4xx) or failed (5xx).
    #[error("{op} {verb} ({status}{code}): {message}",
        verb = if *.status >= 500 { "failed" } else { "refused" },
        code = if .code.is_empty() { String::new() } else { format!(" {}", .code) })]
    Refused { op: String, status: u16, code: String, message: String },
    /// The answer is not what the API documents.
    #[error("{op}: unexpected answer from {url}")]
    Decode {
        op: String,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ApiError {
    /// The refusal of `op` from an answer's status and body: the API's error body if it is one,
    /// else the body's first line (or the status's reason).
    pub(crate) fn refused(op: &str, status: u16, body: &str) -> Self {
        let (code, message) = match serde_json::from_str::<ErrorBody>(body) {
            Ok(ErrorBody { error }) => (error.code, error.message),
            Err(_) => {
                let line = body.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
                let message = if line.is_empty() {
                    reqwest::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("no reason given")
                        .to_owned()
                } else {
                    truncate(line, MAX_PLAIN_MESSAGE)
                };
                (String::new(), message)
            }
        };
        Self::Refused { op: op.to_owned(), status, code, message }
    }

    /// Whether the coordinator could not be reached at all (worth retrying while following a
    /// deployment through a coordinator restart).
    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The API token: the token file if one is given, else `env_token` (the value of
/// [`TOKEN_ENV`]). Surrounding whitespace is removed; the error never shows the token.
pub(crate) fn resolve_token(
    file: Option<&Path>,
    env_token: Option<String>,
) -> Result<String, ConnectError> {
    if let Some(path) = file {
        return read_token_file(path).map_err(ConnectError::TokenFile);
    }
    let Some(token) = env_token else { return Err(ConnectError::NoToken) };
    let token = token.trim();
    if token.is_empty() {
        return Err(ConnectError::BadToken { reason: "it is empty" });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConnectError::BadToken { reason: "it holds spaces or non-ASCII characters" });
    }
    Ok(token.to_owned())
}

/// An answer: the decoded value and the JSON it came from (for `--json`).
#[derive(Debug)]
pub(crate) struct Reply<T> {
    pub(crate) value: T,
    body: String,
}

impl<T> Reply<T> {
    /// The JSON as the coordinator sent it.
    pub(crate) fn json(&self) -> &str {
        &self.body
    }

    /// The JSON on one line, as the coordinator sends it (compact) or flattened if not.
    pub(crate) fn body_line(&self) -> String {
        self.body.lines().map(str::trim).collect()
    }
}

/// A command on a deployment (`POST /api/v1/deployments/{id}/{command}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operate {
    /// Stop starting activations and waves.
    Pause,
    /// Undo a pause, or re-run the gate that holds the deployment.
    Resume,
    /// Pass the current wave now.
    Promote,
    /// Roll every updated host back.
    Rollback,
    /// Stop where it is, without rolling back.
    Abort,
}

impl Operate {
    /// Its path segment, which is also its name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Rollback => "rollback",
            Self::Abort => "abort",
        }
    }
}

/// What `GET /api/v1/audit` selects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AuditQuery {
    pub(crate) service: Option<String>,
    pub(crate) since_ms: Option<u64>,
    pub(crate) limit: Option<usize>,
}

/// A client of one coordinator.
pub(crate) struct Client {
    base: Url,
    token: String,
    http: reqwest::blocking::Client,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the coordinator at `base` (`http://HOST:PORT`, maybe with a path prefix).
    pub(crate) fn new(base: &str, token: String) -> Result<Self, ConnectError> {
        let invalid = |reason| ConnectError::InvalidUrl { url: base.to_owned(), reason };
        let url = Url::parse(base).map_err(|_| invalid("not a URL"))?;
        if url.scheme() != "http" {
            return Err(invalid("only http:// is supported"));
        }
        if url.cannot_be_a_base() || url.host().is_none() {
            return Err(invalid("no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("credentials do not belong in the URL; use --token-file"));
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(ConnectError::Http)?;
        Ok(Self { base: url, token, http })
    }

    /// The URL of `segments` under the base, each segment escaped.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn call<T: DeserializeOwned>(
        &self,
        op: &str,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&dyn ErasedJson>,
    ) -> Result<Reply<T>, ApiError> {
        let url = self.url(segments);
        let mut request = self.http.request(method, url.clone()).bearer_auth(&self.token);
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(&body.value());
        }
        let unreachable =
            |source| ApiError::Unreachable { op: op.to_owned(), base: self.base_str(), source };
        let response = request.send().map_err(unreachable)?;
        let status = response.status();
        let text = response.text().map_err(unreachable)?;
        if !status.is_success() {
            return Err(ApiError::refused(op, status.as_u16(), &text));
        }
        let value = serde_json::from_str(&text).map_err(|source| ApiError::Decode {
            op: op.to_owned(),
            url: url.to_string(),
            source,
        })?;
        Ok(Reply { value, body: text })
    }

    fn base_str(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    /// `GET /api/v1/services`.
    pub(crate) fn services(&self) -> Result<Reply<Vec<ServiceView>>, ApiError> {
        self.call("list services", Method::GET, &["api", "v1", "services"], &[], None)
    }

    /// `GET /api/v1/services/{service}/versions`.
    pub(crate) fn versions(&self, service: &str) -> Result<Reply<Vec<VersionView>>, ApiError> {
        let op = format!("list versions of {service}");
        self.call(&op, Method::GET, &["api", "v1", "services", service, "versions"], &[], None)
    }

    /// `POST /api/v1/services/{service}/versions`: registers a signed manifest (in `dev`).
    pub(crate) fn register(
        &self,
        service: &str,
        version: &str,
        envelope: &[u8],
    ) -> Result<Reply<VersionView>, ApiError> {
        let body = RegisterRequest { signed_manifest_hex: hex::encode(envelope) };
        let op = format!("register {service} {version}");
        let path = ["api", "v1", "services", service, "versions"];
        self.call(&op, Method::POST, &path, &[], Some(&body))
    }

    /// `POST /api/v1/services/{service}/versions/{version}/promote`.
    pub(crate) fn promote_version(
        &self,
        service: &str,
        version: &str,
        request: &PromoteRequest,
    ) -> Result<Reply<VersionView>, ApiError> {
        let op = format!("promote {service} {version} to {}", request.environment);
        let path = ["api", "v1", "services", service, "versions", version, "promote"];
        self.call(&op, Method::POST, &path, &[], Some(request))
    }

    /// `GET /api/v1/deployments`, newest first.
    pub(crate) fn deployments(
        &self,
        service: Option<&str>,
    ) -> Result<Reply<Vec<DeploymentView>>, ApiError> {
        let query: Vec<(&str, String)> =
            service.map(|s| ("service", s.to_owned())).into_iter().collect();
        self.call("list deployments", Method::GET, &["api", "v1", "deployments"], &query, None)
    }

    /// `POST /api/v1/deployments`.
    pub(crate) fn deploy(&self, spec: &DeploymentSpec) -> Result<Reply<DeploymentView>, ApiError> {
        self.call("deploy", Method::POST, &["api", "v1", "deployments"], &[], Some(spec))
    }

    /// `GET /api/v1/deployments/{id}`.
    pub(crate) fn deployment(&self, id: u64) -> Result<Reply<DeploymentView>, ApiError> {
        let op = format!("show deployment {id}");
        let id = id.to_string();
        self.call(&op, Method::GET, &["api", "v1", "deployments", &id], &[], None)
    }

    /// `POST /api/v1/deployments/{id}/{command}`.
    pub(crate) fn operate(
        &self,
        id: u64,
        command: Operate,
        comment: &str,
    ) -> Result<Reply<DeploymentView>, ApiError> {
        let op = format!("{} deployment {id}", command.name());
        let body = OperateRequest { comment: comment.to_owned() };
        let id = id.to_string();
        let path = ["api", "v1", "deployments", &id, command.name()];
        self.call(&op, Method::POST, &path, &[], Some(&body))
    }

    /// `GET /api/v1/hosts`.
    pub(crate) fn hosts(&self) -> Result<Reply<Vec<HostView>>, ApiError> {
        self.call("list hosts", Method::GET, &["api", "v1", "hosts"], &[], None)
    }

    /// `GET /api/v1/audit`, oldest first.
    pub(crate) fn audit(&self, q: &AuditQuery) -> Result<Reply<Vec<AuditView>>, ApiError> {
        let mut query = Vec::new();
        if let Some(s) = &q.service {
            query.push(("service", s.clone()));
        }
        if let Some(ms) = q.since_ms {
            query.push(("since_ms", ms.to_string()));
        }
        if let Some(n) = q.limit {
            query.push(("limit", n.to_string()));
        }
        self.call("show the audit log", Method::GET, &["api", "v1", "audit"], &query, None)
    }
}

/// A request body of any type, so that [`Client::call`] is not generic over it.
trait ErasedJson {
    fn value(&self) -> serde_json::Value;
}

impl<T: Serialize> ErasedJson for T {
    fn value(&self) -> serde_json::Value {
        // The bodies are plain structs of strings, numbers and lists: they always serialize.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_operation_status_code_and_message() {
        let body = r#"{"error":{"code":"not_promoted","message":"web 2.0 was not promoted to prod (it is in: dev)"}}"#;
        let err = ApiError::refused("deploy", 403, body);
        match &err {
            ApiError::Refused { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (403, "not_promoted"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "deploy refused (403 not_promoted): web 2.0 was not promoted to prod (it is in: dev)"
        );
        let err = ApiError::refused("show deployment 3", 500, body);
        assert!(err.to_string().starts_with("show deployment 3 failed (500 not_promoted): "));
    }

    #[test]
    fn a_refusal_without_the_error_body_keeps_one_line_of_it() {
        let err = ApiError::refused("deploy", 400, "\nFailed to parse the request body\nmore\n");
        assert_eq!(err.to_string(), "deploy refused (400): Failed to parse the request body");
        let err = ApiError::refused("list hosts", 502, "");
        assert_eq!(err.to_string(), "list hosts failed (502): Bad Gateway");
        let long = "é".repeat(300);
        let ApiError::Refused { message, .. } = ApiError::refused("x", 400, &long) else {
            panic!("refused");
        };
        assert!(message.len() <= MAX_PLAIN_MESSAGE + 3, "{}", message.len());
    }

    #[test]
    fn urls_keep_the_base_path_and_escape_segments() {
        let client = Client::new("http://127.0.0.1:7600/", "t".into()).expect("client");
        assert_eq!(
            client.url(&["api", "v1", "services", "a b/c", "versions"]).as_str(),
            "http://127.0.0.1:7600/api/v1/services/a%20b%2Fc/versions"
        );
        let client = Client::new("http://coord.example:80/fw", "t".into()).expect("client");
        assert_eq!(
            client.url(&["api", "v1", "hosts"]).as_str(),
            "http://coord.example/fw/api/v1/hosts"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["coordinator:7600", "https://c:7600", "http://user:pw@c:7600", "nonsense"] {
            assert!(
                matches!(Client::new(url, "t".into()), Err(ConnectError::InvalidUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn the_client_never_shows_its_token() {
        let client = Client::new("http://127.0.0.1:7600", "s3cret-token".into()).expect("client");
        assert!(!format!("{client:?}").contains("s3cret"));
    }

    #[test]
    fn tokens_come_from_the_file_first_then_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").expect("write");
        assert_eq!(resolve_token(Some(&file), Some("env".into())).expect("token"), "from-file");
        assert_eq!(resolve_token(None, Some(" env-token\n".into())).expect("token"), "env-token");
        assert!(matches!(resolve_token(None, None), Err(ConnectError::NoToken)));
        assert!(matches!(
            resolve_token(None, Some("  ".into())),
            Err(ConnectError::BadToken { .. })
        ));
        assert!(matches!(
            resolve_token(None, Some("two words".into())),
            Err(ConnectError::BadToken { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(resolve_token(Some(&missing), None), Err(ConnectError::TokenFile(_))));
    }
}
