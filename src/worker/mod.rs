//! The model thread: a named background thread that owns the loaded model, takes [`Job`]s and
//! answers with [`Event`]s over bounded channels, so a window can drive edits without ever
//! blocking on them.
//!
//! - Sending never blocks: [`WorkerHandle::send`] uses `try_send` on a small bounded queue and
//!   returns [`WorkerError::QueueFull`] when the thread is too far behind.
//! - Edits are "latest wins", for slider re-runs: a new edit cancels the running one (reported as
//!   [`Event::Superseded`]) and replaces one that has not started yet. Edits therefore wait in a
//!   one-slot mailbox, not in the queue; the queue carries model loads, shutdown and a wake-up.
//! - A folder job ([`Job::EditFolder`]: one edit applied to every image of a folder, results
//!   written as PNGs, see [`crate::pipeline::folder`]) shares the edits' mailbox and cancel:
//!   [`Event::FolderStarted`], [`Event::FolderProgress`] after each step (with the time left),
//!   then [`Event::FolderFinished`] with what was written and which files were skipped.
//! - Cancelling never waits behind the queue: the running edit's cancel flag lives in state shared
//!   with the handle and is checked by the edit before every denoising step.
//! - After every event it sends, the thread calls the waker, so the window repaints only when
//!   something arrived. Step and download events are dropped when the event channel is full (the
//!   window is slow; the next one carries newer news); every other event is always delivered,
//!   waiting for room when needed.
//! - Failures become [`Event::Failed`] with one line; a panic inside a job is caught and reported
//!   the same way, and the thread goes on.
//! - Model loads download first and release the old model only then, so a cancelled or failed
//!   download leaves the old model usable while memory still holds one model at a time:
//!   [`Event::ModelLoading`], [`Event::Download`]s, then [`Event::ModelReleased`] and
//!   [`Event::ModelLoaded`]. [`WorkerHandle::cancel_load`] works like the edit cancel, outside
//!   the queue: it stops the running download (within one block of bytes) and drops the loads
//!   still waiting, each answered [`Event::LoadCancelled`]. Reading the weights (after
//!   `ModelReleased`) cannot be interrupted.
//! - Dropping the [`WorkerHandle`] cancels the running edit and download and joins the thread; a
//!   drop while weights are being read waits for that to end.
//!
//! The worker is also the window's only way down: it re-exports the plain settings, defaults and
//! image-file functions the window needs (none of them names a tensor type), [`catalog`] lists
//! the models at hand, and [`training`] runs fine-tuning and checks its datasets.

pub mod catalog;
pub mod protocol;
pub mod training;

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::DType;
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use image::RgbImage;

pub use protocol::{
    EditJob, EditResult, Event, FolderJob, FolderProgress, FolderReport, Job, JobId, ModelInfo,
    ModelRequest, StepProgress,
};

// The window's only way down: plain data, defaults and file work, none of it naming a tensor
// type, so `gui/` uses `crate::worker` and nothing else of the crate.
pub use crate::model::device::{DTypeChoice, DeviceChoice};
pub use crate::model::hub::{DEFAULT_REPO, HubSettings};
pub use crate::model::lora::{DEFAULT_LORA_SCALE, LoraChoice, MAX_LORA_SCALE};
pub use crate::pipeline::folder::human_duration;

/// Whether a model spec names a single-file checkpoint (by its extension): what a config folder
/// applies to.
pub fn is_single_file(spec: &str) -> bool {
    crate::model::single_file::is_single_file_name(std::path::Path::new(spec.trim()))
}
pub use crate::pipeline::image::{
    INPUT_EXTENSIONS, edit_size, load_image, read_png_text, save_image,
};
pub use crate::pipeline::metadata::EditRecord;
pub use crate::pipeline::scheduler::SchedulerKind;
pub use crate::pipeline::settings::{
    DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, DEFAULT_MAX_SIDE, DEFAULT_STEPS,
    EditSettings,
};

