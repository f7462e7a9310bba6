//! The error-code contract: [`ErrorCode`] (generated from `docs/error-codes.md`), the module
//! that produced an error, the retry policy of each code, and [`Error`], the one error type a
//! user of yr sees.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

include!(concat!(env!("OUT_DIR"), "/error_codes.rs"));

/// Who produced an error: the core (function system), the runtime (SDK) or the data system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleCode {
    /// The core: master, proxy, agent, runtime manager (10).
    Core,
    /// The SDK and its client core, in the driver or runtime (20).
    Runtime,
    /// The data system: object store, KV, streams (30).
    DataSystem,
}

impl ModuleCode {
    /// The number shown to users: 10, 20 or 30.
    pub const fn number(self) -> u32 {
        match self {
            ModuleCode::Core => 10,
            ModuleCode::Runtime => 20,
            ModuleCode::DataSystem => 30,
        }
    }

    /// The module with this number. Panics on an unknown number; used by generated tables.
    pub const fn from_number(number: u32) -> ModuleCode {
        match number {
            10 => ModuleCode::Core,
            20 => ModuleCode::Runtime,
            30 => ModuleCode::DataSystem,
            _ => panic!("module code must be 10, 20 or 30"),
        }
    }

    /// The module with this number, if there is one.
    pub fn try_from_number(number: u32) -> Option<ModuleCode> {
        match number {
            10 | 20 | 30 => Some(Self::from_number(number)),
            _ => None,
        }
    }
}

/// Whether a failed call with a code is worth retrying, and by whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryPolicy {
    /// yr retries stateless calls automatically, without using `retry_times`.
    Always,
    /// yr retries stateless calls while `retry_times` lasts.
    WithRetryBudget,
    /// yr does not retry, but the user may try again later.
    Later,
    /// Retrying does not help; something must change first.
    Never,
}

/// The language of a code's description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// English.
    En,
    /// Chinese, the language of openYuanrong's original table.
    Zh,
}

/// One row of the error-code table.
#[derive(Clone, Copy, Debug)]
pub struct CodeInfo {
    /// The code.
    pub code: ErrorCode,
    /// openYuanrong's enum name, for example `ERR_PARAM_INVALID`.
    pub name: &'static str,
    /// The module an error with this code carries unless its raise site says otherwise.
    pub module: ModuleCode,
    /// Whether and how the code is retried.
    pub retry: RetryPolicy,
    /// What the code means, in English.
    pub meaning_en: &'static str,
    /// What the user should do, in English.
    pub action_en: &'static str,
    /// What the code means, in Chinese.
    pub meaning_zh: &'static str,
    /// What the user should do, in Chinese.
    pub action_zh: &'static str,
}

impl CodeInfo {
    /// What the code means, in `lang`.
    pub fn meaning(&self, lang: Lang) -> &'static str {
        match lang {
            Lang::En => self.meaning_en,
            Lang::Zh => self.meaning_zh,
        }
    }

    /// What the user should do, in `lang`.
    pub fn action(&self, lang: Lang) -> &'static str {
        match lang {
            Lang::En => self.action_en,
            Lang::Zh => self.action_zh,
        }
    }
}

impl ErrorCode {
    /// Every row of the table, in code order.
    pub fn table() -> &'static [CodeInfo] {
        TABLE
    }

    /// The code's number, for example 1001.
    pub const fn number(self) -> u32 {
        self as u32
    }

    /// The code with this number, if the table has it.
    pub fn from_number(number: u32) -> Option<ErrorCode> {
        TABLE
            .iter()
            .find(|row| row.code.number() == number)
            .map(|row| row.code)
    }

    /// This code's row of the table.
    pub fn info(self) -> &'static CodeInfo {
        // Every variant is generated from a row, so the lookup cannot miss.
        TABLE
            .iter()
            .find(|row| row.code == self)
            .unwrap_or(&TABLE[0])
    }

    /// openYuanrong's enum name, for example `ERR_PARAM_INVALID`.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Whether yr retries stateless calls that fail with this code (always or with a budget).
    pub fn is_retryable(self) -> bool {
        matches!(
            self.info().retry,
            RetryPolicy::Always | RetryPolicy::WithRetryBudget
        )
    }

    /// How this code is retried.
    pub fn retry_policy(self) -> RetryPolicy {
        self.info().retry
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.number(), self.name())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.number())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = u32::deserialize(deserializer)?;
        ErrorCode::from_number(number)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown yr error code {number}")))
    }
}

impl Serialize for ModuleCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.number())
    }
}

impl<'de> Deserialize<'de> for ModuleCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = u32::deserialize(deserializer)?;
        ModuleCode::try_from_number(number)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown yr module code {number}")))
    }
}

/// An error a user of yr sees: a code from the table, the module that produced it, and a
/// message that says what happened and what to do.
///
/// ```
/// use yr_common::{Error, ErrorCode, ModuleCode};
/// let err = Error::new(ErrorCode::ParamInvalid, "cpu must be in [300, 16000]");
/// assert_eq!(err.code(), ErrorCode::ParamInvalid);
/// assert_eq!(err.module_code(), ModuleCode::Runtime);
/// assert!(err.to_string().starts_with("ErrCode: 1001, ModuleCode: 20, ErrMsg: cpu"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("ErrCode: {}, ModuleCode: {}, ErrMsg: {message}", code.number(), module.number())]
pub struct Error {
    code: ErrorCode,
    module: ModuleCode,
    message: String,
    /// The failure as the failing code's own language encoded it (a pickled Python exception),
    /// for an SDK of that language to re-raise; other languages read only the message.
    /// (Boxed: most errors have none, and an `Error` stays small to move around.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<Box<Payload>>,
}

/// The bytes of an error's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Payload(Vec<u8>);

impl Error {
    /// An error with `code`, carrying the code's default module.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error {
            code,
            module: code.info().module,
            message: message.into(),
            payload: None,
        }
    }

    /// An error with `code` produced by `module`.
    pub fn with_module(code: ErrorCode, module: ModuleCode, message: impl Into<String>) -> Error {
        Error {
            code,
            module,
            message: message.into(),
            payload: None,
        }
    }

    /// This error carrying `payload`: the failure in the failing code's own encoding (a
    /// pickled Python exception), which travels with the error to every caller.
    pub fn with_payload(mut self, payload: Vec<u8>) -> Error {
        self.payload = (!payload.is_empty()).then(|| Box::new(Payload(payload)));
        self
    }

    /// The failure in the failing code's own encoding, empty if it has none.
    pub fn payload(&self) -> &[u8] {
        self.payload.as_deref().map_or(&[], |payload| &payload.0)
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The module that produced the error.
    pub fn module_code(&self) -> ModuleCode {
        self.module
    }

    /// The message: what happened and what to do.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether yr retries stateless calls that fail with this error's code.
    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

/// `Result` with yr's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
