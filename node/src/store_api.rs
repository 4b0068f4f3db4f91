//! The store API: a [`ChunkStore`] over HTTP, for publishers, caches and hosts.
//!
//! # Participants
//!
//! - The **origin** serves the authoritative store and accepts uploads from publishers.
//! - A **cache** serves its own store read-only and pulls a manifest it lacks through from its
//!   upstream (the origin, or another cache) the first time someone asks for it.
//! - A **publisher** (`fleetwave publish --origin http://HOST:PORT`, through [`StoreClient`])
//!   asks which chunks the origin lacks, uploads only those, then the manifest, then the ref.
//! - **Hosts and caches** read signed manifests ([`fetch_manifest`]). Chunk bytes do not travel
//!   here but over the chunk protocol ([`crate::protocol`]).
//!
//! The daemon mounts [`router`]; [`spawn_server`] runs it on a thread of its own for programs
//! without an async runtime.
//!
//! # Endpoints
//!
//! Hashes and ids in paths are 64 hex digits; `{service}` and `{version}` are 1 to 128
//! characters from `[A-Za-z0-9._+-]`, not starting with `.`.
//!
//! | request | body | success |
//! |---|---|---|
//! | `GET /v1/manifests/{id}` | - | `200`, the signed manifest (`application/octet-stream`) |
//! | `GET /v1/refs/{service}/{version}` | - | `200`, `{"id": "<hex>"}` |
//! | `POST /v1/chunks/missing` | concatenated 32-byte chunk hashes | `200`, those the store lacks |
//! | `PUT /v1/chunks/{hash}` | the chunk's bytes | `201` stored, `200` already stored |
//! | `PUT /v1/manifests/{id}` | a signed manifest | `201` stored, `200` already stored |
//! | `PUT /v1/refs/{service}/{version}` | `{"id": "<hex>"}` | `201` set, `200` already set so |
//!
//! - `missing` answers with the hashes of the request that the store does not hold, in request
//!   order, concatenated the same way (so an empty body means "nothing to upload"). At most
//!   [`MAX_MISSING_HASHES`] hashes per request: a batch of 256 costs one round trip per 16 MiB
//!   of 64 KiB chunks, and the cap keeps one request's work (a `stat` per hash) small.
//! - A chunk is accepted only if its BLAKE3 hash is `{hash}` (`422 hash_mismatch` otherwise),
//!   and is durable (written to a temporary file, flushed, renamed) before the answer.
//! - A manifest must decode, be the manifest `{id}` names (the id is the BLAKE3 of its
//!   canonical unsigned encoding), pass [`fleetwave_chunker::Manifest::validate`], be signed by a
//!   trusted key when the server has [`TrustedKeys`], and name only chunks the store holds
//!   (`409 chunks_missing` otherwise, with the count in the message). A stored manifest
//!   therefore never names a chunk the store lacks.
//! - A ref must name a stored manifest (`409 manifest_missing`) of that very service and
//!   version (`422 ref_mismatch`). Versions are immutable: a ref that exists with another id is
//!   `409 ref_exists`; setting it again to the same id is a no-op, so a publisher may retry.
//!
//! # Upload order and failures
//!
//! A publisher checks the ref (refusing to publish an existing version), then `missing`, the
//! chunks, the manifest and last the ref, so what becomes visible is always complete: chunks
//! before the manifest that names them, the manifest before the ref that names it. Every step
//! is idempotent; a publisher that fails half-way runs again, and the chunks it had uploaded are
//! no longer reported missing. Chunks of an abandoned upload stay in the store, unnamed.
//!
//! # Authentication
//!
//! Reads (`GET`) are open: manifests are signed, and every receiver checks the signature and the
//! id. Writes (`POST`, `PUT`) need `Authorization: Bearer <token>` when the server has an upload
//! token (`401 unauthorized` otherwise, logged without the token). The server keeps only the
//! SHA-256 of the token ([`UploadAuth`]) and compares digests in constant time. A read-only
//! server (a cache) refuses every write with `403 read_only`.
//!
//! # Limits
//!
//! Every body is capped before it is read: the declared `Content-Length` is checked first and a
//! body without one is counted as it arrives (`413 body_too_large`): chunks at
//! [`MAX_CHUNK_LEN`], manifests at [`MAX_MANIFEST_LEN`], `missing` at [`MAX_MISSING_HASHES`]
//! hashes, ref bodies at 1 KiB. At most [`DEFAULT_MAX_CONCURRENT_WRITES`] writes run at once
//! (more wait their turn before their body is read), which bounds the memory of uploads to that
//! many chunks. The client caps the bodies it reads the same way.
//!
//! # Errors
//!
//! Every error is JSON, `{"code": "snake_case_code", "message": "one line"}`:
//!
//! | status | code | meaning |
//! |---|---|---|
//! | 400 | `invalid_hash`, `invalid_id`, `invalid_name` | a path parameter is malformed |
//! | 400 | `invalid_body` | the body is malformed or could not be read |
//! | 401 | `unauthorized` | a write without the right bearer token |
//! | 403 | `read_only` | a write to a read-only server |
//! | 404 | `manifest_not_found`, `ref_not_found` | nothing by that name (here or upstream) |
//! | 405 | `method_not_allowed` | the path exists, the method does not |
//! | 409 | `chunks_missing`, `manifest_missing`, `ref_exists` | the store is not ready for it |
//! | 413 | `body_too_large` | the body is over its limit |
//! | 422 | `hash_mismatch`, `invalid_manifest`, `untrusted_manifest`, `ref_mismatch` | refused |
//! | 500 | `store_error`, `internal` | the server failed; details are in its log only |
//! | 502 | `upstream_failed` | a cache could not pull a manifest from its upstream |
//!
//! # Caches
//!
//! With an upstream, `GET /v1/manifests/{id}` of a manifest the store lacks fetches
//! `{upstream}/v1/manifests/{id}`, checks that the bytes are the manifest `{id}` (and signed by a
//! trusted key when the server has [`TrustedKeys`]), stores it and serves it. Upstream `404
//! manifest_not_found` is passed on as such; any other upstream failure is `502`.

