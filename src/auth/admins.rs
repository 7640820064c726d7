//! Registry administrators (`auth.admins`): the users who may see and control the whole
//! pull-through cache. Owning a project grants nothing here. An admin proves who they are
//! with Basic credentials (a password or an access token of their own); tokens from the
//! token endpoint never carry this right.

use super::{Authorizer, Caller, Denial, Identity, audit_denial};
use crate::auth::keys::Subject;

impl Authorizer {
    /// `Ok` if `caller` authenticated directly as a user listed in `auth.admins`.
    pub fn require_admin(&self, caller: &Caller) -> Result<(), Denial> {
        let outcome = match &caller.identity {
            Identity::Anonymous => Err(Denial::unauthenticated("authentication required")),
            Identity::Token(_) => Err(Denial::unauthenticated(
                "registry administration takes the Basic credentials of an admin, not a token",
            )),
            Identity::Subject(Subject::User(name)) if self.config.admins.contains(name) => Ok(()),
            Identity::Subject(s) => Err(Denial::Forbidden(format!(
                "{s} is not a registry admin (auth.admins)"
            ))),
        };
        outcome.inspect_err(|d| audit_denial(caller, "administer the cache", d))
    }
}
