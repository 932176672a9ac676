//! Loading the model a subcommand names: device and dtype checks, the Hub or a local folder,
//! download progress.

use anyhow::Result;
use candle_core::DType;

use super::progress::Progress;
use crate::model::device::{DTypeChoice, DeviceChoice, select_device};
use crate::model::hub::{HubSettings, ModelSpec, Variant};
use crate::model::{InstructPix2PixModel, LoadOptions};

/// The model flags shared by the subcommands.
pub struct ModelFlags<'a> {
    pub model: &'a str,
    pub revision: Option<&'a str>,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
}

/// Resolves, fetches (with a progress bar) and loads the model. `--dtype f16` picks the fp16
/// weight files when the model has them.
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
    let options = LoadOptions {
        variant,
        dtype,
        device,
    };
    let spinner = progress.spinner(&format!("loading {}", flags.model));
    let model = InstructPix2PixModel::fetch_and_load(
        &spec,
        &HubSettings::from_env(),
        &options,
        &mut |update| progress.on_download(update),
    );
    progress.finish_download();
    spinner.finish_and_clear();
    Ok(model?)
}
