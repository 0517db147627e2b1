//! `[http]`: the listener, the API token, and what API callers may do.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ingest::CredentialsConfig;

/// `[http]`: the health, metrics and API listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Listen address; keep it on loopback unless a reverse proxy guards it.
    pub listen: SocketAddr,
    /// Environment variable holding the API token.
    pub token_env: Option<String>,
    /// File holding the API token. With neither set, a token is generated at first start
    /// into the state directory (`$STATE_DIRECTORY`, else `var/state`) as `api-token`.
    pub token_file: Option<PathBuf>,
    /// URI schemes accepted for streams added through the API (local files are not, unless
    /// listed: an API caller should not read the daemon's disk). Sources a stream opens
    /// itself (an HLS playlist's segments, say) are held to the same list.
    pub api_schemes: Vec<String>,
    /// Credential sets API callers may name (`"credentials": "lobby"` in a POST
    /// /api/streams body). A caller never names files or environment variables itself.
    pub api_credentials: BTreeMap<String, CredentialsConfig>,
    /// Streams the API may add (runtime-only streams at once). Range 0 to 1024.
    pub api_max_streams: usize,
    /// Whether GET /api/streams and /api/alerts need the token: `auto` (only when `listen`
    /// is not a loopback address), `token` (always), `open` (never). `/livez`, `/readyz`
    /// and `/metrics` are always open.
    pub read_auth: ReadAuth,
    /// Connections open at once (range 1 to 4096). At the bound the oldest connection is
    /// closed to admit the new one, so a flood of slow clients cannot lock a health probe
    /// out; the cost is counted in `dfwatch_http_connections_evicted_total`.
    pub max_connections: usize,
    /// Time a client has to send a request's head, and the most a kept-alive connection
    /// may sit idle (range 1s to 5m).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a whole request may take once its head arrived, body included (range 1s to
    /// 10m); past it the answer is 408.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Reverse proxies in front of the listener (addresses or CIDR blocks, e.g.
    /// `"127.0.0.1"`, `"10.0.0.0/8"`, `"::1"`): for a request from one of them, the client is
    /// the last address in `X-Forwarded-For` that is not itself a trusted proxy, and that
    /// client is who a failed token guess counts against. Default none: `X-Forwarded-For`
    /// is ignored (anyone could write it).
    pub trusted_proxies: Vec<Cidr>,
}

/// An address block: an IP address, or an address with a prefix length (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 address counts as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v4 = |a: IpAddr| match a {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
            v4 => v4,
        };
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is its IPv4 block.
        let (net, prefix) = match (self.addr, v4(self.addr)) {
            (IpAddr::V6(_), IpAddr::V4(n)) => (IpAddr::V4(n), self.prefix.saturating_sub(96)),
            _ => (self.addr, self.prefix),
        };
        let ip = v4(ip);
        let me = Cidr { addr: net, prefix };
        match (me.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(me.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(me.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.as_str(), None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or a CIDR block (10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.addr, c.prefix)
    }
}

/// See [`HttpConfig::read_auth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAuth {
    Auto,
    Token,
    Open,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            token_env: None,
            token_file: None,
            api_schemes: ["rtsp", "rtsps", "srt", "http", "https"]
                .map(String::from)
                .to_vec(),
            api_credentials: BTreeMap::new(),
            api_max_streams: 16,
            read_auth: ReadAuth::Auto,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
        }
    }
}

const KNOWN_SCHEMES: &[&str] = &["rtsp", "rtsps", "srt", "http", "https", "file", "v4l2"];

