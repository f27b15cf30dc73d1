//! The OAuth2 authorization server of Blue Button Plus Pull: app
//! registration (operator, open RFC 7591, trusted via a registry's software
//! statement), the authorization code grant with PKCE, refresh tokens,
//! RFC 7009 revocation and RFC 7662 introspection.
//!
//! Apps, grants and tokens are store records; tokens are kept only as
//! SHA-256 hashes. Pending consent requests and authorization codes live in
//! memory: both last a minute or two and a restart merely makes the patient
//! start again.

use super::jwt::{self, Jwk, SigningKey};
use crate::config::{JwksSource, PullConfig, RegistryConfig};
use crate::documents::index;
use crate::store::{get_json, put_json, Storage, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const APPS: &str = "app";
pub const TOKENS: &str = "token";
pub const GRANTS: &str = "grant";

/// How long a consent page stays valid.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Wrong passwords allowed on one consent page before it is dropped.
const MAX_LOGIN_FAILURES: u32 = 5;
/// How long a fetched registry JWKS is used before fetching it again.
const JWKS_TTL: Duration = Duration::from_secs(3600);
const MAX_PENDING: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// An RFC 6749 / 7591 error: `code` is the `error` value.
    #[error("{code}: {description}")]
    Protocol {
        code: &'static str,
        description: String,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("documents: {0}")]
    Documents(#[from] index::DocumentError),
    #[error("random numbers: {0}")]
    Random(String),
}

impl OAuthError {
    pub fn code(&self) -> &'static str {
        match self {
            OAuthError::Protocol { code, .. } => code,
            _ => "server_error",
        }
    }

    pub fn description(&self) -> String {
        match self {
            OAuthError::Protocol { description, .. } => description.clone(),
            other => other.to_string(),
        }
    }
}

fn err(code: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError::Protocol {
        code,
        description: description.into(),
    }
}

/// How an app came to be registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Registration {
    /// RFC 7591 with no software statement: shown to patients as unverified.
    Open,
    /// Vouched for by a configured registry.
    Registry { name: String },
    /// Added by the operator with `hispd apps add`.
    Operator,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct App {
    pub client_id: String,
    /// SHA-256 (hex) of the client secret; None for public clients.
    pub secret_hash: Option<String>,
    pub name: String,
    pub client_uri: Option<String>,
    pub redirect_uris: Vec<String>,
    /// Scopes the app may ask for (None: any supported scope).
    pub scope: Option<String>,
    pub registration: Registration,
    pub software_id: Option<String>,
    pub created: i64,
}

impl App {
    pub fn is_public(&self) -> bool {
        self.secret_hash.is_none()
    }

    /// Who vouches for the app, for the consent page; None: nobody.
    pub fn verified_by(&self) -> Option<String> {
        match &self.registration {
            Registration::Open => None,
            Registration::Registry { name } => Some(format!("registry {name}")),
            Registration::Operator => Some("this service's operator".into()),
        }
    }
}

/// What an access token allows, per SMART v2 permissions we serve (read and
/// search), plus the Blue Button Plus `summary` and `search` scopes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(pub Vec<String>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Search,
}

const RESOURCES: [&str; 4] = ["*", "Patient", "DocumentReference", "Binary"];
const PLAIN_SCOPES: [&str; 7] = [
    "openid",
    "fhirUser",
    "launch/patient",
    "offline_access",
    "online_access",
    "summary",
    "search",
];

/// Every scope the server grants, for discovery.
pub fn supported_scopes() -> Vec<String> {
    let mut v: Vec<String> = PLAIN_SCOPES.iter().map(|s| s.to_string()).collect();
    for r in RESOURCES {
        v.push(format!("patient/{r}.rs"));
        v.push(format!("patient/{r}.read"));
    }
    v
}

impl Scopes {
    /// The supported part of a requested scope string, normalised: SMART v2
    /// permissions are cut down to `r` and `s` (this server is read-only),
    /// v1 `.read`/`.*` become `.read`; unknown scopes are left out.
    pub fn grantable(requested: &str) -> Scopes {
        let mut out: Vec<String> = Vec::new();
        for s in requested.split(' ').filter(|s| !s.is_empty()) {
            let normalised = if PLAIN_SCOPES.contains(&s) {
                Some(s.to_string())
            } else if let Some(rest) = s.strip_prefix("patient/") {
                rest.split_once('.').and_then(|(res, perm)| {
                    if !RESOURCES.contains(&res) {
                        return None;
                    }
                    match perm {
                        "read" | "*" => Some(format!("patient/{res}.read")),
                        p if !p.is_empty() && p.len() <= 5 && is_ordered_subset(p, "cruds") => {
                            let kept: String =
                                p.chars().filter(|c| matches!(c, 'r' | 's')).collect();
                            (!kept.is_empty()).then(|| format!("patient/{res}.{kept}"))
                        }
                        _ => None,
                    }
                })
            } else {
                None
            };
            if let Some(n) = normalised {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        Scopes(out)
    }

    pub fn has(&self, s: &str) -> bool {
        self.0.iter().any(|x| x == s)
    }

    /// Whether `resource` may be read or searched.
    pub fn allows(&self, resource: &str, access: Access) -> bool {
        let want = match access {
            Access::Read => 'r',
            Access::Search => 's',
        };
        let by_resource = self.0.iter().any(|s| {
            s.strip_prefix("patient/")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(res, perm)| {
                    (res == "*" || res == resource) && (perm == "read" || perm.contains(want))
                })
        });
        let by_bbplus = match resource {
            // BB+ search: find and read documents; summary: the latest one.
            "DocumentReference" | "Binary" => self.has("search"),
            _ => false,
        };
        by_resource || by_bbplus
    }

    /// The latest summary (GET /bb/summary, `$docref` without parameters).
    pub fn allows_summary(&self) -> bool {
        self.has("summary") || self.allows("DocumentReference", Access::Read)
    }

    /// Binary content of a document: any right to the document gives it.
    pub fn allows_binary(&self) -> bool {
        self.allows("Binary", Access::Read)
            || self.allows("DocumentReference", Access::Read)
            || self.has("summary")
    }

    pub fn as_string(&self) -> String {
        self.0.join(" ")
    }
}

fn is_ordered_subset(p: &str, order: &str) -> bool {
    let mut it = order.chars();
    p.chars().all(|c| it.by_ref().any(|o| o == c))
}

/// A token's stored form (keyed by the token's SHA-256).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenRecord {
    refresh: bool,
    client_id: String,
    patient: String,
    scope: String,
    grant: String,
    issued: i64,
    expires: i64,
    /// A refresh token already exchanged for a new one: reuse revokes the grant.
    #[serde(default)]
    rotated: bool,
}

