//! A tiny stand-in for the Hugging Face Hub on 127.0.0.1, answering the requests hf-hub 0.5's
//! sync API makes (read from its source):
//! - `GET /api/models/{owner}/{name}/revision/{rev}` → `{"sha", "siblings": [{"rfilename"}]}`;
//!   with `?blobs=true` each sibling also has its `size`, as on the real Hub (unless the hub was
//!   started without sizes, to test the fallback); 404 with `X-Error-Code: RepoNotFound` /
//!   `RevisionNotFound` like the Hub.
//! - `GET|HEAD /{owner}/{name}/resolve/{rev}/{path}` with `Range: bytes=0-0` (metadata) or
//!   `bytes=N-` (download): small files answer 206 with `ETag`, `X-Repo-Commit` and
//!   `Content-Range`; large-file-storage files (`.safetensors`, `.bin`) answer 302 to
//!   `{cdn}/cdn/{etag}` with `X-Linked-Etag`, `X-Linked-Size` and `X-Repo-Commit`, as the Hub
//!   redirects to its CDN.
//! - The CDN is a second server (another origin, as on the real Hub, so clients must not expect
//!   Hub headers there): `GET /cdn/{etag}` with Range support.
//!
//! - Datasets the same way under `/api/datasets/{owner}/{name}/...` and
//!   `/datasets/{owner}/{name}/resolve/...`: a dataset repo is a [`FakeRepo`] whose `repo_id` is
//!   `datasets/owner/name`. Parquet files are large-file-storage files, as on the Hub.
//!
//! Private repos answer 401 unless `Authorization: Bearer <token>` matches. Every request is
//! logged so tests can check what was (not) downloaded. CDN bodies can be slowed down
//! ([`FakeHub::set_cdn_delay`]) so a test can act in the middle of a download; every request is
//! answered on its own thread, so a slow body never holds up the next request.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

/// One repo served by the fake Hub.
#[derive(Clone, Debug)]
pub struct FakeRepo {
    /// `owner/name`.
    pub repo_id: String,
    /// The commit hash `main` points to.
    pub sha: String,
    /// Repo-relative path → content.
    pub files: BTreeMap<String, Vec<u8>>,
    /// When set, requests without `Authorization: Bearer <token>` get 401.
    pub token: Option<String>,
}

impl FakeRepo {
    /// A public repo serving every file under `folder` (links followed), e.g. a fixture pipeline.
    pub fn from_folder(repo_id: &str, sha: &str, folder: &std::path::Path) -> FakeRepo {
        fn walk(dir: &std::path::Path, prefix: &str, files: &mut BTreeMap<String, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).expect("read fixture folder") {
                let entry = entry.expect("fixture entry");
                let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                if entry.path().is_dir() {
                    walk(&entry.path(), &format!("{name}/"), files);
                } else {
                    files.insert(
                        name,
                        std::fs::read(entry.path()).expect("read fixture file"),
                    );
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(folder, "", &mut files);
        FakeRepo {
            repo_id: repo_id.to_string(),
            sha: sha.to_string(),
            files,
            token: None,
        }
    }
}

/// A running fake Hub; stops when dropped.
pub struct FakeHub {
    servers: Vec<Arc<Server>>,
    threads: Vec<JoinHandle<()>>,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Microseconds slept before each `CDN_CHUNK` bytes of a CDN body; 0 is full speed.
    cdn_delay_us: Arc<AtomicU64>,
}

/// Bytes a slowed CDN body sends per delay.
const CDN_CHUNK: usize = 16 * 1024;

/// A response body read slowly: `CDN_CHUNK` bytes per delay (read at each read, so a test can
/// speed a body up mid-way).
struct Slowed<R> {
    inner: R,
    delay_us: Arc<AtomicU64>,
}

impl<R: Read> Read for Slowed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let delay = self.delay_us.load(Ordering::Relaxed);
        if delay == 0 {
            return self.inner.read(buf);
        }
        std::thread::sleep(Duration::from_micros(delay));
        let len = buf.len().min(CDN_CHUNK);
        self.inner.read(&mut buf[..len])
    }
}

