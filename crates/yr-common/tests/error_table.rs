//! Checks the generated error-code table against openYuanrong's seed table (vendored as
//! `docs/reference/error-codes.seed.md`), its own invariants, the `Error` display format and the
//! retry policies the runtime relies on.
//!
//! No code number is spelled here: numbers compared with the seed are parsed from the seed file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use yr_common::{Error, ErrorCode, Lang, ModuleCode, RetryPolicy};

/// One row of the seed's csv-table: `NNNN, "meaning", "action"`.
#[derive(Debug)]
struct SeedRow {
    code: u32,
    meaning: String,
    action: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seed_path() -> PathBuf {
    repo_root().join("docs/reference/error-codes.seed.md")
}

/// Reads one `"…"` field at the start of `text`; returns the field and what follows it.
fn quoted(text: &str) -> Option<(&str, &str)> {
    let rest = text.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some((&rest[..end], &rest[end + 1..]))
}

/// Parses a csv-table line `NNNN, "…", "…"`; other lines give `None`.
fn parse_seed_line(line: &str) -> Option<SeedRow> {
    let (code, rest) = line.trim().split_once(',')?;
    let code = code.trim().parse().ok()?;
    let (meaning, rest) = quoted(rest)?;
    let rest = rest.trim_start().strip_prefix(',')?;
    let (action, rest) = quoted(rest)?;
    assert!(
        rest.trim().is_empty(),
        "trailing text in seed line {line:?}"
    );
    Some(SeedRow {
        code,
        meaning: meaning.to_string(),
        action: action.to_string(),
    })
}

fn seed_rows() -> Vec<SeedRow> {
    let path = seed_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let rows: Vec<SeedRow> = text.lines().filter_map(parse_seed_line).collect();
    assert!(!rows.is_empty(), "no csv-table rows in {}", path.display());
    let numbered_lines = text
        .lines()
        .filter(|line| line.starts_with(|c: char| c.is_ascii_digit()))
        .count();
    assert_eq!(
        rows.len(),
        numbered_lines,
        "some csv-table lines of {} could not be parsed",
        path.display()
    );
    rows
}

#[test]
fn every_seed_code_exists_with_the_seed_chinese_texts() {
    for seed in seed_rows() {
        let code = ErrorCode::from_number(seed.code).unwrap_or_else(|| {
            panic!(
                "seed code {} is missing from docs/error-codes.md",
                seed.code
            )
        });
        let info = code.info();
        assert_eq!(info.code, code);
        assert_eq!(
            info.meaning_zh, seed.meaning,
            "Chinese meaning of {}",
            seed.code
        );
        assert_eq!(
            info.action_zh, seed.action,
            "Chinese action of {}",
            seed.code
        );
        assert_eq!(info.meaning(Lang::Zh), seed.meaning);
        assert_eq!(info.action(Lang::Zh), seed.action);
    }
}

#[test]
fn seed_codes_are_unique() {
    let mut seen = HashSet::new();
    for seed in seed_rows() {
        assert!(seen.insert(seed.code), "seed lists {} twice", seed.code);
    }
}

#[test]
fn generated_table_rows_are_unique_sorted_and_complete() {
    let table = ErrorCode::table();
    assert!(!table.is_empty());
    for pair in table.windows(2) {
        assert!(
            pair[0].code.number() < pair[1].code.number(),
            "{} is not before {}: rows must be unique and sorted by code",
            pair[0].code.number(),
            pair[1].code.number()
        );
    }
    let mut names = HashSet::new();
    for row in table {
        let number = row.code.number();
        assert!(names.insert(row.name), "{} names two rows", row.name);
        assert!(
            row.name.starts_with("ERR_") && row.name.len() > "ERR_".len(),
            "{number}: enum name {:?} must start with ERR_",
            row.name
        );
        assert!(
            row.name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{number}: enum name {:?} must be SCREAMING_SNAKE_CASE",
            row.name
        );
        for (what, text) in [
            ("English meaning", row.meaning_en),
            ("English action", row.action_en),
            ("Chinese meaning", row.meaning_zh),
            ("Chinese action", row.action_zh),
        ] {
            assert!(!text.trim().is_empty(), "{number}: empty {what}");
            assert!(!text.contains('|'), "{number}: {what} contains '|'");
        }
        assert_eq!(ErrorCode::from_number(number), Some(row.code));
        assert_eq!(row.code.name(), row.name);
        assert_eq!(row.code.retry_policy(), row.retry);
        assert!(
            std::ptr::eq(row.code.info(), row),
            "{number}: info() must return its own row"
        );
    }
}

#[test]
fn default_module_follows_the_code_block() {
    // Function-system codes (1xxx–3xxx) come from the core, 42xx from the data system, the
    // rest (4xxx SDK usage, dependency failures, finalized) from the runtime. ParamInvalid is
    // the exception: it is mostly raised by the SDK's own validation, so it defaults to runtime.
    for row in ErrorCode::table() {
        let number = row.code.number();
        let expected = match (number / 1000, number / 100) {
            _ if row.code == ErrorCode::ParamInvalid => ModuleCode::Runtime,
            (1..=3, _) => ModuleCode::Core,
            (_, 42) => ModuleCode::DataSystem,
            _ => ModuleCode::Runtime,
        };
        assert_eq!(row.module, expected, "default module of {number}");
    }
}

#[test]
fn vendored_seed_is_byte_identical_to_the_shared_reference() {
    let shared = repo_root().join("../shared/reference/error-codes.md");
    let Ok(original) = std::fs::read(&shared) else {
        // The shared reference is not part of the repository; without it there is nothing to
        // compare against.
        return;
    };
    let vendored = std::fs::read(seed_path()).expect("the vendored seed copy exists");
    assert!(
        vendored == original,
        "docs/reference/error-codes.seed.md differs from {}; copy it again byte for byte",
        shared.display()
    );
}

#[test]
fn error_display_shows_code_module_and_message() {
    let err = Error::new(ErrorCode::ParamInvalid, "x");
    assert_eq!(err.module_code(), ModuleCode::Runtime);
    let expected = format!(
        "ErrCode: {}, ModuleCode: {}, ErrMsg: x",
        ErrorCode::ParamInvalid.number(),
        ModuleCode::Runtime.number()
    );
    assert_eq!(err.to_string(), expected);
}

#[test]
fn retry_policies_match_openyuanrong() {
    for code in [
        ErrorCode::InstanceNotFound,
        ErrorCode::InstanceExited,
        ErrorCode::InstanceEvicted,
    ] {
        assert_eq!(code.retry_policy(), RetryPolicy::Always, "{code}");
        assert!(code.is_retryable(), "{code}");
    }
    assert_eq!(
        ErrorCode::UserFunctionException.retry_policy(),
        RetryPolicy::WithRetryBudget
    );
    assert!(ErrorCode::UserFunctionException.is_retryable());
    assert_eq!(ErrorCode::ParamInvalid.retry_policy(), RetryPolicy::Never);
    assert!(!ErrorCode::ParamInvalid.is_retryable());
    assert!(!Error::new(ErrorCode::ParamInvalid, "x").is_retryable());
}
