//! Writes the man pages (section 1) of the command line, generated from its clap definition
//! (`instruct_pix2pix::cli::Cli`): `instruct-pix2pix.1` and one page per subcommand
//! (`instruct-pix2pix-edit.1`, `instruct-pix2pix-bench.1`).
//!
//! ```text
//! cargo run --locked --example gen_man -- OUT_DIR
//! ```
//!
//! `.ci/package.sh` and the release workflow run it and ship the pages, gzipped, in the Linux
//! packages (`/usr/share/man/man1`). It is an example rather than a hidden subcommand so that
//! clap_mangen stays a dev-dependency: the installed program does not carry it, and `cargo test`
//! already builds it, so in CI it costs one link.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use instruct_pix2pix::cli::Cli;

/// Sections the CLI definition does not hold, appended to the main page (roff).
const MAIN_PAGE_EXTRA: &str = r#".SH ENVIRONMENT
.TP
\fBHF_HOME\fR, \fBHF_HUB_CACHE\fR
Where models downloaded from the Hugging Face Hub are stored (default
\fI~/.cache/huggingface/hub\fR), shared with Python's diffusers.
.TP
\fBHF_HUB_OFFLINE\fR=1
Use only models already in the cache.
.TP
\fBHF_ENDPOINT\fR, \fBHF_TOKEN\fR
Another Hub server; an access token for private or gated models.
.TP
\fBINSTRUCT_PIX2PIX_CONFIG_DIR\fR
Where the window keeps its settings, instead of the user's configuration folder.
.SH FILES
.TP
\fI~/.config/instruct\-pix2pix/settings.json\fR
The window's settings (model, sliders, window size, recent files).
.TP
\fI/usr/share/doc/instruct\-pix2pix/THIRD\-PARTY\-LICENSES.html\fR
The licenses of the libraries compiled into the program (Linux packages).
.SH SEE ALSO
\fBinstruct\-pix2pix\-edit\fR(1), \fBinstruct\-pix2pix\-bench\fR(1)
"#;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out_dir), None) = (args.next(), args.next()) else {
        bail!("usage: cargo run --example gen_man -- OUT_DIR");
    };
    let out_dir = PathBuf::from(out_dir);
    fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create the folder {}", out_dir.display()))?;

    // Built once so that subcommands get their full names ("instruct-pix2pix-edit").
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    write_page(command.clone(), Some(MAIN_PAGE_EXTRA), &out_dir)?;
    for subcommand in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_page(subcommand.clone(), None, &out_dir)?;
    }
    Ok(())
}

/// Renders one command's page into `out_dir`, with `extra` roff appended, and prints its path.
fn write_page(command: clap::Command, extra: Option<&str>, out_dir: &Path) -> Result<()> {
    let man = clap_mangen::Man::new(command).manual("instruct-pix2pix manual");
    let path = out_dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("cannot render {}", path.display()))?;
    if let Some(extra) = extra {
        page.write_all(extra.as_bytes())?;
    }
    fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
