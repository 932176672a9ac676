//! What the window remembers across restarts: the last model, the sliders, the window size, recent
//! files and folders. Stored as JSON in the user's configuration folder
//! (`~/.config/instruct-pix2pix/settings.json` on Linux), written atomically; a missing file gives
//! the defaults and an unreadable one gives the defaults plus a message saying why.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::worker::{
    DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, DEFAULT_MAX_SIDE, DEFAULT_REPO,
    DEFAULT_STEPS, DTypeChoice, DeviceChoice, SchedulerKind,
};

/// The file name inside the configuration folder.
pub const SETTINGS_FILE: &str = "settings.json";
/// How many recent images are remembered.
pub const MAX_RECENT: usize = 10;

/// Slider ranges, shared by the sliders and by [`Settings::sanitized`]; inside the pipeline's
/// limits ([`crate::worker::EditSettings::validate`]), which every edit is checked against.
pub const GUIDANCE_RANGE: (f64, f64) = (1.0, 20.0);
pub const IMAGE_GUIDANCE_RANGE: (f64, f64) = (0.0, 5.0);
pub const STEPS_RANGE: (usize, usize) = (1, 100);
/// Resolution cap choices for the long side (the model's multiple is applied by the worker).
pub const RESOLUTION_RANGE: (u32, u32) = (64, 2048);

/// Everything the window persists. Unknown fields are ignored and missing ones take their
/// defaults, so files from other versions still load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The model loaded at start: a folder or a Hub repo id.
    pub model: String,
    /// `auto`, `cpu`, `cuda`, `metal` (as `--device`).
    pub device: String,
    /// `f32`, `f16`, `bf16` (as `--dtype`).
    pub dtype: String,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    pub steps: usize,
    pub seed: u64,
    /// Draw a new seed for every Generate.
    pub randomize_seed: bool,
    /// A scheduler name as `--scheduler` takes it; None: the model's own scheduler.
    pub scheduler: Option<String>,
    /// The long side the edit runs at, at most (as `--resolution`).
    pub max_side: u32,
    pub negative_prompt: String,
    /// Inner size of the window in points.
    pub window_size: Option<[f32; 2]>,
    /// Most recent first.
    pub recent_images: Vec<PathBuf>,
    /// Local model folders the model manager lists besides the Hugging Face cache.
    pub model_folders: Vec<PathBuf>,
    /// The folder of the last save.
    pub save_folder: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: DEFAULT_REPO.to_string(),
            device: DeviceChoice::default().to_string(),
            dtype: DTypeChoice::default().to_string(),
            guidance_scale: DEFAULT_GUIDANCE_SCALE,
            image_guidance_scale: DEFAULT_IMAGE_GUIDANCE_SCALE,
            steps: DEFAULT_STEPS,
            seed: 42,
            randomize_seed: true,
            scheduler: None,
            max_side: DEFAULT_MAX_SIDE,
            negative_prompt: String::new(),
            window_size: None,
            recent_images: Vec::new(),
            model_folders: Vec::new(),
            save_folder: None,
        }
    }
}

impl Settings {
    /// The same settings with every number inside its slider's range (a hand-edited file with
    /// `"steps": -3` or `NaN` must not reach the model).
    pub fn sanitized(mut self) -> Self {
        let defaults = Settings::default();
        self.guidance_scale =
            clamp_or(self.guidance_scale, GUIDANCE_RANGE, defaults.guidance_scale);
        self.image_guidance_scale = clamp_or(
            self.image_guidance_scale,
            IMAGE_GUIDANCE_RANGE,
            defaults.image_guidance_scale,
        );
        self.steps = self.steps.clamp(STEPS_RANGE.0, STEPS_RANGE.1);
        self.max_side = self.max_side.clamp(RESOLUTION_RANGE.0, RESOLUTION_RANGE.1);
        if self.device.parse::<DeviceChoice>().is_err() {
            self.device = defaults.device;
        }
        if self.dtype.parse::<DTypeChoice>().is_err() {
            self.dtype = defaults.dtype;
        }
        if self
            .scheduler
            .as_deref()
            .is_some_and(|name| name.parse::<SchedulerKind>().is_err())
        {
            self.scheduler = None;
        }
        if self.model.trim().is_empty() {
            self.model = defaults.model;
        }
        self.window_size = self
            .window_size
            .filter(|[w, h]| w.is_finite() && h.is_finite() && *w >= 200.0 && *h >= 150.0);
        self.recent_images.truncate(MAX_RECENT);
        self
    }

    /// The scheduler to edit with (None: the model's own).
    pub fn scheduler_kind(&self) -> Option<SchedulerKind> {
        self.scheduler.as_deref().and_then(|name| name.parse().ok())
    }

    pub fn device_choice(&self) -> DeviceChoice {
        self.device.parse().unwrap_or_default()
    }

    pub fn dtype_choice(&self) -> DTypeChoice {
        self.dtype.parse().unwrap_or_default()
    }

