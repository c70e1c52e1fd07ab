//! The admin REST API under `/api/v1`, behind the bearer token.

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::auth::Refusal;
use super::{machine_base_url, AppError, AppState};
use crate::dto::{self, EnrollRequest, UpdateRequest};
use crate::mac::Mac;
use crate::policy::State as MState;
use crate::store::{EventQuery, MachineQuery, MachineSearch, MAX_PAGE};

/// Requires `Authorization: Bearer <admin token>` (see [`super::auth`]: constant-time
/// compare, at most 10 wrong tokens a minute per address).
pub async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let peer = super::peer_ip(req.extensions());
    match st.auth.check(peer, given) {
        Ok(()) => next.run(req).await,
        Err(Refusal::Wrong) => {
            AppError::new(StatusCode::UNAUTHORIZED, "wrong admin token").into_response()
        }
        Err(Refusal::TooMany(wait)) => {
            let secs = wait.as_secs().max(1);
            let mut r = AppError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many wrong admin tokens from {peer}; try again in {secs} s with the token from the daemon's data directory (admin-token)"
                ),
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
            r
        }
        Err(Refusal::Missing) => {
            let mut r = AppError::new(
                StatusCode::UNAUTHORIZED,
                "the admin API needs `Authorization: Bearer <token>`; the token is in the daemon's data directory (admin-token)",
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

/// `/api/...` on the machine listener: the API is not served there.
pub async fn elsewhere() -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        "the admin API is served on the admin listener (--admin, default https://0.0.0.0:8443), not on the machine listener",
    )
}

/// `POST /token/rotate`: a new admin token, in the daemon's token file and in force at once;
/// the caller's (old) token stops working with this answer.
pub async fn rotate_token(State(st): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    let (token, file) = st.auth.rotate().map_err(|e| {
        AppError::from(crate::error::Error::Internal(format!(
            "rotating the admin token: {e:#}"
        )))
    })?;
    Ok(Json(
        serde_json::json!({ "token": token, "token_file": file }),
    ))
}

/// Unknown API path.
pub async fn not_found() -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        "no such API endpoint; see docs/api.md",
    )
}

fn parse_mac(s: &str) -> Result<Mac, AppError> {
    s.parse().map_err(|e: crate::mac::MacError| {
        AppError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    })
}

/// Rejects a JSON body that does not parse, with serde's message (which names the field).
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(body).map_err(|e| {
        AppError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("request body: {e}"),
        )
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
    q: Option<String>,
    sort: Option<String>,
    dir: Option<String>,
    offset: Option<usize>,
}

fn machine(m: crate::store::Machine) -> Json<dto::Machine> {
    Json(m.into())
}

