//! A tiny stand-in for the Hugging Face Hub on 127.0.0.1, answering the requests huggingface_hub
//! (and this program) makes:
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
//! Downloads can be made to misbehave ([`FakeHub::set_fault`]): large files then come from a
//! third server written on raw TCP (so a connection can stall or be cut exactly where a test
//! says), which stalls, drops the connection once, corrupts a byte, or sends at a set pace.
//! Small files can carry git blob ids as etags, as on the Hub ([`FakeHub::set_git_etags`]).
//!
//! Uploads as huggingface_hub's `upload_folder` makes them, for a user with a write token
//! ([`FakeHub::set_write_token`]; a read token, [`FakeHub::add_read_token`], gets 403):
//! `GET /api/whoami-v2` (the user and the token's role), `POST /api/repos/create` (409 for a repo
//! that exists), `POST /api/models/{repo}/preupload/main` (`.safetensors`/`.bin`/`.parquet` and
//! files over 10 MB are LFS), `POST /{repo}.git/info/lfs/objects/batch` handing out `PUT
//! /lfs-upload/{oid}` addresses (which check the bytes' SHA-256 and the action's header) and a
//! `verify` call, and `POST /api/models/{repo}/commit/main` (NDJSON; LFS files must have been
//! uploaded). LFS uploads can be made to fail with 503 ([`FakeHub::fail_lfs_puts`]). What was
//! received is kept: [`FakeHub::commits`] (every file's bytes),
//! [`FakeHub::created_repos`], [`FakeHub::lfs_uploads`].
//!
//! Private repos answer 401 unless `Authorization: Bearer <token>` matches. Every request is
//! logged so tests can check what was (not) downloaded. CDN bodies can be slowed down
//! ([`FakeHub::set_cdn_delay`]) so a test can act in the middle of a download; every request is
//! answered on its own thread, so a slow body never holds up the next request.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// How the fake Hub's downloads misbehave ([`FakeHub::set_fault`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Fault {
    /// Downloads behave.
    #[default]
    None,
    /// Large-file bodies stop at this byte of the file and keep the connection open, silent.
    StallAt(usize),
    /// The first large-file body to reach this byte of the file closes the connection there;
    /// later requests get their whole range.
    DropOnceAt(usize),
    /// Large-file requests get the whole file (200, the range ignored), always cut at this byte.
    IgnoreRangeDropAt(usize),
    /// Large-file bodies carry one wrong byte (in the middle of the file).
    CorruptLarge,
    /// Small files served by the Hub carry one wrong byte (their first).
    CorruptSmall,
    /// Large-file bodies come `bytes` at a time, `every` apart.
    Pace {
        /// Bytes per write.
        bytes: usize,
        /// The pause after each write.
        every: Duration,
    },
}

/// A commit the fake Hub received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedCommit {
    /// `owner/name`.
    pub repo_id: String,
    /// The header's summary.
    pub summary: String,
    /// Path in the repo → bytes (small files decoded from base64, LFS files from their upload).
    pub files: BTreeMap<String, Vec<u8>>,
}

/// What uploads did to the fake Hub.
#[derive(Default)]
struct Writes {
    /// `(token, user, role)`: tokens the Hub knows; only `write` ones may write.
    tokens: Vec<(String, String, &'static str)>,
    /// Repos created through the API, in order.
    created: Vec<String>,
    /// LFS objects by SHA-256.
    lfs: BTreeMap<String, Vec<u8>>,
    /// Oids of the LFS `PUT`s, in order.
    lfs_puts: Vec<String>,
    /// Commits, in order.
    commits: Vec<ReceivedCommit>,
    /// LFS `PUT`s still to answer 503 (after reading their body).
    failing_puts: usize,
}

/// The header an LFS upload action carries and its `PUT` must send back.
const UPLOAD_HEADER: (&str, &str) = ("X-Fake-Upload-Ticket", "ticket-7");

/// A running fake Hub; stops when dropped.
pub struct FakeHub {
    servers: Vec<Arc<Server>>,
    threads: Vec<JoinHandle<()>>,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// `127.0.0.1:PORT` of the raw server that serves large files while a fault is set.
    pub faulty_cdn_host: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Microseconds slept before each `CDN_CHUNK` bytes of a CDN body; 0 is full speed.
    cdn_delay_us: Arc<AtomicU64>,
    fault: Arc<Mutex<Fault>>,
    git_etags: Arc<AtomicBool>,
    /// Set on drop: the raw server and its stalled connections end.
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Writes>>,
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

/// The etag the fake Hub gives a file: its SHA-256, as the Hub gives large (LFS) files, also for
/// small files unless the hub serves git etags ([`FakeHub::start_with_git_etags`]).
pub fn content_etag(content: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, content).as_ref())
}

