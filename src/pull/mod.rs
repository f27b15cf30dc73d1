//! Blue Button Plus Pull: an OAuth2 authorization server (SMART App Launch 2,
//! RFC 7591 registration, RFC 7009 revocation, RFC 7662 introspection) and a
//! read-only FHIR R4 facade over the document index. See docs/PULL.md.
//!
//! Endpoints (under the configured base URL):
//! `/.well-known/smart-configuration`, `/.well-known/jwks.json`,
//! `/oauth/{register,authorize,token,revoke,introspect}`, `/fhir/metadata`,
//! `/fhir/Patient`, `/fhir/DocumentReference` (+ `$docref`), `/fhir/Binary`,
//! and `/bb/summary`.

// Handlers return `Result<_, Response>` so a refusal is built where it is
// decided; a Response is 128 bytes and made once per request.
#![allow(clippy::result_large_err)]

pub mod fhir;
pub mod jwt;
pub mod oauth;
pub mod pages;

use crate::documents::{ccda, index, render};
use crate::store::Storage;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use oauth::{Access, AuthorizeFinish, AuthorizeStart, Authorized, OAuth, OAuthError};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

const CSRF_COOKIE: &str = "hispd_csrf";
/// Request bodies (forms, registrations) are small.
const MAX_BODY: usize = 64 * 1024;
const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pull.tls: {0}")]
    Tls(String),
    #[error("pull signing key: {0}")]
    Key(#[from] jwt::JwtError),
}

/// Everything the handlers share.
pub struct Pull {
    pub oauth: OAuth,
    store: Arc<dyn Storage>,
    base: String,
}

impl Pull {
    /// The signing key for id_tokens lives at `<data_dir>/pull/signing-key.pem`.
    pub fn new(
        store: Arc<dyn Storage>,
        config: crate::config::PullConfig,
        data_dir: &std::path::Path,
        fetch: crate::http::FetchLimits,
    ) -> Result<Pull, PullError> {
        let key = jwt::SigningKey::load_or_create(&data_dir.join("pull").join("signing-key.pem"))?;
        let base = config.base_url.clone();
        Ok(Pull {
            oauth: OAuth::new(store.clone(), config, key, fetch),
            store,
            base,
        })
    }

    fn fhir_base(&self) -> String {
        format!("{}/fhir", self.base)
    }
}

/// The HTTP routes.
pub fn router(pull: Arc<Pull>) -> Router {
    Router::new()
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/oauth/register", post(register))
        .route(
            "/oauth/authorize",
            get(authorize_page).post(authorize_submit),
        )
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        .route("/oauth/introspect", post(introspect))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/Patient", get(patient_search))
        .route("/fhir/Patient/{id}", get(patient_read))
        .route("/fhir/DocumentReference", get(docref_search))
        .route(
            "/fhir/DocumentReference/{id}",
            get(docref_read).post(docref_read),
        )
        .route("/fhir/Binary/{id}", get(binary_read))
        .route("/bb/summary", get(bb_summary))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(pull)
}

/// Serves `router` on `listener`, over TLS when `tls` is set, until the task
/// is dropped.
pub async fn listen(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("pull: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(router);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30));
            let result = match tls {
                Some(acceptor) => {
                    let stream = match tls_accept(&acceptor, stream).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(%remote, "pull: TLS handshake failed: {e}");
                            return;
                        }
                    };
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, "pull: connection ended: {e}");
            }
        });
    }
}

async fn tls_accept(
    acceptor: &openssl::ssl::SslAcceptor,
    stream: tokio::net::TcpStream,
) -> Result<tokio_openssl::SslStream<tokio::net::TcpStream>, String> {
    let ssl = openssl::ssl::Ssl::new(acceptor.context()).map_err(|e| e.to_string())?;
    let mut s = tokio_openssl::SslStream::new(ssl, stream).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        std::pin::Pin::new(&mut s).accept(),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(s)
}

// ---- helpers ----

