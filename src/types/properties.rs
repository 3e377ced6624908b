//! The 14 `basic` message properties of AMQP 0-9-1, lapin-style builders.

use serde::{Deserialize, Serialize};

use super::FieldTable;

/// Message properties. Every field is optional, as on the wire.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BasicProperties {
    /// MIME content type.
    pub content_type: Option<String>,
    /// MIME content encoding.
    pub content_encoding: Option<String>,
    /// Application headers (also used by the headers exchange, `CC`/`BCC`, `x-death`, ...).
    pub headers: Option<FieldTable>,
    /// `2` = persistent; anything else = transient.
    pub delivery_mode: Option<u8>,
    /// Message priority, 0-255.
    pub priority: Option<u8>,
    /// Application correlation id (request-reply).
    pub correlation_id: Option<String>,
    /// Address to reply to (request-reply).
    pub reply_to: Option<String>,
    /// Per-message TTL: decimal milliseconds as a string.
    pub expiration: Option<String>,
    /// Application message id.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Message type name.
    pub kind: Option<String>,
    /// Creating user id.
    pub user_id: Option<String>,
    /// Creating application id.
    pub app_id: Option<String>,
    /// Deprecated cluster id.
    pub cluster_id: Option<String>,
}

macro_rules! string_setters {
    ($($field:ident => $with:ident),* $(,)?) => {$(
        #[doc = concat!("Sets `", stringify!($field), "`.")]
        pub fn $with(mut self, value: impl Into<String>) -> Self {
            self.$field = Some(value.into());
            self
        }
    )*};
}

impl BasicProperties {
    string_setters!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        expiration => with_expiration,
        message_id => with_message_id,
        kind => with_kind,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );

    /// Sets the application headers.
    pub fn with_headers(mut self, headers: FieldTable) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Sets the delivery mode (`2` = persistent).
    pub fn with_delivery_mode(mut self, mode: u8) -> Self {
        self.delivery_mode = Some(mode);
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the timestamp (seconds since the Unix epoch).
    pub fn with_timestamp(mut self, timestamp: u64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// Whether the message is persistent (delivery mode 2).
    pub fn is_persistent(&self) -> bool {
        self.delivery_mode == Some(2)
    }

    /// The size of the property list in AMQP 0-9-1's content header (the 2-byte flags
    /// included), checking that every short string fits 255 bytes and the headers can be
    /// encoded (see [`FieldTable::wire_size`]). Bounded whatever the headers hold.
    pub(crate) fn wire_size(&self) -> Result<u64, String> {
        let mut size = 2;
        let mut longest = 0;
        for value in self.short_strings().into_iter().flatten() {
            size += 1 + value.len() as u64;
            longest = longest.max(value.len());
        }
        if longest > 255 {
            return Err(self.short_string_refusal());
        }
        if let Some(headers) = &self.headers {
            size += headers
                .wire_size()
                .map_err(|e| format!("message headers {e}"))?;
        }
        size += u64::from(self.delivery_mode.is_some()) + u64::from(self.priority.is_some());
        size += 8 * u64::from(self.timestamp.is_some());
        Ok(size)
    }

    /// The short-string properties, in flag order.
    #[inline]
    fn short_strings(&self) -> [&Option<String>; 10] {
        [
            &self.content_type,
            &self.content_encoding,
            &self.correlation_id,
            &self.reply_to,
            &self.expiration,
            &self.message_id,
            &self.kind,
            &self.user_id,
            &self.app_id,
            &self.cluster_id,
        ]
    }

    #[cold]
    fn short_string_refusal(&self) -> String {
        const NAMES: [&str; 10] = [
            "content-type",
            "content-encoding",
            "correlation-id",
            "reply-to",
            "expiration",
            "message-id",
            "type",
            "user-id",
            "app-id",
            "cluster-id",
        ];
        let (name, len) = NAMES
            .iter()
            .zip(self.short_strings())
            .find_map(|(name, value)| {
                value
                    .as_ref()
                    .filter(|v| v.len() > 255)
                    .map(|v| (name, v.len()))
            })
            .expect("called only when a short string is over 255 bytes");
        format!("property {name} is {len} bytes; at most 255 allowed")
    }

    /// Drops the properties without recursing into the headers (see
    /// [`FieldTable::dismantle`]).
    pub(crate) fn dismantle(mut self) {
        if let Some(headers) = self.headers.take() {
            headers.dismantle();
        }
    }
}
