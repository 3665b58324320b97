//! A fake Cloud OS Login API (`oslogin.googleapis.com/v1`), written from the
//! public REST reference, served by the GCE fake's listener (so it shares
//! its token checks): `users.getLoginProfile`, `users.importSshPublicKey`,
//! `users.sshPublicKeys.get/patch/delete`.
//!
//! It checks what a client sends the way the service does: the caller may
//! only touch its own profile, `key` must be an OpenSSH public key whose
//! blob names its own type, `expirationTimeUsec` is an int64 in
//! microseconds (a JSON string or number) in the future, request bodies may
//! hold only SshPublicKey's fields, and `updateMask` names what a patch
//! changes. A POSIX account is created on the first import, named as Google
//! names them (`sa_<uniqueId>` for service accounts, the email with every
//! other character turned into `_` for users) unless a test sets another.
//!
//! Every call is kept with its body (`requests`), and the keys each POSIX
//! user holds now (`authorized_keys`) stand in for what the guest's OS
//! Login `AuthorizedKeysCommand` would fetch.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use sha2::Digest as _;

/// One call as the fake saw it.
#[derive(Debug, Clone)]
pub struct OsLoginCall {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub status: u16,
}

#[derive(Debug, Clone)]
struct StoredKey {
    key: String,
    expiration_usec: Option<i64>,
}

#[derive(Debug, Default)]
struct Account {
    /// POSIX accounts by project id.
    posix: BTreeMap<String, (String, u32)>,
    keys: BTreeMap<String, StoredKey>,
}

#[derive(Debug, Default)]
pub struct Profiles {
    accounts: HashMap<String, Account>,
    /// Usernames tests choose instead of Google's derived ones.
    usernames: HashMap<String, String>,
    pub requests: Vec<OsLoginCall>,
    next_uid: u32,
}

fn now_usec() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn error(status: u16, grpc: &str, message: &str) -> (u16, Value) {
    (
        status,
        json!({"error": {"code": status, "message": message, "status": grpc}}),
    )
}

/// Validates an OpenSSH public key line; returns its fingerprint (hex
/// SHA-256 of the key blob).
fn check_key(line: &str) -> Result<String, String> {
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err("Invalid key format".into());
    };
    const TYPES: [&str; 6] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    if !TYPES.contains(&kind) {
        return Err(format!("Invalid key type {kind}"));
    }
    let blob = STANDARD
        .decode(b64)
        .map_err(|_| "Invalid key format: not base64".to_string())?;
    let n = blob
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("Invalid key format: truncated")?;
    if blob.get(4..4 + n) != Some(kind.as_bytes()) {
        return Err("Invalid key format: the key blob does not match its type".into());
    }
    Ok(hex::encode(sha2::Sha256::digest(&blob)))
}

