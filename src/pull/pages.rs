//! The server-rendered pages patients see: sign-in and consent, and errors.
//! No scripts; every value is escaped; the CSP allows inline styles and
//! posting the form to ourselves only.

use super::oauth::Pending;
use crate::documents::render::esc;

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;background:#f3f5f8;color:#1c2430;margin:0}\
main{max-width:34rem;margin:3rem auto;background:#fff;border-radius:10px;box-shadow:0 2px 10px rgba(0,0,0,.08);padding:2rem 2.25rem}\
h1{font-size:1.35rem;margin:0 0 .75rem}p{line-height:1.45}\
.badge{display:inline-block;border-radius:6px;padding:.35rem .6rem;font-size:.9rem;margin:.25rem 0 1rem}\
.ok{background:#e3f4e8;color:#17602e;border:1px solid #a9d8b6}.warn{background:#fff4dc;color:#7a4b00;border:1px solid #f0cf85}\
ul{padding-left:1.2rem}li{margin:.3rem 0}\
label{display:block;font-weight:600;margin:.9rem 0 .3rem}input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.55rem;border:1px solid #b9c2cf;border-radius:6px;font-size:1rem}\
.buttons{display:flex;gap:.75rem;margin-top:1.4rem}button{flex:1;padding:.65rem;border-radius:6px;font-size:1rem;border:1px solid #1f5fbf;cursor:pointer}\
.allow{background:#1f5fbf;color:#fff}.deny{background:#fff;color:#1f5fbf}.error{color:#a4161a;font-weight:600}.small{font-size:.85rem;color:#5a6472}";

/// The Content-Security-Policy of a page whose form may lead to `redirect`
/// (browsers check form-action against the redirect after the POST too).
pub fn csp(redirect_origin: Option<&str>) -> String {
    let extra = redirect_origin.map(|o| format!(" {o}")).unwrap_or_default();
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'{extra}; frame-ancestors 'none'; base-uri 'none'"
    )
}

/// A human description of a granted scope.
pub fn describe_scope(scope: &str) -> String {
    match scope {
        "openid" => "Sign you in to the app".into(),
        "fhirUser" => "Know which patient record is yours".into(),
        "launch/patient" => "Be told which patient record you chose".into(),
        "offline_access" => {
            "Keep access when you are not using the app, until you revoke it".into()
        }
        "online_access" => "Keep access while you are using the app".into(),
        "summary" => "Read your latest health summary".into(),
        "search" => "Find and read your health documents".into(),
        s => {
            let Some((res, perm)) = s.strip_prefix("patient/").and_then(|r| r.split_once('.'))
            else {
                return s.to_string();
            };
            let what = match res {
                "*" => "all of your records here",
                "Patient" => "your demographics (name, date of birth, sex)",
                "DocumentReference" => "your health documents",
                "Binary" => "the contents of your health documents",
                other => other,
            };
            let how = match perm {
                "read" | "rs" => "Read and search",
                "r" => "Read",
                "s" => "Search",
                _ => "Access",
            };
            format!("{how} {what}")
        }
    }
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"referrer\" content=\"no-referrer\"><title>{}</title><style>{STYLE}</style></head><body><main>{body}</main></body></html>\n",
        esc(title)
    )
}

/// The sign-in and consent page for a pending authorization request.
pub fn consent(request: &str, p: &Pending, message: Option<&str>) -> String {
    let badge = match &p.verified_by {
        Some(by) => format!(
            "<div class=\"badge ok\">&#10003; Verified app: vouched for by {}</div>",
            esc(by)
        ),
        None => "<div class=\"badge warn\">&#9888; Unverified app: no registry vouches for it. \
Allow it only if you know and trust it.</div>"
            .to_string(),
    };
    let uri = p
        .client_uri
        .as_deref()
        .map(|u| format!("<p class=\"small\">App website: {}</p>", esc(u)))
        .unwrap_or_default();
    let scopes: String = p
        .scopes
        .0
        .iter()
        .map(|s| {
            format!(
                "<li>{} <span class=\"small\">({})</span></li>",
                esc(&describe_scope(s)),
                esc(s)
            )
        })
        .collect();
    let error = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    let origin = url::Url::parse(&p.redirect_uri)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();
    let body = format!(
        "<h1>{name} wants to access your health records</h1>{badge}{uri}\
<p>If you allow it, <strong>{name}</strong> will be able to:</p><ul>{scopes}</ul>\
<p class=\"small\">Afterwards you will be sent back to {origin}. You can revoke access at any time.</p>{error}\
<form method=\"post\" action=\"authorize\" autocomplete=\"off\">\
<input type=\"hidden\" name=\"request\" value=\"{request}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<label for=\"username\">Patient ID</label><input type=\"text\" id=\"username\" name=\"username\" required>\
<label for=\"password\">Password</label><input type=\"password\" id=\"password\" name=\"password\" required>\
<div class=\"buttons\"><button class=\"allow\" type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
<button class=\"deny\" type=\"submit\" name=\"decision\" value=\"deny\" formnovalidate>Deny</button></div></form>",
        name = esc(&p.app_name),
        origin = esc(&origin),
        request = esc(request),
        csrf = esc(&p.csrf),
    );
    page(&format!("Allow {}?", p.app_name), &body)
}

/// An error shown to the patient (never sent to the app).
pub fn error(message: &str) -> String {
    page(
        "Cannot continue",
        &format!(
            "<h1>Cannot continue</h1><p class=\"error\">{}</p>",
            esc(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_descriptions_cover_what_is_granted() {
        for s in super::super::oauth::supported_scopes() {
            let d = describe_scope(&s);
            assert_ne!(d, s, "{s} has no description");
        }
    }

    #[test]
    fn error_page_escapes() {
        let p = error("<script>alert(1)</script>");
        assert!(!p.contains("<script>"));
        assert!(p.contains("&lt;script&gt;"));
    }
}
