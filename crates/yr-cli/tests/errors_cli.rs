//! Runs the built `yr` binary and checks `yr errors`: the full listing, one code in English and
//! Chinese (against openYuanrong's seed table), unknown codes, `--help` and `--version`.

use std::path::Path;
use std::process::{Command, Output};

use yr_common::ErrorCode;

fn yr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_yr"))
        .args(args)
        .output()
        .expect("run the yr binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// The seed table's Chinese meaning and action of `code`, read from the vendored seed copy.
fn seed_chinese(code: u32) -> (String, String) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/reference/error-codes.seed.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let prefix = format!("{code},");
    let line = text
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("the seed has no row for {code}"));
    let fields: Vec<&str> = line.split('"').collect();
    // `NNNN, "meaning", "action"` splits into [code, meaning, ", ", action, ""].
    assert_eq!(fields.len(), 5, "unexpected seed line {line:?}");
    (fields[1].to_string(), fields[3].to_string())
}

#[test]
fn listing_contains_every_code() {
    let output = yr(&["errors"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        ErrorCode::table().len() + 1,
        "header + one line per code"
    );
    for (line, row) in lines[1..].iter().zip(ErrorCode::table()) {
        let mut columns = line.split_whitespace();
        assert_eq!(
            columns.next(),
            Some(row.code.number().to_string().as_str()),
            "{line}"
        );
        assert_eq!(columns.next(), Some(row.name), "{line}");
        assert_eq!(
            columns.next(),
            Some(row.module.number().to_string().as_str()),
            "{line}"
        );
        assert!(line.ends_with(row.meaning_en), "{line}");
    }
}

#[test]
fn listing_in_chinese_shows_chinese_meanings() {
    let output = yr(&["errors", "--lang", "zh"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for row in ErrorCode::table() {
        assert!(text.contains(row.meaning_zh), "missing {}", row.name);
    }
}

#[test]
fn one_code_in_english() {
    let code = ErrorCode::ResourceConfigError;
    let output = yr(&["errors", &code.number().to_string()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("ERR_RESOURCE_CONFIG_ERROR"), "{text}");
    assert!(text.contains(&code.number().to_string()), "{text}");
    assert!(text.contains(code.info().meaning_en), "{text}");
    assert!(text.contains(code.info().action_en), "{text}");
    assert!(text.contains("retry:"), "{text}");
    assert!(text.contains("module:"), "{text}");
}

#[test]
fn one_code_in_chinese_matches_the_seed() {
    let code = ErrorCode::ResourceConfigError;
    let output = yr(&["errors", &code.number().to_string(), "--lang", "zh"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let (meaning, action) = seed_chinese(code.number());
    assert!(text.contains("ERR_RESOURCE_CONFIG_ERROR"), "{text}");
    assert!(text.contains(&meaning), "{text}");
    assert!(text.contains(&action), "{text}");
}

#[test]
fn unknown_code_exits_with_status_2() {
    let unknown = "1234";
    assert_eq!(
        unknown.parse().ok().and_then(ErrorCode::from_number),
        None,
        "pick a number that is not a code"
    );
    let output = yr(&["errors", unknown]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    assert_eq!(
        stderr(&output).trim(),
        "yr errors: 1234 is not a yr error code; run `yr errors` to list them"
    );
}

#[test]
fn non_number_exits_with_status_2() {
    let output = yr(&["errors", "abc"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    assert!(
        stderr(&output).contains("abc is not a yr error code; run `yr errors` to list them"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unknown_language_is_a_usage_error() {
    let output = yr(&["errors", "--lang", "fr"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("possible values: en, zh"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn help_and_version() {
    let output = yr(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output).trim(),
        format!("yr {}", env!("CARGO_PKG_VERSION"))
    );

    let output = yr(&["--help"]);
    assert!(output.status.success());
    assert!(stdout(&output).contains("errors"));

    let output = yr(&["errors", "--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(text.contains("--lang"), "{text}");
    assert!(text.contains("[CODE]"), "{text}");
}
