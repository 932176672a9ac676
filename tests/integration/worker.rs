//! The model thread driven as the window drives it: load, edits with step previews, cancel,
//! "latest wins", failures, a full queue, a slow window, the waker, shutdown. Results are compared
//! with `EditPipeline` run directly on this thread, so the worker must add nothing to the numbers.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use image::RgbImage;
use instruct_pix2pix::model::device::{DTypeChoice, DeviceChoice};
use instruct_pix2pix::model::hub::Variant;
use instruct_pix2pix::model::{InstructPix2PixModel, LoadOptions};
use instruct_pix2pix::pipeline::{EditPipeline, EditSettings};
use instruct_pix2pix::worker::{
    EditJob, EditResult, Event, Job, ModelRequest, Worker, WorkerConfig, WorkerError, WorkerHandle,
    drain,
};

use common::fake_hub::{FakeHub, FakeRepo, content_etag};
use common::{fixture_pipeline, fixtures};
use instruct_pix2pix::model::hub::HubSettings;

/// Long enough for any single event on a loaded 2-core machine running other builds.
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);
/// A send or cancel that took longer than this waited for something.
const NON_BLOCKING: Duration = Duration::from_millis(50);
/// Steps for edits that must still be running when the test acts on them.
const LONG_EDIT_STEPS: usize = 400;

fn model_path() -> String {
    fixture_pipeline("sd1-tiny-ancestral").display().to_string()
}

fn input_image() -> Arc<RgbImage> {
    let path = fixtures().join("edits").join("sd1-plain").join("input.png");
    Arc::new(image::open(&path).expect("fixture image").to_rgb8())
}

fn settings(steps: usize, seed: u64) -> EditSettings {
    EditSettings {
        prompt: "make it snowy".into(),
        steps,
        seed,
        ..EditSettings::default()
    }
}

fn edit_job(id: u64, image: &Arc<RgbImage>, settings: EditSettings) -> Job {
    Job::Edit(EditJob {
        id,
        image: Arc::clone(image),
        max_side: u32::MAX,
        settings,
        preview_size: Some((32, 24)),
    })
}

/// A worker whose waker counts its calls.
fn spawn(config: WorkerConfig) -> (WorkerHandle, Receiver<Event>, Arc<AtomicUsize>) {
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&wakes);
    let (handle, events) = Worker::spawn_with(
        config,
        Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .expect("the model thread starts");
    (handle, events, wakes)
}

/// Receives events until one matches `done`; returns them all, the match last.
fn until(events: &Receiver<Event>, done: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        match events.recv_timeout(EVENT_TIMEOUT) {
            Ok(event) => {
                let finished = done(&event);
                seen.push(event);
                if finished {
                    return seen;
                }
            }
            Err(error) => panic!("no matching event ({error}); got {seen:#?}"),
        }
    }
}

fn load(handle: &WorkerHandle, events: &Receiver<Event>) -> Vec<Event> {
    let request = ModelRequest::new(model_path(), DeviceChoice::Cpu, DTypeChoice::F32);
    handle.send(Job::LoadModel(request)).expect("load queued");
    let seen = until(events, |e| {
        matches!(e, Event::ModelLoaded(_) | Event::Failed { .. })
    });
    assert!(
        matches!(seen.last(), Some(Event::ModelLoaded(_))),
        "the fixture model did not load: {seen:#?}"
    );
    seen
}

fn finished(seen: &[Event]) -> &EditResult {
    match seen.last() {
        Some(Event::Finished(result)) => result,
        other => panic!("expected Finished, got {other:#?} after {seen:#?}"),
    }
}

fn step_count(seen: &[Event], id: u64) -> usize {
    seen.iter()
        .filter(|e| matches!(e, Event::Step(step) if step.id == id))
        .count()
}

/// The edit diffusers' numbers were checked on elsewhere, run on this thread without the worker.
fn edit_directly(image: &RgbImage, settings: &EditSettings) -> RgbImage {
    let options = LoadOptions {
        variant: Variant::Default,
        dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
    };
    let model = InstructPix2PixModel::load(&fixture_pipeline("sd1-tiny-ancestral"), &options)
        .expect("fixture model loads");
    let mut pipeline = EditPipeline::new(model).expect("pipeline");
    pipeline
        .edit(image, settings, &mut |_| {}, &AtomicBool::new(false))
        .expect("direct edit")
        .image
}

