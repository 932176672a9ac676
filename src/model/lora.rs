//! LoRA files for editing, fused into the weights when the model loads: `W + scale · α/r · B·A`
//! for every adapted layer, as diffusers' `load_lora_weights` then `fuse_lora(lora_scale=scale)`
//! compute it (in float32, before the weights are converted to the model's dtype).
//!
//! Two formats:
//! - diffusers / peft (what `train --lora-rank` writes, and `save_lora_weights`):
//!   `unet.<module>.lora_A.weight` / `lora_B.weight` (also the older `lora.down` / `lora.up`,
//!   `lora_linear_layer.down` / `up` and attention-processor `to_q_lora.down` names), and
//!   `text_encoder.<module>...` for the text encoder; α from the safetensors metadata
//!   `lora_adapter_metadata` (`unet.lora_alpha`, `alpha_pattern`, `use_rslora`), else α = r.
//! - kohya (most shared LoRAs): `lora_unet_<module with _ for .>.lora_down.weight` /
//!   `.lora_up.weight` / `.alpha`, and `lora_te_...` for the text encoder; module names as
//!   diffusers' (kohya trains SD 1.x on diffusers' UNet) or as the LDM layout's
//!   (`lora_unet_input_blocks_1_1_proj_in`). Linear layers and convolutions (LoCon) both.
//!
//! Every key must be a LoRA weight of a module the model has, with shapes that fit that module's
//! weight; the first key that does not is named with its file, before any weight is read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde_json::Value;

use super::single_file::ldm::{Rename, Shapes, to_ldm};
use super::weights::{WeightFile, WeightsError, open_weight_file};

/// The file name diffusers' `save_lora_weights` writes and `load_lora_weights(folder)` reads.
pub const LORA_WEIGHTS_FILE: &str = "pytorch_lora_weights.safetensors";
/// The safetensors metadata key of the adapter config (diffusers' `LORA_ADAPTER_METADATA_KEY`).
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// The scale a LoRA is fused with when none is given.
pub const DEFAULT_LORA_SCALE: f64 = 1.0;
/// The largest |scale| accepted (diffusers has no limit; past this a LoRA only destroys).
pub const MAX_LORA_SCALE: f64 = 100.0;

/// A LoRA file and the scale to fuse it with: `FILE` or `FILE:SCALE` on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraChoice {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraChoice {
    /// The file at the default scale.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            scale: DEFAULT_LORA_SCALE,
        }
    }
}

impl std::fmt::Display for LoraChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.scale)
    }
}

impl FromStr for LoraChoice {
    type Err = String;

    /// `FILE` or `FILE:SCALE`; a colon followed by something that is not a number belongs to the
    /// path (`C:\loras\x.safetensors`).
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("give a LoRA file, as FILE or FILE:SCALE".into());
        }
        if let Some((path, scale)) = text.rsplit_once(':')
            && !path.is_empty()
            && let Ok(scale) = scale.trim().parse::<f64>()
        {
            if !scale.is_finite() || scale.abs() > MAX_LORA_SCALE {
                return Err(format!(
                    "the scale of {path} must be between -{MAX_LORA_SCALE} and {MAX_LORA_SCALE}, got {scale}"
                ));
            }
            return Ok(Self {
                path: PathBuf::from(path),
                scale,
            });
        }
        Ok(Self::new(text))
    }
}

/// Why a LoRA could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("LoRA {path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("LoRA {path}: key {key} {reason}")]
    BadKey {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("LoRA {path} does not fit this model: key {key} {reason}")]
    Mismatch {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("LoRA {path}: reading {key}: {source}")]
    Tensor {
        path: PathBuf,
        key: String,
        source: Box<candle_core::Error>,
    },
}

/// What the model offers LoRAs: its UNet's weights (diffusers' names) and its text encoder's
/// (transformers' names without `text_model.`), with shapes.
#[derive(Debug, Clone, Default)]
pub struct ModelWeights {
    pub unet: Shapes,
    pub text_encoder: Shapes,
    /// resnets per level and which up levels have attention: the LDM names of the UNet's modules
    /// for kohya files written with them.
    pub unet_ldm: Option<(usize, Vec<bool>)>,
}

