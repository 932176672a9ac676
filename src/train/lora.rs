//! LoRA adapters on the UNet's attention projections, as diffusers' `train_text_to_image_lora.py`
//! makes them with peft (`LoraConfig(target_modules=["to_k", "to_q", "to_v", "to_out.0"])`), and
//! their file: `pytorch_lora_weights.safetensors` in the layout diffusers'
//! `pipe.load_lora_weights(folder)` loads.
//!
//! Every attention projection `W` of the UNet's transformers gets `y = W x + scale · B (A x)` with
//! `A` (`lora_A`, [rank, in]) from peft's distribution (kaiming-uniform with a = √5, that is
//! uniform in ±1/√in; drawn from a seeded generator of this crate, so the same distribution but
//! not torch's numbers) and `B` (`lora_B`, [out, rank]) zero, so training starts from the base
//! model's output; `scale = lora_alpha / rank`. Only `A` and `B` are [`Var`]s: the base weights stay plain
//! tensors and never train.
//!
//! The file holds peft's keys under diffusers' `unet.` prefix
//! (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`) and the adapter
//! config (rank, alpha, targets) in the safetensors metadata `lora_adapter_metadata`, as
//! `save_lora_weights(..., unet_lora_adapter_metadata=...)` writes it. Reading also accepts
//! diffusers' older `lora.down`/`lora.up` key names and files without metadata (alpha = rank, as
//! diffusers assumes).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::checkpoint::{self, CheckpointError};
use crate::model::InstructPix2PixModel;
use crate::model::nn::LowRankAdapter;
use crate::model::unet::UNet2DConditionModel;

/// The largest LoRA rank a run accepts: LoRA's point is a rank far below the layers' widths
/// (320 to 1,280 in Stable Diffusion), and the adapters are allocated at this size.
pub const MAX_LORA_RANK: usize = 1024;

pub use crate::model::lora::{ADAPTER_METADATA_KEY, LORA_WEIGHTS_FILE};
/// The attention projections that get adapters (peft's `target_modules`).
pub const TARGET_MODULES: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];
/// The prefix of the UNet's keys in a pipeline LoRA file.
pub const UNET_PREFIX: &str = "unet";

/// What went wrong creating, saving or loading LoRA adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Rank 0, or a non-positive alpha.
    #[error("invalid LoRA setting: {0}")]
    BadConfig(String),
    /// A tensor operation failed on the adapter of `module`.
    #[error("LoRA adapter {module}: {source}")]
    Tensor {
        module: String,
        source: Box<candle_core::Error>,
    },
    /// Reading or writing the file failed.
    #[error(transparent)]
    File(#[from] CheckpointError),
    /// Creating or renaming the file failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds something this crate cannot apply.
    #[error("LoRA file {path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// The file or the tensors to restore do not fit this UNet's adapters.
    #[error("LoRA weights do not fit the model: {0}")]
    Mismatch(String),
}

/// Rank and alpha of the adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// `r`: the inner width of each adapter.
    pub rank: usize,
    /// `lora_alpha`: the output is scaled by `alpha / rank`.
    pub alpha: f64,
}

