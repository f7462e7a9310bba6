//! `yr errors`: prints yr's error-code table (generated from `docs/error-codes.md` into
//! `yr_common::ErrorCode`), or one code in detail, in English or Chinese.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::ValueEnum;
use yr_common::{CodeInfo, ErrorCode, Lang, ModuleCode, RetryPolicy};

/// Exit status for a code that is not in the table, like a usage error.
const EXIT_UNKNOWN_CODE: u8 = 2;

/// Arguments of `yr errors`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Without CODE, prints every code with its name, module and meaning. With CODE, \
                  prints its name, module, retry policy, meaning and what to do."
)]
pub struct Args {
    /// The error code to explain, for example the number after "ErrCode:" in an error message.
    #[arg(value_name = "CODE")]
    code: Option<String>,

    /// Language of the meanings and actions.
    #[arg(long, value_enum, default_value_t = LangArg::En)]
    lang: LangArg,
}

/// The `--lang` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LangArg {
    /// English.
    En,
    /// Chinese (the language of openYuanrong's original table).
    Zh,
}

impl From<LangArg> for Lang {
    fn from(lang: LangArg) -> Lang {
        match lang {
            LangArg::En => Lang::En,
            LangArg::Zh => Lang::Zh,
        }
    }
}

/// Runs `yr errors`: prints to stdout, or explains on stderr why the code is unknown and
/// returns exit status 2.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let lang = Lang::from(args.lang);
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match args.code.as_deref() {
        None => print_table(&mut out, lang)?,
        Some(text) => match lookup(text) {
            Some(code) => print_code(&mut out, code.info(), lang)?,
            None => {
                eprintln!(
                    "yr errors: {} is not a yr error code; run `yr errors` to list them",
                    text.trim()
                );
                return Ok(ExitCode::from(EXIT_UNKNOWN_CODE));
            }
        },
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The code `text` names, if it is a number in the table.
fn lookup(text: &str) -> Option<ErrorCode> {
    text.trim().parse().ok().and_then(ErrorCode::from_number)
}

/// Prints every code: number, enum name, module and meaning, in aligned columns.
fn print_table(out: &mut impl Write, lang: Lang) -> io::Result<()> {
    let table = ErrorCode::table();
    let name_width = table
        .iter()
        .map(|row| row.name.len())
        .chain(["NAME".len()])
        .max()
        .unwrap_or_default();
    writeln!(
        out,
        "{:<6} {:<name_width$} {:<6} MEANING",
        "CODE", "NAME", "MODULE"
    )?;
    for row in table {
        writeln!(
            out,
            "{:<6} {:<name_width$} {:<6} {}",
            row.code.number(),
            row.name,
            row.module.number(),
            row.meaning(lang)
        )?;
    }
    Ok(())
}

/// Prints one code in detail.
fn print_code(out: &mut impl Write, row: &CodeInfo, lang: Lang) -> io::Result<()> {
    writeln!(out, "code:    {}", row.code.number())?;
    writeln!(out, "name:    {}", row.name)?;
    writeln!(
        out,
        "module:  {} ({})",
        row.module.number(),
        module_label(row.module)
    )?;
    writeln!(out, "retry:   {}", retry_label(row.retry))?;
    writeln!(out, "meaning: {}", row.meaning(lang))?;
    writeln!(out, "action:  {}", row.action(lang))?;
    Ok(())
}

fn module_label(module: ModuleCode) -> &'static str {
    match module {
        ModuleCode::Core => "core: master, proxy, agent, runtime manager",
        ModuleCode::Runtime => "runtime: the SDK in the driver or runtime",
        ModuleCode::DataSystem => "data system: object store, KV, streams",
    }
}

fn retry_label(retry: RetryPolicy) -> &'static str {
    match retry {
        RetryPolicy::Always => {
            "always: yr retries stateless calls automatically, without using retry_times"
        }
        RetryPolicy::WithRetryBudget => {
            "budget: yr retries stateless calls while retry_times lasts"
        }
        RetryPolicy::Later => "later: yr does not retry, but trying again later may succeed",
        RetryPolicy::Never => "no: retrying does not help until the cause is fixed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_accepts_table_numbers_only() {
        let first = ErrorCode::table()[0].code;
        assert_eq!(lookup(&first.number().to_string()), Some(first));
        assert_eq!(lookup(&format!(" {} ", first.number())), Some(first));
        assert_eq!(lookup("not-a-code"), None);
        assert_eq!(lookup(""), None);
        assert_eq!(lookup(&u64::MAX.to_string()), None);
    }

    #[test]
    fn table_columns_are_aligned() {
        let mut out = Vec::new();
        print_table(&mut out, Lang::En).expect("writing to a Vec cannot fail");
        let text = String::from_utf8(out).expect("the table is UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), ErrorCode::table().len() + 1);
        let meaning_column = lines[0].find("MEANING").expect("header has MEANING");
        for (line, row) in lines[1..].iter().zip(ErrorCode::table()) {
            assert_eq!(line.find(row.meaning_en), Some(meaning_column), "{line}");
        }
    }
}