/// Which network a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    Unet,
    TextEncoder,
}

/// One adapter's update of one weight: `scale · up · down`.
#[derive(Debug, Clone)]
struct Delta {
    /// [rank, in·kh·kw], float32 on the CPU.
    down: Tensor,
    /// [out, rank].
    up: Tensor,
    scale: f64,
    path: PathBuf,
    key: String,
}

/// Every LoRA's updates, by the weight they change.
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    deltas: HashMap<(Network, String), Vec<Delta>>,
}

/// A LoRA file's tensors (read whole: LoRAs are small) and metadata.
struct LoraFile {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    metadata: BTreeMap<String, String>,
}

/// Largest LoRA file read whole (SD 1.x LoRAs are 1 to 300 MB).
const MAX_LORA_BYTES: u64 = 4 << 30;

impl LoraFile {
    fn read(path: &Path) -> Result<Self, LoraError> {
        let file = if path.is_dir() {
            path.join(LORA_WEIGHTS_FILE)
        } else {
            path.to_path_buf()
        };
        let (_, len) = super::files::open_regular(&file).map_err(|source| WeightsError::Read {
            path: file.clone(),
            source,
        })?;
        if len > MAX_LORA_BYTES {
            return Err(LoraError::Unsupported {
                path: file,
                reason: format!(
                    "it has {len} bytes, more than a LoRA of Stable Diffusion can ({})",
                    super::files::human_bytes(MAX_LORA_BYTES)
                ),
            });
        }
        let tensor_err = |key: &str| {
            let (path, key) = (file.clone(), key.to_string());
            move |source| LoraError::Tensor {
                path,
                key,
                source: Box::new(source),
            }
        };
        let Some(WeightFile {
            source,
            shapes,
            metadata,
        }) = open_weight_file(&file)?
        else {
            return Err(LoraError::Unsupported {
                path: file,
                reason: "not a .safetensors (or .pt/.bin) file".into(),
            });
        };
        let mut tensors = BTreeMap::new();
        for name in shapes.into_keys() {
            let tensor = source
                .get_unchecked(&name, DType::F32, &Device::Cpu)
                .map_err(tensor_err(&name))?;
            tensors.insert(name, tensor);
        }
        if tensors.is_empty() {
            return Err(LoraError::Unsupported {
                path: file,
                reason: "it holds no tensors".into(),
            });
        }
        Ok(Self {
            path: file,
            tensors,
            metadata,
        })
    }
}

