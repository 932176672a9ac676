//! The original CompVis/LDM key layout of Stable Diffusion checkpoints, mapped to diffusers' names
//! (what diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
//! `convert_ldm_clip_checkpoint` do), and the configs read from the tensors' shapes.
//!
//! The mapping is a table of name prefixes built from the layout found in the file (levels,
//! resnets per level, which levels have attention), used in both directions: diffusers name →
//! file name when a network asks for a weight, file name → diffusers name to list what the file
//! holds (for LoRA checks). Inside a prefix the remaining names are the same on both sides, except
//! for the resnets' and the VAE attention's inner names, mapped by [`Inner`].

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Tensor names (without the component prefix) and their shapes.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// The UNet's prefix in LDM files.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE's prefixes in LDM files (`vae.` in some merges).
pub const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
/// The CLIP text encoder's prefix (SD 1.x: transformers' `CLIPTextModel` under it).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x's OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// The EMA copy of the UNet: `model_ema.` + the UNet key with its dots removed.
pub const EMA_PREFIX: &str = "model_ema.";

/// How the names inside a prefix differ between the two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// The same names.
    Same,
    /// A UNet resnet: `norm1` ↔ `in_layers.0`, `conv1` ↔ `in_layers.2`, …
    UNetResnet,
    /// A VAE resnet: `conv_shortcut` ↔ `nin_shortcut`.
    VaeResnet,
    /// A VAE attention: `group_norm` ↔ `norm`, `to_q` ↔ `q`, …, `to_out.0` ↔ `proj_out`; LDM's
    /// projections are 1×1 convolutions, diffusers' linear layers.
    VaeAttention,
}

const UNET_RESNET: [(&str, &str); 6] = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
];
const VAE_RESNET: [(&str, &str); 1] = [("conv_shortcut.", "nin_shortcut.")];
const VAE_ATTENTION: [(&str, &str); 5] = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
];

impl Inner {
    fn pairs(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Inner::Same => &[],
            Inner::UNetResnet => &UNET_RESNET,
            Inner::VaeResnet => &VAE_RESNET,
            Inner::VaeAttention => &VAE_ATTENTION,
        }
    }
}

/// One row of the table: a diffusers prefix, the file's prefix, and the inner names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    pub diffusers: String,
    pub ldm: String,
    pub inner: Inner,
}

fn rename(diffusers: impl Into<String>, ldm: impl Into<String>, inner: Inner) -> Rename {
    Rename {
        diffusers: diffusers.into(),
        ldm: ldm.into(),
        inner,
    }
}

/// The file's name (without the component prefix) of a diffusers weight name, and how its
/// inner names were mapped.
pub fn to_ldm(table: &[Rename], name: &str) -> Option<(String, Inner)> {
    for row in table {
        if let Some(rest) = name.strip_prefix(row.diffusers.as_str()) {
            let rest = map_inner(rest, row.inner, false)?;
            return Some((format!("{}{rest}", row.ldm), row.inner));
        }
    }
    None
}

/// The diffusers name of a file's name (without the component prefix).
pub fn to_diffusers(table: &[Rename], name: &str) -> Option<String> {
    for row in table {
        if let Some(rest) = name.strip_prefix(row.ldm.as_str()) {
            let rest = map_inner(rest, row.inner, true)?;
            return Some(format!("{}{rest}", row.diffusers));
        }
    }
    None
}

