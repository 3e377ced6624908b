//! The exchange type a declare asks for, as lapin's `ExchangeKind` names it.

use std::fmt;

/// The type of an exchange in `exchange_declare`: one of the four AMQP 0-9-1 types, or any
/// other type by name.
///
/// coney implements `direct`, `fanout`, `topic` and `headers`. Any other name, including the
/// plugin types RabbitMQ ships (`x-consistent-hash`, `x-delayed-message`, `x-random`,
/// `x-local-random`, `x-modulus-hash`, `x-jms-topic`), gets RabbitMQ's answer to a type no
/// enabled plugin provides: 406 PRECONDITION_FAILED `unknown exchange type '<name>'`, which
/// closes the channel. A test of code that relies on such a plugin fails here as it would on a
/// broker without it, instead of passing with some other routing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    #[default]
    Direct,
    /// Every binding.
    Fanout,
    /// Wildcard patterns over dot-separated words.
    Topic,
    /// Header values against binding arguments (`x-match`).
    Headers,
    /// Any other type, by the name a declare sends (`exchange.declare`'s `type` field).
    Custom(String),
}

impl ExchangeKind {
    /// The type name sent in `exchange.declare`.
    pub fn kind(&self) -> &str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::Custom(name) => name,
        }
    }
}

impl From<&str> for ExchangeKind {
    /// The kind named `name`: one of the four built-in names, or [`ExchangeKind::Custom`].
    fn from(name: &str) -> Self {
        match name {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            other => Self::Custom(other.to_owned()),
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in ["direct", "fanout", "topic", "headers", "x-consistent-hash"] {
            assert_eq!(ExchangeKind::from(name).kind(), name);
        }
        assert_eq!(ExchangeKind::from("topic"), ExchangeKind::Topic);
        assert_eq!(
            ExchangeKind::from("x-delayed-message"),
            ExchangeKind::Custom("x-delayed-message".into())
        );
    }
}