use crate::model::device::{device_label, device_memory, select_device};
use crate::model::hub::{HubError, ModelSpec, Variant};
use crate::model::{LoadError, LoadOptions, LocalModel};
use crate::pipeline::edit::{EditError, EditPipeline, StepInfo};
use crate::pipeline::folder::{
    FolderRequest, FolderStop, FolderUpdate, one_line, plan_folder, recorded_settings, run_folder,
    settings_differences,
};
use crate::pipeline::image::resize_lanczos;

/// Called by the model thread after each event it sends (e.g. egui's `Context::request_repaint`).
/// It runs on the model thread, so it should return quickly.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The model thread's name, as debuggers and panic messages show it.
pub const THREAD_NAME: &str = "ip2p-model";

/// Why a job could not be handed to the model thread.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "the model thread is busy: {capacity} jobs are already waiting, so this {job} was not queued; try again when it has caught up"
    )]
    QueueFull { job: &'static str, capacity: usize },
    #[error("the model thread has stopped; no more jobs are taken")]
    Stopped,
    #[error("cannot start the model thread: {0}")]
    Spawn(std::io::Error),
}

/// Channel sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Model loads (and wake-ups) that may wait; more are refused with [`WorkerError::QueueFull`].
    pub job_capacity: usize,
    /// Events that may wait for the window; beyond this step and download events are dropped.
    pub event_capacity: usize,
    /// Run the model (and the compute pool) at a lower priority than the window.
    pub background_priority: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            job_capacity: 8,
            event_capacity: 64,
            background_priority: true,
        }
    }
}

/// Lowers the priority of the calling thread and of the compute pool's threads (where the
/// platform allows; Linux here), so that a window drawing on a CPU the model keeps busy still gets
/// its frames on time. An edit alone on the machine runs as fast as before.
fn run_in_background() {
    lower_thread_priority();
    // The pool the CPU kernels, gemm and candle run on; if something already started it, its
    // threads keep their priority.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("ip2p-compute-{i}"))
        .start_handler(|_| lower_thread_priority())
        .build_global();
}

/// Nice value of the model's threads (0 is normal, 19 the lowest).
const BACKGROUND_NICE: i32 = 10;

#[cfg(target_os = "linux")]
fn lower_thread_priority() {
    // On Linux a thread is a task with its own nice value; `who = 0` is the calling thread.
    // SAFETY: setpriority only reads its integer arguments.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE);
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_thread_priority() {
    // Elsewhere the priority is left as is (std has no per-thread priority call): the window
    // then shares the CPU evenly with the model.
    let _ = BACKGROUND_NICE;
}

/// Starts model threads.
pub struct Worker;

impl Worker {
    /// Starts the model thread with the default channel sizes. Returns the handle that sends it
    /// jobs and the receiver of its events.
    pub fn spawn(waker: Waker) -> Result<(WorkerHandle, Receiver<Event>), WorkerError> {
        Self::spawn_with(WorkerConfig::default(), waker)
    }

    /// [`Worker::spawn`] with chosen channel sizes (each at least 1).
    pub fn spawn_with(
        config: WorkerConfig,
        waker: Waker,
    ) -> Result<(WorkerHandle, Receiver<Event>), WorkerError> {
        let job_capacity = config.job_capacity.max(1);
        let (job_sender, job_receiver) = crossbeam_channel::bounded(job_capacity);
        let (event_sender, event_receiver) =
            crossbeam_channel::bounded(config.event_capacity.max(1));
        let shared = Arc::new(Shared::default());
        let mut model_thread = ModelThread {
            jobs: job_receiver,
            outbox: Outbox {
                events: event_sender,
                waker,
                shared: Arc::clone(&shared),
            },
            pipeline: None,
            scaled: None,
        };
        let background = config.background_priority;
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                if background {
                    run_in_background();
                }
                model_thread.run()
            })
            .map_err(WorkerError::Spawn)?;
        let handle = WorkerHandle {
            jobs: Some(job_sender),
            job_capacity,
            shared,
            thread: Some(thread),
        };
        Ok((handle, event_receiver))
    }
}