/// A content hash standing in for the Hub's git/LFS hashes (SipHash with fixed keys is
/// deterministic): unique enough to name blobs in a test cache.
pub fn content_etag(content: &[u8]) -> String {
    let mut parts = String::new();
    for salt in 0u8..4 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut hasher);
        content.hash(&mut hasher);
        parts.push_str(&format!("{:016x}", hasher.finish()));
    }
    parts
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors") || path.ends_with(".bin") || path.ends_with(".parquet")
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn request_header<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Answers a body, honouring `Range: bytes=S-` / `bytes=S-E` with 206 and `Content-Range`.
fn ranged(
    request: &Request,
    body: &[u8],
    extra: Vec<Header>,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let total = body.len();
    let range = request_header(request, "Range").and_then(|r| {
        let spec = r.strip_prefix("bytes=")?;
        let (start, end) = spec.split_once('-')?;
        let start: usize = start.parse().ok()?;
        let end: usize = if end.is_empty() {
            total.saturating_sub(1)
        } else {
            end.parse::<usize>().ok()?.min(total.saturating_sub(1))
        };
        Some((start, end))
    });
    let mut response = match range {
        Some((start, end)) if start <= end && end < total => {
            Response::from_data(body[start..=end].to_vec())
                .with_status_code(StatusCode(206))
                .with_header(header(
                    "Content-Range",
                    &format!("bytes {start}-{end}/{total}"),
                ))
        }
        Some((start, _)) if start >= total && total > 0 => Response::from_data(Vec::new())
            .with_status_code(StatusCode(416))
            .with_header(header("Content-Range", &format!("bytes */{total}"))),
        _ => Response::from_data(body.to_vec()),
    };
    for h in extra {
        response.add_header(h);
    }
    response
}

fn error(status: u16, code: &str, message: &str) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut response = Response::from_data(format!("{{\"error\":\"{message}\"}}").into_bytes())
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", "application/json"));
    if !code.is_empty() {
        response.add_header(header("X-Error-Code", code));
    }
    response
}

impl FakeHub {
    /// Hub settings that download from this fake Hub into `cache_dir`, online, without a token.
    pub fn settings(
        &self,
        cache_dir: &std::path::Path,
    ) -> instruct_pix2pix::model::hub::HubSettings {
        instruct_pix2pix::model::hub::HubSettings {
            endpoint: self.endpoint.clone(),
            cache_dir: cache_dir.to_path_buf(),
            token: None,
            offline: false,
        }
    }

    /// Starts serving `repos` on a free port (and the CDN on another).
    pub fn start(repos: Vec<FakeRepo>) -> FakeHub {
        Self::start_with(repos, true)
    }

    /// [`FakeHub::start`]; `listing_sizes: false` leaves `size` out of `?blobs=true` listings.
    pub fn start_with(repos: Vec<FakeRepo>, listing_sizes: bool) -> FakeHub {
        let bind = || Arc::new(Server::http("127.0.0.1:0").expect("bind 127.0.0.1"));
        let address = |server: &Server| {
            let port = server.server_addr().to_ip().expect("an IP listener").port();
            format!("http://127.0.0.1:{port}")
        };
        let (hub, cdn) = (bind(), bind());
        let endpoint = address(&hub);
        let cdn_endpoint = address(&cdn);
        let log = Arc::new(Mutex::new(Vec::new()));
        let repos = Arc::new(repos);
        let cdn_delay_us = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (server, is_cdn) in [(Arc::clone(&hub), false), (Arc::clone(&cdn), true)] {
            let log = Arc::clone(&log);
            let repos = Arc::clone(&repos);
            let cdn_endpoint = cdn_endpoint.clone();
            let cdn_delay_us = Arc::clone(&cdn_delay_us);
            threads.push(std::thread::spawn(move || {
                // `recv` fails once `unblock` is called on drop.
                while let Ok(request) = server.recv() {
                    // CDN entries carry the Range asked for: "CDN GET /cdn/x bytes=0-".
                    let entry = if is_cdn {
                        let range = request_header(&request, "Range").unwrap_or("-");
                        format!("CDN {} {} {range}", request.method(), request.url())
                    } else {
                        format!("{} {}", request.method(), request.url())
                    };
                    log.lock().expect("log lock").push(entry);
                    let response = if is_cdn {
                        answer_cdn(&repos, &request)
                    } else {
                        answer(&repos, &cdn_endpoint, &request, listing_sizes)
                    };
                    let delay_us = Arc::clone(&cdn_delay_us);
                    std::thread::spawn(move || {
                        if is_cdn {
                            let status = response.status_code();
                            let headers = response.headers().to_vec();
                            let length = response.data_length();
                            let body = Slowed {
                                inner: response.into_reader(),
                                delay_us,
                            };
                            let slowed = Response::new(status, headers, body, length, None);
                            let _ = request.respond(slowed);
                        } else {
                            let _ = request.respond(response);
                        }
                    });
                }
            }));
        }
        FakeHub {
            servers: vec![hub, cdn],
            threads,
            endpoint,
            log,
            cdn_delay_us,
        }
    }

