//! Request-reply: a price service answered by two servers, called from several threads.
//!
//! The servers consume `prices` on connections of their own and run `RpcServer::serve` on a
//! thread each. One client (direct reply-to) is shared by four caller threads; each gets the
//! price of its own item. A second client (with a reply queue of its own) has three requests
//! in flight at once from one thread. An unknown item is answered with an error reply (a
//! `status` header), so its caller learns at once instead of waiting for a timeout; a request
//! to a queue nobody declared fails at once as unroutable.
//!
//! `cargo run --example rpc`

use std::convert::Infallible;
use std::time::Duration;

use coney::*;

/// How long a call waits for its reply.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the example; public so that `tests/examples.rs` runs it too.
pub fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::in_memory();
    let conn = broker.connect();
    let ch = conn.channel()?;
    ch.queue_declare("prices", QueueDeclareOptions::default(), FieldTable::new())?;

    let server_conns = [broker.connect(), broker.connect()];
    let servers = server_conns
        .iter()
        .map(|c| RpcServer::new(&c.channel()?, "prices", RpcServerOptions::default()))
        .collect::<Result<Vec<_>>>()?;
    let client = RpcClient::new(&conn, ReplyMode::DirectReplyTo)?;
    let batch_client = RpcClient::new(&conn, ReplyMode::ReplyQueue)?;

    std::thread::scope(|s| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let serving: Vec<_> = servers
            .iter()
            .map(|srv| s.spawn(|| srv.serve(price)))
            .collect();

        // Four callers share one client: each gets the reply to its own request.
        let callers: Vec<_> = ["apple", "pear", "plum", "kiwi"]
            .into_iter()
            .map(|item| {
                let client = &client;
                s.spawn(move || {
                    client.call("", "prices", item, BasicProperties::default(), TIMEOUT)
                })
            })
            .collect();
        for caller in callers {
            let reply = caller.join().expect("a caller does not panic")?;
            println!("{}", String::from_utf8_lossy(reply.body()));
        }

        // Three requests in flight from this thread, waited for in any order.
        let pending = ["fig", "mango", "lime"]
            .into_iter()
            .map(|item| batch_client.send("", "prices", item, BasicProperties::default()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for p in pending.into_iter().rev() {
            let reply = p.wait(TIMEOUT)?;
            let status = reply
                .properties()
                .headers
                .as_ref()
                .and_then(|h| h.get("status"));
            let failed = status.and_then(FieldValue::as_str) == Some("error");
            let tag = if failed { " (error reply)" } else { "" };
            println!("{}{tag}", String::from_utf8_lossy(reply.body()));
        }

        // No queue takes it: the broker returns the request and the call fails at once.
        match client.call(
            "",
            "no-such-service",
            "x",
            BasicProperties::default(),
            TIMEOUT,
        ) {
            Err(RpcError::Unroutable { routing_key, .. }) => {
                println!("no service behind '{routing_key}'")
            }
            other => return Err(format!("expected an unroutable request, got {other:?}").into()),
        }

        for srv in &servers {
            srv.cancel()?;
        }
        for serve in serving {
            serve.join().expect("a server does not panic")?;
        }
        Ok(())
    })?;

    let stats = client.stats();
    println!(
        "client: {} calls, {} replies, {} unroutable",
        stats.calls, stats.replies, stats.unroutable
    );
    let handled: u64 = servers.iter().map(|s| s.stats().handled).sum();
    println!("servers: {handled} requests handled");
    assert_eq!(
        (stats.replies, batch_client.stats().replies, handled),
        (4, 3, 7)
    );
    broker.check_invariants()?;
    Ok(())
}

/// The servers' handler: the price of an item, or an error reply for an item it does not
/// know (a reply, not a handler error: a handler error would reject the request and leave
/// its caller waiting until its timeout).
fn price(request: &Delivery) -> std::result::Result<Response, Infallible> {
    let item = String::from_utf8_lossy(request.body());
    let cents = match &*item {
        "apple" => 40,
        "pear" => 55,
        "plum" => 30,
        "kiwi" => 25,
        "fig" => 90,
        "lime" => 20,
        _ => {
            let headers = FieldTable::new().with("status", "error");
            return Ok(Response::new(format!("{item}: unknown item"))
                .with_properties(BasicProperties::default().with_headers(headers)));
        }
    };
    Ok(Response::new(format!("{item}: {cents} cents")))
}
