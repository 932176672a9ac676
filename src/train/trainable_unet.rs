//! The trainable UNet: every weight a float32 variable, conv_in grown to 8 input channels for a
//! plain Stable Diffusion base, frozen for LoRA (on the CPU in bf16 mixed precision, held in bf16
//! from the start), and the network one micro-batch runs (in half precision over the float32
//! variables with `--mixed_precision` on a GPU). Re-exported from
//! [`crate::train::step`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use super::draws::mix_seed;
use super::step::{PLAIN_SD_IN_CHANNELS, Stage, TrainError};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::{INSTRUCT_PIX2PIX_IN_CHANNELS, LoadError, build_error};

/// The UNet with every weight a trainable [`Var`] (f32), its conv_in grown to 8 input channels
/// when it came from a plain Stable Diffusion model.
pub struct TrainableUNet {
    /// The network, built over the variables: updating a variable updates the network.
    pub unet: UNet2DConditionModel,
    config: UNetConfig,
    varmap: VarMap,
    params: Vec<(String, Var)>,
    grew_conv_in: bool,
    /// The dtype the forward and backward passes compute in (`--mixed_precision`): float32, or
    /// half precision over float32 master weights.
    compute_dtype: DType,
    /// Whether the base weights are frozen ([`TrainableUNet::freeze_base`]).
    base_frozen: bool,
}

impl std::fmt::Debug for TrainableUNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableUNet")
            .field("params", &self.params.len())
            .field("grew_conv_in", &self.grew_conv_in)
            .finish()
    }
}

/// Checks the UNet's tensors against its config and grows conv_in from 4 to 8 input channels
/// where needed: the tensors, the config (now of 8 input channels) and whether it grew.
fn prepare(
    mut tensors: BTreeMap<String, Tensor>,
    mut config: UNetConfig,
    source: &Path,
    seed: u64,
) -> Result<(BTreeMap<String, Tensor>, UNetConfig, bool), TrainError> {
    let config_path = source.join("config.json");
    let bad = |reason: String| LoadError::BadConfig {
        path: config_path.clone(),
        reason,
    };
    let conv_in_name = "conv_in.weight";
    let Some(conv_in) = tensors.get(conv_in_name) else {
        return Err(LoadError::MissingWeights {
            dir: source.to_path_buf(),
            names: conv_in_name.to_string(),
        }
        .into());
    };
    let weight_in = conv_in.dims().get(1).copied().unwrap_or(0);
    if weight_in != config.in_channels {
        return Err(bad(format!(
            "in_channels is {} but conv_in.weight takes {weight_in} channels",
            config.in_channels
        ))
        .into());
    }
    let grew_conv_in = match config.in_channels {
        INSTRUCT_PIX2PIX_IN_CHANNELS => false,
        PLAIN_SD_IN_CHANNELS => {
            let grown = grow_conv_in_weight(conv_in).stage("growing conv_in")?;
            let (out_channels, _, kh, kw) = grown.dims4().stage("growing conv_in")?;
            let bias = grown_conv_in_bias(out_channels, (kh, kw), seed, grown.device())
                .stage("growing conv_in")?;
            tensors.insert(conv_in_name.to_string(), grown);
            tensors.insert("conv_in.bias".to_string(), bias);
            config.in_channels = INSTRUCT_PIX2PIX_IN_CHANNELS;
            true
        }
        other => {
            return Err(bad(format!(
                "in_channels {other}: training starts from a 4-channel Stable Diffusion UNet or an 8-channel InstructPix2Pix one"
            ))
            .into());
        }
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok((tensors, config, grew_conv_in))
}

/// A UNet tensor as [`TrainableUNet::frozen_bf16`] holds it, applied to each tensor as it is
/// read: the convolution and linear weights (rank 2 and above) in bf16, biases and norms in
/// float32.
pub fn bf16_product_weights(_name: &str, tensor: Tensor) -> candle_core::Result<Tensor> {
    if tensor.rank() >= 2 && tensor.dtype() == DType::F32 {
        tensor.to_dtype(DType::BF16)
    } else {
        Ok(tensor)
    }
}

/// Named tensors handed to the UNet's loaders as they are held: a bf16 weight stays bf16 (and
/// shares its storage) where a plain `VarBuilder` would convert it to the build's float32.
struct HeldTensors(std::collections::HashMap<String, Tensor>);

impl HeldTensors {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let tensor = self
            .0
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let tensor = if tensor.dtype() == DType::BF16 {
            tensor.clone()
        } else {
            tensor.to_dtype(dtype)?
        };
        tensor.to_device(device)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

crate::model::weights::reader_backend!(HeldTensors);

/// The device the first of `tensors` is on (the CPU for none).
fn device_of<'a>(mut tensors: impl Iterator<Item = &'a Tensor>) -> Device {
    tensors
        .next()
        .map_or(Device::Cpu, |tensor| tensor.device().clone())
}

/// conv_in's weight [out, 4, k, k] grown to [out, 8, k, k] as the script does: the first four
/// input channels keep the pretrained weights, the four new ones (the image latents) start at 0.
pub fn grow_conv_in_weight(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (out, in_channels, kh, kw) = weight.dims4()?;
    let zeros = Tensor::zeros(
        (out, INSTRUCT_PIX2PIX_IN_CHANNELS - in_channels, kh, kw),
        weight.dtype(),
        weight.device(),
    )?;
    Tensor::cat(&[weight, &zeros], 1)
}

/// The grown conv_in's bias `[out]`: the script builds a fresh `nn.Conv2d(8, out, k)` and copies
/// only the weight into it, so its bias keeps torch's default initialisation, uniform in
/// ±1/√fan_in with fan_in = 8·k·k. Drawn here from `seed` (the run's `--seed`): the same
/// distribution as torch, not torch's numbers.
pub fn grown_conv_in_bias(
    out_channels: usize,
    kernel: (usize, usize),
    seed: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let fan_in = INSTRUCT_PIX2PIX_IN_CHANNELS * kernel.0 * kernel.1;
    let bound = 1.0 / (fan_in as f32).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix_seed(seed, CONV_IN_BIAS_STREAM));
    let values: Vec<f32> = (0..out_channels)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Tensor::from_vec(values, out_channels, device)
}

