//! Stream sources: URI parsing, credential handling and redaction.
//!
//! Credentials never travel inside a URI here. A URI written with user info (or an SRT
//! `passphrase=` parameter) is refused at config time; the login comes from the environment or
//! a file and is handed to the source element through its own properties (`user-id`/`user-pw`,
//! `passphrase`). Everything that could echo a URI or a secret back (bus messages, errors)
//! passes through [`Redactor`] before it is logged or stored.

use std::fmt;
use std::path::{Path, PathBuf};

use url::Url;

use serde::{Deserialize, Serialize};

use crate::validation::{Checker, ConfigError};

/// Schemes a stream URI may use.
pub const SUPPORTED_SCHEMES: &[&str] = &["rtsp", "rtsps", "srt", "http", "https", "file", "v4l2"];

/// Query parameters that carry secrets: refused in SRT URIs (they belong in credentials).
/// Wherever a URI is shown, every query value is masked, whatever its key.
const SECRET_PARAMS: &[&str] = &[
    "passphrase",
    "password",
    "passwd",
    "pass",
    "pwd",
    "token",
    "key",
    "secret",
    "auth",
    "signature",
    "sig",
];

/// The kind of source behind a URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Rtsp,
    Srt,
    /// HLS playlists and progressive HTTP; GStreamer tells them apart by content.
    Http,
    File,
    V4l2,
}

impl SourceKind {
    /// Live sources are retried after any failure; files fail for good on bad content.
    pub fn is_live(self) -> bool {
        !matches!(self, SourceKind::File)
    }
}

/// Why a stream URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("not a valid URI ({0})")]
    Invalid(String),
    #[error("unsupported scheme {scheme:?}; supported: {}", SUPPORTED_SCHEMES.join(", "))]
    UnsupportedScheme { scheme: String },
    #[error(
        "credentials written inline in the URI are refused (they would end up in logs and \
         process listings); remove them and set credentials.username / credentials.password_env \
         or credentials.password_file"
    )]
    InlineCredentials,
    #[error(
        "the SRT passphrase is written inline in the URI; remove `{param}=` and set \
         credentials.password_env or credentials.password_file"
    )]
    InlineSrtSecret { param: String },
    #[error("{0}")]
    BadPath(String),
}

/// A parsed stream source: its kind and a URI with no credentials in it.
#[derive(Clone, PartialEq, Eq)]
pub struct Source {
    pub kind: SourceKind,
    uri: Url,
}