use std::fmt;
use std::future::poll_fn;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody as _};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use fleetwave_chunker::sign::SignatureError;
use fleetwave_chunker::{ChunkHash, ManifestId, SignedManifest, TrustedKeys};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot};
use tracing::{debug, error, info, warn};

use crate::store::{ChunkStore, MAX_CHUNK_LEN, MAX_MANIFEST_LEN, StoreError};

/// Most chunk hashes one `POST /v1/chunks/missing` may carry.
///
/// 8192 hashes are 256 KiB of request: large enough that batching costs few round trips, small
/// enough that one request's `stat` calls take milliseconds, not seconds.
pub const MAX_MISSING_HASHES: usize = 8192;

/// Writes served at once unless [`StoreApi::with_max_concurrent_writes`] says otherwise.
///
/// Each write holds its whole body in memory, up to [`MAX_CHUNK_LEN`] for a chunk: 32 writes are
/// at most 512 MiB with 16 MiB chunks and 32 MiB with the default 256 KiB maximum. A publisher
/// uploads with a handful of connections, so 32 serves several publishers at full speed.
pub const DEFAULT_MAX_CONCURRENT_WRITES: usize = 32;

/// Longest upload token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// Largest `PUT /v1/refs/...` body: `{"id": "<64 hex>"}` with room for whitespace.
const MAX_REF_BODY_LEN: usize = 1024;

/// Largest JSON or error body the client reads.
const MAX_SMALL_RESPONSE_LEN: u64 = 64 * 1024;

/// Longest server message the client keeps (messages are one line).
const MAX_MESSAGE_LEN: usize = 512;

