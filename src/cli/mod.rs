//! Command-line subcommands, thin over the library: raw flags are parsed by clap, validated into
//! the library's settings structs, and errors are printed as one line with a non-zero exit code.

mod bench;
mod edit;
mod edit_folder;
mod launch;
mod load;
mod progress;
mod ranges;
mod sigint;
mod train;
mod window;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Edit photos from written instructions with InstructPix2Pix diffusion models.
///
/// Without a subcommand, opens the editor window (with IMAGE when given).
#[derive(Debug, Parser)]
#[command(
    name = "instruct-pix2pix",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    pub window: window::WindowArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Edit an image, or every image of a folder, following a written instruction.
    Edit(Box<edit::EditArgs>),
    /// Time edits on a model: seconds per step and per edit, peak memory (one JSON line).
    Bench(bench::BenchArgs),
    /// Fine-tune a model on a folder of examples, as diffusers' train_instruct_pix2pix.py.
    Train(Box<train::TrainArgs>),
}

/// Exit code for a run that failed on its input or the model (clap uses 2 for bad flags).
const EXIT_FAILURE: u8 = 1;

/// Parses the process arguments and runs the chosen subcommand.
pub fn main() -> ExitCode {
    #[cfg(windows)]
    attach_to_parent_console();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    if let Err(message) = crate::model::nn::kernels_from_env()
        .and_then(|_| ip2p_kernels::isa_cap_from_env())
        .and_then(|_| crate::model::nn::winograd_from_env())
    {
        eprintln!("error: {message}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let result = match cli.command {
        Some(Command::Edit(args)) => edit::run(*args),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Train(args)) => train::run(*args),
        None => window::run(cli.window),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The Windows release build has no console of its own (`windows_subsystem = "windows"` in
/// main.rs); started from a terminal, its output and errors go to that terminal. Started from
/// Explorer there is no parent console and this does nothing.
#[cfg(windows)]
fn attach_to_parent_console() {
    #[link(name = "kernel32")]
    unsafe extern "system" {
        fn AttachConsole(process_id: u32) -> i32;
    }
    const ATTACH_PARENT_PROCESS: u32 = u32::MAX;
    // SAFETY: a plain Win32 call with a constant argument; failure (no parent console, or one
    // already attached) leaves the process as it was.
    unsafe {
        AttachConsole(ATTACH_PARENT_PROCESS);
    }
}

/// Help and version go to stdout as usual; a bad flag or value is reported on one line.
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let rendered = error.render().to_string();
    // The first line, plus the indented lines clap lists under it (the missing arguments).
    let mut lines = rendered.lines();
    let mut first = lines
        .next()
        .unwrap_or("error: invalid arguments")
        .to_string();
    for detail in lines.take_while(|l| l.starts_with("  ")) {
        first.push(' ');
        first.push_str(detail.trim());
    }
    eprintln!("{first} (see --help)");
    ExitCode::from(2)
}

/// The error and its causes on one line, without repeating a cause its parent already quoted.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        // Only a cause's first line: candle appends a backtrace when RUST_BACKTRACE is set.
        let text = cause
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
