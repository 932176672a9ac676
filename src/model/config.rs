//! Reading the JSON files of a diffusers pipeline folder: a generic [`read_json`] whose errors
//! name the file (and the line/column of a syntax error), and the pipeline's `model_index.json`
//! ([`ModelIndex`]). Component configs (UNet, VAE, CLIP, scheduler) are typed by their own modules
//! and read through [`read_json`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The name of the file that marks a folder as a diffusers pipeline.
pub const MODEL_INDEX_FILE: &str = "model_index.json";

/// Why a JSON config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file {path} does not exist")]
    Missing {
        /// The file looked for.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file was read but its content is not what was expected.
    #[error("config file {path} is malformed: {reason}")]
    Malformed {
        /// The file being parsed.
        path: PathBuf,
        /// What is wrong, with the line and column for JSON syntax errors.
        reason: String,
    },
}

/// Reads and parses a JSON config file with errors naming the file (and line/column for bad JSON).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = match super::files::read_to_string_limited(path, super::files::MAX_CONFIG_BYTES) {
        Ok(text) => text,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse_json(&text, path)
}

/// Parses JSON text that came from `path` (used only to name it in errors).
pub fn parse_json<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|err| ConfigError::Malformed {
        path: path.to_path_buf(),
        reason: describe_json_error(&err),
    })
}

/// serde_json's own message already ends in "at line L column C" for syntax and data errors;
/// say which kind it is so "expected `,`" and "missing field" read differently.
fn describe_json_error(err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let kind = match err.classify() {
        Category::Syntax => "invalid JSON",
        Category::Eof => "unexpected end of file",
        Category::Data => "unexpected content",
        Category::Io => "read error",
    };
    format!("{kind}: {err}")
}

/// One pipeline component as listed in `model_index.json`: `"unet": ["diffusers",
/// "UNet2DConditionModel"]`. Both are `None` for a component saved as `[null, null]` (for
/// example a pipeline saved without its safety checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentEntry {
    /// The Python library that defines the class (`"diffusers"`, `"transformers"`).
    pub library: Option<String>,
    /// The class name (`"UNet2DConditionModel"`, `"CLIPTextModel"`, ...).
    pub class: Option<String>,
}

/// The content of a pipeline's `model_index.json`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(try_from = "serde_json::Map<String, Value>")]
pub struct ModelIndex {
    /// The pipeline class, from `_class_name` (`"StableDiffusionInstructPix2PixPipeline"`).
    pub class_name: String,
    /// The diffusers version that saved the pipeline, from `_diffusers_version`.
    pub diffusers_version: Option<String>,
    /// Every `name: [library, class]` entry: the pipeline's components.
    pub components: BTreeMap<String, ComponentEntry>,
    /// Every other key (`requires_safety_checker`, `_name_or_path`, ...), as written.
    pub other: BTreeMap<String, Value>,
}

impl ModelIndex {
    /// Reads `model_index.json` from a pipeline folder.
    pub fn read(pipeline_dir: &Path) -> Result<Self, ConfigError> {
        read_json(&pipeline_dir.join(MODEL_INDEX_FILE))
    }

    /// The entry of component `name`, if the index lists it with a class (not `[null, null]`).
    pub fn component(&self, name: &str) -> Option<&ComponentEntry> {
        self.components.get(name).filter(|c| c.class.is_some())
    }
}

impl TryFrom<serde_json::Map<String, Value>> for ModelIndex {
    type Error = String;

    fn try_from(map: serde_json::Map<String, Value>) -> Result<Self, Self::Error> {
        let class_name = match map.get("_class_name") {
            Some(Value::String(name)) => name.clone(),
            Some(other) => return Err(format!("`_class_name` must be a string, found {other}")),
            None => return Err("missing `_class_name`".to_string()),
        };
        let diffusers_version = match map.get("_diffusers_version") {
            Some(Value::String(version)) => Some(version.clone()),
            _ => None,
        };
        let mut components = BTreeMap::new();
        let mut other = BTreeMap::new();
        for (key, value) in map {
            if key == "_class_name" || key == "_diffusers_version" {
                continue;
            }
            match component_entry(&value) {
                Some(entry) if !key.starts_with('_') => {
                    components.insert(key, entry);
                }
                _ => {
                    other.insert(key, value);
                }
            }
        }
        Ok(ModelIndex {
            class_name,
            diffusers_version,
            components,
            other,
        })
    }
}

/// A component entry is a two-element array of strings or nulls.
fn component_entry(value: &Value) -> Option<ComponentEntry> {
    let Value::Array(items) = value else {
        return None;
    };
    let [library, class] = items.as_slice() else {
        return None;
    };
    let as_name = |v: &Value| -> Option<Option<String>> {
        match v {
            Value::String(s) => Some(Some(s.clone())),
            Value::Null => Some(None),
            _ => None,
        }
    };
    Some(ComponentEntry {
        library: as_name(library)?,
        class: as_name(class)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMBROOKS_INDEX: &str = r#"{
  "_class_name": "StableDiffusionInstructPix2PixPipeline",
  "_diffusers_version": "0.15.0.dev0",
  "feature_extractor": ["transformers", "CLIPImageProcessor"],
  "requires_safety_checker": true,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

    #[test]
    fn model_index_splits_components_from_settings() {
        let index: ModelIndex = parse_json(TIMBROOKS_INDEX, Path::new("model_index.json"))
            .expect("the sample index parses");
        assert_eq!(index.class_name, "StableDiffusionInstructPix2PixPipeline");
        assert_eq!(index.diffusers_version.as_deref(), Some("0.15.0.dev0"));
        let unet = index.component("unet").expect("unet listed");
        assert_eq!(unet.library.as_deref(), Some("diffusers"));
        assert_eq!(unet.class.as_deref(), Some("UNet2DConditionModel"));
        assert_eq!(
            index.components.keys().collect::<Vec<_>>(),
            [
                "feature_extractor",
                "safety_checker",
                "scheduler",
                "text_encoder",
                "tokenizer",
                "unet",
                "vae"
            ]
        );
        // Listed but saved without weights.
        assert!(index.component("safety_checker").is_none());
        assert_eq!(
            index.other.get("requires_safety_checker"),
            Some(&Value::Bool(true))
        );
    }

    #[test]
    fn malformed_json_names_file_line_and_column() {
        let err = parse_json::<ModelIndex>("{\n  \"_class_name\": \"X\",\n  oops\n}", {
            Path::new("/models/p/model_index.json")
        })
        .expect_err("bad JSON must fail");
        let message = err.to_string();
        assert!(message.contains("/models/p/model_index.json"), "{message}");
        assert!(message.contains("line 3 column 3"), "{message}");
    }

    #[test]
    fn missing_class_name_is_reported() {
        let err = parse_json::<ModelIndex>(r#"{"unet": ["diffusers", "U"]}"#, Path::new("m.json"))
            .expect_err("no _class_name");
        assert!(err.to_string().contains("missing `_class_name`"), "{err}");
    }

    #[test]
    fn missing_file_is_its_own_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = ModelIndex::read(dir.path()).expect_err("no file");
        assert!(matches!(err, ConfigError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("model_index.json"), "{err}");
    }
}
