//! Which requests the console answers, and in which form. Registry clients never send
//! `Accept: text/html` (nor ask for JSON outside `/v2/`), so a browser or a script asking for
//! a page cannot be mistaken for a registry request, and `/v2/` is never the console's.

use http::{Method, header};

/// The form a console answer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Html,
    Json,
}

/// The path prefix of the console's own endpoints (sign-in, stylesheet, forms). `-` alone is
/// not a valid repository name component, so it cannot shadow a repository.
pub const OWN: &str = "/-/";

/// Whether the console answers this request: its own endpoints, or a GET/HEAD outside the
/// registry API that prefers HTML or asks for JSON.
pub fn wants(method: &Method, path: &str, headers: &http::HeaderMap) -> Option<Form> {
    if path == "/v2" || path.starts_with("/v2/") {
        return None;
    }
    let preferred = preferred(headers);
    if path.starts_with(OWN) {
        return Some(preferred.unwrap_or(Form::Html));
    }
    if *method != Method::GET && *method != Method::HEAD {
        return None;
    }
    preferred
}

/// The form the `Accept` headers prefer: HTML when `text/html` is at least as welcome as
/// `application/json`; `None` when neither is named (a bare `*/*` is not a browser).
pub fn preferred(headers: &http::HeaderMap) -> Option<Form> {
    let (mut html, mut json) = (0.0f32, 0.0f32);
    for value in headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "text/html" | "application/xhtml+xml" => html = html.max(q),
                "application/json" => json = json.max(q),
                _ => {}
            }
        }
    }
    if html > 0.0 && html >= json {
        Some(Form::Html)
    } else if json > 0.0 {
        Some(Form::Json)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for a in accept {
            h.append(header::ACCEPT, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn browsers_get_html_scripts_get_json_registry_clients_get_neither() {
        let chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8";
        let get = Method::GET;
        assert_eq!(wants(&get, "/p/app", &headers(&[chrome])), Some(Form::Html));
        assert_eq!(
            wants(&get, "/p/app", &headers(&["application/json"])),
            Some(Form::Json)
        );
        assert_eq!(
            wants(
                &get,
                "/p/app",
                &headers(&["application/json, text/html;q=0.5"])
            ),
            Some(Form::Json)
        );
        // What registry clients and curl send.
        assert_eq!(wants(&get, "/p/app", &headers(&["*/*"])), None);
        assert_eq!(wants(&get, "/p/app", &headers(&[])), None);
        assert_eq!(
            wants(
                &get,
                "/v2/p/app/manifests/latest",
                &headers(&[
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/json"
                ])
            ),
            None
        );
        assert_eq!(wants(&get, "/v2/", &headers(&[chrome])), None);
        assert_eq!(wants(&Method::POST, "/p/app", &headers(&[chrome])), None);
        // Its own endpoints, whatever the Accept (a stylesheet is asked for as text/css).
        assert_eq!(
            wants(&get, "/-/style.css", &headers(&["text/css,*/*;q=0.1"])),
            Some(Form::Html)
        );
        assert_eq!(
            wants(&Method::POST, "/-/login", &headers(&[])),
            Some(Form::Html)
        );
        assert_eq!(wants(&get, "/p/app", &headers(&["text/html;q=0"])), None);
    }
}
