//! Training metrics: `metrics.jsonl` (one JSON object per logged step, appended and flushed at
//! once, so a killed run keeps everything logged before the kill) and, for
//! `--report_to tensorboard`, TensorBoard event files written natively.
//!
//! An event file (`events.out.tfevents.<unix time>.<host>`) is a TFRecord stream: each record is
//! its length (u64, little endian), the masked CRC-32C of those 8 bytes, the payload, and the
//! masked CRC-32C of the payload. Each payload is a serialized `tensorflow.Event` protobuf: the
//! first carries `file_version: "brain.Event:2"`, the others a `Summary` of scalar values
//! (`Summary.Value { tag, simple_value }`). The few protobuf fields needed are encoded by hand:
//!
//! | message         | field          | number | wire type           |
//! |-----------------|----------------|--------|---------------------|
//! | `Event`         | `wall_time`    | 1      | 64-bit (double)     |
//! | `Event`         | `step`         | 2      | varint (int64)      |
//! | `Event`         | `file_version` | 3      | length-delimited    |
//! | `Event`         | `summary`      | 5      | length-delimited    |
//! | `Summary`       | `value`        | 1      | length-delimited    |
//! | `Summary.Value` | `tag`          | 1      | length-delimited    |
//! | `Summary.Value` | `simple_value` | 2      | 32-bit (float)      |

use crate::model::files::{FileError, io_err};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

/// The metrics file's name in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The `file_version` of the first event, as TensorFlow writes it.
pub const EVENT_FILE_VERSION: &str = "brain.Event:2";

/// What went wrong writing metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A file-system operation failed on a path.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A record could not be serialized (a non-finite number where JSON has none is written as
    /// `null`, so this is only a record that is not a JSON object).
    #[error("metrics record for {path}: {reason}")]
    BadRecord { path: PathBuf, reason: String },
}

/// Seconds since the Unix epoch, as TensorBoard's `wall_time`.
pub fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// metrics.jsonl
// ---------------------------------------------------------------------------------------------

/// One logged training step. Non-finite numbers are written as `null`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    /// The optimizer step (1 after the first update).
    pub step: u64,
    /// The epoch the step belongs to (0-based, as the reference script counts).
    pub epoch: u64,
    /// The loss, averaged over the accumulated micro-batches as the script logs `train_loss`.
    pub loss: f64,
    /// The learning rate used for this step.
    pub lr: f64,
    /// The gradient norm before clipping, when computed.
    pub grad_norm: Option<f64>,
    /// Seconds since training started.
    pub seconds: f64,
}

