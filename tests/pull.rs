//! Blue Button Plus Pull, as apps use it over HTTP against a running
//! `hispd serve`: SMART discovery, open and trusted (registry-signed)
//! registration, authorization code + PKCE through the patient's consent
//! form, FHIR searches and reads, refresh, introspection, revocation — and
//! every refusal the issue lists. Every FHIR response is validated with
//! Python's `fhir.resources` (FHIR 4.0.1 models).

mod common;

use base64::Engine;
use common::hisp::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const JANE_ID: &str = "2.16.840.1.113883.4.1^444222222";
const BOB_ID: &str = "1.3.6.1.4.1.16517.1^98765432";
const JANE_PASSWORD: &str = "jane-password-1";
const BOB_PASSWORD: &str = "bob-password-1";
const REDIRECT: &str = "http://127.0.0.1:9/callback";
const REGISTRY_ISS: &str = "https://registry.test";

use common::ccda_fixture as fixture;

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

/// A small blocking HTTP client for the test (reqwest on a runtime), never
/// following redirects: the test reads them.
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        Http {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("client"),
        }
    }

    fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        self.rt.block_on(async {
            let r = req.send().await.expect("HTTP request");
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body = r.bytes().await.expect("body").to_vec();
            Resp {
                status,
                headers,
                body,
            }
        })
    }

    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Resp {
        let mut req = self.client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req)
    }

    fn get_token(&self, url: &str, token: &str) -> Resp {
        self.get(url, &[("Authorization", &format!("Bearer {token}"))])
    }

    fn form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Resp {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut req = self
            .client
            .post(url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret));
        }
        self.send(req)
    }

    fn json(&self, url: &str, v: &Value) -> Resp {
        self.send(
            self.client
                .post(url)
                .header("Content-Type", "application/json")
                .body(v.to_string()),
        )
    }
}

/// What a test app knows about the server and itself.
struct App {
    base: String,
    client_id: String,
    secret: Option<String>,
    redirect: String,
}

fn hidden(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no hidden {name} in:\n{page}"))
        + marker.len();
    let end = page[start..].find('"').expect("end of value") + start;
    page[start..end].to_string()
}

fn query_of(location: &str) -> HashMap<String, String> {
    let u = url::Url::parse(location).expect("redirect URL");
    u.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let mut b = [0u8; 48];
    openssl::rand::rand_bytes(&mut b).expect("rand");
    let verifier = b64url(&b);
    let challenge = b64url(&openssl::sha::sha256(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

impl App {
    fn authorize_url(&self, scope: &str, pkce: Option<&Pkce>, redirect: &str) -> String {
        let mut u = url::Url::parse(&format!("{}/oauth/authorize", self.base)).expect("url");
        {
            let mut q = u.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", &self.client_id)
                .append_pair("redirect_uri", redirect)
                .append_pair("scope", scope)
                .append_pair("state", "st4te")
                .append_pair("aud", &format!("{}/fhir", self.base));
            if let Some(p) = pkce {
                q.append_pair("code_challenge", &p.challenge)
                    .append_pair("code_challenge_method", "S256");
            }
        }
        u.to_string()
    }

    /// Drives the consent page as the patient: returns the page's HTML and
    /// the Location the form submission redirected to.
    fn consent(
        &self,
        h: &Http,
        scope: &str,
        pkce: Option<&Pkce>,
        user: &str,
        password: &str,
        decision: &str,
    ) -> (String, String) {
        let page = h.get(&self.authorize_url(scope, pkce, &self.redirect), &[]);
        assert_eq!(page.status, 200, "{}", page.text());
        assert!(page
            .header("content-security-policy")
            .contains("default-src 'none'"));
        let set_cookie = page.header("set-cookie");
        let cookie = set_cookie.split(';').next().expect("cookie").to_string();
        assert!(cookie.starts_with("hispd_csrf="), "{set_cookie}");
        assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
        let html = page.text();
        let request = hidden(&html, "request");
        let csrf = hidden(&html, "csrf");
        let r = h.form(
            &format!("{}/oauth/authorize", self.base),
            &[
                ("request", &request),
                ("csrf", &csrf),
                ("username", user),
                ("password", password),
                ("decision", decision),
            ],
            &[("Cookie", &cookie)],
            None,
        );
        assert_eq!(r.status, 303, "{}", r.text());
        (html, r.header("location"))
    }

    /// Consent as `user` and return the code.
    fn code(
        &self,
        h: &Http,
        scope: &str,
        pkce: Option<&Pkce>,
        user: &str,
        password: &str,
    ) -> String {
        let (_, location) = self.consent(h, scope, pkce, user, password, "allow");
        assert!(location.starts_with(&self.redirect), "{location}");
        let q = query_of(&location);
        assert_eq!(q.get("state").map(String::as_str), Some("st4te"));
        q.get("code")
            .cloned()
            .unwrap_or_else(|| panic!("no code in {location}"))
    }

    fn exchange(&self, h: &Http, code: &str, verifier: Option<&str>) -> Resp {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect.as_str()),
        ];
        if let Some(v) = verifier {
            form.push(("code_verifier", v));
        }
        let basic = self.secret.as_deref().map(|s| (self.client_id.as_str(), s));
        if basic.is_none() {
            form.push(("client_id", &self.client_id));
        }
        h.form(&format!("{}/oauth/token", self.base), &form, &[], basic)
    }

    /// The whole authorization as a patient: returns the token response.
    fn tokens(&self, h: &Http, scope: &str, user: &str, password: &str) -> Value {
        let p = pkce();
        let code = self.code(h, scope, Some(&p), user, password);
        let r = self.exchange(h, &code, Some(&p.verifier));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("cache-control"), "no-store");
        r.json()
    }

    fn post(&self, h: &Http, endpoint: &str, form: &[(&str, &str)]) -> Resp {
        let mut form = form.to_vec();
        let basic = self.secret.as_deref().map(|s| (self.client_id.as_str(), s));
        if basic.is_none() {
            form.push(("client_id", &self.client_id));
        }
        h.form(
            &format!("{}/oauth/{endpoint}", self.base),
            &form,
            &[],
            basic,
        )
    }
}

