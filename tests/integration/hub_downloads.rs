//! Downloads that neither hang nor give up too early, against a fake Hub that misbehaves on
//! purpose: a connection dropped mid-file continues where it stopped, a file whose bytes do not
//! match its etag (SHA-256, or git's SHA-1 for small files) never enters the cache, a full disk
//! leaves no partial file; and, through the program with a 1 s stall time, a stalled download
//! fails in seconds naming the host and the file, a slow but steady one succeeds however long it
//! takes, and a Hub that accepts and never answers is given up on.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fake_hub::{FakeHub, FakeRepo, Fault, SilentServer, content_etag, git_blob_etag};
use common::{fixture_pipeline, fixtures, program, stderr};
use instruct_pix2pix::model::hub::{
    DEFAULT_STALL_TIMEOUT, DownloadProgress, HubError, ModelSpec, STALL_TIMEOUT_VAR, Variant,
    fetch_model, fetch_model_with_cancel,
};

const REPO: &str = "tiny-org/instruct-pix2pix-tiny";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO_FOLDER: &str = "models--tiny-org--instruct-pix2pix-tiny";

/// The committed tiny pipeline (weights of 0.3 to 2.3 MB) as a Hub repo.
fn tiny_repo() -> FakeRepo {
    FakeRepo::from_folder(REPO, SHA, &fixture_pipeline("sd1-tiny"))
}

fn spec() -> ModelSpec {
    ModelSpec::parse(REPO, None).expect("a repo id")
}

