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
    /// A failure of the daemon itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::validate::Invalid> for Error {
    fn from(e: crate::validate::Invalid) -> Self {
        Error::Invalid(e.0)
    }
}

/// Result type of the services.
pub type Result<T, E = Error> = std::result::Result<T, E>;