#[test]
fn edits_report_steps_and_equal_the_pipeline_run_directly() {
    let (handle, events, wakes) = spawn(WorkerConfig::default());
    let loading = load(&handle, &events);
    assert!(matches!(&loading[0], Event::ModelLoading { spec } if *spec == model_path()));
    let Some(Event::ModelLoaded(info)) = loading.last() else {
        unreachable!()
    };
    assert_eq!(info.size_multiple, 8);
    assert_eq!((info.device.as_str(), info.dtype.as_str()), ("cpu", "f32"));
    assert_eq!(info.folder, fixture_pipeline("sd1-tiny-ancestral"));
    assert_eq!(info.warning, None);
    // Issue 12: the memory in use on the device (this process's, on the CPU) of its total.
    #[cfg(target_os = "linux")]
    {
        let memory = info.memory.expect("memory in use after the load");
        assert!(memory.used > 1 << 20 && memory.total.is_some_and(|t| t > memory.used));
    }

    let image = input_image();
    let first_settings = settings(6, 7);
    handle
        .send(edit_job(1, &image, first_settings.clone()))
        .unwrap();
    let first = until(&events, |e| matches!(e, Event::Finished(_)));
    assert!(matches!(
        first[0],
        Event::EditStarted {
            id: 1,
            width: 64,
            height: 64
        }
    ));
    // 64 events fit in the channel, so no step is dropped here.
    let steps: Vec<_> = first
        .iter()
        .filter_map(|e| match e {
            Event::Step(step) => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    for step in &steps {
        assert_eq!((step.id, step.total), (1, 6));
        let preview = step.preview.as_ref().expect("a preview was asked for");
        assert_eq!(preview.dimensions(), (32, 24));
    }
    assert_eq!(steps.last().unwrap().eta, Duration::ZERO);
    assert!(steps.windows(2).all(|w| w[0].elapsed <= w[1].elapsed));

    let result = finished(&first);
    assert_eq!((result.id, result.seed), (1, 7));
    #[cfg(target_os = "linux")]
    assert!(
        result.memory.is_some_and(|m| m.used > 1 << 20),
        "memory after the edit"
    );
    assert_eq!(result.settings, first_settings);
    assert!(!result.reused_prompt_embeddings && !result.reused_image_latents);
    assert!(
        Arc::ptr_eq(&result.input, &image),
        "a 64×64 input is not resized"
    );
    // Same code, same inputs, same CPU kernels: the worker must give the very same pixels.
    let direct = edit_directly(&image, &first_settings);
    assert!(
        result.image == direct,
        "worker and direct pipeline differ: {:?}",
        common::pixel_difference(&result.image, &direct)
    );

    // Only the seed changes: both encodings come from the cache, and the pixels still match.
    let second_settings = settings(6, 8);
    handle
        .send(edit_job(2, &image, second_settings.clone()))
        .unwrap();
    let second = until(&events, |e| matches!(e, Event::Finished(_)));
    let result = finished(&second);
    assert_eq!((result.id, result.seed), (2, 8));
    assert!(result.reused_prompt_embeddings && result.reused_image_latents);
    assert!(result.image == edit_directly(&image, &second_settings));

    // Dropping joins the thread, after which every wake has happened: one per event sent.
    let received = loading.len() + first.len() + second.len();
    drop(handle);
    let late = drain(&events, Duration::from_secs(1)).len();
    assert_eq!(wakes.load(Ordering::SeqCst), received + late);
}

#[test]
fn cancel_stops_the_running_edit_and_the_worker_goes_on() {
    let (handle, events, _) = spawn(WorkerConfig::default());
    load(&handle, &events);
    let image = input_image();
    handle
        .send(edit_job(1, &image, settings(LONG_EDIT_STEPS, 1)))
        .unwrap();
    until(&events, |e| matches!(e, Event::Step(_)));
    let started = Instant::now();
    handle.cancel(1);
    assert!(started.elapsed() < NON_BLOCKING, "cancel waited");
    let seen = until(&events, |e| {
        matches!(
            e,
            Event::Cancelled { .. } | Event::Finished(_) | Event::Failed { .. }
        )
    });
    assert!(
        matches!(seen.last(), Some(Event::Cancelled { id: 1 })),
        "{seen:#?}"
    );
    assert!(step_count(&seen, 1) + 1 < LONG_EDIT_STEPS);

    // Cancelling an edit that is not running (finished, unknown) changes nothing.
    handle.send(Job::Cancel { id: 1 }).unwrap();
    handle.send(edit_job(2, &image, settings(2, 2))).unwrap();
    let next = until(&events, |e| matches!(e, Event::Finished(_)));
    assert_eq!(finished(&next).id, 2);
    assert!(
        !next.iter().any(|e| matches!(e, Event::Cancelled { .. })),
        "{next:#?}"
    );
}

#[test]
fn a_new_edit_supersedes_the_running_one_without_blocking() {
    let (handle, events, _) = spawn(WorkerConfig::default());
    load(&handle, &events);
    let image = input_image();
    handle
        .send(edit_job(1, &image, settings(LONG_EDIT_STEPS, 1)))
        .unwrap();
    until(&events, |e| matches!(e, Event::Step(_)));
    // Two re-runs in a row while 1 runs: 2 replaces nothing but stops 1; 3 replaces 2 if the
    // thread has not started it yet, or stops it if it has.
    let started = Instant::now();
    handle.send(edit_job(2, &image, settings(2, 2))).unwrap();
    handle.send(edit_job(3, &image, settings(2, 3))).unwrap();
    assert!(started.elapsed() < NON_BLOCKING, "sending an edit waited");
    let seen = until(&events, |e| matches!(e, Event::Finished(_)));
    assert_eq!(finished(&seen).id, 3);
    assert_eq!(handle.edit_in_progress(), None);
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Superseded { id: 1, by: 2 })),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Superseded { id: 2, by: 3 })),
        "{seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Finished(r) if r.id != 3)),
        "{seen:#?}"
    );
}

