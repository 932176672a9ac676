//! The HTTP client for the Hub and its CDN: every wait is bounded by the stall time (no bytes for
//! that long fails), never by a total time, so a 4 GB file may take hours while bytes keep
//! coming; requests run on a helper thread so a cancel takes effect within a tenth of a second
//! even while the network is silent.
//!
//! Why ureq's `timeout_per_read` and a helper thread: the per-read timeout restarts at every
//! read from the socket (headers, TLS handshake and body alike), so it is exactly "no bytes for
//! this long", and when it fires ureq closes the connection, so a helper thread blocked on a
//! dead socket ends by itself within the stall time. Ranged requests each with a deadline would
//! need a deadline that suits both a fast and a slow link, and cost a request per range. The
//! helper thread only makes waiting cancellable: it sends the answer's head and then the body in
//! chunks over a bounded channel.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use ureq::http::HeaderMap;

use super::HubError;
use super::settings::HubSettings;

/// How long a download (or any request to the Hub) may receive no bytes before it is abandoned:
/// connecting, waiting for an answer and reading the body each restart this clock with every
/// byte. Overridden by [`STALL_TIMEOUT_VAR`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable that overrides [`DEFAULT_STALL_TIMEOUT`], in seconds (decimals
/// allowed, from 0.1 to 3600).
pub const STALL_TIMEOUT_VAR: &str = "INSTRUCT_PIX2PIX_DOWNLOAD_STALL_SECS";

/// How often a wait checks the cancel flag.
const TICK: Duration = Duration::from_millis(100);

/// Bytes per chunk sent from the helper thread; with [`CHANNEL_CHUNKS`] in flight at most
/// 512 KiB wait in memory.
const CHUNK: usize = 64 * 1024;
const CHANNEL_CHUNKS: usize = 8;

