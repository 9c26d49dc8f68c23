//! Users and their digest credentials (RFC 3261 §22.4, RFC 8760).
//!
//! The directory holds, per user name, the HA1 values
//! `H(username:realm:password)` for SHA-256 and MD5, in lower-case hex, and
//! never a clear password: [`Directory::add_with_password`] hashes and drops
//! it. User names are compared exactly (digest user names are case-sensitive).
//! HA1 values never reach logs: [`User`]'s `Debug` redacts them.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sip::auth::{self, Algorithm};

/// One user's credentials: HA1 per hash family, lower-case hex.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `SHA-256(username:realm:password)`, 64 hex digits.
    pub ha1_sha256: String,
    /// `MD5(username:realm:password)`, 32 hex digits.
    pub ha1_md5: String,
}

impl User {
    /// Hashes `password` for `username` in `realm` (the password is not kept).
    pub fn from_password(username: &str, realm: &str, password: &str) -> User {
        User {
            ha1_sha256: auth::ha1(Algorithm::Sha256, username, realm, password),
            ha1_md5: auth::ha1(Algorithm::Md5, username, realm, password),
        }
    }

    /// The stored HA1 for `alg`'s hash family (the `-sess` variants use the
    /// same base value).
    pub fn ha1(&self, alg: Algorithm) -> &str {
        match alg {
            Algorithm::Sha256 | Algorithm::Sha256Sess => &self.ha1_sha256,
            Algorithm::Md5 | Algorithm::Md5Sess => &self.ha1_md5,
        }
    }
}

impl fmt::Debug for User {
    // An HA1 is password-equivalent for its realm.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("ha1_sha256", &"<redacted>")
            .field("ha1_md5", &"<redacted>")
            .finish()
    }
}

/// The users a node authenticates, by user name.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    users: HashMap<String, User>,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Directory {
        Directory::default()
    }

    /// Adds (or replaces) `user` with credentials computed from `password` in
    /// `realm`; the password itself is dropped.
    pub fn add_with_password(&mut self, user: &str, realm: &str, password: &str) {
        self.users
            .insert(user.to_owned(), User::from_password(user, realm, password));
    }

    /// Adds (or replaces) `user` with stored HA1 values (hex, checked by the
    /// configuration; lower-cased here).
    pub fn add_hashed(&mut self, user: &str, ha1_sha256: &str, ha1_md5: &str) {
        self.users.insert(
            user.to_owned(),
            User {
                ha1_sha256: ha1_sha256.to_ascii_lowercase(),
                ha1_md5: ha1_md5.to_ascii_lowercase(),
            },
        );
    }

    /// Adds (or replaces) a user with precomputed credentials.
    pub fn insert(&mut self, name: impl Into<String>, user: User) {
        self.users.insert(name.into(), user);
    }

    /// Removes a user; returns whether it existed.
    pub fn remove(&mut self, name: &str) -> bool {
        self.users.remove(name).is_some()
    }

    /// The user called `name` (exact match).
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there is no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_both_ha1_and_no_password() {
        let mut d = Directory::new();
        d.add_with_password("alice", "sipzone.local", "secret-pw");
        let u = d.user("alice").unwrap();
        assert_eq!(u.ha1(Algorithm::Sha256).len(), 64);
        assert_eq!(u.ha1(Algorithm::Md5).len(), 32);
        assert_eq!(
            u.ha1(Algorithm::Md5),
            auth::ha1(Algorithm::Md5, "alice", "sipzone.local", "secret-pw")
        );
        assert_eq!(u.ha1(Algorithm::Sha256Sess), u.ha1_sha256);
        let shown = format!("{d:?}");
        assert!(!shown.contains("secret-pw"));
        assert!(!shown.contains(&u.ha1_md5));
        assert!(d.user("Alice").is_none());
        assert_eq!(d.len(), 1);
        let (sha, md5) = (u.ha1_sha256.to_uppercase(), u.ha1_md5.clone());
        d.add_hashed("bob", &sha, &md5);
        assert_eq!(d.user("bob"), d.user("alice"));
        assert!(d.remove("alice"));
        assert_eq!(d.len(), 1);
    }
}
