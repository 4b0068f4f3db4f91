//! Who may do what: API tokens bound to roles.
//!
//! An API caller presents `Authorization: Bearer TOKEN`. The coordinator keeps only the
//! token's SHA-256 (from its config file or created with `fleetwave-coordinator token`), looks
//! the hash up, and checks the token's [`Role`] against the [`Action`]:
//!
//! | action                           | viewer | deployer (its services) | approver | admin |
//! |----------------------------------|:------:|:-----------------------:|:--------:|:-----:|
//! | read (status, listings, audit)   |   x    |            x            |    x     |   x   |
//! | register a version (dev)         |        |            x            |          |   x   |
//! | promote a version to non-prod    |        |            x            |    x     |   x   |
//! | promote a version to prod        |        |                         |    x     |   x   |
//! | deploy, pause, resume            |        |            x            |          |   x   |
//! | promote a wave (skip its gates)  |        |                         |    x     |   x   |
//! | roll back, abort                 |        |                         |    x     |   x   |
//!
//! A missing or unknown token is refused with 401, a known one short of the role with 403;
//! both are logged and audited by the API layer. Tokens are compared by their hash, so the
//! lookup time does not depend on how much of a token matches.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The environment whose promotions need an approver.
pub const PROD: &str = "prod";

/// What a token may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Read only.
    Viewer,
    /// Register, promote outside prod, deploy, pause and resume the named services.
    Deployer {
        /// The services.
        services: Vec<String>,
    },
    /// Promote to any environment (prod included), promote waves, roll back.
    Approver,
    /// Everything.
    Admin,
}

impl Role {
    /// Whether the role allows `action`.
    pub fn allows(&self, action: &Action<'_>) -> bool {
        match self {
            Role::Admin => true,
            Role::Viewer => matches!(action, Action::Read),
            Role::Approver => matches!(
                action,
                Action::Read
                    | Action::PromoteVersion { .. }
                    | Action::PromoteWave { .. }
                    | Action::Rollback { .. }
            ),
            Role::Deployer { services } => {
                let mine = |s: &str| services.iter().any(|m| m == s || m == "*");
                match action {
                    Action::Read => true,
                    Action::Register { service } | Action::Deploy { service } => mine(service),
                    Action::PromoteVersion { service, environment } => {
                        mine(service) && *environment != PROD
                    }
                    Action::PromoteWave { .. } | Action::Rollback { .. } | Action::Admin => false,
                }
            }
        }
    }

    /// The role's name.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer { .. } => "deployer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

/// Something an API caller wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Read anything.
    Read,
    /// Register a version of a service.
    Register {
        /// The service.
        service: &'a str,
    },
    /// Promote a version to an environment.
    PromoteVersion {
        /// The service.
        service: &'a str,
        /// The environment.
        environment: &'a str,
    },
    /// Create, pause or resume a deployment of a service.
    Deploy {
        /// The service.
        service: &'a str,
    },
    /// Pass a deployment's current wave now.
    PromoteWave {
        /// The service.
        service: &'a str,
    },
    /// Roll back or abort a deployment.
    Rollback {
        /// The service.
        service: &'a str,
    },
    /// Manage tokens.
    Admin,
}

/// Who called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Why a caller is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("no bearer token: send Authorization: Bearer TOKEN")]
    Missing,
    /// A token that matches no stored hash.
    #[error("unknown token")]
    Unknown,
    /// The token's role does not allow it.
    #[error("token {name:?} ({role}) may not {what}")]
    Forbidden {
        /// The token's name.
        name: String,
        /// Its role.
        role: &'static str,
        /// What was refused.
        what: String,
    },
}

impl AuthError {
    /// The HTTP status: 401 for a missing or unknown token, 403 for one short of the role.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Unknown => 401,
            AuthError::Forbidden { .. } => 403,
        }
    }
}

/// SHA-256 of a token, hex: what is stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()))
}

/// A new random token (256 bits, hex).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    format!("fwt_{}", hex::encode(bytes))
}

/// Tokens known from the configuration file (by hash); the store holds the others.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Principal>,
}

impl Tokens {
    /// Adds a token by its hash.
    pub fn insert(&mut self, hash: String, principal: Principal) {
        self.by_hash.insert(hash.to_ascii_lowercase(), principal);
    }

    /// The principal of a token hash.
    pub fn get(&self, hash: &str) -> Option<&Principal> {
        self.by_hash.get(hash)
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// Checks `principal` may do `action`.
pub fn authorize(principal: &Principal, action: &Action<'_>) -> Result<(), AuthError> {
    if principal.role.allows(action) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            name: principal.name.clone(),
            role: principal.role.name(),
            what: describe(action),
        })
    }
}

fn describe(action: &Action<'_>) -> String {
    match action {
        Action::Read => "read".into(),
        Action::Register { service } => format!("register versions of {service}"),
        Action::PromoteVersion { service, environment } => {
            format!("promote {service} to {environment}")
        }
        Action::Deploy { service } => format!("deploy {service}"),
        Action::PromoteWave { service } => format!("promote waves of {service}"),
        Action::Rollback { service } => format!("roll back {service}"),
        Action::Admin => "administer the coordinator".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role) -> Principal {
        Principal { name: "t".into(), role }
    }

    #[test]
    fn viewer_reads_only() {
        let v = p(Role::Viewer);
        assert!(authorize(&v, &Action::Read).is_ok());
        let err = authorize(&v, &Action::Deploy { service: "web" }).expect_err("refused");
        assert_eq!(err.status(), 403);
        assert!(authorize(&v, &Action::Rollback { service: "web" }).is_err());
    }

    #[test]
    fn deployer_is_bound_to_its_services_and_not_to_prod_promotion() {
        let d = p(Role::Deployer { services: vec!["web".into()] });
        assert!(authorize(&d, &Action::Deploy { service: "web" }).is_ok());
        assert!(authorize(&d, &Action::Deploy { service: "db" }).is_err());
        let staging = Action::PromoteVersion { service: "web", environment: "staging" };
        assert!(authorize(&d, &staging).is_ok());
        let prod = Action::PromoteVersion { service: "web", environment: PROD };
        assert!(authorize(&d, &prod).is_err());
        assert!(authorize(&d, &Action::Rollback { service: "web" }).is_err());
    }

    #[test]
    fn approver_promotes_to_prod_and_rolls_back_but_does_not_deploy() {
        let a = p(Role::Approver);
        let prod = Action::PromoteVersion { service: "web", environment: PROD };
        assert!(authorize(&a, &prod).is_ok());
        assert!(authorize(&a, &Action::Rollback { service: "web" }).is_ok());
        assert!(authorize(&a, &Action::Deploy { service: "web" }).is_err());
        assert!(authorize(&p(Role::Admin), &Action::Admin).is_ok());
    }

    #[test]
    fn tokens_are_kept_by_hash() {
        let token = generate_token();
        let mut tokens = Tokens::default();
        tokens.insert(hash_token(&token).to_ascii_uppercase(), p(Role::Viewer));
        assert!(tokens.get(&hash_token(&token)).is_some());
        assert!(tokens.get(&hash_token("other")).is_none());
        assert_ne!(hash_token(&token), token);
    }

    #[test]
    fn role_serializes_with_a_tag() {
        let json =
            serde_json::to_string(&Role::Deployer { services: vec!["web".into()] }).expect("json");
        assert_eq!(json, r#"{"role":"deployer","services":["web"]}"#);
        let back: Role = serde_json::from_str(r#"{"role":"admin"}"#).expect("parse");
        assert_eq!(back, Role::Admin);
    }
}
