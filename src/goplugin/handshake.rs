//! The process-launch contract: magic cookie, app protocol negotiation and the handshake line.

use std::path::Path;

/// go-plugin's core protocol version; the host rejects anything else.
pub const CORE_PROTOCOL_VERSION: u32 = 1;

/// What go-plugin prints when the cookie is missing or wrong (three lines, then exit 1).
pub const NOT_A_PLUGIN_MESSAGE: &str = "This binary is a plugin. These are not meant to be executed directly.\n\
Please execute the program that consumes these plugins, which will\n\
load any plugins automatically\n";

/// The application's side of the handshake: which cookie proves the host launched us, and
/// which app protocol versions we speak.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Environment variable holding the cookie.
    pub magic_cookie_key: &'static str,
    /// Expected value of that variable.
    pub magic_cookie_value: &'static str,
    /// App protocol versions this plugin speaks (non-empty).
    pub protocol_versions: &'static [u32],
}

/// The cookie did not prove that a plugin host launched us.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CookieError {
    /// The application configured no cookie: a bug in the plugin itself.
    #[error(
        "Misconfigured ServeConfig given to serve this plugin: no magic cookie key or value was set. Please notify the plugin author and report this as a bug."
    )]
    Misconfigured,
    /// The variable is absent or holds another value.
    #[error("{}", NOT_A_PLUGIN_MESSAGE.trim_end())]
    NotLaunchedByHost,
}

impl HandshakeConfig {
    /// Checks the cookie against the value the host put in our environment.
    pub fn check_cookie(&self, env_value: Option<&str>) -> Result<(), CookieError> {
        if self.magic_cookie_key.is_empty() || self.magic_cookie_value.is_empty() {
            return Err(CookieError::Misconfigured);
        }
        match env_value {
            Some(v) if v == self.magic_cookie_value => Ok(()),
            _ => Err(CookieError::NotLaunchedByHost),
        }
    }

    /// Picks the app protocol version to announce from `PLUGIN_PROTOCOL_VERSIONS`.
    pub fn negotiate(&self, client_versions: Option<&str>) -> Negotiation {
        let ours_lowest = self.protocol_versions.iter().copied().min().unwrap_or(0);
        let ours_highest = self.protocol_versions.iter().copied().max().unwrap_or(0);
        let Some(raw) = client_versions.filter(|s| !s.trim().is_empty()) else {
            // An old host that sends nothing: announce what we speak best.
            return Negotiation {
                version: ours_highest,
                matched: true,
                client_versions: Vec::new(),
                ignored: Vec::new(),
            };
        };
        let mut parsed = Vec::new();
        let mut ignored = Vec::new();
        for item in raw.split(',') {
            match item.trim().parse::<u32>() {
                Ok(v) => parsed.push(v),
                Err(_) => ignored.push(item.to_string()),
            }
        }
        let best = parsed
            .iter()
            .copied()
            .filter(|v| self.protocol_versions.contains(v))
            .max();
        match best {
            Some(version) => Negotiation {
                version,
                matched: true,
                client_versions: parsed,
                ignored,
            },
            // Like go-plugin: announce our lowest version and let the host reject it with its
            // own "incompatible API version" error.
            None => Negotiation {
                version: ours_lowest,
                matched: false,
                client_versions: parsed,
                ignored,
            },
        }
    }
}

/// Outcome of protocol negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiation {
    /// The app protocol version to print in the handshake.
    pub version: u32,
    /// Whether the host listed that version.
    pub matched: bool,
    /// Versions the host listed.
    pub client_versions: Vec<u32>,
    /// Elements of `PLUGIN_PROTOCOL_VERSIONS` that were not integers.
    pub ignored: Vec<String>,
}

/// The single stdout line announcing where we listen: six fields, the sixth (server
/// certificate) empty because the host never enables AutoMTLS; a certificate there would crash
/// a host without TLS config.
pub fn handshake_line(app_version: u32, socket: &Path, multiplex: Option<bool>) -> String {
    let mut line = format!(
        "{CORE_PROTOCOL_VERSION}|{app_version}|unix|{}|grpc|",
        socket.display()
    );
    if let Some(m) = multiplex {
        // Only when the host asked (PLUGIN_MULTIPLEX_GRPC); we never multiplex.
        line.push('|');
        line.push_str(if m { "true" } else { "false" });
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: HandshakeConfig = HandshakeConfig {
        magic_cookie_key: "K",
        magic_cookie_value: "V",
        protocol_versions: &[2],
    };

    #[test]
    fn cookie_must_match_exactly() {
        assert_eq!(CFG.check_cookie(Some("V")), Ok(()));
        assert_eq!(
            CFG.check_cookie(Some("V ")),
            Err(CookieError::NotLaunchedByHost)
        );
        assert_eq!(CFG.check_cookie(None), Err(CookieError::NotLaunchedByHost));
        let bad = HandshakeConfig {
            magic_cookie_value: "",
            ..CFG
        };
        assert_eq!(bad.check_cookie(Some("")), Err(CookieError::Misconfigured));
    }

    #[test]
    fn not_a_plugin_message_is_three_lines() {
        assert_eq!(NOT_A_PLUGIN_MESSAGE.lines().count(), 3);
        assert!(NOT_A_PLUGIN_MESSAGE.ends_with('\n'));
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        let n = CFG.negotiate(Some("1,2,3"));
        assert_eq!((n.version, n.matched), (2, true));
        let n = CFG.negotiate(Some(" 2 "));
        assert_eq!((n.version, n.matched), (2, true));
    }

    #[test]
    fn negotiation_without_common_version_announces_lowest() {
        let n = CFG.negotiate(Some("1,x,3"));
        assert_eq!((n.version, n.matched), (2, false));
        assert_eq!(n.client_versions, vec![1, 3]);
        assert_eq!(n.ignored, vec!["x".to_string()]);
    }

    #[test]
    fn negotiation_without_variable_uses_ours() {
        assert_eq!(CFG.negotiate(None).version, 2);
        assert!(CFG.negotiate(Some("")).matched);
    }

    #[test]
    fn handshake_line_has_six_fields_and_empty_cert() {
        let line = handshake_line(2, Path::new("/tmp/plugin1"), None);
        assert_eq!(line, "1|2|unix|/tmp/plugin1|grpc|\n");
        assert_eq!(line.trim_end().split('|').count(), 6);
        let mux = handshake_line(2, Path::new("/tmp/p"), Some(false));
        assert_eq!(mux, "1|2|unix|/tmp/p|grpc||false\n");
    }
}