/// Collects FHIR responses for validation at the end.
struct Seen(Vec<(String, Value)>);

impl Seen {
    fn fhir(&mut self, name: &str, r: &Resp) -> Value {
        assert!(
            r.header("content-type")
                .starts_with("application/fhir+json"),
            "{name}: content type {}",
            r.header("content-type")
        );
        let v = r.json();
        self.0
            .push((format!("{:02}-{name}", self.0.len()), v.clone()));
        v
    }
}

fn submit_ccda(port: u16, id: &str, file: &str) {
    let xml = std::fs::read(fixture(file)).expect("fixture");
    let b64 = String::from_utf8_lossy(&hispd::smime::mime::encode_base64_lines(&xml)).to_string();
    let data = format!(
        "From: {ALICE}\r\nTo: {BOB}\r\nSubject: records\r\nMessage-ID: <{id}@a.example>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nattached\r\n\
--b1\r\nContent-Type: application/xml; name=\"{file}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}--b1--\r\n"
    );
    let results = submit(port, &json!([{"id": id, "to": [BOB], "data": data}]));
    assert_eq!(results[0]["ok"], true, "{results:?}");
}

fn cli_ok(node: &Node, args: &[&str], stdin: &[u8]) -> String {
    let out = node.cli(args, stdin);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test registry: an RSA key, its JWKS file and signed software statements.
struct Registry {
    key: openssl::pkey::PKey<openssl::pkey::Private>,
}

impl Registry {
    fn new() -> Registry {
        let rsa = openssl::rsa::Rsa::generate(2048).expect("rsa");
        Registry {
            key: openssl::pkey::PKey::from_rsa(rsa).expect("pkey"),
        }
    }

    fn jwks(&self) -> Value {
        let rsa = self.key.rsa().expect("rsa");
        json!({"keys": [{
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "registry-1",
            "n": b64url(&rsa.n().to_vec()), "e": b64url(&rsa.e().to_vec()),
        }]})
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": "registry-1"});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &self.key)
                .expect("signer");
        signer.update(input.as_bytes()).expect("update");
        let sig = signer.sign_to_vec().expect("sign");
        format!("{input}.{}", b64url(&sig))
    }

    fn statement(&self, redirect: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        self.sign(&json!({
            "iss": REGISTRY_ISS,
            "software_id": "verified-phr-1",
            "client_name": "Verified PHR",
            "client_uri": "https://phr.example",
            "redirect_uris": [redirect],
            "token_endpoint_auth_method": "none",
            "iat": now,
            "exp": now + 3600,
        }))
    }
}

/// A HISP with two patients (Jane: two documents; Bob: one), a trusted
/// registry, and an operator-registered confidential app.
fn setup() -> (Net, Registry, String, String) {
    let mut net = Net::new(|b| b.mx_port);
    submit_ccda(net.a.submission_port, "jane-ccd", "hl7-ccd-1.xml");
    submit_ccda(
        net.a.submission_port,
        "jane-referral",
        "hl7-referral-note.xml",
    );
    submit_ccda(net.a.submission_port, "bob-ccd", "hl7-ccd-2.xml");
    assert!(
        net.a.wait_log(Duration::from_secs(30), |l| {
            l.matches("document-indexed").count() >= 3 || l.matches("indexed").count() >= 3
        }),
        "documents not indexed:\n{}",
        net.a.log_text()
    );
    net.a.stop();
    cli_ok(
        &net.a,
        &[
            "patients",
            "add",
            "jane",
            "--name",
            "Jane Doe",
            "--identifier",
            JANE_ID,
            "--password-stdin",
        ],
        format!("{JANE_PASSWORD}\n").as_bytes(),
    );
    cli_ok(
        &net.a,
        &[
            "patients",
            "add",
            "bob",
            "--name",
            "Bob Roe",
            "--identifier",
            BOB_ID,
            "--password-stdin",
        ],
        format!("{BOB_PASSWORD}\n").as_bytes(),
    );
    let out = cli_ok(
        &net.a,
        &[
            "apps",
            "add",
            "--name",
            "Clinic Portal",
            "--redirect-uri",
            REDIRECT,
            "--confidential",
        ],
        b"",
    );
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    let (portal_id, portal_secret) = (field("client_id"), field("client_secret"));
    let list = cli_ok(&net.a, &["apps", "list"], b"");
    assert!(
        list.contains(&portal_id) && list.contains("confidential") && list.contains("operator"),
        "{list}"
    );
    let registry = Registry::new();
    let jwks = net.a.dir.join("registry-jwks.json");
    std::fs::write(&jwks, registry.jwks().to_string()).expect("jwks");
    let mut config = std::fs::read_to_string(&net.a.config).expect("config");
    config.push_str(&format!(
        "\n[[pull.registries]]\nname = \"test-registry\"\nissuer = \"{REGISTRY_ISS}\"\njwks_file = \"{}\"\n",
        jwks.display()
    ));
    std::fs::write(&net.a.config, config).expect("config");
    net.a.start();
    (net, registry, portal_id, portal_secret)
}

#[test]
fn apps_pull_documents_with_patient_consent() {
    let (mut net, registry, portal_id, portal_secret) = setup();
    let h = Http::new();
    let base = format!("http://127.0.0.1:{}", net.a.pull_port);
    let mut seen = Seen(Vec::new());

    // Discovery.
    let conf = h
        .get(&format!("{base}/.well-known/smart-configuration"), &[])
        .json();
    assert_eq!(conf["code_challenge_methods_supported"], json!(["S256"]));
    for cap in [
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "context-standalone-patient",
        "permission-patient",
    ] {
        assert!(
            conf["capabilities"]
                .as_array()
                .expect("caps")
                .contains(&json!(cap)),
            "{cap}"
        );
    }
    for ep in [
        "authorization_endpoint",
        "token_endpoint",
        "registration_endpoint",
        "revocation_endpoint",
        "introspection_endpoint",
    ] {
        assert!(conf[ep].as_str().expect(ep).starts_with(&base), "{ep}");
    }
    let scopes = conf["scopes_supported"].as_array().expect("scopes");
    for s in [
        "patient/*.rs",
        "patient/DocumentReference.rs",
        "patient/Patient.rs",
        "launch/patient",
        "openid",
        "fhirUser",
        "summary",
        "search",
    ] {
        assert!(scopes.contains(&json!(s)), "{s} not in scopes_supported");
    }
    let meta = seen.fhir("metadata", &h.get(&format!("{base}/fhir/metadata"), &[]));
    assert_eq!(meta["fhirVersion"], "4.0.1");
    let mut types: Vec<&str> = meta["rest"][0]["resource"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r["type"].as_str().expect("type"))
        .collect();
    types.sort();
    assert_eq!(types, vec!["Binary", "DocumentReference", "Patient"]);

    // Open registration.
    let reg = h.json(
        conf["registration_endpoint"].as_str().expect("reg"),
        &json!({"client_name": "Pocket PHR", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}),
    );
    assert_eq!(reg.status, 201, "{}", reg.text());
    let app = App {
        base: base.clone(),
        client_id: reg.json()["client_id"]
            .as_str()
            .expect("client_id")
            .to_string(),
        secret: None,
        redirect: REDIRECT.into(),
    };
    assert!(reg.json().get("client_secret").is_none());

    // Authorization with PKCE, as Jane; a wrong password first.
    let p = pkce();
    let scope = "launch/patient openid fhirUser offline_access patient/*.rs";
    let page = h.get(&app.authorize_url(scope, Some(&p), REDIRECT), &[]);
    let html = page.text();
    assert!(
        html.contains("Pocket PHR") && html.contains("Unverified app"),
        "{html}"
    );
    assert!(
        html.contains("Read and search all of your records here"),
        "{html}"
    );
    let cookie = page
        .header("set-cookie")
        .split(';')
        .next()
        .expect("cookie")
        .to_string();
    let consent_url = format!("{base}/oauth/authorize");
    let wrong = h.form(
        &consent_url,
        &[
            ("request", &hidden(&html, "request")),
            ("csrf", &hidden(&html, "csrf")),
            ("username", "jane"),
            ("password", "not-her-password"),
            ("decision", "allow"),
        ],
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("Wrong patient ID or password"));
    // The CSRF check: the right password without the cookie is refused.
    let no_cookie = h.form(
        &consent_url,
        &[
            ("request", &hidden(&html, "request")),
            ("csrf", &hidden(&html, "csrf")),
            ("username", "jane"),
            ("password", JANE_PASSWORD),
            ("decision", "allow"),
        ],
        &[],
        None,
    );
    assert_eq!(no_cookie.status, 403, "{}", no_cookie.text());
    assert!(no_cookie.header("location").is_empty());
    let good = h.form(
        &consent_url,
        &[
            ("request", &hidden(&html, "request")),
            ("csrf", &hidden(&html, "csrf")),
            ("username", "jane"),
            ("password", JANE_PASSWORD),
            ("decision", "allow"),
        ],
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(good.status, 303, "{}", good.text());
    let q = query_of(&good.header("location"));
    assert_eq!(q["state"], "st4te");
    let code = q["code"].clone();

    // Code exchange.
    let t = app.exchange(&h, &code, Some(&p.verifier));
    assert_eq!(t.status, 200, "{}", t.text());
    let t = t.json();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["patient"], "jane");
    assert!(t["scope"].as_str().expect("scope").contains("patient/*.rs"));
    let access = t["access_token"].as_str().expect("access").to_string();
    let refresh = t["refresh_token"].as_str().expect("refresh").to_string();
    // The id_token verifies with the published JWKS and names Jane.
    let jwks = h.get(&format!("{base}/.well-known/jwks.json"), &[]).body;
    let keys = hispd::pull::jwt::parse_jwks(&jwks).expect("jwks");
    let id_token = hispd::pull::jwt::verify(t["id_token"].as_str().expect("id_token"), &keys)
        .expect("id_token verifies");
    assert_eq!(id_token.claims["sub"], "jane");
    assert_eq!(id_token.claims["aud"], json!(app.client_id));
    assert_eq!(
        id_token.claims["fhirUser"],
        json!(format!("{base}/fhir/Patient/jane"))
    );

    // FHIR: Patient, DocumentReference search, $docref, Binary, summary.
    let patient = seen.fhir(
        "patient",
        &h.get_token(&format!("{base}/fhir/Patient/jane"), &access),
    );
    assert_eq!(patient["id"], "jane");
    assert!(patient["identifier"].to_string().contains("444222222"));
    let psearch = seen.fhir(
        "patient-search",
        &h.get_token(&format!("{base}/fhir/Patient?_id=jane"), &access),
    );
    assert_eq!(psearch["total"], 1);
    let search = seen.fhir(
        "docref-search",
        &h.get_token(
            &format!("{base}/fhir/DocumentReference?patient=jane"),
            &access,
        ),
    );
    assert_eq!(search["type"], "searchset");
    assert_eq!(search["total"], 2, "{search}");
    let typed = seen.fhir(
        "docref-type",
        &h.get_token(&format!("{base}/fhir/DocumentReference?patient=Patient/jane&type=http://loinc.org%7C34133-9&category=clinical-note&status=current"), &access),
    );
    assert_eq!(typed["total"], 1, "{typed}");
    let paged = seen.fhir(
        "docref-page",
        &h.get_token(
            &format!("{base}/fhir/DocumentReference?patient=jane&_count=1"),
            &access,
        ),
    );
    assert_eq!(paged["entry"].as_array().expect("entries").len(), 1);
    let next = paged["link"]
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("next link")["url"]
        .as_str()
        .expect("url")
        .to_string();
    let page2 = seen.fhir("docref-page2", &h.get_token(&next, &access));
    assert_eq!(page2["entry"].as_array().expect("entries").len(), 1);
    assert_ne!(
        page2["entry"][0]["resource"]["id"],
        paged["entry"][0]["resource"]["id"]
    );
    let dated = seen.fhir(
        "docref-date",
        &h.get_token(
            &format!("{base}/fhir/DocumentReference?patient=jane&date=ge2020-01-01"),
            &access,
        ),
    );
    assert_eq!(dated["total"], 2);
    let old = seen.fhir(
        "docref-date-none",
        &h.get_token(
            &format!("{base}/fhir/DocumentReference?patient=jane&date=lt2020-01-01"),
            &access,
        ),
    );
    assert_eq!(old["total"], 0);
    let docref = seen.fhir(
        "docref-op",
        &h.get_token(
            &format!("{base}/fhir/DocumentReference/$docref?patient=jane"),
            &access,
        ),
    );
    assert_eq!(docref["total"], 1, "{docref}");
    let ccd = docref["entry"][0]["resource"].clone();
    assert_eq!(ccd["type"]["coding"][0]["code"], "34133-9");
    let read = seen.fhir(
        "docref-read",
        &h.get_token(
            &format!(
                "{base}/fhir/DocumentReference/{}",
                ccd["id"].as_str().expect("id")
            ),
            &access,
        ),
    );
    assert_eq!(read["id"], ccd["id"]);
    let contents = ccd["content"].as_array().expect("content");
    let xml_att = contents
        .iter()
        .find(|c| c["attachment"]["contentType"] == "application/xml")
        .expect("xml attachment");
    assert!(xml_att["format"]["code"]
        .as_str()
        .expect("format")
        .starts_with("urn:hl7-org:sdwg:ccda"));
    let html_att = contents
        .iter()
        .find(|c| c["attachment"]["contentType"] == "text/html")
        .expect("html attachment");
    let xml_url = xml_att["attachment"]["url"].as_str().expect("url");
    let raw = h.get_token(xml_url, &access);
    assert_eq!(raw.status, 200);
    assert!(raw.header("content-type").starts_with("application/xml"));
    assert_eq!(
        raw.body,
        std::fs::read(fixture("hl7-ccd-1.xml")).expect("fixture"),
        "the C-CDA comes back byte for byte"
    );
    let as_json = h.get(
        xml_url,
        &[
            ("Authorization", &format!("Bearer {access}")),
            ("Accept", "application/fhir+json"),
        ],
    );
    let binary = seen.fhir("binary", &as_json);
    assert_eq!(binary["resourceType"], "Binary");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(binary["data"].as_str().expect("data"))
            .expect("base64"),
        raw.body
    );
    let page = h.get_token(
        html_att["attachment"]["url"].as_str().expect("url"),
        &access,
    );
    assert!(page.header("content-type").starts_with("text/html"));
    assert!(page
        .header("content-security-policy")
        .contains("default-src 'none'"));
    assert!(page.text().contains("<html") && !page.text().contains("<script"));
    let summary = h.get_token(&format!("{base}/bb/summary"), &access);
    assert_eq!(summary.status, 200);
    assert_eq!(summary.body, raw.body);
    let summary_html = h.get(
        &format!("{base}/bb/summary"),
        &[
            ("Authorization", &format!("Bearer {access}")),
            ("Accept", "text/html"),
        ],
    );
    assert!(summary_html.header("content-type").starts_with("text/html"));

    // Jane's token cannot reach Bob's records.
    let bob_doc = hispd::pull::fhir::fhir_id("be84a8e4-a22e-4210-a4a6-b3c48273e84c^EHRVersion2.0");
    for url in [
        format!("{base}/fhir/DocumentReference/{bob_doc}"),
        format!("{base}/fhir/Binary/{bob_doc}-ccda"),
        format!("{base}/fhir/DocumentReference?patient=bob"),
        format!("{base}/fhir/Patient/bob"),
    ] {
        let r = h.get_token(&url, &access);
        assert_eq!(r.status, 403, "{url}: {}", r.text());
        let o = seen.fhir("forbidden", &r);
        assert_eq!(o["resourceType"], "OperationOutcome");
    }
    // Unknown search parameters are refused, not ignored.
    let bad = h.get_token(
        &format!("{base}/fhir/DocumentReference?patient=jane&author=x"),
        &access,
    );
    assert_eq!(bad.status, 400);
    assert_eq!(
        seen.fhir("bad-param", &bad)["resourceType"],
        "OperationOutcome"
    );
    let anonymous = h.get(&format!("{base}/fhir/DocumentReference?patient=jane"), &[]);
    assert_eq!(anonymous.status, 401);
    seen.fhir("anonymous", &anonymous);

    // Introspection, refresh (rotating), revocation.
    let intro = app.post(&h, "introspect", &[("token", &access)]).json();
    assert_eq!(intro["active"], true);
    assert_eq!(intro["patient"], "jane");
    let r = app.post(
        &h,
        "token",
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let refreshed = r.json();
    let access2 = refreshed["access_token"]
        .as_str()
        .expect("access")
        .to_string();
    let refresh2 = refreshed["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();
    assert_ne!(access2, access);
    assert_ne!(refresh2, refresh);
    assert_eq!(
        h.get_token(
            &format!("{base}/fhir/DocumentReference?patient=jane"),
            &access2
        )
        .status,
        200
    );
    // Revoking the access token: refused at once.
    assert_eq!(app.post(&h, "revoke", &[("token", &access2)]).status, 200);
    let revoked = h.get_token(
        &format!("{base}/fhir/DocumentReference?patient=jane"),
        &access2,
    );
    assert_eq!(revoked.status, 401);
    seen.fhir("revoked", &revoked);
    assert_eq!(
        app.post(&h, "introspect", &[("token", &access2)]).json()["active"],
        false
    );
    // Revoking the refresh token ends the grant: its other tokens too.
    assert_eq!(app.post(&h, "revoke", &[("token", &refresh2)]).status, 200);
    assert_eq!(
        h.get_token(&format!("{base}/fhir/Patient/jane"), &access)
            .status,
        401
    );
    let r = app.post(
        &h,
        "token",
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh2),
        ],
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );

    // --- Refusals ---
    // Wrong redirect URI: an error page, never a redirect to it.
    let r = h.get(
        &app.authorize_url(scope, Some(&pkce()), "http://127.0.0.1:9/elsewhere"),
        &[],
    );
    assert_eq!(r.status, 400);
    assert!(r.header("location").is_empty());
    assert!(r.text().contains("not one registered"), "{}", r.text());
    // A public client without PKCE, or with plain.
    let r = h.get(&app.authorize_url(scope, None, REDIRECT), &[]);
    assert_eq!(r.status, 303);
    assert_eq!(query_of(&r.header("location"))["error"], "invalid_request");
    let plain = app.authorize_url(scope, None, REDIRECT)
        + "&code_challenge=abcdefghijklmnopqrstuvwxyzabcdefghijklmnopq&code_challenge_method=plain";
    let r = h.get(&plain, &[]);
    let q = query_of(&r.header("location"));
    assert_eq!(q["error"], "invalid_request");
    assert!(q["error_description"].contains("plain"));
    // Deny.
    let (_, location) = app.consent(&h, scope, Some(&pkce()), "jane", JANE_PASSWORD, "deny");
    assert_eq!(query_of(&location)["error"], "access_denied");
    // Missing verifier, then the right one: the failed attempt burnt the code.
    let p = pkce();
    let code = app.code(&h, scope, Some(&p), "jane", JANE_PASSWORD);
    let r = app.exchange(&h, &code, None);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    assert_eq!(app.exchange(&h, &code, Some(&p.verifier)).status, 400);
    // Wrong verifier.
    let p = pkce();
    let code = app.code(&h, scope, Some(&p), "jane", JANE_PASSWORD);
    let r = app.exchange(&h, &code, Some(&pkce().verifier));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    // A reused code is refused and revokes what the first use gave.
    let p = pkce();
    let code = app.code(&h, scope, Some(&p), "jane", JANE_PASSWORD);
    let first = app.exchange(&h, &code, Some(&p.verifier));
    assert_eq!(first.status, 200);
    let first_access = first.json()["access_token"]
        .as_str()
        .expect("access")
        .to_string();
    assert_eq!(
        h.get_token(&format!("{base}/fhir/Patient/jane"), &first_access)
            .status,
        200
    );
    let again = app.exchange(&h, &code, Some(&p.verifier));
    assert_eq!(
        (again.status, again.json()["error"].clone()),
        (400, json!("invalid_grant"))
    );
    assert_eq!(
        h.get_token(&format!("{base}/fhir/Patient/jane"), &first_access)
            .status,
        401
    );
    // A scope without DocumentReference reads the Patient only.
    let t = app.tokens(&h, "patient/Patient.rs", "jane", JANE_PASSWORD);
    let narrow = t["access_token"].as_str().expect("access");
    assert_eq!(
        h.get_token(&format!("{base}/fhir/Patient/jane"), narrow)
            .status,
        200
    );
    for url in [
        format!("{base}/fhir/DocumentReference?patient=jane"),
        format!(
            "{base}/fhir/{}",
            xml_url.rsplit("/fhir/").next().expect("binary path")
        ),
        format!("{base}/bb/summary"),
    ] {
        let r = h.get_token(&url, narrow);
        assert_eq!(r.status, 403, "{url}");
        seen.fhir("scope-forbidden", &r);
    }
    // Bob's own token sees only Bob's document.
    let t = app.tokens(&h, "patient/DocumentReference.rs", "bob", BOB_PASSWORD);
    let bob = seen.fhir(
        "bob-search",
        &h.get_token(
            &format!("{base}/fhir/DocumentReference"),
            t["access_token"].as_str().expect("access"),
        ),
    );
    assert_eq!(bob["total"], 1);
    assert_eq!(bob["entry"][0]["resource"]["id"], json!(bob_doc));

    // --- Trusted registration: a statement signed by the test registry ---
    let verified_redirect = "http://127.0.0.1:9/verified";
    let statement = registry.statement(verified_redirect);
    let reg = h.json(
        &format!("{base}/oauth/register"),
        &json!({"software_statement": statement}),
    );
    assert_eq!(reg.status, 201, "{}", reg.text());
    let reg = reg.json();
    assert_eq!(reg["client_name"], "Verified PHR");
    assert_eq!(reg["redirect_uris"], json!([verified_redirect]));
    assert_eq!(reg["software_id"], "verified-phr-1");
    let verified = App {
        base: base.clone(),
        client_id: reg["client_id"].as_str().expect("client_id").to_string(),
        secret: None,
        redirect: verified_redirect.into(),
    };
    let (page, _) = verified.consent(
        &h,
        "summary search",
        Some(&pkce()),
        "jane",
        JANE_PASSWORD,
        "deny",
    );
    assert!(
        page.contains("Verified app") && page.contains("registry test-registry"),
        "{page}"
    );
    assert!(!page.contains("Unverified"));
    let t = verified.tokens(&h, "summary search offline_access", "jane", JANE_PASSWORD);
    let va = t["access_token"].as_str().expect("access");
    assert_eq!(
        h.get_token(&format!("{base}/bb/summary"), va).body,
        raw.body
    );
    let s = seen.fhir(
        "verified-search",
        &h.get_token(&format!("{base}/fhir/DocumentReference?patient=jane"), va),
    );
    assert_eq!(s["total"], 2);
    // The registry's fixed values cannot be changed by the app.
    let r = h.json(
        &format!("{base}/oauth/register"),
        &json!({"software_statement": registry.statement(verified_redirect), "redirect_uris": ["http://127.0.0.1:9/evil"]}),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_client_metadata"))
    );
    // A tampered statement (payload changed, signature kept) is refused.
    let good = registry.statement(verified_redirect);
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .expect("b64"),
    )
    .expect("json");
    claims["redirect_uris"] = json!(["http://127.0.0.1:9/evil"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    );
    let r = h.json(
        &format!("{base}/oauth/register"),
        &json!({"software_statement": tampered}),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_software_statement")),
        "{}",
        r.text()
    );
    // Signed by a key the registry does not publish.
    let stranger = Registry::new().statement(verified_redirect);
    let r = h.json(
        &format!("{base}/oauth/register"),
        &json!({"software_statement": stranger}),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_software_statement"))
    );

    // --- The operator's confidential app: client_secret_basic ---
    let portal = App {
        base: base.clone(),
        client_id: portal_id.clone(),
        secret: Some(portal_secret.clone()),
        redirect: REDIRECT.into(),
    };
    let t = portal.tokens(&h, "patient/*.rs", "jane", JANE_PASSWORD);
    assert_eq!(t["patient"], "jane");
    let wrong_secret = App {
        secret: Some("hcs_wrong".into()),
        ..portal
    };
    let p = pkce();
    let code = wrong_secret.code(&h, "patient/*.rs", Some(&p), "jane", JANE_PASSWORD);
    let r = wrong_secret.exchange(&h, &code, Some(&p.verifier));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("invalid_client"))
    );

    // --- Expiry: a daemon whose access tokens live one second ---
    net.a.stop();
    net.a
        .env
        .push(("HISPD__PULL__ACCESS_TOKEN_SECS".into(), "1".into()));
    net.a.start();
    // A new client: the old one's pooled connections went with the old process.
    let h = Http::new();
    let t = app.tokens(&h, "patient/*.rs", "jane", JANE_PASSWORD);
    let short = t["access_token"].as_str().expect("access");
    assert_eq!(t["expires_in"], 1);
    std::thread::sleep(Duration::from_millis(2100));
    let expired = h.get_token(&format!("{base}/fhir/Patient/jane"), short);
    assert_eq!(expired.status, 401);
    seen.fhir("expired", &expired);

    // --- TLS: the same listener over HTTPS, cookies marked Secure ---
    net.a.stop();
    let tls = net.a.dir.join("pull-tls");
    let cred = hispd::pki::self_signed_server("localhost").expect("server cert");
    hispd::pki::save(&cred, &tls).expect("save");
    let https = format!("https://127.0.0.1:{}", net.a.pull_port);
    net.a.env.push((
        "HISPD__PULL__TLS_CERT".into(),
        tls.join("cert.pem").display().to_string(),
    ));
    net.a.env.push((
        "HISPD__PULL__TLS_KEY".into(),
        tls.join("key.pem").display().to_string(),
    ));
    net.a
        .env
        .push(("HISPD__PULL__BASE_URL".into(), https.clone()));
    net.a.start();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--cacert"])
        .arg(tls.join("cert.pem"))
        .arg(format!("{https}/.well-known/smart-configuration"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        conf["token_endpoint"],
        json!(format!("{https}/oauth/token"))
    );
    let plain = std::process::Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!(
            "http://127.0.0.1:{}/fhir/metadata",
            net.a.pull_port
        ))
        .output()
        .expect("curl");
    assert!(
        !plain.status.success() || String::from_utf8_lossy(&plain.stdout) != "200",
        "plain HTTP must not be served on the TLS listener"
    );
    let https_app = App {
        base: https.clone(),
        ..app
    };
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
        ])
        .arg(tls.join("cert.pem"))
        .arg(https_app.authorize_url("patient/*.rs", Some(&pkce()), REDIRECT))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("set-cookie: hispd_csrf=") && head.contains("; secure"),
        "{head}"
    );

    // Everything above validates against the FHIR R4 models.
    common::fhir::self_check();
    common::fhir::validate(&seen.0);
}

