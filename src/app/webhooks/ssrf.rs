//! SSRF guard of webhook deliveries: which URLs may be registered and which
//! addresses may be connected to, checked at registration and again on the
//! address actually resolved at delivery time (a DNS resolver that refuses
//! special addresses, pinned into the HTTP client, so a name that re-resolves
//! to an internal address later, DNS rebinding, still cannot be reached).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// Longest URL accepted at registration.
pub const MAX_URL_LEN: usize = 2048;

/// Why an address may not be connected to, or `None` when it may.
///
/// Refused: unspecified, loopback, private (RFC 1918, IPv6 unique local),
/// link-local, shared address space (RFC 6598), benchmarking, documentation,
/// IETF protocol assignments, multicast, broadcast and reserved ranges, and
/// IPv6 forms embedding such an IPv4 address (mapped, compatible, NAT64, 6to4).
pub fn refused_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared address space")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("reserved for protocol assignments")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = embedded_v4(ip) {
        return v4_reason(v4);
    }
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unique_local() {
        Some("private")
    } else if ip.is_unicast_link_local() || (s[0] & 0xffc0) == 0xfec0 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else if (s[0] == 0x2001 && s[1] == 0) || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) {
        Some("reserved")
    } else if s[0] == 0 {
        // Anything else under ::/8 is reserved, not a routable unicast address.
        Some("reserved")
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address stands for: mapped (`::ffff:a.b.c.d`),
/// compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !(ip.is_unspecified() || ip.is_loopback()) {
        return Some(tail(s[6], s[7]));
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(tail(s[1], s[2]));
    }
    None
}

/// Why a URL cannot be registered as a webhook target (the message of a
/// `validation_error` on `url`): scheme, length, literal special addresses and
/// `localhost` names. Other names are resolved by [`check_resolved`].
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, String> {
    let url = parse(raw)?;
    check_literal(&url, allow_private)?;
    if let Some(url::Host::Domain(d)) = url.host() {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        if !allow_private && (d == "localhost" || d.ends_with(".localhost")) {
            return Err(refusal_message("localhost", "loopback"));
        }
    }
    Ok(url)
}

/// A syntactically acceptable target: http(s), a host, at most [`MAX_URL_LEN`].
pub fn parse(raw: &str) -> Result<Url, String> {
    if raw.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if raw.len() > MAX_URL_LEN {
        return Err(format!("must be at most {MAX_URL_LEN} characters"));
    }
    let url = Url::parse(raw).map_err(|e| format!("is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http:// or https:// URL".into());
    }
    if url.host().is_none() {
        return Err("must name a host".into());
    }
    Ok(url)
}

/// Refuses a literal special address. Names are not looked at: at delivery
/// the resolver checks the addresses they resolve to.
pub fn check_literal(url: &Url, allow_private: bool) -> Result<(), String> {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => check_ip(IpAddr::V4(ip), allow_private),
        Some(url::Host::Ipv6(ip)) => check_ip(IpAddr::V6(ip), allow_private),
        _ => Ok(()),
    }
}

fn check_ip(ip: IpAddr, allow_private: bool) -> Result<(), String> {
    match refused_reason(ip) {
        Some(reason) if !allow_private => Err(refusal_message(&ip.to_string(), reason)),
        _ => Ok(()),
    }
}

fn refusal_message(host: &str, reason: &str) -> String {
    format!("{host} is a {reason} address; webhooks may only target public addresses (BULK_WEBHOOK_ALLOW_PRIVATE=true lifts this)")
}

/// Resolves the URL's host name (if it is one) and refuses it when any of its
/// addresses is special. A name that does not resolve now is accepted: the
/// check is made again on every delivery.
pub async fn check_resolved(url: &Url, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let Some(url::Host::Domain(host)) = url.host() else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let lookup = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host, port)),
    )
    .await;
    if let Ok(Ok(addrs)) = lookup {
        for a in addrs {
            check_ip(a.ip(), false).map_err(|_| {
                refusal_message(
                    &format!("{host} ({})", a.ip()),
                    refused_reason(a.ip()).unwrap_or("special"),
                )
            })?;
        }
    }
    Ok(())
}

/// A DNS resolver for the delivery client that refuses names resolving to a
/// special address, so the address checked is the address connected to.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    /// `BULK_WEBHOOK_ALLOW_PRIVATE`.
    pub allow_private: bool,
}

/// A delivery refused by the guard.
#[derive(Debug, thiserror::Error)]
#[error("address refused: {host} resolves to {ip}, a {reason} address")]
pub struct Refused {
    host: String,
    ip: IpAddr,
    reason: &'static str,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some((a, reason)) = addrs
                    .iter()
                    .find_map(|a| refused_reason(a.ip()).map(|r| (a, r)))
                {
                    return Err(Box::new(Refused {
                        host,
                        ip: a.ip(),
                        reason,
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        refused_reason(s.parse().unwrap()).is_some()
    }

    #[test]
    fn special_ranges_are_refused_and_public_ones_allowed() {
        for ip in [
            "127.0.0.1",
            "127.8.9.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "198.18.0.1",
            "192.0.2.1",
            "192.0.0.8",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
        for ip in [
            "93.184.215.14",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!refused(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_length_and_literal_hosts() {
        assert!(check_url("https://93.184.215.14/hook", false).is_ok());
        assert!(check_url("https://hooks.example.com/x?y=1", false).is_ok());
        assert!(check_url("ftp://example.com/", false).is_err());
        assert!(check_url("not a url", false).is_err());
        assert!(check_url("", false).is_err());
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(check_url(&long, false).unwrap_err().contains("2048"));
        for bad in [
            "http://127.0.0.1:8080/",
            "http://[::1]/",
            "http://localhost/",
            "http://api.localhost./",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://[fd00::1]/",
            "http://0x7f000001/",
            "http://2130706433/",
        ] {
            let e = check_url(bad, false).unwrap_err();
            assert!(e.contains("address"), "{bad}: {e}");
            assert!(
                check_url(bad, true).is_ok(),
                "{bad} allowed when private is"
            );
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_special_addresses() {
        let guarded = GuardedResolver {
            allow_private: false,
        };
        let name: Name = "localhost".parse().unwrap();
        let err = guarded.resolve(name).await.err().expect("refused");
        assert!(err.to_string().contains("loopback"), "{err}");
        let open = GuardedResolver {
            allow_private: true,
        };
        let addrs: Vec<_> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
