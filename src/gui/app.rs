//! The editor's state and what happens to it: opening images, sending edits to the model thread,
//! taking in its events, history, the guidance explorer, saving. Drawing lives in
//! [`super::panels`] and [`super::dialogs`], which read this state; [`super::frame`] runs one
//! frame. The state's own types are in [`super::state`], the frame-time recorder in
//! [`super::frame_stats`] and the unattended start in [`super::autopilot`].
//!
//! State is split the way egui's demo app does it: [`Settings`] is what persists, everything else
//! is this run's (loaded textures, history, the running edit).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use egui::TextureHandle;
use image::RgbImage;

use crate::worker::catalog::{CatalogEntry, model_at_hand};
use crate::worker::{
    self, EditJob, EditRecord, EditResult, EditSettings, Event, FolderJob, HubSettings, Job, JobId,
    LoraChoice, ModelInfo, ModelRequest, StepProgress, Worker, WorkerHandle, edit_size,
};

use super::autopilot::{Autopilot, AutopilotStep, EditorReadiness};
use super::explorer::Explorer;
use super::finetune::{FineTune, FineTuneAction};
use super::folder::{FolderAction, FolderDialog};
use super::frame_stats::FrameRecorder;
use super::settings::{Settings, SettingsStore};
use super::state::{
    DialogState, DownloadStatus, HistoryEntry, InputImage, LoadFailure, Loading, Notice, Purpose,
    RunningEdit,
};
use super::tasks::{FilePurpose, FolderPurpose, OpenedImage, TaskEvent, Tasks};
use super::textures::{IMAGE_TEXTURE, display_image, to_color_image};
use super::viewer::ViewerState;

/// How many earlier inputs "Undo input" can bring back.
const MAX_UNDO_INPUTS: usize = 20;

/// How long one frame may spend taking in events before drawing.
const EVENT_BUDGET: Duration = Duration::from_millis(8);

/// How the window starts: a model, an image and an instruction to begin with, and the unattended
/// mode used by the real-window test (edit, screenshot, quit).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Replaces the remembered model.
    pub model: Option<String>,
    /// The config folder or repo of a single-file `model` (the model manager's field).
    pub config: Option<String>,
    /// LoRAs fused into the models loaded (the model manager's list).
    pub loras: Vec<LoraChoice>,
    pub image: Option<PathBuf>,
    pub prompt: Option<String>,
    /// Start an edit as soon as the model and the image are ready.
    pub generate: bool,
    /// After the first result (or, without `generate`, once the image shows), save a screenshot
    /// of the window here.
    pub screenshot: Option<PathBuf>,
    /// Close the window once the screenshot is written.
    pub exit_after_screenshot: bool,
    /// At exit, write frame-time statistics (JSON) here.
    pub frame_stats: Option<PathBuf>,
    /// While measuring frame times, redraw this often during an edit (as while a slider is
    /// dragged); 0 redraws only when something arrives, as normally.
    pub redraw_fps: u32,
    /// Where settings persist; None keeps them for this run only.
    pub settings_store: Option<SettingsStore>,
    /// The Hub and cache to use; None reads the `HF_*` environment variables.
    pub hub: Option<HubSettings>,
}

/// The editor window.
pub struct EditorApp {
    pub settings: Settings,
    pub store: Option<SettingsStore>,
    /// The instruction being typed.
    pub prompt: String,
    /// The model edits run with; it stays while another one downloads.
    pub model: Option<ModelInfo>,
    pub loading: Option<Loading>,
    pub load_failure: Option<LoadFailure>,
    /// What the model manager lists (cached repos and known folders), newest listing.
    pub catalog: Vec<CatalogEntry>,
    /// The number of the newest listing asked for, and of the one `catalog` holds.
    catalog_requested: u64,
    catalog_shown: u64,
    pub input: Option<InputImage>,
    /// Earlier inputs, for "Undo input".
    pub input_stack: Vec<InputImage>,
    pub running: Option<RunningEdit>,
    /// The running edit's latest latent preview.
    pub preview: Option<TextureHandle>,
    pub history: Vec<HistoryEntry>,
    /// The history entry in view; None shows the input.
    pub selected: Option<usize>,
    pub viewer: ViewerState,
    pub notices: Vec<Notice>,
    pub explorer: Explorer,
    /// Re-run the edit when a slider or the seed changes after a result.
    pub rerun_on_change: bool,
    /// Frame times, written at exit when `--frame-stats` asks.
    pub frames: FrameRecorder,
    pub ui_state: DialogState,
    /// The "Fine-tune on folder" dialog and its run.
    pub finetune: FineTune,
    /// The "Apply to folder…" dialog and its run.
    pub folder: FolderDialog,

