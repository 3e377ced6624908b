//! The shop's error type: who can fail (the broker, the stores, the input) and how.

/// Why a run, or one service of it, stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The broker refused or failed a call.
    #[error("broker: {0}")]
    Broker(#[from] coney::Error),
    /// A service's sled store failed.
    #[error("store: {0}")]
    Store(#[from] sled::Error),
    /// A stored record did not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A message did not decode (it is rejected, never retried).
    #[error("bad message: {0}")]
    BadMessage(String),
    /// A file-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The flags ask for something this run cannot do.
    #[error("{0}")]
    Usage(String),
    /// A publish was nacked by the broker.
    #[error("the broker nacked a publish of {0}")]
    Nacked(&'static str),
    /// A service thread panicked.
    #[error("service {0} panicked")]
    Panicked(&'static str),
}

impl From<sled::transaction::TransactionError<AppError>> for AppError {
    fn from(e: sled::transaction::TransactionError<AppError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => AppError::Store(e),
        }
    }
}