impl LoraConfig {
    /// Rank `rank` with alpha = rank (scale 1), diffusers' training-script default.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: rank as f64,
        }
    }

    /// The same rank with another alpha.
    pub fn with_alpha(self, alpha: f64) -> Self {
        Self { alpha, ..self }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::BadConfig("rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::BadConfig(format!(
                "alpha must be positive, got {}",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// One adapter: the module it wraps and its two trainable matrices.
#[derive(Debug, Clone)]
pub struct ModuleAdapter {
    /// The wrapped projection's module path in the UNet
    /// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub module: String,
    /// `lora_A.weight` [rank, in].
    pub down: Var,
    /// `lora_B.weight` [out, rank].
    pub up: Var,
    /// The scale the forward pass applies (`alpha / rank`).
    pub scale: f64,
}

/// The adapters attached to a UNet's attention projections, in diffusers' module order.
#[derive(Debug, Clone)]
pub struct UNetLora {
    config: LoraConfig,
    adapters: Vec<ModuleAdapter>,
}

/// The key of one adapter matrix in a LoRA file (`unet.MODULE.lora_A.weight`).
pub fn lora_key(module: &str, up: bool) -> String {
    let which = if up { "lora_B" } else { "lora_A" };
    format!("{UNET_PREFIX}.{module}.{which}.weight")
}

impl UNetLora {
    /// Attaches fresh adapters to every attention projection of `unet` (`A` kaiming-uniform from
    /// a generator seeded with `seed`, `B` zero) on the base weights' device, in their dtype, or
    /// in float32 when they are half precision (mixed precision: the trained parameters stay
    /// float32, as diffusers' scripts `cast_training_params` them). Adapters already attached are
    /// replaced.
    pub fn attach(
        unet: &mut UNet2DConditionModel,
        config: LoraConfig,
        seed: u64,
    ) -> Result<Self, LoraError> {
        config.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut adapters = Vec::new();
        for (path, attention) in unet.attentions_mut() {
            for (name, linear) in attention.projections_mut() {
                let module = format!("{path}.{name}");
                let tensor_err = |source| LoraError::Tensor {
                    module: module.clone(),
                    source: Box::new(source),
                };
                let (out_features, in_features) = linear.weight.dims2().map_err(tensor_err)?;
                let dtype = match linear.weight.dtype() {
                    DType::F16 | DType::BF16 => DType::F32,
                    other => other,
                };
                let device = linear.weight.device().clone();
                // kaiming_uniform_(a=√5) on [rank, in]: bound = √3 · √(2 / (1 + 5)) / √in = 1/√in.
                let bound = 1.0 / (in_features as f32).sqrt();
                let values: Vec<f32> = (0..config.rank * in_features)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let down = Tensor::from_vec(values, (config.rank, in_features), &device)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| Var::from_tensor(&t))
                    .map_err(tensor_err)?;
                let up =
                    Var::zeros((out_features, config.rank), dtype, &device).map_err(tensor_err)?;
                let adapter = ModuleAdapter {
                    module: module.clone(),
                    down,
                    up,
                    scale: config.scale(),
                };
                linear.adapter = Some(low_rank(&adapter));
                adapters.push(adapter);
            }
        }
        Ok(Self { config, adapters })
    }

    /// Rank and alpha.
    pub fn config(&self) -> LoraConfig {
        self.config
    }

    /// The adapters, in diffusers' module order.
    pub fn adapters(&self) -> &[ModuleAdapter] {
        &self.adapters
    }

    /// Every trainable variable (`A` then `B` of each adapter): what the optimizer updates.
    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .iter()
            .flat_map(|a| [a.down.clone(), a.up.clone()])
            .collect()
    }

    /// Every trainable variable with its key in the LoRA file.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|a| {
                [
                    (lora_key(&a.module, false), a.down.clone()),
                    (lora_key(&a.module, true), a.up.clone()),
                ]
            })
            .collect()
    }

    /// The number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The current weights with their file keys (a snapshot: later updates do not change it),
    /// for checkpoints and the file.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>, LoraError> {
        self.named_vars()
            .into_iter()
            .map(|(key, var)| {
                let copy = var.as_tensor().copy().map_err(|source| LoraError::Tensor {
                    module: key.clone(),
                    source: Box::new(source),
                })?;
                Ok((key, copy))
            })
            .collect()
    }

    /// Sets every adapter's weights from `tensors` (keys as [`UNetLora::named_tensors`] gives
    /// them): resuming from a checkpoint. Every adapter must be present with its shape.
    pub fn restore(&self, tensors: &[(String, Tensor)]) -> Result<(), LoraError> {
        let by_key: HashMap<&str, &Tensor> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        if by_key.len() != self.adapters.len() * 2 {
            return Err(LoraError::Mismatch(format!(
                "{} tensors given for {} adapter matrices",
                by_key.len(),
                self.adapters.len() * 2
            )));
        }
        for (key, var) in self.named_vars() {
            let Some(tensor) = by_key.get(key.as_str()) else {
                return Err(LoraError::Mismatch(format!("{key} is missing")));
            };
            if tensor.dims() != var.dims() {
                return Err(LoraError::Mismatch(format!(
                    "{key} has shape {:?}, the adapter {:?}",
                    tensor.dims(),
                    var.dims()
                )));
            }
            tensor
                .to_dtype(var.dtype())
                .and_then(|t| t.to_device(var.device()))
                .and_then(|t| var.set(&t))
                .map_err(|source| LoraError::Tensor {
                    module: key.clone(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// The safetensors metadata diffusers reads the adapter config from.
    fn file_metadata(&self) -> BTreeMap<String, String> {
        let alpha = if self.config.alpha.fract() == 0.0 {
            json!(self.config.alpha as u64)
        } else {
            json!(self.config.alpha)
        };
        let config = json!({
            "unet.r": self.config.rank,
            "unet.lora_alpha": alpha,
            "unet.target_modules": TARGET_MODULES,
            "unet.init_lora_weights": true,
            "unet.lora_dropout": 0.0,
            "unet.bias": "none",
            "unet.use_rslora": false,
            "unet.use_dora": false,
            "unet.peft_type": "LORA",
        });
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        metadata.insert(
            ADAPTER_METADATA_KEY.to_string(),
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        );
        metadata
    }

    /// Writes `folder/pytorch_lora_weights.safetensors` (creating `folder`), atomically: a
    /// temporary file, synced, then renamed over the old one. Returns the file's path.
    pub fn save(&self, folder: &Path) -> Result<PathBuf, LoraError> {
        fs::create_dir_all(folder).map_err(|source| LoraError::Io {
            action: "creating",
            path: folder.to_path_buf(),
            source,
        })?;
        let path = folder.join(LORA_WEIGHTS_FILE);
        let temp = folder.join(format!(".{LORA_WEIGHTS_FILE}.tmp-{}", std::process::id()));
        let tensors = self.named_tensors()?;
        let metadata = self.file_metadata();
        if let Err(e) = checkpoint::write_safetensors(&temp, &tensors, Some(&metadata)) {
            let _ = fs::remove_file(&temp);
            return Err(e.into());
        }
        fs::rename(&temp, &path).map_err(|source| LoraError::Io {
            action: "renaming into place",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Reads a LoRA file (or a folder holding `pytorch_lora_weights.safetensors`) and attaches it
    /// to `unet`, in the base weights' dtype and device. Adapters already on `unet` are removed
    /// first. Every module in the file must be an attention projection of `unet` with matching
    /// shapes; on any error `unet` is left without adapters.
    ///
    /// With `trainable`, the forward pass uses the [`Var`]s themselves, so training can go on
    /// from them (and the whole UNet then runs candle's differentiable ops). Without, it uses
    /// detached views of them: the fused inference kernels stay in use, as for editing.
    pub fn load(
        unet: &mut UNet2DConditionModel,
        path: &Path,
        trainable: bool,
    ) -> Result<Self, LoraError> {
        remove_adapters(unet);
        let result = Self::load_inner(unet, path, trainable);
        if result.is_err() {
            remove_adapters(unet);
        }
        result
    }

    fn load_inner(
        unet: &mut UNet2DConditionModel,
        path: &Path,
        trainable: bool,
    ) -> Result<Self, LoraError> {
        let file = if path.is_dir() {
            path.join(LORA_WEIGHTS_FILE)
        } else {
            path.to_path_buf()
        };
        let unsupported = |reason: String| LoraError::Unsupported {
            path: file.clone(),
            reason,
        };
        let metadata = checkpoint::read_safetensors_metadata(&file)?;
        let tensors = checkpoint::read_safetensors(&file, &candle_core::Device::Cpu)?;

        // module → (A, B)
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, tensor) in tensors {
            let (module, up) = parse_key(&key).ok_or_else(|| {
                unsupported(format!(
                    "key {key:?} is not a UNet LoRA matrix (`unet.MODULE.lora_A.weight` / \
                     `lora_B.weight`); text-encoder and other adapters are not supported"
                ))
            })?;
            let entry = pairs.entry(module).or_default();
            if up {
                entry.1 = Some(tensor);
            } else {
                entry.0 = Some(tensor);
            }
        }
        if pairs.is_empty() {
            return Err(unsupported("holds no UNet LoRA weights".into()));
        }

        let adapter_config = match metadata.get(ADAPTER_METADATA_KEY) {
            Some(text) => Some(
                serde_json::from_str::<Value>(text)
                    .map_err(|e| unsupported(format!("{ADAPTER_METADATA_KEY} is not JSON: {e}")))?,
            ),
            None => None,
        };
        let meta = |field: &str| {
            adapter_config
                .as_ref()
                .and_then(|c| c.get(format!("{UNET_PREFIX}.{field}")))
                .filter(|v| !v.is_null())
        };
        for flag in ["use_rslora", "use_dora"] {
            if meta(flag).and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(format!("{flag} adapters are not supported")));
            }
        }
        if meta("alpha_pattern")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(unsupported(
                "per-module alphas (alpha_pattern) are not supported".into(),
            ));
        }
        let meta_alpha = meta("lora_alpha").and_then(Value::as_f64);

        let mut adapters = Vec::new();
        let mut ranks = Vec::new();
        let mut attached = 0usize;
        for (path, attention) in unet.attentions_mut() {
            for (name, linear) in attention.projections_mut() {
                let module = format!("{path}.{name}");
                let Some((down, up)) = pairs.remove(&module) else {
                    continue;
                };
                let (Some(down), Some(up)) = (down, up) else {
                    return Err(unsupported(format!("{module} lacks lora_A or lora_B")));
                };
                let (out_features, in_features) =
                    linear.weight.dims2().map_err(|source| LoraError::Tensor {
                        module: module.clone(),
                        source: Box::new(source),
                    })?;
                let (rank_a, in_a) = down.dims2().map_err(|source| LoraError::Tensor {
                    module: module.clone(),
                    source: Box::new(source),
                })?;
                let (out_b, rank_b) = up.dims2().map_err(|source| LoraError::Tensor {
                    module: module.clone(),
                    source: Box::new(source),
                })?;
                if in_a != in_features || out_b != out_features || rank_a != rank_b || rank_a == 0 {
                    return Err(LoraError::Mismatch(format!(
                        "{module}: lora_A {:?} and lora_B {:?} do not fit the layer's weight {:?}",
                        down.dims(),
                        up.dims(),
                        linear.weight.dims()
                    )));
                }
                // Without metadata diffusers takes alpha = rank for each module (scale 1).
                let alpha = meta_alpha.unwrap_or(rank_a as f64);
                let (dtype, device) = (linear.weight.dtype(), linear.weight.device().clone());
                let to_var = |t: Tensor| {
                    t.to_dtype(dtype)
                        .and_then(|t| t.to_device(&device))
                        .and_then(|t| Var::from_tensor(&t))
                        .map_err(|source| LoraError::Tensor {
                            module: module.clone(),
                            source: Box::new(source),
                        })
                };
                let adapter = ModuleAdapter {
                    module: module.clone(),
                    down: to_var(down)?,
                    up: to_var(up)?,
                    scale: alpha / rank_a as f64,
                };
                let mut forward = low_rank(&adapter);
                if !trainable {
                    forward.down = forward.down.detach();
                    forward.up = forward.up.detach();
                }
                linear.adapter = Some(forward);
                adapters.push(adapter);
                ranks.push(rank_a);
                attached += 1;
            }
        }
        if let Some(module) = pairs.keys().next() {
            return Err(LoraError::Mismatch(format!(
                "the file has an adapter for {module}, which is not an attention projection of \
                 this UNet ({} other adapters fitted)",
                attached
            )));
        }
        let rank = most_common(&ranks).unwrap_or(1);
        let config = LoraConfig {
            rank,
            alpha: meta_alpha.unwrap_or(rank as f64),
        };
        Ok(Self { config, adapters })
    }
}

/// The adapter as the forward pass holds it (sharing the variables' storage).
fn low_rank(adapter: &ModuleAdapter) -> LowRankAdapter {
    LowRankAdapter {
        down: adapter.down.as_tensor().clone(),
        up: adapter.up.as_tensor().clone(),
        scale: adapter.scale,
    }
}

fn most_common(values: &[usize]) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for &v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts.into_iter().max_by_key(|&(_, n)| n).map(|(v, _)| v)
}

/// `(module, is_up)` of a LoRA key: peft's `unet.M.lora_A.weight` / `lora_B.weight`, or
/// diffusers' `unet.M.lora.down.weight` / `lora.up.weight`.
fn parse_key(key: &str) -> Option<(String, bool)> {
    let rest = key.strip_prefix(UNET_PREFIX)?.strip_prefix('.')?;
    for (suffix, up) in [
        (".lora_A.weight", false),
        (".lora_B.weight", true),
        (".lora.down.weight", false),
        (".lora.up.weight", true),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((module.to_string(), up));
        }
    }
    None
}

/// Removes every adapter from `unet` (it computes exactly the base model again). Returns how
/// many there were.
pub fn remove_adapters(unet: &mut UNet2DConditionModel) -> usize {
    let mut removed = 0;
    for (_, attention) in unet.attentions_mut() {
        for (_, linear) in attention.projections_mut() {
            if linear.adapter.take().is_some() {
                removed += 1;
            }
        }
    }
    removed
}

/// Applies a LoRA file (or a folder holding `pytorch_lora_weights.safetensors`, such as a
/// `--lora-rank` training's output folder) to a loaded model's UNet for editing with it (frozen
/// adapters: the fused inference kernels stay in use): wrap the model in an `EditPipeline`
/// afterwards. Returns the adapters' config. [`remove_adapters`] on `model.unet` undoes it.
pub fn apply_lora_file(
    model: &mut InstructPix2PixModel,
    path: &Path,
) -> Result<LoraConfig, LoraError> {
    Ok(UNetLora::load(&mut model.unet, path, false)?.config())
}
