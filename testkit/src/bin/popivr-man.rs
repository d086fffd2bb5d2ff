//! `popivr-man [DIR]`: popivr's man pages, rendered from the command line
//! the binary parses (`popivr::cli`): popivr.1 and one page per subcommand
//! into DIR, or popivr(1) on stdout. Run at packaging time
//! (`packaging/build-deb.sh`), so the binary Asterisk starts carries no
//! man page generator.
//!
//! The text after the options (EXAMPLES, LOGS, FILES) is laid out by hand
//! in columns, so each of its headings becomes a section of its own whose
//! lines are kept as written (`.nf`), not refilled into a paragraph.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use popivr::cli::Cli;

fn main() -> ExitCode {
    let dir = std::env::args_os().nth(1).map(PathBuf::from);
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let result = match &dir {
        Some(dir) => write_pages(&cmd, dir),
        None => std::io::stdout()
            .write_all(&page(&cmd))
            .map_err(|e| format!("cannot write the man page: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popivr-man: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The page of `cmd` and those of its visible subcommands, into `dir`.
fn write_pages(cmd: &clap::Command, dir: &Path) -> Result<(), String> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir)?;
    }
    let name = clap_mangen::Man::new(cmd.clone()).get_filename();
    let path = dir.join(name);
    std::fs::write(&path, page(cmd)).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// One page: clap_mangen's sections, with the text after the options as
/// sections of preformatted lines in their place.
fn page(cmd: &clap::Command) -> Vec<u8> {
    let after = cmd
        .get_after_long_help()
        .or_else(|| cmd.get_after_help())
        .map(|t| t.to_string());
    let plain = cmd
        .clone()
        .after_long_help(None::<&str>)
        .after_help(None::<&str>);
    let man = clap_mangen::Man::new(plain);
    let mut out = Vec::new();
    man.render_title(&mut out).expect("writing to memory");
    man.render_name_section(&mut out)
        .expect("writing to memory");
    man.render_synopsis_section(&mut out)
        .expect("writing to memory");
    man.render_description_section(&mut out)
        .expect("writing to memory");
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)
            .expect("writing to memory");
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut out)
            .expect("writing to memory");
    }
    if let Some(text) = after {
        out.extend_from_slice(preformatted_sections(&text).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)
            .expect("writing to memory");
    }
    out
}

/// `HEADING:` lines start sections; the lines under each are kept as they
/// are (leading spaces dropped by four, roff's own characters escaped).
fn preformatted_sections(text: &str) -> String {
    let mut roff = String::new();
    let mut open = false;
    for line in text.lines() {
        let heading = line
            .strip_suffix(':')
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_uppercase() || c == ' '));
        if let Some(heading) = heading {
            if open {
                roff.push_str(".fi\n");
            }
            roff.push_str(&format!(".SH {heading}\n.nf\n"));
            open = true;
            continue;
        }
        if !open {
            roff.push_str(".SH NOTES\n.nf\n");
            open = true;
        }
        let line = line.strip_prefix("    ").unwrap_or(line);
        roff.push_str(&escape(line));
        roff.push('\n');
    }
    if open {
        roff.push_str(".fi\n");
    }
    roff
}

/// A line as roff text: backslashes escaped, and a leading `.` or `'`
/// (a request) protected.
fn escape(line: &str) -> String {
    let line = line.replace('\\', "\\e");
    match line.starts_with(['.', '\'']) {
        true => format!("\\&{line}"),
        false => line,
    }
}
