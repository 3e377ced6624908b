//! Request-reply with `coney::rpc`: round trips in both reply modes, many callers at once,
//! timeouts, late / duplicate / unknown replies, direct reply-to's rules, the reply queue's
//! lifetime, servers that die or fail, and unroutable requests.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use common::*;
use coney::rpc::{Handled, PendingReply};
use coney::*;

const MODES: [ReplyMode; 2] = [ReplyMode::DirectReplyTo, ReplyMode::ReplyQueue];

/// What the tests' servers answer: `re:` and the request's body.
fn echo(request: &Delivery) -> Result<Response, Infallible> {
    Ok(Response::new(format!("re:{}", body(request))))
}

fn reply_text(reply: &Reply) -> String {
    String::from_utf8(reply.body().to_vec()).expect("test bodies are UTF-8")
}

fn server(ch: &Channel, queue: &str) -> RpcServer {
    RpcServer::new(ch, queue, RpcServerOptions::default()).expect("a server on an open channel")
}

/// Answers the next request waiting in `queue` (fetched with `basic_get` on the server's
/// channel) with `echo`.
fn answer_next(server: &RpcServer) -> Handled {
    let request = get(server.channel(), server.queue()).expect("a request is waiting");
    server
        .handle(&request, echo)
        .expect("the reply is published")
}

fn send<'a>(client: &'a RpcClient, queue: &str, body: &str) -> PendingReply<'a> {
    client
        .send("", queue, body, BasicProperties::default())
        .unwrap_or_else(|e| panic!("sending '{body}': {e}"))
}

/// A round trip through a server running `serve` on another thread, in both modes: the reply
/// carries the request's correlation id, both sides count one call, and `serve` returns `Ok`
/// once cancelled.
#[test]
fn a_call_gets_its_reply_in_both_modes() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let server = server(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        assert_eq!(client.mode(), mode);
        std::thread::scope(|s| {
            let serving = s.spawn(|| server.serve(echo));
            let properties = BasicProperties::default().with_correlation_id("mine");
            let reply = client.call("", "rpc", "ping", properties, WAIT).unwrap();
            assert_eq!(reply_text(&reply), "re:ping", "{mode:?}");
            assert_ne!(reply.correlation_id(), "mine", "the client sets its own id");
            assert!(!reply.correlation_id().is_empty());
            assert_eq!(
                reply.properties().correlation_id.as_deref(),
                Some(reply.correlation_id())
            );
            server.cancel().unwrap();
            serving
                .join()
                .unwrap()
                .expect("serve ends cleanly when cancelled");
        });
        let stats = client.stats();
        assert_eq!((stats.calls, stats.replies), (1, 1), "{mode:?}");
        assert_eq!(
            stats,
            RpcStats {
                calls: 1,
                replies: 1,
                ..Default::default()
            }
        );
        let served = server.stats();
        assert_eq!((served.handled, served.replied, served.failed), (1, 1, 0));
        assert_eq!(ready(&ch, "rpc"), 0, "the request was acked");
        broker.check_invariants().unwrap();
    }
}

/// Direct reply-to needs the reply consumer before the first request: the client consumes
/// when it is made, so a request right after construction is accepted (not RabbitMQ's 406
/// `fast reply consumer does not exist`) and carries the channel's own address.
#[test]
fn direct_reply_to_consumes_before_the_first_request() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo).unwrap();
    assert_eq!(client.reply_to(), "amq.rabbitmq.reply-to");
    let pending = send(&client, "rpc", "first");
    assert!(!client.channel().is_closed());
    let request = get(&ch, "rpc").unwrap();
    let address = request.properties().reply_to.clone().unwrap();
    assert!(address.starts_with("amq.rabbitmq.reply-to."), "{address}");
    assert_eq!(
        request.properties().correlation_id.as_deref(),
        Some(pending.correlation_id())
    );
    server(&ch, "rpc").handle(&request, echo).unwrap();
    assert_eq!(reply_text(&pending.wait(WAIT).unwrap()), "re:first");
    broker.check_invariants().unwrap();
}

