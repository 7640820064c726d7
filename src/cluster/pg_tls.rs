//! TLS for the metadata database: the one rustls setup every connection of a `Db` uses (the
//! pool's and the dedicated LISTEN one), and the recognition of a server certificate that
//! failed verification, so that failure says what to fix. Whether TLS is used at all is the
//! connection string's `sslmode` (`disable`, `prefer`, `require`); when it is, the server's
//! certificate is always verified against the host name in the connection string: there is no
//! mode that accepts any certificate, since that would hand the credentials to whoever sits in
//! the path.

use tokio_postgres::Socket;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a `Db` wraps its connections.
pub type Tls = MakeRustlsConnect;

/// The stream of a connection opened with `Tls` (TLS or not, as `sslmode` and the server
/// decided).
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// The connector trusting `roots` (the operator's own CAs), or the web PKI's roots when the
/// operator names none: a database with a publicly trusted certificate needs no setup.
pub fn connector(roots: Option<&rustls::RootCertStore>) -> Tls {
    let roots = roots.cloned().unwrap_or_else(|| rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    });
    MakeRustlsConnect::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The certificate verification failure somewhere in `error`'s chain of causes, if that is
/// what ended the connection attempt. rustls reports it inside an `io::Error` from the
/// handshake, which hides it from `source()`: each `io::Error` is looked into.
pub fn certificate_failure<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(rustls @ rustls::Error::InvalidCertificate(_)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return Some(rustls);
            }
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_certificate_failure_inside_an_io_error() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error.clone());
        assert_eq!(certificate_failure(&io), Some(&rustls_error));
        assert_eq!(certificate_failure(&rustls_error), Some(&rustls_error));
    }

    #[test]
    fn other_failures_are_not_certificate_failures() {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(certificate_failure(&io), None);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_failure(&refused), None);
    }
}