fn json_response(status: StatusCode, content_type: &'static str, v: &Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// An OAuth error response (RFC 6749 5.2).
fn oauth_error(e: &OAuthError) -> Response {
    let status = match e.code() {
        "invalid_client" => StatusCode::UNAUTHORIZED,
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        "access_denied" => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!("pull: {e}");
    }
    let mut r = json_response(
        status,
        "application/json",
        &json!({"error": e.code(), "error_description": e.description()}),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"hispd\""),
        );
    }
    no_store(r)
}

fn html(status: StatusCode, body: String, csp: &str) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    no_store(r)
}

/// Parameters that must each appear once (RFC 6749 3.1, 3.2).
fn single_params(raw: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw) {
        if map.insert(k.to_string(), v.into_owned()).is_some() {
            return Err(format!("parameter {k} appears more than once"));
        }
    }
    Ok(map)
}

fn form_of(headers: &HeaderMap, body: &Bytes) -> Result<HashMap<String, String>, OAuthError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
    {
        return Err(OAuthError::Protocol {
            code: "invalid_request",
            description: "use Content-Type application/x-www-form-urlencoded".into(),
        });
    }
    single_params(body).map_err(|d| OAuthError::Protocol {
        code: "invalid_request",
        description: d,
    })
}

fn basic_of(headers: &HeaderMap) -> Option<(String, String)> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(oauth::basic_credentials)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

// ---- discovery ----

async fn smart_configuration(State(p): State<Arc<Pull>>) -> Response {
    let b = &p.base;
    let v = json!({
        "issuer": b,
        "jwks_uri": format!("{b}/.well-known/jwks.json"),
        "authorization_endpoint": format!("{b}/oauth/authorize"),
        "token_endpoint": format!("{b}/oauth/token"),
        "registration_endpoint": format!("{b}/oauth/register"),
        "revocation_endpoint": format!("{b}/oauth/revoke"),
        "introspection_endpoint": format!("{b}/oauth/introspect"),
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": oauth::supported_scopes(),
        "capabilities": [
            "launch-standalone",
            "client-public",
            "client-confidential-symmetric",
            "context-standalone-patient",
            "permission-patient",
            "permission-v1",
            "permission-v2",
            "permission-offline",
            "sso-openid-connect"
        ],
    });
    json_response(StatusCode::OK, "application/json", &v)
}

async fn jwks(State(p): State<Arc<Pull>>) -> Response {
    json_response(
        StatusCode::OK,
        "application/json",
        &json!({"keys": [p.oauth.signing_key().public_jwk()]}),
    )
}

// ---- OAuth ----

async fn register(State(p): State<Arc<Pull>>, headers: HeaderMap, body: Bytes) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with("application/json") {
        return oauth_error(&OAuthError::Protocol {
            code: "invalid_client_metadata",
            description: "send the metadata as application/json".into(),
        });
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return oauth_error(&OAuthError::Protocol {
            code: "invalid_client_metadata",
            description: "the body is not JSON".into(),
        });
    };
    match p.oauth.register(&v).await {
        Ok(r) => no_store(json_response(StatusCode::CREATED, "application/json", &r)),
        Err(e) => oauth_error(&e),
    }
}

