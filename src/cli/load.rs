//! Loading the model a subcommand names: device and dtype checks, the Hub or a local folder,
//! download progress.

use anyhow::Result;
use candle_core::DType;

use super::progress::Progress;
use crate::model::device::{DTypeChoice, DeviceChoice, select_device};
use crate::model::hub::{HubSettings, ModelSpec, Variant};
use crate::model::lora::LoraChoice;
use crate::model::{InstructPix2PixModel, LoadOptions};

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
/// picks the fp16 weight files when the model has them.
pub fn load_model(flags: &ModelFlags<'_>, progress: &mut Progress) -> Result<InstructPix2PixModel> {
    let device = select_device(flags.device)?;
    if let Some(warning) = flags.dtype.check_on(&device)? {
        eprintln!("warning: {warning}");
    }
    let dtype = flags.dtype.dtype();
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
    let spinner = progress.spinner(&format!("loading {}", flags.model));
    let model = InstructPix2PixModel::fetch_and_load_with(
        &spec,
        config.as_ref(),
        flags.loras,
        &HubSettings::from_env(),
        &options,
        &mut |update| progress.on_download(update),
    );
    progress.finish_download();
    spinner.finish_and_clear();
    Ok(model?)
}
