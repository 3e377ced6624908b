//! The Prometheus text over HTTP (cargo feature `http`): `GET /metrics` on a thread of its
//! own, on `tiny_http`.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use crate::Broker;
use crate::runtime::BrokerInner;

/// Serves `broker`'s [`BrokerStats::to_prometheus`](super::BrokerStats::to_prometheus) at
/// `GET /metrics` on `addr` (port 0 picks a free port: see
/// [`PrometheusServer::local_addr`]); other paths get 404. The server does not keep the broker
/// open: once it is closed, scrapes get 503. It stops when the returned handle is dropped.
pub fn serve_prometheus(broker: &Broker, addr: impl ToSocketAddrs) -> io::Result<PrometheusServer> {
    let server = tiny_http::Server::http(addr).map_err(io::Error::other)?;
    let local_addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("not an IP listener"))?;
    let server = Arc::new(server);
    let broker = broker.downgrade();
    let thread = {
        let server = server.clone();
        std::thread::Builder::new()
            .name("coney-prometheus".into())
            .spawn(move || serve(&server, &broker))?
    };
    Ok(PrometheusServer {
        server,
        thread: Some(thread),
        local_addr,
    })
}

fn serve(server: &tiny_http::Server, broker: &Weak<BrokerInner>) {
    for request in server.incoming_requests() {
        let metrics = request.method() == &tiny_http::Method::Get
            && request.url().split('?').next() == Some("/metrics");
        let response = match (metrics, broker.upgrade()) {
            (false, _) => tiny_http::Response::from_string("not found\n").with_status_code(404),
            (true, Some(b)) if !b.is_closed() => {
                let content_type = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"text/plain; version=0.0.4; charset=utf-8"[..],
                )
                .expect("a valid header");
                tiny_http::Response::from_string(b.stats().to_prometheus())
                    .with_header(content_type)
            }
            (true, _) => tiny_http::Response::from_string("broker closed\n").with_status_code(503),
        };
        // The scraper hung up: nothing to do about it.
        let _ = request.respond(response);
    }
}

/// A running [`serve_prometheus`]; dropping it stops the server.
pub struct PrometheusServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl PrometheusServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