#[test]
fn failures_are_one_line_events_and_the_worker_recovers() {
    let (handle, events, _) = spawn(WorkerConfig::default());
    let image = input_image();
    handle.send(edit_job(1, &image, settings(2, 0))).unwrap();
    let seen = until(&events, |e| matches!(e, Event::Failed { .. }));
    let Some(Event::Failed { id, message }) = seen.last() else {
        unreachable!()
    };
    assert_eq!(*id, Some(1));
    assert!(message.contains("no model is loaded"), "{message}");

    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("no-such-model");
    let request = ModelRequest::new(
        missing.display().to_string(),
        DeviceChoice::Cpu,
        DTypeChoice::F32,
    );
    handle.send(Job::LoadModel(request)).unwrap();
    let seen = until(&events, |e| matches!(e, Event::Failed { .. }));
    let Some(Event::Failed { id, message }) = seen.last() else {
        unreachable!()
    };
    assert_eq!(*id, None);
    assert!(
        message.contains(&missing.display().to_string()),
        "the message should name the folder: {message}"
    );
    assert!(!message.contains('\n'), "{message}");

    // A folder that is not a model: the error names the missing file.
    let request = ModelRequest::new(
        work.path().display().to_string(),
        DeviceChoice::Cpu,
        DTypeChoice::F32,
    );
    handle.send(Job::LoadModel(request)).unwrap();
    let seen = until(&events, |e| matches!(e, Event::Failed { .. }));
    let Some(Event::Failed { message, .. }) = seen.last() else {
        unreachable!()
    };
    assert!(message.contains("model_index.json"), "{message}");

    // An edit setting out of range fails the edit, not the worker.
    load(&handle, &events);
    handle.send(edit_job(2, &image, settings(0, 0))).unwrap();
    let seen = until(&events, |e| {
        matches!(e, Event::Failed { .. } | Event::Finished(_))
    });
    assert!(
        matches!(seen.last(), Some(Event::Failed { id: Some(2), message }) if message.contains("steps")),
        "{seen:#?}"
    );
    handle.send(edit_job(3, &image, settings(1, 0))).unwrap();
    let seen = until(&events, |e| {
        matches!(e, Event::Failed { .. } | Event::Finished(_))
    });
    assert_eq!(finished(&seen).id, 3);
}

