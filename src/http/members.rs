//! Project membership over HTTP, for project owners (the "manage members" part of the owner
//! role): `GET .../members` lists, `PUT .../members/<user>` with `{"role":"editor"}` sets a
//! role, `DELETE .../members/<user>` removes a stored membership. The host's operator does the
//! same with `transship member`; memberships written in the config file stay read-only here.
//! A caller proves ownership with Basic credentials, or with a token granting
//! `project:<project>:admin` (which the token endpoint gives owners only).

use std::sync::Arc;

use http::request::Parts;
use http::{Method, StatusCode};
use serde::Deserialize;

use super::body::{RequestBody, read_limited};
use super::response::{Resp, json};
use crate::App;
use crate::auth::keys::{AdminError, Role};
use crate::auth::record_store::RecordError;
use crate::auth::{ADMIN_ACTION, Caller, PROJECT_SCOPE};
use crate::oci::{ErrorCode, RegistryError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRole {
    role: Role,
}

pub async fn serve(
    app: &Arc<App>,
    parts: &Parts,
    mut body: RequestBody,
    caller: &Caller,
    project: &str,
    user: Option<&str>,
) -> Result<Resp, RegistryError> {
    // The challenge names the scope a token needs here (only for a well-formed project name:
    // the path is client input and ends up in a header).
    let scope = project
        .parse::<crate::oci::RepoName>()
        .is_ok()
        .then(|| format!("{PROJECT_SCOPE}:{project}:{ADMIN_ACTION}"));
    app.auth
        .require_owner(caller, project)
        .map_err(|d| super::token::denial_error(app, parts, d, scope))?;
    let ids = app.auth.identities.clone();
    let (project, user) = (project.to_string(), user.map(str::to_string));
    match (&parts.method, user) {
        (&Method::GET, None) => {
            let members = ids.members(&project);
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "project": project, "members": members }).to_string(),
            ))
        }
        (&Method::PUT, Some(user)) => {
            let raw = read_limited(&mut body, 4096)
                .await
                .map_err(|_| bad("the body must be a small JSON object"))?;
            let SetRole { role } = serde_json::from_slice(&raw).map_err(|e| {
                bad(&format!(
                    "expected {{\"role\": \"owner|editor|viewer\"}}: {e}"
                ))
            })?;
            super::blocking_admin(move || ids.set_member(&project, &user, role)).await?;
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "role": role.as_str() }).to_string(),
            ))
        }
        (&Method::DELETE, Some(user)) => {
            super::blocking_admin(move || ids.remove_member(&project, &user)).await?;
            Ok(super::response::empty(StatusCode::NO_CONTENT))
        }
        _ => Err(RegistryError::unsupported(
            "members: GET the list, PUT or DELETE one member",
        )),
    }
}

fn bad(message: &str) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported, message).with_status(400)
}

impl From<AdminError> for RegistryError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Invalid(m) => bad(&m),
            AdminError::NotFound(m) => RegistryError::new(ErrorCode::NotFound, m),
            AdminError::Store(e) => e.into(),
            AdminError::Records(RecordError::Store(e)) => e.into(),
            AdminError::Records(e) => RegistryError::internal(e.to_string()),
        }
    }
}
