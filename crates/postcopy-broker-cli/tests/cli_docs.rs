//! Every option of every subcommand of `postcopy-broker` is documented in README.md: each one
//! `SUB --help` lists appears in a README paragraph or table row that names `SUB`.

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_postcopy-broker")).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands `postcopy-broker --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let top = help(&[]);
    let list = top.split("Commands:").nth(1).unwrap().split("Options:").next().unwrap();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// The long options a help text lists, `--help` left out.
fn long_options(help: &str) -> Vec<String> {
    let mut opts: Vec<String> = help
        .lines()
        .map(str::trim_start)
        .map(|l| l.strip_prefix("-").and_then(|r| r.split_once(", ")).map_or(l, |(_, long)| long))
        .filter(|l| l.starts_with("--"))
        .filter_map(|l| l.split(|c: char| c.is_whitespace() || c == '=').next())
        .filter(|o| *o != "--help")
        .map(str::to_string)
        .collect();
    opts.dedup();
    opts
}

/// Whether `text` names `option` as a whole word (`--vm` is not found in `--vm-name`).
fn names(text: &str, option: &str) -> bool {
    text.match_indices(option).any(|(i, _)| {
        text[i + option.len()..].chars().next().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-'))
    })
}

#[test]
fn every_option_of_every_subcommand_is_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    // Paragraphs, and each table row on its own.
    let parts: Vec<&str> = readme
        .split("\n\n")
        .flat_map(|p| if p.starts_with('|') { p.lines().collect() } else { vec![p] })
        .collect();
    let subs = subcommands();
    assert!(subs.len() >= 6 && subs.iter().any(|s| s == "serve"), "{subs:?}");
    let mut missing = Vec::new();
    for sub in &subs {
        let opts = long_options(&help(&[sub]));
        assert!(!opts.is_empty(), "{sub} lists no option");
        let about: Vec<&str> = parts
            .iter()
            .copied()
            .filter(|p| p.contains(&format!("`{sub}`")) || p.contains(&format!("`postcopy-broker {sub}")))
            .collect();
        for o in opts {
            if !about.iter().any(|p| names(p, &o)) {
                missing.push(format!("{sub} {o}"));
            }
        }
    }
    assert!(missing.is_empty(), "options not documented in README.md: {missing:?}");
}
