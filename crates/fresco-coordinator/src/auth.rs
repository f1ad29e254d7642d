//! Bearer tokens with roles. Tokens come from a file (`role token` per line, `#` comments) or the
//! environment (`role:token,role:token`); the CLI reads those, this module only checks requests.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Worker,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "client" => Ok(Self::Client),
            "worker" => Ok(Self::Worker),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown role {other:?} (client, worker or admin)")),
        }
    }
}

/// The accepted tokens. Empty means auth is off (allowed only on loopback, see `server`).
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_token: Arc<HashMap<String, Role>>,
}

impl Tokens {
    pub fn new(entries: impl IntoIterator<Item = (Role, String)>) -> Self {
        Self { by_token: Arc::new(entries.into_iter().map(|(r, t)| (t, r)).collect()) }
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }

    /// Parses `role token` lines; errors name the line.
    pub fn parse_file(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (role, token) = line.split_once(char::is_whitespace).ok_or_else(|| format!("line {}: expected \"role token\"", i + 1))?;
            let role: Role = role.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
            let token = token.trim();
            if token.len() < 8 {
                return Err(format!("line {}: token is shorter than 8 characters", i + 1));
            }
            entries.push((role, token.to_string()));
        }
        Ok(Self::new(entries))
    }

    /// Parses `role:token,role:token`.
    pub fn parse_env(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, item) in text.split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
            let (role, token) = item.split_once(':').ok_or_else(|| format!("entry {}: expected role:token", i + 1))?;
            entries.push((role.parse()?, token.to_string()));
        }
        Ok(Self::new(entries))
    }

    fn role_of<T>(&self, req: &Request<T>) -> Result<Role, Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        let value = header.to_str().map_err(|_| Status::unauthenticated("malformed authorization header"))?;
        let token = value.strip_prefix("Bearer ").ok_or_else(|| Status::unauthenticated("expected \"Bearer <token>\""))?;
        self.by_token.get(token.trim()).copied().ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// Admits the request when its token's role is `role` or admin.
    pub fn check<T>(&self, req: &Request<T>, role: Role) -> Result<(), Status> {
        if self.is_empty() {
            return Ok(());
        }
        match self.role_of(req)? {
            r if r == role || r == Role::Admin => Ok(()),
            r => Err(Status::permission_denied(format!("a {r:?} token cannot call this service"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn roles_are_enforced() {
        let t = Tokens::parse_file("# tokens\nclient client-secret\nworker worker-secret\nadmin admin-secret\n").unwrap();
        assert!(t.check(&req(Some("client-secret")), Role::Client).is_ok());
        assert_eq!(t.check(&req(Some("worker-secret")), Role::Client).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(t.check(&req(Some("client-secret")), Role::Worker).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(t.check(&req(Some("admin-secret")), Role::Worker).is_ok());
        assert_eq!(t.check(&req(None), Role::Client).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(t.check(&req(Some("nope")), Role::Client).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(Tokens::default().check(&req(None), Role::Worker).is_ok());
    }

    #[test]
    fn bad_token_files_name_the_line() {
        assert!(Tokens::parse_file("client short").unwrap_err().contains("line 1"));
        assert!(Tokens::parse_file("\nroot abcdefghij").unwrap_err().contains("line 2"));
        assert_eq!(Tokens::parse_env("client:abcdefgh, worker:ijklmnop").unwrap().by_token.len(), 2);
    }
}