/// One thread with several requests in flight: each wait, in any order, gets its own reply,
/// including replies received while waiting for another. No threads at all.
#[test]
fn pending_replies_are_sorted_by_correlation_id_on_one_thread() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let server = server(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let a = send(&client, "rpc", "a");
        let b = send(&client, "rpc", "b");
        let c = send(&client, "rpc", "c");
        assert_ne!(a.correlation_id(), b.correlation_id());
        for _ in 0..3 {
            assert_eq!(answer_next(&server), Handled::Replied);
        }
        // `c` is waited for first: the replies to `a` and `b` arrive before it and are kept.
        assert_eq!(reply_text(&c.wait(WAIT).unwrap()), "re:c", "{mode:?}");
        assert_eq!(reply_text(&a.wait(WAIT).unwrap()), "re:a");
        assert_eq!(reply_text(&b.wait(WAIT).unwrap()), "re:b");
        let stats = client.stats();
        assert_eq!(
            (stats.calls, stats.replies, stats.late, stats.unknown),
            (3, 3, 0, 0)
        );
        broker.check_invariants().unwrap();
    }
}

/// Many callers on several threads share one client; two servers on their own connections
/// answer. Every caller gets the reply to its own request, and nothing is dropped.
#[test]
fn concurrent_callers_each_get_their_own_reply() {
    const THREADS: usize = 8;
    const CALLS: usize = 50;
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let server_conns = [broker.connect(), broker.connect()];
        let servers: Vec<RpcServer> = server_conns
            .iter()
            .map(|c| server(&c.channel().unwrap(), "rpc"))
            .collect();
        std::thread::scope(|s| {
            let serving: Vec<_> = servers
                .iter()
                .map(|srv| s.spawn(|| srv.serve(echo)))
                .collect();
            let callers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let client = &client;
                    s.spawn(move || {
                        for i in 0..CALLS {
                            let request = format!("{t}-{i}");
                            let reply = client
                                .call("", "rpc", request.as_str(), Default::default(), WAIT)
                                .unwrap_or_else(|e| panic!("call {request}: {e}"));
                            assert_eq!(reply_text(&reply), format!("re:{request}"));
                        }
                    })
                })
                .collect();
            for caller in callers {
                caller.join().unwrap();
            }
            for srv in &servers {
                srv.cancel().unwrap();
            }
            for serve in serving {
                serve.join().unwrap().unwrap();
            }
        });
        let n = (THREADS * CALLS) as u64;
        let stats = client.stats();
        assert_eq!(
            stats,
            RpcStats {
                calls: n,
                replies: n,
                ..Default::default()
            },
            "{mode:?}"
        );
        let replied: u64 = servers.iter().map(|s| s.stats().replied).sum();
        assert_eq!(replied, n);
        broker.check_invariants().unwrap();
    }
}

/// Without a server a call times out after about its timeout, with its correlation id; the
/// client works afterwards.
#[test]
fn a_call_nobody_answers_times_out_and_the_client_still_works() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let timeout = Duration::from_millis(50);
        let started = Instant::now();
        let err = client
            .call("", "rpc", "lost", Default::default(), timeout)
            .unwrap_err();
        let elapsed = started.elapsed();
        let RpcError::Timeout {
            correlation_id,
            waited,
        } = err
        else {
            panic!("expected a timeout, got {err:?}");
        };
        assert!(
            waited >= timeout && elapsed >= timeout,
            "{waited:?} {elapsed:?}"
        );
        assert!(
            elapsed < WAIT,
            "gave up long after its timeout: {elapsed:?}"
        );
        let request = get(&ch, "rpc").expect("the request was published");
        assert_eq!(
            request.properties().correlation_id.as_deref(),
            Some(&*correlation_id)
        );
        request.ack(Default::default()).unwrap();

        let server = server(&ch, "rpc");
        std::thread::scope(|s| {
            let serving = s.spawn(|| server.serve(echo));
            let reply = client
                .call("", "rpc", "again", Default::default(), WAIT)
                .unwrap();
            assert_eq!(reply_text(&reply), "re:again");
            server.cancel().unwrap();
            serving.join().unwrap().unwrap();
        });
        let stats = client.stats();
        assert_eq!(
            (stats.calls, stats.replies, stats.timeouts),
            (2, 1, 1),
            "{mode:?}"
        );
        broker.check_invariants().unwrap();
    }
}