/// The two pages people see, rendered by a real browser: the consent page
/// (an unverified app asking for access) and a document's HTML view. The
/// screenshots are what docs/images/ shows in the README; set
/// HISPD_UPDATE_SCREENSHOTS=1 to refresh those files from this run.
#[test]
fn consent_page_and_document_view_render_in_chromium() {
    let (net, _registry, _, _) = setup();
    let h = Http::new();
    let base = format!("http://127.0.0.1:{}", net.a.pull_port);
    let reg = h.json(
        &format!("{base}/oauth/register"),
        &json!({"client_name": "Pocket PHR", "client_uri": "https://pocketphr.example", "redirect_uris": [REDIRECT]}),
    );
    assert_eq!(reg.status, 201, "{}", reg.text());
    let app = App {
        base: base.clone(),
        client_id: reg.json()["client_id"]
            .as_str()
            .expect("client_id")
            .to_string(),
        secret: None,
        redirect: REDIRECT.into(),
    };
    let out = tempfile::tempdir().expect("tmp");
    let shots = [
        out.path().join("consent.png"),
        out.path().join("document.png"),
    ];

    // The consent page, straight from the server.
    let url = app.authorize_url(
        "launch/patient openid fhirUser offline_access patient/DocumentReference.rs patient/Patient.rs",
        Some(&pkce()),
        REDIRECT,
    );
    let dom = common::browser::dump_dom(&url);
    for text in [
        "Pocket PHR wants to access your health records",
        "Unverified app",
        "Read and search your health documents",
        "Patient ID",
        "Allow",
        "Deny",
    ] {
        assert!(
            dom.contains(text),
            "{text:?} not on the rendered page:\n{dom}"
        );
    }
    common::browser::screenshot(&url, &shots[0], 900, 900);

    // A document's HTML view, as an app shows it to the patient.
    let t = app.tokens(&h, "patient/DocumentReference.rs", "jane", JANE_PASSWORD);
    let access = t["access_token"].as_str().expect("access");
    let docs = h
        .get_token(&format!("{base}/fhir/DocumentReference/$docref"), access)
        .json();
    let html_url = docs["entry"][0]["resource"]["content"]
        .as_array()
        .expect("content")
        .iter()
        .find(|c| c["attachment"]["contentType"] == "text/html")
        .expect("html attachment")["attachment"]["url"]
        .as_str()
        .expect("url")
        .to_string();
    let page = h.get_token(&html_url, access);
    assert_eq!(page.status, 200);
    let file = out.path().join("document.html");
    std::fs::write(&file, &page.body).expect("html");
    let dom = common::browser::dump_dom(&common::browser::file_url(&file));
    assert!(dom.contains("Patient Chart Summary"), "{dom}");
    common::browser::screenshot(&common::browser::file_url(&file), &shots[1], 900, 1100);

    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/images");
    for (shot, (w, hgt)) in shots.iter().zip([(900, 900), (900, 1100)]) {
        let (width, height, colours) = common::browser::png_info(shot);
        assert_eq!((width, height), (w, hgt));
        assert!(
            colours > 50,
            "{} looks blank ({colours} colours)",
            shot.display()
        );
        let name = shot.file_name().expect("name");
        if std::env::var_os("HISPD_UPDATE_SCREENSHOTS").is_some() {
            std::fs::create_dir_all(&images).expect("docs/images");
            std::fs::copy(shot, images.join(name)).expect("copy");
        }
        // The README's copies exist and are real screenshots of this size.
        let (width, height, colours) = common::browser::png_info(&images.join(name));
        assert_eq!((width, height), (w, hgt), "docs/images/{name:?}");
        assert!(colours > 50);
    }
}