impl Source {
    /// Parses `text` as written in the config. A string without a scheme is a local file path,
    /// relative to `base_dir` when not absolute.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Source, SourceError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(SourceError::Invalid("empty".into()));
        }
        if !text.contains("://") {
            return Self::from_path(Path::new(text), base_dir);
        }
        let uri = Url::parse(text).map_err(|e| SourceError::Invalid(e.to_string()))?;
        let kind = match uri.scheme() {
            "rtsp" | "rtsps" => SourceKind::Rtsp,
            "srt" => SourceKind::Srt,
            "http" | "https" => SourceKind::Http,
            "file" => SourceKind::File,
            "v4l2" => SourceKind::V4l2,
            other => {
                return Err(SourceError::UnsupportedScheme {
                    scheme: other.to_string(),
                });
            }
        };
        if !uri.username().is_empty() || uri.password().is_some() {
            return Err(SourceError::InlineCredentials);
        }
        if kind == SourceKind::Srt
            && let Some((k, _)) = uri
                .query_pairs()
                .find(|(k, _)| SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()))
        {
            return Err(SourceError::InlineSrtSecret {
                param: k.into_owned(),
            });
        }
        match kind {
            SourceKind::File => {
                if uri
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(SourceError::BadPath(format!(
                        "file URIs name a local absolute path (file:///path); {:?} looks like \
                         a host; for a relative path write it without \"file://\"",
                        uri.host_str().unwrap_or_default()
                    )));
                }
            }
            SourceKind::V4l2 => {
                if !uri.path().starts_with("/dev/") {
                    return Err(SourceError::BadPath(format!(
                        "v4l2 URIs name a device: v4l2:///dev/videoN, not {:?}",
                        uri.path()
                    )));
                }
            }
            _ => {
                if uri.host_str().is_none_or(str::is_empty) {
                    return Err(SourceError::Invalid(format!(
                        "{}:// needs a host",
                        uri.scheme()
                    )));
                }
            }
        }
        Ok(Source { kind, uri })
    }

    fn from_path(path: &Path, base_dir: &Path) -> Result<Source, SourceError> {
        // One spelling of the file wherever it shows (`configs/../x` is `x`).
        let abs: PathBuf = crate::files::resolve(base_dir, path);
        let uri = Url::from_file_path(&abs).map_err(|()| {
            SourceError::BadPath(format!(
                "{} cannot be made into a file URI (the config's directory must be absolute)",
                abs.display()
            ))
        })?;
        Ok(Source {
            kind: SourceKind::File,
            uri,
        })
    }

    /// The URI handed to GStreamer: no credentials, since config parsing refused them.
    pub fn uri(&self) -> &str {
        self.uri.as_str()
    }

    /// Local path of a `file` source.
    pub fn file_path(&self) -> Option<PathBuf> {
        (self.kind == SourceKind::File)
            .then(|| self.uri.to_file_path().ok())
            .flatten()
    }

    /// The URI as it may appear in logs, metrics and alerts: secret-looking query values
    /// replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_uri(self.uri.clone())
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({:?}, {})", self.kind, self.redacted())
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn redact_uri(mut u: Url) -> String {
    if !u.username().is_empty() {
        let _ = u.set_username("");
    }
    if u.password().is_some() {
        let _ = u.set_password(None);
    }
    // Every query value: which keys carry secrets is not ours to guess (access_token,
    // apikey, X-Amz-Signature, ...). The keys stay, so the shape of the URI is still seen.
    if u.query().is_some() {
        let keys: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
        u.query_pairs_mut()
            .clear()
            .extend_pairs(keys.iter().map(|k| (k.as_str(), "***")));
    }
    u.to_string()
}

/// A secret string: its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for handing to a source element and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A login resolved from the environment or a file, ready for the source element.
#[derive(Debug, Clone, Default)]
pub struct Login {
    pub username: Option<Secret>,
    pub password: Option<Secret>,
}

