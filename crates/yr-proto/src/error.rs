//! The one conversion each way between [`yr_common::Error`] and the wire's
//! [`ErrorInfo`](crate::v1::ErrorInfo).
//!
//! A code this process does not know (a peer of a newer version, or a bug) cannot be carried
//! by [`ErrorCode`], whose variants are generated from `docs/error-codes.md`. It is not turned
//! into another code's meaning: it becomes 3003 (`ERR_INNER_SYSTEM_ERROR`), and the message
//! keeps the number the peer sent. An unknown module number becomes the code's own module.

use yr_common::{Error, ErrorCode, ModuleCode};

use crate::v1::ErrorInfo;

/// An error for the wire.
pub fn error_to_proto(error: &Error) -> ErrorInfo {
    ErrorInfo {
        code: error.code().number(),
        module: error.module_code().number(),
        message: error.message().to_string(),
        payload: error.payload().to_vec().into(),
    }
}

/// An error from the wire. An unknown code is kept, by its number, in the message of a 3003.
pub fn error_from_proto(info: &ErrorInfo) -> Error {
    let module = ModuleCode::try_from_number(info.module);
    match ErrorCode::from_number(info.code) {
        Some(code) => Error::with_module(
            code,
            module.unwrap_or(code.info().module),
            info.message.clone(),
        )
        .with_payload(info.payload.to_vec()),
        None => Error::with_module(
            ErrorCode::InnerSystemError,
            module.unwrap_or(ErrorCode::InnerSystemError.info().module),
            format!(
                "unknown error code {} from a peer: {}",
                info.code, info.message
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_of_the_table_round_trips_with_its_module_and_message() {
        for row in ErrorCode::table() {
            for module in [
                ModuleCode::Core,
                ModuleCode::Runtime,
                ModuleCode::DataSystem,
            ] {
                let error = Error::with_module(row.code, module, format!("{} happened", row.name));
                let info = error_to_proto(&error);
                assert_eq!(info.code, row.code.number());
                assert_eq!(info.module, module.number());
                assert_eq!(error_from_proto(&info), error);
            }
        }
    }

    #[test]
    fn an_unknown_code_becomes_3003_and_keeps_its_number_in_the_message() {
        let error = error_from_proto(&ErrorInfo {
            code: 4321,
            module: 30,
            message: "odd".into(),
            ..Default::default()
        });
        assert_eq!(error.code(), ErrorCode::InnerSystemError);
        assert_eq!(error.module_code(), ModuleCode::DataSystem);
        assert_eq!(error.message(), "unknown error code 4321 from a peer: odd");
    }

    #[test]
    fn a_payload_travels_with_its_error() {
        let error = Error::new(ErrorCode::UserFunctionException, "ValueError: bad")
            .with_payload(b"pickled exception".to_vec());
        let back = error_from_proto(&error_to_proto(&error));
        assert_eq!(back.payload(), b"pickled exception");
        assert_eq!(back, error);
    }

    #[test]
    fn an_unknown_module_becomes_the_codes_own_module() {
        let known = error_from_proto(&ErrorInfo {
            code: ErrorCode::KeyAlreadyExist.number(),
            module: 99,
            message: "exists".into(),
            ..Default::default()
        });
        assert_eq!(known, Error::new(ErrorCode::KeyAlreadyExist, "exists"));
        let unknown = error_from_proto(&ErrorInfo {
            code: 1,
            module: 99,
            message: String::new(),
            ..Default::default()
        });
        assert_eq!(
            (unknown.code(), unknown.module_code()),
            (ErrorCode::InnerSystemError, ModuleCode::Core)
        );
    }
}