/// The `mix_seed` index of the grown conv_in bias's draws (far from any micro-batch index).
const CONV_IN_BIAS_STREAM: u64 = u64::MAX;

impl TrainableUNet {
    /// Builds the trainable UNet from named f32 tensors and their config (`source` names them in
    /// errors), growing conv_in from 4 to 8 input channels if needed (its new bias drawn from
    /// `seed`, see [`grown_conv_in_bias`]).
    pub fn from_tensors(
        tensors: BTreeMap<String, Tensor>,
        config: UNetConfig,
        source: &Path,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let (tensors, config, grew_conv_in) = prepare(tensors, config, source, seed)?;
        let config_path = source.join("config.json");
        let bad = |reason: String| LoadError::BadConfig {
            path: config_path.clone(),
            reason,
        };

        let varmap = VarMap::new();
        let mut params = Vec::with_capacity(tensors.len());
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| bad("the variable map's lock is poisoned".to_string()))?;
            for (name, tensor) in tensors {
                let var = Var::from_tensor(&tensor.to_dtype(DType::F32).stage("loading the UNet")?)
                    .stage("loading the UNet")?;
                data.insert(name.clone(), var.clone());
                params.push((name, var));
            }
        }
        let device = device_of(params.iter().map(|(_, v)| v.as_tensor()));
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let unet = UNet2DConditionModel::load(vb, &config)
            .map_err(build_error(source.to_path_buf(), "UNet"))?;
        // A VarMap creates any variable it is asked for and lacks: such names were missing.
        let known: std::collections::HashSet<&str> =
            params.iter().map(|(name, _)| name.as_str()).collect();
        let mut created: Vec<String> = varmap
            .data()
            .lock()
            .map_err(|_| bad("the variable map's lock is poisoned".to_string()))?
            .keys()
            .filter(|name| !known.contains(name.as_str()))
            .cloned()
            .collect();
        if !created.is_empty() {
            created.sort();
            return Err(LoadError::MissingWeights {
                dir: source.to_path_buf(),
                names: created.join(", "),
            }
            .into());
        }
        Ok(Self {
            unet,
            config,
            varmap,
            params,
            grew_conv_in,
            compute_dtype: DType::F32,
            base_frozen: false,
        })
    }

    /// The UNet of a LoRA run whose frozen base is held in bf16 (`--mixed_precision bf16` on the
    /// CPU): `tensors` hold the convolution and linear weights in bf16 and the rest in float32
    /// (as [`bf16_product_weights`] reads them). The network is built over them as they are, no
    /// second copy, and computes in float32: the differentiable kernels widen a weight for each
    /// product, the inference kernels take it as it is. There are no variables (the base is
    /// frozen from the start; a LoRA run saves its adapters only).
    pub fn frozen_bf16(
        tensors: BTreeMap<String, Tensor>,
        config: UNetConfig,
        source: &Path,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let (tensors, config, grew_conv_in) = prepare(tensors, config, source, seed)?;
        let device = device_of(tensors.values());
        let backend = HeldTensors(tensors.into_iter().collect());
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device);
        let unet = UNet2DConditionModel::load(vb, &config)
            .map_err(build_error(source.to_path_buf(), "UNet"))?;
        Ok(Self {
            unet,
            config,
            varmap: VarMap::new(),
            params: Vec::new(),
            grew_conv_in,
            compute_dtype: DType::F32,
            base_frozen: true,
        })
    }

    /// Computes the forward and backward passes in `dtype` (float16 or bfloat16: mixed
    /// precision, as torch's autocast does it: the variables stay float32 master weights and
    /// the optimizer sees float32 gradients). Call it before [`TrainableUNet::freeze_base`].
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// The dtype the passes compute in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The network one micro-batch runs: the trained one itself in float32 or when the base is
    /// frozen (then it was built in the compute dtype); otherwise a copy over the variables'
    /// half-precision casts, made anew for every micro-batch (the casts are part of the graph,
    /// so the gradients reach the float32 variables), checkpointing as the trained one does.
    pub fn compute_unet(&self) -> Result<Cow<'_, UNet2DConditionModel>, TrainError> {
        if self.compute_dtype == DType::F32 || self.base_frozen {
            return Ok(Cow::Borrowed(&self.unet));
        }
        let mut casts = std::collections::HashMap::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let cast = var
                .as_tensor()
                .to_dtype(self.compute_dtype)
                .stage("casting the weights to half precision")?;
            casts.insert(name.clone(), cast);
        }
        let device = self.unet_device();
        let vb = VarBuilder::from_tensors(casts, self.compute_dtype, &device);
        let mut unet = UNet2DConditionModel::load(vb, &self.config).map_err(build_error(
            PathBuf::from("(half-precision weights)"),
            "UNet",
        ))?;
        unet.share_gradient_checkpointing(&self.unet);
        Ok(Cow::Owned(unet))
    }

    fn unet_device(&self) -> Device {
        device_of(self.params.iter().map(|(_, v)| v.as_tensor()))
    }

    /// The trainable weights by diffusers name, sorted by name (the order gradients, moments and
    /// EMA weights use).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The variables as a candle `VarMap` (same variables as [`TrainableUNet::params`]).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The config, with `in_channels` 8 (what the saved model's `config.json` must say).
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether conv_in was grown from 4 input channels.
    pub fn grew_conv_in(&self) -> bool {
        self.grew_conv_in
    }

    /// The current weights by name, detached (for saving).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
            .collect()
    }

    /// A UNet of this config over `tensors` (all of [`TrainableUNet::params`]' names, e.g. the
    /// current weights or the EMA's) that are plain tensors, not variables: it builds no graph and
    /// uses the fast inference kernels (validation edits), and a loss through it differentiates
    /// only what is attached to it afterwards (LoRA adapters). Shares the tensors' storage.
    pub fn frozen_unet(
        &self,
        tensors: &[(String, Tensor)],
    ) -> Result<UNet2DConditionModel, TrainError> {
        self.frozen_unet_in(tensors, DType::F32)
    }

    /// [`TrainableUNet::frozen_unet`] computing in `dtype`.
    fn frozen_unet_in(
        &self,
        tensors: &[(String, Tensor)],
        dtype: DType,
    ) -> Result<UNet2DConditionModel, TrainError> {
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.detach()))
            .collect();
        let device = device_of(tensors.iter().map(|(_, t)| t));
        let vb = VarBuilder::from_tensors(map, dtype, &device);
        let unet = UNet2DConditionModel::load(vb, &self.config)
            .map_err(build_error(PathBuf::from("(trained weights)"), "UNet"))?;
        Ok(unet)
    }

    /// Makes the base weights frozen (for LoRA training): the network is rebuilt over plain
    /// tensors sharing the variables' storage, so backward passes compute no gradient for them.
    /// [`TrainableUNet::params`] still lists them (for saving).
    /// In mixed precision the frozen network is built over half-precision copies, as
    /// diffusers' LoRA scripts cast the frozen UNet to `weight_dtype`, and the float32
    /// variables are released ([`TrainableUNet::params`] is then empty: a LoRA run saves only
    /// its adapters).
    pub fn freeze_base(&mut self) -> Result<(), TrainError> {
        if self.base_frozen {
            return Ok(());
        }
        let mut tensors = self.named_tensors();
        if self.compute_dtype != DType::F32 {
            for (_, tensor) in &mut tensors {
                *tensor = tensor
                    .to_dtype(self.compute_dtype)
                    .stage("casting the frozen weights to half precision")?;
            }
        }
        self.unet = self.frozen_unet_in(&tensors, self.compute_dtype)?;
        self.base_frozen = true;
        if self.compute_dtype != DType::F32 {
            drop(tensors);
            self.params.clear();
            self.varmap = VarMap::new();
        }
        Ok(())
    }
}