/// How long the client waits for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one client request may take in all: a 16 MiB chunk at 1 MB/s fits.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an upload token could not be used. Never carries the token itself.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read upload token file {}", path.display())]
    Io {
        /// The token file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The token (or the file, after trimming whitespace) is empty.
    #[error("the upload token{} is empty", in_file(path))]
    Empty {
        /// The token file, if it came from one.
        path: Option<PathBuf>,
    },
    /// The token is longer than [`MAX_TOKEN_LEN`] bytes.
    #[error("the upload token{} is longer than {max} bytes", in_file(path))]
    TooLong {
        /// The token file, if it came from one.
        path: Option<PathBuf>,
        /// The limit, [`MAX_TOKEN_LEN`].
        max: usize,
    },
    /// The token holds a character that cannot travel in an HTTP header.
    #[error("the upload token{} holds a character other than printable ASCII", in_file(path))]
    BadChar {
        /// The token file, if it came from one.
        path: Option<PathBuf>,
    },
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

/// The upload token a server accepts, kept only as its SHA-256 digest so that the token itself
/// is not in the server's memory (nor in a core dump or a `Debug` print).
#[derive(Clone)]
pub struct UploadAuth {
    digest: [u8; 32],
}

impl UploadAuth {
    /// Accepts `token`: 1 to [`MAX_TOKEN_LEN`] printable ASCII characters, no spaces.
    pub fn new(token: &str) -> Result<Self, TokenError> {
        check_token(token, None)?;
        Ok(Self { digest: sha256(token.as_bytes()) })
    }

    /// Reads the token from a file (see [`read_token_file`]).
    pub fn read_file(path: &Path) -> Result<Self, TokenError> {
        Ok(Self { digest: sha256(read_token_file(path)?.as_bytes()) })
    }

    /// Whether `presented` is the token. Compares SHA-256 digests in constant time, so neither
    /// the token's length nor how much of it matched leaks through timing.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = sha256(presented.as_bytes());
        let diff = self.digest.iter().zip(presented.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for UploadAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UploadAuth(..)")
    }
}

/// Reads an upload token file: the token, with surrounding whitespace (a trailing newline)
/// removed. Fails if the file cannot be read or holds no usable token; the error never shows
/// the file's content.
pub fn read_token_file(path: &Path) -> Result<String, TokenError> {
    let io_err = |source| TokenError::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut text = String::new();
    // Read one byte past the limit of a token plus generous whitespace, never the whole file.
    let cap = (MAX_TOKEN_LEN + 64) as u64;
    file.take(cap + 1).read_to_string(&mut text).map_err(io_err)?;
    let token = text.trim();
    if text.len() as u64 > cap {
        return Err(TokenError::TooLong { path: Some(path.to_owned()), max: MAX_TOKEN_LEN });
    }
    check_token(token, Some(path))?;
    Ok(token.to_owned())
}

fn check_token(token: &str, path: Option<&Path>) -> Result<(), TokenError> {
    let path = path.map(Path::to_path_buf);
    if token.is_empty() {
        return Err(TokenError::Empty { path });
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong { path, max: MAX_TOKEN_LEN });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::BadChar { path });
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Who may write.
#[derive(Debug, Clone)]
enum WriteAccess {
    /// Anyone (no upload token configured).
    Open,
    /// Holders of the token.
    Token(UploadAuth),
    /// Nobody: the configured token is unusable (empty, say), so fail closed.
    Refused,
}

/// The store API's configuration: build one, then mount [`router`].
#[derive(Debug)]
pub struct StoreApi {
    store: ChunkStore,
    access: WriteAccess,
    read_only: bool,
    trusted: Option<TrustedKeys>,
    upstream: Option<String>,
    http: Option<reqwest::Client>,
    max_writes: usize,
}

impl StoreApi {
    /// Serves `store`: reads and writes open to all, no signature check, no upstream.
    pub fn new(store: ChunkStore) -> Self {
        Self {
            store,
            access: WriteAccess::Open,
            read_only: false,
            trusted: None,
            upstream: None,
            http: None,
            max_writes: DEFAULT_MAX_CONCURRENT_WRITES,
        }
    }

    /// Requires `Authorization: Bearer <token>` on writes when `token` is set; only its digest
    /// is kept. A token [`UploadAuth::new`] refuses (an empty one, say) is logged and makes the
    /// server refuse every write, rather than accept writes from anyone.
    pub fn with_upload_token(mut self, token: Option<String>) -> Self {
        self.access = match token.as_deref().map(UploadAuth::new) {
            None => WriteAccess::Open,
            Some(Ok(auth)) => WriteAccess::Token(auth),
            Some(Err(err)) => {
                error!(%err, "store API: unusable upload token; every write will be refused");
                WriteAccess::Refused
            }
        };
        self
    }

    /// Requires writes to carry the token `auth` accepts (`None`: writes are open).
    pub fn with_upload_auth(mut self, auth: Option<UploadAuth>) -> Self {
        self.access = auth.map_or(WriteAccess::Open, WriteAccess::Token);
        self
    }

    /// Accepts only manifests signed by one of `keys`, uploaded or pulled from upstream
    /// (`None`: any well-formed manifest; hosts still check signatures before activating).
    pub fn with_trusted(mut self, keys: Option<TrustedKeys>) -> Self {
        self.trusted = keys;
        self
    }

    /// Pulls manifests the store lacks through from `base_url` (`http://HOST:PORT`, another
    /// store API): the cache role. `None`: a missing manifest is `404`.
    pub fn with_upstream(mut self, base_url: Option<String>) -> Self {
        self.upstream = base_url;
        self
    }

    /// The HTTP client for upstream requests (default: one with a 10 s connect timeout and a
    /// 120 s request timeout).
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Refuses every write with `403 read_only` (a cache's store is filled only from upstream).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Serves at most `n` writes at once (at least 1); see [`DEFAULT_MAX_CONCURRENT_WRITES`].
    pub fn with_max_concurrent_writes(mut self, n: usize) -> Self {
        self.max_writes = n.max(1);
        self
    }
}

/// What the handlers share.
#[derive(Debug)]
struct Shared {
    store: ChunkStore,
    access: WriteAccess,
    read_only: bool,
    trusted: Option<TrustedKeys>,
    upstream: Option<String>,
    http: reqwest::Client,
    writes: Semaphore,
    /// Serializes "check the ref, then set it" so two publishers cannot both create a version.
    /// (Another process writing the same store directory is not covered.)
    refs: Mutex<()>,
}

type Api = State<Arc<Shared>>;

/// The store API's routes (see the [module docs](self)), ready to be merged into a daemon's
/// router or served on their own.
pub fn router(api: StoreApi) -> Router {
    let http = api.http.unwrap_or_else(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_default()
    });
    let shared = Arc::new(Shared {
        store: api.store,
        access: api.access,
        read_only: api.read_only,
        trusted: api.trusted,
        upstream: api.upstream,
        http,
        writes: Semaphore::new(api.max_writes),
        refs: Mutex::new(()),
    });
    Router::new()
        .route("/v1/manifests/{id}", get(get_manifest).put(put_manifest).fallback(not_allowed))
        .route("/v1/refs/{service}/{version}", get(get_ref).put(put_ref).fallback(not_allowed))
        .route("/v1/chunks/missing", post(missing).fallback(not_allowed))
        .route("/v1/chunks/{hash}", put(put_chunk).fallback(not_allowed))
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), write_gate))
        .with_state(shared)
}