impl HttpConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        let mut c = crate::validation::Checker::new(path, errors);
        for (i, s) in self.api_schemes.iter().enumerate() {
            if !KNOWN_SCHEMES.contains(&s.as_str()) {
                c.error(
                    &format!("api_schemes[{i}]"),
                    format!("unknown scheme {s:?}; known: {}", KNOWN_SCHEMES.join(", ")),
                );
            }
        }
        if self.token_env.is_some() && self.token_file.is_some() {
            c.error("", "set one of token_env and token_file, not both");
        }
        c.env_name("token_env", self.token_env.as_deref());
        c.count("api_max_streams", self.api_max_streams as u64, 0..=1024);
        c.count("max_connections", self.max_connections as u64, 1..=4096);
        c.duration(
            "header_timeout",
            self.header_timeout,
            Duration::from_secs(1)..=Duration::from_secs(300),
        );
        c.duration(
            "request_timeout",
            self.request_timeout,
            Duration::from_secs(1)..=Duration::from_secs(600),
        );
        for (name, set) in &self.api_credentials {
            let path = format!("api_credentials.{name}");
            if crate::types::check_id(name).is_err() {
                c.error(&path, "a set's name must match [A-Za-z0-9_-]{1,64}");
            }
            set.validate(&c.path(&path), c.errors());
        }
    }

    /// Whether reads need the token under this config.
    pub fn reads_need_token(&self) -> bool {
        match self.read_auth {
            ReadAuth::Token => true,
            ReadAuth::Open => false,
            ReadAuth::Auto => !self.listen.ip().is_loopback(),
        }
    }

    /// Requests must name this machine in `Host` (an IP address or `localhost`): reads are
    /// open on a loopback listener, and a web page elsewhere could otherwise reach them by
    /// pointing a name of its own at 127.0.0.1 (DNS rebinding) and read the event store's
    /// media.
    pub fn loopback_hosts_only(&self) -> bool {
        !self.reads_need_token() && self.listen.ip().is_loopback()
    }

    /// The API token: from the environment, the file, or generated into `state_dir`.
    pub fn token(&self, base_dir: &Path, state_dir: &Path) -> anyhow::Result<String> {
        use anyhow::Context;
        if let Some(var) = &self.token_env {
            let t = std::env::var(var).with_context(|| {
                format!("http.token_env: environment variable {var} is not set")
            })?;
            return check_token(t.trim(), &format!("environment variable {var}"));
        }
        if let Some(p) = &self.token_file {
            let p = crate::files::resolve(base_dir, p);
            let t = crate::files::read_secret_file(&p)
                .with_context(|| format!("http.token_file: cannot read {}", p.display()))?;
            return check_token(t.trim(), &p.display().to_string());
        }
        let p = state_dir.join("api-token");
        if let Ok(t) = crate::files::read_secret_file(&p) {
            return check_token(t.trim(), &p.display().to_string());
        }
        std::fs::create_dir_all(state_dir).with_context(|| {
            format!("cannot create the state directory {}", state_dir.display())
        })?;
        let mut bytes = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .context("reading /dev/urandom for the API token")?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&p, token.as_bytes())
            .with_context(|| format!("writing the API token to {}", p.display()))?;
        tracing::info!(path = %p.display(), "Generated the API token (mode 0600).");
        Ok(token)
    }
}

fn check_token(t: &str, from: &str) -> anyhow::Result<String> {
    if t.len() < 16 {
        anyhow::bail!("the API token in {from} is shorter than 16 characters");
    }
    Ok(t.to_string())
}

fn write_private(p: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_need_the_token_off_loopback_unless_told_otherwise() {
        let at = |listen: &str, read_auth| HttpConfig {
            listen: listen.parse().unwrap(),
            read_auth,
            ..HttpConfig::default()
        };
        assert!(!at("127.0.0.1:8787", ReadAuth::Auto).reads_need_token());
        assert!(!at("[::1]:8787", ReadAuth::Auto).reads_need_token());
        assert!(at("0.0.0.0:8787", ReadAuth::Auto).reads_need_token());
        assert!(at("192.0.2.4:8787", ReadAuth::Auto).reads_need_token());
        assert!(at("127.0.0.1:8787", ReadAuth::Token).reads_need_token());
        assert!(!at("0.0.0.0:8787", ReadAuth::Open).reads_need_token());
    }

    #[test]
    fn credential_sets_are_checked_like_stream_credentials() {
        let mut errors = Vec::new();
        let mut cfg = HttpConfig::default();
        cfg.api_credentials.insert(
            "bad name".into(),
            CredentialsConfig {
                password: Some("inline".into()),
                ..Default::default()
            },
        );
        cfg.validate("http", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"http.api_credentials.bad name"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"http.api_credentials.bad name.password"),
            "{paths:?}"
        );
    }
}
