//! No subcommand: the editor window, with optional start-up choices.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::gui::{self, StartOptions, settings::SettingsStore};

#[derive(Debug, Args)]
pub struct WindowArgs {
    /// An image to open at start (what "Open with" passes).
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// The model to load at start, instead of the last one used: a folder, a Hub repo id or a
    /// single-file checkpoint (.safetensors, .ckpt).
    #[arg(long, value_name = "DIR|REPO_ID|FILE")]
    pub model: Option<String>,
    /// For a single-file --model: the folder or Hub repo of its tokenizer and scheduler config
    /// (default: timbrooks/instruct-pix2pix).
    #[arg(long, value_name = "DIR|REPO_ID")]
    pub config: Option<String>,
    /// A LoRA file fused into the model (the model manager's list), at SCALE (default 1).
    /// Repeatable.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<crate::model::lora::LoraChoice>,
    /// The instruction to start with.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Start the edit as soon as the model and the image are ready.
    #[arg(long, requires = "image", requires = "prompt")]
    pub generate: bool,
    /// Save a screenshot of the window (PNG) once the first result shows (or the image, without
    /// --generate).
    #[arg(long, value_name = "PATH")]
    pub screenshot: Option<PathBuf>,
    /// Close the window after the screenshot is written.
    #[arg(long, requires = "screenshot")]
    pub exit_after_screenshot: bool,
    /// At exit, write frame-time statistics (JSON) here: the benchmark of the window's
    /// responsiveness during an edit.
    #[arg(long, value_name = "PATH")]
    pub frame_stats: Option<PathBuf>,
    /// With --frame-stats: redraw this many times a second during an edit (as while a slider is
    /// dragged); 0 redraws only when something arrives.
    #[arg(long, value_name = "FPS", default_value_t = 60, requires = "frame_stats",
          value_parser = clap::value_parser!(u32).range(0..=240))]
    pub redraw_fps: u32,
    /// Do not read or write the settings file (a clean start, as on a new machine).
    #[arg(long)]
    pub no_settings: bool,
}

pub fn run(args: WindowArgs) -> Result<()> {
    if let Some(image) = &args.image
        && !image.is_file()
    {
        bail!("{}: no such image file", image.display());
    }
    let settings_store = if args.no_settings {
        None
    } else {
        SettingsStore::user()
    };
    let options = StartOptions {
        model: args.model,
        config: args.config,
        loras: args.loras,
        image: args.image,
        prompt: args.prompt,
        generate: args.generate,
        screenshot: args.screenshot,
        exit_after_screenshot: args.exit_after_screenshot,
        frame_stats: args.frame_stats,
        redraw_fps: args.redraw_fps,
        settings_store,
        hub: None,
    };
    gui::run(options)?;
    Ok(())
}

fn parse_lora(text: &str) -> Result<crate::model::lora::LoraChoice, String> {
    text.parse()
}
