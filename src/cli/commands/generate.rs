//! `generate-assets`: the man page and shell completions, from the clap
//! definitions so they cannot drift (used to build the package).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `man/ai-cmd-executor.1` and `completions/{bash,zsh,fish}` files.
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
    let man = man_dir.join("ai-cmd-executor.1");
    std::fs::write(&man, page).with_context(|| format!("writing {}", man.display()))?;
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
