//! Signal names as Nomad and operators write them ("SIGTERM", "TERM", "sigterm", "15").

use nix::sys::signal::Signal;
use std::str::FromStr;

/// A signal string that names no signal this platform knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error(
        "invalid signal {value:?}: expected a name like \"SIGTERM\"/\"TERM\" or a number like \"15\""
    )]
    Unknown { value: String },
}

/// Parses a signal name or number, case-insensitive, with or without the `SIG` prefix.
pub fn parse_signal(value: &str) -> Result<Signal, SignalError> {
    let unknown = || SignalError::Unknown {
        value: value.to_string(),
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(unknown());
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        let number: i32 = trimmed.parse().map_err(|_| unknown())?;
        return Signal::try_from(number).map_err(|_| unknown());
    }
    let upper = trimmed.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).map_err(|_| unknown())
}

/// The canonical name of a signal ("SIGTERM"), for status reports.
pub fn signal_name(signal: Signal) -> &'static str {
    signal.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_short_names_lowercase_and_numbers() {
        for v in ["SIGTERM", "TERM", "sigterm", "term", "15", " SIGTERM "] {
            assert_eq!(parse_signal(v), Ok(Signal::SIGTERM), "{v}");
        }
        assert_eq!(parse_signal("SIGUSR1"), Ok(Signal::SIGUSR1));
        assert_eq!(parse_signal("kill"), Ok(Signal::SIGKILL));
        assert_eq!(parse_signal("9"), Ok(Signal::SIGKILL));
        assert_eq!(parse_signal("HUP"), Ok(Signal::SIGHUP));
    }

    #[test]
    fn rejects_unknown_values_naming_them() {
        for v in [
            "",
            "SIGFOO",
            "FOO",
            "0",
            "999",
            "-9",
            "SIG",
            "15x",
            "99999999999999999999",
        ] {
            let err = parse_signal(v).expect_err(v);
            assert!(err.to_string().contains(&format!("{v:?}")), "{err}");
        }
    }

    #[test]
    fn every_signal_parses_by_name_short_name_and_number() {
        for sig in Signal::iterator() {
            let name = sig.as_str();
            assert_eq!(parse_signal(name), Ok(sig), "{name}");
            assert_eq!(
                parse_signal(&name[3..].to_ascii_lowercase()),
                Ok(sig),
                "{name}"
            );
            assert_eq!(parse_signal(&(sig as i32).to_string()), Ok(sig), "{name}");
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(signal_name(Signal::SIGINT), "SIGINT");
        assert_eq!(
            parse_signal(signal_name(Signal::SIGQUIT)),
            Ok(Signal::SIGQUIT)
        );
    }
}