/// Why a login could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("environment variable {0} (credentials.{1}) is not set")]
    MissingEnv(String, &'static str),
    #[error("cannot read credentials.password_file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("credentials.{0} is empty")]
    Empty(&'static str),
}

impl Login {
    /// Reads the login named by `cfg`, now (called at every connection attempt, off the
    /// async runtime: a password file is read from disk).
    pub fn resolve(cfg: Option<&CredentialsConfig>) -> Result<Login, LoginError> {
        let Some(cfg) = cfg else {
            return Ok(Login::default());
        };
        let env = |name: &String, key: &'static str| {
            std::env::var(name).map_err(|_| LoginError::MissingEnv(name.clone(), key))
        };
        let username = match (&cfg.username, &cfg.username_env) {
            (Some(u), _) => Some(u.clone()),
            (None, Some(var)) => Some(env(var, "username_env")?),
            (None, None) => None,
        };
        let password = match (&cfg.password_env, &cfg.password_file) {
            (Some(var), _) => Some(env(var, "password_env")?),
            (None, Some(path)) => {
                Some(
                    crate::files::read_secret_file(path).map_err(|e| LoginError::File {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?,
                )
            }
            (None, None) => None,
        };
        if password.as_deref() == Some("") {
            return Err(LoginError::Empty("password"));
        }
        Ok(Login {
            username: username.map(Secret),
            password: password.map(Secret),
        })
    }
}

/// Every secret resolved so far in this process, for scrubbing text whose stream is unknown
/// (GStreamer's own debug log).
static KNOWN_SECRETS: std::sync::Mutex<Vec<Secret>> = std::sync::Mutex::new(Vec::new());

/// Remembers `login`'s values so [`redact_known`] removes them.
pub fn register_secrets(login: &Login) {
    let Ok(mut known) = KNOWN_SECRETS.lock() else {
        return;
    };
    for s in Redactor::for_login(login).secrets {
        if !known.contains(&s) {
            known.push(s);
        }
    }
}

/// Scrubs `text` of URI user info and of every secret registered so far.
pub fn redact_known(text: &str) -> String {
    let secrets = KNOWN_SECRETS.lock().map(|k| k.clone()).unwrap_or_default();
    Redactor { secrets }.redact(text)
}

/// Scrubs text that may echo back a URI or a secret (GStreamer errors and debug strings)
/// before it is logged or stored.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    secrets: Vec<Secret>,
}

impl Redactor {
    /// A redactor that also removes the given login's values wherever they appear.
    pub fn for_login(login: &Login) -> Self {
        let mut secrets: Vec<Secret> = [&login.username, &login.password]
            .into_iter()
            .flatten()
            // Very short values would redact ordinary words; the user info of URIs is still
            // stripped below.
            .filter(|s| s.expose().len() >= 3)
            .cloned()
            .collect();
        // HTTP and RTSP Basic authentication send base64("user:password"); debug logs of the
        // source elements can print that header.
        if let Some(p) = &login.password {
            let user = login.username.as_ref().map(Secret::expose).unwrap_or("");
            secrets.push(Secret(base64(format!("{user}:{}", p.expose()).as_bytes())));
        }
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = strip_auth_headers(&strip_userinfo(text));
        for s in &self.secrets {
            if out.contains(s.expose()) {
                out = out.replace(s.expose(), "***");
            }
        }
        out
    }
}

/// Replaces the value of every `Authorization:` header in free text.
fn strip_auth_headers(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let key = "authorization:";
    if !lower.contains(key) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while let Some(i) = lower[pos..].find(key) {
        let start = pos + i + key.len();
        out.push_str(&text[pos..start]);
        out.push_str(" ***");
        pos = text[start..]
            .find(['\r', '\n'])
            .map(|e| start + e)
            .unwrap_or(text.len());
    }
    out.push_str(&text[pos..]);
    out
}

/// Standard base64 with padding (RFC 4648), for recognising Basic-auth tokens.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// In free text, every `scheme://...` URI loses its `user:pass@` and its query values (the
/// keys stay): `rtsp://u:p@cam/x?token=a&b=c` becomes `rtsp://cam/x?token=***&b=***`.
fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URI ends at whitespace, a quote or an angle bracket.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .unwrap_or(tail.len());
        scrub_uri_rest(&tail[..end], &mut out);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The part of a URI after `scheme://`, without user info and with its query values masked.
fn scrub_uri_rest(uri: &str, out: &mut String) {
    let authority_end = uri.find(['/', '?', '#']).unwrap_or(uri.len());
    let authority = &uri[..authority_end];
    out.push_str(
        authority
            .rfind('@')
            .map_or(authority, |at| &authority[at + 1..]),
    );
    let after = &uri[authority_end..];
    let (before_query, query) = match after.find('?') {
        Some(q) => (&after[..q], Some(&after[q + 1..])),
        None => (after, None),
    };
    out.push_str(before_query);
    let Some(query) = query else { return };
    let (query, fragment) = match query.find('#') {
        Some(h) => (&query[..h], &query[h..]),
        None => (query, ""),
    };
    out.push('?');
    for (n, pair) in query.split(['&', ';']).enumerate() {
        if n > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) => {
                out.push_str(key);
                out.push_str("=***");
            }
            None => out.push_str(pair),
        }
    }
    out.push_str(fragment);
}

