//! A blocking client of a daemon's admin API, for the `fleetwave node` commands.

use std::time::Duration;

use super::{ActivateRequest, RollbackRequest, StageRequest, Status};
use crate::activate::Outcome;

/// Longest a request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of a response read.
const MAX_RESPONSE: u64 = 64 << 20;

/// A request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon cannot be reached.
    #[error("cannot reach the daemon at {url}: {source}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The daemon refused the request.
    #[error("{message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The error code of the JSON body.
        code: String,
        /// Its message.
        message: String,
    },
    /// The answer cannot be read.
    #[error("the daemon's answer from {url} is unreadable: {reason}")]
    Unreadable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// A client of one daemon's API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    http: reqwest::blocking::Client,
}

impl AdminClient {
    /// A client of the API at `base` (`http://127.0.0.1:7400`).
    pub fn new(base: &str) -> Self {
        let http =
            reqwest::blocking::Client::builder().timeout(TIMEOUT).build().unwrap_or_default();
        Self { base: base.trim_end_matches('/').to_owned(), http }
    }

    /// Asks the host to stage manifest `id` (64 hex digits); returns its answer's state
    /// (`staging`, or `already staging or staged`).
    pub fn stage(&self, id: &str) -> Result<String, ClientError> {
        let url = format!("{}/v1/admin/stage", self.base);
        let body = StageRequest { manifest: id.to_owned() };
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        let value: serde_json::Value = read_json(resp, &url)?;
        Ok(value["state"].as_str().unwrap_or("staging").to_owned())
    }

    /// Activates staged manifest `id` of `service` (hooks, health check); the outcome says
    /// whether it is active or the previous release was switched back.
    pub fn activate(&self, service: &str, id: &str) -> Result<Outcome, ClientError> {
        let body = ActivateRequest { service: service.to_owned(), manifest: id.to_owned() };
        self.post("/v1/admin/activate", &body)
    }

    /// Switches `service` back to its previous release.
    pub fn rollback(&self, service: &str) -> Result<Outcome, ClientError> {
        self.post("/v1/admin/rollback", &RollbackRequest { service: service.to_owned() })
    }

    fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        // Hooks and health checks may take minutes: no overall timeout here.
        let resp = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(3600))
            .json(body)
            .send()
            .map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        read_json(resp, &url)
    }

    /// The daemon's status.
    pub fn status(&self) -> Result<Status, ClientError> {
        let url = format!("{}/v1/status", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        read_json(resp, &url)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::blocking::Response,
    url: &str,
) -> Result<T, ClientError> {
    use std::io::Read;
    let status = resp.status();
    let mut bytes = Vec::new();
    resp.take(MAX_RESPONSE)
        .read_to_end(&mut bytes)
        .map_err(|e| ClientError::Unreadable { url: url.to_owned(), reason: e.to_string() })?;
    if !status.is_success() {
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(ClientError::Refused {
            status: status.as_u16(),
            code: body["code"].as_str().unwrap_or("unknown").to_owned(),
            message: body["message"]
                .as_str()
                .map_or_else(|| format!("the daemon answered {status}"), str::to_owned),
        });
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Unreadable { url: url.to_owned(), reason: e.to_string() })
}