/// Takes events until the channel is empty or `budget` is spent (at least one when one is
/// waiting), so a frame never spends long on a burst of events. Call it every frame.
pub fn drain(events: &Receiver<Event>, budget: Duration) -> Vec<Event> {
    let started = Instant::now();
    let mut taken = Vec::new();
    while let Ok(event) = events.try_recv() {
        taken.push(event);
        if started.elapsed() >= budget {
            break;
        }
    }
    taken
}

/// The window's side: sends jobs, cancels edits; dropping it stops the thread.
pub struct WorkerHandle {
    /// `None` once dropped, which disconnects the queue.
    jobs: Option<Sender<Queued>>,
    job_capacity: usize,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Hands a job to the model thread without blocking.
    ///
    /// - [`Job::Edit`]: replaces an edit that has not started yet (it gets
    ///   [`Event::Superseded`]) and cancels the running one (also `Superseded`): latest wins.
    /// - [`Job::EditFolder`]: the same, in the same mailbox (a folder job stopped this way ends
    ///   with its [`Event::FolderFinished`], cancelled).
    /// - [`Job::Cancel`]: as [`WorkerHandle::cancel`].
    /// - [`Job::LoadModel`]: queued behind earlier loads; refused when the queue is full.
    /// - [`Job::Shutdown`]: cancels everything and stops the thread; later sends fail.
    pub fn send(&self, job: Job) -> Result<(), WorkerError> {
        if self.shared.shutdown.load(Ordering::Acquire) {
            return Err(WorkerError::Stopped);
        }
        match job {
            Job::Cancel { id } => {
                self.cancel(id);
                Ok(())
            }
            Job::Shutdown => {
                self.begin_shutdown();
                Ok(())
            }
            Job::LoadModel(request) => {
                let seq = self.shared.next_load.fetch_add(1, Ordering::AcqRel);
                self.enqueue(Queued::Load(Box::new(request), seq), "model load")
            }
            Job::Edit(edit) => self.submit_edit(Work::Edit(edit)),
            Job::EditFolder(folder) => self.submit_edit(Work::Folder(folder)),
        }
    }

    /// Stops edit `id`: the running edit stops before its next step ([`Event::Cancelled`]); an
    /// edit still waiting is dropped (also `Cancelled`). Unknown or finished ids are ignored.
    pub fn cancel(&self, id: JobId) {
        let mut state = self.shared.lock();
        if let Some(running) = &state.running
            && running.id == id
        {
            running.cancel.store(true, Ordering::Release);
        } else if state
            .pending
            .as_ref()
            .is_some_and(|pending| pending.id() == id)
        {
            // A waiting edit always has a wake-up queued, which reports this.
            state.pending = None;
            state.notices.push(Event::Cancelled { id });
        }
    }

    /// Stops every model load sent before this call: the running download stops within one
    /// block of bytes, loads still waiting are dropped; each is answered
    /// [`Event::LoadCancelled`] and the model loaded before stays loaded. A load whose files are
    /// all downloaded already (after [`Event::ModelReleased`]) is past cancelling and completes.
    /// Loads sent after this call are not affected. Never blocks.
    pub fn cancel_load(&self) {
        let mut state = self.shared.lock();
        state.cancel_loads_before = self.shared.next_load.load(Ordering::Acquire);
        if let Some(cancel) = &state.running_load {
            cancel.store(true, Ordering::Release);
        }
    }

    /// The model edits run with now, `None` when none is loaded (never loaded, or released for
    /// a load that then failed). Changes as [`Event::ModelLoaded`] and [`Event::ModelReleased`]
    /// are sent.
    pub fn loaded_model(&self) -> Option<ModelInfo> {
        self.shared.lock().loaded.clone()
    }

    /// The edit the thread is running, else the one waiting to start, else `None` (its last
    /// events may still be on their way). For a window choosing between Generate and Cancel.
    pub fn edit_in_progress(&self) -> Option<JobId> {
        let state = self.shared.lock();
        state
            .running
            .as_ref()
            .map(|running| running.id)
            .or(state.pending.as_ref().map(Work::id))
    }

    /// Stops the thread and waits for it (the same as dropping the handle).
    pub fn shutdown(self) {}

