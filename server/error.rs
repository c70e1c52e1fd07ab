//! The services' error type, classified so `http::AppError` can map it to a status code in
//! one place.

use crate::render::RenderError;
use crate::store::StoreError;

/// What went wrong in a service call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the inventory (not found, illegal transition, token refused, database).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// From rendering.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Input that fails validation.
    #[error("{0}")]
    Invalid(String),
    /// A claim the daemon does not believe (an install claim without evidence).
    #[error("{0}")]
    Forbidden(String),
    /// A request that does not fit the machine as it is.
    #[error("{0}")]
    Conflict(String),
    /// `error`, caused by the value of `field` (`hostname`, `vars.ip`, …) of the input: an
    /// inventory file's error names the line of that field. Reads as `error`.
    #[error("{error}")]
    At {
        /// The field, as a path in the input.
        field: String,
        /// What was wrong with it.
        error: Box<Error>,
    },
    /// A failure of the daemon itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::validate::Invalid> for Error {
    fn from(e: crate::validate::Invalid) -> Self {
        Error::Invalid(e.0)
    }
}

/// Tags an error with the input field it is about: `.map_err(at("hostname"))`.
pub fn at<E: Into<Error>>(field: impl Into<String>) -> impl FnOnce(E) -> Error {
    let field = field.into();
    move |e| Error::At {
        field,
        error: Box::new(e.into()),
    }
}

/// Result type of the services.
pub type Result<T, E = Error> = std::result::Result<T, E>;