/// A server answers after the caller gave up: the reply counts as late and is not handed to
/// the next call, which gets its own reply.
#[test]
fn a_reply_after_the_timeout_is_late_and_not_given_to_the_next_call() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let server = server(&ch, "rpc");
        let (timed_out, gave_up) = crossbeam_channel::bounded::<()>(1);
        std::thread::scope(|s| {
            let slow = s.spawn(|| {
                let mut requests = server.consume().unwrap();
                let first = requests.recv_timeout(WAIT).expect("the first request");
                gave_up.recv_timeout(WAIT).expect("the caller gives up");
                server.handle(&first, echo).unwrap();
                let second = requests.recv_timeout(WAIT).expect("the second request");
                server.handle(&second, echo).unwrap();
            });
            let err = client
                .call(
                    "",
                    "rpc",
                    "first",
                    Default::default(),
                    Duration::from_millis(30),
                )
                .unwrap_err();
            assert!(matches!(err, RpcError::Timeout { .. }), "{err:?}");
            timed_out.send(()).unwrap();
            let reply = client
                .call("", "rpc", "second", Default::default(), WAIT)
                .unwrap();
            assert_eq!(reply_text(&reply), "re:second", "{mode:?}");
            slow.join().unwrap();
        });
        let stats = client.stats();
        assert_eq!(
            (stats.replies, stats.timeouts, stats.late),
            (1, 1, 1),
            "{mode:?}"
        );
        assert_eq!((stats.duplicate, stats.unknown), (0, 0));
        broker.check_invariants().unwrap();
    }
}

/// A pending reply dropped without waiting gives the call up: its reply counts as late.
#[test]
fn a_reply_to_a_dropped_pending_reply_is_late() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo).unwrap();
    let server = server(&ch, "rpc");
    drop(send(&client, "rpc", "dropped"));
    let kept = send(&client, "rpc", "kept");
    answer_next(&server);
    answer_next(&server);
    assert_eq!(reply_text(&kept.wait(WAIT).unwrap()), "re:kept");
    assert_eq!(client.stats().late, 1);
    broker.check_invariants().unwrap();
}

/// A server that answers twice: the second reply is a duplicate, dropped.
#[test]
fn a_second_reply_is_a_duplicate() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let server = server(&ch, "rpc");
        let first = send(&client, "rpc", "once");
        let request = get(&ch, "rpc").unwrap();
        server.handle(&request, echo).unwrap();
        let reply_to = request.properties().reply_to.clone().unwrap();
        let again =
            BasicProperties::default().with_correlation_id(first.correlation_id().to_owned());
        ch.basic_publish("", &reply_to, Default::default(), b"re:once, again", again)
            .unwrap();
        assert_eq!(reply_text(&first.wait(WAIT).unwrap()), "re:once");
        // The duplicate is seen by the next caller that receives: it gets its own reply.
        let next = send(&client, "rpc", "next");
        answer_next(&server);
        assert_eq!(reply_text(&next.wait(WAIT).unwrap()), "re:next", "{mode:?}");
        let stats = client.stats();
        assert_eq!(
            (stats.replies, stats.duplicate, stats.late, stats.unknown),
            (2, 1, 0, 0)
        );
        broker.check_invariants().unwrap();
    }
}

/// Replies published straight to the client's reply address with a made-up correlation id,
/// none, or one of the client's shape it never issued: counted unknown, dropped, and the
/// waiting call still gets its own reply.
#[test]
fn replies_with_unknown_correlation_ids_are_dropped() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let server = server(&ch, "rpc");
        let pending = send(&client, "rpc", "mine");
        let request = get(&ch, "rpc").unwrap();
        let reply_to = request.properties().reply_to.clone().unwrap();
        if mode == ReplyMode::ReplyQueue {
            assert_eq!(reply_to, client.reply_to());
        }
        let (prefix, _) = pending.correlation_id().rsplit_once('.').unwrap();
        let never_issued = format!("{prefix}.999999");
        let forged = [
            BasicProperties::default().with_correlation_id("made-up"),
            BasicProperties::default(),
            BasicProperties::default().with_correlation_id(never_issued),
        ];
        for properties in forged {
            ch.basic_publish("", &reply_to, Default::default(), b"forged", properties)
                .unwrap();
        }
        server.handle(&request, echo).unwrap();
        assert_eq!(
            reply_text(&pending.wait(WAIT).unwrap()),
            "re:mine",
            "{mode:?}"
        );
        let stats = client.stats();
        assert_eq!(
            (stats.replies, stats.unknown, stats.late, stats.duplicate),
            (1, 3, 0, 0)
        );
        broker.check_invariants().unwrap();
    }
}