    ctx: egui::Context,
    worker: Option<WorkerHandle>,
    events: Receiver<Event>,
    pub(crate) tasks: Tasks,
    task_events: Receiver<TaskEvent>,
    next_job: JobId,
    options: StartOptions,
    autopilot: Autopilot,
}

impl EditorApp {
    /// The app for eframe: settings from the store named in `options` (the user's by default).
    pub fn new(cc: &eframe::CreationContext<'_>, options: StartOptions) -> Self {
        Self::with_context(cc.egui_ctx.clone(), options)
    }

    /// The app on any egui context (tests drive it through egui_kittest).
    pub fn with_context(ctx: egui::Context, options: StartOptions) -> Self {
        let waker_ctx = ctx.clone();
        let waker: worker::Waker = Arc::new(move || waker_ctx.request_repaint());
        let (tasks, task_events) = Tasks::new(waker.clone());
        let mut notices = Vec::new();
        let (mut settings, store) = match &options.settings_store {
            Some(store) => {
                let (settings, error) = store.load();
                if let Some(error) = error {
                    notices.push(Notice {
                        text: error.to_string(),
                        is_error: true,
                    });
                }
                (settings, Some(store.clone()))
            }
            None => (Settings::default(), None),
        };
        if let Some(model) = &options.model {
            settings.model = model.clone();
        }
        let (worker, events) = match Worker::spawn(waker) {
            Ok((handle, events)) => (Some(handle), events),
            Err(e) => {
                notices.push(Notice {
                    text: format!("cannot start the model thread: {e}"),
                    is_error: true,
                });
                (None, crossbeam_channel::never())
            }
        };
        let autopilot = Autopilot::new(
            options.generate,
            options.screenshot.clone(),
            options.exit_after_screenshot,
        );
        let frames = FrameRecorder::new(options.frame_stats.clone(), options.redraw_fps);
        let mut app = Self {
            prompt: options.prompt.clone().unwrap_or_default(),
            settings,
            store,
            model: None,
            loading: None,
            load_failure: None,
            catalog: Vec::new(),
            catalog_requested: 0,
            catalog_shown: 0,
            input: None,
            input_stack: Vec::new(),
            running: None,
            preview: None,
            history: Vec::new(),
            selected: None,
            viewer: ViewerState::default(),
            notices,
            explorer: Explorer::default(),
            rerun_on_change: true,
            frames,
            ui_state: DialogState {
                config_field: options.config.clone().unwrap_or_default(),
                loras: options.loras.clone(),
                ..DialogState::default()
            },
            finetune: FineTune::default(),
            folder: FolderDialog::default(),
            ctx,
            worker,
            events,
            tasks,
            task_events,
            next_job: 1,
            options,
            autopilot,
        };
        if let Some(path) = app.options.image.clone() {
            app.tasks.open_file(path);
        }
        app.load_model_at_start();
        app
    }

    /// Loads the remembered (or given) model when it is at hand: a local folder, or a Hub repo
    /// already in the cache. A repo that would need a download opens the model manager instead,
    /// so a first start never begins a multi-gigabyte download unasked.
    fn load_model_at_start(&mut self) {
        let spec = self.settings.model.clone();
        if model_at_hand(&spec, &self.hub_settings()) || self.options.model.is_some() {
            self.load_model(spec);
        } else {
            self.ui_state.model_manager_open = true;
            self.ui_state.model_field = spec;
            self.refresh_catalog();
        }
    }

    /// Asks the model thread to load `spec` with the chosen device and precision, the model
    /// manager's LoRAs fused in (and, for a single-file checkpoint, its config folder or repo).
    pub fn load_model(&mut self, spec: String) {
        let spec = spec.trim().to_string();
        if spec.is_empty() {
            self.notify_error("type a model folder or a Hub repo id first".into());
            return;
        }
        let mut request = ModelRequest::new(
            spec.clone(),
            self.settings.device_choice(),
            self.settings.dtype_choice(),
        );
        request.hub = self.options.hub.clone();
        request.loras = self.ui_state.loras.clone();
        let config = self.ui_state.config_field.trim();
        if worker::is_single_file(&spec) && !config.is_empty() {
            request.config = Some(config.to_string());
        }
        if self.send(Job::LoadModel(request)) {
            self.load_failure = None;
            self.loading = Some(Loading {
                spec,
                download: None,
            });
        }
    }