    fn submit_edit(&self, edit: Work) -> Result<(), WorkerError> {
        let mut state = self.shared.lock();
        let new_id = edit.id();
        match state.pending.take() {
            Some(replaced) => {
                // Its wake-up is still queued and will start `edit` instead.
                state.notices.push(Event::Superseded {
                    id: replaced.id(),
                    by: new_id,
                });
                state.pending = Some(edit);
            }
            None => {
                self.enqueue(Queued::EditReady, "edit")?;
                state.pending = Some(edit);
            }
        }
        if let Some(running) = &mut state.running {
            // The first newer edit is the one that stopped it.
            running.superseded_by.get_or_insert(new_id);
            running.cancel.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn enqueue(&self, queued: Queued, job: &'static str) -> Result<(), WorkerError> {
        let Some(jobs) = &self.jobs else {
            return Err(WorkerError::Stopped);
        };
        jobs.try_send(queued).map_err(|error| match error {
            TrySendError::Full(_) => WorkerError::QueueFull {
                job,
                capacity: self.job_capacity,
            },
            TrySendError::Disconnected(_) => WorkerError::Stopped,
        })
    }

    fn begin_shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let mut state = self.shared.lock();
        state.pending = None;
        if let Some(running) = &state.running {
            running.cancel.store(true, Ordering::Release);
        }
        if let Some(cancel) = &state.running_load {
            cancel.store(true, Ordering::Release);
        }
        drop(state);
        // When the queue is full the thread is awake and sees the flag after its current job.
        if let Some(jobs) = &self.jobs {
            let _ = jobs.try_send(Queued::Shutdown);
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.begin_shutdown();
        // Disconnecting the queue wakes a thread waiting for work.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            // The thread catches panics in jobs; an error here would be one outside them, with
            // nothing left to report it to.
            let _ = thread.join();
        }
    }
}

/// What travels in the job queue. Edits wait in [`State::pending`]; `EditReady` wakes the thread
/// for them.
enum Queued {
    /// A load and its sequence number (for [`WorkerHandle::cancel_load`]).
    Load(Box<ModelRequest>, u64),
    EditReady,
    Shutdown,
}

/// State shared by the handle and the thread.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    shutdown: AtomicBool,
    /// The sequence number the next load sent gets.
    next_load: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What waits in the edit mailbox.
enum Work {
    Edit(EditJob),
    Folder(FolderJob),
}

impl Work {
    fn id(&self) -> JobId {
        match self {
            Work::Edit(job) => job.id,
            Work::Folder(job) => job.id,
        }
    }
}

#[derive(Default)]
struct State {
    running: Option<RunningEdit>,
    /// The edit (or folder job) to start next (at most one: latest wins).
    pending: Option<Work>,
    /// Events about edits that never started, sent by the thread at its next wake-up.
    notices: Vec<Event>,
    /// Loads with a smaller sequence number are cancelled.
    cancel_loads_before: u64,
    /// The cancel flag of the load being downloaded.
    running_load: Option<Arc<AtomicBool>>,
    /// The model edits run with.
    loaded: Option<ModelInfo>,
}

struct RunningEdit {
    id: JobId,
    cancel: Arc<AtomicBool>,
    /// Set when a newer edit cancelled this one.
    superseded_by: Option<JobId>,
}

/// Sends events and wakes the window.
struct Outbox {
    events: Sender<Event>,
    waker: Waker,
    shared: Arc<Shared>,
}

impl Outbox {
    /// Delivers `event`, waiting for room while the window is behind (but not once shutting
    /// down, when nobody may be reading any more).
    fn deliver(&self, mut event: Event) {
        loop {
            match self.events.send_timeout(event, Duration::from_millis(50)) {
                Ok(()) => {
                    self.wake();
                    return;
                }
                Err(SendTimeoutError::Timeout(unsent)) => {
                    if self.shared.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    event = unsent;
                }
                Err(SendTimeoutError::Disconnected(_)) => return,
            }
        }
    }

