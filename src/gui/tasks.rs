//! The window's slow chores off the UI thread: decoding an opened or dropped image, native file
//! dialogs, the clipboard, saving results and settings, listing models, writing screenshots. Each chore runs on a
//! short-lived named thread (`ip2p-io`), or on the one clipboard thread (`ip2p-clipboard`, which
//! must own the clipboard for as long as a copied image should stay pasteable on X11), and its
//! outcome comes back as a [`TaskEvent`] over a bounded channel, followed by a call to the waker.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use image::RgbImage;

use crate::worker::catalog::{CatalogEntry, list_catalog};
use crate::worker::training::{DatasetSummary, MemoryProfile, check_dataset, memory_profile};
use crate::worker::{
    EditRecord, HubSettings, INPUT_EXTENSIONS, Waker, load_image, read_png_text, save_image,
};

use super::settings::{Settings, SettingsStore};
use super::textures::display_image;

/// An image ready to show and edit.
#[derive(Clone)]
pub struct OpenedImage {
    /// Full size, as decoded (alpha dropped, EXIF orientation applied).
    pub image: Arc<RgbImage>,
    /// What to show: the image, or a scaled-down copy when a side exceeds
    /// [`super::textures::MAX_TEXTURE_SIDE`].
    pub display: Arc<egui::ColorImage>,
    /// Where it came from: a file path, or None for the clipboard.
    pub path: Option<PathBuf>,
    /// Settings embedded by this program, when the file is one of its results.
    pub record: Option<EditRecord>,
}

impl std::fmt::Debug for OpenedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedImage")
            .field("size", &self.image.dimensions())
            .field("path", &self.path)
            .finish()
    }
}

/// What a chosen folder is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderPurpose {
    Model,
    Dataset,
    /// The images "Apply to folder…" edits.
    EditInput,
    /// Where "Apply to folder…" writes.
    EditOutput,
}

/// What a chosen file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilePurpose {
    /// A single-file checkpoint for the model manager.
    ModelFile,
    /// A LoRA to add to the model manager's list.
    Lora,
}

/// What a chore produced.
#[derive(Debug)]
pub enum TaskEvent {
    ImageOpened(Box<OpenedImage>),
    /// The open dialog was closed without a choice (also what a headless machine answers).
    OpenDialogClosed,
    /// A save dialog chose where to save.
    SavePathChosen(PathBuf),
    /// A folder dialog chose a folder, for the model manager or the fine-tuning dialog.
    FolderChosen(PathBuf, FolderPurpose),
    /// A file dialog chose a model file or a LoRA for the model manager.
    FileChosen(PathBuf, FilePurpose),
    /// A fine-tuning dataset was checked.
    DatasetChecked(Result<DatasetSummary, String>),
    /// A base model's memory profile for the fine-tuning dialog's estimate.
    MemoryProfile(Box<Result<MemoryProfile, String>>),
    Saved(PathBuf),
    CopiedToClipboard,
    ScreenshotWritten(PathBuf),
    /// Models in the Hugging Face cache and the known folders, with the number of the request
    /// (listings run on their own threads and can arrive out of order).
    ModelList(u64, Vec<CatalogEntry>),
    /// A chore failed; one line for the user.
    Failed(String),
}

/// Starts chores; cheap to call from the UI thread (it only spawns or sends).
pub struct Tasks {
    events: Sender<TaskEvent>,
    waker: Waker,
    clipboard: Option<Sender<ClipboardRequest>>,
}

enum ClipboardRequest {
    Paste,
    Copy(Arc<RgbImage>),
}

impl Tasks {
    /// Chores and the channel their outcomes arrive on.
    pub fn new(waker: Waker) -> (Self, Receiver<TaskEvent>) {
        let (events, receiver) = crossbeam_channel::bounded(32);
        let tasks = Self {
            events,
            waker,
            clipboard: None,
        };
        (tasks, receiver)
    }

    fn spawn(&self, job: impl FnOnce() -> TaskEvent + Send + 'static) {
        let events = self.events.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("ip2p-io".into())
            .spawn(move || {
                let event = job();
                if events.send(event).is_ok() {
                    waker();
                }
            });
        if let Err(e) = spawned {
            let _ = self
                .events
                .try_send(TaskEvent::Failed(format!("cannot start a thread: {e}")));
            (self.waker)();
        }
    }

    /// Lists the models in the Hugging Face cache and `folders`; `request` comes back with the
    /// list.
    pub fn list_models(&self, request: u64, hub: HubSettings, folders: Vec<PathBuf>) {
        self.spawn(move || TaskEvent::ModelList(request, list_catalog(&hub, &folders)));
    }