/// The stall time from [`STALL_TIMEOUT_VAR`]'s `value` (`None`: the default).
pub(super) fn stall_timeout_from(value: Option<&str>) -> Result<Duration, HubError> {
    let Some(raw) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(DEFAULT_STALL_TIMEOUT);
    };
    let bad = |reason: &str| HubError::BadEnv {
        var: STALL_TIMEOUT_VAR,
        value: raw.to_string(),
        reason: reason.to_string(),
    };
    let secs: f64 = raw
        .trim()
        .parse()
        .map_err(|_| bad("it is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(bad("it must be between 0.1 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Why a request got no (complete) answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NetError {
    /// No bytes for the stall time.
    Stalled,
    /// The connection failed or was closed (the reason as the network library gives it).
    Failed(String),
}

/// Why waiting for an answer ended without one.
#[derive(Debug)]
pub(super) enum CallError {
    /// The cancel flag was set.
    Cancelled,
    /// See [`NetError`].
    Net(NetError),
}

/// One ureq agent for the Hub and its CDN: redirects are not followed (the caller reads the
/// Hub's headers on the redirect itself), statuses are not errors, and the token goes only to
/// the Hub's own origin, never to a CDN it redirects to.
pub(super) struct HubClient {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    stall: Duration,
}

impl HubClient {
    /// A client for `settings`, with the stall time from the environment.
    pub(super) fn new(settings: &HubSettings) -> Result<Self, HubError> {
        let stall = stall_timeout_from(std::env::var(STALL_TIMEOUT_VAR).ok().as_deref())?;
        Ok(Self::with_stall(settings, stall))
    }

    fn with_stall(settings: &HubSettings, stall: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_resolve(Some(stall))
            .timeout_connect(Some(stall))
            .timeout_per_read(Some(stall))
            .timeout_per_write(Some(stall))
            // Byte ranges count bytes of the file itself, not of a compressed stream.
            .accept_encoding("identity")
            .user_agent(concat!(
                env!("CARGO_PKG_NAME"),
                "/",
                env!("CARGO_PKG_VERSION")
            ))
            .build();
        HubClient {
            agent: config.into(),
            endpoint: settings.endpoint.clone(),
            token: settings.token.clone(),
            stall,
        }
    }

    /// The Hub's address.
    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The stall time.
    pub(super) fn stall(&self) -> Duration {
        self.stall
    }

    /// Sends `GET url` (with a `Range` header when given) on a helper thread and waits for the
    /// answer's head, checking `cancel` every tick. With `stream_body`, the body then comes
    /// through [`Exchange::next`]; otherwise it is dropped unread.
    pub(super) fn get(
        &self,
        url: &str,
        range: Option<String>,
        stream_body: bool,
        cancel: &AtomicBool,
    ) -> Result<Exchange, CallError> {
        let mut headers = Vec::new();
        if let Some(range) = range {
            headers.push(("Range", range));
        }
        if let Some(token) = &self.token
            && same_origin(url, &self.endpoint)
        {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
        let (sender, events) = sync_channel(CHANNEL_CHUNKS);
        let agent = self.agent.clone();
        let target = url.to_string();
        let spawned = std::thread::Builder::new()
            .name("hub-request".to_string())
            .spawn(move || request_thread(agent, target, headers, stream_body, sender));
        if let Err(err) = spawned {
            return Err(CallError::Net(NetError::Failed(format!(
                "cannot start a thread for the request: {err}"
            ))));
        }
        let mut exchange = Exchange {
            status: 0,
            headers: HeaderMap::new(),
            events,
            // ureq's own timeouts end the helper thread first; this only guarantees that no
            // wait here outlasts them by much, whatever happens inside the library.
            watchdog: self.stall * 2 + Duration::from_secs(1),
        };
        match exchange.wait(cancel)? {
            Event::Head(status, headers) => {
                exchange.status = status;
                exchange.headers = headers;
                Ok(exchange)
            }
            Event::Failed(err) => Err(CallError::Net(err)),
            Event::Chunk(_) | Event::End => Err(CallError::Net(NetError::Failed(
                "the answer had no head".to_string(),
            ))),
        }
    }
}

/// A request body for [`HubClient::send`].
pub(super) enum Payload<'a> {
    /// Bytes in memory (JSON, NDJSON).
    Bytes(Vec<u8>),
    /// `len` bytes read from a reader (a large file), sent with a `Content-Length`, not
    /// chunked: presigned storage URLs refuse chunked bodies.
    Reader(&'a mut dyn Read, u64),
}

/// The whole answer to a [`HubClient::send`] (bodies of API answers are small).
pub(super) struct Answer {
    /// The HTTP status.
    pub(super) status: u16,
    /// The body, at most [`MAX_ANSWER_BYTES`].
    pub(super) body: Vec<u8>,
}

impl Answer {
    /// The Hub's `{"error": "..."}` message, if it sent one.
    pub(super) fn error_message(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        let message = value.get("error")?.as_str()?.trim();
        (!message.is_empty()).then(|| message.chars().take(300).collect())
    }
}

/// The largest API answer read: the Hub's JSON answers are a few KB.
const MAX_ANSWER_BYTES: u64 = 16 << 20;

impl HubClient {
    /// Sends `method url` with `payload` on this thread and reads the whole answer. The token
    /// goes only to the Hub's own origin (not to a storage URL the Hub hands out); `headers` are
    /// added as given. Every read and write is bounded by the stall time, so this never hangs,
    /// while a large body may take as long as it keeps moving.
    pub(super) fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, String)],
        payload: Payload,
    ) -> Result<Answer, NetError> {
        let mut request = match method {
            "POST" => self.agent.post(url),
            "PUT" => self.agent.put(url),
            other => return Err(NetError::Failed(format!("unsupported method {other}"))),
        };
        if let Some(token) = &self.token
            && same_origin(url, &self.endpoint)
        {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let sent = match payload {
            Payload::Bytes(bytes) => request.send(bytes),
            Payload::Reader(reader, len) => request
                .header("Content-Length", len.to_string())
                .send(ureq::SendBody::from_reader(reader)),
        };
        let mut response = sent.map_err(net_error)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(net_error)?;
        Ok(Answer { status, body })
    }
}

/// What the helper thread sends: the head first, then chunks, then the end or a failure.
enum Event {
    Head(u16, HeaderMap),
    Chunk(Vec<u8>),
    End,
    Failed(NetError),
}

/// An answer being received.
pub(super) struct Exchange {
    /// The HTTP status.
    pub(super) status: u16,
    /// The answer's headers.
    pub(super) headers: HeaderMap,
    events: Receiver<Event>,
    watchdog: Duration,
}

/// The next piece of a body.
pub(super) enum BodyPart {
    /// Bytes, in order.
    Bytes(Vec<u8>),
    /// The body ended as the server meant it to (its length was reached).
    End,
}

impl Exchange {
    /// A header's value as text, when present and readable.
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Waits for the next piece of the body.
    pub(super) fn next(&mut self, cancel: &AtomicBool) -> Result<BodyPart, CallError> {
        match self.wait(cancel)? {
            Event::Chunk(bytes) => Ok(BodyPart::Bytes(bytes)),
            Event::End => Ok(BodyPart::End),
            Event::Failed(err) => Err(CallError::Net(err)),
            Event::Head(..) => Err(CallError::Net(NetError::Failed(
                "a second head in one answer".to_string(),
            ))),
        }
    }

    fn wait(&mut self, cancel: &AtomicBool) -> Result<Event, CallError> {
        let started = Instant::now();
        loop {
            if cancel.load(Ordering::Acquire) {
                return Err(CallError::Cancelled);
            }
            match self.events.recv_timeout(TICK) {
                Ok(event) => return Ok(event),
                Err(RecvTimeoutError::Timeout) if started.elapsed() >= self.watchdog => {
                    return Err(CallError::Net(NetError::Stalled));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CallError::Net(NetError::Failed(
                        "the request ended without an answer".to_string(),
                    )));
                }
            }
        }
    }
}