/// int64 in proto3 JSON: a string of digits or a number.
fn int64(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl Profiles {
    pub fn set_username(&mut self, email: &str, username: &str) {
        self.usernames.insert(email.into(), username.into());
    }

    /// Adds a key to an account directly (as another machine of the user would).
    pub fn add_key(&mut self, email: &str, key: &str, expiration_usec: Option<i64>) {
        let fp = check_key(key).expect("a valid key");
        self.accounts.entry(email.into()).or_default().keys.insert(
            fp,
            StoredKey {
                key: key.into(),
                expiration_usec,
            },
        );
    }

    /// `(username, key lines)` of every POSIX account, unexpired keys only.
    pub fn authorized_keys(&self) -> Vec<(String, Vec<String>)> {
        let now = now_usec();
        let mut out = Vec::new();
        for account in self.accounts.values() {
            let keys: Vec<String> = account
                .keys
                .values()
                .filter(|k| k.expiration_usec.is_none_or(|e| e > now))
                .map(|k| k.key.clone())
                .collect();
            for (username, _) in account.posix.values() {
                out.push((username.clone(), keys.clone()));
            }
        }
        out
    }

    /// The keys on `email`'s profile: `(key, expirationTimeUsec)`.
    pub fn keys(&self, email: &str) -> Vec<(String, Option<i64>)> {
        self.accounts
            .get(email)
            .map(|a| {
                a.keys
                    .values()
                    .map(|k| (k.key.clone(), k.expiration_usec))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn username_for(&self, email: &str) -> String {
        if let Some(u) = self.usernames.get(email) {
            return u.clone();
        }
        if email.ends_with(".gserviceaccount.com") {
            // Google: `sa_` and the service account's unique id.
            let digest = sha2::Sha256::digest(email.as_bytes());
            let id = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 10u64.pow(20);
            return format!("sa_{id}");
        }
        email
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    }

    fn profile_json(&self, email: &str) -> Value {
        let account = self.accounts.get(email);
        let posix: Vec<Value> = account
            .map(|a| {
                a.posix
                    .iter()
                    .map(|(project, (username, uid))| {
                        json!({
                            "primary": true,
                            "username": username,
                            "uid": uid.to_string(),
                            "gid": uid.to_string(),
                            "homeDirectory": format!("/home/{username}"),
                            "operatingSystemType": "LINUX",
                            "accountId": project,
                            "name": format!("users/{email}/projects/{project}"),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let keys: serde_json::Map<String, Value> = account
            .map(|a| {
                a.keys
                    .iter()
                    .map(|(fp, k)| (fp.clone(), key_json(email, fp, k)))
                    .collect()
            })
            .unwrap_or_default();
        let mut v = json!({"name": format!("{}", 100000000000000000u64 + email.len() as u64)});
        if !posix.is_empty() {
            v["posixAccounts"] = json!(posix);
        }
        if !keys.is_empty() {
            v["sshPublicKeys"] = Value::Object(keys);
        }
        v
    }

    /// Handles `/v1/...`; `principal` is the token's owner (`serviceAccount:x`
    /// or `user:x`).
    pub fn handle(
        &mut self,
        principal: &str,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let body_json: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return self.log(
                        method,
                        path,
                        query,
                        Value::String(String::from_utf8_lossy(body).into()),
                        error(
                            400,
                            "INVALID_ARGUMENT",
                            &format!("Invalid JSON payload received. {e}"),
                        ),
                    );
                }
            }
        };
        let answer = self.route(principal, method, path, query, &body_json);
        self.log(method, path, query, body_json, answer)
    }

    fn log(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        body: Value,
        answer: (u16, Value),
    ) -> (u16, Value) {
        self.requests.push(OsLoginCall {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            body,
            status: answer.0,
        });
        answer
    }

    fn route(
        &mut self,
        principal: &str,
        method: &str,
        path: &str,
        query: &str,
        body: &Value,
    ) -> (u16, Value) {
        let Some(rest) = path.strip_prefix("/v1/users/") else {
            return error(404, "NOT_FOUND", "Requested entity was not found.");
        };
        let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let caller = principal
            .split_once(':')
            .map(|(_, e)| e)
            .unwrap_or(principal)
            .to_string();
        let (user, tail) = match rest.split_once('/') {
            Some((u, t)) => (percent_decode(u), Some(t.to_string())),
            None => (percent_decode(rest), None),
        };
        let (user, verb) = match user.split_once(':') {
            Some((u, v)) if tail.is_none() => (u.to_string(), Some(v.to_string())),
            _ => (user, None),
        };
        if user != caller {
            return error(
                403,
                "PERMISSION_DENIED",
                "The caller does not have permission",
            );
        }
        match (method, verb.as_deref(), tail.as_deref()) {
            ("GET", None, Some("loginProfile")) => (200, self.profile_json(&user)),
            ("POST", Some("importSshPublicKey"), None) => {
                let project = params.get("projectId").cloned();
                self.import(&user, project, body)
            }
            (m, None, Some(t)) if t.starts_with("sshPublicKeys/") => {
                let fp = t.trim_start_matches("sshPublicKeys/").to_string();
                self.key_call(&user, m, &fp, params.get("updateMask"), body)
            }
            _ => error(404, "NOT_FOUND", "Requested entity was not found."),
        }
    }

    /// Checks an SshPublicKey body; returns `(key, expiration)`.
    fn check_body(
        body: &Value,
        need_key: bool,
    ) -> Result<(Option<String>, Option<i64>), (u16, Value)> {
        let Some(obj) = body.as_object() else {
            return Err(error(
                400,
                "INVALID_ARGUMENT",
                "Request body must be an SshPublicKey",
            ));
        };
        for k in obj.keys() {
            if !["key", "expirationTimeUsec", "fingerprint", "name"].contains(&k.as_str()) {
                return Err(error(
                    400,
                    "INVALID_ARGUMENT",
                    &format!(
                        "Invalid JSON payload received. Unknown name \"{k}\": Cannot find field."
                    ),
                ));
            }
        }
        let key = obj.get("key").and_then(Value::as_str).map(str::to_string);
        if need_key && key.is_none() {
            return Err(error(
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
            ));
        }
        if let Some(k) = &key
            && let Err(why) = check_key(k)
        {
            return Err(error(400, "INVALID_ARGUMENT", &why));
        }
        let expiration = match obj.get("expirationTimeUsec") {
            None => None,
            Some(v) => match int64(v) {
                Some(e) if e > now_usec() => Some(e),
                Some(_) => {
                    return Err(error(
                        400,
                        "INVALID_ARGUMENT",
                        "Expiration time must be in the future",
                    ));
                }
                None => {
                    return Err(error(
                        400,
                        "INVALID_ARGUMENT",
                        "Invalid value at 'ssh_public_key.expiration_time_usec' (TYPE_INT64)",
                    ));
                }
            },
        };
        Ok((key, expiration))
    }

    fn import(&mut self, user: &str, project: Option<String>, body: &Value) -> (u16, Value) {
        let (key, expiration) = match Self::check_body(body, true) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let key = key.expect("checked");
        let fp = check_key(&key).expect("checked");
        let username = self.username_for(user);
        self.next_uid += 1;
        let uid = 1_000_000 + self.next_uid;
        let account = self.accounts.entry(user.to_string()).or_default();
        if let Some(project) = project {
            account
                .posix
                .entry(project)
                .or_insert_with(|| (username, uid));
        }
        account.keys.insert(
            fp,
            StoredKey {
                key,
                expiration_usec: expiration,
            },
        );
        (200, json!({"loginProfile": self.profile_json(user)}))
    }

    fn key_call(
        &mut self,
        user: &str,
        method: &str,
        fp: &str,
        mask: Option<&String>,
        body: &Value,
    ) -> (u16, Value) {
        let Some(account) = self.accounts.get_mut(user) else {
            return error(404, "NOT_FOUND", "Requested entity was not found.");
        };
        if !account.keys.contains_key(fp) {
            return error(404, "NOT_FOUND", "Requested entity was not found.");
        }
        match method {
            "GET" => (200, key_json(user, fp, &account.keys[fp])),
            "DELETE" => {
                account.keys.remove(fp);
                (200, json!({}))
            }
            "PATCH" => {
                let (key, expiration) = match Self::check_body(body, false) {
                    Ok(v) => v,
                    Err(e) => return e,
                };
                let fields: Vec<&str> = match mask {
                    Some(m) => m.split(',').map(str::trim).collect(),
                    None => vec!["key", "expirationTimeUsec"],
                };
                let stored = account.keys.get_mut(fp).expect("checked");
                for f in fields {
                    match f {
                        "expirationTimeUsec" | "expiration_time_usec" => {
                            stored.expiration_usec = expiration
                        }
                        "key" => {
                            if let Some(k) = &key {
                                stored.key = k.clone();
                            }
                        }
                        other => {
                            return error(
                                400,
                                "INVALID_ARGUMENT",
                                &format!("Invalid field in update_mask: {other}"),
                            );
                        }
                    }
                }
                let stored = stored.clone();
                (200, key_json(user, fp, &stored))
            }
            _ => error(404, "NOT_FOUND", "Requested entity was not found."),
        }
    }
}

fn key_json(email: &str, fp: &str, k: &StoredKey) -> Value {
    let mut v = json!({
        "key": k.key,
        "fingerprint": fp,
        "name": format!("users/{email}/sshPublicKeys/{fp}"),
    });
    if let Some(e) = k.expiration_usec {
        v["expirationTimeUsec"] = json!(e.to_string());
    }
    v
}
