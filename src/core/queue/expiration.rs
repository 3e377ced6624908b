//! The `expiration` message property: parsing and validation as RabbitMQ does it.

use crate::core::topology::TTL_MAX_MS;

/// Parses an `expiration` property: the whole string must be a decimal integer of
/// milliseconds in `0..=315_360_000_000`. `Err` carries RabbitMQ's reason term, for the 406
/// text `invalid expiration 'X': REASON`.
pub fn parse_expiration(text: &str) -> Result<u64, String> {
    let negative = text.starts_with('-');
    let start = usize::from(negative);
    let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("no_integer".to_owned());
    }
    let (number, rest) = text.split_at(start + digits);
    if !rest.is_empty() {
        return Err(format!("{{leftover_string,\"{rest}\"}}"));
    }
    // More digits than an i128 holds saturate: far past either bound anyway.
    let value: i128 = number
        .parse()
        .unwrap_or(if negative { i128::MIN } else { i128::MAX });
    if value < 0 {
        return Err(format!("{{value_negative,{number}}}"));
    }
    if value > i128::from(TTL_MAX_MS) {
        return Err(format!("{{value_too_large,{number}}}"));
    }
    u64::try_from(value).map_err(|_| format!("{{value_too_large,{number}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accepted and refused forms, with RabbitMQ's reasons.
    #[test]
    fn expiration_forms() {
        assert_eq!(parse_expiration("0"), Ok(0));
        assert_eq!(parse_expiration("60000"), Ok(60_000));
        assert_eq!(parse_expiration("315360000000"), Ok(315_360_000_000));
        assert_eq!(parse_expiration(""), Err("no_integer".into()));
        assert_eq!(parse_expiration(" 10"), Err("no_integer".into()));
        assert_eq!(parse_expiration("foobar"), Err("no_integer".into()));
        assert_eq!(
            parse_expiration("10000foobar"),
            Err("{leftover_string,\"foobar\"}".into())
        );
        assert_eq!(parse_expiration("-10"), Err("{value_negative,-10}".into()));
        assert_eq!(
            parse_expiration("315360000001"),
            Err("{value_too_large,315360000001}".into())
        );
        assert!(parse_expiration("99999999999999999999999").is_err());
    }
}
