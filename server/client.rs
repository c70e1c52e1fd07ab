//! The CLI's client for the daemon's REST API.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::dto;
use crate::mac::Mac;
use crate::policy::State;

/// Where the daemon is and how to authenticate.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// A failed API call: the server's message, and whether it was the caller's input.
#[derive(Debug)]
pub struct ClientError {
    /// What to print.
    pub message: String,
    /// The server refused the input (4xx other than auth): exit code 2.
    pub bad_input: bool,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`). The token comes from `token`, or
    /// the file `token_file`, or the default data directory's `admin-token`.
    pub fn new(
        base: &str,
        token: Option<String>,
        token_file: Option<PathBuf>,
    ) -> Result<Client, ClientError> {
        let token = match token.filter(|t| !t.trim().is_empty()) {
            Some(t) => t.trim().to_string(),
            None => {
                let path = token_file
                    .unwrap_or_else(|| crate::config::default_data_dir().join("admin-token"));
                std::fs::read_to_string(&path)
                    .map_err(|e| ClientError {
                        message: format!(
                            "cannot read the admin token from {}: {e}; pass --token-file FILE or set PROVISION_TOKEN",
                            path.display()
                        ),
                        bad_input: false,
                    })?
                    .trim()
                    .to_string()
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    /// Calls the API; returns the response body (JSON or text) on 2xx.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<String, ClientError> {
        let url = format!("{}/api/v1{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let res = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (m, b) => {
                let req = match m {
                    "PATCH" => self.agent.patch(&url),
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                }
                .header("Authorization", &auth);
                match b {
                    Some(b) => req.send_json(b),
                    None => req.send_empty(),
                }
            }
        };
        let mut res = res.map_err(|e| ClientError {
            message: format!("cannot reach provision at {}: {e}; is `provision serve` running? (--server URL / PROVISION_URL)", self.base),
            bad_input: false,
        })?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        Err(ClientError {
            message: if status == 401 {
                format!("{message} (check --token-file / PROVISION_TOKEN)")
            } else {
                message
            },
            bad_input: matches!(status, 400 | 404 | 409 | 410 | 422),
        })
    }

    /// Calls the API and parses its JSON answer as `T`.
    pub fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let text = self.call(method, path, body)?;
        serde_json::from_str(&text).map_err(|e| ClientError {
            message: format!("the server's answer to {method} {path} is not what this client expects ({e}); are the daemon and the CLI the same version?"),
            bad_input: false,
        })
    }

    /// `GET` a JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send("GET", path, None::<&()>)
    }

    /// One machine.
    pub fn machine(&self, mac: Mac) -> Result<dto::Machine, ClientError> {
        self.get(&format!("/machines/{mac}"))
    }

    /// Every machine (in one state), walking the API's pages in MAC order.
    pub fn machines(&self, state: Option<State>) -> Result<Vec<dto::Machine>, ClientError> {
        let filter = state.map(|s| format!("state={s}&")).unwrap_or_default();
        let mut all: Vec<dto::Machine> = Vec::new();
        loop {
            let after = all
                .last()
                .map(|m| format!("after={}", m.mac))
                .unwrap_or_default();
            let page: Vec<dto::Machine> = self.get(&format!("/machines?{filter}{after}"))?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// The newest `n` events (of one machine, or all), oldest first.
    pub fn events(&self, mac: Option<Mac>, n: usize) -> Result<Vec<dto::Event>, ClientError> {
        let n = n.clamp(1, crate::store::MAX_PAGE);
        self.get(&match mac {
            Some(m) => format!("/machines/{m}/events?tail=true&limit={n}"),
            None => format!("/events?tail=true&limit={n}"),
        })
    }

    /// Enrolls a machine.
    pub fn enroll(&self, req: &dto::EnrollRequest) -> Result<dto::Machine, ClientError> {
        self.send("POST", "/machines", Some(req))
    }

    /// Changes a machine.
    pub fn update(&self, mac: Mac, req: &dto::UpdateRequest) -> Result<dto::Machine, ClientError> {
        self.send("PATCH", &format!("/machines/{mac}"), Some(req))
    }

    /// Deletes a machine.
    pub fn delete(&self, mac: Mac) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/machines/{mac}"), None::<&()>)
            .map(drop)
    }

    /// Sends a machine round again.
    pub fn reprovision(&self, mac: Mac) -> Result<dto::Machine, ClientError> {
        self.send("POST", &format!("/machines/{mac}/reprovision"), None::<&()>)
    }

    /// Starts a registration run.
    pub fn register(&self, mac: Mac) -> Result<dto::Machine, ClientError> {
        self.send("POST", &format!("/machines/{mac}/register"), None::<&()>)
    }

    /// One profile.
    pub fn profile(&self, name: &str) -> Result<dto::Profile, ClientError> {
        self.get(&format!("/profiles/{name}"))
    }
}