/// A running [`spawn_server`]: stops when [`shutdown`](Self::shutdown) is called or it is
/// dropped.
#[derive(Debug)]
pub struct BackgroundServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl BackgroundServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets requests in flight finish, and waits for the thread.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("store API server thread panicked")),
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Serves [`router`]`(api)` on `listener` from a thread with its own single-threaded tokio
/// runtime, for programs that have no runtime of their own (the CLI's tests, benchmarks). The
/// daemon mounts [`router`] instead.
pub fn spawn_server(
    listener: std::net::TcpListener,
    api: StoreApi,
) -> io::Result<BackgroundServer> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("store-api".into()).spawn(move || {
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, router(api))
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        })
    })?;
    Ok(BackgroundServer { addr, stop: Some(stop), thread: Some(thread) })
}

// ---------------------------------------------------------------------------------------------
// Server: errors, extractors, handlers.

/// An error answer: a status and `{"code", "message"}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// The JSON of an error answer, on both sides.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

/// The JSON of a ref, on both sides.
#[derive(Debug, Serialize, Deserialize)]
struct RefBody {
    id: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn invalid_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", message)
    }

    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the log")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code.to_owned(), message: self.message };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { hash } => Self::new(
                StatusCode::NOT_FOUND,
                "chunk_not_found",
                format!("chunk {hash} is not in the store"),
            ),
            StoreError::ManifestNotFound { id } => Self::new(
                StatusCode::NOT_FOUND,
                "manifest_not_found",
                format!("manifest {id} is not in the store"),
            ),
            StoreError::HashMismatch { expected, actual } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "hash_mismatch",
                format!("the body hashes to {actual}, not to {expected}"),
            ),
            StoreError::ChunkTooLarge { limit, .. }
            | StoreError::ManifestTooLarge { limit, .. } => Self::too_large(limit),
            StoreError::InvalidName { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_name", err.to_string())
            }
            err => {
                // Paths and OS errors stay in the server's log.
                error!(err = %DisplayChain(&err), "store API: store failure");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    "the store failed; see the server's log",
                )
            }
        }
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(err) => {
            error!(%err, "store API: blocking task failed");
            Err(ApiError::internal())
        }
    }
}

fn octets(status: StatusCode, bytes: Vec<u8>) -> Response {
    let content_type = HeaderValue::from_static("application/octet-stream");
    (status, [(CONTENT_TYPE, content_type)], bytes).into_response()
}

/// A request body of at most `LIMIT` bytes. The declared length is checked before anything is
/// read or allocated; a body without one is counted as it arrives.
struct Capped<const LIMIT: usize>(Vec<u8>);

impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for Capped<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > LIMIT as u64) {
            return Err(ApiError::too_large(LIMIT));
        }
        let mut body: Body = req.into_body();
        // `declared <= LIMIT`, so this allocation is capped too.
        let mut buf = Vec::with_capacity(declared.map_or(0, |len| len as usize));
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            let frame = frame.map_err(|err| {
                debug!(%err, "store API: request body unreadable");
                ApiError::invalid_body("the request body could not be read")
            })?;
            if let Ok(data) = frame.into_data() {
                if data.len() > LIMIT - buf.len() {
                    return Err(ApiError::too_large(LIMIT));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Self(buf))
    }
}

/// A digest in a path, parsed before the body is read.
struct Hex<T>(T);

/// The digests that appear in paths.
trait HexParam: std::str::FromStr + Send {
    const CODE: &'static str;
    const WHAT: &'static str;
}

impl HexParam for ChunkHash {
    const CODE: &'static str = "invalid_hash";
    const WHAT: &'static str = "chunk hash";
}

impl HexParam for ManifestId {
    const CODE: &'static str = "invalid_id";
    const WHAT: &'static str = "manifest id";
}

impl<S: Send + Sync, T: HexParam> FromRequestParts<S> for Hex<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = |raw: &str| {
            let message = format!("{:?} is not a {} (64 hex digits)", shorten(raw), T::WHAT);
            ApiError::new(StatusCode::BAD_REQUEST, T::CODE, message)
        };
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| invalid(""))?;
        raw.parse().map(Hex).map_err(|_| invalid(&raw))
    }
}

/// `{service}/{version}` in a path, validated before the body is read.
struct RefParam {
    service: String,
    version: String,
}

impl<S: Send + Sync> FromRequestParts<S> for RefParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path((service, version)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", "malformed ref path")
                })?;
        for (kind, name) in [("service", &service), ("version", &version)] {
            if let Err(reason) = fleetwave_chunker::manifest::validate_name(name) {
                let message = format!("invalid {kind} name {:?}: {reason}", shorten(name));
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", message));
            }
        }
        Ok(Self { service, version })
    }
}

