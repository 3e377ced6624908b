//! Per-method option structs, named and shaped as lapin names them. All implement `Default`.
//! Methods without flags take none: `queue_unbind` has no options struct, as in lapin.

/// Options of `exchange_declare`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeDeclareOptions {
    /// Only check that the exchange exists.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Delete when the last binding with this exchange as source is removed.
    pub auto_delete: bool,
    /// Cannot be published to directly, only through exchange-to-exchange bindings.
    pub internal: bool,
    /// Do not wait for a reply (accepted for compatibility; coney always replies).
    pub nowait: bool,
}

/// Options of `exchange_delete`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeDeleteOptions {
    /// Refuse (406) if the exchange is the source of any binding.
    pub if_unused: bool,
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `queue_declare`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDeclareOptions {
    /// Only check that the queue exists.
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Owned by this connection and deleted when it closes.
    pub exclusive: bool,
    /// Delete when the last consumer is cancelled (if it ever had one).
    pub auto_delete: bool,
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `queue_delete`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDeleteOptions {
    /// Refuse (406) if the queue has consumers.
    pub if_unused: bool,
    /// Refuse (406) if the queue has ready messages.
    pub if_empty: bool,
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `queue_bind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueBindOptions {
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `queue_purge`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuePurgeOptions {
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `exchange_bind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeBindOptions {
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `exchange_unbind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeUnbindOptions {
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `basic_publish`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicPublishOptions {
    /// Return the message to the channel's return handler if no queue receives it.
    pub mandatory: bool,
    /// Not supported by RabbitMQ: `true` is a 540 connection error.
    pub immediate: bool,
}

/// Options of `confirm_select`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfirmSelectOptions {
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `basic_consume`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicConsumeOptions {
    /// Ignored, as by RabbitMQ.
    pub no_local: bool,
    /// Messages are settled when sent; never requeued.
    pub no_ack: bool,
    /// The only consumer of the queue.
    pub exclusive: bool,
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `basic_get`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicGetOptions {
    /// Settle the message when it is fetched.
    pub no_ack: bool,
}

/// Options of `basic_qos`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicQosOptions {
    /// Channel-wide limit shared by all consumers (RabbitMQ <= 4.2 interpretation).
    pub global: bool,
}

/// Options of `basic_ack`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicAckOptions {
    /// Settle every outstanding tag up to and including this one.
    pub multiple: bool,
}

/// Options of `basic_nack`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicNackOptions {
    /// Settle every outstanding tag up to and including this one.
    pub multiple: bool,
    /// Put the message(s) back in the queue instead of dead-lettering or dropping.
    pub requeue: bool,
}

/// Options of `basic_reject`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicRejectOptions {
    /// Put the message back in the queue instead of dead-lettering or dropping.
    pub requeue: bool,
}

/// Options of `basic_cancel`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicCancelOptions {
    /// Accepted for compatibility.
    pub nowait: bool,
}

/// Options of `basic_recover`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasicRecoverOptions {
    /// Requeue every unacked message of the channel; `false` is a 540 as in RabbitMQ.
    pub requeue: bool,
}

impl Default for BasicRecoverOptions {
    fn default() -> Self {
        Self { requeue: true }
    }
}