fn map_inner(rest: &str, inner: Inner, from_ldm: bool) -> Option<String> {
    let pairs = inner.pairs();
    if pairs.is_empty() {
        return Some(rest.to_string());
    }
    // The VAE's per-level rows end at `resnets.` / `block.`: the resnet's index comes first.
    let (index, rest) = match rest.split_once('.') {
        Some((first, tail)) if inner == Inner::VaeResnet && first.parse::<usize>().is_ok() => {
            (format!("{first}."), tail)
        }
        _ => (String::new(), rest),
    };
    for &(d, l) in pairs {
        let (from, to) = if from_ldm { (l, d) } else { (d, l) };
        if let Some(tail) = rest.strip_prefix(from) {
            return Some(format!("{index}{to}{tail}"));
        }
    }
    // Names of a resnet that are the same on both sides (VAE `norm1`, `conv1`, …).
    match inner {
        Inner::VaeResnet => Some(format!("{index}{rest}")),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------
// UNet
// ------------------------------------------------------------------------------------------

/// The UNet's structure as found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetLayout {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_attention: Vec<bool>,
    /// Up levels, deepest first.
    pub up_attention: Vec<bool>,
    pub transformer_depth: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub time_embedding_dim: usize,
}

fn dims<'a>(shapes: &'a Shapes, name: &str) -> Result<&'a [usize], String> {
    shapes
        .get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("it has no {name}"))
}

fn dim(shapes: &Shapes, name: &str, index: usize, rank: usize) -> Result<usize, String> {
    let d = dims(shapes, name)?;
    if d.len() != rank {
        return Err(format!(
            "{name} has shape {d:?}, expected {rank} dimensions"
        ));
    }
    Ok(d[index])
}

/// The number of consecutive `format(i)` names present from i = start.
fn count_from(shapes: &Shapes, start: usize, name: impl Fn(usize) -> String) -> usize {
    (start..)
        .take_while(|&i| shapes.contains_key(&name(i)))
        .count()
}