/// The role of one key of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Suffixes of LoRA weights, most specific first, with the module-name rewrite they imply.
const SUFFIXES: [(&str, Part); 11] = [
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    ("_lora.down.weight", Part::Down),
    ("_lora.up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// Parts of other adapter kinds, refused by name.
const OTHER_KINDS: [(&str, &str); 7] = [
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    (".lora_mid.", "LoCon with a middle (Tucker) factor"),
    (".diff", "full weight differences"),
    ("glora_", "GLoRA"),
];

/// `(module as written, part)` of a key without its network prefix.
fn split_key(key: &str) -> Option<(String, Part)> {
    for (suffix, part) in SUFFIXES {
        if let Some(module) = key.strip_suffix(suffix) {
            let module = if suffix.starts_with("_lora.") {
                // diffusers' attention-processor names: `attn1.processor.to_q_lora.down.weight`,
                // the text encoder's `self_attn.to_q_lora.down.weight`.
                let module = module.replace(".processor.", ".");
                processor_module(&module)?
            } else {
                module.to_string()
            };
            return Some((module, part));
        }
    }
    None
}

/// `...attn1.to_q` from `...attn1.to_q` (UNet), `...self_attn.q_proj` from `...self_attn.to_q`.
fn processor_module(module: &str) -> Option<String> {
    let (head, last) = module.rsplit_once('.')?;
    let text = head.ends_with("self_attn");
    let name = match (last, text) {
        ("to_q", false) | ("to_k", false) | ("to_v", false) => last.to_string(),
        ("to_out", false) => "to_out.0".into(),
        ("to_q", true) => "q_proj".into(),
        ("to_k", true) => "k_proj".into(),
        ("to_v", true) => "v_proj".into(),
        ("to_out", true) => "out_proj".into(),
        _ => return None,
    };
    Some(format!("{head}.{name}"))
}

/// A LoRA file's adapters, before they are checked against the model.
#[derive(Default)]
struct Found {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
}

impl LoraWeights {
    /// Reads every file, resolves its modules in `model` and checks their shapes. Nothing of the
    /// model is read.
    pub fn read(choices: &[LoraChoice], model: &ModelWeights) -> Result<Self, LoraError> {
        let kohya_names = KohyaNames::new(model);
        let mut out = Self::default();
        for choice in choices {
            let file = LoraFile::read(&choice.path)?;
            out.add(&file, choice.scale, model, &kohya_names)?;
        }
        Ok(out)
    }

    /// Whether no LoRA changes anything.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// How many weights of `network` the LoRAs change.
    pub fn changed(&self, network: Network) -> usize {
        self.deltas.keys().filter(|(n, _)| *n == network).count()
    }

    fn add(
        &mut self,
        file: &LoraFile,
        user_scale: f64,
        model: &ModelWeights,
        kohya_names: &KohyaNames,
    ) -> Result<(), LoraError> {
        let path = &file.path;
        let bad_key = |key: &str, reason: String| LoraError::BadKey {
            path: path.clone(),
            key: key.to_string(),
            reason,
        };
        let kohya = file.tensors.keys().all(|k| k.starts_with("lora_"));
        let config = PeftConfig::from_metadata(file).map_err(|reason| LoraError::Unsupported {
            path: path.clone(),
            reason,
        })?;
        // (network, weight name) → parts
        let mut found: BTreeMap<(Network, String), Found> = BTreeMap::new();
        for (key, tensor) in &file.tensors {
            if let Some((_, kind)) = OTHER_KINDS.iter().find(|(marker, _)| key.contains(marker)) {
                return Err(LoraError::Unsupported {
                    path: path.clone(),
                    reason: format!(
                        "key {key} belongs to a {kind} adapter, which this program does not fuse"
                    ),
                });
            }
            let (network, rest) = if kohya {
                kohya_network(key).ok_or_else(|| {
                    let reason = if key.starts_with("lora_te2_") {
                        "is for a second text encoder (SDXL's), which this model does not have"
                    } else {
                        "is not a kohya LoRA name (lora_unet_... or lora_te_...)"
                    };
                    bad_key(key, reason.into())
                })?
            } else {
                diffusers_network(key, model)
            };
            let Some((module, part)) = split_key(rest) else {
                return Err(bad_key(
                    key,
                    "is not a LoRA weight (.lora_A/.lora_B, .lora_down/.lora_up or .alpha)".into(),
                ));
            };
            let weight = if kohya {
                kohya_names.resolve(network, &module)
            } else {
                resolve(model, network, &module)
            };
            let Some(weight) = weight else {
                let what = match network {
                    Network::Unet => "the UNet",
                    Network::TextEncoder => "the text encoder",
                };
                return Err(bad_key(
                    key,
                    format!("names no module of {what} ({module})"),
                ));
            };
            let entry = found.entry((network, weight)).or_default();
            match part {
                Part::Down => entry.down = Some((key.clone(), tensor.clone())),
                Part::Up => entry.up = Some((key.clone(), tensor.clone())),
                Part::Alpha => {
                    let value = tensor
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|source| LoraError::Tensor {
                            path: path.clone(),
                            key: key.clone(),
                            source: Box::new(source),
                        })?;
                    let [alpha] = value[..] else {
                        return Err(bad_key(
                            key,
                            format!("holds {} values, an alpha is one", value.len()),
                        ));
                    };
                    entry.alpha = Some((key.clone(), f64::from(alpha)));
                }
            }
        }
        for ((network, weight), parts) in found {
            let shapes = match network {
                Network::Unet => &model.unet,
                Network::TextEncoder => &model.text_encoder,
            };
            let (Some((down_key, down)), Some((up_key, up))) = (parts.down, parts.up) else {
                let key = parts.alpha.map(|a| a.0).unwrap_or_default();
                return Err(bad_key(
                    &key,
                    format!("has no down and up weights for {weight}"),
                ));
            };
            let base = &shapes[&weight];
            let (down, up, rank) = fit(base, &down, &up).map_err(|reason| LoraError::Mismatch {
                path: path.clone(),
                key: down_key.clone(),
                reason: format!(
                    "({:?}, with {up_key} {:?}) {reason} {weight} of shape {base:?}",
                    down.dims(),
                    up.dims()
                ),
            })?;
            let module = weight.strip_suffix(".weight").unwrap_or(&weight);
            let alpha = parts
                .alpha
                .map(|a| a.1)
                .or_else(|| config.alpha(network, module))
                .unwrap_or(rank as f64);
            let scaling = if config.rslora(network) {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            self.deltas
                .entry((network, weight))
                .or_default()
                .push(Delta {
                    down,
                    up,
                    scale: user_scale * scaling,
                    path: path.clone(),
                    key: down_key,
                });
        }
        Ok(())
    }

    /// Wraps a network's weights: the changed ones come out fused.
    pub fn wrap(&self, network: Network, inner: Box<dyn SimpleBackend>) -> Box<dyn SimpleBackend> {
        let deltas: HashMap<String, Vec<Delta>> = self
            .deltas
            .iter()
            .filter(|((n, _), _)| *n == network)
            .map(|((_, w), d)| (w.clone(), d.clone()))
            .collect();
        if deltas.is_empty() {
            return inner;
        }
        Box::new(Fused {
            inner,
            deltas,
            text: network == Network::TextEncoder,
        })
    }
}

/// The network of a diffusers-format key and the rest of it.
fn diffusers_network<'a>(key: &'a str, model: &ModelWeights) -> (Network, &'a str) {
    if let Some(rest) = key.strip_prefix("unet.") {
        return (Network::Unet, rest);
    }
    if let Some(rest) = key.strip_prefix("text_encoder.") {
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        return (Network::TextEncoder, rest);
    }
    // A peft state dict of one network without its prefix.
    let text = split_key(key).is_some_and(|(module, _)| {
        let module = module.strip_prefix("text_model.").unwrap_or(&module);
        model.text_encoder.contains_key(&format!("{module}.weight"))
    });
    if text {
        (
            Network::TextEncoder,
            key.strip_prefix("text_model.").unwrap_or(key),
        )
    } else {
        (Network::Unet, key)
    }
}

/// The weight a diffusers module name adapts.
fn resolve(model: &ModelWeights, network: Network, module: &str) -> Option<String> {
    let shapes = match network {
        Network::Unet => &model.unet,
        Network::TextEncoder => &model.text_encoder,
    };
    let module = match network {
        Network::TextEncoder => module.strip_prefix("text_model.").unwrap_or(module),
        Network::Unet => module,
    };
    let weight = format!("{module}.weight");
    shapes.contains_key(&weight).then_some(weight)
}

fn kohya_network(key: &str) -> Option<(Network, &str)> {
    for (prefix, network) in [
        ("lora_unet_", Network::Unet),
        ("lora_te_", Network::TextEncoder),
        ("lora_te1_", Network::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return Some((network, rest));
        }
    }
    None
}

/// kohya's flattened module names (dots as underscores) of the model's modules.
struct KohyaNames {
    names: HashMap<(Network, String), String>,
}

impl KohyaNames {
    fn new(model: &ModelWeights) -> Self {
        let mut names = HashMap::new();
        let table = model
            .unet_ldm
            .as_ref()
            .map(|(layers, up)| super::single_file::ldm::unet_table_for(*layers, up));
        for weight in model.unet.keys() {
            let Some(module) = weight.strip_suffix(".weight") else {
                continue;
            };
            names.insert((Network::Unet, module.replace('.', "_")), weight.clone());
            if let Some((ldm, _)) = table.as_deref().and_then(|t: &[Rename]| to_ldm(t, weight))
                && let Some(ldm_module) = ldm.strip_suffix(".weight")
            {
                names
                    .entry((Network::Unet, ldm_module.replace('.', "_")))
                    .or_insert_with(|| weight.clone());
            }
        }
        for weight in model.text_encoder.keys() {
            let Some(module) = weight.strip_suffix(".weight") else {
                continue;
            };
            names.insert(
                (
                    Network::TextEncoder,
                    format!("text_model_{}", module.replace('.', "_")),
                ),
                weight.clone(),
            );
        }
        Self { names }
    }

    fn resolve(&self, network: Network, module: &str) -> Option<String> {
        self.names.get(&(network, module.to_string())).cloned()
    }
}

/// `down` and `up` as the 2-D factors of a weight of shape `base`, and the rank; the reason when
/// they do not fit it.
fn fit(base: &[usize], down: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor, usize), String> {
    let (down_dims, up_dims) = (down.dims(), up.dims());
    if base.len() < 2 || down_dims.len() < 2 || up_dims.len() < 2 {
        return Err("cannot adapt".into());
    }
    let out = base[0];
    let fan_in: usize = base[1..].iter().product();
    let rank = down_dims[0];
    if rank == 0 || up_dims[1] != rank || up_dims[2..].iter().any(|&d| d != 1) {
        return Err("has factors of different ranks for".into());
    }
    if up_dims[0] != out || down_dims[1..].iter().product::<usize>() != fan_in {
        return Err("does not fit".into());
    }
    if down_dims.len() > 2 && base.len() > 2 && down_dims[2..] != base[2..] {
        return Err("has another kernel size than".into());
    }
    let reshape = |t: &Tensor, shape: (usize, usize)| t.reshape(shape).map_err(|e| e.to_string());
    Ok((
        reshape(down, (rank, fan_in))?,
        reshape(up, (out, rank))?,
        rank,
    ))
}

/// The adapter config peft and diffusers write into the safetensors metadata.
#[derive(Debug, Default)]
struct PeftConfig {
    config: Option<Value>,
}

impl PeftConfig {
    fn from_metadata(file: &LoraFile) -> Result<Self, String> {
        let Some(text) = file.metadata.get(ADAPTER_METADATA_KEY) else {
            return Ok(Self::default());
        };
        let config: Value = serde_json::from_str(text)
            .map_err(|e| format!("its adapter metadata is not JSON: {e}"))?;
        for network in ["unet", "text_encoder"] {
            if config
                .get(format!("{network}.use_dora"))
                .and_then(Value::as_bool)
                == Some(true)
            {
                return Err("it is a DoRA adapter, which this program does not fuse".into());
            }
        }
        Ok(Self {
            config: Some(config),
        })
    }

    fn field(&self, network: Network, name: &str) -> Option<&Value> {
        let prefix = match network {
            Network::Unet => "unet",
            Network::TextEncoder => "text_encoder",
        };
        self.config
            .as_ref()?
            .get(format!("{prefix}.{name}"))
            .filter(|v| !v.is_null())
    }

    fn rslora(&self, network: Network) -> bool {
        self.field(network, "use_rslora").and_then(Value::as_bool) == Some(true)
    }

    /// α of a module: its `alpha_pattern` entry (a module-name suffix), else `lora_alpha`.
    fn alpha(&self, network: Network, module: &str) -> Option<f64> {
        let module = module.strip_prefix("text_model.").unwrap_or(module);
        if let Some(Value::Object(patterns)) = self.field(network, "alpha_pattern") {
            for (pattern, alpha) in patterns {
                let pattern = pattern.strip_prefix("text_model.").unwrap_or(pattern);
                if (module == pattern || module.ends_with(&format!(".{pattern}")))
                    && let Some(alpha) = alpha.as_f64()
                {
                    return Some(alpha);
                }
            }
        }
        self.field(network, "lora_alpha").and_then(Value::as_f64)
    }
}

/// A network's weights with the LoRA updates added to the adapted ones.
struct Fused {
    inner: Box<dyn SimpleBackend>,
    deltas: HashMap<String, Vec<Delta>>,
    /// Text encoder names come with or without `text_model.`.
    text: bool,
}

impl Fused {
    fn deltas_of(&self, name: &str) -> Option<&Vec<Delta>> {
        let name = if self.text {
            name.strip_prefix("text_model.").unwrap_or(name)
        } else {
            name
        };
        self.deltas.get(name)
    }

    fn fuse(
        &self,
        base: Tensor,
        deltas: &[Delta],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = base.shape().clone();
        let mut weight = base;
        for delta in deltas {
            let update = delta
                .up
                .matmul(&delta.down)
                .and_then(|u| u * delta.scale)
                .and_then(|u| u.reshape(&shape))
                .map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "LoRA {}: fusing {}: {e}",
                        delta.path.display(),
                        delta.key
                    ))
                })?;
            weight = (weight + update)?;
        }
        weight.to_dtype(dtype)?.to_device(device)
    }
}

