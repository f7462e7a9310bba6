//! Keeps the reserved marks of `docs/error-codes.md` honest: every code that is not marked
//! reserved is raised somewhere in the workspace's sources outside tests, and every code marked
//! reserved is raised nowhere.
//!
//! A raise site is a mention of `ErrorCode::<Variant>` in a crate's `src` (or `bench/src`) that
//! is not a comparison or a pattern (`== ErrorCode::X`, `ErrorCode::X =>`, `matches!(…)`),
//! outside comments and `#[cfg(test)]` items. `crates/yr-tests` is the test harness and does not
//! count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yr_common::ErrorCode;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `ERR_K8S_UNAVAILABLE` → `K8sUnavailable`, as `build.rs` names the variants.
fn variant_name(enum_name: &str) -> String {
    enum_name
        .trim_start_matches("ERR_")
        .split('_')
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            let mut chars = lower.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// The reserved list: `- `NNNN` NAME — reserved: feature` lines under `## Reserved codes`.
fn reserved() -> BTreeMap<u32, String> {
    let path = repo_root().join("docs/error-codes.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let section = text
        .split("\n## ")
        .find(|section| section.starts_with("Reserved codes"))
        .expect("docs/error-codes.md has a `## Reserved codes` section");
    let mut reserved = BTreeMap::new();
    for line in section.lines().filter(|line| line.starts_with("- `")) {
        let rest = &line["- `".len()..];
        let (number, rest) = rest
            .split_once('`')
            .unwrap_or_else(|| panic!("reserved line {line:?}: the code is not in backquotes"));
        let number: u32 = number
            .parse()
            .unwrap_or_else(|_| panic!("reserved line {line:?}: {number:?} is not a number"));
        let code = ErrorCode::from_number(number)
            .unwrap_or_else(|| panic!("reserved line {line:?}: {number} is not in the table"));
        let rest = rest.trim_start();
        assert!(
            rest.starts_with(code.name()),
            "reserved line {line:?}: {number} is {}",
            code.name()
        );
        let (_, feature) = rest
            .split_once("reserved:")
            .unwrap_or_else(|| panic!("reserved line {line:?} does not say `reserved: <feature>`"));
        let feature = feature.trim();
        assert!(
            !feature.is_empty(),
            "reserved line {line:?} names no feature"
        );
        assert!(
            reserved.insert(number, feature.to_string()).is_none(),
            "{number} is reserved twice"
        );
    }
    assert!(
        !reserved.is_empty(),
        "no `- `NNNN` NAME — reserved: feature` lines under `## Reserved codes`"
    );
    reserved
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The product sources: each crate's `src` (not the `yr-tests` harness) and `bench/src`.
fn sources() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = Vec::new();
    let crates = std::fs::read_dir(root.join("crates")).expect("read crates/");
    for krate in crates.flatten() {
        if krate.file_name() == "yr-tests" {
            continue;
        }
        rust_files(&krate.path().join("src"), &mut files);
    }
    rust_files(&root.join("bench/src"), &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    files.sort();
    files
}

/// The file of module `name` declared in `file` (`mod name;`).
fn module_files(file: &Path, name: &str) -> [PathBuf; 2] {
    let dir = file.parent().expect("a source file has a directory");
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let base = if matches!(stem, "lib" | "main" | "mod") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    [
        base.join(format!("{name}.rs")),
        base.join(name).join("mod.rs"),
    ]
}

/// `text` with comments and `#[cfg(test)]` items blanked (lines kept, so that line numbers
/// stay right); adds the files of `#[cfg(test)] mod x;` to `test_files`.
fn product_code(file: &Path, text: &str, test_files: &mut BTreeSet<PathBuf>) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::with_capacity(lines.len());
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index];
        if line.trim() == "#[cfg(test)]" {
            // Skip further attributes to the item itself.
            let mut item = index + 1;
            while item < lines.len() && lines[item].trim_start().starts_with("#[") {
                item += 1;
            }
            let Some(item_line) = lines.get(item) else {
                break;
            };
            let trimmed = item_line.trim();
            if trimmed.ends_with(';') {
                if let Some(name) = trimmed
                    .trim_start_matches("pub ")
                    .strip_prefix("mod ")
                    .map(|rest| rest.trim_end_matches(';').trim())
                {
                    test_files.extend(module_files(file, name));
                }
                kept.extend(std::iter::repeat_n("", item + 1 - index));
                index = item + 1;
                continue;
            }
            // A block item: rustfmt closes it with `}` at the item's indentation.
            let indent = &item_line[..item_line.len() - item_line.trim_start().len()];
            let close = format!("{indent}}}");
            let mut end = item;
            while end < lines.len() && lines[end] != close {
                end += 1;
            }
            kept.extend(std::iter::repeat_n(
                "",
                end.min(lines.len() - 1) + 1 - index,
            ));
            index = end + 1;
            continue;
        }
        kept.push(if line.trim_start().starts_with("//") {
            ""
        } else {
            line
        });
        index += 1;
    }
    kept.join("\n")
}