    /// [`Self::load_model`] with exactly this LoRA (or none) in the model manager's list: what
    /// "Open in editor" does after a LoRA fine-tuning.
    pub fn load_model_with_lora(&mut self, spec: String, lora: Option<PathBuf>) {
        self.ui_state.loras = lora.map(LoraChoice::new).into_iter().collect();
        self.load_model(spec);
    }

    /// Loads the model in use again with the model manager's LoRAs.
    pub fn apply_loras(&mut self) {
        match self.model.as_ref().map(|m| m.name.clone()) {
            Some(spec) => self.load_model(spec),
            None => self.notify_error("load a model first: the LoRAs are fused into it".into()),
        }
    }

    /// Adds a LoRA file to the model manager's list (at scale 1), once.
    pub fn add_lora(&mut self, path: PathBuf) {
        if path.as_os_str().is_empty() {
            self.notify_error("type or choose a LoRA file first".into());
            return;
        }
        if !self.ui_state.loras.iter().any(|l| l.path == path) {
            self.ui_state.loras.push(LoraChoice::new(path));
        }
    }

    fn send(&mut self, job: Job) -> bool {
        let Some(worker) = &self.worker else {
            self.notify_error("the model thread is not running".into());
            return false;
        };
        match worker.send(job) {
            Ok(()) => true,
            Err(e) => {
                self.notify_error(format!("the model thread did not take the job: {e}"));
                false
            }
        }
    }

    pub fn notify(&mut self, text: String) {
        self.push_notice(text, false);
    }

    pub fn notify_error(&mut self, text: String) {
        self.push_notice(text, true);
    }

    fn push_notice(&mut self, text: String, is_error: bool) {
        self.notices.retain(|n| n.text != text);
        self.notices.push(Notice { text, is_error });
        // A long session's messages must not pile up over the image.
        if self.notices.len() > 4 {
            self.notices.remove(0);
        }
    }

    /// The size the current input will be edited at, once a model says its size multiple.
    pub fn edit_size(&self) -> Option<(u32, u32)> {
        let input = self.input.as_ref()?;
        let info = self.model.as_ref()?;
        let (width, height) = input.opened.image.dimensions();
        edit_size(width, height, self.settings.max_side, info.size_multiple).ok()
    }

