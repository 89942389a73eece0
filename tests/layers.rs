//! The service library's layers, checked from its sources: every `crate::…`
//! and `super::…` path of `src/` (the library; the CLI is the binary's) is an
//! arrow between components, and the arrows must form no cycle and only point
//! down: transports → use cases → base (config, auth).
//!
//! A component is a top-level module (`config`, `auth`), or one module under
//! `app/` or `transport/` (`app` itself, `app::quota`, `transport::http`, …),
//! so a cycle inside one folder of the layer is caught too.
//! Unit tests (after a file's `#[cfg(test)]`) are not counted.
//! `cargo test --test layers -- --nocapture` prints the arrows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The module path of a source file: `src/app/quota.rs` → `app::quota`.
fn module_of(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The component a module belongs to.
fn component(module: &[String]) -> String {
    match module.first().map(String::as_str) {
        None => "lib".into(),
        Some(first @ ("app" | "transport")) => match module.get(1) {
            Some(second) => format!("{first}::{second}"),
            None => first.to_string(),
        },
        Some(first) => first.to_string(),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The identifiers after each `crate::` / `super::` in code (comments skipped),
/// as absolute module paths; `use crate::{a, b::c}` yields `a` and `b::c`.
fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // `mod child;` declarations: `child::…` is a path too.
    let children: Vec<String> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("pub ").unwrap_or(l.trim());
            let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect();
    let mut prefixes = vec![
        ("crate::".to_string(), Vec::new()),
        ("super::".to_string(), parent(module)),
    ];
    for child in children {
        let mut base = module.to_vec();
        base.push(child.clone());
        prefixes.push((format!("{child}::"), base));
    }
    // Unit tests (at the end of a file, in an inline module) are not layers.
    let code = code.split("#[cfg(test)]").next().unwrap_or("");
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        for (prefix, base) in &prefixes {
            let (prefix, base) = (prefix.as_str(), base.clone());
            let mut rest = line;
            while let Some(i) = rest.find(prefix) {
                let before = rest[..i].chars().last();
                rest = &rest[i + prefix.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                for path in paths(rest) {
                    let mut full = base.clone();
                    if prefix != "crate::" && prefix != "super::" {
                        // A child path: the child itself is the first segment.
                        full.pop();
                        full.push(prefix.trim_end_matches("::").to_string());
                    }
                    full.extend(path);
                    out.push(full);
                }
            }
        }
    }
    out
}

/// The module `super` names from `module` (a `mod.rs` is its folder's module).
fn parent(module: &[String]) -> Vec<String> {
    let mut p = module.to_vec();
    p.pop();
    p
}

/// `a::b::C` → [[a, b, C]]; `{a, b::c}` → [[a], [b, c]].
fn paths(s: &str) -> Vec<Vec<String>> {
    if let Some(group) = s.strip_prefix('{') {
        let end = group.find('}').unwrap_or(group.len());
        return group[..end]
            .split(',')
            .map(|p| ident_path(p.trim()))
            .filter(|p| !p.is_empty())
            .collect();
    }
    vec![ident_path(s)]
}

fn ident_path(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    out
}

/// Arrows between components of the library.
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .filter(|f| {
            !f.starts_with(root.join("cli")) && !f.ends_with("main.rs") && !f.ends_with("cli.rs")
        })
        .map(|f| module_of(&root, f))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        if file.starts_with(root.join("cli"))
            || file.ends_with("main.rs")
            || file.ends_with("cli.rs")
        {
            continue;
        }
        let module = module_of(&root, file);
        let from = component(&module);
        let code = std::fs::read_to_string(file).unwrap();
        for target in references(&module, &code) {
            // The longest prefix of the path that is a module of the crate.
            let Some(len) = (1..=target.len())
                .rev()
                .find(|&n| modules.contains(&target[..n]))
            else {
                continue;
            };
            let to = component(&target[..len]);
            if to != from {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
        graph.entry(from).or_default();
    }
    graph
}

/// The components on a cycle, if any (a depth-first search).
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// The layer of a component: 0 base, 1 use cases, 2 transports, 3 the root.
fn layer(component: &str) -> u8 {
    match component {
        "lib" => 3,
        c if c.starts_with("transport") => 2,
        c if c.starts_with("app") => 1,
        _ => 0,
    }
}

#[test]
fn the_library_has_no_import_cycle_and_its_layers_point_down() {
    let graph = arrows();
    for (from, tos) in &graph {
        println!(
            "{from} -> {}",
            tos.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(graph.contains_key("app") && graph.contains_key("transport::http"));
    assert_eq!(cycle(&graph), None, "an import cycle");
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from, to)))
        .filter(|(from, to)| layer(to) > layer(from))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(upward.is_empty(), "arrows pointing up: {upward:?}");
}

#[test]
fn the_checker_sees_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert(
        "app".to_string(),
        BTreeSet::from(["transport::ws".to_string()]),
    );
    graph.insert(
        "transport::ws".to_string(),
        BTreeSet::from(["app".to_string()]),
    );
    assert!(cycle(&graph).is_some());
    let refs = references(
        &["transport".into(), "ws".into(), "session".into()],
        "mod open;\nuse crate::{auth::Keys, app::App};\nlet x = super::hub::Hub::new(); // crate::config\nuse open::Opened;\n#[cfg(test)]\nuse super::*;",
    );
    assert_eq!(
        refs,
        vec![
            vec!["auth".to_string(), "Keys".into()],
            vec!["app".into(), "App".into()],
            vec![
                "transport".into(),
                "ws".into(),
                "hub".into(),
                "Hub".into(),
                "new".into()
            ],
            vec![
                "transport".into(),
                "ws".into(),
                "session".into(),
                "open".into(),
                "Opened".into()
            ],
        ]
    );
}

/// The use cases and the transports reach MongoDB only through the
/// repositories (`actors/src/repo/`): no `mongodb::` path, `Database` or
/// collection handle in `src/app/` or `src/transport/` (unit tests aside);
/// `Service::start` (`src/lib.rs`) alone opens the database.
#[test]
fn only_service_start_sees_the_database() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for dir in ["app", "transport"] {
        rust_files(&src.join(dir), &mut files);
    }
    assert!(files.len() > 10, "{files:?}");
    let mut seen = Vec::new();
    for file in &files {
        let code = std::fs::read_to_string(file).unwrap();
        let code = code.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or("");
            if ["mongodb::", "Database", ".collection(", ".collection::<"]
                .iter()
                .any(|w| line.contains(w))
            {
                seen.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        seen.is_empty(),
        "the database outside the repositories:\n{}",
        seen.join("\n")
    );
}