#[test]
fn large_inputs_are_scaled_to_the_edit_size_by_the_worker() {
    let (handle, events, _) = spawn(WorkerConfig::default());
    load(&handle, &events);
    let image = input_image();
    let job = Job::Edit(EditJob {
        id: 1,
        image: Arc::clone(&image),
        max_side: 40,
        settings: settings(1, 0),
        preview_size: None,
    });
    handle.send(job).unwrap();
    let seen = until(&events, |e| {
        matches!(e, Event::Finished(_) | Event::Failed { .. })
    });
    // 64×64 capped at 40 and floored to multiples of 8: 40×40, resized as the CLI does.
    let expected_input = instruct_pix2pix::pipeline::image::resize_lanczos(&image, 40, 40);
    let result = finished(&seen);
    assert_eq!(*result.input, expected_input);
    assert_eq!(result.image.dimensions(), (40, 40));
    assert!(seen.iter().any(|e| matches!(
        e,
        Event::EditStarted {
            width: 40,
            height: 40,
            ..
        }
    )));
    assert!(
        seen.iter()
            .all(|e| !matches!(e, Event::Step(step) if step.preview.is_some()))
    );
}

#[test]
fn a_full_queue_is_an_error_not_a_wait() {
    let config = WorkerConfig {
        job_capacity: 2,
        ..WorkerConfig::default()
    };
    let (handle, events, _) = spawn(config);
    load(&handle, &events);
    let image = input_image();
    handle
        .send(edit_job(1, &image, settings(LONG_EDIT_STEPS, 1)))
        .unwrap();
    until(&events, |e| matches!(e, Event::Step(_)));
    // The thread is busy with the edit: two loads fit in the queue, the third is refused.
    let missing = |n: u32| {
        let request = ModelRequest::new(
            format!("/nonexistent/model-{n}"),
            DeviceChoice::Cpu,
            DTypeChoice::F32,
        );
        Job::LoadModel(request)
    };
    for n in 0..2 {
        let started = Instant::now();
        handle.send(missing(n)).unwrap();
        assert!(started.elapsed() < NON_BLOCKING);
    }
    let started = Instant::now();
    let refused = handle.send(missing(2));
    assert!(started.elapsed() < NON_BLOCKING);
    assert!(
        matches!(refused, Err(WorkerError::QueueFull { capacity: 2, .. })),
        "{refused:?}"
    );
    handle.cancel(1);
    let seen = until(
        &events,
        |e| matches!(e, Event::Failed { message, .. } if message.contains("model-1")),
    );
    assert!(seen.iter().any(|e| matches!(e, Event::Cancelled { id: 1 })));
}