/// `GET /machines[?state=S&after=MAC&limit=N]`: a page in MAC order; or, with any of `q`,
/// `sort`, `dir`, `offset`, a search paged by offset (what the web UI lists), its total in
/// `X-Total-Count`.
pub async fn list_machines(
    State(st): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, AppError> {
    let state = q
        .state
        .map(|s| s.parse::<MState>())
        .transpose()
        .map_err(|e| AppError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let after = q.after.as_deref().map(parse_mac).transpose()?;
    if q.q.is_some() || q.sort.is_some() || q.dir.is_some() || q.offset.is_some() {
        if after.is_some() {
            return Err(AppError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "after= pages in MAC order and cannot be combined with q, sort, dir or offset; page a search with offset=",
            ));
        }
        let invalid = |e: String| AppError::new(StatusCode::UNPROCESSABLE_ENTITY, e);
        let sort = q
            .sort
            .as_deref()
            .unwrap_or("mac")
            .parse()
            .map_err(invalid)?;
        let descending = match q.dir.as_deref().unwrap_or("asc") {
            "asc" => false,
            "desc" => true,
            d => return Err(invalid(format!("dir {d:?}: asc or desc"))),
        };
        let found = st
            .admin
            .search(MachineSearch {
                state,
                term: crate::admin::search_term(q.q.as_deref().unwrap_or(""))?,
                sort,
                descending,
                offset: q.offset.unwrap_or(0),
                limit: q.limit.unwrap_or(MAX_PAGE),
            })
            .await?;
        let page: Vec<dto::Machine> = found.machines.into_iter().map(Into::into).collect();
        let mut r = Json(page).into_response();
        r.headers_mut()
            .insert("x-total-count", header::HeaderValue::from(found.total));
        return Ok(r);
    }
    let page = st
        .admin
        .machines(MachineQuery {
            state,
            after,
            limit: q.limit.unwrap_or(MAX_PAGE),
        })
        .await?;
    let page: Vec<dto::Machine> = page.into_iter().map(Into::into).collect();
    Ok(Json(page).into_response())
}

/// `POST /machines`: enroll.
pub async fn enroll(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, AppError> {
    let req: EnrollRequest = json_body(&body)?;
    let m = st.admin.enroll(req).await?;
    Ok((StatusCode::CREATED, machine(m)).into_response())
}

/// `GET /machines/{mac}`.
pub async fn get_machine(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, AppError> {
    Ok(machine(st.admin.machine(parse_mac(&mac)?).await?).into_response())
}

/// `PATCH /machines/{mac}`.
pub async fn update_machine(
    State(st): State<AppState>,
    Path(mac): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, AppError> {
    let mac = parse_mac(&mac)?;
    let req: UpdateRequest = json_body(&body)?;
    Ok(machine(st.admin.update(mac, req).await?).into_response())
}

/// `GET /machines/{mac}/token`: the install token's state (never the token).
pub async fn machine_token(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, AppError> {
    let m = st.admin.machine(parse_mac(&mac)?).await?;
    match st.admin.token_status(&m).await? {
        Some(t) => Ok(Json(t).into_response()),
        None => Err(AppError::new(
            StatusCode::NOT_FOUND,
            format!(
                "machine {} has no install token; one is minted when it boots to install",
                m.mac
            ),
        )),
    }
}

/// `DELETE /machines/{mac}`.
pub async fn delete_machine(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, AppError> {
    st.admin.delete(parse_mac(&mac)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /machines/{mac}/reprovision`.
pub async fn reprovision(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, AppError> {
    Ok(machine(st.admin.reprovision(parse_mac(&mac)?).await?).into_response())
}

/// `POST /machines/{mac}/register`: a fresh registration run (202: queued).
pub async fn register(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, AppError> {
    let m = st.admin.register(parse_mac(&mac)?).await?;
    Ok((StatusCode::ACCEPTED, machine(m)).into_response())
}

#[derive(Deserialize)]
pub struct InventoryQuery {
    host: Option<String>,
}

/// `GET /inventory/ansible[?host=H]`: Ansible's dynamic inventory (`--list`, `--host H`).
pub async fn inventory_ansible(
    State(st): State<AppState>,
    Query(q): Query<InventoryQuery>,
) -> Result<Response, AppError> {
    let machines = st.admin.installed_machines().await?;
    let profiles = st.admin.profile_facts();
    let v = match q.host {
        Some(h) => crate::inventory::ansible_host(&machines, &profiles, &h),
        None => crate::inventory::ansible(&machines, &profiles),
    };
    Ok(Json(v).into_response())
}

/// `GET /inventory/known_hosts`: the pinned host keys in OpenSSH known_hosts form.
pub async fn inventory_known_hosts(State(st): State<AppState>) -> Result<Response, AppError> {
    let machines = st.admin.installed_machines().await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        crate::inventory::known_hosts(&machines),
    )
        .into_response())
}

/// `?format=` of the inventory file routes.
#[derive(Deserialize)]
pub struct FileQuery {
    format: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    prune: bool,
}

fn file_format(f: Option<&str>) -> Result<crate::declare::Format, AppError> {
    f.unwrap_or("yaml")
        .parse()
        .map_err(|e: String| AppError::new(StatusCode::UNPROCESSABLE_ENTITY, e))
}

/// `GET /inventory?format=yaml|toml|csv`: the inventory as a file `POST /inventory` takes.
pub async fn export(
    State(st): State<AppState>,
    Query(q): Query<FileQuery>,
) -> Result<Response, AppError> {
    let format = file_format(q.format.as_deref())?;
    let text = st.admin.export(format).await?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], text).into_response())
}

/// `POST /inventory?format=yaml|toml|csv[&dry_run=true][&prune=true]`: converges the
/// inventory to the file in the body, in one transaction; answers what changed (or, dry,
/// what would).
pub async fn apply(
    State(st): State<AppState>,
    Query(q): Query<FileQuery>,
    body: axum::body::Bytes,
) -> Result<Json<dto::ApplyReport>, AppError> {
    let format = file_format(q.format.as_deref())?;
    let text = std::str::from_utf8(&body).map_err(|e| {
        AppError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("an inventory file is UTF-8 text; this one is not ({e})"),
        )
    })?;
    Ok(Json(
        st.admin.apply(text, format, q.prune, q.dry_run).await?,
    ))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    mac: Option<String>,
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
    #[serde(default)]
    tail: bool,
}

async fn event_page(
    st: &AppState,
    mac: Option<crate::mac::Mac>,
    q: &EventsQuery,
) -> Result<Response, AppError> {
    let page = st
        .admin
        .events(EventQuery {
            mac,
            after: q.after,
            limit: q.limit.unwrap_or(MAX_PAGE),
            tail: q.tail,
        })
        .await?;
    let page: Vec<dto::Event> = page.into_iter().map(Into::into).collect();
    Ok(Json(page).into_response())
}

/// `GET /events[?mac=&after=&limit=]`.
pub async fn events(
    State(st): State<AppState>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, AppError> {
    let mac = q.mac.as_deref().map(parse_mac).transpose()?;
    event_page(&st, mac, &q).await
}

/// `GET /machines/{mac}/events`.
pub async fn machine_events(
    State(st): State<AppState>,
    Path(mac): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, AppError> {
    // No existence check: a deleted machine's history stays readable.
    let mac = parse_mac(&mac)?;
    event_page(&st, Some(mac), &q).await
}

#[derive(Deserialize)]
pub struct RenderQuery {
    profile: Option<String>,
}

/// `GET /machines/{mac}/render/{artifact}[?profile=]`: preview with the install token
/// redacted, optionally as if the machine had another profile.
pub async fn render(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((mac, artifact)): Path<(String, String)>,
    Query(q): Query<RenderQuery>,
) -> Result<Response, AppError> {
    let mac = parse_mac(&mac)?;
    let base = machine_base_url(&st, &headers)?;
    let (kind, body) = st
        .admin
        .preview_as(mac, q.profile.as_deref(), &artifact, &base)
        .await?;
    Ok(([(header::CONTENT_TYPE, kind.content_type())], body).into_response())
}

/// `GET /profiles`.
pub async fn profiles(State(st): State<AppState>) -> Response {
    let cat = st.admin.catalog();
    let list: Vec<dto::Profile> = cat.profiles().values().map(Into::into).collect();
    Json(list).into_response()
}

/// `GET /profiles/{name}`.
pub async fn profile(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    let cat = st.admin.catalog();
    let p = cat.profile(&name).map_err(crate::error::Error::from)?;
    Ok(Json(dto::Profile::from(p)).into_response())
}

/// `POST /reload`: re-read profiles and templates; the old ones stay on error.
pub async fn reload(State(st): State<AppState>) -> Result<Response, AppError> {
    let n = st.admin.reload()?;
    Ok(Json(serde_json::json!({ "profiles": n })).into_response())
}

/// `GET /status`: machines by state, and what the inventory's bounds did since start.
pub async fn status(State(st): State<AppState>) -> Result<Response, AppError> {
    let (machines, inventory) = st.admin.status().await?;
    Ok(Json(dto::Status {
        machines,
        inventory,
    })
    .into_response())
}

/// `GET /groups`: every group, by name.
pub async fn groups(State(st): State<AppState>) -> Json<Vec<dto::Group>> {
    Json(st.admin.groups().into_iter().map(Into::into).collect())
}

/// `GET /groups/{name}`.
pub async fn group(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<dto::Group>, AppError> {
    Ok(Json(st.admin.group(&name)?.into()))
}

/// `POST /groups`: create (409 if the name is taken).
pub async fn create_group(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, AppError> {
    let g: dto::Group = json_body(&body)?;
    let name = g.name.clone();
    st.admin.put_group(g, false).await?;
    Ok((
        StatusCode::CREATED,
        Json(dto::Group::from(st.admin.group(&name)?)),
    )
        .into_response())
}

/// `PUT /groups/{name}`: create or replace the whole group (201 when created).
pub async fn put_group(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, AppError> {
    let mut g: dto::Group = json_body(&body)?;
    name_from_path(&mut g.name, &name, "group")?;
    let created = st.admin.put_group(g, true).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(dto::Group::from(st.admin.group(&name)?))).into_response())
}

/// `DELETE /groups/{name}`.
pub async fn delete_group(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    st.admin.delete_group(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /rules`: every discovery rule, in the order they are tried.
pub async fn rules(State(st): State<AppState>) -> Json<Vec<dto::Rule>> {
    Json(st.admin.rules().into_iter().map(Into::into).collect())
}

/// `GET /rules/{name}`.
pub async fn rule(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<dto::Rule>, AppError> {
    Ok(Json(st.admin.rule(&name)?.into()))
}

/// `POST /rules`: create (409 if the name is taken).
pub async fn create_rule(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, AppError> {
    let r: dto::Rule = json_body(&body)?;
    let name = r.name.clone();
    st.admin.put_rule(r, false).await?;
    Ok((
        StatusCode::CREATED,
        Json(dto::Rule::from(st.admin.rule(&name)?)),
    )
        .into_response())
}

/// `PUT /rules/{name}`: create or replace the whole rule, keeping its count (201 when
/// created).
pub async fn put_rule(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, AppError> {
    let mut r: dto::Rule = json_body(&body)?;
    name_from_path(&mut r.name, &name, "rule")?;
    let status = if st.admin.put_rule(r, true).await? {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(dto::Rule::from(st.admin.rule(&name)?))).into_response())
}

/// `DELETE /rules/{name}`.
pub async fn delete_rule(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    st.admin.delete_rule(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /machines/{mac}/confirm`: enroll a discovered machine as the propose-mode rule that
/// matches it says.
pub async fn confirm(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, AppError> {
    Ok(machine(st.admin.confirm(parse_mac(&mac)?).await?).into_response())
}

/// The `name` of a `PUT /{what}s/{name}` body: the path's when the body leaves it out; another
/// is refused (nothing is renamed by a PUT).
fn name_from_path(body: &mut String, path: &str, what: &str) -> Result<(), AppError> {
    if body.is_empty() {
        *body = path.to_string();
    }
    if body != path {
        return Err(AppError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the body names {what} {body:?} but the path {path:?}; a {what} cannot be renamed (create the new one, then delete the old)"
            ),
        ));
    }
    Ok(())
}