/// The Hub's etag of a small (non-LFS) file: its git blob id, SHA-1 of `blob <len>\0` and the
/// bytes.
pub fn git_blob_etag(content: &[u8]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    context.update(format!("blob {}\0", content.len()).as_bytes());
    context.update(content);
    hex(context.finish().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        let fault = Arc::new(Mutex::new(Fault::None));
        let git_etags = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Writes::default()));
        let raw = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let faulty_cdn_host = raw.local_addr().expect("raw address").to_string();
        let faulty_cdn = format!("http://{faulty_cdn_host}");
        let mut threads = Vec::new();
        {
            let raw_cdn = RawCdn {
                repos: Arc::clone(&repos),
                log: Arc::clone(&log),
                fault: Arc::clone(&fault),
                dropped: Arc::new(AtomicBool::new(false)),
                stop: Arc::clone(&stop),
            };
            threads.push(std::thread::spawn(move || raw_cdn.serve(raw)));
        }
        for (server, is_cdn) in [(Arc::clone(&hub), false), (Arc::clone(&cdn), true)] {
            let log = Arc::clone(&log);
            let repos = Arc::clone(&repos);
            let cdn_delay_us = Arc::clone(&cdn_delay_us);
            let fault = Arc::clone(&fault);
            let git_etags = Arc::clone(&git_etags);
            let writes = Arc::clone(&writes);
            let hub_endpoint = endpoint.clone();
            let (cdn_endpoint, faulty_cdn) = (cdn_endpoint.clone(), faulty_cdn.clone());
            threads.push(std::thread::spawn(move || {
                // `recv` fails once `unblock` is called on drop.
                while let Ok(mut request) = server.recv() {
                    // CDN entries carry the Range asked for: "CDN GET /cdn/x bytes=0-".
                    let entry = if is_cdn {
                        let range = request_header(&request, "Range").unwrap_or("-");
                        format!("CDN {} {} {range}", request.method(), request.url())
                    } else {
                        format!("{} {}", request.method(), request.url())
                    };
                    log.lock().expect("log lock").push(entry);
                    let is_write = !is_cdn
                        && (matches!(request.method(), Method::Post | Method::Put)
                            || request.url() == "/api/whoami-v2");
                    let response = if is_cdn {
                        answer_cdn(&repos, &request)
                    } else if is_write {
                        let mut body = Vec::new();
                        let read = request.as_reader().take(256 << 20).read_to_end(&mut body);
                        match read {
                            Ok(_) => answer_write(&repos, &writes, &hub_endpoint, &request, &body),
                            Err(_) => error(400, "", "unreadable body"),
                        }
                    } else {
                        let fault = fault.lock().expect("fault lock").clone();
                        let options = Options {
                            cdn: if fault == Fault::None {
                                &cdn_endpoint
                            } else {
                                &faulty_cdn
                            },
                            listing_sizes,
                            git_etags: git_etags.load(Ordering::Relaxed),
                            corrupt_small: fault == Fault::CorruptSmall,
                        };
                        answer(&repos, &request, &options)
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
            faulty_cdn_host,
            log,
            cdn_delay_us,
            fault,
            git_etags,
            stop,
            writes,
        }
    }

    /// Lets `token` write as `user`: create repos under `user` and commit to them.
    pub fn set_write_token(&self, token: &str, user: &str) {
        self.writes.lock().expect("writes lock").tokens.push((
            token.to_string(),
            user.to_string(),
            "write",
        ));
    }

    /// Makes `token` a read-only token of `user`: whoami answers, writes get 403.
    pub fn add_read_token(&self, token: &str, user: &str) {
        self.writes.lock().expect("writes lock").tokens.push((
            token.to_string(),
            user.to_string(),
            "read",
        ));
    }

    /// The next `count` LFS uploads answer 503 Service Unavailable.
    pub fn fail_lfs_puts(&self, count: usize) {
        self.writes.lock().expect("writes lock").failing_puts = count;
    }

    /// The commits received so far.
    pub fn commits(&self) -> Vec<ReceivedCommit> {
        self.writes.lock().expect("writes lock").commits.clone()
    }

    /// The repos created through the API so far.
    pub fn created_repos(&self) -> Vec<String> {
        self.writes.lock().expect("writes lock").created.clone()
    }

    /// The oids of the LFS uploads (`PUT`s that were accepted) so far.
    pub fn lfs_uploads(&self) -> Vec<String> {
        self.writes.lock().expect("writes lock").lfs_puts.clone()
    }

    /// Makes the downloads that start from now on misbehave as `fault` says.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
    }

    /// Small files get their git blob id ([`git_blob_etag`]) as etag, as on the Hub, instead of
    /// their SHA-256.
    pub fn set_git_etags(&self, on: bool) {
        self.git_etags.store(on, Ordering::Relaxed);
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
        self.stop.store(true, Ordering::Relaxed);
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

/// How the Hub answers, beyond the repos.
struct Options<'a> {
    /// Where large files redirect to.
    cdn: &'a str,
    /// Whether `?blobs=true` listings carry sizes.
    listing_sizes: bool,
    /// Small files' etags are git blob ids (else SHA-256).
    git_etags: bool,
    /// Small files' first byte is flipped.
    corrupt_small: bool,
}

/// The Hub: repo listings and `/resolve/`; large files redirect to `options.cdn`.
fn answer(
    repos: &[FakeRepo],
    request: &Request,
    options: &Options,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let (cdn, listing_sizes) = (options.cdn, options.listing_sizes);
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
        let etag = if options.git_etags {
            git_blob_etag(content)
        } else {
            etag
        };
        let mut body = content.clone();
        if options.corrupt_small
            && let Some(first) = body.first_mut()
        {
            *first ^= 0xff;
        }
        ranged(
            request,
            &body,
            vec![
                header("ETag", &format!("\"{etag}\"")),
                header("X-Repo-Commit", &repo.sha),
            ],
        )
    }
}

/// Decodes standard base64 (with padding); `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for quad in bytes.chunks(4) {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

fn json_response(value: serde_json::Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(value.to_string().into_bytes())
        .with_header(header("Content-Type", "application/json"))
}

/// Uploads: whoami, repo creation, preupload, LFS batch / PUT / verify, commit.
fn answer_write(
    repos: &[FakeRepo],
    writes: &Mutex<Writes>,
    endpoint: &str,
    request: &Request,
    body: &[u8],
) -> Response<std::io::Cursor<Vec<u8>>> {
    use serde_json::{Value, json};
    let url = request.url().split('?').next().unwrap_or("").to_string();
    let mut writes = writes.lock().expect("writes lock");

    // The storage PUT carries the action's header, not the token (as a presigned URL).
    if let Some(oid) = url.strip_prefix("/lfs-upload/") {
        if *request.method() != Method::Put {
            return error(405, "", "method not allowed");
        }
        if request_header(request, UPLOAD_HEADER.0) != Some(UPLOAD_HEADER.1) {
            return error(403, "", "missing upload ticket");
        }
        if content_etag(body) != oid {
            return error(400, "", "the bytes do not match the oid");
        }
        if writes.failing_puts > 0 {
            writes.failing_puts -= 1;
            return error(503, "", "storage is busy");
        }
        writes.lfs.insert(oid.to_string(), body.to_vec());
        writes.lfs_puts.push(oid.to_string());
        return Response::from_data(Vec::new());
    }

    let sent = request_header(request, "Authorization").and_then(|a| a.strip_prefix("Bearer "));
    let Some((_, user, role)) = writes
        .tokens
        .iter()
        .find(|(token, _, _)| Some(token.as_str()) == sent)
        .cloned()
    else {
        return error(401, "", "Invalid username or password.");
    };
    let parsed = || serde_json::from_slice::<Value>(body).ok();
    let exists = |writes: &Writes, repo: &str| {
        writes.created.iter().any(|r| r == repo) || repos.iter().any(|r| r.repo_id == repo)
    };

    if url == "/api/whoami-v2" {
        return json_response(json!({
            "type": "user",
            "name": user,
            "auth": { "type": "access_token", "accessToken": { "role": role } },
        }));
    }
    if role != "write" {
        return error(403, "", "This token has no write access");
    }
    if url == "/api/repos/create" {
        let Some(request_body) = parsed() else {
            return error(400, "", "bad JSON");
        };
        let name = request_body["name"].as_str().unwrap_or("");
        let owner = request_body["organization"].as_str().unwrap_or(&user);
        if owner != user {
            return error(
                403,
                "",
                "You don't have the rights to create a model under this namespace",
            );
        }
        let repo = format!("{owner}/{name}");
        if exists(&writes, &repo) {
            return error(409, "", "You already created this model repo");
        }
        writes.created.push(repo.clone());
        return json_response(json!({ "url": format!("{endpoint}/{repo}") }));
    }
    if let Some(rest) = url.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let [owner, name, action, "main"] = parts.as_slice() else {
            return error(404, "", "bad API path");
        };
        let repo = format!("{owner}/{name}");
        if !exists(&writes, &repo) {
            return error(404, "RepoNotFound", "Repository not found");
        }
        if *owner != user {
            return error(403, "", "You don't have write access to this repo");
        }
        if *action == "preupload" {
            let Some(files) = parsed().and_then(|v| v["files"].as_array().cloned()) else {
                return error(400, "", "no files");
            };
            let answered: Vec<Value> = files
                .iter()
                .map(|f| {
                    let path = f["path"].as_str().unwrap_or("");
                    let size = f["size"].as_u64().unwrap_or(0);
                    let lfs = is_lfs(path) || size > 10 << 20;
                    json!({
                        "path": path,
                        "uploadMode": if lfs { "lfs" } else { "regular" },
                        "shouldIgnore": false,
                    })
                })
                .collect();
            return json_response(json!({ "files": answered }));
        }
        if *action == "commit" {
            if request_header(request, "Content-Type") != Some("application/x-ndjson") {
                return error(400, "", "the commit body must be NDJSON");
            }
            let text = String::from_utf8_lossy(body);
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let header_line = lines
                .next()
                .and_then(|l| serde_json::from_str::<Value>(l).ok());
            let Some(summary) = header_line
                .filter(|h| h["key"] == "header")
                .and_then(|h| h["value"]["summary"].as_str().map(str::to_string))
            else {
                return error(400, "", "the first line must be the header");
            };
            let mut files = BTreeMap::new();
            for line in lines {
                let Ok(entry) = serde_json::from_str::<Value>(line) else {
                    return error(400, "", "a line is not JSON");
                };
                let value = &entry["value"];
                let path = value["path"].as_str().unwrap_or("").to_string();
                let content = match entry["key"].as_str() {
                    Some("file") if value["encoding"] == "base64" => {
                        match value["content"].as_str().and_then(base64_decode) {
                            Some(bytes) => bytes,
                            None => return error(400, "", "bad base64"),
                        }
                    }
                    Some("lfsFile") => {
                        let oid = value["oid"].as_str().unwrap_or("");
                        match writes.lfs.get(oid) {
                            Some(bytes) if value["size"].as_u64() == Some(bytes.len() as u64) => {
                                bytes.clone()
                            }
                            _ => return error(400, "", "an LFS file was not uploaded"),
                        }
                    }
                    _ => return error(400, "", "unknown line"),
                };
                files.insert(path, content);
            }
            writes.commits.push(ReceivedCommit {
                repo_id: repo.clone(),
                summary,
                files,
            });
            let oid = format!("{:040x}", writes.commits.len());
            return json_response(json!({
                "commitOid": oid,
                "commitUrl": format!("{endpoint}/{repo}/commit/{oid}"),
            }));
        }
        return error(404, "", "bad API path");
    }
    // /{owner}/{name}.git/info/lfs/objects/{batch|verify}
    let rest = url.trim_start_matches('/');
    if let Some((repo, what)) = rest.split_once(".git/info/lfs/objects/") {
        if !exists(&writes, repo) {
            return error(404, "RepoNotFound", "Repository not found");
        }
        let Some(request_body) = parsed() else {
            return error(400, "", "bad JSON");
        };
        if what == "verify" {
            let oid = request_body["oid"].as_str().unwrap_or("");
            return match writes.lfs.get(oid) {
                Some(bytes) if request_body["size"].as_u64() == Some(bytes.len() as u64) => {
                    json_response(json!({}))
                }
                _ => error(404, "", "object not found"),
            };
        }
        if what != "batch"
            || request_body["operation"] != "upload"
            || !request_body["transfers"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "basic"))
        {
            return error(400, "", "not an upload batch with basic transfers");
        }
        let objects: Vec<Value> = request_body["objects"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap_or("").to_string();
                let size = o["size"].as_u64().unwrap_or(0);
                if writes.lfs.contains_key(&oid) {
                    return json!({ "oid": oid, "size": size });
                }
                json!({
                    "oid": oid,
                    "size": size,
                    "authenticated": true,
                    "actions": {
                        "upload": {
                            "href": format!("{endpoint}/lfs-upload/{oid}"),
                            "header": { UPLOAD_HEADER.0: UPLOAD_HEADER.1 },
                        },
                        "verify": {
                            "href": format!("{endpoint}/{repo}.git/info/lfs/objects/verify"),
                        },
                    },
                })
            })
            .collect();
        return Response::from_data(
            json!({ "transfer": "basic", "objects": objects })
                .to_string()
                .into_bytes(),
        )
        .with_header(header("Content-Type", "application/vnd.git-lfs+json"));
    }
    error(404, "", "not found")
}

