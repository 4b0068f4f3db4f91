//! The store API over real HTTP: routers served on 127.0.0.1:0 in-process, driven by the
//! blocking [`StoreClient`] (on blocking threads), [`fetch_manifest`] and raw requests.

use std::convert::Infallible;

use fleetwave_chunker::cdc::chunk_stream;
use fleetwave_chunker::{
    ArtifactKind, BuildInfo, ChunkHash, ChunkerParams, Manifest, SignedManifest, SigningKey,
    TrustedKeys,
};
use fleetwave_node::store::{ChunkStore, MAX_CHUNK_LEN, MAX_MANIFEST_LEN};
use fleetwave_node::store_api::{
    MAX_MISSING_HASHES, StoreApi, StoreApiError, StoreClient, UploadAuth, fetch_manifest, router,
    spawn_server,
};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest any request of these tests may take: a hang fails the test instead of stalling it.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A signed manifest and the chunks it names, in stream order (repeats included).
struct Artifact {
    signed: SignedManifest,
    chunks: Vec<(ChunkHash, Vec<u8>)>,
}

impl Artifact {
    fn new(key: &SigningKey, version: &str, seed: u64) -> Self {
        Self::of(key, version, &pseudo_random(seed, 1 << 20))
    }

    fn of(key: &SigningKey, version: &str, data: &[u8]) -> Self {
        let params = ChunkerParams::DEFAULT;
        let mut chunks = Vec::new();
        let summary = chunk_stream(data, params, |c| {
            chunks.push((c.hash, c.data.to_vec()));
            Ok::<(), Infallible>(())
        })
        .expect("chunks");
        let manifest = Manifest::from_summary(
            "web".into(),
            version.into(),
            ArtifactKind::File,
            params,
            summary,
            BuildInfo::default(),
        )
        .expect("manifest");
        Self { signed: key.sign(manifest), chunks }
    }

    fn hashes(&self) -> Vec<ChunkHash> {
        self.chunks.iter().map(|(h, _)| *h).collect()
    }
}

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed([seed; 32])
}

fn store() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ChunkStore::open(dir.path().join("store")).expect("open store");
    (dir, store)
}

/// Serves the API on 127.0.0.1:0 on the test's runtime; returns its base URL.
async fn serve(api: StoreApi) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router(api)).await.expect("serve") });
    format!("http://{addr}")
}

/// Runs `f` with a blocking client on a blocking thread (the client has its own runtime, which
/// must not live on the test's).
async fn with_client<T, F>(url: &str, token: Option<&str>, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&StoreClient) -> T + Send + 'static,
{
    let (url, token) = (url.to_owned(), token.map(str::to_owned));
    tokio::task::spawn_blocking(move || f(&StoreClient::new(&url, token).expect("client")))
        .await
        .expect("client thread")
}

/// Uploads every chunk of `artifact` (ignoring what is already there).
fn upload_chunks(client: &StoreClient, artifact: &Artifact) -> Result<(), StoreApiError> {
    for (hash, data) in &artifact.chunks {
        client.put_chunk(hash, data)?;
    }
    Ok(())
}