/// Direct reply-to keeps nothing: a reply to a client that is gone is dropped by the broker;
/// the server's publish still succeeds and nothing is left in any queue.
#[test]
fn a_reply_to_a_dropped_direct_reply_to_client_is_dropped() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo).unwrap();
    drop(send(&client, "rpc", "orphan"));
    drop(client);
    let server = server(&ch, "rpc");
    let request = get(&ch, "rpc").unwrap();
    let address = request.properties().reply_to.clone().unwrap();
    assert!(
        !queue_exists(&broker, &address),
        "the address went with the client"
    );
    assert_eq!(server.handle(&request, echo).unwrap(), Handled::Replied);
    assert_eq!(server.stats().replied, 1);
    assert_eq!(ready(&ch, "rpc"), 0);
    assert!(!ch.is_closed());
    broker.check_invariants().unwrap();
}

/// The reply queue is server-named, exclusive (another connection cannot consume it: 405)
/// and auto-delete: it is gone once the client is dropped, and a reply to it then goes
/// nowhere.
#[test]
fn the_reply_queue_is_exclusive_and_goes_with_the_client() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let client = RpcClient::new(&conn, ReplyMode::ReplyQueue).unwrap();
    let queue = client.reply_to().to_owned();
    assert!(queue.starts_with("amq.gen-"), "{queue}");
    let declared = passive(&ch, &queue).unwrap();
    assert_eq!((declared.message_count, declared.consumer_count), (0, 1));

    let other = broker.connect();
    let stranger = other.channel().unwrap();
    let consume = stranger.basic_consume(&queue, "", Default::default(), FieldTable::new());
    channel_error(consume.map(drop), ReplyCode::ResourceLocked, None);

    drop(send(&client, "rpc", "orphan"));
    drop(client);
    assert!(
        !queue_exists(&broker, &queue),
        "auto-deleted with its consumer"
    );
    let server = server(&ch, "rpc");
    assert_eq!(answer_next(&server), Handled::Replied);
    assert_eq!(ready(&ch, "rpc"), 0);
    broker.check_invariants().unwrap();
}

/// A server whose connection closes after it received a request, before replying: the
/// request is requeued and a second server answers it; the caller gets exactly one reply.
#[test]
fn a_request_of_a_server_that_died_is_answered_by_another() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let doomed_conn = broker.connect();
        let doomed = server(&doomed_conn.channel().unwrap(), "rpc");
        let mut doomed_requests = doomed.consume().unwrap();
        let survivor = server(&broker.connect().channel().unwrap(), "rpc");
        std::thread::scope(|s| {
            let caller = s.spawn(|| client.call("", "rpc", "once", Default::default(), WAIT));
            let request = doomed_requests.recv_timeout(WAIT).expect("the request");
            assert!(!request.redelivered());
            drop(request);
            doomed_conn.close(); // dies before replying
            let serving = s.spawn(|| {
                survivor.serve(|request: &Delivery| {
                    assert!(request.redelivered(), "the requeued request");
                    echo(request)
                })
            });
            let reply = caller.join().unwrap().unwrap();
            assert_eq!(reply_text(&reply), "re:once", "{mode:?}");
            survivor.cancel().unwrap();
            serving.join().unwrap().unwrap();
        });
        assert_eq!(doomed.stats().replied, 0);
        assert_eq!(survivor.stats().replied, 1);
        let stats = client.stats();
        assert_eq!((stats.calls, stats.replies, stats.duplicate), (1, 1, 0));
        assert_eq!(ready(&ch, "rpc"), 0);
        broker.check_invariants().unwrap();
    }
}

