//! The CLI's client for the daemon's REST API.

use std::path::PathBuf;

use serde_json::Value;

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
        body: Option<&Value>,
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

    /// Calls the API and parses JSON.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let text = self.call(method, path, body)?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| ClientError {
            message: format!("the server's answer is not JSON: {e}"),
            bad_input: false,
        })
    }
}