/// At most 80 characters of something a client sent, for messages and logs.
fn shorten(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// Authorizes writes before their bodies are read, and bounds how many run at once.
async fn write_gate(State(shared): Api, req: Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    if shared.read_only {
        let message = "this store is read-only";
        return ApiError::new(StatusCode::FORBIDDEN, "read_only", message).into_response();
    }
    let refusal = match &shared.access {
        WriteAccess::Open => None,
        WriteAccess::Refused => Some("the server's upload token is unusable"),
        WriteAccess::Token(auth) => match bearer(req.headers()) {
            None => Some("no bearer token"),
            Some(token) if !auth.accepts(token) => Some("wrong bearer token"),
            Some(_) => None,
        },
    };
    if let Some(reason) = refusal {
        warn!(method = %req.method(), path = %req.uri().path(), reason, "store API: write refused");
        let message = "this store needs a valid upload token (Authorization: Bearer <token>)";
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    }
    let Ok(_permit) = shared.writes.acquire().await else {
        return ApiError::internal().into_response();
    };
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn not_allowed(method: Method) -> ApiError {
    let message = format!("{method} is not allowed here");
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)
}

async fn get_manifest(State(shared): Api, Hex(id): Hex<ManifestId>) -> Result<Response, ApiError> {
    let store = shared.store.clone();
    let found = blocking(move || Ok(store.get_manifest(&id))).await?;
    match (found, &shared.upstream) {
        (Ok(bytes), _) => Ok(octets(StatusCode::OK, bytes)),
        (Err(StoreError::ManifestNotFound { .. }), Some(upstream)) => {
            pull_through(&shared, upstream, id).await
        }
        (Err(err), _) => Err(err.into()),
    }
}

/// Fetches a manifest from upstream, checks it, stores it and serves it.
async fn pull_through(
    shared: &Shared,
    upstream: &str,
    id: ManifestId,
) -> Result<Response, ApiError> {
    let signed = match fetch_manifest(&shared.http, upstream, id).await {
        Ok(signed) => signed,
        Err(err) if err.code() == Some("manifest_not_found") => {
            let message = format!("manifest {id} is neither in this store nor upstream");
            return Err(ApiError::new(StatusCode::NOT_FOUND, "manifest_not_found", message));
        }
        Err(err) => {
            warn!(manifest = %id, err = %DisplayChain(&err), "store API: upstream pull failed");
            let message =
                format!("cannot pull manifest {id} from upstream: {}", DisplayChain(&err));
            return Err(ApiError::new(StatusCode::BAD_GATEWAY, "upstream_failed", message));
        }
    };
    if let Some(trusted) = &shared.trusted {
        if let Err(err) = signed.verify(trusted) {
            warn!(manifest = %id, %err, %upstream, "store API: upstream manifest not trusted");
            let message = format!("upstream served manifest {id}, but {err}");
            return Err(ApiError::new(StatusCode::BAD_GATEWAY, "upstream_failed", message));
        }
    }
    let bytes = signed.encode();
    let store = shared.store.clone();
    let stored = bytes.clone();
    match blocking(move || Ok(store.put_manifest(&id, &stored))).await? {
        Ok(()) => info!(manifest = %id, %upstream, "store API: manifest pulled through"),
        // Serve it anyway: it was checked, and a full disk should not stop a region.
        Err(err) => {
            error!(manifest = %id, err = %DisplayChain(&err), "cannot store pulled manifest")
        }
    }
    Ok(octets(StatusCode::OK, bytes))
}

async fn get_ref(State(shared): Api, r: RefParam) -> Result<axum::Json<RefBody>, ApiError> {
    let store = shared.store.clone();
    let found =
        blocking(move || Ok(store.resolve_ref(&r.service, &r.version).map(|id| (r, id)))).await??;
    match found {
        (_, Some(id)) => Ok(axum::Json(RefBody { id: id.to_hex() })),
        (r, None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ref_not_found",
            format!("{}@{} is not published here", r.service, r.version),
        )),
    }
}

async fn missing(
    State(shared): Api,
    Capped(body): Capped<{ MAX_MISSING_HASHES * 32 }>,
) -> Result<Response, ApiError> {
    if body.len() % 32 != 0 {
        let message =
            format!("the body is {} bytes, not a whole number of 32-byte hashes", body.len());
        return Err(ApiError::invalid_body(message));
    }
    let store = shared.store.clone();
    let lacking = blocking(move || {
        let mut out = Vec::new();
        for hash in body.chunks_exact(32).filter_map(ChunkHash::from_slice) {
            if !store.has(&hash) {
                out.extend_from_slice(hash.as_bytes());
            }
        }
        Ok(out)
    })
    .await?;
    Ok(octets(StatusCode::OK, lacking))
}

async fn put_chunk(
    State(shared): Api,
    Hex(hash): Hex<ChunkHash>,
    Capped(data): Capped<MAX_CHUNK_LEN>,
) -> Result<StatusCode, ApiError> {
    let store = shared.store.clone();
    let len = data.len();
    let new = blocking(move || Ok(store.put(&hash, &data)?)).await?;
    debug!(chunk = %hash, len, new, "store API: chunk received");
    Ok(if new { StatusCode::CREATED } else { StatusCode::OK })
}

async fn put_manifest(
    State(shared): Api,
    Hex(id): Hex<ManifestId>,
    Capped(bytes): Capped<MAX_MANIFEST_LEN>,
) -> Result<StatusCode, ApiError> {
    let shared = Arc::clone(&shared);
    blocking(move || shared.store_manifest(id, &bytes)).await
}

