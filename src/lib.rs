//! coney: an embedded, in-process message broker engine with RabbitMQ's semantics.

pub mod clock;
pub mod core;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod runtime;
pub mod types;

pub use core::exchange::ExchangeKind;
pub use error::{AmqpError, CloseCause, Error, ReplyCode, Result};
pub use runtime::{
    Broker, BrokerBuilder, Channel, Connection, Consumer, Delivery, GetMessage, Limits,
    QueueDeclareOk, Returned,
};
pub use types::*;