#[test]
fn a_slow_window_loses_steps_but_never_the_result() {
    // Room for one event: while the test does not read, every step finds the channel full.
    let config = WorkerConfig {
        event_capacity: 1,
        ..WorkerConfig::default()
    };
    let (handle, events, _) = spawn(config);
    load(&handle, &events);
    let steps = 30;
    handle
        .send(edit_job(1, &input_image(), settings(steps, 1)))
        .unwrap();
    assert_eq!(handle.edit_in_progress(), Some(1));
    // Wait, without reading, until the edit is done: the thread now waits for room for Finished.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while handle.edit_in_progress().is_some() {
        assert!(Instant::now() < deadline, "the edit did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    let seen = until(&events, |e| matches!(e, Event::Finished(_)));
    // EditStarted filled the channel, so every step was dropped; the result still came.
    assert!(matches!(seen[0], Event::EditStarted { id: 1, .. }));
    assert_eq!(step_count(&seen, 1), 0, "{seen:#?}");
    assert_eq!(finished(&seen).id, 1);
}

#[test]
fn shutdown_cancels_the_edit_and_joins_the_thread() {
    let (handle, events, _) = spawn(WorkerConfig::default());
    load(&handle, &events);
    handle
        .send(edit_job(1, &input_image(), settings(LONG_EDIT_STEPS, 1)))
        .unwrap();
    until(&events, |e| matches!(e, Event::Step(_)));
    let started = Instant::now();
    drop(handle);
    // The edit stops before its next step, so dropping takes about one step, not the edit.
    assert!(started.elapsed() < Duration::from_secs(10));
    let rest = drain(&events, Duration::from_secs(1));
    assert!(
        matches!(rest.last(), Some(Event::Cancelled { id: 1 })),
        "{rest:#?}"
    );
    // The thread has ended: its sender is gone.
    assert!(matches!(
        events.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    ));

    // An explicit Shutdown job stops the thread too; later jobs are refused.
    let (handle, events, _) = spawn(WorkerConfig::default());
    handle.send(Job::Shutdown).unwrap();
    let refused = handle.send(edit_job(2, &input_image(), settings(1, 0)));
    assert!(matches!(refused, Err(WorkerError::Stopped)), "{refused:?}");
    assert!(
        events.recv_timeout(EVENT_TIMEOUT).is_err(),
        "the thread ends without events"
    );
}

#[test]
fn a_panicking_waker_does_not_stop_the_thread() {
    let (handle, events) = Worker::spawn(Arc::new(|| panic!("waker bug"))).unwrap();
    load(&handle, &events);
    handle
        .send(edit_job(1, &input_image(), settings(2, 0)))
        .unwrap();
    let seen = until(&events, |e| {
        matches!(e, Event::Finished(_) | Event::Failed { .. })
    });
    assert_eq!(finished(&seen).id, 1);
}

#[test]
fn drain_stops_at_the_budget_but_takes_at_least_one() {
    let (sender, receiver) = crossbeam_channel::unbounded();
    for id in 0..5 {
        sender.send(Event::Cancelled { id }).unwrap();
    }
    assert_eq!(drain(&receiver, Duration::ZERO).len(), 1);
    let rest = drain(&receiver, Duration::from_secs(10));
    let ids: Vec<_> = rest
        .iter()
        .map(|e| match e {
            Event::Cancelled { id } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert!(drain(&receiver, Duration::from_secs(10)).is_empty());
}

// ---- Cancellable model loads ----

const HUB_REPO: &str = "tester/slow-pix2pix";
const HUB_SHA: &str = "5555555555555555555555555555555555555555";
const HUB_UNET: &str = "unet/diffusion_pytorch_model.safetensors";

/// The fixture model served by a fake Hub whose weight bodies come at 16 KiB per 20 ms (the
/// 2.2 MB UNet takes about 3 s), and a load request for it into `cache`.
fn slow_hub(cache: &std::path::Path) -> (FakeHub, FakeRepo, ModelRequest) {
    let repo = FakeRepo::from_folder(HUB_REPO, HUB_SHA, &fixture_pipeline("sd1-tiny-ancestral"));
    let hub = FakeHub::start(vec![repo.clone()]);
    hub.set_cdn_delay(Duration::from_millis(20));
    let mut request = ModelRequest::new(HUB_REPO, DeviceChoice::Cpu, DTypeChoice::F32);
    request.hub = Some(HubSettings {
        endpoint: hub.endpoint.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
    });
    (hub, repo, request)
}

fn is_load_end(e: &Event) -> bool {
    matches!(
        e,
        Event::ModelLoaded(_) | Event::Failed { id: None, .. } | Event::LoadCancelled { .. }
    )
}

#[test]
fn a_cancelled_download_keeps_the_old_model_and_a_later_load_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let (hub, repo, request) = slow_hub(&cache);
    let (handle, events, _) = spawn(WorkerConfig::default());
    load(&handle, &events);
    let old = handle.loaded_model().expect("the local model is loaded");
    assert_eq!(old.name, model_path());

    handle.send(Job::LoadModel(request.clone())).unwrap();
    // Cancel once the UNet is partly downloaded (its first report past the start).
    let seen = until(
        &events,
        |e| matches!(e, Event::Download { file, done, total, .. } if file == HUB_UNET && *done > 0 && done < total),
    );
    assert!(matches!(&seen[0], Event::ModelLoading { spec } if spec == HUB_REPO));
    let Some(Event::Download {
        file_index,
        file_count,
        overall_done,
        overall_total,
        ..
    }) = seen.last()
    else {
        unreachable!()
    };
    // The configs and tokenizer came first; the three weight files remain.
    assert_eq!((*file_index, *file_count), (10, 12), "{seen:#?}");
    let total: u64 = repo.files.values().map(|c| c.len() as u64).sum();
    assert_eq!(*overall_total, Some(total));
    assert!(overall_done.is_some_and(|done| done < total));
    assert_eq!(
        handle.loaded_model(),
        Some(old.clone()),
        "still the old model"
    );

    let started = Instant::now();
    handle.cancel_load();
    assert!(started.elapsed() < NON_BLOCKING, "cancel_load waited");
    let seen = until(&events, is_load_end);
    assert!(
        matches!(seen.last(), Some(Event::LoadCancelled { spec }) if spec == HUB_REPO),
        "{seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::ModelReleased { .. })),
        "{seen:#?}"
    );
    // The download stopped within a block or two, long before the 3 s the UNet takes.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(handle.loaded_model(), Some(old.clone()));

    // The cut-off UNet waits as a `.part`; the snapshot has no entry for it.
    let repo_dir = cache.join("models--tester--slow-pix2pix");
    let part = repo_dir
        .join("blobs")
        .join(format!("{}.part", content_etag(&repo.files[HUB_UNET])));
    let part_len = std::fs::metadata(&part).expect("a .part blob").len();
    assert!(part_len > 0 && part_len < repo.files[HUB_UNET].len() as u64);
    let snapshot = repo_dir.join("snapshots").join(HUB_SHA);
    assert!(std::fs::symlink_metadata(snapshot.join(HUB_UNET)).is_err());
    assert!(!repo_dir.join("refs").join("main").exists());

    // The old model still edits.
    let image = input_image();
    handle.send(edit_job(1, &image, settings(2, 3))).unwrap();
    let seen = until(&events, |e| {
        matches!(e, Event::Finished(_) | Event::Failed { .. })
    });
    assert_eq!(finished(&seen).id, 1);

    // Loading the same repo again resumes the UNet where it stopped and switches models.
    hub.set_cdn_delay(Duration::ZERO);
    hub.clear_log();
    handle.send(Job::LoadModel(request)).unwrap();
    let seen = until(&events, is_load_end);
    let Some(Event::ModelLoaded(info)) = seen.last() else {
        panic!("{seen:#?}")
    };
    assert_eq!(info.folder, snapshot);
    assert_eq!(handle.loaded_model().as_ref(), Some(info));
    let released = seen
        .iter()
        .position(|e| matches!(e, Event::ModelReleased { spec } if spec == HUB_REPO))
        .expect("ModelReleased");
    let last_download = seen
        .iter()
        .rposition(|e| matches!(e, Event::Download { .. }))
        .expect("downloads");
    assert!(
        last_download < released,
        "released only after the downloads"
    );
    let resumed = format!(
        "CDN GET /cdn/{} bytes={part_len}-",
        content_etag(&repo.files[HUB_UNET])
    );
    assert!(hub.requests().contains(&resumed), "{:#?}", hub.requests());
    assert!(!part.exists());
    let downloads: Vec<(usize, usize)> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Download {
                file_index,
                file_count,
                ..
            } => Some((*file_index, *file_count)),
            _ => None,
        })
        .collect();
    assert!(
        downloads.iter().all(|&(_, count)| count == 3),
        "{downloads:?}"
    );

    handle.send(edit_job(2, &image, settings(2, 3))).unwrap();
    let seen = until(&events, |e| {
        matches!(e, Event::Finished(_) | Event::Failed { .. })
    });
    // The same weights through the Hub cache give the same picture.
    let first = finished(&seen).image.clone();
    assert_eq!(first, edit_directly(&image, &settings(2, 3)));
}