/// Whether any name starts with `prefix`.
fn has_prefix(shapes: &Shapes, prefix: &str) -> bool {
    shapes
        .range(prefix.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

/// Reads the UNet's structure from its tensors (names without `model.diffusion_model.`).
pub fn unet_layout(shapes: &Shapes) -> Result<UNetLayout, String> {
    let conv_in = "input_blocks.0.0.weight";
    let in_channels = dim(shapes, conv_in, 1, 4)?;
    let model_channels = dim(shapes, conv_in, 0, 4)?;
    let conv_in_kernel = dim(shapes, conv_in, 2, 4)?;
    if has_prefix(shapes, "label_emb.") {
        return Err(
            "it has class or size embeddings (label_emb: SDXL or an upscaler), which InstructPix2Pix models do not have"
                .into(),
        );
    }
    // input_blocks 1.. are resnets of a level, then its downsampler (not after the last level).
    let mut levels: Vec<Vec<usize>> = vec![Vec::new()];
    let mut n = 1;
    loop {
        if shapes.contains_key(&format!("input_blocks.{n}.0.op.weight")) {
            levels.push(Vec::new());
        } else if shapes.contains_key(&format!("input_blocks.{n}.0.in_layers.2.weight")) {
            if let Some(level) = levels.last_mut() {
                level.push(n);
            }
        } else {
            break;
        }
        n += 1;
    }
    let layers_per_block = levels[0].len();
    if layers_per_block == 0 {
        return Err("its input_blocks hold no resnets".into());
    }
    if let Some(level) = levels.iter().position(|l| l.len() != layers_per_block) {
        return Err(format!(
            "level {level} of its input_blocks has {} resnets, level 0 has {layers_per_block}",
            levels[level].len()
        ));
    }
    let mut block_out_channels = Vec::new();
    let mut down_attention = Vec::new();
    let mut transformer_depth = Vec::new();
    for (level, blocks) in levels.iter().enumerate() {
        let first = blocks[0];
        block_out_channels.push(dim(
            shapes,
            &format!("input_blocks.{first}.0.in_layers.2.weight"),
            0,
            4,
        )?);
        let attention: Vec<bool> = blocks
            .iter()
            .map(|n| has_prefix(shapes, &format!("input_blocks.{n}.1.")))
            .collect();
        if attention.iter().any(|&a| a != attention[0]) {
            return Err(format!(
                "level {level} of its input_blocks has attention in some resnets only"
            ));
        }
        down_attention.push(attention[0]);
        transformer_depth.push(if attention[0] {
            count_from(shapes, 0, |k| {
                format!("input_blocks.{first}.1.transformer_blocks.{k}.attn1.to_q.weight")
            })
        } else {
            1
        });
    }
    let levels_count = levels.len();
    let mut up_attention = Vec::new();
    for level in 0..levels_count {
        for j in 0..=layers_per_block {
            let n = level * (layers_per_block + 1) + j;
            if !shapes.contains_key(&format!("output_blocks.{n}.0.in_layers.2.weight")) {
                return Err(format!(
                    "it has no output_blocks.{n} resnet, which {levels_count} levels of {layers_per_block} resnets need"
                ));
            }
        }
        let n = level * (layers_per_block + 1);
        up_attention.push(shapes.contains_key(&format!("output_blocks.{n}.1.proj_in.weight")));
    }
    for name in [
        "middle_block.0.in_layers.2.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.in_layers.2.weight",
    ] {
        dims(shapes, name)?;
    }
    let attn2 = shapes
        .iter()
        .find(|(k, _)| k.ends_with(".attn2.to_k.weight"))
        .ok_or("it has no cross-attention (attn2) layers")?;
    let cross_attention_dim = dim(shapes, attn2.0, 1, 2)?;
    let use_linear_projection = dims(shapes, "middle_block.1.proj_in.weight")?.len() == 2;
    let out_channels = dim(shapes, "out.2.weight", 0, 4)?;
    let conv_out_kernel = dim(shapes, "out.2.weight", 2, 4)?;
    let time_embedding_dim = dim(shapes, "time_embed.0.weight", 0, 2)?;
    if dim(shapes, "time_embed.0.weight", 1, 2)? != model_channels {
        return Err("time_embed.0.weight does not take input_blocks.0.0's channels".into());
    }
    Ok(UNetLayout {
        in_channels,
        out_channels,
        block_out_channels,
        layers_per_block,
        down_attention,
        up_attention,
        transformer_depth,
        cross_attention_dim,
        use_linear_projection,
        conv_in_kernel,
        conv_out_kernel,
        time_embedding_dim,
    })
}

/// The diffusers ↔ LDM table of a UNet of this layout.
pub fn unet_table(layout: &UNetLayout) -> Vec<Rename> {
    unet_table_for(layout.layers_per_block, &layout.up_attention)
}

/// The diffusers ↔ LDM table of a UNet of `layers` resnets per down level, whose up levels
/// (deepest first) have attention or not.
pub fn unet_table_for(layers: usize, up_attention: &[bool]) -> Vec<Rename> {
    let levels = up_attention.len();
    let mut table = vec![
        rename("time_embedding.linear_1.", "time_embed.0.", Inner::Same),
        rename("time_embedding.linear_2.", "time_embed.2.", Inner::Same),
        rename("conv_in.", "input_blocks.0.0.", Inner::Same),
        rename("conv_norm_out.", "out.0.", Inner::Same),
        rename("conv_out.", "out.2.", Inner::Same),
        rename("mid_block.resnets.0.", "middle_block.0.", Inner::UNetResnet),
        rename("mid_block.attentions.0.", "middle_block.1.", Inner::Same),
        rename("mid_block.resnets.1.", "middle_block.2.", Inner::UNetResnet),
    ];
    for level in 0..levels {
        for j in 0..layers {
            let n = 1 + level * (layers + 1) + j;
            table.push(rename(
                format!("down_blocks.{level}.resnets.{j}."),
                format!("input_blocks.{n}.0."),
                Inner::UNetResnet,
            ));
            table.push(rename(
                format!("down_blocks.{level}.attentions.{j}."),
                format!("input_blocks.{n}.1."),
                Inner::Same,
            ));
        }
        // The downsampler's row comes after the resnets': `input_blocks.{n}.0.` of a resnet must
        // not swallow `input_blocks.{n}.0.op.` (they never share an n).
        let n = 1 + level * (layers + 1) + layers;
        table.push(rename(
            format!("down_blocks.{level}.downsamplers.0.conv."),
            format!("input_blocks.{n}.0.op."),
            Inner::Same,
        ));
    }
    for (level, &attention) in up_attention.iter().enumerate() {
        let slot = if attention { 2 } else { 1 };
        let n = level * (layers + 1) + layers;
        // Before the attention rows: `output_blocks.{n}.1.conv.` is the upsampler when the level
        // has no attention.
        table.push(rename(
            format!("up_blocks.{level}.upsamplers.0.conv."),
            format!("output_blocks.{n}.{slot}.conv."),
            Inner::Same,
        ));
        for j in 0..=layers {
            let n = level * (layers + 1) + j;
            table.push(rename(
                format!("up_blocks.{level}.resnets.{j}."),
                format!("output_blocks.{n}.0."),
                Inner::UNetResnet,
            ));
            if attention {
                table.push(rename(
                    format!("up_blocks.{level}.attentions.{j}."),
                    format!("output_blocks.{n}.1."),
                    Inner::Same,
                ));
            }
        }
    }
    table
}

/// The fields of diffusers' `unet/config.json` the tensors decide.
pub fn unet_config_fields(layout: &UNetLayout) -> serde_json::Map<String, Value> {
    let down: Vec<&str> = layout
        .down_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = layout
        .up_attention
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let depth = &layout.transformer_depth;
    let depth = if depth.iter().all(|&d| d == depth[0]) {
        json!(depth[0])
    } else {
        json!(depth)
    };
    let mut fields = serde_json::Map::new();
    fields.insert("in_channels".into(), json!(layout.in_channels));
    fields.insert("out_channels".into(), json!(layout.out_channels));
    fields.insert(
        "block_out_channels".into(),
        json!(layout.block_out_channels),
    );
    fields.insert("layers_per_block".into(), json!(layout.layers_per_block));
    fields.insert("down_block_types".into(), json!(down));
    fields.insert("up_block_types".into(), json!(up));
    fields.insert("mid_block_type".into(), json!("UNetMidBlock2DCrossAttn"));
    fields.insert(
        "cross_attention_dim".into(),
        json!(layout.cross_attention_dim),
    );
    fields.insert(
        "use_linear_projection".into(),
        json!(layout.use_linear_projection),
    );
    fields.insert("transformer_layers_per_block".into(), depth);
    fields.insert("conv_in_kernel".into(), json!(layout.conv_in_kernel));
    fields.insert("conv_out_kernel".into(), json!(layout.conv_out_kernel));
    let default_time = layout.block_out_channels[0] * 4;
    fields.insert(
        "time_embedding_dim".into(),
        if layout.time_embedding_dim == default_time {
            Value::Null
        } else {
            json!(layout.time_embedding_dim)
        },
    );
    fields
}

/// The head counts the original configs give when no template says: 8 heads everywhere for
/// SD 1.x (`num_heads: 8`), heads of 64 channels for SD 2.x (`num_head_channels: 64`, with
/// linear projections).
pub fn default_attention_heads(layout: &UNetLayout) -> Value {
    if layout.use_linear_projection {
        json!(
            layout
                .block_out_channels
                .iter()
                .map(|c| (c / 64).max(1))
                .collect::<Vec<_>>()
        )
    } else {
        json!(8)
    }
}

// ------------------------------------------------------------------------------------------
// VAE
// ------------------------------------------------------------------------------------------

/// The VAE's structure as found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeLayout {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_attention: bool,
}

/// Reads the VAE's structure (names without `first_stage_model.`).
pub fn vae_layout(shapes: &Shapes) -> Result<VaeLayout, String> {
    let in_channels = dim(shapes, "encoder.conv_in.weight", 1, 4)?;
    let levels = count_from(shapes, 0, |i| {
        format!("encoder.down.{i}.block.0.conv1.weight")
    });
    if levels == 0 {
        return Err("it has no encoder.down blocks".into());
    }
    let layers_per_block = count_from(shapes, 0, |j| {
        format!("encoder.down.0.block.{j}.conv1.weight")
    });
    let mut block_out_channels = Vec::new();
    for i in 0..levels {
        block_out_channels.push(dim(
            shapes,
            &format!("encoder.down.{i}.block.0.conv1.weight"),
            0,
            4,
        )?);
        for j in 0..=layers_per_block {
            let level = levels - 1 - i;
            dims(
                shapes,
                &format!("decoder.up.{level}.block.{j}.conv1.weight"),
            )?;
        }
    }
    let latent_channels = dim(shapes, "decoder.conv_in.weight", 1, 4)?;
    let out_channels = dim(shapes, "decoder.conv_out.weight", 0, 4)?;
    Ok(VaeLayout {
        in_channels,
        out_channels,
        block_out_channels,
        layers_per_block,
        latent_channels,
        use_quant_conv: shapes.contains_key("quant_conv.weight"),
        use_post_quant_conv: shapes.contains_key("post_quant_conv.weight"),
        mid_attention: shapes.contains_key("encoder.mid.attn_1.q.weight"),
    })
}

/// The diffusers ↔ LDM table of a VAE of this layout.
pub fn vae_table(layout: &VaeLayout) -> Vec<Rename> {
    let levels = layout.block_out_channels.len();
    let mut table = Vec::new();
    for part in ["encoder", "decoder"] {
        table.push(rename(
            format!("{part}.mid_block.resnets.0."),
            format!("{part}.mid.block_1."),
            Inner::VaeResnet,
        ));
        table.push(rename(
            format!("{part}.mid_block.resnets.1."),
            format!("{part}.mid.block_2."),
            Inner::VaeResnet,
        ));
        table.push(rename(
            format!("{part}.mid_block.attentions.0."),
            format!("{part}.mid.attn_1."),
            Inner::VaeAttention,
        ));
        table.push(rename(
            format!("{part}.conv_norm_out."),
            format!("{part}.norm_out."),
            Inner::Same,
        ));
    }
    for level in 0..levels {
        table.push(rename(
            format!("encoder.down_blocks.{level}.resnets."),
            format!("encoder.down.{level}.block."),
            Inner::VaeResnet,
        ));
        table.push(rename(
            format!("encoder.down_blocks.{level}.downsamplers.0."),
            format!("encoder.down.{level}.downsample."),
            Inner::Same,
        ));
        let ldm = levels - 1 - level;
        table.push(rename(
            format!("decoder.up_blocks.{level}.resnets."),
            format!("decoder.up.{ldm}.block."),
            Inner::VaeResnet,
        ));
        table.push(rename(
            format!("decoder.up_blocks.{level}.upsamplers.0."),
            format!("decoder.up.{ldm}.upsample."),
            Inner::Same,
        ));
    }
    // conv_in, conv_out, quant_conv, post_quant_conv: the same names.
    for name in [
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
        "quant_conv.",
        "post_quant_conv.",
    ] {
        table.push(rename(name, name, Inner::Same));
    }
    table
}

/// The fields of diffusers' `vae/config.json` the tensors decide.
pub fn vae_config_fields(layout: &VaeLayout) -> serde_json::Map<String, Value> {
    let levels = layout.block_out_channels.len();
    let mut fields = serde_json::Map::new();
    fields.insert("in_channels".into(), json!(layout.in_channels));
    fields.insert("out_channels".into(), json!(layout.out_channels));
    fields.insert(
        "block_out_channels".into(),
        json!(layout.block_out_channels),
    );
    fields.insert("layers_per_block".into(), json!(layout.layers_per_block));
    fields.insert("latent_channels".into(), json!(layout.latent_channels));
    fields.insert(
        "down_block_types".into(),
        json!(vec!["DownEncoderBlock2D"; levels]),
    );
    fields.insert(
        "up_block_types".into(),
        json!(vec!["UpDecoderBlock2D"; levels]),
    );
    fields.insert("use_quant_conv".into(), json!(layout.use_quant_conv));
    fields.insert(
        "use_post_quant_conv".into(),
        json!(layout.use_post_quant_conv),
    );
    fields.insert(
        "mid_block_add_attention".into(),
        json!(layout.mid_attention),
    );
    fields
}

// ------------------------------------------------------------------------------------------
// CLIP text encoder
// ------------------------------------------------------------------------------------------

/// The text encoder's sizes as found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipLayout {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
}