fn consent_response(
    secure: bool,
    request: &str,
    pending: &oauth::Pending,
    message: Option<&str>,
) -> Response {
    let origin = url::Url::parse(&pending.redirect_uri)
        .ok()
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null");
    let status = if message.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let mut r = html(
        status,
        pages::consent(request, pending, message),
        &pages::csp(origin.as_deref()),
    );
    let cookie = format!(
        "{CSRF_COOKIE}={}; Path=/oauth; HttpOnly; SameSite=Strict{}",
        pending.csrf,
        if secure { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

fn redirect(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(v) => {
            let mut r = StatusCode::SEE_OTHER.into_response();
            r.headers_mut().insert(header::LOCATION, v);
            no_store(r)
        }
        Err(_) => html(
            StatusCode::BAD_REQUEST,
            pages::error("The app's redirect URI cannot be used."),
            &pages::csp(None),
        ),
    }
}

async fn authorize_page(State(p): State<Arc<Pull>>, RawQuery(q): RawQuery) -> Response {
    let q = match single_params(q.as_deref().unwrap_or("").as_bytes()) {
        Ok(q) => q,
        Err(e) => return html(StatusCode::BAD_REQUEST, pages::error(&e), &pages::csp(None)),
    };
    match p.oauth.start(&q) {
        Ok(AuthorizeStart::Consent { request, pending }) => {
            consent_response(p.base.starts_with("https://"), &request, &pending, None)
        }
        Ok(AuthorizeStart::Redirect(to)) => redirect(&to),
        Ok(AuthorizeStart::Refuse(msg)) => html(
            StatusCode::BAD_REQUEST,
            pages::error(&msg),
            &pages::csp(None),
        ),
        Err(e) => {
            tracing::error!("pull: authorize: {e}");
            html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::error("Something went wrong on our side. Try again later."),
                &pages::csp(None),
            )
        }
    }
}

async fn authorize_submit(State(p): State<Arc<Pull>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = match form_of(&headers, &body) {
        Ok(f) => f,
        Err(e) => {
            return html(
                StatusCode::BAD_REQUEST,
                pages::error(&e.description()),
                &pages::csp(None),
            )
        }
    };
    let csrf = cookie(&headers, CSRF_COOKIE);
    let pull = p.clone();
    // The password check is deliberately slow: keep it off the reactor.
    let outcome =
        tokio::task::spawn_blocking(move || pull.oauth.finish(&form, csrf.as_deref())).await;
    match outcome {
        Ok(Ok(AuthorizeFinish::Redirect(to))) => redirect(&to),
        Ok(Ok(AuthorizeFinish::Retry {
            request,
            pending,
            message,
        })) => consent_response(
            p.base.starts_with("https://"),
            &request,
            &pending,
            Some(&message),
        ),
        Ok(Ok(AuthorizeFinish::Refuse(msg))) => {
            html(StatusCode::FORBIDDEN, pages::error(&msg), &pages::csp(None))
        }
        Ok(Err(e)) => {
            tracing::error!("pull: authorize: {e}");
            html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::error("Something went wrong on our side. Try again later."),
                &pages::csp(None),
            )
        }
        Err(e) => {
            tracing::error!("pull: authorize task: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn token(State(p): State<Arc<Pull>>, headers: HeaderMap, body: Bytes) -> Response {
    let result = form_of(&headers, &body).and_then(|f| p.oauth.token(&f, basic_of(&headers)));
    match result {
        Ok(v) => no_store(json_response(StatusCode::OK, "application/json", &v)),
        Err(e) => oauth_error(&e),
    }
}

async fn revoke(State(p): State<Arc<Pull>>, headers: HeaderMap, body: Bytes) -> Response {
    match form_of(&headers, &body).and_then(|f| p.oauth.revoke(&f, basic_of(&headers))) {
        Ok(()) => no_store(StatusCode::OK.into_response()),
        Err(e) => oauth_error(&e),
    }
}

async fn introspect(State(p): State<Arc<Pull>>, headers: HeaderMap, body: Bytes) -> Response {
    match form_of(&headers, &body).and_then(|f| p.oauth.introspect(&f, basic_of(&headers))) {
        Ok(v) => no_store(json_response(StatusCode::OK, "application/json", &v)),
        Err(e) => oauth_error(&e),
    }
}

// ---- FHIR ----

/// A FHIR error: an OperationOutcome with `status`.
fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    let mut r = json_response(
        status,
        FHIR_JSON,
        &fhir::operation_outcome("error", code, diagnostics),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"hispd\", error=\"invalid_token\""),
        );
    } else if status == StatusCode::FORBIDDEN {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"hispd\", error=\"insufficient_scope\""),
        );
    }
    r
}

fn server_error(e: &dyn std::fmt::Display) -> Response {
    tracing::error!("pull: {e}");
    outcome(
        StatusCode::INTERNAL_SERVER_ERROR,
        "exception",
        "internal error; see the server log",
    )
}

