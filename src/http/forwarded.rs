//! The client's address. It is the TCP peer, unless the peer is a reverse proxy listed in
//! `server.trusted_proxies`: then `X-Forwarded-For` is read from the right (each proxy appends
//! the address it saw) and the first address that is not itself a trusted proxy is the client.
//! Anything a client wrote into the header sits to the left of that and is never believed.
//! Anonymous rights, login throttling and the audit and request log lines all use this
//! address, never the raw peer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;

use crate::config::IpNet;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The most hops walked; a longer chain of trusted proxies is not a real deployment.
const MAX_HOPS: usize = 32;

/// Stands for a client a trusted proxy could not name (`unknown`, garbage, too many hops): an
/// address inside no network but `0.0.0.0/0`, so it never gets loopback's or a LAN's rights.
pub const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// The client of a request that arrived from `peer`. A forwarded client gets port 0 (the
/// proxy's port says nothing about it).
pub fn client_addr(headers: &HeaderMap, peer: SocketAddr, trusted: &[IpNet]) -> SocketAddr {
    let ip = client_ip(headers, peer.ip(), trusted);
    if ip == peer.ip() {
        peer
    } else {
        SocketAddr::new(ip, 0)
    }
}

/// See the module header.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        if trusted.is_empty() && is_loopback(peer) && headers.contains_key(X_FORWARDED_FOR) {
            warn_untrusted_proxy_once(peer);
        }
        return peer;
    }
    let mut hops: Vec<Option<IpAddr>> = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        match value.to_str() {
            Ok(list) => hops.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(parse_hop),
            ),
            Err(_) => hops.push(None),
        }
    }
    let mut client = peer;
    for (i, hop) in hops.iter().rev().enumerate() {
        if i == MAX_HOPS {
            return UNKNOWN_CLIENT;
        }
        match hop {
            None => return UNKNOWN_CLIENT,
            Some(ip) if is_trusted(*ip) => client = *ip,
            Some(ip) => return *ip,
        }
    }
    // Every hop is a trusted proxy (or there are none): the left-most is the client.
    client
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`)
/// or in brackets.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        IpAddr::V4(v4) => v4.is_loopback(),
    }
}

/// A loopback peer sending `X-Forwarded-For` is most likely a reverse proxy on this host that
/// nobody listed: every client it forwards gets loopback's rights. Said once per process.
fn warn_untrusted_proxy_once(peer: IpAddr) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(%peer, "a loopback client sent X-Forwarded-For but server.trusted_proxies is empty: if a reverse proxy runs on this host, list it there, or every client it forwards counts as loopback (and gets loopback's anonymous access)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_trusted_peers_name_the_client() {
        let trusted = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        let lo = ip("127.0.0.1");
        // No header, or an untrusted peer: the peer.
        assert_eq!(client_ip(&HeaderMap::new(), lo, &trusted), lo);
        let spoof = headers(&["127.0.0.1"]);
        assert_eq!(
            client_ip(&spoof, ip("203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(&spoof, lo, &[]), lo, "nothing trusted by default");
        // The right-most untrusted hop, whatever the client put to its left.
        let chain = headers(&["127.0.0.1, 198.51.100.4", "203.0.113.7, 10.1.2.3"]);
        assert_eq!(client_ip(&chain, lo, &trusted), ip("203.0.113.7"));
        // Ports, brackets and IPv6.
        assert_eq!(
            client_ip(&headers(&["[2001:db8::1]:443"]), lo, &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(&headers(&["198.51.100.4:5000"]), lo, &trusted),
            ip("198.51.100.4")
        );
        // Every hop trusted: the left-most.
        assert_eq!(
            client_ip(&headers(&["10.0.0.5, 10.0.0.6"]), lo, &trusted),
            ip("10.0.0.5")
        );
        // A hop the proxy could not name is nobody in particular.
        for bad in ["unknown", "1.2.3.4, garbage", "x, 10.0.0.1"] {
            assert_eq!(
                client_ip(&headers(&[bad]), lo, &trusted),
                UNKNOWN_CLIENT,
                "{bad}"
            );
        }
        let long = vec!["10.0.0.1"; MAX_HOPS + 1].join(",");
        assert_eq!(client_ip(&headers(&[&long]), lo, &trusted), UNKNOWN_CLIENT);
        // A forwarded client has port 0; the peer keeps its own.
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            client_addr(&headers(&["203.0.113.7"]), peer, &trusted),
            "203.0.113.7:0".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(client_addr(&HeaderMap::new(), peer, &trusted), peer);
    }
}
