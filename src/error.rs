//! The crate's error type, carrying AMQP reply codes where RabbitMQ would send one.
//!
//! Soft errors (3xx/4xx) close the channel, hard errors (5xx) close the connection, as in
//! RabbitMQ. Once closed, every later call on the channel or connection
//! returns [`Error::ChannelClosed`] / [`Error::ConnectionClosed`] carrying the original cause.

use std::fmt;
use std::sync::Arc;

/// AMQP 0-9-1 reply codes used by the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplyCode {
    /// 312: only as the code of a returned (unroutable, mandatory) message.
    NoRoute,
    /// 320: the broker closed the connection.
    ConnectionForced,
    /// 403.
    AccessRefused,
    /// 404.
    NotFound,
    /// 405.
    ResourceLocked,
    /// 406.
    PreconditionFailed,
    /// 504.
    ChannelError,
    /// 530.
    NotAllowed,
    /// 540.
    NotImplemented,
    /// 541.
    InternalError,
}

impl ReplyCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            ReplyCode::NoRoute => 312,
            ReplyCode::ConnectionForced => 320,
            ReplyCode::AccessRefused => 403,
            ReplyCode::NotFound => 404,
            ReplyCode::ResourceLocked => 405,
            ReplyCode::PreconditionFailed => 406,
            ReplyCode::ChannelError => 504,
            ReplyCode::NotAllowed => 530,
            ReplyCode::NotImplemented => 540,
            ReplyCode::InternalError => 541,
        }
    }

    /// The constant's name as it prefixes reply texts (`NOT_FOUND`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Whether the error closes the whole connection (hard error) rather than the channel.
    pub fn is_hard(self) -> bool {
        self.code() >= 500 || self == ReplyCode::ConnectionForced
    }
}

/// Longest reply text, in bytes (an AMQP short string).
const REPLY_TEXT_BYTES_MAX: usize = 255;
/// What ends a reply text cut to fit.
const ELLIPSIS: &str = "...";

/// An AMQP-level failure: a reply code and RabbitMQ's reply text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpError {
    /// The reply code.
    pub code: ReplyCode,
    /// The reply text, `"<CONSTANT> - <explanation>"` as RabbitMQ formats it.
    pub text: String,
}

impl AmqpError {
    /// Builds an error, prefixing the explanation with the code's constant name.
    pub fn new(code: ReplyCode, explanation: impl fmt::Display) -> Self {
        let mut text = format!("{} - {}", code.name(), explanation);
        if text.len() > REPLY_TEXT_BYTES_MAX {
            // RabbitMQ (rabbit_binary_generator) keeps the first 252 bytes and appends "...";
            // a cut inside a UTF-8 character backs off to its start.
            let mut cut = REPLY_TEXT_BYTES_MAX - ELLIPSIS.len();
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(ELLIPSIS);
        }
        Self { code, text }
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.text)
    }
}

/// Why a channel or connection is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// Closed by the application (`close()` or drop).
    Client,
    /// Closed by the broker because of this error.
    Error(AmqpError),
    /// The connection it belonged to closed.
    Connection(Arc<CloseCause>),
    /// The broker was closed ([`Broker::close`](crate::Broker::close), or its last handle
    /// dropped).
    BrokerClosed,
}

impl CloseCause {
    /// Whether the broker's close is at the root of this cause.
    pub fn is_broker_closed(&self) -> bool {
        match self {
            CloseCause::BrokerClosed => true,
            CloseCause::Connection(c) => c.is_broker_closed(),
            CloseCause::Client | CloseCause::Error(_) => false,
        }
    }
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseCause::Client => f.write_str("closed by the application"),
            CloseCause::Error(e) => write!(f, "{e}"),
            CloseCause::Connection(c) => write!(f, "connection closed: {c}"),
            CloseCause::BrokerClosed => f.write_str("the broker was closed"),
        }
    }
}

/// Every error the broker returns.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A soft error: the broker closed the channel the call was made on.
    #[error("channel error: {0}")]
    Channel(AmqpError),
    /// A hard error: the broker closed the connection the call was made on.
    #[error("connection error: {0}")]
    Connection(AmqpError),
    /// The channel was already closed.
    #[error("channel closed: {0}")]
    ChannelClosed(Arc<CloseCause>),
    /// The connection was already closed.
    #[error("connection closed: {0}")]
    ConnectionClosed(Arc<CloseCause>),
    /// Input the AMQP codec itself would refuse (a name longer than 255 bytes, ...). Nothing is
    /// closed: the call never reached the broker.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The broker was closed ([`Broker::close`](crate::Broker::close), or its last handle
    /// dropped): a call on the broker itself after that. Calls on its connections, channels and
    /// deliveries return [`Error::ConnectionClosed`] / [`Error::ChannelClosed`] with
    /// [`CloseCause::BrokerClosed`] at the root of the cause ([`Error::is_broker_closed`]).
    #[error("the broker was closed")]
    BrokerClosed,
    /// The call waited longer than its timeout.
    #[error("timed out")]
    Timeout,
    /// The durable store failed (or failed earlier and is poisoned), or is damaged: a record
    /// that does not decode, or a store that lost writes or files
    /// ([`StoreError::is_corrupt`](crate::store::StoreError::is_corrupt)). Nothing was made
    /// durable by the call.
    #[error("storage: {0}")]
    Storage(#[from] crate::store::StoreError),
}

impl Error {
    /// The AMQP reply code behind the error, if there is one (also for a closed channel or
    /// connection whose cause was an error).
    pub fn reply_code(&self) -> Option<ReplyCode> {
        match self {
            Error::Channel(e) | Error::Connection(e) => Some(e.code),
            Error::ChannelClosed(cause) | Error::ConnectionClosed(cause) => cause_code(cause),
            _ => None,
        }
    }

    /// Whether the call failed because the broker was closed (on the broker itself, or on a
    /// connection, channel or delivery of a closed broker).
    pub fn is_broker_closed(&self) -> bool {
        match self {
            Error::BrokerClosed => true,
            Error::ChannelClosed(cause) | Error::ConnectionClosed(cause) => {
                cause.is_broker_closed()
            }
            _ => false,
        }
    }

    /// The AMQP error behind this error, if there is one.
    pub fn amqp(&self) -> Option<&AmqpError> {
        match self {
            Error::Channel(e) | Error::Connection(e) => Some(e),
            _ => None,
        }
    }
}

fn cause_code(cause: &CloseCause) -> Option<ReplyCode> {
    match cause {
        CloseCause::Client | CloseCause::BrokerClosed => None,
        CloseCause::Error(e) => Some(e.code),
        CloseCause::Connection(c) => cause_code(c),
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reply_text_keeps_252_bytes_and_an_ellipsis() {
        let e = AmqpError::new(
            ReplyCode::NotFound,
            format!("no queue '{}'", "q".repeat(300)),
        );
        assert_eq!(e.text.len(), 255);
        assert!(e.text.starts_with("NOT_FOUND - no queue 'qqq"));
        assert!(e.text.ends_with("qqq..."));
        let exact = AmqpError::new(ReplyCode::NotFound, "x".repeat(255 - "NOT_FOUND - ".len()));
        assert_eq!(exact.text.len(), 255);
        assert!(!exact.text.ends_with("..."), "255 bytes fit as they are");
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let e = AmqpError::new(ReplyCode::NotFound, "é".repeat(200));
        assert!(e.text.len() <= 255);
        assert!(e.text.ends_with("é..."));
    }
}