/// The caller's token, or the 401 to send.
fn bearer(p: &Pull, headers: &HeaderMap) -> Result<Authorized, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return Err(outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "an access token is required (Authorization: Bearer)",
        ));
    };
    match p.oauth.authorize_bearer(token) {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(outcome(
            StatusCode::UNAUTHORIZED,
            "expired",
            "the access token is invalid, expired or revoked",
        )),
        Err(e) => Err(server_error(&e)),
    }
}

fn need(ok: bool, what: &str) -> Result<(), Response> {
    if ok {
        Ok(())
    } else {
        Err(outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the token's scopes do not allow {what}"),
        ))
    }
}

/// One document of the patient, parsed.
struct Doc {
    entry: index::IndexedDocument,
    ccda: Option<ccda::Ccda>,
    id: String,
}

/// Every document (current and superseded) of the token's patient.
fn patient_docs(p: &Pull, patient: &index::PatientRecord) -> Result<Vec<Doc>, Response> {
    let all = index::documents(&*p.store).map_err(|e| server_error(&e))?;
    let mut docs: Vec<Doc> = all
        .into_iter()
        .filter(|d| d.patient_ids.iter().any(|i| patient.identifiers.contains(i)))
        .map(|entry| {
            let ccda = match p.store.read(&entry.spool) {
                Ok(xml) => match ccda::parse(&xml, &ccda::Limits::default()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(document = %entry.key, "pull: cannot parse the stored C-CDA: {e}");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(document = %entry.key, "pull: cannot read the stored C-CDA: {e}");
                    None
                }
            };
            Doc {
                id: fhir::fhir_id(&entry.key),
                entry,
                ccda,
            }
        })
        .collect();
    docs.sort_by(|a, b| {
        b.entry
            .received
            .cmp(&a.entry.received)
            .then(a.id.cmp(&b.id))
    });
    Ok(docs)
}

fn the_patient(p: &Pull, auth: &Authorized) -> Result<index::PatientRecord, Response> {
    match index::patient(&*p.store, &auth.patient) {
        Ok(Some(pr)) => Ok(pr),
        Ok(None) => Err(outcome(
            StatusCode::UNAUTHORIZED,
            "expired",
            "the token's patient no longer exists",
        )),
        Err(e) => Err(server_error(&e)),
    }
}

fn views(docs: &[Doc]) -> Vec<fhir::DocView<'_>> {
    docs.iter()
        .map(|d| fhir::DocView {
            doc: &d.entry,
            ccda: d.ccda.as_ref(),
        })
        .collect()
}

fn demographics(docs: &[Doc]) -> Option<&ccda::Patient> {
    docs.iter()
        .filter_map(|d| d.ccda.as_ref())
        .flat_map(|c| c.patients.iter())
        .next()
}

async fn metadata(State(p): State<Arc<Pull>>) -> Response {
    json_response(
        StatusCode::OK,
        FHIR_JSON,
        &fhir::capability_statement(
            &p.fhir_base(),
            &format!("{}/oauth/authorize", p.base),
            &format!("{}/oauth/token", p.base),
            env!("CARGO_PKG_VERSION"),
        ),
    )
}

async fn patient_read(
    State(p): State<Arc<Pull>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let run = || -> Result<Response, Response> {
        let auth = bearer(&p, &headers)?;
        need(
            auth.scopes.allows("Patient", Access::Read),
            "reading Patient",
        )?;
        if id != fhir::patient_fhir_id(&auth.patient) {
            return Err(outcome(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token is for another patient",
            ));
        }
        let patient = the_patient(&p, &auth)?;
        let docs = patient_docs(&p, &patient)?;
        Ok(json_response(
            StatusCode::OK,
            FHIR_JSON,
            &fhir::patient_resource(&patient, demographics(&docs)),
        ))
    };
    run().unwrap_or_else(|r| r)
}

