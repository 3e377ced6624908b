//! Publisher confirms on the in-memory broker (SEMANTICS.md §8).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use coney::*;

fn ev(tag: u64, multiple: bool, ack: bool) -> ConfirmEvent {
    ConfirmEvent {
        delivery_tag: tag,
        multiple,
        ack,
    }
}

/// §8 (`publisher_confirms_parallel_SUITE:confirm_ack`): the first publish after
/// `confirm.select` is number 1 and is acked; publishes before the select are not numbered.
#[test]
fn publishes_are_numbered_from_one_after_select_and_acked() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "q");
    publish(&ch, "", "q", "before");
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    assert_eq!(ch.next_publish_seq(), 1);
    let rx = ch.confirm_listener();
    publish(&ch, "", "q", "a");
    publish(&ch, "", "q", "b");
    assert_eq!(ch.next_publish_seq(), 3);
    let events: Vec<ConfirmEvent> = rx.try_iter().collect();
    assert_eq!(events, [ev(1, true, true), ev(2, true, true)]);
    assert!(ch.wait_for_confirms().unwrap());
    broker.check_invariants().unwrap();
}

/// §8 (`confirm_unroutable_message`): an unroutable publish without `mandatory` is acked and
/// not returned.
#[test]
fn unroutable_publish_is_acked_without_a_return() {
    let (_broker, _conn, ch) = setup();
    let returned = Arc::new(Mutex::new(0));
    let r = returned.clone();
    ch.set_return_handler(move |_| *r.lock().unwrap() += 1);
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let rx = ch.confirm_listener();
    publish(&ch, "amq.direct", "nowhere", "m");
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [ev(1, true, true)]);
    assert_eq!(*returned.lock().unwrap(), 0);
}

/// §2.7, §8 (`confirm_mandatory_unroutable`): a mandatory unroutable publish is returned first,
/// then acked.
#[test]
fn mandatory_unroutable_is_returned_before_it_is_acked() {
    let (_broker, _conn, ch) = setup();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let rx = ch.confirm_listener();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, rx_in_handler) = (seen.clone(), rx.clone());
    ch.set_return_handler(move |ret| {
        let acked_already = rx_in_handler.try_recv().is_ok();
        s.lock().unwrap().push((ret.reply_code, acked_already));
    });
    let opts = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    ch.basic_publish(
        "amq.direct",
        "nowhere",
        opts,
        b"m".to_vec(),
        BasicProperties::default(),
    )
    .unwrap();
    assert_eq!(*seen.lock().unwrap(), [(ReplyCode::NoRoute, false)]);
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), [ev(1, true, true)]);
}

/// Waiting for confirms on a channel not in confirm mode is refused without closing it.
#[test]
fn waiting_without_confirm_mode_is_an_input_error() {
    let (_broker, _conn, ch) = setup();
    assert!(matches!(
        ch.wait_for_confirms(),
        Err(Error::InvalidInput(_))
    ));
    assert!(!ch.is_closed());
}

/// §8: after a channel error, later waits report the closed channel.
#[test]
fn waiting_on_a_closed_channel_reports_the_cause() {
    let (_broker, _conn, ch) = setup();
    ch.confirm_select(ConfirmSelectOptions::default()).unwrap();
    let _ = ch.basic_publish(
        "missing",
        "k",
        Default::default(),
        b"m".to_vec(),
        Default::default(),
    );
    let err = ch.wait_for_confirms().unwrap_err();
    assert_eq!(err.reply_code(), Some(ReplyCode::NotFound));
}
