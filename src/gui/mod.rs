//! The editor window (egui + eframe, wgpu renderer): drop an image, type an instruction, move the
//! sliders, watch the edit form, compare, save. The window never calls candle or hf-hub and never
//! waits: model work goes to the [`crate::worker`] thread as jobs and comes back as events; slow
//! chores (decoding, dialogs, clipboard, saving) run on [`tasks`] threads.
//!
//! - [`app`]: the state and what happens to it; [`state`]: the types of that state the drawing
//!   reads too; `frame`: one frame for eframe (logic, then drawing).
//! - [`panels`], [`dialogs`], [`viewer`]: drawing. [`textures`]: images as textures.
//! - [`explorer`]: the guidance grid. [`finetune`]: the fine-tuning dialog. [`folder`]: "Apply to
//!   folder…".
//! - [`settings`]: what persists. [`tasks`]: the slow chores.
//! - [`frame_stats`]: frame times for the benchmark; [`autopilot`]: the unattended start.
//!
//! Everything below the window comes through [`crate::worker`]: no module here names candle,
//! the model, the pipeline or training directly.

pub mod app;
pub mod autopilot;
pub mod dialogs;
pub mod explorer;
pub mod finetune;
pub mod folder;
mod frame;
pub mod frame_stats;
pub mod panels;
pub mod settings;
pub mod state;
pub mod tasks;
pub mod textures;
pub mod viewer;

pub use app::{EditorApp, StartOptions};

/// The window's title.
pub const TITLE: &str = "InstructPix2Pix";

/// Why the window could not run.
#[derive(Debug, thiserror::Error)]
pub enum GuiError {
    #[error("cannot open the window: {0}")]
    Window(String),
}

/// Opens the window and runs until it is closed.
pub fn run(options: StartOptions) -> Result<(), GuiError> {
    if cfg!(all(unix, not(target_os = "macos")))
        && ["DISPLAY", "WAYLAND_DISPLAY", "WAYLAND_SOCKET"]
            .iter()
            .all(|name| std::env::var_os(name).is_none_or(|v| v.is_empty()))
    {
        return Err(GuiError::Window(
            "there is no display (DISPLAY and WAYLAND_DISPLAY are unset); the `edit` command \
             works without one"
                .into(),
        ));
    }
    let remembered = options
        .settings_store
        .as_ref()
        .map(|store| store.load().0)
        .unwrap_or_default();
    let [width, height] = remembered.window_size.unwrap_or([1200.0, 800.0]);
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title(TITLE)
            .with_app_id("instruct-pix2pix")
            .with_inner_size([width, height])
            .with_min_inner_size([640.0, 420.0])
            .with_drag_and_drop(true)
            .with_icon(std::sync::Arc::new(window_icon())),
        ..Default::default()
    };
    eframe::run_native(
        TITLE,
        native,
        Box::new(move |cc| Ok(Box::new(EditorApp::new(cc, options)))),
    )
    .map_err(|e| GuiError::Window(e.to_string()))
}

/// The application icon (assets/icons, drawn by assets/make_icons.py) for the title bar and task
/// bar; the installed packages also carry it for the desktop's menus.
pub fn window_icon() -> egui::IconData {
    const PNG: &[u8] = include_bytes!("../../assets/icons/128x128.png");
    // The file is part of the program, so it can only fail if the build is broken; an icon-less
    // window is still better than no window.
    match image::load_from_memory_with_format(PNG, image::ImageFormat::Png) {
        Ok(icon) => {
            let icon = icon.into_rgba8();
            egui::IconData {
                width: icon.width(),
                height: icon.height(),
                rgba: icon.into_raw(),
            }
        }
        Err(_) => egui::IconData::default(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_window_icon_is_the_128_pixel_application_icon() {
        let icon = super::window_icon();
        assert_eq!((icon.width, icon.height), (128, 128));
        assert_eq!(icon.rgba.len(), 128 * 128 * 4);
        // Not blank: the drawing has opaque pixels and transparent corners.
        assert!(icon.rgba.chunks(4).any(|p| p[3] == 255));
        assert_eq!(icon.rgba[3], 0);
    }
}