/// The helper thread: the request, then the body in chunks. It ends when the body does, when
/// ureq's timeouts fire, or when the receiver is gone (a cancel) at the next chunk.
fn request_thread(
    agent: ureq::Agent,
    url: String,
    headers: Vec<(&'static str, String)>,
    stream_body: bool,
    events: SyncSender<Event>,
) {
    let mut request = agent.get(&url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(err) => {
            let _ = events.send(Event::Failed(net_error(err)));
            return;
        }
    };
    let (parts, body) = response.into_parts();
    if events
        .send(Event::Head(parts.status.as_u16(), parts.headers))
        .is_err()
        || !stream_body
    {
        return;
    }
    let mut reader = body.into_reader();
    loop {
        let mut buffer = vec![0u8; CHUNK];
        match reader.read(&mut buffer) {
            Ok(0) => {
                let _ = events.send(Event::End);
                return;
            }
            Ok(n) => {
                buffer.truncate(n);
                if events.send(Event::Chunk(buffer)).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                let _ = events.send(Event::Failed(io_net_error(err)));
                return;
            }
        }
    }
}

fn net_error(err: ureq::Error) -> NetError {
    match err {
        ureq::Error::Timeout(_) => NetError::Stalled,
        ureq::Error::Io(io) => io_net_error(io),
        other => NetError::Failed(other.to_string()),
    }
}

/// A body read's error: ureq wraps its own errors (a timeout among them) in `io::Error`.
fn io_net_error(err: std::io::Error) -> NetError {
    if matches!(
        err.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) || err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(|inner| matches!(inner, ureq::Error::Timeout(_)))
    {
        return NetError::Stalled;
    }
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        return NetError::Failed("the connection was closed before the end".to_string());
    }
    NetError::Failed(err.to_string())
}

/// `scheme://host[:port]` of a URL, lowercased; `None` when it has none.
pub(super) fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    // Credentials in the URL are not part of the origin.
    let authority = authority.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{authority}").to_ascii_lowercase())
}

/// The `host[:port]` of a URL, for messages ("no data from cdn.example.org for 60 s").
pub(super) fn host_of(url: &str) -> String {
    origin(url)
        .and_then(|o| o.split_once("://").map(|(_, host)| host.to_string()))
        .unwrap_or_else(|| url.to_string())
}

fn same_origin(url: &str, endpoint: &str) -> bool {
    origin(url).is_some() && origin(url) == origin(endpoint)
}

/// Percent-encodes a repo path or revision for a URL: unreserved characters stay, and `/` too
/// when `keep_slash` (file paths keep their folders; a branch name `a/b` becomes `a%2Fb`).
pub(super) fn encode_path(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stall_time_comes_from_the_variable_within_its_range() {
        assert_eq!(stall_timeout_from(None).unwrap(), DEFAULT_STALL_TIMEOUT);
        assert_eq!(
            stall_timeout_from(Some(" ")).unwrap(),
            DEFAULT_STALL_TIMEOUT
        );
        assert_eq!(
            stall_timeout_from(Some("1.5")).unwrap(),
            Duration::from_millis(1500)
        );
        for bad in ["abc", "0", "-3", "NaN", "1e9"] {
            let message = stall_timeout_from(Some(bad)).unwrap_err().to_string();
            assert!(message.contains(STALL_TIMEOUT_VAR), "{message}");
            assert!(message.contains(bad), "{message}");
        }
    }

    #[test]
    fn the_token_goes_only_to_the_hubs_origin() {
        let hub = "https://huggingface.co";
        assert!(same_origin(
            "https://huggingface.co/a/b/resolve/main/x",
            hub
        ));
        assert!(same_origin("https://HuggingFace.co/x", hub));
        assert!(!same_origin("https://cdn-lfs.huggingface.co/x", hub));
        assert!(!same_origin("http://huggingface.co/x", hub));
        assert!(!same_origin("https://huggingface.co:8443/x", hub));
        assert!(!same_origin("https://huggingface.co@evil.example/x", hub));
        assert_eq!(
            host_of("http://127.0.0.1:8080/cdn/abc?x=1"),
            "127.0.0.1:8080"
        );
    }

    #[test]
    fn paths_are_percent_encoded() {
        assert_eq!(
            encode_path("unet/diffusion model+v2.safetensors", true),
            "unet/diffusion%20model%2Bv2.safetensors"
        );
        assert_eq!(encode_path("refs/pr/1", false), "refs%2Fpr%2F1");
    }
}