async fn put_ref(
    State(shared): Api,
    r: RefParam,
    Capped(body): Capped<MAX_REF_BODY_LEN>,
) -> Result<(StatusCode, axum::Json<RefBody>), ApiError> {
    let request: RefBody = serde_json::from_slice(&body)
        .map_err(|_| ApiError::invalid_body(r#"expected {"id": "<64 hex digits>"}"#))?;
    let id: ManifestId = request.id.parse().map_err(|_| {
        let message = format!("{:?} is not a manifest id (64 hex digits)", shorten(&request.id));
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", message)
    })?;
    let shared = Arc::clone(&shared);
    let status = blocking(move || shared.store_ref(&r.service, &r.version, id)).await?;
    Ok((status, axum::Json(RefBody { id: id.to_hex() })))
}

impl Shared {
    /// Checks and stores an uploaded manifest (blocking: decoding, signatures, `stat`s).
    fn store_manifest(&self, id: ManifestId, bytes: &[u8]) -> Result<StatusCode, ApiError> {
        // Decoding validates the manifest (sizes, names, chunk bounds) and checks its id.
        let signed = SignedManifest::decode_expecting(id, bytes).map_err(|err| {
            let message = format!("manifest {id} refused: {}", DisplayChain(&err));
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest", message)
        })?;
        if let Some(trusted) = &self.trusted {
            signed.verify(trusted).map_err(|err| {
                let message = format!("manifest {id} refused: {err}");
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "untrusted_manifest", message)
            })?;
        }
        let chunks = signed.manifest().unique_chunks();
        let lacking = chunks.iter().filter(|c| !self.store.has(&c.hash)).count();
        if lacking > 0 {
            let message = format!(
                "manifest {id} names {lacking} of its {} chunks that the store lacks; \
                 upload them first",
                chunks.len()
            );
            return Err(ApiError::new(StatusCode::CONFLICT, "chunks_missing", message));
        }
        let existed = self.store.has_manifest(&id);
        self.store.put_manifest(&id, bytes)?;
        let m = signed.manifest();
        info!(manifest = %id, service = %m.service, version = %m.version, "store API: manifest stored");
        Ok(if existed { StatusCode::OK } else { StatusCode::CREATED })
    }

    /// Points a ref at a stored manifest of that service and version, once (blocking).
    fn store_ref(
        &self,
        service: &str,
        version: &str,
        id: ManifestId,
    ) -> Result<StatusCode, ApiError> {
        let _guard = self.refs.lock().unwrap_or_else(PoisonError::into_inner);
        match self.store.resolve_ref(service, version)? {
            Some(existing) if existing == id => return Ok(StatusCode::OK),
            Some(existing) => {
                let message = format!(
                    "{service}@{version} is already published as manifest {existing}; \
                     versions are immutable"
                );
                return Err(ApiError::new(StatusCode::CONFLICT, "ref_exists", message));
            }
            None => {}
        }
        let bytes = match self.store.get_manifest(&id) {
            Ok(bytes) => bytes,
            Err(StoreError::ManifestNotFound { .. }) => {
                let message = format!("manifest {id} is not in the store; upload it first");
                return Err(ApiError::new(StatusCode::CONFLICT, "manifest_missing", message));
            }
            Err(err) => return Err(err.into()),
        };
        let signed = SignedManifest::decode_expecting(id, &bytes).map_err(|err| {
            error!(manifest = %id, %err, "store API: a stored manifest does not decode");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_error",
                "the stored manifest is unusable; see the server's log",
            )
        })?;
        let m = signed.manifest();
        if m.service != service || m.version != version {
            let message =
                format!("manifest {id} is {}@{}, not {service}@{version}", m.service, m.version);
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "ref_mismatch", message));
        }
        self.store.set_ref(service, version, &id)?;
        info!(manifest = %id, %service, %version, "store API: ref set");
        Ok(StatusCode::CREATED)
    }
}

/// Shows an error and its sources on one line, `outer: inner: ...`.
struct DisplayChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