/// Reads the CLIP text encoder's sizes (names without `cond_stage_model.transformer.` and
/// without `text_model.`).
pub fn clip_layout(shapes: &Shapes) -> Result<ClipLayout, String> {
    let token = "embeddings.token_embedding.weight";
    let vocab_size = dim(shapes, token, 0, 2)?;
    let hidden_size = dim(shapes, token, 1, 2)?;
    let max_position_embeddings = dim(shapes, "embeddings.position_embedding.weight", 0, 2)?;
    let num_hidden_layers = count_from(shapes, 0, |i| {
        format!("encoder.layers.{i}.self_attn.q_proj.weight")
    });
    if num_hidden_layers == 0 {
        return Err("it has no encoder.layers".into());
    }
    let intermediate_size = dim(shapes, "encoder.layers.0.mlp.fc1.weight", 0, 2)?;
    Ok(ClipLayout {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        max_position_embeddings,
    })
}

/// The fields of `text_encoder/config.json` the tensors decide.
pub fn clip_config_fields(layout: &ClipLayout) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("vocab_size".into(), json!(layout.vocab_size));
    fields.insert("hidden_size".into(), json!(layout.hidden_size));
    fields.insert("intermediate_size".into(), json!(layout.intermediate_size));
    fields.insert("num_hidden_layers".into(), json!(layout.num_hidden_layers));
    fields.insert(
        "max_position_embeddings".into(),
        json!(layout.max_position_embeddings),
    );
    fields
}