fn refusal(err: &StoreApiError) -> (StatusCode, &str) {
    match err {
        StoreApiError::Status { status, code, .. } => (*status, code.as_str()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn upload_flow_moves_only_missing_chunks_then_manifest_then_ref() {
    let (_dir, store) = store();
    let key = key(1);
    let trusted = TrustedKeys::new([key.verifying_key()]);
    let url = serve(StoreApi::new(store.clone()).with_trusted(Some(trusted))).await;
    let v1 = Artifact::new(&key, "1.0.0", 1);
    let id = v1.signed.id();
    let hashes = v1.hashes();
    assert!(hashes.len() > 4, "enough chunks to split: {}", hashes.len());
    // Two chunks are already there; missing must report the others, in order.
    for (hash, data) in &v1.chunks[..2] {
        store.put(hash, data).expect("seed chunk");
    }

    let signed = v1.signed.clone();
    let chunks = v1.chunks.clone();
    let (before, lacking, after, new_flags) = with_client(&url, None, move |client| {
        let before = client.resolve_ref("web", "1.0.0").expect("resolve");
        let lacking = client.missing(&hashes).expect("missing");
        let mut new_flags = Vec::new();
        for (hash, data) in chunks.iter().filter(|(h, _)| lacking.contains(h)) {
            new_flags.push(client.put_chunk(hash, data).expect("put chunk"));
        }
        let after = client.missing(&hashes).expect("missing after");
        client.put_manifest(&signed.id(), &signed.encode()).expect("put manifest");
        client.put_manifest(&signed.id(), &signed.encode()).expect("put manifest again");
        client.set_ref("web", "1.0.0", &signed.id()).expect("set ref");
        client.set_ref("web", "1.0.0", &signed.id()).expect("set ref again (idempotent)");
        (before, lacking, after, new_flags)
    })
    .await;
    assert_eq!(before, None);
    assert_eq!(lacking, v1.hashes()[2..].to_vec(), "the unseeded chunks, in request order");
    assert!(new_flags.iter().all(|&new| new), "every missing chunk was new");
    assert!(after.is_empty(), "nothing missing after the upload: {after:?}");

    // The store holds it all, durably in its layout.
    for hash in v1.hashes() {
        store.verify(&hash).expect("chunk stored intact");
    }
    assert_eq!(store.get_manifest(&id).expect("manifest"), v1.signed.encode());
    assert_eq!(store.resolve_ref("web", "1.0.0").expect("ref"), Some(id));
    assert!(store.iter().count() <= v1.hashes().len());

    // Readers see the same, without a token.
    let fetched = fetch_manifest(&reqwest::Client::new(), &url, id).await.expect("fetch");
    assert_eq!(fetched, v1.signed);
    let resolved = with_client(&url, None, |c| c.resolve_ref("web", "1.0.0")).await;
    assert_eq!(resolved.expect("resolve"), Some(id));
}

#[tokio::test]
async fn chunk_whose_bytes_do_not_hash_to_its_address_is_422() {
    let (_dir, store) = store();
    let url = serve(StoreApi::new(store.clone())).await;
    let claimed = ChunkHash::of(b"what the client claims");
    let err = with_client(&url, None, move |c| c.put_chunk(&claimed, b"something else"))
        .await
        .expect_err("refused");
    assert_eq!(refusal(&err), (StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch"));
    assert!(!store.has(&claimed));
    assert_eq!(store.len().expect("len"), 0);
}

#[tokio::test]
async fn manifest_before_its_chunks_is_409_and_a_ref_needs_its_manifest() {
    let (_dir, store) = store();
    let url = serve(StoreApi::new(store.clone())).await;
    let v1 = Artifact::new(&key(1), "1.0.0", 2);
    let signed = v1.signed.clone();
    let chunks = v1.chunks.clone();
    let (ref_first, manifest_first, partial, complete) = with_client(&url, None, move |c| {
        let id = signed.id();
        let ref_first = c.set_ref("web", "1.0.0", &id).expect_err("no manifest yet");
        let manifest_first = c.put_manifest(&id, &signed.encode()).expect_err("no chunks yet");
        c.put_chunk(&chunks[0].0, &chunks[0].1).expect("one chunk");
        let partial = c.put_manifest(&id, &signed.encode()).expect_err("still missing");
        upload_chunks(c, &Artifact { signed: signed.clone(), chunks }).expect("all chunks");
        let complete = c.put_manifest(&id, &signed.encode());
        (ref_first, manifest_first, partial, complete)
    })
    .await;
    assert_eq!(refusal(&ref_first), (StatusCode::CONFLICT, "manifest_missing"));
    assert_eq!(refusal(&manifest_first), (StatusCode::CONFLICT, "chunks_missing"));
    let distinct = v1.signed.manifest().unique_chunks().len();
    match &manifest_first {
        StoreApiError::Status { message, .. } => {
            assert!(message.contains(&format!("{distinct} of its {distinct} chunks")), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(refusal(&partial), (StatusCode::CONFLICT, "chunks_missing"));
    complete.expect("accepted once the chunks are there");
    assert!(store.has_manifest(&v1.signed.id()));
    assert_eq!(store.resolve_ref("web", "1.0.0").expect("ref"), None);
}

#[tokio::test]
async fn published_versions_are_immutable() {
    let (_dir, store) = store();
    let url = serve(StoreApi::new(store.clone())).await;
    let key = key(1);
    let first = Artifact::new(&key, "1.0.0", 3);
    let second = Artifact::new(&key, "1.0.0", 4);
    let other_version = Artifact::new(&key, "1.0.1", 5);
    let (a, b, c) = (first.signed.clone(), second.signed.clone(), other_version.signed.clone());
    let first_id = a.id();
    let (conflict, mismatch, again) = with_client(&url, None, move |client| {
        for artifact in [&first, &second, &other_version] {
            upload_chunks(client, artifact).expect("chunks");
            let signed = &artifact.signed;
            client.put_manifest(&signed.id(), &signed.encode()).expect("manifest");
        }
        client.set_ref("web", "1.0.0", &a.id()).expect("first ref");
        let conflict = client.set_ref("web", "1.0.0", &b.id()).expect_err("immutable");
        let mismatch = client.set_ref("web", "1.0.0-x", &c.id()).expect_err("wrong version");
        let again = client.set_ref("web", "1.0.0", &a.id());
        (conflict, mismatch, again)
    })
    .await;
    assert_eq!(refusal(&conflict), (StatusCode::CONFLICT, "ref_exists"));
    assert_eq!(refusal(&mismatch), (StatusCode::UNPROCESSABLE_ENTITY, "ref_mismatch"));
    again.expect("the same id again is fine");
    assert_eq!(store.resolve_ref("web", "1.0.0").expect("ref"), Some(first_id));
    assert_eq!(store.resolve_ref("web", "1.0.0-x").expect("ref"), None);
}

#[tokio::test]
async fn writes_need_the_upload_token_and_reads_do_not() {
    let (_dir, store) = store();
    let auth = UploadAuth::new("s3cret-token").expect("token");
    let url = serve(StoreApi::new(store.clone()).with_upload_auth(Some(auth))).await;
    let v1 = Artifact::new(&key(1), "1.0.0", 6);
    let hashes = v1.hashes();

    let (hash, data) = v1.chunks[0].clone();
    let (h, d) = (hash, data.clone());
    let none = with_client(&url, None, move |c| c.put_chunk(&h, &d)).await.expect_err("no token");
    let (h, d) = (hash, data.clone());
    let wrong = with_client(&url, Some("guess"), move |c| c.put_chunk(&h, &d)).await;
    let query = with_client(&url, None, move |c| c.missing(&hashes)).await.expect_err("no token");
    assert_eq!(refusal(&none), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(
        refusal(&wrong.expect_err("wrong token")),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    assert_eq!(refusal(&query), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(store.len().expect("len"), 0, "nothing written without the token");

    // The token's holder may write; anyone may read.
    let signed = v1.signed.clone();
    with_client(&url, Some("s3cret-token"), move |c| {
        upload_chunks(c, &v1)?;
        c.put_manifest(&signed.id(), &signed.encode())?;
        c.set_ref("web", "1.0.0", &signed.id())
    })
    .await
    .expect("upload with the token");
    let resolved = with_client(&url, None, |c| c.resolve_ref("web", "1.0.0")).await;
    let id = resolved.expect("open read").expect("published");
    fetch_manifest(&reqwest::Client::new(), &url, id).await.expect("open read");

    // The 401 names its scheme.
    let resp = reqwest::Client::new()
        .put(format!("{url}/v1/chunks/{hash}"))
        .body(data)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn an_unusable_token_refuses_every_write_and_read_only_refuses_too() {
    let (_dir, store) = store();
    let hash = ChunkHash::of(b"x");
    let url = serve(StoreApi::new(store.clone()).with_upload_token(Some(String::new()))).await;
    let err = with_client(&url, Some(""), move |c| c.put_chunk(&hash, b"x")).await.expect_err("");
    assert_eq!(refusal(&err), (StatusCode::UNAUTHORIZED, "unauthorized"));

    let url = serve(StoreApi::new(store.clone()).read_only(true)).await;
    let err = with_client(&url, None, move |c| c.put_chunk(&hash, b"x")).await.expect_err("ro");
    assert_eq!(refusal(&err), (StatusCode::FORBIDDEN, "read_only"));
    assert!(!store.has(&hash));
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let (_dir, store) = store();
    let url = serve(StoreApi::new(store.clone())).await;
    let http = reqwest::Client::builder().timeout(TIMEOUT).build().expect("client");
    let error_code = |resp: reqwest::Response| async move {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("json error");
        (status, body["code"].as_str().expect("code").to_owned())
    };

    // Too many hashes for one query, by declared length.
    let body = vec![0u8; (MAX_MISSING_HASHES + 1) * 32];
    let resp = http.post(format!("{url}/v1/chunks/missing")).body(body).send().await.expect("send");
    assert_eq!(error_code(resp).await, (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".into()));
    // The cap itself is accepted.
    let body = vec![0u8; MAX_MISSING_HASHES * 32];
    let resp = http.post(format!("{url}/v1/chunks/missing")).body(body).send().await.expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.expect("body").len(), MAX_MISSING_HASHES * 32);
    // Not a whole number of hashes.
    let resp = http.post(format!("{url}/v1/chunks/missing")).body(vec![0u8; 33]).send().await;
    assert_eq!(
        error_code(resp.expect("send")).await,
        (StatusCode::BAD_REQUEST, "invalid_body".into())
    );

    // A chunk and a manifest one byte over their limits.
    let chunk = vec![7u8; MAX_CHUNK_LEN + 1];
    let hash = ChunkHash::of(&chunk);
    let resp = http.put(format!("{url}/v1/chunks/{hash}")).body(chunk).send().await.expect("send");
    assert_eq!(error_code(resp).await, (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".into()));
    let id = Artifact::new(&key(1), "1.0.0", 7).signed.id();
    let manifest = vec![0u8; MAX_MANIFEST_LEN + 1];
    let resp = http.put(format!("{url}/v1/manifests/{id}")).body(manifest).send().await;
    let resp = resp.expect("send");
    assert_eq!(error_code(resp).await, (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".into()));
    assert_eq!(store.len().expect("len"), 0);

    // A body with no declared length is counted as it arrives.
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/chunks/missing HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
         transfer-encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    let frame =
        [format!("{:x}\r\n", 64 * 1024).into_bytes(), vec![0u8; 64 * 1024], b"\r\n".to_vec()]
            .concat();
    for _ in 0..(MAX_MISSING_HASHES * 32 / (64 * 1024) + 1) {
        // The server may answer and stop reading before the last frame.
        if conn.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, conn.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within {TIMEOUT:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}

#[tokio::test]
async fn untrusted_or_mislabelled_manifests_are_refused() {
    let (_dir, store) = store();
    let trusted = TrustedKeys::new([key(1).verifying_key()]);
    let url = serve(StoreApi::new(store.clone()).with_trusted(Some(trusted))).await;
    let forged = Artifact::new(&key(2), "1.0.0", 8);
    let other = Artifact::new(&key(1), "1.0.1", 9);
    let (untrusted, wrong_id, bad_path) = with_client(&url, None, move |c| {
        upload_chunks(c, &forged).expect("chunks");
        let untrusted = c.put_manifest(&forged.signed.id(), &forged.signed.encode());
        // Bytes of one manifest under another's id.
        let wrong_id = c.put_manifest(&other.signed.id(), &forged.signed.encode());
        let bad_path = c.resolve_ref("web", ".hidden");
        (untrusted, wrong_id, bad_path)
    })
    .await;
    let untrusted = untrusted.expect_err("untrusted");
    assert_eq!(refusal(&untrusted), (StatusCode::UNPROCESSABLE_ENTITY, "untrusted_manifest"));
    let wrong_id = wrong_id.expect_err("id mismatch");
    assert_eq!(refusal(&wrong_id), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_manifest"));
    assert_eq!(
        refusal(&bad_path.expect_err("bad name")),
        (StatusCode::BAD_REQUEST, "invalid_name")
    );
    assert!(store.list_manifests().expect("list").is_empty());

    let resp = reqwest::get(format!("{url}/v1/manifests/not-hex")).await.expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = reqwest::Client::new().delete(format!("{url}/v1/chunks/missing")).send().await;
    assert_eq!(resp.expect("send").status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn cache_pulls_manifests_through_from_its_upstream() {
    let (_origin_dir, origin_store) = store();
    let (_cache_dir, cache_store) = store();
    let key = key(1);
    let origin = serve(StoreApi::new(origin_store.clone())).await;
    let cache = serve(
        StoreApi::new(cache_store.clone())
            .with_upstream(Some(origin.clone()))
            .with_trusted(Some(TrustedKeys::new([key.verifying_key()])))
            .read_only(true),
    )
    .await;
    let v1 = Artifact::new(&key, "1.0.0", 10);
    let id = v1.signed.id();
    let signed = v1.signed.clone();
    with_client(&origin, None, move |c| {
        upload_chunks(c, &v1)?;
        c.put_manifest(&signed.id(), &signed.encode())
    })
    .await
    .expect("publish to the origin");

    let http = reqwest::Client::new();
    assert!(!cache_store.has_manifest(&id));
    let pulled = fetch_manifest(&http, &cache, id).await.expect("pulled through");
    assert_eq!(pulled.id(), id);
    assert!(cache_store.has_manifest(&id), "the cache keeps what it pulled");
    // Served from the cache's own store from now on, even with the upstream gone.
    origin_store.remove_manifest(&id).expect("remove at origin");
    assert_eq!(fetch_manifest(&http, &cache, id).await.expect("cached"), pulled);

    // Unknown everywhere: 404 passed on.
    let unknown = Artifact::new(&key, "9.9.9", 11).signed.id();
    let err = fetch_manifest(&http, &cache, unknown).await.expect_err("unknown");
    assert_eq!(refusal(&err), (StatusCode::NOT_FOUND, "manifest_not_found"));

    // A manifest the cache does not trust is not stored nor served.
    let (_dir, strict_store) = store();
    let strict = serve(
        StoreApi::new(strict_store.clone())
            .with_upstream(Some(cache.clone()))
            .with_trusted(Some(TrustedKeys::new([self::key(2).verifying_key()]))),
    )
    .await;
    let err = fetch_manifest(&http, &strict, id).await.expect_err("untrusted upstream manifest");
    assert_eq!(refusal(&err), (StatusCode::BAD_GATEWAY, "upstream_failed"));
    assert!(!strict_store.has_manifest(&id));
}

#[test]
fn background_server_serves_until_shut_down() {
    let (_dir, store) = store();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = spawn_server(listener, StoreApi::new(store)).expect("spawn");
    let client = StoreClient::new(&server.url(), None).expect("client");
    assert_eq!(client.resolve_ref("web", "1.0.0").expect("resolve"), None);
    server.shutdown().expect("shutdown");
    let err = client.resolve_ref("web", "1.0.0").expect_err("server gone");
    assert!(matches!(err, StoreApiError::Request { .. }), "{err:?}");
}

#[test]
fn client_refuses_unusable_urls_and_redacts_its_token() {
    for url in ["https://origin:8080", "origin:8080", "http://user:pw@origin:8080", "http://"] {
        let err = StoreClient::new(url, None).expect_err(url);
        assert!(matches!(err, StoreApiError::InvalidUrl { .. }), "{url}: {err:?}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }
    let client = StoreClient::new("http://origin:8080/prefix/", Some("s3cret".into())).expect("ok");
    assert!(!format!("{client:?}").contains("s3cret"));
    assert!(!format!("{:?}", UploadAuth::new("s3cret").expect("token")).contains("s3cret"));
}