    /// Sends `event` if there is room; progress news is dropped otherwise.
    fn offer(&self, event: Event) {
        if self.events.try_send(event).is_ok() {
            self.wake();
        }
    }

    /// Calls the window's waker; a panic in it is the window's bug and must not stop the thread
    /// (the panic hook has already printed it).
    fn wake(&self) {
        let _ = catch_unwind(AssertUnwindSafe(|| (self.waker)()));
    }

    fn has_room(&self) -> bool {
        !self.events.is_full()
    }
}

/// The input scaled to the edit size, kept so re-runs with the same image skip the resize.
struct ScaledInput {
    original: Arc<RgbImage>,
    max_side: u32,
    multiple: u32,
    scaled: Arc<RgbImage>,
}

/// How an edit ended short of a result.
enum EditFailure {
    Cancelled,
    Message(String),
}

/// The thread's side: owns the model.
struct ModelThread {
    jobs: Receiver<Queued>,
    outbox: Outbox,
    pipeline: Option<EditPipeline>,
    scaled: Option<ScaledInput>,
}

impl ModelThread {
    fn run(&mut self) {
        while let Ok(queued) = self.jobs.recv() {
            if self.outbox.shared.shutdown.load(Ordering::Acquire) {
                break;
            }
            match queued {
                Queued::Load(request, seq) => self.load(*request, seq),
                Queued::EditReady => self.next_edit(),
                Queued::Shutdown => break,
            }
        }
    }

    /// Downloads (cancellably), then releases the old model, then reads the new one, so memory
    /// never holds two models and a cancelled download leaves the old one usable.
    fn load(&mut self, request: ModelRequest, seq: u64) {
        let cancel = {
            let mut state = self.outbox.shared.lock();
            if seq < state.cancel_loads_before {
                None
            } else {
                let cancel = Arc::new(AtomicBool::new(false));
                state.running_load = Some(Arc::clone(&cancel));
                Some(cancel)
            }
        };
        let spec = request.spec.clone();
        let Some(cancel) = cancel else {
            self.outbox.deliver(Event::LoadCancelled { spec });
            return;
        };
        self.outbox
            .deliver(Event::ModelLoading { spec: spec.clone() });
        let outbox = &self.outbox;
        let prepared = catch_unwind(AssertUnwindSafe(|| prepare_load(&request, outbox, &cancel)));
        // Past this point a cancel is too late: take the flag away first, then look at it once.
        self.outbox.shared.lock().running_load = None;
        let prepared = match prepared {
            Ok(Ok(_)) if cancel.load(Ordering::Acquire) => Err(LoadEnd::Cancelled),
            Ok(prepared) => prepared,
            Err(panic) => Err(LoadEnd::Failed(crashed(&spec, &panic))),
        };
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(LoadEnd::Cancelled) => {
                self.outbox.deliver(Event::LoadCancelled { spec });
                return;
            }
            Err(LoadEnd::Failed(message)) => {
                self.outbox.deliver(Event::Failed { id: None, message });
                return;
            }
        };

        // Release the old model first: two full models at once may not fit in memory.
        let had_model = self.pipeline.take().is_some();
        self.scaled = None;
        self.outbox.shared.lock().loaded = None;
        if had_model {
            self.outbox
                .deliver(Event::ModelReleased { spec: spec.clone() });
        }
        let loaded = catch_unwind(AssertUnwindSafe(|| finish_load(&request, prepared)));
        match loaded {
            Ok(Ok((pipeline, info))) => {
                self.pipeline = Some(pipeline);
                self.outbox.shared.lock().loaded = Some(info.clone());
                self.outbox.deliver(Event::ModelLoaded(info));
            }
            Ok(Err(message)) => self.outbox.deliver(Event::Failed { id: None, message }),
            Err(panic) => self.outbox.deliver(Event::Failed {
                id: None,
                message: crashed(&spec, &panic),
            }),
        }
    }