/// The EMA name of a UNet weight (`model_ema.` + `diffusion_model.` + its name, dots removed),
/// as LDM's `LitEma` stores it.
pub fn ema_name(unet_name: &str) -> String {
    format!("{EMA_PREFIX}diffusion_model{}", unet_name.replace('.', ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1_like() -> UNetLayout {
        UNetLayout {
            in_channels: 8,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            down_attention: vec![true, true, true, false],
            up_attention: vec![false, true, true, true],
            transformer_depth: vec![1, 1, 1, 1],
            cross_attention_dim: 768,
            use_linear_projection: false,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            time_embedding_dim: 1280,
        }
    }

    /// Each (diffusers, LDM) pair is renamed by `table` one into the other, both ways.
    fn assert_renames_both_ways(table: &[Rename], pairs: &[(&str, &str)]) {
        for &(diffusers, ldm) in pairs {
            assert_eq!(
                to_ldm(table, diffusers).map(|x| x.0).as_deref(),
                Some(ldm),
                "{diffusers}"
            );
            assert_eq!(
                to_diffusers(table, ldm).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
    }

    /// Pairs from diffusers' conversion of SD 1.5 (convert_ldm_unet_checkpoint).
    #[test]
    fn unet_names_follow_diffusers_conversion() {
        let table = unet_table(&sd1_like());
        let pairs = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.attentions.1.proj_in.weight",
                "input_blocks.2.1.proj_in.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.bias",
                "input_blocks.11.0.emb_layers.1.bias",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "mid_block.resnets.1.conv2.weight",
                "middle_block.2.out_layers.3.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv1.weight",
                "output_blocks.2.0.in_layers.2.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.attentions.2.norm.weight",
                "output_blocks.5.1.norm.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.3.resnets.2.conv_shortcut.weight",
                "output_blocks.11.0.skip_connection.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        assert_renames_both_ways(&table, &pairs);
        assert_eq!(
            to_diffusers(&table, "input_blocks.12.0.in_layers.0.weight"),
            None
        );
    }

    #[test]
    fn vae_names_follow_diffusers_conversion() {
        let layout = VaeLayout {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_attention: true,
        };
        let table = vae_table(&layout);
        let pairs = [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.resnets.1.norm2.bias",
                "encoder.down.0.block.1.norm2.bias",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.weight",
                "encoder.down.2.downsample.conv.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.bias",
                "decoder.mid.attn_1.norm.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
                "decoder.up.1.upsample.conv.bias",
            ),
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        assert_renames_both_ways(&table, &pairs);
    }

    #[test]
    fn ema_names_drop_the_dots() {
        assert_eq!(
            ema_name("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
            "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight"
        );
    }
}