/// The append-only `metrics.jsonl` of a training run.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens (creating) `output_dir/metrics.jsonl` for appending.
    pub fn open(output_dir: &Path) -> Result<Self, MetricsError> {
        fs::create_dir_all(output_dir).map_err(io_err("creating", output_dir))?;
        let path = output_dir.join(METRICS_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        Ok(Self { path, file })
    }

    /// Opens the log of a run resumed at `step`: lines of later steps (logged after the
    /// checkpoint by the run that was interrupted) are dropped first, so the file reads as one
    /// run; a last line cut short by the interruption is dropped too. The file is rewritten
    /// atomically (temporary file and rename).
    pub fn resume(output_dir: &Path, step: u64) -> Result<Self, MetricsError> {
        let path = output_dir.join(METRICS_FILE);
        if path.exists() {
            let file = File::open(&path).map_err(io_err("opening", &path))?;
            let mut kept = String::new();
            for line in BufReader::new(file).lines() {
                let line = line.map_err(io_err("reading", &path))?;
                let Ok(record) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let record_step = record.get("step").and_then(Value::as_u64);
                if record_step.is_none_or(|s| s <= step) {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            let temp = output_dir.join(format!(".{METRICS_FILE}.tmp-{}", std::process::id()));
            fs::write(&temp, kept).map_err(io_err("writing", &temp))?;
            fs::rename(&temp, &path).map_err(io_err("renaming into place", &path))?;
        }
        Self::open(output_dir)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one step's metrics and flushes.
    pub fn log_step(&mut self, metrics: &StepMetrics) -> Result<(), MetricsError> {
        let value = serde_json::to_value(metrics).map_err(|e| MetricsError::BadRecord {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.log(&value)
    }

    /// Appends any JSON object (a validation entry, say
    /// `{"step": 500, "validation": [{"prompt": ..., "image": ...}]}`) and flushes.
    pub fn log(&mut self, record: &Value) -> Result<(), MetricsError> {
        if !record.is_object() {
            return Err(MetricsError::BadRecord {
                path: self.path.clone(),
                reason: format!("{record} is not a JSON object"),
            });
        }
        // One write per line: a kill leaves at most the last line incomplete.
        let mut line = serde_json::to_string(record).map_err(|e| MetricsError::BadRecord {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(io_err("writing", &self.path))?;
        Ok(())
    }
}

/// Reads every complete JSON line of a `metrics.jsonl` (for the window and tests).
pub fn read_metrics(path: &Path) -> Result<Vec<Value>, MetricsError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_err("reading", path))?;
        if let Ok(value) = serde_json::from_str(&line) {
            out.push(value);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// TensorBoard
// ---------------------------------------------------------------------------------------------

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise-table implementation.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: `rotate_right(crc, 15) + 0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` protobuf with `wall_time`, `step` and either `file_version` or a scalar summary.
fn encode_event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut event = Vec::new();
    put_key(&mut event, 1, 1);
    event.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut event, 2, 0);
    // int64 varints carry negative numbers as their two's-complement u64.
    put_varint(&mut event, step as u64);
    match body {
        EventBody::FileVersion(version) => put_bytes(&mut event, 3, version.as_bytes()),
        EventBody::Scalars(scalars) => {
            let mut summary = Vec::new();
            for (tag, value) in scalars {
                let mut entry = Vec::new();
                put_bytes(&mut entry, 1, tag.as_bytes());
                put_key(&mut entry, 2, 5);
                entry.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &entry);
            }
            put_bytes(&mut event, 5, &summary);
        }
    }
    event
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f32)]),
}

/// The machine's name for event file names (`/proc/sys/kernel/hostname`, `$HOSTNAME`, or
/// `localhost`), with characters other than letters, digits, `-`, `_` and `.` replaced.
fn host_name() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "localhost".into());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A TensorBoard event file being written.
#[derive(Debug)]
pub struct TensorBoardWriter {
    path: PathBuf,
    file: File,
}

impl TensorBoardWriter {
    /// Creates `log_dir/events.out.tfevents.<unix time>.<host>` (a `.<pid>` suffix is added
    /// when that name is taken, say by a resumed run in the same second) and writes the
    /// `file_version` event.
    pub fn create(log_dir: &Path) -> Result<Self, MetricsError> {
        Self::create_at(log_dir, unix_time())
    }

    /// As [`TensorBoardWriter::create`], with the file's wall time given (reproducible files).
    pub fn create_at(log_dir: &Path, wall_time: f64) -> Result<Self, MetricsError> {
        fs::create_dir_all(log_dir).map_err(io_err("creating", log_dir))?;
        let base = format!("events.out.tfevents.{}.{}", wall_time as u64, host_name());
        let mut path = log_dir.join(&base);
        if path.exists() {
            path = log_dir.join(format!("{base}.{}", std::process::id()));
        }
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(io_err("creating", &path))?;
        let mut writer = Self { path, file };
        let event = encode_event(wall_time, 0, EventBody::FileVersion(EVENT_FILE_VERSION));
        writer.write_record(&event)?;
        Ok(writer)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes scalars (`tag`, value) for `step` at the current time, as one event, and flushes.
    pub fn add_scalars(&mut self, step: i64, scalars: &[(&str, f32)]) -> Result<(), MetricsError> {
        self.add_scalars_at(step, scalars, unix_time())
    }

    /// As [`TensorBoardWriter::add_scalars`] with the wall time given.
    pub fn add_scalars_at(
        &mut self,
        step: i64,
        scalars: &[(&str, f32)],
        wall_time: f64,
    ) -> Result<(), MetricsError> {
        let event = encode_event(wall_time, step, EventBody::Scalars(scalars));
        self.write_record(&event)
    }

    fn write_record(&mut self, payload: &[u8]) -> Result<(), MetricsError> {
        self.file
            .write_all(&tfrecord(payload))
            .and_then(|()| self.file.flush())
            .map_err(io_err("writing", &self.path))?;
        Ok(())
    }
}