impl SimpleBackend for Fused {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.deltas_of(name) {
            None => self.inner.get(shape, name, init, dtype, device),
            Some(deltas) => {
                let base = self
                    .inner
                    .get(shape, name, init, DType::F32, &Device::Cpu)?;
                self.fuse(base, deltas, dtype, device)
            }
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.deltas_of(name) {
            None => self.inner.get_unchecked(name, dtype, device),
            Some(deltas) => {
                let base = self.inner.get_unchecked(name, DType::F32, &Device::Cpu)?;
                self.fuse(base, deltas, dtype, device)
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_with_and_without_scale() {
        assert_eq!(
            "a.safetensors".parse::<LoraChoice>().unwrap(),
            LoraChoice::new("a.safetensors")
        );
        let c: LoraChoice = "dir/a.safetensors:0.7".parse().unwrap();
        assert_eq!((c.path, c.scale), (PathBuf::from("dir/a.safetensors"), 0.7));
        let c: LoraChoice = r"C:\loras\a.safetensors".parse().unwrap();
        assert_eq!(c.path, PathBuf::from(r"C:\loras\a.safetensors"));
        let c: LoraChoice = r"C:\loras\a.safetensors:-1.5".parse().unwrap();
        assert_eq!(c.scale, -1.5);
        assert!("a.safetensors:1e9".parse::<LoraChoice>().is_err());
        assert!("a.safetensors:nan".parse::<LoraChoice>().is_err());
        assert!("".parse::<LoraChoice>().is_err());
    }

    #[test]
    fn key_suffixes_name_the_module() {
        let split = split_key;
        assert_eq!(
            split("down_blocks.0.attentions.0.proj_in.lora_A.weight"),
            Some(("down_blocks.0.attentions.0.proj_in".into(), Part::Down))
        );
        assert_eq!(
            split(
                "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight"
            ),
            Some((
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0".into(),
                Part::Up
            ))
        );
        assert_eq!(
            split("text_model.encoder.layers.0.self_attn.to_k_lora.down.weight"),
            Some((
                "text_model.encoder.layers.0.self_attn.k_proj".into(),
                Part::Down
            ))
        );
        assert_eq!(
            split("down_blocks_0_resnets_0_conv1.alpha"),
            Some(("down_blocks_0_resnets_0_conv1".into(), Part::Alpha))
        );
        assert_eq!(split("down_blocks.0.resnets.0.conv1.weight"), None);
    }

    #[test]
    fn factors_must_fit_the_weight() {
        let cpu = Device::Cpu;
        let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &cpu).unwrap();
        assert!(fit(&[8, 4], &z(&[2, 4]), &z(&[8, 2])).is_ok());
        assert!(fit(&[8, 4, 3, 3], &z(&[2, 4, 3, 3]), &z(&[8, 2, 1, 1])).is_ok());
        assert!(fit(&[8, 4, 1, 1], &z(&[2, 4]), &z(&[8, 2])).is_ok());
        assert!(fit(&[8, 4], &z(&[2, 5]), &z(&[8, 2])).is_err());
        assert!(fit(&[8, 4], &z(&[2, 4]), &z(&[8, 3])).is_err());
        assert!(fit(&[8, 4, 3, 3], &z(&[2, 4, 1, 1]), &z(&[8, 2, 1, 1])).is_err());
    }
}
