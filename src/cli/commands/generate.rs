//! `generate-assets`: the man pages and shell completions, from the clap
//! definitions (and docs/PROTOCOL.md) so they cannot drift (used to build
//! the package); `completions`: one shell's script on stdout.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, sections};

/// `completions SHELL`: the completion script on stdout.
pub fn completions(shell: Shell) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ai-cmd-executor", &mut out);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out).and_then(|()| stdout.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the completion script")
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Escapes text for roff: a leading `.` or `'` and backslashes.
fn roff_text(line: &str) -> String {
    let l = line.replace('\\', "\\e");
    if l.starts_with('.') || l.starts_with('\'') {
        format!("\\&{l}")
    } else {
        l
    }
}

/// A Markdown list item's mark (`1.`, `-`) and text.
fn list_item(line: &str) -> Option<(&str, &str)> {
    if let Some(rest) = line.strip_prefix("- ") {
        return Some(("\\(bu", rest));
    }
    let (num, rest) = line.split_once(". ")?;
    (!num.is_empty() && num.chars().all(|c| c.is_ascii_digit()))
        .then(|| (&line[..num.len() + 1], rest))
}

/// A man page section of lines kept as they are.
fn roff_section(title: &str, body: &str) -> String {
    let mut out = format!(".SH \"{title}\"\n.nf\n");
    for line in body.lines() {
        out.push_str(&roff_text(line));
        out.push('\n');
    }
    out.push_str(".fi\n");
    out
}

/// The spool protocol (docs/PROTOCOL.md) as `ai-cmd-executor-protocol(7)`:
/// headings become sections, code blocks and tables are kept as they are,
/// paragraphs are filled.
pub fn protocol_page(markdown: &str) -> String {
    let mut out = String::from(
        ".TH AI-CMD-EXECUTOR-PROTOCOL 7\n.SH NAME\nai-cmd-executor-protocol \\- the spool contract of ai-cmd-executor\n",
    );
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            out.push_str(if in_code { ".fi\n.RE\n" } else { ".RS\n.nf\n" });
            in_code = !in_code;
            continue;
        }
        if in_code {
            out.push_str(&roff_text(line));
            out.push('\n');
        } else if let Some(h) = line.strip_prefix("# ") {
            out.push_str(&format!(".SH DESCRIPTION\n{}\n", roff_text(h)));
        } else if let Some(h) = line.strip_prefix("## ") {
            out.push_str(&format!(".SH \"{}\"\n", h.to_uppercase().replace('"', "")));
        } else if let Some(h) = line.strip_prefix("### ") {
            out.push_str(&format!(".SS \"{}\"\n", h.replace('"', "")));
        } else if line.trim().is_empty() {
            out.push_str(".PP\n");
        } else if let Some((mark, rest)) = list_item(line) {
            out.push_str(&format!(".IP \"{mark}\" 4\n{}\n", roff_text(rest)));
        } else if line.starts_with("  ") {
            // The continuation of a list item.
            out.push_str(&roff_text(line.trim_start()));
            out.push('\n');
        } else if line.starts_with('|') {
            out.push_str(&format!(".nf\n{}\n.fi\n", roff_text(line)));
        } else {
            out.push_str(&roff_text(line));
            out.push('\n');
        }
    }
    out
}

/// Writes `man/ai-cmd-executor.1`, `man/ai-cmd-executor-mcp.1`, the
/// protocol's page and `completions/{bash,zsh,fish}` files.
pub fn run(dir: &Path) -> anyhow::Result<ExitCode> {
    let man_dir = dir.join("man");
    let comp_dir = dir.join("completions");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    std::fs::create_dir_all(&comp_dir)
        .with_context(|| format!("creating {}", comp_dir.display()))?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    // One page for the tool, with every subcommand's options below it.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut sub_page = Vec::new();
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut sub_page)?;
        page.extend_from_slice(format!(".SH \"{}\"\n", sub.get_name().to_uppercase()).as_bytes());
        if let Some(about) = sub.get_about() {
            page.extend_from_slice(format!("{about}\n").as_bytes());
        }
        page.extend_from_slice(&sub_page);
    }
    for (title, body) in [
        ("EXIT STATUS", sections::EXIT_STATUS),
        ("FILES", sections::FILES),
        ("ENVIRONMENT", sections::ENVIRONMENT),
        ("EXAMPLES", sections::EXAMPLES),
    ] {
        page.extend_from_slice(roff_section(title, body).as_bytes());
    }
    page.extend_from_slice(
        b".SH \"SEE ALSO\"\nai-cmd-executor-protocol(7), systemctl(1), journalctl(1)\n",
    );
    let man = man_dir.join("ai-cmd-executor.1");
    std::fs::write(&man, page).with_context(|| format!("writing {}", man.display()))?;
    let server = man_dir.join(format!("{}.1", super::mcp::SERVER));
    let mut page = Vec::new();
    clap_mangen::Man::new(super::mcp::ServerArgs::command()).render(&mut page)?;
    page.extend_from_slice(b".SH \"SEE ALSO\"\nai-cmd-executor(1), ai-cmd-executor-protocol(7)\n");
    std::fs::write(&server, page).with_context(|| format!("writing {}", server.display()))?;
    let protocol = man_dir.join("ai-cmd-executor-protocol.7");
    std::fs::write(
        &protocol,
        protocol_page(include_str!("../../../docs/PROTOCOL.md")),
    )
    .with_context(|| format!("writing {}", protocol.display()))?;
    for (shell, name) in [
        (Shell::Bash, "ai-cmd-executor"),
        (Shell::Zsh, "_ai-cmd-executor"),
        (Shell::Fish, "ai-cmd-executor.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "ai-cmd-executor", &mut out);
        let path = comp_dir.join(name);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote {} and completions in {}",
        man.display(),
        comp_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