/// The names in the repo's `blobs/` folder.
fn blob_names(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join(REPO_FOLDER).join("blobs"))
        .map(|entries| {
            entries
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every file the default edit needs, as cached, equals the repo's bytes.
fn assert_snapshot_matches(snapshot: &Path, repo: &FakeRepo) {
    let mut checked = 0;
    for (path, content) in &repo.files {
        let local = snapshot.join(path);
        if local.exists() {
            assert_eq!(
                &std::fs::read(&local).expect("cached file"),
                content,
                "{path}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} files in the snapshot");
    assert!(
        snapshot
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
}

/// The large files whose body was asked for more than once, with the ranges asked.
fn cdn_ranges(hub: &FakeHub, etag: &str) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter_map(|r| {
            r.strip_prefix(&format!("CDN GET /cdn/{etag} "))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn a_connection_dropped_mid_file_continues_from_where_it_stopped() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let repo = tiny_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    // The first large file's connection is cut after 100 000 bytes.
    let cut = 100_000;
    hub.set_fault(Fault::DropOnceAt(cut));
    let mut events: Vec<DownloadProgress> = Vec::new();
    let snapshot = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(tmp.path()),
        &mut |p: &DownloadProgress| events.push(p.clone()),
    )
    .expect("the download continues after the drop");
    assert_snapshot_matches(&snapshot, &repo);

    // Exactly one file was cut: its body was asked for twice, the second time from the cut.
    let mut cut_files = Vec::new();
    for (path, content) in &repo.files {
        let ranges = cdn_ranges(&hub, &content_etag(content));
        if ranges.len() > 1 {
            assert_eq!(ranges, ["bytes=0-".to_string(), format!("bytes={cut}-")]);
            cut_files.push(path.clone());
        }
    }
    assert_eq!(cut_files.len(), 1, "{:#?}", hub.requests());
    // Its progress started again from the cut, not from zero, and never went back.
    let done: Vec<u64> = events
        .iter()
        .filter(|e| e.file == cut_files[0])
        .map(|e| e.bytes_done)
        .collect();
    assert_eq!(done.first(), Some(&0), "{done:?}");
    assert_eq!(done.iter().filter(|&&d| d == 0).count(), 1, "{done:?}");
    assert!(done.contains(&(cut as u64)), "{done:?}");
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert!(
        done.iter()
            .all(|&d| d <= repo.files[&cut_files[0]].len() as u64)
    );
    assert!(
        !blob_names(tmp.path()).iter().any(|n| n.ends_with(".part")),
        "{:?}",
        blob_names(tmp.path())
    );
}

#[test]
fn a_server_that_ignores_ranges_and_keeps_dropping_is_given_up_on() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![tiny_repo()]);
    // Every try starts over from byte 0 and is cut at the same byte: no try gets further than
    // the first, so the download must end rather than loop.
    hub.set_fault(Fault::IgnoreRangeDropAt(50_000));
    let started = Instant::now();
    let err = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(tmp.path()),
        &mut |_: &DownloadProgress| {},
    )
    .expect_err("the file never completes");
    let message = err.to_string();
    assert!(matches!(err, HubError::Download { .. }), "{err:?}");
    assert!(
        message.contains(&format!(
            "{} could not be reached or dropped the connection (4 tries)",
            hub.faulty_cdn_host
        )),
        "{message}"
    );
    assert!(
        message.contains("the 50000 bytes received are kept"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_large_file_whose_sha256_differs_is_refused_and_never_cached() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let repo = tiny_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    hub.set_fault(Fault::CorruptLarge);
    let err = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(tmp.path()),
        &mut |_: &DownloadProgress| {},
    )
    .expect_err("a damaged file is refused");
    let HubError::Download { file, .. } = &err else {
        panic!("not a download error: {err:?}");
    };
    let etag = content_etag(&repo.files[file]);
    let message = err.to_string();
    assert!(message.contains(file.as_str()), "{message}");
    assert!(message.contains(REPO), "{message}");
    assert!(message.contains("SHA-256"), "{message}");
    assert!(message.contains(&etag), "expected hash named: {message}");
    assert!(message.contains("was deleted"), "{message}");
    // Neither the blob nor a part of it is kept, nothing links to it, and the revision is not
    // recorded as downloaded.
    let blobs = blob_names(tmp.path());
    assert!(!blobs.iter().any(|n| n.starts_with(&etag)), "{blobs:?}");
    let snapshot = tmp.path().join(REPO_FOLDER).join("snapshots").join(SHA);
    assert!(std::fs::symlink_metadata(snapshot.join(file)).is_err());
    assert!(!tmp.path().join(REPO_FOLDER).join("refs/main").exists());

    // Once the Hub serves the right bytes, the same cache completes.
    hub.set_fault(Fault::None);
    let snapshot = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(tmp.path()),
        &mut |_: &DownloadProgress| {},
    )
    .expect("download with the right bytes");
    assert_snapshot_matches(&snapshot, &repo);
}

#[test]
fn small_files_are_checked_against_their_git_blob_id() {
    let repo = tiny_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    hub.set_git_etags(true);

    // Right bytes: the blobs of small files are named by their git id, as huggingface_hub does.
    let good = tempfile::tempdir().expect("temp dir");
    let snapshot = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(good.path()),
        &mut |_: &DownloadProgress| {},
    )
    .expect("download with git etags");
    assert_snapshot_matches(&snapshot, &repo);
    let index_id = git_blob_etag(&repo.files["model_index.json"]);
    assert!(
        blob_names(good.path()).contains(&index_id),
        "{:?}",
        blob_names(good.path())
    );

    // A wrong byte in a small file: refused with git's hash named.
    hub.set_fault(Fault::CorruptSmall);
    let bad = tempfile::tempdir().expect("temp dir");
    let err = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(bad.path()),
        &mut |_: &DownloadProgress| {},
    )
    .expect_err("a damaged small file is refused");
    let message = err.to_string();
    assert!(message.contains("model_index.json"), "{message}");
    assert!(message.contains("git SHA-1"), "{message}");
    assert!(message.contains(&index_id), "{message}");
    assert!(
        !blob_names(bad.path())
            .iter()
            .any(|n| n.starts_with(&index_id)),
        "{:?}",
        blob_names(bad.path())
    );
}

