//! The workspace's layers, checked from its manifests and sources.
//!
//! - Crates (from `cargo metadata`): the dependency arrows between the
//!   workspace's members are exactly the allowed ones of [`ALLOWED_CRATE_DEPS`]
//!   (protocol ← actors ← service library ← binary; the client depends on the
//!   protocol only; the test kit on protocol, actors and client, and nothing
//!   but the binary depends on it). The library and the binary are one
//!   package, so the sources of the library (`src/` minus `main.rs`, `cli.rs`
//!   and `cli/`) are also checked not to name the test kit or the client.
//! - Modules of the service library: every `crate::…` and `super::…` path of
//!   `src/` is an arrow between components, and the arrows must form no cycle
//!   and only point down: transports → use cases → base (config, auth). A
//!   component is a top-level module (`config`, `auth`), or one module under
//!   `app/` or `transport/` (`app` itself, `app::quota`, `transport::http`, …),
//!   so a cycle inside one folder of the layer is caught too.
//! - Modules of the job core (`actors/src`): the same arrows between its
//!   top-level modules (`repo`, `delete`, `supervisor`, …) form no cycle; so
//!   do those of `protocol/src`, `client/src` and `testkit/src`.
//!
//! Unit tests (after a file's `#[cfg(test)]`, and `tests.rs` / `testing.rs`
//! modules) are not counted. Each check proves itself on a planted violation.
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

/// Whether a source file of the service crate belongs to the library (the
/// CLI is the binary's: `main.rs`, `cli.rs`, `cli/`).
fn in_library(root: &Path, file: &Path) -> bool {
    !file.starts_with(root.join("cli")) && !file.ends_with("main.rs") && !file.ends_with("cli.rs")
}

/// Whether a module is test code (`…::tests`, `testing`), not a layer.
fn is_test_module(module: &[String]) -> bool {
    module.iter().any(|m| m == "tests" || m == "testing")
}

/// A top-level module of a crate is its component (`repo`, `delete`, …).
fn top_level(module: &[String]) -> String {
    module.first().cloned().unwrap_or_else(|| "lib".into())
}

