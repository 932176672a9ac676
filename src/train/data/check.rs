//! Checking a dataset before training: every example visited, bad ones listed by name with the
//! reason, either from the image headers alone or by decoding every image.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor};
use std::path::Path;

use super::formats::read_prompt;
use super::parquet::{GroupKey, GroupRows, RawRow};
use super::{Dataset, FileRef, PromptRef, Record};
use crate::pipeline::image::{
    ImageError, MAX_IMAGE_PIXELS, decode_image, is_supported_format, load_image,
};

/// How thoroughly [`Dataset::check`] looks at the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLevel {
    /// Files exist and their headers name a supported format and a usable size (fast; a file
    /// damaged after its header is found only when it is decoded).
    Headers,
    /// Decode every image, as training will.
    Decode,
}

/// A bad example found by [`Dataset::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Its index in the dataset.
    pub index: usize,
    /// Its name (file or row).
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

/// The result of [`Dataset::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// How many examples the dataset lists.
    pub total: usize,
    /// The indices of the good examples, ascending.
    pub good: Vec<usize>,
    /// Every bad example, in index order.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when every example is good.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// One line: "12 examples: 10 good, 2 bad".
    pub fn summary(&self) -> String {
        format!(
            "{} examples: {} good, {} bad",
            self.total,
            self.good.len(),
            self.problems.len()
        )
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary())?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.name, p.reason)?;
        }
        Ok(())
    }
}

impl Dataset {
    /// Visits every example and reports which are bad and why (see [`CheckLevel`]).
    pub fn check(&self, level: CheckLevel) -> CheckReport {
        self.check_with_progress(level, |_, _| {})
    }

    /// [`Self::check`], calling `progress(done, total)` after each example.
    pub fn check_with_progress(
        &self,
        level: CheckLevel,
        mut progress: impl FnMut(usize, usize),
    ) -> CheckReport {
        let total = self.len();
        let mut good = Vec::new();
        let mut problems = Vec::new();
        // The row group read last, so a group is read once even with no cache budget.
        let mut last_group: Option<(GroupKey, GroupRows)> = None;
        for (index, record) in self.records.iter().enumerate() {
            let outcome = match record {
                Record::Row {
                    file, group, row, ..
                } => {
                    let key = (*file, *group);
                    if last_group.as_ref().map(|(k, _)| *k) != Some(key) {
                        last_group = Some((key, self.group_rows(*file, *group)));
                    }
                    let name = self.record_name(record);
                    match last_group.as_ref().map(|(_, rows)| rows) {
                        Some(Ok(rows)) => match rows.get(*row) {
                            Some(raw) => check_raw_row(raw, &name, level),
                            None => Err("the row is missing from its row group".to_string()),
                        },
                        Some(Err(reason)) => Err(reason.clone()),
                        None => Err("cannot read this row".to_string()),
                    }
                }
                Record::Invalid { reason, .. } => Err(reason.clone()),
                Record::Files {
                    original,
                    edited,
                    prompt,
                    ..
                } => check_files(original, edited, prompt, level),
            };
            match outcome {
                Ok(()) => good.push(index),
                Err(reason) => problems.push(Problem {
                    index,
                    name: self.record_name(record),
                    reason,
                }),
            }
            progress(index + 1, total);
        }
        CheckReport {
            total,
            good,
            problems,
        }
    }
}

fn check_files(
    original: &FileRef,
    edited: &FileRef,
    prompt: &Result<PromptRef, String>,
    level: CheckLevel,
) -> Result<(), String> {
    let original = original.as_ref().map_err(Clone::clone)?;
    let edited = edited.as_ref().map_err(Clone::clone)?;
    read_prompt(prompt)?;
    for path in [original, edited] {
        match level {
            CheckLevel::Decode => load_image(path).map(drop).map_err(|e| e.to_string())?,
            CheckLevel::Headers => {
                let file = open_image_file(path)?;
                probe_image(BufReader::new(file), &path.display().to_string())?
            }
        }
    }
    Ok(())
}

/// Opens an image file (a regular file only: a FIFO would block); a missing one says "not
/// found" as the edit path does.
fn open_image_file(path: &Path) -> Result<File, String> {
    let opened = crate::model::files::open_regular(path).map(|(file, _)| file);
    opened.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound {
            path: path.to_path_buf(),
        }
        .to_string(),
        _ => format!("cannot read image {}: {e}", path.display()),
    })
}

/// A supported format with a non-empty size within [`MAX_IMAGE_PIXELS`], reading only as far as
/// the headers.
fn probe_image<R: BufRead + std::io::Seek>(input: R, name: &str) -> Result<(), String> {
    let reader = image::ImageReader::new(input)
        .with_guessed_format()
        .map_err(|e| format!("cannot read image {name}: {e}"))?;
    if !is_supported_format(reader.format()) {
        return Err(format!(
            "{name} is not a supported image (PNG, JPEG, WebP, BMP or TIFF expected)"
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("cannot read image {name}: {e}"))?;
    if w == 0 || h == 0 {
        return Err(format!("image {name} is empty ({w}x{h} pixels)"));
    }
    if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(format!(
            "image {name} is too large: {w}x{h} pixels, more than {MAX_IMAGE_PIXELS}"
        ));
    }
    Ok(())
}

fn check_raw_row(raw: &RawRow, name: &str, level: CheckLevel) -> Result<(), String> {
    let original = raw.original.as_ref().map_err(Clone::clone)?;
    let edited = raw.edited.as_ref().map_err(Clone::clone)?;
    raw.prompt.as_ref().map_err(Clone::clone)?;
    for (bytes, column) in [
        (original, &raw.original_column),
        (edited, &raw.edited_column),
    ] {
        let shown = format!("{name} {column}");
        match level {
            CheckLevel::Decode => decode_image(bytes, &shown)
                .map(drop)
                .map_err(|e| e.to_string())?,
            CheckLevel::Headers => probe_image(Cursor::new(bytes), &shown)?,
        }
    }
    Ok(())
}
