//! Backend discovery: which addresses a configured backend target stands for.
//!
//! A target is `host:port` or a URL (`http://host:port`, `https://host:port`). An IP literal is
//! one static address. A DNS name is resolved with hickory-resolver (the system's
//! `/etc/resolv.conf` and hosts file, or `--dns-server`) to every A/AAAA address it has — a
//! Kubernetes headless Service answers with one address per ready pod — and re-resolved every
//! few seconds by the pool, which opens one channel per address. A failed lookup keeps the last
//! good set (a resolver hiccup never empties the pool).

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};

/// One configured backend target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP literal (without brackets).
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parses `host:port`, `[v6]:port` or `scheme://host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (scheme, rest) = match s.split_once("://") {
            Some((sch, rest)) => (sch.to_ascii_lowercase(), rest),
            None => ("http".to_string(), s),
        };
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "backend '{s}': scheme '{scheme}' is not http or https"
            ));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6
                .split_once("]:")
                .ok_or_else(|| format!("backend '{s}': expected [address]:port"))?;
            (h.to_string(), p)
        } else {
            let (h, p) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("backend '{s}': expected host:port"))?;
            (h.to_string(), p)
        };
        if host.is_empty() {
            return Err(format!("backend '{s}': empty host"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("backend '{s}': bad port '{port}'"))?;
        Ok(Self { scheme, host, port })
    }

    /// The address when the host is an IP literal (no lookup needed).
    pub fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }

    /// The URL a channel to `addr` (one of this target's addresses) connects to.
    pub fn url_for(&self, addr: SocketAddr) -> String {
        format!("{}://{addr}", self.scheme)
    }

    /// As written in configuration and messages.
    pub fn display(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Resolves targets to their current addresses.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Answers are re-read at every re-resolution, never served from a cache older than this.
fn opts(base: ResolverOpts) -> ResolverOpts {
    let mut o = base;
    o.cache_size = 0;
    o.positive_max_ttl = Some(std::time::Duration::from_secs(1));
    o.negative_max_ttl = Some(std::time::Duration::from_secs(1));
    o.timeout = std::time::Duration::from_secs(2);
    o.attempts = 1;
    o
}

impl Resolver {
    /// The system's resolver configuration (`/etc/resolv.conf`, hosts file); falls back to the
    /// hosts file only when there is no resolv.conf.
    pub fn system() -> Self {
        let builder = match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("no system resolver configuration ({e}); using the hosts file only");
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::new()),
                    TokioConnectionProvider::default(),
                )
            }
        };
        let mut builder = builder;
        let o = opts(builder.options_mut().clone());
        Self {
            inner: builder.with_options(o).build(),
        }
    }

    /// A resolver asking only the nameserver at `addr` (UDP and TCP).
    pub fn nameserver(addr: SocketAddr) -> Self {
        let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
        let builder = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], group),
            TokioConnectionProvider::default(),
        );
        let o = opts(ResolverOpts::default());
        Self {
            inner: builder.with_options(o).build(),
        }
    }

    /// The current addresses of `t`, sorted; an IP literal without a lookup.
    pub async fn resolve(&self, t: &Target) -> Result<Vec<SocketAddr>, String> {
        if let Some(a) = t.literal() {
            return Ok(vec![a]);
        }
        // A trailing dot: the name is fully qualified (no search-domain walk per lookup).
        let name = if t.host.ends_with('.') || !t.host.contains('.') {
            t.host.clone()
        } else {
            format!("{}.", t.host)
        };
        let lookup = self
            .inner
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| format!("resolving {}: {e}", t.host))?;
        let mut addrs: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, t.port))
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(format!("resolving {}: no addresses", t.host));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("janus-understanding:50052").unwrap();
        assert_eq!(
            (t.scheme.as_str(), t.host.as_str(), t.port),
            ("http", "janus-understanding", 50052)
        );
        assert_eq!(t.literal(), None);
        let t = Target::parse("https://127.0.0.2:7").unwrap();
        assert_eq!(t.literal(), Some("127.0.0.2:7".parse().unwrap()));
        assert_eq!(
            t.url_for("127.0.0.2:7".parse().unwrap()),
            "https://127.0.0.2:7"
        );
        let t = Target::parse("[::1]:9").unwrap();
        assert_eq!(t.literal(), Some("[::1]:9".parse().unwrap()));
        assert!(Target::parse("nohost").is_err());
        assert!(Target::parse("h:notaport").is_err());
        assert!(Target::parse("ftp://h:1").is_err());
    }

    #[tokio::test]
    async fn literals_and_hosts_file_names_resolve() {
        let r = Resolver::system();
        let t = Target::parse("127.0.0.3:80").unwrap();
        assert_eq!(
            r.resolve(&t).await.unwrap(),
            vec!["127.0.0.3:80".parse().unwrap()]
        );
        let t = Target::parse("localhost:80").unwrap();
        let got = r.resolve(&t).await.unwrap();
        assert!(
            got.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
            "{got:?}"
        );
    }
}