/// `/dev/full` answers every write with ENOSPC, as a full disk does: a `.part` that is a link to
/// it makes the download hit a full disk.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_leaves_no_partial_file_and_names_the_folder() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let repo = tiny_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    let blobs = tmp.path().join(REPO_FOLDER).join("blobs");
    std::fs::create_dir_all(&blobs).expect("blobs");
    for (path, content) in &repo.files {
        if path.ends_with(".safetensors") {
            let part = blobs.join(format!("{}.part", content_etag(content)));
            std::os::unix::fs::symlink("/dev/full", part).expect("link to /dev/full");
        }
    }
    let err = fetch_model(
        &spec(),
        Variant::Default,
        &hub.settings(tmp.path()),
        &mut |_: &DownloadProgress| {},
    )
    .expect_err("the disk is full");
    let HubError::Download { file, .. } = &err else {
        panic!("not a download error: {err:?}");
    };
    let message = err.to_string();
    assert!(message.contains(file.as_str()), "{message}");
    assert!(
        message.contains(&format!("the disk holding {} is full", blobs.display())),
        "{message}"
    );
    let etag = content_etag(&repo.files[file]);
    assert!(
        !blob_names(tmp.path()).iter().any(|n| n.starts_with(&etag)),
        "the partial file is gone: {:?}",
        blob_names(tmp.path())
    );
}

#[test]
fn a_cancel_stops_a_silent_download_at_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![tiny_repo()]);
    hub.set_fault(Fault::StallAt(100_000));
    let settings = hub.settings(tmp.path());
    let blobs = tmp.path().join(REPO_FOLDER).join("blobs");
    let cancel = AtomicBool::new(false);
    let (err, after_cancel) = std::thread::scope(|scope| {
        let cancelled_at = scope.spawn(|| {
            // Once the first large file has gone silent, cancel.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let silent = std::fs::read_dir(&blobs).into_iter().flatten().any(|e| {
                    e.is_ok_and(|e| {
                        e.file_name().to_string_lossy().ends_with(".part")
                            && e.metadata().is_ok_and(|m| m.len() == 100_000)
                    })
                });
                if silent {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
            cancel.store(true, Ordering::SeqCst);
            Instant::now()
        });
        let err = fetch_model_with_cancel(
            &spec(),
            Variant::Default,
            &settings,
            &mut |_: &DownloadProgress| {},
            &cancel,
        )
        .expect_err("cancelled");
        let cancelled_at = cancelled_at.join().expect("cancelling thread");
        (err, cancelled_at.elapsed())
    });
    assert!(matches!(err, HubError::Cancelled { .. }), "{err:?}");
    // Well within the stall time, which is a minute here.
    assert_eq!(DEFAULT_STALL_TIMEOUT, Duration::from_secs(60));
    assert!(after_cancel < Duration::from_secs(5), "{after_cancel:?}");
}

#[test]
fn two_downloads_of_one_model_into_one_cache_fetch_each_file_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let repo = tiny_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    // Slow enough that both are downloading at the same time.
    hub.set_fault(Fault::Pace {
        bytes: 256 * 1024,
        every: Duration::from_millis(50),
    });
    let settings = hub.settings(tmp.path());
    let snapshots: Vec<PathBuf> = std::thread::scope(|scope| {
        let fetches: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    fetch_model(
                        &spec(),
                        Variant::Default,
                        &settings,
                        &mut |_: &DownloadProgress| {},
                    )
                    .map_err(|err| err.to_string())
                })
            })
            .collect();
        fetches
            .into_iter()
            .map(|f| f.join().expect("fetch thread").expect("fetch"))
            .collect()
    });
    assert_eq!(snapshots[0], snapshots[1]);
    assert_snapshot_matches(&snapshots[0], &repo);
    // One holds the lock on each blob while the other waits, then links the finished blob.
    for (path, content) in &repo.files {
        let ranges = cdn_ranges(&hub, &content_etag(content));
        assert!(ranges.len() <= 1, "{path}: {ranges:?}");
    }
    assert!(!blob_names(tmp.path()).iter().any(|n| n.ends_with(".part")));
}

// ---- Through the program, with a short stall time ----

