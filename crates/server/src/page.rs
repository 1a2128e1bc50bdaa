//! The chat page `serve` answers `/` with: hand-written HTML, CSS and JavaScript embedded in the
//! binary, so that a browser pointed at the server can chat with no install, build step or CDN.
//!
//! The page is public (it is static and holds no secret); the API calls it makes carry the key
//! the user types when the server answers 401. The Content-Security-Policy allows loads from
//! this server only, so a model's output rendered in the page can never pull in remote code.
use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Only this origin: scripts, styles and API calls; the favicon is an empty `data:` URL.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// (name under `/assets/`, content type, bytes).
const ASSETS: [(&str, &str, &str); 2] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../assets/style.css"),
    ),
];

const INDEX: &str = include_str!("../assets/index.html");

/// The routes of the page, to merge into the app outside the API-key check.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
}

fn respond(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A new binary may bring a new page: revalidate rather than run a stale script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => respond(ct, body),
        None => crate::error::ApiError::not_found(format!("no such asset: /assets/{name}"))
            .with_code("unknown_url")
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_references_only_embedded_assets() {
        for (name, _, body) in ASSETS {
            assert!(!body.is_empty(), "{name}");
            assert!(INDEX.contains(&format!("/assets/{name}")), "{name}");
        }
        // Nothing remote: the CSP would block it anyway, so a reference is a bug.
        for text in [INDEX, ASSETS[0].2, ASSETS[1].2] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }
}
