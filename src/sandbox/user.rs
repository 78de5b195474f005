//! Resolves the `user` of a task ("nobody", "1000", "name:group", `nomad-<N>`) to numeric ids.
//!
//! Lookups go through NSS (`getpwnam`/`getgrnam`), which may block on network directories:
//! call [`resolve_user`] from a blocking context.

use nix::unistd::{Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::path::PathBuf;

/// A user the child will run as: what `setgroups`/`setgid`/`setuid` need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedUser {
    /// The value the task asked for, for messages.
    pub spec: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (includes `gid`); empty when the user has no passwd entry.
    pub groups: Vec<u32>,
    /// Home directory from passwd, if any.
    pub home: Option<PathBuf>,
    /// Login name from passwd, if any.
    pub name: Option<String>,
}

/// A `user` value that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("invalid user {value:?}: {reason}")]
    Invalid { value: String, reason: String },
    #[error("unknown user {value:?}: no passwd entry named {name:?}")]
    UnknownUser { value: String, name: String },
    #[error("unknown group in user {value:?}: no group named {group:?}")]
    UnknownGroup { value: String, group: String },
    #[error("looking up user {value:?}: {reason}")]
    Lookup { value: String, reason: String },
}

/// Resolves a task `user` value.
///
/// Accepted forms: a login name (`nobody`), a numeric uid (`1000`; gid from passwd or equal to
/// the uid), `user:group` (either side a name or number), and Nomad dynamic workload users
/// `nomad-<N>` (uid = gid = N) when no passwd entry of that name exists.
pub fn resolve_user(value: &str) -> Result<ResolvedUser, UserError> {
    let invalid = |reason: &str| UserError::Invalid {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if value.is_empty() {
        return Err(invalid("empty"));
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\0')
    {
        return Err(invalid("contains whitespace or control characters"));
    }
    let (user_part, group_part) = match value.split_once(':') {
        Some((u, g)) => {
            if u.is_empty() || g.is_empty() || g.contains(':') {
                return Err(invalid("expected user or user:group"));
            }
            (u, Some(g))
        }
        None => (value, None),
    };

    let mut resolved = resolve_user_part(value, user_part)?;
    if let Some(group) = group_part {
        let gid = resolve_group_part(value, group)?;
        resolved.gid = gid;
        if !resolved.groups.contains(&gid) {
            resolved.groups.insert(0, gid);
        }
    }
    Ok(resolved)
}

fn lookup_err(value: &str, e: nix::Error) -> UserError {
    UserError::Lookup {
        value: value.to_string(),
        reason: e.to_string(),
    }
}

fn parse_id(value: &str, text: &str) -> Result<u32, UserError> {
    let id: u32 = text.parse().map_err(|_| UserError::Invalid {
        value: value.to_string(),
        reason: format!("{text:?} is not a valid numeric id"),
    })?;
    // (uid_t)-1 means "unchanged" to setuid/setgid: never a real id.
    if id == u32::MAX {
        return Err(UserError::Invalid {
            value: value.to_string(),
            reason: format!("{id} is reserved"),
        });
    }
    Ok(id)
}

fn from_passwd(value: &str, user: User) -> Result<ResolvedUser, UserError> {
    let name = user.name.clone();
    let groups = match CString::new(name.clone()) {
        Ok(c) => nix::unistd::getgrouplist(&c, user.gid)
            .map_err(|e| lookup_err(value, e))?
            .into_iter()
            .map(Gid::as_raw)
            .collect(),
        Err(_) => vec![user.gid.as_raw()],
    };
    Ok(ResolvedUser {
        spec: value.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
        home: Some(user.dir),
        name: Some(name),
    })
}

fn bare_ids(value: &str, uid: u32, gid: u32) -> ResolvedUser {
    ResolvedUser {
        spec: value.to_string(),
        uid,
        gid,
        groups: vec![gid],
        home: None,
        name: None,
    }
}

fn resolve_user_part(value: &str, part: &str) -> Result<ResolvedUser, UserError> {
    if part.bytes().all(|b| b.is_ascii_digit()) {
        let uid = parse_id(value, part)?;
        return match User::from_uid(Uid::from_raw(uid)).map_err(|e| lookup_err(value, e))? {
            Some(user) => from_passwd(value, user),
            None => Ok(bare_ids(value, uid, uid)),
        };
    }
    if let Some(user) = User::from_name(part).map_err(|e| lookup_err(value, e))? {
        return from_passwd(value, user);
    }
    if let Some(n) = part.strip_prefix("nomad-")
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        let id = parse_id(value, n)?;
        return Ok(bare_ids(value, id, id));
    }
    Err(UserError::UnknownUser {
        value: value.to_string(),
        name: part.to_string(),
    })
}

fn resolve_group_part(value: &str, part: &str) -> Result<u32, UserError> {
    if part.bytes().all(|b| b.is_ascii_digit()) {
        return parse_id(value, part);
    }
    match Group::from_name(part).map_err(|e| lookup_err(value, e))? {
        Some(g) => Ok(g.gid.as_raw()),
        None => Err(UserError::UnknownGroup {
            value: value.to_string(),
            group: part.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_resolves_from_passwd() {
        let u = resolve_user("nobody").expect("nobody exists on Debian");
        assert_eq!(u.uid, 65534);
        assert_eq!(u.gid, 65534);
        assert_eq!(u.name.as_deref(), Some("nobody"));
        assert!(u.groups.contains(&65534));
    }

    #[test]
    fn root_by_number_uses_passwd() {
        let u = resolve_user("0").expect("root");
        assert_eq!((u.uid, u.gid), (0, 0));
        assert_eq!(u.home.as_deref(), Some(std::path::Path::new("/root")));
    }

    #[test]
    fn numeric_uid_without_entry_uses_uid_as_gid() {
        let u = resolve_user("54321").expect("numeric");
        assert_eq!(
            (u.uid, u.gid, u.groups.clone()),
            (54321, 54321, vec![54321])
        );
        assert_eq!(u.home, None);
    }

    #[test]
    fn nomad_dynamic_user() {
        let u = resolve_user("nomad-80123").expect("nomad-N");
        assert_eq!((u.uid, u.gid), (80123, 80123));
        assert_eq!(u.name, None);
    }

    #[test]
    fn user_colon_group() {
        let u = resolve_user("nobody:nogroup").expect("nobody:nogroup");
        assert_eq!((u.uid, u.gid), (65534, 65534));
        let u = resolve_user("1000:2000").expect("ids");
        assert_eq!((u.uid, u.gid), (1000, 2000));
        assert!(u.groups.contains(&2000));
    }

    #[test]
    fn errors_name_the_value() {
        for v in [
            "",
            "no-such-user-xyz",
            "nobody:no-such-group-xyz",
            ":x",
            "x:",
            "a:b:c",
            "4294967295",
            "99999999999",
            "nomad-",
            "nomad-x1",
            "bad name",
        ] {
            let err = resolve_user(v).expect_err(v);
            assert!(err.to_string().contains(&format!("{v:?}")), "{err}");
        }
    }
}
