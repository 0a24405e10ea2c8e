//! The shape of the workspace: the library's dependency tree is lean without its default
//! features (no CLI crate reaches it), a feature left out leaves its code out (the Firecracker
//! handshake's symbols), and its modules import each other without cycles (the layers
//! ARCHITECTURE.md lists).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What only the daemon and the command line may depend on.
const CLI_ONLY: &[&str] = &["clap", "env_logger", "sd-notify", "postcopy-broker-cli"];

fn library_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../postcopy-broker")
}

/// The package names of the library's normal dependency tree with `features`.
fn tree(features: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(library_dir())
        .args(["tree", "-p", "postcopy-broker", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .args(features)
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree {features:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_library_without_default_features_has_no_cli_or_optional_dependency() {
    let lean = tree(&["--no-default-features"]);
    assert!(lean.contains("postcopy-broker") && lean.contains("userfaultfd-sys"), "{lean:?}");
    for name in CLI_ONLY.iter().chain(&["vhost", "rustls", "snow", "rcgen", "xxhash-rust", "hmac"]) {
        assert!(!lean.contains(*name), "{name} in the lean tree: {lean:?}");
    }
}

#[test]
fn each_feature_brings_its_own_dependencies_and_no_cli_one() {
    let full = tree(&[]);
    let vhost = tree(&["--no-default-features", "--features", "vhost-user"]);
    let migration = tree(&["--no-default-features", "--features", "migration"]);
    let firecracker = tree(&["--no-default-features", "--features", "firecracker"]);
    for (name, t) in
        [("default", &full), ("vhost-user", &vhost), ("migration", &migration), ("firecracker", &firecracker)]
    {
        for cli in CLI_ONLY {
            assert!(!t.contains(*cli), "{cli} in the {name} tree");
        }
    }
    assert!(vhost.contains("vhost") && !vhost.contains("rustls"), "{vhost:?}");
    assert!(migration.contains("rustls") && migration.contains("snow") && !migration.contains("vhost"));
    assert!(full.contains("vhost") && full.contains("rustls"));
    // The handshake is JSON over the control socket: no dependency of its own.
    assert_eq!(firecracker, tree(&["--no-default-features"]));
}

/// The library's rlib built (release) with `features`, found through cargo's JSON messages.
fn library_rlib(features: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(library_dir())
        .args(["build", "--release", "-p", "postcopy-broker", "--lib", "--message-format", "json"])
        .args(features)
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo build {features:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rlib = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "postcopy_broker")
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "rlib"));
    rlib.unwrap_or_else(|| panic!("no rlib of postcopy_broker in cargo's messages for {features:?}"))
}

/// The demangled names of the symbols an rlib defines.
fn defined_symbols(rlib: &Path) -> String {
    let out = Command::new("nm").args(["--defined-only", "--demangle"]).arg(rlib).output().unwrap();
    // nm also reports the archive's metadata member, which is no object file: its exit code is
    // not the answer, the symbols are.
    let syms = String::from_utf8(out.stdout).unwrap();
    assert!(syms.contains("postcopy_broker::"), "nm found no symbol of the library in {}", rlib.display());
    syms
}

#[test]
fn without_the_firecracker_feature_the_handshake_is_not_in_the_library() {
    let with = defined_symbols(&library_rlib(&["--no-default-features", "--features", "firecracker"]));
    let without = defined_symbols(&library_rlib(&["--no-default-features"]));
    for name in
        ["control::firecracker::handshake::HandshakeDecoder", "control::firecracker::fuzz::fuzz_firecracker"]
    {
        assert!(with.contains(name), "{name} missing with the feature");
    }
    assert!(without.contains("control::frame::FrameDecoder"), "the core decoder is in both");
    let leaked: Vec<&str> = without.lines().filter(|l| l.to_lowercase().contains("firecracker")).collect();
    assert!(leaked.is_empty(), "Firecracker symbols without the feature: {leaked:#?}");
}

/// The top-level modules of the library each file's `crate::` paths name (comments left out).
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = library_dir().join("src");
    let mut files = vec![src.clone()];
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = p.strip_prefix(&src).unwrap().to_str().unwrap().to_string();
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        if top == "lib" || !rel.ends_with(".rs") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let deps = graph.entry(top.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let group = group.split('}').next().unwrap();
                    deps.extend(group.split(',').filter_map(|g| ident(g.trim_start())));
                } else {
                    deps.extend(ident(rest));
                }
            }
        }
        deps.remove(&top);
    }
    graph
}

fn ident(s: &str) -> Option<String> {
    let id: String = s.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
    (!id.is_empty()).then_some(id)
}

#[test]
fn the_library_modules_import_each_other_without_cycles() {
    let graph = module_imports();
    assert!(graph.contains_key("error") && graph["fault"].contains("client"), "{graph:?}");
    assert!(!graph["error"].contains("migration") && !graph["error"].contains("control"), "{graph:?}");
    // Peel off modules that import nothing left; what cannot be peeled is a cycle.
    let mut left = graph.clone();
    loop {
        let leaves: Vec<String> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
            .collect();
        if leaves.is_empty() {
            break;
        }
        for m in leaves {
            left.remove(&m);
        }
    }
    assert!(left.is_empty(), "modules in an import cycle: {left:?}");
}