/// One patient's authorization of one app; revoking it ends every token.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GrantRecord {
    client_id: String,
    patient: String,
    scope: String,
    created: i64,
}

/// A valid access token's meaning.
#[derive(Clone, Debug)]
pub struct Authorized {
    pub client_id: String,
    pub patient: String,
    pub scopes: Scopes,
}

/// A validated authorization request waiting for the patient.
#[derive(Clone, Debug)]
pub struct Pending {
    pub client_id: String,
    pub app_name: String,
    pub verified_by: Option<String>,
    pub client_uri: Option<String>,
    pub redirect_uri: String,
    pub scopes: Scopes,
    state: Option<String>,
    challenge: Option<String>,
    nonce: Option<String>,
    pub csrf: String,
    expires: Instant,
    failures: u32,
}

struct Code {
    client_id: String,
    redirect_uri: String,
    patient: String,
    scopes: Scopes,
    challenge: Option<String>,
    nonce: Option<String>,
    expires: Instant,
    /// Set once exchanged; a second use revokes this grant.
    used: Option<String>,
}

/// What the authorization endpoint does with a request.
#[derive(Debug)]
pub enum AuthorizeStart {
    /// Show the consent page for this request id.
    Consent {
        request: String,
        pending: Box<Pending>,
    },
    /// Tell the user (not the app): client or redirect URI cannot be trusted.
    Refuse(String),
    /// Send the user agent back to the app with an error.
    Redirect(String),
}

/// What the consent form submission leads to.
#[derive(Debug)]
pub enum AuthorizeFinish {
    Redirect(String),
    /// Wrong credentials: show the page again with this message.
    Retry {
        request: String,
        pending: Box<Pending>,
        message: String,
    },
    Refuse(String),
}

struct RegistryState {
    config: RegistryConfig,
    keys: tokio::sync::Mutex<Option<(Vec<Jwk>, Instant)>>,
}

pub struct OAuth {
    store: Arc<dyn Storage>,
    config: PullConfig,
    signing: SigningKey,
    fetch: crate::http::FetchLimits,
    registries: Vec<RegistryState>,
    pending: Mutex<HashMap<String, Pending>>,
    codes: Mutex<HashMap<String, Code>>,
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn random_token(prefix: &str) -> Result<String, OAuthError> {
    let mut b = [0u8; 32];
    openssl::rand::rand_bytes(&mut b).map_err(|e| OAuthError::Random(e.to_string()))?;
    Ok(format!("{prefix}{}", jwt::b64url(&b)))
}

fn hash(token: &str) -> String {
    hex::encode(openssl::sha::sha256(token.as_bytes()))
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a.as_bytes(), b.as_bytes())
}

/// A redirect URI apps may register: absolute, no fragment, https (or http
/// to a loopback host, for native apps), or a private-use scheme (RFC 8252).
pub fn check_redirect_uri(uri: &str) -> Result<(), String> {
    let u = url::Url::parse(uri).map_err(|e| format!("{uri:?} is not an absolute URI: {e}"))?;
    if u.fragment().is_some() {
        return Err(format!("{uri:?} has a fragment"));
    }
    match u.scheme() {
        "https" => Ok(()),
        "http" => match u.host() {
            Some(url::Host::Ipv4(ip)) if ip.is_loopback() => Ok(()),
            Some(url::Host::Ipv6(ip)) if ip.is_loopback() => Ok(()),
            Some(url::Host::Domain("localhost")) => Ok(()),
            _ => Err(format!("{uri:?}: http is allowed for loopback hosts only")),
        },
        "javascript" | "data" | "file" | "vbscript" => {
            Err(format!("{uri:?}: scheme {} is not allowed", u.scheme()))
        }
        s if s.contains('.') => Ok(()),
        _ => Err(format!(
            "{uri:?}: use https, http on loopback, or a reverse-domain private scheme"
        )),
    }
}

fn add_query(uri: &str, pairs: &[(&str, &str)]) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) => {
            {
                let mut q = u.query_pairs_mut();
                for (k, v) in pairs {
                    q.append_pair(k, v);
                }
            }
            u.to_string()
        }
        Err(_) => uri.to_string(),
    }
}