    /// Starts the waiting edit or folder job, if any, after reporting edits that never started.
    fn next_edit(&mut self) {
        let (work, cancel, notices) = {
            let mut state = self.outbox.shared.lock();
            let notices = std::mem::take(&mut state.notices);
            let work = state.pending.take();
            let cancel = Arc::new(AtomicBool::new(false));
            if let Some(work) = &work {
                state.running = Some(RunningEdit {
                    id: work.id(),
                    cancel: Arc::clone(&cancel),
                    superseded_by: None,
                });
            }
            (work, cancel, notices)
        };
        for notice in notices {
            self.outbox.deliver(notice);
        }
        let Some(work) = work else { return };
        let id = work.id();
        let outcome = catch_unwind(AssertUnwindSafe(|| match work {
            Work::Edit(job) => self
                .edit(job, &cancel)
                .map(|result| Event::Finished(Box::new(result))),
            Work::Folder(job) => self.edit_folder(job, &cancel),
        }));
        let superseded_by = self
            .outbox
            .shared
            .lock()
            .running
            .take()
            .and_then(|running| running.superseded_by);
        let last = match outcome {
            Ok(Ok(event)) => event,
            Ok(Err(EditFailure::Cancelled)) => match superseded_by {
                Some(by) => Event::Superseded { id, by },
                None => Event::Cancelled { id },
            },
            Ok(Err(EditFailure::Message(message))) => Event::Failed {
                id: Some(id),
                message,
            },
            Err(panic) => {
                // The caches may be half written; start the next edit from scratch.
                if let Some(pipeline) = &mut self.pipeline {
                    pipeline.clear_caches();
                }
                self.scaled = None;
                Event::Failed {
                    id: Some(id),
                    message: format!(
                        "the edit crashed (internal error): {}",
                        panic_message(&panic)
                    ),
                }
            }
        };
        self.outbox.deliver(last);
    }

