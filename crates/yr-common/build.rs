//! Generates `ErrorCode` from the table in `docs/error-codes.md`, the single source of yr's codes.

use std::fmt::Write as _;
use std::path::Path;

struct Row {
    code: u32,
    name: String,
    module: u32,
    retry: String,
    texts: [String; 4],
}

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

fn parse(table: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for (index, line) in table.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Ok(code) = cells[0].parse::<u32>() else {
            continue;
        };
        assert_eq!(
            cells.len(),
            8,
            "docs/error-codes.md line {}: expected 8 cells",
            index + 1
        );
        let module = cells[2]
            .parse()
            .unwrap_or_else(|_| panic!("docs/error-codes.md line {}: bad module", index + 1));
        assert!(
            matches!(cells[3], "always" | "budget" | "later" | "no"),
            "docs/error-codes.md line {}: retry must be always|budget|later|no",
            index + 1
        );
        rows.push(Row {
            code,
            name: cells[1].to_string(),
            module,
            retry: cells[3].to_string(),
            texts: [cells[4], cells[5], cells[6], cells[7]].map(str::to_string),
        });
    }
    rows
}

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let table_path = Path::new(&manifest).join("../../docs/error-codes.md");
    println!("cargo:rerun-if-changed={}", table_path.display());
    let table = std::fs::read_to_string(&table_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", table_path.display()));
    let rows = parse(&table);
    assert!(!rows.is_empty(), "docs/error-codes.md has no rows");

    let mut out = String::new();
    out.push_str("/// Every yr error code, generated from `docs/error-codes.md`.\n");
    out.push_str("#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]\n");
    out.push_str("#[repr(u32)]\n#[non_exhaustive]\npub enum ErrorCode {\n");
    for row in &rows {
        let _ = writeln!(out, "    /// {} ({}): {}", row.code, row.name, row.texts[0]);
        let _ = writeln!(out, "    {} = {},", variant_name(&row.name), row.code);
    }
    out.push_str("}\n\n");

    out.push_str("const TABLE: &[CodeInfo] = &[\n");
    for row in &rows {
        let _ = writeln!(
            out,
            "    CodeInfo {{ code: ErrorCode::{}, name: {:?}, module: ModuleCode::from_number({}), retry: RetryPolicy::{}, meaning_en: {:?}, action_en: {:?}, meaning_zh: {:?}, action_zh: {:?} }},",
            variant_name(&row.name),
            row.name,
            row.module,
            match row.retry.as_str() {
                "always" => "Always",
                "budget" => "WithRetryBudget",
                "later" => "Later",
                _ => "Never",
            },
            row.texts[0],
            row.texts[1],
            row.texts[2],
            row.texts[3],
        );
    }
    out.push_str("];\n");

    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    std::fs::write(Path::new(&out_dir).join("error_codes.rs"), out).expect("write error_codes.rs");
}