/// `edit --model REPO` against `endpoint`, with the stall time set to `stall_secs`; returns the
/// output and how long it took.
fn edit_from(endpoint: &str, hf_home: &Path, stall_secs: &str) -> (std::process::Output, Duration) {
    let case_dir = fixtures().join("edits").join("sd1-plain");
    let output: PathBuf = hf_home.with_file_name("out.png");
    let started = Instant::now();
    let result = program(hf_home)
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_ENDPOINT", endpoint)
        .env(STALL_TIMEOUT_VAR, stall_secs)
        .args(["edit", "--model", REPO, "--image"])
        .arg(case_dir.join("input.png"))
        .arg("--latents")
        .arg(case_dir.join("latents.npy"))
        .args(["--prompt", "make it snowy", "--steps", "2", "--quiet"])
        .arg("--output")
        .arg(&output)
        .output()
        .expect("run the program");
    (result, started.elapsed())
}

#[test]
fn a_stalled_download_fails_after_the_stall_time_naming_host_and_file() {
    let work = tempfile::tempdir().expect("temp dir");
    let hf_home = work.path().join("hf");
    let hub = FakeHub::start(vec![tiny_repo()]);
    // Every large file goes silent after 100 000 bytes, with the connection left open.
    hub.set_fault(Fault::StallAt(100_000));
    let (result, took) = edit_from(&hub.endpoint, &hf_home, "1");
    assert!(!result.status.success());
    let message = stderr(&result);
    assert!(
        message.contains(&format!("no data from {} for 1 s", hub.faulty_cdn_host)),
        "{message}"
    );
    assert!(
        message.contains(&format!(".safetensors of {REPO}")),
        "{message}"
    );
    assert!(
        message.contains("the 100000 bytes received are kept"),
        "{message}"
    );
    assert!(message.contains(STALL_TIMEOUT_VAR), "{message}");
    // One silent stall time per try (the first brought bytes, then three brought none) and
    // 1 + 2 s between the fruitless ones: seconds, not the minutes a default would take.
    assert!(took >= Duration::from_secs(4), "{took:?}");
    assert!(took < Duration::from_secs(40), "{took:?}");
    // The bytes that came are kept for the next run.
    let parts: Vec<u64> = std::fs::read_dir(hf_home.join("hub").join(REPO_FOLDER).join("blobs"))
        .expect("blobs")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .map(|e| e.metadata().expect("metadata").len())
        .collect();
    assert_eq!(parts, [100_000]);
}

#[test]
fn a_slow_but_steady_download_outlasts_the_stall_time() {
    let work = tempfile::tempdir().expect("temp dir");
    let hf_home = work.path().join("hf");
    let repo = tiny_repo();
    let hub = FakeHub::start(vec![repo.clone()]);
    // 128 KiB every 0.15 s: the 3.6 MB of weights take over 4 s, never silent for 1 s.
    hub.set_fault(Fault::Pace {
        bytes: 128 * 1024,
        every: Duration::from_millis(150),
    });
    let (result, took) = edit_from(&hub.endpoint, &hf_home, "1");
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(took > Duration::from_secs(3), "{took:?}");
    let snapshot = hf_home
        .join("hub")
        .join(REPO_FOLDER)
        .join("snapshots")
        .join(SHA);
    assert_snapshot_matches(&snapshot, &repo);
}

#[test]
fn a_hub_that_accepts_and_never_answers_is_given_up_on_after_the_stall_time() {
    let work = tempfile::tempdir().expect("temp dir");
    let silent = SilentServer::start();
    let (result, took) = edit_from(&silent.endpoint, &work.path().join("hf"), "1");
    assert!(!result.status.success());
    let message = stderr(&result);
    assert!(
        message.contains(&format!(
            "{} could not be reached: no answer for 1 s",
            silent.endpoint
        )),
        "{message}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn a_stall_time_that_is_not_a_number_of_seconds_is_refused() {
    let work = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![tiny_repo()]);
    for bad in ["soon", "0", "-5"] {
        let (result, _) = edit_from(&hub.endpoint, &work.path().join("hf"), bad);
        assert!(!result.status.success());
        let message = stderr(&result);
        assert!(
            message.contains(&format!("{STALL_TIMEOUT_VAR}={bad:?} cannot be used")),
            "{message}"
        );
    }
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}
