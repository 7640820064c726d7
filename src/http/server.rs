//! Listening sockets and connection lifecycle: HTTP/1.1 and HTTP/2 on one port, over TLS when
//! configured (hyper-util's auto builder; h2c for plain HTTP), header-read timeouts (slowloris), TCP_NODELAY, and graceful shutdown: stop
//! accepting, let in-flight requests finish up to the configured timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::App;

/// Longest a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(256 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let app = app.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = app.tls.as_ref().map(|t| t.acceptor());
                    let svc = {
                        let app = app.clone();
                        hyper::service::service_fn(move |req| {
                            // Boxed: the request future is large (every handler's state), and
                            // hyper moves it several times per request; a box moves as a pointer.
                            let fut = Box::pin(super::handle(app.clone(), req, peer));
                            async move { Ok::<_, std::convert::Infallible>(fut.await) }
                        })
                    };
                    match tls {
                        None => {
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).into_owned();
                            let _ = watcher.watch(conn).await;
                        }
                        Some(acceptor) => {
                            // The handshake is bounded like header reads: no slowloris here.
                            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            // HTTP/2 (chosen by ALPN) batches its small responses' writes.
                            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                                let io = TokioIo::new(super::coalesce::Coalesce::new(stream));
                                let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
                                let _ = watcher.watch(conn).await;
                            } else {
                                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
                                let _ = watcher.watch(conn).await;
                            }
                        }
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let timeout = app.config.server.shutdown_timeout.0;
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(timeout) => tracing::warn!(?timeout, "shutdown timeout reached with requests still in flight"),
    }
    Ok(())
}