#[test]
fn cancel_load_drops_waiting_loads_too_and_later_loads_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hub, _repo, slow) = slow_hub(&tmp.path().join("hub"));
    let (handle, events, _) = spawn(WorkerConfig::default());
    handle.send(Job::LoadModel(slow)).unwrap();
    let local = ModelRequest::new(model_path(), DeviceChoice::Cpu, DTypeChoice::F32);
    handle.send(Job::LoadModel(local.clone())).unwrap();
    until(&events, |e| matches!(e, Event::Download { .. }));
    handle.cancel_load();
    // A load sent after the cancel is not affected.
    handle.send(Job::LoadModel(local)).unwrap();

    let mut ends = Vec::new();
    while ends.len() < 3 {
        let seen = until(&events, is_load_end);
        ends.push(seen.last().cloned().expect("an event"));
    }
    assert!(
        matches!(&ends[0], Event::LoadCancelled { spec } if spec == HUB_REPO),
        "{ends:#?}"
    );
    assert!(
        matches!(&ends[1], Event::LoadCancelled { spec } if *spec == model_path()),
        "{ends:#?}"
    );
    assert!(matches!(&ends[2], Event::ModelLoaded(_)), "{ends:#?}");
    // No model was loaded before, so none was released.
    assert_eq!(
        handle.loaded_model().map(|info| info.name),
        Some(model_path())
    );
}

#[test]
fn dropping_the_handle_stops_a_download() {
    let tmp = tempfile::tempdir().unwrap();
    let (_hub, _repo, slow) = slow_hub(&tmp.path().join("hub"));
    let (handle, events, _) = spawn(WorkerConfig::default());
    handle.send(Job::LoadModel(slow)).unwrap();
    until(
        &events,
        |e| matches!(e, Event::Download { file, .. } if file == HUB_UNET),
    );
    let started = Instant::now();
    drop(handle);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
