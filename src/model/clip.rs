//! The CLIP text encoder that Stable Diffusion uses as `text_encoder`: transformers'
//! `CLIPTextModel` (token + position embeddings, pre-norm transformer layers with a causal mask,
//! final layer norm), read from transformers' `config.json` and weight names.
//!
//! Both weight layouts in use are accepted: the Hub's Stable Diffusion checkpoints name the weights
//! under `text_model.` (`text_model.embeddings.token_embedding.weight`, …) while transformers 5
//! saves them at the root (`embeddings.token_embedding.weight`, …).
//!
//! SD 2.x uses OpenCLIP's penultimate layer; diffusers' saved config already sets
//! `num_hidden_layers` to 23 (the 24th layer is dropped at conversion), so the model is simply run
//! to its last configured layer and its final layer norm, with no layer skipping here.
//!
//! Everything stays differentiable (the shared blocks of [`super::nn`] pick backprop-capable ops
//! when a gradient is tracked).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{LayerNorm, Linear, gelu, softmax_last_dim};

/// The weight-name prefix of the Hub's Stable Diffusion text encoders.
const TEXT_MODEL_PREFIX: &str = "text_model";

/// Errors reading a CLIP text encoder `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ClipConfigError {
    /// The file could not be read.
    #[error("cannot read the CLIP text encoder config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid CLIP text config (bad JSON, missing field, unknown `hidden_act`).
    #[error("the CLIP text encoder config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The values parse but do not describe a model that can be built.
    #[error("the CLIP text encoder config {path} is not usable: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// The activation of the MLP blocks (`hidden_act` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ClipActivation {
    /// `x·σ(1.702·x)`: OpenAI CLIP ViT-L/14, the SD 1.x text encoder.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The exact (erf) GELU: OpenCLIP ViT-H/14, the SD 2.x text encoder.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU (`gelu_new` / `gelu_pytorch_tanh` in transformers).
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
}

impl ClipActivation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => gelu(x),
            Self::GeluTanh => x.gelu(),
        }
    }
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// The text encoder's `config.json` (transformers' `CLIPTextConfig`); missing fields take
/// transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Number of token ids (rows of the token embedding).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the hidden states (the UNet's `cross_attention_dim`).
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Transformer layers actually run (23 for SD 2.x: diffusers already dropped the last).
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Longest token sequence (77 for Stable Diffusion).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// The MLP activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: ClipActivation,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Only used by `CLIPTextModelWithProjection`; kept for completeness.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Start-of-text id, as recorded (not used by the forward pass).
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-text id, as recorded (not used by the forward pass).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Padding id, as recorded; the tokenizer's files decide the real padding.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl ClipTextConfig {
    /// Reads and checks `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> std::result::Result<Self, ClipConfigError> {
        let text = crate::model::files::read_to_string_limited(
            path,
            crate::model::files::MAX_CONFIG_BYTES,
        )
        .map_err(|source| ClipConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self =
            serde_json::from_str(&text).map_err(|source| ClipConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        config.check().map_err(|problem| ClipConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    /// Whether the values describe a buildable model; the problem in words otherwise.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} is not a positive number",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

/// One pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: ClipActivation,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), hidden, config.layer_norm_eps)?,
            q_proj: Linear::load(attn.pp("q_proj"), hidden, hidden, true)?,
            k_proj: Linear::load(attn.pp("k_proj"), hidden, hidden, true)?,
            v_proj: Linear::load(attn.pp("v_proj"), hidden, hidden, true)?,
            out_proj: Linear::load(attn.pp("out_proj"), hidden, hidden, true)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), hidden, config.layer_norm_eps)?,
            fc1: Linear::load(mlp.pp("fc1"), hidden, config.intermediate_size, true)?,
            fc2: Linear::load(mlp.pp("fc2"), config.intermediate_size, hidden, true)?,
            heads: config.num_attention_heads,
            activation: config.hidden_act,
        })
    }

    /// `x`: [batch, seq, hidden]; `causal_mask`: [seq, seq] additive (0 / f32::MIN).
    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = self.q_proj.forward(&h)?;
        let k = self.k_proj.forward(&h)?;
        let v = self.v_proj.forward(&h)?;
        let attn = masked_attention(&q, &k, &v, self.heads, causal_mask)?;
        let x = (x + self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.activation.apply(&self.fc1.forward(&h)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// Multi-head self-attention with an additive mask (nn.rs' `attention` has no mask).
///
/// `q`, `k`, `v`: [batch, seq, heads·head_dim]; `mask`: [seq, seq] f32, added to the scores.
/// Scores and softmax run in f32 for half-precision inputs, as transformers does.
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: &Tensor,
) -> Result<Tensor> {
    let (batch, seq, inner) = q.dims3()?;
    let head_dim = inner / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        t.reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let dtype = q.dtype();
    let work_dtype = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q
        .to_dtype(work_dtype)?
        .matmul(&k.to_dtype(work_dtype)?.t()?)?
        * scale)?;
    let scores = scores.broadcast_add(&mask.to_dtype(work_dtype)?)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((batch, seq, inner))
}