async fn patient_search(
    State(p): State<Arc<Pull>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let run = || -> Result<Response, Response> {
        let auth = bearer(&p, &headers)?;
        need(
            auth.scopes.allows("Patient", Access::Search),
            "searching Patient",
        )?;
        let params = query_pairs(&q);
        let search = fhir::PatientSearch::parse(&params)
            .map_err(|e| json_response(StatusCode::BAD_REQUEST, FHIR_JSON, &e.outcome()))?;
        let patient = the_patient(&p, &auth)?;
        let docs = patient_docs(&p, &patient)?;
        let mut matches = Vec::new();
        if search.matches(&patient) {
            matches.push(fhir::patient_resource(&patient, demographics(&docs)));
        }
        Ok(json_response(
            StatusCode::OK,
            FHIR_JSON,
            &fhir::searchset(
                &p.fhir_base(),
                "Patient",
                &params,
                matches,
                search.offset(),
                search.count(),
            ),
        ))
    };
    run().unwrap_or_else(|r| r)
}

async fn docref_search(
    State(p): State<Arc<Pull>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let run = || -> Result<Response, Response> {
        let auth = bearer(&p, &headers)?;
        need(
            auth.scopes.allows("DocumentReference", Access::Search),
            "searching DocumentReference",
        )?;
        let params = query_pairs(&q);
        refuse_other_patient(&auth, &params)?;
        let search = fhir::DocSearch::parse(&params)
            .map_err(|e| json_response(StatusCode::BAD_REQUEST, FHIR_JSON, &e.outcome()))?;
        let patient = the_patient(&p, &auth)?;
        let docs = patient_docs(&p, &patient)?;
        let base = p.fhir_base();
        let matches: Vec<Value> = views(&docs)
            .iter()
            .filter(|v| search.matches(&fhir::patient_fhir_id(&patient.id), v))
            .map(|v| fhir::document_reference(&base, &fhir::patient_fhir_id(&patient.id), v))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            FHIR_JSON,
            &fhir::searchset(
                &base,
                "DocumentReference",
                &params,
                matches,
                search.offset(),
                search.count(),
            ),
        ))
    };
    run().unwrap_or_else(|r| r)
}

/// A `patient` parameter naming someone else is refused, not answered empty.
fn refuse_other_patient(auth: &Authorized, params: &[(String, String)]) -> Result<(), Response> {
    for (k, v) in params {
        if k == "patient" || k == "subject" {
            for one in v.split(',') {
                let id = one.strip_prefix("Patient/").unwrap_or(one);
                if id != fhir::patient_fhir_id(&auth.patient) {
                    return Err(outcome(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "the token is for another patient",
                    ));
                }
            }
        }
    }
    Ok(())
}

async fn docref_read(
    State(p): State<Arc<Pull>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let run = || -> Result<Response, Response> {
        let auth = bearer(&p, &headers)?;
        let patient = the_patient(&p, &auth)?;
        let base = p.fhir_base();
        if id == "$docref" {
            let mut params = query_pairs(&q);
            if method == Method::POST {
                params.extend(docref_body_params(&headers, &body)?);
            }
            let plain = params.iter().all(|(k, _)| k == "patient" || k == "_format");
            need(
                if plain {
                    auth.scopes.allows_summary()
                        || auth.scopes.allows("DocumentReference", Access::Search)
                } else {
                    auth.scopes.allows("DocumentReference", Access::Search)
                },
                "$docref",
            )?;
            refuse_other_patient(&auth, &params)?;
            let docs = patient_docs(&p, &patient)?;
            let vs = views(&docs);
            let chosen = fhir::docref_select(&vs, &params)
                .map_err(|e| json_response(StatusCode::BAD_REQUEST, FHIR_JSON, &e.outcome()))?;
            let matches: Vec<Value> = chosen
                .into_iter()
                .filter_map(|i| vs.get(i))
                .map(|v| fhir::document_reference(&base, &fhir::patient_fhir_id(&patient.id), v))
                .collect();
            let n = matches.len();
            return Ok(json_response(
                StatusCode::OK,
                FHIR_JSON,
                &fhir::searchset(
                    &base,
                    "DocumentReference/$docref",
                    &params,
                    matches,
                    0,
                    n.max(1),
                ),
            ));
        }
        if method != Method::GET {
            return Err(outcome(
                StatusCode::METHOD_NOT_ALLOWED,
                "not-supported",
                "only GET is supported here",
            ));
        }
        need(
            auth.scopes.allows("DocumentReference", Access::Read),
            "reading DocumentReference",
        )?;
        let docs = patient_docs(&p, &patient)?;
        let Some(doc) = docs.iter().find(|d| d.id == id) else {
            return Err(not_this_patients(&p, &id));
        };
        let v = fhir::DocView {
            doc: &doc.entry,
            ccda: doc.ccda.as_ref(),
        };
        Ok(json_response(
            StatusCode::OK,
            FHIR_JSON,
            &fhir::document_reference(&base, &fhir::patient_fhir_id(&patient.id), &v),
        ))
    };
    run().unwrap_or_else(|r| r)
}

