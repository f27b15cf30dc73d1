//! Edge accounts: the people and systems that submit mail through hispd over
//! SMTP submission (and later read it over IMAP/POP3).
//!
//! Accounts live in the sled tree `users`, one JSON record per lower-cased
//! login name. Passwords are stored as Argon2id PHC strings with a random
//! salt; every write is flushed before the call returns.

use std::path::PathBuf;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

/// The shortest password `add` and `set_password` accept, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;

const TREE_NAME: &str = "users";

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no such user {0}")]
    NoSuchUser(String),
    #[error("user {0} exists")]
    Exists(String),
    #[error("password too short (min {MIN_PASSWORD_CHARS})")]
    PasswordTooShort,
    #[error("invalid user name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid sending address {address:?} for user {name}: {reason}")]
    InvalidAddress {
        name: String,
        address: String,
        reason: &'static str,
    },
    #[error("user database {}: {source}", path.display())]
    Storage {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("user database {}: record for {name:?} is corrupt: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("system random generator failed: {0}")]
    Random(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    /// Login name, normally the Direct address; always lower case.
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Addresses this account may send from; defaults to `[name]`.
    pub addresses: Vec<String>,
    /// RFC 3339 creation time.
    pub created: String,
}

pub struct Users {
    tree: sled::Tree,
    /// The database directory, only for error messages.
    path: PathBuf,
}

impl Users {
    /// Opens (creating if needed) the `users` tree of `db`.
    pub fn open(db: &sled::Db) -> Result<Users, UserError> {
        // sled 0.34 has no public accessor for its directory; this hidden one
        // is what sled itself uses, and only feeds error messages.
        let path = db.context.get_path();
        let tree = db
            .open_tree(TREE_NAME)
            .map_err(|source| UserError::Storage {
                path: path.clone(),
                source,
            })?;
        // Pay for the dummy hash now, so the first login attempt for an
        // unknown name costs the same as any other.
        let _ = dummy_hash();
        Ok(Users { tree, path })
    }

    /// Creates an account. The name is lower-cased; `addresses` empty means
    /// the account may send only as its own name.
    pub fn add(&self, name: &str, password: &str, addresses: &[String]) -> Result<(), UserError> {
        let name = normalize_name(name)?;
        check_password(password)?;
        let addresses = if addresses.is_empty() {
            vec![name.clone()]
        } else {
            addresses
                .iter()
                .map(|a| normalize_address(&name, a))
                .collect::<Result<Vec<_>, _>>()?
        };
        let user = User {
            password_hash: hash_password(password)?,
            name: name.clone(),
            addresses,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let record = self.encode(&user)?;
        // Compare-and-swap from "absent" makes concurrent adds of one name
        // safe: exactly one wins, the other sees Exists.
        match self
            .tree
            .compare_and_swap(name.as_bytes(), None as Option<&[u8]>, Some(record))
            .map_err(|e| self.storage(e))?
        {
            Ok(()) => self.flush(),
            Err(_) => Err(UserError::Exists(name)),
        }
    }

    pub fn set_password(&self, name: &str, password: &str) -> Result<(), UserError> {
        let name = name.to_lowercase();
        check_password(password)?;
        let password_hash = hash_password(password)?;
        loop {
            let current = self
                .tree
                .get(name.as_bytes())
                .map_err(|e| self.storage(e))?
                .ok_or_else(|| UserError::NoSuchUser(name.clone()))?;
            let mut user = self.decode(&name, &current)?;
            user.password_hash = password_hash.clone();
            let record = self.encode(&user)?;
            // Retry if someone else changed the record in between, so a
            // concurrent address change is not lost.
            match self
                .tree
                .compare_and_swap(name.as_bytes(), Some(current), Some(record))
                .map_err(|e| self.storage(e))?
            {
                Ok(()) => return self.flush(),
                Err(_) => continue,
            }
        }
    }

    pub fn remove(&self, name: &str) -> Result<(), UserError> {
        let name = name.to_lowercase();
        match self
            .tree
            .remove(name.as_bytes())
            .map_err(|e| self.storage(e))?
        {
            Some(_) => self.flush(),
            None => Err(UserError::NoSuchUser(name)),
        }
    }

    /// All accounts, ordered by name.
    pub fn list(&self) -> Result<Vec<User>, UserError> {
        self.tree
            .iter()
            .map(|entry| {
                let (key, value) = entry.map_err(|e| self.storage(e))?;
                self.decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<Option<User>, UserError> {
        let name = name.to_lowercase();
        match self
            .tree
            .get(name.as_bytes())
            .map_err(|e| self.storage(e))?
        {
            Some(value) => self.decode(&name, &value).map(Some),
            None => Ok(None),
        }
    }

    /// Verifies the password in constant time w.r.t. the hash; unknown users
    /// still pay one hash computation (against a fixed dummy hash) so timing
    /// does not reveal which names exist.
    pub fn authenticate(&self, name: &str, password: &str) -> Result<Option<User>, UserError> {
        let Some(user) = self.get(name)? else {
            let _ = verify_password(dummy_hash(), password);
            return Ok(None);
        };
        let hash = PasswordHash::new(&user.password_hash).map_err(|e| UserError::Corrupt {
            path: self.path.clone(),
            name: user.name.clone(),
            reason: format!("password hash: {e}"),
        })?;
        if Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
        {
            Ok(Some(user))
        } else {
            Ok(None)
        }
    }

    /// Whether `user` may use `address` as the envelope sender / From
    /// (case-insensitive).
    pub fn may_send_as(user: &User, address: &str) -> bool {
        let address = address.trim();
        let address = address
            .strip_prefix('<')
            .and_then(|a| a.strip_suffix('>'))
            .unwrap_or(address);
        let address = address.to_lowercase();
        !address.is_empty()
            && user
                .addresses
                .iter()
                .any(|allowed| allowed.to_lowercase() == address)
    }

    fn flush(&self) -> Result<(), UserError> {
        self.tree.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn storage(&self, source: sled::Error) -> UserError {
        UserError::Storage {
            path: self.path.clone(),
            source,
        }
    }

    fn encode(&self, user: &User) -> Result<Vec<u8>, UserError> {
        serde_json::to_vec(user).map_err(|e| UserError::Corrupt {
            path: self.path.clone(),
            name: user.name.clone(),
            reason: format!("cannot encode: {e}"),
        })
    }

    fn decode(&self, name: &str, value: &[u8]) -> Result<User, UserError> {
        serde_json::from_slice(value).map_err(|e| UserError::Corrupt {
            path: self.path.clone(),
            name: name.to_string(),
            reason: e.to_string(),
        })
    }
}

fn normalize_name(name: &str) -> Result<String, UserError> {
    let invalid = |reason| UserError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("contains white space or control characters"));
    }
    if name.len() > 320 {
        return Err(invalid("longer than 320 bytes"));
    }
    Ok(name.to_lowercase())
}

fn normalize_address(name: &str, address: &str) -> Result<String, UserError> {
    let invalid = |reason| UserError::InvalidAddress {
        name: name.to_string(),
        address: address.to_string(),
        reason,
    };
    let trimmed = address.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    if trimmed
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
    {
        return Err(invalid(
            "contains white space, control characters or angle brackets",
        ));
    }
    if !trimmed.contains('@') {
        return Err(invalid("not an address (no @)"));
    }
    Ok(trimmed.to_lowercase())
}

fn check_password(password: &str) -> Result<(), UserError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(UserError::PasswordTooShort);
    }
    Ok(())
}

pub fn hash_password(password: &str) -> Result<String, UserError> {
    let mut salt = [0u8; 16];
    openssl::rand::rand_bytes(&mut salt).map_err(|e| UserError::Random(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| UserError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Checks `password` against an optional PHC hash; with none, a dummy hash
/// is checked instead so the time taken does not reveal that no hash exists.
pub fn check_password_hash(phc: Option<&str>, password: &str) -> bool {
    match phc {
        Some(phc) => verify_password(phc, password),
        None => {
            let _ = verify_password(dummy_hash(), password);
            false
        }
    }
}

fn verify_password(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash made with the same parameters as real accounts, so checking a
/// password against it costs what checking a real account costs.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::encode_b64(b"hispd-dummy-salt").ok();
        salt.and_then(|salt| {
            Argon2::default()
                .hash_password(b"no such user, no such password", &salt)
                .ok()
                .map(|h| h.to_string())
        })
        .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_temp() -> (tempfile::TempDir, sled::Db, Users) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let users = Users::open(&db).unwrap();
        (dir, db, users)
    }

    #[test]
    fn add_and_authenticate() {
        let (_dir, _db, users) = open_temp();
        users
            .add("Alice@Direct.Example.org", "correct horse", &[])
            .unwrap();
        let user = users
            .authenticate("alice@direct.example.org", "correct horse")
            .unwrap()
            .expect("right password accepted");
        assert_eq!(user.name, "alice@direct.example.org");
        assert_eq!(user.addresses, vec!["alice@direct.example.org".to_string()]);
        assert!(user.password_hash.starts_with("$argon2id$"));
        assert!(!user.password_hash.contains("correct horse"));
        assert!(chrono::DateTime::parse_from_rfc3339(&user.created).is_ok());
        // Names are case-insensitive at login too.
        assert!(users
            .authenticate("ALICE@direct.example.org", "correct horse")
            .unwrap()
            .is_some());
    }

    #[test]
    fn wrong_password_and_unknown_user() {
        let (_dir, _db, users) = open_temp();
        users.add("bob@d.example", "password1", &[]).unwrap();
        assert!(users
            .authenticate("bob@d.example", "password2")
            .unwrap()
            .is_none());
        assert!(users
            .authenticate("nobody@d.example", "password1")
            .unwrap()
            .is_none());
        assert!(users.get("nobody@d.example").unwrap().is_none());
    }

    #[test]
    fn dummy_hash_uses_default_parameters() {
        let dummy = PasswordHash::new(dummy_hash()).unwrap();
        let real_phc = hash_password("whatever123").unwrap();
        let real = PasswordHash::new(&real_phc).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
    }

    #[test]
    fn salts_differ() {
        let a = hash_password("samepassword").unwrap();
        let b = hash_password("samepassword").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn duplicate_refused() {
        let (_dir, _db, users) = open_temp();
        users.add("carol@d.example", "password1", &[]).unwrap();
        let err = users.add("CAROL@d.example", "password2", &[]).unwrap_err();
        assert!(matches!(err, UserError::Exists(_)));
        assert_eq!(err.to_string(), "user carol@d.example exists");
        // The original password still works.
        assert!(users
            .authenticate("carol@d.example", "password1")
            .unwrap()
            .is_some());
    }

    #[test]
    fn short_password_and_bad_names_refused() {
        let (_dir, _db, users) = open_temp();
        let err = users.add("dave@d.example", "short", &[]).unwrap_err();
        assert_eq!(err.to_string(), "password too short (min 8)");
        assert!(matches!(
            users.add("", "password1", &[]),
            Err(UserError::InvalidName { .. })
        ));
        assert!(matches!(
            users.add("a b@d.example", "password1", &[]),
            Err(UserError::InvalidName { .. })
        ));
        assert!(matches!(
            users.add("e@d.example", "password1", &["nope".to_string()]),
            Err(UserError::InvalidAddress { .. })
        ));
        assert!(users.list().unwrap().is_empty());
    }

    #[test]
    fn set_password_and_remove() {
        let (_dir, _db, users) = open_temp();
        users.add("erin@d.example", "oldpassword", &[]).unwrap();
        users.set_password("Erin@d.example", "newpassword").unwrap();
        assert!(users
            .authenticate("erin@d.example", "oldpassword")
            .unwrap()
            .is_none());
        assert!(users
            .authenticate("erin@d.example", "newpassword")
            .unwrap()
            .is_some());
        assert!(matches!(
            users.set_password("erin@d.example", "short"),
            Err(UserError::PasswordTooShort)
        ));
        let err = users
            .set_password("ghost@d.example", "newpassword")
            .unwrap_err();
        assert_eq!(err.to_string(), "no such user ghost@d.example");

        users.remove("ERIN@d.example").unwrap();
        assert!(users.get("erin@d.example").unwrap().is_none());
        assert!(users
            .authenticate("erin@d.example", "newpassword")
            .unwrap()
            .is_none());
        let err = users.remove("erin@d.example").unwrap_err();
        assert_eq!(err.to_string(), "no such user erin@d.example");
    }

    #[test]
    fn list_is_sorted_and_complete() {
        let (_dir, _db, users) = open_temp();
        users.add("zed@d.example", "password1", &[]).unwrap();
        users
            .add(
                "ehr-system",
                "password1",
                &["Clinic@D.Example".to_string(), "lab@d.example".to_string()],
            )
            .unwrap();
        let list = users.list().unwrap();
        let names: Vec<_> = list.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["ehr-system", "zed@d.example"]);
        assert_eq!(list[0].addresses, ["clinic@d.example", "lab@d.example"]);
    }

    #[test]
    fn may_send_as_is_case_insensitive() {
        let (_dir, _db, users) = open_temp();
        users
            .add(
                "ehr",
                "password1",
                &["Clinic@D.Example".to_string(), "lab@d.example".to_string()],
            )
            .unwrap();
        let user = users.get("ehr").unwrap().unwrap();
        assert!(Users::may_send_as(&user, "clinic@d.example"));
        assert!(Users::may_send_as(&user, "CLINIC@D.EXAMPLE"));
        assert!(Users::may_send_as(&user, "<Lab@d.example>"));
        assert!(!Users::may_send_as(&user, "ehr"));
        assert!(!Users::may_send_as(&user, "other@d.example"));
        assert!(!Users::may_send_as(&user, ""));
    }

    #[test]
    fn reopen_keeps_users() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::store::SledStore::open(dir.path()).unwrap();
            let users = Users::open(store.db()).unwrap();
            users.add("frank@d.example", "password1", &[]).unwrap();
            users.add("grace@d.example", "password2", &[]).unwrap();
            users.remove("grace@d.example").unwrap();
        }
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let users = Users::open(store.db()).unwrap();
        let list = users.list().unwrap();
        assert_eq!(list.len(), 1);
        assert!(users
            .authenticate("frank@d.example", "password1")
            .unwrap()
            .is_some());
    }

    #[test]
    fn storage_errors_name_the_path() {
        let (dir, _db, users) = open_temp();
        users.tree.insert("broken", b"not json".as_slice()).unwrap();
        let err = users.get("broken").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("corrupt"), "{text}");
    }
}