/// A handler error rejects the request without requeue by default: it is dead-lettered to
/// the queue's DLX; the caller gets no reply. With `requeue_on_error` it goes back instead.
#[test]
fn a_handler_error_rejects_the_request() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc.failed");
    let args = FieldTable::new()
        .with("x-dead-letter-exchange", "")
        .with("x-dead-letter-routing-key", "rpc.failed");
    declare_args(&ch, "rpc", args);
    let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo).unwrap();
    let server = server(&ch, "rpc");
    let fail = |_: &Delivery| Err::<Response, _>("no such account");

    let pending = send(&client, "rpc", "doomed");
    let request = get(&ch, "rpc").unwrap();
    assert_eq!(server.handle(&request, fail).unwrap(), Handled::Failed);
    let dead = get(&ch, "rpc.failed").expect("dead-lettered");
    assert_eq!(body(&dead), "doomed");
    assert_eq!(text(&death(&dead, 0), "reason"), Some("rejected"));
    let err = pending.wait(Duration::from_millis(20)).unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err:?}");
    assert_eq!(
        server.stats(),
        RpcServerStats {
            handled: 1,
            failed: 1,
            ..Default::default()
        }
    );

    let options = RpcServerOptions {
        requeue_on_error: true,
        ..Default::default()
    };
    let requeuing = RpcServer::new(&ch, "rpc", options).unwrap();
    drop(send(&client, "rpc", "again"));
    let request = get(&ch, "rpc").unwrap();
    assert_eq!(requeuing.handle(&request, fail).unwrap(), Handled::Failed);
    let back = get(&ch, "rpc").expect("requeued");
    assert!(back.redelivered());
    assert_eq!(body(&back), "again");
    broker.check_invariants().unwrap();
}

/// A request without `reply_to` cannot be answered: acked, counted, the handler not called.
#[test]
fn a_request_without_reply_to_is_acked_unanswered() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "rpc");
    publish(&ch, "", "rpc", "fire and forget");
    let server = server(&ch, "rpc");
    let request = get(&ch, "rpc").unwrap();
    let handled = server
        .handle(&request, |_: &Delivery| -> Result<Response, Infallible> {
            panic!("the handler must not run")
        })
        .unwrap();
    assert_eq!(handled, Handled::Unanswerable);
    assert_eq!(
        server.stats(),
        RpcServerStats {
            handled: 1,
            unanswerable: 1,
            ..Default::default()
        }
    );
    assert_eq!(ready(&ch, "rpc"), 0);
    broker.check_invariants().unwrap();
}

/// Requests are mandatory: one no queue takes fails at once, not after the timeout, and the
/// client goes on working.
#[test]
fn an_unroutable_request_fails_fast() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        declare_exchange(&ch, "requests", ExchangeKind::Direct);
        let client = RpcClient::new(&conn, mode).unwrap();
        let started = Instant::now();
        for (exchange, key) in [("", "no-such-queue"), ("requests", "unbound")] {
            let err = client
                .call(exchange, key, "lost", Default::default(), WAIT)
                .unwrap_err();
            match err {
                RpcError::Unroutable {
                    exchange: e,
                    routing_key,
                    ..
                } => {
                    assert_eq!((e.as_str(), routing_key.as_str()), (exchange, key));
                }
                other => panic!("expected unroutable, got {other:?}"),
            }
        }
        assert!(started.elapsed() < WAIT / 2, "{:?}", started.elapsed());
        assert!(client.send("", "nowhere", "x", Default::default()).is_err());
        let server = server(&ch, "rpc");
        let pending = send(&client, "rpc", "routable");
        answer_next(&server);
        assert_eq!(reply_text(&pending.wait(WAIT).unwrap()), "re:routable");
        let stats = client.stats();
        assert_eq!(
            (stats.calls, stats.unroutable, stats.replies),
            (4, 3, 1),
            "{mode:?}"
        );
        broker.check_invariants().unwrap();
    }
}

/// The client's connection closes while a caller waits: the call fails with `Closed` (and
/// the cause) at once, not at its timeout; later calls fail too.
#[test]
fn closing_the_clients_connection_ends_waiting_calls() {
    for mode in MODES {
        let (broker, _conn, ch) = setup();
        declare(&ch, "rpc");
        let client_conn = broker.connect();
        let client = RpcClient::new(&client_conn, mode).unwrap();
        let mut requests = consume(&ch, "rpc", "watch");
        let started = Instant::now();
        std::thread::scope(|s| {
            let caller = s.spawn(|| client.call("", "rpc", "q", Default::default(), WAIT * 2));
            requests
                .recv_timeout(WAIT)
                .expect("the request was published");
            client_conn.close();
            let err = caller.join().unwrap().unwrap_err();
            match err {
                RpcError::Closed { cause: Some(cause) } => {
                    assert!(matches!(*cause, CloseCause::Connection(_)), "{cause:?}")
                }
                other => panic!("expected Closed with a cause, got {other:?}"),
            }
        });
        assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
        let err = client
            .call("", "rpc", "q2", Default::default(), WAIT)
            .unwrap_err();
        assert!(matches!(err, RpcError::Closed { .. }), "{err:?}");
        broker.check_invariants().unwrap();
    }
}