/// $docref by POST takes a Parameters resource (or a form).
fn docref_body_params(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<(String, String)>, Response> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.starts_with("application/x-www-form-urlencoded") {
        return Ok(url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect());
    }
    let bad = |d: &str| outcome(StatusCode::BAD_REQUEST, "invalid", d);
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("the body is not JSON"))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(bad("the body is not a Parameters resource"));
    }
    let mut out = Vec::new();
    for p in v
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        let value = [
            "valueDate",
            "valueDateTime",
            "valueBoolean",
            "valueString",
            "valueId",
        ]
        .iter()
        .find_map(|k| p.get(*k))
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .or_else(|| {
            p.get("valueCoding").map(|c| {
                format!(
                    "{}|{}",
                    c.get("system").and_then(Value::as_str).unwrap_or(""),
                    c.get("code").and_then(Value::as_str).unwrap_or("")
                )
            })
        })
        .ok_or_else(|| bad(&format!("parameter {name:?} has no supported value")))?;
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// A document outside the token's patient: 403 if it exists, else 404.
fn not_this_patients(p: &Pull, id: &str) -> Response {
    let exists = index::documents(&*p.store)
        .map(|all| all.iter().any(|d| fhir::fhir_id(&d.key) == id))
        .unwrap_or(false);
    if exists {
        outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the document belongs to another patient",
        )
    } else {
        outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no document {id}"),
        )
    }
}

fn wants_fhir_json(headers: &HeaderMap, q: &Option<String>) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = query_pairs(q)
        .into_iter()
        .any(|(k, v)| k == "_format" && (v.contains("json")));
    format || accept.contains("application/fhir+json") || accept.contains("application/json")
}

/// The raw bytes of a document, or its HTML rendering.
fn content(
    p: &Pull,
    doc: &Doc,
    kind: &fhir::BinaryKind,
) -> Result<(&'static str, Vec<u8>), Response> {
    let xml = p
        .store
        .read(&doc.entry.spool)
        .map_err(|e| server_error(&e))?;
    match kind {
        fhir::BinaryKind::Ccda => Ok(("application/xml", xml)),
        fhir::BinaryKind::Html => {
            let parsed = match &doc.ccda {
                Some(c) => c.clone(),
                None => {
                    ccda::parse(&xml, &ccda::Limits::default()).map_err(|e| server_error(&e))?
                }
            };
            Ok((
                "text/html; charset=utf-8",
                render::render_html(&parsed).into_bytes(),
            ))
        }
    }
}

fn raw_content(content_type: &'static str, bytes: Vec<u8>) -> Response {
    let mut r = (StatusCode::OK, bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if content_type.starts_with("text/html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(render::CSP),
        );
    }
    no_store(r)
}

