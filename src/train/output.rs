//! The final model of a full fine-tuning: a complete pipeline folder in diffusers' layout, what
//! the reference script's `pipeline.save_pretrained(output_dir)` leaves, loadable by
//! `StableDiffusionInstructPix2PixPipeline.from_pretrained` and by this crate.
//!
//! The trained UNet is written as `unet/diffusion_pytorch_model.safetensors` (diffusers' weight
//! names) beside the base model's `unet/config.json` with `in_channels` set from the trained
//! `conv_in` (8 after growing a plain Stable Diffusion model). The frozen components (`vae`,
//! `text_encoder`, `tokenizer`, `scheduler`, and `feature_extractor`, `safety_checker`,
//! `image_encoder` when the base has them) come from the base folder: weight files hard-linked
//! where the file system allows, everything else copied. `model_index.json` names `StableDiffusionInstructPix2PixPipeline`.
//!
//! Atomicity: everything is written into a hidden temporary folder first. When the target folder
//! does not exist yet, that folder is renamed to it in one step. When it exists (the training
//! output folder, which also holds checkpoints and logs), its `model_index.json` is removed
//! first, each component folder is swapped in by rename, and the new `model_index.json` is
//! renamed in last: at every moment the folder either has no `model_index.json` (nothing loads
//! it as a model) or is complete.

use crate::model::files::{FileError, io_err};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::Value;

use super::checkpoint::{self, CheckpointError};

/// The pipeline class written to `model_index.json`.
pub const PIPELINE_CLASS: &str = "StableDiffusionInstructPix2PixPipeline";
/// Components copied from the base model when its folder has them.
pub const COPIED_COMPONENTS: [&str; 7] = [
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "feature_extractor",
    "safety_checker",
    "image_encoder",
];
/// The UNet's weight file name.
pub const UNET_WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// What went wrong writing the final model folder.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A file-system operation failed on a path.
    #[error(transparent)]
    Io(#[from] FileError),
    /// The base model folder lacks something the output needs, or holds malformed JSON.
    #[error("base model {path}: {reason}")]
    BadBase { path: PathBuf, reason: String },
    /// The trained UNet tensors are not usable.
    #[error("trained UNet weights: {0}")]
    BadWeights(String),
    /// Writing the weights failed.
    #[error(transparent)]
    Weights(#[from] CheckpointError),
}

fn read_json(path: &Path) -> Result<Value, OutputError> {
    let text = fs::read_to_string(path).map_err(|e| OutputError::BadBase {
        path: path.to_path_buf(),
        reason: format!("cannot be read ({e})"),
    })?;
    serde_json::from_str(&text).map_err(|e| OutputError::BadBase {
        path: path.to_path_buf(),
        reason: format!("is not valid JSON ({e})"),
    })
}

fn write_json(path: &Path, value: &Value) -> Result<(), OutputError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    Ok(fs::write(path, text).map_err(io_err("writing", path))?)
}

/// Copies the tree `from` into `to`, following symbolic links (a Hugging Face cache snapshot is
/// made of links to blobs). Weight files are hard-linked where the file system allows (they are
/// large and never rewritten in place); small files (configs, tokenizer) are copied, so that
/// editing them in the output never changes the base model.
fn link_or_copy_tree(from: &Path, to: &Path) -> Result<(), OutputError> {
    fs::create_dir_all(to).map_err(io_err("creating", to))?;
    for entry in fs::read_dir(from).map_err(io_err("listing", from))? {
        let entry = entry.map_err(io_err("listing", from))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let real = fs::canonicalize(&source).map_err(io_err("resolving", &source))?;
        if real.is_dir() {
            link_or_copy_tree(&real, &target)?;
        } else {
            let is_weights = real
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "bin");
            if !(is_weights && fs::hard_link(&real, &target).is_ok()) {
                fs::copy(&real, &target).map_err(io_err("copying", &real))?;
            }
        }
    }
    Ok(())
}

fn remove_path(path: &Path) -> Result<(), OutputError> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e).into()),
    }
}

/// The hidden folder a final model is written into before it is moved into place:
/// `.tmp-model-LEAF-PID` beside `model_dir`.
pub const TEMP_MODEL_PREFIX: &str = ".tmp-model-";

/// Removes `prefix`PID folders in `parent` left by processes that no longer run (a run killed
/// while writing its model; another live run's folder is left alone).
fn remove_stale_temporaries(parent: &Path, prefix: &str) -> Result<(), OutputError> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_is_running(pid) {
            remove_path(&entry.path())?;
        }
    }
    Ok(())
}

/// Whether a process with this id exists (on Linux, `kill(pid, 0)`; elsewhere assumed to run,
/// so nothing of another process is removed).
fn process_is_running(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let result = unsafe { libc::kill(pid, 0) };
        result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}