fn pkce_s256(verifier: &str) -> String {
    jwt::b64url(&openssl::sha::sha256(verifier.as_bytes()))
}

fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn valid_challenge(c: &str) -> bool {
    c.len() == 43
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Client credentials from an HTTP Basic header (RFC 6749 2.3.1: both parts
/// form-urlencoded).
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    let b64 = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    let raw =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.trim()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (id, secret) = raw.split_once(':')?;
    let dec = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((dec(id)?, dec(secret)?))
}

impl OAuth {
    pub fn new(
        store: Arc<dyn Storage>,
        config: PullConfig,
        signing: SigningKey,
        fetch: crate::http::FetchLimits,
    ) -> OAuth {
        let registries = config
            .registries
            .iter()
            .map(|r| RegistryState {
                config: r.clone(),
                keys: tokio::sync::Mutex::new(None),
            })
            .collect();
        OAuth {
            store,
            config,
            signing,
            fetch,
            registries,
            pending: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &PullConfig {
        &self.config
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    fn issuer(&self) -> &str {
        &self.config.base_url
    }

    // ---- apps ----

    pub fn app(&self, client_id: &str) -> Result<Option<App>, OAuthError> {
        app(&*self.store, client_id)
    }

    /// RFC 7591 registration: open, or trusted when `software_statement`
    /// verifies against a configured registry. Returns the registration
    /// response.
    pub async fn register(&self, body: &Value) -> Result<Value, OAuthError> {
        let meta = body
            .as_object()
            .ok_or_else(|| err("invalid_client_metadata", "the body is not a JSON object"))?;
        let mut fields = meta.clone();
        let mut registration = Registration::Open;
        let mut software_id = None;
        if let Some(statement) = meta.get("software_statement") {
            let statement = statement.as_str().ok_or_else(|| {
                err(
                    "invalid_software_statement",
                    "software_statement is not a string",
                )
            })?;
            let (registry, claims) = self.verify_statement(statement).await?;
            // The registry's values win; a request that contradicts them is
            // refused rather than silently changed.
            for k in ["client_name", "client_uri", "redirect_uris"] {
                match (claims.get(k), meta.get(k)) {
                    (Some(fixed), Some(asked)) if fixed != asked => {
                        return Err(err(
                            "invalid_client_metadata",
                            format!("{k} differs from the registry's software statement"),
                        ))
                    }
                    (None, _) if k == "redirect_uris" => {
                        return Err(err(
                            "invalid_software_statement",
                            "the software statement has no redirect_uris",
                        ))
                    }
                    _ => {}
                }
            }
            for (k, v) in claims.iter() {
                if matches!(
                    k.as_str(),
                    "client_name"
                        | "client_uri"
                        | "redirect_uris"
                        | "logo_uri"
                        | "scope"
                        | "token_endpoint_auth_method"
                        | "grant_types"
                ) {
                    fields.insert(k.clone(), v.clone());
                }
            }
            software_id = claims
                .get("software_id")
                .and_then(Value::as_str)
                .map(str::to_string);
            registration = Registration::Registry { name: registry };
        } else if !self.config.open_registration {
            return Err(err(
                "access_denied",
                "open registration is disabled here: register through a trusted registry (software_statement)",
            ));
        }
        let str_field = |k: &str| -> Result<Option<String>, OAuthError> {
            match fields.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(err(
                    "invalid_client_metadata",
                    format!("{k} is not a string"),
                )),
            }
        };
        let redirect_uris: Vec<String> = match fields.get("redirect_uris") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err("invalid_redirect_uri", "redirect_uris must be strings"))
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(err(
                    "invalid_redirect_uri",
                    "redirect_uris must be a non-empty array",
                ))
            }
        };
        for u in &redirect_uris {
            check_redirect_uri(u).map_err(|e| err("invalid_redirect_uri", e))?;
        }
        let method = str_field("token_endpoint_auth_method")?.unwrap_or_else(|| "none".into());
        let confidential = match method.as_str() {
            "none" => false,
            "client_secret_basic" => true,
            other => {
                return Err(err(
                    "invalid_client_metadata",
                    format!(
                        "token_endpoint_auth_method {other:?}: use none or client_secret_basic"
                    ),
                ))
            }
        };
        if let Some(Value::Array(grants)) = fields.get("grant_types") {
            for g in grants {
                if !matches!(g.as_str(), Some("authorization_code" | "refresh_token")) {
                    return Err(err(
                        "invalid_client_metadata",
                        format!(
                            "grant_types: {g} is not supported (authorization_code, refresh_token)"
                        ),
                    ));
                }
            }
        }
        if let Some(Value::Array(types)) = fields.get("response_types") {
            if types.iter().any(|t| t.as_str() != Some("code")) {
                return Err(err(
                    "invalid_client_metadata",
                    "response_types: only \"code\" is supported",
                ));
            }
        }
        let name = str_field("client_name")?.unwrap_or_else(|| "Unnamed app".into());
        if name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(err(
                "invalid_client_metadata",
                "client_name is too long or has control characters",
            ));
        }
        let scope = str_field("scope")?.map(|s| Scopes::grantable(&s).as_string());
        let (app, secret) = create_app(
            &*self.store,
            name,
            str_field("client_uri")?,
            redirect_uris,
            confidential,
            scope,
            registration,
            software_id,
        )?;
        let mut response = json!({
            "client_id": app.client_id,
            "client_id_issued_at": app.created,
            "client_name": app.name,
            "redirect_uris": app.redirect_uris,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": method,
            "scope": app.scope.clone().unwrap_or_else(|| supported_scopes().join(" ")),
        });
        if let Some(uri) = &app.client_uri {
            response["client_uri"] = json!(uri);
        }
        if let Some(id) = &app.software_id {
            response["software_id"] = json!(id);
        }
        if let Some(secret) = secret {
            response["client_secret"] = json!(secret);
            response["client_secret_expires_at"] = json!(0);
        }
        tracing::info!(client_id = %app.client_id, name = %app.name, registration = ?app.registration, "app registered");
        Ok(response)
    }

    async fn registry_keys(
        &self,
        r: &RegistryState,
        refetch: bool,
    ) -> Result<Vec<Jwk>, OAuthError> {
        let mut cached = r.keys.lock().await;
        if let Some((keys, at)) = &*cached {
            if !refetch && at.elapsed() < JWKS_TTL {
                return Ok(keys.clone());
            }
        }
        let bytes = match &r.config.jwks {
            JwksSource::File(p) => std::fs::read(p).map_err(|e| {
                err(
                    "server_error",
                    format!("registry {} JWKS {}: {e}", r.config.name, p.display()),
                )
            })?,
            JwksSource::Url(u) => crate::http::fetch(u, self.fetch).await.map_err(|e| {
                err(
                    "server_error",
                    format!("registry {} JWKS {u}: {e}", r.config.name),
                )
            })?,
        };
        let keys = jwt::parse_jwks(&bytes).map_err(|e| {
            err(
                "server_error",
                format!("registry {} JWKS: {e}", r.config.name),
            )
        })?;
        *cached = Some((keys.clone(), Instant::now()));
        Ok(keys)
    }

    /// Verifies a software statement; returns the registry's name and the claims.
    async fn verify_statement(
        &self,
        statement: &str,
    ) -> Result<(String, serde_json::Map<String, Value>), OAuthError> {
        let bad = |e: String| err("invalid_software_statement", e);
        // The issuer picks the registry; nothing is trusted before the signature.
        let payload = statement
            .split('.')
            .nth(1)
            .ok_or_else(|| bad("not a JWT".into()))?;
        let claims: Value = jwt::b64url_decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| bad("the payload is not base64url JSON".into()))?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no iss claim".into()))?;
        let registry = self
            .registries
            .iter()
            .find(|r| r.config.issuer == iss)
            .ok_or_else(|| {
                err(
                    "unapproved_software_statement",
                    format!("{iss:?} is not a trusted registry here"),
                )
            })?;
        let keys = self.registry_keys(registry, false).await?;
        let verified = match jwt::verify(statement, &keys) {
            Ok(v) => v,
            // A registry may have rotated its keys: fetch once more.
            Err(jwt::JwtError::NoKeyWithKid(_))
                if matches!(registry.config.jwks, JwksSource::Url(_)) =>
            {
                let keys = self.registry_keys(registry, true).await?;
                jwt::verify(statement, &keys).map_err(|e| bad(e.to_string()))?
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        jwt::check_times(&verified.claims, now_secs(), 60).map_err(|e| bad(e.to_string()))?;
        Ok((registry.config.name.clone(), verified.claims))
    }

    // ---- authorization endpoint ----

    /// Validates an authorization request (RFC 6749 4.1.1, PKCE RFC 7636,
    /// SMART `aud`).
    pub fn start(&self, q: &HashMap<String, String>) -> Result<AuthorizeStart, OAuthError> {
        let Some(client_id) = q.get("client_id") else {
            return Ok(AuthorizeStart::Refuse(
                "The request has no client_id.".into(),
            ));
        };
        let Some(app) = self.app(client_id)? else {
            return Ok(AuthorizeStart::Refuse(format!(
                "No app is registered with client_id {client_id:?}."
            )));
        };
        let redirect_uri = match q.get("redirect_uri") {
            Some(u) if app.redirect_uris.contains(u) => u.clone(),
            Some(u) => {
                return Ok(AuthorizeStart::Refuse(format!(
                    "The redirect URI {u:?} is not one registered for {}.",
                    app.name
                )))
            }
            None if app.redirect_uris.len() == 1 => app.redirect_uris[0].clone(),
            None => {
                return Ok(AuthorizeStart::Refuse(
                    "The request has no redirect_uri and the app registered several.".into(),
                ))
            }
        };
        let state = q.get("state").cloned();
        let back = |code: &str, description: &str| {
            let mut pairs = vec![("error", code), ("error_description", description)];
            if let Some(s) = &state {
                pairs.push(("state", s));
            }
            Ok(AuthorizeStart::Redirect(add_query(&redirect_uri, &pairs)))
        };
        if q.get("response_type").map(String::as_str) != Some("code") {
            return back(
                "unsupported_response_type",
                "only response_type=code is supported",
            );
        }
        let challenge = q.get("code_challenge").cloned();
        match (q.get("code_challenge_method").map(String::as_str), &challenge) {
            (Some("S256"), Some(c)) if valid_challenge(c) => {}
            (Some("S256"), _) => return back("invalid_request", "code_challenge is not a base64url SHA-256"),
            (Some("plain"), _) => return back("invalid_request", "code_challenge_method plain is refused: use S256"),
            (Some(m), _) => return back("invalid_request", &format!("code_challenge_method {m} is not supported: use S256")),
            (None, Some(_)) => return back("invalid_request", "code_challenge_method is required (S256)"),
            (None, None) if app.is_public() => {
                return back("invalid_request", "PKCE is required for public clients: send code_challenge with code_challenge_method=S256")
            }
            (None, None) => {}
        }
        if let Some(aud) = q.get("aud") {
            let fhir = format!("{}/fhir", self.issuer());
            if aud.trim_end_matches('/') != fhir {
                return back("invalid_request", &format!("aud must be {fhir}"));
            }
        }
        let requested = q.get("scope").map(String::as_str).unwrap_or("");
        let mut scopes = Scopes::grantable(requested);
        if let Some(allowed) = &app.scope {
            let allowed = Scopes::grantable(allowed);
            scopes.0.retain(|s| allowed.has(s));
        }
        if !scopes
            .0
            .iter()
            .any(|s| s.starts_with("patient/") || s == "summary" || s == "search")
        {
            return back(
                "invalid_scope",
                "no grantable scope: ask for patient/*.rs, patient/DocumentReference.rs, summary or search",
            );
        }
        let pending = Pending {
            client_id: app.client_id.clone(),
            app_name: app.name.clone(),
            verified_by: app.verified_by(),
            client_uri: app.client_uri.clone(),
            redirect_uri,
            scopes,
            state,
            challenge,
            nonce: q.get("nonce").cloned(),
            csrf: random_token("")?,
            expires: Instant::now() + PENDING_TTL,
            failures: 0,
        };
        let request = random_token("")?;
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, p| p.expires > Instant::now());
        if map.len() >= MAX_PENDING {
            return Ok(AuthorizeStart::Refuse(
                "Too many sign-ins in progress; try again in a few minutes.".into(),
            ));
        }
        map.insert(request.clone(), pending.clone());
        Ok(AuthorizeStart::Consent {
            request,
            pending: Box::new(pending),
        })
    }

    /// The consent form was submitted. `cookie_csrf` is the CSRF cookie the
    /// browser sent; it must equal the form's and the request's token.
    /// Checks the password (slow on purpose): call from a blocking thread.
    pub fn finish(
        &self,
        form: &HashMap<String, String>,
        cookie_csrf: Option<&str>,
    ) -> Result<AuthorizeFinish, OAuthError> {
        let request = form.get("request").cloned().unwrap_or_default();
        let pending = {
            let map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&request).cloned()
        };
        let Some(pending) = pending.filter(|p| p.expires > Instant::now()) else {
            return Ok(AuthorizeFinish::Refuse(
                "This sign-in page has expired or was already used. Start again from the app."
                    .into(),
            ));
        };
        let csrf_ok = form
            .get("csrf")
            .is_some_and(|c| constant_eq(c, &pending.csrf))
            && cookie_csrf.is_some_and(|c| constant_eq(c, &pending.csrf));
        if !csrf_ok {
            return Ok(AuthorizeFinish::Refuse(
                "The form did not come from this sign-in page (CSRF check failed). Start again from the app.".into(),
            ));
        }
        let state = pending.state.clone();
        let back = |pairs: &mut Vec<(&str, String)>| {
            if let Some(s) = &state {
                pairs.push(("state", s.clone()));
            }
            let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            add_query(&pending.redirect_uri, &refs)
        };
        if form.get("decision").map(String::as_str) != Some("allow") {
            self.drop_pending(&request);
            return Ok(AuthorizeFinish::Redirect(back(&mut vec![
                ("error", "access_denied".into()),
                (
                    "error_description",
                    "the patient did not allow access".into(),
                ),
            ])));
        }
        let username = form.get("username").map(|s| s.trim()).unwrap_or("");
        let password = form.get("password").map(String::as_str).unwrap_or("");
        let patient = if username.is_empty() {
            None
        } else {
            index::patient(&*self.store, username)?
        };
        let ok = crate::users::check_password_hash(
            patient.as_ref().and_then(|p| p.password_hash.as_deref()),
            password,
        );
        let Some(patient) = patient.filter(|_| ok) else {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let Some(p) = map.get_mut(&request) else {
                return Ok(AuthorizeFinish::Refuse(
                    "This sign-in page has expired.".into(),
                ));
            };
            p.failures += 1;
            tracing::warn!(client_id = %p.client_id, "patient sign-in failed");
            if p.failures >= MAX_LOGIN_FAILURES {
                map.remove(&request);
                return Ok(AuthorizeFinish::Refuse(
                    "Too many wrong passwords. Start again from the app.".into(),
                ));
            }
            return Ok(AuthorizeFinish::Retry {
                request,
                pending: Box::new(p.clone()),
                message: "Wrong patient ID or password.".into(),
            });
        };
        self.drop_pending(&request);
        let code = random_token("")?;
        {
            let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
            codes.retain(|_, c| c.expires > Instant::now());
            codes.insert(
                hash(&code),
                Code {
                    client_id: pending.client_id.clone(),
                    redirect_uri: pending.redirect_uri.clone(),
                    patient: patient.id.clone(),
                    scopes: pending.scopes.clone(),
                    challenge: pending.challenge.clone(),
                    nonce: pending.nonce.clone(),
                    expires: Instant::now() + self.config.code,
                    used: None,
                },
            );
        }
        crate::server::audit(
            "pull-authorized",
            &format!(
                "patient {} allowed app {} ({})",
                patient.id, pending.app_name, pending.client_id
            ),
        );
        Ok(AuthorizeFinish::Redirect(back(&mut vec![("code", code)])))
    }

    fn drop_pending(&self, request: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(request);
    }

    // ---- token endpoint ----

    /// Authenticates the client of a token, revocation or introspection
    /// request: client_secret_basic for confidential apps, client_id alone
    /// for public ones.
    pub fn client(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<App, OAuthError> {
        let invalid = |d: &str| err("invalid_client", d.to_string());
        match basic {
            Some((id, secret)) => {
                if form.get("client_id").is_some_and(|f| f != &id) {
                    return Err(invalid("client_id differs from the Basic credentials"));
                }
                let app = self
                    .app(&id)?
                    .ok_or_else(|| invalid("unknown client or wrong secret"))?;
                match &app.secret_hash {
                    Some(h) if constant_eq(h, &hash(&secret)) => Ok(app),
                    _ => Err(invalid("unknown client or wrong secret")),
                }
            }
            None => {
                let id = form
                    .get("client_id")
                    .ok_or_else(|| invalid("no client authentication and no client_id"))?;
                let app = self.app(id)?.ok_or_else(|| invalid("unknown client"))?;
                if !app.is_public() {
                    return Err(invalid("this client is confidential: authenticate with HTTP Basic (client_secret_basic)"));
                }
                Ok(app)
            }
        }
    }

    /// The token endpoint (RFC 6749 4.1.3 and 6).
    pub fn token(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<Value, OAuthError> {
        let app = self.client(form, basic)?;
        match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => self.exchange_code(&app, form),
            Some("refresh_token") => self.refresh(&app, form),
            Some(other) => Err(err(
                "unsupported_grant_type",
                format!("{other}: use authorization_code or refresh_token"),
            )),
            None => Err(err("invalid_request", "grant_type is missing")),
        }
    }

    fn exchange_code(
        &self,
        app: &App,
        form: &HashMap<String, String>,
    ) -> Result<Value, OAuthError> {
        let code = form
            .get("code")
            .ok_or_else(|| err("invalid_request", "code is missing"))?;
        let grant_id = random_token("g")?;
        let code_key = hash(code);
        let (patient, scopes, nonce) = {
            let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = codes.get_mut(&code_key) else {
                return Err(err("invalid_grant", "unknown or expired code"));
            };
            if let Some(grant) = &c.used {
                // RFC 6749 4.1.2: a reused code revokes what it gave.
                let grant = grant.clone();
                drop(codes);
                self.store.remove_record(GRANTS, &grant)?;
                tracing::warn!(client_id = %app.client_id, "authorization code reused: its tokens are revoked");
                return Err(err(
                    "invalid_grant",
                    "the code was already used; the tokens it gave are revoked",
                ));
            }
            let refusal = if c.expires <= Instant::now() {
                Some("the code has expired")
            } else if c.client_id != app.client_id {
                Some("the code was issued to another client")
            } else if form.get("redirect_uri") != Some(&c.redirect_uri) {
                Some("redirect_uri differs from the authorization request's")
            } else {
                match (&c.challenge, form.get("code_verifier")) {
                    (Some(_), Some(v)) if !valid_verifier(v) => {
                        Some("code_verifier must be 43-128 unreserved characters")
                    }
                    (Some(ch), Some(v)) if !constant_eq(&pkce_s256(v), ch) => {
                        Some("code_verifier does not match the code_challenge")
                    }
                    (Some(_), None) => Some("code_verifier is missing"),
                    (None, Some(_)) => Some("code_verifier sent but no code_challenge was"),
                    _ => None,
                }
            };
            if let Some(why) = refusal {
                // A failed exchange burns the code: no second guess.
                codes.remove(&code_key);
                return Err(err("invalid_grant", why));
            }
            c.used = Some(grant_id.clone());
            (c.patient.clone(), c.scopes.clone(), c.nonce.clone())
        };
        let now = now_secs();
        put_json(
            &*self.store,
            GRANTS,
            &grant_id,
            &GrantRecord {
                client_id: app.client_id.clone(),
                patient: patient.clone(),
                scope: scopes.as_string(),
                created: now,
            },
        )?;
        self.issue(app, &patient, &scopes, &grant_id, nonce.as_deref(), None)
    }

    /// Issues an access token (and a refresh token with offline_access).
    /// `refresh_expires`: keep a rotated refresh token's original lifetime.
    fn issue(
        &self,
        app: &App,
        patient: &str,
        scopes: &Scopes,
        grant: &str,
        nonce: Option<&str>,
        refresh_expires: Option<i64>,
    ) -> Result<Value, OAuthError> {
        let now = now_secs();
        let access = random_token("hat_")?;
        let lifetime = self.config.access_token.as_secs() as i64;
        let record = TokenRecord {
            refresh: false,
            client_id: app.client_id.clone(),
            patient: patient.to_string(),
            scope: scopes.as_string(),
            grant: grant.to_string(),
            issued: now,
            expires: now + lifetime,
            rotated: false,
        };
        put_json(&*self.store, TOKENS, &hash(&access), &record)?;
        let mut response = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scopes.as_string(),
            "patient": super::fhir::patient_fhir_id(patient),
        });
        if scopes.has("offline_access") || scopes.has("online_access") {
            let refresh = random_token("hrt_")?;
            let expires =
                refresh_expires.unwrap_or(now + self.config.refresh_token.as_secs() as i64);
            put_json(
                &*self.store,
                TOKENS,
                &hash(&refresh),
                &TokenRecord {
                    refresh: true,
                    expires,
                    ..record
                },
            )?;
            response["refresh_token"] = json!(refresh);
        }
        if scopes.has("openid") && scopes.has("fhirUser") {
            let mut claims = json!({
                "iss": self.issuer(),
                "sub": super::fhir::patient_fhir_id(patient),
                "aud": app.client_id,
                "iat": now,
                "exp": now + lifetime,
                "fhirUser": format!("{}/fhir/Patient/{}", self.issuer(), super::fhir::patient_fhir_id(patient)),
            });
            if let Some(n) = nonce {
                claims["nonce"] = json!(n);
            }
            let id_token = self
                .signing
                .sign(&claims)
                .map_err(|e| err("server_error", e.to_string()))?;
            response["id_token"] = json!(id_token);
        }
        Ok(response)
    }

    fn refresh(&self, app: &App, form: &HashMap<String, String>) -> Result<Value, OAuthError> {
        let token = form
            .get("refresh_token")
            .ok_or_else(|| err("invalid_request", "refresh_token is missing"))?;
        let key = hash(token);
        let Some(mut rec) = get_json::<TokenRecord>(&*self.store, TOKENS, &key)? else {
            return Err(err("invalid_grant", "unknown or revoked refresh token"));
        };
        if !rec.refresh || rec.client_id != app.client_id {
            return Err(err("invalid_grant", "not a refresh token of this client"));
        }
        if rec.rotated {
            self.store.remove_record(GRANTS, &rec.grant)?;
            tracing::warn!(client_id = %app.client_id, "a rotated refresh token was reused: the grant is revoked");
            return Err(err(
                "invalid_grant",
                "this refresh token was already used; the grant is revoked",
            ));
        }
        let now = now_secs();
        if rec.expires <= now
            || get_json::<GrantRecord>(&*self.store, GRANTS, &rec.grant)?.is_none()
        {
            return Err(err(
                "invalid_grant",
                "the refresh token has expired or was revoked",
            ));
        }
        let granted = Scopes::grantable(&rec.scope);
        // RFC 6749 6: a narrower scope may be asked for, never a wider one.
        let scopes = match form.get("scope") {
            Some(s) => {
                let asked = Scopes::grantable(s);
                if let Some(extra) = asked.0.iter().find(|x| !granted.has(x)) {
                    return Err(err("invalid_scope", format!("{extra} was not granted")));
                }
                asked
            }
            None => granted,
        };
        rec.rotated = true;
        put_json(&*self.store, TOKENS, &key, &rec)?;
        self.issue(
            app,
            &rec.patient.clone(),
            &scopes,
            &rec.grant.clone(),
            None,
            Some(rec.expires),
        )
    }

    /// RFC 7009: revokes a token of the authenticated client. A refresh
    /// token ends its whole grant; an access token only itself.
    pub fn revoke(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<(), OAuthError> {
        let app = self.client(form, basic)?;
        let token = form
            .get("token")
            .ok_or_else(|| err("invalid_request", "token is missing"))?;
        let key = hash(token);
        // Unknown tokens are not an error (RFC 7009 2.2).
        if let Some(rec) = get_json::<TokenRecord>(&*self.store, TOKENS, &key)? {
            if rec.client_id != app.client_id {
                return Ok(());
            }
            self.store.remove_record(TOKENS, &key)?;
            if rec.refresh {
                self.store.remove_record(GRANTS, &rec.grant)?;
            }
            crate::server::audit(
                "pull-revoked",
                &format!(
                    "app {} revoked a {} token of patient {}",
                    app.client_id,
                    if rec.refresh { "refresh" } else { "access" },
                    rec.patient
                ),
            );
        }
        Ok(())
    }

    /// RFC 7662: what a token of the authenticated client means.
    pub fn introspect(
        &self,
        form: &HashMap<String, String>,
        basic: Option<(String, String)>,
    ) -> Result<Value, OAuthError> {
        let app = self.client(form, basic)?;
        let token = form
            .get("token")
            .ok_or_else(|| err("invalid_request", "token is missing"))?;
        let Some(rec) = self.live(token)? else {
            return Ok(json!({"active": false}));
        };
        if rec.client_id != app.client_id {
            return Ok(json!({"active": false}));
        }
        Ok(json!({
            "active": true,
            "scope": rec.scope,
            "client_id": rec.client_id,
            "token_type": if rec.refresh { "refresh_token" } else { "Bearer" },
            "exp": rec.expires,
            "iat": rec.issued,
            "sub": super::fhir::patient_fhir_id(&rec.patient),
            "patient": super::fhir::patient_fhir_id(&rec.patient),
            "iss": self.issuer(),
        }))
    }

    /// A token record that is unexpired, unrotated, of a live grant and a
    /// still-registered app.
    fn live(&self, token: &str) -> Result<Option<TokenRecord>, OAuthError> {
        if token.len() > 512 {
            return Ok(None);
        }
        let Some(rec) = get_json::<TokenRecord>(&*self.store, TOKENS, &hash(token))? else {
            return Ok(None);
        };
        if rec.expires <= now_secs()
            || rec.rotated
            || get_json::<GrantRecord>(&*self.store, GRANTS, &rec.grant)?.is_none()
            || self.app(&rec.client_id)?.is_none()
        {
            return Ok(None);
        }
        Ok(Some(rec))
    }

    /// What a bearer access token allows; None: invalid, expired or revoked.
    pub fn authorize_bearer(&self, token: &str) -> Result<Option<Authorized>, OAuthError> {
        Ok(self
            .live(token)?
            .filter(|r| !r.refresh)
            .map(|r| Authorized {
                client_id: r.client_id,
                patient: r.patient,
                scopes: Scopes::grantable(&r.scope),
            }))
    }

    /// Removes expired token records and grants without tokens' use.
    pub fn sweep(&self) -> Result<usize, OAuthError> {
        let now = now_secs();
        let mut removed = 0;
        for (k, v) in self.store.records(TOKENS)? {
            let dead = match serde_json::from_slice::<TokenRecord>(&v) {
                Ok(r) => r.expires <= now,
                Err(_) => true,
            };
            if dead {
                self.store.remove_record(TOKENS, &k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A registered app, by client_id.
pub fn app(store: &dyn Storage, client_id: &str) -> Result<Option<App>, OAuthError> {
    if client_id.is_empty() || client_id.len() > 128 {
        return Ok(None);
    }
    Ok(get_json(store, APPS, client_id)?)
}

/// Every registered app, by name.
pub fn apps(store: &dyn Storage) -> Result<Vec<App>, OAuthError> {
    let mut v: Vec<App> = crate::store::all_json(store, APPS)?;
    v.sort_by(|a, b| a.name.cmp(&b.name).then(a.client_id.cmp(&b.client_id)));
    Ok(v)
}

/// Removes an app; its tokens stop working at once.
pub fn remove_app(store: &dyn Storage, client_id: &str) -> Result<bool, OAuthError> {
    if app(store, client_id)?.is_none() {
        return Ok(false);
    }
    store.remove_record(APPS, client_id)?;
    for (k, v) in store.records(GRANTS)? {
        if serde_json::from_slice::<GrantRecord>(&v).is_ok_and(|g| g.client_id == client_id) {
            store.remove_record(GRANTS, &k)?;
        }
    }
    Ok(true)
}

/// Registers an app; returns it and, for confidential apps, its secret
/// (shown once: only its hash is kept).
#[allow(clippy::too_many_arguments)]
pub fn create_app(
    store: &dyn Storage,
    name: String,
    client_uri: Option<String>,
    redirect_uris: Vec<String>,
    confidential: bool,
    scope: Option<String>,
    registration: Registration,
    software_id: Option<String>,
) -> Result<(App, Option<String>), OAuthError> {
    if redirect_uris.is_empty() {
        return Err(err(
            "invalid_redirect_uri",
            "at least one redirect URI is needed",
        ));
    }
    for u in &redirect_uris {
        check_redirect_uri(u).map_err(|e| err("invalid_redirect_uri", e))?;
    }
    if let Some(u) = &client_uri {
        match url::Url::parse(u) {
            Ok(p) if matches!(p.scheme(), "https" | "http") => {}
            _ => {
                return Err(err(
                    "invalid_client_metadata",
                    format!("client_uri {u:?} is not an http(s) URL"),
                ))
            }
        }
    }
    let secret = if confidential {
        Some(random_token("hcs_")?)
    } else {
        None
    };
    let app = App {
        client_id: random_token("")?.chars().take(22).collect(),
        secret_hash: secret.as_deref().map(hash),
        name,
        client_uri,
        redirect_uris,
        scope,
        registration,
        software_id,
        created: now_secs(),
    };
    put_json(store, APPS, &app.client_id, &app)?;
    Ok((app, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_cut_to_what_is_served() {
        let s = Scopes::grantable(
            "patient/*.cruds patient/Observation.rs patient/DocumentReference.read user/*.rs launch/patient openid fhirUser bogus patient/Patient.c patient/Patient.sr summary",
        );
        assert_eq!(
            s.0,
            vec![
                "patient/*.rs",
                "patient/DocumentReference.read",
                "launch/patient",
                "openid",
                "fhirUser",
                "summary"
            ]
        );
        let docs = Scopes::grantable("patient/DocumentReference.rs");
        assert!(docs.allows("DocumentReference", Access::Search));
        assert!(!docs.allows("Patient", Access::Read));
        assert!(docs.allows_binary());
        let only_search = Scopes::grantable("patient/DocumentReference.s");
        assert!(!only_search.allows("DocumentReference", Access::Read));
        let patient = Scopes::grantable("patient/Patient.rs");
        assert!(!patient.allows("DocumentReference", Access::Search));
        assert!(!patient.allows_binary());
        assert!(!patient.allows_summary());
        let bb = Scopes::grantable("search");
        assert!(bb.allows("DocumentReference", Access::Search));
        assert!(!bb.allows("Patient", Access::Read));
    }

    #[test]
    fn redirect_uris_must_be_safe() {
        assert!(check_redirect_uri("https://app.example/cb").is_ok());
        assert!(check_redirect_uri("http://127.0.0.1:9999/cb").is_ok());
        assert!(check_redirect_uri("http://[::1]/cb").is_ok());
        assert!(check_redirect_uri("com.example.app:/cb").is_ok());
        assert!(check_redirect_uri("http://app.example/cb").is_err());
        assert!(check_redirect_uri("https://app.example/cb#x").is_err());
        assert!(check_redirect_uri("javascript:alert(1)").is_err());
        assert!(check_redirect_uri("/relative").is_err());
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        // The appendix's verifier is 43 characters.
        assert!(valid_verifier(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
        ));
        assert!(!valid_verifier("short"));
        assert!(!valid_verifier(&"a".repeat(129)));
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let h = format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                "my%20id:s%3Acret"
            )
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("my id".into(), "s:cret".into()))
        );
        assert_eq!(basic_credentials("Basic !!!"), None);
        assert_eq!(basic_credentials("Bearer x"), None);
    }
}