/// Where a stream's login comes from. Secrets are never written in the config file itself:
/// they come from an environment variable or a file (e.g. a systemd credential), read each
/// time the stream connects, so a rotated secret is picked up on the next reconnect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// User name written here (not secret by itself).
    pub username: Option<String>,
    /// Environment variable holding the user name.
    pub username_env: Option<String>,
    /// Environment variable holding the password (RTSP, HTTP) or passphrase (SRT).
    pub password_env: Option<String>,
    /// File holding the password or passphrase (trailing newline ignored).
    pub password_file: Option<std::path::PathBuf>,
    /// Refused: present only to explain that inline passwords are not accepted.
    #[serde(skip_serializing)]
    pub password: Option<String>,
}

impl CredentialsConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if self.password.is_some() {
            errors.push(ConfigError::new(
                format!("{path}.password"),
                "inline passwords are refused (config files get copied, logged and committed); \
                 use password_env or password_file",
            ));
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            errors.push(ConfigError::new(
                path,
                "set one of password_env and password_file, not both",
            ));
        }
        if self.username.is_some() && self.username_env.is_some() {
            errors.push(ConfigError::new(
                path,
                "set one of username and username_env, not both",
            ));
        }
        let mut c = Checker::new(path, errors);
        c.env_name("username_env", self.username_env.as_deref());
        c.env_name("password_env", self.password_env.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Source, SourceError> {
        Source::parse(s, Path::new("/etc/dfwatch"))
    }

    #[test]
    fn every_supported_scheme_parses_to_its_kind() {
        for (uri, kind) in [
            ("rtsp://cam.local:554/stream1", SourceKind::Rtsp),
            ("rtsps://cam.local/s", SourceKind::Rtsp),
            ("srt://127.0.0.1:7001?mode=caller", SourceKind::Srt),
            ("http://h/live.m3u8", SourceKind::Http),
            ("https://h/v.mp4", SourceKind::Http),
            ("file:///var/v.mp4", SourceKind::File),
            ("v4l2:///dev/video0", SourceKind::V4l2),
        ] {
            assert_eq!(parse(uri).unwrap().kind, kind, "{uri}");
        }
    }

    #[test]
    fn unsupported_schemes_and_inline_credentials_are_refused() {
        assert_eq!(
            parse("ftp://h/x").unwrap_err(),
            SourceError::UnsupportedScheme {
                scheme: "ftp".into()
            }
        );
        assert_eq!(
            parse("rtsp://admin:hunter2@cam/s").unwrap_err(),
            SourceError::InlineCredentials
        );
        assert_eq!(
            parse("rtsp://admin@cam/s").unwrap_err(),
            SourceError::InlineCredentials
        );
        assert!(matches!(
            parse("srt://h:1?passphrase=abcdefghij").unwrap_err(),
            SourceError::InlineSrtSecret { .. }
        ));
        assert!(matches!(
            parse("file://relative/x.mp4").unwrap_err(),
            SourceError::BadPath(_)
        ));
        assert!(matches!(
            parse("v4l2://video0").unwrap_err(),
            SourceError::BadPath(_)
        ));
        assert!(matches!(
            parse("rtsp:///s").unwrap_err(),
            SourceError::Invalid(_)
        ));
    }

    #[test]
    fn plain_paths_resolve_against_the_config_directory() {
        let s = parse("clips/a b.mp4").unwrap();
        assert_eq!(s.kind, SourceKind::File);
        assert_eq!(s.uri(), "file:///etc/dfwatch/clips/a%20b.mp4");
        assert_eq!(
            s.file_path().unwrap(),
            PathBuf::from("/etc/dfwatch/clips/a b.mp4")
        );
        assert_eq!(parse("/abs/x.mkv").unwrap().uri(), "file:///abs/x.mkv");
    }

    #[test]
    fn redaction_removes_userinfo_secret_params_and_known_secrets() {
        let login = Login {
            username: Some(Secret::new("operator")),
            password: Some(Secret::new("s3cr3t-pw")),
        };
        let r = Redactor::for_login(&login);
        let text = "Unauthorized for rtsp://operator:s3cr3t-pw@10.0.0.1:554/x?token=abc&x=1 \
                    (pw s3cr3t-pw)";
        let out = r.redact(text);
        assert!(!out.contains("s3cr3t-pw"), "{out}");
        assert!(!out.contains("operator"), "{out}");
        assert!(!out.contains("abc"), "{out}");
        assert!(
            out.contains("rtsp://10.0.0.1:554/x?token=***&x=***"),
            "{out}"
        );
        let u = Source::parse("https://h/p.m3u8?token=zzz&a=1", Path::new("/")).unwrap();
        assert_eq!(u.redacted(), "https://h/p.m3u8?token=***&a=***");
    }

    #[test]
    fn every_query_value_is_masked_whatever_its_key() {
        // Keys nobody could list in advance leaked before: access_token, apikey, AWS signing.
        let canary = "CANARY-q7Zx";
        let uri = format!(
            "https://cdn.example/live.m3u8?access_token={canary}&apikey={canary}&\
             X-Amz-Signature={canary}&X-Amz-Credential=AKIA%2F{canary}&plain"
        );
        let shown = Source::parse(&uri, Path::new("/")).unwrap().redacted();
        assert!(!shown.contains(canary), "{shown}");
        assert!(shown.contains("access_token=***") && shown.contains("X-Amz-Signature=***"));
        let text = format!("GET failed for {uri} (404); retrying srt://h:1?passphrase={canary}");
        let out = Redactor::default().redact(&text);
        assert!(!out.contains(canary), "{out}");
        assert!(
            out.contains("apikey=***&X-Amz-Signature=***&X-Amz-Credential=***&plain"),
            "{out}"
        );
        assert!(out.ends_with("srt://h:1?passphrase=***"), "{out}");
        // Text without URIs, and URIs without queries, are left alone.
        let plain = "what? a=b & c=d";
        assert_eq!(Redactor::default().redact(plain), plain);
        assert_eq!(redact_known("rtsp://cam:554/x#y"), "rtsp://cam:554/x#y");
    }

    #[test]
    fn basic_auth_tokens_and_headers_are_redacted() {
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        let login = Login {
            username: Some(Secret::new("Aladdin")),
            password: Some(Secret::new("open sesame")),
        };
        let r = Redactor::for_login(&login);
        let out = r.redact("token QWxhZGRpbjpvcGVuIHNlc2FtZQ== seen");
        assert_eq!(out, "token *** seen");
        let out = Redactor::default()
            .redact("DESCRIBE\r\nAuthorization: Digest username=x, response=y\r\nCSeq: 2");
        assert_eq!(out, "DESCRIBE\r\nAuthorization: ***\r\nCSeq: 2");
    }

    #[test]
    fn secret_debug_never_shows_the_value() {
        let l = Login {
            username: None,
            password: Some(Secret::new("hunter2")),
        };
        assert!(!format!("{l:?}").contains("hunter2"));
    }

    #[test]
    fn login_resolves_from_env_and_file_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        let cfg = CredentialsConfig {
            username: Some("u".into()),
            password_file: Some(f),
            ..Default::default()
        };
        let l = Login::resolve(Some(&cfg)).unwrap();
        assert_eq!(l.password.unwrap().expose(), "from-file");
        let cfg = CredentialsConfig {
            password_env: Some("DFWATCH_TEST_SURELY_UNSET_VAR".into()),
            ..Default::default()
        };
        assert_eq!(
            Login::resolve(Some(&cfg)).unwrap_err(),
            LoginError::MissingEnv("DFWATCH_TEST_SURELY_UNSET_VAR".into(), "password_env")
        );
    }
}