    /// Puts `path` first among the recent images.
    pub fn remember_image(&mut self, path: &Path) {
        self.recent_images.retain(|p| p != path);
        self.recent_images.insert(0, path.to_path_buf());
        self.recent_images.truncate(MAX_RECENT);
    }
}

fn clamp_or(value: f64, (low, high): (f64, f64), fallback: f64) -> f64 {
    if value.is_finite() {
        value.clamp(low, high)
    } else {
        fallback
    }
}

/// Where settings are read from and written to.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingsStore {
    pub path: PathBuf,
}

/// Why settings could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: cannot read the settings: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: not valid settings ({reason}); using the defaults")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: cannot save the settings: {reason}")]
    Write { path: PathBuf, reason: String },
}

impl SettingsStore {
    /// The user's settings file: `INSTRUCT_PIX2PIX_CONFIG_DIR` when set, else the platform's
    /// configuration folder. None when neither is known (no home folder): nothing is persisted.
    pub fn user() -> Option<Self> {
        let folder = std::env::var_os("INSTRUCT_PIX2PIX_CONFIG_DIR")
            .map(PathBuf::from)
            .or_else(|| dirs::config_dir().map(|d| d.join("instruct-pix2pix")))?;
        Some(Self::at(folder.join(SETTINGS_FILE)))
    }

    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The stored settings; defaults when there is no file yet. An unreadable or malformed file
    /// gives the defaults and the error (the caller shows it; the file is left alone until the next
    /// save replaces it).
    pub fn load(&self) -> (Settings, Option<SettingsError>) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (Settings::default(), None);
            }
            Err(e) => {
                let error = SettingsError::Read {
                    path: self.path.clone(),
                    reason: e.to_string(),
                };
                return (Settings::default(), Some(error));
            }
        };
        match serde_json::from_str::<Settings>(&text) {
            Ok(settings) => (settings.sanitized(), None),
            Err(e) => {
                let error = SettingsError::Parse {
                    path: self.path.clone(),
                    reason: e.to_string(),
                };
                (Settings::default(), Some(error))
            }
        }
    }

    /// Writes the settings atomically (temporary file in the same folder, then rename), creating
    /// the folder when needed.
    pub fn save(&self, settings: &Settings) -> Result<(), SettingsError> {
        let write_err = |reason: String| SettingsError::Write {
            path: self.path.clone(),
            reason,
        };
        let folder = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(folder).map_err(|e| write_err(e.to_string()))?;
        let json = serde_json::to_string_pretty(settings).map_err(|e| write_err(e.to_string()))?;
        let mut temp = tempfile::Builder::new()
            .prefix(".settings-")
            .suffix(".part")
            .tempfile_in(folder)
            .map_err(|e| write_err(e.to_string()))?;
        use std::io::Write;
        temp.write_all(json.as_bytes())
            .and_then(|()| temp.as_file().sync_all())
            .map_err(|e| write_err(e.to_string()))?;
        temp.persist(&self.path)
            .map_err(|e| write_err(e.error.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let store = SettingsStore::at(dir.path().join("sub/settings.json"));
        let (loaded, error) = store.load();
        assert!(error.is_none());
        assert_eq!(loaded, Settings::default());
        let mut settings = Settings {
            steps: 33,
            guidance_scale: 9.0,
            scheduler: Some("ddim".into()),
            window_size: Some([900.0, 700.0]),
            ..Settings::default()
        };
        settings.remember_image(Path::new("/a.png"));
        settings.remember_image(Path::new("/b.png"));
        settings.remember_image(Path::new("/a.png"));
        store.save(&settings).unwrap();
        let (loaded, error) = store.load();
        assert!(error.is_none());
        assert_eq!(loaded, settings);
        assert_eq!(
            loaded.recent_images,
            [PathBuf::from("/a.png"), PathBuf::from("/b.png")]
        );
    }

    #[test]
    fn nonsense_values_are_clamped_and_garbage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.json");
        std::fs::write(
            &path,
            r#"{"steps": 100000, "guidance_scale": -4, "image_guidance_scale": 1e9,
                "device": "tpu", "scheduler": "warp", "max_side": 3, "window_size": [1, 1], "future_field": true}"#,
        )
        .unwrap();
        let (loaded, error) = SettingsStore::at(&path).load();
        assert!(error.is_none());
        assert_eq!(loaded.steps, 100);
        assert_eq!(loaded.guidance_scale, 1.0);
        assert_eq!(loaded.image_guidance_scale, 5.0);
        assert_eq!(loaded.device, "auto");
        assert_eq!(loaded.scheduler, None);
        assert_eq!(loaded.max_side, 64);
        assert_eq!(loaded.window_size, None);

        std::fs::write(&path, "{not json").unwrap();
        let (loaded, error) = SettingsStore::at(&path).load();
        assert_eq!(loaded, Settings::default());
        let message = error.unwrap().to_string();
        assert!(
            message.contains("settings.json") && message.contains("not valid"),
            "{message}"
        );
    }
}