    /// Why Generate cannot run now, if it cannot.
    pub fn generate_blocker(&self) -> Option<&'static str> {
        if self.input.is_none() {
            return Some("open an image first (drop it here, Open… or Paste)");
        }
        if self.loading.is_some() {
            return Some("a model is loading (cancel it in the model manager to keep editing)");
        }
        if self.finetune.training() {
            return Some("fine-tuning is running; editing waits until it ends (or Stop it)");
        }
        if self.folder.running.is_some() {
            return Some("a folder is being edited (Apply to folder…); Cancel it to edit here");
        }
        if self.model.is_none() {
            return Some("load a model first (Model > Model manager…)");
        }
        if self.prompt.trim().is_empty() {
            return Some("type an instruction first");
        }
        if self.edit_size().is_none() {
            return Some("the image is too small for this model");
        }
        None
    }

    fn edit_settings(&self) -> EditSettings {
        EditSettings {
            prompt: self.prompt.trim().to_string(),
            negative_prompt: self.settings.negative_prompt.clone(),
            steps: self.settings.steps,
            guidance_scale: self.settings.guidance_scale,
            image_guidance_scale: self.settings.image_guidance_scale,
            seed: self.settings.seed,
            scheduler: self.settings.scheduler_kind(),
            initial_latents: None,
        }
    }

    /// The Generate button: a new seed when "random seed" is on, then the edit.
    pub fn generate(&mut self) {
        if let Some(why) = self.generate_blocker() {
            self.notify_error(why.to_string());
            return;
        }
        if self.settings.randomize_seed {
            self.settings.seed = u64::from(rand::random::<u32>());
        }
        self.start_edit(self.edit_settings(), Purpose::Main);
    }

    /// After a slider, the seed or the scheduler changed: the same edit again with the new values,
    /// when there is a result of this input and instruction to update. The model thread keeps
    /// the prompt embeddings and image latents, so only the denoising runs again.
    pub fn settings_changed(&mut self) {
        if !self.rerun_on_change || self.generate_blocker().is_some() {
            return;
        }
        let Some(input) = &self.input else { return };
        let same_edit = self
            .selected
            .and_then(|i| self.history.get(i))
            .is_some_and(|entry| {
                entry.result.settings.prompt == self.prompt.trim()
                    && Arc::ptr_eq(&entry.source, &input.opened.image)
            });
        if same_edit {
            self.start_edit(self.edit_settings(), Purpose::Main);
        }
    }

    pub(crate) fn start_edit(&mut self, settings: EditSettings, purpose: Purpose) -> bool {
        let Some(input) = self.input.clone() else {
            return false;
        };
        // The pipeline's own limits: the worker would refuse the edit anyway, after a round trip.
        if let Err(e) = settings.validate() {
            self.notify_error(e.to_string());
            return false;
        }
        let id = self.next_job;
        self.next_job += 1;
        let job = EditJob {
            id,
            image: input.opened.image.clone(),
            max_side: self.settings.max_side,
            settings,
            preview_size: self.edit_size(),
        };
        if !self.send(Job::Edit(job)) {
            return false;
        }
        if let Some(previous) = self.running.take() {
            self.explorer.edit_replaced(&previous);
        }
        self.running = Some(RunningEdit {
            id,
            purpose,
            started: Instant::now(),
            size: None,
            progress: None,
            source: input.opened.image.clone(),
        });
        self.persist_settings();
        true
    }

    /// Stops a model download or load that has not started reading weights; the loaded model
    /// stays.
    pub fn cancel_load(&mut self) {
        if let Some(worker) = &self.worker {
            worker.cancel_load();
        }
    }

    /// Lists cached and known models again (in the background).
    pub fn refresh_catalog(&mut self) {
        self.catalog_requested += 1;
        self.tasks.list_models(
            self.catalog_requested,
            self.hub_settings(),
            self.settings.model_folders.clone(),
        );
    }

    /// Whether a newer listing of the models than the one shown is on its way.
    pub fn catalog_pending(&self) -> bool {
        self.catalog_shown < self.catalog_requested
    }

    /// Where models are downloaded from and cached.
    pub fn hub_settings(&self) -> HubSettings {
        self.options
            .hub
            .clone()
            .unwrap_or_else(HubSettings::from_env)
    }

    /// Stops the running edit (the result in view stays) or folder run (the images written so
    /// far stay).
    pub fn cancel(&mut self) {
        if let (Some(running), Some(worker)) = (&self.running, &self.worker) {
            worker.cancel(running.id);
        }
        if let (Some(id), Some(worker)) = (self.folder.running_id(), &self.worker) {
            worker.cancel(id);
        }
    }

    /// Why "Edit all images" cannot run now, if it cannot.
    pub fn folder_blocker(&self) -> Option<&'static str> {
        if self.loading.is_some() {
            return Some("a model is loading");
        }
        if self.finetune.training() {
            return Some("fine-tuning is running; editing waits until it ends (or Stop it)");
        }
        if self.model.is_none() {
            return Some("load a model first (Model > Model manager…)");
        }
        if self.prompt.trim().is_empty() {
            return Some("type an instruction first");
        }
        if self.running.is_some() || self.explorer.running {
            return Some("an edit is running; wait for it or Cancel it");
        }
        if self.folder.input.trim().is_empty() || self.folder.output.trim().is_empty() {
            return Some("choose the input and output folders");
        }
        None
    }

    /// What every image of a folder run gets, for the dialog.
    pub fn folder_settings_text(&self) -> String {
        let seed = if self.settings.randomize_seed {
            "a random seed (that of the results already there, when continuing)".to_string()
        } else {
            format!("seed {}", self.settings.seed)
        };
        format!(
            "“{}” · {seed} · {} steps · text guidance {:.2} · image guidance {:.2} · long side at \
             most {} px",
            self.prompt.trim(),
            self.settings.steps,
            self.settings.guidance_scale,
            self.settings.image_guidance_scale,
            self.settings.max_side
        )
    }

    /// Sends the folder job: the current instruction and settings (one seed for every image).
    pub fn start_folder(&mut self) {
        if let Some(why) = self.folder_blocker() {
            self.folder.error = Some(why.to_string());
            return;
        }
        let settings = self.edit_settings();
        if let Err(e) = settings.validate() {
            self.folder.error = Some(e.to_string());
            return;
        }
        let id = self.next_job;
        self.next_job += 1;
        let job = FolderJob {
            id,
            input_dir: PathBuf::from(self.folder.input.trim()),
            output_dir: PathBuf::from(self.folder.output.trim()),
            max_side: self.settings.max_side,
            settings,
            // The worker takes the seed of the results already there, or a new one.
            random_seed: self.settings.randomize_seed,
        };
        if self.send(Job::EditFolder(job)) {
            self.folder.started(id);
            self.persist_settings();
        }
    }

    /// Carries out what the folder dialog asked for.
    pub fn folder_action(&mut self, action: FolderAction) {
        match action {
            FolderAction::Start => self.start_folder(),
            FolderAction::Cancel => self.cancel(),
            FolderAction::BrowseInput => self.tasks.folder_dialog(
                "Choose the folder of images to edit",
                FolderPurpose::EditInput,
            ),
            FolderAction::BrowseOutput => self.tasks.folder_dialog(
                "Choose where the edited images go",
                FolderPurpose::EditOutput,
            ),
        }
    }

    /// Shows an opened image as the new input; the previous one can be brought back with
    /// [`Self::undo_input`].
    pub fn set_input(&mut self, opened: OpenedImage, name: String) {
        let texture = self.ctx.load_texture(
            format!("input-{name}"),
            (*opened.display).clone(),
            IMAGE_TEXTURE,
        );
        if let Some(path) = &opened.path {
            self.settings.remember_image(path);
        }
        let new_input = InputImage {
            opened,
            texture,
            name,
        };
        if let Some(old) = self.input.replace(new_input) {
            self.input_stack.push(old);
            // Each input holds its full image and a texture: keep a bounded undo.
            if self.input_stack.len() > MAX_UNDO_INPUTS {
                self.input_stack.remove(0);
            }
        }
        self.selected = None;
        self.viewer.reset_view();
        self.explorer.clear();
        self.persist_settings();
    }

    /// Back to the input before the current one.
    pub fn undo_input(&mut self) {
        if let Some(previous) = self.input_stack.pop() {
            self.input = Some(previous);
            self.selected = None;
            self.viewer.reset_view();
            self.explorer.clear();
        }
    }

    /// Chains edits: the result in view becomes the input.
    pub fn use_result_as_input(&mut self) {
        let Some(entry) = self.selected.and_then(|i| self.history.get(i)) else {
            return;
        };
        let image = Arc::new(entry.result.image.clone());
        let opened = OpenedImage {
            display: Arc::new(to_color_image(&image)),
            image,
            path: None,
            record: Some(entry.record()),
        };
        let name = format!("result #{}", entry.number);
        self.set_input(opened, name);
    }

    /// Puts a history entry's settings back on the sliders and in the instruction box.
    pub fn restore_settings(&mut self, index: usize) {
        if let Some(record) = self.history.get(index).map(HistoryEntry::record) {
            self.restore_record(&record);
        }
    }

    /// Settings stored in an opened PNG, put on the controls.
    pub fn restore_record(&mut self, record: &EditRecord) {
        self.prompt = record.prompt.clone();
        self.settings.negative_prompt = record.negative_prompt.clone();
        self.settings.steps = record.steps;
        self.settings.guidance_scale = record.guidance_scale;
        self.settings.image_guidance_scale = record.image_guidance_scale;
        self.settings.seed = record.seed;
        self.settings.randomize_seed = false;
        self.settings.scheduler = record.scheduler.clone();
        self.settings = self.settings.clone().sanitized();
    }

    /// The result in view, if any.
    pub fn selected_entry(&self) -> Option<&HistoryEntry> {
        self.selected.and_then(|i| self.history.get(i))
    }

    /// Saves the result in view at `path` (on a background thread).
    pub fn save_selected(&mut self, path: PathBuf) {
        let Some(entry) = self.selected_entry() else {
            self.notify_error("there is no result to save yet".into());
            return;
        };
        let image = Arc::new(entry.result.image.clone());
        let record = entry.record();
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.settings.save_folder = Some(folder.to_path_buf());
        }
        self.tasks.save(path, image, record);
    }

    /// Where Save suggests writing the result in view.
    pub fn suggested_save_path(&self) -> PathBuf {
        let folder = self
            .settings
            .save_folder
            .clone()
            .or_else(dirs::picture_dir)
            .or_else(dirs::home_dir)
            .unwrap_or_else(|| PathBuf::from("."));
        let stem = self
            .input
            .as_ref()
            .and_then(|i| i.opened.path.as_deref())
            .and_then(Path::file_stem)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "edit".into());
        let seed = self.selected_entry().map_or(0, |e| e.result.seed);
        folder.join(format!("{stem}-edited-{seed}.png"))
    }

    pub fn copy_selected(&mut self) {
        match self.selected_entry() {
            Some(entry) => {
                let image = Arc::new(entry.result.image.clone());
                self.tasks.copy(image);
            }
            None => self.notify_error("there is no result to copy yet".into()),
        }
    }

    /// Writes the settings file in the background (when there is one).
    pub fn persist_settings(&self) {
        if let Some(store) = &self.store {
            self.tasks
                .save_settings(store.clone(), self.settings.clone());
        }
    }

    /// Starts (or continues) the guidance explorer's grid around the current values.
    pub fn start_explorer(&mut self) {
        if let Some(why) = self.generate_blocker() {
            self.notify_error(why.to_string());
            return;
        }
        if self.settings.randomize_seed && !self.explorer.matches(&self.edit_settings()) {
            self.settings.seed = self
                .selected_entry()
                .map_or_else(|| u64::from(rand::random::<u32>()), |e| e.result.seed);
        }
        let settings = self.edit_settings();
        if !self.explorer.matches(&settings)
            && let Some(input) = &self.input
        {
            self.explorer.plan(&settings, input.opened.image.clone());
        }
        self.explorer.running = true;
        self.advance_explorer();
    }

    fn advance_explorer(&mut self) {
        if !self.explorer.running || self.running.is_some() {
            return;
        }
        match self.explorer.next_job() {
            Some((cell, settings)) => {
                if self.start_edit(settings, Purpose::Explorer { cell }) {
                    self.explorer.mark_running(cell, self.next_job - 1);
                } else {
                    self.explorer.running = false;
                }
            }
            None => self.explorer.running = false,
        }
    }

    /// Takes a grid cell's values (and its image, as a result in the history).
    pub fn adopt_explorer_cell(&mut self, cell: usize) {
        let Some((result, source)) = self.explorer.cell_result(cell) else {
            return;
        };
        self.settings.guidance_scale = result.settings.guidance_scale;
        self.settings.image_guidance_scale = result.settings.image_guidance_scale;
        self.settings.seed = result.seed;
        self.settings.randomize_seed = false;
        self.add_to_history(result, source);
    }

    /// Takes in the model thread's and the chores' news; at most `EVENT_BUDGET` per frame.
    pub fn take_events(&mut self) {
        for event in worker::drain(&self.events, EVENT_BUDGET) {
            self.on_worker_event(event);
        }
        while let Ok(event) = self.task_events.try_recv() {
            self.on_task_event(event);
        }
    }

    fn on_worker_event(&mut self, event: Event) {
        let Some(event) = self.folder.on_event(event) else {
            return;
        };
        match event {
            Event::ModelLoading { spec } => {
                self.loading = Some(Loading {
                    spec,
                    download: None,
                });
            }
            Event::Download {
                file,
                done,
                total,
                file_index,
                file_count,
                overall_done,
                overall_total,
            } => {
                if let Some(loading) = &mut self.loading {
                    loading.download = Some(DownloadStatus {
                        file,
                        done,
                        total,
                        file_index,
                        file_count,
                        overall: overall_done.zip(overall_total),
                    });
                }
            }
            Event::ModelReleased { .. } => self.model = None,
            Event::ModelLoaded(info) => {
                if let Some(warning) = &info.warning {
                    self.notify(warning.clone());
                }
                self.settings.model = info.name.clone();
                let folder = PathBuf::from(&info.name);
                // Folders and single files both join the manager's list.
                if folder.exists() && !self.settings.model_folders.contains(&folder) {
                    self.settings.model_folders.push(folder);
                }
                self.loading = None;
                self.model = Some(info);
                self.persist_settings();
                self.refresh_catalog();
            }
            Event::LoadCancelled { spec } => {
                self.loading = None;
                let still = self
                    .model
                    .as_ref()
                    .map_or_else(String::new, |m| format!("; still using {}", m.name));
                self.notify(format!("loading {spec} was cancelled{still}"));
                self.refresh_catalog();
            }
            Event::EditStarted { id, width, height } => {
                if let Some(running) = self.running.as_mut().filter(|r| r.id == id) {
                    running.size = Some((width, height));
                }
            }
            Event::Step(progress) => self.on_step(progress),
            Event::Finished(result) => self.on_finished(*result),
            Event::Cancelled { id } => {
                if let Some(running) = self.running.take_if(|r| r.id == id) {
                    self.preview = None;
                    self.explorer.edit_replaced(&running);
                    self.notify("edit cancelled".into());
                }
            }
            Event::Superseded { .. } => {
                // The replacing edit is already the running one; nothing to undo.
            }
            Event::FolderStarted { .. } | Event::FolderProgress(_) | Event::FolderFinished(_) => {
                // About a folder run this window no longer follows.
            }
            Event::Failed {
                id: Some(id),
                message,
            } => {
                if let Some(running) = self.running.take_if(|r| r.id == id) {
                    self.preview = None;
                    self.explorer.edit_failed(&running, &message);
                    self.notify_error(format!("the edit failed: {message}"));
                }
            }
            Event::Failed { id: None, message } => {
                let spec = self
                    .loading
                    .take()
                    .map_or_else(|| self.settings.model.clone(), |l| l.spec);
                self.notify_error(format!("cannot load the model: {message}"));
                self.load_failure = Some(LoadFailure { spec, message });
                self.autopilot.stop_waiting_to_generate();
            }
        }
    }

    fn on_step(&mut self, progress: StepProgress) {
        let Some(running) = self.running.as_mut().filter(|r| r.id == progress.id) else {
            return;
        };
        if let (Purpose::Main, Some(preview)) = (running.purpose, &progress.preview) {
            let image = to_color_image(preview);
            match &mut self.preview {
                Some(texture) if texture.size() == image.size => texture.set(image, IMAGE_TEXTURE),
                _ => self.preview = Some(self.ctx.load_texture("preview", image, IMAGE_TEXTURE)),
            }
        }
        let mut progress = progress;
        progress.preview = None;
        running.progress = Some(progress);
    }

    fn on_finished(&mut self, result: EditResult) {
        if let (Some(info), Some(memory)) = (&mut self.model, result.memory) {
            info.memory = Some(memory);
        }
        let Some(running) = self.running.take_if(|r| r.id == result.id) else {
            return;
        };
        self.preview = None;
        let result = Arc::new(result);
        match running.purpose {
            Purpose::Main => self.add_to_history(result, running.source),
            Purpose::Explorer { cell } => {
                self.explorer.cell_done(cell, result, &self.ctx);
                self.advance_explorer();
            }
        }
    }

    fn add_to_history(&mut self, result: Arc<EditResult>, source: Arc<RgbImage>) {
        let number = self.history.len() + 1;
        let texture = self.ctx.load_texture(
            format!("result-{number}"),
            display_image(&result.image),
            IMAGE_TEXTURE,
        );
        let before = self.ctx.load_texture(
            format!("before-{number}"),
            display_image(&result.input),
            IMAGE_TEXTURE,
        );
        let (model, dtype) = match &self.model {
            Some(info) => (info.name.clone(), info.dtype.clone()),
            None => (self.settings.model.clone(), self.settings.dtype.clone()),
        };
        self.history.push(HistoryEntry {
            number,
            result,
            source,
            model,
            dtype,
            texture,
            before,
        });
        self.selected = Some(self.history.len() - 1);
    }

    fn on_task_event(&mut self, event: TaskEvent) {
        match event {
            TaskEvent::ImageOpened(opened) => {
                let name = opened
                    .path
                    .as_deref()
                    .and_then(Path::file_name)
                    .map_or_else(|| "clipboard".into(), |n| n.to_string_lossy().into_owned());
                if let Some(record) = opened.record.clone() {
                    self.restore_record(&record);
                    self.notify(format!(
                        "{name} was made by this program: its settings are on the controls"
                    ));
                    if record.num_images > 1 {
                        // The window makes one image per seed, not a batch.
                        self.notify(format!(
                            "{name} is image {} of {} made together from seed {}; the window \
                             makes one image per seed, so Generate gives another picture. \
                             `instruct-pix2pix edit --seed {} --num-images {}` makes it again.",
                            record.image_index + 1,
                            record.num_images,
                            record.seed,
                            record.seed,
                            record.num_images
                        ));
                    }
                }
                self.set_input(*opened, name);
            }
            TaskEvent::OpenDialogClosed => {}
            TaskEvent::SavePathChosen(path) => {
                self.ui_state.save_path = path.display().to_string();
            }
            // An older listing that arrives late must not replace a newer one.
            TaskEvent::ModelList(request, entries) => {
                if request > self.catalog_shown {
                    self.catalog_shown = request;
                    self.catalog = entries;
                }
            }
            TaskEvent::FolderChosen(path, FolderPurpose::Model) => {
                self.ui_state.model_field = path.display().to_string();
            }
            TaskEvent::FolderChosen(path, FolderPurpose::EditInput) => {
                self.folder.input = path.display().to_string();
            }
            TaskEvent::FolderChosen(path, FolderPurpose::EditOutput) => {
                self.folder.output = path.display().to_string();
            }
            TaskEvent::FileChosen(path, FilePurpose::ModelFile) => {
                self.ui_state.model_field = path.display().to_string();
            }
            TaskEvent::FileChosen(path, FilePurpose::Lora) => self.add_lora(path),
            TaskEvent::FolderChosen(path, FolderPurpose::Dataset) => {
                let action = self.finetune.set_folder(path);
                self.finetune_action(action);
            }
            TaskEvent::DatasetChecked(check) => self.finetune.check = Some(check),
            TaskEvent::MemoryProfile(profile) => self.finetune.set_memory(*profile),
            TaskEvent::Saved(path) => {
                self.ui_state.save_open = false;
                self.notify(format!("saved {}", path.display()));
                self.persist_settings();
            }
            TaskEvent::CopiedToClipboard => self.notify("result copied to the clipboard".into()),
            TaskEvent::ScreenshotWritten(path) => {
                println!("screenshot written to {}", path.display());
                if self.autopilot.screenshot_written() {
                    self.ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
            TaskEvent::Failed(message) => {
                self.autopilot.stop_waiting_to_generate();
                self.notify_error(message);
            }
        }
    }

    /// Unattended start: generate when ready, then the screenshot.
    fn drive_autopilot(&mut self) {
        let readiness = EditorReadiness {
            has_input: self.input.is_some(),
            model_loaded: self.model.is_some(),
            model_loading: self.loading.is_some(),
            editing: self.running.is_some(),
            has_notices: !self.notices.is_empty(),
        };
        match self.autopilot.next(readiness) {
            Some(AutopilotStep::Generate) => self.generate(),
            Some(AutopilotStep::Screenshot(path)) => {
                self.ctx
                    .request_screenshot(self.tasks.screenshot_writer(path));
            }
            None => {}
        }
    }

    /// Drops and pastes of files onto the window.
    fn take_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped = ctx.input(|i| i.raw.dropped_files.clone());
        // One image at a time: the first file of a drop; a folder goes to the fine-tuning dialog.
        if let Some(file) = dropped.first() {
            let path = file.path().to_path_buf();
            if path.is_dir() {
                self.finetune.open_with(&self.settings.model);
                let action = self.finetune.set_folder(path);
                self.finetune_action(action);
            } else {
                self.tasks.open_file(path);
            }
        }
    }

    /// Carries out what the fine-tuning dialog asked for.
    pub fn finetune_action(&mut self, action: FineTuneAction) {
        match action {
            FineTuneAction::Check(folder) => self.tasks.check_dataset(folder),
            FineTuneAction::EstimateMemory(model) => self.tasks.memory_profile(model),
            FineTuneAction::BrowseFolder => self
                .tasks
                .folder_dialog("Choose a folder of examples", FolderPurpose::Dataset),
            FineTuneAction::OpenInEditor { model, lora } => {
                self.load_model_with_lora(model, lora);
            }
        }
    }

    /// Wakes the window (for threads the window starts itself).
    pub fn waker(&self) -> worker::Waker {
        let ctx = self.ctx.clone();
        Arc::new(move || ctx.request_repaint())
    }

    /// Work that is not drawing: events in, autopilot, window size.
    pub fn logic(&mut self, ctx: &egui::Context) {
        self.frames.frame_started();
        self.take_events();
        self.finetune.take_events(ctx);
        self.take_dropped_files(ctx);
        self.drive_autopilot();
        if let Some(rect) = ctx.input(|i| i.viewport().inner_rect) {
            self.settings.window_size = Some([rect.width(), rect.height()]);
        }
    }

    /// After drawing: the frame's time, and the next redraw while measuring.
    pub fn end_frame(&mut self) {
        if let Some(interval) = self.frames.frame_ended(self.running.is_some()) {
            self.ctx.request_repaint_after(interval);
        }
    }

    /// The window is closing: stop the edit, save the settings and frame times, join the model
    /// thread (a running edit stops within a step).
    pub fn exit(&mut self) {
        if let Some(worker) = &self.worker
            && let Some(running) = &self.running
        {
            worker.cancel(running.id);
        }
        if let (Some(worker), Some(id)) = (&self.worker, self.folder.running_id()) {
            worker.cancel(id);
        }
        if let Some(store) = &self.store
            && let Err(e) = store.save(&self.settings)
        {
            eprintln!("error: {e}");
        }
        self.frames.write();
        self.worker.take();
    }
}