async fn binary_read(
    State(p): State<Arc<Pull>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let run = || -> Result<Response, Response> {
        let auth = bearer(&p, &headers)?;
        need(auth.scopes.allows_binary(), "reading Binary")?;
        let Some((doc_id, kind)) = fhir::parse_binary_id(&id) else {
            return Err(outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("no Binary {id}"),
            ));
        };
        let patient = the_patient(&p, &auth)?;
        let docs = patient_docs(&p, &patient)?;
        let Some(doc) = docs.iter().find(|d| d.id == doc_id) else {
            return Err(not_this_patients(&p, &doc_id));
        };
        let (ct, bytes) = content(&p, doc, &kind)?;
        if wants_fhir_json(&headers, &q) {
            return Ok(json_response(
                StatusCode::OK,
                FHIR_JSON,
                &fhir::binary_resource(&id, ct, &bytes),
            ));
        }
        Ok(raw_content(ct, bytes))
    };
    run().unwrap_or_else(|r| r)
}

/// Blue Button Plus: the latest summary, as C-CDA or (Accept: text/html) HTML.
async fn bb_summary(State(p): State<Arc<Pull>>, headers: HeaderMap) -> Response {
    let run = || -> Result<Response, Response> {
        let auth = bearer(&p, &headers)?;
        need(auth.scopes.allows_summary(), "reading the summary")?;
        let patient = the_patient(&p, &auth)?;
        let docs = patient_docs(&p, &patient)?;
        let vs = views(&docs);
        let chosen = fhir::docref_select(&vs, &[])
            .map_err(|e| json_response(StatusCode::BAD_REQUEST, FHIR_JSON, &e.outcome()))?;
        let Some(doc) = chosen.first().and_then(|i| docs.get(*i)) else {
            return Err(outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                "no summary document for this patient yet",
            ));
        };
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let kind = if accept.contains("text/html") {
            fhir::BinaryKind::Html
        } else {
            fhir::BinaryKind::Ccda
        };
        let (ct, bytes) = content(&p, doc, &kind)?;
        Ok(raw_content(ct, bytes))
    };
    run().unwrap_or_else(|r| r)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/fhir/") {
        outcome(
            StatusCode::NOT_FOUND,
            "not-supported",
            &format!("{} is not supported here (see /fhir/metadata)", uri.path()),
        )
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}

/// Serves Pull until the returned task is aborted; None when disabled.
pub async fn start(
    pull: Arc<Pull>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
) -> tokio::task::JoinHandle<()> {
    let app = router(pull.clone());
    let sweeper = pull.clone();
    tokio::spawn(async move {
        let sweep = async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                match sweeper.oauth.sweep() {
                    Ok(n) if n > 0 => tracing::info!("pull: removed {n} expired token(s)"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("pull: token sweep: {e}"),
                }
            }
        };
        tokio::select! {
            _ = listen(listener, app, tls) => {}
            _ = sweep => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patients_documents_are_parsed_for_fhir() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Storage> = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let xml = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/ccda/hl7-ccd-1.xml"),
        )
        .unwrap();
        let doc = ccda::parse(&xml, &ccda::Limits::default()).unwrap();
        index::index(&*store, &xml, &doc, 1_700_000_000).unwrap();
        let patient = index::PatientRecord {
            id: "jane".into(),
            name: "Jane".into(),
            identifiers: vec!["2.16.840.1.113883.4.1^444222222".into()],
            password_hash: None,
        };
        let mut config = crate::config::Settings::load_with_env(None, std::iter::empty())
            .unwrap()
            .pull;
        config.base_url = "http://h.example".into();
        let pull = Pull::new(
            store,
            config,
            dir.path(),
            crate::http::FetchLimits {
                timeout: std::time::Duration::from_secs(1),
                max_bytes: 1000,
            },
        )
        .unwrap();
        let docs = patient_docs(&pull, &patient).map_err(|_| "docs").unwrap();
        assert_eq!(docs.len(), 1);
        assert!(docs[0].ccda.is_some());
        let v = fhir::document_reference("http://h.example/fhir", "jane", &views(&docs)[0]);
        assert_eq!(v["type"]["coding"][0]["code"], "34133-9");
    }
}