/// The broker's close also ends a waiting call at once.
#[test]
fn closing_the_broker_ends_waiting_calls() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let client = RpcClient::new(&conn, ReplyMode::ReplyQueue).unwrap();
    let mut requests = consume(&ch, "rpc", "watch");
    let started = Instant::now();
    std::thread::scope(|s| {
        let caller = s.spawn(|| client.call("", "rpc", "q", Default::default(), WAIT * 2));
        requests
            .recv_timeout(WAIT)
            .expect("the request was published");
        broker.close().unwrap();
        let err = caller.join().unwrap().unwrap_err();
        match err {
            RpcError::Closed { cause: Some(cause) } => assert!(cause.is_broker_closed()),
            other => panic!("expected Closed by the broker, got {other:?}"),
        }
    });
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
}

/// Hand-over when the leader's own reply arrives: caller A waits first (and so receives),
/// then B waits; A's reply is sent and A returns; B's reply is sent only after that, so B
/// must have taken the consumer over to get it.
#[test]
fn the_next_caller_takes_over_when_the_leaders_reply_arrives() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        let client = RpcClient::new(&conn, mode).unwrap();
        let options = RpcServerOptions {
            prefetch_count: 2,
            ..Default::default()
        };
        let server = RpcServer::new(&ch, "rpc", options).unwrap();
        let mut requests = server.consume().unwrap();
        std::thread::scope(|s| {
            let a = s.spawn(|| client.call("", "rpc", "a", Default::default(), WAIT));
            let request_a = requests.recv_timeout(WAIT).expect("request a");
            let b = s.spawn(|| client.call("", "rpc", "b", Default::default(), WAIT));
            let request_b = requests.recv_timeout(WAIT).expect("request b");
            server.handle(&request_a, echo).unwrap();
            assert_eq!(reply_text(&a.join().unwrap().unwrap()), "re:a");
            server.handle(&request_b, echo).unwrap();
            assert_eq!(reply_text(&b.join().unwrap().unwrap()), "re:b", "{mode:?}");
        });
        assert_eq!(client.stats().replies, 2);
        broker.check_invariants().unwrap();
    }
}

/// Hand-over when the leader times out: A waits first on a request nobody answers and gives
/// up; B, waiting meanwhile, takes the consumer over and gets the reply sent after that.
#[test]
fn the_next_caller_takes_over_when_the_leader_times_out() {
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        declare(&ch, "void");
        let client = RpcClient::new(&conn, mode).unwrap();
        let server = server(&ch, "rpc");
        let mut requests = server.consume().unwrap();
        let mut void = consume(&ch, "void", "void");
        let short = Duration::from_millis(100);
        std::thread::scope(|s| {
            let a = s.spawn(|| client.call("", "void", "a", Default::default(), short));
            void.recv_timeout(WAIT).expect("request a");
            let b = s.spawn(|| client.call("", "rpc", "b", Default::default(), WAIT));
            let request_b = requests.recv_timeout(WAIT).expect("request b");
            let err = a.join().unwrap().unwrap_err();
            assert!(matches!(err, RpcError::Timeout { .. }), "{err:?}");
            server.handle(&request_b, echo).unwrap();
            assert_eq!(reply_text(&b.join().unwrap().unwrap()), "re:b", "{mode:?}");
        });
        let stats = client.stats();
        assert_eq!((stats.replies, stats.timeouts), (1, 1));
        broker.check_invariants().unwrap();
    }
}

