//! The visualizer's web pages: the analysts' page at `GET /`, the operators' console at
//! `GET /admin`, and their assets under `/assets/`; and the visualizer's part of the
//! OpenAPI document ([`openapi`]), the websocket's included.
//!
//! `build.rs` copies the hand-written page (`web/index.html`, `web/app.js`,
//! `web/style.css`), the console (`web/admin.html`, `web/admin.js`, `web/admin.css`) and
//! uPlot (installed from the npm registry through `web/package-lock.json`) into
//! `$OUT_DIR/web/`; they are embedded here, so the binary serves both with no network
//! and no files beside it.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;

macro_rules! web_asset {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/web/", $file))
    };
}

const INDEX_HTML: &[u8] = web_asset!("index.html");
const APP_JS: &[u8] = web_asset!("app.js");
const STYLE_CSS: &[u8] = web_asset!("style.css");
const UPLOT_JS: &[u8] = web_asset!("uPlot.iife.min.js");
const UPLOT_CSS: &[u8] = web_asset!("uPlot.min.css");
const ADMIN_HTML: &[u8] = web_asset!("admin.html");
const ADMIN_JS: &[u8] = web_asset!("admin.js");
const ADMIN_CSS: &[u8] = web_asset!("admin.css");

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page and the console load only their own assets and talk only to their own
/// origin (the HTTP API and the websocket); uPlot sets inline styles on its elements.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self' ws: wss:; object-src 'none'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'self'";

fn asset(body: &'static [u8], content_type: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 3] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    (headers, body).into_response()
}

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::hub::upgrade,
        index,
        app_js,
        style_css,
        uplot_js,
        uplot_css,
        admin,
        admin_js,
        admin_css
    ),
    tags(
        (name = "live", description = "The websocket that feeds live charts (the protocol is in SPEC §6)."),
        (name = "page", description = "The visualizer's web page, the operators' console, and their assets, served from the binary.")
    )
)]
struct VisualizerDoc;

/// The OpenAPI document of the visualizer's endpoints: the websocket and the page.
pub fn openapi() -> utoipa::openapi::OpenApi {
    VisualizerDoc::openapi()
}

/// The visualizer page.
///
/// It takes a token as `?token=`, which it never sends elsewhere.
#[utoipa::path(
    get,
    path = "/",
    tag = "page",
    responses((status = 200, description = "The page.", body = String, content_type = "text/html"))
)]
async fn index() -> Response {
    html_page(INDEX_HTML)
}

/// An HTML page, with the headers that keep it to its own origin.
fn html_page(body: &'static [u8]) -> Response {
    let mut response = asset(body, HTML);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    // The token may arrive in the page's query string: never send it elsewhere.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The page's script.
#[utoipa::path(
    get,
    path = "/assets/app.js",
    tag = "page",
    responses((status = 200, description = "The page's script.", body = String, content_type = "text/javascript"))
)]
async fn app_js() -> Response {
    asset(APP_JS, JS)
}

/// The page's style sheet.
#[utoipa::path(
    get,
    path = "/assets/style.css",
    tag = "page",
    responses((status = 200, description = "The page's style sheet.", body = String, content_type = "text/css"))
)]
async fn style_css() -> Response {
    asset(STYLE_CSS, CSS)
}

/// uPlot, the charting library.
#[utoipa::path(
    get,
    path = "/assets/uPlot.iife.min.js",
    tag = "page",
    responses((status = 200, description = "uPlot, the charting library.", body = String, content_type = "text/javascript"))
)]
async fn uplot_js() -> Response {
    asset(UPLOT_JS, JS)
}

/// uPlot's style sheet.
#[utoipa::path(
    get,
    path = "/assets/uPlot.min.css",
    tag = "page",
    responses((status = 200, description = "uPlot's style sheet.", body = String, content_type = "text/css"))
)]
async fn uplot_css() -> Response {
    asset(UPLOT_CSS, CSS)
}

/// The operators' console.
///
/// It asks for an admin token (or takes one as `?token=`, which it drops from the address
/// bar and never sends elsewhere) and then uses the HTTP API and the websocket.
#[utoipa::path(
    get,
    path = "/admin",
    tag = "page",
    responses((status = 200, description = "The console.", body = String, content_type = "text/html"))
)]
async fn admin() -> Response {
    html_page(ADMIN_HTML)
}

/// The console's script.
#[utoipa::path(
    get,
    path = "/assets/admin.js",
    tag = "page",
    responses((status = 200, description = "The console's script.", body = String, content_type = "text/javascript"))
)]
async fn admin_js() -> Response {
    asset(ADMIN_JS, JS)
}

