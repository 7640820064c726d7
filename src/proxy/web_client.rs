//! A plain HTTPS-or-HTTP client trusting the public web roots: for peers transship calls that
//! are not upstream registries (notification endpoints, other replicas of a cluster), which
//! need neither the upstream client's resolver guard nor its per-upstream CA files.

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type WebClient<B> = Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// A client speaking HTTP/1.1 and HTTP/2, connecting within `connect_timeout`.
pub fn web_client<B>(connect_timeout: Duration) -> WebClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Client::builder(TokioExecutor::new()).build(https_or_http(
        tls,
        HttpConnector::new(),
        connect_timeout,
    ))
}

/// `http` (with this connect timeout, no Nagle delay) wrapped for `https://` with `tls`, and
/// plain `http://`, both speaking HTTP/1.1 and HTTP/2.
pub fn https_or_http<R>(
    tls: rustls::ClientConfig,
    mut http: HttpConnector<R>,
    connect_timeout: Duration,
) -> hyper_rustls::HttpsConnector<HttpConnector<R>> {
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}