    /// Runs a folder job; its last event is [`Event::FolderFinished`], or [`Event::Failed`] when
    /// the folder could not be listed.
    fn edit_folder(&mut self, job: FolderJob, cancel: &AtomicBool) -> Result<Event, EditFailure> {
        let Some(pipeline) = self.pipeline.as_mut() else {
            return Err(EditFailure::Message(
                "no model is loaded: load a model before editing".into(),
            ));
        };
        let plan = plan_folder(&job.input_dir, &job.output_dir, 1)
            .map_err(|error| EditFailure::Message(one_line(&error)))?;
        let recorded = recorded_settings(&plan);
        let mut settings = job.settings;
        if job.random_seed {
            settings.seed = recorded
                .as_ref()
                .map_or_else(|| u64::from(rand::random::<u32>()), |record| record.seed);
        }
        let warning = recorded.and_then(|record| {
            let differences = settings_differences(&record, &settings, 1);
            (!differences.is_empty()).then(|| {
                format!(
                    "the {} results already in {} were made with other settings ({}) and are kept \
                     as they are",
                    plan.done.len(),
                    plan.output_dir.display(),
                    differences.join(", ")
                )
            })
        });
        let (model, dtype) = self
            .outbox
            .shared
            .lock()
            .loaded
            .as_ref()
            .map(|info| (info.name.clone(), info.dtype.clone()))
            .unwrap_or_default();
        let outbox = &self.outbox;
        let total = plan.todo.len();
        outbox.deliver(Event::FolderStarted {
            id: job.id,
            seed: settings.seed,
            total,
            already_done: plan.done.len(),
            ignored: plan.ignored.len(),
        });
        let request = FolderRequest {
            settings: &settings,
            max_side: job.max_side,
            model: &model,
            dtype: &dtype,
        };
        let mut on_update = |update: FolderUpdate<'_>| {
            if let FolderUpdate::Progress(progress) = update
                && outbox.has_room()
            {
                outbox.offer(Event::FolderProgress(FolderProgress {
                    id: job.id,
                    done: progress.files_done,
                    total: progress.files_total,
                    current: progress
                        .current
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    step: progress.step,
                    steps: progress.steps,
                    eta: progress.eta,
                }));
            }
        };
        let summary = run_folder(pipeline, &plan, &request, &mut on_update, cancel);
        let (cancelled, error) = match &summary.stopped {
            None => (false, None),
            Some(FolderStop::Cancelled) => (true, None),
            Some(FolderStop::Error(error)) => (false, Some(one_line(error))),
        };
        Ok(Event::FolderFinished(Box::new(FolderReport {
            id: job.id,
            output_dir: plan.output_dir.clone(),
            edited: summary.edited,
            total,
            already_done: summary.already_done,
            skipped: summary
                .failed
                .iter()
                .map(|failed| {
                    let name = failed
                        .input
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (name, failed.reason.clone())
                })
                .collect(),
            not_reached: summary.not_reached,
            cancelled,
            error,
            prompt_encodings: summary.prompt_encodings,
            seed: settings.seed,
            warning,
            elapsed: summary.elapsed,
        })))
    }

    fn edit(&mut self, job: EditJob, cancel: &AtomicBool) -> Result<EditResult, EditFailure> {
        let Some(pipeline) = self.pipeline.as_mut() else {
            return Err(EditFailure::Message(
                "no model is loaded: load a model before editing".into(),
            ));
        };
        let input = scale_input(
            &mut self.scaled,
            &job.image,
            job.max_side,
            pipeline.size_multiple(),
        )?;
        let outbox = &self.outbox;
        outbox.deliver(Event::EditStarted {
            id: job.id,
            width: input.width(),
            height: input.height(),
        });
        let mut on_step = |info: &StepInfo<'_>| {
            // A full channel means the window is behind: skip this step, previews included.
            if !outbox.has_room() {
                return;
            }
            let remaining = info.total.saturating_sub(info.step) as f64;
            let eta = if info.step == 0 {
                Duration::ZERO
            } else {
                info.elapsed.mul_f64(remaining / info.step as f64)
            };
            // A preview that cannot be made only costs the picture, not the edit.
            let preview = job
                .preview_size
                .and_then(|(width, height)| info.preview(width, height).ok());
            outbox.offer(Event::Step(StepProgress {
                id: job.id,
                step: info.step,
                total: info.total,
                elapsed: info.elapsed,
                eta,
                preview,
            }));
        };
        let result = pipeline.edit(&input, &job.settings, &mut on_step, cancel);
        let memory = device_memory(&pipeline.model().device);
        match result {
            Ok(output) => Ok(EditResult {
                id: job.id,
                image: output.image,
                input,
                seed: output.seed,
                settings: job.settings,
                reused_prompt_embeddings: output.reused_prompt_embeddings,
                reused_image_latents: output.reused_image_latents,
                denoise_time: output.denoise_time,
                total_time: output.total_time,
                memory,
            }),
            Err(EditError::Cancelled) => Err(EditFailure::Cancelled),
            Err(error) => Err(EditFailure::Message(one_line(&error))),
        }
    }
}

/// The input at the edit size, from the cache when the same image and cap come again.
fn scale_input(
    cache: &mut Option<ScaledInput>,
    image: &Arc<RgbImage>,
    max_side: u32,
    multiple: u32,
) -> Result<Arc<RgbImage>, EditFailure> {
    if let Some(cached) = cache
        && Arc::ptr_eq(&cached.original, image)
        && cached.max_side == max_side
        && cached.multiple == multiple
    {
        return Ok(Arc::clone(&cached.scaled));
    }
    let (width, height) = image.dimensions();
    let (edit_width, edit_height) = edit_size(width, height, max_side, multiple)
        .map_err(|error| EditFailure::Message(one_line(&error)))?;
    let scaled = if (edit_width, edit_height) == (width, height) {
        Arc::clone(image)
    } else {
        Arc::new(resize_lanczos(image, edit_width, edit_height))
    };
    *cache = Some(ScaledInput {
        original: Arc::clone(image),
        max_side,
        multiple,
        scaled: Arc::clone(&scaled),
    });
    Ok(scaled)
}

/// How a load ended before its weights were read.
enum LoadEnd {
    Cancelled,
    /// One line for the user.
    Failed(String),
}