/// Why a store API request failed. Every variant names the URL involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreApiError {
    /// The base URL is not an `http://` URL this client can use.
    #[error("invalid store API URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given (without any password).
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("cannot set up an HTTP client")]
    Client(#[source] reqwest::Error),
    /// The request could not be sent or its answer not received (connection refused, timeout).
    #[error("request to {url} failed")]
    Request {
        /// The request's URL.
        url: String,
        /// What went wrong.
        #[source]
        source: reqwest::Error,
    },
    /// Reading the answer's body failed part-way.
    #[error("cannot read the answer from {url}")]
    Read {
        /// The request's URL.
        url: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The server refused the request.
    #[error("{url} answered {status}{}: {message}", fmt_code(code))]
    Status {
        /// The request's URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The error code from the answer's JSON (empty if it had none).
        code: String,
        /// The server's one-line message (or the status's reason if it sent none).
        message: String,
    },
    /// The answer is larger than anything the server should send.
    #[error("the answer from {url} is larger than {limit} bytes")]
    TooLarge {
        /// The request's URL.
        url: String,
        /// The limit for answers of its kind.
        limit: u64,
    },
    /// The answer is not what the API specifies.
    #[error("malformed answer from {url}: {reason}")]
    Malformed {
        /// The request's URL.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The manifest served is not the one asked for, or does not decode.
    #[error("manifest {id} from {url} is unusable")]
    BadManifest {
        /// The request's URL.
        url: String,
        /// The manifest asked for.
        id: ManifestId,
        /// What is wrong with it.
        #[source]
        source: Box<SignatureError>,
    },
}

fn fmt_code(code: &str) -> String {
    if code.is_empty() { String::new() } else { format!(" ({code})") }
}

impl StoreApiError {
    /// The HTTP status of a refusal ([`StoreApiError::Status`]).
    pub fn status(&self) -> Option<reqwest::StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's error code of a refusal, such as `"chunks_missing"` (see the module docs).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A blocking client of the store API, for publishers. Cheap to clone; clones share
/// connections, so upload threads can each hold one.
#[derive(Clone)]
pub struct StoreClient {
    base: reqwest::Url,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreClient")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl StoreClient {
    /// A client of the store API at `base_url` (`http://HOST:PORT`, optionally with a path
    /// prefix), sending `token` as `Authorization: Bearer` on writes.
    ///
    /// Must not be created or dropped on an async runtime's threads (it runs one of its own).
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, StoreApiError> {
        let base = parse_base(base_url)?;
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(StoreApiError::Client)?;
        Ok(Self { base, token, http })
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Which of `hashes` the store lacks, in order; as many requests as the
    /// [`MAX_MISSING_HASHES`] cap needs.
    pub fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, StoreApiError> {
        let url = endpoint(&self.base, &["v1", "chunks", "missing"]);
        let mut out = Vec::new();
        for batch in hashes.chunks(MAX_MISSING_HASHES) {
            let body: Vec<u8> = batch.iter().flat_map(|h| *h.as_bytes()).collect();
            let request = self.http.post(url.clone()).body(body);
            let resp = self.send(request, &url, true)?;
            let bytes = read_capped(&url, resp, (batch.len() * 32) as u64)?;
            if bytes.len() % 32 != 0 {
                return Err(malformed(&url, "not a whole number of 32-byte hashes"));
            }
            let lacking: Vec<ChunkHash> =
                bytes.chunks_exact(32).filter_map(ChunkHash::from_slice).collect();
            // The answer must be a subsequence of the request.
            let mut asked = batch.iter();
            if !lacking.iter().all(|h| asked.any(|a| a == h)) {
                return Err(malformed(&url, "hashes that were not asked about, or out of order"));
            }
            out.extend(lacking);
        }
        Ok(out)
    }

    /// Uploads a chunk. Returns whether the store did not have it yet.
    pub fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool, StoreApiError> {
        let url = endpoint(&self.base, &["v1", "chunks", &hash.to_hex()]);
        let resp = self.send(self.http.put(url.clone()).body(data.to_vec()), &url, true)?;
        Ok(resp.status() == reqwest::StatusCode::CREATED)
    }

    /// Uploads a signed manifest (its encoding, [`SignedManifest::encode`]). Fails with
    /// `409 chunks_missing` unless every chunk it names is stored.
    pub fn put_manifest(&self, id: &ManifestId, bytes: &[u8]) -> Result<(), StoreApiError> {
        let url = endpoint(&self.base, &["v1", "manifests", &id.to_hex()]);
        self.send(self.http.put(url.clone()).body(bytes.to_vec()), &url, true)?;
        Ok(())
    }

    /// Fetches and decodes a signed manifest, checking that it is the manifest `id` (not its
    /// signatures: that is the caller's policy).
    pub fn manifest(&self, id: &ManifestId) -> Result<SignedManifest, StoreApiError> {
        let url = endpoint(&self.base, &["v1", "manifests", &id.to_hex()]);
        let resp = self.send(self.http.get(url.clone()), &url, false)?;
        let bytes = read_capped(&url, resp, MAX_MANIFEST_LEN as u64)?;
        SignedManifest::decode_expecting(*id, &bytes).map_err(|source| StoreApiError::BadManifest {
            url: url.to_string(),
            id: *id,
            source: Box::new(source),
        })
    }

    /// The manifest published as `service`@`version`, or `None` if there is none.
    pub fn resolve_ref(
        &self,
        service: &str,
        version: &str,
    ) -> Result<Option<ManifestId>, StoreApiError> {
        let url = endpoint(&self.base, &["v1", "refs", service, version]);
        let resp = match self.send(self.http.get(url.clone()), &url, false) {
            Ok(resp) => resp,
            // Only the API's own "no such ref" means none: a 404 from something that is not a
            // store API must not look like an unpublished version.
            Err(err) if err.code() == Some("ref_not_found") => return Ok(None),
            Err(err) => return Err(err),
        };
        let bytes = read_capped(&url, resp, MAX_SMALL_RESPONSE_LEN)?;
        let body: RefBody =
            serde_json::from_slice(&bytes).map_err(|_| malformed(&url, "not a ref (JSON)"))?;
        body.id.parse().map(Some).map_err(|_| malformed(&url, "the ref's id is not 64 hex digits"))
    }

    /// Publishes `service`@`version` as manifest `id`. Fails with `409 ref_exists` if it is
    /// already published as another manifest; succeeds if it is already this one.
    pub fn set_ref(
        &self,
        service: &str,
        version: &str,
        id: &ManifestId,
    ) -> Result<(), StoreApiError> {
        let url = endpoint(&self.base, &["v1", "refs", service, version]);
        let request = self.http.put(url.clone()).json(&RefBody { id: id.to_hex() });
        self.send(request, &url, true)?;
        Ok(())
    }

    /// Sends a request (with the token if `write`) and turns a refusal into
    /// [`StoreApiError::Status`].
    fn send(
        &self,
        mut request: reqwest::blocking::RequestBuilder,
        url: &reqwest::Url,
        write: bool,
    ) -> Result<reqwest::blocking::Response, StoreApiError> {
        if let (true, Some(token)) = (write, &self.token) {
            request = request.bearer_auth(token);
        }
        let resp = request.send().map_err(|source| StoreApiError::Request {
            url: url.to_string(),
            source: source.without_url(),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = read_capped(url, resp, MAX_SMALL_RESPONSE_LEN).unwrap_or_default();
        Err(refusal(url, status, &body))
    }
}

/// Fetches the signed manifest `id` from the store API at `base` (`http://HOST:PORT`), and
/// checks that the bytes decode to that very manifest. Signatures are the caller's to check.
///
/// A store that does not have it answers [`StoreApiError::Status`] with code
/// `manifest_not_found`.
pub async fn fetch_manifest(
    client: &reqwest::Client,
    base: &str,
    id: ManifestId,
) -> Result<SignedManifest, StoreApiError> {
    let base = parse_base(base)?;
    let url = endpoint(&base, &["v1", "manifests", &id.to_hex()]);
    let request = client.get(url.clone());
    let mut resp = request.send().await.map_err(|source| StoreApiError::Request {
        url: url.to_string(),
        source: source.without_url(),
    })?;
    let status = resp.status();
    let limit = if status.is_success() { MAX_MANIFEST_LEN as u64 } else { MAX_SMALL_RESPONSE_LEN };
    if resp.content_length().is_some_and(|len| len > limit) {
        return Err(StoreApiError::TooLarge { url: url.to_string(), limit });
    }
    let mut bytes = Vec::new();
    loop {
        let chunk = resp.chunk().await;
        match chunk {
            Ok(Some(chunk)) => {
                if (bytes.len() + chunk.len()) as u64 > limit {
                    return Err(StoreApiError::TooLarge { url: url.to_string(), limit });
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(source) if status.is_success() => {
                return Err(StoreApiError::Request {
                    url: url.to_string(),
                    source: source.without_url(),
                });
            }
            // A refusal whose body broke off is still a refusal.
            Err(_) => break,
        }
    }
    if !status.is_success() {
        return Err(refusal(&url, status, &bytes));
    }
    SignedManifest::decode_expecting(id, &bytes).map_err(|source| StoreApiError::BadManifest {
        url: url.to_string(),
        id,
        source: Box::new(source),
    })
}

/// Parses a base URL: `http://` with a host, no credentials, query or fragment.
fn parse_base(base: &str) -> Result<reqwest::Url, StoreApiError> {
    let invalid = |url: String, reason| StoreApiError::InvalidUrl { url, reason };
    let url = reqwest::Url::parse(base).map_err(|_| invalid(base.to_owned(), "not a URL"))?;
    if url.password().is_some() || !url.username().is_empty() {
        let mut shown = url.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        return Err(invalid(shown.to_string(), "credentials do not belong in the URL"));
    }
    if url.scheme() != "http" {
        return Err(invalid(base.to_owned(), "only http:// is supported"));
    }
    if url.host_str().is_none_or(str::is_empty) || url.cannot_be_a_base() {
        return Err(invalid(base.to_owned(), "no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(base.to_owned(), "a base URL has no query or fragment"));
    }
    Ok(url)
}

/// `base` with `segments` appended to its path, each percent-encoded as needed.
fn endpoint(base: &reqwest::Url, segments: &[&str]) -> reqwest::Url {
    let mut url = base.clone();
    // `parse_base` made sure the URL can have a path.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// Reads a whole answer of at most `limit` bytes, checking the declared length first.
fn read_capped(
    url: &reqwest::Url,
    resp: reqwest::blocking::Response,
    limit: u64,
) -> Result<Vec<u8>, StoreApiError> {
    let too_large = || StoreApiError::TooLarge { url: url.to_string(), limit };
    let declared = resp.content_length();
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // `declared <= limit`, so this allocation is capped.
    let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
    resp.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|source| StoreApiError::Read { url: url.to_string(), source })?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

/// The error of a non-success answer, from its `{"code", "message"}` body if it has one.
fn refusal(url: &reqwest::Url, status: reqwest::StatusCode, body: &[u8]) -> StoreApiError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { code, message }) => (code, message),
        Err(_) => (String::new(), status.canonical_reason().unwrap_or("error").to_owned()),
    };
    StoreApiError::Status {
        url: url.to_string(),
        status,
        code: one_line(&code, 64),
        message: one_line(&message, MAX_MESSAGE_LEN),
    }
}

/// What a server said, made safe to print on one line: control characters replaced, length
/// capped.
fn one_line(text: &str, max: usize) -> String {
    text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn malformed(url: &reqwest::Url, reason: &'static str) -> StoreApiError {
    StoreApiError::Malformed { url: url.to_string(), reason }
}