/// Whether the mention at `start..end` of `code` is a comparison or a pattern, not a raise.
fn is_check(code: &str, start: usize, end: usize) -> bool {
    let after = code[end..].trim_start();
    let before = code[..start].trim_end();
    if after.starts_with("=>") || after.starts_with("if ") {
        return true;
    }
    if (after.starts_with('|') && !after.starts_with("||"))
        || (before.ends_with('|') && !before.ends_with("||"))
    {
        return true;
    }
    if before.ends_with("==") || before.ends_with("!=") {
        return true;
    }
    // Inside `matches!(…)`: the macro's parenthesis is still open here.
    let window_start = start.saturating_sub(400);
    let window_start = (window_start..start)
        .find(|&i| code.is_char_boundary(i))
        .unwrap_or(start);
    let window = &code[window_start..start];
    if let Some(at) = window.rfind("matches!(") {
        let mut depth = 1usize;
        for c in window[at + "matches!(".len()..].chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                return false;
            }
        }
        return true;
    }
    false
}

/// Where each code variant is raised: `path:line` per site.
fn raise_sites() -> BTreeMap<String, Vec<String>> {
    let root = repo_root();
    let files = sources();
    let mut test_files = BTreeSet::new();
    let mut texts = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let code = product_code(file, &text, &mut test_files);
        texts.push((file, code));
    }
    let mut sites: BTreeMap<String, Vec<String>> = BTreeMap::new();
    const PREFIX: &str = "ErrorCode::";
    for (file, code) in texts {
        if test_files.contains(file) {
            continue;
        }
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let mut from = 0;
        while let Some(found) = code[from..].find(PREFIX) {
            let start = from + found;
            let name_start = start + PREFIX.len();
            let name_len = code[name_start..]
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .unwrap_or(code.len() - name_start);
            let end = name_start + name_len;
            let name = &code[name_start..end];
            from = end;
            if !name.starts_with(|c: char| c.is_ascii_uppercase()) || is_check(&code, start, end) {
                continue;
            }
            let line = code[..start].matches('\n').count() + 1;
            sites
                .entry(name.to_string())
                .or_default()
                .push(format!("{shown}:{line}"));
        }
    }
    sites
}

#[test]
fn every_code_is_raised_or_marked_reserved_and_no_reserved_code_is_raised() {
    let reserved = reserved();
    let sites = raise_sites();
    let mut problems = Vec::new();
    for row in ErrorCode::table() {
        let number = row.code.number();
        let variant = variant_name(row.name);
        let raised = sites.get(&variant).map(Vec::as_slice).unwrap_or(&[]);
        match (reserved.get(&number), raised.is_empty()) {
            (None, true) => problems.push(format!(
                "{number} {} (ErrorCode::{variant}) is raised nowhere outside tests: raise it \
                 where its row says, or mark it reserved in docs/error-codes.md with the \
                 feature that will raise it",
                row.name
            )),
            (Some(feature), false) => problems.push(format!(
                "{number} {} is marked reserved ({feature}) but raised at {}: remove its mark",
                row.name,
                raised.join(", ")
            )),
            _ => {}
        }
    }
    let known: BTreeSet<String> = ErrorCode::table()
        .iter()
        .map(|row| variant_name(row.name))
        .collect();
    for (variant, at) in &sites {
        if !known.contains(variant) {
            problems.push(format!(
                "ErrorCode::{variant} at {} is not a row of the table",
                at.join(", ")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_scanner_tells_raises_from_checks_and_skips_tests() {
    let file = Path::new("crates/x/src/lib.rs");
    let text = "\
fn f() -> Error {
    // ErrorCode::InstanceEvicted in a comment
    if error.code() == ErrorCode::InstanceBusy {}
    let retry = matches!(code, ErrorCode::InstanceSuspend | ErrorCode::K8sUnavailable);
    match code {
        ErrorCode::NpuFaultError => 1,
        ErrorCode::SubStateInvalid
        | ErrorCode::GroupExitTogether => 2,
    };
    Error::new(ErrorCode::ParamInvalid, \"x\")
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod more {
    fn g() { Error::new(ErrorCode::GroupScheduleFailed, \"y\"); }
}
";
    let mut test_files = BTreeSet::new();
    let code = product_code(file, text, &mut test_files);
    assert!(test_files.contains(Path::new("crates/x/src/tests.rs")));
    let mut raised = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find("ErrorCode::") {
        let start = from + found;
        let end = start
            + "ErrorCode::".len()
            + code[start + "ErrorCode::".len()..]
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap();
        if !is_check(&code, start, end) {
            raised.push(code[start + "ErrorCode::".len()..end].to_string());
        }
        from = end;
    }
    assert_eq!(raised, vec!["ParamInvalid".to_string()]);
}