    /// Slows CDN bodies (the large weight files) to 16 KiB per `delay`; zero is full speed.
    /// Takes effect at once, also in bodies being sent.
    pub fn set_cdn_delay(&self, delay: Duration) {
        self.cdn_delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Every request so far, as `"GET /path"` (`"CDN GET /cdn/etag bytes=N-"` for the CDN).
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_log(&self) {
        self.log.lock().expect("log lock").clear();
    }

    /// The repo-relative files asked for through `/resolve/` (metadata or content), in order.
    pub fn resolved_files(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|r| {
                let (_, path) = r.split_once(' ')?;
                let rest = path.split_once("/resolve/")?.1;
                Some(rest.split_once('/')?.1.to_string())
            })
            .collect()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        for server in &self.servers {
            server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The CDN: blobs by etag, no Hub headers.
fn answer_cdn(repos: &[FakeRepo], request: &Request) -> Response<std::io::Cursor<Vec<u8>>> {
    let url = request.url().split('?').next().unwrap_or("");
    let blob = url.strip_prefix("/cdn/").and_then(|etag| {
        repos
            .iter()
            .flat_map(|r| r.files.values())
            .find(|content| content_etag(content) == etag)
    });
    match blob {
        Some(content) if matches!(request.method(), Method::Get | Method::Head) => {
            ranged(request, content, Vec::new())
        }
        Some(_) => error(405, "", "method not allowed"),
        None => error(404, "", "no such blob"),
    }
}

/// The Hub: repo listings and `/resolve/`; large files redirect to `cdn`.
fn answer(
    repos: &[FakeRepo],
    cdn: &str,
    request: &Request,
    listing_sizes: bool,
) -> Response<std::io::Cursor<Vec<u8>>> {
    if !matches!(request.method(), Method::Get | Method::Head) {
        return error(405, "", "method not allowed");
    }
    let url = request.url().split('?').next().unwrap_or("").to_string();
    let authorized = |repo: &FakeRepo| match &repo.token {
        None => true,
        Some(token) => request_header(request, "Authorization") == Some(&format!("Bearer {token}")),
    };

    let api = url
        .strip_prefix("/api/models/")
        .map(|rest| ("", rest))
        .or_else(|| {
            url.strip_prefix("/api/datasets/")
                .map(|rest| ("datasets/", rest))
        });
    if let Some((kind, rest)) = api {
        // owner/name/revision/rev (a branch name may be %2F-escaped)
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let [owner, name, "revision", revision] = parts.as_slice() else {
            return error(404, "", "bad API path");
        };
        let repo_id = format!("{kind}{owner}/{name}");
        let Some(repo) = repos.iter().find(|r| r.repo_id == repo_id) else {
            return error(404, "RepoNotFound", "Repository not found");
        };
        if !authorized(repo) {
            return error(401, "", "Invalid credentials in Authorization header");
        }
        if *revision != "main" && *revision != repo.sha {
            return error(404, "RevisionNotFound", "Invalid rev id");
        }
        let with_sizes = listing_sizes && request.url().contains("blobs=true");
        let siblings: Vec<String> = repo
            .files
            .iter()
            .map(|(f, content)| {
                if with_sizes {
                    format!("{{\"rfilename\":\"{f}\",\"size\":{}}}", content.len())
                } else {
                    format!("{{\"rfilename\":\"{f}\"}}")
                }
            })
            .collect();
        let body = format!(
            "{{\"id\":\"{}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
            repo_id.trim_start_matches("datasets/"),
            repo.sha,
            siblings.join(",")
        );
        return Response::from_data(body.into_bytes())
            .with_header(header("Content-Type", "application/json"));
    }

    // /owner/name/resolve/rev/path... (or /datasets/owner/name/resolve/...)
    let (kind, rest) = match url.strip_prefix("/datasets/") {
        Some(rest) => ("datasets/", rest),
        None => ("", url.trim_start_matches('/')),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    let [owner, name, "resolve", revision, path] = parts.as_slice() else {
        return error(404, "", "not found");
    };
    let repo_id = format!("{kind}{owner}/{name}");
    let Some(repo) = repos.iter().find(|r| r.repo_id == repo_id) else {
        return error(404, "RepoNotFound", "Repository not found");
    };
    if !authorized(repo) {
        return error(401, "", "Invalid credentials in Authorization header");
    }
    if *revision != "main" && *revision != repo.sha {
        return error(404, "RevisionNotFound", "Invalid rev id");
    }
    let Some(content) = repo.files.get(*path) else {
        return error(404, "EntryNotFound", "Entry not found");
    };
    let etag = content_etag(content);
    if is_lfs(path) {
        Response::from_data(Vec::new())
            .with_status_code(StatusCode(302))
            .with_header(header("Location", &format!("{cdn}/cdn/{etag}")))
            .with_header(header("X-Repo-Commit", &repo.sha))
            .with_header(header("X-Linked-Etag", &format!("\"{etag}\"")))
            .with_header(header("X-Linked-Size", &content.len().to_string()))
            .with_header(header("ETag", "\"git-pointer-etag\""))
    } else {
        ranged(
            request,
            content,
            vec![
                header("ETag", &format!("\"{etag}\"")),
                header("X-Repo-Commit", &repo.sha),
            ],
        )
    }
}