/// Writes the complete pipeline folder `model_dir` from the base model folder `base_model` and
/// the trained UNet weights `unet_tensors` (diffusers' names, such as `conv_in.weight`), see the
/// module doc. Returns `model_dir`.
pub fn write_final_model(
    base_model: &Path,
    model_dir: &Path,
    unet_tensors: &[(String, Tensor)],
) -> Result<PathBuf, OutputError> {
    let base_index_path = base_model.join("model_index.json");
    let mut index = read_json(&base_index_path)?;
    let Some(index_map) = index.as_object_mut() else {
        return Err(OutputError::BadBase {
            path: base_index_path,
            reason: "is not a JSON object".into(),
        });
    };
    let unet_config_path = base_model.join("unet").join("config.json");
    let mut unet_config = read_json(&unet_config_path)?;
    let conv_in = unet_tensors
        .iter()
        .find(|(name, _)| name == "conv_in.weight")
        .ok_or_else(|| OutputError::BadWeights("no conv_in.weight".into()))?;
    let in_channels = conv_in
        .1
        .dims4()
        .map_err(|e| OutputError::BadWeights(format!("conv_in.weight: {e}")))?
        .1;
    match unet_config.as_object_mut() {
        Some(config) => {
            config.insert("in_channels".into(), in_channels.into());
        }
        None => {
            return Err(OutputError::BadBase {
                path: unet_config_path,
                reason: "is not a JSON object".into(),
            });
        }
    }
    index_map.insert("_class_name".into(), PIPELINE_CLASS.into());
    index_map.insert(
        "unet".into(),
        serde_json::json!(["diffusers", "UNet2DConditionModel"]),
    );

    let parent = match model_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
    let leaf = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let temp_prefix = format!("{TEMP_MODEL_PREFIX}{leaf}-");
    remove_stale_temporaries(&parent, &temp_prefix)?;
    let temp = parent.join(format!("{temp_prefix}{}", std::process::id()));
    remove_path(&temp)?;
    fs::create_dir(&temp).map_err(io_err("creating", &temp))?;
    let result = fill_model_folder(
        base_model,
        &temp,
        &index,
        &unet_config,
        unet_tensors,
        index_map_components(&index),
    )
    .and_then(|components| move_into_place(&temp, model_dir, &components));
    if result.is_err() {
        let _ = remove_path(&temp);
    }
    result.map(|()| model_dir.to_path_buf())
}

/// The files of a trained model, as `(path in the model, file)`, sorted by path: what
/// `train --push_to_hub` uploads. `model` is what the run wrote ([`crate::train::run::TrainOutcome::model`]):
/// for a full fine-tuning the output folder, of which only the pipeline goes (`model_index.json`
/// and every component folder it lists, hidden temporaries left out); checkpoints, logs,
/// `metrics.jsonl` and validation images stay local, as the reference script's
/// `ignore_patterns` mean them to. For LoRA it is the one weights file.
pub fn model_files(model: &Path) -> Result<Vec<(String, PathBuf)>, OutputError> {
    if model.is_file() {
        let name = model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| OutputError::BadBase {
                path: model.to_path_buf(),
                reason: "has no file name".into(),
            })?;
        return Ok(vec![(name, model.to_path_buf())]);
    }
    let index_path = model.join("model_index.json");
    let index = read_json(&index_path)?;
    let mut files = vec![("model_index.json".to_string(), index_path)];
    for component in index_map_components(&index) {
        let folder = model.join(&component);
        if folder.is_dir() {
            collect_files(&folder, &component, &mut files)?;
        }
    }
    files.sort();
    Ok(files)
}

/// Every regular file under `dir` (links followed), named `prefix/...`; hidden entries (a
/// temporary being written) are left out.
fn collect_files(
    dir: &Path,
    prefix: &str,
    files: &mut Vec<(String, PathBuf)>,
) -> Result<(), OutputError> {
    for entry in fs::read_dir(dir).map_err(io_err("reading", dir))? {
        let entry = entry.map_err(io_err("reading", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(io_err("reading", &path))?;
        let in_model = format!("{prefix}/{name}");
        if meta.is_dir() {
            collect_files(&path, &in_model, files)?;
        } else if meta.is_file() {
            files.push((in_model, path));
        }
    }
    Ok(())
}

/// The component names `model_index.json` lists with a real class (not `[null, null]`).
fn index_map_components(index: &Value) -> Vec<String> {
    index
        .as_object()
        .map(|map| {
            map.iter()
                .filter(|(key, value)| {
                    !key.starts_with('_')
                        && value
                            .as_array()
                            .is_some_and(|pair| pair.iter().all(|v| !v.is_null()))
                })
                .map(|(key, _)| key.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes every component into `temp` and returns the component folders written.
fn fill_model_folder(
    base_model: &Path,
    temp: &Path,
    index: &Value,
    unet_config: &Value,
    unet_tensors: &[(String, Tensor)],
    listed: Vec<String>,
) -> Result<Vec<String>, OutputError> {
    let mut components = Vec::new();
    for component in COPIED_COMPONENTS {
        let from = base_model.join(component);
        if from.is_dir() {
            link_or_copy_tree(&from, &temp.join(component))?;
            components.push(component.to_string());
        } else if listed.iter().any(|c| c == component) {
            return Err(OutputError::BadBase {
                path: base_model.to_path_buf(),
                reason: format!("model_index.json lists {component} but the folder has none"),
            });
        }
    }
    let unet_dir = temp.join("unet");
    fs::create_dir(&unet_dir).map_err(io_err("creating", &unet_dir))?;
    write_json(&unet_dir.join("config.json"), unet_config)?;
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    checkpoint::write_safetensors(
        &unet_dir.join(UNET_WEIGHTS_FILE),
        unet_tensors,
        Some(&metadata),
    )?;
    components.push("unet".into());
    write_json(&temp.join("model_index.json"), index)?;
    Ok(components)
}

/// Moves the finished `temp` folder to `model_dir` (see the module doc for the order).
fn move_into_place(
    temp: &Path,
    model_dir: &Path,
    components: &[String],
) -> Result<(), OutputError> {
    if !model_dir.exists() {
        return Ok(fs::rename(temp, model_dir).map_err(io_err("renaming into place", model_dir))?);
    }
    let index = model_dir.join("model_index.json");
    remove_path(&index)?;
    for component in components {
        let target = model_dir.join(component);
        remove_path(&target)?;
        fs::rename(temp.join(component), &target)
            .map_err(io_err("renaming into place", &target))?;
    }
    fs::rename(temp.join("model_index.json"), &index)
        .map_err(io_err("renaming into place", &index))?;
    remove_path(temp)
}
