//! Loading the model a subcommand names: device and dtype checks, the Hub or a local folder,
//! download progress.

use anyhow::Result;
use candle_core::DType;

use super::progress::Progress;
use crate::model::device::{DTypeChoice, DeviceChoice, select_device};
use crate::model::hub::{HubSettings, ModelSpec, Variant};
use crate::model::lora::LoraChoice;
use crate::model::{InstructPix2PixModel, LoadOptions, LocalModel};

use std::sync::atomic::AtomicBool;

/// The model flags shared by the subcommands.
pub struct ModelFlags<'a> {
    pub model: &'a str,
    pub revision: Option<&'a str>,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    /// `--config`: where a single-file checkpoint's tokenizer and scheduler come from.
    pub config: Option<&'a str>,
    /// `--lora`: LoRA files fused into the weights.
    pub loras: &'a [LoraChoice],
}

/// Resolves, fetches (with a progress bar) and loads the model: a pipeline folder or repo, or a
/// single-file checkpoint with its config folder or repo, with the LoRAs fused in. `--dtype f16`
/// picks the fp16 weight files when the model has them; `--dtype auto` on the CPU picks bf16 or
/// float32 at load (`model::cpu_precision`).
pub fn load_model(flags: &ModelFlags<'_>, progress: &mut Progress) -> Result<InstructPix2PixModel> {
    let device = select_device(flags.device)?;
    if let Some(warning) = flags.dtype.check_on(&device)? {
        eprintln!("warning: {warning}");
    }
    let dtype = flags.dtype.load_dtype(&device);
    let variant = if dtype == DType::F16 {
        Variant::Fp16
    } else {
        Variant::Default
    };
    let spec = ModelSpec::parse(flags.model, flags.revision)?;
    let config = flags
        .config
        .map(|c| ModelSpec::parse(c, None))
        .transpose()
        .map_err(|e| anyhow::Error::new(e).context("--config"))?;
    let options = LoadOptions {
        variant,
        dtype,
        device,
    };
    let never = AtomicBool::new(false);
    let local = LocalModel::fetch(
        &spec,
        config.as_ref(),
        variant,
        &HubSettings::from_env(),
        &mut |update| progress.on_download(update),
        &never,
    );
    progress.finish_download();
    let spinner = progress.spinner(&format!("loading {}", flags.model));
    let model = local.and_then(|local| {
        let mut prepared = local.prepare(&options, flags.loras)?;
        if flags.dtype.chooses_at_load(&options.device) {
            let choice = prepared.choose_cpu_precision()?;
            if std::env::var_os(AUTO_REPORT_VAR).is_some() {
                eprintln!("--dtype auto: {}", choice.reason);
            }
        }
        prepared.load()
    });
    spinner.finish_and_clear();
    Ok(model?)
}

/// Set (to anything) to have `--dtype auto` print what it chose and why.
pub const AUTO_REPORT_VAR: &str = "INSTRUCT_PIX2PIX_REPORT_DTYPE";