/// The additive causal mask [seq, seq]: 0 on and below the diagonal, the lowest f32 above (as
/// transformers does; finite, so no −∞ can turn into NaN in a backward pass).
fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|row| (0..seq).map(move |col| if col > row { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq, seq), device)
}

/// transformers' `CLIPTextModel`: input ids → last hidden state (after the final layer norm).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from `vb` at the weight file's root, under either `text_model.` (the Hub's
    /// SD checkpoints) or the root itself (what transformers 5 saves). A builder that holds
    /// neither (a fresh `VarMap`) gets the `text_model.` names.
    pub fn load(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::msg)?;
        let vb = if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb
        } else {
            vb.pp(TEXT_MODEL_PREFIX)
        };
        let hidden = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        let token_embedding = embeddings
            .pp("token_embedding")
            .get((config.vocab_size, hidden), "weight")?;
        let position_embedding = embeddings
            .pp("position_embedding")
            .get((config.max_position_embeddings, hidden), "weight")?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(layers_vb.pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::load(vb.pp("final_layer_norm"), hidden, config.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: config.clone(),
        })
    }

    /// `input_ids`: u32 (or any integer dtype) [batch, seq] with seq ≤ max_position_embeddings
    /// and every id below vocab_size → last_hidden_state [batch, seq, hidden_size].
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq == 0 || seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "CLIP text encoder: sequence length {seq} is not in 1..={}",
                self.config.max_position_embeddings
            );
        }
        let ids = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        let max_id = ids.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            candle_core::bail!(
                "CLIP text encoder: token id {max_id} is outside the vocabulary of {}",
                self.config.vocab_size
            );
        }
        let hidden = self.config.hidden_size;
        let tokens = self
            .token_embedding
            .index_select(&ids, 0)?
            .reshape((batch, seq, hidden))?;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(seq, x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The width of the hidden states (the UNet's `cross_attention_dim`).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    use candle_nn::VarMap;

    /// Tolerance against transformers (float32 on both sides, hidden 32): summation order
    /// differences stay near 1e-6 on outputs of order 1.
    const TOLERANCE: f32 = 1e-4;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_vae")
    }

    /// The fixture model `name` with its weights in `dtype`.
    fn load_model(name: &str, dtype: DType) -> anyhow::Result<ClipTextModel> {
        let dir = fixtures().join(name);
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        // SAFETY: the fixture files are not modified while the test runs.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                dtype,
                &Device::Cpu,
            )?
        };
        Ok(ClipTextModel::load(vb, &config)?)
    }

    fn load_fixture(name: &str) -> anyhow::Result<(ClipTextModel, HashMap<String, Tensor>)> {
        let model = load_model(name, DType::F32)?;
        let refs_path = fixtures().join(format!("{name}_refs.safetensors"));
        let refs = candle_core::safetensors::load(refs_path, &Device::Cpu)?;
        Ok((model, refs))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        assert_eq!(a.dims(), b.dims());
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    fn compare_with_transformers(name: &str) -> anyhow::Result<()> {
        let (model, refs) = load_fixture(name)?;
        for case in ["77", "short"] {
            let ids = refs[&format!("input_ids_{case}")].to_dtype(DType::U32)?;
            let want = &refs[&format!("last_hidden_state_{case}")];
            let got = model.forward(&ids)?;
            let diff = max_abs_diff(&got, want)?;
            eprintln!("{name} {case} {:?}: max abs diff {diff:e}", got.dims());
            assert!(diff < TOLERANCE, "{name} {case}: max abs diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn quick_gelu_model_matches_transformers() -> anyhow::Result<()> {
        // Weight names at the root, as transformers 5 saves them; SD1's activation.
        compare_with_transformers("clip_quick_gelu")
    }

    #[test]
    fn gelu_model_with_text_model_prefix_matches_transformers() -> anyhow::Result<()> {
        // Weight names under `text_model.` as on the Hub; SD2's activation; padded with id 0.
        compare_with_transformers("clip_gelu")
    }

    #[test]
    fn runs_in_half_precision() -> anyhow::Result<()> {
        let model = load_model("clip_gelu", DType::F16)?;
        let (_, refs) = load_fixture("clip_gelu")?;
        let got = model.forward(&refs["input_ids_77"].to_dtype(DType::U32)?)?;
        assert_eq!(got.dtype(), DType::F16);
        let diff = max_abs_diff(&got.to_dtype(DType::F32)?, &refs["last_hidden_state_77"])?;
        eprintln!("clip_gelu F16: max abs diff {diff:e}");
        // float16 keeps ~3 significant digits per op on outputs of order 1.
        assert!(diff < 2e-2, "F16 max abs diff {diff}");
        Ok(())
    }

    #[test]
    fn rejects_too_long_sequences_and_unknown_ids() -> anyhow::Result<()> {
        let (model, _) = load_fixture("clip_quick_gelu")?;
        let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu)?;
        assert!(model.forward(&too_long).is_err());
        let unknown = Tensor::new(&[[1u32, 1000]], &Device::Cpu)?;
        let err = model
            .forward(&unknown)
            .expect_err("id 1000 is outside a vocab of 1000");
        assert!(err.to_string().contains("1000"), "{err}");
        Ok(())
    }

    #[test]
    fn every_weight_gets_a_gradient() -> anyhow::Result<()> {
        let dir = fixtures().join("clip_quick_gelu");
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = ClipTextModel::load(vb, &config)?;
        // A fresh VarMap gets the Hub's `text_model.` names; fill it from the root-named file.
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let vars = varmap.all_vars();
        {
            let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(data.len(), weights.len(), "one variable per stored weight");
            for (name, var) in data.iter() {
                let stored = name.strip_prefix("text_model.").unwrap_or(name);
                var.set(&weights[stored])?;
            }
        }
        let (_, refs) = load_fixture("clip_quick_gelu")?;
        let ids = refs["input_ids_77"].to_dtype(DType::U32)?;
        let loss = model.forward(&ids)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
        for (name, var) in data.iter() {
            let grad = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{name} got no gradient"))?;
            let largest = grad.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(largest > 0.0, "{name} has an all-zero gradient");
        }
        assert_eq!(vars.len(), 4 + 16 * config.num_hidden_layers);
        Ok(())
    }

    #[test]
    fn causal_mask_blocks_only_later_positions() -> Result<()> {
        let mask = causal_mask(3, &Device::Cpu)?.to_vec2::<f32>()?;
        for (row, values) in mask.iter().enumerate() {
            for (col, &v) in values.iter().enumerate() {
                let want = if col > row { f32::MIN } else { 0.0 };
                assert_eq!(v, want, "mask[{row}][{col}]");
            }
        }
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_its_formula() -> Result<()> {
        let xs = [-3.0f32, -0.5, 0.0, 0.7, 2.5];
        let t = Tensor::new(&xs, &Device::Cpu)?;
        let got = ClipActivation::QuickGelu.apply(&t)?.to_vec1::<f32>()?;
        for (x, y) in xs.iter().zip(got) {
            let want = x / (1.0 + (-1.702 * x).exp());
            assert!(
                (y - want).abs() < 1e-6,
                "quick_gelu({x}) = {y}, want {want}"
            );
        }
        Ok(())
    }

    #[test]
    fn config_rejects_unknown_activation_and_bad_heads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"hidden_act": "swish"}"#).expect("write");
        let err = ClipTextConfig::from_file(&path).expect_err("swish is not a CLIP activation");
        assert!(matches!(err, ClipConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");

        std::fs::write(&path, r#"{"hidden_size": 30, "num_attention_heads": 4}"#).expect("write");
        let err = ClipTextConfig::from_file(&path).expect_err("30 is not divisible by 4");
        assert!(matches!(err, ClipConfigError::Invalid { .. }), "{err}");

        let missing = dir.path().join("absent.json");
        let err = ClipTextConfig::from_file(&missing).expect_err("no such file");
        assert!(matches!(err, ClipConfigError::Read { .. }), "{err}");
    }
}