/// A load whose files are all present, ready to be read.
struct PreparedLoad {
    model: crate::model::PreparedModel,
    device: candle_core::Device,
    warning: Option<String>,
}

/// Names the model in a message unless it already does (most errors name the folder or repo).
fn load_failed(request: &ModelRequest, error: &dyn std::error::Error) -> String {
    let message = one_line(error);
    if message.contains(request.spec.trim()) {
        message
    } else {
        format!("cannot load {}: {message}", request.spec)
    }
}

fn crashed(spec: &str, panic: &Box<dyn Any + Send>) -> String {
    format!(
        "loading {spec} crashed (internal error): {}",
        panic_message(panic)
    )
}

/// Resolves the model as the command line does and makes its files present (downloading them,
/// reported as [`Event::Download`], stopped by `cancel`); the old model is untouched.
fn prepare_load(
    request: &ModelRequest,
    outbox: &Outbox,
    cancel: &AtomicBool,
) -> Result<PreparedLoad, LoadEnd> {
    let failed = |error: &dyn std::error::Error| LoadEnd::Failed(load_failed(request, error));
    let device = select_device(request.device).map_err(|e| failed(&e))?;
    let warning = request.dtype.check_on(&device).map_err(|e| failed(&e))?;
    let dtype = request.dtype.load_dtype(&device);
    let variant = if dtype == DType::F16 {
        Variant::Fp16
    } else {
        Variant::Default
    };
    let spec =
        ModelSpec::parse(&request.spec, request.revision.as_deref()).map_err(|e| failed(&e))?;
    let config = request
        .config
        .as_deref()
        .map(|c| ModelSpec::parse(c, None))
        .transpose()
        .map_err(|e| failed(&e))?;
    let hub = request.hub.clone().unwrap_or_else(HubSettings::from_env);
    let mut on_progress = |progress: &crate::model::hub::DownloadProgress| {
        outbox.offer(Event::Download {
            file: progress.file.clone(),
            done: progress.bytes_done,
            total: progress.bytes_total,
            file_index: progress.file_index,
            file_count: progress.file_count,
            overall_done: progress.overall_done,
            overall_total: progress.overall_total,
        });
    };
    let local = match LocalModel::fetch(
        &spec,
        config.as_ref(),
        variant,
        &hub,
        &mut on_progress,
        cancel,
    ) {
        Ok(local) => local,
        Err(LoadError::Hub(error)) if matches!(*error, HubError::Cancelled { .. }) => {
            return Err(LoadEnd::Cancelled);
        }
        Err(error) => return Err(failed(&error)),
    };
    // Checked before the old model is released: a model of the wrong kind, or a LoRA that does
    // not fit it, leaves the old one in use.
    let options = LoadOptions {
        variant,
        dtype,
        device: device.clone(),
    };
    let mut model = local
        .prepare(&options, &request.loras)
        .map_err(|e| failed(&e))?;
    if request.dtype.chooses_at_load(&device) {
        model.choose_cpu_precision().map_err(|e| failed(&e))?;
    }
    Ok(PreparedLoad {
        model,
        device,
        warning,
    })
}

/// Reads the weights of a prepared load; the error is one line.
fn finish_load(
    request: &ModelRequest,
    prepared: PreparedLoad,
) -> Result<(EditPipeline, ModelInfo), String> {
    let failed = |error: &dyn std::error::Error| load_failed(request, error);
    let model = prepared.model.load().map_err(|e| failed(&e))?;
    let (folder, ema) = match &model.single_file {
        Some(file) => (file.path.clone(), Some(file.ema)),
        None => (model.folder.clone(), None),
    };
    let pipeline = EditPipeline::new(model).map_err(|e| failed(&e))?;
    let info = ModelInfo {
        name: request.spec.clone(),
        folder,
        device: device_label(&prepared.device),
        dtype: pipeline.model().precision_label().to_string(),
        size_multiple: pipeline.size_multiple(),
        warning: prepared.warning,
        loras: request.loras.clone(),
        ema,
        memory: device_memory(&prepared.device),
    };
    Ok((pipeline, info))
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    } else {
        "a panic without a message".into()
    }
}