/// Callers on several threads mix calls nobody answers (short timeouts) with answered calls:
/// leaders keep timing out while others wait, so the consumer changes hands again and again.
/// Every answered call gets its own reply, every other one times out, none waits much past its
/// timeout.
#[test]
fn callers_timing_out_between_answered_calls_hand_the_consumer_over() {
    const THREADS: usize = 6;
    const ROUNDS: usize = 30;
    let short = Duration::from_millis(3);
    for mode in MODES {
        let (broker, conn, ch) = setup();
        declare(&ch, "rpc");
        declare(&ch, "void");
        let client = RpcClient::new(&conn, mode).unwrap();
        let server = server(&broker.connect().channel().unwrap(), "rpc");
        std::thread::scope(|s| {
            let serving = s.spawn(|| server.serve(echo));
            let callers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let client = &client;
                    s.spawn(move || {
                        for i in 0..ROUNDS {
                            let request = format!("{t}-{i}");
                            if (t + i) % 2 == 0 {
                                let started = Instant::now();
                                let r = client.call(
                                    "",
                                    "void",
                                    request.as_str(),
                                    Default::default(),
                                    short,
                                );
                                assert!(matches!(r, Err(RpcError::Timeout { .. })), "{r:?}");
                                assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
                            } else {
                                let reply = client
                                    .call("", "rpc", request.as_str(), Default::default(), WAIT)
                                    .unwrap_or_else(|e| panic!("call {request}: {e}"));
                                assert_eq!(reply_text(&reply), format!("re:{request}"));
                            }
                        }
                    })
                })
                .collect();
            for caller in callers {
                caller.join().unwrap();
            }
            server.cancel().unwrap();
            serving.join().unwrap().unwrap();
        });
        let half = (THREADS * ROUNDS / 2) as u64;
        let stats = client.stats();
        assert_eq!((stats.replies, stats.timeouts), (half, half), "{mode:?}");
        assert_eq!((stats.late, stats.duplicate, stats.unknown), (0, 0, 0));
        broker.check_invariants().unwrap();
    }
}

/// `serve` ends with an error when the broker closes its channel, not only when the
/// application does.
#[test]
fn serve_reports_a_close_it_did_not_ask_for() {
    let (broker, _conn, ch) = setup();
    declare(&ch, "rpc");
    let server = server(&ch, "rpc");
    let client = RpcClient::new(&broker.connect(), ReplyMode::DirectReplyTo).unwrap();
    std::thread::scope(|s| {
        let serving = s.spawn(|| server.serve(echo));
        // One answered call: `serve` is consuming.
        client
            .call("", "rpc", "up?", Default::default(), WAIT)
            .unwrap();
        broker.close().unwrap();
        let err = serving.join().unwrap().unwrap_err();
        assert!(err.is_broker_closed(), "{err:?}");
    });
}

/// A reply the broker refuses is never followed by the ack: refused with a channel error
/// (a `user_id` that is not the connection's), the channel closes and the request goes back
/// to its queue; refused alone (a property over 255 bytes), the request is rejected as for a
/// handler error rather than left unacked.
#[test]
fn a_refused_reply_leaves_the_request_unacked_or_rejected() {
    let (broker, conn, ch) = setup();
    declare(&ch, "rpc");
    let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo).unwrap();
    let server_ch = conn.channel().unwrap();
    let server = server(&server_ch, "rpc");

    drop(send(&client, "rpc", "impostor"));
    let request = get(&server_ch, "rpc").unwrap();
    let impostor = |_: &Delivery| {
        let properties = BasicProperties::default().with_user_id("mallory");
        Ok::<_, Infallible>(Response::new("x").with_properties(properties))
    };
    let err = server.handle(&request, impostor).unwrap_err();
    assert_eq!(
        err.reply_code(),
        Some(ReplyCode::PreconditionFailed),
        "{err:?}"
    );
    assert!(server_ch.is_closed());
    assert_eq!(ready(&ch, "rpc"), 1, "requeued with the closed channel");
    assert_eq!(server.stats().replied, 0);

    let server = server_of_new_channel(&conn);
    let request = get(server.channel(), "rpc").unwrap();
    let oversized = |_: &Delivery| {
        let properties = BasicProperties::default().with_content_type("x".repeat(300));
        Ok::<_, Infallible>(Response::new("x").with_properties(properties))
    };
    let err = server.handle(&request, oversized).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(!server.channel().is_closed());
    assert_eq!(ready(&ch, "rpc"), 0, "rejected, not requeued");
    assert_eq!(
        server.stats(),
        RpcServerStats {
            handled: 1,
            failed: 1,
            ..Default::default()
        }
    );
    broker.check_invariants().unwrap();
}

fn server_of_new_channel(conn: &Connection) -> RpcServer {
    server(&conn.channel().unwrap(), "rpc")
}