    /// Decodes an image file (PNG, JPEG, WebP, BMP, TIFF).
    pub fn open_file(&self, path: PathBuf) {
        self.spawn(move || open_path(path));
    }

    /// Shows the native open dialog, then decodes the chosen file.
    pub fn open_dialog(&self, folder: Option<PathBuf>) {
        self.spawn(move || {
            let mut dialog = rfd::FileDialog::new()
                .set_title("Open an image")
                .add_filter("Images", &INPUT_EXTENSIONS);
            if let Some(folder) = folder {
                dialog = dialog.set_directory(folder);
            }
            match dialog.pick_file() {
                Some(path) => open_path(path),
                None => TaskEvent::OpenDialogClosed,
            }
        });
    }

    /// Shows the native save dialog.
    pub fn save_dialog(&self, suggested: PathBuf) {
        self.spawn(move || {
            let mut dialog = rfd::FileDialog::new()
                .set_title("Save the result")
                .add_filter("PNG (with settings)", &["png"])
                .add_filter("JPEG", &["jpg", "jpeg"])
                .add_filter("WebP", &["webp"]);
            if let Some(folder) = suggested.parent() {
                dialog = dialog.set_directory(folder);
            }
            if let Some(name) = suggested.file_name() {
                dialog = dialog.set_file_name(name.to_string_lossy());
            }
            match dialog.save_file() {
                Some(path) => TaskEvent::SavePathChosen(path),
                None => TaskEvent::OpenDialogClosed,
            }
        });
    }

    /// Shows the native folder dialog.
    pub fn folder_dialog(&self, title: &'static str, purpose: FolderPurpose) {
        self.spawn(
            move || match rfd::FileDialog::new().set_title(title).pick_folder() {
                Some(path) => TaskEvent::FolderChosen(path, purpose),
                None => TaskEvent::OpenDialogClosed,
            },
        );
    }

    /// Shows the native open dialog for a file of one of `extensions`.
    pub fn file_dialog(
        &self,
        title: &'static str,
        filter: &'static str,
        extensions: &'static [&'static str],
        purpose: FilePurpose,
    ) {
        self.spawn(move || {
            match rfd::FileDialog::new()
                .set_title(title)
                .add_filter(filter, extensions)
                .pick_file()
            {
                Some(path) => TaskEvent::FileChosen(path, purpose),
                None => TaskEvent::OpenDialogClosed,
            }
        });
    }

    /// Opens a folder of training examples and checks every file's header.
    pub fn check_dataset(&self, folder: PathBuf) {
        self.spawn(move || TaskEvent::DatasetChecked(check_dataset(&folder)));
    }

    /// Reads a base model's sizes and the free memory for the fine-tuning dialog's estimate.
    pub fn memory_profile(&self, base_model: String) {
        self.spawn(move || TaskEvent::MemoryProfile(Box::new(memory_profile(&base_model, None))));
    }

    /// Writes a result atomically; PNG files carry `record` as the `edit` command writes it.
    pub fn save(&self, path: PathBuf, image: Arc<RgbImage>, record: EditRecord) {
        self.spawn(
            move || match save_image(&path, &image, &record.to_text_chunks()) {
                Ok(()) => TaskEvent::Saved(path),
                Err(e) => TaskEvent::Failed(e.to_string()),
            },
        );
    }

    /// Writes the settings file; failures are reported, never fatal.
    pub fn save_settings(&self, store: SettingsStore, settings: Settings) {
        let events = self.events.clone();
        let waker = self.waker.clone();
        let _ = std::thread::Builder::new()
            .name("ip2p-io".into())
            .spawn(move || {
                if let Err(e) = store.save(&settings)
                    && events.send(TaskEvent::Failed(e.to_string())).is_ok()
                {
                    waker();
                }
            });
    }

    /// A callback for [`egui::Context::request_screenshot`] that writes the screenshot as PNG.
    pub fn screenshot_writer(
        &self,
        path: PathBuf,
    ) -> impl FnOnce(Arc<egui::ColorImage>) + Send + 'static {
        let tasks = Tasks {
            events: self.events.clone(),
            waker: self.waker.clone(),
            clipboard: None,
        };
        move |screenshot| tasks.write_screenshot(path, screenshot)
    }

    fn write_screenshot(&self, path: PathBuf, screenshot: Arc<egui::ColorImage>) {
        self.spawn(move || {
            let [width, height] = screenshot.size;
            let mut rgb = RgbImage::new(width as u32, height as u32);
            for (pixel, color) in rgb.pixels_mut().zip(&screenshot.pixels) {
                *pixel = image::Rgb([color.r(), color.g(), color.b()]);
            }
            match save_image(&path, &rgb, &[]) {
                Ok(()) => TaskEvent::ScreenshotWritten(path),
                Err(e) => TaskEvent::Failed(e.to_string()),
            }
        });
    }

    /// Reads an image from the clipboard.
    pub fn paste(&mut self) {
        self.clipboard_request(ClipboardRequest::Paste);
    }

    /// Puts an image on the clipboard.
    pub fn copy(&mut self, image: Arc<RgbImage>) {
        self.clipboard_request(ClipboardRequest::Copy(image));
    }

    fn clipboard_request(&mut self, request: ClipboardRequest) {
        if self.clipboard.is_none() {
            self.clipboard = self.start_clipboard_thread();
        }
        let sent = self
            .clipboard
            .as_ref()
            .is_some_and(|clipboard| clipboard.try_send(request).is_ok());
        if !sent {
            let _ = self
                .events
                .try_send(TaskEvent::Failed("the clipboard is busy; try again".into()));
            (self.waker)();
        }
    }

    fn start_clipboard_thread(&self) -> Option<Sender<ClipboardRequest>> {
        let (requests, receiver) = crossbeam_channel::bounded::<ClipboardRequest>(4);
        let events = self.events.clone();
        let waker = self.waker.clone();
        std::thread::Builder::new()
            .name("ip2p-clipboard".into())
            .spawn(move || {
                let mut clipboard = None;
                for request in receiver {
                    let event = serve_clipboard(&mut clipboard, request);
                    if events.send(event).is_ok() {
                        waker();
                    }
                }
            })
            .ok()?;
        Some(requests)
    }
}