/// The console's style sheet.
#[utoipa::path(
    get,
    path = "/assets/admin.css",
    tag = "page",
    responses((status = 200, description = "The console's style sheet.", body = String, content_type = "text/css"))
)]
async fn admin_css() -> Response {
    asset(ADMIN_CSS, CSS)
}

/// Routes of the page and the console: `GET /`, `GET /admin` and `GET /assets/{app.js,
/// style.css, uPlot.iife.min.js, uPlot.min.css, admin.js, admin.css}` (HEAD too), each
/// with its content type and `Cache-Control: no-cache`.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/admin", get(admin))
        .route("/assets/admin.js", get(admin_js))
        .route("/assets/admin.css", get(admin_css))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
        .route("/assets/uPlot.iife.min.js", get(uplot_js))
        .route("/assets/uPlot.min.css", get(uplot_css))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[test]
    fn index_references_every_asset() {
        for asset in [
            "assets/app.js",
            "assets/style.css",
            "assets/uPlot.iife.min.js",
            "assets/uPlot.min.css",
        ] {
            assert!(
                contains(INDEX_HTML, asset),
                "index.html does not load {asset}"
            );
        }
        // Works offline: nothing is loaded from another origin.
        assert!(!contains(INDEX_HTML, "http://") && !contains(INDEX_HTML, "https://"));
    }

    #[test]
    fn the_console_references_its_assets_and_nothing_outside() {
        for asset in ["assets/admin.js", "assets/admin.css"] {
            assert!(
                contains(ADMIN_HTML, asset),
                "admin.html does not load {asset}"
            );
        }
        for page in [ADMIN_HTML, ADMIN_JS, ADMIN_CSS] {
            assert!(!contains(page, "http://") && !contains(page, "https://"));
        }
        // It talks to the API with a bearer token and to the websocket with `?token=`.
        assert!(contains(ADMIN_JS, "Authorization"));
        assert!(contains(ADMIN_JS, "searchParams.set('token'"));
        assert!(contains(ADMIN_JS, "dry_run: true"));
        assert!(contains(ADMIN_CSS, "[data-status=\"failed\"]"));
    }

    #[test]
    fn assets_are_embedded() {
        assert!(
            contains(UPLOT_JS, "uPlot"),
            "uPlot.iife.min.js is not uPlot"
        );
        assert!(
            contains(UPLOT_CSS, ".uplot"),
            "uPlot.min.css is not uPlot's"
        );
        assert!(contains(APP_JS, "\"subscribe\"") || contains(APP_JS, "'subscribe'"));
        assert!(contains(APP_JS, "data-ready") || contains(APP_JS, "dataset.ready"));
        assert!(contains(STYLE_CSS, "[data-status=\"failed\"]"));
    }

    /// Serves the router on a local port and reads raw HTTP responses from it.
    async fn get_raw(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8_lossy(&response).into_owned()
    }

    #[tokio::test]
    async fn serves_page_and_assets_with_content_types() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(listener, router()).await.expect("serve");
        });

        for (path, content_type, marker) in [
            ("/", "text/html; charset=utf-8", "assets/app.js"),
            (
                "/assets/app.js",
                "text/javascript; charset=utf-8",
                "subscribe",
            ),
            (
                "/assets/style.css",
                "text/css; charset=utf-8",
                "data-status",
            ),
            (
                "/assets/uPlot.iife.min.js",
                "text/javascript; charset=utf-8",
                "uPlot",
            ),
            ("/assets/uPlot.min.css", "text/css; charset=utf-8", ".uplot"),
            ("/admin", "text/html; charset=utf-8", "assets/admin.js"),
            (
                "/assets/admin.js",
                "text/javascript; charset=utf-8",
                "subscribe",
            ),
            (
                "/assets/admin.css",
                "text/css; charset=utf-8",
                "data-status",
            ),
        ] {
            let response = get_raw(addr, path).await;
            let lower = response.to_ascii_lowercase();
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "{path}: {}",
                response.chars().take(300).collect::<String>()
            );
            assert!(
                lower.contains(&format!("content-type: {content_type}")),
                "{path}: wrong content type"
            );
            assert!(
                lower.contains("cache-control: no-cache"),
                "{path}: no Cache-Control"
            );
            assert!(response.contains(marker), "{path}: body lacks {marker}");
        }
        let console = get_raw(addr, "/admin").await.to_ascii_lowercase();
        assert!(
            console.contains("content-security-policy: default-src 'self'"),
            "{console}"
        );
        assert!(
            console.contains("referrer-policy: no-referrer"),
            "{console}"
        );
        let missing = get_raw(addr, "/assets/nope.js").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        server.abort();
    }
}