/// Arrows between the components (named by `component`) of the crate whose
/// sources are under `root`, counting only the files `counted` accepts.
fn arrows_of(
    root: &Path,
    component: fn(&[String]) -> String,
    counted: &dyn Fn(&Path) -> bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    files.retain(|f| counted(f) && !is_test_module(&module_of(root, f)));
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(root, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(root, file);
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

/// Arrows between components of the service library.
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    arrows_of(&root, component, &|f| in_library(&root, f))
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

#[test]
fn the_job_core_and_the_other_crates_have_no_import_cycle() {
    for krate in ["actors", "protocol", "client", "testkit"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(krate)
            .join("src");
        let graph = arrows_of(&root, top_level, &|_| true);
        for (from, tos) in &graph {
            println!(
                "{krate}::{from} -> {}",
                tos.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        assert_eq!(cycle(&graph), None, "an import cycle in {krate}/src");
    }
    let actors = arrows_of(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("actors/src"),
        top_level,
        &|_| true,
    );
    assert!(actors.contains_key("supervisor") && actors["supervisor"].contains("repo"));
}

#[test]
fn the_module_check_sees_a_planted_cycle_in_a_crate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("delete")).unwrap();
    std::fs::write(root.join("lib.rs"), "pub mod delete;\npub mod store;\n").unwrap();
    std::fs::write(
        root.join("delete/mod.rs"),
        "mod tests;\nuse crate::store::Store;\n",
    )
    .unwrap();
    // A test module's arrows do not count ...
    std::fs::write(root.join("delete/tests.rs"), "use crate::lib;\n").unwrap();
    std::fs::write(root.join("store.rs"), "pub struct Store;\n").unwrap();
    assert_eq!(cycle(&arrows_of(root, top_level, &|_| true)), None);
    // ... the store reaching back into delete does.
    std::fs::write(
        root.join("store.rs"),
        "pub struct Store(crate::delete::Keep);\n",
    )
    .unwrap();
    let found = cycle(&arrows_of(root, top_level, &|_| true)).expect("the planted cycle");
    assert!(found.contains(&"store".to_string()) && found.contains(&"delete".to_string()));
}

/// The workspace's crates and the workspace crates each may depend on
/// (normal and build dependencies; dev-dependencies are tests, not layers).
/// A new member must be placed here.
const ALLOWED_CRATE_DEPS: &[(&str, &[&str])] = &[
    ("contact-bulk-protocol", &[]),
    ("contact-bulk-actors", &["contact-bulk-protocol"]),
    ("contact-bulk-client", &["contact-bulk-protocol"]),
    (
        "contact-bulk-testkit",
        &[
            "contact-bulk-protocol",
            "contact-bulk-actors",
            "contact-bulk-client",
        ],
    ),
    (
        "contact-bulk",
        &[
            "contact-bulk-protocol",
            "contact-bulk-actors",
            "contact-bulk-client",
            "contact-bulk-testkit",
        ],
    ),
];

/// The arrows of `cargo metadata` output that [`ALLOWED_CRATE_DEPS`] does not
/// allow, as `from -> to` (a member missing from the table is one too).
fn crate_violations(metadata: &serde_json::Value) -> Vec<String> {
    let packages = metadata["packages"].as_array().expect("packages");
    let members: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut out = Vec::new();
    for p in packages {
        let name = p["name"].as_str().expect("package name");
        let Some((_, allowed)) = ALLOWED_CRATE_DEPS.iter().find(|(n, _)| *n == name) else {
            out.push(format!("{name}: not placed in ALLOWED_CRATE_DEPS"));
            continue;
        };
        for dep in p["dependencies"].as_array().into_iter().flatten() {
            let to = dep["name"].as_str().unwrap_or_default();
            let dev = dep["kind"].as_str() == Some("dev");
            if members.contains(to) && !dev && !allowed.contains(&to) {
                out.push(format!("{name} -> {to}"));
            }
        }
    }
    out
}

fn cargo_metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata is JSON")
}

#[test]
fn the_crates_depend_one_way_and_the_library_leaves_the_tooling_alone() {
    let metadata = cargo_metadata();
    let names: BTreeSet<&str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for (name, _) in ALLOWED_CRATE_DEPS {
        assert!(names.contains(name), "{name} is not a workspace member");
    }
    assert_eq!(crate_violations(&metadata), Vec::<String>::new());
    // The library and the binary are one package: the library's sources must
    // not reach for what only the binary may use.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut named = Vec::new();
    for file in files.iter().filter(|f| in_library(&root, f)) {
        let code = std::fs::read_to_string(file).unwrap();
        for krate in ["contact_bulk_testkit", "contact_bulk_client"] {
            if code.contains(krate) {
                named.push(format!("{} names {krate}", file.display()));
            }
        }
    }
    assert!(named.is_empty(), "{named:?}");
}

#[test]
fn the_crate_check_sees_planted_upward_arrows() {
    let mut metadata = cargo_metadata();
    assert!(crate_violations(&metadata).is_empty());
    let packages = metadata["packages"].as_array_mut().unwrap();
    let dep = |name: &str, kind: serde_json::Value| serde_json::json!({"name": name, "kind": kind});
    for p in packages.iter_mut() {
        let name = p["name"].as_str().unwrap().to_string();
        let deps = p["dependencies"].as_array_mut().unwrap();
        match name.as_str() {
            "contact-bulk-client" => deps.push(dep("contact-bulk-actors", serde_json::Value::Null)),
            "contact-bulk-protocol" => deps.push(dep("contact-bulk-testkit", "build".into())),
            // A test-only dependency is no layer.
            "contact-bulk-actors" => deps.push(dep("contact-bulk-testkit", "dev".into())),
            _ => {}
        }
    }
    packages.push(serde_json::json!({"name": "contact-bulk-extra", "dependencies": []}));
    assert_eq!(
        crate_violations(&metadata),
        vec![
            "contact-bulk-protocol -> contact-bulk-testkit".to_string(),
            "contact-bulk-client -> contact-bulk-actors".into(),
            "contact-bulk-extra: not placed in ALLOWED_CRATE_DEPS".into(),
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