fn serve_clipboard(
    clipboard: &mut Option<arboard::Clipboard>,
    request: ClipboardRequest,
) -> TaskEvent {
    if clipboard.is_none() {
        match arboard::Clipboard::new() {
            Ok(c) => *clipboard = Some(c),
            Err(e) => return TaskEvent::Failed(format!("the clipboard is not available: {e}")),
        }
    }
    let Some(clipboard) = clipboard.as_mut() else {
        return TaskEvent::Failed("the clipboard is not available".into());
    };
    match request {
        ClipboardRequest::Paste => match clipboard.get_image() {
            Ok(data) => match clipboard_to_rgb(&data) {
                Some(image) => TaskEvent::ImageOpened(Box::new(opened(image, None, None))),
                None => TaskEvent::Failed("the clipboard image has an unexpected layout".into()),
            },
            Err(arboard::Error::ContentNotAvailable) => {
                TaskEvent::Failed("the clipboard holds no image".into())
            }
            Err(e) => TaskEvent::Failed(format!("cannot read the clipboard: {e}")),
        },
        ClipboardRequest::Copy(image) => {
            let rgba: Vec<u8> = image
                .pixels()
                .flat_map(|p| [p.0[0], p.0[1], p.0[2], 255])
                .collect();
            let data = arboard::ImageData {
                width: image.width() as usize,
                height: image.height() as usize,
                bytes: rgba.into(),
            };
            match clipboard.set_image(data) {
                Ok(()) => TaskEvent::CopiedToClipboard,
                Err(e) => TaskEvent::Failed(format!("cannot copy to the clipboard: {e}")),
            }
        }
    }
}

/// RGBA clipboard data as RGB, alpha discarded as PIL's `convert("RGB")` (and file loading) does.
fn clipboard_to_rgb(data: &arboard::ImageData<'_>) -> Option<RgbImage> {
    let (width, height) = (data.width as u32, data.height as u32);
    if data.bytes.len() != data.width * data.height * 4 || width == 0 || height == 0 {
        return None;
    }
    let rgb: Vec<u8> = data
        .bytes
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(width, height, rgb)
}

fn open_path(path: PathBuf) -> TaskEvent {
    match load_image(&path) {
        Ok(image) => {
            let record = read_png_text(&path)
                .ok()
                .and_then(|chunks| EditRecord::from_text_chunks(&chunks));
            TaskEvent::ImageOpened(Box::new(opened(image, Some(path), record)))
        }
        Err(e) => TaskEvent::Failed(e.to_string()),
    }
}

fn opened(image: RgbImage, path: Option<PathBuf>, record: Option<EditRecord>) -> OpenedImage {
    let display = Arc::new(display_image(&image));
    OpenedImage {
        image: Arc::new(image),
        display,
        path,
        record,
    }
}