/// The CDN that misbehaves, on raw TCP: one request per connection, `Connection: close`.
struct RawCdn {
    repos: Arc<Vec<FakeRepo>>,
    log: Arc<Mutex<Vec<String>>>,
    fault: Arc<Mutex<Fault>>,
    /// Whether [`Fault::DropOnceAt`] has dropped its connection.
    dropped: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl RawCdn {
    fn serve(self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let this = Arc::new(self);
        while !this.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let this = Arc::clone(&this);
                    std::thread::spawn(move || this.answer(stream));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn answer(&self, mut stream: TcpStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut head = Vec::new();
        let mut buffer = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buffer[..n]),
            }
            if head.len() > 64 * 1024 {
                return;
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.lines();
        let mut request_line = lines.next().unwrap_or("").split(' ');
        let method = request_line.next().unwrap_or("").to_string();
        let path = request_line.next().unwrap_or("").to_string();
        let range = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("range")
                .then(|| value.trim().to_string())
        });
        self.log.lock().expect("log lock").push(format!(
            "CDN {method} {path} {}",
            range.as_deref().unwrap_or("-")
        ));
        let content = path.strip_prefix("/cdn/").and_then(|etag| {
            self.repos
                .iter()
                .flat_map(|r| r.files.values())
                .find(|content| content_etag(content) == etag)
        });
        let Some(content) = content else {
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        };
        let total = content.len();
        let fault = self.fault.lock().expect("fault lock").clone();
        let ignore_range = matches!(fault, Fault::IgnoreRangeDropAt(_));
        let start = range
            .as_deref()
            .filter(|_| !ignore_range)
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(start, _)| start.parse::<usize>().ok())
            .unwrap_or(0);
        if start >= total {
            let _ = write!(
                stream,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        let status = if range.is_some() && !ignore_range {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{total}\r\n\
             Connection: close\r\n\r\n",
            total - start,
            total - 1
        );
        let mut body = content[start..].to_vec();
        match fault {
            Fault::StallAt(at) => {
                let cut = at.saturating_sub(start).min(body.len());
                let _ = stream.write_all(&body[..cut]);
                let _ = stream.flush();
                // Silent, with the connection open, until the client gives up (or 30 s).
                let until = std::time::Instant::now() + Duration::from_secs(30);
                while !self.stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Fault::DropOnceAt(at)
                if at > start && at < total && !self.dropped.swap(true, Ordering::SeqCst) =>
            {
                let _ = stream.write_all(&body[..at - start]);
                let _ = stream.flush();
                let _ = stream.shutdown(Shutdown::Both);
            }
            Fault::IgnoreRangeDropAt(at) => {
                let _ = stream.write_all(&body[..at.min(body.len())]);
                let _ = stream.flush();
                let _ = stream.shutdown(Shutdown::Both);
            }
            Fault::Pace { bytes, every } => {
                for piece in body.chunks(bytes.max(1)) {
                    if stream
                        .write_all(piece)
                        .and_then(|()| stream.flush())
                        .is_err()
                    {
                        return;
                    }
                    std::thread::sleep(every);
                }
            }
            other => {
                if other == Fault::CorruptLarge && total / 2 >= start {
                    body[total / 2 - start] ^= 0xff;
                }
                let _ = stream.write_all(&body);
            }
        }
    }
}

/// An address that accepts connections and never answers (until dropped).
pub struct SilentServer {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentServer {
    /// Starts listening on a free port.
    pub fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                if let Ok((stream, _)) = listener.accept() {
                    held.push(stream);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        SilentServer {
            endpoint,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
